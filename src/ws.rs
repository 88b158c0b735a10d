//! `GET /v1/ws`: several generations multiplexed on one WebSocket by client-chosen ids.
//! The protocol (docs/websocket.md) is written over any `Sink<Message>` / `Stream` so tests
//! drive it with channels.
//!
//! Client → server: `{"type":"generate","id":..., <chat or completions fields>}`,
//! `{"type":"embed","id":..., <embeddings fields>}`, `{"type":"image","id":..., <image generation
//! fields>}`, `{"type":"speech","id":..., <audio/speech fields>}`, `{"type":"cancel","id":...}`.
//! Server → client: `token`, `done`, `embedding`, `image_step`, `image`, `audio` (each followed
//! by one binary message of PCM), `audio_done`, `error` events.
//! Closing the socket cancels every generation it started (their receivers are dropped).

use std::collections::HashMap;
use std::fmt::Display;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::{Sink, SinkExt, Stream, StreamExt};
use kiln_actors::ClientEvent;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::api::audio::{self, SpeechBody, SpeechJob, SpeechJobEvent};
use crate::api::embeddings::{embed, EmbeddingBody};
use crate::api::from_value;
use crate::api::images::{image_item, prepare, step_fields, ImageBody, ImageJob, JobEvent};
use crate::api::openai::{missing, submit};
use crate::api::types::CompletionBody;
use crate::error::ApiError;
use crate::server::AppState;
use crate::validation::{chat_messages, completion_prompt, validate, Endpoint, PromptSpec};

pub async fn ws_handler(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    let max = state.limits.max_body_bytes;
    ws.max_message_size(max).max_frame_size(max).on_upgrade(move |socket: WebSocket| async move {
        let (sink, stream) = socket.split();
        run_session(state, sink, stream).await;
    })
}

/// What generation tasks hand the session's writer.
struct Outgoing {
    event: Value,
    /// A binary message sent right after `event` (a speech request's PCM).
    binary: Option<Vec<u8>>,
    /// Set on a generation's last event: its id leaves the active set when this is written.
    finished: Option<String>,
}

struct ActiveGeneration {
    cancel: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Runs one socket's session until the client closes it or the connection fails.
pub async fn run_session<Si, St, E>(state: AppState, mut sink: Si, mut stream: St)
where
    Si: Sink<Message> + Unpin + Send,
    St: Stream<Item = Result<Message, E>> + Unpin + Send,
    E: Display,
{
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(256);
    let mut active: HashMap<String, ActiveGeneration> = HashMap::new();
    loop {
        tokio::select! {
            msg = stream.next() => {
                let text = match msg {
                    None => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "websocket receive failed");
                        break;
                    }
                    Some(Ok(Message::Close(_))) => break,
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        let e = error_event(None, "invalid_message", "binary messages are not supported: send JSON text");
                        if sink.send(text_message(&e)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    Some(Ok(_)) => continue,
                };
                if let Some(reply) = handle_message(&state, text.as_str(), &mut active, &out_tx) {
                    if sink.send(text_message(&reply)).await.is_err() {
                        break;
                    }
                }
            }
            Some(out) = out_rx.recv() => {
                if let Some(id) = out.finished {
                    active.remove(&id);
                }
                if sink.send(text_message(&out.event)).await.is_err() {
                    break;
                }
                if let Some(bytes) = out.binary {
                    if sink.send(Message::Binary(bytes.into())).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    // Aborting a task drops its receiver, which cancels its sequences.
    for (_, g) in active.drain() {
        g.task.abort();
    }
}

fn text_message(v: &Value) -> Message {
    Message::Text(v.to_string().into())
}

pub fn error_event(id: Option<&str>, code: &str, message: &str) -> Value {
    let mut v = json!({"type": "error", "code": code, "message": message});
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    v
}

/// Handles one client message; returns an immediate reply (an error event), if any.
fn handle_message(
    state: &AppState,
    text: &str,
    active: &mut HashMap<String, ActiveGeneration>,
    out: &mpsc::Sender<Outgoing>,
) -> Option<Value> {
    let mut msg: serde_json::Map<String, Value> = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Some(error_event(None, "invalid_message", "a message must be a JSON object with a `type`")),
        Err(e) => return Some(error_event(None, "invalid_json", &format!("invalid JSON: {e}"))),
    };
    let id = match msg.remove("id") {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let kind = msg.remove("type");
    let Some(kind) = kind.as_ref().and_then(Value::as_str) else {
        return Some(error_event(
            id.as_deref(),
            "invalid_message",
            "missing `type`: expected \"generate\", \"embed\", \"image\", \"speech\" or \"cancel\"",
        ));
    };
    match kind {
        "generate" | "embed" | "image" | "speech" => {
            let Some(id) = id else {
                return Some(error_event(
                    None,
                    "invalid_message",
                    &format!("a {kind} message needs a non-empty string `id`"),
                ));
            };
            if crate::api::is_draining(state) {
                let e = ApiError::Draining { retry_after_s: crate::api::DRAINING_RETRY_AFTER_S };
                return Some(api_error_event(&id, &e));
            }
            if active.contains_key(&id) {
                return Some(error_event(
                    Some(&id),
                    "duplicate_id",
                    &format!("a generation with id {id:?} is already running on this socket"),
                ));
            }
            if active.len() >= state.limits.max_ws_inflight {
                return Some(error_event(
                    Some(&id),
                    "too_many_requests",
                    &format!("at most {} generations may run at once on one socket", state.limits.max_ws_inflight),
                ));
            }
            let (cancel_tx, cancel_rx) = oneshot::channel();
            let (state, body, out) = (state.clone(), Value::Object(msg), out.clone());
            let task = match kind {
                "embed" => tokio::spawn(run_embedding(state, id.clone(), body, out, cancel_rx)),
                "image" => tokio::spawn(run_image(state, id.clone(), body, out, cancel_rx)),
                "speech" => tokio::spawn(run_speech(state, id.clone(), body, out, cancel_rx)),
                _ => tokio::spawn(run_generation(state, id.clone(), body, out, cancel_rx)),
            };
            active.insert(id, ActiveGeneration { cancel: Some(cancel_tx), task });
            None
        }
        "cancel" => {
            let Some(id) = id else {
                return Some(error_event(None, "invalid_message", "a cancel message needs the `id` of a generation"));
            };
            match active.get_mut(&id).and_then(|g| g.cancel.take()) {
                Some(cancel) => {
                    let _ = cancel.send(());
                    None
                }
                None => Some(error_event(Some(&id), "unknown_id", &format!("no running generation has id {id:?}"))),
            }
        }
        other => Some(error_event(
            id.as_deref(),
            "unknown_type",
            &format!(
                "unknown message type {other:?}: expected \"generate\", \"embed\", \"image\", \"speech\" or \"cancel\""
            ),
        )),
    }
}

/// Validates and submits one generation, then forwards its events until every choice is done
/// or the client cancels it.
async fn run_generation(
    state: AppState,
    id: String,
    body: Value,
    out: mpsc::Sender<Outgoing>,
    mut cancel: oneshot::Receiver<()>,
) {
    let setup = async {
        let body: CompletionBody = from_value(body)?;
        let entry = state.resolve_model(body.model.as_deref())?;
        let tok = entry.text_tokenizer()?.as_ref();
        let (endpoint, prompt) = match (&body.messages, &body.prompt) {
            (Some(_), Some(_)) => return Err(ApiError::param("messages", "give either messages or prompt, not both")),
            (Some(m), None) => (Endpoint::Chat, PromptSpec::Chat(chat_messages(m)?)),
            (None, Some(p)) => (Endpoint::Completion, completion_prompt(Some(p), tok)?),
            (None, None) => return Err(missing("messages")),
        };
        let valid = validate(&body, endpoint, prompt, tok)?;
        submit(&state, &entry, valid).await
    };
    let finished = |event: Value| Outgoing { event, binary: None, finished: Some(id.clone()) };
    let (g, mut rx) = tokio::select! {
        r = setup => match r {
            Ok(v) => v,
            Err(e) => {
                let _ = out.send(finished(api_error_event(&id, &e))).await;
                return;
            }
        },
        _ = &mut cancel => {
            let _ = out.send(finished(done_event(&id, 0, "cancelled", 0, 0))).await;
            return;
        }
    };
    let n = g.request.n;
    let prompt_tokens = g.request.prompt.len();
    let with_logprobs = g.request.logprobs.is_some();
    let mut produced = vec![0usize; n];
    let mut open: Vec<bool> = vec![true; n];
    let mut remaining = n;
    while remaining > 0 {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = &mut cancel => {
                drop(rx);
                let pending: Vec<usize> = (0..n).filter(|&i| open[i]).collect();
                for (k, &i) in pending.iter().enumerate() {
                    let e = done_event(&id, i, "cancelled", prompt_tokens, produced[i]);
                    let o = if k + 1 == pending.len() { finished(e) } else { Outgoing { event: e, binary: None, finished: None } };
                    let _ = out.send(o).await;
                }
                return;
            }
        };
        let (event, last) = match ev {
            None => (error_event(Some(&id), "internal_error", "the generation ended without finishing"), true),
            Some(ClientEvent::Token { index, text, token, logprob, top_logprobs, .. }) => {
                if let Some(p) = produced.get_mut(index) {
                    *p += 1;
                }
                let mut v = json!({"type": "token", "id": id, "index": index, "text": text, "token": token});
                if with_logprobs {
                    v["logprob"] = json!(logprob);
                    v["top_logprobs"] = top_logprobs
                        .iter()
                        .map(|a| json!({"token": a.token, "text": a.text, "logprob": a.logprob}))
                        .collect();
                }
                (v, false)
            }
            Some(ClientEvent::Done { index, finish_reason, prompt_tokens, completion_tokens }) => {
                if let Some(o) = open.get_mut(index) {
                    *o = false;
                }
                remaining -= 1;
                (done_event(&id, index, finish_reason.as_str(), prompt_tokens, completion_tokens), remaining == 0)
            }
            Some(ClientEvent::Error { index, message }) => {
                if let Some(o) = open.get_mut(index) {
                    *o = false;
                }
                remaining -= 1;
                let mut v = error_event(Some(&id), "internal_error", &message);
                v["index"] = json!(index);
                (v, remaining == 0)
            }
        };
        let o = if last { finished(event) } else { Outgoing { event, binary: None, finished: None } };
        if out.send(o).await.is_err() || last {
            return;
        }
    }
}

/// Embeds one `embed` message's inputs and sends one `embedding` event (or an `error`, or a
/// `done` with `cancelled` when the client cancels first).
async fn run_embedding(
    state: AppState,
    id: String,
    body: Value,
    out: mpsc::Sender<Outgoing>,
    mut cancel: oneshot::Receiver<()>,
) {
    let work = async {
        let body: EmbeddingBody = from_value(body)?;
        embed(&state, body).await
    };
    let event = tokio::select! {
        r = work => match r {
            Ok(mut resp) => json!({
                "type": "embedding",
                "id": id,
                "model": resp["model"].take(),
                "data": resp["data"].take(),
                "usage": resp["usage"].take(),
            }),
            Err(e) => api_error_event(&id, &e),
        },
        // Dropping `work` cancels the inputs still in the batcher.
        _ = &mut cancel => done_event(&id, 0, "cancelled", 0, 0),
    };
    let _ = out.send(Outgoing { event, binary: None, finished: Some(id) }).await;
}

/// Generates one `image` message's images: `image_step` events per denoising step (with a
/// `preview` every `preview_every` steps), then per image an `image` event, or an `error` (it
/// failed), or a `done` with `finish_reason` `cancelled`/`timeout` (no image). The id is free
/// once every image has had its last event.
async fn run_image(
    state: AppState,
    id: String,
    body: Value,
    out: mpsc::Sender<Outgoing>,
    mut cancel: oneshot::Receiver<()>,
) {
    let setup = async {
        let body: ImageBody = from_value(body)?;
        let (entry, plan, requests) = prepare(&state, &body, true)?;
        let job = ImageJob::start(&entry, &plan, requests).await?;
        Ok::<_, ApiError>((plan, job))
    };
    let finished = |event: Value| Outgoing { event, binary: None, finished: Some(id.clone()) };
    let image_done =
        |index: usize, reason: &str| json!({"type": "done", "id": id, "index": index, "finish_reason": reason});
    let (plan, mut job) = tokio::select! {
        r = setup => match r {
            Ok(v) => v,
            Err(e) => {
                let _ = out.send(finished(api_error_event(&id, &e))).await;
                return;
            }
        },
        _ = &mut cancel => {
            let _ = out.send(finished(image_done(0, "cancelled"))).await;
            return;
        }
    };
    let mut open = vec![true; plan.n];
    loop {
        let ev = tokio::select! {
            ev = job.next() => ev,
            _ = &mut cancel => {
                // Dropping the job cancels the images still running.
                drop(job);
                let pending: Vec<usize> = (0..plan.n).filter(|&i| open[i]).collect();
                for (k, &i) in pending.iter().enumerate() {
                    let e = image_done(i, "cancelled");
                    let o = if k + 1 == pending.len() { finished(e) } else { Outgoing { event: e, binary: None, finished: None } };
                    let _ = out.send(o).await;
                }
                return;
            }
        };
        let mut events = Vec::new();
        match ev {
            None => {
                if open.contains(&true) {
                    events.push(error_event(Some(&id), "internal_error", "the image request ended without finishing"));
                    open.iter_mut().for_each(|o| *o = false);
                } else {
                    return;
                }
            }
            Some(JobEvent::Step { index, step, total, timestep, elapsed_ms, preview }) => {
                let mut v = step_fields(index, step, total, timestep, elapsed_ms, preview.as_deref());
                v["type"] = json!("image_step");
                v["id"] = json!(id);
                events.push(v);
            }
            Some(JobEvent::Image { index, seed, png }) => {
                let mut v = image_item(&state, plan.format, seed, png);
                v["type"] = json!("image");
                v["id"] = json!(id);
                v["index"] = json!(index);
                open[index] = false;
                events.push(v);
            }
            Some(JobEvent::Failed { index, error }) => {
                let mut v = api_error_event(&id, &error);
                v["index"] = json!(index);
                open[index] = false;
                events.push(v);
            }
            Some(JobEvent::TimedOut { pending, .. }) => {
                for i in pending {
                    open[i] = false;
                    events.push(image_done(i, "timeout"));
                }
            }
        }
        let last_batch = !open.contains(&true);
        let count = events.len();
        for (k, event) in events.into_iter().enumerate() {
            let o = if last_batch && k + 1 == count {
                finished(event)
            } else {
                Outgoing { event, binary: None, finished: None }
            };
            if out.send(o).await.is_err() {
                return;
            }
        }
        if last_batch {
            return;
        }
    }
}

/// Speaks one `speech` message: per decoded chunk an `audio` event (JSON) followed by one
/// binary message with its s16le PCM, then `audio_done` (`stop`, `length`, `timeout`, or
/// `cancelled` after `cancel`), or an `error`.
async fn run_speech(
    state: AppState,
    id: String,
    body: Value,
    out: mpsc::Sender<Outgoing>,
    mut cancel: oneshot::Receiver<()>,
) {
    let setup = async {
        let body: SpeechBody = from_value(body)?;
        let (entry, plan, request) = audio::prepare(&state, &body)?;
        let job = SpeechJob::start(&entry, &plan, request).await?;
        Ok::<_, ApiError>((plan, job))
    };
    let finished = |event: Value| Outgoing { event, binary: None, finished: Some(id.clone()) };
    let audio_done = |frames: usize, samples: usize, sample_rate: u32, reason: &str| {
        json!({
            "type": "audio_done",
            "id": id,
            "frames": frames,
            "samples": samples,
            "duration_s": samples as f64 / f64::from(sample_rate.max(1)),
            "finish_reason": reason,
        })
    };
    let (plan, mut job) = tokio::select! {
        r = setup => match r {
            Ok(v) => v,
            Err(e) => {
                let _ = out.send(finished(api_error_event(&id, &e))).await;
                return;
            }
        },
        _ = &mut cancel => {
            let _ = out.send(finished(audio_done(0, 0, 1, "cancelled"))).await;
            return;
        }
    };
    let sample_rate = plan.sample_rate;
    loop {
        let ev = tokio::select! {
            ev = job.next() => ev,
            _ = &mut cancel => {
                let (frames, samples) = (job.frames(), job.samples());
                // Dropping the job cancels the utterance.
                drop(job);
                let _ = out.send(finished(audio_done(frames, samples, sample_rate, "cancelled"))).await;
                return;
            }
        };
        let (event, binary) = match ev {
            Some(SpeechJobEvent::Audio { samples, frames_total }) => {
                let event = json!({
                    "type": "audio",
                    "id": id,
                    "frames": samples.len() / plan.samples_per_frame.max(1),
                    "samples": samples.len(),
                    "frames_total": frames_total,
                    "sample_rate": sample_rate,
                    "format": "pcm_s16le",
                });
                (event, audio::pcm16(&samples))
            }
            Some(SpeechJobEvent::Done { reason }) => {
                let _ = out.send(finished(audio_done(job.frames(), job.samples(), sample_rate, reason.as_str()))).await;
                return;
            }
            Some(SpeechJobEvent::Failed(e)) => {
                let _ = out.send(finished(api_error_event(&id, &e))).await;
                return;
            }
            None => {
                let e = error_event(Some(&id), "internal_error", "the speech request ended without finishing");
                let _ = out.send(finished(e)).await;
                return;
            }
        };
        if out.send(Outgoing { event, binary: Some(binary), finished: None }).await.is_err() {
            return;
        }
    }
}

fn done_event(id: &str, index: usize, finish_reason: &str, prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "type": "done",
        "id": id,
        "index": index,
        "finish_reason": finish_reason,
        "usage": crate::api::openai::usage(prompt_tokens, completion_tokens),
    })
}

fn api_error_event(id: &str, e: &ApiError) -> Value {
    let mut v = error_event(Some(id), e.code(), &e.to_string());
    if let Some(p) = e.param_name() {
        v["param"] = json!(p);
    }
    if let Some(retry_after_s) = e.retry_after_s() {
        v["retry_after_s"] = json!(retry_after_s);
    }
    v
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use futures::channel::mpsc as fmpsc;

    use super::*;
    use crate::server::Limits;
    use crate::testing::{fake_state, fake_state_with, FakeBackend};

    struct Client {
        to_server: fmpsc::UnboundedSender<Result<Message, Infallible>>,
        from_server: fmpsc::UnboundedReceiver<Message>,
        session: JoinHandle<()>,
        state: AppState,
    }

    impl Client {
        fn start(delay_ms: u64, limits: Limits) -> Client {
            Client::with_state(fake_state(Duration::from_millis(delay_ms), limits))
        }
        fn with_state(state: AppState) -> Client {
            let (to_server, server_in) = fmpsc::unbounded();
            let (server_out, from_server) = fmpsc::unbounded();
            let session = tokio::spawn(run_session(state.clone(), server_out, server_in));
            Client { to_server, from_server, session, state }
        }
        fn send(&self, v: Value) {
            self.to_server.unbounded_send(Ok(Message::Text(v.to_string().into()))).unwrap();
        }
        fn send_raw(&self, s: &str) {
            self.to_server.unbounded_send(Ok(Message::Text(s.to_string().into()))).unwrap();
        }
        async fn next(&mut self) -> Value {
            let m = tokio::time::timeout(Duration::from_secs(5), self.from_server.next())
                .await
                .expect("no event in 5 s")
                .expect("socket closed");
            match m {
                Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
                other => panic!("unexpected {other:?}"),
            }
        }
        /// Reads until `id` is done (all `n` choices), returning the texts.
        async fn until_done(&mut self, events: &mut Vec<Value>, id: &str, n: usize) {
            let mut done = 0;
            while done < n {
                let e = self.next().await;
                if e["id"] == id && (e["type"] == "done" || e["type"] == "error") {
                    done += 1;
                }
                events.push(e);
            }
        }
    }

    fn text_of(events: &[Value], id: &str) -> String {
        events.iter().filter(|e| e["type"] == "token" && e["id"] == id).map(|e| e["text"].as_str().unwrap()).collect()
    }

    #[tokio::test]
    async fn two_generations_interleave_and_finish() {
        let mut c = Client::start(2, Limits::default());
        c.send(json!({"type": "generate", "id": "a", "prompt": "hi", "max_tokens": 5, "temperature": 0}));
        c.send(json!({"type": "generate", "id": "b", "messages": [{"role": "user", "content": "yo"}], "max_tokens": 3, "temperature": 0}));
        let mut events = Vec::new();
        c.until_done(&mut events, "a", 1).await;
        if !events.iter().any(|e| e["type"] == "done" && e["id"] == "b") {
            c.until_done(&mut events, "b", 1).await;
        }
        assert_eq!(text_of(&events, "a"), "abcde");
        assert_eq!(text_of(&events, "b"), "abc");
        let done_b = events.iter().find(|e| e["type"] == "done" && e["id"] == "b").unwrap();
        assert_eq!(done_b["usage"]["completion_tokens"], 3);
        assert_eq!(done_b["finish_reason"], "length");
    }

    #[tokio::test]
    async fn cancel_ends_a_generation_with_cancelled() {
        let mut c = Client::start(20, Limits::default());
        c.send(json!({"type": "generate", "id": "long", "prompt": "hi", "max_tokens": 400}));
        let first = c.next().await;
        assert_eq!(first["type"], "token");
        c.send(json!({"type": "cancel", "id": "long"}));
        let mut events = Vec::new();
        c.until_done(&mut events, "long", 1).await;
        assert_eq!(events.last().unwrap()["finish_reason"], "cancelled");
        // The id is free again and the socket still works.
        c.send(json!({"type": "generate", "id": "long", "prompt": "x", "max_tokens": 1}));
        let mut events = Vec::new();
        c.until_done(&mut events, "long", 1).await;
        assert_eq!(events.last().unwrap()["finish_reason"], "length");
    }

    #[tokio::test]
    async fn bad_messages_get_error_events_and_the_socket_stays_open() {
        let mut c = Client::start(0, Limits::default());
        c.send_raw("{not json");
        assert_eq!(c.next().await["code"], "invalid_json");
        c.send(json!({"type": "dance", "id": "x"}));
        let e = c.next().await;
        assert_eq!((e["code"].as_str(), e["id"].as_str()), (Some("unknown_type"), Some("x")));
        c.send(json!({"type": "cancel", "id": "nope"}));
        assert_eq!(c.next().await["code"], "unknown_id");
        c.send(json!({"type": "generate", "id": "t", "prompt": "hi", "temperature": 9}));
        let e = c.next().await;
        assert_eq!((e["code"].as_str(), e["param"].as_str()), (Some("invalid_parameter"), Some("temperature")));
        c.send(json!({"type": "generate", "id": "t2", "prompt": 5}));
        assert_eq!(c.next().await["code"], "invalid_type");
        c.send(json!({"type": "generate", "id": "ok", "prompt": "hi", "max_tokens": 2}));
        let mut events = Vec::new();
        c.until_done(&mut events, "ok", 1).await;
    }

    #[tokio::test]
    async fn duplicate_active_id_is_refused() {
        let mut c = Client::start(20, Limits::default());
        c.send(json!({"type": "generate", "id": "d", "prompt": "hi", "max_tokens": 100}));
        c.send(json!({"type": "generate", "id": "d", "prompt": "hi", "max_tokens": 100}));
        loop {
            let e = c.next().await;
            if e["type"] == "error" {
                assert_eq!(e["code"], "duplicate_id");
                break;
            }
        }
    }

    #[tokio::test]
    async fn inflight_limit_applies_per_socket() {
        let limits = Limits { max_ws_inflight: 1, ..Limits::default() };
        let mut c = Client::start(20, limits);
        c.send(json!({"type": "generate", "id": "a", "prompt": "hi", "max_tokens": 100}));
        c.send(json!({"type": "generate", "id": "b", "prompt": "hi", "max_tokens": 100}));
        loop {
            let e = c.next().await;
            if e["type"] == "error" {
                assert_eq!((e["code"].as_str(), e["id"].as_str()), (Some("too_many_requests"), Some("b")));
                break;
            }
        }
    }

    #[tokio::test]
    async fn closing_the_socket_cancels_its_generations() {
        let state = fake_state(Duration::from_millis(20), Limits::default());
        let (to_server, server_in) = fmpsc::unbounded::<Result<Message, Infallible>>();
        let (server_out, mut from_server) = fmpsc::unbounded();
        let session = tokio::spawn(run_session(state.clone(), server_out, server_in));
        let gen = json!({"type": "generate", "id": "g", "prompt": "hi", "max_tokens": 400, "n": 2});
        to_server.unbounded_send(Ok(Message::Text(gen.to_string().into()))).unwrap();
        from_server.next().await.unwrap();
        let backend = state.models[0].backend().await.unwrap();
        assert_eq!(backend.stats().await.unwrap().running, 2);
        drop(to_server);
        session.await.unwrap();
        for _ in 0..100 {
            if backend.stats().await.unwrap().running == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("generations still running after the socket closed");
    }

    #[tokio::test]
    async fn while_draining_running_generations_finish_and_new_ones_are_refused() {
        let mut c = Client::start(5, Limits::default());
        c.send(json!({"type": "generate", "id": "run", "prompt": "hi", "max_tokens": 20, "temperature": 0}));
        let first = c.next().await;
        assert_eq!(first["type"], "token");
        c.state.draining.store(true, std::sync::atomic::Ordering::Release);
        c.send(json!({"type": "generate", "id": "new", "prompt": "hi", "max_tokens": 2}));
        let mut events = vec![first];
        c.until_done(&mut events, "run", 1).await;
        if !events.iter().any(|e| e["id"] == "new") {
            c.until_done(&mut events, "new", 1).await;
        }
        let refused = events.iter().find(|e| e["id"] == "new").unwrap();
        assert_eq!((refused["type"].as_str(), refused["code"].as_str()), (Some("error"), Some("draining")));
        assert_eq!(refused["retry_after_s"], 1);
        assert_eq!(text_of(&events, "run"), "abcdefghijklmnopqrst", "the running generation was cut short");
        let done = events.iter().find(|e| e["type"] == "done" && e["id"] == "run").unwrap();
        assert_eq!(done["finish_reason"], "length");
    }

    #[tokio::test]
    async fn a_full_queue_is_an_overloaded_error_event() {
        let mut backend = FakeBackend::new(Duration::from_millis(20));
        backend.max_running = Some(1);
        let mut c = Client::with_state(fake_state_with(backend, Limits::default()));
        c.send(json!({"type": "generate", "id": "a", "prompt": "hi", "max_tokens": 50}));
        assert_eq!(c.next().await["type"], "token");
        c.send(json!({"type": "generate", "id": "b", "prompt": "hi", "max_tokens": 50}));
        loop {
            let e = c.next().await;
            if e["id"] == "b" {
                assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("overloaded")), "{e}");
                assert_eq!(e["retry_after_s"], 1);
                break;
            }
        }
        c.send(json!({"type": "cancel", "id": "a"}));
    }

    #[tokio::test]
    async fn a_deadline_ends_the_choices_with_timeout() {
        let mut c = Client::start(20, Limits::default());
        c.send(json!({"type": "generate", "id": "t", "prompt": "hi", "max_tokens": 400, "n": 2, "timeout": 0.1}));
        let mut events = Vec::new();
        c.until_done(&mut events, "t", 2).await;
        let done: Vec<&Value> = events.iter().filter(|e| e["type"] == "done").collect();
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|d| d["finish_reason"] == "timeout"), "{done:?}");
        c.send(json!({"type": "generate", "id": "bad", "prompt": "hi", "timeout": 0}));
        let e = c.next().await;
        assert_eq!((e["code"].as_str(), e["param"].as_str()), (Some("invalid_parameter"), Some("timeout")));
    }

    #[tokio::test]
    async fn logprobs_ride_token_events() {
        let mut c = Client::start(0, Limits::default());
        c.send(json!({"type": "generate", "id": "l", "prompt": "hi", "max_tokens": 1, "logprobs": 2}));
        let e = c.next().await;
        assert_eq!(e["type"], "token");
        assert_eq!(e["logprob"], -0.5);
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2);
        let _ = c.session.is_finished();
    }
}
