# Shared by hack/node/up.sh and hack/node/down.sh (sourced, not run): the node's names,
# addresses and paths (one place), process handling, and the host-state probes that the
# bring-up records and the teardown checks.
# shellcheck shell=bash
set -E -o pipefail

SLUICE_CACHE="${SLUICE_CACHE:-${HOME}/.cache/sluice}"
BIN="${SLUICE_CACHE}/bin"
IMAGES="${SLUICE_CACHE}/images/node"
# Sluice's own images (`make image`, hack/image/build.sh): imported when present, for the e2e
# tests of the chart (docker.io/library/sluice:<version>, docker.io/library/sluice-redis:<version>).
APP_IMAGES_DIR="${SLUICE_CACHE}/images"
APP_IMAGES=(sluice.oci.tar sluice-redis.oci.tar)
CNI_BIN="${SLUICE_CNI_BIN:-/usr/lib/cni}"       # Debian's containernetworking-plugins
NODE_BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl crictl)

NODE_NAME=sluice-node
BRIDGE=sluice0                 # not cni0: the name says whose it is, and cannot clash with a CNI default
SERVICE_CIDR=10.0.0.0/24       # the 'kubernetes' Service gets 10.0.0.1
DNS_IP=10.0.0.10
CLUSTER_CIDR=10.244.0.0/16
POD_SUBNET=10.244.0.0/24       # the node's podCIDR (the controller-manager allocates the first /24)
PAUSE_VERSION=3.10.1
# Order in which down.sh stops the daemons (the reverse of start, kubelet first).
STOP_ORDER=(kubelet kube-proxy coredns kube-scheduler kube-controller-manager kube-apiserver containerd etcd)

# Host-wide kernel settings the components change (kubelet: the vm./kernel. ones; the bridge
# plugin: ip_forward; kube-proxy may touch route_localnet and conntrack): restored by down.sh.
SYSCTLS=(net.ipv4.ip_forward net.ipv4.conf.all.route_localnet net.ipv4.conf.all.forwarding
         vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
         kernel.keys.root_maxkeys kernel.keys.root_maxbytes
         net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
         net.netfilter.nf_conntrack_max net.netfilter.nf_conntrack_tcp_timeout_established
         net.netfilter.nf_conntrack_tcp_timeout_close_wait)
# Default locations the components would write to if a setting were missed: down.sh removes
# the ones that did not exist before (and tests/e2e checks none is left).
HOST_PATHS=(/var/lib/cni /etc/cni /opt/cni /opt/containerd /var/lib/containerd /run/containerd
            /var/lib/kubelet /var/log/pods /var/log/containers /etc/kubernetes /run/netns)

# The node running on this machine (one at a time): its state directory, written by up.sh,
# removed by down.sh; how a later bring-up (or tests/support/node.py) finds a node left behind.
CURRENT=/run/sluice-node.dir
# The caller sets D (the state directory) before sourcing this file.
CONTAINERD_SOCK="${D}/run/containerd/containerd.sock"

_T0="${EPOCHREALTIME}"
log() { printf '[node %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
step() { # log with the time since the script started, e.g. "+4.2s kube-apiserver ready"
  local ds=$(( (${EPOCHREALTIME/./} - ${_T0/./}) / 100000 ))
  log "+$((ds / 10)).$((ds % 10))s $*"
}

print_tails() { # the last lines of every component log, for a failed bring-up
  [[ -d "${D:-}/logs" ]] || return 0
  local f
  for f in "${D}"/logs/*.log; do
    [[ -s "$f" ]] || continue
    printf '\n----- %s (last 25 lines) -----\n' "$f" >&2
    tail -n 25 "$f" >&2
  done
}
# The log tails only once this run started something (a refused start must not show the logs
# of the node that is already running in the same directory).
die() { log "ERROR: $*"; if [[ -n "${STARTED:-}" ]]; then print_tails; fi; exit 1; }
on_failure() {
  local rc=$? line=${BASH_LINENO[0]}
  log "ERROR: bring-up failed (exit ${rc}, up.sh line ${line}); tear down with: hack/node/down.sh ${D}"
  print_tails
  exit 1
}

# spawn NAME CMD...: run a daemon in its own session (a Ctrl-C of the caller's terminal or a
# signal to pytest's process group does not reach it), log to DIR/logs/NAME.log, PID in DIR/pids.
spawn() {
  local name="$1"; shift
  setsid "$@" </dev/null >"${D}/logs/${name}.log" 2>&1 &
  echo $! >"${D}/pids/${name}.pid"
}

# Running = exists and is not a zombie: orphaned daemons are reaped by PID 1, which in some
# containers/VMs does so only every few seconds, and kill -0 succeeds on a zombie.
running() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ "${stat:0:1}" != Z ]]
}
alive() { running "$(cat "${D}/pids/$1.pid")"; }

# wait_for WHAT CMD...: poll CMD until it succeeds; fail at the deadline, or at once (with the
# log) when a daemon we started has exited.
wait_for() {
  local what="$1"; shift
  local deadline=$((SECONDS + ${START_TIMEOUT:-120})) p name
  until "$@" >/dev/null 2>&1; do
    for p in "${D}"/pids/*.pid; do
      name="$(basename "$p" .pid)"
      alive "${name}" || die "${name} exited while waiting for ${what}"
    done
    ((SECONDS < deadline)) || die "timed out after ${START_TIMEOUT:-120}s waiting for ${what}"
    sleep 0.2
  done
}

node_ip() { ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p'; }

# Free TCP ports for everything that listens: the node never takes a fixed, host-wide port,
# so it cannot collide with the suite's own control planes (tests/k8s) or anything else.
pick_ports() {
  read -r ETCD_PORT ETCD_PEER_PORT API_PORT KCM_PORT SCHED_PORT KUBELET_PORT \
    KUBELET_HEALTHZ_PORT PROXY_HEALTHZ_PORT PROXY_METRICS_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(9)]
for s in socks:
    s.bind(("0.0.0.0", 0))
print(*(s.getsockname()[1] for s in socks))')
}

# DIR/env: the node's addresses as KEY=value lines (bash-sourceable, parsed by tests/support/node.py).
save_env() {
  cat >"${D}/env" <<EOF
NODE_NAME=${NODE_NAME}
NODE_IP=${NODE_IP}
API_PORT=${API_PORT}
KUBECONFIG=${D}/etc/admin.kubeconfig
ETCD_PORT=${ETCD_PORT}
ETCD_PEER_PORT=${ETCD_PEER_PORT}
KCM_PORT=${KCM_PORT}
SCHED_PORT=${SCHED_PORT}
KUBELET_PORT=${KUBELET_PORT}
KUBELET_HEALTHZ_PORT=${KUBELET_HEALTHZ_PORT}
PROXY_HEALTHZ_PORT=${PROXY_HEALTHZ_PORT}
PROXY_METRICS_PORT=${PROXY_METRICS_PORT}
CONTAINERD_SOCK=${CONTAINERD_SOCK}
BRIDGE=${BRIDGE}
SERVICE_CIDR=${SERVICE_CIDR}
DNS_IP=${DNS_IP}
POD_SUBNET=${POD_SUBNET}
EOF
  load_env
}
load_env() {
  # shellcheck disable=SC1091
  source "${D}/env"
  ETCD_URL="http://127.0.0.1:${ETCD_PORT}"
}

# --- PKI (openssl, EC P-256, one CA valid 7 days) ---------------------------------------------
cert() { # NAME SUBJECT [SAN]: a key and a certificate signed by the CA
  local name="$1" subj="$2" san="${3:-}" p="${D}/pki" ext
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "${p}/${name}.key" 2>/dev/null
  openssl req -new -key "${p}/${name}.key" -subj "${subj}" -out "${p}/${name}.csr"
  ext="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment"
  if [[ -n "${san}" ]]; then
    ext+=$'\n'"extendedKeyUsage=serverAuth,clientAuth"$'\n'"subjectAltName=${san}"
  else
    ext+=$'\n'"extendedKeyUsage=clientAuth"
  fi
  openssl x509 -req -in "${p}/${name}.csr" -CA "${p}/ca.crt" -CAkey "${p}/ca.key" \
    -CAcreateserial -days 7 -extfile <(printf '%s\n' "${ext}") -out "${p}/${name}.crt" 2>/dev/null
  rm -f "${p}/${name}.csr"
}

make_pki() {
  local p="${D}/pki"
  mkdir -p "${p}" && chmod 0700 "${p}"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "${p}/ca.key" 2>/dev/null
  openssl req -x509 -new -key "${p}/ca.key" -subj "/CN=sluice-node-ca" -days 7 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "${p}/ca.crt"
  cert apiserver "/CN=kube-apiserver" \
    "IP:${NODE_IP},IP:127.0.0.1,IP:${SERVICE_CIDR%.*}.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
  cert kubelet-serving "/CN=${NODE_NAME}" "IP:${NODE_IP},IP:127.0.0.1,DNS:${NODE_NAME},DNS:localhost"
  cert admin "/O=system:masters/CN=sluice-node-admin"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  cert kube-controller-manager "/CN=system:kube-controller-manager"
  cert kube-scheduler "/CN=system:kube-scheduler"
  cert kube-proxy "/CN=system:kube-proxy"
  cert kubelet "/O=system:nodes/CN=system:node:${NODE_NAME}"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "${p}/sa.key" 2>/dev/null
  openssl pkey -in "${p}/sa.key" -pubout -out "${p}/sa.pub"
  step "PKI written"
}

kubeconfig() { # NAME CERT: DIR/etc/NAME.kubeconfig for the client certificate CERT
  cat >"${D}/etc/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sluice-node
  cluster: {server: "https://${NODE_IP}:${API_PORT}", certificate-authority: "${D}/pki/ca.crt"}
users:
- name: $1
  user: {client-certificate: "${D}/pki/$2.crt", client-key: "${D}/pki/$2.key"}
contexts:
- name: sluice-node
  context: {cluster: sluice-node, user: $1}
current-context: sluice-node
EOF
}

# --- clients -----------------------------------------------------------------------------------
api_get() {
  [[ "$(curl -fsS --max-time 5 --cacert "${D}/pki/ca.crt" --cert "${D}/pki/admin.crt" \
        --key "${D}/pki/admin.key" "https://${NODE_IP}:${API_PORT}$1")" == ok ]]
}
kubectl_() { "${BIN}/kubectl" --kubeconfig="${D}/etc/admin.kubeconfig" --cache-dir="${D}/kube-cache" "$@"; }
ctr_() { ctr --address "${CONTAINERD_SOCK}" --namespace k8s.io "$@"; }
crictl_() { "${BIN}/crictl" --runtime-endpoint "unix://${CONTAINERD_SOCK}" --timeout 30s "$@"; }
node_ready() {
  [[ "$(kubectl_ get node "${NODE_NAME}" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]
}
dns_ready() {
  [[ "$(kubectl_ -n kube-system get deployment coredns -o jsonpath='{.status.readyReplicas}')" == 1 ]]
}

# --- host-state probes (recorded by up.sh, compared by down.sh and tests/e2e) ----------------
nft_tables() { # "FAMILY NAME" of every nftables table (iptables-nft's included)
  command -v nft >/dev/null && nft list tables 2>/dev/null | awk '$1 == "table" {print $2, $3}' | sort
}
iptables_chains() { # "CMD TABLE CHAIN" for every chain of iptables and ip6tables
  local cmd
  for cmd in iptables-save ip6tables-save; do
    command -v "${cmd}" >/dev/null || continue
    "${cmd}" 2>/dev/null | awk -v c="${cmd%-save}" '/^\*/{t=substr($0,2)} /^:/{print c, t, substr($1,2)}'
  done | sort
}
cgroup_dirs() { # the first level of every cgroup hierarchy (kubelet adds kubepods there)
  find /sys/fs/cgroup -mindepth 1 -maxdepth 2 -type d 2>/dev/null | sort
}
