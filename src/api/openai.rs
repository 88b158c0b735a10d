//! `/v1/chat/completions` and `/v1/completions`: JSON responses and SSE streams in OpenAI's
//! shapes. The SSE stream owns the event receiver, so a client that goes away drops it and
//! its sequences are cancelled.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use kiln_actors::{ClientEvent, FinishReason, TopLogprob};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::types::CompletionBody;
use super::ApiJson;
use crate::error::ApiError;
use crate::server::{unix_now, AppState, ModelEntry};
use crate::validation::{
    chat_messages, completion_prompt, validate, Endpoint, PromptSpec, ValidGeneration, ValidTextRequest,
};

pub async fn chat_completions(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CompletionBody>,
) -> Result<Response, ApiError> {
    let entry = state.resolve_model(body.model.as_deref())?;
    let tok = entry.text_tokenizer()?.as_ref();
    let messages = body.messages.as_deref().ok_or_else(|| missing("messages"))?;
    let prompt = PromptSpec::Chat(chat_messages(messages)?);
    let valid = validate(&body, Endpoint::Chat, prompt, tok)?;
    respond(&state, &entry, valid, Shape::Chat).await
}

pub async fn completions(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CompletionBody>,
) -> Result<Response, ApiError> {
    let entry = state.resolve_model(body.model.as_deref())?;
    let tok = entry.text_tokenizer()?.as_ref();
    let prompt = completion_prompt(body.prompt.as_ref(), tok)?;
    let valid = validate(&body, Endpoint::Completion, prompt, tok)?;
    respond(&state, &entry, valid, Shape::Completion).await
}

pub fn missing(field: &str) -> ApiError {
    ApiError::InvalidType { param: Some(field.to_string()), message: format!("missing field `{field}`") }
}

/// Loads the model if needed, checks the context, and submits.
pub async fn submit(
    state: &AppState,
    entry: &Arc<ModelEntry>,
    valid: ValidTextRequest,
) -> Result<(ValidGeneration, mpsc::Receiver<ClientEvent>), ApiError> {
    let backend = entry.backend().await?;
    let g = valid.finish(&backend.spec(), state.limits.request_timeout)?;
    let rx = backend.generate(g.generation.clone()).await?;
    Ok((g, rx))
}

/// The response format of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Chat,
    Completion,
    /// `/v1/generate`: `{text, finish_reason, usage}`.
    Generate,
}

pub async fn respond(
    state: &AppState,
    entry: &Arc<ModelEntry>,
    valid: ValidTextRequest,
    shape: Shape,
) -> Result<Response, ApiError> {
    let (g, rx) = submit(state, entry, valid).await?;
    let meta = ResponseMeta::new(shape, &entry.name);
    if g.request.stream {
        Ok(Sse::new(event_stream(meta, g, rx)).keep_alive(KeepAlive::default()).into_response())
    } else {
        let (choices, prompt_tokens) = collect(rx, g.request.n, g.timeout).await?;
        Ok(Json(meta.response(&g.request, &choices, prompt_tokens)).into_response())
    }
}

/// One generated token, as collected for a JSON response.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub text: String,
    pub token: u32,
    pub token_text: String,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Default)]
pub struct ChoiceResult {
    pub text: String,
    pub tokens: Vec<TokenInfo>,
    pub finish_reason: Option<FinishReason>,
    pub completion_tokens: usize,
}

/// Waits for every choice to finish; the first choice error fails the request, and a choice
/// ended by the deadline makes it a 408 (`timeout` is the deadline's length, for the message).
pub async fn collect(
    mut rx: mpsc::Receiver<ClientEvent>,
    n: usize,
    timeout: std::time::Duration,
) -> Result<(Vec<ChoiceResult>, usize), ApiError> {
    let mut choices = vec![ChoiceResult::default(); n];
    let mut prompt_tokens = 0;
    let mut open = n;
    while open > 0 {
        match rx.recv().await {
            None => return Err(ApiError::Internal("the generation ended without finishing".into())),
            Some(ClientEvent::Token { index, text, token, token_text, logprob, top_logprobs }) => {
                if let Some(c) = choices.get_mut(index) {
                    c.text.push_str(&text);
                    c.tokens.push(TokenInfo { text, token, token_text, logprob, top_logprobs });
                }
            }
            Some(ClientEvent::Done { finish_reason: FinishReason::Timeout, .. }) => {
                // The request actor has cancelled every choice (their blocks are freed).
                return Err(ApiError::Timeout { timeout_s: timeout.as_secs_f64() });
            }
            Some(ClientEvent::Done { index, finish_reason, prompt_tokens: p, completion_tokens }) => {
                prompt_tokens = p;
                if let Some(c) = choices.get_mut(index) {
                    c.finish_reason = Some(finish_reason);
                    c.completion_tokens = completion_tokens;
                }
                open -= 1;
            }
            Some(ClientEvent::Error { index, message }) => {
                return Err(ApiError::Internal(format!("choice {index} failed: {message}")))
            }
        }
    }
    Ok((choices, prompt_tokens))
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

fn top_alternatives_chat(top: &[TopLogprob]) -> Vec<Value> {
    top.iter().map(|a| json!({"token": a.text, "logprob": a.logprob, "bytes": a.text.as_bytes()})).collect()
}

/// One token of a chat `logprobs.content` list.
pub fn chat_logprob(t: &TokenInfo) -> Value {
    json!({
        "token": t.token_text,
        "logprob": t.logprob,
        "bytes": t.token_text.as_bytes(),
        "top_logprobs": top_alternatives_chat(&t.top_logprobs),
    })
}

/// A completions `logprobs` object; `offset` is where the first token's text starts.
pub fn completion_logprobs(tokens: &[TokenInfo], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.text.chars().count();
    }
    json!({
        "tokens": tokens.iter().map(|t| t.token_text.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens
            .iter()
            .map(|t| t.top_logprobs.iter().map(|a| (a.text.clone(), json!(a.logprob))).collect::<serde_json::Map<_, _>>())
            .collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

/// What every chunk or response of one request shares.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub shape: Shape,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ResponseMeta {
    pub fn new(shape: Shape, model: &str) -> ResponseMeta {
        let prefix = match shape {
            Shape::Chat => "chatcmpl",
            Shape::Completion => "cmpl",
            Shape::Generate => "gen",
        };
        ResponseMeta {
            shape,
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: unix_now(),
            model: model.to_string(),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.shape, chunk) {
            (Shape::Chat, false) => "chat.completion",
            (Shape::Chat, true) => "chat.completion.chunk",
            _ => "text_completion",
        }
    }

    /// A non-streaming response.
    pub fn response(&self, req: &ValidTextRequest, choices: &[ChoiceResult], prompt_tokens: usize) -> Value {
        let completion_tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
        let finish = |c: &ChoiceResult| c.finish_reason.map(|f| f.as_str());
        match self.shape {
            Shape::Chat => json!({
                "id": self.id,
                "object": self.object(false),
                "created": self.created,
                "model": self.model,
                "choices": choices.iter().enumerate().map(|(i, c)| json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": req.logprobs.map(|_| json!({"content": c.tokens.iter().map(chat_logprob).collect::<Vec<_>>()})),
                    "finish_reason": finish(c),
                })).collect::<Vec<_>>(),
                "usage": usage(prompt_tokens, completion_tokens),
            }),
            Shape::Completion => {
                let echo = if req.echo { req.prompt_text.as_str() } else { "" };
                json!({
                    "id": self.id,
                    "object": self.object(false),
                    "created": self.created,
                    "model": self.model,
                    "choices": choices.iter().enumerate().map(|(i, c)| json!({
                        "index": i,
                        "text": format!("{echo}{}", c.text),
                        "logprobs": req.logprobs.map(|_| completion_logprobs(&c.tokens, echo.chars().count())),
                        "finish_reason": finish(c),
                    })).collect::<Vec<_>>(),
                    "usage": usage(prompt_tokens, completion_tokens),
                })
            }
            Shape::Generate => {
                let c = choices.first().cloned().unwrap_or_default();
                json!({
                    "id": self.id,
                    "model": self.model,
                    "text": c.text,
                    "finish_reason": finish(&c),
                    "usage": usage(prompt_tokens, completion_tokens),
                })
            }
        }
    }

    fn chunk(&self, choice: Value, include_usage: bool) -> Event {
        let mut v = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if include_usage {
            v["usage"] = Value::Null;
        }
        data(&v)
    }
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// The SSE events of one request, ending with `data: [DONE]`.
pub fn event_stream(
    meta: ResponseMeta,
    g: ValidGeneration,
    rx: mpsc::Receiver<ClientEvent>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    async_stream::stream! {
        let mut rx = rx;
        let req = g.request;
        let with_usage = req.include_usage;
        let with_logprobs = req.logprobs.is_some();
        let echo = if req.echo { req.prompt_text.clone() } else { String::new() };
        let mut offsets = vec![echo.chars().count(); req.n];
        for i in 0..req.n {
            match meta.shape {
                Shape::Chat => yield Ok(meta.chunk(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}), with_usage)),
                Shape::Completion if !echo.is_empty() => yield Ok(meta.chunk(json!({"index": i, "text": echo, "logprobs": null, "finish_reason": null}), with_usage)),
                _ => {}
            }
        }
        let mut open = req.n;
        let mut prompt_tokens = 0;
        let mut completion_tokens = 0;
        while open > 0 {
            let Some(ev) = rx.recv().await else {
                yield Ok(data(&ApiError::Internal("the generation ended without finishing".into()).body()));
                break;
            };
            match ev {
                ClientEvent::Token { index, text, token, token_text, logprob, top_logprobs } => {
                    if text.is_empty() && !with_logprobs {
                        continue;
                    }
                    let t = TokenInfo { text, token, token_text, logprob, top_logprobs };
                    match meta.shape {
                        Shape::Chat => {
                            let lp = with_logprobs.then(|| json!({"content": [chat_logprob(&t)]}));
                            yield Ok(meta.chunk(json!({"index": index, "delta": {"content": t.text}, "logprobs": lp, "finish_reason": null}), with_usage));
                        }
                        Shape::Completion => {
                            let off = offsets.get(index).copied().unwrap_or(0);
                            let lp = with_logprobs.then(|| completion_logprobs(std::slice::from_ref(&t), off));
                            if let Some(o) = offsets.get_mut(index) {
                                *o += t.text.chars().count();
                            }
                            yield Ok(meta.chunk(json!({"index": index, "text": t.text, "logprobs": lp, "finish_reason": null}), with_usage));
                        }
                        Shape::Generate => {
                            if !t.text.is_empty() {
                                yield Ok(data(&json!({"text": t.text})));
                            }
                        }
                    }
                }
                ClientEvent::Done { index, finish_reason, prompt_tokens: p, completion_tokens: c } => {
                    open -= 1;
                    prompt_tokens = p;
                    completion_tokens += c;
                    let f = finish_reason.as_str();
                    match meta.shape {
                        Shape::Chat => yield Ok(meta.chunk(json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": f}), with_usage)),
                        Shape::Completion => yield Ok(meta.chunk(json!({"index": index, "text": "", "logprobs": null, "finish_reason": f}), with_usage)),
                        Shape::Generate => yield Ok(data(&json!({"text": "", "finish_reason": f, "usage": usage(p, c)}))),
                    }
                }
                ClientEvent::Error { index, message } => {
                    open -= 1;
                    yield Ok(data(&ApiError::Internal(format!("choice {index} failed: {message}")).body()));
                }
            }
        }
        if with_usage && meta.shape != Shape::Generate {
            let mut v = json!({
                "id": meta.id,
                "object": meta.object(true),
                "created": meta.created,
                "model": meta.model,
                "choices": [],
                "usage": usage(prompt_tokens, completion_tokens),
            });
            if meta.shape == Shape::Completion {
                v["object"] = json!("text_completion");
            }
            yield Ok(data(&v));
        }
        yield Ok(Event::default().data("[DONE]"));
    }
}
