//! Text generation request and output types shared by the server, the request actor and the
//! text engine.

use crate::engine::SeqRequest;

/// Sampling controls, already validated (see the server's validation layer).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    /// In [0, 1]; 0 disables.
    pub min_p: f32,
    /// HF-style multiplicative penalty over prompt and output tokens; 1 disables.
    pub repetition_penalty: f32,
    /// OpenAI-style additive penalties over output tokens; 0 disables.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Same seed + same request => same output, whatever else is batched. None: random.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct TextRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Tokens to generate at most (already capped to the context).
    pub max_new_tokens: usize,
    /// Extra token ids that end the sequence (in addition to the model's eos unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Some(k): return the sampled token's logprob and the top-k alternatives (k may be 0).
    pub logprobs: Option<usize>,
}

impl SeqRequest for TextRequest {
    fn prompt_len(&self) -> usize {
        self.prompt.len()
    }
    fn max_new_tokens(&self) -> usize {
        self.max_new_tokens
    }
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOutput {
    pub token: u32,
    /// log-softmax of the raw model logits at the sampled token (when logprobs were asked).
    pub logprob: Option<f32>,
    /// The top-k tokens by raw logprob, best first.
    pub top_logprobs: Vec<(u32, f32)>,
}
