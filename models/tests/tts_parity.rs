//! Qwen3-TTS talker + code predictor against qwen-tts (fixtures of
//! tools/oracle/make_tts_fixtures.py in tests/fixtures/tts-tiny): the talker's input rows, its
//! first logits, the code predictor's logits, every case's codec frames exactly (greedy, with
//! the repetition penalty, min_new_tokens, suppression and the max_new_tokens cap) and the
//! waveform; then the same utterances batched together at staggered starts.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use burn::backend::flex::FlexDevice;
use burn::backend::Flex;
use burn::tensor::Tensor;
use common::{max_abs, Reference};
use kiln_actors::engine::{Engine, FinishReason, ScheduledSeq, StepPlan};
use kiln_actors::{SpeechOutput, SpeechRequest, SpeechSampling};
use kiln_models::qwen2::{ForwardSeq, KvCache, KvWriteMode};
use kiln_models::tts::{mask_code0_logits, speech_samplers, TalkerSpec, TtsEngine, TtsEngineOptions, TtsModel};
use kiln_models::weights::WeightStore;
use kiln_models::{DType, DeviceSpec};
use serde_json::Value;

fn fixtures() -> PathBuf {
    common::fixtures("tts-tiny")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

fn reference() -> Reference {
    Reference::load(&fixtures().join("expected.safetensors"))
}

fn host(x: Tensor<Flex, 2>) -> Vec<f32> {
    x.into_data().into_vec::<f32>().unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The request of a fixture case, greedy as recorded, at most `max_new_tokens - 1` frames.
fn request(case: &Value, gen: &Value, chunk_frames: usize) -> SpeechRequest {
    let codec: Vec<Option<u32>> =
        case["prompt"]["codec_track"].as_array().unwrap().iter().map(|x| x.as_u64().map(|c| c as u32)).collect();
    let mut sampling = SpeechSampling::greedy();
    sampling.repetition_penalty = gen["repetition_penalty"].as_f64().unwrap() as f32;
    SpeechRequest {
        text_track: u32s(&case["prompt"]["text_track"]),
        codec_track: codec,
        trailing_text: u32s(&case["trailing_text"]),
        max_frames: gen["max_new_tokens"].as_u64().unwrap() as usize - 1,
        sampling,
        first_chunk_frames: chunk_frames,
        chunk_frames,
    }
}

fn load_model() -> TtsModel<Flex> {
    let dir = fixtures();
    let spec = TalkerSpec::from_dir(&dir).unwrap();
    let store = WeightStore::open(&dir).unwrap();
    TtsModel::load(&spec, &store, &FlexDevice, DType::F32, KvWriteMode::SliceRuns).unwrap()
}

#[test]
fn talker_inputs_and_logits_match() {
    let exp = expected();
    let r = reference();
    let model = load_model();
    let tol = 1e-4;
    for case in exp["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let req = request(case, &exp["generation"], 1);
        let rows = model.prompt_rows(&req.text_track, &req.codec_track);
        let d = max_abs(&host(rows.clone()), &r.f32s(&format!("{name}.prefill_embeds")));
        assert!(d < tol, "{name}: prefill rows differ by {d}");

        // Prefill, first logits.
        let n = req.text_track.len();
        let spec = &model.spec;
        let mut cache = KvCache::<Flex>::new(&spec.talker, 64, 4, &FlexDevice, DType::F32);
        let zeros = vec![0u32; n];
        let table = [0u32, 1, 2, 3];
        let seq = ForwardSeq { tokens: &zeros, start: 0, block_table: &table, logits: true };
        let h = model.talker.forward_embeds(&[seq], rows, &mut cache).unwrap().unwrap();
        let d = max_abs(&host(h.clone()), &r.f32s(&format!("{name}.talker_hidden"))[..spec.talker.hidden_size]);
        assert!(d < tol, "{name}: talker hidden differs by {d}");
        let logits = model.codec_logits(h.clone()).unwrap().remove(0);
        let d = max_abs(&logits, &r.f32s(&format!("{name}.talker_logits_step0")));
        assert!(d < tol, "{name}: step-0 logits differ by {d}");

        // Code predictor logits of frame 0, fed the recorded codes.
        let codes = r.codes(&format!("{name}.codes"));
        let want = r.f32s(&format!("{name}.cp_logits_frame0"));
        let cb = spec.codebook_size;
        let mut cp_cache = KvCache::<Flex>::new(&spec.code_predictor, spec.num_code_groups, 1, &FlexDevice, DType::F32);
        let mut got: Vec<f32> = Vec::new();
        let frame0 = codes[0].clone();
        let picked = model
            .predict_codes(h, &frame0[..1], &mut cp_cache, |_, k, l| {
                got.extend_from_slice(l);
                assert_eq!(l.len(), cb);
                frame0[k + 1]
            })
            .unwrap();
        assert_eq!(picked[0], frame0);
        let d = max_abs(&got, &want);
        assert!(d < tol, "{name}: code predictor logits differ by {d}");
    }
}

#[test]
fn step_rows_match_fed_frames() {
    let exp = expected();
    let r = reference();
    let model = load_model();
    let pad = model.spec.tts_pad;
    for case in exp["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let codes = r.codes(&format!("{name}.codes"));
        let trailing = u32s(&case["trailing_text"]);
        let frames: Vec<&[u32]> = codes.iter().map(Vec::as_slice).collect();
        let text: Vec<u32> = (0..codes.len()).map(|g| trailing.get(g).copied().unwrap_or(pad)).collect();
        let rows = host(model.frame_rows(&frames, &text));
        let want = r.f32s(&format!("{name}.step_embeds"));
        let d = max_abs(&rows, &want[..rows.len()]);
        assert!(d < 1e-4, "{name}: step rows differ by {d}");
    }
}

#[test]
fn code0_processing_blocks_eos_early_and_control_ids() {
    let mut l = vec![1.0f32; 1088];
    mask_code0_logits(&mut l, 0, 166);
    assert_eq!(l[166], f32::NEG_INFINITY, "eos blocked at step 0");
    assert!(l[64..].iter().all(|x| *x == f32::NEG_INFINITY));
    assert!(l[..64].iter().all(|x| *x == 1.0));
    let mut l = vec![1.0f32; 1088];
    mask_code0_logits(&mut l, 2, 166);
    assert_eq!(l[166], 1.0, "eos allowed from step 2");
    assert_eq!(l[165], f32::NEG_INFINITY);
    // The samplers are deterministic per seed.
    let mut s = SpeechSampling::greedy();
    s.do_sample = true;
    s.temperature = 0.9;
    s.top_k = 50;
    s.seed = 7;
    let draw = |s: &SpeechSampling| {
        let (mut a, _) = speech_samplers(s);
        (0..20)
            .map(|i| a.sample(&mut (0..64).map(|j| ((i * 7 + j) % 13) as f32 * 0.3).collect::<Vec<_>>()).token)
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(&s), draw(&s));
}

fn engine(max_running: usize) -> TtsEngine {
    let opts = TtsEngineOptions {
        device: DeviceSpec::Cpu,
        dtype: DType::F32,
        block_size: 16,
        kv_cache_tokens: 16 * 64,
        max_batch_tokens: 512,
        max_running,
        max_model_len: 256,
    };
    TtsEngine::load(&fixtures(), &opts).unwrap()
}

#[derive(Default, Debug, Clone)]
struct Utterance {
    frames: Vec<Vec<u32>>,
    audio: Vec<f32>,
    finished: Option<FinishReason>,
    /// Engine steps in which audio arrived.
    audio_steps: usize,
}

/// Runs utterances through the engine like the batcher would: utterance `i` joins at step
/// `starts[i]` with its whole prompt, then feeds one row per step. Blocks: 4 per utterance.
fn run(engine: &mut TtsEngine, reqs: Vec<SpeechRequest>, starts: &[usize]) -> Vec<Utterance> {
    let n = reqs.len();
    let mut out = vec![Utterance::default(); n];
    let mut pos: Vec<Option<usize>> = vec![None; n];
    let mut prompt = vec![0; n];
    let mut reqs: Vec<Option<SpeechRequest>> = reqs.into_iter().map(Some).collect();
    let mut done = 0;
    let mut step = 0;
    let ids: HashMap<u64, usize> = (0..n).map(|i| (i as u64 + 1, i)).collect();
    while done < n {
        let mut plan = StepPlan::default();
        for i in 0..n {
            if out[i].finished.is_some() {
                continue;
            }
            let id = i as u64 + 1;
            let table: Vec<u32> = (0..4).map(|b| (i * 4 + b) as u32).collect();
            match pos[i] {
                None if step >= starts[i] => {
                    let req = reqs[i].take().unwrap();
                    prompt[i] = req.text_track.len();
                    plan.seqs.push(ScheduledSeq { id, start: 0, len: prompt[i], block_table: table, sample: true });
                    plan.new.push((id, req));
                }
                None => {}
                Some(p) => plan.seqs.push(ScheduledSeq { id, start: p, len: 1, block_table: table, sample: true }),
            }
        }
        for o in engine.step(plan).unwrap() {
            let i = ids[&o.id];
            let u = &mut out[i];
            let SpeechOutput { frames, audio, frames_total } = o.output;
            u.frames.extend(frames);
            assert_eq!(frames_total, u.frames.len());
            if !audio.is_empty() {
                u.audio_steps += 1;
            }
            u.audio.extend(audio);
            pos[i] = Some(pos[i].map_or(prompt[i], |p| p + 1));
            if let Some(f) = o.finished {
                u.finished = Some(f);
                done += 1;
                let mut release = StepPlan::default();
                release.released.push(o.id);
                assert!(engine.step(release).unwrap().is_empty());
            }
        }
        step += 1;
        assert!(step < 1000, "runaway");
    }
    out
}

#[test]
fn every_case_gives_the_recorded_codes_and_waveform() {
    let exp = expected();
    let r = reference();
    let tol = exp["tolerances"]["waveform_max_abs"].as_f64().unwrap_or(1e-4) as f32;
    let mut engine = engine(4);
    for case in exp["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let req = request(case, &exp["generation"], 1);
        let u = run(&mut engine, vec![req], &[0]).remove(0);
        assert_eq!(u.frames, r.codes(&format!("{name}.codes")), "{name}: codes");
        let want_stop = case["stop"].as_str().unwrap();
        let want = if want_stop == "eos" { FinishReason::Stop } else { FinishReason::Length };
        assert_eq!(u.finished, Some(want), "{name}");
        let d = max_abs(&u.audio, &r.f32s(&format!("{name}.wav")));
        assert!(d < tol, "{name}: waveform differs by {d}");
        // Streamed: audio arrived in every frame's step.
        assert_eq!(u.audio_steps, u.frames.len(), "{name}: one audio chunk per frame");
    }
}

#[test]
fn batched_staggered_utterances_equal_each_alone() {
    let exp = expected();
    let cases = exp["cases"].as_array().unwrap();
    let mut engine = engine(4);
    let alone: Vec<Utterance> =
        cases.iter().map(|c| run(&mut engine, vec![request(c, &exp["generation"], 1)], &[0]).remove(0)).collect();
    // Different chunk sizes too: the audio is the same, it only leaves in bigger pieces.
    let reqs: Vec<SpeechRequest> =
        cases.iter().enumerate().map(|(i, c)| request(c, &exp["generation"], 1 + i % 3)).collect();
    let together = run(&mut engine, reqs, &[0, 2, 3, 5]);
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.frames, b.frames, "case {i}: codes");
        assert_eq!(a.finished, b.finished);
        let d = max_abs(&a.audio, &b.audio);
        assert!(d < 1e-5, "case {i}: audio differs by {d}");
        let chunk = 1 + i % 3;
        assert_eq!(b.audio_steps, a.frames.len().div_ceil(chunk), "case {i}: audio every {chunk} frames");
    }
    // A first chunk smaller than the later ones: audio after frame 1, then every 3 frames.
    let case = &cases[0];
    let mut req = request(case, &exp["generation"], 3);
    req.first_chunk_frames = 1;
    let u = run(&mut engine, vec![req], &[0]);
    assert_eq!(u[0].frames, alone[0].frames);
    assert_eq!(u[0].audio_steps, 1 + (alone[0].frames.len() - 1).div_ceil(3));
    assert!(max_abs(&u[0].audio, &alone[0].audio) < 1e-5);
}

#[test]
fn warmup_runs_the_largest_step_and_leaves_nothing_behind() {
    let exp = expected();
    let r = reference();
    let mut engine = engine(4);
    engine.warmup().unwrap();
    let mem = engine.memory();
    assert!(mem.weights > 0 && mem.kv > 0);
    if std::fs::write("/proc/self/clear_refs", "5").is_ok() {
        assert!(mem.activations > 0, "the warm-up measured its workspace");
    }
    // The warm-up wrote scratch K/V; a real utterance afterwards is unaffected.
    let case = &exp["cases"][0];
    let u = run(&mut engine, vec![request(case, &exp["generation"], 2)], &[0]).remove(0);
    assert_eq!(u.frames, r.codes(&format!("{}.codes", case["name"].as_str().unwrap())));
}
