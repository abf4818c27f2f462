// What the overview and the client view are drawn from: the signed-in API, the URL's view, the
// policy whose buckets are shown, and the page's navigation and status line.

import type { Api, Policy } from "./api";
import type { View } from "./view";

export interface Ctx {
  api: Api;
  view: View;
  policy: Policy | null;
  open: (client: string) => void;
  status: (text: string, error?: boolean) => void;
}

export function base(view: View): { namespace: string; policy: string } {
  return { namespace: view.namespace, policy: view.policy };
}
