#!/usr/bin/env bash
# node.sh: a real one-node cluster on this machine, for the install path users take:
# kube-apiserver + etcd (hack/control-plane.sh, advertising the node bridge's address),
# kube-controller-manager, kube-scheduler, containerd + runc, kubelet and kube-proxy.
#
#   hack/node.sh up   [DIR]   install Debian's containerd, runc, CNI plugins, iptables,
#                              conntrack, buildah (if missing), start everything, wait
#                              for the node to be Ready; DIR/kubeconfig is the admin's
#   hack/node.sh down [DIR]   stop every process `up` started, by pid, kill containerd's
#                              tasks, unmount, remove the bridge and the iptables rules
#   hack/node.sh import [DIR] FILE   load an OCI image archive into containerd (k8s.io)
#
# DIR defaults to target/node. Root only (bridges, iptables, containerd). Pod traffic stays
# on the bridge cni0 (10.244.0.0/24): no masquerade, and forwarding out of it is dropped.
# The two settings without which Pods never start here: containerd's
# restrict_oom_score_adj (root lacks CAP_SYS_RESOURCE) and the kubelet's failCgroupV1:
# false (cgroup v1 hybrid); runc, not crun (crun refuses the hybrid layout).
set -euo pipefail
cd "$(dirname "$0")/.."
PLANE=hack/control-plane.sh
BRIDGE=cni0
NODE_IP=10.244.0.1
POD_CIDR=10.244.0.0/24
NODE=lk-node
CTR_SOCK=/run/containerd/containerd.sock

log() { printf '[node] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

packages() {
  local need=() p
  for p in containerd:containerd runc:runc buildah:buildah iptables:iptables conntrack:conntrack ip:iproute2 nsenter:util-linux; do
    command -v "${p%%:*}" >/dev/null 2>&1 || need+=("${p#*:}")
  done
  [ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing Debian packages: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

start() {
  local w=$1 name=$2
  shift 2
  setsid "$@" >>"$w/$name.log" 2>&1 </dev/null &
  echo $! >"$w/$name.pid"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

stop_pid() {
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

# Unmounts everything mounted below the directory prefix $1 (deepest first).
unmount_under() {
  local m
  { grep " $1" /proc/mounts || true; } | cut -d' ' -f2 | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
}

bridge_up() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr show dev "$BRIDGE" | grep -q "$NODE_IP/" || ip addr add "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # Nothing from the Pods leaves the node's bridge.
  iptables -C FORWARD -s "$POD_CIDR" ! -d "$POD_CIDR" -j DROP 2>/dev/null ||
    iptables -I FORWARD -s "$POD_CIDR" ! -d "$POD_CIDR" -j DROP
}

containerd_up() {
  local w=$1 c=$1/containerd
  mkdir -p "$c/cni" /run/containerd
  cat >"$c/cni/10-leasekeeper.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "leasekeeper", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "10.244.0.10", "gateway": "$NODE_IP"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$c/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}},
  {"type": "loopback"}]}
EOF
  containerd config default >"$c/config.toml"
  sed -i \
    -e "s#sandbox_image = .*#sandbox_image = \"localhost/pause:local\"#" \
    -e "s#bin_dir = .*#bin_dir = \"/usr/lib/cni\"#" \
    -e "s#conf_dir = .*#conf_dir = \"$c/cni\"#" \
    -e "s#restrict_oom_score_adj = false#restrict_oom_score_adj = true#" \
    -e "s#SystemdCgroup = true#SystemdCgroup = false#" \
    "$c/config.toml"
  grep -q 'restrict_oom_score_adj = true' "$c/config.toml" || die "containerd config: restrict_oom_score_adj not set"
  start "$w" containerd containerd --config "$c/config.toml" --address "$CTR_SOCK"
  for _ in $(seq 60); do ctr --address "$CTR_SOCK" version >/dev/null 2>&1 && return 0; sleep 0.25; done
  die "containerd did not start; see $w/containerd.log"
}

# The sandbox ("pause") image, built locally: no registry is reachable.
pause_image() {
  local w=$1
  ctr --address "$CTR_SOCK" -n k8s.io images ls -q | grep -x localhost/pause:local >/dev/null && return 0
  local src=$w/pause-src
  mkdir -p "$src"
  cat >"$src/main.go" <<'EOF'
// pause: the Pod sandbox's process; it waits for SIGTERM or SIGINT and exits.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGINT, syscall.SIGTERM)
	<-c
}
EOF
  printf 'module local/pause\n\ngo 1.24\n' >"$src/go.mod"
  (cd "$src" && GOTOOLCHAIN=local CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o pause .)
  export STORAGE_DRIVER=vfs
  local ctr_id
  ctr_id=$(buildah from scratch)
  buildah copy "$ctr_id" "$src/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' --user 65535:65535 "$ctr_id"
  buildah commit -q "$ctr_id" localhost/pause:local >/dev/null
  buildah rm "$ctr_id" >/dev/null
  buildah push -q localhost/pause:local "oci-archive:$w/pause.tar:localhost/pause:local"
  import_image "$w/pause.tar"
}

import_image() {
  ctr --address "$CTR_SOCK" -n k8s.io images import --all-platforms "$1" >/dev/null
}

kubelet_up() {
  local w=$1 bin=$2
  mkdir -p "$w/kubelet"
  cat >"$w/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$CTR_SOCK
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $w/pki/ca.crt}
authorization: {mode: Webhook}
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
address: $NODE_IP
readOnlyPort: 0
healthzPort: 0
serializeImagePulls: false
EOF
  start "$w" kubelet "$bin/kubelet" --config="$w/kubelet.yaml" --kubeconfig="$w/kubeconfig" \
    --root-dir="$w/kubelet" --hostname-override="$NODE" --node-ip="$NODE_IP" --cert-dir="$w/kubelet/pki"
}

control_up() {
  local w=$1 bin=$2 p=$1/pki
  start "$w" scheduler "$bin/kube-scheduler" --kubeconfig="$w/kubeconfig" --leader-elect=false --secure-port=0
  start "$w" controller-manager "$bin/kube-controller-manager" --kubeconfig="$w/kubeconfig" \
    --leader-elect=false --secure-port=0 --use-service-account-credentials \
    --service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt"
  cat >"$w/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE
clientConnection: {kubeconfig: $w/kubeconfig}
conntrack: {maxPerCore: 0}
metricsBindAddress: 127.0.0.1:$(free_port)
healthzBindAddress: 127.0.0.1:$(free_port)
EOF
  start "$w" kube-proxy "$bin/kube-proxy" --config="$w/kube-proxy.yaml"
}

wait_node() {
  local w=$1 bin=$2
  for _ in $(seq 240); do
    if KUBECONFIG=$w/kubeconfig "$bin/kubectl" get node "$NODE" \
      -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True; then
      return 0
    fi
    alive "$w/kubelet.pid" || die "kubelet exited; see $w/kubelet.log"
    sleep 0.5
  done
  die "node $NODE not Ready; see $w/kubelet.log"
}

up() {
  local w=$1 bin
  [ "$(id -u)" = 0 ] || die "the node needs root (bridges, iptables, containerd)"
  packages
  $PLANE build
  bin=$($PLANE bin)
  if alive "$w/kubelet.pid"; then log "already running in $w"; return 0; fi
  down "$w" >/dev/null 2>&1 || true
  mkdir -p "$w"
  w=$(cd "$w" && pwd)
  modprobe br_netfilter 2>/dev/null || true
  bridge_up
  LK_NODE_MODE=1 LK_APISERVER_ADDRESS=$NODE_IP $PLANE up "$w"
  containerd_up "$w"
  pause_image "$w"
  control_up "$w" "$bin"
  kubelet_up "$w" "$bin"
  wait_node "$w" "$bin"
  local d
  for d in scheduler controller-manager kube-proxy containerd; do
    alive "$w/$d.pid" || die "$d exited; see $w/$d.log"
  done
  # The default ServiceAccount and kube-root-ca.crt come from kube-controller-manager.
  for _ in $(seq 120); do
    KUBECONFIG=$w/kubeconfig "$bin/kubectl" get serviceaccount default -n default >/dev/null 2>&1 && break
    sleep 0.5
  done
  for _ in $(seq 60); do
    iptables -t nat -S KUBE-SERVICES 2>/dev/null | grep 'default/kubernetes' >/dev/null && break
    sleep 0.5
  done
  log "ready: node $NODE, API server https://$NODE_IP:$(cat "$w/apiserver.port"), dir $w"
}

down() {
  local w=$1 bin
  [ -d "$w" ] && w=$(cd "$w" && pwd)
  bin=$($PLANE bin)
  for d in kubelet kube-proxy scheduler controller-manager; do stop_pid "$w/$d.pid"; done
  if ctr --address "$CTR_SOCK" version >/dev/null 2>&1; then
    local t
    for t in $(ctr --address "$CTR_SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$CTR_SOCK" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
    done
    sleep 1
    for t in $(ctr --address "$CTR_SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$CTR_SOCK" -n k8s.io tasks delete -f "$t" >/dev/null 2>&1 || true
    done
    for t in $(ctr --address "$CTR_SOCK" -n k8s.io containers ls -q 2>/dev/null); do
      ctr --address "$CTR_SOCK" -n k8s.io containers delete "$t" >/dev/null 2>&1 || true
    done
  fi
  stop_pid "$w/containerd.pid"
  # Pod volumes (Secrets, projected tokens) are tmpfs mounts under the kubelet's dir.
  if [ -d "$w/kubelet" ]; then
    unmount_under "$w/kubelet"
  fi
  unmount_under /run/containerd/
  if [ -x "$bin/kube-proxy" ]; then "$bin/kube-proxy" --cleanup >/dev/null 2>&1 || true; fi
  iptables -D FORWARD -s "$POD_CIDR" ! -d "$POD_CIDR" -j DROP 2>/dev/null || true
  $PLANE down "$w" || true
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -rf "$w/containerd/ipam" "$w/kubelet"
  log "stopped $w"
}

cmd=${1:-}; dir=${2:-target/node}
case "$cmd" in
  up) up "$dir" ;;
  down) down "$dir" ;;
  import) import_image "${3:?import DIR FILE}" ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
