// Small DOM helpers: elements built with textContent only (never innerHTML: client ids and
// endpoint names come from requests), tables, and number formats.

type Child = Node | string | null;

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const c of children) if (c !== null) e.append(c);
  return e;
}

export function byId<T extends HTMLElement = HTMLElement>(id: string): T {
  const e = document.getElementById(id);
  if (e === null) throw new Error(`no #${id}`);
  return e as T;
}

export interface Column<R> {
  title: string;
  cell: (row: R) => Child;
  num?: boolean;
}

export function table<R>(rows: R[], columns: Column<R>[], empty: string, name: string): HTMLElement {
  if (rows.length === 0) return h("p", { class: "empty" }, empty);
  const head = h("tr", {}, ...columns.map((c) => h("th", { scope: "col", class: c.num ? "num" : "" }, c.title)));
  const body = rows.map((r) => h("tr", {}, ...columns.map((c) => h("td", { class: c.num ? "num" : "" }, c.cell(r)))));
  return h("table", { "data-table": name }, h("thead", {}, head), h("tbody", {}, ...body));
}

// Replace a container's content only when it changed, so a refresh does not move the focus
// or the scroll of a table that shows the same rows.
export function show(container: HTMLElement, content: HTMLElement, key: string): void {
  if (container.dataset.key === key) return;
  container.dataset.key = key;
  container.replaceChildren(content);
}

const INT = new Intl.NumberFormat("en");

export function int(n: number): string {
  return INT.format(n);
}

export function pct(part: number, whole: number): string {
  return whole ? `${((100 * part) / whole).toFixed(1)} %` : "–";
}

export function ms(us: number | null): string {
  if (us === null) return "–";
  return us < 1000 ? `${(us / 1000).toFixed(2)} ms` : `${(us / 1000).toFixed(us < 10_000 ? 1 : 0)} ms`;
}

export function duration(msLeft: number): string {
  if (msLeft <= 0) return "full";
  const s = msLeft / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

export function clock(t: number, withDate: boolean): string {
  const d = new Date(t * 1000);
  const time = d.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit" });
  return withDate ? `${d.toLocaleDateString("en-CA")} ${time}` : time;
}

export function cards(dl: HTMLElement, items: [string, string][]): void {
  const row = h("div", { class: "cardrow" }, ...items.map(([k, v]) => h("div", { class: "card" }, h("dt", {}, k), h("dd", {}, v))));
  show(dl, row, JSON.stringify(items));
}
