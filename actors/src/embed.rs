//! Request and output types of embedding models: one-step sequences whose only output is the
//! sentence vector (the prompt is the whole input; nothing is generated).

use std::collections::{HashMap, VecDeque};

use crate::batcher::{BatcherHandle, SeqEvent, SubmitError};
use crate::engine::{Engine, FinishReason, SeqId, SeqRequest};

/// One input of an embedding request, already tokenized (special tokens included) and
/// truncated to the model's `max_seq_length`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedRequest {
    pub tokens: Vec<u32>,
}

impl SeqRequest for EmbedRequest {
    fn prompt_len(&self) -> usize {
        self.tokens.len()
    }
    fn max_new_tokens(&self) -> usize {
        0
    }
}

/// The sentence vector of one input (pooled, normalized when the model says so).
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedOutput {
    pub vector: Vec<f32>,
    /// Tokens the model read for this input.
    pub prompt_tokens: usize,
}

/// Why a batch of inputs got no vectors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// The engine refused one input (empty, or token ids outside the vocabulary).
    #[error("input {index} could not be embedded (empty, or token ids outside the vocabulary)")]
    InvalidInput { index: usize },
    #[error("embedding failed: {0}")]
    Failed(String),
    #[error("input {index} ended without a vector ({reason:?})")]
    Ended { index: usize, reason: FinishReason },
}

/// Embeds every input through `batcher` and returns the outputs in input order. At most
/// `max_running` inputs of this call wait in the batcher at a time, so one call with thousands
/// of inputs neither fills the queue nor starves other callers; it is `Overloaded` only when
/// none of its inputs could be queued. On the first error the call's other inputs are
/// cancelled. Dropping the future cancels them too (the batcher sees the sink disconnected).
pub async fn embed_inputs<E>(batcher: &BatcherHandle<E>, inputs: Vec<Vec<u32>>) -> Result<Vec<EmbedOutput>, EmbedError>
where
    E: Engine<Request = EmbedRequest, Output = EmbedOutput>,
{
    let n = inputs.len();
    let window = batcher.spec().max_running.max(1);
    let (tx, rx) = flume::unbounded::<SeqEvent<EmbedOutput>>();
    let mut results: Vec<Option<EmbedOutput>> = vec![None; n];
    let mut in_flight: HashMap<SeqId, usize> = HashMap::new();
    let mut pending: VecDeque<(usize, Vec<u32>)> = inputs.into_iter().enumerate().collect();
    let fail = |in_flight: &HashMap<SeqId, usize>, e: EmbedError| {
        for id in in_flight.keys() {
            batcher.cancel(*id);
        }
        Err(e)
    };
    let mut done = 0;
    while done < n {
        while in_flight.len() < window {
            let Some((index, tokens)) = pending.pop_front() else { break };
            // A copy stays here in case the queue is full and the input must wait.
            match batcher.submit(EmbedRequest { tokens: tokens.clone() }, tx.clone()).await {
                Ok(id) => {
                    in_flight.insert(id, index);
                }
                Err(SubmitError::Overloaded { .. }) if !in_flight.is_empty() => {
                    // Queue full but some of ours are queued: retry once one of them is done.
                    pending.push_front((index, tokens));
                    break;
                }
                Err(e) => return fail(&in_flight, e.into()),
            }
        }
        let event = match rx.recv_async().await {
            Ok(event) => event,
            Err(_) => return fail(&in_flight, EmbedError::Failed("the batcher went away".into())),
        };
        let (id, outcome) = match event {
            SeqEvent::Output(out) => (out.id, out.finished.map(|r| (r, Some(out.output)))),
            SeqEvent::Finished(id, reason) => (id, Some((reason, None))),
            SeqEvent::Failed(_, message) => return fail(&in_flight, EmbedError::Failed(message)),
        };
        let Some(index) = in_flight.remove(&id) else { continue };
        match outcome {
            Some((FinishReason::Stop, Some(output))) => {
                results[index] = Some(output);
                done += 1;
            }
            Some((FinishReason::Error, _)) => return fail(&in_flight, EmbedError::InvalidInput { index }),
            other => {
                let reason = other.map(|(r, _)| r).unwrap_or(FinishReason::Error);
                return fail(&in_flight, EmbedError::Ended { index, reason });
            }
        }
    }
    Ok(results.into_iter().map(|r| r.expect("every input has an output")).collect())
}
