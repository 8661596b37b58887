#!/usr/bin/env bash
# Negative controls: each deliberately broken build/holder must make lk-chaos report
# violations. Passes only if every control is caught.
#   hack/chaos-controls.sh PLANE_DIR BIN_DIR DURATION
set -uo pipefail
plane=$1 bin=$2 duration=${3:-30s}
read -r -a controls <<<"${LK_CONTROLS:-no-precondition grant-before-lease skip-lock-delay non-leader-writes holder-ignores-lost release-before-drain}"
# The faults each control is run with: all kinds, except for controls that need one
# fault to show, which the mixed schedule injects too rarely for a 30 s run:
# no-precondition shows when the leader decides from a stale Lease cache while holders
# renew (the Lease-watch stall); skip-lock-delay after an expiry (paused holders);
# holder-ignores-lost when the ignoring holder is paused past its TTL while it holds
# (its lock moves on, then it wakes and writes); release-before-drain when the leader
# gets SIGTERM while it works (the fault term-leader).
fault_args() {
  case $1 in
    no-precondition) extra=(--faults stall-lease-watch --fault-every 3) ;;
    skip-lock-delay | holder-ignores-lost) extra=(--faults pause-holder --fault-every 3) ;;
    release-before-drain) extra=(--faults term-leader --fault-every 2) ;;
    *) extra=() ;;
  esac
}
missed=()
# Whether a control shows depends on the faults a run happens to inject, so each gets
# up to three short runs (fixed seeds); it counts as caught on the first that reports.
for c in "${controls[@]}"; do
  caught=
  for seed in 42 43 44; do
    echo "=== negative control: $c (seed $seed)"
    fault_args "$c"
    out=$("$bin/lk-chaos" run --plane "$plane" --bin "$bin" --duration "$duration" --seed "$seed" --break "$c" "${extra[@]}" 2>&1)
    rc=$?
    echo "$out" | grep -E "^\| \(" | grep -v "| 0 |"
    if [ $rc -ne 0 ]; then caught=$seed; break; fi
  done
  if [ -n "$caught" ]; then
    echo "--- caught: $c (seed $caught)"
  else
    echo "--- NOT CAUGHT: $c"
    missed+=("$c")
  fi
done
if [ ${#missed[@]} -gt 0 ]; then
  echo "negative controls not caught: ${missed[*]}"
  exit 1
fi
echo "every negative control was caught (${#controls[@]} of ${#controls[@]})"
