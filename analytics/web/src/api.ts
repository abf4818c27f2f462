// The analytics API as the page calls it: same origin, the token as a bearer header, errors as
// the API's problem+json (status and detail).

export type Outcomes = Record<string, number>;

export interface Overview {
  start: number;
  end: number;
  requests: number;
  tokens: number;
  outcomes: Outcomes;
  statuses: Record<string, number>;
  success: number;
  clients: number;
  latency_avg_us: number | null;
  latency_p95_us: number | null;
  consumers: Consumer[];
}
export interface Consumer {
  client: string;
  requests: number;
  limited: number;
  tokens: number;
  tiers: string[];
}
export interface Point {
  t: number;
  requests: number;
  tokens: number;
  outcomes: Outcomes;
}
export interface Series {
  start: number;
  end: number;
  step: number;
  points: Point[];
}
export interface Endpoint {
  endpoint: string;
  requests: number;
  limited: number;
  latency_avg_us: number | null;
  latency_p95_us: number | null;
}
export interface Limited {
  client: string;
  policy: string;
  tier: string;
  endpoint: string;
  limited: number;
  last_minute: number;
}
export interface Tier {
  name: string;
  requests: number | null;
  period_s?: number;
  period?: string;
  burst: number | null;
}
export interface Policy {
  ref: string;
  name: string;
  cluster: boolean;
  mode: string;
  failure_mode: string;
  default_tier: string | null;
  tiers: Tier[];
  accepted: boolean;
  programmed: boolean;
  enforced: boolean;
  config_version: number | null;
  enforced_sidecars: number | null;
  may_reset: boolean;
}
export interface Policies {
  source: string;
  sidecars: number | null;
  policies: Policy[];
  truncated: boolean;
}
export interface Bucket {
  kind: string;
  name: string;
  capacity: number;
  remaining: number;
  full_in_ms: number;
  next_token_in_ms: number;
}
export interface ClientUsage {
  client: string;
  requests: number;
  tokens: number;
  bytes_in: number;
  bytes_out: number;
  outcomes: Outcomes;
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly detail: string,
  ) {
    super(`${status}: ${detail}`);
  }
}

export type Query = Record<string, string | number | null | undefined>;

export class Api {
  constructor(private readonly token: string) {}

  url(path: string, query: Query): string {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) {
      if (v !== null && v !== undefined && v !== "") q.set(k, String(v));
    }
    return `${path}?${q.toString()}`;
  }

  async call(method: string, path: string, query: Query): Promise<Response> {
    let resp: Response;
    try {
      resp = await fetch(this.url(path, query), {
        method,
        headers: { Authorization: `Bearer ${this.token}` },
        cache: "no-store",
        credentials: "omit",
      });
    } catch {
      throw new ApiError(0, "the collector did not answer");
    }
    if (!resp.ok) {
      let detail = resp.statusText;
      try {
        const body = (await resp.json()) as { detail?: string };
        detail = body.detail ?? detail;
      } catch {
        // not problem+json: keep the status text
      }
      throw new ApiError(resp.status, detail);
    }
    return resp;
  }

  async get<T>(path: string, query: Query): Promise<T> {
    return (await (await this.call("GET", path, query)).json()) as T;
  }

  async del<T>(path: string, query: Query): Promise<T> {
    return (await (await this.call("DELETE", path, query)).json()) as T;
  }

  async blob(path: string, query: Query): Promise<Blob> {
    return (await this.call("GET", path, query)).blob();
  }
}

// A usage client (key:ID, ip:ADDRESS, header:DIGEST) as the bucket API names it, or null where
// the usage name cannot be turned into one: an API key's buckets are found by the key's SHA-256,
// an IPv4 address truncated to its /24 stands for many buckets.
export function bucketClient(client: string): string | null {
  if (client.startsWith("ip:")) return client.includes("/") && !client.includes(":", 3) ? null : client;
  if (client.startsWith("header:")) return `id:h${client.slice(7)}`;
  return null;
}

export async function keyClient(key: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(key));
  const hex = Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
  return `api-key-sha256:${hex}`;
}
