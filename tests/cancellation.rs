//! Cancellation, deadlines and backpressure on the real fixture model
//! (tests/fixtures/qwen2-tied-gqa, random weights, CPU): a client that leaves, cancels or runs
//! out of time frees its sequence and KV blocks; a burst past `max_waiting` is refused with
//! 429 + Retry-After while every accepted request completes. Checked through the batcher's
//! stats and the `/metrics` a scraper sees.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestServer;
use futures::{SinkExt, StreamExt};
use kiln::config::Config;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const MODEL: &str = "kiln-demo";

fn config(extra: &str) -> Config {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        r#"
        [server]
        max_body_bytes = 65536
        request_timeout_s = 60
        max_ws_inflight = 64
        fault_injection = true   # POST /admin/fault slow_steps: a slow device, for timing tests

        [[models]]
        name = "{MODEL}"
        path = "tests/fixtures/qwen2-tied-gqa"
        demo = true
        device = "cpu"
        kv_cache_tokens = 4096
        max_batch_tokens = 256
        {extra}
        "#
    );
    Config::parse(&text, "test config", root).unwrap()
}

async fn server_with(extra: &str) -> TestServer {
    TestServer::serve(&config(extra)).await
}

/// The value of `name{model="kiln-demo", labels...}` in `/metrics` (0 when absent).
async fn metric(s: &TestServer, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = s.get("/metrics").await;
    let mut all = labels.to_vec();
    all.push(("model", MODEL));
    common::metric_value(&text, name, &all)
}

/// Polls until the model holds no sequence and no KV block (batcher stats and the gauges a
/// scraper reads); panics with the last state after `within`.
async fn assert_drained(s: &TestServer, within: Duration) {
    let backend = s.state.models[0].backend().await.unwrap();
    let start = Instant::now();
    loop {
        let st = backend.stats().await.unwrap();
        let gauges = (
            metric(s, "kiln_running_sequences", &[]).await,
            metric(s, "kiln_queue_depth", &[]).await,
            metric(s, "kiln_kv_blocks_used", &[]).await,
            metric(s, "kiln_kv_cache_usage_ratio", &[]).await,
        );
        if st.running == 0 && st.waiting == 0 && st.used_blocks == 0 && gauges == (0.0, 0.0, 0.0, 0.0) {
            return;
        }
        if start.elapsed() > within {
            panic!(
                "not drained after {within:?}: stats {st:?}; gauges (running, queue, kv blocks, kv ratio) {gauges:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn long_request(i: usize) -> Value {
    json!({"model": MODEL, "prompt": format!("Story number {i}:"), "max_tokens": 400, "ignore_eos": true})
}

/// SSE close: the stream is dropped after its first token.
async fn sse_close(s: &TestServer, i: usize) {
    let mut body = long_request(i);
    body["stream"] = json!(true);
    let r = s.client.post(s.url("/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = stream.next().await.expect("a first chunk").unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_event(ws: &mut Ws) -> Value {
    let m = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.expect("an event").unwrap().unwrap();
    serde_json::from_str(m.to_text().unwrap()).unwrap()
}

fn ws_generate(id: &str, i: usize) -> Message {
    let mut body = long_request(i);
    body["type"] = json!("generate");
    body["id"] = json!(id);
    Message::Text(body.to_string().into())
}

/// WS close: the socket is closed after its generations' first tokens.
async fn ws_close(s: &TestServer, i: usize, per_socket: usize) {
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    for k in 0..per_socket {
        ws.send(ws_generate(&format!("g{k}"), i + k)).await.unwrap();
    }
    let mut started = std::collections::HashSet::new();
    while started.len() < per_socket {
        let v = ws_event(&mut ws).await;
        assert_eq!(v["type"], "token", "{v}");
        started.insert(v["id"].as_str().unwrap().to_string());
    }
    if i.is_multiple_of(2) {
        ws.close(None).await.unwrap();
    } else {
        drop(ws); // the TCP connection just goes away
    }
}

/// WS cancel: every generation is cancelled after its first token; each ends with `cancelled`.
async fn ws_cancel(s: &TestServer, i: usize, per_socket: usize) {
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    for k in 0..per_socket {
        ws.send(ws_generate(&format!("c{k}"), i + k)).await.unwrap();
    }
    let mut cancelled = std::collections::HashSet::new();
    let mut done = 0;
    while done < per_socket {
        let v = ws_event(&mut ws).await;
        let id = v["id"].as_str().unwrap().to_string();
        match v["type"].as_str().unwrap() {
            "token" => {
                if cancelled.insert(id.clone()) {
                    ws.send(Message::Text(json!({"type": "cancel", "id": id}).to_string().into())).await.unwrap();
                }
            }
            "done" => {
                assert_eq!(v["finish_reason"], "cancelled", "{v}");
                assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 400, "{v}");
                done += 1;
            }
            _ => panic!("unexpected event {v}"),
        }
    }
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_cancelled_streams_leave_nothing_behind() {
    let s = Arc::new(server_with("max_running = 32").await);
    let cancelled_before = metric(&s, "kiln_requests_total", &[("status", "cancelled")]).await;
    let generated_before = metric(&s, "kiln_generated_tokens_total", &[]).await;
    let started = Instant::now();
    // 200 requests: 80 SSE closes, 60 WS closes (10 sockets x 6), 60 WS cancels (10 sockets x 6),
    // at most 40 in flight.
    let per_socket = 6;
    let mut jobs: Vec<(u8, usize)> = (0..80).map(|i| (0, i)).collect();
    jobs.extend((0..10).map(|k| (1, 1000 + k * per_socket)));
    jobs.extend((0..10).map(|k| (2, 2000 + k * per_socket)));
    let limit = Arc::new(tokio::sync::Semaphore::new(40));
    let mut tasks = Vec::new();
    for (kind, i) in jobs {
        let (s, limit) = (s.clone(), limit.clone());
        tasks.push(tokio::spawn(async move {
            let permits = if kind == 0 { 1 } else { per_socket as u32 };
            let _permit = limit.acquire_many(permits).await.unwrap();
            match kind {
                0 => sse_close(&s, i).await,
                1 => ws_close(&s, i, per_socket).await,
                _ => ws_cancel(&s, i, per_socket).await,
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_drained(&s, Duration::from_secs(15)).await;
    // Every one of the 200 was counted as cancelled (the request actors may lag the batcher).
    let deadline = Instant::now() + Duration::from_secs(5);
    let cancelled = loop {
        let c = metric(&s, "kiln_requests_total", &[("status", "cancelled")]).await - cancelled_before;
        if c >= 200.0 || Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(cancelled, 200.0);
    // Cancelled at a step boundary, not run to max_tokens: far fewer than 200 x 400 tokens.
    let generated = metric(&s, "kiln_generated_tokens_total", &[]).await - generated_before;
    assert!(generated < 200.0 * 50.0, "{generated} tokens generated for 200 cancelled requests");
    eprintln!("200 cancellations in {:?}, {generated} tokens generated", started.elapsed());
    // The model still serves.
    let (st, v) = s.post("/v1/completions", json!({"prompt": "ok", "max_tokens": 2})).await;
    assert_eq!(st, 200, "{v}");
    assert_drained(&s, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_max_waiting_is_refused_and_every_accepted_request_completes() {
    let s = server_with("max_running = 2\nmax_waiting = 2").await;
    let rejected_before = metric(&s, "kiln_rejected_total", &[("reason", "overloaded")]).await;
    let sent = 16;
    let body = json!({"model": MODEL, "prompt": "Burst", "max_tokens": 24, "ignore_eos": true, "temperature": 0});
    let calls = (0..sent).map(|_| s.client.post(s.url("/v1/completions")).json(&body).send());
    let (mut accepted, mut rejected) = (0, 0);
    for r in futures::future::join_all(calls).await {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
                assert_eq!(v["usage"]["completion_tokens"], 24, "{v}");
                accepted += 1;
            }
            429 => {
                let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                assert!(retry >= 1);
                common::assert_error(429, &r.json().await.unwrap(), 429, "overloaded");
                rejected += 1;
            }
            other => panic!("unexpected status {other}: {}", r.text().await.unwrap()),
        }
    }
    assert_eq!(accepted + rejected, sent);
    assert!(rejected >= 1, "no request refused with max_running = 2, max_waiting = 2");
    assert!(accepted >= 2, "only {accepted} accepted: the queue holds max_waiting = 2");
    let counted = metric(&s, "kiln_rejected_total", &[("reason", "overloaded")]).await - rejected_before;
    assert_eq!(counted, rejected as f64);

    // The same over a WebSocket: `overloaded` error events, the rest finish.
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    for k in 0..sent {
        let mut m = body.clone();
        m["type"] = json!("generate");
        m["id"] = json!(format!("w{k}"));
        ws.send(Message::Text(m.to_string().into())).await.unwrap();
    }
    let (mut done, mut overloaded) = (0, 0);
    while done + overloaded < sent {
        let v = ws_event(&mut ws).await;
        match v["type"].as_str().unwrap() {
            "token" => {}
            "done" => {
                assert_eq!(v["finish_reason"], "length", "{v}");
                done += 1;
            }
            "error" => {
                assert_eq!(v["code"], "overloaded", "{v}");
                assert!(v["retry_after_s"].as_u64().unwrap() >= 1, "{v}");
                overloaded += 1;
            }
            _ => panic!("unexpected event {v}"),
        }
    }
    assert!(overloaded >= 1 && done >= 1, "done {done}, overloaded {overloaded}");
    assert_drained(&s, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_timeout_gets_408_and_frees_its_sequence() {
    // One running slot and a queue of long generations ahead: the timed request waits in the
    // queue until its deadline.
    let s = server_with("max_running = 1").await;
    // A slow device (30 ms a step) makes every deadline below certain to pass first.
    let (st, _) = s.post("/admin/fault", json!({"model": MODEL, "kind": "slow_steps", "count": 30})).await;
    assert_eq!(st, 200);
    let timeouts_before = metric(&s, "kiln_requests_total", &[("status", "timeout")]).await;
    let queued_before = metric(&s, "kiln_rejected_total", &[("reason", "timeout")]).await;
    let (mut holder, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    for k in 0..6 {
        holder.send(ws_generate(&format!("h{k}"), k)).await.unwrap();
    }
    assert_eq!(ws_event(&mut holder).await["type"], "token");
    let started = Instant::now();
    let (st, v) =
        s.post("/v1/completions", json!({"model": MODEL, "prompt": "late", "max_tokens": 8, "timeout": 0.2})).await;
    let waited = started.elapsed();
    assert_eq!(metric(&s, "kiln_running_sequences", &[]).await, 1.0, "a holder still runs");
    holder.close(None).await.unwrap();
    let e = common::assert_error(st, &v, 408, "timeout");
    assert_eq!(e["type"], "timeout_error");
    assert!(waited < Duration::from_secs(5), "the deadline fired after {waited:?}");
    let queued = metric(&s, "kiln_rejected_total", &[("reason", "timeout")]).await - queued_before;
    assert_eq!(queued, 1.0, "a request that timed out in the queue counts as rejected{{reason=timeout}}");
    assert_drained(&s, Duration::from_secs(10)).await;

    // A running request whose deadline passes mid-generation: 408, its blocks freed; streamed,
    // it ends with finish_reason "timeout".
    let (st, v) = s
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "run", "max_tokens": 480, "ignore_eos": true, "timeout": 0.3}),
        )
        .await;
    common::assert_error(st, &v, 408, "timeout");
    let streamed = s
        .sse("/v1/completions", json!({"model": MODEL, "prompt": "run", "max_tokens": 480, "ignore_eos": true, "timeout": 0.3, "stream": true}))
        .await;
    assert_eq!(streamed.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&streamed[streamed.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "timeout", "{last}");
    assert_drained(&s, Duration::from_secs(10)).await;
    let timeouts = metric(&s, "kiln_requests_total", &[("status", "timeout")]).await - timeouts_before;
    assert_eq!(timeouts, 3.0);
}
