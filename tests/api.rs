//! The HTTP API over a fake backend (no model): routes, shapes, validation, streaming and
//! disconnects, in milliseconds. `tests/server.rs` runs the same surface on a real model.

mod common;

use std::time::Duration;

use common::{check_validation, TestServer};
use futures::StreamExt;
use kiln::server::Limits;
use kiln::testing::fake_state;
use serde_json::{json, Value};

async fn server(step_ms: u64) -> TestServer {
    let limits = Limits { max_body_bytes: 64 * 1024, ..Limits::default() };
    let s = TestServer::start(fake_state(Duration::from_millis(step_ms), limits)).await;
    s.wait_ready().await;
    s
}

#[tokio::test]
async fn every_bad_input_gets_an_openai_error() {
    let s = server(0).await;
    check_validation(&s, "fake", 512).await;
}

#[tokio::test]
async fn chat_and_completions_json() {
    let s = server(0).await;
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "fake");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["content"], "abc");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // "user: hi\nassistant: " is 20 bytes = 20 fake tokens.
    assert_eq!(v["usage"], json!({"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23}));

    let (st, v) = s
        .post(
            "/v1/completions",
            json!({"prompt": "hey", "max_tokens": 2, "temperature": 0, "echo": true, "logprobs": 1}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "heyab");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["a", "b"]));
    assert_eq!(lp["text_offset"], json!([3, 4]));
    assert_eq!(lp["token_logprobs"], json!([-0.5, -0.5]));
    assert_eq!(lp["top_logprobs"][0], json!({"a": -0.5}));
}

#[tokio::test]
async fn chat_logprobs_have_openai_shape() {
    let s = server(0).await;
    let (_, v) = s
        .post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": true, "top_logprobs": 2, "temperature": 0}))
        .await;
    let content = &v["choices"][0]["logprobs"]["content"];
    assert_eq!(content.as_array().unwrap().len(), 2);
    assert_eq!(content[0]["token"], "a");
    assert_eq!(content[0]["bytes"], json!([97]));
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn sse_streams_concatenate_to_the_json_text() {
    let s = server(0).await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0, "n": 2, "stream": true, "stream_options": {"include_usage": true}});
    let data = s.sse("/v1/chat/completions", body).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    for i in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty()) && c["choices"][0]["index"] == i)
            .collect();
        assert_eq!(mine[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = mine.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, "abcde");
        assert_eq!(mine.last().unwrap()["choices"][0]["finish_reason"], "length");
        assert!(mine[..mine.len() - 1].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    }
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 10);

    let data =
        s.sse("/v1/completions", json!({"prompt": "x", "max_tokens": 3, "temperature": 0, "stream": true})).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let text: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, "abc");
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_its_stream() {
    let s = server(10).await;
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": 400, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    let backend = s.state.models[0].backend().await.unwrap();
    assert_eq!(backend.stats().await.unwrap().running, 1);
    drop(body);
    for _ in 0..100 {
        let st = backend.stats().await.unwrap();
        if st.running == 0 && st.used_blocks == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the sequence kept running after the client left");
}

#[tokio::test]
async fn generate_accepts_every_input_form() {
    let s = server(0).await;
    for body in [
        json!({"text": "hi", "sampling_params": {"max_tokens": 2, "temperature": 0}}),
        json!({"prompt": "hi", "system_prompt": "be brief", "sampling_params": {"max_tokens": 2, "temperature": 0}}),
        json!({"messages": [{"role": "user", "content": "hi"}], "sampling_params": {"max_tokens": 2, "temperature": 0}}),
        json!({"input": {"prompt": "hi", "sampling_params": {"max_tokens": 2, "temperature": 0}}}),
        json!({"prompt": [104, 105], "sampling_params": {"max_tokens": 2, "temperature": 0}}),
    ] {
        let (st, v) = s.post("/v1/generate", body.clone()).await;
        assert_eq!(st, 200, "{body}: {v}");
        assert_eq!(v["text"], "ab", "{body}");
        assert_eq!(v["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 2);
    }
    // text goes through the chat template with the system prompt.
    let (_, v) = s
        .post("/v1/generate", json!({"text": "hi", "system_prompt": "be brief", "sampling_params": {"max_tokens": 1}}))
        .await;
    assert_eq!(v["usage"]["prompt_tokens"], "system: be brief\nuser: hi\nassistant: ".len());
    let data = s
        .sse(
            "/v1/generate",
            json!({"text": "hi", "stream": true, "sampling_params": {"max_tokens": 3, "temperature": 0}}),
        )
        .await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let events: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let text: String = events.iter().map(|e| e["text"].as_str().unwrap()).collect();
    assert_eq!(text, "abc");
    assert_eq!(events.last().unwrap()["finish_reason"], "length");
}

#[tokio::test]
async fn models_tokenize_and_operational_routes() {
    let s = server(0).await;
    let (st, body) = s.get("/v1/models").await;
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"][0]["id"], "fake");
    assert_eq!(v["data"][0]["owned_by"], "kiln");
    assert_eq!(v["data"][0]["kiln"]["demo"], true);
    assert_eq!(v["data"][0]["kiln"]["max_model_len"], 512);
    assert_eq!(v["data"][0]["kiln"]["kv_blocks"], 64);

    let (st, v) = s.post("/tokenize", json!({"prompt": "hey"})).await;
    assert_eq!(st, 200);
    assert_eq!(v, json!({"tokens": [104, 101, 121], "count": 3, "max_model_len": 512}));
    let (_, d) = s.post("/detokenize", json!({"tokens": v["tokens"]})).await;
    assert_eq!(d["prompt"], "hey");
    let (_, v) = s.post("/tokenize", json!({"messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(v["count"], "user: x\nassistant: ".len());

    assert_eq!(s.get("/ready").await.0, 200);
    let r = s.client.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/plain; version=0.0.4");
    assert!(r.text().await.unwrap().contains("model=\"fake\""));
}

#[tokio::test]
async fn websocket_over_a_real_socket() {
    use tokio_tungstenite::tungstenite::Message;
    let s = server(5).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    ws.send(Message::Text(
        json!({"type": "generate", "id": "a", "prompt": "hi", "max_tokens": 4, "temperature": 0}).to_string().into(),
    ))
    .await
    .unwrap();
    ws.send(Message::Text(
        json!({"type": "generate", "id": "b", "prompt": "hi", "max_tokens": 300}).to_string().into(),
    ))
    .await
    .unwrap();
    let mut text_a = String::new();
    let mut cancelled = false;
    while !cancelled {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        match (v["type"].as_str().unwrap(), v["id"].as_str().unwrap()) {
            ("token", "a") => text_a.push_str(v["text"].as_str().unwrap()),
            ("done", "a") => {
                ws.send(Message::Text(json!({"type": "cancel", "id": "b"}).to_string().into())).await.unwrap();
            }
            ("done", "b") => {
                assert_eq!(v["finish_reason"], "cancelled");
                cancelled = true;
            }
            _ => {}
        }
    }
    assert_eq!(text_a, "abcd");
}

use futures::SinkExt;

#[tokio::test]
async fn while_draining_inference_routes_answer_503_and_operational_ones_stay_up() {
    use std::sync::atomic::Ordering;
    let s = server(20).await;
    // A stream that started before the drain runs to its end.
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": 10, "temperature": 0, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.state.draining.store(true, Ordering::Release);
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    for (route, body) in [
        ("/v1/chat/completions", chat.clone()),
        ("/v1/completions", json!({"prompt": "hi", "max_tokens": 2})),
        ("/v1/generate", json!({"text": "hi"})),
        ("/v1/embeddings", json!({"input": "hi"})),
        ("/tokenize", json!({"prompt": "hi"})),
        // Even a bad body: the refusal comes first.
        ("/v1/chat/completions", json!({"messages": 5})),
    ] {
        let r = s.client.post(s.url(route)).json(&body).send().await.unwrap();
        assert_eq!(r.headers().get("retry-after").map(|h| h.to_str().unwrap()), Some("1"), "{route}");
        let st = r.status().as_u16();
        let e = common::assert_error(st, &r.json().await.unwrap(), 503, "draining");
        assert_eq!(e["type"], "service_unavailable");
    }
    let ws = tokio_tungstenite::connect_async(s.ws_url()).await;
    match ws {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 503),
        other => panic!("the websocket upgrade was not refused: {:?}", other.map(|(_, r)| r.status())),
    }
    s.assert_healthy().await;
    let (st, body) = s.get("/ready").await;
    assert_eq!(st, 503, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["status"], "draining");
    assert_eq!(s.get("/v1/models").await.0, 200);
    assert_eq!(s.get("/metrics").await.0, 200);
    // The stream admitted before the drain finished normally.
    let text = r.text().await.unwrap();
    assert!(text.contains("\"finish_reason\":\"length\"") && text.trim_end().ends_with("data: [DONE]"), "{text}");

    s.state.draining.store(false, Ordering::Release);
    let (st, v) = s.post("/v1/chat/completions", chat).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(s.get("/ready").await.0, 200);
}

#[tokio::test]
async fn a_request_past_its_timeout_gets_408_or_a_timeout_finish() {
    let s = server(20).await;
    for (route, body) in [
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 300, "timeout": 0.1})),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 300, "timeout": 0.1}),
        ),
        ("/v1/generate", json!({"text": "x", "timeout": 0.1, "sampling_params": {"max_tokens": 300}})),
        ("/v1/generate", json!({"text": "x", "sampling_params": {"max_tokens": 300, "timeout": 0.1}})),
    ] {
        let started = std::time::Instant::now();
        let (st, v) = s.post(route, body.clone()).await;
        let e = common::assert_error(st, &v, 408, "timeout");
        assert_eq!(e["type"], "timeout_error", "{route}");
        assert!(started.elapsed() < Duration::from_secs(3), "{route} {body}: took {:?}", started.elapsed());
    }
    // Streamed: the stream ends with finish_reason "timeout", then [DONE].
    let data =
        s.sse("/v1/completions", json!({"prompt": "x", "max_tokens": 300, "timeout": 0.1, "stream": true})).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "timeout");
    // A timeout longer than the work changes nothing.
    let (st, v) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 2, "timeout": 30})).await;
    assert_eq!(st, 200, "{v}");
    for bad in [json!(0), json!(-1.5), json!("soon")] {
        let (st, v) = s.post("/v1/completions", json!({"prompt": "x", "timeout": bad})).await;
        assert!(st == 400 || st == 422, "{bad}: {st} {v}");
        assert_eq!(v["error"]["param"], "timeout", "{bad}: {v}");
    }
}
