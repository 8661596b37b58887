# syntax=docker/dockerfile:1
# leasekeeper: a multi-stage build of a small non-root image holding the operator
# (`leasekeeper`) and the workload plugin (`kubectl-lock`, also the sidecar).
#   docker build -t leasekeeper:0.1.0 .
# `make e2e-cluster` (CI) builds this file with buildah and local stand-ins for its two
# base images (hack/image.sh) and runs the image on a real node; `make
# dockerfile-replay` replays the build stage without a container engine.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: a change to src/ does not rebuild them. The
# workspace's tool members need their manifests and a stub target for cargo to load it.
COPY Cargo.toml Cargo.lock ./
COPY tools/testkit/Cargo.toml tools/testkit/
COPY tools/lk-bench/Cargo.toml tools/lk-bench/
COPY tools/lk-chaos/Cargo.toml tools/lk-chaos/
RUN mkdir -p src/bin/kubectl-lock tools/testkit/src tools/lk-bench/src tools/lk-chaos/src \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > src/bin/kubectl-lock/main.rs \
 && echo '' > src/lib.rs \
 && echo '' > tools/testkit/src/lib.rs \
 && echo 'fn main() {}' > tools/lk-bench/src/main.rs \
 && echo 'fn main() {}' > tools/lk-chaos/src/main.rs \
 && cargo build --release --locked -p leasekeeper \
 && rm -rf src
COPY src ./src
# Touch so cargo sees the real sources as newer than the placeholder build.
RUN touch src/main.rs src/lib.rs src/bin/kubectl-lock/main.rs \
 && cargo build --release --locked -p leasekeeper --bins \
 && mkdir -p out \
 && cp target/release/leasekeeper target/release/kubectl-lock out/

# distroless/cc carries glibc and the CA roots, nothing else; "nonroot" is uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/out/leasekeeper /src/out/kubectl-lock /usr/local/bin/
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/leasekeeper"]
CMD ["run"]
