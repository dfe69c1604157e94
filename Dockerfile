# syntax=docker/dockerfile:1.7
#
# tollgate's container images, built with the Rust toolchain image:
#
#   docker build -t tollgate .                   # `runtime` (the default): the server
#   docker build --target ops -t tollgate-ops .  # + PostgreSQL's client tools, for
#                                                #   `tollgate backup` / `restore-drill`
#
# `runtime` is distroless (glibc, CA certificates, no shell, no package
# manager) and runs as the numeric non-root user 65532. `ops` is Debian slim
# because `tollgate backup` on PostgreSQL shells out to `pg_dump` and the drill
# to `pg_restore`; client 17 reads and writes servers 9.2 to 17.
#
# The three stages share one Debian release (13, trixie), so the binary built
# against the build stage's glibc runs on both final images.
# BuildKit (Docker's default builder since 23.0) is needed for the cache mounts.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-trixie AS build
WORKDIR /src
COPY . .
# The cache mounts keep crates and compiled dependencies between builds; the
# binary is copied out because the mounted target/ is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tollgate \
 && install -D -m 0755 target/release/tollgate /out/tollgate \
 && install -d -m 0750 /out/state/backups

FROM debian:trixie-slim AS ops
# Not pinned to Debian package versions: those vanish from the archive when a
# security update lands, which breaks rebuilds. The base tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-client \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/tollgate --shell /usr/sbin/nologin nonroot
# Root owns the binary and the catalog; the service user owns only its state.
COPY --from=build /out/tollgate /usr/local/bin/tollgate
COPY tollgate.toml /etc/tollgate/tollgate.toml
COPY --from=build --chown=65532:65532 /out/state /var/lib/tollgate
ENV ENVIRONMENT=production \
    LOG_FORMAT=json \
    BIND_ADDRESS=0.0.0.0 \
    PORT=8080 \
    TOLLGATE_CATALOG=/etc/tollgate/tollgate.toml \
    BACKUP_DIR=/var/lib/tollgate/backups
WORKDIR /var/lib/tollgate
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["--help"]

FROM gcr.io/distroless/cc-debian13:nonroot AS runtime
# Root owns the binary and the catalog; the service user owns only its state.
COPY --from=build /out/tollgate /usr/local/bin/tollgate
COPY tollgate.toml /etc/tollgate/tollgate.toml
COPY --from=build --chown=65532:65532 /out/state /var/lib/tollgate
ENV ENVIRONMENT=production \
    LOG_FORMAT=json \
    BIND_ADDRESS=0.0.0.0 \
    PORT=8080 \
    TOLLGATE_CATALOG=/etc/tollgate/tollgate.toml \
    BACKUP_DIR=/var/lib/tollgate/backups
WORKDIR /var/lib/tollgate
USER 65532:65532
EXPOSE 8080
# Liveness, not readiness: Docker (and Swarm) act on "unhealthy" by replacing
# the container, which would not bring back a database that is down.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/tollgate", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve"]
