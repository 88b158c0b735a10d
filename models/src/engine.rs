//! The text-generation engine. (in progress)

use crate::{DType, DeviceSpec};

/// How to build a text engine.
#[derive(Debug, Clone)]
pub struct TextEngineOptions {
    pub device: DeviceSpec,
    pub dtype: DType,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Total tokens the KV pool holds (rounded up to whole blocks).
    pub kv_cache_tokens: usize,
    /// Token budget of one step.
    pub max_batch_tokens: usize,
    /// Most sequences in one step.
    pub max_running: usize,
    /// Caps the model's own `max_position_embeddings`.
    pub max_model_len: Option<usize>,
}

pub struct TextEngine {}
