//! Test doubles for the API layer: a byte-level tokenizer and a backend that "generates"
//! letters without a model, so routes, validation and the WebSocket protocol are tested in
//! milliseconds. Not part of the server's behaviour.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kiln_actors::{
    BatcherStats, ClientEvent, Detokenize, EngineSpec, FinishReason, Generation, SubmitError, TopLogprob,
};
use kiln_models::ChatMessage;
use tokio::sync::mpsc;

use crate::backend::{GenerationDefaults, TextBackend, TextTokenizer};
use crate::server::{AppState, Limits, Loader, ModelEntry};

/// One token per byte; the chat template is `role: content\n` lines.
#[derive(Debug, Clone)]
pub struct FakeTokenizer {
    pub chat_template: bool,
    pub defaults_temperature: Option<f32>,
}

impl Default for FakeTokenizer {
    fn default() -> Self {
        FakeTokenizer { chat_template: true, defaults_temperature: None }
    }
}

impl TextTokenizer for FakeTokenizer {
    fn encode(&self, text: &str, _add_special_tokens: bool) -> Result<Vec<u32>, String> {
        Ok(text.bytes().map(u32::from).collect())
    }
    fn decode(&self, ids: &[u32], _skip_special_tokens: bool) -> String {
        let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    fn has_chat_template(&self) -> bool {
        self.chat_template
    }
    fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, String> {
        let mut s: String = messages.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect();
        if add_generation_prompt {
            s.push_str("assistant: ");
        }
        Ok(s)
    }
    fn generation_defaults(&self) -> GenerationDefaults {
        GenerationDefaults { temperature: self.defaults_temperature, ..GenerationDefaults::default() }
    }
    fn vocab_size(&self) -> Option<usize> {
        Some(256)
    }
}

impl Detokenize for FakeTokenizer {
    fn decode(&self, ids: &[u32]) -> String {
        TextTokenizer::decode(self, ids, true)
    }
    fn token_text(&self, id: u32) -> String {
        TextTokenizer::decode(self, &[id], false)
    }
}

/// Emits lowercase letters, one per step: greedy requests all read `abc...`, seeded ones
/// start from their seed, unseeded sampled ones differ per request. Like the request actor,
/// it ends every unfinished choice with `timeout` when the generation's deadline passes.
pub struct FakeBackend {
    pub spec: EngineSpec,
    pub step_delay: Duration,
    /// Sequences that may run at once; more get `Overloaded` (None: no limit).
    pub max_running: Option<usize>,
    running: Arc<AtomicUsize>,
    counter: AtomicU64,
}

impl FakeBackend {
    pub fn new(step_delay: Duration) -> FakeBackend {
        FakeBackend {
            spec: EngineSpec {
                block_size: 16,
                num_blocks: 64,
                max_model_len: 512,
                max_batch_tokens: 256,
                max_running: 16,
            },
            step_delay,
            max_running: None,
            running: Arc::new(AtomicUsize::new(0)),
            counter: AtomicU64::new(1),
        }
    }
}

struct RunningGuard(Arc<AtomicUsize>, usize);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::SeqCst);
    }
}

impl TextBackend for FakeBackend {
    fn spec(&self) -> EngineSpec {
        self.spec.clone()
    }

    fn generate(&self, generation: Generation) -> BoxFuture<'static, Result<mpsc::Receiver<ClientEvent>, SubmitError>> {
        let (tx, rx) = mpsc::channel(64);
        let n = generation.choices.len();
        let before = self.running.fetch_add(n, Ordering::SeqCst);
        if self.max_running.is_some_and(|max| before + n > max) {
            self.running.fetch_sub(n, Ordering::SeqCst);
            return Box::pin(async { Err(SubmitError::Overloaded { retry_after_s: 1 }) });
        }
        let guard = RunningGuard(self.running.clone(), n);
        let delay = self.step_delay;
        let salt = self.counter.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let _guard = guard;
            let max = generation.choices.iter().map(|c| c.max_new_tokens).max().unwrap_or(0);
            for step in 0..max {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if generation.deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    for (index, c) in generation.choices.iter().enumerate().filter(|(_, c)| step < c.max_new_tokens) {
                        let done = ClientEvent::Done {
                            index,
                            finish_reason: FinishReason::Timeout,
                            prompt_tokens: c.prompt.len(),
                            completion_tokens: step,
                        };
                        if tx.send(done).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                for (index, c) in generation.choices.iter().enumerate() {
                    if step >= c.max_new_tokens {
                        continue;
                    }
                    let start = if c.params.temperature == 0.0 {
                        0
                    } else {
                        c.params.seed.unwrap_or(salt.wrapping_mul(7919).wrapping_add(index as u64))
                    };
                    let token = u32::from(b'a') + ((start + step as u64) % 26) as u32;
                    let text = char::from(token as u8).to_string();
                    let ev = ClientEvent::Token {
                        index,
                        text: text.clone(),
                        token,
                        token_text: text,
                        logprob: c.logprobs.map(|_| -0.5),
                        top_logprobs: (0..c.logprobs.unwrap_or(0))
                            .map(|k| TopLogprob {
                                token: token + k as u32,
                                text: char::from((token + k as u32) as u8).to_string(),
                                logprob: -0.5 - k as f32,
                            })
                            .collect(),
                    };
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                    if step + 1 == c.max_new_tokens {
                        let done = ClientEvent::Done {
                            index,
                            finish_reason: FinishReason::Length,
                            prompt_tokens: c.prompt.len(),
                            completion_tokens: c.max_new_tokens,
                        };
                        if tx.send(done).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Box::pin(async move { Ok(rx) })
    }

    fn stats(&self) -> BoxFuture<'static, Result<BatcherStats, SubmitError>> {
        let running = self.running.load(Ordering::SeqCst);
        let total_blocks = self.spec.num_blocks;
        Box::pin(
            async move { Ok(BatcherStats { running, used_blocks: running, total_blocks, ..BatcherStats::default() }) },
        )
    }

    fn stop(&self) {}
}

/// An `AppState` serving one fake model named `fake`.
pub fn fake_state(step_delay: Duration, limits: Limits) -> AppState {
    fake_state_with(FakeBackend::new(step_delay), limits)
}

/// An `AppState` serving `backend` as the model named `fake`.
pub fn fake_state_with(backend: FakeBackend, limits: Limits) -> AppState {
    let backend: Arc<dyn TextBackend> = Arc::new(backend);
    let loader: Loader = Arc::new(move || {
        let b = backend.clone();
        Box::pin(async move { Ok(b) })
    });
    let entry = ModelEntry::new("fake".into(), true, true, Arc::new(FakeTokenizer::default()), loader);
    let state = AppState::new(vec![entry], limits, Arc::new(|| "kiln_fake_metric{model=\"fake\"} 1\n".to_string()));
    state.start_preload();
    state
}
