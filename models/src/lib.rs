//! kiln-models: Burn model code (generic over `B: Backend`), HuggingFace weight loading,
//! tokenizers and chat templates, and one `Engine` per family.

pub mod backend;
pub mod bert;
pub mod clip;
pub mod config;
pub mod diffusion;
pub mod embed;
pub mod engine;
#[cfg(feature = "flex")]
pub mod flex_kv;
pub mod memory;
pub mod qwen2;
pub mod schedulers;
pub mod tokenizer;
pub mod tts;
pub mod tts_decoder;
pub mod tts_prompt;
pub mod unet;
pub mod vae;
pub mod weights;

pub use diffusion::{DiffusionEngine, DiffusionEngineOptions, DiffusionInfo};
pub use embed::{EmbeddingEngine, EmbeddingEngineOptions, EmbeddingModelInfo, EmbeddingTokenizer};
pub use engine::{TextEngine, TextEngineOptions, TextModelInfo};
pub use tokenizer::{ChatMessage, HfTokenizer};
pub use tts::{TtsEngine, TtsEngineOptions, TtsModelInfo};

use std::path::Path;

/// Numeric type of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    #[default]
    F32,
    F16,
    BF16,
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA device 0 when built with `cuda` and a GPU is present, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(format!("unknown device {s:?}: expected auto, cpu, cuda or cuda:N")),
            },
        }
    }
}

/// Model families a folder can hold, detected from its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `config.json` with a causal-LM `architectures` entry Kiln implements.
    TextGeneration,
    /// sentence-transformers folder (`modules.json`).
    Embedding,
    /// diffusers folder (`model_index.json`).
    Diffusion,
    /// Qwen3-TTS folder (`config.json` with `model_type` `qwen3_tts`, `speech_tokenizer/`).
    Speech,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path}: invalid {what}: {message}")]
    Parse { path: String, what: &'static str, message: String },
    #[error("unsupported architecture {0:?}: Kiln serves Qwen2ForCausalLM and LlamaForCausalLM")]
    UnsupportedArchitecture(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("weight {name}: {message}")]
    Weight { name: String, message: String },
}

/// Tells which family a model folder holds.
pub fn detect_family(dir: &Path) -> Result<Family, LoadError> {
    if dir.join("model_index.json").is_file() {
        return Ok(Family::Diffusion);
    }
    if dir.join("modules.json").is_file() {
        return Ok(Family::Embedding);
    }
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| LoadError::Io { path: path.display().to_string(), message: e.to_string() })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::Parse {
        path: path.display().to_string(),
        what: "JSON",
        message: e.to_string(),
    })?;
    if v["model_type"].as_str() == Some("qwen3_tts") {
        return Ok(Family::Speech);
    }
    let arch = v["architectures"][0].as_str().unwrap_or("<missing architectures>");
    match arch {
        "Qwen2ForCausalLM" | "LlamaForCausalLM" => Ok(Family::TextGeneration),
        other => Err(LoadError::UnsupportedArchitecture(other.to_string())),
    }
}
