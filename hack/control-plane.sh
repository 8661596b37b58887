#!/usr/bin/env bash
# control-plane.sh: a real kube-apiserver + etcd on loopback, built from Go modules.
#
#   hack/control-plane.sh build [SET]    build (cached) SET: run = etcd, kube-apiserver, kubectl
#                                        (what `make run` needs); all (default) = those, helm,
#                                        kube-controller-manager, kubelet, kube-scheduler, kube-proxy
#   hack/control-plane.sh up   [DIR]     start etcd + kube-apiserver, write DIR/kubeconfig
#   hack/control-plane.sh down [DIR]     stop exactly the processes `up` started in DIR
#   hack/control-plane.sh env  [DIR]     print `export ...` lines for DIR
#   hack/control-plane.sh restart DIR apiserver|etcd   restart one daemon in place
#   hack/control-plane.sh bin            print the directory that holds the binaries
#
# DIR defaults to $LK_PLANE_DIR or ./.plane. Several DIRs may run side by side: every
# instance picks its own free ports and keeps its own pids, certificates and data.
# LK_ETCD_EXTRA_ARGS and LK_APISERVER_EXTRA_ARGS add flags to the daemons at `up`.
# KVER picks the Kubernetes release (binaries cached per version); LK_K8S_BINS limits
# `build` to some of its commands (make compat builds only kube-apiserver).
# LK_APISERVER_ADDRESS (default 127.0.0.1) is where kube-apiserver binds and what it
# advertises; hack/node.sh sets the node bridge's address, so that Pods reach it through
# the `kubernetes` Service (10.0.0.1), and LK_NODE_MODE=1 keeps the ServiceAccount
# admission plugin on (Pods get tokens) and writes an audit log of every write.
set -euo pipefail

KVER=${KVER:-v1.35.4}
EVER=${EVER:-v3.6.16}
HVER=${HVER:-v3.22.0}
CACHE=${LK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/leasekeeper}
BIN=$CACHE/bin-$KVER-etcd-$EVER-helm-$HVER
export GOTOOLCHAIN=local CGO_ENABLED=0

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

build_k8s() {
  local out=$CACHE/src/k8s-$KVER sver=v0.${KVER#v1.} minor
  minor=$(echo "$KVER" | cut -d. -f2)
  local b missing='' bins=${LK_K8S_BINS:-$1}
  for b in $bins; do
    [ -x "$BIN/$b" ] || missing=1
  done
  [ -z "$missing" ] && return 0
  mkdir -p "$out" "$BIN"
  local gomod
  gomod=$(cd "$out" && GOFLAGS="" go mod download -json "k8s.io/kubernetes@$KVER" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])') ||
    die "cannot download k8s.io/kubernetes@$KVER from the Go module proxy"
  local gover
  gover=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod" | head -1)
  {
    printf 'module local/k8sbins\n\ngo %s\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "${gover:-1.24.0}" "$KVER"
    sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/.*#\1#p' "$gomod" |
      while read -r m; do printf '\t%s => %s %s\n' "$m" "$m" "$sver"; done
    printf ')\n'
  } >"$out/go.mod"
  # Stamp the real version so /version and `kubectl version` report it (hack/lib/version.sh keys).
  local ld="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$KVER -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  # kube-controller-manager is not part of `up`: tests that need its garbage collector
  # start it themselves (tests/pod_gc.rs). kubelet, kube-scheduler and kube-proxy are
  # for hack/node.sh (the real node); with the build cache warm they add a few minutes.
  log "building $bins $KVER from the Go module proxy ($2)"
  local pkgs=()
  for b in $bins; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  (cd "$out" && GOFLAGS=-mod=mod go build -trimpath -ldflags "$ld" -o "$BIN/" "${pkgs[@]}")
  "$BIN/kube-apiserver" --version
}

build_etcd() {
  [ -x "$BIN/etcd" ] && return 0
  local out=$CACHE/src/etcd-$EVER
  mkdir -p "$out" "$BIN"
  printf 'module local/etcdbin\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$EVER" >"$out/go.mod"
  log "building etcd $EVER from the Go module proxy (cold: ~1-2 min on 2 cores)"
  (cd "$out" && GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3)
  "$BIN/etcd" --version | head -1
}

# Like Helm's own release build: the Kubernetes version `helm template` assumes without
# --kube-version is the one of the client-go it is built with (v1.20 otherwise, which
# no chart requiring a current Kubernetes renders with). The marker file records it.
build_helm() {
  [ -x "$BIN/helm" ] && [ -s "$BIN/helm.kube-default" ] && return 0
  local out=$CACHE/src/helm-$HVER cgo minor ld
  mkdir -p "$out" "$BIN"
  printf 'module local/helmbin\n\ngo 1.24\n\nrequire helm.sh/helm/v3 %s\n' "$HVER" >"$out/go.mod"
  log "building helm $HVER from the Go module proxy (cold: ~2-4 min on 2 cores)"
  cgo=$(cd "$out" && GOFLAGS=-mod=mod go list -m -f '{{.Version}}' k8s.io/client-go) ||
    die "cannot resolve helm $HVER's client-go version"
  minor=$(echo "$cgo" | cut -d. -f2)
  ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HVER"
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ld="$ld -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$minor"
  done
  (cd "$out" && GOFLAGS=-mod=mod go build -trimpath -ldflags "$ld" -o "$BIN/helm" helm.sh/helm/v3/cmd/helm)
  echo "v1.$minor.0" >"$BIN/helm.kube-default"
  "$BIN/helm" version --short
}

# setsid: each daemon leads its own process group, so a Ctrl-C in the caller's
# terminal does not reach it and `down` can stop it (and only it) by pid.
start_daemon() {
  local w=$1 name=$2
  chmod +x "$w/start-$name.sh"
  setsid "$w/start-$name.sh" >>"$w/$name.log" 2>&1 </dev/null &
  echo $! >"$w/$name.pid"
}

wait_ready() {
  local w=$1
  for _ in $(seq 240); do
    if curl -fsS --cacert "$w/pki/ca.crt" --cert "$w/pki/admin.crt" --key "$w/pki/admin.key" \
      "https://$(cat "$w/apiserver.address" 2>/dev/null || echo 127.0.0.1):$(cat "$w/apiserver.port")/readyz" >/dev/null 2>&1; then
      return 0
    fi
    alive "$w/apiserver.pid" || return 1
    sleep 0.25
  done
  return 1
}

# restart DIR apiserver|etcd: stop one daemon and start it again as it was.
restart() {
  local w=$1 name=$2
  [ -f "$w/start-$name.sh" ] || die "no $name started in $w"
  stop_pid "$w/$name.pid"
  start_daemon "$w" "$name"
  if [ "$name" = apiserver ]; then wait_ready "$w" || die "kube-apiserver did not come back; see $w/apiserver.log"; fi
  log "restarted $name in $w"
}

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  local w=$1 p
  for b in etcd kube-apiserver; do [ -x "$BIN/$b" ] || die "$BIN/$b missing: run '$0 build' first"; done
  if alive "$w/apiserver.pid" && [ -f "$w/kubeconfig" ]; then
    log "already running in $w"; return 0
  fi
  down "$w" >/dev/null 2>&1 || true
  mkdir -p "$w"; w=$(cd "$w" && pwd); p=$w/pki
  rm -rf "$w/etcd" "$p"; mkdir -p "$p" "$w/etcd"
  local ep pp ap
  ep=$(free_port); pp=$(free_port); ap=$(free_port)
  o() { openssl "$@" >/dev/null 2>&1 || die "openssl $1 failed"; }
  o req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=leasekeeper-test-ca -keyout "$p/ca.key" -out "$p/ca.crt"
  o req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout "$p/srv.key" -out "$p/srv.csr"
  local addr=${LK_APISERVER_ADDRESS:-127.0.0.1}
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:%s,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n' "$addr" >"$p/srv.ext"
  o x509 -req -in "$p/srv.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -days 30 -extfile "$p/srv.ext" -out "$p/srv.crt"
  o req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=leasekeeper-admin" -keyout "$p/admin.key" -out "$p/admin.csr"
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >"$p/cli.ext"
  o x509 -req -in "$p/admin.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -days 30 -extfile "$p/cli.ext" -out "$p/admin.crt"
  o genrsa -out "$p/sa.key" 2048
  o rsa -in "$p/sa.key" -pubout -out "$p/sa.pub"
  local nofsync=
  "$BIN/etcd" --help 2>&1 | grep unsafe-no-fsync >/dev/null && nofsync=--unsafe-no-fsync=true
  # A bare plane has no controller creating ServiceAccounts: admission must not require
  # them. A node plane (hack/node.sh) runs kube-controller-manager, gives Pods tokens,
  # advertises the bridge address and logs every write (who, from where, when).
  local node_args=--disable-admission-plugins=ServiceAccount
  # LK_AUDIT=1: every write to Leases, LockClaims (and status) and Locks (and status),
  # with the object the API server answered (its resourceVersion), in DIR/audit.log:
  # the history the chaos checker rebuilds without trusting any watch of ours.
  if [ -n "${LK_AUDIT:-}" ]; then
    printf '%s\n' 'apiVersion: audit.k8s.io/v1' 'kind: Policy' 'omitStages: [RequestReceived]' 'rules:' \
      '- level: RequestResponse' '  verbs: [create, update, patch, delete]' '  resources:' \
      '  - {group: coordination.k8s.io, resources: [leases]}' \
      '  - {group: leasekeeper.io, resources: [lockclaims, lockclaims/status, locks, locks/status]}' \
      '  - {group: "", resources: [configmaps]}' \
      '- level: None' >"$w/audit-policy.yaml"
    node_args="$node_args --audit-policy-file=$w/audit-policy.yaml --audit-log-path=$w/audit.log --audit-log-maxsize=4000 --audit-log-maxbackup=20"
  fi
  if [ -n "${LK_NODE_MODE:-}" ]; then
    printf '%s\n' 'apiVersion: audit.k8s.io/v1' 'kind: Policy' 'omitStages: [RequestReceived]' 'rules:' \
      '- level: Metadata' '  verbs: [create, update, patch, delete, deletecollection]' '- level: None' >"$w/audit-policy.yaml"
    node_args="--advertise-address=$addr --kubelet-preferred-address-types=InternalIP --kubelet-client-certificate=$p/admin.crt --kubelet-client-key=$p/admin.key --audit-policy-file=$w/audit-policy.yaml --audit-log-path=$w/audit.log --audit-log-maxsize=200"
  fi
  # Each daemon's command line is kept in a start script, so `restart` brings it back
  # with the same ports, certificates and data.
  cat >"$w/start-etcd.sh" <<EOS
#!/usr/bin/env bash
exec "$BIN/etcd" --name lk --data-dir "$w/etcd" \\
  --listen-client-urls "http://127.0.0.1:$ep" --advertise-client-urls "http://127.0.0.1:$ep" \\
  --listen-peer-urls "http://127.0.0.1:$pp" --initial-advertise-peer-urls "http://127.0.0.1:$pp" \\
  --initial-cluster "lk=http://127.0.0.1:$pp" $nofsync ${LK_ETCD_EXTRA_ARGS:-}
EOS
  start_daemon "$w" etcd
  echo "$ep" >"$w/etcd.port"
  cat >"$w/start-apiserver.sh" <<EOS
#!/usr/bin/env bash
exec "$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ep" --bind-address="$addr" --secure-port="$ap" \\
  --cert-dir="$p" --tls-cert-file="$p/srv.crt" --tls-private-key-file="$p/srv.key" --client-ca-file="$p/ca.crt" \\
  --authorization-mode=RBAC --service-account-issuer="https://127.0.0.1:$ap/" \\
  --service-account-key-file="$p/sa.pub" --service-account-signing-key-file="$p/sa.key" \\
  --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \\
  $node_args ${LK_APISERVER_EXTRA_ARGS:-}
EOS
  start_daemon "$w" apiserver
  echo "$ap" >"$w/apiserver.port"
  echo "$addr" >"$w/apiserver.address"
  b64() { base64 -w0 "$1"; }
  cat >"$w/kubeconfig" <<EOC
apiVersion: v1
kind: Config
clusters: [{name: leasekeeper-test, cluster: {server: "https://$addr:$ap", certificate-authority-data: $(b64 "$p/ca.crt")}}]
users: [{name: leasekeeper-admin, user: {client-certificate-data: $(b64 "$p/admin.crt"), client-key-data: $(b64 "$p/admin.key")}}]
contexts: [{name: leasekeeper-test, context: {cluster: leasekeeper-test, user: leasekeeper-admin, namespace: default}}]
current-context: leasekeeper-test
EOC
  if wait_ready "$w"; then
    log "ready: https://$addr:$ap (etcd 127.0.0.1:$ep), dir $w"
    return 0
  fi
  log "kube-apiserver did not become ready; last lines of $w/apiserver.log:"
  tail -40 "$w/apiserver.log" >&2 || true
  log "last lines of $w/etcd.log:"; tail -10 "$w/etcd.log" >&2 || true
  down "$w" >/dev/null 2>&1 || true
  exit 1
}

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

down() {
  local w=$1
  stop_pid "$w/apiserver.pid"
  stop_pid "$w/etcd.pid"
  log "stopped $w"
}

envlines() {
  local w; w=$(cd "$1" && pwd)
  echo "export KUBECONFIG=$w/kubeconfig"
  echo "export PATH=$BIN:\$PATH"
}

cmd=${1:-}; dir=${2:-${LK_PLANE_DIR:-.plane}}
case "$cmd" in
  build)
    case "${2:-all}" in
      run) build_etcd
        build_k8s "kube-apiserver kubectl" "cold: ~4-6 min on 2 cores, then cached" ;;
      all) build_etcd; build_helm
        build_k8s "kube-apiserver kubectl kube-controller-manager kubelet kube-scheduler kube-proxy" \
          "cold: ~12-20 min on 2 cores for all six; a few minutes once kube-apiserver is built" ;;
      *) die "build SET: run or all" ;;
    esac ;;
  restart) restart "$dir" "${3:?restart DIR apiserver|etcd}" ;;
  up) up "$dir" ;;
  down) down "$dir" ;;
  env) envlines "$dir" ;;
  bin) echo "$BIN" ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
