//! The API's one error type and its OpenAI shape: `{"error":{"message","type","param","code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_actors::SubmitError;
use serde_json::json;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON (syntax error, truncated, not UTF-8).
    #[error("{0}")]
    InvalidJson(String),
    /// JSON of the wrong shape: a field of the wrong type, a missing required field.
    #[error("{message}")]
    InvalidType { param: Option<String>, message: String },
    /// A field with a value out of range or not allowed.
    #[error("{message}")]
    InvalidParam { param: String, message: String },
    /// Prompt or prompt + max_tokens beyond the model's context.
    #[error("{message}")]
    ContextLength { param: String, message: String },
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// A resource that does not exist (or no longer does), e.g. an expired stored image.
    #[error("{0}")]
    NotFound(String),
    #[error("{0} does not accept this method")]
    MethodNotAllowed(String),
    #[error("the server is overloaded; retry after {retry_after_s} s")]
    Overloaded { retry_after_s: u64 },
    #[error("model unavailable: {0}")]
    Unavailable(String),
    /// The server is shutting down: no new requests (503 with `Retry-After`).
    #[error(
        "the server is shutting down and accepts no new requests; retry after {retry_after_s} s (another replica)"
    )]
    Draining { retry_after_s: u64 },
    /// The request's deadline (`timeout`, or the server's `request_timeout_s`) passed.
    #[error("the request did not finish within its timeout of {timeout_s} s")]
    Timeout { timeout_s: f64 },
    #[error("{0}")]
    Unsupported(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::InvalidParam { param: param.to_string(), message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_)
            | ApiError::InvalidParam { .. }
            | ApiError::ContextLength { .. }
            | ApiError::Unsupported(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidType { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::Draining { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI `type` (also the metric label of a failure).
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::Overloaded { .. } => "rate_limit_error",
            ApiError::Unavailable(_) | ApiError::Draining { .. } => "service_unavailable",
            ApiError::Timeout { .. } => "timeout_error",
            ApiError::Internal(_) => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidType { .. } => "invalid_type",
            ApiError::InvalidParam { .. } => "invalid_parameter",
            ApiError::ContextLength { .. } => "context_length_exceeded",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::RouteNotFound(_) | ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::Unavailable(_) => "model_unavailable",
            ApiError::Draining { .. } => "draining",
            ApiError::Timeout { .. } => "timeout",
            ApiError::Unsupported(_) => "unsupported",
            ApiError::Internal(_) => "internal_error",
        }
    }

    /// Seconds a client should wait before retrying (the `Retry-After` header), if any.
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            ApiError::Overloaded { retry_after_s } | ApiError::Draining { retry_after_s } => Some(*retry_after_s),
            _ => None,
        }
    }

    pub fn param_name(&self) -> Option<&str> {
        match self {
            ApiError::InvalidType { param, .. } => param.as_deref(),
            ApiError::InvalidParam { param, .. } | ApiError::ContextLength { param, .. } => Some(param),
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// The body shared by HTTP responses and SSE error events.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.to_string(),
                "type": self.error_type(),
                "param": self.param_name(),
                "code": self.code(),
            }
        })
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Overloaded { retry_after_s } => ApiError::Overloaded { retry_after_s },
            SubmitError::TooLarge { .. } => {
                ApiError::ContextLength { param: "max_tokens".to_string(), message: e.to_string() }
            }
            SubmitError::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if let Some(retry_after_s) = self.retry_after_s() {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overloaded_maps_to_429_with_retry_after() {
        let r = ApiError::from(SubmitError::Overloaded { retry_after_s: 3 }).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
    }

    #[test]
    fn submit_errors_map_to_statuses() {
        let too_large = ApiError::from(SubmitError::TooLarge { needed: 10, capacity: 5 });
        assert_eq!(too_large.status(), StatusCode::BAD_REQUEST);
        let gone = ApiError::from(SubmitError::Unavailable("x".into()));
        assert_eq!(gone.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn draining_and_timeout_statuses() {
        let r = ApiError::Draining { retry_after_s: 1 }.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let t = ApiError::Timeout { timeout_s: 0.5 };
        assert_eq!((t.status(), t.error_type(), t.code()), (StatusCode::REQUEST_TIMEOUT, "timeout_error", "timeout"));
        assert!(t.to_string().contains("0.5 s"), "{t}");
    }

    #[test]
    fn body_has_openai_shape() {
        let b = ApiError::param("temperature", "too hot").body();
        assert_eq!(b["error"]["param"], "temperature");
        assert_eq!(b["error"]["code"], "invalid_parameter");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["message"], "too hot");
    }
}
