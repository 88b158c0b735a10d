//! Helpers shared by the HTTP tests: serve an `AppState` on 127.0.0.1:0, call it, read SSE,
//! and the validation table every served model must pass.
#![allow(dead_code)]

use std::time::Duration;

use kiln::AppState;
use serde_json::{json, Value};

pub struct TestServer {
    pub base: String,
    pub state: AppState,
    pub client: reqwest::Client,
}

impl TestServer {
    pub async fn start(state: AppState) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = kiln::app(state.clone());
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TestServer { base: format!("http://{addr}"), state, client: reqwest::Client::new() }
    }

    /// Builds the state of `config`, starts its preloads, serves it and waits until it is ready.
    pub async fn serve(config: &kiln::Config) -> TestServer {
        let state = AppState::from_config(config, kiln_actors::Metrics::new()).await.unwrap();
        state.start_preload();
        let s = TestServer::start(state).await;
        s.wait_ready().await;
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ws_url(&self) -> String {
        format!("{}/v1/ws", self.base.replace("http://", "ws://"))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.client.post(self.url(path)).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The `data:` payloads of an SSE response, in order.
    pub async fn sse(&self, path: &str, body: Value) -> Vec<String> {
        let r = self.client.post(self.url(path)).json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        let text = r.text().await.unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }

    pub async fn assert_healthy(&self) {
        let (s, body) = self.get("/health").await;
        assert_eq!((s, body.as_str()), (200, "ok"));
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&self) {
        for _ in 0..600 {
            if self.get("/ready").await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("server not ready after 60 s: {:?}", self.get("/ready").await);
    }
}

/// The value of the series `name{labels}` in a Prometheus text exposition (labels in any
/// order, all of them given); 0 when absent.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (n, mut have) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}').split(',').map(str::to_string).collect::<Vec<_>>()),
            None => (series, Vec::new()),
        };
        have.sort();
        if n == name && have == want {
            return value.parse().unwrap();
        }
    }
    0.0
}

/// Checks the OpenAI error shape and returns the error object.
pub fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) -> Value {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(e.is_object(), "no error object: {body}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(e.get("param").is_some(), "{body}");
    assert_eq!(e["code"], want_code, "{body}");
    e.clone()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Every validation case of the API: (route, body, status, code, param).
/// `context` is the model's context length.
pub fn validation_cases(model: &str, context: usize) -> Vec<(&'static str, Value, u16, &'static str, Option<String>)> {
    let chat = "/v1/chat/completions";
    let cmpl = "/v1/completions";
    let with = |field: &str, v: Value| {
        let mut b = json!({"model": model, "messages": user("hi"), "max_tokens": 4});
        b[field] = v;
        b
    };
    let p = |s: &str| Some(s.to_string());
    vec![
        (chat, json!({"model": model, "messages": "hi"}), 422, "invalid_type", p("messages")),
        (chat, with("temperature", json!("hot")), 422, "invalid_type", p("temperature")),
        (chat, json!({"model": model}), 422, "invalid_type", p("messages")),
        (chat, json!({"model": model, "messages": []}), 400, "invalid_parameter", p("messages")),
        (
            chat,
            json!({"model": model, "messages": [{"role": "user", "content": 5}]}),
            422,
            "invalid_type",
            p("messages[0].content"),
        ),
        (
            chat,
            json!({"model": model, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            400,
            "unsupported",
            None,
        ),
        (cmpl, json!({"model": model, "prompt": ""}), 400, "invalid_parameter", p("prompt")),
        (cmpl, json!({"model": model, "prompt": []}), 400, "invalid_parameter", p("prompt")),
        (cmpl, json!({"model": model, "prompt": {"a": 1}}), 422, "invalid_type", p("prompt")),
        (cmpl, json!({"model": model, "prompt": [-1]}), 400, "invalid_parameter", p("prompt")),
        (cmpl, json!({"model": model, "prompt": ["a", "b"]}), 400, "unsupported", None),
        (chat, with("temperature", json!(2.5)), 400, "invalid_parameter", p("temperature")),
        (chat, with("temperature", json!(-0.5)), 400, "invalid_parameter", p("temperature")),
        (chat, with("top_p", json!(0)), 400, "invalid_parameter", p("top_p")),
        (chat, with("top_p", json!(1.01)), 400, "invalid_parameter", p("top_p")),
        (chat, with("top_k", json!(-2)), 400, "invalid_parameter", p("top_k")),
        (chat, with("min_p", json!(1.5)), 400, "invalid_parameter", p("min_p")),
        (chat, with("min_p", json!(-0.1)), 400, "invalid_parameter", p("min_p")),
        (chat, with("presence_penalty", json!(2.5)), 400, "invalid_parameter", p("presence_penalty")),
        (chat, with("frequency_penalty", json!(-2.5)), 400, "invalid_parameter", p("frequency_penalty")),
        (chat, with("repetition_penalty", json!(0)), 400, "invalid_parameter", p("repetition_penalty")),
        (chat, with("n", json!(0)), 400, "invalid_parameter", p("n")),
        (chat, with("n", json!(17)), 400, "invalid_parameter", p("n")),
        (chat, with("max_tokens", json!(0)), 400, "invalid_parameter", p("max_tokens")),
        (chat, with("max_tokens", json!(-3)), 400, "invalid_parameter", p("max_tokens")),
        (chat, with("max_completion_tokens", json!(0)), 400, "invalid_parameter", p("max_completion_tokens")),
        (chat, with("max_tokens", json!(context)), 400, "context_length_exceeded", p("max_tokens")),
        (
            cmpl,
            json!({"model": model, "prompt": vec![5; context + 10], "max_tokens": 1}),
            400,
            "context_length_exceeded",
            p("prompt"),
        ),
        (chat, with("top_logprobs", json!(3)), 400, "invalid_parameter", p("top_logprobs")),
        (
            chat,
            json!({"model": model, "messages": user("hi"), "logprobs": true, "top_logprobs": 21}),
            400,
            "invalid_parameter",
            p("top_logprobs"),
        ),
        (chat, with("logprobs", json!(3)), 422, "invalid_type", p("logprobs")),
        (cmpl, json!({"model": model, "prompt": "hi", "logprobs": 21}), 400, "invalid_parameter", p("logprobs")),
        (cmpl, json!({"model": model, "prompt": "hi", "logprobs": -1}), 400, "invalid_parameter", p("logprobs")),
        (
            chat,
            with("stop", json!((0..17).map(|i| format!("s{i}")).collect::<Vec<_>>())),
            400,
            "invalid_parameter",
            p("stop"),
        ),
        (chat, with("stop", json!(["ok", ""])), 400, "invalid_parameter", p("stop")),
        (chat, with("stop_token_ids", json!([-4])), 400, "invalid_parameter", p("stop_token_ids")),
        (chat, with("echo", json!(true)), 400, "invalid_parameter", p("echo")),
        (chat, with("tools", json!([{"type": "function", "function": {"name": "f"}}])), 400, "unsupported", None),
        (chat, with("response_format", json!({"type": "json_object"})), 400, "unsupported", None),
        (chat, json!({"model": "no-such-model", "messages": user("hi")}), 404, "model_not_found", p("model")),
        (cmpl, json!({"model": "no-such-model", "prompt": "hi"}), 404, "model_not_found", p("model")),
        ("/v1/generate", json!({"model": model}), 400, "invalid_parameter", p("text")),
        (
            "/v1/generate",
            json!({"model": model, "text": "hi", "sampling_params": {"temperature": 5}}),
            400,
            "invalid_parameter",
            p("temperature"),
        ),
        ("/tokenize", json!({"model": model}), 400, "invalid_parameter", p("prompt")),
        ("/detokenize", json!({"model": model, "tokens": [-1]}), 400, "invalid_parameter", p("tokens")),
    ]
}

/// Runs the validation table and the raw-body cases; the server must stay healthy.
pub async fn check_validation(server: &TestServer, model: &str, context: usize) {
    for (route, body, status, code, param) in validation_cases(model, context) {
        let (s, v) = server.post(route, body.clone()).await;
        let e = assert_error(s, &v, status, code);
        if let Some(param) = param {
            assert_eq!(e["param"], param.as_str(), "{route} {body}: {v}");
        }
        server.assert_healthy().await;
    }
    let chat = "/v1/chat/completions";
    for (raw, what) in [
        (b"{\"model\": ".to_vec(), "truncated JSON"),
        (b"{\"messages\": [}".to_vec(), "malformed JSON"),
        (b"{} trailing".to_vec(), "trailing characters"),
        (vec![0xff, 0xfe, 0x7b, 0x7d], "not UTF-8"),
        (Vec::new(), "empty body"),
    ] {
        let (s, v) = server.post_raw(chat, raw).await;
        assert_error(s, &v, 400, "invalid_json");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty(), "{what}");
        server.assert_healthy().await;
    }
    let limit = server.state.limits.max_body_bytes;
    let huge = json!({"model": model, "prompt": "x".repeat(limit + 10)});
    let (s, v) = server.post_raw("/v1/completions", serde_json::to_vec(&huge).unwrap()).await;
    assert_error(s, &v, 413, "payload_too_large");
    server.assert_healthy().await;
    let (s, body) = server.get("/v1/nowhere").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_error(s, &v, 404, "not_found");
    let r = server.client.delete(server.url("/v1/models")).send().await.unwrap();
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 405, "method_not_allowed");
}
