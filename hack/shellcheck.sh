#!/usr/bin/env bash
# Lints shell scripts with shellcheck, installing Debian's package when it is missing.
set -euo pipefail
if ! command -v shellcheck >/dev/null 2>&1; then
  echo "[shellcheck] installing Debian's shellcheck" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null
fi
shellcheck --version | sed -n 2p
shellcheck "$@"
