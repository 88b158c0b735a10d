//! The server's TOML configuration (`config/*.toml`): a `[server]` table and one
//! `[[models]]` entry per served model. Unknown keys are errors that name the file and key.

use std::fmt;
use std::path::{Path, PathBuf};

use kiln_models::{DType, DeviceSpec};
use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Largest accepted request body (HTTP) or WebSocket message, in bytes.
    pub max_body_bytes: usize,
    /// A generation still running after this many seconds ends with `timeout`.
    pub request_timeout_s: u64,
    /// Generations one WebSocket may run at once.
    pub max_ws_inflight: usize,
    /// Share of each CUDA device's total memory the models may hold (weights, KV, activations).
    pub memory_fraction: f64,
    /// Memory the models on the CPU may hold, e.g. `"8GB"` or bytes; default: `memory_fraction`
    /// of the host's RAM.
    #[serde(deserialize_with = "de_opt_bytes")]
    pub memory_limit: Option<u64>,
    /// Seconds a request for a model that must first be loaded (after evicting idle models)
    /// waits for memory to free up before it gets 503.
    pub load_wait_s: u64,
    /// Host RAM that keeps text models' checkpoint files after their first load, so a model
    /// unloaded to make room for another reloads without reading the disk (e.g. `"16GB"`;
    /// 0, the default, disables it: on a CPU-only server it would hold a second copy).
    #[serde(deserialize_with = "de_bytes")]
    pub host_cache_bytes: u64,
    /// On SIGTERM / Ctrl-C, seconds running requests may take to finish before the server exits.
    pub drain_timeout_s: u64,
    /// Test-only: enables `POST /admin/fault` (inject engine or batcher failures). Off by default.
    pub fault_injection: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".to_string(),
            port: 8080,
            max_body_bytes: 4 << 20,
            request_timeout_s: 600,
            max_ws_inflight: 16,
            memory_fraction: 0.9,
            memory_limit: None,
            load_wait_s: 60,
            host_cache_bytes: 0,
            drain_timeout_s: 30,
            fault_injection: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients put in `model`.
    pub name: String,
    /// The HuggingFace model folder; relative paths are resolved from the config file's folder.
    pub path: PathBuf,
    /// Random-weight demo model: said in the log and in `/v1/models`.
    #[serde(default)]
    pub demo: bool,
    #[serde(default, deserialize_with = "de_device")]
    pub device: DeviceSpec,
    #[serde(default)]
    pub dtype: DType,
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// Tokens of KV cache, or `"auto"`: what the device's memory budget leaves after every
    /// model's weights and activation reserve, and the explicit KV pools of the others, split
    /// evenly between the `auto` models of the device (capped at `max_running` full-length
    /// sequences).
    #[serde(default = "default_kv_cache_tokens")]
    pub kv_cache_tokens: KvCacheTokens,
    #[serde(default = "default_max_batch_tokens")]
    pub max_batch_tokens: usize,
    #[serde(default = "default_max_running")]
    pub max_running: usize,
    #[serde(default = "default_max_waiting")]
    pub max_waiting: usize,
    /// Prompt tokens waiting beyond which new requests get 429 (default: no limit).
    #[serde(default)]
    pub max_waiting_tokens: Option<usize>,
    /// Caps the model's own context length.
    #[serde(default)]
    pub max_model_len: Option<usize>,
    /// Load at start-up (and count for `/ready`); otherwise loaded on first use.
    #[serde(default = "default_true")]
    pub preload: bool,
    /// Embedding models: a projection written by `kiln pca fit` (safetensors); relative paths
    /// are resolved from the config file's folder. The API then serves its reduced vectors.
    #[serde(default)]
    pub projection: Option<PathBuf>,
    /// Image models: the largest image served, in pixels (width x height). Default: twice the
    /// pixels of the resolution the model was trained at (524288 for SD 1.5's 512x512).
    #[serde(default)]
    pub max_image_pixels: Option<usize>,
    /// Image models: the largest width or height. Default: twice the trained side.
    #[serde(default)]
    pub max_image_side: Option<usize>,
    /// Image models: images of the largest size one UNet forward may hold; with
    /// `max_image_pixels` it sizes the activation reserve, and smaller images batch more
    /// (up to `max_running` images in flight).
    #[serde(default = "default_max_batch_images")]
    pub max_batch_images: usize,
    /// Image models: the most denoising steps a request may ask for.
    #[serde(default = "default_max_steps")]
    pub max_steps: usize,
    /// Image models: steps when a request gives none.
    #[serde(default = "default_image_steps")]
    pub default_steps: usize,
    /// Speech models: the longest text (`input`) a request may ask to speak, in characters.
    #[serde(default = "default_max_speech_chars")]
    pub max_speech_chars: usize,
    /// Speech models: the most codec frames one utterance may generate (12.5 frames per second
    /// of audio). Default: the model's `generation_config.json` `max_new_tokens` - 1 (as
    /// upstream generates); always capped by `max_model_len` less the prompt.
    #[serde(default)]
    pub max_frames: Option<usize>,
    /// Speech models: the first audio of an utterance is decoded and sent once this many frames
    /// exist (1 = 0.08 s of audio: the lowest latency to first audio).
    #[serde(default = "default_speech_first_chunk_frames")]
    pub speech_first_chunk_frames: usize,
    /// Speech models: later audio is decoded and sent every this many frames (4 = 0.32 s of
    /// audio); larger chunks cost less per frame.
    #[serde(default = "default_speech_chunk_frames")]
    pub speech_chunk_frames: usize,
}

fn default_max_speech_chars() -> usize {
    2000
}
fn default_speech_first_chunk_frames() -> usize {
    1
}
fn default_speech_chunk_frames() -> usize {
    4
}

fn default_max_batch_images() -> usize {
    4
}
fn default_max_steps() -> usize {
    150
}
fn default_image_steps() -> usize {
    30
}

fn default_block_size() -> usize {
    16
}
fn default_kv_cache_tokens() -> KvCacheTokens {
    KvCacheTokens::Tokens(16384)
}

/// A model's KV-cache size: a token count, or sized from the device's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum KvCacheTokens {
    #[serde(serialize_with = "ser_auto")]
    Auto,
    Tokens(usize),
}

fn ser_auto<S: serde::Serializer>(s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("auto")
}

impl KvCacheTokens {
    /// The configured count (`None` for `auto`).
    pub fn tokens(self) -> Option<usize> {
        match self {
            KvCacheTokens::Auto => None,
            KvCacheTokens::Tokens(n) => Some(n),
        }
    }
}

impl From<usize> for KvCacheTokens {
    fn from(n: usize) -> Self {
        KvCacheTokens::Tokens(n)
    }
}

impl fmt::Display for KvCacheTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvCacheTokens::Auto => f.write_str("auto"),
            KvCacheTokens::Tokens(n) => write!(f, "{n}"),
        }
    }
}

impl<'de> Deserialize<'de> for KvCacheTokens {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Tokens(usize),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Tokens(n) => Ok(KvCacheTokens::Tokens(n)),
            Raw::Text(t) if t == "auto" => Ok(KvCacheTokens::Auto),
            Raw::Text(t) => Err(serde::de::Error::custom(format!("expected a token count or \"auto\", got {t:?}"))),
        }
    }
}
fn default_max_batch_tokens() -> usize {
    2048
}
fn default_max_running() -> usize {
    32
}
fn default_max_waiting() -> usize {
    256
}
fn default_true() -> bool {
    true
}

fn de_opt_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Option::<Size>::deserialize(d)? {
        None => Ok(None),
        Some(Size::Bytes(b)) => Ok(Some(b)),
        Some(Size::Text(t)) => crate::plan::parse_bytes(&t).map(Some).map_err(serde::de::Error::custom),
    }
}

fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    de_opt_bytes(d)?.ok_or_else(|| serde::de::Error::custom("expected a size such as \"16GB\" or bytes"))
}

fn de_device<'de, D: Deserializer<'de>>(d: D) -> Result<DeviceSpec, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// The name of a model folder (its canonical path's last component), e.g. for `--model DIR`.
pub fn folder_name(dir: &Path) -> Option<String> {
    dir.canonicalize().ok().as_deref().unwrap_or(dir).file_name().map(|n| n.to_string_lossy().into_owned())
}

impl ModelConfig {
    /// A model entry with default options, named after its folder (for `kiln serve --model DIR`).
    pub fn from_dir(dir: &Path) -> ModelConfig {
        let name = folder_name(dir).unwrap_or_else(|| "model".to_string());
        ModelConfig {
            name,
            path: dir.to_path_buf(),
            demo: false,
            device: DeviceSpec::default(),
            dtype: DType::default(),
            block_size: default_block_size(),
            kv_cache_tokens: default_kv_cache_tokens(),
            max_batch_tokens: default_max_batch_tokens(),
            max_running: default_max_running(),
            max_waiting: default_max_waiting(),
            max_waiting_tokens: None,
            max_model_len: None,
            preload: true,
            projection: None,
            max_image_pixels: None,
            max_image_side: None,
            max_batch_images: default_max_batch_images(),
            max_steps: default_max_steps(),
            default_steps: default_image_steps(),
            max_speech_chars: default_max_speech_chars(),
            max_frames: None,
            speech_first_chunk_frames: default_speech_first_chunk_frames(),
            speech_chunk_frames: default_speech_chunk_frames(),
        }
    }
}

#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and checks a config file; model paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, &path.display().to_string(), base)
    }

    /// Parses config text; `origin` names the file in errors, `base` resolves model paths.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text)
            .map_err(|e| ConfigError(format!("invalid config {origin}: {}", e.to_string().trim_end())))?;
        for m in &mut config.models {
            if m.path.is_relative() {
                m.path = base.join(&m.path);
            }
            if let Some(p) = m.projection.as_mut().filter(|p| p.is_relative()) {
                *p = base.join(&*p);
            }
        }
        config.check().map_err(|e| ConfigError(format!("invalid config {origin}: {e}")))?;
        Ok(config)
    }

    /// Checks what serde cannot: unique names, positive sizes. Empty `models` is allowed here
    /// (the CLI may add some); the server refuses to start without any.
    pub fn check(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let at = format!("models[{i}] ({:?})", m.name);
            if m.name.trim().is_empty() {
                return Err(format!("models[{i}].name is empty"));
            }
            if !names.insert(m.name.as_str()) {
                return Err(format!("{at}: duplicate model name"));
            }
            if m.kv_cache_tokens == KvCacheTokens::Tokens(0) {
                return Err(format!("{at}: kv_cache_tokens must be at least 1 (or \"auto\")"));
            }
            for (key, v) in [
                ("block_size", m.block_size),
                ("max_batch_tokens", m.max_batch_tokens),
                ("max_running", m.max_running),
                ("max_speech_chars", m.max_speech_chars),
                ("speech_first_chunk_frames", m.speech_first_chunk_frames),
                ("speech_chunk_frames", m.speech_chunk_frames),
            ] {
                if v == 0 {
                    return Err(format!("{at}: {key} must be at least 1"));
                }
            }
            if m.max_waiting_tokens == Some(0) {
                return Err(format!("{at}: max_waiting_tokens must be at least 1"));
            }
            if m.max_model_len == Some(0) {
                return Err(format!("{at}: max_model_len must be at least 1"));
            }
            if m.max_frames == Some(0) {
                return Err(format!("{at}: max_frames must be at least 1"));
            }
        }
        if self.server.max_body_bytes < 1024 {
            return Err("server.max_body_bytes must be at least 1024".to_string());
        }
        if !(self.server.memory_fraction > 0.0 && self.server.memory_fraction <= 1.0) {
            return Err(format!("server.memory_fraction must be in (0, 1], got {}", self.server.memory_fraction));
        }
        if self.server.memory_limit == Some(0) {
            return Err("server.memory_limit must be more than 0".to_string());
        }
        if self.server.max_ws_inflight == 0 {
            return Err("server.max_ws_inflight must be at least 1".to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", Path::new("/etc/kiln"))
    }

    #[test]
    fn parses_a_full_config_and_resolves_paths() {
        let c = parse(
            r#"
            [server]
            host = "0.0.0.0"
            port = 9000
            max_body_bytes = 65536
            request_timeout_s = 30
            max_ws_inflight = 4
            memory_fraction = 0.8
            memory_limit = "2GB"
            load_wait_s = 5
            drain_timeout_s = 3
            fault_injection = true

            [[models]]
            name = "m"
            path = "models/m"
            demo = true
            device = "cuda:1"
            dtype = "bf16"
            block_size = 32
            kv_cache_tokens = 1024
            max_batch_tokens = 512
            max_running = 8
            max_waiting = 16
            max_model_len = 2048
            preload = false
            "#,
        )
        .unwrap();
        assert_eq!(c.server.host, "0.0.0.0");
        assert_eq!(c.server.port, 9000);
        assert_eq!(c.server.max_ws_inflight, 4);
        assert_eq!(c.server.memory_limit, Some(2 << 30));
        assert_eq!((c.server.memory_fraction, c.server.load_wait_s, c.server.drain_timeout_s), (0.8, 5, 3));
        assert!(c.server.fault_injection);
        assert_eq!(parse("[server]\nmemory_limit = 1048576\n").unwrap().server.memory_limit, Some(1 << 20));
        assert!(parse("[server]\nmemory_limit = \"lots\"\n").is_err());
        assert!(parse("[server]\nmemory_fraction = 1.5\n").is_err());
        let auto = parse("[[models]]\nname = \"a\"\npath = \"p\"\nkv_cache_tokens = \"auto\"\n").unwrap();
        assert_eq!(auto.models[0].kv_cache_tokens, KvCacheTokens::Auto);
        let e = parse("[[models]]\nname = \"a\"\npath = \"p\"\nkv_cache_tokens = \"lots\"\n").unwrap_err();
        assert!(e.to_string().contains("auto"), "{e}");
        let m = &c.models[0];
        assert_eq!(m.path, Path::new("/etc/kiln/models/m"));
        assert_eq!(m.device, DeviceSpec::Cuda(1));
        assert_eq!(m.dtype, DType::BF16);
        assert_eq!(m.max_model_len, Some(2048));
        assert!(m.demo && !m.preload);
    }

    #[test]
    fn defaults_fill_missing_keys() {
        let c = parse("[[models]]\nname = \"a\"\npath = \"/abs\"\n").unwrap();
        assert_eq!(c.server.port, 8080);
        assert_eq!(c.models[0].path, Path::new("/abs"));
        assert_eq!(c.models[0].device, DeviceSpec::Auto);
        assert!(c.models[0].preload);
        let m = &c.models[0];
        assert_eq!(
            (m.max_speech_chars, m.max_frames, m.speech_first_chunk_frames, m.speech_chunk_frames),
            (2000, None, 1, 4)
        );
        let e = parse("[[models]]\nname = \"a\"\npath = \"p\"\nspeech_chunk_frames = 0\n").unwrap_err().to_string();
        assert!(e.contains("speech_chunk_frames"), "{e}");
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = parse("[server]\nprot = 1\n").unwrap_err().to_string();
        assert!(e.contains("test.toml") && e.contains("prot"), "{e}");
        let e = parse("[[models]]\nname = \"a\"\npath = \"p\"\nkv_tokens = 3\n").unwrap_err().to_string();
        assert!(e.contains("kv_tokens"), "{e}");
    }

    #[test]
    fn bad_values_are_explained() {
        let e = parse("[[models]]\nname = \"a\"\npath = \"p\"\ndevice = \"tpu\"\n").unwrap_err().to_string();
        assert!(e.contains("tpu"), "{e}");
        let e = parse("[[models]]\nname = \"a\"\npath = \"p\"\n[[models]]\nname = \"a\"\npath = \"q\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate"), "{e}");
    }

    #[test]
    fn shipped_configs_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for f in ["config/qwen2.5-3b-instruct.toml", "config/minilm.toml", "config/sd15.toml", "config/qwen3-tts.toml"]
        {
            let c = Config::load(&root.join(f)).unwrap();
            assert_eq!(c.models.len(), 1, "{f}");
        }
        let c = Config::load(&root.join("config/default.toml")).unwrap();
        assert_eq!(c.models.len(), 3);
        assert_eq!(c.models[0].name, "kiln-demo");
        assert!(c.models[0].demo);
        assert!(c.models[0].path.ends_with("tests/fixtures/qwen2-tied-gqa"));
        assert_eq!(c.models[1].name, "sd-demo");
        assert!(c.models[1].path.ends_with("tests/fixtures/sd-tiny/sd15"));
        assert_eq!((c.models[1].max_image_side, c.models[1].max_batch_images), (Some(64), 4));
        assert_eq!(c.models[2].name, "tts-demo");
        assert!(c.models[2].demo);
        assert!(c.models[2].path.ends_with("tests/fixtures/tts-tiny"));
        let tts = &c.models[2];
        assert_eq!((tts.max_speech_chars, tts.speech_first_chunk_frames, tts.speech_chunk_frames), (2000, 1, 4));
    }
}
