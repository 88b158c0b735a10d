//! CLIP text encoder (HF `CLIPTextModel`, the `text_encoder/` of a diffusers Stable Diffusion
//! folder) in Burn, and the CLIP BPE tokenizer of its `tokenizer/` folder.
//!
//! The encoder: token + position embeddings, pre-LN transformer layers with a causal mask,
//! `quick_gelu` (OpenAI CLIP, SD 1.x) or `gelu` (OpenCLIP-H, SD 2.x) per `hidden_act`, then the
//! final layer norm. [`ClipOutput`] picks which hidden state comes out: the last (SD 1.5, and
//! SD 2.1, whose shipped config already drops OpenCLIP's last layer), an earlier one through
//! the final layer norm (diffusers' `clip_skip`), or the raw penultimate one (SDXL).
//! Inputs are CLIP-padded to 77 tokens and no attention mask is used, as diffusers' SD
//! pipelines call it: the causal mask already keeps padding from affecting earlier tokens.
//!
//! The tokenizer: the `tokenizers` BPE model built from `vocab.json` + `merges.txt` the way
//! transformers' `CLIPTokenizer` builds it (NFC, whitespace runs to one space, lowercase; CLIP's
//! split regex then byte-level; `</w>` word suffix; `<|startoftext|>` ... `<|endoftext|>`),
//! truncated and padded to `model_max_length` with the pad token `tokenizer_config.json` names.

use std::path::Path;

use burn::tensor::activation::{gelu, gelu_approximate, sigmoid, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{DType as BurnDType, Int, Tensor, TensorData};
use serde_json::{json, Value};

use crate::bert::LayerNorm;
use crate::qwen2::Linear;
use crate::weights::WeightStore;
use crate::{DType, LoadError};

/// The MLP activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `quick_gelu`: `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// `gelu`: exact, with erf (OpenCLIP).
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
}

/// The fields of a `CLIPTextConfig` the encoder needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub activation: ClipActivation,
}

fn parse_err(path: &Path, what: &'static str, message: impl Into<String>) -> LoadError {
    LoadError::Parse { path: path.display().to_string(), what, message: message.into() }
}

impl ClipTextConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("config.json");
        let v = crate::config::read_json(&path)?;
        Self::from_value(&v).map_err(|m| parse_err(&path, "CLIP text config", m))
    }

    /// A `CLIPTextConfig` (`model_type` `clip_text_model`), or a full `CLIPConfig`'s `text_config`.
    pub fn from_value(v: &Value) -> Result<Self, String> {
        let v = match v["model_type"].as_str() {
            Some("clip") if v["text_config"].is_object() => &v["text_config"],
            Some("clip_text_model") | None => v,
            Some(other) => return Err(format!("model_type {other:?} is not a CLIP text encoder")),
        };
        let usize_field = |k: &str, default: Option<usize>| -> Result<usize, String> {
            match v[k].as_u64() {
                Some(x) => Ok(x as usize),
                None if v[k].is_null() => default.ok_or_else(|| format!("missing {k}")),
                None => Err(format!("invalid {k}: {}", v[k])),
            }
        };
        let activation = match v["hidden_act"].as_str().unwrap_or("quick_gelu") {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => ClipActivation::GeluTanh,
            other => return Err(format!("hidden_act {other:?} is not supported (quick_gelu, gelu, gelu_new)")),
        };
        let cfg = ClipTextConfig {
            vocab_size: usize_field("vocab_size", Some(49408))?,
            hidden_size: usize_field("hidden_size", Some(512))?,
            intermediate_size: usize_field("intermediate_size", Some(2048))?,
            num_hidden_layers: usize_field("num_hidden_layers", Some(12))?,
            num_attention_heads: usize_field("num_attention_heads", Some(8))?,
            max_position_embeddings: usize_field("max_position_embeddings", Some(77))?,
            layer_norm_eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-5),
            activation,
        };
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            ));
        }
        if cfg.num_hidden_layers == 0 {
            return Err("num_hidden_layers is 0".into());
        }
        Ok(cfg)
    }

    pub fn num_params(&self) -> usize {
        let (h, f) = (self.hidden_size, self.intermediate_size);
        let layer = 4 * (h * h + h) + 2 * h * f + f + h + 4 * h;
        (self.vocab_size + self.max_position_embeddings) * h + self.num_hidden_layers * layer + 2 * h
    }
}

/// Which hidden state the encoder returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClipOutput {
    /// Layers skipped from the end: 0 is the last layer's output (`hidden_states[-1]`), 1 the
    /// penultimate (`hidden_states[-2]`).
    pub clip_skip: usize,
    /// Apply the final layer norm (always on the last layer: `last_hidden_state`).
    pub final_layer_norm: bool,
}

impl ClipOutput {
    /// `last_hidden_state` (SD 1.x, SD 2.x).
    pub const LAST: ClipOutput = ClipOutput { clip_skip: 0, final_layer_norm: true };
    /// The raw penultimate hidden state (SDXL).
    pub const PENULTIMATE_RAW: ClipOutput = ClipOutput { clip_skip: 1, final_layer_norm: false };

    /// diffusers' `clip_skip = n`: `final_layer_norm(hidden_states[-(n + 1)])`.
    pub fn clip_skip(n: usize) -> ClipOutput {
        ClipOutput { clip_skip: n, final_layer_norm: true }
    }
}

pub struct ClipEncoderLayer<B: Backend> {
    pub norm1: LayerNorm<B>,
    /// q, k and v fused: `[hidden, 3 * hidden]`.
    pub qkv: Linear<B>,
    pub out_proj: Linear<B>,
    pub norm2: LayerNorm<B>,
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

/// A CLIP text transformer (no projection head).
pub struct ClipTextModel<B: Backend> {
    pub cfg: ClipTextConfig,
    pub dtype: DType,
    pub device: B::Device,
    pub token_embedding: Tensor<B, 2>,
    pub position_embedding: Tensor<B, 2>,
    pub layers: Vec<ClipEncoderLayer<B>>,
    pub final_layer_norm: LayerNorm<B>,
}

/// `text_model.` for checkpoints saved by transformers 4 (every SD repo on the Hub), nothing
/// for transformers 5.
fn weight_prefix(store: &WeightStore) -> Result<&'static str, LoadError> {
    for p in ["text_model.", ""] {
        if store.contains(&format!("{p}embeddings.token_embedding.weight")) {
            return Ok(p);
        }
    }
    Err(LoadError::Weight {
        name: "text_model.embeddings.token_embedding.weight".into(),
        message: "missing from checkpoint (also tried without the text_model. prefix)".into(),
    })
}

impl<B: Backend> ClipTextModel<B> {
    /// Loads `dir/config.json` and `dir/model.safetensors` (a diffusers `text_encoder/`).
    pub fn from_dir(dir: &Path, device: &B::Device, dtype: DType) -> Result<Self, LoadError> {
        let cfg = ClipTextConfig::from_dir(dir)?;
        let store = WeightStore::open(dir)?;
        Self::load(&cfg, &store, device, dtype)
    }

    pub fn load(
        cfg: &ClipTextConfig,
        store: &WeightStore,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, LoadError> {
        let pre = weight_prefix(store)?;
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let lin = |name: &str, out: usize, inp: usize| {
            Linear::<B>::load_biased(store, &format!("{pre}{name}"), out, inp, device, dtype)
        };
        let norm =
            |name: &str| LayerNorm::<B>::load(store, &format!("{pre}{name}"), h, cfg.layer_norm_eps, device, dtype);
        let token_embedding = store.load::<B, 2>(
            &format!("{pre}embeddings.token_embedding.weight"),
            [cfg.vocab_size, h],
            false,
            device,
            dtype,
        )?;
        let position_embedding = store.load::<B, 2>(
            &format!("{pre}embeddings.position_embedding.weight"),
            [cfg.max_position_embeddings, h],
            false,
            device,
            dtype,
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layers.{i}");
            let q = lin(&format!("{p}.self_attn.q_proj"), h, h)?;
            let k = lin(&format!("{p}.self_attn.k_proj"), h, h)?;
            let v = lin(&format!("{p}.self_attn.v_proj"), h, h)?;
            let bias = |l: &Linear<B>| l.b.clone().expect("loaded with a bias");
            let qkv = Linear {
                b: Some(Tensor::cat(vec![bias(&q), bias(&k), bias(&v)], 0)),
                w: Tensor::cat(vec![q.w, k.w, v.w], 1),
            };
            layers.push(ClipEncoderLayer {
                norm1: norm(&format!("{p}.layer_norm1"))?,
                qkv,
                out_proj: lin(&format!("{p}.self_attn.out_proj"), h, h)?,
                norm2: norm(&format!("{p}.layer_norm2"))?,
                fc1: lin(&format!("{p}.mlp.fc1"), f, h)?,
                fc2: lin(&format!("{p}.mlp.fc2"), h, f)?,
            });
        }
        Ok(ClipTextModel {
            cfg: cfg.clone(),
            dtype,
            device: device.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm: norm("final_layer_norm")?,
        })
    }

    /// Encodes `[B, L]` token ids (every row the same length, at most
    /// `max_position_embeddings`: CLIP-padded prompts) into `[B, L, hidden]` hidden states in
    /// the model's dtype.
    pub fn encode(&self, inputs: &[&[u32]], output: ClipOutput) -> Result<Tensor<B, 3>, String> {
        let b = inputs.len();
        let l = inputs.first().map_or(0, |t| t.len());
        if b == 0 || l == 0 {
            return Err("no tokens to encode".into());
        }
        if inputs.iter().any(|t| t.len() != l) {
            return Err("every input must have the same length (pad prompts to the tokenizer's max length)".into());
        }
        if l > self.cfg.max_position_embeddings {
            return Err(format!(
                "input of {l} tokens exceeds the model's {} positions",
                self.cfg.max_position_embeddings
            ));
        }
        if output.clip_skip >= self.cfg.num_hidden_layers {
            return Err(format!("clip_skip {} leaves no layer of {}", output.clip_skip, self.cfg.num_hidden_layers));
        }
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = inputs.iter().flat_map(|t| t.iter()).find(|&&t| t >= vocab) {
            return Err(format!("token id {bad} is outside the vocabulary ({vocab} ids)"));
        }
        let dev = &self.device;
        let (h, heads) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let hd = h / heads;
        let ids: Vec<i32> = inputs.iter().flat_map(|t| t.iter().map(|&x| x as i32)).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [b * l]), dev);
        let tokens = self.token_embedding.clone().select(0, ids).reshape([b, l, h]);
        let positions = self.position_embedding.clone().narrow(0, 0, l).reshape([1, l, h]);
        let mut x = (tokens + positions).reshape([b * l, h]);
        // [1, 1, l, l]: 0 on and below the diagonal, a large negative above (HF's finfo.min).
        let mask: Vec<f32> = (0..l * l).map(|i| if i % l > i / l { -1e30 } else { 0.0 }).collect();
        let mask = Tensor::<B, 4>::from_data(TensorData::new(mask, [1, 1, l, l]), (dev, BurnDType::F32));
        let scale = 1.0 / (hd as f64).sqrt();
        let dtype = x.dtype();
        let used = self.cfg.num_hidden_layers - output.clip_skip;
        for layer in &self.layers[..used] {
            let residual = x.clone();
            let qkv = layer.qkv.forward(layer.norm1.forward(x));
            let split = |i: usize| qkv.clone().narrow(1, i * h, h).reshape([b, l, heads, hd]).swap_dims(1, 2);
            let (q, k, v) = (split(0), split(1), split(2));
            let scores = q.mul_scalar(scale).matmul(k.swap_dims(2, 3)).cast(BurnDType::F32) + mask.clone();
            let probs = softmax(scores, 3).cast(dtype);
            let ctx = probs.matmul(v).swap_dims(1, 2).reshape([b * l, h]);
            x = residual + layer.out_proj.forward(ctx);
            let residual = x.clone();
            let inter = layer.fc1.forward(layer.norm2.forward(x));
            let inter = match self.cfg.activation {
                ClipActivation::QuickGelu => inter.clone() * sigmoid(inter.mul_scalar(1.702)),
                ClipActivation::Gelu => gelu(inter),
                ClipActivation::GeluTanh => gelu_approximate(inter),
            };
            x = residual + layer.fc2.forward(inter);
        }
        if output.final_layer_norm {
            x = self.final_layer_norm.forward(x);
        }
        Ok(x.reshape([b, l, h]))
    }

    /// [`encode`](Self::encode), read back as f32 rows: `[B][L * hidden]`.
    pub fn encode_to_vec(&self, inputs: &[&[u32]], output: ClipOutput) -> Result<Vec<Vec<f32>>, String> {
        let x = self.encode(inputs, output)?;
        let [_, l, h] = x.dims();
        let flat: Vec<f32> = x
            .cast(BurnDType::F32)
            .into_data()
            .into_vec::<f32>()
            .map_err(|e| format!("reading hidden states: {e:?}"))?;
        Ok(flat.chunks(l * h).map(<[f32]>::to_vec).collect())
    }
}

/// The CLIP tokenizer of a diffusers `tokenizer/` folder.
pub struct ClipTokenizer {
    tokenizer: tokenizers::Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// A token named in `tokenizer_config.json` / `special_tokens_map.json`: a string or an
/// `AddedToken` dict.
fn token_name(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// CLIP's pre-tokenization regex (transformers' `CLIPTokenizer`).
const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

impl ClipTokenizer {
    /// Loads `dir` (`vocab.json` + `merges.txt`, or a `tokenizer.json`) with the special
    /// tokens and `model_max_length` of `tokenizer_config.json` (falling back to
    /// `special_tokens_map.json`; CLIP's defaults where neither names one).
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let read_opt = |name: &str| -> Result<Value, LoadError> {
            let p = dir.join(name);
            if p.is_file() {
                crate::config::read_json(&p)
            } else {
                Ok(Value::Null)
            }
        };
        let tc = read_opt("tokenizer_config.json")?;
        let sm = read_opt("special_tokens_map.json")?;
        let special = |key: &str, default: &str| -> String {
            token_name(&tc[key]).or_else(|| token_name(&sm[key])).unwrap_or_else(|| default.to_string())
        };
        let bos = special("bos_token", "<|startoftext|>");
        let eos = special("eos_token", "<|endoftext|>");
        let pad = special("pad_token", "<|endoftext|>");
        let unk = special("unk_token", "<|endoftext|>");
        let max_length = match tc["model_max_length"].as_u64() {
            // transformers writes a huge sentinel when there is no limit.
            Some(n) if n > 0 && n < 1_000_000 => n as usize,
            _ => 77,
        };
        let tok_json = dir.join("tokenizer.json");
        let tokenizer = if tok_json.is_file() {
            tokenizers::Tokenizer::from_file(&tok_json)
                .map_err(|e| parse_err(&tok_json, "tokenizer.json", e.to_string()))?
        } else {
            let vocab_path = dir.join("vocab.json");
            let (vmap, merges) = crate::tokenizer::read_bpe_files(dir)?;
            let id = |t: &str| vmap.get(t).and_then(Value::as_u64);
            let mut added = Vec::new();
            for t in [&pad, &bos, &eos] {
                let tid = id(t).ok_or_else(|| {
                    parse_err(&vocab_path, "vocab.json", format!("special token {t:?} is not in the vocabulary"))
                })?;
                if !added.iter().any(|a: &Value| a["content"] == json!(t)) {
                    added.push(json!({"id": tid, "content": t, "single_word": false, "lstrip": false,
                                      "rstrip": false, "normalized": false, "special": true}));
                }
            }
            let spec = json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "NFC"},
                    {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                    {"type": "Lowercase"}
                ]},
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
                ]},
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
                          "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": false, "vocab": vmap, "merges": merges}
            });
            spec.to_string()
                .parse::<tokenizers::Tokenizer>()
                .map_err(|e| parse_err(&vocab_path, "CLIP BPE vocabulary", e.to_string()))?
        };
        let id = |t: &str| -> Result<u32, LoadError> {
            tokenizer.token_to_id(t).ok_or_else(|| LoadError::Parse {
                path: dir.display().to_string(),
                what: "CLIP tokenizer",
                message: format!("special token {t:?} is not in the vocabulary"),
            })
        };
        if max_length < 2 {
            return Err(parse_err(dir, "CLIP tokenizer", format!("model_max_length {max_length} is too small")));
        }
        Ok(ClipTokenizer { bos_id: id(&bos)?, eos_id: id(&eos)?, pad_id: id(&pad)?, max_length, tokenizer })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The prompt's tokens without bos/eos, untruncated.
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<u32>, String> {
        let enc = self.tokenizer.encode(prompt, false).map_err(|e| format!("tokenizing the prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`:
    /// `<|startoftext|>`, at most `max_length - 2` prompt tokens, `<|endoftext|>`, then pad
    /// tokens up to `max_length`. Also returns the untruncated length with bos/eos, so a
    /// caller can report truncation as diffusers warns of it.
    pub fn encode(&self, prompt: &str) -> Result<(Vec<u32>, usize), String> {
        let content = self.tokenize(prompt)?;
        let full_len = content.len() + 2;
        let keep = content.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&content[..keep]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok((ids, full_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_value() {
        let e = ClipTextConfig::from_value(&json!({"hidden_act": "swish"})).unwrap_err();
        assert!(e.contains("\"swish\""), "{e}");
        let e = ClipTextConfig::from_value(&json!({"model_type": "bert"})).unwrap_err();
        assert!(e.contains("\"bert\""), "{e}");
        let e = ClipTextConfig::from_value(&json!({"hidden_size": 30, "num_attention_heads": 4})).unwrap_err();
        assert!(e.contains("multiple"), "{e}");
        let full = json!({"model_type": "clip", "text_config": {"hidden_size": 64, "num_attention_heads": 4}});
        assert_eq!(ClipTextConfig::from_value(&full).unwrap().hidden_size, 64);
    }
}
