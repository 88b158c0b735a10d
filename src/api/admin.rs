//! Test-only administration: `POST /admin/fault` injects failures into a model's engine or
//! batcher so tests can prove the supervisor's recovery. The route answers 404 unless the
//! config sets `[server] fault_injection = true` (off by default).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::ApiJson;
use crate::error::ApiError;
use crate::server::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultBody {
    pub model: String,
    /// `engine_panic`: the engine panics in its next `count` step(s) and is rebuilt;
    /// `batcher_panic`: the batcher actor itself fails and the supervisor reloads the model;
    /// `slow_steps`: every step first sleeps `count` milliseconds (0 turns it off).
    pub kind: String,
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

pub async fn inject_fault(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<FaultBody>,
) -> Result<Json<Value>, ApiError> {
    let Some(faults) = &state.faults else {
        return Err(ApiError::RouteNotFound("/admin/fault".into()));
    };
    let switch = faults.get(&body.model).ok_or_else(|| ApiError::ModelNotFound(body.model.clone()))?;
    let counter = match body.kind.as_str() {
        "engine_panic" => &switch.engine_panics,
        "batcher_panic" => &switch.batcher_panics,
        "slow_steps" => {
            switch.step_delay_ms.store(body.count, Ordering::SeqCst);
            &switch.step_delay_ms
        }
        other => {
            return Err(ApiError::param(
                "kind",
                format!("unknown fault kind {other:?}: expected engine_panic, batcher_panic or slow_steps"),
            ))
        }
    };
    if body.kind != "slow_steps" {
        counter.fetch_add(body.count, Ordering::SeqCst);
    }
    tracing::warn!(model = %body.model, kind = %body.kind, count = body.count, "fault injected");
    Ok(Json(json!({"model": body.model, "kind": body.kind, "armed": counter.load(Ordering::SeqCst)})))
}
