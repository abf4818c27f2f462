// The dashboard: sign-in, then the overview (cards, volume, consumers, endpoints, limited now,
// policies) or one client's view, refreshed every few seconds while the tab is visible.

import {
  Api,
  ApiError,
  type Bucket,
  bucketClient,
  type ClientUsage,
  type Consumer,
  type Endpoint,
  keyClient,
  type Limited,
  type Overview,
  type Policies,
  type Policy,
  type Series,
} from "./api";
import { VolumeChart } from "./chart";
import { byId, clock, duration, h, int, ms, pct, show, table } from "./dom";
import { RANGES, type Range, rangeOf, readView, type View, writeView } from "./view";

const TOKEN_KEY = "sluice.analytics.token";
const THEME_KEY = "sluice.analytics.theme";
const REFRESH_MS = 5000;

let api: Api | null = null;
let view: View = readView();
let policies: Policy[] = [];
let keyBucketClient = "";
let timer = 0;
let busy = false;

const overviewChart = new VolumeChart(byId("volume-chart"), byId("volume-data"), "Volume");
const clientChart = new VolumeChart(byId("client-chart"), byId("client-data"), "Client volume");

function status(text: string, error = false): void {
  const s = byId("status");
  s.textContent = text;
  s.classList.toggle("error", error);
}

// --- sign-in -------------------------------------------------------------------------------

function signedOut(message: string): void {
  api = null;
  sessionStorage.removeItem(TOKEN_KEY);
  window.clearTimeout(timer);
  for (const id of ["overview", "client", "filters"]) byId(id).hidden = true;
  byId("signin").hidden = false;
  byId("signin-error").textContent = message;
  byId<HTMLInputElement>("s-namespace").value = view.namespace || "default";
  status("");
  byId<HTMLInputElement>("s-token").focus();
}

async function signIn(token: string, namespace: string): Promise<void> {
  const candidate = new Api(token);
  const r = rangeOf(view.range, Date.now());
  try {
    await candidate.get<Overview>("v1/overview", { namespace, start: r.start, end: r.end, limit: 1 });
  } catch (e) {
    const why = e instanceof ApiError ? e.detail : String(e);
    signedOut(e instanceof ApiError && e.status === 403 ? `Not allowed in namespace ${namespace}: ${why}` : why);
    return;
  }
  api = candidate;
  sessionStorage.setItem(TOKEN_KEY, token);
  view = { ...view, namespace };
  writeView(view, false);
  byId("signin").hidden = true;
  byId("filters").hidden = false;
  syncFilters();
  await refresh();
}

// --- the URL's view and the filters ---------------------------------------------------------

function syncFilters(): void {
  byId<HTMLInputElement>("f-namespace").value = view.namespace;
  const sel = byId<HTMLSelectElement>("f-policy");
  const refs = policies.map((p) => p.ref);
  if (view.policy && !refs.includes(view.policy)) refs.push(view.policy);
  const want = ["", ...refs].join("\n");
  if (sel.dataset.options !== want) {
    sel.dataset.options = want;
    sel.replaceChildren(h("option", { value: "" }, "all policies"), ...refs.map((r) => h("option", { value: r }, r)));
  }
  sel.value = view.policy;
  for (const b of document.querySelectorAll<HTMLButtonElement>("[data-range]")) {
    b.setAttribute("aria-pressed", String(b.dataset.range === view.range));
  }
}

function navigate(change: Partial<View>, push = true): void {
  const namespaceChanged = change.namespace !== undefined && change.namespace !== view.namespace;
  if (change.client !== undefined && change.client !== view.client) keyBucketClient = "";
  view = { ...view, ...change };
  if (namespaceChanged) {
    policies = [];
    view.policy = change.policy ?? "";
  }
  writeView(view, push);
  syncFilters();
  void refresh();
}

// --- refresh ----------------------------------------------------------------------------------

async function refresh(): Promise<void> {
  window.clearTimeout(timer);
  if (api === null) return;
  if (busy) {
    timer = window.setTimeout(() => void refresh(), 200);
    return;
  }
  busy = true;
  try {
    await loadPolicies(api);
    if (view.client) await refreshClient(api);
    else await refreshOverview(api);
    status(`Updated ${new Date().toLocaleTimeString("en-GB")}`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      signedOut(`The token is no longer accepted: ${e.detail}`);
      return;
    }
    status(`Refresh failed: ${e instanceof ApiError ? e.detail : String(e)}`, true);
  } finally {
    busy = false;
  }
  if (byId<HTMLInputElement>("f-live").checked) {
    timer = window.setTimeout(() => {
      if (document.visibilityState === "visible") void refresh();
      else timer = window.setTimeout(() => void refresh(), REFRESH_MS);
    }, REFRESH_MS);
  }
}

function base(): { namespace: string; policy: string } {
  return { namespace: view.namespace, policy: view.policy };
}

// A failure here (the collector's account may not list policies) costs the policy cards only.
async function loadPolicies(a: Api): Promise<void> {
  let body: Policies;
  try {
    body = await a.get<Policies>("v1/policies", { namespace: view.namespace });
  } catch (e) {
    if (!(e instanceof ApiError) || e.status === 401) throw e;
    const why = `Policies could not be read: ${e.detail}`;
    show(byId("policies"), h("p", { class: "error" }, why), why);
    return;
  }
  policies = body.policies;
  syncFilters();
  renderPolicies(body);
}

// The policy whose buckets a client is shown under: the filter's, or the namespace's only one.
function bucketPolicy(): Policy | null {
  if (view.policy) return policies.find((p) => p.ref === view.policy) ?? null;
  return policies.length === 1 ? (policies[0] ?? null) : null;
}

async function refreshOverview(a: Api): Promise<void> {
  byId("client").hidden = true;
  byId("overview").hidden = false;
  const r = rangeOf(view.range, Date.now());
  const q = { ...base(), start: r.start, end: r.end };
  const [ov, series, eps, lim] = await Promise.all([
    a.get<Overview>("v1/overview", q),
    a.get<Series>("v1/series", { ...q, step: r.step }),
    a.get<{ endpoints: Endpoint[] }>("v1/endpoints", q),
    a.get<{ clients: Limited[] }>("v1/limited", { ...base(), minutes: 5 }),
  ]);
  renderCards(byId("cards"), [
    ["Requests", int(ov.requests)],
    ["Success rate", pct(ov.success, ov.requests)],
    ["Limited", pct(ov.outcomes.limited ?? 0, ov.requests)],
    ["Avg latency", ms(ov.latency_avg_us)],
    ["p95 latency", ms(ov.latency_p95_us)],
    ["Active consumers", int(ov.clients)],
  ]);
  byId("volume-step").textContent = `per ${r.step >= 3600 ? "hour" : "minute"}, last ${view.range}`;
  overviewChart.draw(series.points, series.step);
  await renderConsumers(a, ov.consumers);
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
        { title: "client", cell: (l) => clientButton(l.client) },
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

function renderCards(dl: HTMLElement, cards: [string, string][]): void {
  show(dl, h("div", { class: "cardrow" }, ...cards.map(([k, v]) => h("div", { class: "card" }, h("dt", {}, k), h("dd", {}, v)))), JSON.stringify(cards));
}

function clientButton(client: string): HTMLElement {
  const b = h("button", { type: "button", class: "link", "data-client": client }, client);
  b.addEventListener("click", () => navigate({ client }));
  return b;
}

function bucketSummary(buckets: Bucket[]): string {
  if (buckets.length === 0) return "–";
  const tightest = buckets.reduce((a, b) => (b.remaining / b.capacity < a.remaining / a.capacity ? b : a));
  const full = Math.max(...buckets.map((b) => b.full_in_ms));
  return `${int(tightest.remaining)}/${int(tightest.capacity)} left · ${duration(full)}`;
}

async function renderConsumers(a: Api, consumers: Consumer[]): Promise<void> {
  const policy = bucketPolicy();
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
        { title: "client", cell: (c) => clientButton(c.client) },
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

function renderPolicies(body: Policies): void {
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

// --- one client -------------------------------------------------------------------------------

async function refreshClient(a: Api): Promise<void> {
  byId("overview").hidden = true;
  byId("client").hidden = false;
  const r = rangeOf(view.range, Date.now());
  const q = { ...base(), start: r.start, end: r.end };
  const path = `v1/clients/${encodeURIComponent(view.client)}`;
  const [usage, series] = await Promise.all([
    a.get<ClientUsage>(path, q),
    a.get<Series>("v1/series", { ...q, client: view.client, step: r.step }),
  ]);
  byId("client-h").textContent = view.client;
  renderCards(byId("client-cards"), [
    ["Requests", int(usage.requests)],
    ["Allowed", int(usage.outcomes.allowed ?? 0)],
    ["Limited", int(usage.outcomes.limited ?? 0)],
    ["Tokens", int(usage.tokens)],
  ]);
  clientChart.draw(series.points, series.step);
  await renderBuckets(a);
}

async function renderBuckets(a: Api): Promise<void> {
  const policy = bucketPolicy();
  const isKey = view.client.startsWith("key:");
  byId("key-form").hidden = !isKey || policy === null;
  const reset = byId("reset");
  const who = isKey ? keyBucketClient || null : bucketClient(view.client);
  byId("buckets-policy").textContent = policy ? `under ${policy.ref}` : "";
  if (policy === null || who === null) {
    reset.hidden = true;
    const why = policy === null ? "Choose a policy to see this client's buckets." : isKey ? "Give the API key to find its buckets." : "This client's buckets cannot be named from its usage name.";
    show(byId("buckets"), h("p", { class: "empty" }, why), why);
    return;
  }
  const body = await a.get<{ buckets: Bucket[] }>("v1/buckets", { namespace: view.namespace, policy: policy.ref, client: who });
  reset.hidden = !policy.may_reset;
  show(
    byId("buckets"),
    table(
      body.buckets,
      [
        { title: "bucket", cell: (b) => `${b.kind} ${b.name}` },
        { title: "tokens left", num: true, cell: (b) => `${int(b.remaining)} / ${int(b.capacity)}` },
        { title: "full in", num: true, cell: (b) => duration(b.full_in_ms) },
        { title: "next token in", num: true, cell: (b) => duration(b.next_token_in_ms) },
      ],
      "this policy has no bucket for the client",
      "buckets",
    ),
    JSON.stringify(body.buckets),
  );
}

async function confirmReset(): Promise<void> {
  const policy = bucketPolicy();
  const who = view.client.startsWith("key:") ? keyBucketClient : bucketClient(view.client);
  if (api === null || policy === null || !who) return;
  const dialog = byId<HTMLDialogElement>("confirm");
  byId("confirm-text").textContent = `Every bucket of ${view.client} under ${policy.ref} becomes full again. This is logged.`;
  dialog.returnValue = "";
  dialog.showModal();
  await new Promise<void>((done) => dialog.addEventListener("close", () => done(), { once: true }));
  if (dialog.returnValue !== "reset") return;
  try {
    const body = await api.del<{ deleted: number }>("v1/buckets", { namespace: view.namespace, policy: policy.ref, client: who });
    status(`Reset: ${body.deleted} buckets of ${view.client} deleted (full again)`);
    byId("buckets").dataset.key = "";
    await renderBuckets(api);
  } catch (e) {
    status(`Reset failed: ${e instanceof ApiError ? e.detail : String(e)}`, true);
  }
  byId("reset").focus();
}

// --- export, theme, wiring ----------------------------------------------------------------------

async function exportCsv(): Promise<void> {
  if (api === null) return;
  const r = rangeOf(view.range, Date.now());
  const day = (t: number) => new Date(t * 1000).toISOString().slice(0, 10);
  const from = day(r.start);
  const to = day(r.end - 1);
  try {
    const blob = await api.blob("v1/report.csv", { ...base(), from, to });
    const a = h("a", { href: URL.createObjectURL(blob), download: `sluice-usage-${view.namespace}-${from}-${to}.csv` });
    a.click();
    window.setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
  } catch (e) {
    status(`Export failed: ${e instanceof ApiError ? e.detail : String(e)}`, true);
  }
}

function applyTheme(theme: string): void {
  const root = document.documentElement;
  if (theme === "light" || theme === "dark") root.dataset.theme = theme;
  else delete root.dataset.theme;
  byId("theme").setAttribute("aria-label", `Theme: ${theme || "automatic"} (change)`);
  overviewChart.reset();
  clientChart.reset();
}

function wire(): void {
  byId<HTMLFormElement>("signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = byId<HTMLInputElement>("s-token").value.trim();
    const namespace = byId<HTMLInputElement>("s-namespace").value.trim();
    byId<HTMLInputElement>("s-token").value = "";
    void signIn(token, namespace);
  });
  byId<HTMLFormElement>("filters").addEventListener("submit", (ev) => ev.preventDefault());
  byId<HTMLInputElement>("f-namespace").addEventListener("change", (ev) => {
    const ns = (ev.target as HTMLInputElement).value.trim();
    if (ns) navigate({ namespace: ns, client: "" });
  });
  byId<HTMLSelectElement>("f-policy").addEventListener("change", (ev) => navigate({ policy: (ev.target as HTMLSelectElement).value }));
  for (const b of document.querySelectorAll<HTMLButtonElement>("[data-range]")) {
    b.addEventListener("click", () => navigate({ range: (b.dataset.range ?? "1h") as Range }));
  }
  byId<HTMLInputElement>("f-live").addEventListener("change", () => void refresh());
  byId("csv").addEventListener("click", () => void exportCsv());
  byId("signout").addEventListener("click", () => signedOut("Signed out."));
  byId("back").addEventListener("click", () => navigate({ client: "" }));
  byId("reset").addEventListener("click", () => void confirmReset());
  byId<HTMLFormElement>("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = byId<HTMLInputElement>("k-key");
    const key = input.value;
    input.value = "";
    void keyClient(key).then((c) => {
      keyBucketClient = c;
      byId("buckets").dataset.key = "";
      if (api !== null) void renderBuckets(api);
    });
  });
  byId("theme").addEventListener("click", () => {
    const order = ["", "light", "dark"];
    const next = order[(order.indexOf(localStorage.getItem(THEME_KEY) ?? "") + 1) % order.length] ?? "";
    localStorage.setItem(THEME_KEY, next);
    applyTheme(next);
    void refresh();
  });
  window.addEventListener("popstate", () => {
    view = readView();
    keyBucketClient = "";
    syncFilters();
    void refresh();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && api !== null && byId<HTMLInputElement>("f-live").checked) void refresh();
  });
}

function boot(): void {
  applyTheme(localStorage.getItem(THEME_KEY) ?? "");
  wire();
  if (!Object.hasOwn(RANGES, view.range)) view.range = "1h";
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token && view.namespace) void signIn(token, view.namespace);
  else signedOut("");
}

boot();
