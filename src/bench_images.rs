//! `kiln bench-images`: closed-loop image-generation benchmark of one diffusers folder, in
//! process (the batcher and the diffusion engine of the server, without HTTP). For each
//! concurrency it runs that many clients, each generating images one after another (different
//! seeds, the same prompt, settings and size), and reports images/s, denoising steps/s
//! (image-steps: one image advanced one step), engine steps/s (UNet forwards over the running
//! batch), time to the first step event and the image latency percentiles, and resident memory.
//! Concurrency 1 is the sequential baseline; diffusers' figure comes from
//! `tools/bench/diffusers_baseline.py` run on the same machine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_actors::{BatcherHandle, ImageEvent, ImageRequest, ImageStream, Metrics};
use kiln_models::clip::ClipTokenizer;
use kiln_models::{DeviceSpec, DiffusionEngine, DiffusionEngineOptions};

use crate::bench::{block_on_bench, finish_bench, percentile, rss_mib, spawn_bench_batcher, BenchDType};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchImagesArgs {
    /// diffusers pipeline folder (Stable Diffusion 1.x / 2.x).
    #[arg(long)]
    pub model: PathBuf,
    /// Concurrency levels to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub concurrency: Vec<usize>,
    /// Images per level (default: the concurrency, at least 2).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Image width and height in pixels.
    #[arg(long, default_value_t = 256)]
    pub width: usize,
    #[arg(long, default_value_t = 256)]
    pub height: usize,
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f32,
    /// Scheduler name (default: the folder's).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Images of this size one UNet forward may hold (default: the largest concurrency).
    #[arg(long)]
    pub max_batch_images: Option<usize>,
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: BenchDType,
    /// Write the results as JSON to this file too.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageLevelResult {
    pub concurrency: usize,
    pub images: usize,
    pub wall_s: f64,
    pub images_per_s: f64,
    /// Images advanced one denoising step, per second.
    pub image_steps_per_s: f64,
    /// Engine steps (one UNet forward per resolution over the running images) per second.
    pub engine_steps_per_s: f64,
    /// Images per engine step, on average.
    pub mean_batch: f64,
    pub first_step_p50_ms: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub rss_mib: f64,
}

pub fn run(args: BenchImagesArgs) -> anyhow::Result<()> {
    block_on_bench(run_async(args))
}

async fn run_async(args: BenchImagesArgs) -> anyhow::Result<()> {
    let tok = ClipTokenizer::from_dir(&args.model.join("tokenizer")).context("loading the tokenizer")?;
    let max_conc = args.concurrency.iter().copied().max().unwrap_or(1).max(1);
    let opts = DiffusionEngineOptions {
        device: args.device,
        dtype: args.dtype.into(),
        max_running: max_conc,
        max_pixels: args.width * args.height,
        max_batch_images: args.max_batch_images.unwrap_or(max_conc),
        max_steps: args.steps.max(1),
        warmup: false,
    };
    let (rss0, _) = rss_mib();
    let t_load = Instant::now();
    let (dir, factory_opts) = (args.model.clone(), opts.clone());
    let batcher = spawn_bench_batcher(move || DiffusionEngine::load(&dir, &factory_opts), &Metrics::new()).await?;
    let (rss_loaded, _) = rss_mib();
    println!(
        "pipeline {} loaded in {:.1}s ({:?}, {:?}); RSS {:.0} MiB (before load {:.0} MiB); {}x{}, {} steps, guidance {}",
        args.model.display(),
        t_load.elapsed().as_secs_f64(),
        opts.device,
        opts.dtype,
        rss_loaded,
        rss0,
        args.width,
        args.height,
        args.steps,
        args.guidance_scale
    );
    let base = ImageRequest {
        prompt_ids: tok.encode("a photograph of an astronaut riding a horse").map_err(anyhow::Error::msg)?.0,
        negative_ids: tok.encode("").map_err(anyhow::Error::msg)?.0,
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        scheduler: args.scheduler.clone(),
        seed: 0,
        init_image: None,
        preview_every: 0,
    };
    // Warm-up: one image with a single step.
    run_level(&batcher, &ImageRequest { steps: 1, ..base.clone() }, 1, 1).await?;

    println!(
        "{:>11} {:>6} {:>9} {:>12} {:>13} {:>10} {:>14} {:>12} {:>12} {:>8}",
        "concurrency",
        "images",
        "images/s",
        "img-steps/s",
        "eng-steps/s",
        "batch",
        "1st step p50ms",
        "lat p50 ms",
        "lat p99 ms",
        "RSS MiB"
    );
    let mut results = Vec::new();
    for &c in &args.concurrency {
        let n = args.requests.unwrap_or(c.max(2));
        let r = run_level(&batcher, &base, c, n).await?;
        println!(
            "{:>11} {:>6} {:>9.3} {:>12.2} {:>13.2} {:>10.2} {:>14.0} {:>12.0} {:>12.0} {:>8.0}",
            r.concurrency,
            r.images,
            r.images_per_s,
            r.image_steps_per_s,
            r.engine_steps_per_s,
            r.mean_batch,
            r.first_step_p50_ms,
            r.latency_p50_ms,
            r.latency_p99_ms,
            r.rss_mib
        );
        results.push(r);
    }
    finish_bench(&batcher, &results, args.json.as_deref())
}

async fn run_level(
    batcher: &BatcherHandle<DiffusionEngine>,
    base: &ImageRequest,
    concurrency: usize,
    images: usize,
) -> anyhow::Result<ImageLevelResult> {
    let seeds = Arc::new(std::sync::Mutex::new((0..images as u64).collect::<Vec<_>>()));
    let steps_before = batcher.stats().await.map(|s| s.steps).unwrap_or(0);
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (seeds, batcher, base) = (seeds.clone(), batcher.clone(), base.clone());
        workers.push(tokio::spawn(async move {
            let (mut first, mut latency, mut image_steps) = (Vec::new(), Vec::new(), 0usize);
            loop {
                let Some(seed) = seeds.lock().unwrap().pop() else { break };
                let start = Instant::now();
                let mut stream = ImageStream::start(&batcher, vec![ImageRequest { seed, ..base.clone() }]).await?;
                let mut got_image = false;
                while let Some(ev) = stream.next().await {
                    match ev {
                        ImageEvent::Step { output, .. } => {
                            if output.step == 1 {
                                first.push(start.elapsed().as_secs_f64() * 1e3);
                            }
                            image_steps += 1;
                            got_image |= output.image.is_some();
                        }
                        ImageEvent::Ended { reason, .. } => anyhow::bail!("image ended: {reason:?}"),
                        ImageEvent::Failed { message, .. } => anyhow::bail!("image failed: {message}"),
                    }
                }
                anyhow::ensure!(got_image, "no image");
                latency.push(start.elapsed().as_secs_f64() * 1e3);
            }
            Ok::<_, anyhow::Error>((first, latency, image_steps))
        }));
    }
    let (mut first, mut latency, mut image_steps) = (Vec::new(), Vec::new(), 0);
    for w in workers {
        let (f, l, s) = w.await??;
        first.extend(f);
        latency.extend(l);
        image_steps += s;
    }
    let wall = t0.elapsed().max(Duration::from_micros(1)).as_secs_f64();
    let engine_steps = batcher.stats().await.map(|s| s.steps).unwrap_or(0) - steps_before;
    first.sort_by(f64::total_cmp);
    latency.sort_by(f64::total_cmp);
    Ok(ImageLevelResult {
        concurrency,
        images,
        wall_s: wall,
        images_per_s: images as f64 / wall,
        image_steps_per_s: image_steps as f64 / wall,
        engine_steps_per_s: engine_steps as f64 / wall,
        mean_batch: image_steps as f64 / engine_steps.max(1) as f64,
        first_step_p50_ms: percentile(&first, 0.5),
        latency_p50_ms: percentile(&latency, 0.5),
        latency_p99_ms: percentile(&latency, 0.99),
        rss_mib: rss_mib().0,
    })
}
