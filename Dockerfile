# Multi-stage build of the Petrel broker.
#   docker build -t petrel .
#   docker run --rm -p 1883:1883 -p 8883:8883 -p 8083:8083 -p 8084:8084 -p 14567:14567/udp \
#       -p 18083:18083 -v petrel-data:/opt/petrel/data petrel
# or `docker compose up -d` with docker-compose.yml.
FROM rust:1-bookworm AS build
WORKDIR /src
# Cargo loads the whole workspace even to build one binary: every member (netem) and every
# target a manifest declares ([[bench]] files under benches/) must be here. A unit test
# (`packaging` in src/lib.rs) checks these lines against the manifests.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY netem ./netem
COPY benches ./benches
RUN cargo build --release --locked --bin petrel

FROM debian:bookworm-slim
# CA certificates: the system trust store that `petrel pub`/`sub` (and any outgoing TLS the
# broker makes) read; curl for the health check only.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --no-create-home --home-dir /opt/petrel --shell /usr/sbin/nologin petrel \
    && mkdir -p /opt/petrel/etc /opt/petrel/data /opt/petrel/log \
    && chown -R petrel:petrel /opt/petrel/data /opt/petrel/log
COPY --from=build /src/target/release/petrel /usr/local/bin/petrel
# The annotated example is the default configuration: every listener, development certificate
# made under /opt/petrel/data/certs/ on first start. Mount your own file over it to change that.
COPY petrel.example.toml /opt/petrel/etc/petrel.toml
USER petrel
WORKDIR /opt/petrel
# The durable store (sessions, queues, retained messages: /opt/petrel/data/store) and the
# development certificates live here; keep it on a volume so they outlive the container.
VOLUME /opt/petrel/data
# MQTT over TCP, TLS, WebSocket, WebSocket over TLS and QUIC; the HTTP API and dashboard.
EXPOSE 1883 8883 8083 8084 14567/udp 18083
# /api/v5/status needs no credentials. The start period covers opening a large store.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:18083/api/v5/status || exit 1
# docker stop sends SIGTERM: Petrel stops accepting, tells MQTT 5 clients "Server shutting
# down" and drains within broker.close_linger, then commits the store. The exec form makes
# petrel PID 1, and it handles SIGTERM itself; `docker kill -s HUP` reloads the password and
# ACL files and the log level.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/petrel", "--config", "/opt/petrel/etc/petrel.toml", "--data-dir", "/opt/petrel/data"]
