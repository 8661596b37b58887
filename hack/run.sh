#!/usr/bin/env bash
# make run: run the operator in the foreground.
# - If KUBECONFIG (or ~/.kube/config) reaches a cluster, run against it.
# - Otherwise start the local control plane in .plane/ (the embedded default).
# Either way the CRD is applied first. Ctrl-C stops the operator and whatever this
# script started.
set -euo pipefail
cd "$(dirname "$0")/.."
PLANE=hack/control-plane.sh
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
cargo build --locked -q
target/debug/leasekeeper crd | "$KUBECTL" apply --server-side --force-conflicts -f - >/dev/null
echo "[run] CRD applied. In another shell:"
echo "        export KUBECONFIG=$KUBECONFIG PATH=$BIN:\$PATH"
echo "        kubectl apply -f examples/maintenance-lock.yaml && kubectl get lockclaims"
target/debug/leasekeeper run --metrics-addr "${METRICS_ADDR:-127.0.0.1:8080}" "$@" &
op=$!
trap 'kill -INT $op 2>/dev/null || true' INT TERM
wait $op || true
wait $op 2>/dev/null || true
