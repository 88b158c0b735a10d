//! Graceful shutdown of the real `kiln` binary: on SIGTERM a running stream finishes, new
//! requests get 503 with Retry-After while it drains, and the process exits 0.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

struct Kiln(Child);

impl Drop for Kiln {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn wait_ready(client: &reqwest::Client, base: &str) {
    let t0 = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "kiln never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_requests_refuses_new_ones_and_exits_zero() {
    let root = env!("CARGO_MANIFEST_DIR");
    let port = free_port();
    let config = std::env::temp_dir().join(format!("kiln-shutdown-{}-{port}.toml", std::process::id()));
    std::fs::File::create(&config)
        .unwrap()
        .write_all(
            format!(
                r#"
[server]
port = {port}
drain_timeout_s = 20
fault_injection = true

[[models]]
name = "m"
path = "{root}/tests/fixtures/qwen2-tied-gqa"
device = "cpu"
kv_cache_tokens = 1024
max_batch_tokens = 128
"#
            )
            .as_bytes(),
        )
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut kiln = Kiln(child);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;

    // A slow device: 25 ms a step, so a 40-token stream takes about a second.
    let r = client
        .post(format!("{base}/admin/fault"))
        .json(&json!({"model": "m", "kind": "slow_steps", "count": 25}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let stream = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "m", "prompt": "drain me", "max_tokens": 40, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut body = stream.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));

    let killed = Command::new("kill").args(["-TERM", &kiln.0.id().to_string()]).status().unwrap();
    assert!(killed.success());
    // The flag flips as soon as the signal is handled.
    let t0 = Instant::now();
    let refused = loop {
        let r = client
            .post(format!("{base}/v1/completions"))
            .json(&json!({"model": "m", "prompt": "too late", "max_tokens": 2}))
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "never refused while draining");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(refused.headers().contains_key("retry-after"));
    let err: Value = refused.json().await.unwrap();
    assert!(err["error"]["message"].is_string(), "{err}");
    let health = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200, "alive while draining");

    // The stream that was running finishes normally.
    let mut rest = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = body.next().await {
        rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");

    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = kiln.0.try_wait().unwrap() {
            break status;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "kiln did not exit after draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
}
