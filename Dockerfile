# Multi-stage build of the Petrel broker.
#   docker build -t petrel .
#   docker run --rm -p 1883:1883 -p 8883:8883 -p 8083:8083 -p 8084:8084 -v petrel-data:/opt/petrel/data petrel
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY petrel.example.toml ./
RUN cargo build --release --locked --bin petrel

FROM debian:bookworm-slim
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
# MQTT over TCP, TLS, WebSocket, WebSocket over TLS, and (to come) QUIC.
EXPOSE 1883 8883 8083 8084 14567/udp
# docker stop sends SIGTERM: Petrel stops accepting, tells MQTT 5 clients "Server shutting
# down" and drains within broker.close_linger, then commits the store. The exec form makes
# petrel PID 1, and it handles SIGTERM itself.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/petrel", "--config", "/opt/petrel/etc/petrel.toml", "--data-dir", "/opt/petrel/data"]
