//! HuggingFace tokenizer folder: `tokenizer.json` (the `tokenizers` crate), the chat template
//! and special tokens of `tokenizer_config.json` (or `chat_template.jinja`), and the eos ids and
//! sampling defaults of `generation_config.json`.
//!
//! Chat templates are Jinja templates written for Python's Jinja2 as transformers configures
//! it (`trim_blocks`, `lstrip_blocks`, a `tojson` filter that is `json.dumps`, a
//! `raise_exception` function, Python string methods). They are rendered here with minijinja
//! plus `minijinja_contrib::pycompat`, configured the same way, so the rendering equals
//! `tokenizer.apply_chat_template(messages, tokenize=False, ...)` (checked against
//! `tests/fixtures/*/expected.json` by `models/tests/chat_template.rs`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::Value as Json;

use crate::LoadError;

/// One chat message as the template sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Sampling defaults a model ships in `generation_config.json`; `None` where it names none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    /// `do_sample`: transformers ignores temperature/top_p/top_k when this is `false`.
    pub do_sample: Option<bool>,
}

const TEMPLATE_NAME: &str = "chat_template";

/// A HuggingFace tokenizer folder: tokenizer, special tokens, chat template, eos ids.
pub struct HfTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// The compiled chat template (one template named [`TEMPLATE_NAME`]) when the folder has one.
    env: Option<Environment<'static>>,
    template_source: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
    eos_token_ids: Vec<u32>,
    generation: GenerationDefaults,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("pad_token", &self.pad_token)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("has_chat_template", &self.has_chat_template())
            .field("generation", &self.generation)
            .finish()
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, LoadError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LoadError::Io { path: path.display().to_string(), message: e.to_string() }),
    }
}

fn read_json_optional(path: &Path) -> Result<Option<Json>, LoadError> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    serde_json::from_str(&text).map(Some).map_err(|e| LoadError::Parse {
        path: path.display().to_string(),
        what: "JSON",
        message: e.to_string(),
    })
}

/// A special token in `tokenizer_config.json`: a string, an AddedToken object
/// (`{"content": ..}`), or null.
fn special_token(cfg: &Json, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template` in `tokenizer_config.json`: a string, or a list of `{name, template}`
/// (the "default" one is used; the first when none is named so).
fn config_chat_template(cfg: &Json, path: &Path) -> Result<Option<String>, LoadError> {
    let bad = |message: &str| LoadError::Parse {
        path: path.display().to_string(),
        what: "chat_template",
        message: message.to_string(),
    };
    match cfg.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let mut first = None;
            for item in list {
                let name = item.get("name").and_then(Json::as_str);
                let template = item
                    .get("template")
                    .and_then(Json::as_str)
                    .ok_or_else(|| bad("list entries must be {\"name\", \"template\"} objects"))?;
                if name == Some("default") {
                    return Ok(Some(template.to_string()));
                }
                first.get_or_insert(template);
            }
            Ok(first.map(str::to_string))
        }
        Some(_) => Err(bad("expected a string or a list of {name, template}")),
    }
}

/// `eos_token_id` as an int or a list of ints.
fn id_list(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Json::Array(a)) => a.iter().filter_map(Json::as_u64).map(|n| n as u32).collect(),
        _ => Vec::new(),
    }
}

fn generation_defaults(cfg: &Json) -> GenerationDefaults {
    let f = |k: &str| cfg.get(k).and_then(Json::as_f64).map(|x| x as f32);
    GenerationDefaults {
        temperature: f("temperature"),
        top_p: f("top_p"),
        top_k: cfg.get("top_k").and_then(Json::as_u64).map(|x| x as usize),
        repetition_penalty: f("repetition_penalty"),
        do_sample: cfg.get("do_sample").and_then(Json::as_bool),
    }
}

impl HfTokenizer {
    /// Loads `dir/tokenizer.json` (required), `dir/tokenizer_config.json`,
    /// `dir/chat_template.jinja` (takes precedence over the config's `chat_template`, as in
    /// transformers) and `dir/generation_config.json` (all optional).
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(LoadError::Io {
                path: tok_path.display().to_string(),
                message: "not found (Kiln needs a HuggingFace fast tokenizer, tokenizer.json)".into(),
            });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| LoadError::Parse {
            path: tok_path.display().to_string(),
            what: "tokenizer",
            message: e.to_string(),
        })?;

        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json_optional(&cfg_path)?.unwrap_or(Json::Null);
        let mut template = config_chat_template(&cfg, &cfg_path)?;
        if let Some(t) = read_optional(&dir.join("chat_template.jinja"))? {
            template = Some(t);
        }
        let gen = read_json_optional(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);
        let model_cfg = read_json_optional(&dir.join("config.json")).ok().flatten();

        let mut this = Self::from_parts(tokenizer, &cfg, template, &gen).map_err(|message| LoadError::Parse {
            path: if dir.join("chat_template.jinja").is_file() {
                dir.join("chat_template.jinja")
            } else {
                cfg_path.clone()
            }
            .display()
            .to_string(),
            what: "chat template",
            message,
        })?;
        if this.eos_token_ids.is_empty() {
            if let Some(m) = model_cfg {
                this.eos_token_ids = id_list(m.get("eos_token_id"));
            }
        }
        Ok(this)
    }

    /// Builds a tokenizer from its parts: `tokenizer_config` and `generation_config` as JSON
    /// (`Json::Null` when absent) and the chat template source. Errs when the template does
    /// not compile.
    pub fn from_parts(
        tokenizer: tokenizers::Tokenizer,
        tokenizer_config: &Json,
        chat_template: Option<String>,
        generation_config: &Json,
    ) -> Result<Self, String> {
        let env = match &chat_template {
            Some(source) => Some(build_env(source.clone()).map_err(|e| format!("{e:#}"))?),
            None => None,
        };
        let eos_token = special_token(tokenizer_config, "eos_token");
        let mut eos_token_ids = id_list(generation_config.get("eos_token_id"));
        if eos_token_ids.is_empty() {
            if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
                eos_token_ids.push(id);
            }
        }
        let mut seen = std::collections::HashSet::new();
        eos_token_ids.retain(|id| seen.insert(*id));
        Ok(Self {
            env,
            template_source: chat_template,
            bos_token: special_token(tokenizer_config, "bos_token"),
            eos_token,
            pad_token: special_token(tokenizer_config, "pad_token"),
            unk_token: special_token(tokenizer_config, "unk_token"),
            eos_token_ids,
            generation: generation_defaults(generation_config),
            tokenizer,
        })
    }

    /// Token ids of `text`. `add_special_tokens` runs the tokenizer's post-processor (e.g. a
    /// BOS token); special-token text in `text` (`<|im_start|>`) is always parsed as the token.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizer: {e}"))
    }

    /// Text of `ids`; invalid UTF-8 (a character split across ids) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        self.tokenizer.decode(ids, skip_special_tokens).unwrap_or_default()
    }

    /// Number of ids the tokenizer knows, added tokens included. A model's `vocab_size` may be
    /// larger (padded embedding rows).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Id of a token (a vocabulary entry in its byte-level form, or an added token).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The ids that end generation: `generation_config.json`'s `eos_token_id` (int or list),
    /// else the id of `tokenizer_config.json`'s `eos_token`, else `config.json`'s.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_ids.clone()
    }

    pub fn generation_defaults(&self) -> &GenerationDefaults {
        &self.generation
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    /// The id padding uses: `pad_token`'s, else the first eos id.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_id(t)).or_else(|| self.eos_token_ids.first().copied())
    }

    pub fn has_chat_template(&self) -> bool {
        self.env.is_some()
    }

    /// The chat template's Jinja source.
    pub fn chat_template(&self) -> Option<&str> {
        self.template_source.as_deref()
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Renders the model's chat template, as
    /// `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=..)`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, String> {
        self.render_chat_template(Value::from_serialize(messages), None, add_generation_prompt)
    }

    /// [`render_chat_template`](Self::render_chat_template) from JSON (OpenAI-style messages
    /// with `tool_calls`, `tool` messages; `tools` the list of tool schemas).
    pub fn render_chat_template_json(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        self.render_chat_template(
            Value::from_serialize(messages),
            tools.map(Value::from_serialize),
            add_generation_prompt,
        )
    }

    /// Renders the chat template with arbitrary message values (e.g. assistant `tool_calls`,
    /// `tool` messages) and an optional list of tool schemas (`tools`).
    pub fn render_chat_template(
        &self,
        messages: Value,
        tools: Option<Value>,
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let env = self.env.as_ref().ok_or_else(|| "this model has no chat template".to_string())?;
        let template = env.get_template(TEMPLATE_NAME).map_err(|e| e.to_string())?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        // transformers passes the special tokens that are set (special_tokens_map).
        for (key, token) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
        ] {
            if let Some(t) = token {
                ctx.insert(key, Value::from(t.as_str()));
            }
        }
        ctx.insert("messages", messages);
        ctx.insert("tools", tools.unwrap_or(Value::from(())));
        ctx.insert("documents", Value::from(()));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        template.render(ctx).map_err(|e| render_error(&e))
    }
}

fn render_error(e: &JinjaError) -> String {
    // raise_exception's message is the detail; keep the template location when there is one.
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => match e.line() {
            Some(line) => format!("chat template: {detail} (line {line})"),
            None => format!("chat template: {detail}"),
        },
        _ => format!("chat template: {e}"),
    }
}

/// A minijinja environment configured like transformers' Jinja2 sandbox, holding the one
/// template.
fn build_env(source: String) -> Result<Environment<'static>, JinjaError> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_template_owned(TEMPLATE_NAME, source)?;
    Ok(env)
}

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)`
/// as transformers' `tojson` filter does it (no HTML escaping, `", "` / `": "` separators).
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent = match kwargs.get::<Option<Value>>("indent")?.or(indent) {
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(n.max(0) as usize)),
            None => Some(v.as_str().unwrap_or_default().to_string()),
        },
        None => None,
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !v.is_none() => {
            let a = v.get_item_by_index(0)?;
            let b = v.get_item_by_index(1)?;
            (a.as_str().unwrap_or(",").to_string(), b.as_str().unwrap_or(":").to_string())
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    kwargs.assert_all_used()?;
    let opts = JsonOpts { indent, item_sep, key_sep, sort_keys, ensure_ascii };
    let mut out = String::new();
    py_json(value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn py_float(x: f64, out: &mut String) {
    if x.is_nan() {
        out.push_str("NaN");
    } else if x.is_infinite() {
        out.push_str(if x > 0.0 { "Infinity" } else { "-Infinity" });
    } else if x == x.trunc() && x.abs() < 1e16 {
        let _ = write!(out, "{x:.1}");
    } else {
        let _ = write!(out, "{x}");
    }
}

fn py_json(value: &Value, o: &JsonOpts, depth: usize, out: &mut String) -> Result<(), JinjaError> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                let _ = write!(out, "{value}");
            } else {
                py_float(f64::try_from(value.clone()).unwrap_or(f64::NAN), out);
            }
        }
        ValueKind::String => json_string(value.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if o.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                match key.as_str() {
                    Some(s) => json_string(s, o.ensure_ascii, out),
                    None => json_string(&key.to_string(), o.ensure_ascii, out),
                }
                out.push_str(&o.key_sep);
                py_json(&value.get_item(key)?, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                py_json(item, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        _ => json_string(&value.to_string(), o.ensure_ascii, out),
    }
    Ok(())
}

/// `strftime_now(format)`: the current UTC time formatted with the common `strftime` codes
/// (`%Y %m %d %b %B %a %A %H %M %S %y %j %%`); Llama 3 templates use `"%d %b %Y"`.
fn strftime_now(format: String) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime(secs, &format)
}

fn strftime(unix_secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86_400);
    let rem = unix_secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('j') => write!(out, "{yday:03}"),
            Some('b') => write!(out, "{}", &MONTHS[(month - 1) as usize][..3]),
            Some('B') => write!(out, "{}", MONTHS[(month - 1) as usize]),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('H') => write!(out, "{:02}", rem / 3600),
            Some('M') => write!(out, "{:02}", rem / 60 % 60),
            Some('S') => write!(out, "{:02}", rem % 60),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

impl kiln_actors::Detokenize for HfTokenizer {
    fn decode(&self, ids: &[u32]) -> String {
        HfTokenizer::decode(self, ids, true)
    }

    fn token_text(&self, id: u32) -> String {
        HfTokenizer::decode(self, &[id], false)
    }
}

/// Reads a byte-level BPE's `dir/vocab.json` (token -> id) and `dir/merges.txt` (one
/// `left right` pair per line, `#version` header allowed) into the JSON values a
/// `tokenizers` BPE model spec takes (`vocab`, `merges`).
pub(crate) fn read_bpe_files(dir: &Path) -> Result<(serde_json::Map<String, Json>, Vec<Json>), LoadError> {
    let parse_err = |path: &Path, what: &'static str, message: String| LoadError::Parse {
        path: path.display().to_string(),
        what,
        message,
    };
    let vocab_path = dir.join("vocab.json");
    let vocab = match crate::config::read_json(&vocab_path)? {
        Json::Object(m) => m,
        _ => return Err(parse_err(&vocab_path, "vocab.json", "expected an object of token -> id".into())),
    };
    let merges_path = dir.join("merges.txt");
    let text = std::fs::read_to_string(&merges_path)
        .map_err(|e| LoadError::Io { path: merges_path.display().to_string(), message: e.to_string() })?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push(serde_json::json!([a, b])),
            _ => return Err(parse_err(&merges_path, "merges.txt", format!("line {}: {line:?}", n + 1))),
        }
    }
    Ok((vocab, merges))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
    }

    fn raw_tokenizer() -> tokenizers::Tokenizer {
        tokenizers::Tokenizer::from_file(fixture("qwen2-tied-gqa").join("tokenizer.json")).unwrap()
    }

    fn with_template(template: &str) -> HfTokenizer {
        let cfg = json!({"eos_token": "<|im_end|>", "bos_token": {"content": "<|im_start|>", "special": true}});
        HfTokenizer::from_parts(raw_tokenizer(), &cfg, Some(template.to_string()), &Json::Null).unwrap()
    }

    fn user(content: &str) -> Vec<ChatMessage> {
        vec![ChatMessage { role: "user".into(), content: content.into() }]
    }

    #[test]
    fn loads_qwen_fixture() {
        let tok = HfTokenizer::load(&fixture("qwen2-tied-gqa")).unwrap();
        let im_end = tok.token_id("<|im_end|>").unwrap();
        let eot = tok.token_id("<|endoftext|>").unwrap();
        assert_eq!(tok.eos_token_ids(), vec![im_end, eot]);
        assert_eq!(tok.bos_token(), None);
        assert_eq!(tok.pad_token_id(), Some(eot));
        assert!(tok.has_chat_template());
        let g = tok.generation_defaults();
        assert_eq!(g.temperature, Some(0.7));
        assert_eq!(g.top_k, Some(20));
        assert_eq!(g.top_p, Some(0.8));
        assert_eq!(g.repetition_penalty, Some(1.05));
        assert_eq!(g.do_sample, Some(true));
    }

    #[test]
    fn loads_llama_fixture() {
        let tok = HfTokenizer::load(&fixture("llama-tiny")).unwrap();
        assert_eq!(tok.eos_token_ids(), vec![tok.token_id("<|im_end|>").unwrap()]);
        assert_eq!(tok.bos_token(), Some("<|im_start|>"));
        assert_eq!(tok.generation_defaults(), &GenerationDefaults::default());
    }

    #[test]
    fn missing_folder_names_the_file() {
        let err = HfTokenizer::load(Path::new("/nonexistent/kiln-model")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/kiln-model/tokenizer.json"), "{err}");
    }

    #[test]
    fn chat_template_list_takes_default() {
        let cfg = json!({"chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"}
        ]});
        let t = config_chat_template(&cfg, Path::new("x")).unwrap();
        assert_eq!(t.as_deref(), Some("D"));
        assert!(config_chat_template(&json!({"chat_template": 3}), Path::new("x")).is_err());
    }

    #[test]
    fn eos_from_config_when_no_generation_config() {
        let tok = with_template("{{ messages[0].content }}");
        assert_eq!(tok.eos_token_ids(), vec![tok.token_id("<|im_end|>").unwrap()]);
        assert_eq!(tok.bos_token(), Some("<|im_start|>"));
        let gen = json!({"eos_token_id": 5, "temperature": 0.6});
        let tok = HfTokenizer::from_parts(raw_tokenizer(), &Json::Null, None, &gen).unwrap();
        assert_eq!(tok.eos_token_ids(), vec![5]);
        assert_eq!(tok.generation_defaults().temperature, Some(0.6));
        assert!(!tok.has_chat_template());
        assert!(tok.apply_chat_template(&user("hi"), true).is_err());
    }

    #[test]
    fn raise_exception_is_an_error() {
        let tok = with_template(
            "{% if messages[0].role != 'system' %}{{ raise_exception('System message first!') }}{% endif %}",
        );
        let err = tok.apply_chat_template(&user("hi"), true).unwrap_err();
        assert!(err.contains("System message first!"), "{err}");
    }

    #[test]
    fn bad_template_fails_at_build() {
        let r = HfTokenizer::from_parts(raw_tokenizer(), &Json::Null, Some("{% if %}".into()), &Json::Null);
        assert!(r.is_err());
    }

    #[test]
    fn python_string_methods_and_tokens() {
        let tok = with_template(
            "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.content.startswith('  a') }}|{{ m.content.split(',')[1] }}{% endfor %}{{ eos_token }}",
        );
        let out = tok.apply_chat_template(&user("  a,b  "), false).unwrap();
        assert_eq!(out, "<|im_start|>A,B|True|b  <|im_end|>");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let tok =
            with_template("{% for m in messages %}\n    {% if true %}\n{{ m.role }}\n    {% endif %}\n{% endfor %}\n");
        assert_eq!(tok.apply_chat_template(&user("x"), false).unwrap(), "user\n");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let tok = with_template("{{ tools | tojson }}#{{ tools[0] | tojson(indent=2) }}");
        let tools = Value::from_serialize(json!([{"name": "f", "d": "<a & 'b'> é\n", "n": [1, 2.5, 3.0], "e": {}}]));
        let out = tok.render_chat_template(Value::from(Vec::<Value>::new()), Some(tools), false).unwrap();
        let (compact, indented) = out.split_once('#').unwrap();
        // Key order: serde_json's map order (sorted unless its preserve_order feature is on).
        let v: Json = serde_json::from_str(compact).unwrap();
        assert_eq!(v[0]["d"], "<a & 'b'> é\n");
        assert!(compact.contains("\"<a & 'b'> é\\n\""), "{compact}");
        assert!(compact.contains("[1, 2.5, 3.0]"), "{compact}");
        assert!(compact.contains("\"e\": {}"), "{compact}");
        assert!(indented.starts_with("{\n  \""), "{indented}");
        assert!(indented.contains("[\n    1,\n    2.5,\n    3.0\n  ]"), "{indented}");
    }

    #[test]
    fn strftime_formats_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        assert_eq!(strftime(1_722_000_309, "%d %b %Y %H:%M:%S %a %j %%"), "26 Jul 2024 13:25:09 Fri 208 %");
        assert_eq!(strftime(0, "%Y-%m-%d %A"), "1970-01-01 Thursday");
    }

    #[test]
    fn detokenize_trait() {
        use kiln_actors::Detokenize;
        let tok = HfTokenizer::load(&fixture("qwen2-tied-gqa")).unwrap();
        let ids = tok.encode("<|im_start|>Hello, world!<|im_end|>", false).unwrap();
        assert_eq!(Detokenize::decode(&tok, &ids), "Hello, world!");
        assert_eq!(tok.token_text(ids[0]), "<|im_start|>");
        let hello: String = ids[1..ids.len() - 1].iter().map(|&i| tok.token_text(i)).collect();
        assert_eq!(hello, "Hello, world!");
    }
}
