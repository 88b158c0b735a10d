//! Per-sequence sampling on the host. (implementation in progress)

use crate::text::{SamplingParams, TokenOutput};

/// Owns one sequence's RNG and penalty counts, so its output never depends on the batch.
pub struct Sampler {}

impl Sampler {
    /// `logprobs`: Some(k) to report the sampled token's logprob and the top-k.
    pub fn new(_params: &SamplingParams, _prompt: &[u32], _logprobs: Option<usize>) -> Self {
        todo!()
    }
    /// Picks the next token from raw logits (used as scratch) and records it for penalties.
    pub fn sample(&mut self, _logits: &mut [f32]) -> TokenOutput {
        todo!()
    }
}
