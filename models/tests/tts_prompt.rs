//! Qwen3-TTS prompt construction against `tests/fixtures/tts-tiny/expected.json` (what
//! `qwen-tts` 0.1.1 built for each case): text tokenization, the dual-track prefill rows and the
//! trailing text must match exactly. Also the config's speaker / language lists, request
//! validation, and the `0b6` rule that drops `instruct`.

use std::path::PathBuf;

use kiln_models::tts_prompt::{PromptError, TtsConfig, TtsPrompter};
use kiln_models::LoadError;
use serde_json::Value;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tts-tiny")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

fn prompter() -> TtsPrompter {
    TtsPrompter::from_dir(&fixture()).expect("fixture loads")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("array of ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn opt_ids(v: &Value) -> Vec<Option<u32>> {
    v.as_array().expect("array of ids").iter().map(|x| x.as_u64().map(|n| n as u32)).collect()
}

fn strings(v: &Value) -> Vec<String> {
    let obj = v.as_object().expect("object");
    obj.keys().cloned().collect()
}

/// A copy of the fixture's text-side files with `config.json` edited by `edit`, in a fresh
/// temporary folder.
fn fixture_copy(tag: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-tts-prompt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["generation_config.json", "vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(fixture().join(f), dir.join(f)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir
}

#[test]
fn every_fixture_case_matches_upstream() {
    let p = prompter();
    let exp = expected();
    let cases = exp["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 4);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        // Tokenization of the templates.
        let assistant = case["assistant_text"].as_str().unwrap();
        assert_eq!(p.encode(assistant).unwrap(), ids(&case["input_ids"]), "{name}: input_ids");
        if let Some(instruct_text) = case["instruct_text"].as_str() {
            assert_eq!(p.encode(instruct_text).unwrap(), ids(&case["instruct_ids"]), "{name}: instruct_ids");
        }
        // The prompt.
        let prompt = p
            .build(
                case["text"].as_str().unwrap(),
                case["speaker"].as_str().unwrap(),
                case["language"].as_str().unwrap(),
                case["instruct"].as_str(),
                case["non_streaming_mode"].as_bool().unwrap(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(prompt.text_track, ids(&case["prompt"]["text_track"]), "{name}: text_track");
        assert_eq!(prompt.codec_track, opt_ids(&case["prompt"]["codec_track"]), "{name}: codec_track");
        assert_eq!(prompt.trailing_text, ids(&case["trailing_text"]), "{name}: trailing_text");
        assert_eq!(prompt.text_track.len(), case["prefill_len"].as_u64().unwrap() as usize, "{name}: prefill_len");
        assert_eq!(prompt.text_tokens, case["input_ids"].as_array().unwrap().len() - 8, "{name}: text_tokens");
        assert_eq!(prompt.instruct_used, !case["instruct"].is_null(), "{name}: instruct_used");
        // The codec prefix (think/nothink, language, speaker, pad) heads the codec rows.
        let codec: Vec<u32> = prompt.codec_track.iter().flatten().copied().collect();
        let prefix = ids(&case["codec_prefix"]);
        assert_eq!(codec[..prefix.len() - 1], prefix[..prefix.len() - 1], "{name}: codec_prefix");
        assert_eq!(codec.last(), prefix.last(), "{name}: last prefill row is codec_bos");
    }
}

#[test]
fn config_and_generation_defaults_from_fixture() {
    let p = prompter();
    let cfg = p.config();
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    let tc = &raw["talker_config"];
    let tok = &expected()["text_tokenizer"]["special_ids"];
    assert_eq!(cfg.tts_model_type, "custom_voice");
    assert_eq!(cfg.tts_model_size, "1b7");
    assert!(cfg.instruct_allowed());
    assert_eq!(u64::from(cfg.tts_pad_token_id), tok["<tts_pad>"].as_u64().unwrap());
    assert_eq!(u64::from(cfg.tts_bos_token_id), tok["<tts_text_bos>"].as_u64().unwrap());
    assert_eq!(u64::from(cfg.tts_eos_token_id), tok["<tts_text_eod>"].as_u64().unwrap());
    assert_eq!(u64::from(cfg.codec_eos_token_id), tc["codec_eos_token_id"].as_u64().unwrap());
    assert_eq!(u64::from(cfg.codec_pad_id), tc["codec_pad_id"].as_u64().unwrap());
    assert_eq!(u64::from(cfg.codec_bos_id), tc["codec_bos_id"].as_u64().unwrap());
    assert_eq!(cfg.vocab_size as u64, tc["vocab_size"].as_u64().unwrap());
    assert_eq!(cfg.spk_is_dialect["eric"].as_deref(), Some("sichuan_dialect"));
    assert_eq!(cfg.spk_is_dialect["aiden"], None);

    let gen: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("generation_config.json")).unwrap()).unwrap();
    let s = cfg.sampling_defaults(7);
    assert_eq!(s.seed, 7);
    assert_eq!(s.do_sample, gen["do_sample"].as_bool().unwrap());
    assert_eq!(s.sub_do_sample, gen["subtalker_dosample"].as_bool().unwrap());
    assert_eq!(s.top_k as u64, gen["top_k"].as_u64().unwrap());
    assert_eq!(s.sub_top_k as u64, gen["subtalker_top_k"].as_u64().unwrap());
    assert_eq!(s.temperature, gen["temperature"].as_f64().unwrap() as f32);
    assert_eq!(s.sub_temperature, gen["subtalker_temperature"].as_f64().unwrap() as f32);
    assert_eq!(s.top_p, gen["top_p"].as_f64().unwrap() as f32);
    assert_eq!(s.repetition_penalty, gen["repetition_penalty"].as_f64().unwrap() as f32);
    assert_eq!(cfg.generation.max_new_tokens as u64, gen["max_new_tokens"].as_u64().unwrap());
}

#[test]
fn missing_generation_config_keys_take_upstream_defaults() {
    let dir = fixture_copy("gen", |_| {});
    std::fs::write(dir.join("generation_config.json"), r#"{"do_sample": false, "top_k": 0}"#).unwrap();
    let cfg = TtsConfig::from_dir(&dir).unwrap();
    let g = &cfg.generation;
    assert!(!g.do_sample);
    assert_eq!(g.top_k, 0);
    assert_eq!((g.temperature, g.top_p, g.repetition_penalty), (0.9, 1.0, 1.05));
    assert!(g.subtalker_dosample);
    assert_eq!((g.subtalker_temperature, g.subtalker_top_k, g.subtalker_top_p), (0.9, 50, 1.0));
    assert_eq!(g.max_new_tokens, 2048);
    std::fs::remove_file(dir.join("generation_config.json")).unwrap();
    assert_eq!(TtsConfig::from_dir(&dir).unwrap().generation, Default::default());
    std::fs::write(dir.join("generation_config.json"), r#"{"top_k": "many"}"#).unwrap();
    let err = TtsConfig::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("generation_config.json") && err.contains("top_k"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn speakers_and_languages_come_from_the_config() {
    let p = prompter();
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    let tc = &raw["talker_config"];
    let mut speakers = strings(&tc["spk_id"]);
    speakers.sort();
    assert_eq!(p.speakers(), speakers);
    assert_eq!(p.speakers(), ["aiden", "eric", "vivian"]);
    // Dialect entries are reached through dialect speakers, not requested directly.
    let mut languages: Vec<String> =
        strings(&tc["codec_language_id"]).into_iter().filter(|l| !l.contains("dialect")).collect();
    languages.push("auto".into());
    languages.sort();
    assert_eq!(p.languages(), languages);
    assert_eq!(p.languages(), ["auto", "chinese", "english"]);
}

#[test]
fn request_errors_name_the_allowed_values() {
    let p = prompter();
    let err = p.build("Hello world.", "Bob", "English", None, true).unwrap_err();
    assert_eq!(
        err,
        PromptError::UnknownSpeaker {
            given: "Bob".into(),
            allowed: vec!["aiden".into(), "eric".into(), "vivian".into()]
        }
    );
    let msg = err.to_string();
    assert!(msg.contains("Bob") && msg.contains("aiden, eric, vivian"), "{msg}");

    let err = p.build("Hello world.", "aiden", "Klingon", None, true).unwrap_err();
    assert!(matches!(&err, PromptError::UnknownLanguage { given, .. } if given == "Klingon"), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("Klingon") && msg.contains("auto, chinese, english"), "{msg}");
    // Dialect keys are not languages of their own (upstream's wrapper rejects them too).
    assert!(matches!(
        p.build("Hello world.", "eric", "sichuan_dialect", None, true),
        Err(PromptError::UnknownLanguage { .. })
    ));

    for text in ["", "   ", "\n\t "] {
        assert_eq!(p.build(text, "aiden", "English", None, true), Err(PromptError::EmptyText), "{text:?}");
    }
}

#[test]
fn speaker_and_language_are_case_insensitive() {
    let p = prompter();
    let exp = expected();
    let case = &exp["cases"][0];
    assert_eq!(case["speaker"], "Aiden");
    let want = p.build(case["text"].as_str().unwrap(), "aiden", "english", None, true).unwrap();
    for (spk, lang) in [("AIDEN", "English"), ("Aiden", "ENGLISH"), ("aIdEn", "english")] {
        assert_eq!(p.build(case["text"].as_str().unwrap(), spk, lang, None, true).unwrap(), want, "{spk} {lang}");
    }
    assert_eq!(want.text_track, ids(&case["prompt"]["text_track"]));
}

#[test]
fn dialect_speaker_keeps_its_dialect_under_auto_but_not_english() {
    let p = prompter();
    let cfg = p.config();
    let sichuan = cfg.codec_language_id["sichuan_dialect"];
    let auto = p.build("我们一起。", "eric", "auto", None, true).unwrap();
    assert!(auto.codec_track.contains(&Some(sichuan)));
    assert!(auto.codec_track.contains(&Some(cfg.codec_think_id)));
    let en = p.build("Hello world.", "eric", "english", None, true).unwrap();
    assert!(!en.codec_track.contains(&Some(sichuan)));
    assert!(en.codec_track.contains(&Some(cfg.codec_language_id["english"])));
}

#[test]
fn empty_instruct_is_no_instruct() {
    let p = prompter();
    let a = p.build("Hello world.", "vivian", "English", Some(""), true).unwrap();
    let b = p.build("Hello world.", "vivian", "English", None, true).unwrap();
    assert_eq!(a, b);
    assert!(!a.instruct_used);
}

#[test]
fn model_size_0b6_drops_instruct() {
    let exp = expected();
    let case = exp["cases"].as_array().unwrap().iter().find(|c| !c["instruct"].is_null()).expect("an instruct case");
    let dir = fixture_copy("0b6", |cfg| cfg["tts_model_size"] = "0b6".into());
    let p = TtsPrompter::from_dir(&dir).unwrap();
    assert!(!p.config().instruct_allowed());
    let args = |c: &Value| {
        (
            c["text"].as_str().unwrap().to_string(),
            c["speaker"].as_str().unwrap().to_string(),
            c["language"].as_str().unwrap().to_string(),
            c["non_streaming_mode"].as_bool().unwrap(),
        )
    };
    let (text, spk, lang, nsm) = args(case);
    let dropped = p.build(&text, &spk, &lang, case["instruct"].as_str(), nsm).unwrap();
    assert!(!dropped.instruct_used);
    // Exactly the expected prompt without the instruct rows.
    let n_instruct = case["instruct_ids"].as_array().unwrap().len();
    assert_eq!(dropped.text_track, ids(&case["prompt"]["text_track"])[n_instruct..]);
    assert_eq!(dropped.codec_track, opt_ids(&case["prompt"]["codec_track"])[n_instruct..]);
    assert_eq!(dropped.trailing_text, ids(&case["trailing_text"]));
    let _ = std::fs::remove_dir_all(&dir);

    // Upstream tests `tts_model_size in "0b6"`: any substring of it ("b6", "0b", "") drops too.
    for (size, allowed) in [("b6", false), ("0b", false), ("1b7", true), ("0b6b", true)] {
        let dir = fixture_copy(&format!("size-{size}"), |cfg| cfg["tts_model_size"] = size.into());
        assert_eq!(TtsConfig::from_dir(&dir).unwrap().instruct_allowed(), allowed, "{size}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn unsupported_models_are_rejected_at_load() {
    let check = |tag: &str, edit: fn(&mut Value), needle: &str| {
        let dir = fixture_copy(tag, edit);
        let err = TtsPrompter::from_dir(&dir).err().expect("rejected");
        let msg = err.to_string();
        assert!(msg.contains(needle), "{tag}: {msg}");
        let _ = std::fs::remove_dir_all(&dir);
        err
    };
    let e = check("base", |c| c["tts_model_type"] = "base".into(), "base");
    assert!(matches!(e, LoadError::Unsupported(_)));
    let e = check("v1", |c| c["tokenizer_type"] = "qwen3_tts_tokenizer_25hz".into(), "qwen3_tts_tokenizer_25hz");
    assert!(matches!(e, LoadError::Unsupported(_)));
    check("nocodec", |c| c["talker_config"]["codec_bos_id"] = Value::Null, "codec_bos_id");
    check("badspk", |c| c["talker_config"]["spk_id"]["aiden"] = 5000.into(), "aiden");
    check("baddialect", |c| c["talker_config"]["spk_is_dialect"]["eric"] = "klingon".into(), "eric");
}

#[test]
fn leading_line_break_does_not_break_the_layout() {
    let p = prompter();
    let plain = p.build("Hello world.", "aiden", "English", None, true).unwrap();
    for text in ["\nHello world.", " \r\n Hello world."] {
        assert_eq!(p.build(text, "aiden", "English", None, true).unwrap(), plain, "{text:?}");
    }
}

#[test]
fn request_carries_the_prompt() {
    let p = prompter();
    let prompt = p.build("Hello, voice streaming.", "aiden", "Auto", None, false).unwrap();
    let sampling = p.config().sampling_defaults(3);
    let req = p.request(prompt.clone(), 100, sampling.clone(), 0);
    assert_eq!(req.text_track, prompt.text_track);
    assert_eq!(req.codec_track, prompt.codec_track);
    assert_eq!(req.trailing_text, prompt.trailing_text);
    assert_eq!(req.max_frames, 100);
    assert_eq!(req.sampling, sampling);
    assert_eq!(req.chunk_frames, 1);
}
