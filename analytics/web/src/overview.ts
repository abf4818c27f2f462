// The overview: cards, volume, top consumers (with their buckets now), endpoints, limited now,
// and the policy cards.

import { ApiError, type Bucket, bucketClient, type Consumer, type Endpoint, type Limited, type Overview, type Policies, type Series } from "./api";
import type { VolumeChart } from "./chart";
import { base, type Ctx } from "./ctx";
import { byId, cards, clock, duration, h, int, ms, pct, show, table } from "./dom";
import { rangeOf } from "./view";

export async function refreshOverview(ctx: Ctx, chart: VolumeChart): Promise<void> {
  const a = ctx.api;
  const view = ctx.view;
  const r = rangeOf(view.range, Date.now());
  const q = { ...base(view), start: r.start, end: r.end };
  const [ov, series, eps, lim] = await Promise.all([
    a.get<Overview>("v1/overview", q),
    a.get<Series>("v1/series", { ...q, step: r.step }),
    a.get<{ endpoints: Endpoint[] }>("v1/endpoints", q),
    a.get<{ clients: Limited[] }>("v1/limited", { ...base(view), minutes: 5 }),
  ]);
  cards(byId("cards"), [
    ["Requests", int(ov.requests)],
    ["Success rate", pct(ov.success, ov.requests)],
    ["Limited", pct(ov.outcomes.limited ?? 0, ov.requests)],
    ["Avg latency", ms(ov.latency_avg_us)],
    ["p95 latency", ms(ov.latency_p95_us)],
    ["Active consumers", int(ov.clients)],
  ]);
  byId("volume-step").textContent = `per ${r.step >= 3600 ? "hour" : "minute"}, last ${view.range}`;
  chart.draw(series.points, series.step);
  await renderConsumers(ctx, ov.consumers);
  show(
    byId("endpoints"),
    table(
      eps.endpoints,
      [
        { title: "endpoint", cell: (e) => h("code", {}, e.endpoint) },
        { title: "requests", num: true, cell: (e) => int(e.requests) },
        { title: "limited", num: true, cell: (e) => int(e.limited) },
        { title: "avg", num: true, cell: (e) => ms(e.latency_avg_us) },
        { title: "p95", num: true, cell: (e) => ms(e.latency_p95_us) },
      ],
      "no requests in this range",
      "endpoints",
    ),
    JSON.stringify(eps.endpoints),
  );
  show(
    byId("limited"),
    table(
      lim.clients,
      [
        { title: "client", cell: (l) => clientButton(l.client, ctx.open) },
        { title: "policy", cell: (l) => l.policy },
        { title: "tier", cell: (l) => l.tier },
        { title: "rule", cell: (l) => h("code", {}, l.endpoint) },
        { title: "refused", num: true, cell: (l) => int(l.limited) },
        { title: "last", cell: (l) => clock(l.last_minute, false) },
      ],
      "nobody was refused in the last 5 minutes",
      "limited",
    ),
    JSON.stringify(lim.clients),
  );
}

function clientButton(client: string, open: (client: string) => void): HTMLElement {
  const b = h("button", { type: "button", class: "link", "data-client": client }, client);
  b.addEventListener("click", () => open(client));
  return b;
}

function bucketSummary(buckets: Bucket[]): string {
  if (buckets.length === 0) return "–";
  const tightest = buckets.reduce((a, b) => (b.remaining / b.capacity < a.remaining / a.capacity ? b : a));
  const full = Math.max(...buckets.map((b) => b.full_in_ms));
  return `${int(tightest.remaining)}/${int(tightest.capacity)} left · ${duration(full)}`;
}

async function renderConsumers(ctx: Ctx, consumers: Consumer[]): Promise<void> {
  const { api: a, view, policy } = ctx;
  byId("consumers-note").textContent = policy
    ? `buckets now under ${policy.ref}`
    : "choose a policy to see their buckets now";
  const live = await Promise.all(
    consumers.map(async (c) => {
      const who = bucketClient(c.client);
      if (policy === null || who === null) return "–";
      try {
        const body = await a.get<{ buckets: Bucket[] }>("v1/buckets", { namespace: view.namespace, policy: policy.ref, client: who });
        return bucketSummary(body.buckets);
      } catch (e) {
        if (e instanceof ApiError && e.status === 401) throw e;
        return "–";
      }
    }),
  );
  const rows = consumers.map((c, i) => ({ ...c, live: live[i] ?? "–" }));
  show(
    byId("consumers"),
    table(
      rows,
      [
        { title: "client", cell: (c) => clientButton(c.client, ctx.open) },
        { title: "tier", cell: (c) => c.tiers.join(", ") },
        { title: "requests", num: true, cell: (c) => int(c.requests) },
        { title: "limited", num: true, cell: (c) => int(c.limited) },
        { title: "tokens", num: true, cell: (c) => int(c.tokens) },
        { title: "bucket now", cell: (c) => c.live },
      ],
      "no consumers in this range",
      "consumers",
    ),
    JSON.stringify(rows),
  );
}

function period(s: number | undefined): string {
  if (s === undefined) return "?";
  for (const [unit, n] of [["d", 86400], ["h", 3600], ["min", 60]] as const) {
    if (s >= n && s % n === 0) return s === n ? unit : `${s / n} ${unit}`;
  }
  return `${s} s`;
}

export function renderPolicies(body: Policies): void {
  const src = body.source === "status" ? "from the policies' status" : "from the sidecars' heartbeats";
  byId("policies-source").textContent = body.sidecars === null ? src : `${src}, ${body.sidecars} sidecars beating`;
  const flag = (name: string, ok: boolean) => h("li", { class: ok ? "ok" : "bad" }, `${ok ? "✓" : "✗"} ${name}`);
  const cards = body.policies.map((p) =>
    h(
      "article",
      { class: "policy", "data-policy": p.ref },
      h("h3", {}, p.ref),
      h("p", {}, h("span", { class: `mode ${p.mode}` }, p.mode), ` · fails ${p.failure_mode}`),
      h("ul", { class: "flags" }, flag("Accepted", p.accepted), flag("Programmed", p.programmed), flag("Enforced", p.enforced)),
      h("p", {}, `${p.enforced_sidecars ?? "?"} sidecars enforce version ${p.config_version ?? "?"}`),
      h(
        "ul",
        { class: "tiers" },
        ...p.tiers.map((t) =>
          h("li", {}, `${t.name}${t.name === p.default_tier ? " (default)" : ""}: ${t.requests ?? "?"} per ${t.period ?? period(t.period_s)}`),
        ),
      ),
    ),
  );
  show(byId("policies"), cards.length ? h("div", { class: "cardgrid" }, ...cards) : h("p", { class: "empty" }, "no policy in this namespace"), JSON.stringify(body));
}
