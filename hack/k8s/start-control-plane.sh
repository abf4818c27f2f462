#!/usr/bin/env bash
# Prove that the binaries from hack/k8s/build.sh make a working control plane:
#
#   1. generate a CA, an apiserver serving cert, admin + controller-manager
#      client certs and a service-account key pair (openssl, EC P-256);
#   2. start etcd, kube-apiserver and kube-controller-manager on free
#      127.0.0.1 ports (nothing listens on any other address);
#   3. write an admin kubeconfig and wait for /readyz;
#   4. smoke test: kubectl version / get ns / create deployment, wait until the
#      controller-manager has made a ReplicaSet and a (Pending: no nodes, no
#      scheduler) Pod; helm create + helm install of a chart;
#   5. tear everything down (only the processes this script started).
#
# Usage: hack/k8s/start-control-plane.sh [--hold]
#   --hold   after the smoke test, keep the control plane running until
#            Ctrl-C (prints KUBECONFIG to use).
# Env: SLUICE_CACHE (binaries in $SLUICE_CACHE/bin), SLUICE_KEEP=1 keeps the
#      temp dir (certs, etcd data, logs) even on success. It is always kept
#      on failure. Needs: openssl, curl, python3 (only to pick free ports).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "${HERE}/versions.env"
BIN="${SLUICE_CACHE:-${HOME}/.cache/sluice}/bin"
HOLD=0
[[ "${1:-}" == "--hold" ]] && HOLD=1

for b in etcd kube-apiserver kube-controller-manager kubectl helm; do
  [[ -x "${BIN}/${b}" ]] || { echo "missing ${BIN}/${b}: run hack/k8s/build.sh first" >&2; exit 1; }
done

T0=$(date +%s.%N)
log() { printf '[cp %6.2fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="${T0}" 'BEGIN{print a-b}')" "$*" >&2; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sluice-k8s.XXXXXX")"
CERTS="${WORK}/pki"; LOGS="${WORK}/logs"
mkdir -p "${CERTS}" "${LOGS}"
mkdir -m 700 "${WORK}/etcd-data"   # etcd warns about anything wider than 0700
chmod 700 "${WORK}"

PIDS=()        # processes we started, in start order
NAMES=()
OK=0
start_bg() { # name cmd...: start cmd in the background, logging to $LOGS/name.log
  local name="$1"; shift
  "$@" >"${LOGS}/${name}.log" 2>&1 &
  PIDS+=($!); NAMES+=("${name}")
}
cleanup() {
  local rc=$?
  local i t0
  # Stop in reverse start order (controller-manager, apiserver, etcd), each
  # with SIGTERM and up to 15s grace before SIGKILL.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    t0=${SECONDS}
    kill "${PIDS[i]}" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "${PIDS[i]}" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "${PIDS[i]}" 2>/dev/null; then
      kill -9 "${PIDS[i]}" 2>/dev/null || true
      log "stopped ${NAMES[i]} with SIGKILL after $((SECONDS - t0))s"
    else
      log "stopped ${NAMES[i]} (SIGTERM) in ~$((SECONDS - t0))s"
    fi
    wait "${PIDS[i]}" 2>/dev/null || true
  done
  if [[ ${OK} == 1 && "${SLUICE_KEEP:-0}" != 1 ]]; then
    rm -rf "${WORK}"
    log "torn down; removed ${WORK}"
  else
    if [[ ${OK} != 1 ]]; then
      echo "---- FAILED (exit ${rc}); logs kept in ${LOGS} ----" >&2
      for f in "${LOGS}"/*.log; do [[ -f "$f" ]] && { echo "== tail $f" >&2; tail -n 20 "$f" >&2; }; done
    fi
    log "torn down; kept ${WORK}"
  fi
  exit "${rc}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- free ports (bound simultaneously so they are distinct) ----------------
read -r ETCD_PORT ETCD_PEER_PORT API_PORT KCM_PORT < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(4):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)
log "ports: etcd ${ETCD_PORT} (peer ${ETCD_PEER_PORT}), kube-apiserver ${API_PORT}, kube-controller-manager ${KCM_PORT}; dir ${WORK}"

# ---- PKI ------------------------------------------------------------------------
SERVICE_CIDR="10.0.0.0/24"     # first IP (10.0.0.1) is the 'kubernetes' Service
cd "${CERTS}"
newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
# sign NAME SUBJECT EXTENSIONS: NAME.key + NAME.crt signed by ca
sign() {
  newkey "$1.key"
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
  printf '%s\n' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
    -extfile "$1.ext" -out "$1.crt" 2>/dev/null
}
newkey ca.key
openssl req -x509 -new -key ca.key -subj "/CN=sluice-test-ca" -days 2 -out ca.crt \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
sign apiserver "/CN=kube-apiserver" "$(printf '%s\n' \
  'basicConstraints=CA:FALSE' 'keyUsage=critical,digitalSignature,keyEncipherment' \
  'extendedKeyUsage=serverAuth' \
  'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local')"
CLIENT_EXT="$(printf '%s\n' 'basicConstraints=CA:FALSE' 'keyUsage=critical,digitalSignature,keyEncipherment' 'extendedKeyUsage=clientAuth')"
sign admin "/O=system:masters/CN=sluice-admin" "${CLIENT_EXT}"
sign kcm "/CN=system:kube-controller-manager" "${CLIENT_EXT}"   # bound by the bootstrap RBAC policy
newkey sa.key                                                   # service-account token signing key
openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
cd - >/dev/null
log "PKI generated"

# ---- kubeconfigs (written with kubectl itself) ---------------------------------
API_URL="https://127.0.0.1:${API_PORT}"
mkkubeconfig() { # file user cert key
  local kc="$1"
  "${BIN}/kubectl" --kubeconfig="${kc}" config set-cluster sluice --server="${API_URL}" \
    --certificate-authority="${CERTS}/ca.crt" --embed-certs=true >/dev/null
  "${BIN}/kubectl" --kubeconfig="${kc}" config set-credentials "$2" \
    --client-certificate="$3" --client-key="$4" --embed-certs=true >/dev/null
  "${BIN}/kubectl" --kubeconfig="${kc}" config set-context sluice --cluster=sluice --user="$2" >/dev/null
  "${BIN}/kubectl" --kubeconfig="${kc}" config use-context sluice >/dev/null
}
ADMIN_KC="${WORK}/admin.kubeconfig"
KCM_KC="${WORK}/kube-controller-manager.kubeconfig"
mkkubeconfig "${ADMIN_KC}" sluice-admin "${CERTS}/admin.crt" "${CERTS}/admin.key"
mkkubeconfig "${KCM_KC}" system:kube-controller-manager "${CERTS}/kcm.crt" "${CERTS}/kcm.key"
export KUBECONFIG="${ADMIN_KC}"
kubectl() { "${BIN}/kubectl" "$@"; }

wait_for() { # description timeout_seconds command...
  local what="$1" timeout="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then log "timed out after ${timeout}s waiting for ${what}"; return 1; fi
    for p in "${PIDS[@]}"; do
      kill -0 "$p" 2>/dev/null || { log "a control-plane process (pid $p) died while waiting for ${what}"; return 1; }
    done
    sleep 0.2
  done
  log "${what}: ok"
}

# ---- etcd -------------------------------------------------------------------
ETCD_URL="http://127.0.0.1:${ETCD_PORT}"
start_bg etcd "${BIN}/etcd" \
  --name=sluice \
  --data-dir="${WORK}/etcd-data" \
  --listen-client-urls="${ETCD_URL}" \
  --advertise-client-urls="${ETCD_URL}" \
  --listen-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}" \
  --initial-advertise-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}" \
  --initial-cluster="sluice=http://127.0.0.1:${ETCD_PEER_PORT}" \
  --unsafe-no-fsync=true \
  --log-level=warn
etcd_healthy() { curl -fsS "${ETCD_URL}/health" | grep -q '"health":"true"'; }
wait_for "etcd /health" 30 etcd_healthy

# ---- kube-apiserver -------------------------------------------------------------
start_bg kube-apiserver "${BIN}/kube-apiserver" \
  --etcd-servers="${ETCD_URL}" \
  --bind-address=127.0.0.1 \
  --advertise-address=127.0.0.1 \
  --endpoint-reconciler-type=none \
  --secure-port="${API_PORT}" \
  --cert-dir="${WORK}/apiserver-certs" \
  --tls-cert-file="${CERTS}/apiserver.crt" \
  --tls-private-key-file="${CERTS}/apiserver.key" \
  --client-ca-file="${CERTS}/ca.crt" \
  --authorization-mode=RBAC \
  --service-cluster-ip-range="${SERVICE_CIDR}" \
  --service-account-issuer="https://kubernetes.default.svc.cluster.local" \
  --service-account-key-file="${CERTS}/sa.pub" \
  --service-account-signing-key-file="${CERTS}/sa.key" \
  --v=1
api_ready() {
  [[ "$(curl -sS --cacert "${CERTS}/ca.crt" --cert "${CERTS}/admin.crt" --key "${CERTS}/admin.key" \
    "${API_URL}/readyz")" == ok ]]
}
wait_for "kube-apiserver /readyz" 90 api_ready

# ---- kube-controller-manager -------------------------------------------------------
start_bg kube-controller-manager "${BIN}/kube-controller-manager" \
  --kubeconfig="${KCM_KC}" \
  --bind-address=127.0.0.1 \
  --secure-port="${KCM_PORT}" \
  --cert-dir="${WORK}/kcm-certs" \
  --leader-elect=false \
  --use-service-account-credentials=true \
  --service-account-private-key-file="${CERTS}/sa.key" \
  --root-ca-file="${CERTS}/ca.crt" \
  --cluster-signing-cert-file="${CERTS}/ca.crt" \
  --cluster-signing-key-file="${CERTS}/ca.key" \
  --service-cluster-ip-range="${SERVICE_CIDR}" \
  --v=1
kcm_healthy() { [[ "$(curl -sk "https://127.0.0.1:${KCM_PORT}/healthz")" == ok ]]; }
wait_for "kube-controller-manager /healthz" 60 kcm_healthy

# ---- smoke test -------------------------------------------------------------------
kubectl version
kubectl version -o json | grep -q "\"gitVersion\": \"${KUBERNETES_VERSION}\"" ||
  { log "server/client version is not ${KUBERNETES_VERSION}"; exit 1; }
kubectl get ns
for ns in default kube-system kube-public kube-node-lease; do
  kubectl get ns "${ns}" >/dev/null
done
# The ServiceAccount admission plugin rejects Pods until the serviceaccount
# controller has created 'default' in the namespace.
wait_for "serviceaccount default/default (controller-manager)" 60 kubectl get serviceaccount default -n default
kubectl create deployment x --image=nginx
wait_for "ReplicaSet for deployment x (controller-manager)" 60 \
  bash -c '[[ -n "$("$0" get rs -l app=x -o name)" ]]' "${BIN}/kubectl"
wait_for "Pending Pod for deployment x (controller-manager)" 60 \
  bash -c '[[ "$("$0" get pods -l app=x -o jsonpath="{.items[*].status.phase}")" == Pending ]]' "${BIN}/kubectl"
kubectl get deploy,rs,pods -o wide

# helm against the same apiserver (chart generated locally, nothing downloaded)
"${BIN}/helm" version
"${BIN}/helm" create "${WORK}/demo-chart" >/dev/null
"${BIN}/helm" install demo "${WORK}/demo-chart" --namespace helm-demo --create-namespace >"${LOGS}/helm-install.log"
"${BIN}/helm" list -A
kubectl get deploy -n helm-demo demo-demo-chart >/dev/null
log "helm install: ok"

log "resident memory (RSS) now: $(ps -o comm=,rss= -p "$(IFS=,; echo "${PIDS[*]}")" | awk '{printf "%s %d MiB; ", $1, $2/1024}')"
log "SMOKE TEST PASSED"
OK=1

if [[ ${HOLD} == 1 ]]; then
  log "holding; use: export KUBECONFIG=${ADMIN_KC}   (Ctrl-C to stop)"
  SLUICE_KEEP=1
  while :; do sleep 3600; done
fi
