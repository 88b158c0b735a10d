//! `POST /v1/embeddings` (OpenAI) and the WebSocket `embed` message: inputs as text or token
//! ids, tokenized as sentence-transformers does (prompt, truncation to `max_seq_length`),
//! embedded through the model's batcher, returned as floats or base64, optionally truncated
//! to fewer `dimensions` (Matryoshka) and re-normalised. A model with a `kiln pca fit`
//! projection serves the projected vectors (re-normalised when the model normalises), and
//! `dimensions` then truncates those.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use kiln_actors::{EmbedError, SubmitError};
use kiln_models::embed::EmbedInputError;
use serde::Deserialize;
use serde_json::{json, Value};

use super::types::{kind_of, token_ids};
use super::ApiJson;
use crate::api::openai::missing;
use crate::error::ApiError;
use crate::server::{AppState, EmbeddingModel};

/// Most inputs one request may carry.
pub const MAX_INPUTS: usize = 2048;

/// The body of `/v1/embeddings` and of a WebSocket `embed` message. Unknown fields are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EmbeddingBody {
    pub model: Option<String>,
    pub input: Option<EmbeddingInput>,
    /// `float` (default) or `base64` (little-endian f32 bytes).
    pub encoding_format: Option<String>,
    /// Keep the first `dimensions` components (re-normalised when the model normalises).
    pub dimensions: Option<i64>,
    /// Extension: a named prompt of the model (`config_sentence_transformers.json`), e.g. `query`.
    pub prompt_name: Option<String>,
    /// Extension: cut inputs longer than `max_seq_length` (default) or refuse them (false).
    pub truncate: Option<bool>,
    /// Accepted and ignored.
    pub user: Option<String>,
}

/// `input`: a string, an array of strings, an array of token ids, or an array of those.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "Value")]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

const SHAPE: &str =
    "input must be a string, an array of strings, an array of token ids, or an array of arrays of token ids";

impl TryFrom<Value> for EmbeddingInput {
    type Error = String;
    fn try_from(v: Value) -> Result<Self, String> {
        let not_mixed = |i: &Value| format!("{SHAPE} (all items of one kind), found {}", kind_of(i));
        match v {
            Value::String(s) => Ok(EmbeddingInput::Text(s)),
            Value::Array(items) if items.is_empty() => Ok(EmbeddingInput::Texts(Vec::new())),
            Value::Array(items) => match &items[0] {
                Value::String(_) => items
                    .into_iter()
                    .map(|i| match i {
                        Value::String(s) => Ok(s),
                        other => Err(not_mixed(&other)),
                    })
                    .collect::<Result<_, _>>()
                    .map(EmbeddingInput::Texts),
                Value::Number(_) => token_ids(&items).map(EmbeddingInput::Tokens),
                Value::Array(_) => items
                    .iter()
                    .map(|i| match i {
                        Value::Array(ids) => token_ids(ids),
                        other => Err(not_mixed(other)),
                    })
                    .collect::<Result<_, _>>()
                    .map(EmbeddingInput::TokenLists),
                other => Err(format!("{SHAPE}; found an array whose first item is {}", kind_of(other))),
            },
            other => Err(format!("{SHAPE}, not {}", kind_of(&other))),
        }
    }
}

/// A checked embedding request: token ids ready for the batcher.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidEmbedding {
    pub inputs: Vec<Vec<u32>>,
    pub base64: bool,
    /// Some(d): keep the first d components.
    pub dimensions: Option<usize>,
    /// Re-normalise after truncating (the model's vectors are unit length).
    pub renormalize: bool,
}

fn input_name(i: usize, single: bool) -> String {
    if single {
        "input".to_string()
    } else {
        format!("input[{i}]")
    }
}

fn too_long(what: &str, len: usize, max: usize) -> ApiError {
    ApiError::ContextLength {
        param: "input".to_string(),
        message: format!(
            "{what} has {len} tokens but the model reads at most {max} (max_seq_length): shorten it, \
             or leave `truncate` at true to cut it"
        ),
    }
}

/// Checks a body against an embedding model and tokenizes its inputs (CPU work: run it off the
/// async workers).
pub fn validate_embedding(body: &EmbeddingBody, model: &EmbeddingModel) -> Result<ValidEmbedding, ApiError> {
    let base64 = match body.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::param(
                "encoding_format",
                format!("encoding_format must be \"float\" or \"base64\", got {other:?}"),
            ))
        }
    };
    let dims = model.dimensions;
    let dimensions = match body.dimensions {
        None => None,
        Some(d) if d >= 1 && d as u64 <= dims as u64 => Some(d as usize),
        Some(d) => {
            return Err(ApiError::param(
                "dimensions",
                format!("dimensions must be between 1 and {dims} (the model's vector length), got {d}"),
            ))
        }
    };
    let truncate = body.truncate.unwrap_or(true);
    let prompt_name = body.prompt_name.as_deref();
    if let Err(EmbedInputError::UnknownPrompt(name)) = model.tokenizer.prompt(prompt_name) {
        let known: Vec<&str> = model.prompts.keys().map(String::as_str).collect();
        return Err(ApiError::param(
            "prompt_name",
            format!(
                "the model has no prompt named {name:?} (its prompts: {})",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ),
        ));
    }
    let input = body.input.as_ref().ok_or_else(|| missing("input"))?;
    let count = match input {
        EmbeddingInput::Text(_) | EmbeddingInput::Tokens(_) => 1,
        EmbeddingInput::Texts(v) => v.len(),
        EmbeddingInput::TokenLists(v) => v.len(),
    };
    if count == 0 {
        return Err(ApiError::param("input", "input must not be empty"));
    }
    if count > MAX_INPUTS {
        return Err(ApiError::param(
            "input",
            format!("at most {MAX_INPUTS} inputs may be embedded in one request, got {count}"),
        ));
    }
    let max = model.max_seq_length;
    let inputs = match input {
        EmbeddingInput::Text(t) => vec![encode_text(model, t, "input", prompt_name, truncate)?],
        EmbeddingInput::Texts(v) => v
            .iter()
            .enumerate()
            .map(|(i, t)| encode_text(model, t, &input_name(i, false), prompt_name, truncate))
            .collect::<Result<_, _>>()?,
        EmbeddingInput::Tokens(_) | EmbeddingInput::TokenLists(_) => {
            if body.prompt_name.is_some() {
                return Err(ApiError::param(
                    "prompt_name",
                    "prompt_name applies to text inputs; token-id inputs are embedded as given",
                ));
            }
            let lists: Vec<&Vec<i64>> = match input {
                EmbeddingInput::Tokens(ids) => vec![ids],
                EmbeddingInput::TokenLists(v) => v.iter().collect(),
                _ => unreachable!("token inputs only"),
            };
            let single = matches!(input, EmbeddingInput::Tokens(_));
            let vocab = model.vocab_size as i64;
            lists
                .into_iter()
                .enumerate()
                .map(|(i, ids)| {
                    let what = input_name(i, single);
                    if ids.is_empty() {
                        return Err(ApiError::param("input", format!("{what} is an empty list of token ids")));
                    }
                    if let Some(bad) = ids.iter().find(|&&t| !(0..vocab).contains(&t)) {
                        return Err(ApiError::param(
                            "input",
                            format!("{what}: token id {bad} is outside the vocabulary (0..{vocab})"),
                        ));
                    }
                    if ids.len() > max && !truncate {
                        return Err(too_long(&what, ids.len(), max));
                    }
                    Ok(ids.iter().take(max).map(|&t| t as u32).collect())
                })
                .collect::<Result<_, _>>()?
        }
    };
    Ok(ValidEmbedding { inputs, base64, dimensions, renormalize: model.normalize })
}

fn encode_text(
    model: &EmbeddingModel,
    text: &str,
    what: &str,
    prompt_name: Option<&str>,
    truncate: bool,
) -> Result<Vec<u32>, ApiError> {
    if text.is_empty() {
        return Err(ApiError::param("input", format!("{what} is an empty string")));
    }
    model.tokenizer.encode(text, prompt_name, truncate).map_err(|e| match e {
        EmbedInputError::TooLong { len, max } => too_long(what, len, max),
        other => ApiError::param("input", format!("{what}: {other}")),
    })
}

/// The vector the API returns for one of the encoder's vectors: projected when the model has a
/// projection, then truncated to the requested `dimensions`.
pub fn served_vector(
    model: &EmbeddingModel,
    vector: Vec<f32>,
    dimensions: Option<usize>,
    renormalize: bool,
) -> Vec<f32> {
    let v = match &model.projection {
        Some(p) => p.apply(&vector, renormalize),
        None => vector,
    };
    truncate_vector(v, dimensions, renormalize)
}

/// Keeps the first `dims` components, re-normalised to unit length when `renormalize`.
pub fn truncate_vector(mut v: Vec<f32>, dims: Option<usize>, renormalize: bool) -> Vec<f32> {
    let Some(d) = dims.filter(|&d| d < v.len()) else { return v };
    v.truncate(d);
    if renormalize {
        let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
        if norm > 0.0 {
            for x in &mut v {
                *x = (*x as f64 / norm) as f32;
            }
        }
    }
    v
}

/// Standard base64 (with padding) of the vector's little-endian f32 bytes.
pub fn base64_f32(v: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn embed_error(e: EmbedError) -> ApiError {
    match e {
        EmbedError::Submit(SubmitError::TooLarge { .. }) => {
            ApiError::ContextLength { param: "input".to_string(), message: e.to_string() }
        }
        EmbedError::Submit(s) => s.into(),
        EmbedError::InvalidInput { index } => ApiError::param(
            "input",
            format!("input[{index}] could not be embedded (empty, or token ids outside the vocabulary)"),
        ),
        EmbedError::Failed(m) => ApiError::Internal(format!("embedding failed: {m}")),
        EmbedError::Ended { .. } => ApiError::Internal(e.to_string()),
    }
}

/// Validates, embeds, and builds the OpenAI response
/// (`{"object":"list","data":[...],"model","usage"}`). Dropping the future cancels the inputs.
pub async fn embed(state: &AppState, body: EmbeddingBody) -> Result<Value, ApiError> {
    let entry = state.resolve_model(body.model.as_deref())?;
    let model = Arc::clone(entry.embedding_model()?);
    let valid = tokio::task::spawn_blocking(move || validate_embedding(&body, &model))
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizing failed: {e}")))??;
    let backend = entry.embedding_backend().await?;
    let timeout = state.limits.request_timeout;
    let started = std::time::Instant::now();
    let metrics = &backend.metrics;
    let outputs = match tokio::time::timeout(timeout, backend.embed(valid.inputs)).await {
        Err(_) => {
            metrics.reject(kiln_actors::metrics::reject_reason::TIMEOUT);
            return Err(ApiError::Unavailable(format!("the embedding did not finish within {} s", timeout.as_secs())));
        }
        Ok(Err(e)) => {
            match &e {
                EmbedError::Submit(s) => metrics.reject(kiln_actors::request::submit_reject_reason(s)),
                EmbedError::InvalidInput { .. } => {}
                _ => metrics.request_finished("error"),
            }
            return Err(embed_error(e));
        }
        Ok(Ok(outputs)) => outputs,
    };
    metrics.e2e.observe(started.elapsed().as_secs_f64());
    metrics.request_finished("stop");
    let prompt_tokens: usize = outputs.iter().map(|o| o.prompt_tokens).sum();
    let model = entry.embedding_model()?;
    let data: Vec<Value> = outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let v = served_vector(model, o.vector, valid.dimensions, valid.renormalize);
            let embedding = if valid.base64 { json!(base64_f32(&v)) } else { json!(v) };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(json!({
        "object": "list",
        "data": data,
        "model": entry.name,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
}

pub async fn embeddings(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<EmbeddingBody>,
) -> Result<Json<Value>, ApiError> {
    embed(&state, body).await.map(Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        // 1.0f32 = 00 00 80 3f
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, -2.0]), "AACAPwAAAMA=");
        assert_eq!(base64_f32(&[]), "");
        assert_eq!(base64_f32(&[0.0, 0.0, 0.0]), "AAAAAAAAAAAAAAAA");
    }

    #[test]
    fn truncation_renormalises_only_when_asked() {
        let v = vec![0.6, 0.0, 0.8];
        assert_eq!(truncate_vector(v.clone(), None, true), v);
        assert_eq!(truncate_vector(v.clone(), Some(3), true), v);
        assert_eq!(truncate_vector(v.clone(), Some(1), true), vec![1.0]);
        assert_eq!(truncate_vector(v.clone(), Some(2), false), vec![0.6, 0.0]);
    }

    #[test]
    fn input_shapes() {
        let p = |v: Value| EmbeddingInput::try_from(v);
        assert!(matches!(p(json!("a")), Ok(EmbeddingInput::Text(_))));
        assert!(matches!(p(json!(["a", "b"])), Ok(EmbeddingInput::Texts(v)) if v.len() == 2));
        assert!(matches!(p(json!([1, 2])), Ok(EmbeddingInput::Tokens(v)) if v == vec![1, 2]));
        assert!(matches!(p(json!([[1], [2, 3]])), Ok(EmbeddingInput::TokenLists(v)) if v.len() == 2));
        assert!(matches!(p(json!([])), Ok(EmbeddingInput::Texts(v)) if v.is_empty()));
        for bad in [
            json!(5),
            json!(null),
            json!({"a": 1}),
            json!(["a", 1]),
            json!([1, "a"]),
            json!([[1], 2]),
            json!([1.5]),
            json!([true]),
        ] {
            assert!(p(bad.clone()).is_err(), "{bad}");
        }
    }
}
