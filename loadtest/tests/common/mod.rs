//! A fake OpenAI-compatible server for the load-test tests: streams exactly `max_tokens`
//! tokens with a known time to first token and a known gap between tokens, so counts can be
//! checked exactly and latencies against known bounds. The model name selects misbehaviour:
//! `error400`, `error500`, `nodone` (a stream without `[DONE]`), `liar` (usage off by one),
//! `slow` (first token after 2 s); every `fail_every`-th request gets a 429.

#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};

use kiln_loadtest::scenario::Scenario;

#[derive(Default)]
pub struct Counters {
    pub http_requests: AtomicU64,
    pub embedding_inputs: AtomicU64,
    pub ws_sockets: AtomicU64,
    pub ws_generations: AtomicU64,
    pub tokens_sent: AtomicU64,
}

pub struct Fake {
    pub ttft: Duration,
    pub itl: Duration,
    pub fail_every: Option<u64>,
    pub counters: Counters,
}

pub struct FakeServer {
    pub base_url: String,
    pub state: Arc<Fake>,
}

pub async fn start(ttft_ms: u64, itl_ms: u64, fail_every: Option<u64>) -> FakeServer {
    let state = Arc::new(Fake {
        ttft: Duration::from_millis(ttft_ms),
        itl: Duration::from_millis(itl_ms),
        fail_every,
        counters: Counters::default(),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/ws", get(ws))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    FakeServer { base_url: format!("http://{addr}"), state }
}

/// A scenario targeting `base_url`; `extra` is appended (more tables / keys after [target]).
pub fn scenario(base_url: &str, model: &str, kind: &str, target_extra: &str, rest: &str) -> Scenario {
    let text = format!(
        "name = \"test\"\n[target]\nbase_url = \"{base_url}\"\nmodel = \"{model}\"\nkind = \"{kind}\"\nrequest_timeout_s = 20\n{target_extra}\n{rest}\n"
    );
    Scenario::parse(&text, None).unwrap_or_else(|e| panic!("{e:#}\n{text}"))
}

fn gate(s: &Fake, model: &str) -> Option<Response> {
    let n = s.counters.http_requests.fetch_add(1, Ordering::SeqCst) + 1;
    if s.fail_every.is_some_and(|k| n.checked_rem(k) == Some(0)) {
        let body = json!({"error": {"message": "queue full", "type": "overloaded", "code": "overloaded"}});
        return Some((StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")], Json(body)).into_response());
    }
    match model {
        "error400" => Some((StatusCode::BAD_REQUEST, Json(json!({"error": {"message": "bad model"}}))).into_response()),
        "error500" => Some((StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()),
        _ => None,
    }
}

async fn chat(State(s): State<Arc<Fake>>, Json(body): Json<Value>) -> Response {
    stream_tokens(s, body, true).await
}

async fn completions(State(s): State<Arc<Fake>>, Json(body): Json<Value>) -> Response {
    stream_tokens(s, body, false).await
}

async fn stream_tokens(s: Arc<Fake>, body: Value, chat: bool) -> Response {
    let model = body["model"].as_str().unwrap_or("").to_string();
    if let Some(r) = gate(&s, &model) {
        return r;
    }
    assert_eq!(body["stream"], json!(true), "the load tester streams");
    assert_eq!(body["stream_options"]["include_usage"], json!(true));
    let n = body["max_tokens"].as_u64().expect("max_tokens");
    let ttft = if model == "slow" { Duration::from_secs(2) } else { s.ttft };
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, Infallible>>(4);
    tokio::spawn(async move {
        let ev = |v: Value| Ok(Bytes::from(format!("data: {v}\n\n")));
        if chat {
            let _ = tx
                .send(ev(
                    json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": null}),
                ))
                .await;
        }
        tokio::time::sleep(ttft).await;
        for i in 0..n {
            if i > 0 {
                tokio::time::sleep(s.itl).await;
            }
            let choice = if chat {
                json!({"index": 0, "delta": {"content": format!(" t{i}")}, "finish_reason": null})
            } else {
                json!({"index": 0, "text": format!(" t{i}"), "finish_reason": null})
            };
            s.counters.tokens_sent.fetch_add(1, Ordering::SeqCst);
            if tx.send(ev(json!({"choices": [choice], "usage": null}))).await.is_err() {
                return;
            }
        }
        let last = if chat {
            json!({"index": 0, "delta": {}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": "", "finish_reason": "length"})
        };
        let _ = tx.send(ev(json!({"choices": [last], "usage": null}))).await;
        if model == "nodone" {
            return;
        }
        let reported = if model == "liar" { n + 1 } else { n };
        let usage = json!({"prompt_tokens": 5, "completion_tokens": reported, "total_tokens": 5 + reported});
        let _ = tx.send(ev(json!({"choices": [], "usage": usage}))).await;
        let _ = tx.send(Ok(Bytes::from("data: [DONE]\n\n"))).await;
    });
    Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(rx)).unwrap()
}

async fn embeddings(State(s): State<Arc<Fake>>, Json(body): Json<Value>) -> Response {
    let model = body["model"].as_str().unwrap_or("").to_string();
    if let Some(r) = gate(&s, &model) {
        return r;
    }
    let inputs: Vec<String> = match &body["input"] {
        Value::String(x) => vec![x.clone()],
        Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
        _ => panic!("bad input"),
    };
    s.counters.embedding_inputs.fetch_add(inputs.len() as u64, Ordering::SeqCst);
    tokio::time::sleep(s.ttft).await;
    let words: usize = inputs.iter().map(|i| i.split_whitespace().count()).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, _)| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}))
        .collect();
    Json(json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": words, "total_tokens": words}}))
        .into_response()
}

async fn ws(State(s): State<Arc<Fake>>, up: WebSocketUpgrade) -> Response {
    s.counters.ws_sockets.fetch_add(1, Ordering::SeqCst);
    up.on_upgrade(move |socket| ws_session(s, socket))
}

async fn ws_session(s: Arc<Fake>, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let writer = tokio::spawn(async move {
        while let Some(v) = out_rx.recv().await {
            if sink.send(Message::Text(v.to_string().into())).await.is_err() {
                break;
            }
        }
    });
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Text(text) = msg else { continue };
        let v: Value = serde_json::from_str(&text).unwrap();
        if v["type"] != "generate" {
            continue;
        }
        s.counters.ws_generations.fetch_add(1, Ordering::SeqCst);
        let id = v["id"].as_str().unwrap().to_string();
        let n = v["max_tokens"].as_u64().unwrap();
        assert!(v["messages"].is_array());
        let (s, out) = (s.clone(), out_tx.clone());
        tokio::spawn(async move {
            tokio::time::sleep(s.ttft).await;
            for i in 0..n {
                if i > 0 {
                    tokio::time::sleep(s.itl).await;
                }
                s.counters.tokens_sent.fetch_add(1, Ordering::SeqCst);
                let _ = out.send(json!({"type": "token", "id": id, "index": 0, "text": format!(" t{i}"), "token": i}));
            }
            let usage = json!({"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n});
            let _ = out.send(json!({"type": "done", "id": id, "index": 0, "finish_reason": "length", "usage": usage}));
        });
    }
    drop(out_tx);
    let _ = writer.await;
}
