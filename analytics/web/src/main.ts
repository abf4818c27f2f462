// The dashboard: sign-in, then the overview (cards, volume, consumers, endpoints, limited now,
// policies) or one client's view, refreshed every few seconds while the tab is visible.

import { Api, ApiError, keyClient, type Overview, type Policies, type Policy } from "./api";
import { VolumeChart } from "./chart";
import { confirmReset, refreshClient, renderBuckets } from "./client";
import { base, type Ctx } from "./ctx";
import { byId, h, show } from "./dom";
import { refreshOverview, renderPolicies } from "./overview";
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
    if (view.client) {
      byId("overview").hidden = true;
      byId("client").hidden = false;
      await refreshClient(ctx(api), clientChart, keyBucketClient);
    } else {
      byId("client").hidden = true;
      byId("overview").hidden = false;
      await refreshOverview(ctx(api), overviewChart);
    }
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

function ctx(a: Api): Ctx {
  return { api: a, view, policy: bucketPolicy(), open: (client) => navigate({ client }), status };
}

// --- one client -------------------------------------------------------------------------------

// --- export, theme, wiring ----------------------------------------------------------------------

async function exportCsv(): Promise<void> {
  if (api === null) return;
  const r = rangeOf(view.range, Date.now());
  const day = (t: number) => new Date(t * 1000).toISOString().slice(0, 10);
  const from = day(r.start);
  const to = day(r.end - 1);
  try {
    const blob = await api.blob("v1/report.csv", { ...base(view), from, to });
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
  byId("reset").addEventListener("click", () => {
    if (api !== null) void confirmReset(ctx(api), keyBucketClient);
  });
  byId<HTMLFormElement>("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = byId<HTMLInputElement>("k-key");
    const key = input.value;
    input.value = "";
    void keyClient(key).then((c) => {
      keyBucketClient = c;
      byId("buckets").dataset.key = "";
      if (api !== null) void renderBuckets(ctx(api), keyBucketClient);
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
