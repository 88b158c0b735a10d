//! Wiring: one `ModelEntry` per configured model (tokenizer on the server side, the batcher
//! loaded in the background), the shared `AppState`, and `serve`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::future::BoxFuture;
use kiln_actors::{
    spawn_batcher, BatcherConfig, BatcherHealth, Detokenize, DeviceLedger, EngineError, FailureHook, FaultSwitch,
    MemoryBytes, MemoryPlan, Metrics, ModelMetrics, SupervisorHandle,
};
use kiln_models::bert::EncoderConfig;
use kiln_models::embed::SentenceTransformerConfig;
use kiln_models::{
    detect_family, EmbeddingEngine, EmbeddingEngineOptions, EmbeddingTokenizer, Family, HfTokenizer, TextEngine,
    TextEngineOptions,
};
use tokio::sync::watch;

use crate::backend::{BatcherBackend, EmbeddingBackend, ImageBackend, SpeechBackend, TextBackend, TextTokenizer};
use crate::config::{Config, ModelConfig};
use crate::error::ApiError;

/// A loaded model's batcher, by family.
#[derive(Clone)]
pub enum Backend {
    Text(Arc<dyn TextBackend>),
    Embedding(Arc<EmbeddingBackend>),
    Image(Arc<ImageBackend>),
    Speech(Arc<SpeechBackend>),
}

impl Backend {
    pub fn spec(&self) -> kiln_actors::EngineSpec {
        match self {
            Backend::Text(b) => b.spec(),
            Backend::Embedding(b) => b.handle.spec().clone(),
            Backend::Image(b) => b.handle.spec().clone(),
            Backend::Speech(b) => b.handle.spec().clone(),
        }
    }

    pub async fn stats(&self) -> Result<kiln_actors::BatcherStats, kiln_actors::SubmitError> {
        match self {
            Backend::Text(b) => b.stats().await,
            Backend::Embedding(b) => b.handle.stats().await,
            Backend::Image(b) => b.handle.stats().await,
            Backend::Speech(b) => b.handle.stats().await,
        }
    }

    pub fn stop(&self) {
        match self {
            Backend::Text(b) => b.stop(),
            Backend::Embedding(b) => b.handle.stop(),
            Backend::Image(b) => b.handle.stop(),
            Backend::Speech(b) => b.handle.stop(),
        }
    }

    /// Device memory the engine holds.
    pub fn memory(&self) -> MemoryBytes {
        match self {
            Backend::Text(b) => b.memory(),
            Backend::Embedding(b) => b.handle.memory(),
            Backend::Image(b) => b.handle.memory(),
            Backend::Speech(b) => b.handle.memory(),
        }
    }

    /// Resolves once the engine has ended and freed its memory (after `stop`).
    pub async fn engine_exited(&self) {
        match self {
            Backend::Text(b) => b.engine_exited().await,
            Backend::Embedding(b) => b.handle.engine_exited().await,
            Backend::Image(b) => b.handle.engine_exited().await,
            Backend::Speech(b) => b.handle.engine_exited().await,
        }
    }
}

/// Where a model's memory comes from: its device's ledger, the reservation it makes before
/// loading, and the pool of models it shares the device with (for eviction).
pub struct Placement {
    pub ledger: Arc<DeviceLedger>,
    /// Estimated before loading (weights from the checkpoint, KV pool, activation reserve).
    pub estimate: MemoryBytes,
    pub pool: Arc<ModelPool>,
}

/// Every served model, for least-recently-used eviction, and the lock that serialises loads.
pub struct ModelPool {
    entries: OnceLock<Vec<Weak<ModelEntry>>>,
    load_lock: tokio::sync::Mutex<()>,
    /// How long a load waits for busy models to go idle before giving up.
    load_wait: Duration,
    /// A model used more recently than this is not evicted (a request may be about to submit).
    idle_grace: Duration,
    started: Instant,
}

impl ModelPool {
    pub fn new(load_wait: Duration) -> Arc<ModelPool> {
        Arc::new(ModelPool {
            entries: OnceLock::new(),
            load_lock: tokio::sync::Mutex::new(()),
            load_wait,
            idle_grace: Duration::from_millis(250),
            started: Instant::now(),
        })
    }

    /// Registers the models sharing the pool (once).
    pub fn set_entries(&self, entries: &[Arc<ModelEntry>]) {
        let _ = self.entries.set(entries.iter().map(Arc::downgrade).collect());
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Frees room on `entry`'s device for its reservation: unloads idle models on the same
    /// ledger, least recently used first; waits (up to `load_wait`) while they are busy.
    async fn make_room(&self, entry: &Arc<ModelEntry>, placement: &Placement) -> Result<(), String> {
        let ledger = &placement.ledger;
        let need = placement.estimate.total();
        if need > ledger.capacity() {
            return Err(format!(
                "model {} needs {} (weights {}, KV cache {}, activations {}) but {} has {} for models; \
                 lower kv_cache_tokens or max_batch_tokens, or raise memory_limit / memory_fraction",
                entry.name,
                human_bytes(need),
                human_bytes(placement.estimate.weights),
                human_bytes(placement.estimate.kv),
                human_bytes(placement.estimate.activations),
                ledger.device(),
                human_bytes(ledger.capacity()),
            ));
        }
        let deadline = Instant::now() + self.load_wait;
        loop {
            if ledger.free() >= need {
                return Ok(());
            }
            let mut others: Vec<Arc<ModelEntry>> = self
                .entries
                .get()
                .into_iter()
                .flatten()
                .filter_map(Weak::upgrade)
                .filter(|e| {
                    !Arc::ptr_eq(e, entry)
                        && e.placement().is_some_and(|p| Arc::ptr_eq(&p.ledger, ledger))
                        && matches!(e.state(), LoadState::Ready(_))
                })
                .collect();
            others.sort_by_key(|e| e.last_used.load(Ordering::Relaxed));
            let mut evicted = false;
            for other in others {
                if other.is_idle(self.now_ms(), self.idle_grace).await {
                    tracing::info!(
                        model = %other.name,
                        for_model = %entry.name,
                        device = ledger.device(),
                        free = %human_bytes(ledger.free()),
                        need = %human_bytes(need),
                        "unloading the least recently used idle model to make room"
                    );
                    other.unload().await;
                    evicted = true;
                    break;
                }
            }
            if evicted {
                continue;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not enough free memory on {} to load model {}: it needs {}, {} is free and the other \
                     models are busy; retry later",
                    ledger.device(),
                    entry.name,
                    human_bytes(need),
                    human_bytes(ledger.free()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub use kiln_actors::ledger::human_bytes;

/// Where a model's batcher stands.
#[derive(Clone)]
pub enum LoadState {
    Unloaded,
    Loading,
    Ready(Backend),
    Failed(String),
}

impl LoadState {
    pub fn as_str(&self) -> &'static str {
        match self {
            LoadState::Unloaded => "unloaded",
            LoadState::Loading => "loading",
            LoadState::Ready(_) => "ready",
            LoadState::Failed(_) => "failed",
        }
    }
}

/// Starts a text model's batcher.
pub type Loader = Arc<dyn Fn() -> BoxFuture<'static, Result<Arc<dyn TextBackend>, String>> + Send + Sync>;
/// Starts any model's batcher.
pub type BackendLoader = Arc<dyn Fn() -> BoxFuture<'static, Result<Backend, String>> + Send + Sync>;

/// What an embedding model's folder says, known before its weights load.
pub struct EmbeddingModel {
    pub tokenizer: EmbeddingTokenizer,
    /// Length of the served vectors: the projection's output when there is one.
    pub dimensions: usize,
    pub max_seq_length: usize,
    /// Token ids at or above this are refused.
    pub vocab_size: usize,
    /// e.g. `mean`, `cls`.
    pub pooling: String,
    /// The vectors are L2-normalised (a `Normalize` module).
    pub normalize: bool,
    pub prompts: std::collections::BTreeMap<String, String>,
    pub default_prompt_name: Option<String>,
    /// A `kiln pca fit` projection applied to the encoder's vectors before they are served.
    pub projection: Option<crate::pca::Projection>,
}

impl EmbeddingModel {
    /// Reads a sentence-transformers folder's configs and tokenizer.
    pub fn from_dir(dir: &std::path::Path) -> anyhow::Result<EmbeddingModel> {
        let encoder = EncoderConfig::from_dir(dir)?;
        let st = SentenceTransformerConfig::from_dir(dir, &encoder)?;
        let tokenizer = EmbeddingTokenizer::load(dir, &st)?;
        Ok(EmbeddingModel {
            tokenizer,
            dimensions: encoder.hidden_size * st.pooling.num_modes(),
            max_seq_length: st.max_seq_length,
            vocab_size: encoder.vocab_size,
            pooling: st.pooling.describe(),
            normalize: st.normalize,
            prompts: st.prompts,
            default_prompt_name: st.default_prompt_name,
            projection: None,
        })
    }
}

/// What a diffusers folder says, known before its weights load, with the limits the server
/// applies to its requests.
pub struct ImageModel {
    pub info: kiln_models::DiffusionInfo,
    pub tokenizer: kiln_models::clip::ClipTokenizer,
    /// Largest width x height, and largest side, in pixels.
    pub max_pixels: usize,
    pub max_side: usize,
    pub max_steps: usize,
    pub default_steps: usize,
}

impl ImageModel {
    pub fn from_config(m: &ModelConfig) -> anyhow::Result<ImageModel> {
        let info = kiln_models::DiffusionInfo::from_dir(&m.path)?;
        let tokenizer = kiln_models::clip::ClipTokenizer::from_dir(&m.path.join("tokenizer"))?;
        let (w, h) = (info.default_width, info.default_height);
        let max_steps = m.max_steps.clamp(1, info.scheduler.num_train_timesteps);
        Ok(ImageModel {
            max_pixels: m.max_image_pixels.unwrap_or(2 * w * h),
            max_side: m.max_image_side.unwrap_or(2 * w.max(h)),
            max_steps,
            default_steps: m.default_steps.clamp(1, max_steps),
            info,
            tokenizer,
        })
    }
}

/// What a Qwen3-TTS folder says, known before its weights load (prompt builder, speakers,
/// languages, audio format), with the limits the server applies to its requests.
pub struct SpeechModel {
    pub prompter: kiln_models::tts_prompt::TtsPrompter,
    /// Output samples per second (24000 for the 12 Hz tokenizer).
    pub sample_rate: u32,
    /// Waveform samples per codec frame (1920).
    pub samples_per_frame: usize,
    /// Longest `input`, in characters (`max_speech_chars`).
    pub max_chars: usize,
    /// Most frames per utterance before the context cap (`max_frames`, or the model's
    /// `max_new_tokens` - 1).
    pub max_frames: usize,
    /// The first audio is decoded and sent once this many frames exist
    /// (`speech_first_chunk_frames`), later audio every `chunk_frames` (`speech_chunk_frames`).
    pub first_chunk_frames: usize,
    pub chunk_frames: usize,
    /// Talker positions one utterance may use: prompt rows, one per frame, and the step that
    /// ends it.
    pub max_model_len: usize,
}

impl SpeechModel {
    /// Reads the configs and text tokenizer; `kv_tokens` is the model's resolved KV pool.
    pub fn from_config(m: &ModelConfig, kv_tokens: usize) -> anyhow::Result<SpeechModel> {
        let prompter = kiln_models::tts_prompt::TtsPrompter::from_dir(&m.path)?;
        let talker = kiln_models::tts::TalkerSpec::from_dir(&m.path)?;
        let codec = kiln_models::tts_decoder::TtsDecoderConfig::from_dir(&m.path.join("speech_tokenizer"))?;
        let positions = talker.talker.max_position_embeddings.max(1);
        let kv = kv_tokens.div_ceil(m.block_size.max(1)) * m.block_size.max(1);
        let max_model_len = m.max_model_len.unwrap_or(positions).min(positions).min(kv.max(1));
        let model_frames = prompter.config().generation.max_new_tokens.saturating_sub(1).max(1);
        Ok(SpeechModel {
            sample_rate: u32::try_from(codec.output_sample_rate).context("output_sample_rate")?,
            samples_per_frame: codec.samples_per_frame(),
            max_chars: m.max_speech_chars,
            max_frames: m.max_frames.unwrap_or(model_frames),
            first_chunk_frames: m.speech_first_chunk_frames.max(1),
            chunk_frames: m.speech_chunk_frames.max(1),
            max_model_len,
            prompter,
        })
    }

    /// The most frames an utterance whose prompt has `prompt_rows` rows may generate: the
    /// configured cap, and what its context leaves (one position per frame, one for the last
    /// step).
    pub fn frame_cap(&self, prompt_rows: usize) -> usize {
        self.max_frames.min(self.max_model_len.saturating_sub(prompt_rows + 1))
    }

    /// The model's speakers, sorted (matched case-insensitively).
    pub fn speakers(&self) -> Vec<String> {
        self.prompter.speakers()
    }

    /// The model's languages, with `auto` (matched case-insensitively).
    pub fn languages(&self) -> Vec<String> {
        self.prompter.languages()
    }

    /// Whether an `instruct` text is used (some model sizes drop it).
    pub fn instruct_supported(&self) -> bool {
        self.prompter.config().instruct_allowed()
    }
}

/// What a served model does, with the server side of its tokenizer.
#[derive(Clone)]
pub enum ModelKind {
    Text(Arc<dyn TextTokenizer>),
    Embedding(Arc<EmbeddingModel>),
    Image(Arc<ImageModel>),
    Speech(Arc<SpeechModel>),
}

/// One served model.
pub struct ModelEntry {
    pub name: String,
    /// A random-weight demo model (its text is noise).
    pub demo: bool,
    pub preload: bool,
    /// Unix seconds the server registered it (`created` in /v1/models).
    pub created: u64,
    pub kind: ModelKind,
    loader: BackendLoader,
    state: watch::Sender<LoadState>,
    /// Its device ledger and pool (none: memory not accounted, e.g. test fakes).
    placement: OnceLock<Placement>,
    /// Milliseconds since the pool started, at the last request (for LRU eviction).
    last_used: AtomicU64,
    /// Loaded at least once (a preloaded model unloaded since still counts as ready).
    ever_loaded: std::sync::atomic::AtomicBool,
    metrics: OnceLock<ModelMetrics>,
}

impl ModelEntry {
    /// A text-generation model.
    pub fn new(
        name: String,
        demo: bool,
        preload: bool,
        tokenizer: Arc<dyn TextTokenizer>,
        loader: Loader,
    ) -> Arc<ModelEntry> {
        let loader: BackendLoader = Arc::new(move || {
            let load = loader();
            Box::pin(async move { load.await.map(Backend::Text) })
        });
        Self::with_kind(name, demo, preload, ModelKind::Text(tokenizer), loader)
    }

    /// A model of any family; `loader` must start the batcher `kind` calls for.
    pub fn with_kind(
        name: String,
        demo: bool,
        preload: bool,
        kind: ModelKind,
        loader: BackendLoader,
    ) -> Arc<ModelEntry> {
        Arc::new(ModelEntry {
            name,
            demo,
            preload,
            created: unix_now(),
            kind,
            loader,
            state: watch::Sender::new(LoadState::Unloaded),
            placement: OnceLock::new(),
            last_used: AtomicU64::new(0),
            ever_loaded: Default::default(),
            metrics: OnceLock::new(),
        })
    }

    /// Accounts the model's memory in `placement` (once, before the first load).
    pub fn set_placement(&self, placement: Placement) {
        let _ = self.placement.set(placement);
    }

    pub fn placement(&self) -> Option<&Placement> {
        self.placement.get()
    }

    /// The model's metrics (loaded, loads, memory gauges).
    pub fn set_metrics(&self, metrics: ModelMetrics) {
        let _ = self.metrics.set(metrics);
    }

    /// The model's memory for `/v1/models`: where it lives, what it holds (measured once
    /// loaded, else the estimate it will reserve), and what its KV pool allows.
    pub fn memory_report(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        if let Some(p) = self.placement() {
            let held = p.ledger.held_by(&self.name);
            let loaded = held.total() > 0;
            let bytes = if loaded { held } else { p.estimate };
            out.insert("device".into(), p.ledger.device().into());
            out.insert("measured".into(), loaded.into());
            out.insert("weights_bytes".into(), bytes.weights.into());
            out.insert("kv_bytes".into(), bytes.kv.into());
            out.insert("activation_bytes".into(), bytes.activations.into());
            out.insert("device_budget_bytes".into(), p.ledger.capacity().into());
            out.insert("device_free_bytes".into(), p.ledger.free().into());
        }
        if let LoadState::Ready(b) = self.state() {
            let spec = b.spec();
            if matches!(self.kind, ModelKind::Text(_) | ModelKind::Speech(_)) {
                let tokens = spec.num_blocks * spec.block_size;
                let per_seq = spec.max_model_len.div_ceil(spec.block_size).max(1);
                out.insert("kv_blocks".into(), spec.num_blocks.into());
                out.insert("block_size".into(), spec.block_size.into());
                out.insert("max_tokens_in_cache".into(), tokens.into());
                out.insert("max_model_len".into(), spec.max_model_len.into());
                out.insert("max_concurrent_sequences".into(), spec.max_running.min(spec.num_blocks).into());
                out.insert(
                    "max_concurrent_sequences_at_max_model_len".into(),
                    spec.max_running.min(spec.num_blocks / per_seq).into(),
                );
            } else {
                out.insert("max_concurrent_sequences".into(), spec.max_running.into());
            }
        }
        serde_json::Value::Object(out)
    }

    /// Whether the loaded model has no queued or running sequence and was not used lately.
    async fn is_idle(&self, now_ms: u64, grace: Duration) -> bool {
        let LoadState::Ready(backend) = self.state() else { return false };
        if now_ms.saturating_sub(self.last_used.load(Ordering::Relaxed)) < grace.as_millis() as u64 {
            return false;
        }
        matches!(backend.stats().await, Ok(s) if s.waiting == 0 && s.running == 0)
    }

    /// Unloads a ready model: stops its batcher and waits until its engine has freed its
    /// memory. A later request loads it again.
    pub async fn unload(&self) {
        let mut backend = None;
        self.state.send_if_modified(|s| {
            if let LoadState::Ready(b) = s {
                backend = Some(b.clone());
                *s = LoadState::Unloaded;
                true
            } else {
                false
            }
        });
        if let Some(b) = backend {
            b.stop();
            b.engine_exited().await;
            self.record_unloaded();
            tracing::info!(model = %self.name, "model unloaded");
        }
    }

    fn record_unloaded(&self) {
        if let Some(m) = self.metrics.get() {
            m.model_unloads.inc();
            m.model_loaded.set(0);
            m.mem_weights.set(0);
            m.mem_kv.set(0);
            m.mem_activations.set(0);
        }
    }

    /// The supervisor's hook: the batcher actor failed (its sequences got an error event).
    /// Drops the dead backend and loads the model again; its engine frees its memory as its
    /// thread ends, which the reload waits for in the ledger.
    pub fn restart_after_failure(self: &Arc<Self>, error: &str) {
        let mut was_ready = false;
        self.state.send_if_modified(|s| {
            was_ready = matches!(s, LoadState::Ready(_));
            if was_ready {
                *s = LoadState::Unloaded;
            }
            was_ready
        });
        if was_ready {
            self.record_unloaded();
            tracing::warn!(model = %self.name, error, "restarting the model's batcher after a failure");
            self.start_loading();
        }
    }

    /// Loads the backend, first making room in the device ledger when the model has one.
    async fn load_with_room(self: &Arc<Self>) -> Result<Backend, String> {
        let Some(placement) = self.placement() else { return (self.loader)().await };
        let _serialised = placement.pool.load_lock.lock().await;
        placement.pool.make_room(self, placement).await?;
        (self.loader)().await
    }

    /// The tokenizer of a text model; a clear 400 for an embedding model.
    pub fn text_tokenizer(&self) -> Result<&Arc<dyn TextTokenizer>, ApiError> {
        match &self.kind {
            ModelKind::Text(t) => Ok(t),
            ModelKind::Embedding(_) => Err(ApiError::param(
                "model",
                format!(
                    "the model `{}` is an embedding model: it serves /v1/embeddings (or the WebSocket `embed` \
                     message), not text generation",
                    self.name
                ),
            )),
            ModelKind::Image(_) => Err(self.image_model_error("text generation")),
            ModelKind::Speech(_) => Err(self.speech_model_error("text generation")),
        }
    }

    fn speech_model_error(&self, what: &str) -> ApiError {
        ApiError::param(
            "model",
            format!(
                "the model `{}` is a text-to-speech model: it serves /v1/audio/speech (or the WebSocket \
                 `speech` message), not {what}",
                self.name
            ),
        )
    }

    /// The facts of a speech model; a clear 400 for another family.
    pub fn speech_model(&self) -> Result<&Arc<SpeechModel>, ApiError> {
        match &self.kind {
            ModelKind::Speech(m) => Ok(m),
            _ => Err(ApiError::param(
                "model",
                format!(
                    "the model `{}` does not generate speech (GET /v1/audio/voices lists the speech models)",
                    self.name
                ),
            )),
        }
    }

    /// The speech model's backend, loading it first if needed.
    pub async fn speech_backend(self: &Arc<Self>) -> Result<Arc<SpeechBackend>, ApiError> {
        self.speech_model()?;
        match self.loaded().await? {
            Backend::Speech(b) => Ok(b),
            _ => Err(ApiError::Internal(format!("model {} loaded the wrong backend", self.name))),
        }
    }

    fn image_model_error(&self, what: &str) -> ApiError {
        ApiError::param(
            "model",
            format!(
                "the model `{}` is an image-generation model: it serves /v1/images/generations and \
                 /v1/images/edits (or the WebSocket `image` message), not {what}",
                self.name
            ),
        )
    }

    /// The facts of an image model; a clear 400 for another family.
    pub fn image_model(&self) -> Result<&Arc<ImageModel>, ApiError> {
        match &self.kind {
            ModelKind::Image(m) => Ok(m),
            _ => Err(ApiError::param(
                "model",
                format!("the model `{}` does not generate images (see /v1/models for the image models)", self.name),
            )),
        }
    }

    /// The image model's backend, loading it first if needed.
    pub async fn image_backend(self: &Arc<Self>) -> Result<Arc<ImageBackend>, ApiError> {
        self.image_model()?;
        match self.loaded().await? {
            Backend::Image(b) => Ok(b),
            _ => Err(ApiError::Internal(format!("model {} loaded the wrong backend", self.name))),
        }
    }

    /// The facts of an embedding model; a clear 400 for a text model.
    pub fn embedding_model(&self) -> Result<&Arc<EmbeddingModel>, ApiError> {
        match &self.kind {
            ModelKind::Embedding(m) => Ok(m),
            ModelKind::Text(_) => Err(ApiError::param(
                "model",
                format!(
                    "the model `{}` is a text-generation model: it does not serve embeddings \
                     (use /v1/chat/completions or /v1/completions)",
                    self.name
                ),
            )),
            ModelKind::Image(_) => Err(self.image_model_error("embeddings")),
            ModelKind::Speech(_) => Err(self.speech_model_error("embeddings")),
        }
    }

    pub fn state(&self) -> LoadState {
        self.state.borrow().clone()
    }

    /// Starts loading in the background unless loading has started already.
    pub fn start_loading(self: &Arc<Self>) {
        let mut start = false;
        self.state.send_if_modified(|s| {
            start = matches!(s, LoadState::Unloaded);
            if start {
                *s = LoadState::Loading;
            }
            start
        });
        if start {
            let entry = self.clone();
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                tracing::info!(model = %entry.name, demo = entry.demo, "loading model");
                let state = match entry.load_with_room().await {
                    Ok(backend) => {
                        let spec = backend.spec();
                        let memory = backend.memory();
                        entry.ever_loaded.store(true, Ordering::Relaxed);
                        if let Some(m) = entry.metrics.get() {
                            m.model_loads.inc();
                            m.model_loaded.set(1);
                            m.mem_weights.set(memory.weights as i64);
                            m.mem_kv.set(memory.kv as i64);
                            m.mem_activations.set(memory.activations as i64);
                        }
                        tracing::info!(
                            model = %entry.name,
                            elapsed_s = started.elapsed().as_secs_f32(),
                            max_model_len = spec.max_model_len,
                            kv_blocks = spec.num_blocks,
                            block_size = spec.block_size,
                            weights = %human_bytes(memory.weights),
                            kv = %human_bytes(memory.kv),
                            activations = %human_bytes(memory.activations),
                            "model ready{}",
                            if entry.demo { " (random-weight demo: its outputs are noise)" } else { "" }
                        );
                        LoadState::Ready(backend)
                    }
                    Err(e) => {
                        tracing::error!(model = %entry.name, error = %e, "model failed to load");
                        LoadState::Failed(e)
                    }
                };
                entry.state.send_replace(state);
            });
        }
    }

    /// The text model's backend, loading it first if needed (waits for a load in progress).
    pub async fn backend(self: &Arc<Self>) -> Result<Arc<dyn TextBackend>, ApiError> {
        self.text_tokenizer()?;
        match self.loaded().await? {
            Backend::Text(b) => Ok(b),
            _ => Err(ApiError::Internal(format!("model {} loaded the wrong backend", self.name))),
        }
    }

    /// The embedding model's backend, loading it first if needed.
    pub async fn embedding_backend(self: &Arc<Self>) -> Result<Arc<EmbeddingBackend>, ApiError> {
        self.embedding_model()?;
        match self.loaded().await? {
            Backend::Embedding(b) => Ok(b),
            _ => Err(ApiError::Internal(format!("model {} loaded the wrong backend", self.name))),
        }
    }

    /// The model's backend, loading it first if needed (waits for a load in progress).
    pub async fn loaded(self: &Arc<Self>) -> Result<Backend, ApiError> {
        if let Some(p) = self.placement() {
            self.last_used.store(p.pool.now_ms(), Ordering::Relaxed);
        }
        self.start_loading();
        let mut rx = self.state.subscribe();
        let state = rx
            .wait_for(|s| matches!(s, LoadState::Ready(_) | LoadState::Failed(_)))
            .await
            .map_err(|_| ApiError::Unavailable(format!("model {} is shutting down", self.name)))?;
        match &*state {
            LoadState::Ready(b) => Ok(b.clone()),
            LoadState::Failed(e) => Err(ApiError::Unavailable(format!("model {} failed to load: {e}", self.name))),
            _ => unreachable!("wait_for returned a state it does not accept"),
        }
    }

    /// Waits for a load in progress to end; the error of a failed load.
    pub async fn wait_loaded(self: &Arc<Self>) -> Result<(), String> {
        let mut rx = self.state.subscribe();
        let state = rx
            .wait_for(|s| matches!(s, LoadState::Ready(_) | LoadState::Failed(_)))
            .await
            .map_err(|e| e.to_string())?;
        match &*state {
            LoadState::Failed(e) => Err(e.clone()),
            _ => Ok(()),
        }
    }
}

/// Limits the API enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub max_ws_inflight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let s = crate::config::ServerConfig::default();
        Limits {
            max_body_bytes: s.max_body_bytes,
            request_timeout: Duration::from_secs(s.request_timeout_s),
            max_ws_inflight: s.max_ws_inflight,
        }
    }
}

/// Shared by every route; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub models: Arc<Vec<Arc<ModelEntry>>>,
    pub limits: Limits,
    /// The Prometheus text of every metric.
    pub render_metrics: Arc<dyn Fn() -> String + Send + Sync>,
    /// Parent of every batcher: tells which one failed.
    pub supervisor: Option<SupervisorHandle>,
    /// Set once shutdown begins: new requests get 503 while running ones finish.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// One memory ledger per device the models use.
    pub ledgers: Vec<Arc<DeviceLedger>>,
    /// On shutdown, how long running requests may take to finish.
    pub drain_timeout: Duration,
    /// Test-only fault switches by model (`[server] fault_injection = true`).
    pub faults: Option<Arc<std::collections::BTreeMap<String, Arc<FaultSwitch>>>>,
    /// Generated images kept for `response_format: "url"` (`GET /v1/images/{id}.png`).
    pub images: Arc<crate::image_store::ImageStore>,
}

impl AppState {
    pub fn new(
        models: Vec<Arc<ModelEntry>>,
        limits: Limits,
        render_metrics: Arc<dyn Fn() -> String + Send + Sync>,
    ) -> AppState {
        AppState {
            models: Arc::new(models),
            limits,
            render_metrics,
            supervisor: None,
            draining: Default::default(),
            ledgers: Vec::new(),
            drain_timeout: Duration::from_secs(crate::config::ServerConfig::default().drain_timeout_s),
            faults: None,
            images: Default::default(),
        }
    }

    /// Builds every configured model's entry (tokenizers load now, batchers in the background
    /// once `start_preload` runs). Fails on an unreadable folder or an unsupported family.
    pub async fn from_config(config: &Config, metrics: Metrics) -> anyhow::Result<AppState> {
        anyhow::ensure!(
            !config.models.is_empty(),
            "no models configured: add a [[models]] entry to the config or pass --model DIR"
        );
        let supervisor = SupervisorHandle::start().await.context("starting the supervisor")?;
        let pool = ModelPool::new(Duration::from_secs(config.server.load_wait_s));
        let mut ledgers: std::collections::BTreeMap<String, Arc<DeviceLedger>> = Default::default();
        let mut faults = std::collections::BTreeMap::new();
        let host_cache = (config.server.host_cache_bytes > 0)
            .then(|| kiln_models::weights::HostWeightCache::new(config.server.host_cache_bytes));
        let mut configs = config.models.clone();
        resolve_auto_kv(&mut configs, &config.server, &mut ledgers)?;
        let mut models = Vec::new();
        for m in &configs {
            let ledger = device_ledger(m, &config.server, &mut ledgers)?;
            let estimate = ledger.as_ref().map(|_| estimate_memory(m)).transpose()?;
            let fault = config.server.fault_injection.then(|| Arc::new(FaultSwitch::default()));
            let wiring = Wiring {
                supervisor: supervisor.clone(),
                memory: ledger.clone().zip(estimate).map(|(ledger, estimate)| MemoryPlan { ledger, estimate }),
                faults: fault.clone(),
                entry: Arc::new(OnceLock::new()),
                host_cache: host_cache.clone(),
            };
            let entry = model_entry(m, &metrics, &wiring)?;
            let _ = wiring.entry.set(Arc::downgrade(&entry));
            entry.set_metrics(metrics.for_model(&m.name));
            if let Some(plan) = wiring.memory {
                tracing::info!(
                    model = %m.name,
                    device = plan.ledger.device(),
                    weights = %human_bytes(plan.estimate.weights),
                    kv = %human_bytes(plan.estimate.kv),
                    activations = %human_bytes(plan.estimate.activations),
                    device_budget = %human_bytes(plan.ledger.capacity()),
                    "memory plan (estimates; replaced by measurements once loaded)"
                );
                entry.set_placement(Placement { ledger: plan.ledger, estimate: plan.estimate, pool: pool.clone() });
            }
            if let Some(f) = fault {
                faults.insert(m.name.clone(), f);
            }
            models.push(entry);
        }
        pool.set_entries(&models);
        let limits = Limits {
            max_body_bytes: config.server.max_body_bytes,
            request_timeout: Duration::from_secs(config.server.request_timeout_s),
            max_ws_inflight: config.server.max_ws_inflight,
        };
        let render = metrics.clone();
        let mut state = AppState::new(models, limits, Arc::new(move || render.render()));
        state.supervisor = Some(supervisor);
        state.ledgers = ledgers.into_values().collect();
        state.drain_timeout = Duration::from_secs(config.server.drain_timeout_s);
        if config.server.fault_injection {
            tracing::warn!("fault injection is enabled (POST /admin/fault): for tests only");
            state.faults = Some(Arc::new(faults));
        }
        Ok(state)
    }

    /// Starts loading every `preload` model.
    pub fn start_preload(&self) {
        for m in self.models.iter().filter(|m| m.preload) {
            m.start_loading();
        }
    }

    /// Ready when every preloaded model is loaded and no batcher is down. (A model unloaded to
    /// make room for another is not down: it reloads on its next request.)
    pub async fn is_ready(&self) -> bool {
        let loaded = self
            .models
            .iter()
            .filter(|m| m.preload)
            .all(|m| m.ever_loaded.load(Ordering::Relaxed) && !matches!(m.state(), LoadState::Failed(_)));
        loaded && self.batcher_health().await.values().all(|h| !matches!(h, BatcherHealth::Failed(_)))
    }

    /// Health of every started batcher, by model (empty without a supervisor).
    pub async fn batcher_health(&self) -> std::collections::BTreeMap<String, BatcherHealth> {
        match &self.supervisor {
            Some(s) => s.health().await,
            None => Default::default(),
        }
    }

    pub fn model(&self, name: &str) -> Option<&Arc<ModelEntry>> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The model a request names; optional when only one model is served.
    pub fn resolve_model(&self, requested: Option<&str>) -> Result<Arc<ModelEntry>, ApiError> {
        match requested {
            Some(name) if !name.is_empty() => {
                self.model(name).cloned().ok_or_else(|| ApiError::ModelNotFound(name.to_string()))
            }
            _ if self.models.len() == 1 => Ok(self.models[0].clone()),
            _ => Err(ApiError::param(
                "model",
                format!(
                    "`model` is required when several models are served ({})",
                    self.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    /// Stops every loaded batcher.
    pub fn shutdown(&self) {
        for m in self.models.iter() {
            if let LoadState::Ready(b) = m.state() {
                b.stop();
            }
        }
        if let Some(s) = &self.supervisor {
            s.stop();
        }
    }
}

/// How a model's batcher is wired into the server: its supervisor, its memory, test faults,
/// and (once created) its own entry, which the supervisor's failure hook reloads.
struct Wiring {
    supervisor: SupervisorHandle,
    memory: Option<MemoryPlan>,
    faults: Option<Arc<FaultSwitch>>,
    entry: Arc<OnceLock<Weak<ModelEntry>>>,
    host_cache: Option<Arc<kiln_models::weights::HostWeightCache>>,
}

impl Wiring {
    fn batcher_config(&self, m: &ModelConfig) -> BatcherConfig {
        let entry = self.entry.clone();
        let on_failure: FailureHook = Arc::new(move |error: String| {
            if let Some(entry) = entry.get().and_then(Weak::upgrade) {
                entry.restart_after_failure(&error);
            }
        });
        BatcherConfig {
            max_waiting: m.max_waiting,
            max_waiting_tokens: m.max_waiting_tokens.unwrap_or(usize::MAX),
            supervisor: Some(self.supervisor.clone()),
            on_failure: Some(on_failure),
            memory: self.memory.clone(),
            faults: self.faults.clone(),
            ..BatcherConfig::default()
        }
    }
}

/// The ledger of the device `m` runs on (one per device, created on first use). `None` when
/// the device's memory is unknown (e.g. no CUDA driver: the load reports the real error).
fn device_ledger(
    m: &ModelConfig,
    server: &crate::config::ServerConfig,
    ledgers: &mut std::collections::BTreeMap<String, Arc<DeviceLedger>>,
) -> anyhow::Result<Option<Arc<DeviceLedger>>> {
    let backend =
        kiln_models::backend::choose_backend(m.device).map_err(|e| anyhow::anyhow!("model {:?}: {e}", m.name))?;
    let key = backend.describe();
    if let Some(l) = ledgers.get(&key) {
        return Ok(Some(l.clone()));
    }
    let capacity = match (backend, server.memory_limit) {
        (kiln_models::backend::BackendChoice::Flex, Some(limit)) => Some(limit),
        _ => kiln_models::backend::device_total_memory(backend).map(|t| (t as f64 * server.memory_fraction) as u64),
    };
    let Some(capacity) = capacity else {
        tracing::warn!(device = %key, "the device's memory is unknown: its models are not memory-accounted");
        return Ok(None);
    };
    tracing::info!(device = %key, budget = %human_bytes(capacity), "device memory ledger");
    let ledger = DeviceLedger::new(key.clone(), capacity);
    ledgers.insert(key, ledger.clone());
    Ok(Some(ledger))
}

/// Sizes the KV pool of every `kv_cache_tokens = "auto"` text model: per device, the budget
/// left after every model's weights and activation reserve and the other models' explicit KV
/// pools, split evenly between the device's `auto` models (`kiln plan`'s `kv_shares`), each
/// capped at `max_running` sequences of its context. All the device's models then fit at once.
fn resolve_auto_kv(
    models: &mut [ModelConfig],
    server: &crate::config::ServerConfig,
    ledgers: &mut std::collections::BTreeMap<String, Arc<DeviceLedger>>,
) -> anyhow::Result<()> {
    if models.iter().all(|m| m.kv_cache_tokens.tokens().is_some()) {
        return Ok(());
    }
    // Per model: its device ledger, its fixed bytes (weights + activation reserve) and, for
    // text models, the estimate and context its KV claim is made of.
    struct Facts {
        ledger: Option<Arc<DeviceLedger>>,
        fixed: u64,
        text: Option<(kiln_models::memory::ModelMemory, usize)>,
    }
    let mut facts = Vec::new();
    for m in models.iter() {
        let ledger = device_ledger(m, server, ledgers)?;
        if detect_family(&m.path).ok() == Some(Family::Diffusion) {
            let mem = image_memory(m)?;
            facts.push(Facts { ledger, fixed: mem.weights + mem.activations, text: None });
            continue;
        }
        let mem = kiln_models::memory::estimate(&m.path, m.dtype).with_context(|| format!("model {:?}", m.name))?;
        let positions = mem.shape.max_positions.max(1);
        let context = m.max_model_len.unwrap_or(positions).min(positions);
        let activations = kiln_models::memory::activation_bytes(&mem, m.max_batch_tokens, m.max_running, context);
        let fixed = mem.weights_bytes + activations;
        let text = mem.is_text().then_some((mem, context));
        facts.push(Facts { ledger, fixed, text });
    }
    let devices: Vec<Arc<DeviceLedger>> = ledgers.values().cloned().collect();
    for ledger in devices {
        let on: Vec<usize> =
            (0..models.len()).filter(|&i| facts[i].ledger.as_ref().is_some_and(|l| Arc::ptr_eq(l, &ledger))).collect();
        let fixed: u64 = on.iter().map(|&i| facts[i].fixed).sum();
        let usable = ledger.capacity().saturating_sub(fixed);
        let text: Vec<(usize, &kiln_models::memory::ModelMemory, usize)> =
            on.iter().filter_map(|&i| facts[i].text.as_ref().map(|(mem, ctx)| (i, mem, *ctx))).collect();
        let claims: Vec<crate::plan::KvClaim> = text
            .iter()
            .map(|&(i, mem, context)| crate::plan::KvClaim {
                tokens: models[i].kv_cache_tokens.tokens(),
                kv_bytes_per_token: mem.kv_bytes_per_token,
                cap_tokens: models[i].max_running * context.div_ceil(models[i].block_size) * models[i].block_size,
            })
            .collect();
        let shares = crate::plan::kv_shares(&claims, usable);
        for (&(i, mem, _), share) in text.iter().zip(shares) {
            let m = &mut models[i];
            if m.kv_cache_tokens.tokens().is_some() {
                continue;
            }
            let block_bytes = mem.kv_bytes_per_token.max(1) * m.block_size as u64;
            let tokens = (share / block_bytes) as usize * m.block_size;
            anyhow::ensure!(
                tokens > 0,
                "model {:?}: kv_cache_tokens = \"auto\" leaves no KV cache: {} has {} for models and their \
                 weights and activation reserves take {}",
                m.name,
                ledger.device(),
                human_bytes(ledger.capacity()),
                human_bytes(fixed)
            );
            tracing::info!(model = %m.name, device = ledger.device(), kv_tokens = tokens, kv = %human_bytes(tokens as u64 * mem.kv_bytes_per_token), "kv_cache_tokens = auto");
            m.kv_cache_tokens = crate::config::KvCacheTokens::Tokens(tokens);
        }
    }
    if let Some(m) = models.iter().find(|m| {
        m.kv_cache_tokens.tokens().is_none()
            && matches!(detect_family(&m.path).ok(), Some(Family::TextGeneration | Family::Speech))
    }) {
        anyhow::bail!(
            "model {:?}: kv_cache_tokens = \"auto\" needs a known device memory (set [server] memory_limit, \
             or give a token count)",
            m.name
        );
    }
    Ok(())
}

/// What `m` will reserve before loading: checkpoint weights in the configured dtype, the KV
/// pool it asks for, and the activation reserve of its largest step (`kiln plan`'s formula).
fn estimate_memory(m: &ModelConfig) -> anyhow::Result<MemoryBytes> {
    if detect_family(&m.path).ok() == Some(Family::Diffusion) {
        return image_memory(m);
    }
    let mem = kiln_models::memory::estimate(&m.path, m.dtype).with_context(|| format!("model {:?}", m.name))?;
    let positions = mem.shape.max_positions.max(1);
    if mem.is_text() {
        let configured = m.kv_cache_tokens.tokens().ok_or_else(|| {
            anyhow::anyhow!("model {:?}: kv_cache_tokens = \"auto\" must be resolved before estimating", m.name)
        })?;
        let kv_tokens = configured.div_ceil(m.block_size) * m.block_size;
        let context = m.max_model_len.unwrap_or(positions).min(positions).min(kv_tokens);
        Ok(MemoryBytes {
            weights: mem.weights_bytes,
            kv: mem.kv_bytes_per_token * kv_tokens as u64,
            activations: kiln_models::memory::activation_bytes(&mem, m.max_batch_tokens, m.max_running, context),
        })
    } else {
        let context = positions.min(m.max_batch_tokens);
        Ok(MemoryBytes {
            weights: mem.weights_bytes,
            kv: 0,
            activations: kiln_models::memory::activation_bytes(&mem, m.max_batch_tokens, m.max_running, context),
        })
    }
}

fn model_entry(m: &ModelConfig, metrics: &Metrics, wiring: &Wiring) -> anyhow::Result<Arc<ModelEntry>> {
    let family = detect_family(&m.path).with_context(|| format!("model {:?} at {}", m.name, m.path.display()))?;
    match family {
        Family::TextGeneration => text_model_entry(m, metrics, wiring),
        Family::Embedding => embedding_model_entry(m, metrics, wiring),
        Family::Diffusion => image_model_entry(m, metrics, wiring),
        Family::Speech => speech_model_entry(m, metrics, wiring),
    }
}

/// A diffusers folder: its tokenizer and limits now, a `DiffusionEngine` batcher on load.
/// Reuses `device`, `dtype`, `max_running` (images in flight) and `max_waiting`.
fn image_model_entry(m: &ModelConfig, metrics: &Metrics, wiring: &Wiring) -> anyhow::Result<Arc<ModelEntry>> {
    let dir: PathBuf = m.path.clone();
    let model = Arc::new(
        ImageModel::from_config(m)
            .with_context(|| format!("model {:?} at {}: reading the diffusion pipeline", m.name, dir.display()))?,
    );
    let opts = kiln_models::DiffusionEngineOptions {
        device: m.device,
        dtype: m.dtype,
        max_running: m.max_running,
        max_pixels: model.max_pixels,
        max_batch_images: m.max_batch_images,
        max_steps: model.max_steps,
        warmup: true,
    };
    let batcher_config = wiring.batcher_config(m);
    let model_metrics = metrics.for_model(&m.name);
    let name = m.name.clone();
    let loader: BackendLoader = Arc::new(move || {
        let dir = dir.clone();
        let opts = opts.clone();
        let make_engine = Arc::new(move || {
            kiln_models::DiffusionEngine::load(&dir, &opts).map_err(|e| EngineError::Load(e.to_string()))
        });
        let (name, config, metrics) = (name.clone(), batcher_config.clone(), model_metrics.clone());
        Box::pin(async move {
            let handle = spawn_batcher(name, make_engine, config, metrics.clone()).await.map_err(|e| e.to_string())?;
            Ok(Backend::Image(Arc::new(ImageBackend { handle, metrics })))
        })
    });
    Ok(ModelEntry::with_kind(m.name.clone(), m.demo, m.preload, ModelKind::Image(model), loader))
}

/// A Qwen3-TTS folder: its prompt builder and limits now, a `TtsEngine` batcher on load.
/// Reuses `device`, `dtype`, `block_size`, `kv_cache_tokens` (talker positions),
/// `max_batch_tokens` (talker rows per step), `max_running` (utterances per step),
/// `max_waiting` and `max_model_len`. Its memory is reserved like a text model's (weights,
/// the talker's KV pool, the activation reserve), which `estimate_memory` does.
fn speech_model_entry(m: &ModelConfig, metrics: &Metrics, wiring: &Wiring) -> anyhow::Result<Arc<ModelEntry>> {
    let dir: PathBuf = m.path.clone();
    let kv_cache_tokens = m
        .kv_cache_tokens
        .tokens()
        .ok_or_else(|| anyhow::anyhow!("model {:?}: kv_cache_tokens = \"auto\" was not resolved", m.name))?;
    let model = Arc::new(
        SpeechModel::from_config(m, kv_cache_tokens)
            .with_context(|| format!("model {:?} at {}: reading the speech model", m.name, dir.display()))?,
    );
    let opts = kiln_models::TtsEngineOptions {
        device: m.device,
        dtype: m.dtype,
        block_size: m.block_size,
        kv_cache_tokens,
        max_batch_tokens: m.max_batch_tokens,
        max_running: m.max_running,
        max_model_len: model.max_model_len,
    };
    let batcher_config = wiring.batcher_config(m);
    let model_metrics = metrics.for_model(&m.name);
    let name = m.name.clone();
    let loader: BackendLoader = Arc::new(move || {
        let dir = dir.clone();
        let opts = opts.clone();
        let make_engine =
            Arc::new(move || kiln_models::TtsEngine::load(&dir, &opts).map_err(|e| EngineError::Load(e.to_string())));
        let (name, config, metrics) = (name.clone(), batcher_config.clone(), model_metrics.clone());
        Box::pin(async move {
            let handle = spawn_batcher(name, make_engine, config, metrics.clone()).await.map_err(|e| e.to_string())?;
            Ok(Backend::Speech(Arc::new(SpeechBackend { handle, metrics })))
        })
    });
    Ok(ModelEntry::with_kind(m.name.clone(), m.demo, m.preload, ModelKind::Speech(model), loader))
}

/// What an image model reserves: its three components' weights and the workspace of one
/// forward of `max_batch_images` images of the largest size (UNet with guidance, then their
/// VAE decode).
pub(crate) fn image_memory(m: &ModelConfig) -> anyhow::Result<MemoryBytes> {
    let model = ImageModel::from_config(m).with_context(|| format!("model {:?}", m.name))?;
    let side = kiln_models::diffusion::largest_side(&model.info, model.max_pixels);
    Ok(MemoryBytes {
        weights: model.info.weights_bytes(m.dtype),
        kv: 0,
        activations: model.info.activation_bytes(side, side, m.max_batch_images.max(1), m.dtype),
    })
}

/// A sentence-transformers folder: its tokenizer now, an `EmbeddingEngine` batcher on load.
/// Reuses `device`, `dtype`, `max_batch_tokens`, `max_running` and `max_waiting`.
fn embedding_model_entry(m: &ModelConfig, metrics: &Metrics, wiring: &Wiring) -> anyhow::Result<Arc<ModelEntry>> {
    let dir: PathBuf = m.path.clone();
    let mut model = EmbeddingModel::from_dir(&dir)
        .with_context(|| format!("model {:?} at {}: reading the embedding model", m.name, dir.display()))?;
    if let Some(path) = &m.projection {
        crate::pca::attach_projection(&mut model, path).with_context(|| format!("model {:?}", m.name))?;
    }
    let model = Arc::new(model);
    let opts = EmbeddingEngineOptions {
        device: m.device,
        dtype: m.dtype,
        max_batch_tokens: m.max_batch_tokens,
        max_running: m.max_running,
        pooling: None,
    };
    let batcher_config = wiring.batcher_config(m);
    let model_metrics = metrics.for_model(&m.name);
    let name = m.name.clone();
    let loader: BackendLoader = Arc::new(move || {
        let dir = dir.clone();
        let opts = opts.clone();
        let make_engine =
            Arc::new(move || EmbeddingEngine::load(&dir, &opts).map_err(|e| EngineError::Load(e.to_string())));
        let (name, config, metrics) = (name.clone(), batcher_config.clone(), model_metrics.clone());
        Box::pin(async move {
            let handle = spawn_batcher(name, make_engine, config, metrics.clone()).await.map_err(|e| e.to_string())?;
            Ok(Backend::Embedding(Arc::new(EmbeddingBackend { handle, metrics })))
        })
    });
    Ok(ModelEntry::with_kind(m.name.clone(), m.demo, m.preload, ModelKind::Embedding(model), loader))
}

fn text_model_entry(m: &ModelConfig, metrics: &Metrics, wiring: &Wiring) -> anyhow::Result<Arc<ModelEntry>> {
    let dir: PathBuf = m.path.clone();
    let tokenizer =
        Arc::new(HfTokenizer::load(&dir).with_context(|| format!("model {:?}: loading the tokenizer", m.name))?);
    let detok: Arc<dyn Detokenize> = tokenizer.clone();
    let opts = TextEngineOptions {
        device: m.device,
        dtype: m.dtype,
        block_size: m.block_size,
        kv_cache_tokens: m
            .kv_cache_tokens
            .tokens()
            .ok_or_else(|| anyhow::anyhow!("model {:?}: kv_cache_tokens = \"auto\" was not resolved", m.name))?,
        max_batch_tokens: m.max_batch_tokens,
        max_running: m.max_running,
        max_model_len: m.max_model_len,
        host_cache: wiring.host_cache.clone(),
    };
    let batcher_config = wiring.batcher_config(m);
    let model_metrics = metrics.for_model(&m.name);
    let name = m.name.clone();
    let loader: Loader = Arc::new(move || {
        let dir = dir.clone();
        let opts = opts.clone();
        let make_engine = Arc::new(move || TextEngine::load(&dir, &opts).map_err(|e| EngineError::Load(e.to_string())));
        let (name, config, metrics, detok) =
            (name.clone(), batcher_config.clone(), model_metrics.clone(), detok.clone());
        Box::pin(async move {
            let handle = spawn_batcher(name, make_engine, config, metrics.clone()).await.map_err(|e| e.to_string())?;
            Ok(Arc::new(BatcherBackend { handle, detok, metrics }) as Arc<dyn TextBackend>)
        })
    });
    Ok(ModelEntry::new(m.name.clone(), m.demo, m.preload, tokenizer, loader))
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Serves `state` on `addr` until Ctrl-C / SIGTERM; exits with an error if a preloaded
/// model fails to load.
pub async fn serve(state: AppState, addr: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "kiln listening");
    state.start_preload();
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::channel::<String>(1);
    for m in state.models.iter().filter(|m| m.preload) {
        let (m, fail_tx) = (m.clone(), fail_tx.clone());
        tokio::spawn(async move {
            if let Err(e) = m.wait_loaded().await {
                let _ = fail_tx.send(format!("model {:?} failed to load: {e}", m.name)).await;
            }
        });
    }
    drop(fail_tx);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = crate::api::app(state.clone());
    // Tokens are small writes: without TCP_NODELAY, Nagle + delayed ACK adds ~40 ms stalls.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await
    });
    let outcome = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        Some(e) = fail_rx.recv() => Err(anyhow::anyhow!(e)),
    };
    let deadline = Instant::now() + state.drain_timeout;
    if outcome.is_ok() {
        // Drain: new requests get 503 (the API checks `draining`); running ones finish.
        state.draining.store(true, Ordering::SeqCst);
        tracing::info!(timeout_s = state.drain_timeout.as_secs_f32(), "draining: finishing running requests");
        let drained = state.wait_idle(deadline).await;
        if drained {
            tracing::info!("drained");
        } else {
            tracing::warn!("drain timeout: stopping with requests still running");
        }
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(());
    // Responses being written (and idle keep-alive / WebSocket connections) get what is left of
    // the drain time, at least a moment; then the batchers stop.
    let rest = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
    let _ = tokio::time::timeout(rest, server).await;
    state.shutdown();
    outcome
}

impl AppState {
    /// Waits until no loaded model has a waiting or running sequence (checked twice, 100 ms
    /// apart, so a request between validation and submission is not missed), or `deadline`.
    pub async fn wait_idle(&self, deadline: Instant) -> bool {
        let mut quiet = 0;
        while Instant::now() < deadline {
            let mut busy = false;
            for m in self.models.iter() {
                if let LoadState::Ready(b) = m.state() {
                    if matches!(b.stats().await, Ok(s) if s.waiting + s.running > 0) {
                        busy = true;
                    }
                }
            }
            quiet = if busy { 0 } else { quiet + 1 };
            if quiet >= 2 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
