//! HuggingFace `config.json` for the causal LMs Kiln serves (Qwen2ForCausalLM,
//! LlamaForCausalLM), plus `generation_config.json` eos ids.

use std::path::Path;

use serde::Deserialize;

use crate::LoadError;

/// Which decoder family a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Qwen2,
    Llama,
    /// Qwen3 layers (per-head q/k RMSNorm, no q/k/v bias): the Qwen3-TTS talker and code
    /// predictor. Not accepted as a text checkpoint (`from_value`); built by
    /// [`DecoderConfig::qwen3_from_value`].
    Qwen3,
}

impl Architecture {
    pub fn hf_name(&self) -> &'static str {
        match self {
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen3 => "Qwen3",
        }
    }
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.x frequency-dependent scaling.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize },
}

/// The validated decoder configuration the model code uses.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (always for Qwen2, `attention_bias` for Llama).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`; never for Qwen2).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// eos ids from config.json (generation_config.json takes precedence in the engine).
    pub eos_token_ids: Vec<u32>,
    /// RMSNorm over `head_dim` of every query and key head before RoPE (Qwen3).
    pub qk_norm: bool,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 writes `rope_parameters: {rope_theta, rope_type, ...}`.
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value, LoadError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| LoadError::Io { path: path.display().to_string(), message: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Parse {
        path: path.display().to_string(),
        what: "JSON",
        message: e.to_string(),
    })
}

/// Reads `eos_token_id` (an int or a list of ints); None when absent or null.
pub fn parse_eos(v: &serde_json::Value) -> Option<Vec<u32>> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().map(|x| vec![x as u32]),
        serde_json::Value::Array(a) => Some(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect()),
        _ => None,
    }
}

impl DecoderConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("config.json");
        let value = read_json(&path)?;
        Self::from_value(&value).map_err(|e| match e {
            LoadError::Parse { what, message, .. } => {
                LoadError::Parse { path: path.display().to_string(), what, message }
            }
            other => other,
        })
    }

    /// Parses a config.json value.
    pub fn from_value(value: &serde_json::Value) -> Result<Self, LoadError> {
        let arch_name = value["architectures"][0].as_str().unwrap_or("<missing architectures>");
        let architecture = match arch_name {
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            "LlamaForCausalLM" => Architecture::Llama,
            other => return Err(LoadError::UnsupportedArchitecture(other.to_string())),
        };
        Self::parse(value, architecture)
    }

    /// Parses a Qwen3 decoder's config (a sub-config such as Qwen3-TTS's `talker_config`).
    /// Multimodal RoPE sections are accepted: for speech all position streams are equal, which
    /// makes it plain RoPE.
    pub fn qwen3_from_value(value: &serde_json::Value) -> Result<Self, LoadError> {
        let mut value = value.clone();
        if let Some(scaling) = value.get_mut("rope_scaling").and_then(|v| v.as_object_mut()) {
            scaling.remove("mrope_section");
            scaling.remove("interleaved");
        }
        Self::parse(&value, Architecture::Qwen3)
    }

    fn parse(value: &serde_json::Value, architecture: Architecture) -> Result<Self, LoadError> {
        let parse_err = |message: String| LoadError::Parse { path: "config.json".into(), what: "config", message };
        let raw: RawConfig = serde_json::from_value(value.clone()).map_err(|e| parse_err(e.to_string()))?;
        let _ = (&raw.architectures, &raw.model_type);
        if let Some(act) = &raw.hidden_act {
            if act != "silu" && act != "swish" {
                return Err(LoadError::Unsupported(format!("hidden_act {act:?} is not supported (only silu)")));
            }
        }
        if raw.use_sliding_window == Some(true) {
            return Err(LoadError::Unsupported("use_sliding_window=true is not supported".to_string()));
        }
        let heads = raw.num_attention_heads;
        if heads == 0 {
            return Err(parse_err("num_attention_heads is 0".into()));
        }
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(parse_err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(parse_err(format!("head_dim {head_dim} must be even and non-zero")));
        }

        // RoPE: `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters` (5).
        let mut rope_theta = raw.rope_theta;
        let mut scaling_value = raw.rope_scaling.clone().filter(|v| !v.is_null());
        if let Some(params) = raw.rope_parameters.as_ref().filter(|v| v.is_object()) {
            if rope_theta.is_none() {
                rope_theta = params["rope_theta"].as_f64();
            }
            if scaling_value.is_none() {
                scaling_value = Some(params.clone());
            }
        }
        let rope_theta = rope_theta.unwrap_or(10000.0);
        let rope_scaling = match scaling_value {
            None => RopeScaling::None,
            Some(v) => parse_rope_scaling(&v, raw.max_position_embeddings)?,
        };

        let eos_token_ids = raw.eos_token_id.as_ref().and_then(parse_eos).unwrap_or_default();
        let (qkv_bias, o_bias, mlp_bias) = match architecture {
            Architecture::Qwen2 => (true, false, false),
            Architecture::Llama => (raw.attention_bias, raw.attention_bias, raw.mlp_bias),
            Architecture::Qwen3 => (raw.attention_bias, raw.attention_bias, false),
        };
        Ok(DecoderConfig {
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            vocab_size: raw.vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            eos_token_ids,
            qk_norm: architecture == Architecture::Qwen3,
        })
    }

    /// RoPE inverse frequencies (`head_dim / 2` of them), computed in f32 as transformers does.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base = self.rope_theta as f32;
        let inv: Vec<f32> = (0..dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / dim as f32;
                1.0f32 / base.powf(exponent)
            })
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => inv,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old_len = *original_max_position_embeddings as f32;
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                inv.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_freq_wavelen {
                            f / factor
                        } else if wavelen < high_freq_wavelen {
                            f
                        } else {
                            let smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// K and V elements of one position over all layers (multiply by the dtype's bytes).
    pub fn kv_elements_per_token(&self) -> usize {
        2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim
    }

    /// Parameter count implied by the config (embeddings counted once when tied).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += h;
        }
        let mut mlp = 3 * h * i;
        if self.mlp_bias {
            mlp += 2 * i + h;
        }
        let layer = attn + mlp + 2 * h + if self.qk_norm { 2 * self.head_dim } else { 0 };
        let emb = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.num_hidden_layers * layer + emb + head + h
    }
}

fn parse_rope_scaling(v: &serde_json::Value, max_pos: usize) -> Result<RopeScaling, LoadError> {
    let ty = v["rope_type"].as_str().or_else(|| v["type"].as_str()).unwrap_or("default");
    match ty {
        "default" => Ok(RopeScaling::None),
        "llama3" => {
            let f = |k: &str, d: f64| v[k].as_f64().unwrap_or(d) as f32;
            Ok(RopeScaling::Llama3 {
                factor: f("factor", 8.0),
                low_freq_factor: f("low_freq_factor", 1.0),
                high_freq_factor: f("high_freq_factor", 4.0),
                original_max_position_embeddings: v["original_max_position_embeddings"]
                    .as_u64()
                    .map(|x| x as usize)
                    .unwrap_or(max_pos),
            })
        }
        other => Err(LoadError::Unsupported(format!(
            "rope_scaling type {other:?} is not supported (supported: default, llama3)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"],
            "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "eos_token_id": [2, 3],
            "rope_scaling": null
        })
    }

    #[test]
    fn parses_qwen2_defaults() {
        let c = DecoderConfig::from_value(&base()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.rope_scaling, RopeScaling::None);
    }

    #[test]
    fn parses_rope_parameters_v5() {
        let mut v = base();
        v["rope_parameters"] = serde_json::json!({"rope_theta": 1e6, "rope_type": "default"});
        let c = DecoderConfig::from_value(&v).unwrap();
        assert_eq!(c.rope_theta, 1e6);
    }

    #[test]
    fn rejects_unknown() {
        let mut v = base();
        v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        assert!(matches!(DecoderConfig::from_value(&v), Err(LoadError::UnsupportedArchitecture(_))));
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
        assert!(matches!(DecoderConfig::from_value(&v), Err(LoadError::Unsupported(_))));
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        assert!(matches!(DecoderConfig::from_value(&v).unwrap().rope_scaling, RopeScaling::Llama3 { .. }));
    }
}
