//! Memory-aware serving end to end (issue 3): the device ledger, preemption under a tiny KV
//! pool, several models taking turns on a device too small for both, and the supervisor
//! rebuilding a failed engine or batcher. Real tiny fixture models on the CPU.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::TestServer;
use kiln::config::Config;
use kiln::server::LoadState;
use kiln::AppState;
use kiln_actors::Metrics;
use serde_json::{json, Value};

fn config(text: &str) -> Config {
    Config::parse(text, "test config", Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap()
}

async fn serve(text: &str) -> TestServer {
    TestServer::serve(&config(text)).await
}

/// The value of a metric line `name{labels} value` whose labels include every `want`.
fn metric(text: &str, name: &str, want: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| want.iter().all(|w| l.contains(w)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

fn completion(model: &str, prompt: &str, max_tokens: usize) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

async fn complete(s: &TestServer, body: Value) -> String {
    let (status, v) = s.post("/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

const ONE_MODEL: &str = r#"
[server]
request_timeout_s = 120

[[models]]
name = "m"
path = "tests/fixtures/qwen2-tied-gqa"
device = "cpu"
block_size = 16
max_batch_tokens = 256
max_running = 16
max_waiting = 256
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tiny_kv_pool_preempts_but_every_output_matches_an_unconstrained_run() {
    // 64 requests of ~50 tokens each; the small pool holds 160 tokens, so most wait and running
    // ones are preempted by recompute when decode needs blocks.
    let roomy = serve(&format!("{ONE_MODEL}kv_cache_tokens = 8192\n")).await;
    let tiny = serve(&format!("{ONE_MODEL}kv_cache_tokens = 160\n")).await;
    let prompts: Vec<String> = (0..64).map(|i| format!("request {i}: tell me about the number {}", i * 7)).collect();

    let mut expected = Vec::new();
    for p in &prompts {
        expected.push(complete(&roomy, completion("m", p, 40)).await);
    }

    let ledger = tiny.state.ledgers[0].clone();
    let watcher = {
        let state = tiny.state.clone();
        tokio::spawn(async move {
            let mut worst = (0usize, 0usize);
            loop {
                if let LoadState::Ready(b) = state.models[0].state() {
                    let s = b.stats().await.unwrap();
                    assert!(s.used_blocks <= s.total_blocks, "{s:?}");
                    worst = worst.max((s.used_blocks, s.total_blocks));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
                    return worst;
                }
            }
        })
    };
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (client, url, body) = (tiny.client.clone(), tiny.url("/v1/completions"), completion("m", p, 40));
            tokio::spawn(async move {
                let r = client.post(url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let v: Value = r.json().await.unwrap();
                v["choices"][0]["text"].as_str().unwrap().to_string()
            })
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    tiny.state.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    let (used_max, total) = watcher.await.unwrap();
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "request {i} differs from its unconstrained run");
    }
    assert_eq!(total, 10, "160 tokens in blocks of 16");
    assert!(used_max <= total);
    let (_, m) = tiny.get("/metrics").await;
    let preemptions = metric(&m, "kiln_preemptions_total", &["model=\"m\""]);
    assert!(preemptions > 0.0, "no preemption under a 160-token pool:\n{m}");
    assert!(ledger.peak() <= ledger.capacity());
    let held = ledger.held_by("m");
    assert_eq!(held.kv, 10 * 16 * 2 * 2 * 2 * 16 * 4, "blocks × tokens × K,V × layers × kv heads × head_dim × f32");
    assert!(held.weights > 0 && held.activations > 0, "{held:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_models_that_do_not_fit_together_take_turns() {
    let models = r#"
[[models]]
name = "qwen"
path = "tests/fixtures/qwen2-tied-gqa"
device = "cpu"
kv_cache_tokens = 1024
max_batch_tokens = 128
max_running = 4
preload = false

[[models]]
name = "llama"
path = "tests/fixtures/llama-tiny"
device = "cpu"
kv_cache_tokens = 1024
max_batch_tokens = 128
max_running = 4
preload = false
"#;
    // First learn what each model reserves, then give the device room for the larger one
    // and half the smaller: never both.
    let probe = AppState::from_config(&config(&format!("[server]\nmemory_limit = \"8GB\"\n{models}")), Metrics::new())
        .await
        .unwrap();
    let sizes: Vec<u64> = probe.models.iter().map(|m| m.placement().unwrap().estimate.total()).collect();
    let (big, small) = (sizes[0].max(sizes[1]), sizes[0].min(sizes[1]));
    // Measured activations may exceed the estimate a little: leave a margin below big + small.
    let limit = big + small / 2;
    let s = serve(&format!("[server]\nmemory_limit = {limit}\nload_wait_s = 10\n{models}")).await;
    let ledger = s.state.ledgers[0].clone();

    let mut texts = std::collections::HashMap::new();
    for round in 0..3 {
        for model in ["qwen", "llama"] {
            let text = complete(&s, completion(model, "hello there", 8)).await;
            // The same model gives the same text after every reload.
            let first = texts.entry(model).or_insert_with(|| text.clone());
            assert_eq!(&text, first, "{model} round {round}");
            assert!(ledger.used() <= ledger.capacity());
            let loaded: Vec<&str> = s
                .state
                .models
                .iter()
                .filter(|m| matches!(m.state(), LoadState::Ready(_)))
                .map(|m| m.name.as_str())
                .collect();
            assert_eq!(loaded, vec![model], "only the model in use is loaded");
        }
    }
    assert!(ledger.peak() <= ledger.capacity(), "peak {} > capacity {}", ledger.peak(), ledger.capacity());
    let (_, m) = s.get("/metrics").await;
    for model in ["qwen", "llama"] {
        let label = format!("model=\"{model}\"");
        assert_eq!(metric(&m, "kiln_model_loads_total", &[&label]), 3.0, "{model}:\n{m}");
        assert!(metric(&m, "kiln_model_unloads_total", &[&label]) >= 2.0, "{model}:\n{m}");
    }
    assert_eq!(metric(&m, "kiln_model_loaded", &["model=\"llama\""]), 1.0);
    assert_eq!(metric(&m, "kiln_model_loaded", &["model=\"qwen\""]), 0.0);
    assert!(metric(&m, "kiln_memory_bytes", &["model=\"llama\"", "kind=\"weights\""]) > 0.0);
    assert_eq!(metric(&m, "kiln_memory_bytes", &["model=\"qwen\"", "kind=\"weights\""]), 0.0);

    // /v1/models reports each model's memory and KV capacity.
    let (_, listing) = s.get("/v1/models").await;
    let listing: Value = serde_json::from_str(&listing).unwrap();
    let llama = listing["data"].as_array().unwrap().iter().find(|d| d["id"] == "llama").unwrap();
    let mem = &llama["kiln"]["memory"];
    assert_eq!(mem["max_tokens_in_cache"], 1024, "{llama}");
    assert!(mem["weights_bytes"].as_u64().unwrap() > 0, "{llama}");
    assert_eq!(mem["device_budget_bytes"].as_u64().unwrap(), limit, "{llama}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_larger_than_the_device_is_refused_with_a_clear_error() {
    let s = serve(
        r#"
[server]
memory_limit = 4096

[[models]]
name = "m"
path = "tests/fixtures/qwen2-tied-gqa"
device = "cpu"
preload = false
"#,
    )
    .await;
    let (status, v) = s.post("/v1/completions", completion("m", "hi", 2)).await;
    assert_eq!(status, 503, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("needs") && msg.contains("memory_limit"), "{msg}");
    s.assert_healthy().await;
}

async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let t0 = Instant::now();
    while !check().await {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const FAULTY: &str = r#"
[server]
fault_injection = true

[[models]]
name = "m"
path = "tests/fixtures/qwen2-tied-gqa"
device = "cpu"
kv_cache_tokens = 1024
max_batch_tokens = 128

[[models]]
name = "other"
path = "tests/fixtures/llama-tiny"
device = "cpu"
kv_cache_tokens = 1024
max_batch_tokens = 128
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_that_panics_is_rebuilt_and_serving_goes_on() {
    let s = serve(FAULTY).await;
    let before = complete(&s, completion("m", "steady", 6)).await;
    let (status, v) = s.post("/admin/fault", json!({"model": "m", "kind": "engine_panic"})).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = s.post("/v1/completions", completion("m", "doomed", 6)).await;
    assert!(status >= 500, "{status} {v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("injected engine fault"), "{v}");
    // The other model never noticed; the failed one answers again, identically.
    complete(&s, completion("other", "unaffected", 4)).await;
    assert_eq!(complete(&s, completion("m", "steady", 6)).await, before);
    let LoadState::Ready(b) = s.state.models[0].state() else { panic!("m not loaded") };
    let stats = b.stats().await.unwrap();
    assert_eq!((stats.engine_restarts, stats.used_blocks, stats.running), (1, 0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batcher_that_fails_is_restarted_by_the_supervisor() {
    let s = serve(FAULTY).await;
    let before = complete(&s, completion("m", "steady", 6)).await;
    let (status, _) = s.post("/admin/fault", json!({"model": "m", "kind": "batcher_panic"})).await;
    assert_eq!(status, 200);
    let (status, v) = s.post("/v1/completions", completion("m", "doomed", 6)).await;
    assert!(status >= 500, "{status} {v}");
    // The supervisor reloads the model; requests meanwhile wait for the load instead of failing.
    wait_until("the model is reloaded", async || {
        s.state.batcher_health().await.get("m") == Some(&kiln_actors::BatcherHealth::Running)
            && matches!(s.state.models[0].state(), LoadState::Ready(_))
    })
    .await;
    assert_eq!(complete(&s, completion("m", "steady", 6)).await, before);
    complete(&s, completion("other", "unaffected", 4)).await;
    let (status, _) = s.get("/ready").await;
    assert_eq!(status, 200);
    let (_, m) = s.get("/metrics").await;
    assert_eq!(metric(&m, "kiln_model_loads_total", &["model=\"m\""]), 2.0, "{m}");

    // Without the config switch the route does not exist.
    let plain = serve(&FAULTY.replace("fault_injection = true", "fault_injection = false")).await;
    let (status, _) = plain.post("/admin/fault", json!({"model": "m", "kind": "engine_panic"})).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_kv_takes_what_the_device_budget_leaves() {
    let model = |kv: &str, running: usize| {
        format!(
            r#"
[[models]]
name = "m"
path = "tests/fixtures/qwen2-tied-gqa"
device = "cpu"
block_size = 16
kv_cache_tokens = {kv}
max_batch_tokens = 128
max_running = {running}
"#
        )
    };
    // Learn the model's weights and activation reserve with a fixed pool, then give the device
    // room for them plus exactly 40 blocks (2 KiB per token: 2 layers x K,V x 2 heads x 16 x f32).
    let probe = AppState::from_config(
        &config(&format!("[server]\nmemory_limit = \"1GB\"\n{}", model("1024", 64))),
        Metrics::new(),
    )
    .await
    .unwrap();
    let est = probe.models[0].placement().unwrap().estimate;
    let kv_per_token = 2 * 2 * 2 * 16 * 4;
    let limit = est.weights + est.activations + 40 * 16 * kv_per_token + 100;
    let s = serve(&format!("[server]\nmemory_limit = {limit}\n{}", model("\"auto\"", 64))).await;
    let LoadState::Ready(b) = s.state.models[0].state() else { panic!("not loaded") };
    assert_eq!(b.spec().num_blocks, 40);
    complete(&s, completion("m", "auto sized", 4)).await;

    // With a large budget the pool stops at max_running sequences of the full context (512).
    let s = serve(&format!("[server]\nmemory_limit = \"1GB\"\n{}", model("\"auto\"", 3))).await;
    let LoadState::Ready(b) = s.state.models[0].state() else { panic!("not loaded") };
    assert_eq!(b.spec().num_blocks * 16, 3 * 512);

    // A budget that leaves nothing for the cache is refused at start-up.
    let e = AppState::from_config(
        &config(&format!("[server]\nmemory_limit = {}\n{}", est.weights + est.activations, model("\"auto\"", 64))),
        Metrics::new(),
    )
    .await
    .err()
    .expect("no room for a KV cache");
    assert!(e.to_string().contains("leaves no KV cache"), "{e}");
}
