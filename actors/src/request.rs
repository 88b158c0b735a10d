//! The request actor: one per client request. (public API; implementation in progress)

use std::sync::Arc;
use std::time::Instant;

use crate::batcher::{BatcherHandle, SubmitError};
use crate::detok::Detokenize;
use crate::engine::{Engine, FinishReason};
use crate::metrics::ModelMetrics;
use crate::text::{TextRequest, TokenOutput};

/// One client request: `n` choices (one sequence each) sharing stop strings and a deadline.
#[derive(Debug, Clone)]
pub struct Generation {
    pub choices: Vec<TextRequest>,
    /// Stop strings: generation ends before them; they are not included in the output.
    pub stop: Vec<String>,
    pub deadline: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token: u32,
    pub text: String,
    pub logprob: f32,
}

/// What the client side (SSE, WebSocket, JSON) receives, in order per choice.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// A text delta for choice `index`. `text` may be empty (token held back: partial UTF-8 or
    /// a possible stop-string prefix); every generated token yields exactly one event.
    Token {
        index: usize,
        text: String,
        token: u32,
        token_text: String,
        logprob: Option<f32>,
        top_logprobs: Vec<TopLogprob>,
    },
    /// Choice `index` ended. `completion_tokens` counts the tokens of this choice.
    Done {
        index: usize,
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// Choice `index` failed.
    Error { index: usize, message: String },
}

/// Submits every choice of `gen` to the batcher and spawns the request actor that turns engine
/// outputs into client events. Dropping the receiver cancels the sequences.
pub async fn start_generation<E>(
    _batcher: BatcherHandle<E>,
    _detok: Arc<dyn Detokenize>,
    _gen: Generation,
    _metrics: ModelMetrics,
) -> Result<tokio::sync::mpsc::Receiver<ClientEvent>, SubmitError>
where
    E: Engine<Request = TextRequest, Output = TokenOutput>,
{
    todo!()
}
