// What the page shows, in its URL: a view can be shared as a link. namespace, policy, range
// (1h, 24h, 7d, 30d) and, for one client's view, client.

export const RANGES = { "1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400 } as const;
export type Range = keyof typeof RANGES;

export interface View {
  namespace: string;
  policy: string;
  range: Range;
  client: string;
}

function isRange(v: string | null): v is Range {
  return v !== null && Object.hasOwn(RANGES, v);
}

export function readView(): View {
  const q = new URLSearchParams(location.search);
  const range = q.get("range");
  return {
    namespace: q.get("namespace") ?? "",
    policy: q.get("policy") ?? "",
    range: isRange(range) ? range : "1h",
    client: q.get("client") ?? "",
  };
}

export function writeView(v: View, push: boolean): void {
  const q = new URLSearchParams();
  if (v.namespace) q.set("namespace", v.namespace);
  if (v.policy) q.set("policy", v.policy);
  q.set("range", v.range);
  if (v.client) q.set("client", v.client);
  const url = `${location.pathname}?${q.toString()}`;
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}

// The range as the API reads it: per minute up to an hour, per hour beyond (whole hours, so
// the rollups answer); the end is the next whole step, so the current minute (hour) is in it.
export function rangeOf(range: Range, nowMs: number): { start: number; end: number; step: number } {
  const span = RANGES[range];
  const step = span <= 3600 ? 60 : 3600;
  const now = Math.floor(nowMs / 1000);
  const end = now - (now % step) + step;
  return { start: end - span, end, step };
}
