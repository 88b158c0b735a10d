//! Image generation (docs/images.md): `POST /v1/images/generations` (OpenAI's shape, JSON or
//! an SSE stream of denoising steps), `POST /v1/images/edits` (multipart img2img),
//! `POST /v1/images/simple` (the seed example's flat input), `GET /v1/images/{id}.png` (images
//! kept for `response_format: "url"`), and the pieces the WebSocket `image` message shares.
//!
//! A request becomes an [`ImagePlan`] and one `ImageRequest` per image (validation), then an
//! [`ImageJob`]: the images' engine events as API events (PNG-encoded), with the request's
//! deadline and its metrics. Dropping a job cancels its images.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures::Stream;
use image::ImageEncoder as _;
use kiln_actors::metrics::reject_reason;
use kiln_actors::request::submit_reject_reason;
use kiln_actors::{
    img2img_steps, FinishReason, ImageEvent, ImageRequest, ImageStream, InitImage, ModelMetrics, RgbImage, SubmitError,
};
use serde::Deserialize;
use serde_json::{json, Map, Number, Value};

use super::{from_value, ApiJson};
use crate::api::openai::missing;
use crate::error::ApiError;
use crate::server::{unix_now, AppState, ImageModel, ModelEntry};
use crate::upload::{self, MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS};
use crate::validation::request_timeout;

/// Most images one request may ask for (`n`).
pub const MAX_N: i64 = 8;
/// `guidance_scale` range and default (diffusers' default for SD).
pub const MAX_GUIDANCE: f64 = 50.0;
pub const DEFAULT_GUIDANCE: f32 = 7.5;
/// `strength` of `/v1/images/edits` when none is given (diffusers' default).
pub const DEFAULT_STRENGTH: f64 = 0.8;

/// The body of `/v1/images/generations` and of a WebSocket `image` message; the text fields of
/// `/v1/images/edits`. Unknown fields are ignored (OpenAI clients send `quality`, `style`...).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageBody {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub n: Option<i64>,
    /// `"WxH"`; default: the model's trained size (edits: the uploaded image's size).
    pub size: Option<String>,
    /// `b64_json` (default) or `url`.
    pub response_format: Option<String>,
    /// Only `png` is produced.
    pub output_format: Option<String>,
    /// Accepted and ignored.
    pub user: Option<String>,
    pub negative_prompt: Option<String>,
    pub steps: Option<i64>,
    /// diffusers' name for `steps`.
    pub num_inference_steps: Option<i64>,
    pub guidance_scale: Option<f64>,
    pub scheduler: Option<String>,
    /// Any u64; default: random (the response says which).
    pub seed: Option<Number>,
    pub stream: Option<bool>,
    /// With `stream`: a preview every this many steps (0: none).
    pub preview_every: Option<i64>,
    /// Seconds, as for the text routes; capped by `server.request_timeout_s`.
    pub timeout: Option<f64>,
    /// Edits only: how much of the schedule runs, in (0, 1].
    pub strength: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    B64Json,
    Url,
}

/// Everything a validated request says, but the images' own inputs.
#[derive(Debug, Clone)]
pub struct ImagePlan {
    pub model: String,
    pub n: usize,
    pub width: usize,
    pub height: usize,
    /// Steps of the schedule (`num_inference_steps`).
    pub steps: usize,
    /// Steps each image runs: `steps`, or `floor(steps * strength)` for img2img.
    pub denoising_steps: usize,
    pub guidance_scale: f32,
    /// The scheduler used, by name.
    pub scheduler: String,
    /// Image `i` uses `seed + i` (wrapping).
    pub seed: u64,
    pub format: ResponseFormat,
    pub stream: bool,
    pub preview_every: usize,
    pub timeout: Duration,
    pub strength: Option<f64>,
    /// The prompt had more tokens than the text encoder reads (the rest was cut).
    pub prompt_truncated: bool,
}

impl ImagePlan {
    pub fn seed_of(&self, index: usize) -> u64 {
        self.seed.wrapping_add(index as u64)
    }

    pub fn size(&self) -> String {
        format!("{}x{}", self.width, self.height)
    }

    /// The response's `kiln` object.
    pub fn summary(&self, elapsed: Duration) -> Value {
        let mut v = json!({
            "model": self.model,
            "seed": self.seed,
            "size": self.size(),
            "steps": self.steps,
            "denoising_steps": self.denoising_steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
            "prompt_truncated": self.prompt_truncated,
            "elapsed_ms": elapsed.as_millis() as u64,
        });
        if let Some(s) = self.strength {
            v["strength"] = json!(s);
        }
        v
    }
}

fn int_param(param: &str, v: Option<i64>, min: i64, max: i64) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if (min..=max).contains(&x) => Ok(Some(x as usize)),
        Some(x) => Err(ApiError::param(param, format!("{param} must be between {min} and {max}, got {x}"))),
    }
}

/// `"WxH"` (also `"W*H"`) in pixels.
pub fn parse_size(s: &str) -> Result<(usize, usize), ApiError> {
    let bad =
        || ApiError::param("size", format!("size must be \"WIDTHxHEIGHT\" in pixels (e.g. \"512x512\"), got {s:?}"));
    let (w, h) = s.trim().split_once(['x', 'X', '*']).ok_or_else(bad)?;
    let side = |t: &str| t.trim().parse::<usize>().ok().filter(|&v| v > 0);
    Ok((side(w).ok_or_else(bad)?, side(h).ok_or_else(bad)?))
}

/// The model's size rules, for messages.
fn size_rules(model: &ImageModel) -> String {
    format!(
        "width and height must be multiples of {} between {} and {}, with width x height at most {} pixels \
         (the model's default is {}x{})",
        model.info.size_multiple,
        model.info.size_multiple,
        model.max_side,
        model.max_pixels,
        model.info.default_width,
        model.info.default_height
    )
}

/// Checks a size against the model's limits; `what` names it in the message.
pub fn check_size(model: &ImageModel, width: usize, height: usize, param: &str, what: &str) -> Result<(), ApiError> {
    let m = model.info.size_multiple.max(1);
    let ok = |v: usize| v >= m && v.is_multiple_of(m) && v <= model.max_side;
    if ok(width) && ok(height) && width * height <= model.max_pixels {
        return Ok(());
    }
    Err(ApiError::param(param, format!("{what} {width}x{height} is not allowed: {}", size_rules(model))))
}

/// What a request asks for, checked against `model`: the plan and one request per image.
/// `size` is already checked (`check_size`); `init` is the edit's image at that size.
/// `previews_allowed`: streaming (SSE or WebSocket).
pub fn validate(
    body: &ImageBody,
    model: &ImageModel,
    (width, height): (usize, usize),
    init: Option<RgbImage>,
    previews_allowed: bool,
    server_timeout: Duration,
) -> Result<(ImagePlan, Vec<ImageRequest>), ApiError> {
    let prompt = body.prompt.as_deref().ok_or_else(|| missing("prompt"))?;
    if prompt.trim().is_empty() {
        return Err(ApiError::param("prompt", "prompt must be a non-empty string"));
    }
    let n = int_param("n", body.n, 1, MAX_N)?.unwrap_or(1);
    let max_steps = model.max_steps as i64;
    let steps = match (body.steps, body.num_inference_steps) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::param("steps", "give steps or num_inference_steps (the same thing), not both"))
        }
        (Some(s), _) => int_param("steps", Some(s), 1, max_steps)?,
        (None, Some(s)) => int_param("num_inference_steps", Some(s), 1, max_steps)?,
        (None, None) => None,
    }
    .unwrap_or(model.default_steps);
    let guidance_scale = match body.guidance_scale {
        None => DEFAULT_GUIDANCE,
        Some(g) if g.is_finite() && (0.0..=MAX_GUIDANCE).contains(&g) => g as f32,
        Some(g) => {
            return Err(ApiError::param(
                "guidance_scale",
                format!("guidance_scale must be between 0 and {MAX_GUIDANCE} (<= 1 disables guidance), got {g}"),
            ))
        }
    };
    let scheduler = match body.scheduler.as_deref() {
        None => scheduler_name(&model.info.scheduler),
        Some(name) => kiln_models::diffusion::scheduler_config(&model.info.scheduler, Some(name))
            .map(|cfg| scheduler_name(&cfg))
            .map_err(|e| {
                ApiError::param(
                    "scheduler",
                    format!(
                        "unknown scheduler {name:?} ({e}); allowed: {}",
                        kiln_models::diffusion::scheduler_names().join(", ")
                    ),
                )
            })?,
    };
    let seed = match &body.seed {
        None => u64::from(rand::random::<u32>()),
        Some(s) => s.as_u64().ok_or_else(|| {
            ApiError::param("seed", format!("seed must be an integer between 0 and {}, got {s}", u64::MAX))
        })?,
    };
    let format = match body.response_format.as_deref() {
        None | Some("b64_json") => ResponseFormat::B64Json,
        Some("url") => ResponseFormat::Url,
        Some(other) => {
            return Err(ApiError::param(
                "response_format",
                format!("response_format must be \"b64_json\" or \"url\", got {other:?}"),
            ))
        }
    };
    if let Some(f) = body.output_format.as_deref().filter(|f| !f.eq_ignore_ascii_case("png")) {
        return Err(ApiError::param("output_format", format!("only \"png\" output is produced, got {f:?}")));
    }
    let stream = body.stream.unwrap_or(false);
    let preview_every = int_param("preview_every", body.preview_every, 0, i64::MAX)?.unwrap_or(0);
    if preview_every > 0 && !previews_allowed {
        return Err(ApiError::param("preview_every", "previews are sent only when streaming: add \"stream\": true"));
    }
    let timeout = request_timeout("timeout", body.timeout)?.map_or(server_timeout, |t| t.min(server_timeout));
    let strength = match (&init, body.strength) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ApiError::param("strength", "strength applies to /v1/images/edits (image to image) only"))
        }
        (Some(_), None) => Some(DEFAULT_STRENGTH),
        (Some(_), Some(s)) if s.is_finite() && s > 0.0 && s <= 1.0 => Some(s),
        (Some(_), Some(s)) => return Err(ApiError::param("strength", format!("strength must be in (0, 1], got {s}"))),
    };
    let denoising_steps = match strength {
        None => steps,
        Some(s) => {
            let run = img2img_steps(steps, s);
            if run == 0 {
                return Err(ApiError::param(
                    "strength",
                    format!("steps x strength runs no step: floor({steps} x {s}) = 0; raise steps or strength"),
                ));
            }
            run
        }
    };
    let (prompt_ids, prompt_len) = model.tokenizer.encode(prompt).map_err(|e| ApiError::param("prompt", e))?;
    let (negative_ids, _) = model
        .tokenizer
        .encode(body.negative_prompt.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::param("negative_prompt", e))?;
    let plan = ImagePlan {
        model: String::new(),
        n,
        width,
        height,
        steps,
        denoising_steps,
        guidance_scale,
        scheduler: scheduler.clone(),
        seed,
        format,
        stream,
        preview_every,
        timeout,
        strength,
        prompt_truncated: prompt_len > prompt_ids.len(),
    };
    let init = init.zip(strength).map(|(image, strength)| InitImage { image, strength });
    let requests = (0..n)
        .map(|i| ImageRequest {
            prompt_ids: prompt_ids.clone(),
            negative_ids: negative_ids.clone(),
            width,
            height,
            steps,
            guidance_scale,
            scheduler: body.scheduler.is_some().then(|| scheduler.clone()),
            seed: plan.seed_of(i),
            init_image: init.clone(),
            preview_every,
        })
        .collect();
    Ok((plan, requests))
}

/// A scheduler's canonical name (`euler_a`, `dpmpp_2m_karras`...), as `scheduler_names` lists.
fn scheduler_name(cfg: &kiln_models::schedulers::SchedulerConfig) -> String {
    let karras = if cfg.use_karras_sigmas { "_karras" } else { "" };
    format!("{}{karras}", cfg.kind.name())
}

/// PNG bytes of an RGB image.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&img.data, img.width as u32, img.height as u32, image::ExtendedColorType::Rgb8)
        .map_err(|e| format!("encoding the PNG: {e}"))?;
    Ok(out)
}

async fn encode_png_off_thread(img: RgbImage) -> Result<Vec<u8>, String> {
    tokio::task::spawn_blocking(move || encode_png(&img)).await.map_err(|e| format!("encoding the PNG: {e}"))?
}

pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// What one image request produces, in order per image: its steps, then its image (or a
/// failure).
#[derive(Debug)]
pub enum JobEvent {
    Step {
        index: usize,
        step: usize,
        total: usize,
        timestep: f32,
        elapsed_ms: u64,
        preview: Option<Vec<u8>>,
    },
    Image {
        index: usize,
        seed: u64,
        png: Vec<u8>,
    },
    /// The image ended without a result; the others go on.
    Failed {
        index: usize,
        error: ApiError,
    },
    /// The deadline passed: the images still running (`pending`) were cancelled; the job is over.
    TimedOut {
        pending: Vec<usize>,
        error: ApiError,
    },
}

/// The running images of one request. Dropping it cancels them and counts the request as
/// cancelled (unless it already ended).
pub struct ImageJob {
    stream: ImageStream<kiln_models::DiffusionEngine>,
    metrics: ModelMetrics,
    started: Instant,
    deadline: tokio::time::Instant,
    timeout: Duration,
    seeds: Vec<u64>,
    open: Vec<bool>,
    queued: VecDeque<JobEvent>,
    stepped: bool,
    failed: bool,
    recorded: bool,
}

impl ImageJob {
    /// Loads the model if needed and submits every image; a full queue is a 429.
    pub async fn start(
        entry: &Arc<ModelEntry>,
        plan: &ImagePlan,
        requests: Vec<ImageRequest>,
    ) -> Result<Self, ApiError> {
        let backend = entry.image_backend().await?;
        let started = Instant::now();
        let stream = backend.start(requests).await.map_err(|e| {
            backend.metrics.reject(submit_reject_reason(&e));
            submit_error(e)
        })?;
        Ok(ImageJob {
            stream,
            metrics: backend.metrics.clone(),
            started,
            deadline: tokio::time::Instant::from_std(started) + plan.timeout,
            timeout: plan.timeout,
            seeds: (0..plan.n).map(|i| plan.seed_of(i)).collect(),
            open: vec![true; plan.n],
            queued: VecDeque::new(),
            stepped: false,
            failed: false,
            recorded: false,
        })
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn record(&mut self, outcome: &str) {
        if !self.recorded {
            self.recorded = true;
            self.metrics.e2e.observe(self.started.elapsed().as_secs_f64());
            self.metrics.request_finished(outcome);
        }
    }

    fn close(&mut self, index: usize) -> bool {
        self.open.get_mut(index).map(std::mem::take).unwrap_or(false)
    }

    fn fail(&mut self, index: usize, error: ApiError) -> Option<JobEvent> {
        self.close(index).then(|| {
            self.failed = true;
            JobEvent::Failed { index, error }
        })
    }

    /// The next event; `None` once every image has ended.
    pub async fn next(&mut self) -> Option<JobEvent> {
        loop {
            if let Some(e) = self.queued.pop_front() {
                return Some(e);
            }
            if !self.open.contains(&true) {
                self.record(if self.failed { "error" } else { "stop" });
                return None;
            }
            let event = match tokio::time::timeout_at(self.deadline, self.stream.next()).await {
                Err(_) => {
                    self.stream.cancel();
                    let pending: Vec<usize> = (0..self.open.len()).filter(|&i| self.open[i]).collect();
                    self.open.iter_mut().for_each(|o| *o = false);
                    if !self.stepped {
                        // Never served: as the text routes count a request that timed out queued.
                        self.metrics.rejected(reject_reason::TIMEOUT).inc();
                    }
                    self.record("timeout");
                    let error = ApiError::Timeout { timeout_s: self.timeout.as_secs_f64() };
                    return Some(JobEvent::TimedOut { pending, error });
                }
                Ok(None) => {
                    let pending: Vec<usize> = (0..self.open.len()).filter(|&i| self.open[i]).collect();
                    for index in pending {
                        let e = ApiError::Internal(format!("image {index} ended without finishing"));
                        if let Some(ev) = self.fail(index, e) {
                            self.queued.push_back(ev);
                        }
                    }
                    continue;
                }
                Ok(Some(e)) => e,
            };
            match event {
                ImageEvent::Step { index, output } => {
                    if !self.open.get(index).copied().unwrap_or(false) {
                        continue;
                    }
                    self.stepped = true;
                    let preview = match output.preview {
                        Some(p) => encode_png_off_thread(p).await.ok(),
                        None => None,
                    };
                    self.queued.push_back(JobEvent::Step {
                        index,
                        step: output.step,
                        total: output.total,
                        timestep: output.timestep,
                        elapsed_ms: self.started.elapsed().as_millis() as u64,
                        preview,
                    });
                    if let Some(img) = output.image {
                        let ev = match encode_png_off_thread(img).await {
                            Ok(png) => {
                                self.close(index);
                                Some(JobEvent::Image { index, seed: self.seeds[index], png })
                            }
                            Err(e) => self.fail(index, ApiError::Internal(e)),
                        };
                        self.queued.extend(ev);
                    }
                }
                ImageEvent::Ended { index, reason } => {
                    let e = match reason {
                        FinishReason::Timeout => ApiError::Timeout { timeout_s: self.timeout.as_secs_f64() },
                        FinishReason::Cancelled => {
                            ApiError::Unavailable(format!("image {index} was cancelled (the model is stopping)"))
                        }
                        other => {
                            ApiError::Internal(format!("image {index} ended without an image ({})", other.as_str()))
                        }
                    };
                    let ev = self.fail(index, e);
                    self.queued.extend(ev);
                }
                ImageEvent::Failed { index, message } => {
                    let ev = self.fail(index, ApiError::Internal(format!("image {index} failed: {message}")));
                    self.queued.extend(ev);
                }
            }
        }
    }
}

impl Drop for ImageJob {
    fn drop(&mut self) {
        let outcome = if self.failed { "error" } else { "cancelled" };
        self.record(outcome);
    }
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::TooLarge { .. } => ApiError::param("steps", format!("the request does not fit the model: {e}")),
        other => other.into(),
    }
}

/// The `data` item of one finished image: `b64_json` or a stored image's `url`.
pub fn image_item(state: &AppState, format: ResponseFormat, seed: u64, png: Vec<u8>) -> Value {
    match format {
        ResponseFormat::B64Json => json!({"b64_json": base64(&png), "seed": seed}),
        ResponseFormat::Url => json!({"url": format!("/v1/images/{}.png", state.images.insert(png)), "seed": seed}),
    }
}

/// Runs a job to the end and builds the JSON response; the first failure fails the request.
async fn collect(state: &AppState, plan: &ImagePlan, mut job: ImageJob) -> Result<Value, ApiError> {
    let mut data = vec![Value::Null; plan.n];
    while let Some(ev) = job.next().await {
        match ev {
            JobEvent::Step { .. } => {}
            JobEvent::Image { index, seed, png } => data[index] = image_item(state, plan.format, seed, png),
            JobEvent::Failed { error, .. } | JobEvent::TimedOut { error, .. } => return Err(error),
        }
    }
    Ok(json!({
        "created": unix_now(),
        "data": data,
        "size": plan.size(),
        "output_format": "png",
        "kiln": plan.summary(job.elapsed()),
    }))
}

fn sse_event(name: &str, v: &Value) -> Event {
    Event::default().event(name).data(v.to_string())
}

/// The step event's fields (SSE `step` and WebSocket `image_step`).
pub fn step_fields(
    index: usize,
    step: usize,
    total: usize,
    timestep: f32,
    elapsed_ms: u64,
    preview: Option<&[u8]>,
) -> Value {
    let mut v = json!({"index": index, "step": step, "total": total, "timestep": timestep, "elapsed_ms": elapsed_ms});
    if let Some(p) = preview {
        v["preview"] = json!(base64(p));
    }
    v
}

/// `event: step` per denoising step, `event: image` per finished image, `event: error` for a
/// failed image (or the deadline), then `event: done` with `data: [DONE]`. The stream owns the
/// job: a client that goes away cancels the images.
fn event_stream(state: AppState, plan: ImagePlan, job: ImageJob) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream::stream! {
        let mut job = job;
        while let Some(ev) = job.next().await {
            match ev {
                JobEvent::Step { index, step, total, timestep, elapsed_ms, preview } => {
                    let mut v = step_fields(index, step, total, timestep, elapsed_ms, preview.as_deref());
                    v["type"] = json!("step");
                    yield Ok(sse_event("step", &v));
                }
                JobEvent::Image { index, seed, png } => {
                    let mut v = image_item(&state, plan.format, seed, png);
                    v["type"] = json!("image");
                    v["index"] = json!(index);
                    yield Ok(sse_event("image", &v));
                }
                JobEvent::Failed { index, error } => {
                    let mut v = error.body();
                    v["index"] = json!(index);
                    yield Ok(sse_event("error", &v));
                }
                JobEvent::TimedOut { error, .. } => yield Ok(sse_event("error", &error.body())),
            }
        }
        yield Ok(Event::default().event("done").data("[DONE]"));
    }
}

async fn respond(
    state: &AppState,
    entry: &Arc<ModelEntry>,
    mut plan: ImagePlan,
    requests: Vec<ImageRequest>,
) -> Result<Response, ApiError> {
    plan.model = entry.name.clone();
    let job = ImageJob::start(entry, &plan, requests).await?;
    if plan.stream {
        let events = event_stream(state.clone(), plan, job);
        Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
    } else {
        Ok(Json(collect(state, &plan, job).await?).into_response())
    }
}

/// Validates a generations body (no init image): the model entry, plan and requests.
pub fn prepare(
    state: &AppState,
    body: &ImageBody,
    previews_allowed: bool,
) -> Result<(Arc<ModelEntry>, ImagePlan, Vec<ImageRequest>), ApiError> {
    let entry = state.resolve_model(body.model.as_deref())?;
    let model = entry.image_model()?;
    let size = match &body.size {
        Some(s) => parse_size(s)?,
        None => (model.info.default_width, model.info.default_height),
    };
    check_size(model, size.0, size.1, "size", "size")?;
    let (mut plan, requests) = validate(body, model, size, None, previews_allowed, state.limits.request_timeout)?;
    plan.model = entry.name.clone();
    Ok((entry, plan, requests))
}

/// `POST /v1/images/generations`.
pub async fn generations(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ImageBody>,
) -> Result<Response, ApiError> {
    let stream = body.stream.unwrap_or(false);
    let (entry, plan, requests) = prepare(&state, &body, stream)?;
    respond(&state, &entry, plan, requests).await
}

/// `GET /v1/images/{id}.png`: an image kept for `response_format: "url"`.
pub async fn stored_image(State(state): State<AppState>, Path(file): Path<String>) -> Result<Response, ApiError> {
    let not_found = || {
        ApiError::NotFound(format!(
            "no image {file:?}: unknown, or expired (images are kept {} s)",
            state.images.ttl().as_secs()
        ))
    };
    let id = file.strip_suffix(".png").ok_or_else(not_found)?;
    let png = state.images.get(id).ok_or_else(not_found)?;
    Ok(([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "private, max-age=3600")], png).into_response())
}

// --- edits (multipart) ---------------------------------------------------------------------------

/// Multipart fields read as numbers or booleans; the rest are strings.
const INT_FIELDS: [&str; 4] = ["n", "steps", "num_inference_steps", "preview_every"];
const FLOAT_FIELDS: [&str; 3] = ["guidance_scale", "strength", "timeout"];

fn field_value(name: &str, text: &str) -> Result<Value, ApiError> {
    let t = text.trim();
    let bad = |what: &str| ApiError::InvalidType {
        param: Some(name.to_string()),
        message: format!("{name}: expected {what}, got {text:?}"),
    };
    Ok(if INT_FIELDS.contains(&name) {
        json!(t.parse::<i64>().map_err(|_| bad("an integer"))?)
    } else if FLOAT_FIELDS.contains(&name) {
        json!(t.parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(|| bad("a number"))?)
    } else if name == "seed" {
        match t.parse::<u64>() {
            Ok(s) => json!(s),
            Err(_) => json!(t.parse::<i64>().map_err(|_| bad("an integer"))?),
        }
    } else if name == "stream" {
        match t.to_ascii_lowercase().as_str() {
            "true" | "1" => json!(true),
            "false" | "0" | "" => json!(false),
            _ => return Err(bad("true or false")),
        }
    } else {
        json!(text)
    })
}

fn multipart_error(e: MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit: MAX_UPLOAD_BYTES }
    } else {
        ApiError::param("image", format!("the multipart/form-data body could not be read: {}", e.body_text()))
    }
}

/// The uploaded file and the other fields of an edits body.
async fn read_edit_form(mut form: Multipart) -> Result<(Vec<u8>, ImageBody), ApiError> {
    let mut image: Option<Vec<u8>> = None;
    let mut fields = Map::new();
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "image" | "image[]" => {
                if image.is_some() {
                    return Err(ApiError::param("image", "give one image (several images are not supported)"));
                }
                image = Some(field.bytes().await.map_err(multipart_error)?.to_vec());
            }
            "mask" => {
                return Err(ApiError::Unsupported(
                    "mask (inpainting) is not supported: the whole image is re-generated with `strength`".into(),
                ))
            }
            _ => {
                let text = field.text().await.map_err(multipart_error)?;
                fields.insert(name.clone(), field_value(&name, &text)?);
            }
        }
    }
    let image = image.ok_or_else(|| missing("image"))?;
    Ok((image, from_value(Value::Object(fields))?))
}

/// Decodes an upload off the runtime's threads; a decoder panic is a corrupt file.
async fn decode_upload(bytes: Vec<u8>) -> Result<image::RgbImage, ApiError> {
    let decoded = tokio::task::spawn_blocking(move || upload::decode(&bytes, MAX_UPLOAD_PIXELS))
        .await
        .map_err(|_| ApiError::param("image", "the image could not be decoded (corrupt file)"))?
        .map_err(|e| ApiError::param("image", e.to_string()))?;
    Ok(decoded.image)
}

/// `POST /v1/images/edits`: multipart `image` + the generation fields + `strength` (img2img).
pub async fn edits(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    // Refused before a byte of the body is read.
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_UPLOAD_BYTES as u64) {
        return Err(ApiError::PayloadTooLarge { limit: MAX_UPLOAD_BYTES });
    }
    let form = form.map_err(|r| {
        ApiError::Unsupported(format!(
            "/v1/images/edits takes a multipart/form-data body with an `image` file and a `prompt`: {}",
            r.body_text()
        ))
    })?;
    let (bytes, body) = read_edit_form(form).await?;
    let entry = state.resolve_model(body.model.as_deref())?;
    let model = entry.image_model()?;
    let uploaded = decode_upload(bytes).await?;
    let (uw, uh) = (uploaded.width() as usize, uploaded.height() as usize);
    let size = match &body.size {
        Some(s) => {
            let size = parse_size(s)?;
            check_size(model, size.0, size.1, "size", "size")?;
            size
        }
        None => {
            check_size(model, uw, uh, "size", "the uploaded image's size (used when `size` is not given)")
                .map_err(|e| ApiError::param("size", format!("{e}; give `size` and the image is resized to it")))?;
            (uw, uh)
        }
    };
    let resized = upload::resize(uploaded, size.0 as u32, size.1 as u32);
    let init = RgbImage { width: size.0, height: size.1, data: resized.into_raw() };
    let stream = body.stream.unwrap_or(false);
    let (plan, requests) = validate(&body, model, size, Some(init), stream, state.limits.request_timeout)?;
    respond(&state, &entry, plan, requests).await
}

// --- the seed example's simple input -------------------------------------------------------------

/// `/v1/images/simple`: flat fields, top level or in a Runpod envelope `{"input": {...}}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SimpleImageBody {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub num_steps: Option<i64>,
    pub guidance_scale: Option<f64>,
    pub seed: Option<Number>,
    pub scheduler: Option<String>,
    pub timeout: Option<f64>,
    pub input: Option<Value>,
}

/// `POST /v1/images/simple` → `{"image_base64", "width", "height", "seed", "steps", "elapsed_ms"}`.
pub async fn simple(
    State(state): State<AppState>,
    ApiJson(outer): ApiJson<SimpleImageBody>,
) -> Result<Json<Value>, ApiError> {
    let body = match outer.input.clone() {
        None => outer,
        Some(v @ Value::Object(_)) => {
            let inner: SimpleImageBody = from_value(v).map_err(|e| match e {
                ApiError::InvalidType { param, message } => {
                    ApiError::InvalidType { param: Some(format!("input.{}", param.unwrap_or_default())), message }
                }
                other => other,
            })?;
            SimpleImageBody { model: inner.model.clone().or(outer.model), ..inner }
        }
        Some(other) => {
            return Err(ApiError::InvalidType {
                param: Some("input".into()),
                message: format!("input must be an object, not {}", super::types::kind_of(&other)),
            })
        }
    };
    let entry = state.resolve_model(body.model.as_deref())?;
    let model = entry.image_model()?;
    let side = |param: &str, v: Option<i64>, default: usize| match v {
        None => Ok(default),
        Some(x) if x > 0 => Ok(x as usize),
        Some(x) => Err(ApiError::param(param, format!("{param} must be a positive number of pixels, got {x}"))),
    };
    let width = side("width", body.width, model.info.default_width)?;
    let height = side("height", body.height, model.info.default_height)?;
    check_size(model, width, height, "width", "size")?;
    let image_body = ImageBody {
        prompt: body.prompt,
        negative_prompt: body.negative_prompt,
        steps: body.num_steps,
        guidance_scale: body.guidance_scale,
        seed: body.seed,
        scheduler: body.scheduler,
        timeout: body.timeout,
        ..ImageBody::default()
    };
    let (mut plan, requests) = validate(&image_body, model, (width, height), None, false, state.limits.request_timeout)
        .map_err(|e| rename_param(e, "steps", "num_steps"))?;
    plan.model = entry.name.clone();
    let job = ImageJob::start(&entry, &plan, requests).await?;
    let v = collect(&state, &plan, job).await?;
    Ok(Json(json!({
        "image_base64": v["data"][0]["b64_json"],
        "width": width,
        "height": height,
        "seed": plan.seed,
        "steps": plan.steps,
        "elapsed_ms": v["kiln"]["elapsed_ms"],
        "model": entry.name,
    })))
}

fn rename_param(e: ApiError, from: &str, to: &str) -> ApiError {
    match e {
        ApiError::InvalidParam { param, message } if param == from => {
            ApiError::InvalidParam { param: to.to_string(), message: message.replacen(from, to, 1) }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512x768").unwrap(), (512, 768));
        assert_eq!(parse_size(" 64 X 32 ").unwrap(), (64, 32));
        assert_eq!(parse_size("64*32").unwrap(), (64, 32));
        for bad in ["", "512", "x512", "0x64", "-8x8", "axb", "1.5x2"] {
            let e = parse_size(bad).unwrap_err();
            assert_eq!(e.param_name(), Some("size"), "{bad}");
        }
    }

    #[test]
    fn img2img_steps_match_the_engine() {
        assert_eq!(img2img_steps(10, 0.8), 8);
        // Python floats: int(10 * 0.7) = 7 (an f32 0.7 would give 6).
        assert_eq!(img2img_steps(10, 0.7), 7);
        assert_eq!(img2img_steps(3, 0.3), 0, "3 * 0.3 = 0.8999999999999999");
        assert_eq!(img2img_steps(4, 0.2), 0);
        assert_eq!(img2img_steps(7, 1.0), 7);
    }

    #[test]
    fn multipart_fields_take_their_types() {
        assert_eq!(field_value("n", " 2 ").unwrap(), json!(2));
        assert_eq!(field_value("strength", "0.5").unwrap(), json!(0.5));
        assert_eq!(field_value("seed", "18446744073709551615").unwrap(), json!(u64::MAX));
        assert_eq!(field_value("stream", "true").unwrap(), json!(true));
        assert_eq!(field_value("prompt", " a cat ").unwrap(), json!(" a cat "));
        let e = field_value("steps", "many").unwrap_err();
        assert_eq!((e.status(), e.param_name()), (StatusCode::UNPROCESSABLE_ENTITY, Some("steps")));
        assert!(field_value("strength", "NaN").is_err());
    }

    #[test]
    fn png_encoding_round_trips() {
        let img = RgbImage { width: 3, height: 2, data: (0..18).collect() };
        let png = encode_png(&img).unwrap();
        let back = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap().into_rgb8();
        assert_eq!((back.width(), back.height()), (3, 2));
        assert_eq!(back.into_raw(), img.data);
    }
}
