//! `kiln bench-speech`: closed-loop text-to-speech benchmark of one Qwen3-TTS folder, in
//! process (the batcher and the speech engine of the server, without HTTP). For each
//! concurrency it runs that many clients, each speaking utterances one after another (the same
//! text, speaker and settings, different seeds), and reports the aggregate speed in seconds of
//! audio per second of wall time (x real time), frames per second, talker batch size, time to
//! first audio, the first output (the prefill step, which also yields frame 0) and the frame
//! interval, and resident memory. Concurrency 1 is the sequential baseline; qwen-tts' figure
//! comes from `tools/bench/qwen_tts_baseline.py` run on the same machine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_actors::{BatcherHandle, Metrics, SpeechEvent, SpeechRequest, SpeechStream};
use kiln_models::tts_prompt::TtsPrompter;
use kiln_models::{DeviceSpec, TtsEngine, TtsEngineOptions};

use crate::bench::{block_on_bench, finish_bench, percentile, rss_mib, spawn_bench_batcher, BenchDType};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchSpeechArgs {
    /// Qwen3-TTS CustomVoice folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Concurrency levels to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub concurrency: Vec<usize>,
    /// Utterances per level (default: the concurrency, at least 2).
    #[arg(long)]
    pub requests: Option<usize>,
    #[arg(long, default_value = "Hello world, this is Kiln speaking.")]
    pub text: String,
    /// Speaker (default: the model's first).
    #[arg(long)]
    pub speaker: Option<String>,
    #[arg(long, default_value = "auto")]
    pub language: String,
    /// Most frames per utterance (12.5 per second of audio).
    #[arg(long, default_value_t = 50)]
    pub max_frames: usize,
    /// Decode audio every this many frames.
    #[arg(long, default_value_t = 1)]
    pub chunk_frames: usize,
    /// Sample with the model's defaults (different seeds per utterance) instead of greedy.
    #[arg(long)]
    pub sample: bool,
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: BenchDType,
    /// Write the results as JSON to this file too.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SpeechLevelResult {
    pub concurrency: usize,
    pub utterances: usize,
    pub frames: usize,
    pub audio_s: f64,
    pub wall_s: f64,
    /// Seconds of audio per second of wall time, all utterances together.
    pub x_realtime: f64,
    pub frames_per_s: f64,
    /// Utterances per talker step, on average.
    pub mean_batch: f64,
    /// From submission to the first audio samples.
    pub first_audio_p50_ms: f64,
    pub first_audio_max_ms: f64,
    /// From submission to the first output (the prefill step, which yields frame 0).
    pub prefill_p50_ms: f64,
    /// Mean time between an utterance's frames after the first.
    pub frame_interval_ms: f64,
    /// (first audio - first output) / frame interval: frames of generation between the end of
    /// the prefill and the first audio.
    pub first_audio_after_prefill_frames: f64,
    pub latency_p50_ms: f64,
    pub rss_mib: f64,
}

pub fn run(args: BenchSpeechArgs) -> anyhow::Result<()> {
    block_on_bench(run_async(args))
}

async fn run_async(args: BenchSpeechArgs) -> anyhow::Result<()> {
    let prompter = TtsPrompter::from_dir(&args.model).context("reading the model's prompt config")?;
    let max_conc = args.concurrency.iter().copied().max().unwrap_or(1).max(1);
    let speaker = match &args.speaker {
        Some(s) => s.clone(),
        None => prompter.speakers().into_iter().next().context("the model has no speakers")?,
    };
    let prompt = prompter.build(&args.text, &speaker, &args.language, None, true)?;
    let positions = prompt.text_track.len() + args.max_frames + 1;
    let opts = TtsEngineOptions {
        device: args.device,
        dtype: args.dtype.into(),
        block_size: 16,
        kv_cache_tokens: max_conc * positions.div_ceil(16) * 16,
        max_batch_tokens: (max_conc * positions).max(256),
        max_running: max_conc,
        max_model_len: positions,
    };
    let (rss0, _) = rss_mib();
    let t_load = Instant::now();
    let (dir, factory_opts) = (args.model.clone(), opts.clone());
    let batcher = spawn_bench_batcher(move || TtsEngine::load(&dir, &factory_opts), &Metrics::new()).await?;
    let (rss_loaded, _) = rss_mib();
    let codec = kiln_models::tts_decoder::TtsDecoderConfig::from_dir(&args.model.join("speech_tokenizer"))?;
    let (rate, spf) = (codec.output_sample_rate, codec.samples_per_frame());
    let sampling = prompter.config().sampling_defaults(0);
    let sampling = if args.sample { sampling } else { kiln_actors::SpeechSampling::greedy() };
    let base = prompter.request(prompt, args.max_frames, sampling, args.chunk_frames.max(1));
    println!(
        "model {} loaded in {:.1}s ({:?}, {:?}); RSS {:.0} MiB (before load {:.0} MiB); {} prompt rows, up to {} frames, {}",
        args.model.display(),
        t_load.elapsed().as_secs_f64(),
        opts.device,
        opts.dtype,
        rss_loaded,
        rss0,
        base.text_track.len(),
        args.max_frames,
        if args.sample { "sampled" } else { "greedy" }
    );
    // Warm-up: one short utterance.
    run_level(&batcher, &SpeechRequest { max_frames: 2, ..base.clone() }, 1, 1, rate, spf).await?;

    println!(
        "{:>11} {:>5} {:>7} {:>8} {:>10} {:>9} {:>6} {:>13} {:>11} {:>11} {:>15} {:>8}",
        "concurrency",
        "utts",
        "frames",
        "audio s",
        "x realtime",
        "frames/s",
        "batch",
        "1st audio p50",
        "prefill p50",
        "frame ms",
        "1st audio (fr)",
        "RSS MiB"
    );
    let mut results = Vec::new();
    for &c in &args.concurrency {
        let n = args.requests.unwrap_or(c.max(2));
        let r = run_level(&batcher, &base, c, n, rate, spf).await?;
        println!(
            "{:>11} {:>5} {:>7} {:>8.2} {:>10.3} {:>9.2} {:>6.2} {:>13.0} {:>11.0} {:>11.1} {:>15.2} {:>8.0}",
            r.concurrency,
            r.utterances,
            r.frames,
            r.audio_s,
            r.x_realtime,
            r.frames_per_s,
            r.mean_batch,
            r.first_audio_p50_ms,
            r.prefill_p50_ms,
            r.frame_interval_ms,
            r.first_audio_after_prefill_frames,
            r.rss_mib
        );
        results.push(r);
    }
    finish_bench(&batcher, &results, args.json.as_deref())
}

/// Per utterance: first output, first audio, end (ms from submission), frames, samples.
type Timing = (f64, f64, f64, usize, usize);

async fn run_level(
    batcher: &BatcherHandle<TtsEngine>,
    base: &SpeechRequest,
    concurrency: usize,
    utterances: usize,
    sample_rate: usize,
    samples_per_frame: usize,
) -> anyhow::Result<SpeechLevelResult> {
    let seeds = Arc::new(std::sync::Mutex::new((0..utterances as u64).collect::<Vec<_>>()));
    let steps_before = batcher.stats().await.map(|s| s.steps).unwrap_or(0);
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (seeds, batcher, base) = (seeds.clone(), batcher.clone(), base.clone());
        workers.push(tokio::spawn(async move {
            let mut timings: Vec<Timing> = Vec::new();
            loop {
                let Some(seed) = seeds.lock().unwrap().pop() else { break };
                let mut req = base.clone();
                req.sampling.seed = seed;
                let start = Instant::now();
                let ms = |t: Instant| t.duration_since(start).as_secs_f64() * 1e3;
                let mut stream = SpeechStream::start(&batcher, req).await?;
                let (mut first_out, mut first_audio) = (None, None);
                let (mut frames, mut samples) = (0usize, 0usize);
                loop {
                    match stream.next().await {
                        Some(SpeechEvent::Output(o)) => {
                            let now = Instant::now();
                            first_out.get_or_insert(now);
                            if !o.audio.is_empty() {
                                first_audio.get_or_insert(now);
                            }
                            frames = o.frames_total;
                            samples += o.audio.len();
                        }
                        Some(SpeechEvent::Done(_)) | None => break,
                        Some(SpeechEvent::Failed(m)) => anyhow::bail!("utterance failed: {m}"),
                    }
                }
                anyhow::ensure!(samples == frames * samples_per_frame, "{samples} samples for {frames} frames");
                let end = ms(Instant::now());
                timings.push((ms(first_out.unwrap_or(start)), ms(first_audio.unwrap_or(start)), end, frames, samples));
            }
            Ok::<_, anyhow::Error>(timings)
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await??);
    }
    let wall = t0.elapsed().max(Duration::from_micros(1)).as_secs_f64();
    let engine_steps = batcher.stats().await.map(|s| s.steps).unwrap_or(0) - steps_before;
    let frames: usize = all.iter().map(|t| t.3).sum();
    let samples: usize = all.iter().map(|t| t.4).sum();
    let audio_s = samples as f64 / sample_rate as f64;
    let mut first_audio: Vec<f64> = all.iter().map(|t| t.1).collect();
    let mut prefill: Vec<f64> = all.iter().map(|t| t.0).collect();
    let mut latency: Vec<f64> = all.iter().map(|t| t.2).collect();
    let intervals: Vec<f64> = all.iter().filter(|t| t.3 > 1).map(|t| (t.2 - t.0) / (t.3 - 1) as f64).collect();
    let frame_interval = intervals.iter().sum::<f64>() / intervals.len().max(1) as f64;
    let after_prefill = all.iter().map(|t| t.1 - t.0).sum::<f64>() / all.len().max(1) as f64;
    first_audio.sort_by(f64::total_cmp);
    prefill.sort_by(f64::total_cmp);
    latency.sort_by(f64::total_cmp);
    // Talker steps include each utterance's prefill step and its final (eos) step.
    let talker_rows = frames + all.len();
    Ok(SpeechLevelResult {
        concurrency,
        utterances,
        frames,
        audio_s,
        wall_s: wall,
        x_realtime: audio_s / wall,
        frames_per_s: frames as f64 / wall,
        mean_batch: talker_rows as f64 / engine_steps.max(1) as f64,
        first_audio_p50_ms: percentile(&first_audio, 0.5),
        first_audio_max_ms: first_audio.last().copied().unwrap_or(0.0),
        prefill_p50_ms: percentile(&prefill, 0.5),
        frame_interval_ms: frame_interval,
        first_audio_after_prefill_frames: if frame_interval > 0.0 { after_prefill / frame_interval } else { 0.0 },
        latency_p50_ms: percentile(&latency, 0.5),
        rss_mib: rss_mib().0,
    })
}
