//! Streaming speech-tokenizer decode on the CPU (Flex, f32): time per `push` of 1 and 4
//! frames with the stage breakdown of each, the full decode of 24 frames, and 4 utterances
//! pushed one after another against one `push_batch`. Each measurement runs the tensor path
//! (a decoder loaded with `from_dir_with_host_path(.., false)`: the generic Burn ops) and the
//! host path interleaved, so that both see the same machine load; times are the best of `reps`.
//!
//!     cargo run --release -p kiln-models --example tts_decoder_bench -- [speech_tokenizer dir] [reps] [host|tensor|both]
//!
//! The folder defaults to /tmp/kiln-models/qwen3-tts-0.6b-random/speech_tokenizer (a real-size
//! random decoder made by tools/bench/make_random_qwen3_tts.py); the bench exits quietly when
//! it is absent. Codes are pseudo-random.

use std::path::Path;
use std::time::{Duration, Instant};

use burn::backend::flex::FlexDevice;
use burn::backend::Flex;
use kiln_models::tts_decoder::{profile, TtsDecoder, TtsDecoderState};
use kiln_models::DType;

/// `n` frames of pseudo-random codes.
fn codes(n: usize, nq: usize, cs: usize, seed: &mut u64) -> Vec<Vec<u32>> {
    (0..n)
        .map(|_| {
            (0..nq)
                .map(|_| {
                    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((*seed >> 33) % cs as u64) as u32
                })
                .collect()
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Milliseconds `f` takes.
fn time(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    ms(t.elapsed())
}

fn print_stages(title: &str, stages: &[(String, Duration)]) {
    let total: f64 = stages.iter().map(|(_, d)| ms(*d)).sum();
    println!("  {title}:");
    for (name, d) in stages {
        println!("    {name:<22} {:>8.2} ms {:>5.1}%", ms(*d), 100.0 * ms(*d) / total);
    }
    println!("    {:<22} {total:>8.2} ms", "sum");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = match args.get(1).map(String::as_str) {
        Some(d) if !d.is_empty() => d,
        _ => "/tmp/kiln-models/qwen3-tts-0.6b-random/speech_tokenizer",
    };
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5).max(1);
    let paths: Vec<bool> = match args.get(3).map(String::as_str) {
        Some("host") => vec![true],
        Some("tensor") => vec![false],
        _ => vec![false, true],
    };
    let dir = Path::new(dir);
    if !dir.join("config.json").exists() {
        eprintln!("{} not found: nothing to bench", dir.display());
        return;
    }
    let t0 = Instant::now();
    let models: Vec<TtsDecoder<Flex>> = paths
        .iter()
        .map(|&h| TtsDecoder::<Flex>::from_dir_with_host_path(dir, &FlexDevice, DType::F32, h).expect("load"))
        .collect();
    println!("loaded {} in {:.1} s", dir.display(), t0.elapsed().as_secs_f64());
    let name = |host: bool| if host { "host path" } else { "tensor path" };
    let (nq, cs) = (models[0].cfg.num_quantizers, models[0].cfg.codebook_size);
    let mut seed = 42u64;
    let warm = 8; // frames decoded before the timed pushes

    // Single-utterance pushes: best wall time and the stage breakdown of one more push.
    for n in [1usize, 4] {
        let mut states: Vec<TtsDecoderState<Flex>> = models
            .iter()
            .map(|model| {
                let mut s = model.new_state();
                model.push(&mut s, &codes(warm, nq, cs, &mut seed)).unwrap();
                s
            })
            .collect();
        let mut times = vec![Vec::new(); paths.len()];
        for _ in 0..reps {
            let f = codes(n, nq, cs, &mut seed);
            for (i, model) in models.iter().enumerate() {
                times[i].push(time(|| drop(model.push(&mut states[i], &f).unwrap())));
            }
        }
        println!("\npush {n} frame(s):");
        for (i, &h) in paths.iter().enumerate() {
            let b = best(&times[i]);
            println!("  {:<12} {b:>8.1} ms ({:.1} ms per frame)", name(h), b / n as f64);
        }
        let f = codes(n, nq, cs, &mut seed);
        for (i, (model, &h)) in models.iter().zip(&paths).enumerate() {
            let (_, stages) = profile(|| model.push(&mut states[i], &f).unwrap());
            print_stages(&format!("{} stages", name(h)), &stages);
        }
    }

    // Full decode of 24 frames (pushes of 24 frames onto a fresh state).
    let clip = codes(24, nq, cs, &mut seed);
    let mut times = vec![Vec::new(); paths.len()];
    for _ in 0..reps.clamp(1, 3) {
        for (i, model) in models.iter().enumerate() {
            times[i].push(time(|| drop(model.decode(&clip).unwrap())));
        }
    }
    println!("\ndecode 24 frames:");
    for (i, &h) in paths.iter().enumerate() {
        let b = best(&times[i]);
        println!("  {:<12} {b:>8.1} ms ({:.1} ms per frame)", name(h), b / 24.0);
    }

    // The same clip in pushes of 1 .. 24 frames (the host path's cost per frame by push size).
    if let Some(model) = models.iter().find(|m| m.host_path()) {
        let sizes = [1usize, 2, 4, 8, 12, 24];
        let mut times = vec![Vec::new(); sizes.len()];
        for _ in 0..reps.clamp(1, 2) {
            for (i, &c) in sizes.iter().enumerate() {
                times[i].push(time(|| drop(model.decode_chunked(&clip, c).unwrap())));
            }
        }
        print!("\nhost path, 24 frames in pushes of");
        for (i, &c) in sizes.iter().enumerate() {
            print!(" {c}: {:.1}", best(&times[i]) / 24.0);
        }
        println!(" ms per frame");
    }

    // 4 utterances at different positions: 4 pushes against one push_batch.
    let utts = 4;
    for n in [1usize, 4] {
        println!("\n{utts} utterances x {n} frame(s) each:");
        for (model, &h) in models.iter().zip(&paths) {
            let mut states: Vec<TtsDecoderState<Flex>> = (0..utts).map(|_| model.new_state()).collect();
            for (i, s) in states.iter_mut().enumerate() {
                model.push(s, &codes(warm + i, nq, cs, &mut seed)).unwrap();
            }
            let (mut seq, mut bat) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                let f: Vec<Vec<Vec<u32>>> = (0..utts).map(|_| codes(n, nq, cs, &mut seed)).collect();
                seq.push(time(|| {
                    for (s, f) in states.iter_mut().zip(&f) {
                        model.push(s, f).unwrap();
                    }
                }));
                let f: Vec<Vec<Vec<u32>>> = (0..utts).map(|_| codes(n, nq, cs, &mut seed)).collect();
                let frames: Vec<&[Vec<u32>]> = f.iter().map(Vec::as_slice).collect();
                let mut refs: Vec<&mut TtsDecoderState<Flex>> = states.iter_mut().collect();
                bat.push(time(|| drop(model.push_batch(&mut refs, &frames).unwrap())));
            }
            let (seq, bat) = (best(&seq), best(&bat));
            let f = (utts * n) as f64;
            println!(
                "  {:<12} sequential pushes {seq:>8.1} ms ({:.1} ms per frame), push_batch {bat:>8.1} ms ({:.1} ms per frame)",
                name(h),
                seq / f,
                bat / f
            );
        }
    }
}
