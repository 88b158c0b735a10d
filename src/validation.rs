//! Validation, TGI style: a wire body becomes a `ValidTextRequest` (parameters checked, prompt
//! tokenized), then, against the model's `EngineSpec`, a `ValidGeneration` (context checked,
//! `max_tokens` resolved). The actors only ever see valid requests.

use std::time::{Duration, Instant};

use kiln_actors::{EngineSpec, Generation, SamplingParams, TextRequest};
use kiln_models::ChatMessage;
use serde_json::Value;

use crate::api::types::{kind_of, CompletionBody, MessageContent, PromptInput, WireMessage};
use crate::backend::TextTokenizer;
use crate::error::ApiError;

pub const MAX_N: i64 = 16;
pub const MAX_STOP: usize = 16;
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// Which route's rules apply (chat and completions differ in `logprobs` and `echo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// The prompt a request asked for, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptSpec {
    Chat(Vec<ChatMessage>),
    Text(String),
    Tokens(Vec<u32>),
}

/// A request with checked parameters and a tokenized prompt; not yet checked against the
/// model's context.
#[derive(Debug, Clone)]
pub struct ValidTextRequest {
    pub endpoint: Endpoint,
    pub prompt: Vec<u32>,
    /// The prompt as text (for `echo`).
    pub prompt_text: String,
    pub params: SamplingParams,
    pub n: usize,
    /// As asked; None: the rest of the context.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Some(k): the sampled token's logprob and the top k.
    pub logprobs: Option<usize>,
    pub echo: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// The client's deadline, if it gave one (the server's cap applies in `finish`).
    pub timeout: Option<Duration>,
}

/// A request ready for the batcher.
#[derive(Debug, Clone)]
pub struct ValidGeneration {
    pub request: ValidTextRequest,
    pub generation: Generation,
    /// The deadline's length: the client's `timeout` capped by the server's.
    pub timeout: Duration,
}

/// A per-request `timeout` in seconds: finite and > 0 (the server's cap applies later).
pub fn request_timeout(param: &str, timeout: Option<f64>) -> Result<Option<Duration>, ApiError> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t > 0.0 => Ok(Some(Duration::try_from_secs_f64(t).unwrap_or(Duration::MAX))),
        Some(t) => Err(ApiError::param(param, format!("{param} must be a number of seconds > 0, got {t}"))),
    }
}

fn range_f(param: &str, v: Option<f64>, ok: impl Fn(f64) -> bool, rule: &str) -> Result<Option<f32>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x.is_finite() && ok(x) => Ok(Some(x as f32)),
        Some(x) => Err(ApiError::param(param, format!("{param} must be {rule}, got {x}"))),
    }
}

/// Checks a body's parameters and builds its prompt (`Endpoint` decides how `logprobs` and
/// `echo` read). `prompt` must come from `chat_prompt`/`completion_prompt` (or `/v1/generate`).
pub fn validate(
    body: &CompletionBody,
    endpoint: Endpoint,
    prompt: PromptSpec,
    tok: &dyn TextTokenizer,
) -> Result<ValidTextRequest, ApiError> {
    let defaults = tok.generation_defaults();
    let temperature = range_f("temperature", body.temperature, |x| (0.0..=2.0).contains(&x), "between 0 and 2")?
        .or(defaults.temperature)
        .unwrap_or(1.0);
    let top_p = range_f("top_p", body.top_p, |x| x > 0.0 && x <= 1.0, "in (0, 1]")?.or(defaults.top_p).unwrap_or(1.0);
    let top_k = match body.top_k {
        Some(k) if k < 0 => return Err(ApiError::param("top_k", format!("top_k must be >= 0 (0 disables), got {k}"))),
        Some(k) => k as usize,
        None => defaults.top_k.unwrap_or(0),
    };
    let min_p = range_f("min_p", body.min_p, |x| (0.0..=1.0).contains(&x), "in [0, 1]")?.unwrap_or(0.0);
    let repetition_penalty =
        range_f("repetition_penalty", body.repetition_penalty, |x| x > 0.0 && x <= 2.0, "in (0, 2]")?
            .or(defaults.repetition_penalty)
            .unwrap_or(1.0);
    let presence_penalty =
        range_f("presence_penalty", body.presence_penalty, |x| (-2.0..=2.0).contains(&x), "between -2 and 2")?
            .unwrap_or(0.0);
    let frequency_penalty =
        range_f("frequency_penalty", body.frequency_penalty, |x| (-2.0..=2.0).contains(&x), "between -2 and 2")?
            .unwrap_or(0.0);
    let n = match body.n {
        None => 1,
        Some(n) if (1..=MAX_N).contains(&n) => n as usize,
        Some(n) => return Err(ApiError::param("n", format!("n must be between 1 and {MAX_N}, got {n}"))),
    };
    let max_tokens = match (body.max_completion_tokens, body.max_tokens) {
        (Some(m), _) if m <= 0 => {
            return Err(ApiError::param(
                "max_completion_tokens",
                format!("max_completion_tokens must be at least 1, got {m}"),
            ))
        }
        (Some(m), _) => Some(m as usize),
        (None, Some(m)) if m <= 0 => {
            return Err(ApiError::param("max_tokens", format!("max_tokens must be at least 1, got {m}")))
        }
        (None, Some(m)) => Some(m as usize),
        (None, None) => None,
    };
    let stop = body.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOP {
        return Err(ApiError::param("stop", format!("at most {MAX_STOP} stop strings, got {}", stop.len())));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::param("stop", "stop strings must not be empty"));
    }
    let stop_token_ids = token_ids("stop_token_ids", body.stop_token_ids.as_deref().unwrap_or(&[]), tok)?;
    let logprobs = logprobs(body, endpoint)?;
    let echo = body.echo.unwrap_or(false);
    if echo && endpoint == Endpoint::Chat {
        return Err(ApiError::param("echo", "echo is only supported by /v1/completions"));
    }
    let include_usage = body.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let timeout = request_timeout("timeout", body.timeout)?;
    if body.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::Unsupported("tools (function calling) are not supported yet".into()));
    }
    match body.response_format.as_ref().map(|f| f.get("type").and_then(Value::as_str)) {
        None | Some(Some("text")) => {}
        Some(kind) => {
            return Err(ApiError::Unsupported(format!(
                "response_format {} is not supported yet: only {{\"type\": \"text\"}}",
                kind.unwrap_or("without a type")
            )))
        }
    }

    let (prompt, prompt_text) = tokenize_prompt(prompt, tok)?;
    if prompt.is_empty() {
        return Err(ApiError::param(param_of(endpoint), "the prompt is empty (it encodes to no tokens)"));
    }
    Ok(ValidTextRequest {
        endpoint,
        prompt,
        prompt_text,
        params: SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            seed: body.seed.map(|s| s as u64),
        },
        n,
        max_tokens,
        stop,
        stop_token_ids,
        ignore_eos: body.ignore_eos.unwrap_or(false),
        logprobs,
        echo,
        stream: body.stream.unwrap_or(false),
        include_usage,
        timeout,
    })
}

fn param_of(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completion => "prompt",
    }
}

fn logprobs(body: &CompletionBody, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
    let top = match body.top_logprobs {
        None => None,
        Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::param(
                "top_logprobs",
                format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
            ))
        }
    };
    match (endpoint, &body.logprobs) {
        (_, None | Some(Value::Null)) | (Endpoint::Chat, Some(Value::Bool(false))) => {
            if top.is_some_and(|k| k > 0) {
                Err(ApiError::param("top_logprobs", "top_logprobs requires logprobs: true"))
            } else {
                Ok(None)
            }
        }
        (Endpoint::Chat, Some(Value::Bool(true))) => Ok(Some(top.unwrap_or(0))),
        (Endpoint::Completion, Some(Value::Number(k))) => match k.as_i64() {
            Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Ok(Some(k as usize)),
            _ => Err(ApiError::param(
                "logprobs",
                format!("logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
            )),
        },
        (Endpoint::Chat, Some(v)) => Err(ApiError::InvalidType {
            param: Some("logprobs".into()),
            message: format!("logprobs must be a boolean (use top_logprobs for alternatives), not {}", kind_of(v)),
        }),
        (Endpoint::Completion, Some(v)) => Err(ApiError::InvalidType {
            param: Some("logprobs".into()),
            message: format!("logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}, not {}", kind_of(v)),
        }),
    }
}

fn token_ids(param: &str, ids: &[i64], tok: &dyn TextTokenizer) -> Result<Vec<u32>, ApiError> {
    let vocab = tok.vocab_size().map(|v| v as i64).unwrap_or(u32::MAX as i64 + 1);
    ids.iter()
        .map(|&id| {
            if (0..vocab).contains(&id) {
                Ok(id as u32)
            } else {
                Err(ApiError::param(param, format!("token id {id} is outside the vocabulary (0..{vocab})")))
            }
        })
        .collect()
}

/// `messages` as the chat template sees them.
pub fn chat_messages(messages: &[WireMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "user" | "assistant" | "tool" => m.role.clone(),
                "developer" => "system".to_string(),
                other => {
                    return Err(ApiError::param(
                        &format!("messages[{i}].role"),
                        format!("unknown role {other:?}: expected system, developer, user, assistant or tool"),
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            ("text", None) => {
                                return Err(ApiError::param(
                                    &format!("messages[{i}].content[{j}].text"),
                                    "a text part needs a string `text`",
                                ))
                            }
                            (other, _) => {
                                return Err(ApiError::Unsupported(format!(
                                    "messages[{i}].content[{j}]: content parts of type {other:?} are not supported by this model (text only)"
                                )))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

/// `prompt` of `/v1/completions`: one prompt (a batch of several is refused for now).
pub fn completion_prompt(prompt: Option<&PromptInput>, tok: &dyn TextTokenizer) -> Result<PromptSpec, ApiError> {
    let empty = || ApiError::param("prompt", "prompt must not be empty");
    let batch = |n: usize| {
        ApiError::Unsupported(format!(
            "prompt holds {n} prompts; batched prompts are not supported yet: send one prompt per request (use `n` for several completions)"
        ))
    };
    match prompt {
        None => Err(ApiError::InvalidType { param: Some("prompt".into()), message: "missing field `prompt`".into() }),
        Some(PromptInput::Text(t)) if t.is_empty() => Err(empty()),
        Some(PromptInput::Text(t)) => Ok(PromptSpec::Text(t.clone())),
        Some(PromptInput::Texts(v)) => match v.as_slice() {
            [] => Err(empty()),
            [t] if t.is_empty() => Err(empty()),
            [t] => Ok(PromptSpec::Text(t.clone())),
            _ => Err(batch(v.len())),
        },
        Some(PromptInput::Tokens(ids)) => Ok(PromptSpec::Tokens(token_ids("prompt", ids, tok)?)),
        Some(PromptInput::TokenLists(lists)) => match lists.as_slice() {
            [] => Err(empty()),
            [ids] if ids.is_empty() => Err(empty()),
            [ids] => Ok(PromptSpec::Tokens(token_ids("prompt", ids, tok)?)),
            _ => Err(batch(lists.len())),
        },
    }
}

fn tokenize_prompt(prompt: PromptSpec, tok: &dyn TextTokenizer) -> Result<(Vec<u32>, String), ApiError> {
    match prompt {
        PromptSpec::Chat(messages) => {
            let text = render_chat(&messages, tok, true)?;
            let ids = tok.encode(&text, false).map_err(|e| ApiError::param("messages", e))?;
            Ok((ids, text))
        }
        PromptSpec::Text(text) => {
            let ids = tok.encode(&text, true).map_err(|e| ApiError::param("prompt", e))?;
            Ok((ids, text))
        }
        PromptSpec::Tokens(ids) => {
            let text = tok.decode(&ids, false);
            Ok((ids, text))
        }
    }
}

/// Renders messages through the model's chat template.
pub fn render_chat(
    messages: &[ChatMessage],
    tok: &dyn TextTokenizer,
    add_generation_prompt: bool,
) -> Result<String, ApiError> {
    if !tok.has_chat_template() {
        return Err(ApiError::Unsupported(
            "this model has no chat template: use /v1/completions with a prompt".to_string(),
        ));
    }
    tok.apply_chat_template(messages, add_generation_prompt)
        .map_err(|e| ApiError::param("messages", format!("the chat template failed: {e}")))
}

impl ValidTextRequest {
    /// Checks the prompt and `max_tokens` against the model's context (and KV pool) and builds
    /// the batcher's `Generation`. The request's `timeout`, capped by the server's
    /// `max_timeout`, becomes its deadline.
    pub fn finish(self, spec: &EngineSpec, max_timeout: Duration) -> Result<ValidGeneration, ApiError> {
        let kv_tokens = spec.num_blocks.saturating_mul(spec.block_size);
        let context = spec.max_model_len.min(kv_tokens);
        let what = if context < spec.max_model_len {
            format!("{context} tokens (the KV cache's capacity)")
        } else {
            format!("{context} tokens")
        };
        let p = self.prompt.len();
        let param = param_of(self.endpoint);
        if p >= context {
            return Err(ApiError::ContextLength {
                param: param.to_string(),
                message: format!(
                    "the prompt has {p} tokens but the model's context is {what}, which leaves no room to generate"
                ),
            });
        }
        let max_new_tokens = match self.max_tokens {
            Some(m) if p + m > context => {
                return Err(ApiError::ContextLength {
                    param: "max_tokens".to_string(),
                    message: format!(
                        "the prompt ({p} tokens) + max_tokens ({m}) = {} tokens exceeds the model's context of {what}",
                        p + m
                    ),
                })
            }
            Some(m) => m,
            None => context - p,
        };
        let choices = (0..self.n)
            .map(|i| {
                let mut params = self.params.clone();
                // Same seed, different choices: each choice gets its own stream.
                params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
                TextRequest {
                    prompt: self.prompt.clone(),
                    params,
                    max_new_tokens,
                    stop_token_ids: self.stop_token_ids.clone(),
                    ignore_eos: self.ignore_eos,
                    logprobs: self.logprobs,
                }
            })
            .collect();
        let timeout = self.timeout.map_or(max_timeout, |t| t.min(max_timeout));
        let deadline = Instant::now().checked_add(timeout);
        let generation = Generation { choices, stop: self.stop.clone(), deadline };
        Ok(ValidGeneration { request: self, generation, timeout })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeTokenizer;

    fn body(v: Value) -> CompletionBody {
        serde_json::from_value(v).unwrap()
    }

    fn chat(v: Value) -> Result<ValidTextRequest, ApiError> {
        let b = body(v);
        let tok = FakeTokenizer::default();
        let msgs = chat_messages(b.messages.as_deref().unwrap_or(&[]))?;
        validate(&b, Endpoint::Chat, PromptSpec::Chat(msgs), &tok)
    }

    fn completion(v: Value) -> Result<ValidTextRequest, ApiError> {
        let b = body(v);
        let tok = FakeTokenizer::default();
        let p = completion_prompt(b.prompt.as_ref(), &tok)?;
        validate(&b, Endpoint::Completion, p, &tok)
    }

    fn spec(max_model_len: usize) -> EngineSpec {
        EngineSpec { block_size: 16, num_blocks: 1024, max_model_len, max_batch_tokens: 256, max_running: 8 }
    }

    fn param_err(r: Result<ValidTextRequest, ApiError>) -> String {
        r.unwrap_err().param_name().unwrap_or("").to_string()
    }

    #[test]
    fn defaults_come_from_the_model_then_openai() {
        let r = completion(serde_json::json!({"prompt": "hi"})).unwrap();
        assert_eq!(r.params.temperature, 1.0);
        assert_eq!(r.params.top_p, 1.0);
        let tok = FakeTokenizer { defaults_temperature: Some(0.7), ..FakeTokenizer::default() };
        let b = body(serde_json::json!({"prompt": "hi"}));
        let r = validate(&b, Endpoint::Completion, PromptSpec::Text("hi".into()), &tok).unwrap();
        assert_eq!(r.params.temperature, 0.7);
    }

    #[test]
    fn out_of_range_parameters_name_their_field() {
        let m = serde_json::json!([{"role": "user", "content": "x"}]);
        for (field, value) in [
            ("temperature", serde_json::json!(2.5)),
            ("temperature", serde_json::json!(-0.1)),
            ("top_p", serde_json::json!(0.0)),
            ("top_p", serde_json::json!(1.5)),
            ("top_k", serde_json::json!(-1)),
            ("min_p", serde_json::json!(1.5)),
            ("repetition_penalty", serde_json::json!(0.0)),
            ("presence_penalty", serde_json::json!(3.0)),
            ("frequency_penalty", serde_json::json!(-2.5)),
            ("n", serde_json::json!(0)),
            ("n", serde_json::json!(17)),
            ("max_tokens", serde_json::json!(0)),
            ("top_logprobs", serde_json::json!(21)),
        ] {
            let mut v = serde_json::json!({"messages": m});
            v[field] = value.clone();
            if field == "top_logprobs" {
                v["logprobs"] = serde_json::json!(true);
            }
            assert_eq!(param_err(chat(v)), field, "{field} = {value}");
        }
    }

    #[test]
    fn logprobs_read_per_endpoint() {
        let m = serde_json::json!([{"role": "user", "content": "x"}]);
        let r = chat(serde_json::json!({"messages": m, "logprobs": true, "top_logprobs": 3})).unwrap();
        assert_eq!(r.logprobs, Some(3));
        assert!(chat(serde_json::json!({"messages": m, "logprobs": 2})).is_err());
        let r = completion(serde_json::json!({"prompt": "x", "logprobs": 2})).unwrap();
        assert_eq!(r.logprobs, Some(2));
        assert!(completion(serde_json::json!({"prompt": "x", "logprobs": 21})).is_err());
    }

    #[test]
    fn prompts_of_every_form() {
        let r = completion(serde_json::json!({"prompt": ["ab"]})).unwrap();
        assert_eq!(r.prompt, vec![97, 98]);
        let r = completion(serde_json::json!({"prompt": [97, 98]})).unwrap();
        assert_eq!(r.prompt_text, "ab");
        let r = completion(serde_json::json!({"prompt": [[97]]})).unwrap();
        assert_eq!(r.prompt, vec![97]);
        assert_eq!(param_err(completion(serde_json::json!({"prompt": ""}))), "prompt");
        assert_eq!(param_err(completion(serde_json::json!({"prompt": []}))), "prompt");
        assert_eq!(param_err(completion(serde_json::json!({"prompt": [999999]}))), "prompt");
        assert!(matches!(completion(serde_json::json!({"prompt": ["a", "b"]})), Err(ApiError::Unsupported(_))));
    }

    #[test]
    fn chat_messages_are_checked() {
        assert_eq!(param_err(chat(serde_json::json!({"messages": []}))), "messages");
        let r = chat(serde_json::json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})).unwrap();
        assert!(r.prompt_text.contains("ab"));
        assert!(matches!(
            chat(
                serde_json::json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
            ),
            Err(ApiError::Unsupported(_))
        ));
        assert_eq!(
            param_err(chat(serde_json::json!({"messages": [{"role": "wizard", "content": "x"}]}))),
            "messages[0].role"
        );
    }

    #[test]
    fn context_limits_give_the_numbers() {
        let r = completion(serde_json::json!({"prompt": "abcd", "max_tokens": 10})).unwrap();
        let e = r.clone().finish(&spec(12), Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.code(), "context_length_exceeded");
        assert!(e.to_string().contains("4 tokens") && e.to_string().contains("14"), "{e}");
        let e = r.clone().finish(&spec(4), Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.param_name(), Some("prompt"));
        let g = r.finish(&spec(100), Duration::from_secs(1)).unwrap();
        assert_eq!(g.generation.choices[0].max_new_tokens, 10);
        let r = completion(serde_json::json!({"prompt": "abcd", "n": 2, "seed": 7})).unwrap();
        let g = r.finish(&spec(100), Duration::from_secs(1)).unwrap();
        assert_eq!(g.generation.choices.len(), 2);
        assert_eq!(g.generation.choices[0].max_new_tokens, 96);
        assert_eq!(g.generation.choices[1].params.seed, Some(8));
    }

    #[test]
    fn timeout_is_checked_and_capped_by_the_server() {
        for bad in [0.0, -1.0] {
            assert_eq!(param_err(completion(serde_json::json!({"prompt": "a", "timeout": bad}))), "timeout");
        }
        let r = completion(serde_json::json!({"prompt": "a", "timeout": 0.25})).unwrap();
        assert_eq!(r.timeout, Some(Duration::from_millis(250)));
        let g = r.finish(&spec(100), Duration::from_secs(10)).unwrap();
        assert_eq!(g.timeout, Duration::from_millis(250));
        let r = completion(serde_json::json!({"prompt": "a", "timeout": 1e9})).unwrap();
        assert_eq!(r.finish(&spec(100), Duration::from_secs(10)).unwrap().timeout, Duration::from_secs(10));
        let r = completion(serde_json::json!({"prompt": "a"})).unwrap();
        let g = r.finish(&spec(100), Duration::from_secs(7)).unwrap();
        assert_eq!(g.timeout, Duration::from_secs(7));
        assert!(g.generation.deadline.is_some());
    }

    #[test]
    fn stop_lists_are_bounded() {
        let many: Vec<String> = (0..17).map(|i| i.to_string()).collect();
        assert_eq!(param_err(completion(serde_json::json!({"prompt": "a", "stop": many}))), "stop");
        assert_eq!(param_err(completion(serde_json::json!({"prompt": "a", "stop": ""}))), "stop");
        let r = completion(serde_json::json!({"prompt": "a", "stop": "x"})).unwrap();
        assert_eq!(r.stop, vec!["x".to_string()]);
    }
}
