#!/usr/bin/env bash
# e2e-cluster.sh [DIR]: the install path on a real node (make e2e-cluster): the node up,
# the operator image built from the Dockerfile and a tools image, both imported into
# containerd, tests/cluster.rs run against the node, the node stopped whatever happened.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
dir=${1:-target/node}
# shellcheck disable=SC2317  # run by the trap
cleanup() { hack/node.sh down "$dir" >/dev/null 2>&1 || true; }
trap cleanup EXIT
hack/node.sh up "$dir" || exit 1
tar=$(hack/image.sh build dev) || exit 1
tools=$(hack/image.sh tools dev) || exit 1
hack/node.sh import "$dir" "$tar" || exit 1
hack/node.sh import "$dir" "$tools" || exit 1
LEASEKEEPER_TEST_KUBECONFIG=$dir/kubeconfig cargo test --locked --test cluster -- \
  --ignored --nocapture --test-threads=1 2>&1 | tee target/e2e-cluster.log
rc=${PIPESTATUS[0]}
exit "$rc"
