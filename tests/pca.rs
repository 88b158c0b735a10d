//! `kiln pca fit` and serving its projection, end to end: the real `kiln` binary fits a PCA
//! of the tiny sentence-transformers fixture (tests/fixtures/bert-tiny-st, 32 dimensions,
//! normalised) on a small corpus; a real server serves the model twice, plain and with
//! `projection = ...`; each served reduced vector must equal normalize((x − mean) · Cᵀ)
//! computed here from the plain vector and the file's tensors (read with the safetensors
//! crate, not kiln's loader).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_error, TestServer};
use futures::{SinkExt, StreamExt};
use kiln::config::Config;
use kiln::AppState;
use kiln_actors::Metrics;
use serde_json::{json, Value};

const PLAIN: &str = "bert-plain";
const REDUCED: &str = "bert-pca";
const K: usize = 8;
const D: usize = 32;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/bert-tiny-st")
}

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("kiln-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// 60 short sentences from a small vocabulary (the fixture's tokenizer knows English words).
fn corpus() -> Vec<String> {
    let subjects = ["the cat", "a dog", "my friend", "the teacher", "a small bird", "the old man"];
    let verbs =
        ["sees", "likes", "finds", "reads about", "walks to", "talks with", "waits for", "draws", "hears", "eats"];
    let objects = ["the house", "a red car", "the river", "some books", "the city", "a green tree"];
    (0..60).map(|i| format!("{} {} {}", subjects[i % 6], verbs[(i / 6) % 10], objects[(i * 7 + i / 6) % 6])).collect()
}

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn fit(dir: &Path, corpus_file: &Path, dims: usize) -> std::process::Output {
    let out = dir.join("pca.safetensors");
    kiln(&[
        "pca",
        "fit",
        "--model",
        fixture().to_str().unwrap(),
        "--corpus",
        corpus_file.to_str().unwrap(),
        "--dims",
        &dims.to_string(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ])
}

/// The projection file's tensors and metadata, read independently of kiln.
struct RawProjection {
    mean: Vec<f64>,
    components: Vec<Vec<f64>>,
    metadata: std::collections::HashMap<String, String>,
}

fn read_projection(path: &Path) -> RawProjection {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().clone().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let floats = |name: &str| -> (Vec<usize>, Vec<f64>) {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect();
        (t.shape().to_vec(), v)
    };
    let (ms, mean) = floats("mean");
    let (cs, comps) = floats("components");
    assert_eq!((ms, cs), (vec![D], vec![K, D]));
    RawProjection { mean, components: comps.chunks(D).map(<[f64]>::to_vec).collect(), metadata }
}

fn project(p: &RawProjection, x: &[f32]) -> Vec<f32> {
    let centered: Vec<f64> = x.iter().zip(&p.mean).map(|(&x, m)| x as f64 - m).collect();
    let y: Vec<f64> = p.components.iter().map(|c| c.iter().zip(&centered).map(|(a, b)| a * b).sum()).collect();
    let norm = y.iter().map(|v| v * v).sum::<f64>().sqrt();
    y.iter().map(|v| (v / norm) as f32).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn b64_floats(s: &str) -> Vec<f32> {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut bytes = Vec::new();
    for c in s.bytes().filter(|&c| c != b'=') {
        bits = (bits << 6) | alphabet.iter().position(|&a| a == c).unwrap() as u32;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            bytes.push((bits >> nbits) as u8);
        }
    }
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-5, "{what}[{i}]: {g} vs {w}\n got {got:?}\nwant {want:?}");
    }
}

fn vectors(body: &Value) -> Vec<Vec<f32>> {
    body["data"].as_array().unwrap().iter().map(|d| floats(&d["embedding"])).collect()
}

async fn server(projection: &Path) -> TestServer {
    let text = format!(
        r#"
        [[models]]
        name = "{PLAIN}"
        path = "tests/fixtures/bert-tiny-st"
        device = "cpu"

        [[models]]
        name = "{REDUCED}"
        path = "tests/fixtures/bert-tiny-st"
        device = "cpu"
        projection = "{}"
        "#,
        projection.display()
    );
    let config = Config::parse(&text, "test config", root()).unwrap();
    TestServer::serve(&config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fitted_projection_is_served_over_http_and_websocket() {
    let dir = TempDir::new("pca");
    let corpus_file = dir.0.join("corpus.txt");
    std::fs::write(&corpus_file, corpus().join("\n\n")).unwrap();
    let out = fit(&dir.0, &corpus_file, K);
    assert!(out.status.success(), "kiln pca fit failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("32 → 8 dimensions"), "{stdout}");
    let file = dir.0.join("pca.safetensors");
    let raw = read_projection(&file);

    // The file: PCA metadata, orthonormal components by decreasing variance.
    assert_eq!(raw.metadata["format"], "kiln-pca");
    assert_eq!(raw.metadata["model"], "bert-tiny-st");
    assert_eq!((raw.metadata["input_dims"].as_str(), raw.metadata["output_dims"].as_str()), ("32", "8"));
    assert_eq!(raw.metadata["samples"], "60");
    assert_eq!(raw.metadata["normalized"], "true");
    let ratio: Vec<f64> = serde_json::from_str(&raw.metadata["explained_variance_ratio"]).unwrap();
    assert_eq!(ratio.len(), K);
    assert!(ratio.windows(2).all(|w| w[0] >= w[1]) && ratio[K - 1] > 0.0, "{ratio:?}");
    assert!(ratio.iter().sum::<f64>() <= 1.0 + 1e-6);
    for (i, a) in raw.components.iter().enumerate() {
        for (j, b) in raw.components.iter().enumerate() {
            let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-5, "c{i}·c{j} = {dot}");
        }
    }

    let s = server(&file).await;
    let texts = ["the cat sees the river", "a sentence that was not in the corpus", "my friend draws"];
    let (st, plain) = s.post("/v1/embeddings", json!({"model": PLAIN, "input": texts})).await;
    assert_eq!(st, 200, "{plain}");
    let (st, reduced) = s.post("/v1/embeddings", json!({"model": REDUCED, "input": texts})).await;
    assert_eq!(st, 200, "{reduced}");
    let (plain, reduced_vs) = (vectors(&plain), vectors(&reduced));
    assert_eq!(plain[0].len(), D);
    let want: Vec<Vec<f32>> = plain.iter().map(|x| project(&raw, x)).collect();
    for (i, (got, want)) in reduced_vs.iter().zip(&want).enumerate() {
        assert_close(got, want, &format!("projected vector {i}"));
    }
    assert!(reduced["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    // `dimensions` truncates the projected vector (and re-normalises); beyond K is a 400.
    let (st, v) = s.post("/v1/embeddings", json!({"model": REDUCED, "input": texts[0], "dimensions": 3})).await;
    assert_eq!(st, 200, "{v}");
    let head: Vec<f32> = want[0][..3].to_vec();
    let n = head.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert_close(&vectors(&v)[0], &head.iter().map(|x| x / n).collect::<Vec<_>>(), "dimensions 3");
    let (st, v) = s.post("/v1/embeddings", json!({"model": REDUCED, "input": "x", "dimensions": K + 1})).await;
    let e = assert_error(st, &v, 400, "invalid_parameter");
    assert!(e["message"].as_str().unwrap().contains("between 1 and 8"), "{e}");

    // base64 carries the same floats.
    let (st, v) =
        s.post("/v1/embeddings", json!({"model": REDUCED, "input": texts, "encoding_format": "base64"})).await;
    assert_eq!(st, 200, "{v}");
    for (i, d) in v["data"].as_array().unwrap().iter().enumerate() {
        assert_close(&b64_floats(d["embedding"].as_str().unwrap()), &reduced_vs[i], &format!("base64 {i}"));
    }

    // /v1/models advertises the served length.
    let (st, body) = s.get("/v1/models").await;
    assert_eq!(st, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    let dims_of = |name: &str| {
        models["data"].as_array().unwrap().iter().find(|m| m["id"] == name).unwrap()["kiln"]["dimensions"].clone()
    };
    assert_eq!((dims_of(PLAIN), dims_of(REDUCED)), (json!(D), json!(K)));

    // The WebSocket `embed` message serves the same projected vectors.
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    let msg = json!({"type": "embed", "id": "p", "model": REDUCED, "input": texts});
    ws.send(Message::Text(msg.to_string().into())).await.unwrap();
    let event = loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(30), ws.next()).await.unwrap().unwrap().unwrap();
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == "p" {
                break v;
            }
        }
    };
    assert_eq!(event["type"], "embedding", "{event}");
    for (i, got) in vectors(&event).iter().enumerate() {
        assert_close(got, &want[i], &format!("ws {i}"));
    }
}

#[tokio::test]
async fn a_projection_of_another_length_or_a_missing_file_stops_the_start() {
    let dir = TempDir::new("pca-bad");
    // A valid projection file for 16-dimensional vectors; the fixture's are 32.
    let data: Vec<Vec<f32>> = (0..20).map(|i| (0..16).map(|j| ((i * 31 + j * 17) % 23) as f32).collect()).collect();
    let fit = kiln::pca::fit(&data, 4).unwrap();
    let wrong = dir.0.join("wrong.safetensors");
    kiln::pca::Projection::from_fit(&fit, "other", false).save(&wrong).unwrap();
    let not_safetensors = dir.0.join("garbage.safetensors");
    std::fs::write(&not_safetensors, b"hello").unwrap();
    let missing = dir.0.join("missing.safetensors");
    for (path, wants) in [
        (&wrong, vec!["16-dimensional", "32 dimensions", "kiln pca fit"]),
        (&not_safetensors, vec!["garbage.safetensors", "not a kiln projection"]),
        (&missing, vec!["missing.safetensors"]),
    ] {
        let text = format!(
            "[[models]]\nname = \"{REDUCED}\"\npath = \"tests/fixtures/bert-tiny-st\"\ndevice = \"cpu\"\nprojection = \"{}\"\n",
            path.display()
        );
        let config = Config::parse(&text, "test config", root()).unwrap();
        let err = match AppState::from_config(&config, Metrics::new()).await {
            Ok(_) => panic!("the server started with the projection {}", path.display()),
            Err(e) => format!("{e:#}"),
        };
        for w in wants {
            assert!(err.contains(w), "{w:?} not in: {err}");
        }
        assert!(err.contains(REDUCED), "the error names the model: {err}");
    }
}

#[test]
fn pca_fit_explains_bad_input() {
    let dir = TempDir::new("pca-cli");
    let small = dir.0.join("small.txt");
    std::fs::write(&small, "one\ntwo\nthree\nfour\nfive\n").unwrap();
    let jsonl = dir.0.join("bad.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"a\"}\n{\"txt\": \"b\"}\n").unwrap();
    let good = dir.0.join("good.txt");
    std::fs::write(&good, corpus().join("\n")).unwrap();
    let empty = dir.0.join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let nope = dir.0.join("nope.txt");
    let cases: Vec<(&Path, usize, &str)> = vec![
        (&nope, 4, "reading the corpus"),
        (&empty, 4, "has no texts"),
        (&jsonl, 1, "line 2"),
        (&good, D + 1, "more than the model's 32 dimensions"),
        (&small, 5, "needs more than 5 corpus texts (found 5)"),
        (&good, 0, "--dims must be at least 1"),
    ];
    for (corpus_file, dims, want) in cases {
        let out = fit(&dir.0, corpus_file, dims);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} --dims {dims} succeeded", corpus_file.display());
        assert!(stderr.contains(want), "{want:?} not in: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert!(!dir.0.join("pca.safetensors").exists());
    // JSON lines with a "text" field are a corpus too.
    let ok = dir.0.join("ok.jsonl");
    let lines: Vec<String> = corpus().iter().map(|t| json!({"text": t, "id": 1}).to_string()).collect();
    std::fs::write(&ok, lines.join("\n")).unwrap();
    let out = fit(&dir.0, &ok, 2);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.0.join("pca.safetensors").exists());
}
