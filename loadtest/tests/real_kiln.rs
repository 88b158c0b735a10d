//! Against a real `kiln serve` with the demo model (tiny random-weight Qwen2 on CPU): chat SSE,
//! completions SSE and WebSocket runs whose token counts agree (tokens counted = tokens
//! streamed = usage.completion_tokens = max_tokens, with `ignore_eos`).
//!
//! Needs the server binary: `cargo build -p kiln` (found in `$CARGO_TARGET_DIR/debug` or
//! `<workspace>/target/debug`, or named by `KILN_BIN`). Without it the test prints why and
//! passes (skips).

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_loadtest::runner;

struct Server {
    child: Child,
    base_url: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn kiln_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KILN_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let exe = if cfg!(windows) { "kiln.exe" } else { "kiln" };
    let mut dirs = Vec::new();
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        let t = PathBuf::from(t);
        dirs.push(if t.is_relative() { workspace().join(t) } else { t });
    }
    dirs.push(workspace().join("target"));
    // This test binary itself lives in <target>/debug/deps.
    if let Some(target) = std::env::current_exe().ok().and_then(|e| e.ancestors().nth(3).map(Path::to_path_buf)) {
        dirs.push(target);
    }
    dirs.iter().map(|d| d.join("debug").join(exe)).find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_kiln(serve_args: &[&str]) -> Option<Server> {
    let Some(bin) = kiln_binary() else {
        eprintln!("SKIPPED: no kiln binary (run `cargo build -p kiln`, or set KILN_BIN) — real-server test not run");
        return None;
    };
    let port = free_port();
    let log = std::env::temp_dir().join(format!("kiln-loadtest-real-{}-{port}.log", std::process::id()));
    let child = Command::new(&bin)
        .arg("serve")
        .args(serve_args)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .current_dir(workspace())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let mut server = Server { child, base_url: format!("http://127.0.0.1:{port}"), log };
    let http = reqwest::Client::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(180) {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!(
                "kiln exited with {status} before it was healthy:\n{}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
        }
        if let Ok(r) = http.get(format!("{}/health", server.base_url)).send().await {
            if r.status().is_success() {
                eprintln!("kiln ({}) healthy after {:.1}s", bin.display(), t.elapsed().as_secs_f64());
                return Some(server);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = server.child.kill();
    panic!("kiln did not become healthy in 180 s:\n{}", std::fs::read_to_string(&server.log).unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_kiln_demo_model_token_counts_agree() {
    let Some(server) = start_kiln(&["--config", "config/default.toml"]).await else { return };
    const N: u64 = 8;
    for (kind, extra) in
        [("chat_sse", "logprobs = true"), ("chat_sse", ""), ("completions_sse", "logprobs = true"), ("websocket", "")]
    {
        let s = common::scenario(
            &server.base_url,
            "kiln-demo",
            kind,
            &format!("temperature = 0.0\n{extra}"),
            &format!(
                "[load]\nconcurrency = 2\n[bounds]\nrequests = 4\nwarmup_requests = 1\n\
                 [prompts]\nsource = \"synthetic\"\ninput_tokens = 12\noutput_tokens = {N}\n"
            ),
        );
        let mode = s.validate().unwrap();
        let r = runner::run(&s, mode, false).await.unwrap();
        let label = format!("{kind} {extra}");
        eprint!("--- {label}\n{}", kiln_loadtest::report::table(&r));
        let sum = &r.summary;
        assert_eq!(
            (sum.requests, sum.ok),
            (4, 4),
            "{label}: {:?}",
            r.requests.iter().find_map(|q| q.error_message.clone())
        );
        assert_eq!(sum.usage_reported, 4, "{label}: every request reports usage");
        for q in r.requests.iter().filter(|q| !q.warmup) {
            assert_eq!(q.usage_completion_tokens, Some(N), "{label}: ignore_eos gives exactly max_tokens");
            assert!(q.usage_prompt_tokens.is_some_and(|p| p >= 12), "{label}");
            assert!(q.ttft_ms.is_some_and(|t| t > 0.0 && t <= q.e2e_ms), "{label}");
            if extra.is_empty() && kind == "chat_sse" {
                // Without logprobs a token whose text is empty (half a UTF-8 character) sends no
                // chunk, so the counted tokens can only be fewer.
                assert!(q.output_tokens <= N && q.output_tokens > 0, "{label}: {}", q.output_tokens);
            } else {
                assert_eq!(q.output_tokens, N, "{label}: tokens counted = tokens streamed = usage");
                assert!(!q.token_mismatch);
                assert_eq!(q.itl_ms.len() as u64, N - 1, "{label}");
            }
        }
        if !(extra.is_empty() && kind == "chat_sse") {
            assert_eq!(sum.token_mismatches, 0, "{label}");
            assert_eq!(sum.output_tokens, 4 * N, "{label}");
        }
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_kiln_embeddings_scenario_runs() {
    // The tiny random-weight sentence-transformers fixture, named after its folder.
    let Some(server) = start_kiln(&["--model", "tests/fixtures/bert-tiny-st"]).await else { return };
    let s = common::scenario(
        &server.base_url,
        "bert-tiny-st",
        "embeddings",
        "",
        "[load]\nconcurrency = 3\n[bounds]\nrequests = 6\nwarmup_requests = 1\n\
         [prompts]\nsource = \"synthetic\"\ninput_tokens = 10\noutput_tokens = 1\n",
    );
    let mode = s.validate().unwrap();
    let r = runner::run(&s, mode, false).await.unwrap();
    eprint!("--- embeddings\n{}", kiln_loadtest::report::table(&r));
    let sum = &r.summary;
    assert_eq!((sum.requests, sum.ok), (6, 6), "{:?}", r.requests.iter().find_map(|q| q.error_message.clone()));
    for q in r.requests.iter().filter(|q| !q.warmup) {
        assert!(q.usage_prompt_tokens.is_some_and(|p| p > 0), "usage.prompt_tokens reported: {q:?}");
        assert!(q.e2e_ms > 0.0);
    }
    drop(server);
}
