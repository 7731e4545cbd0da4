# syntax=docker/dockerfile:1
# The `quantfleet` image: one binary for every role (operator, node, router, fetch). Build from the repository
# root:   docker build -t quantfleet:0.1.0 .
# Stage 1 compiles with the pinned toolchain (rust-toolchain.toml); stage 2 is distroless: glibc and CA
# certificates, no shell, no package manager, running as the non-root user 65532 (the UID the chart and the
# operator's node pods use). No container engine exists on the project's CI machines, so CI does not build this.

FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target directory between builds; the binary is copied out of the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p quantfleet \
    && install -D -m 0755 target/release/quantfleet /out/quantfleet

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/quantfleet /usr/local/bin/quantfleet
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/quantfleet"]
