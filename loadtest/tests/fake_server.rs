//! Every scenario kind against the in-test fake server: exact token counts, latencies within
//! the fake's known delays, errors classified by kind, bounds respected.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kiln_loadtest::runner;
use kiln_loadtest::{RequestRecord, RunResult};

// The fake waits TTFT ms before the first token and ITL ms between tokens.
const TTFT: u64 = 40;
const ITL: u64 = 10;

async fn run(s: &kiln_loadtest::Scenario) -> RunResult {
    let mode = s.validate().unwrap();
    runner::run(s, mode, false).await.unwrap()
}

fn measured(r: &RunResult) -> Vec<&RequestRecord> {
    r.requests.iter().filter(|q| !q.warmup).collect()
}

/// Latency sanity for a request that streamed `n` tokens from the fake.
fn check_latencies(q: &RequestRecord, n: u64) {
    let ttft = q.ttft_ms.expect("a TTFT");
    // Timers never fire early; the upper bounds leave room for a loaded 2-core CI machine.
    assert!(ttft >= TTFT as f64 - 1.0 && ttft < TTFT as f64 + 1000.0, "ttft {ttft}");
    assert_eq!(q.itl_ms.len() as u64, n - 1, "one gap between consecutive tokens");
    let min_e2e = (TTFT + (n - 1) * ITL) as f64 - 1.0;
    assert!(q.e2e_ms >= min_e2e && q.e2e_ms >= ttft, "e2e {} < {min_e2e}", q.e2e_ms);
    // Gaps are measured on arrival: delivery jitter (a delayed first token) can shrink them, so
    // only the causal e2e bound above is strict; the mean gap must still be near ITL.
    let mean_itl = q.itl_ms.iter().sum::<f64>() / q.itl_ms.len() as f64;
    assert!(mean_itl >= ITL as f64 * 0.3 && mean_itl < ITL as f64 + 200.0, "mean itl {mean_itl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_sse_closed_loop_counts_exactly() {
    let fake = common::start(TTFT, ITL, None).await;
    let s = common::scenario(
        &fake.base_url,
        "m",
        "chat_sse",
        "",
        "[load]\nconcurrency = 3\n[bounds]\nrequests = 12\nwarmup_requests = 2\n\
         [prompts]\nsource = \"synthetic\"\ninput_tokens = 16\noutput_tokens = 8\n[slo]\nttft_ms = 60000\n",
    );
    let r = run(&s).await;
    let sum = &r.summary;
    assert_eq!((sum.requests, sum.ok, sum.failed, sum.warmup_requests), (12, 12, 0, 2));
    assert_eq!(fake.state.counters.http_requests.load(Ordering::SeqCst), 14);
    assert_eq!(sum.output_tokens, 12 * 8);
    assert_eq!(fake.state.counters.tokens_sent.load(Ordering::SeqCst), 14 * 8);
    assert_eq!((sum.usage_reported, sum.token_mismatches), (12, 0));
    for q in measured(&r) {
        assert!(q.ok, "{:?}", q.error_message);
        assert_eq!((q.output_tokens, q.usage_completion_tokens, q.max_tokens), (8, Some(8), 8));
        assert_eq!(q.usage_prompt_tokens, Some(5));
        assert_eq!(q.finish_reason.as_deref(), Some("length"));
        check_latencies(q, 8);
    }
    let idx: Vec<u64> = measured(&r).iter().map(|q| q.index).collect();
    assert_eq!(idx, (2..14).collect::<Vec<_>>(), "warm-up takes indices 0 and 1");
    assert_eq!(sum.itl_ms.count, 12 * 7);
    assert!(sum.ttft_ms.p50.unwrap() >= TTFT as f64 - 1.0);
    assert!(sum.itl_ms.p50.unwrap() >= ITL as f64 * 0.5 && sum.itl_ms.p50.unwrap() < ITL as f64 + 100.0);
    assert_eq!(sum.slo_met, Some(12));
    // 3 workers × 4 requests of ≥ 110 ms each: the run cannot be shorter than 440 ms.
    assert!(sum.duration_s >= 0.43, "{}", sum.duration_s);
    assert!(sum.requests_per_s > 0.0 && sum.output_tokens_per_s > 0.0);
    let ts_tokens: u64 = r.timeseries.iter().map(|b| b.output_tokens).sum();
    assert_eq!(ts_tokens, 96);
    assert_eq!(r.timeseries.iter().map(|b| b.requests_done).sum::<u64>(), 12);
    // Goodput under an impossible SLO is zero.
    let mut strict = s.clone();
    strict.slo.ttft_ms = Some(1.0);
    assert_eq!(runner::summarize(&strict, &r.requests, sum.duration_s).slo_met, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_sse_with_length_distribution() {
    let fake = common::start(TTFT, ITL, None).await;
    let s = common::scenario(
        &fake.base_url,
        "m",
        "completions_sse",
        "",
        "[load]\nconcurrency = 4\n[bounds]\nrequests = 10\n[prompts]\nsource = \"synthetic\"\n\
         input_tokens = { dist = \"normal\", mean = 20.0, sd = 5.0 }\noutput_tokens = { dist = \"uniform\", min = 2, max = 9 }\n",
    );
    let r = run(&s).await;
    assert_eq!((r.summary.ok, r.summary.token_mismatches), (10, 0));
    let mut total = 0;
    for q in measured(&r) {
        assert!((2..=9).contains(&q.max_tokens));
        assert_eq!(q.output_tokens, u64::from(q.max_tokens));
        assert_eq!(q.usage_completion_tokens, Some(q.output_tokens));
        check_latencies(q, q.output_tokens);
        total += q.output_tokens;
    }
    assert_eq!(r.summary.output_tokens, total);
    assert_eq!(fake.state.counters.tokens_sent.load(Ordering::SeqCst), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_multiplexes_over_few_sockets() {
    let fake = common::start(TTFT, ITL, None).await;
    let s = common::scenario(
        &fake.base_url,
        "m",
        "websocket",
        "ws_max_inflight_per_socket = 4",
        "[load]\nconcurrency = 6\n[bounds]\nrequests = 18\n[prompts]\nsource = \"synthetic\"\ninput_tokens = 8\noutput_tokens = 6\n",
    );
    let r = run(&s).await;
    let sum = &r.summary;
    assert_eq!((sum.ok, sum.failed, sum.token_mismatches, sum.usage_reported), (18, 0, 0, 18));
    assert_eq!(sum.output_tokens, 18 * 6);
    assert_eq!(fake.state.counters.ws_generations.load(Ordering::SeqCst), 18);
    // Six in flight, four per socket: exactly two sockets, reused for all 18 requests.
    assert_eq!(fake.state.counters.ws_sockets.load(Ordering::SeqCst), 2);
    for q in measured(&r) {
        assert_eq!((q.output_tokens, q.usage_completion_tokens), (6, Some(6)));
        check_latencies(q, 6);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_batches_inputs() {
    let fake = common::start(TTFT, ITL, None).await;
    let s = common::scenario(
        &fake.base_url,
        "m",
        "embeddings",
        "embeddings_batch = 3",
        "[load]\nconcurrency = 2\n[bounds]\nrequests = 10\n[prompts]\nsource = \"synthetic\"\ninput_tokens = 7\n",
    );
    let r = run(&s).await;
    assert_eq!((r.summary.ok, r.summary.failed), (10, 0));
    assert_eq!(fake.state.counters.embedding_inputs.load(Ordering::SeqCst), 30);
    for q in measured(&r) {
        assert_eq!(q.input_tokens, 21);
        assert_eq!(q.usage_prompt_tokens, Some(21));
        assert_eq!((q.output_tokens, q.ttft_ms), (0, None));
        assert!(q.e2e_ms >= TTFT as f64 - 1.0);
        assert!(!q.token_mismatch);
    }
    assert_eq!(r.summary.ttft_ms.count, 0);
    assert_eq!(r.summary.e2e_ms.count, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_poisson_arrivals() {
    let fake = common::start(TTFT, ITL, None).await;
    let s = common::scenario(
        &fake.base_url,
        "m",
        "chat_sse",
        "",
        "[load]\nrate = 40.0\n[bounds]\nrequests = 30\n[prompts]\nsource = \"synthetic\"\ninput_tokens = 8\noutput_tokens = 4\n",
    );
    let t = Instant::now();
    let r = run(&s).await;
    assert_eq!((r.summary.requests, r.summary.ok), (30, 30));
    assert_eq!(r.summary.output_tokens, 120);
    let starts: Vec<f64> = measured(&r).iter().map(|q| q.start_s).collect();
    assert!(starts.windows(2).all(|w| w[1] >= w[0] - 0.005), "arrivals are sent in order: {starts:?}");
    // 30 arrivals at 40/s: the last arrives after ~0.75 s (Poisson: well within 0.2..3 s).
    let last = *starts.last().unwrap();
    assert!(last > 0.2 && last < 3.0, "{last}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // Open loop: requests overlap (a 70 ms request every ~25 ms).
    let overlapping = measured(&r).windows(2).filter(|w| w[1].start_s < w[0].end_s()).count();
    assert!(overlapping > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_bound_stops_new_requests() {
    let fake = common::start(TTFT, ITL, None).await;
    let s = common::scenario(
        &fake.base_url,
        "m",
        "chat_sse",
        "",
        "[load]\nconcurrency = 2\n[bounds]\nduration_s = 0.6\n[prompts]\nsource = \"synthetic\"\ninput_tokens = 8\noutput_tokens = 4\n",
    );
    let mut s = s;
    s.bounds.requests = None;
    let r = run(&s).await;
    let n = r.summary.requests;
    // Each request takes ≥ 70 ms: at most ~2 × 0.6 / 0.07 ≈ 17 of them fit.
    assert!((2..=18).contains(&n), "{n}");
    assert!(measured(&r).iter().all(|q| q.start_s < 0.6));
    assert_eq!(r.summary.failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_classified() {
    // Every third request gets a 429.
    let fake = common::start(5, 1, Some(3)).await;
    let rest = "[load]\nconcurrency = 2\n[bounds]\nrequests = 12\n[prompts]\nsource = \"synthetic\"\ninput_tokens = 4\noutput_tokens = 3\n";
    let r = run(&common::scenario(&fake.base_url, "m", "chat_sse", "", rest)).await;
    assert_eq!(r.summary.errors.get("http_429"), Some(&4));
    assert_eq!((r.summary.ok, r.summary.failed), (8, 4));
    let q = measured(&r).into_iter().find(|q| !q.ok).unwrap();
    assert_eq!(q.http_status, Some(429));
    assert!(q.error_message.as_deref().unwrap().contains("Retry-After: 1"), "{:?}", q.error_message);
    assert_eq!(r.summary.output_tokens, 8 * 3, "failed requests add no tokens");

    let fake = common::start(5, 1, None).await;
    let kinds = [("error400", "http_4xx"), ("error500", "http_5xx"), ("nodone", "protocol")];
    for (model, kind) in kinds {
        let r = run(&common::scenario(&fake.base_url, model, "chat_sse", "", rest)).await;
        assert_eq!(r.summary.errors.get(kind), Some(&12), "{model}: {:?}", r.summary.errors);
    }
    let r = run(&common::scenario(&fake.base_url, "error400", "embeddings", "", rest)).await;
    assert_eq!(r.summary.errors.get("http_4xx"), Some(&12));

    // Timeouts: the `slow` model waits 2 s before its first token.
    let rest_few = rest.replace("requests = 12", "requests = 2");
    let mut s = common::scenario(&fake.base_url, "slow", "chat_sse", "", &rest_few);
    s.target.request_timeout_s = 0.3;
    let t = Instant::now();
    let r = run(&s).await;
    assert_eq!(r.summary.errors.get("timeout"), Some(&2));
    assert!(t.elapsed() < Duration::from_millis(1900), "timed out requests do not wait for the server");
    assert!(measured(&r).iter().all(|q| q.e2e_ms >= 299.0 && q.e2e_ms < 1500.0));

    // Connection refused: a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = format!("http://127.0.0.1:{port}");
    for kind in ["chat_sse", "websocket", "embeddings"] {
        let r = run(&common::scenario(&dead, "m", kind, "", &rest_few)).await;
        assert_eq!(r.summary.errors.get("connect"), Some(&2), "{kind}: {:?}", r.requests[0].error_message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_mismatch_is_recorded() {
    let fake = common::start(5, 1, None).await;
    let rest = "[bounds]\nrequests = 3\n[prompts]\nsource = \"synthetic\"\ninput_tokens = 4\noutput_tokens = 5\n";
    let r = run(&common::scenario(&fake.base_url, "liar", "chat_sse", "", rest)).await;
    assert_eq!(r.summary.ok, 3);
    assert_eq!(r.summary.token_mismatches, 3);
    for q in measured(&r) {
        assert_eq!((q.output_tokens, q.usage_completion_tokens), (5, Some(6)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_writes_json_html_and_compares() {
    let fake = common::start(5, 2, None).await;
    let dir = std::env::temp_dir().join(format!("kiln-loadtest-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scenario = dir.join("s.toml");
    std::fs::write(
        &scenario,
        format!(
            "name = \"cli\"\n[target]\nbase_url = \"{}\"\nmodel = \"m\"\nkind = \"chat_sse\"\n\
             [load]\nconcurrency = 2\n[bounds]\nrequests = 6\n[prompts]\nsource = \"synthetic\"\ninput_tokens = 4\noutput_tokens = 4\n\
             [slo]\nttft_ms = 5000\n",
            fake.base_url
        ),
    )
    .unwrap();
    let (out, html) = (dir.join("r.json"), dir.join("r.html"));
    let bin = env!("CARGO_BIN_EXE_kiln-loadtest");
    let p = |p: &std::path::Path| p.display().to_string();
    // Flags override the scenario (8 requests, not 6).
    let stdout = tokio::task::spawn_blocking({
        let args = vec![
            p(&scenario),
            "--requests".into(),
            "8".into(),
            "--out".into(),
            p(&out),
            "--html".into(),
            p(&html),
            "-q".into(),
        ];
        move || run_cli(args)
    })
    .await
    .unwrap();
    assert!(stdout.contains("TTFT ms") && stdout.contains("goodput"), "{stdout}");
    let result: RunResult = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!((result.summary.requests, result.summary.output_tokens), (8, 32));
    assert_eq!(result.requests.len(), 8);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>") && page.matches("<svg").count() >= 4);
    assert!(!page.contains("<script") && !page.contains("src=") && !page.contains("href="), "self-contained");
    let stdout = tokio::task::spawn_blocking({
        let args = vec!["--from".into(), p(&out), "--compare".into(), p(&out)];
        move || run_cli(args)
    })
    .await
    .unwrap();
    assert!(stdout.contains("compare:") && stdout.contains("TTFT p99 ms") && stdout.contains("+0.00"), "{stdout}");
    // An unknown key in a scenario is an error naming it.
    std::fs::write(&scenario, std::fs::read_to_string(&scenario).unwrap().replace("[load]", "[load]\nconcurency = 3"))
        .unwrap();
    let o = std::process::Command::new(bin).arg(&scenario).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("concurency"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn run_cli(args: Vec<String>) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-loadtest")).args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{args:?}: {stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    stdout
}
