#!/usr/bin/env bash
# make run: run the operator in the foreground.
# - If KUBECONFIG (or ~/.kube/config) reaches a cluster, run against it.
# - Otherwise start the local control plane in .plane/ (the embedded default).
# Either way the CRD is applied first. Ctrl-C stops the operator and whatever this
# script started.
set -euo pipefail
cd "$(dirname "$0")/.."
PLANE=hack/control-plane.sh
t0=$(date +%s)
step() { printf '[run] %s (%ss since start)\n' "$*" "$(($(date +%s) - t0))"; }

# Cold, the two builds take most of the first run: the operator (cargo, ~3 min on 2 cores)
# and etcd, kube-apiserver and kubectl (Go, ~4-6 min). They run side by side, which keeps
# both cores busy while either is linking.
mkdir -p target
step "building the operator (cargo build; cold ~3 min, then seconds) beside the control plane"
cargo build --locked -q -p leasekeeper --bin leasekeeper >target/run-cargo.log 2>&1 &
cargo_pid=$!
$PLANE build run
wait "$cargo_pid" || { cat target/run-cargo.log >&2; exit 1; }
step "builds done"
BIN=$($PLANE bin)
KUBECTL=$BIN/kubectl
started=

cleanup() {
  if [ -n "$started" ]; then $PLANE down .plane || true; fi
}
trap cleanup EXIT

if "$KUBECTL" get --raw /readyz >/dev/null 2>&1; then
  echo "[run] using the cluster in ${KUBECONFIG:-~/.kube/config}"
else
  echo "[run] no reachable cluster in KUBECONFIG: starting the local control plane in .plane/"
  $PLANE up .plane
  started=1
  export KUBECONFIG=$PWD/.plane/kubeconfig
fi
target/debug/leasekeeper crd | "$KUBECTL" apply --server-side --force-conflicts -f - >/dev/null
step "CRD applied; starting the operator. In another shell:"
echo "        export KUBECONFIG=$KUBECONFIG PATH=$BIN:\$PATH"
echo "        kubectl apply -f examples/maintenance-lock.yaml && kubectl get lockclaims"
addr=${METRICS_ADDR:-127.0.0.1:8080}
target/debug/leasekeeper run --metrics-addr "$addr" "$@" &
op=$!
# Say when it serves: Ready means leader, caches synced, reconciling.
for _ in $(seq 600); do
  if curl -fsS "http://$addr/readyz" >/dev/null 2>&1; then step "serving: http://$addr/readyz is ready"; break; fi
  kill -0 "$op" 2>/dev/null || break
  sleep 0.1
done
trap 'kill -INT $op 2>/dev/null || true' INT TERM
wait $op || true
wait $op 2>/dev/null || true
