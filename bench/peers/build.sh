#!/usr/bin/env bash
# Builds the client-go leader-election peer (cached by the hash of its sources) and
# prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/client-go-le"
hash=$(cat go.mod go.sum main.go | sha256sum | cut -c1-12)
out=${LK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/leasekeeper}/peers/client-go-le-$hash
if [ ! -x "$out" ]; then
  mkdir -p "$(dirname "$out")"
  GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$out" . >&2
fi
echo "$out"
