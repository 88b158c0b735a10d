//! The speech routes end to end: a real server on 127.0.0.1:0 serving the tiny random-weight
//! Qwen3-TTS CustomVoice model (tests/fixtures/tts-tiny: speakers aiden, eric, vivian;
//! languages auto, chinese, english; 24 kHz, 1920 samples per frame) next to the tiny text
//! model. Endpoints are compared with each other (the same seed and input give the same audio
//! whatever the route) and against structural facts (WAV layout, whole frames, the fixture's
//! speakers), never against numbers computed by this code.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{assert_error, metric_value, TestServer};
use futures::{SinkExt, StreamExt};
use kiln::config::Config;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const TTS: &str = "tts-tiny";
const TEXT: &str = "kiln-demo";
const SAMPLE_RATE: u32 = 24000;
const SAMPLES_PER_FRAME: usize = 1920;

fn config(tts_extra: &str) -> Config {
    let text = format!(
        r#"
        [server]
        max_body_bytes = 1048576
        request_timeout_s = 120

        [[models]]
        name = "{TTS}"
        path = "tests/fixtures/tts-tiny"
        demo = true
        device = "cpu"
        kv_cache_tokens = 4096
        max_batch_tokens = 256
        max_speech_chars = 200
        {tts_extra}

        [[models]]
        name = "{TEXT}"
        path = "tests/fixtures/qwen2-tied-gqa"
        demo = true
        device = "cpu"
        kv_cache_tokens = 1024
        max_batch_tokens = 256
        "#
    );
    Config::parse(&text, "test config", Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap()
}

async fn server() -> TestServer {
    server_with("").await
}

async fn server_with(tts_extra: &str) -> TestServer {
    TestServer::serve(&config(tts_extra)).await
}

/// The fixture case the oracle recorded greedily that never reached the codec eos: its
/// request fields and how many frames it generated (all of them before the cap).
fn long_case() -> (Value, u64) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tts-tiny/expected.json");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let case = expected["cases"].as_array().unwrap().iter().find(|c| c["stop"] == "max_new_tokens").unwrap().clone();
    let body = json!({
        "model": TTS,
        "input": case["text"],
        "voice": case["speaker"],
        "language": case["language"],
        "non_streaming_mode": case["non_streaming_mode"],
        "do_sample": false,
        "subtalker_dosample": false,
    });
    (body, case["frames"].as_u64().unwrap())
}

fn speech(extra: Value) -> Value {
    let mut b = json!({"model": TTS, "input": "Hello world, this is Kiln speaking.", "voice": "Aiden",
        "language": "English", "seed": 7, "max_frames": 40});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// A WAV file read by the RIFF rules: chunks walked by their sizes, `fmt ` checked, `data`
/// taken to the end of the file when its size is the streaming 0xFFFFFFFF.
struct Wav {
    format: u16,
    channels: u16,
    sample_rate: u32,
    byte_rate: u32,
    block_align: u16,
    bits: u16,
    data: Vec<u8>,
    streaming: bool,
}

fn parse_wav(bytes: &[u8]) -> Wav {
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    let u16_at = |i: usize| u16::from_le_bytes(bytes[i..i + 2].try_into().unwrap());
    assert!(bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WAVE", "not a RIFF WAVE file");
    let riff = u32_at(4);
    let streaming = riff == u32::MAX;
    if !streaming {
        assert_eq!(riff as usize + 8, bytes.len(), "the RIFF size is the file's");
    }
    let mut fmt = None;
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let (id, size) = (&bytes[at..at + 4], u32_at(at + 4));
        let body = at + 8;
        if id == b"fmt " {
            assert!(size >= 16);
            fmt = Some((
                u16_at(body),
                u16_at(body + 2),
                u32_at(body + 4),
                u32_at(body + 8),
                u16_at(body + 12),
                u16_at(body + 14),
            ));
        } else if id == b"data" {
            let (format, channels, sample_rate, byte_rate, block_align, bits) = fmt.expect("fmt before data");
            let end = if size == u32::MAX {
                assert!(streaming, "a streaming data size in a sized file");
                bytes.len()
            } else {
                body + size as usize
            };
            assert!(end <= bytes.len(), "data runs past the file");
            return Wav {
                format,
                channels,
                sample_rate,
                byte_rate,
                block_align,
                bits,
                data: bytes[body..end].to_vec(),
                streaming,
            };
        }
        at = body + size as usize + (size as usize & 1);
    }
    panic!("no data chunk");
}

/// Checks the format this server produces (16-bit PCM mono at the model's rate) and that the
/// audio is whole frames; returns the PCM.
fn check_wav(bytes: &[u8], streaming: bool) -> Vec<u8> {
    let w = parse_wav(bytes);
    assert_eq!((w.format, w.channels, w.bits, w.block_align), (1, 1, 16, 2));
    assert_eq!((w.sample_rate, w.byte_rate), (SAMPLE_RATE, 2 * SAMPLE_RATE));
    assert_eq!(w.streaming, streaming);
    assert!(!w.data.is_empty(), "no audio");
    assert_eq!(w.data.len() % (2 * SAMPLES_PER_FRAME), 0, "not whole frames: {} bytes", w.data.len());
    w.data
}

fn b64(s: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s.as_str().expect("a base64 string")).unwrap()
}

/// Posts a speech request and reads the body chunk by chunk: (status, headers, chunks with the
/// time each arrived).
async fn post_chunks(s: &TestServer, body: &Value) -> (u16, reqwest::header::HeaderMap, Vec<(Instant, Vec<u8>)>) {
    let mut r = s.client.post(s.url("/v1/audio/speech")).json(body).send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let mut chunks = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        chunks.push((Instant::now(), c.to_vec()));
    }
    (status, headers, chunks)
}

async fn post_bytes(s: &TestServer, body: &Value) -> Vec<u8> {
    let (status, headers, chunks) = post_chunks(s, body).await;
    let bytes: Vec<u8> = chunks.into_iter().flat_map(|(_, c)| c).collect();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    assert_eq!(headers["x-sample-rate"], SAMPLE_RATE.to_string().as_str());
    assert!(headers.get("content-length").is_none(), "the body is streamed, not sized: {headers:?}");
    assert_eq!(headers["transfer-encoding"], "chunked");
    bytes
}

/// Runs one `speech` message on a WebSocket: (every `audio` event, the concatenated binary PCM,
/// the final event).
async fn ws_speech(s: &TestServer, msg: Value) -> (Vec<Value>, Vec<u8>, Value) {
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    ws.send(Message::Text(msg.to_string().into())).await.unwrap();
    let mut audio = Vec::new();
    let mut pcm = Vec::new();
    loop {
        let v = next_json(&mut ws).await;
        match v["type"].as_str() {
            Some("audio") => {
                // Each `audio` event is immediately followed by its PCM.
                let m = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.unwrap().unwrap().unwrap();
                let Message::Binary(bytes) = m else { panic!("expected the binary PCM after {v}, got {m:?}") };
                assert_eq!(bytes.len() as u64, 2 * v["samples"].as_u64().unwrap(), "{v}");
                pcm.extend_from_slice(&bytes);
                audio.push(v);
            }
            _ => return (audio, pcm, v),
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws) -> Value {
    let m = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.unwrap().unwrap().unwrap();
    match m {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        other => panic!("expected a JSON event, got {other:?}"),
    }
}

#[tokio::test]
async fn wav_pcm_simple_and_websocket_give_the_same_audio() {
    let s = server().await;

    // Streamed WAV: the streaming header, then whole frames of PCM.
    let wav = post_bytes(&s, &speech(json!({}))).await;
    let pcm = check_wav(&wav, true);

    // Raw PCM: the same samples without the header.
    let (status, headers, chunks) = post_chunks(&s, &speech(json!({"response_format": "pcm"}))).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "audio/pcm");
    assert_eq!(headers["x-kiln-seed"], "7");
    let raw: Vec<u8> = chunks.into_iter().flat_map(|(_, c)| c).collect();
    assert_eq!(raw, pcm, "pcm and wav differ");

    // The seed example's input: a complete WAV with exact sizes, and the same samples.
    let simple = json!({"model": TTS, "text": "Hello world, this is Kiln speaking.", "speaker": "aiden",
        "language": "english", "instruct": "", "seed": 7, "max_frames": 40});
    let (st, v) = s.post("/v1/audio/speech/simple", simple.clone()).await;
    assert_eq!(st, 200, "{v}");
    let file = b64(&v["audio_base64"]);
    assert_eq!(check_wav(&file, false), pcm, "simple and streamed audio differ");
    let frames = v["frames"].as_u64().unwrap() as usize;
    assert!((1..=40).contains(&frames), "{v}");
    assert_eq!(pcm.len(), 2 * frames * SAMPLES_PER_FRAME, "one 1920-sample block per frame: {v}");
    assert_eq!(v["samples"].as_u64().unwrap() as usize, frames * SAMPLES_PER_FRAME);
    assert!((v["duration_s"].as_f64().unwrap() - (frames * SAMPLES_PER_FRAME) as f64 / 24000.0).abs() < 1e-9);
    assert_eq!((v["sample_rate"].as_u64(), v["speaker"].as_str()), (Some(24000), Some("aiden")), "{v}");
    assert_eq!(
        (v["language"].as_str(), v["text"].as_str()),
        (Some("english"), Some("Hello world, this is Kiln speaking."))
    );
    assert!(v["instruct"].is_null() && v["seed"] == 7, "{v}");
    let reason = v["finish_reason"].as_str().unwrap().to_string();
    assert!(reason == "stop" || (reason == "length" && frames == 40), "{v}");

    // In a Runpod-style envelope: the same.
    let (st, v2) = s.post("/v1/audio/speech/simple", json!({"model": TTS, "input": simple})).await;
    assert_eq!(st, 200, "{v2}");
    assert_eq!(b64(&v2["audio_base64"]), file);

    // WebSocket: `audio` events, each followed by its PCM, concatenate to the same samples.
    let (audio, ws_pcm, done) = ws_speech(&s, speech(json!({"type": "speech", "id": "s1"}))).await;
    assert_eq!(ws_pcm, pcm, "websocket and HTTP audio differ");
    assert_eq!(done["type"], "audio_done", "{done}");
    assert_eq!((done["id"].as_str(), done["frames"].as_u64()), (Some("s1"), Some(frames as u64)), "{done}");
    assert_eq!(done["finish_reason"], reason.as_str());
    assert_eq!(done["samples"].as_u64().unwrap() as usize, frames * SAMPLES_PER_FRAME);
    let mut total = 0;
    for a in &audio {
        assert_eq!(
            (a["id"].as_str(), a["format"].as_str(), a["sample_rate"].as_u64()),
            (Some("s1"), Some("pcm_s16le"), Some(24000))
        );
        assert_eq!(a["samples"].as_u64().unwrap() as usize, a["frames"].as_u64().unwrap() as usize * SAMPLES_PER_FRAME);
        total += a["frames"].as_u64().unwrap();
        assert!(a["frames_total"].as_u64().unwrap() >= total, "{a}");
    }
    assert_eq!(total as usize, frames);

    // Another seed samples other audio; the same seed again the same.
    let again = post_bytes(&s, &speech(json!({"response_format": "pcm"}))).await;
    assert_eq!(again, pcm, "same seed, different audio");

    let metrics = s.get("/metrics").await.1;
    let m = |name: &str, labels: &[(&str, &str)]| metric_value(&metrics, name, labels);
    assert!(m("kiln_requests_total", &[("model", TTS), ("status", &reason)]) >= 6.0, "{metrics}");
    let audio_s = m("kiln_generated_audio_seconds_total", &[("model", TTS)]);
    assert!((audio_s - 6.0 * (frames * SAMPLES_PER_FRAME) as f64 / 24000.0).abs() < 1e-6, "{audio_s}\n{metrics}");
    assert!(m("kiln_time_to_first_audio_seconds_count", &[("model", TTS)]) >= 6.0, "{metrics}");
}

/// The batcher's running and waiting utterances of the speech model, asked in process.
async fn queue(s: &TestServer) -> (usize, usize) {
    let entry = s.state.model(TTS).unwrap().clone();
    let stats = entry.loaded().await.unwrap().stats().await.unwrap();
    (stats.running, stats.waiting)
}

/// The queue once it is empty (cancellations take effect at the next step), or as it is
/// after 10 s.
async fn idle_queue(s: &TestServer) -> (usize, usize) {
    let mut q = queue(s).await;
    for _ in 0..400 {
        if q == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        q = queue(s).await;
    }
    q
}

/// One streamed WAV of `body`: its bytes, (time, bytes so far) per read, and the batcher's
/// running utterances when the first audio bytes had arrived.
async fn stream_wav(s: &TestServer, body: &Value) -> (Vec<u8>, Vec<(Duration, usize)>, usize) {
    let start = Instant::now();
    let mut r = s.client.post(s.url("/v1/audio/speech")).json(body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut bytes = Vec::new();
    let mut arrivals = Vec::new();
    let mut running_at_first_audio = None;
    while let Some(c) = r.chunk().await.unwrap() {
        bytes.extend_from_slice(&c);
        arrivals.push((start.elapsed(), bytes.len()));
        if running_at_first_audio.is_none() && bytes.len() > 44 {
            running_at_first_audio = Some(queue(s).await.0);
        }
    }
    (bytes, arrivals, running_at_first_audio.expect("no audio"))
}

#[tokio::test]
async fn audio_streams_while_the_utterance_is_generated() {
    let s = server_with("speech_first_chunk_frames = 2\nspeech_chunk_frames = 3").await;
    let (mut body, frames) = long_case();
    body["max_frames"] = json!(frames);

    // The first audio arrives while the utterance is still being generated. (Asked up to three
    // times: a loaded machine may stall this client past the utterance's end. A server that
    // buffered the audio would never pass: its utterance ends before the first byte.)
    let mut seen = Vec::new();
    let mut streamed = None;
    for _ in 0..3 {
        let (bytes, arrivals, running) = stream_wav(&s, &body).await;
        seen.push((running, arrivals.clone()));
        if running == 1 {
            streamed = Some((bytes, arrivals));
            break;
        }
    }
    let Some((bytes, arrivals)) = streamed else { panic!("the first audio came after the utterance ended: {seen:?}") };
    let pcm = check_wav(&bytes, true);
    // The oracle's greedy run had not ended at this many frames: all of them are generated.
    assert_eq!(pcm.len(), 2 * frames as usize * SAMPLES_PER_FRAME);
    let audio_reads: Vec<_> = arrivals.iter().filter(|(_, n)| *n > 44).collect();
    assert!(audio_reads.len() >= 3, "the audio came in {} reads: {arrivals:?}", audio_reads.len());
    assert!(audio_reads[0].1 < bytes.len() / 2, "most of the audio was in the first read: {arrivals:?}");
    assert!(audio_reads.last().unwrap().0 > audio_reads[0].0, "{arrivals:?}");

    // On the WebSocket each chunk says how many frames existed when it was decoded: the first
    // left after `speech_first_chunk_frames` frames, long before the last, then one every
    // `speech_chunk_frames`.
    let mut msg = body.clone();
    msg["type"] = json!("speech");
    msg["id"] = json!("w");
    let (audio, ws_pcm, done) = ws_speech(&s, msg).await;
    assert_eq!(ws_pcm, pcm);
    assert_eq!((audio[0]["frames"].as_u64(), audio[0]["frames_total"].as_u64()), (Some(2), Some(2)), "{audio:?}");
    assert_eq!(done["frames"].as_u64(), Some(frames), "{done}");
    assert_eq!(audio.len() as u64, 1 + (frames - 2).div_ceil(3), "2 frames, then 3 per chunk: {audio:?}");
    for (k, a) in audio.iter().enumerate() {
        let total = (2 + 3 * k as u64).min(frames);
        assert_eq!(a["frames_total"].as_u64(), Some(total), "chunk {k}: {a}");
    }

    // The same request in one piece (the simple route) gives the same samples.
    let mut simple = body.clone();
    let fields = simple.as_object_mut().unwrap();
    let (text, speaker) = (fields.remove("input").unwrap(), fields.remove("voice").unwrap());
    fields.insert("text".into(), text);
    fields.insert("speaker".into(), speaker);
    let (st, v) = s.post("/v1/audio/speech/simple", simple).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(check_wav(&b64(&v["audio_base64"]), false), pcm);
    assert_eq!((v["frames"].as_u64(), v["finish_reason"].as_str()), (Some(frames), Some("length")), "{v}");

    // A deadline ends the stream early: a valid WAV of whole frames, counted as a timeout.
    let mut short = body.clone();
    short["max_frames"] = json!(null);
    short["timeout"] = json!(0.02);
    let cut = post_bytes(&s, &short).await;
    let w = parse_wav(&cut);
    assert_eq!(w.data.len() % (2 * SAMPLES_PER_FRAME), 0);
    assert!(w.data.len() < pcm.len(), "the deadline did not cut the audio");
    let metrics = s.get("/metrics").await.1;
    assert_eq!(
        metric_value(&metrics, "kiln_requests_total", &[("model", TTS), ("status", "timeout")]),
        1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn bad_requests_are_4xx_and_the_server_carries_on() {
    let s = server().await;
    let p = |x: &str| x.to_string();
    let route = "/v1/audio/speech";
    let cases: Vec<(Value, u16, &str, String, &str)> = vec![
        (speech(json!({"voice": "nobody"})), 400, "invalid_parameter", p("voice"), "aiden, eric, vivian"),
        (speech(json!({"language": "klingon"})), 400, "invalid_parameter", p("language"), "auto, chinese, english"),
        (speech(json!({"input": ""})), 400, "invalid_parameter", p("input"), "non-empty"),
        (speech(json!({"input": " \n\t "})), 400, "invalid_parameter", p("input"), "non-empty"),
        (speech(json!({"input": "a".repeat(201)})), 400, "invalid_parameter", p("input"), "at most 200"),
        (speech(json!({"input": "é".repeat(201)})), 400, "invalid_parameter", p("input"), "201 characters"),
        (speech(json!({"speed": 1.5})), 400, "invalid_parameter", p("speed"), "not supported"),
        (
            speech(json!({"response_format": "flac"})),
            400,
            "invalid_parameter",
            p("response_format"),
            "use \"wav\" or \"pcm\"",
        ),
        (speech(json!({"response_format": "mp3"})), 400, "invalid_parameter", p("response_format"), "not supported"),
        (speech(json!({"response_format": "ogg"})), 400, "invalid_parameter", p("response_format"), "unknown"),
        (speech(json!({"stream_format": "sse"})), 400, "invalid_parameter", p("stream_format"), "not supported"),
        (speech(json!({"temperature": 0})), 400, "invalid_parameter", p("temperature"), "(0, 2]"),
        (speech(json!({"temperature": 3})), 400, "invalid_parameter", p("temperature"), "(0, 2]"),
        (speech(json!({"top_p": 1.5})), 400, "invalid_parameter", p("top_p"), "(0, 1]"),
        (speech(json!({"top_k": -1})), 400, "invalid_parameter", p("top_k"), ">= 0"),
        (speech(json!({"repetition_penalty": 0})), 400, "invalid_parameter", p("repetition_penalty"), "(0, 2]"),
        (speech(json!({"subtalker_top_p": 0})), 400, "invalid_parameter", p("subtalker_top_p"), "(0, 1]"),
        (speech(json!({"seed": -1})), 400, "invalid_parameter", p("seed"), "between 0"),
        (speech(json!({"max_frames": 0})), 400, "invalid_parameter", p("max_frames"), "between 1 and"),
        (speech(json!({"max_frames": 100000})), 400, "invalid_parameter", p("max_frames"), "between 1 and"),
        (speech(json!({"timeout": 0})), 400, "invalid_parameter", p("timeout"), "> 0"),
        (speech(json!({"instruct": "a", "instructions": "b"})), 400, "invalid_parameter", p("instruct"), "not both"),
        (speech(json!({"do_sample": "yes"})), 422, "invalid_type", p("do_sample"), "do_sample"),
        (speech(json!({"input": 5})), 422, "invalid_type", p("input"), "input"),
        (json!({"model": TTS, "voice": "aiden"}), 422, "invalid_type", p("input"), "input"),
        (json!({"model": TTS, "input": "hi"}), 422, "invalid_type", p("voice"), "aiden, eric, vivian"),
        (speech(json!({"model": TEXT})), 400, "invalid_parameter", p("model"), "does not generate speech"),
        (speech(json!({"model": "nope"})), 404, "model_not_found", p("model"), "nope"),
        (json!({"input": "hi", "voice": "aiden"}), 400, "invalid_parameter", p("model"), "required"),
    ];
    for (body, status, code, param, want) in cases {
        let (st, v) = s.post(route, body.clone()).await;
        let e = assert_error(st, &v, status, code);
        assert_eq!(e["param"], param.as_str(), "{body}: {v}");
        assert!(e["message"].as_str().unwrap().contains(want), "{want:?} not in {v}");
        s.assert_healthy().await;
    }
    // The simple route names its own fields in errors.
    let simple = |extra: Value| {
        let mut b = json!({"model": TTS, "text": "hi", "speaker": "vivian", "language": "chinese"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (body, status, param, want) in [
        (simple(json!({"speaker": "Bob"})), 400, "speaker", "aiden, eric, vivian"),
        (simple(json!({"text": ""})), 400, "text", "non-empty"),
        (simple(json!({"text": "x".repeat(300)})), 400, "text", "at most 200"),
        (simple(json!({"language": "french"})), 400, "language", "auto, chinese, english"),
        (json!({"model": TTS, "text": "hi"}), 422, "speaker", "missing field `speaker`"),
        (json!({"model": TTS, "input": "hi"}), 422, "input", "must be an object"),
    ] {
        let (st, v) = s.post("/v1/audio/speech/simple", body.clone()).await;
        let code = if status == 422 { "invalid_type" } else { "invalid_parameter" };
        let e = assert_error(st, &v, status, code);
        assert_eq!(e["param"], param, "{body}: {v}");
        assert!(e["message"].as_str().unwrap().contains(want), "{want:?} not in {v}");
    }
    // Speech models refuse the other routes with a pointer to theirs.
    let (st, v) =
        s.post("/v1/chat/completions", json!({"model": TTS, "messages": [{"role": "user", "content": "hi"}]})).await;
    let e = assert_error(st, &v, 400, "invalid_parameter");
    assert!(e["message"].as_str().unwrap().contains("/v1/audio/speech"), "{e}");

    // The WebSocket gets the same errors as events, and the socket stays usable.
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    let send = |v: Value| Message::Text(v.to_string().into());
    ws.send(send(json!({"type": "speech", "id": "b", "model": TTS, "input": "hi", "voice": "nobody"}))).await.unwrap();
    let e = next_json(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["param"].as_str()),
        (Some("error"), Some("invalid_parameter"), Some("voice"))
    );
    assert!(e["message"].as_str().unwrap().contains("aiden, eric, vivian"), "{e}");
    ws.send(send(json!({"type": "speech", "id": "t", "model": TEXT, "input": "hi", "voice": "aiden"}))).await.unwrap();
    let e = next_json(&mut ws).await;
    assert_eq!((e["id"].as_str(), e["param"].as_str()), (Some("t"), Some("model")), "{e}");
    s.assert_healthy().await;
}

#[tokio::test]
async fn voices_and_models_describe_the_speech_model() {
    let s = server().await;
    let (st, body) = s.get("/v1/audio/voices").await;
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "only the speech model: {v}");
    let m = &data[0];
    assert_eq!(m["model"], TTS);
    assert_eq!(m["voices"], json!(["aiden", "eric", "vivian"]));
    assert_eq!(m["languages"], json!(["auto", "chinese", "english"]));
    assert_eq!((m["sample_rate"].as_u64(), m["samples_per_frame"].as_u64()), (Some(24000), Some(1920)));
    assert_eq!(m["frame_rate"], 12.5);
    assert!(m["instruct"].is_boolean() && m["max_frames"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(m["response_formats"], json!(["wav", "pcm"]));

    let models: Value = serde_json::from_str(&s.get("/v1/models").await.1).unwrap();
    let tts = models["data"].as_array().unwrap().iter().find(|m| m["id"] == TTS).unwrap().clone();
    let k = &tts["kiln"];
    assert_eq!((k["family"].as_str(), k["state"].as_str()), (Some("text-to-speech"), Some("ready")), "{k}");
    assert_eq!(k["voices"], m["voices"]);
    assert!(k["kv_blocks"].as_u64().unwrap() > 0 && k["max_model_len"].as_u64().unwrap() > 0, "{k}");
    assert!(k["memory"]["kv_blocks"].as_u64().unwrap() > 0, "{k}");
}

#[tokio::test]
async fn a_full_queue_is_429_and_a_client_that_leaves_cancels_its_utterance() {
    let s = server_with("max_running = 1\nmax_waiting = 1").await;
    let metric =
        |text: &str, status: &str| metric_value(text, "kiln_requests_total", &[("model", TTS), ("status", status)]);
    let (mut long, _) = long_case();
    long["response_format"] = json!("pcm");

    // Six at once, one may run and one wait: the rest are refused with Retry-After; the
    // served ones all get the whole (greedy, so identical) utterance.
    let send = |body: Value| {
        let (client, url) = (s.client.clone(), s.url("/v1/audio/speech"));
        async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            let (status, retry) = (r.status().as_u16(), r.headers().get("retry-after").cloned());
            (status, retry, r.bytes().await.unwrap().to_vec())
        }
    };
    let results = futures::future::join_all((0..6).map(|_| send(long.clone()))).await;
    let served: Vec<&Vec<u8>> = results.iter().filter(|r| r.0 == 200).map(|r| &r.2).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(served.len() + refused.len(), 6, "{:?}", results.iter().map(|r| r.0).collect::<Vec<_>>());
    assert!(!refused.is_empty() && served.len() >= 2, "served {}, refused {}", served.len(), refused.len());
    for (_, retry, body) in &refused {
        assert_eq!(retry.as_ref().unwrap(), "1");
        assert_error(429, &serde_json::from_slice(body).unwrap(), 429, "overloaded");
    }
    assert!(!served[0].is_empty() && served[0].len().is_multiple_of(2 * SAMPLES_PER_FRAME));
    assert!(served.iter().all(|b| b == &served[0]), "the same greedy request gave different audio");
    let metrics = s.get("/metrics").await.1;
    assert_eq!(metric(&metrics, "rejected"), refused.len() as f64, "{metrics}");
    let finished = metric(&metrics, "length") + metric(&metrics, "stop");
    assert_eq!(finished, served.len() as f64, "{metrics}");

    // A client that goes away after the first audio: its utterance is cancelled, nothing runs.
    let mut r = s.client.post(s.url("/v1/audio/speech")).json(&long).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(!r.chunk().await.unwrap().expect("audio").is_empty());
    drop(r);
    let mut state = (0.0, (9, 9));
    for _ in 0..400 {
        state = (metric(&s.get("/metrics").await.1, "cancelled"), queue(&s).await);
        if state == (1.0, (0, 0)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(state, (1.0, (0, 0)), "(cancelled requests, (running, waiting))");
    let metrics = s.get("/metrics").await.1;
    assert_eq!(metric(&metrics, "length") + metric(&metrics, "stop"), finished, "the dropped stream finished");

    // The model serves again.
    let pcm = post_bytes(&s, &speech(json!({"response_format": "pcm"}))).await;
    assert!(!pcm.is_empty() && pcm.len().is_multiple_of(2 * SAMPLES_PER_FRAME));
}

#[tokio::test]
async fn websocket_cancel_ends_an_utterance_and_the_socket_goes_on() {
    let s = server_with("speech_chunk_frames = 1").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    let send = |v: Value| Message::Text(v.to_string().into());
    let (mut long, _) = long_case();
    long["type"] = json!("speech");
    long["id"] = json!("c");
    // Cancelled after its first audio. (Up to three tries: on a loaded machine the utterance
    // may end before the cancel arrives; it then ends as usual.)
    let mut reasons = Vec::new();
    for _ in 0..3 {
        ws.send(send(long.clone())).await.unwrap();
        let first = next_json(&mut ws).await;
        assert_eq!(first["type"], "audio", "{first}");
        ws.send(send(json!({"type": "cancel", "id": "c"}))).await.unwrap();
        let done = loop {
            let m = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.unwrap().unwrap().unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "audio_done" {
                break v;
            }
            assert_eq!(v["type"], "audio", "{v}");
        };
        assert_eq!(done["id"], "c");
        reasons.push(done["finish_reason"].as_str().unwrap().to_string());
        if reasons.last().unwrap() == "cancelled" {
            break;
        }
        // Too late: the cancel of a finished id is an `unknown_id` error.
        let e = next_json(&mut ws).await;
        assert_eq!(e["code"], "unknown_id", "{e}");
    }
    assert_eq!(reasons.last().map(String::as_str), Some("cancelled"), "{reasons:?}");
    assert_eq!(idle_queue(&s).await, (0, 0), "the cancelled utterance still runs");
    // The id is free again and the socket speaks.
    ws.send(send(speech(json!({"type": "speech", "id": "c", "max_frames": 3})))).await.unwrap();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.unwrap().unwrap().unwrap();
        let Message::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        if v["type"] == "audio_done" {
            assert!(v["frames"].as_u64().unwrap() <= 3, "{v}");
            break;
        }
        assert_eq!(v["type"], "audio", "{v}");
    }
}
