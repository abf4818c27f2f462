// The volume chart (uPlot) and the same numbers as a table (for screen readers, keyboard users
// and anyone who wants the figures). Outcomes are grouped as the page names them.

import uPlot from "uplot";
import type { Point } from "./api";
import { type Column, clock, h, int, show, table } from "./dom";

export const GROUPS: Record<string, string[]> = {
  allowed: ["allowed"],
  limited: ["limited"],
  "shadow-limited": ["shadow_limited"],
  failed: ["failed_open", "failed_closed"],
  other: ["unauthorized", "skipped"],
};
const COLOURS = ["--ok", "--limited", "--shadow", "--failed", "--other"];

export function grouped(p: Point): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [name, outcomes] of Object.entries(GROUPS)) {
    out[name] = outcomes.reduce((n, o) => n + (p.outcomes[o] ?? 0), 0);
  }
  return out;
}

export class VolumeChart {
  private plot: uPlot | null = null;
  private key = "";

  constructor(
    private readonly box: HTMLElement,
    private readonly data: HTMLElement,
    private readonly label: string,
  ) {
    new ResizeObserver(() => this.plot?.setSize(this.size())).observe(box);
  }

  private size(): { width: number; height: number } {
    const width = Math.max(240, this.box.clientWidth);
    return { width, height: Math.round(Math.min(280, Math.max(180, width / 4))) };
  }

  // Recreated when the theme changes (its colours are read from the page's CSS variables).
  reset(): void {
    this.plot?.destroy();
    this.plot = null;
    this.key = "";
  }

  draw(points: Point[], step: number): void {
    const key = `${step}:${JSON.stringify(points)}`;
    if (key === this.key) return;
    this.key = key;
    const names = Object.keys(GROUPS);
    const rows = points.map((p) => ({ t: p.t, g: grouped(p) }));
    const cols: uPlot.AlignedData = [rows.map((r) => r.t), ...names.map((n) => rows.map((r) => r.g[n] ?? 0))];
    const withDate = step >= 3600;
    this.renderTable(rows, names, withDate);
    if (this.plot !== null) {
      this.plot.setData(cols);
      return;
    }
    const css = getComputedStyle(document.documentElement);
    const colour = (v: string) => css.getPropertyValue(v).trim() || "#888";
    const axis = { stroke: colour("--fg"), grid: { stroke: colour("--grid") }, ticks: { stroke: colour("--grid") } };
    this.plot = new uPlot(
      {
        ...this.size(),
        title: "",
        scales: { x: { time: true } },
        axes: [axis, { ...axis, size: 56 }],
        legend: { live: true },
        series: [
          { label: "time" },
          ...names.map((n, i) => ({ label: n, stroke: colour(COLOURS[i] ?? "--fg"), width: 2, points: { show: false } })),
        ],
      },
      cols,
      this.box,
    );
    this.box.setAttribute("role", "img");
    this.box.setAttribute("aria-label", `${this.label}: requests per ${withDate ? "hour" : "minute"} by outcome`);
  }

  private renderTable(rows: { t: number; g: Record<string, number> }[], names: string[], withDate: boolean): void {
    const busy = rows.filter((r) => names.some((n) => (r.g[n] ?? 0) > 0));
    const columns: Column<{ t: number; g: Record<string, number> }>[] = [
      { title: "time", cell: (r) => h("time", { datetime: new Date(r.t * 1000).toISOString() }, clock(r.t, withDate)) },
      ...names.map((n) => ({ title: n, num: true, cell: (r: { g: Record<string, number> }) => int(r.g[n] ?? 0) })),
    ];
    show(this.data, table(busy, columns, "no requests in this range", "series"), JSON.stringify(busy));
  }
}
