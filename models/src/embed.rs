//! Embedding models: sentence-transformers folders (`modules.json` with a Transformer, a
//! Pooling and an optional Normalize module) on a BERT or XLM-R encoder, their tokenizer
//! (truncation to `max_seq_length`, prompts), and the `EmbeddingEngine` the batcher drives.
//!
//! An embedding is a one-step sequence: the scheduler hands the engine a sequence's tokens
//! (normally whole; a chunk split by the step's token budget is only recorded, and the input
//! is encoded when its last chunk arrives), and the engine answers with its vector. On the CPU
//! (f32) a step's inputs run packed without padding (`BertModel`'s host path); elsewhere each
//! step sorts its inputs by length and runs them in buckets of similar length to cut padding.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use burn::tensor::backend::Backend;
use kiln_actors::embed::{EmbedOutput, EmbedRequest};
use kiln_actors::engine::{Engine, EngineError, EngineSpec, FinishReason, SeqId, SeqOutput, StepPlan};
use serde_json::Value as Json;

use crate::backend::{choose_backend, dtype_bytes, BackendChoice};
use crate::bert::{BertModel, EncoderConfig, EncoderKind, Pooling};
use crate::config::read_json;
use crate::tokenizer::HfTokenizer;
use crate::weights::WeightStore;
use crate::{DType, DeviceSpec, LoadError};

/// What a sentence-transformers folder says about its pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceTransformerConfig {
    pub pooling: Pooling,
    /// A `Normalize` module follows the pooling.
    pub normalize: bool,
    /// Inputs are truncated to this many tokens (special tokens included).
    pub max_seq_length: usize,
    /// Lower-case the text before tokenizing (`sentence_bert_config.json`).
    pub do_lower_case: bool,
    /// Named prompts (`config_sentence_transformers.json`), e.g. `query` → `"query: "`.
    pub prompts: BTreeMap<String, String>,
    /// The prompt used when a request names none.
    pub default_prompt_name: Option<String>,
}

fn parse(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Parse { path: path.display().to_string(), what: "sentence-transformers config", message: message.into() }
}

fn read_json_opt(path: &Path) -> Result<Option<Json>, LoadError> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// `1_Pooling/config.json`: the 2.x flags (`pooling_mode_mean_tokens`, ..) or the 6.x
/// `pooling_mode` (a string or a list of strings).
fn parse_pooling(path: &Path, v: &Json) -> Result<Pooling, LoadError> {
    let mut p = Pooling::default();
    if let Some(mode) = v.get("pooling_mode") {
        let modes: Vec<&str> = match mode {
            Json::String(s) => vec![s.as_str()],
            Json::Array(a) => a.iter().filter_map(Json::as_str).collect(),
            _ => return Err(parse(path, "pooling_mode must be a string or a list of strings")),
        };
        for m in modes {
            match m {
                "mean" | "mean_tokens" => p.mean = true,
                "cls" | "cls_token" => p.cls = true,
                "max" | "max_tokens" => p.max = true,
                "mean_sqrt_len_tokens" | "mean_sqrt_len" => p.mean_sqrt_len = true,
                other => {
                    return Err(parse(
                        path,
                        format!("pooling mode {other:?} is not supported (mean, cls, max, mean_sqrt_len_tokens)"),
                    ))
                }
            }
        }
    } else {
        let flag = |k: &str| v.get(k).and_then(Json::as_bool).unwrap_or(false);
        p.cls = flag("pooling_mode_cls_token");
        p.mean = flag("pooling_mode_mean_tokens");
        p.max = flag("pooling_mode_max_tokens");
        p.mean_sqrt_len = flag("pooling_mode_mean_sqrt_len_tokens");
        for unsupported in ["pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"] {
            if flag(unsupported) {
                return Err(parse(path, format!("{unsupported} is not supported")));
            }
        }
    }
    if v.get("include_prompt").and_then(Json::as_bool) == Some(false) {
        return Err(parse(path, "include_prompt = false is not supported"));
    }
    if p.num_modes() == 0 {
        return Err(parse(path, "no pooling mode is enabled"));
    }
    Ok(p)
}

impl SentenceTransformerConfig {
    /// Reads `modules.json` and the module configs of a sentence-transformers folder. `encoder`
    /// bounds `max_seq_length` by the position table.
    pub fn from_dir(dir: &Path, encoder: &EncoderConfig) -> Result<Self, LoadError> {
        let modules_path = dir.join("modules.json");
        let modules = read_json(&modules_path)?;
        let modules = modules.as_array().ok_or_else(|| parse(&modules_path, "expected a list of modules"))?;
        let mut pooling = None;
        let mut normalize = false;
        let mut has_transformer = false;
        for m in modules {
            let ty = m["type"].as_str().unwrap_or("");
            let sub = dir.join(m["path"].as_str().unwrap_or(""));
            match ty.rsplit('.').next().unwrap_or("") {
                "Transformer" => {
                    if m["path"].as_str().is_some_and(|p| !p.is_empty()) {
                        return Err(parse(&modules_path, "the Transformer module must be the folder root"));
                    }
                    has_transformer = true;
                }
                "Pooling" => {
                    let p = sub.join("config.json");
                    pooling = Some(parse_pooling(&p, &read_json(&p)?)?);
                }
                "Normalize" => normalize = true,
                _ => {
                    return Err(LoadError::Unsupported(format!(
                        "{}: module {ty:?} is not supported (Kiln serves Transformer, Pooling and Normalize)",
                        modules_path.display()
                    )))
                }
            }
        }
        if !has_transformer {
            return Err(parse(&modules_path, "no Transformer module"));
        }
        let pooling = pooling.ok_or_else(|| parse(&modules_path, "no Pooling module"))?;
        // sentence_bert_config.json's max_seq_length (2.x), else the tokenizer's
        // model_max_length (what 6.x saves), else the position table.
        let sbert = read_json_opt(&dir.join("sentence_bert_config.json"))?.unwrap_or(Json::Null);
        let tok_cfg = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let limit = encoder.max_input_len();
        let max_seq_length = sbert["max_seq_length"]
            .as_u64()
            .or_else(|| tok_cfg["model_max_length"].as_u64().filter(|&m| m < 1_000_000))
            .map(|m| m as usize)
            .unwrap_or(limit)
            .min(limit);
        let st = read_json_opt(&dir.join("config_sentence_transformers.json"))?.unwrap_or(Json::Null);
        let prompts = st["prompts"]
            .as_object()
            .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default();
        Ok(SentenceTransformerConfig {
            pooling,
            normalize,
            max_seq_length,
            do_lower_case: sbert["do_lower_case"].as_bool().unwrap_or(false),
            prompts,
            default_prompt_name: st["default_prompt_name"].as_str().map(str::to_string),
        })
    }
}

/// Why a text could not be turned into model input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmbedInputError {
    #[error("input has {len} tokens but the model reads at most {max}")]
    TooLong { len: usize, max: usize },
    #[error("unknown prompt name {0:?}")]
    UnknownPrompt(String),
    #[error("{0}")]
    Tokenizer(String),
}

/// The tokenizer of an embedding model, set up as sentence-transformers calls it: no padding,
/// truncation to `max_seq_length` with the special tokens counted, prompts prepended.
pub struct EmbeddingTokenizer {
    tokenizer: tokenizers::Tokenizer,
    untruncated: tokenizers::Tokenizer,
    max_seq_length: usize,
    do_lower_case: bool,
    prompts: BTreeMap<String, String>,
    default_prompt_name: Option<String>,
}

impl EmbeddingTokenizer {
    pub fn load(dir: &Path, st: &SentenceTransformerConfig) -> Result<Self, LoadError> {
        let hf = HfTokenizer::load(dir)?;
        let mut untruncated = hf.inner().clone();
        untruncated.with_padding(None);
        untruncated.with_truncation(None).map_err(|e| LoadError::Unsupported(e.to_string()))?;
        let mut tokenizer = untruncated.clone();
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: st.max_seq_length,
                strategy: tokenizers::TruncationStrategy::LongestFirst,
                stride: 0,
                direction: tokenizers::TruncationDirection::Right,
            }))
            .map_err(|e| LoadError::Unsupported(format!("tokenizer truncation: {e}")))?;
        Ok(EmbeddingTokenizer {
            tokenizer,
            untruncated,
            max_seq_length: st.max_seq_length,
            do_lower_case: st.do_lower_case,
            prompts: st.prompts.clone(),
            default_prompt_name: st.default_prompt_name.clone(),
        })
    }

    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// The prompt text of `name`, or of the default prompt when `name` is None.
    pub fn prompt(&self, name: Option<&str>) -> Result<&str, EmbedInputError> {
        match name.or(self.default_prompt_name.as_deref()) {
            None => Ok(""),
            Some(n) => self.prompts.get(n).map(String::as_str).ok_or_else(|| EmbedInputError::UnknownPrompt(n.into())),
        }
    }

    /// Token ids of `prompt + text` with special tokens. Longer than `max_seq_length`: cut to
    /// it when `truncate`, else an error.
    pub fn encode(&self, text: &str, prompt_name: Option<&str>, truncate: bool) -> Result<Vec<u32>, EmbedInputError> {
        let mut full = format!("{}{text}", self.prompt(prompt_name)?);
        if self.do_lower_case {
            full = full.to_lowercase();
        }
        let tok = if truncate { &self.tokenizer } else { &self.untruncated };
        let ids = tok.encode(full, true).map_err(|e| EmbedInputError::Tokenizer(e.to_string()))?.get_ids().to_vec();
        if ids.len() > self.max_seq_length {
            return Err(EmbedInputError::TooLong { len: ids.len(), max: self.max_seq_length });
        }
        Ok(ids)
    }
}

/// A sentence-transformers pipeline on one backend: encoder, pooling, normalisation.
pub struct EmbeddingModel<B: Backend> {
    pub encoder: BertModel<B>,
    pub pooling: Pooling,
    pub normalize: bool,
    pub max_seq_length: usize,
}

/// Inputs of one forward may be padded up to this factor of their own length: a step's inputs,
/// sorted by length, are cut into buckets whose shortest is at least 3/4 of their longest.
const BUCKET_MIN_RATIO: f64 = 0.75;

/// Most tokens in one forward of the host path (its activations are unpadded).
const HOST_BATCH_TOKENS: usize = 8192;

impl<B: Backend> EmbeddingModel<B> {
    /// Vectors of `inputs` in their order (each truncated to `max_seq_length`). On the host
    /// path inputs run packed without padding; otherwise sorted by length in buckets of
    /// similar length. Either way a vector does not depend on the batch.
    pub fn embed(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
        let clipped: Vec<&[u32]> = inputs.iter().map(|t| &t[..t.len().min(self.max_seq_length)]).collect();
        if self.encoder.host.is_some() {
            // The host forward packs inputs without padding: one forward per HOST_BATCH_TOKENS.
            let mut out = Vec::with_capacity(inputs.len());
            let mut i = 0;
            while i < clipped.len() {
                let (mut j, mut tokens) = (i, 0);
                while j < clipped.len() && (j == i || tokens + clipped[j].len() <= HOST_BATCH_TOKENS) {
                    tokens += clipped[j].len();
                    j += 1;
                }
                out.extend(self.encoder.embed(&clipped[i..j], self.pooling, self.normalize)?);
                i = j;
            }
            return Ok(out);
        }
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(inputs[i].len()));
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); inputs.len()];
        let mut i = 0;
        while i < order.len() {
            let longest = clipped[order[i]].len();
            let mut j = i + 1;
            while j < order.len() && (clipped[order[j]].len() as f64) >= longest as f64 * BUCKET_MIN_RATIO {
                j += 1;
            }
            let batch: Vec<&[u32]> = order[i..j].iter().map(|&k| clipped[k]).collect();
            let vectors = self.encoder.embed(&batch, self.pooling, self.normalize)?;
            for (&k, v) in order[i..j].iter().zip(vectors) {
                out[k] = v;
            }
            i = j;
        }
        Ok(out)
    }
}

/// How to build an embedding engine.
#[derive(Debug, Clone)]
pub struct EmbeddingEngineOptions {
    pub device: DeviceSpec,
    pub dtype: DType,
    /// Token budget of one step; raised to `max_seq_length` when smaller, so that an input
    /// always fits one step.
    pub max_batch_tokens: usize,
    /// Most inputs in one step.
    pub max_running: usize,
    /// Overrides pooling and normalisation (tests, experiments); None: the folder's.
    pub pooling: Option<(Pooling, bool)>,
}

impl Default for EmbeddingEngineOptions {
    fn default() -> Self {
        EmbeddingEngineOptions {
            device: DeviceSpec::Auto,
            dtype: DType::F32,
            max_batch_tokens: 8192,
            max_running: 256,
            pooling: None,
        }
    }
}

/// Facts about a loaded embedding model.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingModelInfo {
    /// `BertModel` or `XLMRobertaModel`.
    pub architecture: String,
    pub hidden_size: usize,
    /// Length of the returned vectors.
    pub dimensions: usize,
    pub max_seq_length: usize,
    pub vocab_size: usize,
    /// e.g. `mean`, `cls`.
    pub pooling: String,
    pub normalize: bool,
    pub num_params: usize,
    pub weights_bytes: usize,
    pub dtype: DType,
    pub device: String,
    pub prompts: BTreeMap<String, String>,
    pub default_prompt_name: Option<String>,
    pub load_seconds: f64,
}

enum Inner {
    Flex(EmbeddingModel<burn::backend::Flex>),
    #[cfg(feature = "cuda")]
    Cuda(EmbeddingModel<burn::backend::Cuda>),
}

impl Inner {
    fn embed(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
        match self {
            Inner::Flex(m) => m.embed(inputs),
            #[cfg(feature = "cuda")]
            Inner::Cuda(m) => m.embed(inputs),
        }
    }
}

fn load_encoder<B: Backend>(
    cfg: &EncoderConfig,
    store: &WeightStore,
    device: &B::Device,
    dtype: DType,
    on_host: bool,
) -> Result<BertModel<B>, LoadError> {
    let mut encoder = BertModel::load(cfg, store, device, dtype)?;
    if on_host {
        encoder.use_host_path()?;
    }
    Ok(encoder)
}

struct SeqState {
    tokens: Vec<u32>,
    /// Tokens the scheduler has fed so far (chunks are only counted).
    fed: usize,
}

/// Tokens per KV block the engine reports; blocks are bookkeeping only (no KV cache).
const BLOCK_SIZE: usize = 16;

/// A sentence-transformers embedding engine on Flex (CPU) or CUDA.
pub struct EmbeddingEngine {
    inner: Inner,
    spec: EngineSpec,
    info: EmbeddingModelInfo,
    seqs: HashMap<SeqId, SeqState>,
}

impl EmbeddingEngine {
    /// Loads a sentence-transformers folder. Runs on the engine thread.
    pub fn load(dir: &Path, opts: &EmbeddingEngineOptions) -> Result<EmbeddingEngine, LoadError> {
        let t0 = Instant::now();
        let cfg = EncoderConfig::from_dir(dir)?;
        let st = SentenceTransformerConfig::from_dir(dir, &cfg)?;
        let (pooling, normalize) = opts.pooling.unwrap_or((st.pooling, st.normalize));
        let backend = choose_backend(opts.device)?;
        let store = WeightStore::open(dir)?;
        let msl = st.max_seq_length;
        let inner = match backend {
            BackendChoice::Flex => Inner::Flex(EmbeddingModel {
                encoder: load_encoder(&cfg, &store, &burn::backend::flex::FlexDevice, opts.dtype, true)?,
                pooling,
                normalize,
                max_seq_length: msl,
            }),
            #[cfg(feature = "cuda")]
            BackendChoice::Cuda(n) => Inner::Cuda(EmbeddingModel {
                encoder: load_encoder(&cfg, &store, &burn::backend::cuda::CudaDevice::new(n), opts.dtype, false)?,
                pooling,
                normalize,
                max_seq_length: msl,
            }),
            #[cfg(not(feature = "cuda"))]
            BackendChoice::Cuda(n) => {
                return Err(LoadError::Unsupported(format!("cuda:{n} requested but this build has no CUDA backend")))
            }
        };
        let max_running = opts.max_running.max(1);
        // The scheduler admits a sequence when prompt + 1 token fits; embeddings never grow.
        let max_model_len = msl + 1;
        let spec = EngineSpec {
            block_size: BLOCK_SIZE,
            num_blocks: max_running * max_model_len.div_ceil(BLOCK_SIZE),
            max_model_len,
            max_batch_tokens: opts.max_batch_tokens.max(msl),
            max_running,
        };
        let num_params = cfg.num_params();
        let info = EmbeddingModelInfo {
            architecture: match cfg.kind {
                EncoderKind::Bert => "BertModel",
                EncoderKind::XlmRoberta => "XLMRobertaModel",
            }
            .to_string(),
            hidden_size: cfg.hidden_size,
            dimensions: cfg.hidden_size * pooling.num_modes(),
            max_seq_length: msl,
            vocab_size: cfg.vocab_size,
            pooling: pooling.describe(),
            normalize,
            num_params,
            weights_bytes: num_params * dtype_bytes(opts.dtype),
            dtype: opts.dtype,
            device: backend.describe(),
            prompts: st.prompts,
            default_prompt_name: st.default_prompt_name,
            load_seconds: t0.elapsed().as_secs_f64(),
        };
        tracing::info!(
            architecture = %info.architecture,
            device = %info.device,
            dimensions = info.dimensions,
            max_seq_length = msl,
            pooling = %info.pooling,
            normalize,
            seconds = info.load_seconds,
            "embedding model loaded"
        );
        Ok(EmbeddingEngine { inner, spec, info, seqs: HashMap::new() })
    }

    pub fn model_info(&self) -> EmbeddingModelInfo {
        self.info.clone()
    }

    /// Sequences the engine currently holds state for.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Vectors of `inputs` in order, outside the scheduler (tests, `kiln pca fit`). Inputs are
    /// truncated to `max_seq_length`; empty ones and ids outside the vocabulary are errors.
    pub fn embed(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.inner.embed(inputs).map_err(EngineError::Step)
    }
}

fn check_input(tokens: &[u32], vocab: u32) -> Result<(), String> {
    if tokens.is_empty() {
        return Err("empty input".into());
    }
    if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
        return Err(format!("token id {bad} is outside the vocabulary ({vocab} ids)"));
    }
    Ok(())
}

impl Engine for EmbeddingEngine {
    type Request = EmbedRequest;
    type Output = EmbedOutput;

    fn spec(&self) -> EngineSpec {
        self.spec.clone()
    }

    /// Weights as loaded; an encoder keeps no cache between steps (its workspace is the
    /// ledger's estimate).
    fn memory(&self) -> kiln_actors::MemoryBytes {
        kiln_actors::MemoryBytes { weights: self.info.weights_bytes as u64, ..Default::default() }
    }

    fn step(&mut self, plan: StepPlan<EmbedRequest>) -> Result<Vec<SeqOutput<EmbedOutput>>, EngineError> {
        for id in &plan.released {
            self.seqs.remove(id);
        }
        for (id, mut req) in plan.new {
            req.tokens.truncate(self.info.max_seq_length);
            self.seqs.insert(id, SeqState { tokens: req.tokens, fed: 0 });
        }
        // Ready: every token fed. Bad inputs (empty, unknown ids) end alone with an error;
        // they must not fail the whole step.
        let vocab = self.info.vocab_size as u32;
        let mut ready: Vec<SeqId> = Vec::new();
        let mut outputs = Vec::new();
        for s in &plan.seqs {
            let st = self
                .seqs
                .get_mut(&s.id)
                .ok_or_else(|| EngineError::Step(format!("sequence {} scheduled but unknown", s.id)))?;
            if s.start != st.fed {
                return Err(EngineError::Step(format!(
                    "sequence {}: fed from {} but {} tokens were fed before",
                    s.id, s.start, st.fed
                )));
            }
            st.fed += s.len;
            if !s.sample {
                continue;
            }
            if st.fed < st.tokens.len() {
                return Err(EngineError::Step(format!(
                    "sequence {}: output asked after {} of its {} tokens",
                    s.id,
                    st.fed,
                    st.tokens.len()
                )));
            }
            match check_input(&st.tokens, vocab) {
                Ok(()) => ready.push(s.id),
                Err(e) => {
                    tracing::warn!(seq = s.id, error = %e, "embedding input rejected");
                    let output = EmbedOutput { vector: Vec::new(), prompt_tokens: st.tokens.len() };
                    outputs.push(SeqOutput { id: s.id, output, finished: Some(FinishReason::Error) });
                }
            }
        }
        if !ready.is_empty() {
            let inputs: Vec<&[u32]> = ready.iter().map(|id| self.seqs[id].tokens.as_slice()).collect();
            let vectors = self.inner.embed(&inputs).map_err(EngineError::Step)?;
            for (id, vector) in ready.iter().zip(vectors) {
                let prompt_tokens = self.seqs[id].tokens.len();
                outputs.push(SeqOutput {
                    id: *id,
                    output: EmbedOutput { vector, prompt_tokens },
                    finished: Some(FinishReason::Stop),
                });
            }
        }
        for out in &outputs {
            self.seqs.remove(&out.id);
        }
        Ok(outputs)
    }
}
