# Kiln with the CUDA backend. Build: docker build -t kiln .
# Run the built-in CPU demo model (config/default.toml, copied into the image):
#   docker run -p 8080:8080 kiln
# Run a real model on the GPU: mount the HuggingFace snapshots at /models, then either pick a
# config profile (their "../models/<name>" paths resolve to /models: /etc/kiln/models -> /models)
#   docker run --gpus all -p 8080:8080 -v /data/models:/models:ro \
#     -e KILN_CONFIG=/etc/kiln/config/qwen2.5-3b-instruct.toml kiln
# or name the folder directly:
#   docker run --gpus all -p 8080:8080 -v /data/models:/models:ro kiln \
#     serve --model /models/Qwen2.5-3B-Instruct --device cuda
# Config via env: KILN_CONFIG, KILN_HOST, KILN_PORT, RUST_LOG. deploy/ has a compose file with
# Prometheus and Grafana.
ARG CUDA_VERSION=12.6.3

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS chef
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
ENV PATH=/root/.cargo/bin:$PATH
RUN cargo install cargo-chef --locked
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Dependencies first: cached until Cargo.toml/Cargo.lock change.
RUN cargo chef cook --release --features cuda --recipe-path recipe.json
COPY . .
RUN cargo build --release --features cuda --bin kiln

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 kiln \
    && mkdir -p /etc/kiln /models && ln -s /models /etc/kiln/models
COPY --from=builder /src/target/release/kiln /usr/local/bin/kiln
COPY --chown=kiln config /etc/kiln/config
COPY --chown=kiln tests/fixtures /etc/kiln/tests/fixtures
USER kiln
WORKDIR /etc/kiln
ENV KILN_HOST=0.0.0.0 KILN_PORT=8080 KILN_CONFIG=/etc/kiln/config/default.toml RUST_LOG=info NO_COLOR=1
VOLUME ["/models"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 CMD curl -fsS "http://127.0.0.1:${KILN_PORT:-8080}/health" || exit 1
ENTRYPOINT ["kiln"]
CMD ["serve"]
