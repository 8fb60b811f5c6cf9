# Multi-stage build of the Petrel broker.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY petrel.example.toml ./
RUN cargo build --release --locked --bin petrel

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/petrel petrel && mkdir -p /var/lib/petrel && chown petrel /var/lib/petrel
COPY --from=build /src/target/release/petrel /usr/local/bin/petrel
COPY petrel.example.toml /etc/petrel/petrel.toml
USER petrel
WORKDIR /var/lib/petrel
EXPOSE 1883
ENTRYPOINT ["/usr/local/bin/petrel", "--config", "/etc/petrel/petrel.toml", "--data-dir", "/var/lib/petrel"]
