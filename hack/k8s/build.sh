#!/usr/bin/env bash
# Build a local Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kubectl), etcd and helm, and the one-node cluster's node side (kubelet, kube-scheduler,
# kube-proxy, crictl, CoreDNS; hack/node/) from Go modules, into
# ${SLUICE_CACHE:-~/.cache/sluice}/bin.
#
# Usage: hack/k8s/build.sh [component...]
#   components: kube-apiserver kube-controller-manager kubectl etcd helm promtool
#               kubelet kube-scheduler kube-proxy crictl coredns (default: all)
#
# Idempotent: every binary has a stamp file (bin/.stamps/<name>) holding the
# version, Go version and build flags it was built with; a binary whose stamp
# matches is not rebuilt, so a second run is a no-op. SLUICE_FORCE_REBUILD=1
# ignores the stamps.
#
# Versions come from hack/k8s/versions.env only.
#
# Environment:
#   SLUICE_CACHE       cache root (default ~/.cache/sluice)
#   SLUICE_GOMODCACHE  Go module cache (default $SLUICE_CACHE/go/mod)
#   SLUICE_GOCACHE     Go build cache  (default $SLUICE_CACHE/go/build-cache)
#   GOTOOLCHAIN        default "local": use the installed go, never download one
#   GOPROXY/GONOSUMDB  honoured as usual
#
# Nothing outside $SLUICE_CACHE (or the two overrides above) is written, except
# the Go compiler's temporary work dirs in $TMPDIR (removed by go itself).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "${HERE}/versions.env"

SLUICE_CACHE="${SLUICE_CACHE:-${HOME}/.cache/sluice}"
mkdir -p "${SLUICE_CACHE}"
SLUICE_CACHE="$(cd "${SLUICE_CACHE}" && pwd)"   # absolute: we cd around
BIN="${SLUICE_CACHE}/bin"
SRC="${SLUICE_CACHE}/src"
STAMPS="${BIN}/.stamps"
LOGS="${SLUICE_CACHE}/logs"

export GOPATH="${SLUICE_CACHE}/go"
export GOMODCACHE="${SLUICE_GOMODCACHE:-${SLUICE_CACHE}/go/mod}"
export GOCACHE="${SLUICE_GOCACHE:-${SLUICE_CACHE}/go/build-cache}"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export GOWORK=off
export GOFLAGS="-modcacherw"   # deterministic; also makes the cache rm -rf-able
export CGO_ENABLED=0           # static binaries, like the upstream release builds
unset GOBIN GOOS GOARCH

ALL_COMPONENTS=(kube-apiserver kube-controller-manager kubectl etcd helm promtool
                kubelet kube-scheduler kube-proxy crictl coredns)
# The Kubernetes binaries built from the wrapper module of prepare_k8s_module.
KUBE_CMDS=(kube-apiserver kube-controller-manager kubectl kubelet kube-scheduler kube-proxy)

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v go >/dev/null 2>&1 || {
  if [[ -x /usr/local/go/bin/go ]]; then PATH="/usr/local/go/bin:${PATH}"; else die "go not found in PATH"; fi
}

mkdir -p "${BIN}" "${SRC}" "${STAMPS}" "${LOGS}" "${GOMODCACHE}" "${GOCACHE}"
# Never run go commands inside the caller's module (e.g. the repo, if it ever
# gets a go.mod): its go.mod/replaces would leak into "go mod download".
cd "${SRC}"

# Internal: "build.sh __step FUNC ARGS..." runs one step function in a child
# process so /usr/bin/time can measure it (see timed()); the parent holds the lock.
if [[ "${1:-}" == __step ]]; then STEP=("${@:2}"); set --; else STEP=(); fi

# One build at a time per cache (e.g. several pytest workers calling us).
if [[ ${#STEP[@]} -eq 0 ]]; then
  exec 9>"${SLUICE_CACHE}/.build.lock"
  flock 9
fi

GO_VERSION="$(go env GOVERSION)"
GO_PLATFORM="$(go env GOOS)/$(go env GOARCH)"
# etcd's module needs Go 1.26 (GOTOOLCHAIN=local: no toolchain download); say so up front
# rather than in the tail of a step log.
GO_MINOR="$(sed -E 's/^go1\.([0-9]+).*/\1/' <<<"${GO_VERSION}")"
[[ "${GO_MINOR}" =~ ^[0-9]+$ && "${GO_MINOR}" -ge 26 ]] || die "need Go >= 1.26, found ${GO_VERSION} ($(command -v go))"

# --- helpers ---------------------------------------------------------------

# Version parts: v1.34.10 -> 1 34 10
IFS=. read -r KUBE_MAJOR KUBE_MINOR KUBE_PATCH <<<"${KUBERNETES_VERSION#v}"
STAGING_VERSION="v0.${KUBE_MINOR}.${KUBE_PATCH}"

KUBE_TAGS="selinux,notest,grpcnotrace"   # same tags as upstream hack/lib/golang.sh (non-debug)

gomod_file() { # module@version -> path of its go.mod in the module cache
  local out
  if ! out="$(go mod download -json "$1" 2>&1)"; then
    printf 'go mod download %s failed:\n%s\n' "$1" "${out}" >&2
    return 1
  fi
  sed -n 's/^[[:space:]]*"GoMod": "\([^"]*\)".*/\1/p' <<<"${out}"
}

# Reproducible build date: the release's commit time as served by the proxy.
module_time() { # module@version -> RFC3339 time
  go list -m -json "$1" | sed -n 's/^[[:space:]]*"Time": "\([^"]*\)".*/\1/p' | head -n1
}

kube_ldflags() {
  local date="$1" ld="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X ${pkg}.gitVersion=${KUBERNETES_VERSION}"
    ld+=" -X ${pkg}.gitMajor=${KUBE_MAJOR}"
    ld+=" -X ${pkg}.gitMinor=${KUBE_MINOR}"
    ld+=" -X ${pkg}.gitTreeState=clean"
    ld+=" -X ${pkg}.gitCommit="
    ld+=" -X ${pkg}.buildDate=${date}"
  done
  printf '%s' "${ld}"
}

stamp_for() { # component -> the stamp text it should have
  local c="$1"
  case "$c" in
    kube-*|kubectl|kubelet) printf 'k8s.io/kubernetes %s staging %s tags %s' "${KUBERNETES_VERSION}" "${STAGING_VERSION}" "${KUBE_TAGS}" ;;
    etcd) printf 'go.etcd.io/etcd/server/v3 %s' "${ETCD_VERSION}" ;;
    helm) printf 'helm.sh/helm/v3 %s' "${HELM_VERSION}" ;;
    promtool) printf 'github.com/prometheus/prometheus %s' "${PROMETHEUS_VERSION}" ;;
    crictl) printf 'sigs.k8s.io/cri-tools %s' "${CRICTL_VERSION}" ;;
    coredns) printf 'github.com/coredns/coredns %s plugins %s kubernetes %s tags %s' "${COREDNS_VERSION}" "${COREDNS_PLUGINS[*]}" "${KUBERNETES_VERSION}" "${KUBE_TAGS}" ;;
  esac
  printf ' | %s %s cgo=0 trimpath -s -w | recipe 1\n' "${GO_VERSION}" "${GO_PLATFORM}"
}

up_to_date() { # component
  local c="$1"
  [[ "${SLUICE_FORCE_REBUILD:-0}" != 1 ]] || return 1
  [[ -x "${BIN}/${c}" && -f "${STAMPS}/${c}" ]] || return 1
  [[ "$(cat "${STAMPS}/${c}")" == "$(stamp_for "$c")" ]]
}

declare -A RESULT_TIME RESULT_RSS RESULT_STATE

# timed NAME LOGFILE FUNC ARGS...: run a step function in a child process, record wall time and peak RSS (KiB) of
# the largest process in the tree (go compile/link), print a progress line.
timed() {
  local name="$1" logf="$2"; shift 2
  local start=${SECONDS} tfile="${LOGS}/${name}.time" rc=0
  log "${name}: start (log: ${logf})"
  if [[ -x /usr/bin/time ]]; then
    /usr/bin/time -f '%M' -o "${tfile}" bash "${HERE}/build.sh" __step "$@" >"${logf}" 2>&1 || rc=$?
  else
    bash "${HERE}/build.sh" __step "$@" >"${logf}" 2>&1 || rc=$?
    echo "?" >"${tfile}"
  fi
  local el=$((SECONDS - start)) rss
  rss="$(tail -n1 "${tfile}" 2>/dev/null || echo '?')"
  RESULT_TIME[$name]=${el}
  if [[ "${rss}" =~ ^[0-9]+$ ]]; then RESULT_RSS[$name]="$((rss / 1024)) MiB"; else RESULT_RSS[$name]="?"; fi
  if [[ ${rc} -ne 0 ]]; then
    log "${name}: FAILED after ${el}s (exit ${rc}); last lines of ${logf}:"
    tail -n 30 "${logf}" >&2
    return "${rc}"
  fi
  log "${name}: done in ${el}s, peak RSS ${RESULT_RSS[$name]}"
}

# --- Kubernetes ------------------------------------------------------------

# Generate $SRC/k8s: a module that requires k8s.io/kubernetes and replaces every
# staging module (whatever k8s.io/kubernetes's own go.mod replaces with
# ./staging/...) with its published v0.<minor>.<patch> version.
prepare_k8s_module() {
  local dir="${SRC}/k8s" upstream_mod
  mkdir -p "${dir}"
  upstream_mod="$(gomod_file "k8s.io/kubernetes@${KUBERNETES_VERSION}")"
  [[ -f "${upstream_mod}" ]] || die "could not download go.mod of k8s.io/kubernetes@${KUBERNETES_VERSION}"

  local staging
  staging="$(awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "${upstream_mod}" | sort -u)"
  [[ -n "${staging}" ]] || die "no ./staging replaces found in ${upstream_mod}"

  {
    echo "// Generated by hack/k8s/build.sh; do not edit (it is rewritten on every rebuild)."
    echo "module sluice.local/k8s-control-plane"
    echo
    # Same language version / GODEBUG defaults as upstream's own builds.
    grep -E '^(go|godebug) ' "${upstream_mod}"
    echo
    echo "require k8s.io/kubernetes ${KUBERNETES_VERSION}"
    echo
    echo "replace ("
    local m
    for m in ${staging}; do printf '\t%s => %s %s\n' "$m" "$m" "${STAGING_VERSION}"; done
    echo ")"
    echo
    echo "tool ("
    printf '\tk8s.io/kubernetes/cmd/%s\n' "${KUBE_CMDS[@]}"
    echo ")"
  } >"${dir}/go.mod"
  rm -f "${dir}/go.sum"
  # tidy resolves the full requirement graph for the tools (needs Go >= 1.24
  # for the tool directive) and writes go.sum.
  (cd "${dir}" && go mod tidy)
}

build_kube() { # component
  local c="$1"
  (cd "${SRC}/k8s" && go build -trimpath -tags "${KUBE_TAGS}" \
    -ldflags "$(kube_ldflags "${KUBE_BUILD_DATE}")" \
    -o "${BIN}/.${c}.tmp" "k8s.io/kubernetes/cmd/${c}")
  mv -f "${BIN}/.${c}.tmp" "${BIN}/${c}"
}

# --- etcd --------------------------------------------------------------------
# `go install go.etcd.io/etcd/server/v3@vX` is refused (its go.mod has replace
# directives), so build the module's own main package (server/main.go, which
# calls etcdmain.Main) from a wrapper module that requires it.
prepare_etcd_module() {
  local dir="${SRC}/etcd"
  mkdir -p "${dir}"
  cat >"${dir}/go.mod" <<EOF
// Generated by hack/k8s/build.sh; do not edit (it is rewritten on every rebuild).
module sluice.local/etcd

go 1.24.0

require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}

tool go.etcd.io/etcd/server/v3
EOF
  rm -f "${dir}/go.sum"
  (cd "${dir}" && go mod tidy)   # also raises the go line to what etcd needs
}

build_etcd() {
  (cd "${SRC}/etcd" && go build -trimpath -ldflags "-s -w" -o "${BIN}/.etcd.tmp" go.etcd.io/etcd/server/v3)
  mv -f "${BIN}/.etcd.tmp" "${BIN}/etcd"
}

# --- helm --------------------------------------------------------------------
build_helm() {
  local helm_mod cg minor ld tmpbin="${BIN}/.helm-tmp"
  helm_mod="$(gomod_file "helm.sh/helm/v3@${HELM_VERSION}")"
  # Like helm's Makefile: default .Capabilities.KubeVersion = the client-go it uses.
  cg="$(awk '$1 == "k8s.io/client-go" {print $2; exit}' "${helm_mod}")"   # v0.37.0
  minor="$(cut -d. -f2 <<<"${cg}")"
  ld="-s -w"
  ld+=" -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
  ld+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  ld+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=${minor}"
  ld+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${minor}"
  rm -rf "${tmpbin}"
  GOBIN="${tmpbin}" go install -trimpath -ldflags "${ld}" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
  mv -f "${tmpbin}/helm" "${BIN}/helm"
  rm -rf "${tmpbin}"
}

# --- promtool ----------------------------------------------------------------
# For `promtool test rules` on the chart's alerts (tests/observability). Its go.mod has no
# replace directives, so `go install module@version` builds it as released.
build_promtool() {
  local tmpbin="${BIN}/.promtool-tmp"
  rm -rf "${tmpbin}"
  GOBIN="${tmpbin}" go install -trimpath -ldflags "-s -w" \
    "github.com/prometheus/prometheus/cmd/promtool@${PROMETHEUS_VERSION}"
  mv -f "${tmpbin}/promtool" "${BIN}/promtool"
  rm -rf "${tmpbin}"
}

# --- crictl, CoreDNS ------------------------------------------------------------
# crictl's module has no replace directives, so plain `go install mod@version` works (no
# wrapper module). The -X flags are what their Makefiles set, so --version tells the truth.
build_crictl() {
  local tmpbin="${BIN}/.crictl-tmp"
  rm -rf "${tmpbin}"
  GOBIN="${tmpbin}" go install -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=${CRICTL_VERSION}" \
    "sigs.k8s.io/cri-tools/cmd/crictl@${CRICTL_VERSION}"
  mv -f "${tmpbin}/crictl" "${BIN}/crictl"
  rm -rf "${tmpbin}"
}

# CoreDNS with only the plugins the node's Corefile (hack/node/coredns.yaml) uses, from a
# wrapper module. Two things keep its cold build short (it took about 10 minutes as
# `go install github.com/coredns/coredns@...`):
# - upstream's main imports all ~60 plugins (route53, azure, clouddns, etcd, dnstap, geoip...)
#   and their SDKs; here only COREDNS_PLUGINS are compiled in (the plugin order stays
#   upstream's, core/dnsserver's Directives; a Corefile line naming a plugin left out fails at
#   start-up with "unknown directive");
# - every module CoreDNS shares with the Kubernetes wrapper module (client-go, api, grpc,
#   protobuf, x/net...) is required at the version Kubernetes uses, and the build uses the
#   same tags, so those packages come out of the Go build cache the Kubernetes binaries filled.
#   That is why COREDNS_VERSION is the release whose client-go matches KUBERNETES_VERSION.
COREDNS_PLUGINS=(errors log health ready kubernetes metrics forward cache reload loadbalance loop)

prepare_coredns_module() {
  local dir="${SRC}/coredns" p
  [[ -f "${SRC}/k8s/go.sum" ]] || prepare_k8s_module
  mkdir -p "${dir}"
  {
    echo "// Generated by hack/k8s/build.sh; do not edit. CoreDNS with the plugins the node uses."
    echo "package main"
    echo
    echo "import ("
    for p in "${COREDNS_PLUGINS[@]}"; do printf '\t_ "github.com/coredns/coredns/plugin/%s"\n' "$p"; done
    printf '\t"github.com/coredns/coredns/coremain"\n'
    echo ")"
    echo
    echo "func main() { coremain.Run() }"
  } >"${dir}/main.go"
  coredns_go_mod "" >"${dir}/go.mod"
  rm -f "${dir}/go.sum"
  (cd "${dir}" && go mod tidy)
  # The shared modules at the Kubernetes module's versions (its go.sum has their sums).
  local shared
  shared="$(join <(cd "${dir}" && go list -m -f '{{if not .Main}}{{.Path}}{{end}}' all | sort -u) \
                 <(cd "${SRC}/k8s" && go list -m -f '{{if not .Main}}{{.Path}} {{with .Replace}}{{.Version}}{{else}}{{.Version}}{{end}}{{end}}' all | sort -u))"
  coredns_go_mod "${shared}" >"${dir}/go.mod"
  sort -u -o "${dir}/go.sum" "${dir}/go.sum" "${SRC}/k8s/go.sum"
  (cd "${dir}" && go mod tidy)
}

coredns_go_mod() { # "path version" lines to require besides CoreDNS
  echo "// Generated by hack/k8s/build.sh; do not edit (it is rewritten on every rebuild)."
  echo "module sluice.local/coredns"
  echo
  echo "go 1.24.0"
  echo
  echo "require github.com/coredns/coredns ${COREDNS_VERSION}"
  if [[ -n "$1" ]]; then
    echo
    echo "require ("
    sed 's/^/\t/' <<<"$1"
    echo ")"
  fi
}

build_coredns() {
  (cd "${SRC}/coredns" && go build -trimpath -tags "${KUBE_TAGS}" \
    -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=${COREDNS_VERSION}" \
    -o "${BIN}/.coredns.tmp" .)
  mv -f "${BIN}/.coredns.tmp" "${BIN}/coredns"
}

# --- main ----------------------------------------------------------------------

if [[ ${#STEP[@]} -gt 0 ]]; then
  set -x
  "${STEP[@]}"
  exit 0
fi

if [[ $# -gt 0 ]]; then COMPONENTS=("$@"); else COMPONENTS=("${ALL_COMPONENTS[@]}"); fi
for c in "${COMPONENTS[@]}"; do
  [[ " ${ALL_COMPONENTS[*]} " == *" ${c} "* ]] || die "unknown component '${c}' (known: ${ALL_COMPONENTS[*]})"
done

log "cache ${SLUICE_CACHE}; ${GO_VERSION} ${GO_PLATFORM}; kubernetes ${KUBERNETES_VERSION} (staging ${STAGING_VERSION}), etcd ${ETCD_VERSION}, helm ${HELM_VERSION}, crictl ${CRICTL_VERSION}, coredns ${COREDNS_VERSION}, prometheus ${PROMETHEUS_VERSION}"

TODO=()
for c in "${COMPONENTS[@]}"; do
  if up_to_date "$c"; then RESULT_STATE[$c]="up to date"; else TODO+=("$c"); fi
done

FAILED=()
k8s_prepared=""
TOTAL_START=${SECONDS}
for c in "${TODO[@]}"; do
  case "$c" in
    kube-apiserver|kube-controller-manager|kubectl|kubelet|kube-scheduler|kube-proxy)
      if [[ -z "${k8s_prepared}" ]]; then
        if timed k8s-modules "${LOGS}/k8s-modules.log" prepare_k8s_module; then
          k8s_prepared=ok
          KUBE_BUILD_DATE="$(cd "${SRC}/k8s" && module_time "k8s.io/kubernetes@${KUBERNETES_VERSION}")"
          export KUBE_BUILD_DATE
        else
          k8s_prepared=failed
        fi
      fi
      if [[ "${k8s_prepared}" != ok ]]; then RESULT_STATE[$c]="FAILED (module setup)"; FAILED+=("$c"); continue; fi
      if timed "$c" "${LOGS}/${c}.log" build_kube "$c"; then ok=1; else ok=0; fi
      ;;
    etcd)
      ok=0
      if timed etcd-modules "${LOGS}/etcd-modules.log" prepare_etcd_module &&
         timed etcd "${LOGS}/etcd.log" build_etcd; then ok=1; fi
      ;;
    coredns)
      ok=0
      if timed coredns-modules "${LOGS}/coredns-modules.log" prepare_coredns_module &&
         timed coredns "${LOGS}/coredns.log" build_coredns; then ok=1; fi
      ;;
    helm|crictl|promtool)
      if timed "$c" "${LOGS}/${c}.log" "build_${c}"; then ok=1; else ok=0; fi
      ;;
  esac
  if [[ ${ok} == 1 ]]; then
    stamp_for "$c" >"${STAMPS}/${c}"
    RESULT_STATE[$c]="built"
  else
    rm -f "${STAMPS}/${c}"
    RESULT_STATE[$c]="FAILED (see ${LOGS}/${c}*.log)"
    FAILED+=("$c")
  fi
done

log "summary (total $((SECONDS - TOTAL_START))s):"
for n in k8s-modules "${COMPONENTS[@]}" etcd-modules coredns-modules; do
  [[ -n "${RESULT_STATE[$n]:-}${RESULT_TIME[$n]:-}" ]] || continue
  size=""
  [[ -x "${BIN}/${n}" ]] && size="$(du -h "${BIN}/${n}" | cut -f1)"
  printf '  %-24s %-22s %6s %10s %6s\n' "$n" "${RESULT_STATE[$n]:-step}" \
    "${RESULT_TIME[$n]:+${RESULT_TIME[$n]}s}" "${RESULT_RSS[$n]:-}" "${size}" >&2
done
if [[ ${#FAILED[@]} -gt 0 ]]; then
  log "FAILED: ${FAILED[*]}"
  exit 1
fi
log "binaries in ${BIN}"
