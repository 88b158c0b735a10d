//! Stable Diffusion building blocks against diffusers / transformers (fixtures of
//! tools/oracle/make_sd_fixtures.py in tests/fixtures/sd-tiny): CLIP tokenizer ids exactly,
//! CLIP text encoder hidden states, and every scheduler's timesteps and latents after each
//! step, on host vectors and on Burn tensors.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use common::{max_abs, Reference};
use kiln_models::clip::{ClipOutput, ClipTextModel, ClipTokenizer};
use kiln_models::schedulers::{Latents, Scheduler, SchedulerConfig, SchedulerKind};
use kiln_models::DType;
use serde_json::Value;

/// Text encoder hidden states: max abs difference allowed.
const HIDDEN_TOL: f32 = 1e-4;
/// Latents after each scheduler step: max abs difference allowed.
const LATENT_TOL: f32 = 1e-5;

fn fixtures() -> PathBuf {
    common::fixtures("sd-tiny")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// A named float32 tensor of expected.safetensors, flattened.
fn reference_tensor(name: &str) -> (Vec<f32>, Vec<usize>) {
    Reference::load(&fixtures().join("expected.safetensors")).get(name).unwrap_or_else(|| panic!("{name} missing"))
}

#[test]
fn clip_tokenizer_ids_match_transformers() {
    let exp = expected();
    let prompts: Vec<&str> = exp["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    for pipe in ["sd15", "sd21"] {
        let want = &exp["pipelines"][pipe];
        let tok = ClipTokenizer::from_dir(&fixtures().join(pipe).join("tokenizer")).unwrap();
        assert_eq!(tok.max_length(), 77);
        assert_eq!(tok.pad_id() as u64, want["pad_token_id"].as_u64().unwrap(), "{pipe} pad");
        assert_eq!(tok.bos_id() as u64, want["bos_token_id"].as_u64().unwrap(), "{pipe} bos");
        assert_eq!(tok.eos_id() as u64, want["eos_token_id"].as_u64().unwrap(), "{pipe} eos");
        let ids = want["ids"].as_array().unwrap();
        let lens = want["untruncated_lengths"].as_array().unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let (got, full) = tok.encode(p).unwrap();
            assert_eq!(got, u32s(&ids[i]), "{pipe}: ids of {p:?}");
            assert_eq!(full as u64, lens[i].as_u64().unwrap(), "{pipe}: untruncated length of {p:?}");
        }
    }
}

#[test]
fn clip_text_encoder_matches_transformers() {
    let exp = expected();
    let dev = Default::default();
    let mut worst = 0.0f32;
    for (pipe, outputs) in [
        ("sd15", vec![("last_hidden_state", ClipOutput::LAST)]),
        (
            "sd21",
            vec![
                ("last_hidden_state", ClipOutput::LAST),
                ("penultimate", ClipOutput::PENULTIMATE_RAW),
                ("penultimate_normed", ClipOutput::clip_skip(1)),
            ],
        ),
    ] {
        let model = ClipTextModel::<Flex>::from_dir(&fixtures().join(pipe).join("text_encoder"), &dev, DType::F32)
            .unwrap_or_else(|e| panic!("{pipe}: {e}"));
        let ids: Vec<Vec<u32>> = exp["pipelines"][pipe]["ids"].as_array().unwrap().iter().map(u32s).collect();
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        for (name, output) in outputs {
            let (want, shape) = reference_tensor(&format!("{pipe}.{name}"));
            assert_eq!(shape, vec![ids.len(), 77, 32]);
            let got = model.encode_to_vec(&refs, output).unwrap();
            let row = 77 * 32;
            for (i, g) in got.iter().enumerate() {
                let d = max_abs(g, &want[i * row..(i + 1) * row]);
                worst = worst.max(d);
                assert!(d <= HIDDEN_TOL, "{pipe} {name} prompt {i}: max abs diff {d:e} > {HIDDEN_TOL:e}");
            }
            // One prompt alone gives the same rows as in the batch.
            let alone = model.encode_to_vec(&refs[1..2], output).unwrap();
            assert!(max_abs(&alone[0], &got[1]) <= 1e-6, "{pipe} {name}: batch variance");
        }
    }
    eprintln!("CLIP text encoder: worst max abs diff {worst:e}");
}

#[test]
fn clip_rejects_bad_input() {
    let dev = Default::default();
    let model =
        ClipTextModel::<Flex>::from_dir(&fixtures().join("sd15").join("text_encoder"), &dev, DType::F32).unwrap();
    assert!(model.encode(&[], ClipOutput::LAST).is_err());
    assert!(model.encode(&[&[1, 2], &[1]], ClipOutput::LAST).is_err());
    assert!(model.encode(&[&[99_999]], ClipOutput::LAST).is_err());
    assert!(model.encode(&[&vec![0; 78]], ClipOutput::LAST).is_err());
    assert!(model.encode(&[&[1, 2]], ClipOutput::clip_skip(2)).is_err());
}

/// The fixtures' fake UNet: `0.9 cos(t/2000) x[i] + 0.2 sin(0.37 i + t/97)` in f64, then f32.
fn fake_unet(x: &[f32], t: f32) -> Vec<f32> {
    let t = t as f64;
    let a = 0.9 * (t / 2000.0).cos();
    x.iter().enumerate().map(|(i, &v)| (a * v as f64 + 0.2 * (0.37 * i as f64 + t / 97.0).sin()) as f32).collect()
}

fn case_config(case: &Value) -> SchedulerConfig {
    let pipe = case["pipeline"].as_str().unwrap();
    let path = fixtures().join(pipe).join("scheduler/scheduler_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (k, x) in case["overrides"].as_object().unwrap() {
        v[k] = x.clone();
    }
    SchedulerConfig::from_value(&v).unwrap_or_else(|e| panic!("{}: {e}", case["name"]))
}

/// Worst (abs diff, abs diff / max(1, |value|)) over the case's steps.
fn run_case<T: Latents>(case: &Value, init: &[f32], to: impl Fn(Vec<f32>) -> T, back: impl Fn(&T) -> Vec<f32>) -> f32 {
    let name = case["name"].as_str().unwrap();
    let cfg = case_config(case);
    assert_eq!(cfg.kind.class_name(), case["class"].as_str().unwrap(), "{name}");
    let steps = case["steps"].as_u64().unwrap() as usize;
    let mut s = Scheduler::<T>::new(&cfg, steps).unwrap();
    let want_ts = f32s(&case["timesteps"]);
    // Karras' fractional Euler timesteps pass through numpy's float32 log, whose SIMD
    // rounding differs from libm's in the last bit; everything else is exact.
    let fractional = want_ts.iter().any(|t| t.fract() != 0.0);
    let ts_tol = if fractional { 1e-4 } else { 0.0 };
    assert_eq!(s.timesteps().len(), want_ts.len(), "{name}: timesteps {:?} vs {want_ts:?}", s.timesteps());
    let ts_diff = max_abs(s.timesteps(), &want_ts);
    assert!(ts_diff <= ts_tol, "{name}: timesteps {:?} vs {want_ts:?}", s.timesteps());
    if fractional {
        eprintln!("{name}: fractional timesteps, max abs diff {ts_diff:e}");
    }
    if let Some(sig) = case.get("sigmas") {
        let want = f32s(sig);
        let d = max_abs(s.sigmas(), &want);
        assert!(d <= 1e-5 * want[0].max(1.0), "{name}: sigmas {:?} vs {want:?}", s.sigmas());
    }
    let init_sigma = case["init_noise_sigma"].as_f64().unwrap();
    assert!((s.init_noise_sigma() - init_sigma).abs() <= 1e-6 * init_sigma, "{name}: init_noise_sigma");
    let scales = f32s(&case["input_scales"]);
    let noise: Vec<Vec<f32>> =
        case.get("noise").map(|n| n.as_array().unwrap().iter().map(f32s).collect()).unwrap_or_default();
    let mut latents = to(init.iter().map(|x| x * init_sigma as f32).collect());
    let mut worst = 0.0f32;
    for (i, want) in case["latents"].as_array().unwrap().iter().enumerate() {
        assert!(!s.is_done(), "{name}: done after {i} steps");
        let t = s.timestep().unwrap();
        assert!((s.input_scale() as f32 - scales[i]).abs() <= 1e-6, "{name} step {i}: input scale");
        let x_in = back(&s.scale_model_input(&latents));
        let out = to(fake_unet(&x_in, t));
        let n = noise.get(i).map(|n| to(n.clone()));
        assert_eq!(s.needs_noise(), n.is_some() && s.sigmas()[i + 1] > 0.0, "{name} step {i}: needs_noise");
        latents = s.step(&out, &latents, n.as_ref()).unwrap_or_else(|e| panic!("{name} step {i}: {e}"));
        let got = back(&latents);
        let want = f32s(want);
        let d = max_abs(&got, &want);
        assert!(d <= LATENT_TOL, "{name} step {i} (t = {t}): max abs diff {d:e} > {LATENT_TOL:e}\n{got:?}\n{want:?}");
        worst = worst.max(d);
    }
    assert!(s.is_done(), "{name}: {} steps left", s.num_steps() - s.step_index());
    worst
}

#[test]
fn schedulers_match_diffusers() {
    let exp = expected();
    let init = f32s(&exp["init_latents"]);
    let mut kinds = std::collections::HashSet::new();
    let mut report = Vec::new();
    for case in exp["schedulers"].as_array().unwrap() {
        let worst = run_case(case, &init, |v| v, |v: &Vec<f32>| v.clone());
        kinds.insert(case_config(case).kind);
        report.push(format!("{} {worst:.1e}", case["name"].as_str().unwrap()));
    }
    assert_eq!(kinds.len(), SchedulerKind::ALL.len(), "every scheduler kind has a case");
    eprintln!("scheduler latents, worst max abs diff per case: {}", report.join(", "));
}

#[test]
fn schedulers_on_burn_tensors_match_diffusers() {
    let exp = expected();
    let init = f32s(&exp["init_latents"]);
    let shape: Vec<usize> =
        exp["latent_shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let shape: [usize; 4] = shape.try_into().unwrap();
    let dev = Default::default();
    let to = |v: Vec<f32>| Tensor::<Flex, 4>::from_data(TensorData::new(v, shape), &dev);
    let back = |t: &Tensor<Flex, 4>| t.clone().into_data().into_vec::<f32>().unwrap();
    let mut worst = 0.0f32;
    for case in exp["schedulers"].as_array().unwrap() {
        worst = worst.max(run_case(case, &init, to, back));
    }
    eprintln!("scheduler latents on Burn tensors: worst max abs diff {worst:e}");
}

/// One running sequence of the interleaving test.
struct Sequence<'a> {
    scheduler: Scheduler<Vec<f32>>,
    latents: Vec<f32>,
    case: &'a Value,
    step: usize,
}

#[test]
fn sequences_with_different_schedulers_step_independently() {
    // The engine's view: several sequences, each its own kind and step count, interleaved.
    let exp = expected();
    let init = f32s(&exp["init_latents"]);
    let mut seqs: Vec<Sequence> = exp["schedulers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let scheduler = Scheduler::new(&case_config(case), case["steps"].as_u64().unwrap() as usize).unwrap();
            let latents = init.iter().map(|v| v * scheduler.init_noise_sigma() as f32).collect();
            Sequence { scheduler, latents, case, step: 0 }
        })
        .collect();
    while seqs.iter().any(|q| !q.scheduler.is_done()) {
        for q in seqs.iter_mut().filter(|q| !q.scheduler.is_done()) {
            let s = &mut q.scheduler;
            let out = fake_unet(&s.scale_model_input(&q.latents), s.timestep().unwrap());
            let noise = q.case.get("noise").map(|n| f32s(&n[q.step]));
            q.latents = s.step(&out, &q.latents, noise.as_ref()).unwrap();
            let want = f32s(&q.case["latents"][q.step]);
            assert!(max_abs(&q.latents, &want) <= LATENT_TOL, "{} step {} interleaved", q.case["name"], q.step);
            q.step += 1;
        }
    }
}

#[test]
fn request_scheduler_choice_overrides_the_folder_config() {
    let path: &Path = &fixtures().join("sd15/scheduler/scheduler_config.json");
    let cfg = SchedulerConfig::from_file(path).unwrap();
    assert_eq!(cfg.kind, SchedulerKind::Pndm);
    let euler = cfg.with_kind("euler".parse().unwrap()).unwrap();
    let s = Scheduler::<Vec<f32>>::new(&euler, 10).unwrap();
    // No timestep_spacing in SD 1.5's file: Euler's own default (linspace) applies.
    assert_eq!(s.timesteps()[0], 999.0);
    let ddim = Scheduler::<Vec<f32>>::new(&cfg.with_kind(SchedulerKind::Ddim).unwrap(), 10).unwrap();
    assert_eq!(ddim.timesteps()[0], 901.0);
}
