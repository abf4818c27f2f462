#!/usr/bin/env bash
# Bring up a real one-node Kubernetes cluster on this machine (as root): etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, containerd + runc, kubelet, kube-proxy (iptables),
# the CNI bridge plugin and CoreDNS, everything under one state directory.
#
# Usage: hack/node/up.sh [DIR]     (DIR default: ${SLUICE_NODE_DIR:-/tmp/sluice-node})
#   then: export KUBECONFIG=DIR/etc/admin.kubeconfig; kubectl get nodes
#   tear down: hack/node/down.sh DIR   (also after a failed bring-up)
#
# Binaries: ${SLUICE_CACHE:-~/.cache/sluice}/bin (hack/k8s/build.sh); images:
# ${SLUICE_CACHE}/images/node (hack/node/images.sh); Debian packages: hack/node/ensure-deps.sh.
# `make setup-node` does all three. Everything the node writes is under DIR, except what the
# kernel makes host-wide (iptables chains, the sluice0 bridge, veths, network namespaces in
# /run/netns, kubepods cgroups, a few sysctls): DIR/host-state records the host as found so that
# down.sh can put it back. Daemons run in their own sessions, their PIDs in DIR/pids; their
# logs are in DIR/logs (on failure this script prints their tails).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../k8s/versions.env
source "${HERE}/../k8s/versions.env"
D="${1:-${SLUICE_NODE_DIR:-/tmp/sluice-node}}"
mkdir -p "${D}" && D="$(cd "${D}" && pwd)"
# shellcheck source=lib.sh
source "${HERE}/lib.sh"
START_TIMEOUT="${SLUICE_NODE_TIMEOUT:-120}"

preflight() {
  [[ "$(id -u)" == 0 ]] || die "the one-node cluster needs root (containerd, runc, iptables, network namespaces, mounts); run as root"
  local missing=() b
  for b in "${NODE_BINARIES[@]}"; do [[ -x "${BIN}/${b}" ]] || missing+=("${BIN}/${b}"); done
  [[ ${#missing[@]} -eq 0 ]] || die "missing ${missing[*]}: run 'make setup-k8s' (hack/k8s/build.sh)"
  for b in containerd containerd-shim-runc-v2 runc ctr iptables ip6tables nft; do
    command -v "$b" >/dev/null || missing+=("$b")
  done
  for b in bridge host-local portmap loopback; do [[ -x "${CNI_BIN}/${b}" ]] || missing+=("${CNI_BIN}/${b}"); done
  [[ ${#missing[@]} -eq 0 ]] || die "missing ${missing[*]}: run 'make setup-node' as root (hack/node/ensure-deps.sh: Debian containerd, runc, containernetworking-plugins, iptables, nftables)"
  for b in pause coredns busybox; do [[ -f "${IMAGES}/${b}.tar" ]] || missing+=("${IMAGES}/${b}.tar"); done
  [[ ${#missing[@]} -eq 0 ]] || die "missing ${missing[*]}: run 'make setup-node' (hack/node/images.sh)"
  [[ -d /sys/fs/cgroup/memory || -f /sys/fs/cgroup/cgroup.controllers ]] || die "no cgroup filesystem under /sys/fs/cgroup: the kubelet cannot run here"
  if [[ -s "${CURRENT}" ]]; then
    die "a node is already running on this machine (or was not torn down): hack/node/down.sh $(cat "${CURRENT}")"
  fi
  if ip link show "${BRIDGE}" >/dev/null 2>&1; then
    die "the bridge ${BRIDGE} exists: a node is already running on this machine (or was not torn down: hack/node/down.sh DIR)"
  fi
  [[ ! -e "${D}/pids" ]] || die "${D} holds a node already (tear it down first: hack/node/down.sh ${D})"
}

# Record what the node may change host-wide so down.sh can restore and check it.
record_host_state() {
  mkdir -p "${D}/host-state"
  local k
  for k in "${SYSCTLS[@]}"; do
    if [[ -e "/proc/sys/${k//.//}" ]]; then printf '%s=%s\n' "$k" "$(cat "/proc/sys/${k//.//}")"; fi
  done >"${D}/host-state/sysctl"
  iptables_chains >"${D}/host-state/iptables-chains"
  nft_tables >"${D}/host-state/nft-tables"
  ls /run/netns 2>/dev/null >"${D}/host-state/netns" || true
  cgroup_dirs >"${D}/host-state/cgroups"
  for k in "${HOST_PATHS[@]}"; do if [[ -e "$k" ]]; then echo "$k"; fi; done >"${D}/host-state/paths"
}

write_configs() {
  local e="${D}/etc"
  mkdir -p "${e}/cni" "${D}/lib/cni" "${D}/log/pods"
  kubeconfig admin admin
  kubeconfig kube-controller-manager kube-controller-manager
  kubeconfig kube-scheduler kube-scheduler
  kubeconfig kube-proxy kube-proxy
  kubeconfig kubelet kubelet

  cat >"${e}/containerd.toml" <<EOF
version = 2
root = "${D}/lib/containerd"
state = "${D}/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "${CONTAINERD_SOCK}"
[ttrpc]
  address = "${D}/run/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "${D}/lib/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:${PAUSE_VERSION}"
  # Processes here lack CAP_SYS_RESOURCE even as root: without this runc cannot set the
  # kubelet's oom_score_adj of -998 and every Pod sandbox fails ("can't get final child's PID").
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "${D}/run/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "${CNI_BIN}"
    conf_dir = "${e}/cni"
EOF

  cat >"${e}/cni/10-sluice.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "sluice-node",
  "plugins": [
    {"type": "bridge", "bridge": "${BRIDGE}", "isGateway": true, "ipMasq": true,
     "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "${D}/lib/cni/networks",
              "ranges": [[{"subnet": "${POD_SUBNET}"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

  cat >"${e}/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: ${NODE_IP}
port: ${KUBELET_PORT}
healthzBindAddress: 127.0.0.1
healthzPort: ${KUBELET_HEALTHZ_PORT}
readOnlyPort: 0
cgroupDriver: cgroupfs
failCgroupV1: false
containerRuntimeEndpoint: unix://${CONTAINERD_SOCK}
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: ${D}/pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: ${D}/pki/kubelet-serving.crt
tlsPrivateKeyFile: ${D}/pki/kubelet-serving.key
clusterDomain: cluster.local
clusterDNS: [${DNS_IP}]
resolvConf: /etc/resolv.conf
podLogsDir: ${D}/log/pods
# Imported images can never be pulled back (there is no registry): never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "1%", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
serializeImagePulls: false
EOF

  cat >"${e}/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: ${e}/kube-proxy.kubeconfig}
hostnameOverride: ${NODE_NAME}
mode: iptables
clusterCIDR: ${CLUSTER_CIDR}
healthzBindAddress: 127.0.0.1:${PROXY_HEALTHZ_PORT}
metricsBindAddress: 127.0.0.1:${PROXY_METRICS_PORT}
# 0 = leave the host's conntrack sysctls as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
# No NodePorts on 127.0.0.1: that would need net.ipv4.conf.all.route_localnet=1 host-wide.
iptables: {localhostNodePorts: false}
EOF
}

start_control_plane() {
  mkdir -p "${D}/lib/etcd" && chmod 0700 "${D}/lib/etcd"
  spawn etcd "${BIN}/etcd" --name=node --data-dir="${D}/lib/etcd" \
    --listen-client-urls="${ETCD_URL}" --advertise-client-urls="${ETCD_URL}" \
    --listen-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-advertise-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-cluster="node=http://127.0.0.1:${ETCD_PEER_PORT}" \
    --unsafe-no-fsync=true --log-level=warn
  wait_for "etcd /health" curl -fsS "${ETCD_URL}/health"
  step "etcd healthy"

  # Reachable from Pods through the 'kubernetes' Service (the endpoint reconciler publishes
  # NODE_IP:API_PORT), so it binds the node IP, not loopback.
  spawn kube-apiserver "${BIN}/kube-apiserver" --etcd-servers="${ETCD_URL}" \
    --bind-address="${NODE_IP}" --advertise-address="${NODE_IP}" --secure-port="${API_PORT}" \
    --cert-dir="${D}/pki/apiserver-dyn" \
    --tls-cert-file="${D}/pki/apiserver.crt" --tls-private-key-file="${D}/pki/apiserver.key" \
    --client-ca-file="${D}/pki/ca.crt" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --kubelet-client-certificate="${D}/pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="${D}/pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="${D}/pki/ca.crt" \
    --kubelet-preferred-address-types=InternalIP \
    --service-cluster-ip-range="${SERVICE_CIDR}" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="${D}/pki/sa.pub" \
    --service-account-signing-key-file="${D}/pki/sa.key" --v=1
  wait_for "kube-apiserver /readyz" api_get /readyz
  step "kube-apiserver ready"

  spawn kube-controller-manager "${BIN}/kube-controller-manager" \
    --kubeconfig="${D}/etc/kube-controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="${KCM_PORT}" --cert-dir="${D}/pki/kcm-dyn" \
    --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="${D}/pki/sa.key" --root-ca-file="${D}/pki/ca.crt" \
    --cluster-signing-cert-file="${D}/pki/ca.crt" --cluster-signing-key-file="${D}/pki/ca.key" \
    --service-cluster-ip-range="${SERVICE_CIDR}" \
    --allocate-node-cidrs --cluster-cidr="${CLUSTER_CIDR}" --node-cidr-mask-size=24 --v=1
  spawn kube-scheduler "${BIN}/kube-scheduler" \
    --kubeconfig="${D}/etc/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="${D}/etc/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="${D}/etc/kube-scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="${SCHED_PORT}" --leader-elect=false --v=1
}

import_app_images() {
  local img
  for img in "${APP_IMAGES[@]}"; do
    if [[ -f "${APP_IMAGES_DIR}/${img}" ]]; then
      ctr_ images import --no-unpack=false "${APP_IMAGES_DIR}/${img}" >>"${D}/logs/app-images.log" 2>&1 ||
        { log "ctr images import ${APP_IMAGES_DIR}/${img} failed (${D}/logs/app-images.log)"; return 1; }
    else
      log "not imported: ${APP_IMAGES_DIR}/${img} is missing (make image builds it; the chart's e2e tests need it)"
    fi
  done
}

start_node() {
  # containerd's content and unpacked images on a tmpfs: importing ~100 MiB of Sluice's images
  # and removing the unpacked files again at teardown took ~10 s each on disk; an unmount is
  # instant (down.sh unmounts everything under DIR).
  mkdir -p "${D}/lib/containerd"
  mount -t tmpfs -o size=4g,mode=0700 sluice-node-containerd "${D}/lib/containerd"
  spawn containerd containerd --config "${D}/etc/containerd.toml"
  wait_for "containerd socket" ctr_ version
  step "containerd up"
  local img
  for img in pause coredns busybox; do
    ctr_ images import --no-unpack=false "${IMAGES}/${img}.tar" >>"${D}/logs/images.log" 2>&1 ||
      die "ctr images import ${IMAGES}/${img}.tar failed (${D}/logs/images.log)"
  done
  step "images imported"
  # Sluice's images (~100 MiB to unpack, ~10 s) in the background while the node and CoreDNS
  # come up; main waits for it before declaring the node up.
  import_app_images &
  APP_IMPORT_PID=$!

  spawn kubelet "${BIN}/kubelet" --config="${D}/etc/kubelet.yaml" \
    --kubeconfig="${D}/etc/kubelet.kubeconfig" --root-dir="${D}/lib/kubelet" \
    --hostname-override="${NODE_NAME}" --node-ip="${NODE_IP}" --v=1
  spawn kube-proxy "${BIN}/kube-proxy" --config="${D}/etc/kube-proxy.yaml" --v=1
  wait_for "node ${NODE_NAME} Ready" node_ready
  step "node Ready"
}

start_dns() {
  sed -e "s|@COREDNS_VERSION@|${COREDNS_VERSION}|g" -e "s|@DNS_IP@|${DNS_IP}|g" \
    "${HERE}/coredns.yaml" >"${D}/etc/coredns.yaml"
  kubectl_ apply -f "${D}/etc/coredns.yaml" >>"${D}/logs/kubectl.log"
  wait_for "CoreDNS Ready" dns_ready
  step "CoreDNS Ready"
}

main() {
  preflight
  STARTED=1
  mkdir -p "${D}"/{pids,logs,pki,etc,lib,run}
  echo "${D}" >"${CURRENT}"
  pick_ports
  NODE_IP="$(node_ip)"
  [[ -n "${NODE_IP}" ]] || die "cannot tell this machine's IPv4 address (no default route?)"
  save_env
  record_host_state
  make_pki
  write_configs
  start_control_plane
  start_node
  start_dns
  wait "${APP_IMPORT_PID}" || die "importing Sluice's images failed"
  step "Sluice images imported"
  echo "export KUBECONFIG=${D}/etc/admin.kubeconfig"
}

# Sourced (e.g. to run one step by hand), only the functions are defined.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  trap 'on_failure' ERR
  main
fi
