# leasekeeper: the commands every user and CI start from.
#   make run    the operator on the cluster in KUBECONFIG, or on a local control plane
#   make test   unit, property and end-to-end tests (starts its own control plane)
#   make lint   rustfmt and clippy
SHELL := /usr/bin/env bash
PLANE := hack/control-plane.sh
E2E_PLANE := target/e2e-plane
CARGO ?= cargo
# Property-test sequences for `make test` (CI) and `make soak`.
PROPTEST_CASES ?= 10000
SOAK_CASES ?= 1000000

.PHONY: all build release crd run test unit lint promtool soak chart-test bench bench-smoke chaos chaos-smoke chaos-semaphore chaos-controls chaos-build compat bench-node plane-build plane-up plane-down image e2e-cluster node-up node-down dockerfile-replay

all: build

build:
	$(CARGO) build --locked

release:
	$(CARGO) build --locked --release

## Regenerate the committed CRD from the Rust types.
crd:
	$(CARGO) run --locked -q -- crd --write-dir crds
	cp crds/*.yaml charts/leasekeeper/crds/

## Build kube-apiserver, kubectl, kube-controller-manager, etcd and helm from Go modules (cached by version).
plane-build:
	$(PLANE) build

## promtool from the Prometheus Go module (cached): tests/observability.rs checks the
## chart's alerts and dashboard queries with it.
promtool:
	hack/promtool.sh >/dev/null

plane-up: plane-build
	$(PLANE) up $(E2E_PLANE)

plane-down:
	$(PLANE) down $(E2E_PLANE)

## The operator: against KUBECONFIG when it answers, else on a local control plane.
run:
	hack/run.sh

## Everything: unit + property tests, then e2e tests on a real control plane.
## KEEP_PLANE=1 leaves the control plane running for the next run. The timings the e2e
## tests print are gathered into target/e2e-timings.md (hack/e2e-timings.sh).
test: plane-up promtool
	PROPTEST_CASES=$(PROPTEST_CASES) $(CARGO) test --locked --no-fail-fast --workspace --all-targets -- --nocapture --test-threads=16 2>&1 | tee target/test.log; \
	  rc=$${PIPESTATUS[0]}; \
	  [ -n "$(KEEP_PLANE)" ] || $(PLANE) down $(E2E_PLANE); \
	  hack/e2e-timings.sh target/test.log > target/e2e-timings.md; \
	  exit $$rc

## The image from the Dockerfile: `docker build` where a Docker engine answers; here
## (no registry) buildah with local stand-ins for the base images (hack/image.sh).
IMAGE_TAG ?= dev
image:
	@if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then \
	  docker build -t leasekeeper:$(IMAGE_TAG) . ; \
	else \
	  hack/image.sh build $(IMAGE_TAG); \
	fi

## The Dockerfile's build stage replayed without a container engine (hack/dockerfile-replay.sh).
dockerfile-replay:
	hack/dockerfile-replay.sh

## A real one-node cluster (kubelet, containerd, kube-proxy) in target/node; root only.
NODE_DIR := target/node
node-up: plane-build
	hack/node.sh up $(NODE_DIR)

node-down:
	hack/node.sh down $(NODE_DIR)

## The install path on the real node: image built and imported, helm install, failover,
## partition, upgrade under load, uninstall (tests/cluster.rs). Stops the node after.
e2e-cluster: plane-build
	hack/e2e-cluster.sh $(NODE_DIR)

## Kubernetes releases: each one's kube-apiserver built from its Go module (cached per
## version), the API, controller, client, semaphore, tenant and chart suites run against it.
## Writes bench/results/compat.md. Not part of CI (cold: ~8 min per release to build).
COMPAT_VERSIONS ?= v1.33.13 v1.34.4 v1.35.4 v1.36.3 v1.37.2
compat:
	hack/compat.sh $(COMPAT_VERSIONS)

## The Helm chart: lint, render, bad values, install, RBAC proven by running as its ServiceAccount.
## (Also part of `make test`.)
chart-test: plane-up
	$(CARGO) test --locked --test chart -- --nocapture

unit:
	PROPTEST_CASES=$(PROPTEST_CASES) $(CARGO) test --locked --workspace --lib --bins

soak:
	PROPTEST_CASES=$(SOAK_CASES) $(CARGO) test --locked --release -p leasekeeper --lib arbiter::proptests

## clippy runs twice: the product build, and the chaos build whose negative-control
## hooks (controller::chaos) exist only with the feature.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	$(CARGO) clippy --locked --workspace --all-targets --features leasekeeper/chaos-negative-controls -- -D warnings
	hack/shellcheck.sh hack/*.sh bench/peers/*.sh .ci/run
	hack/hadolint.sh Dockerfile
	python3 hack/docs-check.py

## Benchmarks against client-go leader election on one local API server (~20 min).
## Writes bench/results/latest.md. Asserts nothing: it measures.
BENCH_PLANE := target/bench-plane
bench: plane-build
	$(CARGO) build --locked --release -p leasekeeper -p lk-bench
	peer=$$(bench/peers/build.sh) && $(PLANE) up $(BENCH_PLANE) && \
	  target/release/lk-bench --kubeconfig $(BENCH_PLANE)/kubeconfig --bin target/release --peer $$peer \
	    --out bench/results/latest.md; rc=$$?; $(PLANE) down $(BENCH_PLANE); exit $$rc

## The node scenarios (Pods by scheduling gates, routes to the holder) on a real
## one-node cluster with the operator installed by Helm (~15 min). Root only.
## Writes bench/results/node-latest.md.
bench-node: plane-build
	hack/bench-node.sh target/bench-node

## Every benchmark scenario with small N (part of CI; debug build, numbers not meaningful).
bench-smoke: plane-build
	$(CARGO) build --locked -p leasekeeper -p lk-bench
	peer=$$(bench/peers/build.sh) && $(PLANE) up $(BENCH_PLANE)-smoke && \
	  target/debug/lk-bench --smoke --kubeconfig $(BENCH_PLANE)-smoke/kubeconfig --bin target/debug --peer $$peer \
	    --out target/bench-smoke.md; rc=$$?; $(PLANE) down $(BENCH_PLANE)-smoke; exit $$rc

## Chaos: operator replicas, holders and faults on a seeded schedule, then the checker.
## The chaos build carries the negative-control switches (feature chaos-negative-controls)
## in its own target dir, so they never reach the normal binaries.
CHAOS_PLANE := target/chaos-plane
CHAOS_TARGET := target/chaos-build
CHAOS_BIN := $(CHAOS_TARGET)/debug
CHAOS_DURATION ?= 20m
## The full run's load: 10 Leases x 4 holders, a fault every 1.5 s on average
## (about 165 grants a minute on a 2-core machine, so 10,000 grants take about an hour).
CHAOS_ARGS ?= --leases 10 --fault-every 1.5
## etcd compacts its own history: kube-apiserver's compactor runs 5 minutes after it
## starts, and the chaos run restarts it more often than that, so without this the
## history grows until etcd's 2 GiB quota stops every write (seen at 49 minutes).
CHAOS_ETCD := LK_AUDIT=1 LK_ETCD_EXTRA_ARGS="--auto-compaction-mode=periodic --auto-compaction-retention=2m --quota-backend-bytes=8589934592"
chaos-build:
	$(CARGO) build --locked -p leasekeeper -p lk-chaos --features leasekeeper/chaos-negative-controls --target-dir $(CHAOS_TARGET)

## The long run works on a copy of the binaries (holders and replicas are respawned from
## them), so the chaos build can be rebuilt while it runs.
chaos: plane-build chaos-build
	rm -rf $(CHAOS_PLANE)-bin && mkdir -p $(CHAOS_PLANE)-bin && \
	  cp $(CHAOS_BIN)/leasekeeper $(CHAOS_BIN)/lk-chaos $(CHAOS_PLANE)-bin/ && \
	  $(CHAOS_ETCD) $(PLANE) up $(CHAOS_PLANE) && \
	  $(CHAOS_PLANE)-bin/lk-chaos run --plane $(CHAOS_PLANE) --bin $(CHAOS_PLANE)-bin --duration $(CHAOS_DURATION) $(CHAOS_ARGS) \
	    --out bench/results/chaos-latest.md $(if $(SEED),--seed $(SEED)); rc=$$?; $(PLANE) down $(CHAOS_PLANE); exit $$rc

## The semaphore mode: one lock of capacity 3 with 6 holders, checked for at most 3
## Granted at once and one per slot Lease, fenced registers per slot.
SEMAPHORE_DURATION ?= 10m
SEMAPHORE_ARGS := --leases 1 --capacity 3 --holders 6
chaos-semaphore: plane-build chaos-build
	rm -rf $(CHAOS_PLANE)-sem-bin && mkdir -p $(CHAOS_PLANE)-sem-bin && \
	  cp $(CHAOS_BIN)/leasekeeper $(CHAOS_BIN)/lk-chaos $(CHAOS_PLANE)-sem-bin/ && \
	  $(CHAOS_ETCD) $(PLANE) up $(CHAOS_PLANE)-sem && \
	  $(CHAOS_PLANE)-sem-bin/lk-chaos run --plane $(CHAOS_PLANE)-sem --bin $(CHAOS_PLANE)-sem-bin --duration $(SEMAPHORE_DURATION) $(SEMAPHORE_ARGS) \
	    --out bench/results/chaos-semaphore-latest.md $(if $(SEED),--seed $(SEED)); rc=$$?; $(PLANE) down $(CHAOS_PLANE)-sem; exit $$rc

## A short chaos run, a short semaphore run, and every negative control (part of CI).
chaos-smoke: plane-build chaos-build
	$(CHAOS_ETCD) $(PLANE) up $(CHAOS_PLANE)-smoke && \
	  $(CHAOS_BIN)/lk-chaos run --plane $(CHAOS_PLANE)-smoke --bin $(CHAOS_BIN) --duration 60s \
	    --out target/chaos-smoke.md $(if $(SEED),--seed $(SEED)) && \
	  $(CHAOS_BIN)/lk-chaos run --plane $(CHAOS_PLANE)-smoke --bin $(CHAOS_BIN) --duration 45s $(SEMAPHORE_ARGS) \
	    --out target/chaos-semaphore-smoke.md $(if $(SEED),--seed $(SEED)) && \
	  hack/chaos-controls.sh $(CHAOS_PLANE)-smoke $(CHAOS_BIN) 30s; rc=$$?; $(PLANE) down $(CHAOS_PLANE)-smoke; exit $$rc

chaos-controls: plane-build chaos-build
	$(CHAOS_ETCD) $(PLANE) up $(CHAOS_PLANE)-controls && hack/chaos-controls.sh $(CHAOS_PLANE)-controls $(CHAOS_BIN) 30s; \
	  rc=$$?; $(PLANE) down $(CHAOS_PLANE)-controls; exit $$rc
