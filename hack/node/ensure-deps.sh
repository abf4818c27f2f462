#!/usr/bin/env bash
# Make sure the Debian packages the one-node cluster (hack/node/up.sh) runs on are installed:
# containerd and runc (the container runtime), the CNI plugins (bridge, host-local, portmap,
# loopback in /usr/lib/cni), iptables (kube-proxy, CNI masquerading), nftables (nft: the
# teardown deletes the tables iptables-nft created), busybox-static (the
# e2e test image) and gcc + libc6-dev (a static pause binary). As root they are installed with
# apt-get; otherwise the script says exactly which packages are missing and exits 1.
set -euo pipefail
PACKAGES=(containerd runc containernetworking-plugins iptables nftables busybox-static gcc libc6-dev)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep '^install ok installed$' >/dev/null || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "==> installing ${missing[*]} from Debian's packages (for the one-node cluster)"
  export DEBIAN_FRONTEND=noninteractive
  # Several installers may run at once on a shared machine: wait for the dpkg lock.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The package starts containerd as a system service where an init system runs; the node
  # runs its own containerd (own root, state and socket), so a system one is not needed.
  exit 0
fi
echo "error: the one-node cluster needs these Debian packages, which are not installed:" \
     "${missing[*]} (as root: apt-get install ${missing[*]}; or run 'make setup-node' as root)" >&2
exit 1
