#!/usr/bin/env bash
# image.sh: the operator image, built from the Dockerfile itself, with no registry.
#
#   hack/image.sh build [TAG]     the image localhost/leasekeeper:TAG (default dev), with
#                                 buildah from ./Dockerfile; writes target/image/leasekeeper-TAG.tar
#                                 (an OCI archive) and prints its path
#   hack/image.sh tools [TAG]     a test image localhost/lk-tools:TAG: the operator image
#                                 plus Debian's static busybox (a shell), for test Pods
#   hack/image.sh stand-ins       only the base-image stand-ins (see below)
#
# TEST SCAFFOLDING, not how users build: with Docker and a registry, `docker build .` is
# all there is (make image does that where a Docker engine answers). No registry is
# reachable here, so the Dockerfile's two base images are replaced by local stand-ins of
# the same names, made from Debian's packages and the local Rust toolchain:
#   rust:1.95-slim-bookworm             debootstrap (bookworm, minbase) + gcc + libc6-dev,
#                                       plus this machine's Rust toolchain (rustc, cargo)
#   gcr.io/distroless/cc-debian12:nonroot  libc6, libgcc-s1 and the CA bundle, extracted
#                                       from Debian's .debs, /etc/passwd with nonroot 65532
# The build reads crates from this machine's cargo registry (mounted; no download) and
# keeps its target/ in ~/.cache/leasekeeper/image-target, so a repeat build only
# recompiles the project's own crates.
set -euo pipefail
cd "$(dirname "$0")/.."
export STORAGE_DRIVER=vfs
CACHE=${LK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/leasekeeper}
MIRROR=${LK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BUILDER=docker.io/library/rust:1.95-slim-bookworm
RUNTIME=gcr.io/distroless/cc-debian12:nonroot
OUT=target/image

log() { printf '[image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The list is read whole before it is searched: `buildah images | grep -q` under
# pipefail fails when grep exits at the first match and buildah, still writing, gets
# SIGPIPE (seen once many untagged images had piled up).
have() {
  local names
  names=$(buildah images --format '{{.Name}}:{{.Tag}}' 2>/dev/null) || return 1
  grep -qx "$1" <<<"$names"
}

ensure_packages() {
  local need=()
  command -v buildah >/dev/null || need+=(buildah)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  [ -x /bin/busybox ] || need+=(busybox-static)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing Debian packages: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

# The Rust toolchain that `cargo` here runs, without its documentation.
toolchain_dir() {
  local sysroot
  sysroot=$(rustc --print sysroot) || die "no Rust toolchain"
  echo "$sysroot"
}

builder_standin() {
  have "$BUILDER" && return 0
  local root=$CACHE/standins/builder-rootfs
  if [ ! -x "$root/usr/bin/gcc" ]; then
    log "debootstrap: bookworm minbase + gcc, libc6-dev (cached in $root)"
    rm -rf "$root"
    mkdir -p "$root"
    debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates bookworm "$root" "$MIRROR" >"$CACHE/standins/debootstrap.log" 2>&1 ||
      die "debootstrap failed; see $CACHE/standins/debootstrap.log"
    rm -rf "$root/var/cache/apt/archives/"*.deb
  fi
  local sysroot c
  sysroot=$(toolchain_dir)
  log "builder stand-in $BUILDER: Debian rootfs + Rust $(rustc --version | cut -d' ' -f2) from $sysroot"
  c=$(buildah from scratch)
  buildah copy "$c" "$root" / >/dev/null
  buildah run --isolation chroot "$c" -- mkdir -p /usr/local/rust /usr/local/cargo >/dev/null
  buildah copy "$c" "$sysroot/bin" /usr/local/rust/bin >/dev/null
  buildah copy "$c" "$sysroot/lib" /usr/local/rust/lib >/dev/null
  [ -d "$sysroot/libexec" ] && buildah copy "$c" "$sysroot/libexec" /usr/local/rust/libexec >/dev/null
  buildah config --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
  buildah commit -q "$c" "$BUILDER" >/dev/null
  buildah rm "$c" >/dev/null
}

runtime_standin() {
  have "$RUNTIME" && return 0
  local d=$CACHE/standins/runtime root
  root=$d/rootfs
  rm -rf "$d"
  mkdir -p "$d/debs" "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot"
  log "runtime stand-in $RUNTIME: libc6, libgcc-s1 and the CA bundle from Debian"
  (cd "$d/debs" && apt-get download libc6 libgcc-s1 >/dev/null 2>&1) || die "apt-get download failed"
  for deb in "$d"/debs/*.deb; do dpkg-deb -x "$deb" "$root"; done
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  chmod 1777 "$root/tmp"
  chown 65532:65532 "$root/home/nonroot"
  rm -rf "$root/usr/share/doc" "$root/usr/share/lintian" "$root/usr/share/man"
  local c
  c=$(buildah from scratch)
  buildah copy "$c" "$root" / >/dev/null
  buildah config --user 65532:65532 --workingdir /home/nonroot "$c"
  buildah commit -q "$c" "$RUNTIME" >/dev/null
  buildah rm "$c" >/dev/null
}

build() {
  local tag=${1:-dev} image
  image=localhost/leasekeeper:$tag
  ensure_packages
  builder_standin
  runtime_standin
  mkdir -p "$OUT" "$CACHE/image-target" "$HOME/.cargo/registry"
  log "buildah build -f Dockerfile -t $image"
  buildah build --isolation chroot --pull=never --layers=false \
    --volume "$HOME/.cargo/registry:/usr/local/cargo/registry" \
    --volume "$CACHE/image-target:/src/target" \
    -f Dockerfile -t "$image" . >"$OUT/build.log" 2>&1 || {
    tail -30 "$OUT/build.log" >&2
    die "buildah build failed; see $OUT/build.log"
  }
  buildah push -q "$image" "oci-archive:$OUT/leasekeeper-$tag.tar:$image"
  local size
  size="$(buildah images --format '{{.Size}}' "$image") unpacked, $(du -h "$OUT/leasekeeper-$tag.tar" | cut -f1) as a compressed OCI archive"
  echo "$size" >"$OUT/leasekeeper-$tag.size"
  log "$image: $size"
  echo "$OUT/leasekeeper-$tag.tar"
}

tools() {
  local tag=${1:-dev} image c
  image=localhost/lk-tools:$tag
  ensure_packages
  have "localhost/leasekeeper:$tag" || die "build localhost/leasekeeper:$tag first"
  # The operator image (with kubectl-lock) plus a shell and a few tools.
  c=$(buildah from --pull=never "localhost/leasekeeper:$tag")
  buildah copy --chown 0:0 "$c" /bin/busybox /bin/busybox >/dev/null
  for a in sh sleep cat wget nc kill ls date httpd hostname; do
    buildah run --isolation chroot --user 0:0 "$c" -- /bin/busybox ln -s /bin/busybox "/bin/$a" >/dev/null
  done
  buildah config --entrypoint '[]' --cmd '["sh"]' --env PATH=/usr/local/bin:/bin "$c"
  buildah commit -q "$c" "$image" >/dev/null
  buildah rm "$c" >/dev/null
  mkdir -p "$OUT"
  buildah push -q "$image" "oci-archive:$OUT/lk-tools-$tag.tar:$image"
  echo "$OUT/lk-tools-$tag.tar"
}

case "${1:-}" in
  build) build "${2:-dev}" ;;
  tools) tools "${2:-dev}" ;;
  stand-ins) ensure_packages; builder_standin; runtime_standin ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
