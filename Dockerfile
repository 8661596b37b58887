# syntax=docker/dockerfile:1
# leasekeeper: a multi-stage build of a small non-root image.
#   docker build -t leasekeeper:0.1.0 .

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: a change to src/ does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && echo '' > src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src
COPY src ./src
# Touch so cargo sees the real sources as newer than the placeholder build.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin leasekeeper \
 && cp target/release/leasekeeper /leasekeeper

# distroless/cc carries glibc and the CA roots, nothing else; "nonroot" is uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /leasekeeper /usr/local/bin/leasekeeper
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/leasekeeper"]
CMD ["run"]
