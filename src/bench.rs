//! `kiln bench`: closed-loop generation benchmark of one model folder, in process (the
//! batcher, engine thread and request actors of the server, without HTTP). For each
//! concurrency it runs that many clients, each sending greedy requests with a fixed prompt
//! length and a fixed number of output tokens (eos ignored), and reports output tokens/s,
//! time to first token and inter-token latency percentiles, and the process's resident memory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_actors::{
    spawn_batcher, start_generation, BatcherConfig, BatcherHandle, ClientEvent, Engine, EngineError, Generation,
    Metrics, SamplingParams, TextRequest,
};
use kiln_models::{DType, DeviceSpec, HfTokenizer, TextEngine, TextEngineOptions};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// HuggingFace model folder (Qwen2 or Llama architecture).
    #[arg(long)]
    pub model: PathBuf,
    /// Concurrency levels to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub concurrency: Vec<usize>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Output tokens per request (eos is ignored).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Requests per concurrency level (default: the concurrency, at least 2).
    #[arg(long)]
    pub requests: Option<usize>,
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: BenchDType,
    /// KV cache size in tokens (default: enough for the largest concurrency).
    #[arg(long)]
    pub kv_cache_tokens: Option<usize>,
    /// Token budget of one engine step.
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Write the results as JSON to this file too.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BenchDType {
    F32,
    F16,
    Bf16,
}

impl From<BenchDType> for DType {
    fn from(d: BenchDType) -> DType {
        match d {
            BenchDType::F32 => DType::F32,
            BenchDType::F16 => DType::F16,
            BenchDType::Bf16 => DType::BF16,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LevelResult {
    pub concurrency: usize,
    pub requests: usize,
    pub output_tokens: usize,
    pub wall_s: f64,
    pub output_tokens_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
    pub rss_mib: f64,
}

/// The `q` quantile of sorted values (nearest rank); NaN when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx]
}

/// Resident and peak resident memory of this process in MiB (Linux; NaN elsewhere).
pub fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Prompts of exactly `len` tokens, different per request.
/// Runs a benchmark's async body on a two-worker runtime (the clients; engines run on their
/// own threads).
pub fn block_on_bench<F: std::future::Future<Output = anyhow::Result<()>>>(body: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(body)
}

/// Spawns the benchmark's batcher over an engine built (on its thread) by `load`, with a
/// queue that never refuses the closed-loop clients.
pub async fn spawn_bench_batcher<E, F, Err>(load: F, metrics: &Metrics) -> anyhow::Result<BatcherHandle<E>>
where
    E: Engine,
    F: Fn() -> Result<E, Err> + Send + Sync + 'static,
    Err: std::fmt::Display,
{
    let load = move || load().map_err(|e| EngineError::Load(e.to_string()));
    let handle = spawn_batcher(
        "bench".into(),
        Arc::new(load),
        BatcherConfig { max_waiting: 1 << 16, ..BatcherConfig::default() },
        metrics.for_model("bench"),
    )
    .await?;
    Ok(handle)
}

/// Prints the peak RSS, writes `results` as JSON to `json` if given, and stops the batcher.
pub fn finish_bench<E: Engine, T: serde::Serialize>(
    batcher: &BatcherHandle<E>,
    results: &[T],
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let (_, peak) = rss_mib();
    println!("peak RSS {peak:.0} MiB");
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(results)?)?;
    }
    batcher.stop();
    Ok(())
}

fn make_prompts(tok: &HfTokenizer, len: usize, count: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    let text = "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly \
                report on renewable energy, inference servers, batching, and the history of kilns. ";
    let base = tok.encode(&text.repeat(len / 8 + 4), false).map_err(|e| anyhow::anyhow!(e))?;
    anyhow::ensure!(!base.is_empty(), "the tokenizer produced no tokens");
    Ok((0..count).map(|i| (0..len).map(|k| base[(k + i * 7) % base.len()]).collect()).collect())
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    block_on_bench(run_async(args))
}

async fn run_async(args: BenchArgs) -> anyhow::Result<()> {
    let tokenizer = HfTokenizer::load(&args.model).context("loading the tokenizer")?;
    let max_conc = args.concurrency.iter().copied().max().unwrap_or(1);
    let per_seq = args.prompt_tokens + args.max_tokens + 16;
    let opts = TextEngineOptions {
        device: args.device,
        dtype: args.dtype.into(),
        block_size: 16,
        kv_cache_tokens: args.kv_cache_tokens.unwrap_or(per_seq * max_conc),
        max_batch_tokens: args.max_batch_tokens,
        max_running: max_conc.max(1),
        max_model_len: None,
        host_cache: None,
    };
    let (rss0, _) = rss_mib();
    let t_load = Instant::now();
    let dir = args.model.clone();
    let factory_opts = opts.clone();
    let metrics = Metrics::new();
    let batcher = spawn_bench_batcher(move || TextEngine::load(&dir, &factory_opts), &metrics).await?;
    let (rss_loaded, _) = rss_mib();
    println!(
        "model {} loaded in {:.1}s ({:?}, {:?}); RSS {:.0} MiB (before load {:.0} MiB); KV pool {} tokens",
        args.model.display(),
        t_load.elapsed().as_secs_f64(),
        opts.device,
        opts.dtype,
        rss_loaded,
        rss0,
        opts.kv_cache_tokens
    );
    let detok: Arc<dyn kiln_actors::Detokenize> = Arc::new(tokenizer);
    let detok_for_prompts = HfTokenizer::load(&args.model)?;

    // Warm-up: one short request so lazy initialisation is not measured.
    run_level(&batcher, &detok, &metrics, &make_prompts(&detok_for_prompts, args.prompt_tokens, 1)?, 1, 4).await?;

    let mut results = Vec::new();
    println!(
        "{:>11} {:>8} {:>8} {:>10} {:>11} {:>11} {:>10} {:>10} {:>9}",
        "concurrency", "requests", "tokens", "tok/s", "ttft p50ms", "ttft p99ms", "itl p50ms", "itl p99ms", "RSS MiB"
    );
    for &c in &args.concurrency {
        let n = args.requests.unwrap_or(c.max(2));
        let prompts = make_prompts(&detok_for_prompts, args.prompt_tokens, n)?;
        let r = run_level(&batcher, &detok, &metrics, &prompts, c, args.max_tokens).await?;
        println!(
            "{:>11} {:>8} {:>8} {:>10.1} {:>11.1} {:>11.1} {:>10.1} {:>10.1} {:>9.0}",
            r.concurrency,
            r.requests,
            r.output_tokens,
            r.output_tokens_per_s,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.itl_p50_ms,
            r.itl_p99_ms,
            r.rss_mib
        );
        results.push(r);
    }
    finish_bench(&batcher, &results, args.json.as_deref())
}

async fn run_level(
    batcher: &kiln_actors::BatcherHandle<TextEngine>,
    detok: &Arc<dyn kiln_actors::Detokenize>,
    metrics: &Metrics,
    prompts: &[Vec<u32>],
    concurrency: usize,
    max_tokens: usize,
) -> anyhow::Result<LevelResult> {
    let queue = Arc::new(std::sync::Mutex::new(prompts.to_vec()));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let queue = queue.clone();
        let batcher = batcher.clone();
        let detok = detok.clone();
        let m = metrics.for_model("bench");
        workers.push(tokio::spawn(async move {
            let mut ttfts = Vec::new();
            let mut itls = Vec::new();
            let mut tokens = 0usize;
            loop {
                let Some(prompt) = queue.lock().unwrap().pop() else { break };
                let req = TextRequest {
                    prompt,
                    params: SamplingParams { temperature: 0.0, ..Default::default() },
                    max_new_tokens: max_tokens,
                    stop_token_ids: vec![],
                    ignore_eos: true,
                    logprobs: None,
                };
                let gen = Generation { choices: vec![req], stop: vec![], deadline: None };
                let start = Instant::now();
                let mut rx = start_generation(batcher.clone(), detok.clone(), gen, m.clone()).await?;
                let mut last: Option<Instant> = None;
                while let Some(ev) = rx.recv().await {
                    match ev {
                        ClientEvent::Token { .. } => {
                            let now = Instant::now();
                            match last {
                                None => ttfts.push((now - start).as_secs_f64() * 1e3),
                                Some(prev) => itls.push((now - prev).as_secs_f64() * 1e3),
                            }
                            last = Some(now);
                            tokens += 1;
                        }
                        ClientEvent::Done { .. } => break,
                        ClientEvent::Error { message, .. } => anyhow::bail!("generation failed: {message}"),
                    }
                }
            }
            Ok::<_, anyhow::Error>((ttfts, itls, tokens))
        }));
    }
    let (mut ttft, mut itl, mut tokens) = (Vec::new(), Vec::new(), 0);
    for w in workers {
        let (a, b, t) = w.await??;
        ttft.extend(a);
        itl.extend(b);
        tokens += t;
    }
    let wall = t0.elapsed().max(Duration::from_micros(1)).as_secs_f64();
    ttft.sort_by(f64::total_cmp);
    itl.sort_by(f64::total_cmp);
    Ok(LevelResult {
        concurrency,
        requests: prompts.len(),
        output_tokens: tokens,
        wall_s: wall,
        output_tokens_per_s: tokens as f64 / wall,
        ttft_p50_ms: percentile(&ttft, 0.5),
        ttft_p99_ms: percentile(&ttft, 0.99),
        itl_p50_ms: percentile(&itl, 0.5),
        itl_p99_ms: percentile(&itl, 0.99),
        rss_mib: rss_mib().0,
    })
}
