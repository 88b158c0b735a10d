//! Memory estimates for a model folder, computed from its files without loading weights:
//! what `kiln plan` prints and what the per-device memory ledger reserves per model.
//!
//! - **Weights**: the element count of every tensor in the safetensors headers (one
//!   `model.safetensors`, or the shards named by `model.safetensors.index.json`; only the
//!   8-byte length and the JSON header of each file are read), times the bytes of the
//!   *configured* dtype (weights are converted to it at load). The parameter count implied by
//!   `config.json` is kept alongside as a cross-check; when no safetensors file is present the
//!   config count is used instead.
//! - **KV cache** (text models): `2 (K and V) × layers × kv_heads × head_dim × dtype bytes` per token.
//! - **Activation reserve**: see [`activation_bytes`].

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::backend::dtype_bytes;
use crate::bert::EncoderConfig;
use crate::config::DecoderConfig;
use crate::{detect_family, DType, Family, LoadError};

/// Largest safetensors JSON header accepted (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// What the safetensors headers of one checkpoint say.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CheckpointSummary {
    pub files: Vec<PathBuf>,
    pub tensors: usize,
    /// Sum over tensors of the product of their shape.
    pub elements: u64,
    /// Bytes of tensor data on disk (at the file's own dtypes).
    pub data_bytes: u64,
}

/// One tensor entry of a safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    /// End of its data in the file's data section (`data_offsets[1]`).
    pub data_end: u64,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> LoadError {
    LoadError::Io { path: path.display().to_string(), message: e.to_string() }
}

fn parse_err(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Parse { path: path.display().to_string(), what: "safetensors header", message: message.into() }
}

/// Reads only the header of a safetensors file: 8 bytes little-endian length, then that many
/// bytes of JSON (`{"name": {"dtype", "shape", "data_offsets"}, "__metadata__": {..}}`).
pub fn read_safetensors_header(path: &Path) -> Result<Vec<HeaderTensor>, LoadError> {
    let mut file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| io_err(path, format!("reading the header length: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        return Err(parse_err(path, format!("header length {len} is larger than {MAX_HEADER_BYTES}")));
    }
    let mut json = vec![0u8; len as usize];
    file.read_exact(&mut json).map_err(|e| io_err(path, format!("reading the {len}-byte header: {e}")))?;
    let v: serde_json::Value = serde_json::from_slice(&json).map_err(|e| parse_err(path, e.to_string()))?;
    let map = v.as_object().ok_or_else(|| parse_err(path, "header is not a JSON object"))?;
    let mut out = Vec::with_capacity(map.len());
    for (name, t) in map {
        if name == "__metadata__" {
            continue;
        }
        let dtype = t["dtype"].as_str().ok_or_else(|| parse_err(path, format!("{name}: missing dtype")))?;
        let shape = t["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect::<Option<Vec<u64>>>())
            .ok_or_else(|| parse_err(path, format!("{name}: missing or invalid shape")))?;
        let data_end = t["data_offsets"][1].as_u64().unwrap_or(0);
        out.push(HeaderTensor { name: name.clone(), dtype: dtype.to_string(), shape, data_end });
    }
    Ok(out)
}

/// The safetensors files of a checkpoint folder: the shards of `model.safetensors.index.json`
/// (sorted, deduplicated) or `model.safetensors`; empty when there are none.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    checkpoint_files_named(dir, "model")
}

/// Like [`checkpoint_files`] for another file stem (diffusers components use
/// `diffusion_pytorch_model`): `{stem}.safetensors.index.json`'s shards or `{stem}.safetensors`.
pub fn checkpoint_files_named(dir: &Path, stem: &str) -> Result<Vec<PathBuf>, LoadError> {
    let index_path = dir.join(format!("{stem}.safetensors.index.json"));
    if index_path.is_file() {
        let v = crate::config::read_json(&index_path)?;
        let map = v["weight_map"].as_object().ok_or_else(|| LoadError::Parse {
            path: index_path.display().to_string(),
            what: "safetensors index",
            message: "missing weight_map".into(),
        })?;
        let mut names: Vec<&str> = map.values().filter_map(|x| x.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        return Ok(names.into_iter().map(|n| dir.join(n)).collect());
    }
    let single = dir.join(format!("{stem}.safetensors"));
    Ok(if single.is_file() { vec![single] } else { Vec::new() })
}

/// Sums the headers of a checkpoint's safetensors files; `None` when the folder has none.
pub fn checkpoint_summary(dir: &Path) -> Result<Option<CheckpointSummary>, LoadError> {
    let files = checkpoint_files(dir)?;
    if files.is_empty() {
        return Ok(None);
    }
    let (mut tensors, mut elements, mut data_bytes) = (0, 0u64, 0u64);
    for f in &files {
        let header = read_safetensors_header(f)?;
        tensors += header.len();
        elements += header.iter().map(|t| t.shape.iter().product::<u64>()).sum::<u64>();
        data_bytes += header.iter().map(|t| t.data_end).max().unwrap_or(0);
    }
    Ok(Some(CheckpointSummary { files, tensors, elements, data_bytes }))
}

/// The architecture facts a memory estimate needs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Shape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Zero for encoders (no KV cache).
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Longest sequence the position table allows.
    pub max_positions: usize,
}

impl Shape {
    /// The shape of a decoder (a causal LM, or Qwen3-TTS's talker).
    pub fn of_decoder(c: &DecoderConfig) -> Shape {
        Shape {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
            max_positions: c.max_position_embeddings,
        }
    }
}

/// Per-model memory figures, independent of the card.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelMemory {
    /// "text-generation", "embedding", "image-generation" or "speech".
    pub family: &'static str,
    pub dtype: DType,
    pub shape: Shape,
    /// Parameters implied by `config.json`.
    pub config_params: u64,
    /// Elements in the safetensors headers (None without safetensors files).
    pub checkpoint: Option<CheckpointSummary>,
    /// The count the weights figure uses: the headers' when present, else the config's.
    pub params: u64,
    /// `params × dtype bytes`.
    pub weights_bytes: u64,
    /// KV cache bytes per token (0 for embedding models).
    pub kv_bytes_per_token: u64,
    /// Remarks, e.g. a header/config mismatch.
    pub notes: Vec<String>,
}

impl ModelMemory {
    pub fn is_text(&self) -> bool {
        self.kv_bytes_per_token > 0
    }
}

/// Estimates a model folder's memory at `dtype` from `config.json` and the safetensors headers.
pub fn estimate(dir: &Path, dtype: DType) -> Result<ModelMemory, LoadError> {
    let eb = dtype_bytes(dtype) as u64;
    let (family, shape, config_params, kv_bytes_per_token) = match detect_family(dir)? {
        Family::TextGeneration => {
            let c = DecoderConfig::from_dir(dir)?;
            ("text-generation", Shape::of_decoder(&c), c.num_params() as u64, c.kv_elements_per_token() as u64 * eb)
        }
        Family::Embedding => {
            let c = EncoderConfig::from_dir(dir)?;
            let shape = Shape {
                hidden_size: c.hidden_size,
                intermediate_size: c.intermediate_size,
                num_layers: c.num_hidden_layers,
                num_heads: c.num_attention_heads,
                num_kv_heads: 0,
                head_dim: c.hidden_size / c.num_attention_heads,
                vocab_size: c.vocab_size,
                max_positions: c.max_input_len(),
            };
            ("embedding", shape, c.num_params() as u64, 0)
        }
        Family::Speech => {
            // Talker + code predictor (model.safetensors) and the codec decoder (the
            // `decoder.*` tensors of speech_tokenizer/; its encoder is not loaded).
            let spec = crate::tts::TalkerSpec::from_dir(dir)?;
            let shape = Shape::of_decoder(&spec.talker);
            let talker = checkpoint_summary(dir)?;
            let decoder_path = dir.join("speech_tokenizer").join("model.safetensors");
            let decoder: u64 = read_safetensors_header(&decoder_path)?
                .iter()
                .filter(|t| t.name.starts_with("decoder."))
                .map(|t| t.shape.iter().product::<u64>())
                .sum();
            let config_params = spec.num_params() as u64 + decoder;
            let params = talker.as_ref().map_or(spec.num_params() as u64, |ck| ck.elements) + decoder;
            return Ok(ModelMemory {
                family: "speech",
                dtype,
                shape,
                config_params,
                checkpoint: talker,
                params,
                weights_bytes: params * eb,
                kv_bytes_per_token: spec.talker.kv_elements_per_token() as u64 * eb,
                notes: vec!["weights: talker + code predictor, and the speech tokenizer's decoder".into()],
            });
        }
        Family::Diffusion => {
            // Weights of the text encoder, UNet and VAE; the workspace depends on the image
            // size and batch (`DiffusionInfo::activation_bytes`), which the caller knows.
            let info = crate::diffusion::DiffusionInfo::from_dir(dir)?;
            let shape = Shape {
                hidden_size: info.text_hidden,
                intermediate_size: 0,
                num_layers: 0,
                num_heads: 0,
                num_kv_heads: 0,
                head_dim: 0,
                vocab_size: 0,
                max_positions: info.text_length,
            };
            return Ok(ModelMemory {
                family: "image-generation",
                dtype,
                shape,
                config_params: info.num_params,
                checkpoint: None,
                params: info.num_params,
                weights_bytes: info.weights_bytes(dtype),
                kv_bytes_per_token: 0,
                notes: vec!["weights: text_encoder + unet + vae safetensors headers".into()],
            });
        }
    };
    let checkpoint = checkpoint_summary(dir)?;
    let mut notes = Vec::new();
    let params = match &checkpoint {
        Some(ck) => {
            let diff = ck.elements.abs_diff(config_params) as f64 / config_params.max(1) as f64;
            if diff > 0.02 {
                notes.push(format!(
                    "safetensors headers hold {} parameters, config.json implies {} ({:+.1}%); using the headers",
                    ck.elements,
                    config_params,
                    (ck.elements as f64 / config_params.max(1) as f64 - 1.0) * 100.0
                ));
            }
            ck.elements
        }
        None => {
            notes.push("no safetensors files: weights counted from config.json".to_string());
            config_params
        }
    };
    Ok(ModelMemory {
        family,
        dtype,
        shape,
        config_params,
        checkpoint,
        params,
        weights_bytes: params * eb,
        kv_bytes_per_token,
        notes,
    })
}

/// Activation reserve of one step, in bytes: every transient tensor of the largest step the
/// config allows, counted at 4 bytes per element (f32; conservative for f16/bf16 models).
/// With `T = max_batch_tokens`, `R = min(max_running, T)` sequences in a step (rows that need
/// logits), `C` = the context each sequence may reach, `h` hidden, `i` intermediate,
/// `q = heads × head_dim`, `kv = kv_heads × head_dim`, `V` vocab:
///
/// ```text
/// reserve = 4 × ( T × (2h + q + 2kv + 3i)      hidden + norm, fused qkv, gate/up + silu·up (one layer live)
///               + 2 × heads × T × C            attention scores and softmax probabilities (scores are materialized)
///               + 2 × R × C × kv               K and V gathered from the paged cache
///               + R × V )                      logits of the last token of each sequence
/// ```
///
/// For encoders (no cache) `C` is the longest input, the gathered-KV term is dropped and
/// the logits term is `R × h` (pooled vectors).
pub fn activation_bytes(m: &ModelMemory, max_batch_tokens: usize, max_running: usize, context: usize) -> u64 {
    let s = &m.shape;
    let t = max_batch_tokens as u64;
    let r = max_running.min(max_batch_tokens) as u64;
    let c = context as u64;
    let (h, i) = (s.hidden_size as u64, s.intermediate_size as u64);
    let q = (s.num_heads * s.head_dim) as u64;
    let kv = (s.num_kv_heads * s.head_dim) as u64;
    let per_token = t * (2 * h + q + 2 * kv + 3 * i);
    let scores = 2 * s.num_heads as u64 * t * c;
    let (gathered, rows) = if m.is_text() { (2 * r * c * kv, r * s.vocab_size as u64) } else { (0, r * h) };
    4 * (per_token + scores + gathered + rows)
}

/// Process memory from `/proc/self/status` (Linux): `(VmRSS, VmHWM)` in bytes.
fn proc_rss() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Measures the peak growth of host memory over a span of work (CPU activations): resets the
/// kernel's high-water mark (`/proc/self/clear_refs`), then reads it back in `finish`. The
/// figure is process-wide, so other threads allocating meanwhile inflate it (conservative).
pub struct PeakProbe {
    base: u64,
}

impl PeakProbe {
    /// `None` where the platform cannot reset and read the high-water mark.
    pub fn start() -> Option<PeakProbe> {
        std::fs::write("/proc/self/clear_refs", "5").ok()?;
        let (rss, _) = proc_rss()?;
        Some(PeakProbe { base: rss })
    }

    /// Bytes the peak rose above the resident size at `start`.
    pub fn finish(self) -> u64 {
        proc_rss().map(|(_, hwm)| hwm.saturating_sub(self.base)).unwrap_or(0)
    }
}

/// Total memory of the host (`MemTotal` of `/proc/meminfo`), if known.
pub fn host_total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line["MemTotal:".len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod probe_tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn peak_probe_sees_a_transient_allocation() {
        let probe = PeakProbe::start().expect("Linux can reset and read the RSS high-water mark");
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        drop(v);
        let grew = probe.finish();
        assert!(grew >= 60 << 20, "a 64 MiB touched buffer raised the peak by only {grew} bytes");
        assert!(host_total_memory().unwrap() > 1 << 30);
    }
}
