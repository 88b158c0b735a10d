//! What the API needs from a served model: for text, two small traits: the tokenizer (prompt
//! building, /tokenize) and the generation backend (the model's batcher). The real
//! implementations wrap kiln-models' `HfTokenizer` and kiln-actors' `BatcherHandle`; tests
//! substitute fakes (`crate::testing`). Embedding, image and speech models are served by
//! `EmbeddingBackend`, `ImageBackend` and `SpeechBackend`.

use std::sync::Arc;

use futures::future::BoxFuture;
use kiln_actors::{
    start_generation, BatcherHandle, BatcherStats, ClientEvent, Detokenize, Engine, EngineSpec, Generation,
    ModelMetrics, SubmitError, TextRequest, TokenOutput,
};
use kiln_models::{ChatMessage, HfTokenizer};
use tokio::sync::mpsc;

/// Sampling defaults a model ships (`generation_config.json`); unset fields fall back to
/// OpenAI's defaults.
pub use kiln_models::tokenizer::GenerationDefaults;

/// The server side of a model's tokenizer.
pub trait TextTokenizer: Send + Sync + 'static {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String>;
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String;
    fn has_chat_template(&self) -> bool;
    fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, String>;
    fn generation_defaults(&self) -> GenerationDefaults;
    /// Token ids at or above this are rejected in token-id prompts (None: not checked).
    fn vocab_size(&self) -> Option<usize>;
}

impl TextTokenizer for HfTokenizer {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        HfTokenizer::encode(self, text, add_special_tokens)
    }
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        HfTokenizer::decode(self, ids, skip_special_tokens)
    }
    fn has_chat_template(&self) -> bool {
        HfTokenizer::has_chat_template(self)
    }
    fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, String> {
        HfTokenizer::apply_chat_template(self, messages, add_generation_prompt)
    }
    fn generation_defaults(&self) -> GenerationDefaults {
        let d = HfTokenizer::generation_defaults(self);
        // transformers decodes greedily when the model says `do_sample: false`.
        let temperature = if d.do_sample == Some(false) { Some(0.0) } else { d.temperature };
        GenerationDefaults { temperature, ..d.clone() }
    }
    fn vocab_size(&self) -> Option<usize> {
        Some(HfTokenizer::vocab_size(self))
    }
}

/// A served text model: where validated generations go.
pub trait TextBackend: Send + Sync + 'static {
    fn spec(&self) -> EngineSpec;
    /// Submits every choice; dropping the receiver cancels the sequences.
    fn generate(&self, generation: Generation) -> BoxFuture<'static, Result<mpsc::Receiver<ClientEvent>, SubmitError>>;
    fn stats(&self) -> BoxFuture<'static, Result<BatcherStats, SubmitError>>;
    fn stop(&self);
    /// Device memory the engine holds (zero where unknown, e.g. fakes).
    fn memory(&self) -> kiln_actors::MemoryBytes {
        Default::default()
    }
    /// Resolves once the engine has ended and freed its memory (after `stop`).
    fn engine_exited(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// A model's batcher (kiln-actors) with the tokenizer the request actors detokenize with.
pub struct BatcherBackend<E: Engine> {
    pub handle: BatcherHandle<E>,
    pub detok: Arc<dyn Detokenize>,
    pub metrics: ModelMetrics,
}

impl<E> TextBackend for BatcherBackend<E>
where
    E: Engine<Request = TextRequest, Output = TokenOutput>,
{
    fn spec(&self) -> EngineSpec {
        self.handle.spec().clone()
    }
    fn generate(&self, generation: Generation) -> BoxFuture<'static, Result<mpsc::Receiver<ClientEvent>, SubmitError>> {
        let handle = self.handle.clone();
        let detok = self.detok.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move { start_generation(handle, detok, generation, metrics).await })
    }
    fn stats(&self) -> BoxFuture<'static, Result<BatcherStats, SubmitError>> {
        let handle = self.handle.clone();
        Box::pin(async move { handle.stats().await })
    }
    fn stop(&self) {
        self.handle.stop()
    }
    fn memory(&self) -> kiln_actors::MemoryBytes {
        self.handle.memory()
    }
    fn engine_exited(&self) -> BoxFuture<'static, ()> {
        let handle = self.handle.clone();
        Box::pin(async move { handle.engine_exited().await })
    }
}

/// A served embedding model: its batcher (kiln-actors' `embed_inputs` drives it).
pub struct EmbeddingBackend {
    pub handle: BatcherHandle<kiln_models::EmbeddingEngine>,
    /// The model's metrics (request latency and outcomes are recorded by the API).
    pub metrics: ModelMetrics,
}

impl EmbeddingBackend {
    /// The vectors of `inputs` (token ids, already truncated), in input order.
    pub async fn embed(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<kiln_actors::EmbedOutput>, kiln_actors::EmbedError> {
        kiln_actors::embed_inputs(&self.handle, inputs).await
    }
}

/// A served image-generation model: its batcher (kiln-actors' `ImageStream` drives it).
pub struct ImageBackend {
    pub handle: BatcherHandle<kiln_models::DiffusionEngine>,
    /// The model's metrics (request latency and outcomes are recorded by the API).
    pub metrics: ModelMetrics,
}

impl ImageBackend {
    /// Submits every image of a request; dropping the stream cancels the ones still running.
    pub async fn start(
        &self,
        requests: Vec<kiln_actors::ImageRequest>,
    ) -> Result<kiln_actors::ImageStream<kiln_models::DiffusionEngine>, SubmitError> {
        kiln_actors::ImageStream::start(&self.handle, requests).await
    }
}

/// A served text-to-speech model: its batcher (kiln-actors' `SpeechStream` drives it).
pub struct SpeechBackend {
    pub handle: BatcherHandle<kiln_models::TtsEngine>,
    /// The model's metrics (request outcomes, audio seconds and time to first audio are
    /// recorded by the API).
    pub metrics: ModelMetrics,
}

impl SpeechBackend {
    /// Queues one utterance; dropping the stream cancels it.
    pub async fn start(
        &self,
        request: kiln_actors::SpeechRequest,
    ) -> Result<kiln_actors::SpeechStream<kiln_models::TtsEngine>, SubmitError> {
        kiln_actors::SpeechStream::start(&self.handle, request).await
    }
}
