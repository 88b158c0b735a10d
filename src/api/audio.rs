//! Text-to-speech (docs/speech.md): `POST /v1/audio/speech` (OpenAI's shape; the audio streams
//! as it is generated, as a WAV with a streaming header or as raw PCM, in a chunked body),
//! `POST /v1/audio/speech/simple` (the seed example's `{text, speaker, language, instruct}` → a
//! complete base64 WAV in JSON), `GET /v1/audio/voices`, and the pieces the WebSocket `speech`
//! message shares.
//!
//! A request becomes a [`SpeechPlan`] and one `SpeechRequest` (validation), then a
//! [`SpeechJob`]: the utterance's engine events as audio chunks, with the request's deadline
//! and its metrics. Dropping a job cancels the utterance.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::Json;
use kiln_actors::metrics::reject_reason;
use kiln_actors::request::submit_reject_reason;
use kiln_actors::{FinishReason, ModelMetrics, SpeechEvent, SpeechRequest, SpeechStream, SubmitError};
use kiln_models::tts_prompt::PromptError;
use serde::Deserialize;
use serde_json::{json, Map, Number, Value};

use super::{from_value, ApiJson};
use crate::api::images::base64;
use crate::api::openai::missing;
use crate::error::ApiError;
use crate::server::{AppState, ModelEntry, ModelKind, SpeechModel};
use crate::validation::request_timeout;

/// The `response_format`s produced.
pub const FORMATS: [&str; 2] = ["wav", "pcm"];
/// OpenAI's other formats: refused with a pointer to the ones produced.
const OTHER_FORMATS: [&str; 4] = ["mp3", "opus", "aac", "flac"];
/// Largest `temperature` and `repetition_penalty` (as the text routes).
const MAX_TEMPERATURE: f64 = 2.0;
const MAX_REPETITION_PENALTY: f64 = 2.0;

/// The body of `/v1/audio/speech` and of a WebSocket `speech` message. Unknown fields are
/// ignored (OpenAI clients may send others).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SpeechBody {
    pub model: Option<String>,
    /// The text to speak.
    pub input: Option<String>,
    /// A speaker of the model (case-insensitive).
    pub voice: Option<String>,
    /// `wav` (default) or `pcm`.
    pub response_format: Option<String>,
    /// Only 1.0.
    pub speed: Option<f64>,
    /// OpenAI: `audio` (the only one) or `sse`.
    pub stream_format: Option<String>,
    /// Accepted; the body always streams.
    pub stream: Option<bool>,
    /// Accepted and ignored.
    pub user: Option<String>,
    /// A language of the model or `auto` (default).
    pub language: Option<String>,
    /// A style instruction (models that take one).
    pub instruct: Option<String>,
    /// OpenAI's name for `instruct`.
    pub instructions: Option<String>,
    /// Any u64; default: random.
    pub seed: Option<Number>,
    /// Codebook 0 (the talker), as upstream's same-named arguments; defaults from the model's
    /// `generation_config.json`.
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// Codebooks 1..15 (the code predictor).
    pub subtalker_dosample: Option<bool>,
    pub subtalker_temperature: Option<f64>,
    pub subtalker_top_k: Option<i64>,
    pub subtalker_top_p: Option<f64>,
    /// Most frames to generate (12.5 per second of audio); default and maximum: the model's.
    pub max_frames: Option<i64>,
    /// Seconds, as for the other routes; capped by `server.request_timeout_s`.
    pub timeout: Option<f64>,
    /// Upstream's `non_streaming_mode` (default true): the whole text goes in the prompt;
    /// false feeds it one token per generated frame.
    pub non_streaming_mode: Option<bool>,
}

/// How the audio is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioFormat {
    /// A WAV header (streaming sizes), then s16le mono PCM.
    Wav,
    /// s16le mono PCM only.
    Pcm,
}

impl AudioFormat {
    pub fn name(self) -> &'static str {
        match self {
            AudioFormat::Wav => "wav",
            AudioFormat::Pcm => "pcm",
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            AudioFormat::Wav => "audio/wav",
            AudioFormat::Pcm => "audio/pcm",
        }
    }
}

/// Everything a validated request says, but the utterance's own inputs.
#[derive(Debug, Clone)]
pub struct SpeechPlan {
    pub model: String,
    pub text: String,
    /// The speaker and language as the model names them (lowercase).
    pub speaker: String,
    pub language: String,
    pub instruct: Option<String>,
    /// False when no instruction was given or the model drops it.
    pub instruct_used: bool,
    pub format: AudioFormat,
    pub seed: u64,
    pub max_frames: usize,
    pub timeout: Duration,
    pub sample_rate: u32,
    pub samples_per_frame: usize,
}

fn float_param(param: &str, v: Option<f64>, max: f64, rule: &str) -> Result<Option<f32>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x.is_finite() && x > 0.0 && x <= max => Ok(Some(x as f32)),
        Some(x) => Err(ApiError::param(param, format!("{param} must be {rule}, got {x}"))),
    }
}

fn top_k_param(param: &str, v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(k) if k >= 0 => Ok(Some(usize::try_from(k).unwrap_or(usize::MAX))),
        Some(k) => Err(ApiError::param(param, format!("{param} must be >= 0 (0: no top-k), got {k}"))),
    }
}

/// The parameter a prompt error is about.
fn prompt_error(e: PromptError) -> ApiError {
    let param = match &e {
        PromptError::UnknownSpeaker { .. } => "voice",
        PromptError::UnknownLanguage { .. } => "language",
        PromptError::EmptyText | PromptError::Tokenizer(_) => "input",
    };
    ApiError::param(param, e.to_string())
}

/// `name` as the model spells it in `names` (matched case-insensitively).
fn canonical(names: &[String], name: &str) -> String {
    let lower = name.to_lowercase();
    names.iter().find(|n| n.to_lowercase() == lower).cloned().unwrap_or(lower)
}

/// What a request asks for, checked against `model`: the plan and the utterance's request.
pub fn validate(
    body: &SpeechBody,
    model: &SpeechModel,
    server_timeout: Duration,
) -> Result<(SpeechPlan, SpeechRequest), ApiError> {
    let text = body.input.as_deref().ok_or_else(|| missing("input"))?;
    if text.trim().is_empty() {
        return Err(ApiError::param("input", "input must be non-empty text to speak"));
    }
    let chars = text.chars().count();
    if chars > model.max_chars {
        return Err(ApiError::param(
            "input",
            format!(
                "input is {chars} characters long; this model speaks at most {} per request \
                 (max_speech_chars): split the text",
                model.max_chars
            ),
        ));
    }
    let speakers = model.speakers();
    let voice = body.voice.as_deref().ok_or_else(|| ApiError::InvalidType {
        param: Some("voice".into()),
        message: format!("missing field `voice`: one of {}", speakers.join(", ")),
    })?;
    let format = match body.response_format.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("wav") => AudioFormat::Wav,
        Some("pcm") => AudioFormat::Pcm,
        Some(f) if OTHER_FORMATS.contains(&f) => {
            return Err(ApiError::param(
                "response_format",
                format!("response_format {f:?} is not supported: use \"wav\" or \"pcm\" (s16le mono)"),
            ))
        }
        Some(f) => {
            return Err(ApiError::param(
                "response_format",
                format!("unknown response_format {f:?}: use \"wav\" or \"pcm\" (s16le mono)"),
            ))
        }
    };
    match body.stream_format.as_deref() {
        None | Some("audio") => {}
        Some(f) => {
            return Err(ApiError::param(
                "stream_format",
                format!("stream_format {f:?} is not supported: the audio streams as the response body (\"audio\")"),
            ))
        }
    }
    if let Some(speed) = body.speed.filter(|&s| s != 1.0) {
        return Err(ApiError::param(
            "speed",
            format!("speed {speed} is not supported: the model speaks at its own pace (give 1.0 or leave it out)"),
        ));
    }
    let instruct = match (body.instruct.as_deref(), body.instructions.as_deref()) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::param("instruct", "give instruct or instructions (the same thing), not both"))
        }
        (a, b) => a.or(b).filter(|s| !s.trim().is_empty()),
    };
    let language = body.language.as_deref().unwrap_or("auto");
    let seed = match &body.seed {
        None => u64::from(rand::random::<u32>()),
        Some(s) => s.as_u64().ok_or_else(|| {
            ApiError::param("seed", format!("seed must be an integer between 0 and {}, got {s}", u64::MAX))
        })?,
    };
    let mut sampling = model.prompter.config().sampling_defaults(seed);
    let rule = format!("in (0, {MAX_TEMPERATURE}]");
    if let Some(t) = float_param("temperature", body.temperature, MAX_TEMPERATURE, &rule)? {
        sampling.temperature = t;
    }
    if let Some(t) = float_param("subtalker_temperature", body.subtalker_temperature, MAX_TEMPERATURE, &rule)? {
        sampling.sub_temperature = t;
    }
    if let Some(p) = float_param("top_p", body.top_p, 1.0, "in (0, 1]")? {
        sampling.top_p = p;
    }
    if let Some(p) = float_param("subtalker_top_p", body.subtalker_top_p, 1.0, "in (0, 1]")? {
        sampling.sub_top_p = p;
    }
    if let Some(k) = top_k_param("top_k", body.top_k)? {
        sampling.top_k = k;
    }
    if let Some(k) = top_k_param("subtalker_top_k", body.subtalker_top_k)? {
        sampling.sub_top_k = k;
    }
    let rule = format!("in (0, {MAX_REPETITION_PENALTY}]");
    if let Some(r) = float_param("repetition_penalty", body.repetition_penalty, MAX_REPETITION_PENALTY, &rule)? {
        sampling.repetition_penalty = r;
    }
    if let Some(d) = body.do_sample {
        sampling.do_sample = d;
    }
    if let Some(d) = body.subtalker_dosample {
        sampling.sub_do_sample = d;
    }
    let timeout = request_timeout("timeout", body.timeout)?.map_or(server_timeout, |t| t.min(server_timeout));

    let prompt = model
        .prompter
        .build(text, voice, language, instruct, body.non_streaming_mode.unwrap_or(true))
        .map_err(prompt_error)?;
    let rows = prompt.text_track.len();
    let cap = model.frame_cap(rows);
    if cap == 0 {
        return Err(ApiError::ContextLength {
            param: "input".into(),
            message: format!(
                "the prompt of this input takes {rows} of the model's {} positions, leaving none for audio: \
                 shorten the text",
                model.max_model_len
            ),
        });
    }
    let max_frames = match body.max_frames {
        None => cap,
        Some(n) if n >= 1 && (n as u64) <= cap as u64 => n as usize,
        Some(n) => {
            return Err(ApiError::param(
                "max_frames",
                format!(
                    "max_frames must be between 1 and {cap} for this input (the model allows {} frames per \
                     utterance, within {} positions with the prompt's {rows}), got {n}",
                    model.max_frames, model.max_model_len
                ),
            ))
        }
    };
    let plan = SpeechPlan {
        model: String::new(),
        text: text.to_string(),
        speaker: canonical(&speakers, voice),
        language: canonical(&model.languages(), language),
        instruct: instruct.map(str::to_string),
        instruct_used: prompt.instruct_used,
        format,
        seed,
        max_frames,
        timeout,
        sample_rate: model.sample_rate,
        samples_per_frame: model.samples_per_frame,
    };
    let mut request = model.prompter.request(prompt, max_frames, sampling, model.chunk_frames);
    request.first_chunk_frames = model.first_chunk_frames;
    Ok((plan, request))
}

/// Validates a speech body: the model entry, plan and request.
pub fn prepare(state: &AppState, body: &SpeechBody) -> Result<(Arc<ModelEntry>, SpeechPlan, SpeechRequest), ApiError> {
    let entry = state.resolve_model(body.model.as_deref())?;
    let model = entry.speech_model()?;
    let (mut plan, request) = validate(body, model, state.limits.request_timeout)?;
    plan.model = entry.name.clone();
    Ok((entry, plan, request))
}

// --- audio encoding ---------------------------------------------------------------------------------

/// Samples as 16-bit little-endian PCM (clipped to [-1, 1], scaled by 32767, rounded).
pub fn pcm16(samples: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(samples.len() * 2);
    for &x in samples {
        let x = if x.is_nan() { 0.0 } else { x.clamp(-1.0, 1.0) };
        out.extend_from_slice(&((x * 32767.0).round() as i16).to_le_bytes());
    }
    out
}

/// The 44-byte header of a mono 16-bit PCM WAV. `data_bytes`: the PCM's length; `None` for a
/// stream of unknown length (the RIFF and data sizes are then 0xFFFFFFFF, which readers take
/// as "until the end of the file").
pub fn wav_header(sample_rate: u32, data_bytes: Option<u32>) -> Vec<u8> {
    let (riff, data) = match data_bytes {
        Some(n) => (n.saturating_add(36), n),
        None => (u32::MAX, u32::MAX),
    };
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&riff.to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    h.extend_from_slice(&1u16.to_le_bytes()); // PCM
    h.extend_from_slice(&1u16.to_le_bytes()); // mono
    h.extend_from_slice(&sample_rate.to_le_bytes());
    h.extend_from_slice(&(sample_rate.saturating_mul(2)).to_le_bytes()); // bytes per second
    h.extend_from_slice(&2u16.to_le_bytes()); // block align
    h.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    h.extend_from_slice(b"data");
    h.extend_from_slice(&data.to_le_bytes());
    h
}

/// A complete WAV file of `pcm` (s16le mono).
pub fn wav_file(sample_rate: u32, pcm: &[u8]) -> Vec<u8> {
    let mut out = wav_header(sample_rate, Some(u32::try_from(pcm.len()).unwrap_or(u32::MAX - 36)));
    out.extend_from_slice(pcm);
    out
}

// --- the running utterance ----------------------------------------------------------------------------

/// What a speech request produces, in order: audio chunks, then its end.
#[derive(Debug)]
pub enum SpeechJobEvent {
    /// New audio (mono f32 in [-1, 1]): whole frames, decoded once `chunk_frames` were
    /// generated (or the utterance ended); `frames_total` frames were generated so far.
    Audio { samples: Vec<f32>, frames_total: usize },
    /// The utterance ended: `stop` (the model's end of speech), `length` (`max_frames`) or
    /// `timeout` (the deadline passed: the audio so far is all there is).
    Done { reason: FinishReason },
    /// The utterance failed in the engine, or the model stopped.
    Failed(ApiError),
}

/// One running utterance. Dropping it cancels the utterance and counts the request as
/// cancelled (unless it already ended).
pub struct SpeechJob {
    stream: SpeechStream<kiln_models::TtsEngine>,
    metrics: ModelMetrics,
    started: Instant,
    deadline: tokio::time::Instant,
    sample_rate: u32,
    frames: usize,
    samples: usize,
    ended: bool,
    recorded: bool,
}

impl SpeechJob {
    /// Loads the model if needed and submits the utterance; a full queue is a 429.
    pub async fn start(entry: &Arc<ModelEntry>, plan: &SpeechPlan, request: SpeechRequest) -> Result<Self, ApiError> {
        let backend = entry.speech_backend().await?;
        let started = Instant::now();
        let stream = backend.start(request).await.map_err(|e| {
            backend.metrics.reject(submit_reject_reason(&e));
            submit_error(e)
        })?;
        Ok(SpeechJob {
            stream,
            metrics: backend.metrics.clone(),
            started,
            deadline: tokio::time::Instant::from_std(started) + plan.timeout,
            sample_rate: plan.sample_rate,
            frames: 0,
            samples: 0,
            ended: false,
            recorded: false,
        })
    }

    /// Frames generated so far.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Samples sent so far.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Seconds of audio sent so far.
    pub fn duration_s(&self) -> f64 {
        self.samples as f64 / f64::from(self.sample_rate.max(1))
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn record(&mut self, outcome: &str) {
        self.ended = true;
        if !self.recorded {
            self.recorded = true;
            self.metrics.e2e.observe(self.started.elapsed().as_secs_f64());
            self.metrics.request_finished(outcome);
        }
    }

    /// The next event; `None` after `Done` or `Failed`.
    pub async fn next(&mut self) -> Option<SpeechJobEvent> {
        while !self.ended {
            let event = match tokio::time::timeout_at(self.deadline, self.stream.next()).await {
                Err(_) => {
                    self.stream.cancel();
                    if self.frames == 0 {
                        // Never served: as the text routes count a request that timed out queued.
                        self.metrics.rejected(reject_reason::TIMEOUT).inc();
                    }
                    self.record("timeout");
                    return Some(SpeechJobEvent::Done { reason: FinishReason::Timeout });
                }
                Ok(None) => {
                    self.record("error");
                    return Some(SpeechJobEvent::Failed(ApiError::Internal(
                        "the utterance ended without finishing".into(),
                    )));
                }
                Ok(Some(e)) => e,
            };
            match event {
                SpeechEvent::Output(out) => {
                    self.frames = out.frames_total;
                    if out.audio.is_empty() {
                        continue;
                    }
                    if self.samples == 0 {
                        self.metrics.ttfa.observe(self.started.elapsed().as_secs_f64());
                    }
                    self.samples += out.audio.len();
                    self.metrics.audio_seconds.inc_by(out.audio.len() as f64 / f64::from(self.sample_rate.max(1)));
                    return Some(SpeechJobEvent::Audio { samples: out.audio, frames_total: out.frames_total });
                }
                SpeechEvent::Done(reason @ (FinishReason::Stop | FinishReason::Length | FinishReason::Timeout)) => {
                    self.record(reason.as_str());
                    return Some(SpeechJobEvent::Done { reason });
                }
                SpeechEvent::Done(FinishReason::Cancelled) => {
                    self.record("cancelled");
                    return Some(SpeechJobEvent::Failed(ApiError::Unavailable(
                        "the utterance was cancelled (the model is stopping)".into(),
                    )));
                }
                SpeechEvent::Done(FinishReason::Error) => {
                    self.record("error");
                    return Some(SpeechJobEvent::Failed(ApiError::Internal(
                        "the utterance failed in the engine".into(),
                    )));
                }
                SpeechEvent::Failed(message) => {
                    self.record("error");
                    return Some(SpeechJobEvent::Failed(ApiError::Internal(format!(
                        "the utterance failed: {message}"
                    ))));
                }
            }
        }
        None
    }
}

impl Drop for SpeechJob {
    fn drop(&mut self) {
        self.record("cancelled");
    }
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::TooLarge { .. } => ApiError::ContextLength {
            param: "input".into(),
            message: format!("the utterance does not fit the model: {e}"),
        },
        other => other.into(),
    }
}

// --- routes -------------------------------------------------------------------------------------------

/// `POST /v1/audio/speech`: the audio as a chunked body, each chunk sent as soon as its frames
/// are decoded: a WAV header with streaming sizes first (`wav`), then s16le mono PCM. A timeout
/// ends the body early (the audio so far is valid); an engine failure cuts it (the chunked
/// body is not terminated, so clients see an incomplete transfer). Both are logged. A client
/// that goes away cancels the utterance.
pub async fn speech(State(state): State<AppState>, ApiJson(body): ApiJson<SpeechBody>) -> Result<Response, ApiError> {
    let (entry, plan, request) = prepare(&state, &body)?;
    let job = SpeechJob::start(&entry, &plan, request).await?;
    Ok(stream_response(plan, job))
}

fn stream_response(plan: SpeechPlan, job: SpeechJob) -> Response {
    let header = (plan.format == AudioFormat::Wav).then(|| wav_header(plan.sample_rate, None));
    let (model, timeout) = (plan.model.clone(), plan.timeout);
    let body = async_stream::stream! {
        let mut job = job;
        if let Some(h) = header {
            yield Ok::<Bytes, std::io::Error>(Bytes::from(h));
        }
        while let Some(ev) = job.next().await {
            match ev {
                SpeechJobEvent::Audio { samples, .. } => yield Ok(Bytes::from(pcm16(&samples))),
                SpeechJobEvent::Done { reason } => {
                    if reason == FinishReason::Timeout {
                        tracing::warn!(
                            model = %model,
                            timeout_s = timeout.as_secs_f64(),
                            frames = job.frames(),
                            "speech request timed out: its audio ends early"
                        );
                    }
                    break;
                }
                SpeechJobEvent::Failed(e) => {
                    tracing::error!(model = %model, error = %e, frames = job.frames(), "speech request failed mid-stream");
                    yield Err(std::io::Error::other(e.to_string()));
                    break;
                }
            }
        }
    };
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(plan.format.mime()));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-sample-rate", HeaderValue::from(plan.sample_rate));
    h.insert("x-kiln-seed", HeaderValue::from(plan.seed));
    resp
}

/// Renames the parameters of an error (`input` → `text`...), in its `param` and the first
/// mention in its message.
fn rename_params(e: ApiError, names: &[(&str, &str)]) -> ApiError {
    let rename = |param: &str, message: &str| -> Option<(String, String)> {
        let &(from, to) = names.iter().find(|(from, _)| *from == param)?;
        let message = match message.strip_prefix(from) {
            Some(rest) => format!("{to}{rest}"),
            None => message.replacen(&format!("`{from}`"), &format!("`{to}`"), 1),
        };
        Some((to.to_string(), message))
    };
    match e {
        ApiError::InvalidParam { param, message } => match rename(&param, &message) {
            Some((param, message)) => ApiError::InvalidParam { param, message },
            None => ApiError::InvalidParam { param, message },
        },
        ApiError::ContextLength { param, message } => match rename(&param, &message) {
            Some((param, message)) => ApiError::ContextLength { param, message },
            None => ApiError::ContextLength { param, message },
        },
        ApiError::InvalidType { param: Some(param), message } => match rename(&param, &message) {
            Some((param, message)) => ApiError::InvalidType { param: Some(param), message },
            None => ApiError::InvalidType { param: Some(param), message },
        },
        other => other,
    }
}

/// The seed example's names → this route's.
const SIMPLE_NAMES: [(&str, &str); 2] = [("input", "text"), ("voice", "speaker")];

/// `POST /v1/audio/speech/simple`: `{text, speaker, language, instruct}` (top level or in a
/// Runpod envelope `{"input": {...}}`; the other fields of `/v1/audio/speech` are accepted
/// too) → `{audio_base64 (a complete WAV), sample_rate, speaker, language, instruct, text,
/// frames, duration_s, ...}`.
pub async fn simple(State(state): State<AppState>, ApiJson(outer): ApiJson<Value>) -> Result<Json<Value>, ApiError> {
    let Value::Object(mut fields) = outer else {
        return Err(ApiError::InvalidType {
            param: None,
            message: "the body must be a JSON object: {\"text\", \"speaker\", \"language\", \"instruct\"}".into(),
        });
    };
    match fields.remove("input") {
        None | Some(Value::Null) => {}
        Some(Value::Object(inner)) => {
            let model = fields.remove("model");
            fields = inner;
            if let Some(m) = model.filter(|_| !fields.contains_key("model")) {
                fields.insert("model".into(), m);
            }
        }
        Some(other) => {
            return Err(ApiError::InvalidType {
                param: Some("input".into()),
                message: format!(
                    "input must be an object (a Runpod-style envelope of the fields), not {}; the text to speak \
                     goes in `text`",
                    super::types::kind_of(&other)
                ),
            })
        }
    }
    let mut body = Map::new();
    for (k, v) in fields {
        let k = SIMPLE_NAMES.iter().find(|(_, simple)| *simple == k).map_or(k, |(api, _)| api.to_string());
        body.insert(k, v);
    }
    body.remove("response_format");
    let rename = |e| rename_params(e, &SIMPLE_NAMES);
    let body: SpeechBody = from_value(Value::Object(body)).map_err(rename)?;
    let (entry, plan, request) = prepare(&state, &body).map_err(rename)?;
    let mut job = SpeechJob::start(&entry, &plan, request).await?;
    let mut pcm = Vec::new();
    let mut reason = FinishReason::Stop;
    while let Some(ev) = job.next().await {
        match ev {
            SpeechJobEvent::Audio { samples, .. } => pcm.extend_from_slice(&pcm16(&samples)),
            SpeechJobEvent::Done { reason: FinishReason::Timeout } => {
                return Err(ApiError::Timeout { timeout_s: plan.timeout.as_secs_f64() })
            }
            SpeechJobEvent::Done { reason: r } => reason = r,
            SpeechJobEvent::Failed(e) => return Err(e),
        }
    }
    let wav = wav_file(plan.sample_rate, &pcm);
    Ok(Json(json!({
        "audio_base64": base64(&wav),
        "format": "wav",
        "sample_rate": plan.sample_rate,
        "speaker": plan.speaker,
        "language": plan.language,
        "instruct": plan.instruct,
        "instruct_used": plan.instruct_used,
        "text": plan.text,
        "frames": job.frames(),
        "samples": job.samples(),
        "duration_s": job.duration_s(),
        "finish_reason": reason.as_str(),
        "seed": plan.seed,
        "model": entry.name,
        "elapsed_ms": job.elapsed().as_millis() as u64,
    })))
}

/// `GET /v1/audio/voices`: every speech model's speakers, languages and audio format (from
/// its config: the model need not be loaded).
pub async fn voices(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .models
        .iter()
        .filter_map(|m| match &m.kind {
            ModelKind::Speech(s) => Some(json!({
                "model": m.name,
                "demo": m.demo,
                "voices": s.speakers(),
                "languages": s.languages(),
                "default_language": "auto",
                "instruct": s.instruct_supported(),
                "sample_rate": s.sample_rate,
                "samples_per_frame": s.samples_per_frame,
                "frame_rate": f64::from(s.sample_rate) / s.samples_per_frame.max(1) as f64,
                "max_frames": s.frame_cap(0),
                "max_model_len": s.max_model_len,
                "max_speech_chars": s.max_chars,
                "response_formats": FORMATS,
            })),
            _ => None,
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcm16_clips_and_rounds() {
        let b = pcm16(&[0.0, 1.0, -1.0, 2.0, -3.0, 0.5, f32::NAN]);
        let v: Vec<i16> = b.chunks(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(v, [0, 32767, -32767, 32767, -32767, 16384, 0]);
    }

    #[test]
    fn wav_headers() {
        let h = wav_header(24000, None);
        assert_eq!(h.len(), 44);
        assert_eq!(&h[0..4], b"RIFF");
        assert_eq!(&h[4..8], &u32::MAX.to_le_bytes());
        assert_eq!(&h[8..16], b"WAVEfmt ");
        assert_eq!(u32::from_le_bytes(h[24..28].try_into().unwrap()), 24000);
        assert_eq!(u32::from_le_bytes(h[28..32].try_into().unwrap()), 48000);
        assert_eq!(&h[36..40], b"data");
        assert_eq!(&h[40..44], &u32::MAX.to_le_bytes());
        let f = wav_file(16000, &[1, 0, 2, 0]);
        assert_eq!(f.len(), 48);
        assert_eq!(u32::from_le_bytes(f[4..8].try_into().unwrap()), 40);
        assert_eq!(u32::from_le_bytes(f[40..44].try_into().unwrap()), 4);
    }

    #[test]
    fn simple_names_map_back_in_errors() {
        let e = rename_params(ApiError::param("input", "input must be non-empty text"), &SIMPLE_NAMES);
        assert_eq!((e.param_name(), e.to_string().as_str()), (Some("text"), "text must be non-empty text"));
        let e = rename_params(missing("voice"), &SIMPLE_NAMES);
        assert_eq!(e.param_name(), Some("speaker"));
        let e = rename_params(ApiError::param("seed", "bad seed"), &SIMPLE_NAMES);
        assert_eq!(e.param_name(), Some("seed"));
    }
}
