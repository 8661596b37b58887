#!/usr/bin/env bash
# Negative controls: each deliberately broken build/holder must make lk-chaos report
# violations. Passes only if every control is caught.
#   hack/chaos-controls.sh PLANE_DIR BIN_DIR DURATION
set -uo pipefail
plane=$1 bin=$2 duration=${3:-30s}
# no-precondition is left out: this fault model does not catch it (see README,
# "Reliability"); run it by hand with lk-chaos run --break no-precondition.
controls=(${LK_CONTROLS:-grant-before-lease skip-lock-delay non-leader-writes holder-ignores-lost})
missed=()
# Whether a control shows depends on the faults a run happens to inject, so each gets
# up to three short runs (fixed seeds); it counts as caught on the first that reports.
for c in "${controls[@]}"; do
  caught=
  for seed in 42 43 44; do
    echo "=== negative control: $c (seed $seed)"
    out=$("$bin/lk-chaos" run --plane "$plane" --bin "$bin" --duration "$duration" --seed "$seed" --break "$c" 2>&1)
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
