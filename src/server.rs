//! Wiring: one `ModelEntry` per configured model (tokenizer on the server side, the batcher
//! loaded in the background), the shared `AppState`, and `serve`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::future::BoxFuture;
use kiln_actors::{spawn_batcher, BatcherConfig, BatcherHealth, Detokenize, EngineError, Metrics, SupervisorHandle};
use kiln_models::bert::EncoderConfig;
use kiln_models::embed::SentenceTransformerConfig;
use kiln_models::{
    detect_family, EmbeddingEngine, EmbeddingEngineOptions, EmbeddingTokenizer, Family, HfTokenizer, TextEngine,
    TextEngineOptions,
};
use tokio::sync::watch;

use crate::backend::{BatcherBackend, EmbeddingBackend, TextBackend, TextTokenizer};
use crate::config::{Config, ModelConfig};
use crate::error::ApiError;

/// A loaded model's batcher, by family.
#[derive(Clone)]
pub enum Backend {
    Text(Arc<dyn TextBackend>),
    Embedding(Arc<EmbeddingBackend>),
}

impl Backend {
    pub fn spec(&self) -> kiln_actors::EngineSpec {
        match self {
            Backend::Text(b) => b.spec(),
            Backend::Embedding(b) => b.handle.spec().clone(),
        }
    }

    pub async fn stats(&self) -> Result<kiln_actors::BatcherStats, kiln_actors::SubmitError> {
        match self {
            Backend::Text(b) => b.stats().await,
            Backend::Embedding(b) => b.handle.stats().await,
        }
    }

    pub fn stop(&self) {
        match self {
            Backend::Text(b) => b.stop(),
            Backend::Embedding(b) => b.handle.stop(),
        }
    }
}

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
    /// Length of the model's vectors.
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
        })
    }
}

/// What a served model does, with the server side of its tokenizer.
#[derive(Clone)]
pub enum ModelKind {
    Text(Arc<dyn TextTokenizer>),
    Embedding(Arc<EmbeddingModel>),
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
        })
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
                let state = match (entry.loader)().await {
                    Ok(backend) => {
                        let spec = backend.spec();
                        tracing::info!(
                            model = %entry.name,
                            elapsed_s = started.elapsed().as_secs_f32(),
                            max_model_len = spec.max_model_len,
                            kv_blocks = spec.num_blocks,
                            block_size = spec.block_size,
                            "model ready{}",
                            if entry.demo { " (random-weight demo: its text is noise)" } else { "" }
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
            Backend::Embedding(_) => Err(ApiError::Internal(format!("model {} loaded the wrong backend", self.name))),
        }
    }

    /// The embedding model's backend, loading it first if needed.
    pub async fn embedding_backend(self: &Arc<Self>) -> Result<Arc<EmbeddingBackend>, ApiError> {
        self.embedding_model()?;
        match self.loaded().await? {
            Backend::Embedding(b) => Ok(b),
            Backend::Text(_) => Err(ApiError::Internal(format!("model {} loaded the wrong backend", self.name))),
        }
    }

    /// The model's backend, loading it first if needed (waits for a load in progress).
    pub async fn loaded(self: &Arc<Self>) -> Result<Backend, ApiError> {
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
}

impl AppState {
    pub fn new(
        models: Vec<Arc<ModelEntry>>,
        limits: Limits,
        render_metrics: Arc<dyn Fn() -> String + Send + Sync>,
    ) -> AppState {
        AppState { models: Arc::new(models), limits, render_metrics, supervisor: None, draining: Default::default() }
    }

    /// Builds every configured model's entry (tokenizers load now, batchers in the background
    /// once `start_preload` runs). Fails on an unreadable folder or an unsupported family.
    pub async fn from_config(config: &Config, metrics: Metrics) -> anyhow::Result<AppState> {
        anyhow::ensure!(
            !config.models.is_empty(),
            "no models configured: add a [[models]] entry to the config or pass --model DIR"
        );
        let supervisor = SupervisorHandle::start().await.context("starting the supervisor")?;
        let mut models = Vec::new();
        for m in &config.models {
            models.push(model_entry(m, &metrics, &supervisor)?);
        }
        let limits = Limits {
            max_body_bytes: config.server.max_body_bytes,
            request_timeout: Duration::from_secs(config.server.request_timeout_s),
            max_ws_inflight: config.server.max_ws_inflight,
        };
        let render = metrics.clone();
        let mut state = AppState::new(models, limits, Arc::new(move || render.render()));
        state.supervisor = Some(supervisor);
        Ok(state)
    }

    /// Starts loading every `preload` model.
    pub fn start_preload(&self) {
        for m in self.models.iter().filter(|m| m.preload) {
            m.start_loading();
        }
    }

    /// Ready when every preloaded model is loaded and no batcher is down.
    pub async fn is_ready(&self) -> bool {
        let loaded = self.models.iter().filter(|m| m.preload).all(|m| matches!(m.state(), LoadState::Ready(_)));
        loaded && self.batcher_health().await.values().all(|h| *h == BatcherHealth::Running)
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

fn model_entry(m: &ModelConfig, metrics: &Metrics, supervisor: &SupervisorHandle) -> anyhow::Result<Arc<ModelEntry>> {
    let family = detect_family(&m.path).with_context(|| format!("model {:?} at {}", m.name, m.path.display()))?;
    match family {
        Family::TextGeneration => text_model_entry(m, metrics, supervisor),
        Family::Embedding => embedding_model_entry(m, metrics, supervisor),
        Family::Diffusion => anyhow::bail!(
            "model {:?} at {}: the {family:?} family is not yet supported by the server \
             (text generation and embeddings only for now)",
            m.name,
            m.path.display()
        ),
    }
}

/// A sentence-transformers folder: its tokenizer now, an `EmbeddingEngine` batcher on load.
/// Reuses `device`, `dtype`, `max_batch_tokens`, `max_running` and `max_waiting`.
fn embedding_model_entry(
    m: &ModelConfig,
    metrics: &Metrics,
    supervisor: &SupervisorHandle,
) -> anyhow::Result<Arc<ModelEntry>> {
    let dir: PathBuf = m.path.clone();
    let model = Arc::new(
        EmbeddingModel::from_dir(&dir)
            .with_context(|| format!("model {:?} at {}: reading the embedding model", m.name, dir.display()))?,
    );
    let opts = EmbeddingEngineOptions {
        device: m.device,
        dtype: m.dtype,
        max_batch_tokens: m.max_batch_tokens,
        max_running: m.max_running,
        pooling: None,
    };
    let batcher_config =
        BatcherConfig { max_waiting: m.max_waiting, supervisor: Some(supervisor.clone()), ..BatcherConfig::default() };
    let model_metrics = metrics.for_model(&m.name);
    let name = m.name.clone();
    let loader: BackendLoader = Arc::new(move || {
        let dir = dir.clone();
        let opts = opts.clone();
        let make_engine =
            Arc::new(move || EmbeddingEngine::load(&dir, &opts).map_err(|e| EngineError::Load(e.to_string())));
        let (name, config, metrics) = (name.clone(), batcher_config.clone(), model_metrics.clone());
        Box::pin(async move {
            let handle = spawn_batcher(name, make_engine, config, metrics).await.map_err(|e| e.to_string())?;
            Ok(Backend::Embedding(Arc::new(EmbeddingBackend { handle })))
        })
    });
    Ok(ModelEntry::with_kind(m.name.clone(), m.demo, m.preload, ModelKind::Embedding(model), loader))
}

fn text_model_entry(
    m: &ModelConfig,
    metrics: &Metrics,
    supervisor: &SupervisorHandle,
) -> anyhow::Result<Arc<ModelEntry>> {
    let dir: PathBuf = m.path.clone();
    let tokenizer =
        Arc::new(HfTokenizer::load(&dir).with_context(|| format!("model {:?}: loading the tokenizer", m.name))?);
    let detok: Arc<dyn Detokenize> = tokenizer.clone();
    let opts = TextEngineOptions {
        device: m.device,
        dtype: m.dtype,
        block_size: m.block_size,
        kv_cache_tokens: m.kv_cache_tokens,
        max_batch_tokens: m.max_batch_tokens,
        max_running: m.max_running,
        max_model_len: m.max_model_len,
    };
    let batcher_config =
        BatcherConfig { max_waiting: m.max_waiting, supervisor: Some(supervisor.clone()), ..BatcherConfig::default() };
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
    tracing::info!("shutting down");
    let _ = stop_tx.send(());
    // Streams in flight get a moment to finish; then the batchers stop.
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    state.shutdown();
    outcome
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
