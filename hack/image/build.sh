#!/usr/bin/env bash
# `make image`: Sluice's image (the project's Dockerfile) and a Redis image, built on a machine
# with no Docker engine and no image registry, written as OCI archives that containerd imports
# (`ctr -n k8s.io images import`):
#   ${SLUICE_CACHE:-~/.cache/sluice}/images/sluice.oci.tar        docker.io/library/sluice:<version>
#   ${SLUICE_CACHE:-~/.cache/sluice}/images/sluice-redis.oci.tar  docker.io/library/sluice-redis:<version>
# How: Debian's mmdebstrap makes two Python bases from Debian's packages (a runtime one, and a
# build one that adds pip and binutils), Debian's buildah (vfs storage, chroot isolation) builds
# the Dockerfile on them with BASE_IMAGE/BUILD_IMAGE, and the Redis image is Debian's
# redis-server on the same kind of root filesystem. Where a registry is reachable,
# SLUICE_BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm builds on the public image instead.
#
# Cached: each output has a stamp (images/.stamps/<name>) holding the sha256 of its inputs
# (this script, the package lists, the Dockerfile, the sources it copies, the pins); a second
# run with unchanged inputs does nothing. New Debian package versions do not invalidate a
# stamp: `make image-clean` (or deleting the stamps) rebuilds from scratch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="${ROOT}/hack/image"
SLUICE_CACHE="${SLUICE_CACHE:-${HOME}/.cache/sluice}"
OUT="${SLUICE_CACHE}/images"
STAMPS="${OUT}/.stamps"
SUITE=bookworm
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "${ROOT}/pyproject.toml" | head -n1)"
SLUICE_IMAGE="docker.io/library/sluice:${VERSION}"
REDIS_IMAGE="docker.io/library/sluice-redis:${VERSION}"
RUN_BASE="localhost/sluice-python:${SUITE}"
BUILD_BASE="localhost/sluice-python-build:${SUITE}"
# Debian's redis package creates its user with the next free system uid; a fixed one lets the
# chart say runAsUser (the official Redis image's is 999 too).
REDIS_UID=999
# pip inside the build must trust what the host trusts (the package index may be reached
# through a TLS-inspecting proxy whose CA only the host's store holds); RUN-time mount only.
HOST_CA=/etc/ssl/certs/ca-certificates.crt

# Debian packages of each root filesystem. Docs, man pages and translations are left out
# (copyright files stay); no apt in the images (the essential variant): nothing is installed
# into a running container.
# libstdc++6: google-re2's wheel links it (Debian's apt brings it into most images, not this one).
RUN_PACKAGES=python3,ca-certificates,passwd,libstdc++6
BUILD_PACKAGES=${RUN_PACKAGES},python3-pip,binutils
REDIS_PACKAGES=redis-server

log() { printf '[image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

ensure_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  [[ ${#missing[@]} -eq 0 ]] && return
  if [[ "$(id -u)" = 0 ]] && command -v apt-get >/dev/null; then
    log "installing ${missing[*]} from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    die "missing ${missing[*]} (Debian: sudo apt-get install ${missing[*]}); make image also needs root (mmdebstrap, chroot isolation)"
  fi
}

[[ "$(id -u)" = 0 ]] || die "make image needs root here (mmdebstrap in root mode, buildah's chroot isolation with vfs storage)"
ensure_tools

# buildah's own storage, kept beside the archives (not /var/lib/containers: other tools on
# the machine keep theirs there).
bah() { buildah --root "${OUT}/.buildah/root" --runroot "${OUT}/.buildah/run" --storage-driver vfs "$@"; }

# The sha256 of files and extra strings: the stamp of one output.
inputs_hash() {
  local extra=$1; shift
  {
    printf '%s\n' "$extra"
    [[ $# -gt 0 ]] || return 0
    find "$@" -type f -not -path '*/__pycache__/*' -not -path '*.egg-info/*' -not -name '*.pyc' \
      -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}
fresh() { [[ -f "$2" && -f "${STAMPS}/$1" && "$(cat "${STAMPS}/$1")" = "$3" ]]; }
has_image() { bah inspect --type image "$1" >/dev/null 2>&1; }

# How every root filesystem is made (mmdebstrap options beyond the packages). The stamps hash
# these settings, not this whole script: editing its other parts rebuilds nothing.
ROOTFS_OPTS=(--variant=essential --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --customize-hook='rm -rf "$1"/var/cache/debconf/*-old "$1"/var/log/* "$1"/var/lib/apt/lists/*')
ROOTFS_ENV=(--env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8)

# A Debian root filesystem with PACKAGES, made by mmdebstrap straight into a scratch working
# container (printed; the caller configures and commits it: one layer). Extra arguments go to
# mmdebstrap.
debian_rootfs_image() {
  local image=$1 packages=$2; shift 2
  local ctr mnt
  ctr="$(bah from scratch)"
  mnt="$(bah mount "$ctr")"
  mmdebstrap --quiet "${ROOTFS_OPTS[@]}" --include="$packages" "$@" "$SUITE" "$mnt" \
    >"${OUT}/logs/${image##*/}.log" 2>&1 \
    || die "mmdebstrap failed: $(tail -n 20 "${OUT}/logs/${image##*/}.log")"
  bah umount "$ctr" >/dev/null
  bah config "${ROOTFS_ENV[@]}" "$ctr"
  printf '%s\n' "$ctr"
}

# Debian's Python is externally managed (PEP 668): pip refuses to install anything unless
# this marker is gone. Only the bases lose it; it concerns pip, which the final image lacks.
PEP668_HOOK='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED'
# The runtime base only: what no process of the final image runs or reads (issue #12 §1, the
# image under 150 MB), removed before the base is committed, so no layer carries it. Perl
# (~7.5 MB): only maintainer scripts and debconf use it, and nothing is installed into the
# image (dpkg records the purge; debconf's dependency on it is left broken on purpose).
# glibc's gconv modules (~8 MB): iconv for other charsets; Python decodes with its own codecs,
# and UTF-8 is built into glibc. The openssl command (Python links libssl, the operator makes
# its certificates with cryptography). dpkg's md5sums and debconf's database: integrity and
# questions for package operations that never happen here (dpkg's status and file lists stay:
# vulnerability scanners read them). Python's test support, pydoc's topic data, turtle and the
# test extension modules: nothing Sluice or its packages import (tests/image imports every
# module Sluice names in the image itself). Then the standard library becomes bytecode only,
# as the virtualenv's packages do (hack/image/bytecode.py: ~10 MB of source).
RUN_TRIM_HOOK='set -e
chroot "$1" dpkg --purge --force-remove-essential --force-depends perl-base >/dev/null
rm -rf "$1"/usr/lib/*/gconv "$1"/usr/bin/openssl "$1"/var/cache/debconf/* "$1"/var/lib/dpkg/info/*.md5sums
cd "$1"/usr/lib/python3.[0-9]*
rm -rf test pydoc_data turtle.py __pycache__/turtle.* lib-dynload/_test* lib-dynload/_ctypes_test.* \
  lib-dynload/xxlimited* lib-dynload/_xxtestfuzz.*
chroot "$1" python3 -B -X no_debug_ranges - "/usr/lib/${PWD##*/}" <"$SLUICE_BYTECODE_PY"'
# the hooks run in mmdebstrap's environment; the script's path stays out of the stamp's key
export SLUICE_BYTECODE_PY="${HERE}/bytecode.py"

python_bases() {
  local key
  key="$(inputs_hash "$SUITE $RUN_PACKAGES $BUILD_PACKAGES ${ROOTFS_OPTS[*]} ${ROOTFS_ENV[*]} $PEP668_HOOK $RUN_TRIM_HOOK" \
    "$SLUICE_BYTECODE_PY")"
  if [[ -f "${STAMPS}/bases" && "$(cat "${STAMPS}/bases")" = "$key" ]] \
      && has_image "$RUN_BASE" && has_image "$BUILD_BASE"; then
    return
  fi
  local image packages ctr hooks
  for image in "$RUN_BASE" "$BUILD_BASE"; do
    packages=$RUN_PACKAGES hooks=(--customize-hook="$PEP668_HOOK" --customize-hook="$RUN_TRIM_HOOK")
    [[ "$image" = "$BUILD_BASE" ]] && packages=$BUILD_PACKAGES hooks=(--customize-hook="$PEP668_HOOK")
    log "making ${image} from Debian ${SUITE}: ${packages}"
    ctr="$(debian_rootfs_image "$image" "$packages" "${hooks[@]}")"
    bah config --cmd python3 "$ctr"
    bah commit --rm -q "$ctr" "$image" >/dev/null
  done
  printf '%s\n' "$key" >"${STAMPS}/bases"
}

# Push IMAGE from buildah's storage to ARCHIVE as an OCI archive named for containerd.
push_archive() {
  local image=$1 archive=$2 dir="${OUT}/.push"
  rm -rf "$dir"
  bah push -q "$image" "oci:${dir}:${image##*:}" >&2
  "${PYTHON:-python3}" "${HERE}/oci_archive.py" "$dir" "$image" "${archive}.tmp"
  mv "${archive}.tmp" "$archive"
  rm -rf "$dir"
}

sluice_image() {
  local archive="${OUT}/sluice.oci.tar" base=${SLUICE_BASE_IMAGE:-} key
  key="$(cd "$ROOT" && inputs_hash "${base:-$(cat "${STAMPS}/bases")} $SLUICE_IMAGE" \
    Dockerfile .dockerignore pyproject.toml hack/constraints.txt core sidecar operator analytics \
    hack/image/oci_archive.py hack/image/bytecode.py)"
  if fresh sluice "$archive" "$key"; then log "sluice image up to date: ${archive}"; return; fi
  local args=(--pull=never --build-arg "BASE_IMAGE=${RUN_BASE}" --build-arg "BUILD_IMAGE=${BUILD_BASE}")
  [[ -n "$base" ]] && args=(--pull=true --build-arg "BASE_IMAGE=${base}" --build-arg "BUILD_IMAGE=${base}")
  [[ -f "$HOST_CA" ]] && args+=(-v /etc/ssl/certs:/etc/ssl/certs:ro --build-arg "PIP_CERT=${HOST_CA}")
  log "building ${SLUICE_IMAGE} from the Dockerfile (base: ${base:-${RUN_BASE}})"
  (cd "$ROOT" && bah bud --isolation chroot --format oci "${args[@]}" -t "$SLUICE_IMAGE" . \
    >"${OUT}/logs/sluice.log" 2>&1) || die "buildah bud failed: $(tail -n 30 "${OUT}/logs/sluice.log")"
  push_archive "$SLUICE_IMAGE" "$archive"
  printf '%s\n' "$key" >"${STAMPS}/sluice"
  log "wrote ${archive} ($(du -h "$archive" | cut -f1))"
}

# The Redis image: Debian's redis-server as uid/gid 999 on the same kind of root filesystem.
# The user is written before redis-server's maintainer scripts run, so they keep it.
REDIS_USER_HOOK="echo 'redis:x:${REDIS_UID}:${REDIS_UID}::/var/lib/redis:/usr/sbin/nologin' >>\"\$1\"/etc/passwd
echo 'redis:x:${REDIS_UID}:' >>\"\$1\"/etc/group
echo 'redis:*:19000:0:99999:7:::' >>\"\$1\"/etc/shadow"
REDIS_DATA_HOOK="mkdir -m 0750 \"\$1\"/data && chown ${REDIS_UID}:${REDIS_UID} \"\$1\"/data"
# No config file: redis-server's defaults, the data directory as working directory (where it
# writes dumps), and protected mode off as in the official image: the chart sets a password
# and NetworkPolicies.
REDIS_CONFIG=(--user "${REDIS_UID}:${REDIS_UID}" --workingdir /data --port 6379
  --entrypoint '["redis-server"]' --cmd '["--protected-mode", "no"]')

redis_image() {
  local archive="${OUT}/sluice-redis.oci.tar" key ctr
  key="$(inputs_hash "$SUITE $REDIS_PACKAGES $REDIS_IMAGE ${ROOTFS_OPTS[*]} ${ROOTFS_ENV[*]} \
    $REDIS_USER_HOOK $REDIS_DATA_HOOK ${REDIS_CONFIG[*]}" "${HERE}/oci_archive.py")"
  if fresh redis "$archive" "$key"; then log "redis image up to date: ${archive}"; return; fi
  log "making ${REDIS_IMAGE} from Debian ${SUITE}: ${REDIS_PACKAGES}"
  ctr="$(debian_rootfs_image "$REDIS_IMAGE" "$REDIS_PACKAGES" --essential-hook="$REDIS_USER_HOOK" \
    --customize-hook="$REDIS_DATA_HOOK")"
  bah config "${REDIS_CONFIG[@]}" "$ctr"
  bah commit --rm -q "$ctr" "$REDIS_IMAGE" >/dev/null
  push_archive "$REDIS_IMAGE" "$archive"
  printf '%s\n' "$key" >"${STAMPS}/redis"
  log "wrote ${archive} ($(du -h "$archive" | cut -f1))"
}

mkdir -p "$STAMPS" "${OUT}/logs"
# One build at a time (make image and the image tests may start together): they share
# buildah's storage and the stamps.
exec 9>"${OUT}/.lock"
flock 9
case "${1:-all}" in
  all) [[ -n "${SLUICE_BASE_IMAGE:-}" ]] || python_bases; sluice_image; redis_image ;;
  sluice) [[ -n "${SLUICE_BASE_IMAGE:-}" ]] || python_bases; sluice_image ;;
  redis) redis_image ;;
  clean) rm -rf "${STAMPS}" "${OUT}/sluice.oci.tar" "${OUT}/sluice-redis.oci.tar"
         bah rm --all >/dev/null 2>&1 || true; bah rmi --all --force >/dev/null 2>&1 || true ;;
  *) die "usage: $0 [all|sluice|redis|clean]" ;;
esac
# Images left in buildah's storage after a rebuild (the old tags' layers) take disk, not time.
bah rmi --prune >/dev/null 2>&1 || true
