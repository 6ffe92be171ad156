# syntax=docker/dockerfile:1
# game-gateway container image.
#
#   docker build -t game-gateway:0.1.0 .        (or: podman build ...)
#
# Stage 1 builds the release binary; stage 2 is distroless/cc (glibc,
# libgcc_s, CA certificates, no shell) running as the non-root user 65532 with
# the documented default config in /etc/game-gateway. Kubernetes mounts its
# own gateway.toml over that directory (deploy/kubernetes).
#
# Where base images cannot be pulled, scripts/build-image.sh builds the same
# layout from the local binary and its shared libraries (FROM scratch).

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin game-gateway \
 && install -D -m 0755 target/release/game-gateway /out/usr/local/bin/game-gateway \
 && strip --strip-debug /out/usr/local/bin/game-gateway \
 && install -D -m 0644 config/gateway.toml /out/etc/game-gateway/gateway.toml

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/ /
USER 65532:65532
WORKDIR /
# 8080 game (TCP game frames, WebSocket), 9090 admin (/health /ready /metrics
# /status, POST /drain). The default config binds admin to 127.0.0.1: mount a
# config with server.admin_listen = "0.0.0.0:9090" to probe or scrape it.
EXPOSE 8080 9090
# SIGTERM drains (sessions get server.drain_timeout); give `docker stop` more
# time than that: docker stop -t 60.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/game-gateway"]
CMD ["--config", "/etc/game-gateway/gateway.toml"]
