//! kiln-loadtest: a load generator for Kiln and any OpenAI-compatible server.
//!
//! A [`scenario::Scenario`] (TOML) names a target and a kind (chat SSE, completions SSE,
//! Kiln's WebSocket, embeddings), a load pattern (closed loop at a concurrency, or open loop
//! with Poisson arrivals at a rate), bounds, a prompt set and an SLO. [`runner::run`] executes
//! it and returns a [`runner::RunResult`]: per-request records (TTFT, inter-token latencies,
//! end-to-end latency, tokens streamed versus `usage`, error kind), a summary (p50/p90/p99,
//! throughput, goodput, errors by kind) and a per-second time series. [`report`] renders the
//! stdout table, `--compare` deltas and a self-contained HTML report.

pub mod client;
pub mod prompts;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod stats;

pub use client::{ErrorKind, RequestRecord};
pub use runner::{run, RunResult, Summary};
pub use scenario::{Kind, LoadMode, Scenario};
