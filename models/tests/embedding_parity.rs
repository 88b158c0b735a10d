//! Embedding parity with sentence-transformers (fixtures of tools/oracle/make_embedding_fixtures.py),
//! batching invariance, and the embedding engine driven through the batcher actor.
//!
//! The real all-MiniLM-L6-v2 check runs when /tmp/kiln-models/minilm (or `KILN_MINILM_DIR`)
//! exists; fetch it with `bash ../shared/tools/real-models.sh`.

mod common;

use common::max_abs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_actors::embed::{embed_inputs, EmbedError, EmbedOutput, EmbedRequest};
use kiln_actors::engine::{Engine, EngineError, FinishReason, ScheduledSeq, StepPlan};
use kiln_actors::metrics::ModelMetrics;
use kiln_actors::{spawn_batcher, BatcherConfig, BatcherHandle};
use kiln_models::bert::Pooling;
use kiln_models::embed::{EmbedInputError, SentenceTransformerConfig};
use kiln_models::{DType, DeviceSpec, EmbeddingEngine, EmbeddingEngineOptions, EmbeddingTokenizer};
use serde_json::Value;

const TOL: f32 = 1e-5;

fn fixtures() -> PathBuf {
    common::fixtures("")
}

fn expected(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap()
}

fn opts() -> EmbeddingEngineOptions {
    EmbeddingEngineOptions { device: DeviceSpec::Cpu, dtype: DType::F32, ..Default::default() }
}

fn load(dir: &Path, opts: &EmbeddingEngineOptions) -> (EmbeddingEngine, EmbeddingTokenizer) {
    let engine = EmbeddingEngine::load(dir, opts).unwrap();
    let cfg = kiln_models::bert::EncoderConfig::from_dir(dir).unwrap();
    let st = SentenceTransformerConfig::from_dir(dir, &cfg).unwrap();
    (engine, EmbeddingTokenizer::load(dir, &st).unwrap())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect())
        .collect()
}

fn vectors(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = max_abs(g, w);
        assert!(d <= TOL, "{what}: input {i}: max abs diff {d:e} > {TOL:e}");
    }
}

fn refs(v: &[Vec<u32>]) -> Vec<&[u32]> {
    v.iter().map(Vec::as_slice).collect()
}

/// Tokenization, then `encode()` vectors in one batch and one by one.
fn check_fixture(name: &str) -> (EmbeddingEngine, EmbeddingTokenizer, Value) {
    let dir = fixtures().join(name);
    let exp = expected(&dir);
    let (engine, tok) = load(&dir, &opts());
    assert_eq!(tok.max_seq_length(), exp["max_seq_length"].as_u64().unwrap() as usize);
    let sentences = strings(&exp["sentences"]);
    let want_ids = ids(&exp["token_ids"]);
    for (s, want) in sentences.iter().zip(&want_ids) {
        assert_eq!(&tok.encode(s, None, true).unwrap(), want, "{name}: token ids of {s:?}");
    }
    let want = vectors(&exp["vectors"]);
    assert_close(&engine.embed(&refs(&want_ids)).unwrap(), &want, &format!("{name} batched"));
    for (i, t) in want_ids.iter().enumerate() {
        assert_close(&engine.embed(&[t]).unwrap(), &want[i..=i], &format!("{name} alone"));
    }
    (engine, tok, exp)
}

#[test]
fn bert_tiny_matches_sentence_transformers() {
    let (engine, _, _) = check_fixture("bert-tiny-st");
    let info = engine.model_info();
    assert_eq!((info.architecture.as_str(), info.pooling.as_str(), info.normalize), ("BertModel", "mean", true));
    assert_eq!(info.dimensions, 32);
}

#[test]
fn bert_tiny_every_pooling_mode() {
    let dir = fixtures().join("bert-tiny-st");
    let exp = expected(&dir);
    let want_ids = ids(&exp["token_ids"]);
    let modes = [
        ("mean", Pooling::MEAN),
        ("cls", Pooling::CLS),
        ("max", Pooling::MAX),
        ("mean_sqrt_len_tokens", Pooling::MEAN_SQRT_LEN),
    ];
    for (name, pooling) in modes {
        let opts = EmbeddingEngineOptions { pooling: Some((pooling, false)), ..opts() };
        let engine = EmbeddingEngine::load(&dir, &opts).unwrap();
        let got = engine.embed(&refs(&want_ids)).unwrap();
        assert_close(&got, &vectors(&exp["pooling"][name]), &format!("pooling {name}"));
    }
}

#[test]
fn xlmr_tiny_matches_sentence_transformers_with_prompts() {
    let (engine, tok, exp) = check_fixture("xlmr-tiny-st");
    let info = engine.model_info();
    assert_eq!((info.architecture.as_str(), info.pooling.as_str(), info.normalize), ("XLMRobertaModel", "cls", false));
    assert_eq!(info.prompts.get("query").map(String::as_str), Some("query: "));
    let queries = strings(&exp["query_sentences"]);
    let want_ids = ids(&exp["query_token_ids"]);
    let got_ids: Vec<Vec<u32>> = queries.iter().map(|q| tok.encode(q, Some("query"), true).unwrap()).collect();
    assert_eq!(got_ids, want_ids);
    assert_close(&engine.embed(&refs(&got_ids)).unwrap(), &vectors(&exp["query_vectors"]), "xlmr queries");
    assert!(matches!(tok.encode("x", Some("nope"), true), Err(EmbedInputError::UnknownPrompt(_))));
}

#[test]
fn long_inputs_truncate_or_fail() {
    let dir = fixtures().join("bert-tiny-st");
    let (_, tok) = load(&dir, &opts());
    let long = "the kiln was warm long before sunrise ".repeat(20);
    let ids = tok.encode(&long, None, true).unwrap();
    assert_eq!(ids.len(), tok.max_seq_length());
    match tok.encode(&long, None, false) {
        Err(EmbedInputError::TooLong { len, max }) => assert!(len > max && max == 24),
        other => panic!("expected TooLong, got {other:?}"),
    }
}

/// Inputs of every length 1..=max from the fixture's sentences and a deterministic id stream.
fn mixed_inputs(engine: &EmbeddingEngine, n: usize) -> Vec<Vec<u32>> {
    let info = engine.model_info();
    let (vocab, max) = (info.vocab_size as u64, info.max_seq_length);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|i| {
            let len = 1 + (i * 7 + i / 3) % max;
            (0..len)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 33) % vocab) as u32
                })
                .collect()
        })
        .collect()
}

#[test]
fn vectors_do_not_depend_on_the_batch() {
    for name in ["bert-tiny-st", "xlmr-tiny-st"] {
        let (engine, _) = load(&fixtures().join(name), &opts());
        let inputs = mixed_inputs(&engine, 64);
        let batched = engine.embed(&refs(&inputs)).unwrap();
        let alone: Vec<Vec<f32>> = inputs.iter().map(|t| engine.embed(&[t]).unwrap().pop().unwrap()).collect();
        assert_close(&batched, &alone, &format!("{name}: batch of 64 vs alone"));
        // Another order, another batch composition.
        let rev: Vec<Vec<u32>> = inputs.iter().rev().cloned().collect();
        let mut again = engine.embed(&refs(&rev)).unwrap();
        again.reverse();
        assert_close(&again, &alone, &format!("{name}: reversed batch vs alone"));
    }
}

/// Drives `Engine::step` by hand: a chunked input is encoded when its last chunk arrives,
/// bad inputs end alone with `FinishReason::Error`, a skipped chunk is an engine error.
#[test]
fn engine_steps_whole_chunked_and_bad_inputs() {
    let (mut engine, _) = load(&fixtures().join("bert-tiny-st"), &opts());
    let inputs = mixed_inputs(&engine, 3);
    let want = engine.embed(&refs(&inputs)).unwrap();
    let seq = |id, start, len, sample| ScheduledSeq { id, start, len, block_table: vec![], sample };
    let (a, b, c) = (&inputs[0], &inputs[1], &inputs[2]);
    assert!(b.len() > 2);
    let plan = StepPlan {
        new: vec![
            (0, EmbedRequest { tokens: a.clone() }),
            (1, EmbedRequest { tokens: b.clone() }),
            (2, EmbedRequest { tokens: vec![] }),
            (3, EmbedRequest { tokens: vec![1, 100_000] }),
        ],
        released: vec![],
        seqs: vec![seq(0, 0, a.len(), true), seq(1, 0, 2, false), seq(2, 0, 1, true), seq(3, 0, 2, true)],
    };
    let out = engine.step(plan).unwrap();
    assert_eq!(out.len(), 3);
    let by_id = |id| out.iter().find(|o| o.id == id).unwrap();
    assert_eq!(by_id(0).finished, Some(FinishReason::Stop));
    assert!(max_abs(&by_id(0).output.vector, &want[0]) <= TOL);
    assert_eq!(by_id(2).finished, Some(FinishReason::Error));
    assert_eq!(by_id(3).finished, Some(FinishReason::Error));
    let plan = StepPlan {
        new: vec![(4, EmbedRequest { tokens: c.clone() })],
        released: vec![],
        seqs: vec![seq(1, 2, b.len() - 2, true), seq(4, 0, c.len(), true)],
    };
    let out = engine.step(plan).unwrap();
    assert!(max_abs(&out[0].output.vector, &want[1]) <= TOL);
    assert_eq!(out[0].output.prompt_tokens, b.len());
    assert!(max_abs(&out[1].output.vector, &want[2]) <= TOL);
    assert_eq!(engine.num_sequences(), 0);
    let plan = StepPlan {
        new: vec![(5, EmbedRequest { tokens: c.clone() })],
        released: vec![],
        seqs: vec![seq(5, 1, 1, false)],
    };
    assert!(engine.step(plan).is_err());
}

async fn batcher(dir: PathBuf, opts: EmbeddingEngineOptions, max_waiting: usize) -> BatcherHandle<EmbeddingEngine> {
    spawn_batcher(
        "embed".into(),
        Arc::new(move || EmbeddingEngine::load(&dir, &opts).map_err(|e| EngineError::Load(e.to_string()))),
        BatcherConfig { max_waiting, ..Default::default() },
        ModelMetrics::unregistered("embed"),
    )
    .await
    .expect("engine loads")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batcher_serves_many_concurrent_requests() {
    let dir = fixtures().join("bert-tiny-st");
    let (engine, _) = load(&dir, &opts());
    let inputs = mixed_inputs(&engine, 200);
    let want = engine.embed(&refs(&inputs)).unwrap();
    // A budget of one longest input: most steps split some input across two steps.
    let small_steps = EmbeddingEngineOptions { max_batch_tokens: 24, max_running: 16, ..opts() };
    let b = batcher(dir.clone(), small_steps.clone(), 256).await;
    assert_eq!(b.spec().max_batch_tokens, 24);
    // 20 concurrent callers of 10 inputs each, and one of 200 (it keeps max_running queued).
    let mut tasks = Vec::new();
    for chunk in 0..20 {
        let (b, part) = (b.clone(), inputs[chunk * 10..chunk * 10 + 10].to_vec());
        tasks.push(tokio::spawn(async move { (chunk * 10, embed_inputs(&b, part).await) }));
    }
    let big = {
        let (b, all) = (b.clone(), inputs.clone());
        tokio::spawn(async move { embed_inputs(&b, all).await })
    };
    for t in tasks {
        let (offset, res) = t.await.unwrap();
        let outs: Vec<EmbedOutput> = res.expect("embedded");
        for (i, o) in outs.iter().enumerate() {
            assert!(max_abs(&o.vector, &want[offset + i]) <= TOL, "input {}", offset + i);
            assert_eq!(o.prompt_tokens, inputs[offset + i].len());
        }
    }
    let outs = big.await.unwrap().expect("embedded");
    let got: Vec<Vec<f32>> = outs.into_iter().map(|o| o.vector).collect();
    assert_close(&got, &want, "200 inputs through the batcher");

    // A bad input fails its call, not the batcher.
    let err = embed_inputs(&b, vec![inputs[0].clone(), vec![], inputs[1].clone()]).await.unwrap_err();
    assert!(matches!(err, EmbedError::InvalidInput { index: 1 }), "{err:?}");
    let ok = embed_inputs(&b, vec![inputs[3].clone()]).await.unwrap();
    assert!(max_abs(&ok[0].vector, &want[3]) <= TOL);
    let stats = b.stats().await.unwrap();
    assert_eq!((stats.waiting, stats.running, stats.used_blocks), (0, 0, 0));
    b.stop();

    // A queue shorter than the call's window: the call waits for its own inputs and retries.
    let b = batcher(dir, small_steps, 4).await;
    let outs = embed_inputs(&b, inputs[..50].to_vec()).await.expect("embedded despite a short queue");
    let got: Vec<Vec<f32>> = outs.into_iter().map(|o| o.vector).collect();
    assert_close(&got, &want[..50], "50 inputs through a queue of 4");
    b.stop();
}

fn minilm_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("KILN_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/kiln-models/minilm"));
    if dir.join("model.safetensors").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "skipping: all-MiniLM-L6-v2 not found at {} (fetch it with `bash ../shared/tools/real-models.sh`, \
             or set KILN_MINILM_DIR)",
            dir.display()
        );
        None
    }
}

#[test]
fn real_minilm_matches_sentence_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("minilm-expected.json")).unwrap()).unwrap();
    let (engine, tok) = load(&dir, &opts());
    assert_eq!(tok.max_seq_length(), 256);
    let sentences = strings(&exp["sentences"]);
    let want_ids = ids(&exp["token_ids"]);
    let got_ids: Vec<Vec<u32>> = sentences.iter().map(|s| tok.encode(s, None, true).unwrap()).collect();
    assert_eq!(got_ids, want_ids);
    let want = vectors(&exp["vectors"]);
    let got = engine.embed(&refs(&got_ids)).unwrap();
    let mut worst = 1.0f64;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let c = cosine(g, w);
        worst = worst.min(c);
        assert!(c >= 0.99999, "sentence {i}: cosine {c}");
    }
    let max_diff = got.iter().zip(&want).map(|(g, w)| max_abs(g, w)).fold(0.0, f32::max);
    let alone: Vec<Vec<f32>> = got_ids.iter().map(|t| engine.embed(&[t]).unwrap().pop().unwrap()).collect();
    assert_close(&got, &alone, "all-MiniLM-L6-v2: batch of 50 vs alone");
    eprintln!("all-MiniLM-L6-v2: worst cosine {worst:.9}, max abs diff {max_diff:e} over {} sentences", got.len());
}

/// f16 and bf16 weights and activations (LayerNorm, softmax and pooling in f32) stay close to f32.
#[test]
fn half_precision_stays_close() {
    let dir = fixtures().join("bert-tiny-st");
    let exp = expected(&dir);
    let want = vectors(&exp["vectors"]);
    let want_ids = ids(&exp["token_ids"]);
    for (dtype, min_cos) in [(DType::F16, 0.999), (DType::BF16, 0.99)] {
        let engine = EmbeddingEngine::load(&dir, &EmbeddingEngineOptions { dtype, ..opts() }).unwrap();
        let got = engine.embed(&refs(&want_ids)).unwrap();
        let worst = got.iter().zip(&want).map(|(g, w)| cosine(g, w)).fold(1.0, f64::min);
        assert!(worst >= min_cos, "{dtype:?}: worst cosine {worst}");
    }
}
