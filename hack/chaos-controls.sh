#!/usr/bin/env bash
# Negative controls: each deliberately broken build (or holder) must be caught by the
# check that targets it, and the same fault schedule on the unbroken build must report
# nothing (the clean baseline). A control whose run failed for another reason (a panic,
# an error, only other checks firing) is not caught.
#   hack/chaos-controls.sh PLANE_DIR BIN_DIR DURATION
set -uo pipefail
plane=$1 bin=$2 duration=${3:-30s}
read -r -a controls <<<"${LK_CONTROLS:-no-precondition grant-before-lease skip-lock-delay non-leader-writes holder-ignores-lost release-before-drain lease-before-ending flash-double-grant ignore-term}"

# The faults each control is run with (and its baseline): all kinds, except for
# controls that need one fault to show, which a mixed 30 s schedule injects too rarely:
# no-precondition shows when the leader decides from a stale Lease view while holders
# renew (the Lease-watch stall); skip-lock-delay after an expiry and holder-ignores-lost
# when a holder is paused past its TTL (paused holders); release-before-drain when the
# leader gets SIGTERM while it works (term-leader); ignore-term when a leader is frozen
# past its term and wakes (pause-leader).
fault_args() {
  case $1 in
    no-precondition) echo "--faults stall-lease-watch --fault-every 3" ;;
    skip-lock-delay | holder-ignores-lost) echo "--faults pause-holder --fault-every 3" ;;
    release-before-drain) echo "--faults term-leader --fault-every 2" ;;
    ignore-term) echo "--faults pause-leader --fault-every 3" ;;
    *) echo "" ;;
  esac
}

# The check that targets each control (a prefix of its row in lk-chaos's report). Where
# the same sabotage shows in both views, the audit view's check is named with the
# watch view's: either firing catches it.
expected() {
  case $1 in
    no-precondition) echo "(a) two Granted at once|(a') audit: two Granted|(h) a healthy holder expired" ;;
    grant-before-lease) echo "(a) a Granted claim its Lease does not name|(b') audit" ;;
    skip-lock-delay) echo "(c) grant inside the lock delay" ;;
    non-leader-writes) echo "(g) a non-leader replica wrote|(g') audit" ;;
    holder-ignores-lost) echo "(d') a holder wrote a guarded object after losing its lock" ;;
    release-before-drain) echo "(g) a write landed after another replica took leadership|(g') audit" ;;
    lease-before-ending) echo "(b') audit" ;;
    flash-double-grant) echo "(a') audit: two Granted" ;;
    ignore-term) echo "(g') audit" ;;
  esac
}

# The rows of a report whose count is not zero.
fired() { grep -E '^\| \(' | grep -vE '\| 0 \|$' || true; }

run() { # SEED BREAK(or "") FAULT-ARGS...
  local seed=$1 brk=$2; shift 2
  local extra=()
  [ -n "$brk" ] && extra=(--break "$brk")
  "$bin/lk-chaos" run --plane "$plane" --bin "$bin" --duration "$duration" --seed "$seed" "${extra[@]}" "$@" 2>&1
}

failed=()
# Clean baselines: each distinct fault schedule on the unbroken build reports nothing.
declare -A baseline_done=()
for c in "${controls[@]}"; do
  args=$(fault_args "$c")
  [ -n "${baseline_done["x$args"]:-}" ] && continue
  baseline_done["x$args"]=1
  echo "=== clean baseline (seed 42) with faults: ${args:-all kinds}"
  # shellcheck disable=SC2086  # the fault args are words
  out=$(run 42 "" $args)
  rc=$?
  rows=$(echo "$out" | fired)
  if [ $rc -ne 0 ] || [ -n "$rows" ]; then
    echo "$rows"
    echo "$out" | grep -E "panicked|error" | head -5
    echo "--- BASELINE NOT CLEAN with faults: ${args:-all kinds}"
    failed+=("baseline(${args:-all})")
  else
    echo "--- baseline clean"
  fi
done

# Each control gets up to three short runs (fixed seeds): whether it shows depends on
# the faults a run happens to inject. Caught on the first run where its check fires.
for c in "${controls[@]}"; do
  want=$(expected "$c")
  caught=
  for seed in 42 43 44; do
    echo "=== negative control: $c (seed $seed), must fire: $want"
    # shellcheck disable=SC2046  # the fault args are words
    out=$(run "$seed" "$c" $(fault_args "$c"))
    rows=$(echo "$out" | fired)
    echo "$rows"
    if echo "$out" | grep -q "panicked"; then
      echo "    (a panic, not a check: not counted)"
      continue
    fi
    IFS='|' read -r -a alts <<<"$want"
    for a in "${alts[@]}"; do
      if echo "$rows" | grep -qF "| $a"; then caught=$seed; fi
    done
    [ -n "$caught" ] && break
  done
  if [ -n "$caught" ]; then
    echo "--- caught: $c by its own check (seed $caught)"
  else
    echo "--- NOT CAUGHT by its own check: $c"
    failed+=("$c")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "negative controls failed: ${failed[*]}"
  exit 1
fi
echo "every negative control was caught by the check that targets it (${#controls[@]} of ${#controls[@]}); every clean baseline reported nothing"
