# Sluice: `make demo` runs the sidecar on the embedded example, `make test` runs the suite.
# Both set up what they need first (virtualenv, Python packages, redis-server, postgresql; for
# the tests also node packages and Debian's chromium: the dashboard's build and browser tests).
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

WEB := analytics/web
WEB_DEPS := $(WEB)/node_modules/.package-lock.json

.PHONY: setup setup-k8s setup-tools setup-node node-up node-down image image-clean demo test test-fast lint typecheck bench clean dashboard

$(STAMP): pyproject.toml hack/bootstrap.sh hack/constraints.txt
	@hack/bootstrap.sh $(VENV)

setup: $(STAMP) $(WEB_DEPS)

# The dashboard's node packages (analytics/web, pinned by its package-lock), installed again
# when the lock changes; no install scripts run (esbuild and biome come as per-platform packages).
$(WEB_DEPS): $(WEB)/package-lock.json
	@hack/ensure-node.sh
	cd $(WEB) && npm ci --ignore-scripts --no-audit --no-fund

# After a change in analytics/web: check it and rebuild the bundle in
# analytics/sluice_analytics/static (committed; tests/analytics/test_dashboard_build.py).
dashboard: $(WEB_DEPS)
	cd $(WEB) && npm run --silent check && npm run --silent build

# etcd, kube-apiserver, kube-controller-manager, kubectl, helm, promtool, and for the one-node
# cluster kubelet, kube-scheduler, kube-proxy, crictl, CoreDNS, built from Go modules into
# ${SLUICE_CACHE:-~/.cache/sluice}/bin; a no-op once built (hack/k8s/NOTES.md).
setup-k8s:
	@hack/k8s/build.sh

# checkov in its own virtualenv (.venv-tools), for the chart's scan in the suite
# (tests/chart/test_chart_checkov.py); pinned in hack/tools-constraints.txt.
setup-tools:
	@hack/tools.sh

# Sluice's image (the Dockerfile) and a Redis image as OCI archives in
# ${SLUICE_CACHE:-~/.cache/sluice}/images, built without a registry or a Docker engine (mmdebstrap,
# buildah; as root, installed from Debian's packages); a no-op once built (hack/image/build.sh).
# The suite checks them (tests/image) and the one-node cluster imports them.
image:
	@hack/image/build.sh

image-clean:
	@hack/image/build.sh clean

# The one-node cluster of the e2e tests (docs/real-node.md): Debian's containerd, runc, CNI
# plugins (installed as root; otherwise a message naming what is missing) and the node's own
# images (pause, CoreDNS, a busybox test image) as OCI archives; a no-op once done.
setup-node: setup-k8s
	@hack/node/ensure-deps.sh
	@hack/node/images.sh

# By hand: bring a node up in $(NODE_DIR) (prints the KUBECONFIG to export), tear it down.
NODE_DIR ?= /tmp/sluice-node
node-up: setup-node
	@hack/node/up.sh $(NODE_DIR)
node-down:
	@hack/node/down.sh $(NODE_DIR)

demo: $(STAMP)
	@hack/ensure-redis.sh --optional
	$(BIN)/sluice demo

test: $(STAMP) $(WEB_DEPS) setup-k8s setup-node setup-tools image
	@hack/ensure-redis.sh
	@hack/ensure-postgres.sh
	@hack/ensure-chromium.sh
	$(BIN)/pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	@hack/ensure-postgres.sh
	$(BIN)/pytest -q -x -m "not slow and not cluster and not k8s and not e2e"

lint: $(STAMP) $(WEB_DEPS)
	$(BIN)/ruff check core sidecar operator analytics tests bench hack
	$(BIN)/mypy
	$(BIN)/lint-imports
	cd $(WEB) && npm run --silent check

bench: $(STAMP) setup-k8s setup-node
	@hack/ensure-redis.sh
	@hack/ensure-postgres.sh
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk >/dev/null; } || { echo "error: wrk is not installed (Debian: apt-get install wrk)" >&2; exit 1; }
	@command -v valgrind >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get -o DPkg::Lock::Timeout=600 install -y -qq valgrind >/dev/null; } || echo "note: valgrind is not installed: bench.usage_sidecar skips its instruction counts (Debian: apt-get install valgrind)" >&2
	$(BIN)/python -m bench.run --out docs/benchmarks.md
	$(BIN)/python -m bench.transport --out docs/benchmarks.md
	$(BIN)/python -m bench.keys_apply --out docs/benchmarks.md
	$(BIN)/python -m bench.keys_sidecar --out docs/benchmarks.md
	$(BIN)/python -m bench.collector --out docs/benchmarks.md
	$(BIN)/python -m bench.usage_sidecar --out docs/benchmarks.md
	$(BIN)/python -m bench.usage_stream_size --out docs/benchmarks.md
	$(BIN)/python -m bench.usage_summary --out docs/benchmarks.md
	$(BIN)/python -m bench.image --out docs/benchmarks.md
	$(BIN)/python -m bench.attacks --out docs/security.md
	$(BIN)/python -m bench.node_bringup --out docs/benchmarks.md
	$(BIN)/python -m bench.operator_scale --out docs/benchmarks.md  # 9 min; + --keys 10000: 12 more

clean:
	rm -rf $(VENV) .venv-tools .pytest_cache .mypy_cache .ruff_cache .hypothesis $(WEB)/node_modules
