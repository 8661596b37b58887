#!/usr/bin/env bash
# bench-node.sh [DIR]: the node scenarios of lk-bench (Pods by scheduling gates, routes
# to the holder) on a real one-node cluster: the node up, the images built and
# imported, the operator installed with Helm (the chart's defaults), lk-bench --node,
# the node stopped whatever happened. Writes bench/results/node-latest.md.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
dir=${1:-target/bench-node}
out=${BENCH_NODE_OUT:-bench/results/node-latest.md}
# shellcheck disable=SC2317  # run by the trap
cleanup() { hack/node.sh down "$dir" >/dev/null 2>&1 || true; }
trap cleanup EXIT
cargo build --locked --release -p lk-bench || exit 1
hack/node.sh up "$dir" || exit 1
tar=$(hack/image.sh build dev) || exit 1
tools=$(hack/image.sh tools dev) || exit 1
hack/node.sh import "$dir" "$tar" || exit 1
hack/node.sh import "$dir" "$tools" || exit 1
export KUBECONFIG=$dir/kubeconfig
# The test kit's kubectl (scenario 9 applies an example with it) talks to this cluster.
export LEASEKEEPER_TEST_KUBECONFIG=$KUBECONFIG
bin=$(hack/control-plane.sh bin)
"$bin/helm" install lk charts/leasekeeper -n leasekeeper-system --create-namespace \
  --set image.repository=localhost/leasekeeper --set image.tag=dev --set image.pullPolicy=Never \
  --wait --timeout 180s || exit 1
extra=()
[ -n "${BENCH_NODE_SMOKE:-}" ] && extra=(--smoke)
target/release/lk-bench --node --kubeconfig "$dir/kubeconfig" --bin target/release --out "$out" "${extra[@]}"
