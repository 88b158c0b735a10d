//! The server end to end on the fixture model (tests/fixtures/qwen2-tied-gqa, random
//! weights, CPU): real batcher, real tokenizer, reqwest and tokio-tungstenite clients.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{check_validation, TestServer};
use futures::{SinkExt, StreamExt};
use kiln::config::Config;
use serde_json::{json, Value};

const MODEL: &str = "kiln-demo";
/// The fixture's max_position_embeddings.
const CONTEXT: usize = 512;

fn config(extra: &str) -> Config {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        r#"
        [server]
        max_body_bytes = 65536
        request_timeout_s = 60
        max_ws_inflight = 4

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

async fn server() -> TestServer {
    server_with("").await
}

fn chat(content: &str, extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

fn data_json(data: &[String]) -> Vec<Value> {
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

#[tokio::test]
async fn chat_and_completions_answer_in_openai_shape() {
    let s = server().await;
    let (st, v) = s.post("/v1/chat/completions", chat("Hello!", json!({"max_tokens": 8, "temperature": 0}))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    assert!(v["choices"][0]["message"]["content"].is_string());
    assert!(["stop", "length"].contains(&v["choices"][0]["finish_reason"].as_str().unwrap()));
    let (_, t) = s.post("/tokenize", json!({"messages": [{"role": "user", "content": "Hello!"}]})).await;
    assert_eq!(v["usage"]["prompt_tokens"], t["count"]);
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );

    let (st, v) = s.post("/v1/completions", json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": true, "logprobs": 2})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 6);
    assert!(lp["token_logprobs"].as_array().unwrap().iter().all(|l| l.as_f64().unwrap() <= 0.0));
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
}

#[tokio::test]
async fn sse_stream_concatenates_to_the_greedy_text() {
    let s = server().await;
    let req = chat("Tell me a story", json!({"max_tokens": 16, "temperature": 0, "ignore_eos": true}));
    let (_, full) = s.post("/v1/chat/completions", req.clone()).await;
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = data_json(&s.sse("/v1/chat/completions", streamed).await);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String =
        chunks.iter().filter_map(|c| c["choices"].get(0).and_then(|ch| ch["delta"]["content"].as_str())).collect();
    assert_eq!(text, full["choices"][0]["message"]["content"].as_str().unwrap());
    let last_choice = chunks.iter().rev().find(|c| !c["choices"].as_array().unwrap().is_empty()).unwrap();
    assert_eq!(last_choice["choices"][0]["finish_reason"], "length");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], full["usage"]);

    let req = json!({"model": MODEL, "prompt": "The sky is", "max_tokens": 10, "temperature": 0, "ignore_eos": true});
    let (_, full) = s.post("/v1/completions", req.clone()).await;
    let mut streamed = req;
    streamed["stream"] = json!(true);
    let chunks = data_json(&s.sse("/v1/completions", streamed).await);
    let text: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(text, full["choices"][0]["text"].as_str().unwrap());
}

#[tokio::test]
async fn stop_strings_end_the_text_before_them() {
    let s = server().await;
    let req = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let (_, full) = s.post("/v1/completions", req.clone()).await;
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string from the middle of the greedy text (on a char boundary, not at the start).
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 8, "{text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let want = &text[..text.find(&stop).unwrap()];
    let mut with_stop = req.clone();
    with_stop["stop"] = json!([stop]);
    let (st, v) = s.post("/v1/completions", with_stop.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want, "stop {stop:?} in {text:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    with_stop["stream"] = json!(true);
    let chunks = data_json(&s.sse("/v1/completions", with_stop).await);
    let streamed: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(streamed, want);
}

#[tokio::test]
async fn n_choices_and_seeded_sampling() {
    let s = server().await;
    let req = json!({"model": MODEL, "prompt": "Hi", "max_tokens": 8, "n": 2, "temperature": 1.0, "seed": 1234, "ignore_eos": true});
    let (st, a) = s.post("/v1/completions", req.clone()).await;
    assert_eq!(st, 200, "{a}");
    let choices = a["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!((choices[0]["index"].as_u64(), choices[1]["index"].as_u64()), (Some(0), Some(1)));
    assert_eq!(a["usage"]["completion_tokens"], 16);
    let (_, b) = s.post("/v1/completions", req).await;
    assert_eq!(a["choices"], b["choices"], "same seed, same text");
}

#[tokio::test]
async fn every_bad_input_gets_an_openai_error() {
    let s = server().await;
    check_validation(&s, MODEL, CONTEXT).await;
    // The model is still serving after all of that.
    let (st, _) = s.post("/v1/completions", json!({"prompt": "ok", "max_tokens": 1})).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn a_client_that_disconnects_frees_its_sequence() {
    let s = server().await;
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "a", "max_tokens": 500, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    let backend = s.state.models[0].backend().await.unwrap();
    for _ in 0..250 {
        let st = backend.stats().await.unwrap();
        if st.running == 0 && st.used_blocks == 0 && st.waiting == 0 {
            assert!(st.steps < 450, "the sequence ran to the end ({} steps): not cancelled", st.steps);
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("still running 5 s after the client left: {:?}", backend.stats().await);
}

#[tokio::test]
async fn websocket_interleaves_generations_and_cancels() {
    use tokio_tungstenite::tungstenite::Message;
    let s = server().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    let send = |v: Value| Message::Text(v.to_string().into());
    ws.send(send(json!({"type": "generate", "id": "a", "prompt": "Hello", "max_tokens": 40, "temperature": 0, "ignore_eos": true}))).await.unwrap();
    ws.send(send(json!({"type": "generate", "id": "b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10, "temperature": 0, "ignore_eos": true}))).await.unwrap();
    ws.send(send(json!({"type": "generate", "id": "c", "prompt": "Long", "max_tokens": 480, "ignore_eos": true})))
        .await
        .unwrap();
    ws.send(send(json!({"type": "bogus", "id": "z"}))).await.unwrap();
    let mut texts = std::collections::HashMap::<String, String>::new();
    let mut done = std::collections::HashMap::<String, Value>::new();
    let mut order = Vec::new();
    let mut sent_cancel = false;
    let mut saw_bogus = false;
    while done.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("event").unwrap().unwrap();
        let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        let id = v["id"].as_str().unwrap_or("").to_string();
        match v["type"].as_str().unwrap() {
            "token" => {
                texts.entry(id.clone()).or_default().push_str(v["text"].as_str().unwrap());
                order.push(id.clone());
                if id == "c" && !sent_cancel {
                    ws.send(send(json!({"type": "cancel", "id": "c"}))).await.unwrap();
                    sent_cancel = true;
                }
            }
            "done" => {
                done.insert(id, v);
            }
            "error" => {
                assert_eq!((id.as_str(), v["code"].as_str()), ("z", Some("unknown_type")), "{v}");
                saw_bogus = true;
            }
            other => panic!("unexpected event {other}: {v}"),
        }
    }
    assert!(saw_bogus);
    assert_eq!(done["a"]["finish_reason"], "length");
    assert_eq!(done["a"]["usage"]["completion_tokens"], 40);
    assert_eq!(done["b"]["usage"]["completion_tokens"], 10);
    assert_eq!(done["c"]["finish_reason"], "cancelled");
    assert!(done["c"]["usage"]["completion_tokens"].as_u64().unwrap() < 480);
    // a and b ran at the same time: their tokens interleave.
    let first_b = order.iter().position(|i| i == "b").unwrap();
    let last_a = order.iter().rposition(|i| i == "a").unwrap();
    assert!(first_b < last_a, "not interleaved: {order:?}");
    // Same greedy text as the HTTP route.
    let (_, full) = s
        .post("/v1/completions", json!({"prompt": "Hello", "max_tokens": 40, "temperature": 0, "ignore_eos": true}))
        .await;
    assert_eq!(texts["a"], full["choices"][0]["text"].as_str().unwrap());
}

#[tokio::test]
async fn generate_accepts_every_input_form() {
    let s = server().await;
    let sp = json!({"max_tokens": 4, "temperature": 0, "ignore_eos": true});
    let (_, via_chat) = s
        .post("/v1/chat/completions", chat("Hi there", json!({"max_tokens": 4, "temperature": 0, "ignore_eos": true})))
        .await;
    for body in [
        json!({"text": "Hi there", "sampling_params": sp}),
        json!({"prompt": "Hi there", "sampling_params": sp}),
        json!({"messages": [{"role": "user", "content": "Hi there"}], "sampling_params": sp}),
        json!({"input": {"text": "Hi there", "sampling_params": sp}}),
    ] {
        let (st, v) = s.post("/v1/generate", body.clone()).await;
        assert_eq!(st, 200, "{body}: {v}");
        assert_eq!(v["text"], via_chat["choices"][0]["message"]["content"], "{body}");
        assert_eq!(v["usage"], via_chat["usage"], "{body}");
        assert_eq!(v["finish_reason"], "length");
    }
    let (_, with_system) = s
        .post("/v1/generate", json!({"text": "Hi there", "system_prompt": "You are terse.", "sampling_params": sp}))
        .await;
    let (_, t) = s
        .post("/tokenize", json!({"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]}))
        .await;
    assert_eq!(with_system["usage"]["prompt_tokens"], t["count"], "system_prompt goes through the template");
    let chunks =
        data_json(&s.sse("/v1/generate", json!({"text": "Hi there", "stream": true, "sampling_params": sp})).await);
    let text: String = chunks.iter().map(|c| c["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(text, via_chat["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["finish_reason"], "length");
}

#[tokio::test]
async fn tokenize_detokenize_models_metrics() {
    let s = server().await;
    let (st, t) = s.post("/tokenize", json!({"model": MODEL, "prompt": "Hello world, how are you?"})).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["max_model_len"], CONTEXT);
    assert_eq!(t["count"].as_u64().unwrap() as usize, t["tokens"].as_array().unwrap().len());
    let (st, d) = s.post("/detokenize", json!({"model": MODEL, "tokens": t["tokens"]})).await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["prompt"], "Hello world, how are you?");

    let (_, body) = s.get("/v1/models").await;
    let m: Value = serde_json::from_str(&body).unwrap();
    let entry = &m["data"][0];
    assert_eq!(entry["id"], MODEL);
    assert_eq!(entry["object"], "model");
    assert_eq!(entry["owned_by"], "kiln");
    assert_eq!(entry["kiln"]["demo"], true);
    assert_eq!(entry["kiln"]["max_model_len"], CONTEXT);
    assert!(entry["kiln"]["kv_blocks"].as_u64().unwrap() > 0);

    let (st, _) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 2})).await;
    assert_eq!(st, 200);
    let r = s.client.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/plain; version=0.0.4");
    let text = r.text().await.unwrap();
    assert!(text.lines().any(|l| l.starts_with("kiln_") && l.contains(&format!("model=\"{MODEL}\""))), "{text}");
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let s = server_with("max_running = 1\nmax_waiting = 1").await;
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": true});
    let calls = (0..6).map(|_| s.client.post(s.url("/v1/completions")).json(&body).send());
    let responses = futures::future::join_all(calls).await;
    let mut overloaded = 0;
    for r in responses {
        let r = r.unwrap();
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
            let v: Value = r.json().await.unwrap();
            common::assert_error(429, &v, 429, "overloaded");
            overloaded += 1;
        } else {
            assert_eq!(r.status(), 200);
        }
    }
    assert!(overloaded > 0, "no request was refused with max_running = 1, max_waiting = 1");
    s.assert_healthy().await;
}

#[tokio::test]
async fn metrics_move_by_the_workload() {
    let s = server_with("max_running = 4").await;
    let scrape = || async { s.get("/metrics").await.1 };
    let m = |text: &str, name: &str, extra: &[(&str, &str)]| {
        let mut labels = extra.to_vec();
        labels.push(("model", MODEL));
        common::metric_value(text, name, &labels)
    };
    let before = scrape().await;
    // 3 requests of exactly 5 tokens, one cancelled stream, one invalid request (no effect).
    let mut prompt_tokens = 0.0;
    for i in 0..3 {
        let (st, v) = s
            .post("/v1/completions", json!({"prompt": format!("Count {i}"), "max_tokens": 5, "ignore_eos": true}))
            .await;
        assert_eq!(st, 200, "{v}");
        prompt_tokens += v["usage"]["prompt_tokens"].as_f64().unwrap();
    }
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "Leave", "max_tokens": 480, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    let (st, _) = s.post("/v1/completions", json!({"prompt": "x", "temperature": 7})).await;
    assert_eq!(st, 400);
    let mut after = scrape().await;
    for _ in 0..250 {
        if m(&after, "kiln_requests_total", &[("status", "cancelled")])
            > m(&before, "kiln_requests_total", &[("status", "cancelled")])
            && m(&after, "kiln_running_sequences", &[]) == 0.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = scrape().await;
    }
    let delta = |name: &str, extra: &[(&str, &str)]| m(&after, name, extra) - m(&before, name, extra);
    assert_eq!(delta("kiln_requests_total", &[("status", "length")]), 3.0, "{after}");
    assert_eq!(delta("kiln_requests_total", &[("status", "cancelled")]), 1.0, "{after}");
    assert_eq!(delta("kiln_requests_total", &[("status", "rejected")]), 0.0, "a 400 is not a rejection");
    assert_eq!(delta("kiln_request_duration_seconds_count", &[]), 4.0);
    assert_eq!(delta("kiln_time_to_first_token_seconds_count", &[]), 4.0);
    assert!(delta("kiln_inter_token_latency_seconds_count", &[]) >= 3.0 * 4.0);
    let generated = delta("kiln_generated_tokens_total", &[]);
    assert!((16.0..480.0).contains(&generated), "{generated} tokens: 3 x 5 + the cancelled stream's");
    let leave = s.post("/tokenize", json!({"prompt": "Leave"})).await.1["count"].as_f64().unwrap();
    assert_eq!(delta("kiln_prompt_tokens_total", &[]), prompt_tokens + leave);
    assert!(delta("kiln_engine_steps_total", &[]) >= 5.0);
    assert!(delta("kiln_batch_size_count", &[]) >= 5.0);
    assert!(delta("kiln_step_duration_seconds_count", &[]) >= 5.0);
    for gauge in ["kiln_running_sequences", "kiln_queue_depth", "kiln_kv_blocks_used", "kiln_kv_cache_usage_ratio"] {
        assert_eq!(m(&after, gauge, &[]), 0.0, "{gauge}: {after}");
    }
    assert!(m(&after, "kiln_kv_blocks_total", &[]) > 0.0);
}
