# Kiln with the CUDA backend. Build: docker build -t kiln .
# Run:   docker run --gpus all -p 8080:8080 -v /models:/models kiln \
#          serve --model /models/Qwen2.5-3B-Instruct --device cuda --host 0.0.0.0
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
    && useradd --create-home --uid 10001 kiln
COPY --from=builder /src/target/release/kiln /usr/local/bin/kiln
COPY --chown=kiln config /etc/kiln/config
COPY --chown=kiln tests/fixtures /etc/kiln/tests/fixtures
USER kiln
WORKDIR /etc/kiln
ENV KILN_HOST=0.0.0.0 KILN_PORT=8080 KILN_CONFIG=/etc/kiln/config/default.toml RUST_LOG=info
VOLUME ["/models"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["kiln"]
CMD ["serve"]
