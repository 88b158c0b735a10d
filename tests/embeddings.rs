//! `/v1/embeddings` and the WebSocket `embed` message end to end: a real server on
//! 127.0.0.1:0 serving the sentence-transformers fixtures (tests/fixtures/bert-tiny-st: mean
//! pooling + Normalize; xlmr-tiny-st: CLS, query/passage prompts) next to the tiny text model,
//! checked against the vectors sentence-transformers recorded (expected.json, 1e-5).

mod common;

use std::path::Path;

use common::{assert_error, TestServer};
use futures::{SinkExt, StreamExt};
use kiln::config::Config;
use serde_json::{json, Value};

const BERT: &str = "bert-tiny";
const XLMR: &str = "xlmr-tiny";
const TEXT: &str = "kiln-demo";
const TOL: f32 = 1e-5;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn config(bert_extra: &str) -> Config {
    let text = format!(
        r#"
        [server]
        max_body_bytes = 1048576
        request_timeout_s = 60

        [[models]]
        name = "{BERT}"
        path = "tests/fixtures/bert-tiny-st"
        device = "cpu"
        {bert_extra}

        [[models]]
        name = "{XLMR}"
        path = "tests/fixtures/xlmr-tiny-st"
        device = "cpu"

        [[models]]
        name = "{TEXT}"
        path = "tests/fixtures/qwen2-tied-gqa"
        demo = true
        device = "cpu"
        kv_cache_tokens = 2048
        max_batch_tokens = 256
        "#
    );
    Config::parse(&text, "test config", root()).unwrap()
}

async fn server_with(bert_extra: &str) -> TestServer {
    TestServer::serve(&config(bert_extra)).await
}

async fn server() -> TestServer {
    server_with("").await
}

fn expected(name: &str) -> Value {
    let path = root().join("tests/fixtures").join(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn vectors(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(floats).collect()
}

fn token_counts(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().len()).collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let d = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(d <= TOL, "{what}: max abs diff {d:e} > {TOL:e}");
}

/// The vectors of a float response, checking its shape and order.
fn data_vectors(v: &Value, model: &str, n: usize) -> Vec<Vec<f32>> {
    assert_eq!(v["object"], "list", "{v}");
    assert_eq!(v["model"], model, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], v["usage"]["total_tokens"], "{v}");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), n);
    data.iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["object"], "embedding");
            assert_eq!(d["index"], i);
            floats(&d["embedding"])
        })
        .collect()
}

fn b64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not standard base64: {c}"),
    } as u32;
    let bytes = s.as_bytes();
    assert_eq!(bytes.len() % 4, 0, "base64 without padding");
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().filter(|&&c| c == b'=').count();
        let n = chunk.iter().take(4 - pad).enumerate().fold(0u32, |n, (k, &c)| n | (val(c) << (18 - 6 * k)));
        out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8][..3 - pad]);
    }
    out
}

fn b64_floats(s: &str) -> Vec<f32> {
    b64_decode(s).chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

#[tokio::test]
async fn vectors_match_sentence_transformers_for_strings_and_arrays() {
    let s = server().await;
    let exp = expected("bert-tiny-st");
    let sentences = strings(&exp["sentences"]);
    let want = vectors(&exp["vectors"]);
    let counts = token_counts(&exp["token_ids"]);

    // One string at a time.
    for (i, text) in sentences.iter().enumerate() {
        let (st, v) = s.post("/v1/embeddings", json!({"model": BERT, "input": text})).await;
        assert_eq!(st, 200, "{v}");
        let got = data_vectors(&v, BERT, 1);
        assert_close(&got[0], &want[i], &format!("sentence {i} alone"));
        assert_eq!(v["usage"]["prompt_tokens"], counts[i], "{text}");
    }

    // All at once, and reversed: order is preserved.
    let (st, v) = s.post("/v1/embeddings", json!({"model": BERT, "input": sentences, "user": "u1"})).await;
    assert_eq!(st, 200, "{v}");
    for (i, g) in data_vectors(&v, BERT, sentences.len()).iter().enumerate() {
        assert_close(g, &want[i], &format!("sentence {i} in a batch"));
    }
    assert_eq!(v["usage"]["prompt_tokens"], counts.iter().sum::<usize>());
    let reversed: Vec<&String> = sentences.iter().rev().collect();
    let (st, v) = s.post("/v1/embeddings", json!({"model": BERT, "input": reversed})).await;
    assert_eq!(st, 200, "{v}");
    for (k, g) in data_vectors(&v, BERT, sentences.len()).iter().enumerate() {
        assert_close(g, &want[sentences.len() - 1 - k], &format!("reversed {k}"));
    }

    // Token-id input: one list, and a list of lists.
    let ids = exp["token_ids"].as_array().unwrap();
    let (st, v) = s.post("/v1/embeddings", json!({"model": BERT, "input": ids[1]})).await;
    assert_eq!(st, 200, "{v}");
    assert_close(&data_vectors(&v, BERT, 1)[0], &want[1], "token ids");
    assert_eq!(v["usage"]["prompt_tokens"], counts[1]);
    let (st, v) = s.post("/v1/embeddings", json!({"model": BERT, "input": ids})).await;
    assert_eq!(st, 200, "{v}");
    for (i, g) in data_vectors(&v, BERT, ids.len()).iter().enumerate() {
        assert_close(g, &want[i], &format!("token ids {i}"));
    }
    // Token ids longer than max_seq_length are cut by default.
    let mut long: Vec<u64> = ids[1].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    long.extend([300, 301, 302]);
    let (st, v) = s.post("/v1/embeddings", json!({"model": BERT, "input": [long]})).await;
    assert_eq!(st, 200, "{v}");
    assert_close(&data_vectors(&v, BERT, 1)[0], &want[1], "truncated token ids");
    assert_eq!(v["usage"]["prompt_tokens"], 24);

    // Without `model`, several models served: a clear 400.
    let (st, v) = s.post("/v1/embeddings", json!({"input": "hi"})).await;
    assert_error(st, &v, 400, "invalid_parameter");
    s.assert_healthy().await;
}

#[tokio::test]
async fn base64_dimensions_and_prompts() {
    let s = server().await;
    let exp = expected("bert-tiny-st");
    let sentences = strings(&exp["sentences"]);
    let want = vectors(&exp["vectors"]);

    let (_, floats_resp) = s.post("/v1/embeddings", json!({"model": BERT, "input": sentences})).await;
    let float_vectors = data_vectors(&floats_resp, BERT, sentences.len());
    let (st, v) =
        s.post("/v1/embeddings", json!({"model": BERT, "input": sentences, "encoding_format": "base64"})).await;
    assert_eq!(st, 200, "{v}");
    for (i, d) in v["data"].as_array().unwrap().iter().enumerate() {
        let got = b64_floats(d["embedding"].as_str().unwrap());
        assert_eq!(got, float_vectors[i], "base64 and float differ for {i}");
        assert_close(&got, &want[i], &format!("base64 {i}"));
    }
    assert_eq!(v["usage"], floats_resp["usage"]);

    // Matryoshka: the first 8 components, re-normalised (the model normalises).
    for format in ["float", "base64"] {
        let body = json!({"model": BERT, "input": sentences, "dimensions": 8, "encoding_format": format});
        let (st, v) = s.post("/v1/embeddings", body).await;
        assert_eq!(st, 200, "{v}");
        for (i, d) in v["data"].as_array().unwrap().iter().enumerate() {
            let got = match format {
                "float" => floats(&d["embedding"]),
                _ => b64_floats(d["embedding"].as_str().unwrap()),
            };
            let head = &want[i][..8];
            let n = norm(head) as f32;
            let renorm: Vec<f32> = head.iter().map(|x| x / n).collect();
            assert_close(&got, &renorm, &format!("dimensions 8, {format}, {i}"));
            assert!((norm(&got) - 1.0).abs() < 1e-5);
        }
    }
    let (st, v) = s.post("/v1/embeddings", json!({"model": BERT, "input": "hi", "dimensions": 32})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(data_vectors(&v, BERT, 1)[0].len(), 32);

    // XLM-R: CLS pooling without Normalize, named prompts.
    let xe = expected("xlmr-tiny-st");
    let queries = strings(&xe["query_sentences"]);
    let (st, v) = s.post("/v1/embeddings", json!({"model": XLMR, "input": queries, "prompt_name": "query"})).await;
    assert_eq!(st, 200, "{v}");
    let qwant = vectors(&xe["query_vectors"]);
    for (i, g) in data_vectors(&v, XLMR, queries.len()).iter().enumerate() {
        assert_close(g, &qwant[i], &format!("xlmr query {i}"));
    }
    assert_eq!(v["usage"]["prompt_tokens"], token_counts(&xe["query_token_ids"]).iter().sum::<usize>());
    let xs = strings(&xe["sentences"]);
    let (st, v) = s.post("/v1/embeddings", json!({"model": XLMR, "input": xs[0], "dimensions": 4})).await;
    assert_eq!(st, 200, "{v}");
    // Not a normalising model: truncation only.
    assert_close(&data_vectors(&v, XLMR, 1)[0], &vectors(&xe["vectors"])[0][..4], "xlmr dimensions 4");
}

#[tokio::test]
async fn models_lists_embedding_models() {
    let s = server().await;
    let (st, body) = s.get("/v1/models").await;
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let find = |name: &str| v["data"].as_array().unwrap().iter().find(|m| m["id"] == name).unwrap().clone();
    let bert = find(BERT);
    assert_eq!(bert["kiln"]["family"], "embedding", "{bert}");
    assert_eq!(bert["kiln"]["dimensions"], 32);
    assert_eq!(bert["kiln"]["max_seq_length"], 24);
    assert_eq!(bert["kiln"]["pooling"], "mean");
    assert_eq!(bert["kiln"]["normalize"], true);
    assert_eq!(bert["kiln"]["state"], "ready");
    let xlmr = find(XLMR);
    assert_eq!((xlmr["kiln"]["pooling"].as_str(), xlmr["kiln"]["max_seq_length"].as_u64()), (Some("cls"), Some(20)));
    assert_eq!(xlmr["kiln"]["prompts"]["query"], "query: ");
    assert_eq!(find(TEXT)["kiln"]["family"], "text-generation");
}

#[tokio::test]
async fn bad_inputs_get_openai_errors_and_the_server_stays_up() {
    let s = server().await;
    let exp = expected("bert-tiny-st");
    let long_text = strings(&exp["sentences"])[2].clone();
    let e = "/v1/embeddings";
    let p = |x: &str| Some(x.to_string());
    let body = |extra: Value| {
        let mut b = json!({"model": BERT, "input": "hello"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let cases: Vec<(&str, Value, u16, &str, Option<String>)> = vec![
        (e, json!({"model": BERT}), 422, "invalid_type", p("input")),
        (e, body(json!({"input": ""})), 400, "invalid_parameter", p("input")),
        (e, body(json!({"input": []})), 400, "invalid_parameter", p("input")),
        (e, body(json!({"input": ["a", ""]})), 400, "invalid_parameter", p("input")),
        (e, body(json!({"input": [[]]})), 400, "invalid_parameter", p("input")),
        (e, body(json!({"input": [[5], []]})), 400, "invalid_parameter", p("input")),
        (e, body(json!({"input": vec!["a"; 2049]})), 400, "invalid_parameter", p("input")),
        (e, body(json!({"input": 5})), 422, "invalid_type", p("input")),
        (e, body(json!({"input": null})), 422, "invalid_type", p("input")),
        (e, body(json!({"input": {"text": "a"}})), 422, "invalid_type", p("input")),
        (e, body(json!({"input": ["a", 1]})), 422, "invalid_type", p("input")),
        (e, body(json!({"input": [1, "a"]})), 422, "invalid_type", p("input")),
        (e, body(json!({"input": [[1], "a"]})), 422, "invalid_type", p("input")),
        (e, body(json!({"input": [1.5]})), 422, "invalid_type", p("input")),
        (e, body(json!({"input": [true]})), 422, "invalid_type", p("input")),
        (e, body(json!({"input": [2, 100000]})), 400, "invalid_parameter", p("input")),
        (e, body(json!({"input": [[2, 3], [-1]]})), 400, "invalid_parameter", p("input")),
        (e, body(json!({"encoding_format": "int8"})), 400, "invalid_parameter", p("encoding_format")),
        (e, body(json!({"encoding_format": 3})), 422, "invalid_type", p("encoding_format")),
        (e, body(json!({"dimensions": 0})), 400, "invalid_parameter", p("dimensions")),
        (e, body(json!({"dimensions": -3})), 400, "invalid_parameter", p("dimensions")),
        (e, body(json!({"dimensions": 33})), 400, "invalid_parameter", p("dimensions")),
        (e, body(json!({"dimensions": "8"})), 422, "invalid_type", p("dimensions")),
        (e, body(json!({"prompt_name": "nope"})), 400, "invalid_parameter", p("prompt_name")),
        (e, body(json!({"input": [2, 3], "prompt_name": "query"})), 400, "invalid_parameter", p("prompt_name")),
        (e, body(json!({"truncate": "no"})), 422, "invalid_type", p("truncate")),
        (e, body(json!({"input": long_text, "truncate": false})), 400, "context_length_exceeded", p("input")),
        (e, body(json!({"input": ["ok", long_text], "truncate": false})), 400, "context_length_exceeded", p("input")),
        (e, body(json!({"input": vec![5; 30], "truncate": false})), 400, "context_length_exceeded", p("input")),
        (e, json!({"model": "nope", "input": "a"}), 404, "model_not_found", p("model")),
        // The wrong kind of model, both ways.
        (e, json!({"model": TEXT, "input": "a"}), 400, "invalid_parameter", p("model")),
        (
            "/v1/chat/completions",
            json!({"model": BERT, "messages": [{"role": "user", "content": "hi"}]}),
            400,
            "invalid_parameter",
            p("model"),
        ),
        ("/v1/completions", json!({"model": BERT, "prompt": "hi"}), 400, "invalid_parameter", p("model")),
        ("/v1/generate", json!({"model": BERT, "text": "hi"}), 400, "invalid_parameter", p("model")),
        ("/tokenize", json!({"model": BERT, "prompt": "hi"}), 400, "invalid_parameter", p("model")),
    ];
    for (route, b, status, code, param) in cases {
        let (st, v) = s.post(route, b.clone()).await;
        let err = assert_error(st, &v, status, code);
        if let Some(param) = param {
            assert_eq!(err["param"], param.as_str(), "{route} {b}: {v}");
        }
        s.assert_healthy().await;
    }
    let (st, v) = s.post(e, json!({"model": TEXT, "input": "a"})).await;
    assert_eq!(st, 400);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("text-generation") && msg.contains(TEXT), "{msg}");
    let (st, v) = s.post_raw(e, b"{\"input\": ".to_vec()).await;
    assert_error(st, &v, 400, "invalid_json");
    // The long input is fine when truncated, and the models still answer.
    let (st, v) = s.post(e, json!({"model": BERT, "input": long_text, "truncate": true})).await;
    assert_eq!((st, v["usage"]["prompt_tokens"].as_u64()), (200, Some(24)), "{v}");
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            json!({"model": TEXT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    s.assert_healthy().await;
}

#[tokio::test]
async fn overload_answers_429_with_retry_after() {
    // One waiting input at most: concurrent requests find the queue full.
    let s = server_with("max_waiting = 1\nmax_running = 1").await;
    let sentences = strings(&expected("bert-tiny-st")["sentences"]);
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let client = s.client.clone();
        let url = s.url("/v1/embeddings");
        let body = json!({"model": BERT, "input": sentences});
        tasks.push(tokio::spawn(async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").map(|h| h.to_str().unwrap().to_string());
            (status, retry, r.json::<Value>().await.unwrap())
        }));
    }
    let mut counts = (0, 0);
    for t in tasks {
        let (status, retry, v) = t.await.unwrap();
        match status {
            200 => {
                counts.0 += 1;
                assert_eq!(v["data"].as_array().unwrap().len(), sentences.len());
            }
            429 => {
                counts.1 += 1;
                assert_error(status, &v, 429, "overloaded");
                assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok()), "429 without Retry-After");
            }
            other => panic!("unexpected status {other}: {v}"),
        }
    }
    assert!(counts.0 >= 1, "no request succeeded: {counts:?}");
    assert!(counts.1 >= 1, "no request was refused: {counts:?}");
    s.assert_healthy().await;
    let (st, _) = s.post("/v1/embeddings", json!({"model": BERT, "input": "after the storm"})).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn websocket_embed() {
    use tokio_tungstenite::tungstenite::Message;
    let s = server().await;
    let exp = expected("bert-tiny-st");
    let sentences = strings(&exp["sentences"]);
    let want = vectors(&exp["vectors"]);
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    let send = |v: Value| Message::Text(v.to_string().into());
    ws.send(send(json!({"type": "embed", "id": "e1", "model": BERT, "input": sentences}))).await.unwrap();
    ws.send(send(json!({"type": "embed", "id": "e2", "model": BERT, "input": sentences[0], "encoding_format": "base64", "dimensions": 8})))
        .await
        .unwrap();
    ws.send(send(json!({"type": "embed", "id": "bad", "model": BERT, "input": []}))).await.unwrap();
    ws.send(send(json!({"type": "embed", "id": "wrong", "model": TEXT, "input": "x"}))).await.unwrap();
    ws.send(send(json!({"type": "generate", "id": "gen", "model": BERT, "prompt": "x"}))).await.unwrap();
    ws.send(send(json!({"type": "embed", "model": BERT, "input": "x"}))).await.unwrap();
    let mut events = std::collections::HashMap::<String, Value>::new();
    let mut anonymous = Vec::new();
    while events.len() < 5 || anonymous.is_empty() {
        let m = tokio::time::timeout(std::time::Duration::from_secs(30), ws.next()).await.unwrap().unwrap().unwrap();
        let Message::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        match v["id"].as_str().map(str::to_string) {
            Some(id) => assert!(events.insert(id.clone(), v).is_none(), "two final events for {id}"),
            None => anonymous.push(v),
        }
    }
    let e1 = &events["e1"];
    assert_eq!(e1["type"], "embedding", "{e1}");
    assert_eq!(e1["model"], BERT);
    assert_eq!(e1["usage"]["prompt_tokens"], token_counts(&exp["token_ids"]).iter().sum::<usize>());
    let data = e1["data"].as_array().unwrap();
    assert_eq!(data.len(), sentences.len());
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        assert_close(&floats(&d["embedding"]), &want[i], &format!("ws {i}"));
    }
    let e2 = &events["e2"];
    assert_eq!(e2["type"], "embedding", "{e2}");
    let got = b64_floats(e2["data"][0]["embedding"].as_str().unwrap());
    assert_eq!(got.len(), 8);
    assert!((norm(&got) - 1.0).abs() < 1e-5);
    for (id, code, param) in [
        ("bad", "invalid_parameter", "input"),
        ("wrong", "invalid_parameter", "model"),
        ("gen", "invalid_parameter", "model"),
    ] {
        let e = &events[id];
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str(), e["param"].as_str()),
            (Some("error"), Some(code), Some(param)),
            "{e}"
        );
    }
    assert_eq!(anonymous[0]["code"], "invalid_message");
    // The ids are free again, and the socket still works.
    ws.send(send(json!({"type": "embed", "id": "e1", "model": BERT, "input": [[2, 568, 3]]}))).await.unwrap();
    loop {
        let m = ws.next().await.unwrap().unwrap();
        let Message::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        assert_eq!(v["type"], "embedding", "{v}");
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        break;
    }
    s.assert_healthy().await;
}
