// One client's view: its cards and series, its buckets under the policy (an API key's found by
// the key, hashed in the page), and the reset for callers allowed to.

import { ApiError, type Bucket, bucketClient, type ClientUsage, type Series } from "./api";
import type { VolumeChart } from "./chart";
import { base, type Ctx } from "./ctx";
import { byId, cards, duration, h, int, show, table } from "./dom";
import { rangeOf } from "./view";

export async function refreshClient(ctx: Ctx, chart: VolumeChart, keyBucketClient: string): Promise<void> {
  const a = ctx.api;
  const view = ctx.view;
  const r = rangeOf(view.range, Date.now());
  const q = { ...base(view), start: r.start, end: r.end };
  const path = `v1/clients/${encodeURIComponent(view.client)}`;
  const [usage, series] = await Promise.all([
    a.get<ClientUsage>(path, q),
    a.get<Series>("v1/series", { ...q, client: view.client, step: r.step }),
  ]);
  byId("client-h").textContent = view.client;
  cards(byId("client-cards"), [
    ["Requests", int(usage.requests)],
    ["Allowed", int(usage.outcomes.allowed ?? 0)],
    ["Limited", int(usage.outcomes.limited ?? 0)],
    ["Tokens", int(usage.tokens)],
  ]);
  chart.draw(series.points, series.step);
  await renderBuckets(ctx, keyBucketClient);
}

export async function renderBuckets(ctx: Ctx, keyBucketClient: string): Promise<void> {
  const { api: a, view, policy } = ctx;
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

export async function confirmReset(ctx: Ctx, keyBucketClient: string): Promise<void> {
  const { api, view, policy } = ctx;
  const who = view.client.startsWith("key:") ? keyBucketClient : bucketClient(view.client);
  if (policy === null || !who) return;
  const dialog = byId<HTMLDialogElement>("confirm");
  byId("confirm-text").textContent = `Every bucket of ${view.client} under ${policy.ref} becomes full again. This is logged.`;
  dialog.returnValue = "";
  dialog.showModal();
  await new Promise<void>((done) => dialog.addEventListener("close", () => done(), { once: true }));
  if (dialog.returnValue !== "reset") return;
  try {
    const body = await api.del<{ deleted: number }>("v1/buckets", { namespace: view.namespace, policy: policy.ref, client: who });
    ctx.status(`Reset: ${body.deleted} buckets of ${view.client} deleted (full again)`);
    byId("buckets").dataset.key = "";
    await renderBuckets(ctx, keyBucketClient);
  } catch (e) {
    ctx.status(`Reset failed: ${e instanceof ApiError ? e.detail : String(e)}`, true);
  }
  byId("reset").focus();
}
