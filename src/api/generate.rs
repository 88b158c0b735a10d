//! `/v1/generate`: the simple input of the Runpod seed examples. `text` or `prompt` becomes
//! a user message (after an optional `system_prompt`) through the chat template when the
//! model has one; `messages` are used as given.

use axum::extract::State;
use axum::response::Response;
use kiln_models::ChatMessage;

use super::openai::{respond, Shape};
use super::types::{GenerateBody, PromptInput};
use super::{from_value, ApiJson};
use crate::error::ApiError;
use crate::server::AppState;
use crate::validation::{chat_messages, completion_prompt, request_timeout, validate, Endpoint, PromptSpec};

pub async fn generate(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<GenerateBody>,
) -> Result<Response, ApiError> {
    let body = match body.input {
        Some(input) => {
            let inner: GenerateBody = from_value(input)?;
            GenerateBody {
                model: inner.model.or(body.model),
                stream: inner.stream.or(body.stream),
                timeout: inner.timeout.or(body.timeout),
                ..inner
            }
        }
        None => body,
    };
    let sampling = body.sampling_params.clone().unwrap_or_default();
    let entry = state.resolve_model(body.model.as_deref().or(sampling.model.as_deref()))?;
    let tok = entry.text_tokenizer()?.as_ref();
    if sampling.n.is_some_and(|n| n != 1) {
        return Err(ApiError::param(
            "sampling_params.n",
            "/v1/generate returns one text: use /v1/completions for n > 1",
        ));
    }
    let system = body.system_prompt.as_ref().filter(|s| !s.is_empty());
    let text = match (&body.text, &body.prompt) {
        (Some(_), Some(_)) => return Err(ApiError::param("text", "give one of text, prompt or messages")),
        (Some(t), None) | (None, Some(PromptInput::Text(t))) => Some(t.clone()),
        _ => None,
    };
    let prompt = match (text, &body.prompt, &body.messages) {
        (Some(_), _, Some(_)) | (None, Some(_), Some(_)) => {
            return Err(ApiError::param("messages", "give one of text, prompt or messages"))
        }
        (Some(t), _, None) if t.is_empty() => return Err(ApiError::param("text", "the text is empty")),
        (Some(t), _, None) if tok.has_chat_template() => {
            let mut m: Vec<ChatMessage> =
                system.map(|s| ChatMessage { role: "system".into(), content: s.clone() }).into_iter().collect();
            m.push(ChatMessage { role: "user".into(), content: t });
            PromptSpec::Chat(m)
        }
        (Some(t), _, None) => PromptSpec::Text(match system {
            Some(s) => format!("{s}\n\n{t}"),
            None => t,
        }),
        (None, Some(p), None) => completion_prompt(Some(p), tok)?,
        (None, None, Some(messages)) => {
            let mut m = chat_messages(messages)?;
            if let Some(s) = system.filter(|_| m.first().is_none_or(|f| f.role != "system")) {
                m.insert(0, ChatMessage { role: "system".into(), content: s.clone() });
            }
            PromptSpec::Chat(m)
        }
        (None, None, None) => return Err(ApiError::param("text", "give text, prompt or messages")),
    };
    let mut valid = validate(&sampling, Endpoint::Completion, prompt, tok)?;
    valid.stream = body.stream.or(sampling.stream).unwrap_or(false);
    valid.include_usage = false;
    valid.echo = false;
    if let Some(t) = request_timeout("timeout", body.timeout)? {
        valid.timeout = Some(t);
    }
    respond(&state, &entry, valid, Shape::Generate).await
}
