//! Qwen3-TTS 12 Hz speech-tokenizer decoder against qwen-tts (fixtures of
//! tools/oracle/make_tts_fixtures.py in tests/fixtures/tts-tiny): every case's codec frames to
//! the 24 kHz waveform (`wav`, the full decode), and the chunk-by-chunk decode with the exact
//! left context (`wav_chunked`, and the full decode).

mod common;

use std::path::PathBuf;

use burn::backend::flex::FlexDevice;
use burn::backend::Flex;
use common::{max_abs, Reference};
use kiln_models::tts_decoder::{TtsChunkedDecoder, TtsDecoder, TtsDecoderConfig};
use kiln_models::DType;
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

fn load() -> TtsDecoder<Flex> {
    TtsDecoder::<Flex>::from_dir(&fixtures().join("speech_tokenizer"), &FlexDevice, DType::F32).unwrap()
}

/// The same decoder on the tensor path (the generic Burn ops of the other backends).
fn load_tensor_path() -> TtsDecoder<Flex> {
    let dir = fixtures().join("speech_tokenizer");
    TtsDecoder::<Flex>::from_dir_with_host_path(&dir, &FlexDevice, DType::F32, false).unwrap()
}

#[test]
fn config_and_left_context() {
    let exp = expected();
    let cfg = TtsDecoderConfig::from_dir(&fixtures().join("speech_tokenizer")).unwrap();
    assert_eq!(cfg.samples_per_frame(), exp["samples_per_frame"].as_u64().unwrap() as usize);
    assert_eq!(cfg.output_sample_rate, exp["sample_rate"].as_u64().unwrap() as usize);
    assert_eq!(cfg.left_context(), exp["streaming"]["left_context_frames"].as_u64().unwrap() as usize);
    assert_eq!(cfg.num_quantizers, 16);

    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("speech_tokenizer/config.json")).unwrap())
            .unwrap();
    v["decoder_config"]["hidden_act"] = "gelu".into();
    let err = TtsDecoderConfig::from_value(&v).unwrap_err();
    assert!(err.contains("hidden_act"), "{err}");
    v["decoder_config"]["hidden_act"] = "silu".into();
    v["decode_upsample_rate"] = 960.into();
    let err = TtsDecoderConfig::from_value(&v).unwrap_err();
    assert!(err.contains("decode_upsample_rate"), "{err}");
}

/// The waveform of every case on the host path (Flex f32's) and on the tensor path.
#[test]
fn waveform_matches_reference_full_and_streamed() {
    check_waveforms(&load());
    check_waveforms(&load_tensor_path());
}

fn check_waveforms(model: &TtsDecoder<Flex>) {
    let path = if model.host_path() { "host" } else { "tensor" };
    let exp = expected();
    let tol = exp["tolerances"]["waveform_max_abs"].as_f64().unwrap() as f32;
    let chunk_tol = exp["tolerances"]["chunked_vs_full_max_abs"].as_f64().unwrap() as f32;
    let chunk = exp["streaming"]["chunk_frames"].as_u64().unwrap() as usize;
    let reference = reference();
    let spf = model.samples_per_frame();
    for case in exp["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let codes = reference.codes(&format!("{name}.codes"));
        assert_eq!(codes.len(), case["frames"].as_u64().unwrap() as usize, "{name}");
        let want = reference.f32s(&format!("{name}.wav"));
        let wav = model.decode(&codes).unwrap();
        assert_eq!(wav.len(), codes.len() * spf, "{name}");
        let err = max_abs(&wav, &want);
        eprintln!("{path} path, {name}: {} frames, full decode max |Δ| {err:.3e}", codes.len());
        assert!(err <= tol, "{name}: waveform max |Δ| {err} > {tol}");
        // The one-pass tensor forward.
        let one_pass = model.forward(&codes).unwrap().into_data().into_vec::<f32>().unwrap();
        let err_one_pass = max_abs(&one_pass, &want);
        assert!(err_one_pass <= tol, "{name}: one-pass forward max |Δ| {err_one_pass} > {tol}");

        // Upstream's chunked_decode: chunks re-decoded with the exact left context.
        let want_chunked = reference.f32s(&format!("{name}.wav_chunked"));
        let mut chunked = TtsChunkedDecoder::new(model);
        let mut out_chunked = Vec::with_capacity(wav.len());
        for frames in codes.chunks(chunk) {
            let out = chunked.push(frames).unwrap();
            assert_eq!(out.len(), frames.len() * spf, "{name}");
            out_chunked.extend(out);
        }
        let err_chunked = max_abs(&out_chunked, &want_chunked);
        let err_self = max_abs(&out_chunked, &wav);
        eprintln!(
            "{path} path, {name}: chunked ({chunk}/chunk) vs wav_chunked {err_chunked:.3e}, vs own full {err_self:.3e}"
        );
        assert!(err_chunked <= tol, "{name}: chunked vs wav_chunked {err_chunked} > {tol}");
        assert!(err_self <= chunk_tol, "{name}: chunked vs full {err_self} > {chunk_tol}");

        // Stateful streaming, in uneven chunks (1, 2, 3, 1, 2, 3, ...).
        let mut state = model.new_state();
        let mut streamed = Vec::with_capacity(wav.len());
        let mut rest = &codes[..];
        let mut n = 0;
        while !rest.is_empty() {
            let (now, later) = rest.split_at((n % 3 + 1).min(rest.len()));
            let out = model.push(&mut state, now).unwrap();
            assert_eq!(out.len(), now.len() * spf, "{name}");
            streamed.extend(out);
            rest = later;
            n += 1;
        }
        assert_eq!(state.frames(), codes.len());
        let err_stream = max_abs(&streamed, &want);
        let err_stream_self = max_abs(&streamed, &wav);
        eprintln!("{path} path, {name}: stateful stream vs wav {err_stream:.3e}, vs own full {err_stream_self:.3e}");
        assert!(err_stream <= tol, "{name}: stream vs wav {err_stream} > {tol}");
        assert!(err_stream_self <= chunk_tol, "{name}: stream vs full {err_stream_self} > {chunk_tol}");
    }
}

#[test]
fn bad_codes_are_rejected() {
    let model = load();
    assert!(model.decode::<Vec<u32>>(&[]).unwrap().is_empty());
    let err = model.decode(&[vec![0u32; 15]]).unwrap_err();
    assert!(err.contains("15 codes"), "{err}");
    let mut frame = [0u32; 16];
    frame[3] = model.cfg.codebook_size as u32;
    let err = model.decode(&[frame]).unwrap_err();
    assert!(err.contains("out of the codebook"), "{err}");
    // One frame decodes (T = 1 through every stage).
    assert_eq!(model.decode(&[[1u32; 16]]).unwrap().len(), model.samples_per_frame());
}

/// Half precision runs through the same code (dtype plumbing of the zero padding, streaming
/// states, SnakeBeta constants). A loose bound: f16 activations through a random decoder
/// measure ~7e-3 from the f32 reference.
#[test]
fn f16_decode_and_stream_run_close_to_reference() {
    const F16_TOL: f32 = 3e-2;
    let reference = reference();
    let codes = reference.codes("en_aiden.codes");
    let want = reference.f32s("en_aiden.wav");
    let m = TtsDecoder::<Flex>::from_dir(&fixtures().join("speech_tokenizer"), &FlexDevice, DType::F16).unwrap();
    let wav = m.decode(&codes).unwrap();
    let mut state = m.new_state();
    let mut streamed = Vec::new();
    for c in codes.chunks(2) {
        streamed.extend(m.push(&mut state, c).unwrap());
    }
    let (err, err_stream) = (max_abs(&wav, &want), max_abs(&streamed, &want));
    eprintln!("f16: full vs reference {err:.3e}, stream vs reference {err_stream:.3e}");
    assert!(err <= F16_TOL && err_stream <= F16_TOL, "f16 {err} / {err_stream} > {F16_TOL}");
}

/// Several streams decoded together equal each decoded alone: `push_batch` with uneven and
/// empty pushes per step against one `push` per stream, on the host path (Flex f32) and the
/// tensor path (one push per stream inside).
#[test]
fn push_batch_equals_individual_pushes() {
    let exp = expected();
    let tol = exp["tolerances"]["waveform_max_abs"].as_f64().unwrap() as f32;
    let chunk_tol = exp["tolerances"]["chunked_vs_full_max_abs"].as_f64().unwrap() as f32;
    let reference = reference();
    let names: Vec<&str> = exp["cases"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    let codes: Vec<Vec<Vec<u32>>> = names.iter().map(|n| reference.codes(&format!("{n}.codes"))).collect();
    let host = load();
    assert!(host.host_path(), "Flex f32 decodes on the host path");
    let tensor = load_tensor_path();
    assert!(!tensor.host_path());
    for model in [&host, &tensor] {
        // Alone: pushes of 1, 2, 3, 1, ... frames.
        let alone: Vec<Vec<f32>> = codes
            .iter()
            .map(|c| {
                let mut state = model.new_state();
                let mut out = Vec::new();
                let (mut rest, mut k) = (&c[..], 0);
                while !rest.is_empty() {
                    let (now, later) = rest.split_at((k % 3 + 1).min(rest.len()));
                    out.extend(model.push(&mut state, now).unwrap());
                    (rest, k) = (later, k + 1);
                }
                out
            })
            .collect();
        // Together: stream `i` pushes `(step + i) % 4` frames at each step (0 .. 3, so some
        // streams push nothing at some steps and the counts differ).
        let mut states: Vec<_> = codes.iter().map(|_| model.new_state()).collect();
        let mut done = vec![0usize; codes.len()];
        let mut together = vec![Vec::new(); codes.len()];
        let mut step = 0;
        while done.iter().zip(&codes).any(|(&d, c)| d < c.len()) {
            let frames: Vec<&[Vec<u32>]> = codes
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let take = ((step + i) % 4).min(c.len() - done[i]);
                    &c[done[i]..done[i] + take]
                })
                .collect();
            let mut refs: Vec<_> = states.iter_mut().collect();
            let outs = model.push_batch(&mut refs, &frames).unwrap();
            for (i, (o, f)) in outs.into_iter().zip(&frames).enumerate() {
                assert_eq!(o.len(), f.len() * model.samples_per_frame(), "{}", names[i]);
                together[i].extend(o);
                done[i] += f.len();
            }
            step += 1;
        }
        for (i, name) in names.iter().enumerate() {
            assert_eq!(states[i].frames(), codes[i].len());
            let err = max_abs(&together[i], &alone[i]);
            let err_ref = max_abs(&together[i], &reference.f32s(&format!("{name}.wav")));
            eprintln!("host path {}, {name}: push_batch vs alone {err:.3e}, vs wav {err_ref:.3e}", model.host_path());
            assert!(err <= chunk_tol, "{name}: push_batch vs alone {err} > {chunk_tol}");
            assert!(err_ref <= tol, "{name}: push_batch vs wav {err_ref} > {tol}");
        }
    }

    // Bad codes in one stream leave every state untouched; a state of the other path is refused.
    let mut a = host.new_state();
    let mut b = host.new_state();
    let bad = [vec![host.cfg.codebook_size as u32; 16]];
    let err = host.push_batch(&mut [&mut a, &mut b], &[&codes[0][..2], &bad[..]]).unwrap_err();
    assert!(err.contains("out of the codebook"), "{err}");
    assert_eq!((a.frames(), b.frames()), (0, 0));
    let err = tensor.push(&mut a, &codes[0][..1]).unwrap_err();
    assert!(err.contains("made by a decoder on the host path"), "{err}");
    let mut t = tensor.new_state();
    let err = host.push(&mut t, &codes[0][..1]).unwrap_err();
    assert!(err.contains("made by a decoder on the tensor path"), "{err}");
}
