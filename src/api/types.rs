//! Wire types: what clients send. Numbers are parsed wide (i64/f64) so out-of-range values
//! reach validation and get a message naming the field, not a serde type error.

use serde::Deserialize;
use serde_json::Value;

/// The body of `/v1/chat/completions`, `/v1/completions`, a WebSocket `generate` message, and
/// `/v1/generate`'s `sampling_params`: one struct, so every route accepts the same fields.
/// Unknown fields are ignored (OpenAI clients send many).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CompletionBody {
    pub model: Option<String>,
    pub messages: Option<Vec<WireMessage>>,
    pub prompt: Option<PromptInput>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<StopInput>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub ignore_eos: Option<bool>,
    pub n: Option<i64>,
    /// Chat: a bool (with `top_logprobs`); completions: an int 0..=20.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Seconds the request may take (queueing included); capped by the server's
    /// `request_timeout_s`. Past it: 408 (or a `timeout` finish when streaming).
    pub timeout: Option<f64>,
    /// Accepted and ignored.
    pub user: Option<String>,
    /// Not supported yet: refused when non-empty rather than silently ignored.
    pub tools: Option<Vec<Value>>,
    /// Only `{"type": "text"}` is supported.
    pub response_format: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WireMessage {
    pub role: String,
    /// `null` (an assistant turn with tool calls) reads as empty.
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// A string, or an array of `{type:"text", text}` parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "Value")]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone)]
pub struct ContentPart {
    pub kind: String,
    pub text: Option<String>,
}

impl TryFrom<Value> for MessageContent {
    type Error = String;
    fn try_from(v: Value) -> Result<Self, String> {
        match v {
            Value::String(s) => Ok(MessageContent::Text(s)),
            Value::Array(parts) => parts
                .into_iter()
                .map(|p| {
                    let kind = p
                        .get("type")
                        .and_then(Value::as_str)
                        .ok_or("each content part must be an object with a string `type`".to_string())?;
                    Ok(ContentPart {
                        kind: kind.to_string(),
                        text: p.get("text").and_then(Value::as_str).map(str::to_string),
                    })
                })
                .collect::<Result<_, String>>()
                .map(MessageContent::Parts),
            other => Err(format!("content must be a string or an array of content parts, not {}", kind_of(&other))),
        }
    }
}

/// `prompt`: a string, an array of strings, an array of token ids, or an array of those.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "Value")]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

impl TryFrom<Value> for PromptInput {
    type Error = String;
    fn try_from(v: Value) -> Result<Self, String> {
        const SHAPE: &str = "prompt must be a string, an array of strings, or an array of token ids";
        match v {
            Value::String(s) => Ok(PromptInput::Text(s)),
            Value::Array(items) if items.is_empty() => Ok(PromptInput::Texts(Vec::new())),
            Value::Array(items) => match &items[0] {
                Value::String(_) => items
                    .into_iter()
                    .map(|i| match i {
                        Value::String(s) => Ok(s),
                        _ => Err(SHAPE.to_string()),
                    })
                    .collect::<Result<_, _>>()
                    .map(PromptInput::Texts),
                Value::Number(_) => token_ids(&items).map(PromptInput::Tokens),
                Value::Array(_) => items
                    .iter()
                    .map(|i| match i {
                        Value::Array(ids) => token_ids(ids),
                        _ => Err(SHAPE.to_string()),
                    })
                    .collect::<Result<_, _>>()
                    .map(PromptInput::TokenLists),
                _ => Err(SHAPE.to_string()),
            },
            _ => Err(SHAPE.to_string()),
        }
    }
}

pub(crate) fn token_ids(items: &[Value]) -> Result<Vec<i64>, String> {
    items.iter().map(|i| i.as_i64().ok_or_else(|| format!("token ids must be integers, not {i}"))).collect()
}

/// `stop`: a string or an array of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

impl StopInput {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopInput::One(s) => vec![s],
            StopInput::Many(v) => v,
        }
    }
}

/// `/v1/generate` (the Runpod seed examples' input): `text`, `prompt` or `messages`, an
/// optional `system_prompt`, and `sampling_params`. A Runpod envelope `{"input": {...}}`
/// is unwrapped.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerateBody {
    pub model: Option<String>,
    pub text: Option<String>,
    pub prompt: Option<PromptInput>,
    pub messages: Option<Vec<WireMessage>>,
    pub system_prompt: Option<String>,
    pub sampling_params: Option<CompletionBody>,
    pub stream: Option<bool>,
    /// As in `CompletionBody` (also accepted inside `sampling_params`).
    pub timeout: Option<f64>,
    pub input: Option<Value>,
}

/// `/tokenize`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenizeBody {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<WireMessage>>,
    pub add_special_tokens: Option<bool>,
    /// With `messages`: end with the assistant turn's opening (default true).
    pub add_generation_prompt: Option<bool>,
}

/// `/detokenize`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DetokenizeBody {
    pub model: Option<String>,
    pub tokens: Vec<i64>,
}

pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
