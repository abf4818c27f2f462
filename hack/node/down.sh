#!/usr/bin/env bash
# Tear down a node brought up by hack/node/up.sh and put the host back as up.sh found it.
#
# Usage: hack/node/down.sh [--keep-logs] [DIR]   (DIR default: ${SLUICE_NODE_DIR:-/tmp/sluice-node})
#
# Order: stop the kubelet (so nothing is restarted), remove every Pod sandbox through the CRI
# (so the CNI DEL runs: veth, IP, masquerade rules), stop the other daemons by PID in reverse
# start order (SIGTERM, SIGKILL after a grace period), kill containerd's shims (found by the
# socket in their command line), `kube-proxy --cleanup`, then the host state: iptables chains,
# the bridge, network namespaces, mounts under DIR, kubepods cgroups and sysctls that were not
# there (or were different) when up.sh recorded DIR/host-state. Safe to run twice and after a
# failed bring-up. Finally it lists anything it could not remove and exits 1 if so.
# --keep-logs leaves DIR/logs (the rest of DIR is removed).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KEEP_LOGS=0
if [[ "${1:-}" == --keep-logs ]]; then KEEP_LOGS=1; shift; fi
D="${1:-${SLUICE_NODE_DIR:-/tmp/sluice-node}}"
[[ -d "${D}" ]] || { echo "down.sh: ${D} does not exist: nothing to tear down" >&2; exit 0; }
D="$(cd "${D}" && pwd)"
# shellcheck source=lib.sh
source "${HERE}/lib.sh"
[[ -f "${D}/env" ]] && load_env
GRACE=10

stop_pid() { # NAME: SIGTERM, wait up to GRACE s, then SIGKILL; by the PID up.sh recorded
  local f="${D}/pids/$1.pid" pid i
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f")"
  # Only the process we started: its command line still names our state directory or binary.
  if running "${pid}" && cmdline "${pid}" | grep -F -e "${D}" -e "$1" >/dev/null; then
    kill -TERM "${pid}" 2>/dev/null
    for ((i = 0; i < GRACE * 20; i++)); do running "${pid}" || break; sleep 0.05; done
    if running "${pid}"; then
      log "$1 (${pid}) did not stop in ${GRACE}s: SIGKILL"
      kill -KILL "${pid}"
    fi
    step "$1 stopped"
  fi
  rm -f "$f"
}

pids_matching() { # PIDs whose command line contains $1 (one argument of it), except ours
  grep -slF -- "$1" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 | grep -vx -e "$$" -e "${BASHPID}"
}
cmdline() { { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null; }

remove_pods() {
  [[ -f "${D}/pids/containerd.pid" ]] && alive containerd || return 0
  # Stop and remove every sandbox: the CRI runs the CNI DEL for each (veth, IPAM, iptables).
  crictl_ rmp --force --all >>"${D}/logs/teardown.log" 2>&1 ||
    log "crictl rmp failed (see ${D}/logs/teardown.log); the host cleanup below still runs"
}

kill_leftovers() {
  # containerd's shims are reparented to init; they carry our socket path in their arguments.
  local pid
  for pid in $(pids_matching "${D}/run/containerd"); do kill -KILL "${pid}" 2>/dev/null; done
  # Container processes left in the kubepods cgroups (only if a shim was killed above).
  local procs
  for procs in $(find /sys/fs/cgroup/*/kubepods -name cgroup.procs 2>/dev/null); do
    while read -r pid; do kill -KILL "${pid}" 2>/dev/null; done <"${procs}"
  done
}

clean_iptables() {
  [[ -x "${BIN}/kube-proxy" ]] && "${BIN}/kube-proxy" --cleanup >>"${D}/logs/teardown.log" 2>&1
  [[ -f "${D}/host-state/iptables-chains" ]] || return 0
  # Chains that exist now and did not at bring-up, made by kube-proxy, the kubelet or CNI.
  local new cmd table chain rule
  new="$(comm -13 "${D}/host-state/iptables-chains" <(iptables_chains) | grep -E ' (KUBE-|CNI-)')"
  [[ -n "${new}" ]] || return 0
  while read -r cmd table; do
    local chains
    chains="$(awk -v c="${cmd}" -v t="${table}" '$1 == c && $2 == t {print $3}' <<<"${new}")"
    local re
    re="$(paste -sd'|' <<<"${chains}")"
    # First the rules that jump to them (from any chain), then the chains themselves.
    "${cmd}-save" -t "${table}" 2>/dev/null | grep -E -- "^-A .* -[jg] (${re})( |$)" |
      while read -r rule; do
        eval "${cmd} -w -t ${table} -D ${rule#-A }" 2>/dev/null
      done
    for chain in ${chains}; do "${cmd}" -w -t "${table}" -F "${chain}" 2>/dev/null; done
    for chain in ${chains}; do "${cmd}" -w -t "${table}" -X "${chain}" 2>/dev/null; done
  done < <(awk '{print $1, $2}' <<<"${new}" | sort -u)
}

clean_nft_tables() {
  # iptables-nft creates a table (nat, filter, mangle) on first use; the host had none of the
  # ones listed here. Delete them when no rule is left in them (nobody else uses them).
  [[ -f "${D}/host-state/nft-tables" ]] && command -v nft >/dev/null || return 0
  local family name
  while read -r family name; do
    # With -a every chain and rule line ends in "# handle N"; rules are the non-chain ones.
    nft -a list table "${family}" "${name}" 2>/dev/null | grep -F '# handle' |
      grep -vE '^\s*(table|chain) ' >/dev/null && continue
    nft delete table "${family}" "${name}" 2>/dev/null
  done < <(comm -13 "${D}/host-state/nft-tables" <(nft_tables))
}

clean_network() {
  ip link show "${BRIDGE}" >/dev/null 2>&1 && ip link del "${BRIDGE}"
  # Veths whose Pod side is gone are deleted by the kernel; any left had our bridge as master.
  local ns
  for ns in $(ls /run/netns 2>/dev/null); do
    grep -qx "${ns}" "${D}/host-state/netns" 2>/dev/null && continue
    [[ "${ns}" == cni-* ]] || continue
    umount "/run/netns/${ns}" 2>/dev/null
    rm -f "/run/netns/${ns}"
  done
}

clean_mounts() { # everything mounted under DIR, deepest first
  local m
  for m in $(awk -v d="${D}/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
  done
}

clean_cgroups() {
  [[ -f "${D}/host-state/cgroups" ]] || return 0
  local dir
  # Only the kubelet's (another program's new cgroup is not ours to remove).
  for dir in $(comm -13 "${D}/host-state/cgroups" <(cgroup_dirs) | grep '/kubepods'); do
    find "${dir}" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
}

restore_host() {
  local line k v
  if [[ -f "${D}/host-state/sysctl" ]]; then
    while IFS='=' read -r k v; do
      [[ "$(cat "/proc/sys/${k//.//}" 2>/dev/null)" == "${v}" ]] || printf '%s' "${v}" >"/proc/sys/${k//.//}" 2>/dev/null ||
        log "could not restore ${k}=${v}"
    done <"${D}/host-state/sysctl"
  fi
  if [[ -f "${D}/host-state/paths" ]]; then
    for line in "${HOST_PATHS[@]}"; do
      grep -qx "${line}" "${D}/host-state/paths" || rm -rf "${line}"
    done
  fi
}

leftovers() { # what is still there; empty output = clean
  local pid
  for pid in $(pids_matching "${D}/"); do
    [[ -d "/proc/${pid}" ]] && echo "process ${pid}: $(cmdline "${pid}")"   # (not the grep itself)
  done
  awk -v d="${D}/" 'index($5, d) == 1 {print "mount " $5}' /proc/self/mountinfo
  ip link show "${BRIDGE}" >/dev/null 2>&1 && echo "bridge ${BRIDGE}"
  if [[ -f "${D}/host-state/iptables-chains" ]]; then
    comm -13 "${D}/host-state/iptables-chains" <(iptables_chains) | sed 's/^/iptables chain /'
    comm -13 "${D}/host-state/nft-tables" <(nft_tables) | sed 's/^/nftables table /'
    comm -13 "${D}/host-state/cgroups" <(cgroup_dirs) | sed 's/^/cgroup /'
  fi
}

main() {
  local t0=${SECONDS}
  mkdir -p "${D}/logs"
  stop_pid kubelet
  remove_pods
  local c
  for c in "${STOP_ORDER[@]}"; do stop_pid "$c"; done
  kill_leftovers; step "leftover processes killed"
  clean_iptables; clean_nft_tables; step "iptables and nftables cleaned"
  clean_network; step "network cleaned"
  clean_mounts; step "mounts removed"
  clean_cgroups; step "cgroups removed"
  restore_host
  local left
  left="$(leftovers)"
  if [[ -n "${left}" ]]; then
    log "teardown left these behind:"
    printf '%s\n' "${left}" >&2
    return 1
  fi
  [[ "$(cat "${CURRENT}" 2>/dev/null)" == "${D}" ]] && rm -f "${CURRENT}"
  if [[ ${KEEP_LOGS} == 1 ]]; then
    find "${D}" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
  else
    rm -rf "${D}"
  fi
  log "torn down in $((SECONDS - t0))s; the host is as up.sh found it"
}
main
