//! HTTP routes (axum): OpenAI-compatible completions, embeddings, images and speech, `/v1/generate`, tokenizer utilities,
//! health/readiness/metrics, and the WebSocket upgrade.

pub mod admin;
pub mod audio;
pub mod embeddings;
pub mod generate;
pub mod images;
pub mod openai;
pub mod types;

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_actors::BatcherHealth;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::server::{AppState, Backend, LoadState, ModelKind};
use crate::validation::{chat_messages, render_chat};
use types::{DetokenizeBody, TokenizeBody};

/// Seconds a client refused during shutdown should wait (another replica will answer).
pub const DRAINING_RETRY_AFTER_S: u64 = 1;

/// Every route; tests serve it on `127.0.0.1:0`.
pub fn app(state: AppState) -> Router {
    let limit = state.limits.max_body_bytes;
    // The routes that use a model (and may load one): refused with 503 once shutdown begins.
    let inference = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/generate", post(generate::generate))
        .route("/v1/images/generations", post(images::generations))
        .route("/v1/images/edits", post(images::edits).layer(DefaultBodyLimit::max(crate::upload::MAX_UPLOAD_BYTES)))
        .route("/v1/images/simple", post(images::simple))
        .route("/v1/audio/speech", post(audio::speech))
        .route("/v1/audio/speech/simple", post(audio::simple))
        .route("/v1/ws", get(crate::ws::ws_handler))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), refuse_while_draining));
    Router::new()
        .merge(inference)
        .route("/v1/models", get(list_models))
        .route("/v1/images/{file}", get(images::stored_image))
        .route("/v1/audio/voices", get(audio::voices))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/admin/fault", post(admin::inject_fault))
        .fallback(|uri: Uri| async move { ApiError::RouteNotFound(uri.path().to_string()) })
        .method_not_allowed_fallback(|uri: Uri| async move { ApiError::MethodNotAllowed(uri.path().to_string()) })
        .layer(DefaultBodyLimit::max(limit))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(tower_http::cors::CorsLayer::permissive())
        .with_state(state)
}

/// Whether the server is shutting down (new work is refused; running work finishes).
pub fn is_draining(state: &AppState) -> bool {
    state.draining.load(Ordering::Acquire)
}

async fn refuse_while_draining(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if is_draining(&state) {
        return ApiError::Draining { retry_after_s: DRAINING_RETRY_AFTER_S }.into_response();
    }
    next.run(req).await
}

/// A JSON body whose every failure is an OpenAI-shaped error: not UTF-8 or not JSON (400),
/// the wrong shape (422, naming the field), larger than `max_body_bytes` (413). No
/// content-type is required.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit: state.limits.max_body_bytes }
            } else {
                ApiError::InvalidJson(format!("could not read the request body: {}", r.body_text()))
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses a body; errors name the failing field (`messages[0].content`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ApiError::InvalidJson(format!("the request body is not valid UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(ApiError::InvalidJson("the request body is empty; expected a JSON object".into()));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(path_error)?;
    de.end().map_err(|e| ApiError::InvalidJson(format!("invalid JSON: {e}")))?;
    Ok(value)
}

/// Deserializes an already-parsed JSON value (WebSocket messages, envelopes).
pub fn from_value<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(path_error)
}

fn path_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if inner.classify() == serde_json::error::Category::Data {
        let param = (path != ".").then_some(path);
        let message = match &param {
            Some(p) => format!("{p}: {inner}"),
            None => format!("the body must be a JSON object with the request's fields: {inner}"),
        };
        ApiError::InvalidType { param, message }
    } else {
        ApiError::InvalidJson(format!("invalid JSON: {inner}"))
    }
}

async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let health = state.batcher_health().await;
    let mut data = Vec::new();
    for m in state.models.iter() {
        let load = m.state();
        let mut kiln = json!({
            "demo": m.demo,
            "state": load.as_str(),
            "preload": m.preload,
        });
        kiln["memory"] = m.memory_report();
        match &m.kind {
            ModelKind::Text(tok) => {
                kiln["family"] = json!("text-generation");
                kiln["chat_template"] = json!(tok.has_chat_template());
            }
            ModelKind::Embedding(e) => {
                kiln["family"] = json!("embedding");
                kiln["dimensions"] = json!(e.dimensions);
                kiln["max_seq_length"] = json!(e.max_seq_length);
                kiln["pooling"] = json!(e.pooling);
                kiln["normalize"] = json!(e.normalize);
                kiln["prompts"] = json!(e.prompts);
                kiln["default_prompt_name"] = json!(e.default_prompt_name);
            }
            ModelKind::Image(i) => {
                kiln["family"] = json!("image-generation");
                kiln["pipeline"] = json!(i.info.pipeline_class);
                kiln["default_size"] = json!(format!("{}x{}", i.info.default_width, i.info.default_height));
                kiln["size_multiple"] = json!(i.info.size_multiple);
                kiln["max_pixels"] = json!(i.max_pixels);
                kiln["max_side"] = json!(i.max_side);
                kiln["default_steps"] = json!(i.default_steps);
                kiln["max_steps"] = json!(i.max_steps);
                kiln["scheduler"] = json!(i.info.scheduler.kind.name());
                kiln["schedulers"] = json!(kiln_models::diffusion::scheduler_names());
            }
            ModelKind::Speech(s) => {
                kiln["family"] = json!("text-to-speech");
                kiln["voices"] = json!(s.speakers());
                kiln["languages"] = json!(s.languages());
                kiln["instruct"] = json!(s.instruct_supported());
                kiln["sample_rate"] = json!(s.sample_rate);
                kiln["samples_per_frame"] = json!(s.samples_per_frame);
                kiln["max_frames"] = json!(s.frame_cap(0));
                kiln["max_speech_chars"] = json!(s.max_chars);
                kiln["first_chunk_frames"] = json!(s.first_chunk_frames);
                kiln["chunk_frames"] = json!(s.chunk_frames);
                kiln["response_formats"] = json!(audio::FORMATS);
            }
        }
        if let Some(h) = health.get(&m.name) {
            kiln["batcher"] = json!(health_str(h));
        }
        match &load {
            LoadState::Ready(b) => {
                let spec = b.spec();
                if let Backend::Text(_) | Backend::Speech(_) = b {
                    // An embedding engine's blocks are bookkeeping only: not shown.
                    kiln["max_model_len"] = json!(spec.max_model_len);
                    kiln["kv_blocks"] = json!(spec.num_blocks);
                    kiln["block_size"] = json!(spec.block_size);
                }
                kiln["max_running"] = json!(spec.max_running);
                kiln["max_batch_tokens"] = json!(spec.max_batch_tokens);
                if let Ok(s) = b.stats().await {
                    kiln["stats"] = json!({
                        "waiting": s.waiting,
                        "running": s.running,
                        "used_blocks": s.used_blocks,
                        "total_blocks": s.total_blocks,
                        "preemptions": s.preemptions,
                        "steps": s.steps,
                    });
                }
            }
            LoadState::Failed(e) => kiln["error"] = json!(e),
            _ => {}
        }
        data.push(json!({
            "id": m.name,
            "object": "model",
            "created": m.created,
            "owned_by": "kiln",
            "kiln": kiln,
        }));
    }
    Json(json!({"object": "list", "data": data}))
}

async fn tokenize(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<TokenizeBody>,
) -> Result<Json<Value>, ApiError> {
    let entry = state.resolve_model(body.model.as_deref())?;
    let tok = entry.text_tokenizer()?.as_ref();
    let tokens = match (&body.prompt, &body.messages) {
        (Some(_), Some(_)) => return Err(ApiError::param("prompt", "give either prompt or messages, not both")),
        (Some(p), None) => {
            tok.encode(p, body.add_special_tokens.unwrap_or(true)).map_err(|e| ApiError::param("prompt", e))?
        }
        (None, Some(m)) => {
            let text = render_chat(&chat_messages(m)?, tok, body.add_generation_prompt.unwrap_or(true))?;
            tok.encode(&text, body.add_special_tokens.unwrap_or(false)).map_err(|e| ApiError::param("messages", e))?
        }
        (None, None) => return Err(ApiError::param("prompt", "give prompt (a string) or messages")),
    };
    let max_model_len = entry.backend().await?.spec().max_model_len;
    Ok(Json(json!({"tokens": tokens, "count": tokens.len(), "max_model_len": max_model_len})))
}

async fn detokenize(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<DetokenizeBody>,
) -> Result<Json<Value>, ApiError> {
    let entry = state.resolve_model(body.model.as_deref())?;
    let tok = entry.text_tokenizer()?;
    let vocab = tok.vocab_size().map(|v| v as i64).unwrap_or(u32::MAX as i64 + 1);
    let ids = body
        .tokens
        .iter()
        .map(|&t| {
            if (0..vocab).contains(&t) {
                Ok(t as u32)
            } else {
                Err(ApiError::param("tokens", format!("token id {t} is outside the vocabulary (0..{vocab})")))
            }
        })
        .collect::<Result<Vec<u32>, _>>()?;
    Ok(Json(json!({"prompt": tok.decode(&ids, false)})))
}

fn health_str(h: &BatcherHealth) -> String {
    match h {
        BatcherHealth::Running => "running".to_string(),
        BatcherHealth::Stopped => "stopped".to_string(),
        BatcherHealth::Failed(e) => format!("failed: {e}"),
    }
}

async fn ready(State(state): State<AppState>) -> Response {
    if is_draining(&state) {
        let retry = [(header::RETRY_AFTER, DRAINING_RETRY_AFTER_S.to_string())];
        return (StatusCode::SERVICE_UNAVAILABLE, retry, Json(json!({"status": "draining"}))).into_response();
    }
    if state.is_ready().await {
        return (StatusCode::OK, "ready").into_response();
    }
    let health = state.batcher_health().await;
    let models: serde_json::Map<String, Value> = state
        .models
        .iter()
        .map(|m| {
            let s = m.state();
            let mut v = match &s {
                LoadState::Failed(e) => json!({"state": "failed", "error": e}),
                other => json!({"state": other.as_str()}),
            };
            if let Some(h) = health.get(&m.name) {
                v["batcher"] = json!(health_str(h));
            }
            (m.name.clone(), v)
        })
        .collect();
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not ready", "models": models}))).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], (state.render_metrics)()).into_response()
}
