#!/usr/bin/env bash
# The timings the end-to-end tests print (measured, never asserted), gathered from a
# `make test` log into a markdown file that names the commit and the build they came from.
# usage: hack/e2e-timings.sh target/test.log > bench/results/e2e-timings.md
set -euo pipefail
log=${1:?usage: e2e-timings.sh TEST_LOG}
commit=$(git rev-parse --short HEAD)
dirty=$(git status --porcelain --untracked-files=no | head -1)
echo "# Timings printed by the end-to-end tests"
echo
echo "From \`make test\` (debug build, suites running 16 tests at once against one local"
echo "control plane, so these include that load), commit ${commit}${dirty:+ plus uncommitted changes},"
echo "$(date -u -r "$log" '+%Y-%m-%d %H:%M UTC') (when the log was written), $(nproc) cores. Printed, not asserted."
echo
echo '```'
grep -E '^(e2e_[0-9]+|ha|client_[0-9]+|workload_[0-9]+|fence_[0-9]+|pods_[0-9]+|tenant_[0-9]+):' "$log" | sort -V
echo '```'
