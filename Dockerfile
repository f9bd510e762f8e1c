# syntax=docker/dockerfile:1
#
# Legate container image: multi-stage (Rust builder, Debian slim runtime), runs as non-root.
#
# UNVERIFIED: no container engine runs on the machines this was written on, so this file has
# never been built here. Its shape (multi-stage, non-root USER, ENTRYPOINT) is checked by
# tests/it/deploy.rs; the build itself is not.
#
#   docker build -t ghcr.io/legate-dev/legate:0.1.0 .

FROM rust:1.95-bookworm AS builder
# libgit2's HTTPS transport links OpenSSL (TLS for the proxy and the Kubernetes client is
# rustls with ring; no OpenSSL there).
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config libssl-dev cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and build directory between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin legate \
 && cp target/release/legate /usr/local/bin/legate \
 && strip /usr/local/bin/legate

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 legate \
 && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/legate --create-home legate \
 && mkdir -p /var/run/legate/secrets \
 && chown -R 65532:65532 /var/run/legate
COPY --from=builder /usr/local/bin/legate /usr/local/bin/legate
USER 65532:65532
EXPOSE 8080 8443 8877
ENTRYPOINT ["/usr/local/bin/legate"]
CMD ["run", "--help"]
