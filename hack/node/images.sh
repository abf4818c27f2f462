#!/usr/bin/env bash
# Build the one-node cluster's own images as OCI archives in ${SLUICE_CACHE}/images/node/:
#   pause     localhost/pause:3.10.1          pause.c from the k8s.io/kubernetes module, gcc -static
#   coredns   localhost/coredns:<version>     the CoreDNS binary from hack/k8s/build.sh
#   busybox   localhost/sluice-e2e-busybox:1  Debian's busybox-static: sh, httpd, wget, nslookup...
# No registry and no container engine is needed (hack/node/oci_archive.py writes the layout);
# hack/node/up.sh imports them into the node's containerd with `ctr images import`.
#
# Idempotent: each archive has a stamp (images/node/.stamps/<name>) holding the sha256 of its
# inputs (the binaries, this script and oci_archive.py); an archive whose stamp matches is not
# rebuilt, so a second run is a no-op. Needs: gcc + libc6-dev, busybox-static
# (hack/node/ensure-deps.sh), and the coredns binary + Go module cache (hack/k8s/build.sh).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../k8s/versions.env
source "${HERE}/../k8s/versions.env"
SLUICE_CACHE="${SLUICE_CACHE:-${HOME}/.cache/sluice}"
BIN="${SLUICE_CACHE}/bin"
OUT="${SLUICE_CACHE}/images/node"
STAMPS="${OUT}/.stamps"
GOMODCACHE="${SLUICE_GOMODCACHE:-${SLUICE_CACHE}/go/mod}"
PAUSE_VERSION=3.10.1   # build/pause/Makefile TAG and kubeadm's PauseVersion in k8s 1.34
mkdir -p "${OUT}" "${STAMPS}"
log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# build NAME INPUT... -- oci_archive.py ARGS: (re)build ${OUT}/NAME.tar unless its stamp matches.
build() {
  local name="$1"; shift
  local inputs=()
  while [[ "$1" != -- ]]; do inputs+=("$1"); shift; done
  shift
  local stamp
  stamp="$(cat "${inputs[@]}" "${HERE}/images.sh" "${HERE}/oci_archive.py" | sha256sum | cut -d' ' -f1) $*"
  if [[ -f "${OUT}/${name}.tar" && "$(cat "${STAMPS}/${name}" 2>/dev/null)" == "${stamp}" ]]; then
    log "${name}: up to date"
    return
  fi
  python3 "${HERE}/oci_archive.py" "${OUT}/${name}.tar" "$@" >&2
  printf '%s\n' "${stamp}" >"${STAMPS}/${name}"
  log "${name}: built ($(du -h "${OUT}/${name}.tar" | cut -f1))"
}

# A fixed place for built inputs: their paths are part of the stamps.
work="${OUT}/.work"
mkdir -p "${work}"

# pause: the sandbox every Pod shares its namespaces with. The same source and flags as
# upstream's build/pause/Makefile (static, -Os, VERSION baked in), user 65535 like theirs.
pause_c="${GOMODCACHE}/k8s.io/kubernetes@${KUBERNETES_VERSION}/build/pause/linux/pause.c"
[[ -f "${pause_c}" ]] || die "missing ${pause_c}: run hack/k8s/build.sh first (it downloads the k8s.io/kubernetes module)"
command -v gcc >/dev/null || die "gcc not found: run hack/node/ensure-deps.sh (as root) first"
gcc -Os -Wall -Werror -static -DVERSION="v${PAUSE_VERSION}-sluice" -o "${work}/pause" "${pause_c}"
strip "${work}/pause"
build pause "${work}/pause" -- --name "localhost/pause:${PAUSE_VERSION}" --user 65535:65535 \
  --entrypoint /pause --file "${work}/pause:/pause:0755"

# busybox: the e2e tests' web server and client (httpd, nc, nslookup, sh; its wget crashes).
busybox=/bin/busybox
[[ -x "${busybox}" ]] && "${busybox}" --list | grep -x httpd >/dev/null || die "no static busybox with httpd at ${busybox}: run hack/node/ensure-deps.sh (as root) first (Debian: busybox-static)"
links=()
for applet in sh ash cat echo env hostname httpd id ip kill ls mkdir nc nslookup ps sleep sort \
              test true false seq head tail wc grep; do
  links+=(--symlink "/bin/${applet}:busybox")
done
build busybox "${busybox}" -- --name localhost/sluice-e2e-busybox:1 --user 65534:65534 \
  --file "${busybox}:/bin/busybox:0755" "${links[@]}" --dir /tmp:1777 --cmd sh

# coredns: the static binary; it listens on 1053 (the kube-dns Service maps 53 to it) so it
# runs as nobody without CAP_NET_BIND_SERVICE.
[[ -x "${BIN}/coredns" ]] || die "missing ${BIN}/coredns: run hack/k8s/build.sh coredns first"
build coredns "${BIN}/coredns" -- --name "localhost/coredns:${COREDNS_VERSION}" \
  --user 65534:65534 --entrypoint /coredns --file "${BIN}/coredns:/coredns:0755"
