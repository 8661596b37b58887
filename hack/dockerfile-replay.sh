#!/usr/bin/env bash
# dockerfile-replay.sh: runs the build stage of the Dockerfile (everything before the
# second FROM) without a container engine: WORKDIR, COPY and RUN, in order, in a
# scratch directory, with the host's cargo. It fails where `docker build` would fail
# in that stage (a manifest the stubs do not satisfy, a source the COPY misses), and
# checks that the stage leaves the binaries the runtime stage copies.
#   hack/dockerfile-replay.sh [Dockerfile]
# The scratch directory's target/ is kept in ~/.cache/leasekeeper/dockerfile-replay, so
# a repeat run only rebuilds the project's own crate.
set -euo pipefail
cd "$(dirname "$0")/.."
dockerfile=${1:-Dockerfile}
ctx=$PWD
cache=${LK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/leasekeeper}/dockerfile-replay
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
log() { printf '[dockerfile-replay] %s\n' "$*" >&2; }

# The build stage as logical lines (continuations joined), comments dropped.
stage=$(awk '
  /^[[:space:]]*#/ { next }
  { line = line $0 }
  /\\$/ { sub(/\\$/, "", line); next }
  { if (line ~ /^FROM /) { froms++ } if (froms == 1 && line != "") print line; line = "" }
' "$dockerfile")

workdir=/
copies=()
while IFS= read -r line; do
  read -r op rest <<<"$line"
  case $op in
    FROM) log "stage: $rest" ;;
    WORKDIR)
      workdir=$rest
      mkdir -p "$scratch$workdir"
      # The build cache stands in for the layer cache across runs.
      if [ ! -e "$scratch$workdir/target" ]; then mkdir -p "$cache"; ln -s "$cache" "$scratch$workdir/target"; fi
      ;;
    COPY)
      read -r -a args <<<"$rest"
      dest=${args[-1]}
      unset 'args[-1]'
      case $dest in /*) ;; *) dest=$workdir/$dest ;; esac
      for src in "${args[@]}"; do
        [ -e "$ctx/$src" ] || { log "COPY source missing from the build context: $src"; exit 1; }
        if [[ $dest == */ ]] || [ ${#args[@]} -gt 1 ]; then
          mkdir -p "$scratch$dest"
          cp -a "$ctx/$src" "$scratch$dest/"
        else
          mkdir -p "$(dirname "$scratch$dest")"
          cp -a "$ctx/$src" "$scratch$dest"
        fi
        copies+=("$src")
      done
      log "COPY ${args[*]} -> $dest"
      ;;
    RUN)
      log "RUN $rest"
      (cd "$scratch$workdir" && sh -ec "$rest")
      ;;
    ENV | ARG | LABEL | USER | EXPOSE | SHELL) log "($op ignored in the replay)" ;;
    *) log "unsupported instruction in the build stage: $op"; exit 1 ;;
  esac
done <<<"$stage"

# What the runtime stage copies out of the build stage must exist.
grep -o -- '--from=build [^ ]*\( [^ ]*\)*' "$dockerfile" | while read -r _ paths; do
  read -r -a parts <<<"$paths"
  unset 'parts[-1]'
  for p in "${parts[@]}"; do
    [ -x "$scratch$p" ] || { log "the runtime stage copies $p, which the build stage did not produce"; exit 1; }
    "$scratch$p" --version >/dev/null || { log "$p does not run"; exit 1; }
    log "produced $p ($(du -h "$scratch$p" | cut -f1))"
  done
done
log "build stage replayed: OK"
