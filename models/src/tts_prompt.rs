//! Qwen3-TTS (12 Hz, CustomVoice) configuration, text tokenizer and prompt construction.
//!
//! [`TtsPrompter`] turns a request (text, speaker, language, optional instruction) into the
//! talker's dual-track prefill rows exactly as `qwen-tts` 0.1.1 builds them
//! (`Qwen3TTSModel.generate_custom_voice` → `Qwen3TTSForConditionalGeneration.generate`); see
//! `docs/tts-design.md` ("Prompt layout"). Everything here is validated before a request reaches
//! the engine, so its errors ([`PromptError`]) are client errors.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_actors::{SpeechRequest, SpeechSampling};
use serde_json::{json, Value};

use crate::config::read_json;
use crate::LoadError;

/// The only speech-tokenizer family Kiln implements (the 25 Hz v1 tokenizer is another model).
const TOKENIZER_TYPE_12HZ: &str = "qwen3_tts_tokenizer_12hz";

/// Qwen2's pre-tokenizer split regex (`Qwen2Tokenizer` / its `tokenizer.json`).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The assistant template's parts around the text: `ids[..3]` and `ids[len - 5..]`.
const ROLE_PREFIX: &str = "<|im_start|>assistant\n";
const ROLE_SUFFIX: &str = "<|im_end|>\n<|im_start|>assistant\n";

/// Sampling defaults from `generation_config.json` (what `Qwen3TTSModel` passes to `generate`
/// when the caller does not); a missing file or key takes the wrapper's hard default.
#[derive(Debug, Clone, PartialEq)]
pub struct TtsGenerationConfig {
    /// Sample codebook 0 (talker); false is greedy. Default true.
    pub do_sample: bool,
    /// Default 0.9.
    pub temperature: f32,
    /// 0: no top-k. Default 50.
    pub top_k: usize,
    /// Default 1.0.
    pub top_p: f32,
    /// Over codebook 0's history. Default 1.05.
    pub repetition_penalty: f32,
    /// Sample codebooks 1..15 (code predictor). Default true.
    pub subtalker_dosample: bool,
    /// Default 0.9.
    pub subtalker_temperature: f32,
    /// Default 50.
    pub subtalker_top_k: usize,
    /// Default 1.0.
    pub subtalker_top_p: f32,
    /// Most talker steps. Default 2048 (`_merge_generate_kwargs`' hard default; the published
    /// `generation_config.json` files say 8192).
    pub max_new_tokens: usize,
}

impl Default for TtsGenerationConfig {
    fn default() -> Self {
        TtsGenerationConfig {
            do_sample: true,
            temperature: 0.9,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.05,
            subtalker_dosample: true,
            subtalker_temperature: 0.9,
            subtalker_top_k: 50,
            subtalker_top_p: 1.0,
            max_new_tokens: 2048,
        }
    }
}

/// What Kiln needs from a Qwen3-TTS model folder's `config.json` (model_type `qwen3_tts`) and
/// `generation_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct TtsConfig {
    /// `custom_voice` or `voice_design` (`base`, voice cloning, is rejected at load).
    pub tts_model_type: String,
    /// e.g. `1b7`, `0b6`; decides [`TtsConfig::instruct_allowed`].
    pub tts_model_size: String,
    /// Always [`TOKENIZER_TYPE_12HZ`] once loaded.
    pub tokenizer_type: String,
    /// Text-vocabulary id of `<tts_text_bos>`.
    pub tts_bos_token_id: u32,
    /// Text-vocabulary id of `<tts_text_eod>`.
    pub tts_eos_token_id: u32,
    /// Text-vocabulary id of `<tts_pad>`.
    pub tts_pad_token_id: u32,
    /// Codec id that ends an utterance.
    pub codec_eos_token_id: u32,
    pub codec_pad_id: u32,
    pub codec_bos_id: u32,
    pub codec_think_id: u32,
    pub codec_nothink_id: u32,
    pub codec_think_bos_id: u32,
    pub codec_think_eos_id: u32,
    /// Language name → codec id (includes the `*_dialect` entries).
    pub codec_language_id: BTreeMap<String, u32>,
    /// Speaker name → codec id.
    pub spk_id: BTreeMap<String, u32>,
    /// Speaker name → the `codec_language_id` key of its dialect (`None`: not a dialect speaker).
    pub spk_is_dialect: BTreeMap<String, Option<String>>,
    /// Talker (codec) vocabulary size.
    pub vocab_size: usize,
    /// Sampling defaults.
    pub generation: TtsGenerationConfig,
}

impl TtsConfig {
    /// Reads `dir/config.json` and (when present) `dir/generation_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("config.json");
        let cfg = Self::from_value(&read_json(&path)?, &path)?;
        let gen_path = dir.join("generation_config.json");
        let generation = if gen_path.is_file() {
            parse_generation(&read_json(&gen_path)?, &gen_path)?
        } else {
            TtsGenerationConfig::default()
        };
        Ok(TtsConfig { generation, ..cfg })
    }

    /// Parses a `config.json` value (`path` is for messages); generation defaults are the hard
    /// defaults.
    pub fn from_value(v: &Value, path: &Path) -> Result<Self, LoadError> {
        let err =
            |message: String| LoadError::Parse { path: path.display().to_string(), what: "Qwen3-TTS config", message };
        if v["model_type"].as_str() != Some("qwen3_tts") {
            return Err(err(format!("model_type is {}, expected \"qwen3_tts\"", v["model_type"])));
        }
        let string = |key: &str| -> Result<String, LoadError> {
            v[key].as_str().map(str::to_string).ok_or_else(|| err(format!("{key} is missing or not a string")))
        };
        let tokenizer_type = string("tokenizer_type")?;
        if tokenizer_type != TOKENIZER_TYPE_12HZ {
            return Err(LoadError::Unsupported(format!(
                "{}: tokenizer_type {tokenizer_type:?} is not supported: Kiln implements the 12 Hz \
                 speech tokenizer ({TOKENIZER_TYPE_12HZ:?})",
                path.display()
            )));
        }
        let tts_model_type = string("tts_model_type")?;
        match tts_model_type.as_str() {
            "custom_voice" | "voice_design" => {}
            "base" => {
                return Err(LoadError::Unsupported(format!(
                    "{}: tts_model_type \"base\" (voice cloning from reference audio) is not \
                     supported: use a CustomVoice model",
                    path.display()
                )))
            }
            other => {
                return Err(LoadError::Unsupported(format!(
                    "{}: unknown tts_model_type {other:?}: expected \"custom_voice\" or \"voice_design\"",
                    path.display()
                )))
            }
        }
        let tts_model_size = string("tts_model_size")?;

        let id_in = |obj: &Value, key: &str, prefix: &str| -> Result<u32, LoadError> {
            obj[key]
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| err(format!("{prefix}{key} is missing or not a token id")))
        };
        let tc = &v["talker_config"];
        if !tc.is_object() {
            return Err(err("talker_config is missing".into()));
        }
        let tp = "talker_config.";
        let vocab_size = tc["vocab_size"]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| err("talker_config.vocab_size is missing or not an integer".into()))?;
        let id_map = |key: &str| -> Result<BTreeMap<String, u32>, LoadError> {
            let obj = tc[key].as_object().ok_or_else(|| err(format!("{tp}{key} is missing or not an object")))?;
            obj.iter()
                .map(|(name, id)| {
                    id.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .map(|id| (name.clone(), id))
                        .ok_or_else(|| err(format!("{tp}{key}[{name:?}] is not a token id")))
                })
                .collect()
        };
        let codec_language_id = id_map("codec_language_id")?;
        let spk_id = id_map("spk_id")?;
        let mut spk_is_dialect = BTreeMap::new();
        match &tc["spk_is_dialect"] {
            Value::Null => {}
            Value::Object(obj) => {
                for (name, d) in obj {
                    let dialect = match d {
                        Value::Bool(false) | Value::Null => None,
                        Value::String(lang) if codec_language_id.contains_key(lang) => Some(lang.clone()),
                        other => {
                            return Err(err(format!(
                                "{tp}spk_is_dialect[{name:?}] is {other}: expected false or a key of \
                                 codec_language_id"
                            )))
                        }
                    };
                    spk_is_dialect.insert(name.clone(), dialect);
                }
            }
            other => return Err(err(format!("{tp}spk_is_dialect is {other}: expected an object"))),
        }

        let cfg = TtsConfig {
            tts_bos_token_id: id_in(v, "tts_bos_token_id", "")?,
            tts_eos_token_id: id_in(v, "tts_eos_token_id", "")?,
            tts_pad_token_id: id_in(v, "tts_pad_token_id", "")?,
            codec_eos_token_id: id_in(tc, "codec_eos_token_id", tp)?,
            codec_pad_id: id_in(tc, "codec_pad_id", tp)?,
            codec_bos_id: id_in(tc, "codec_bos_id", tp)?,
            codec_think_id: id_in(tc, "codec_think_id", tp)?,
            codec_nothink_id: id_in(tc, "codec_nothink_id", tp)?,
            codec_think_bos_id: id_in(tc, "codec_think_bos_id", tp)?,
            codec_think_eos_id: id_in(tc, "codec_think_eos_id", tp)?,
            tts_model_type,
            tts_model_size,
            tokenizer_type,
            codec_language_id,
            spk_id,
            spk_is_dialect,
            vocab_size,
            generation: TtsGenerationConfig::default(),
        };

        // Every codec id must be a row of the talker's codec embedding.
        let controls = [
            ("codec_eos_token_id", cfg.codec_eos_token_id),
            ("codec_pad_id", cfg.codec_pad_id),
            ("codec_bos_id", cfg.codec_bos_id),
            ("codec_think_id", cfg.codec_think_id),
            ("codec_nothink_id", cfg.codec_nothink_id),
            ("codec_think_bos_id", cfg.codec_think_bos_id),
            ("codec_think_eos_id", cfg.codec_think_eos_id),
        ];
        let named = cfg
            .codec_language_id
            .iter()
            .map(|(k, &id)| (format!("codec_language_id[{k:?}]"), id))
            .chain(cfg.spk_id.iter().map(|(k, &id)| (format!("spk_id[{k:?}]"), id)));
        for (name, id) in controls.iter().map(|(k, id)| (k.to_string(), *id)).chain(named) {
            if id as usize >= vocab_size {
                return Err(err(format!("{tp}{name} = {id} is outside the codec vocabulary ({vocab_size})")));
            }
        }
        if let Some(text_vocab) = tc["text_vocab_size"].as_u64() {
            for (name, id) in [
                ("tts_bos_token_id", cfg.tts_bos_token_id),
                ("tts_eos_token_id", cfg.tts_eos_token_id),
                ("tts_pad_token_id", cfg.tts_pad_token_id),
            ] {
                if u64::from(id) >= text_vocab {
                    return Err(err(format!(
                        "{name} = {id} is outside the text vocabulary (talker_config.text_vocab_size {text_vocab})"
                    )));
                }
            }
        }
        Ok(cfg)
    }

    /// Whether an `instruct` prompt is used. Upstream drops it (silently) when
    /// `tts_model_size in "0b6"` — a substring test, reproduced as such — and `base` models have
    /// none.
    pub fn instruct_allowed(&self) -> bool {
        !("0b6".contains(self.tts_model_size.as_str()) || self.tts_model_type == "base")
    }

    /// The model's default sampling for one utterance, seeded with `seed`.
    pub fn sampling_defaults(&self, seed: u64) -> SpeechSampling {
        let g = &self.generation;
        SpeechSampling {
            do_sample: g.do_sample,
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            repetition_penalty: g.repetition_penalty,
            sub_do_sample: g.subtalker_dosample,
            sub_temperature: g.subtalker_temperature,
            sub_top_k: g.subtalker_top_k,
            sub_top_p: g.subtalker_top_p,
            seed,
        }
    }
}

/// Reads `generation_config.json`; a missing or null key keeps the hard default, a value of the
/// wrong type is an error.
fn parse_generation(v: &Value, path: &Path) -> Result<TtsGenerationConfig, LoadError> {
    let err = |key: &str, expected: &str| LoadError::Parse {
        path: path.display().to_string(),
        what: "generation config",
        message: format!("{key} is {}: expected {expected}", v[key]),
    };
    let present = |key: &str| !v[key].is_null();
    let boolean = |key: &str, default: bool| -> Result<bool, LoadError> {
        if !present(key) {
            return Ok(default);
        }
        v[key].as_bool().ok_or_else(|| err(key, "a boolean"))
    };
    let float = |key: &str, default: f32| -> Result<f32, LoadError> {
        if !present(key) {
            return Ok(default);
        }
        match v[key].as_f64() {
            Some(x) if x.is_finite() => Ok(x as f32),
            _ => Err(err(key, "a number")),
        }
    };
    let count = |key: &str, default: usize| -> Result<usize, LoadError> {
        if !present(key) {
            return Ok(default);
        }
        v[key].as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| err(key, "a non-negative integer"))
    };
    let d = TtsGenerationConfig::default();
    Ok(TtsGenerationConfig {
        do_sample: boolean("do_sample", d.do_sample)?,
        temperature: float("temperature", d.temperature)?,
        top_k: count("top_k", d.top_k)?,
        top_p: float("top_p", d.top_p)?,
        repetition_penalty: float("repetition_penalty", d.repetition_penalty)?,
        subtalker_dosample: boolean("subtalker_dosample", d.subtalker_dosample)?,
        subtalker_temperature: float("subtalker_temperature", d.subtalker_temperature)?,
        subtalker_top_k: count("subtalker_top_k", d.subtalker_top_k)?,
        subtalker_top_p: float("subtalker_top_p", d.subtalker_top_p)?,
        max_new_tokens: count("max_new_tokens", d.max_new_tokens)?,
    })
}

/// Loads the text tokenizer: `dir/tokenizer.json` when present, else the equivalent of
/// transformers' `Qwen2Tokenizer` (and its fast conversion) built from `vocab.json`,
/// `merges.txt` and `tokenizer_config.json`'s `added_tokens_decoder`.
fn load_text_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer, LoadError> {
    let tok_json = dir.join("tokenizer.json");
    if tok_json.is_file() {
        return tokenizers::Tokenizer::from_file(&tok_json).map_err(|e| LoadError::Parse {
            path: tok_json.display().to_string(),
            what: "tokenizer",
            message: e.to_string(),
        });
    }
    let parse_err = |path: &Path, what: &'static str, message: String| LoadError::Parse {
        path: path.display().to_string(),
        what,
        message,
    };
    let vocab_path = dir.join("vocab.json");
    let (mut vocab, merges) = crate::tokenizer::read_bpe_files(dir)?;

    // Added tokens keep their ids: tokenizers gives an added token the model's id for the same
    // content, else the next free id, so each one is also put in the BPE vocabulary (BPE never
    // produces it: no merge leads to it).
    let tc_path = dir.join("tokenizer_config.json");
    let mut added: Vec<(u32, Value)> = Vec::new();
    if tc_path.is_file() {
        let tc = read_json(&tc_path)?;
        if let Some(obj) = tc["added_tokens_decoder"].as_object() {
            for (id, tok) in obj {
                let bad =
                    |m: &str| parse_err(&tc_path, "tokenizer config", format!("added_tokens_decoder[{id:?}]: {m}"));
                let id: u32 = id.parse().map_err(|_| bad("the key is not a token id"))?;
                let content = tok["content"].as_str().ok_or_else(|| bad("no content"))?;
                let flag = |k: &str, default: bool| tok[k].as_bool().unwrap_or(default);
                added.push((
                    id,
                    json!({
                        "id": id,
                        "content": content,
                        "single_word": flag("single_word", false),
                        "lstrip": flag("lstrip", false),
                        "rstrip": flag("rstrip", false),
                        "normalized": flag("normalized", false),
                        "special": flag("special", true),
                    }),
                ));
                vocab.entry(content.to_string()).or_insert(json!(id));
            }
        }
    }
    added.sort_by_key(|(id, _)| *id);
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added.iter().map(|(_, t)| t).collect::<Vec<_>>(),
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    let tokenizer = spec
        .to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| parse_err(&vocab_path, "Qwen2 BPE vocabulary", e.to_string()))?;
    for (id, tok) in &added {
        let content = tok["content"].as_str().unwrap_or_default();
        if tokenizer.token_to_id(content) != Some(*id) {
            return Err(parse_err(
                &tc_path,
                "tokenizer config",
                format!("added token {content:?} (id {id}) clashes with vocab.json"),
            ));
        }
    }
    Ok(tokenizer)
}

/// Why a request's prompt cannot be built (a client error).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PromptError {
    #[error("the text to speak is empty")]
    EmptyText,
    #[error("unknown speaker {given:?}: expected one of {}", allowed.join(", "))]
    UnknownSpeaker { given: String, allowed: Vec<String> },
    #[error("unknown language {given:?}: expected one of {}", allowed.join(", "))]
    UnknownLanguage { given: String, allowed: Vec<String> },
    #[error("cannot tokenize the request: {0}")]
    Tokenizer(String),
}

/// The talker's prefill rows and the text fed during generation, for one utterance.
#[derive(Debug, Clone, PartialEq)]
pub struct TtsPrompt {
    /// Text-vocabulary id of every prefill row.
    pub text_track: Vec<u32>,
    /// Codec id of every prefill row (`None`: no codec part); same length as `text_track`.
    pub codec_track: Vec<Option<u32>>,
    /// Text ids fed with the generated frames, one per frame (`tts_pad` once they run out).
    pub trailing_text: Vec<u32>,
    /// Number of tokens of the text itself (`ids[3..len - 5]` of the assistant template).
    pub text_tokens: usize,
    /// Whether the instruction was used (false when none was given or the model drops it).
    pub instruct_used: bool,
}

/// Builds Qwen3-TTS CustomVoice prompts for one model folder.
pub struct TtsPrompter {
    cfg: TtsConfig,
    tokenizer: tokenizers::Tokenizer,
    /// Ids of [`ROLE_PREFIX`] (3) and [`ROLE_SUFFIX`] (5), checked at load.
    role_prefix: Vec<u32>,
    role_suffix: Vec<u32>,
}

impl TtsPrompter {
    /// Loads the config, the generation defaults and the text tokenizer from a model folder, and
    /// checks that the tokenizer gives the assistant template the layout `generate` slices by
    /// position.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let cfg = TtsConfig::from_dir(dir)?;
        let tokenizer = load_text_tokenizer(dir)?;
        let encode = |s: &str| -> Result<Vec<u32>, LoadError> {
            tokenizer.encode(s, false).map(|e| e.get_ids().to_vec()).map_err(|e| LoadError::Parse {
                path: dir.display().to_string(),
                what: "text tokenizer",
                message: format!("{s:?}: {e}"),
            })
        };
        let role_prefix = encode(ROLE_PREFIX)?;
        let role_suffix = encode(ROLE_SUFFIX)?;
        if role_prefix.len() != 3 || role_suffix.len() != 5 || role_suffix[2..] != role_prefix[..] {
            return Err(LoadError::Parse {
                path: dir.display().to_string(),
                what: "text tokenizer",
                message: format!(
                    "{ROLE_PREFIX:?} must be 3 tokens (got {role_prefix:?}) and {ROLE_SUFFIX:?} 5 tokens ending \
                     with them (got {role_suffix:?}): `<|im_start|>`, `<|im_end|>` must be added tokens and \
                     `assistant`, `\\n` single tokens"
                ),
            });
        }
        Ok(TtsPrompter { cfg, tokenizer, role_prefix, role_suffix })
    }

    /// The model's configuration.
    pub fn config(&self) -> &TtsConfig {
        &self.cfg
    }

    /// The speakers `build` accepts (sorted; matched case-insensitively).
    pub fn speakers(&self) -> Vec<String> {
        self.cfg.spk_id.keys().cloned().collect()
    }

    /// The languages `build` accepts (sorted, with `auto`; matched case-insensitively). Like
    /// upstream's `get_supported_languages`, the `*_dialect` entries are left out: they are
    /// reached through dialect speakers.
    pub fn languages(&self) -> Vec<String> {
        let mut langs: Vec<String> =
            self.cfg.codec_language_id.keys().filter(|k| !k.contains("dialect")).cloned().collect();
        langs.push("auto".to_string());
        langs.sort();
        langs.dedup();
        langs
    }

    /// Tokenizes `s` as the wrapper's processor does (no special tokens added; added tokens such
    /// as `<|im_start|>` in `s` are parsed as themselves).
    pub fn encode(&self, s: &str) -> Result<Vec<u32>, PromptError> {
        self.tokenizer.encode(s, false).map(|e| e.get_ids().to_vec()).map_err(|e| PromptError::Tokenizer(e.to_string()))
    }

    /// Builds the prompt of one utterance, as upstream's `generate_custom_voice(text, speaker,
    /// language, instruct, non_streaming_mode)` does.
    ///
    /// `speaker` and `language` are matched case-insensitively; language `auto` gives no
    /// language id (the `nothink` codec prefix). With language `chinese` or `auto`, a dialect
    /// speaker uses its dialect's language id. `instruct` (`None` or empty: none) is prepended
    /// when the model allows it and silently dropped otherwise (see
    /// [`TtsPrompt::instruct_used`]). `non_streaming_mode` puts the whole text in the prefill;
    /// otherwise the text is fed one token per generated frame.
    ///
    /// Leading whitespace that contains a line break is removed from `text`: it would merge with
    /// the template's `\n` token and break the positional layout (it carries no speech).
    pub fn build(
        &self,
        text: &str,
        speaker: &str,
        language: &str,
        instruct: Option<&str>,
        non_streaming_mode: bool,
    ) -> Result<TtsPrompt, PromptError> {
        if text.trim().is_empty() {
            return Err(PromptError::EmptyText);
        }
        let cfg = &self.cfg;

        let lang = language.to_lowercase();
        let mut language_id = if lang == "auto" {
            None
        } else {
            match cfg.codec_language_id.get(&lang) {
                Some(&id) if !lang.contains("dialect") => Some(id),
                _ => {
                    return Err(PromptError::UnknownLanguage { given: language.to_string(), allowed: self.languages() })
                }
            }
        };
        let spk = speaker.to_lowercase();
        let &spk_id = cfg
            .spk_id
            .get(&spk)
            .ok_or_else(|| PromptError::UnknownSpeaker { given: speaker.to_string(), allowed: self.speakers() })?;
        if lang == "chinese" || lang == "auto" {
            if let Some(Some(dialect)) = cfg.spk_is_dialect.get(&spk) {
                // Checked at load: every dialect names a codec_language_id key.
                language_id = cfg.codec_language_id.get(dialect).copied().or(language_id);
            }
        }

        let leading = &text[..text.len() - text.trim_start().len()];
        let text = if leading.contains(['\r', '\n']) { text.trim_start() } else { text };
        let ids = self.encode(&format!("<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"))?;
        let n = ids.len();
        if n < 9 || ids[..3] != self.role_prefix[..] || ids[n - 5..] != self.role_suffix[..] {
            return Err(PromptError::Tokenizer(
                "the text breaks the assistant template's layout (`<|im_start|>assistant\\n` … \
                 `<|im_end|>\\n<|im_start|>assistant\\n`)"
                    .into(),
            ));
        }
        let body = &ids[3..n - 5];

        let instruct = instruct.filter(|s| !s.is_empty());
        let instruct_used = instruct.is_some() && cfg.instruct_allowed();
        let mut text_track = Vec::new();
        let mut codec_track = Vec::new();
        if let (Some(ins), true) = (instruct, instruct_used) {
            let iids = self.encode(&format!("<|im_start|>user\n{ins}<|im_end|>\n"))?;
            codec_track.extend(std::iter::repeat_n(None, iids.len()));
            text_track.extend(iids);
        }
        text_track.extend_from_slice(&ids[..3]);
        codec_track.extend([None; 3]);

        let mut codec = match language_id {
            Some(lid) => vec![cfg.codec_think_id, cfg.codec_think_bos_id, lid, cfg.codec_think_eos_id],
            None => vec![cfg.codec_nothink_id, cfg.codec_think_bos_id, cfg.codec_think_eos_id],
        };
        codec.extend([spk_id, cfg.codec_pad_id, cfg.codec_bos_id]);
        // tts_pad × (len(c) - 2), tts_bos  |  c[..len(c) - 1]
        text_track.extend(std::iter::repeat_n(cfg.tts_pad_token_id, codec.len() - 2));
        text_track.push(cfg.tts_bos_token_id);
        codec_track.extend(codec[..codec.len() - 1].iter().map(|&c| Some(c)));

        let trailing_text = if non_streaming_mode {
            text_track.extend_from_slice(body);
            text_track.extend([cfg.tts_eos_token_id, cfg.tts_pad_token_id]);
            codec_track.extend(std::iter::repeat_n(Some(cfg.codec_pad_id), body.len() + 1));
            codec_track.push(Some(cfg.codec_bos_id));
            vec![cfg.tts_pad_token_id]
        } else {
            text_track.push(body[0]);
            codec_track.push(Some(cfg.codec_bos_id));
            let mut trailing = body[1..].to_vec();
            trailing.push(cfg.tts_eos_token_id);
            trailing
        };
        Ok(TtsPrompt { text_track, codec_track, trailing_text, text_tokens: body.len(), instruct_used })
    }

    /// The engine request for a built prompt: the first audio is decoded after the first frame
    /// (the lowest latency), later audio every `chunk_frames` (raised to at least 1).
    pub fn request(
        &self,
        prompt: TtsPrompt,
        max_frames: usize,
        sampling: SpeechSampling,
        chunk_frames: usize,
    ) -> SpeechRequest {
        SpeechRequest {
            text_track: prompt.text_track,
            codec_track: prompt.codec_track,
            trailing_text: prompt.trailing_text,
            max_frames,
            sampling,
            first_chunk_frames: 1,
            chunk_frames: chunk_frames.max(1),
        }
    }
}
