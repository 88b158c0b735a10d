//! The text-generation engine: owns a Qwen2/Llama model, its paged KV cache and the per-sequence
//! state (tokens, sampler, limits), and runs one batched forward per step.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use burn::tensor::backend::Backend;
use kiln_actors::engine::{Engine, EngineError, EngineSpec, FinishReason, SeqId, SeqOutput, StepPlan};
use kiln_actors::text::{TextRequest, TokenOutput};
use kiln_actors::Sampler;

use crate::backend::{choose_backend, dtype_bytes, BackendChoice};
use crate::config::{parse_eos, read_json, DecoderConfig};
use crate::qwen2::{DecoderModel, ForwardSeq, KvCache, KvWriteMode};
use crate::weights::WeightStore;
use crate::{DType, DeviceSpec, LoadError};

/// How to build a text engine.
#[derive(Debug, Clone)]
pub struct TextEngineOptions {
    pub device: DeviceSpec,
    pub dtype: DType,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Total tokens the KV pool holds (rounded up to whole blocks).
    pub kv_cache_tokens: usize,
    /// Token budget of one step.
    pub max_batch_tokens: usize,
    /// Most sequences in one step.
    pub max_running: usize,
    /// Caps the model's own `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// Keeps the checkpoint in host RAM so a reload after an unload skips the disk.
    pub host_cache: Option<std::sync::Arc<crate::weights::HostWeightCache>>,
}

/// Facts about a loaded text model (for logs, `/v1/models`, the memory ledger).
#[derive(Debug, Clone, PartialEq)]
pub struct TextModelInfo {
    /// HF architecture name, e.g. `Qwen2ForCausalLM`.
    pub architecture: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub num_params: usize,
    /// Bytes of weights on the device.
    pub weights_bytes: usize,
    pub dtype: DType,
    /// e.g. `cpu (flex)` or `cuda:0`.
    pub device: String,
    /// K and V bytes of one token over all layers.
    pub kv_bytes_per_token: usize,
    /// Bytes of the allocated KV pool.
    pub kv_cache_bytes: usize,
    pub max_position_embeddings: usize,
    pub eos_token_ids: Vec<u32>,
    /// Seconds spent loading.
    pub load_seconds: f64,
}

struct SeqState {
    /// Prompt followed by every generated token.
    tokens: Vec<u32>,
    prompt_len: usize,
    sampler: Sampler,
    max_new_tokens: usize,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
}

struct Runner<B: Backend> {
    model: DecoderModel<B>,
    cache: KvCache<B>,
}

impl<B: Backend> Runner<B> {
    fn load(
        cfg: &DecoderConfig,
        store: &WeightStore,
        device: B::Device,
        opts: &TextEngineOptions,
        num_blocks: usize,
        mode: KvWriteMode,
        host_kv_writer: Option<crate::qwen2::HostKvWriter<B>>,
    ) -> Result<Self, LoadError> {
        let mut model = DecoderModel::<B>::load(cfg, store, &device, opts.dtype, mode)?;
        model.host_kv_writer = host_kv_writer;
        let cache = KvCache::new(cfg, opts.block_size, num_blocks, &device, opts.dtype);
        Ok(Runner { model, cache })
    }

    fn forward(&mut self, seqs: &[ForwardSeq<'_>]) -> Result<Vec<Vec<f32>>, String> {
        self.model.forward(seqs, &mut self.cache)
    }
}

enum Inner {
    Flex(Runner<burn::backend::Flex>),
    #[cfg(feature = "cuda")]
    Cuda(Runner<burn::backend::Cuda>, usize),
}

/// Bytes the CUDA memory pools of device `n` hold (what they reserved, which they keep after
/// a step: the growth over a warm-up step is its workspace). `None` if unavailable.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_reserved_bytes(n: usize) -> Option<u64> {
    use cubecl::Runtime;
    std::panic::catch_unwind(|| {
        let client = cubecl::cuda::CudaRuntime::client(&cubecl::cuda::CudaDevice::new(n));
        client.memory_usage().ok().map(|u| u.bytes_reserved)
    })
    .ok()
    .flatten()
}

impl Inner {
    fn forward(&mut self, seqs: &[ForwardSeq<'_>]) -> Result<Vec<Vec<f32>>, String> {
        match self {
            Inner::Flex(r) => r.forward(seqs),
            #[cfg(feature = "cuda")]
            Inner::Cuda(r, _) => r.forward(seqs),
        }
    }
}

/// A Qwen2 / Llama text generation engine on Flex (CPU) or CUDA.
pub struct TextEngine {
    inner: Inner,
    spec: EngineSpec,
    info: TextModelInfo,
    eos: Vec<u32>,
    seqs: HashMap<SeqId, SeqState>,
    /// Peak host-memory growth seen by `warmup` on the CPU (0: not measured).
    activation_peak: u64,
}

/// eos ids: `generation_config.json` `eos_token_id` (int or list), else config.json's.
fn read_eos(dir: &Path, cfg: &DecoderConfig) -> Vec<u32> {
    let path = dir.join("generation_config.json");
    if path.is_file() {
        if let Ok(v) = read_json(&path) {
            if let Some(ids) = parse_eos(&v["eos_token_id"]) {
                if !ids.is_empty() {
                    return ids;
                }
            }
        }
    }
    cfg.eos_token_ids.clone()
}

/// Hands the heap freed by weight conversion back to the OS: without it glibc keeps the
/// load's temporary buffers resident (about one embedding matrix for a 0.5B model).
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl TextEngine {
    /// Loads a HF Qwen2/Llama folder. Runs on the engine thread.
    pub fn load(dir: &Path, opts: &TextEngineOptions) -> Result<TextEngine, LoadError> {
        let t0 = Instant::now();
        if opts.block_size == 0 {
            return Err(LoadError::Unsupported("block_size must be > 0".into()));
        }
        let cfg = DecoderConfig::from_dir(dir)?;
        let backend = choose_backend(opts.device)?;
        let store = WeightStore::open_cached(dir, opts.host_cache.as_deref())?;
        let num_blocks = opts.kv_cache_tokens.div_ceil(opts.block_size).max(1);
        let inner = match backend {
            BackendChoice::Flex => Inner::Flex(Runner::load(
                &cfg,
                &store,
                burn::backend::flex::FlexDevice,
                opts,
                num_blocks,
                KvWriteMode::SliceRuns,
                Some(crate::flex_kv::write_runs),
            )?),
            #[cfg(feature = "cuda")]
            BackendChoice::Cuda(n) => Inner::Cuda(
                Runner::load(
                    &cfg,
                    &store,
                    burn::backend::cuda::CudaDevice::new(n),
                    opts,
                    num_blocks,
                    KvWriteMode::ScatterNd,
                    None,
                )?,
                n,
            ),
            #[cfg(not(feature = "cuda"))]
            BackendChoice::Cuda(n) => {
                return Err(LoadError::Unsupported(format!("cuda:{n} requested but this build has no CUDA backend")))
            }
        };
        drop(store);
        release_freed_heap();
        let eos = read_eos(dir, &cfg);
        let max_model_len = match opts.max_model_len {
            Some(m) => m.min(cfg.max_position_embeddings),
            None => cfg.max_position_embeddings,
        };
        let spec = EngineSpec {
            block_size: opts.block_size,
            num_blocks,
            max_model_len,
            max_batch_tokens: opts.max_batch_tokens,
            max_running: opts.max_running,
        };
        let eb = dtype_bytes(opts.dtype);
        let kv_bytes_per_token = cfg.kv_elements_per_token() * eb;
        let num_params = cfg.num_params();
        let info = TextModelInfo {
            architecture: cfg.architecture.hf_name().to_string(),
            num_layers: cfg.num_hidden_layers,
            hidden_size: cfg.hidden_size,
            vocab_size: cfg.vocab_size,
            num_params,
            weights_bytes: num_params * eb,
            dtype: opts.dtype,
            device: backend.describe(),
            kv_bytes_per_token,
            kv_cache_bytes: kv_bytes_per_token * num_blocks * opts.block_size,
            max_position_embeddings: cfg.max_position_embeddings,
            eos_token_ids: eos.clone(),
            load_seconds: t0.elapsed().as_secs_f64(),
        };
        tracing::info!(
            architecture = %info.architecture,
            device = %info.device,
            params = info.num_params,
            kv_blocks = num_blocks,
            seconds = info.load_seconds,
            "text model loaded"
        );
        Ok(TextEngine { inner, spec, info, eos, seqs: HashMap::new(), activation_peak: 0 })
    }

    pub fn model_info(&self) -> TextModelInfo {
        self.info.clone()
    }

    /// The model's eos ids (generation_config.json, else config.json).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Sequences the engine currently holds state for.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Tokens (prompt + generated) the engine knows for a sequence.
    pub fn sequence_tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.tokens.as_slice())
    }

    /// Low-level: one batched forward over explicit token chunks, writing their K/V into the
    /// engine's cache at the given block tables, returning the last-token logits (f32) of each
    /// entry with `logits == true`. Bypasses per-sequence state and sampling (tests, benchmarks);
    /// do not mix with live sequences whose blocks it would overwrite.
    pub fn forward_raw(&mut self, seqs: &[ForwardSeq<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.inner.forward(seqs).map_err(EngineError::Step)
    }

    /// Low-level: the last-position logits of `prompt` (one chunk, blocks 0..n of the cache).
    pub fn prompt_logits(&mut self, prompt: &[u32]) -> Result<Vec<f32>, EngineError> {
        let blocks: Vec<u32> = (0..prompt.len().div_ceil(self.spec.block_size) as u32).collect();
        if blocks.len() > self.spec.num_blocks {
            return Err(EngineError::Step("prompt does not fit the KV pool".into()));
        }
        let seq = ForwardSeq { tokens: prompt, start: 0, block_table: &blocks, logits: true };
        let mut out = self.forward_raw(&[seq])?;
        out.pop().ok_or_else(|| EngineError::Step("no logits".into()))
    }

    /// Runs the two largest steps the config allows — one prefill chunk of the whole token
    /// budget, and a decode of `max_running` sequences at the end of the context — without
    /// touching live sequences (call before serving). On the CPU it measures the peak memory
    /// growth, which `Engine::memory` reports as the activation workspace.
    pub fn warmup_steps(&mut self) -> Result<(), EngineError> {
        let (bs, nb) = (self.spec.block_size, self.spec.num_blocks);
        let cap = (nb * bs).min(self.spec.max_model_len);
        let probe = match self.inner {
            Inner::Flex(_) => crate::memory::PeakProbe::start(),
            #[cfg(feature = "cuda")]
            Inner::Cuda(..) => None,
        };
        #[cfg(feature = "cuda")]
        let cuda_before = match self.inner {
            Inner::Cuda(_, n) => cuda_reserved_bytes(n).map(|b| (n, b)),
            _ => None,
        };
        let t = self.spec.max_batch_tokens.min(cap).max(1);
        let tokens = vec![0u32; t];
        let blocks: Vec<u32> = (0..t.div_ceil(bs) as u32).collect();
        self.forward_raw(&[ForwardSeq { tokens: &tokens, start: 0, block_table: &blocks, logits: true }])?;
        // Every decode row attends over the longest context; they share one block table
        // (the writes all land in one slot of scratch blocks).
        let rows = self.spec.max_running.min(self.spec.max_batch_tokens).max(1);
        let table: Vec<u32> = (0..cap.div_ceil(bs) as u32).collect();
        let one = [0u32];
        let decode: Vec<ForwardSeq<'_>> =
            (0..rows).map(|_| ForwardSeq { tokens: &one, start: cap - 1, block_table: &table, logits: true }).collect();
        self.forward_raw(&decode)?;
        if let Some(p) = probe {
            self.activation_peak = p.finish();
        }
        #[cfg(feature = "cuda")]
        if let Some((n, before)) = cuda_before {
            if let Some(after) = cuda_reserved_bytes(n) {
                self.activation_peak = after.saturating_sub(before);
            }
        }
        Ok(())
    }

    fn finish_reason(&self, st: &SeqState, token: u32) -> Option<FinishReason> {
        if (!st.ignore_eos && self.eos.contains(&token)) || st.stop_token_ids.contains(&token) {
            return Some(FinishReason::Stop);
        }
        let generated = st.tokens.len() - st.prompt_len;
        if generated >= st.max_new_tokens || st.tokens.len() >= self.spec.max_model_len {
            return Some(FinishReason::Length);
        }
        None
    }
}

impl Engine for TextEngine {
    type Request = TextRequest;
    type Output = TokenOutput;

    fn spec(&self) -> EngineSpec {
        self.spec.clone()
    }

    fn warmup(&mut self) -> Result<(), EngineError> {
        self.warmup_steps()
    }

    fn memory(&self) -> kiln_actors::MemoryBytes {
        kiln_actors::MemoryBytes {
            weights: self.info.weights_bytes as u64,
            kv: self.info.kv_cache_bytes as u64,
            activations: self.activation_peak,
        }
    }

    fn step(&mut self, plan: StepPlan<TextRequest>) -> Result<Vec<SeqOutput<TokenOutput>>, EngineError> {
        for id in &plan.released {
            self.seqs.remove(id);
        }
        for (id, req) in plan.new {
            let sampler = Sampler::new(&req.params, &req.prompt, req.logprobs);
            self.seqs.insert(
                id,
                SeqState {
                    prompt_len: req.prompt.len(),
                    tokens: req.prompt,
                    sampler,
                    max_new_tokens: req.max_new_tokens,
                    stop_token_ids: req.stop_token_ids,
                    ignore_eos: req.ignore_eos,
                },
            );
        }
        if plan.seqs.is_empty() {
            return Ok(Vec::new());
        }
        let logits = {
            let mut fwd = Vec::with_capacity(plan.seqs.len());
            for s in &plan.seqs {
                let st = self
                    .seqs
                    .get(&s.id)
                    .ok_or_else(|| EngineError::Step(format!("sequence {} scheduled but unknown", s.id)))?;
                let end = s.start + s.len;
                if s.len == 0 || end > st.tokens.len() {
                    return Err(EngineError::Step(format!(
                        "sequence {}: feeding {}..{end} but it has {} tokens",
                        s.id,
                        s.start,
                        st.tokens.len()
                    )));
                }
                if s.sample && end != st.tokens.len() {
                    return Err(EngineError::Step(format!(
                        "sequence {}: sampling after {end} tokens but it has {}",
                        s.id,
                        st.tokens.len()
                    )));
                }
                fwd.push(ForwardSeq {
                    tokens: &st.tokens[s.start..end],
                    start: s.start,
                    block_table: &s.block_table,
                    logits: s.sample,
                });
            }
            self.inner.forward(&fwd).map_err(EngineError::Step)?
        };
        let mut outputs = Vec::with_capacity(logits.len());
        let sampled = plan.seqs.iter().filter(|s| s.sample);
        for (s, mut row) in sampled.zip(logits) {
            let st = self.seqs.get_mut(&s.id).expect("checked above");
            let output = st.sampler.sample(&mut row);
            st.tokens.push(output.token);
            let st = &self.seqs[&s.id];
            let finished = self.finish_reason(st, output.token);
            outputs.push(SeqOutput { id: s.id, output, finished });
        }
        Ok(outputs)
    }
}
