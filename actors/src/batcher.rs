//! The per-model batcher actor and its engine thread. (public API; implementation in progress)

use std::sync::Arc;

use crate::engine::{Engine, EngineError, EngineSpec, SeqId, SeqOutput};
use crate::metrics::ModelMetrics;

/// Queue limits and step shape of one model's batcher.
#[derive(Debug, Clone)]
pub struct BatcherConfig {
    /// Requests waiting (not yet running) beyond which new ones get `Overloaded`.
    pub max_waiting: usize,
    /// Seconds a rejected client should wait before retrying.
    pub retry_after_s: u64,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig { max_waiting: 256, retry_after_s: 1 }
    }
}

/// What a sequence's subscriber receives.
#[derive(Debug, Clone)]
pub enum SeqEvent<O> {
    Output(SeqOutput<O>),
    /// The engine failed; the sequence is gone.
    Failed(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is overloaded; retry after {retry_after_s} s")]
    Overloaded { retry_after_s: u64 },
    #[error("the request needs {needed} tokens of KV cache but the model holds at most {capacity}")]
    TooLarge { needed: usize, capacity: usize },
    #[error("model unavailable: {0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatcherStats {
    pub waiting: usize,
    pub running: usize,
    pub used_blocks: usize,
    pub total_blocks: usize,
    pub preemptions: u64,
    pub steps: u64,
}

/// A cheap, cloneable handle to one model's batcher.
pub struct BatcherHandle<E: Engine> {
    _e: std::marker::PhantomData<E>,
}

impl<E: Engine> Clone for BatcherHandle<E> {
    fn clone(&self) -> Self {
        todo!()
    }
}

impl<E: Engine> BatcherHandle<E> {
    pub fn model(&self) -> &str {
        todo!()
    }
    pub fn spec(&self) -> &EngineSpec {
        todo!()
    }
    /// Queues one sequence; its outputs go to `sink` until it finishes.
    pub async fn submit(
        &self,
        _req: E::Request,
        _sink: flume::Sender<SeqEvent<E::Output>>,
    ) -> Result<SeqId, SubmitError> {
        todo!()
    }
    /// Stops a sequence at the next step boundary and frees its blocks.
    pub fn cancel(&self, _id: SeqId) {
        todo!()
    }
    pub async fn stats(&self) -> Result<BatcherStats, SubmitError> {
        todo!()
    }
    /// Stops the batcher and its engine thread.
    pub fn stop(&self) {
        todo!()
    }
}

/// Starts a batcher actor for `model`; `make_engine` runs on the new engine thread (Burn
/// state never leaves it). Returns once the engine is loaded, or its load error.
pub async fn spawn_batcher<E: Engine>(
    _model: String,
    _make_engine: Arc<dyn Fn() -> Result<E, EngineError> + Send + Sync>,
    _config: BatcherConfig,
    _metrics: ModelMetrics,
) -> Result<BatcherHandle<E>, EngineError> {
    todo!()
}
