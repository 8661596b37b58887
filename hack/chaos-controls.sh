#!/usr/bin/env bash
# Negative controls: each deliberately broken build/holder must make lk-chaos report
# violations. Passes only if every control is caught.
#   hack/chaos-controls.sh PLANE_DIR BIN_DIR DURATION
set -uo pipefail
plane=$1 bin=$2 duration=${3:-30s}
controls=(no-precondition grant-before-lease skip-lock-delay non-leader-writes holder-ignores-lost)
missed=()
for c in "${controls[@]}"; do
  echo "=== negative control: $c"
  out=$("$bin/lk-chaos" run --plane "$plane" --bin "$bin" --duration "$duration" --seed 42 --break "$c" 2>&1)
  rc=$?
  echo "$out" | grep -E "^\| \(|violation|seed" | head -20
  if [ $rc -eq 0 ]; then
    echo "--- NOT CAUGHT: $c"
    missed+=("$c")
  else
    echo "--- caught: $c"
  fi
done
if [ ${#missed[@]} -gt 0 ]; then
  echo "negative controls not caught: ${missed[*]}"
  exit 1
fi
echo "every negative control was caught (${#controls[@]} of ${#controls[@]})"
