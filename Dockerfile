# weighbridge's container image: built from this repository with the versions in Cargo.lock,
# run as a non-root user from a slim Debian.
#
#   docker build -t weighbridge .
#   docker run --rm -p 8000:8000 -v "$PWD/my.toml:/etc/weighbridge/weighbridge.toml:ro" weighbridge
#
# Ports: 8000 is the example listener of conf/container.toml; 9900 is the admin endpoint
# (/metrics, /status, /healthz, drain/enable, reload), token-protected off loopback: publish it
# only where Prometheus and operators reach it.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
COPY tests/support/dns.rs ./tests/support/dns.rs
RUN cargo build --release --locked --bin weighbridge

FROM debian:bookworm-slim
# 65532, the user the Kubernetes manifests run as (deploy/kubernetes/).
RUN useradd --system --uid 65532 --no-create-home --shell /usr/sbin/nologin weighbridge
COPY --from=build /src/target/release/weighbridge /usr/local/bin/weighbridge
COPY conf/container.toml /etc/weighbridge/weighbridge.toml
USER 65532
EXPOSE 8000 9900
# SIGTERM drains open connections for shutdown_grace (30 s): give `docker stop -t` more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/weighbridge"]
CMD ["--config", "/etc/weighbridge/weighbridge.toml"]
