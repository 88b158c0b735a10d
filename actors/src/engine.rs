//! The contract between the batcher (scheduling, no model code) and an engine (owns a model
//! and its per-sequence state, runs one step at a time on a dedicated thread).
//!
//! Every family is "sequences that need N more steps": text generation feeds prompt chunks and
//! then one token per step, embeddings are one-step sequences, diffusion runs one denoising
//! step per sequence per tick. The scheduler counts work in tokens and memory in KV blocks.

use std::fmt;

/// Identifies one sequence inside one batcher. Unique for the batcher's lifetime.
pub type SeqId = u64;

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token (eos, `stop_token_ids`) or a stop string was produced.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The client went away or asked to cancel.
    Cancelled,
    /// The request's deadline passed.
    Timeout,
    /// The engine failed while running this sequence.
    Error,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Timeout => "timeout",
            FinishReason::Error => "error",
        }
    }
}

/// What a request needs from the scheduler, whatever the family.
pub trait SeqRequest: Send + 'static {
    /// Tokens that must be computed before the first output (the prompt).
    fn prompt_len(&self) -> usize;
    /// Upper bound on tokens this sequence appends after the prompt (for admission checks).
    fn max_new_tokens(&self) -> usize;
}

/// Fixed facts about an engine that the scheduler plans with; reported once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSpec {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the KV pool.
    pub num_blocks: usize,
    /// Longest sequence (prompt + output) the model accepts.
    pub max_model_len: usize,
    /// Token budget of one step (prefill chunks + decode tokens).
    pub max_batch_tokens: usize,
    /// Most sequences in one step.
    pub max_running: usize,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    /// Tokens of this sequence already in the KV cache: the position of the first token fed now.
    pub start: usize,
    /// Tokens fed this step (a prefill chunk, or 1 when decoding).
    pub len: usize,
    /// KV blocks holding positions `0 .. start + len` (block `i` holds positions
    /// `i*block_size .. (i+1)*block_size`).
    pub block_table: Vec<u32>,
    /// Whether this step reaches the end of the known tokens, so the engine must produce an
    /// output (sample the next token) for this sequence.
    pub sample: bool,
}

/// Everything the engine needs for one step. Built by the scheduler, executed by the engine.
#[derive(Debug)]
pub struct StepPlan<R> {
    /// Sequences the engine has not seen yet, with their request data. They also appear in `seqs`.
    pub new: Vec<(SeqId, R)>,
    /// Sequences whose state the engine must drop (finished, cancelled, failed) before running.
    pub released: Vec<SeqId>,
    /// The work of this step, in a stable order.
    pub seqs: Vec<ScheduledSeq>,
}

impl<R> Default for StepPlan<R> {
    fn default() -> Self {
        StepPlan { new: Vec::new(), released: Vec::new(), seqs: Vec::new() }
    }
}

/// One sequence's result from a step (only for sequences scheduled with `sample == true`).
#[derive(Debug, Clone)]
pub struct SeqOutput<O> {
    pub id: SeqId,
    pub output: O,
    /// Set when the engine decided the sequence is done (stop token, max tokens, context full).
    /// A sequence not finished here grows by one token that the next step must feed.
    pub finished: Option<FinishReason>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("engine step failed: {0}")]
    Step(String),
    #[error("engine could not start: {0}")]
    Load(String),
}

/// A model that runs steps. Runs on its own OS thread; never shared.
pub trait Engine: Send + 'static {
    type Request: SeqRequest;
    type Output: Send + Clone + fmt::Debug + 'static;

    fn spec(&self) -> EngineSpec;

    /// Runs one step. Must first admit `plan.new` and drop `plan.released`.
    /// Returns one output per scheduled sequence with `sample == true`.
    fn step(&mut self, plan: StepPlan<Self::Request>) -> Result<Vec<SeqOutput<Self::Output>>, EngineError>;

    /// Runs the largest step the engine's config allows once, before serving: it profiles the
    /// activation workspace (see `memory`) and warms the allocator, so a config that cannot
    /// run fails at start-up rather than on a busy server. Leaves no sequence behind.
    fn warmup(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    /// Device memory the engine holds, measured where the backend allows (weights after
    /// load, the KV pool as allocated, the activation peak seen by `warmup`). Zero fields are
    /// unknown: the ledger keeps its estimate for them.
    fn memory(&self) -> crate::ledger::MemoryBytes {
        Default::default()
    }
}
