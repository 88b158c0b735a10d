//! In-process embedding throughput, without HTTP: the sentences of
//! `tools/bench/st_embeddings_baseline.py --prompts` (JSON lines `{"prompt": ...}`) through
//! `EmbeddingEngine::embed`.
//!
//!     cargo run --release -p kiln-models --example embed_bench -- /tmp/kiln-models/minilm /tmp/st-sentences.jsonl [mode] [runs]
//!
//! Modes: `sorted32` (all inputs sorted by length, batches of 32, as sentence-transformers),
//! `groups16` (groups of 16 in file order, as the server sees them at concurrency 16),
//! `single` (one input a call; prints the p50), `all` (the three).

use std::path::Path;
use std::time::Instant;

use kiln_models::embed::SentenceTransformerConfig;
use kiln_models::{EmbeddingEngine, EmbeddingEngineOptions, EmbeddingTokenizer};

/// CPU time of the process (all threads), seconds.
fn cpu_seconds() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(1).map(String::as_str).unwrap_or("/tmp/kiln-models/minilm"));
    let file = args.get(2).map(String::as_str).unwrap_or("/tmp/st-sentences.jsonl");
    let mode = args.get(3).map(String::as_str).unwrap_or("all");
    let runs: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(3);

    let engine = EmbeddingEngine::load(dir, &EmbeddingEngineOptions::default()).expect("load");
    let cfg = kiln_models::bert::EncoderConfig::from_dir(dir).expect("config");
    let st = SentenceTransformerConfig::from_dir(dir, &cfg).expect("st config");
    let tok = EmbeddingTokenizer::load(dir, &st).expect("tokenizer");
    let texts: Vec<String> = std::fs::read_to_string(file)
        .expect("sentences")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt"].as_str().unwrap().to_string())
        .collect();
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t, None, true).unwrap()).collect();
    let n = ids.len();
    let tokens: usize = ids.iter().map(Vec::len).sum();
    println!("{n} inputs, {:.1} tokens on average", tokens as f64 / n as f64);

    let run = |name: &str, groups: Vec<Vec<&[u32]>>| {
        let _ = engine.embed(&groups[0]).unwrap(); // warm up
        let mut rates = Vec::new();
        let mut cpu = Vec::new();
        for _ in 0..runs {
            let (t0, c0) = (Instant::now(), cpu_seconds());
            for g in &groups {
                std::hint::black_box(engine.embed(g).unwrap());
            }
            rates.push(n as f64 / t0.elapsed().as_secs_f64());
            cpu.push(n as f64 / (cpu_seconds() - c0));
        }
        rates.sort_by(f64::total_cmp);
        cpu.sort_by(f64::total_cmp);
        println!(
            "{name}: {:.1} sentences/s (median of {runs}; runs {rates:.1?}); {:.1} sentences per CPU-second",
            rates[runs / 2],
            cpu[runs / 2]
        );
    };
    if mode == "sorted32" || mode == "all" {
        let mut sorted: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        sorted.sort_by_key(|t| std::cmp::Reverse(t.len()));
        run("sorted32", sorted.chunks(32).map(<[&[u32]]>::to_vec).collect());
    }
    if mode == "groups16" || mode == "all" {
        let all: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        run("groups16", all.chunks(16).map(<[&[u32]]>::to_vec).collect());
    }
    if mode == "single" || mode == "all" {
        let mut lat = Vec::new();
        for t in ids.iter().take(200) {
            let t0 = Instant::now();
            std::hint::black_box(engine.embed(&[t.as_slice()]).unwrap());
            lat.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        lat.sort_by(f64::total_cmp);
        println!("single: p50 {:.2} ms, p90 {:.2} ms", lat[lat.len() / 2], lat[lat.len() * 9 / 10]);
    }
}
