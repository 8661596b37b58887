#!/usr/bin/env bash
# compat.sh VERSION...: for each Kubernetes release, build its kube-apiserver from the Go
# module (cached per version under ~/.cache/leasekeeper), start a plane on it, and run the
# API, controller, client, semaphore, tenant, chart (helm install), fencing and pods e2e suites against it (kubectl and helm
# stay the default release's). Writes a table to $COMPAT_OUT (bench/results/compat.md)
# and fails if any version failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${COMPAT_OUT:-bench/results/compat.md}
suites=(api controller client semaphore tenant chart fencing pods)
[ $# -gt 0 ] || { echo "usage: $0 VERSION..." >&2; exit 2; }

log() { printf '[compat] %s\n' "$*" >&2; }

hack/control-plane.sh build || exit 1
test_args=(--locked --no-fail-fast)
for s in "${suites[@]}"; do test_args+=(--test "$s"); done
cargo test "${test_args[@]}" --no-run || exit 1

rows=() failed=0
for v in "$@"; do
  dir=target/compat-plane-$v
  logf=target/compat-$v.log
  start=$(date +%s)
  result=
  if ! KVER=$v LK_K8S_BINS=kube-apiserver hack/control-plane.sh build >"$logf" 2>&1; then
    result="build failed (see $logf)"
  elif ! KVER=$v hack/control-plane.sh up "$dir" >>"$logf" 2>&1; then
    result="plane did not start (see $logf)"
  else
    log "$v: ${suites[*]}"
    LEASEKEEPER_TEST_KUBECONFIG=$PWD/$dir/kubeconfig cargo test "${test_args[@]}" >>"$logf" 2>&1
    rc=$?
    KVER=$v hack/control-plane.sh down "$dir" >>"$logf" 2>&1
    passed=$(grep -o '[0-9]* passed' "$logf" | awk '{s+=$1} END {print s+0}')
    nfail=$(grep -o '[0-9]* failed' "$logf" | awk '{s+=$1} END {print s+0}')
    if [ "$rc" -eq 0 ]; then
      result="pass: $passed tests"
    else
      result="FAIL: $passed passed, $nfail failed (see $logf)"
    fi
  fi
  case "$result" in pass*) ;; *) failed=1 ;; esac
  log "$v: $result"
  rows+=("| $v | $result | $(($(date +%s) - start)) s | $(date -u +%F) |")
done

{
  echo "# Kubernetes compatibility"
  echo
  echo "Commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src tests tools crds charts || echo ' (with uncommitted changes)')."
  echo
  echo "\`make compat\`: each release's kube-apiserver (etcd $(hack/control-plane.sh bin | sed 's/.*-etcd-\(v[0-9.]*\)-.*/\1/')), the suites ${suites[*]} (e2e, against the real API server), kubectl and helm of the default release."
  echo
  echo "| Kubernetes | result | time (build + run) | date |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$out"
cat "$out"
exit $failed
