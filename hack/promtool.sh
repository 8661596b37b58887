#!/usr/bin/env bash
# promtool.sh: builds Prometheus's promtool from its Go module (cached) and prints its
# path. The chart's alert rules and dashboard queries are checked and unit-tested with it
# (tests/observability.rs). Service-discovery plugins are left out (build tag
# remove_all_sd): promtool's rule checks and tests do not need them, and the build takes
# a third of the time.
set -euo pipefail
PVER=${PVER:-v0.316.0}
CACHE=${LK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/leasekeeper}
BIN=$CACHE/promtool-$PVER-nosd
if [ ! -x "$BIN/promtool" ]; then
  echo "[promtool] building promtool $PVER (cached in $BIN)" >&2
  mkdir -p "$BIN"
  GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$BIN" GOFLAGS="" \
    go install -trimpath -tags remove_all_sd -ldflags "-s -w" \
    "github.com/prometheus/prometheus/cmd/promtool@$PVER"
fi
echo "$BIN/promtool"
