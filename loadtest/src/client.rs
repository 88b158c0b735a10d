//! Sends one request of a scenario kind and measures it: TTFT, inter-token latencies, e2e,
//! tokens streamed versus `usage`, and a classified error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex};
use tokio_tungstenite::tungstenite::Message;

use crate::prompts::{PromptSet, RequestSpec};
use crate::scenario::{Kind, Target};

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ErrorKind {
    /// A 4xx answer other than 429 (or a WebSocket `invalid_*`-style error event).
    #[serde(rename = "http_4xx")]
    Http4xx,
    /// Too many requests (HTTP 429 with `Retry-After`, or an `overloaded` WebSocket event).
    #[serde(rename = "http_429")]
    Http429,
    /// A 5xx answer (or an `internal_error` WebSocket event).
    #[serde(rename = "http_5xx")]
    Http5xx,
    /// The connection could not be made (refused, reset before the response, DNS).
    #[serde(rename = "connect")]
    Connect,
    /// The request ran past `request_timeout_s`.
    #[serde(rename = "timeout")]
    Timeout,
    /// The answer broke the protocol: bad JSON, a stream without `[DONE]`, an error mid-stream,
    /// a closed socket.
    #[serde(rename = "protocol")]
    Protocol,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::Http4xx,
        ErrorKind::Http429,
        ErrorKind::Http5xx,
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Protocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Http4xx => "http_4xx",
            ErrorKind::Http429 => "http_429",
            ErrorKind::Http5xx => "http_5xx",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Protocol => "protocol",
        }
    }

    pub fn from_status(status: u16) -> ErrorKind {
        match status {
            429 => ErrorKind::Http429,
            500..=599 => ErrorKind::Http5xx,
            _ => ErrorKind::Http4xx,
        }
    }

    /// Maps a Kiln WebSocket error `code` to the HTTP-like kind it stands for.
    pub fn from_ws_code(code: &str) -> ErrorKind {
        match code {
            "overloaded" | "too_many_requests" | "rate_limited" => ErrorKind::Http429,
            "internal_error" | "model_unavailable" => ErrorKind::Http5xx,
            c if c.starts_with("invalid")
                || matches!(
                    c,
                    "context_length_exceeded"
                        | "payload_too_large"
                        | "model_not_found"
                        | "not_found"
                        | "unsupported"
                        | "duplicate_id"
                        | "unknown_id"
                        | "unknown_type"
                ) =>
            {
                ErrorKind::Http4xx
            }
            _ => ErrorKind::Protocol,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: ErrorKind,
    pub status: Option<u16>,
    pub message: String,
}

impl Failure {
    fn protocol(msg: impl Into<String>) -> Failure {
        Failure { kind: ErrorKind::Protocol, status: None, message: msg.into() }
    }
    fn from_reqwest(e: reqwest::Error) -> Failure {
        let kind = if e.is_timeout() {
            ErrorKind::Timeout
        } else if e.is_connect() {
            ErrorKind::Connect
        } else if e.is_request() && e.status().is_none() && !e.is_body() && !e.is_decode() {
            // Failed before a response arrived (e.g. the connection was reset while sending).
            ErrorKind::Connect
        } else {
            ErrorKind::Protocol
        };
        let mut message = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            message.push_str(": ");
            message.push_str(&s.to_string());
            src = s.source();
        }
        Failure { kind, status: e.status().map(|s| s.as_u16()), message }
    }
}

/// The measurement of one request, as written to the result file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestRecord {
    pub index: u64,
    pub warmup: bool,
    /// Seconds from the start of the (warm-up or measured) phase to the send.
    pub start_s: f64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    pub ttft_ms: Option<f64>,
    pub e2e_ms: f64,
    /// Gaps between consecutive token events (SSE chunks / WebSocket token events).
    pub itl_ms: Vec<f64>,
    /// Tokens counted from the stream.
    pub output_tokens: u64,
    pub usage_completion_tokens: Option<u64>,
    pub usage_prompt_tokens: Option<u64>,
    /// `usage.completion_tokens` was reported and differs from the tokens counted.
    pub token_mismatch: bool,
    pub input_tokens: u32,
    pub max_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Token events as (seconds from phase start, tokens): the throughput time series.
    #[serde(skip)]
    pub token_events: Vec<(f64, u32)>,
}

impl RequestRecord {
    /// Mean inter-token latency of this request (time per output token after the first).
    pub fn tpot_ms(&self) -> Option<f64> {
        match (self.ttft_ms, self.output_tokens) {
            (Some(ttft), n) if n > 1 => Some((self.e2e_ms - ttft) / (n - 1) as f64),
            _ => None,
        }
    }

    /// End of the request, in seconds from the phase start.
    pub fn end_s(&self) -> f64 {
        self.start_s + self.e2e_ms / 1000.0
    }
}

/// Token arrival bookkeeping while a request streams.
struct Timing {
    t0: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    itl_ms: Vec<f64>,
    tokens: u64,
    events: Vec<(Instant, u32)>,
    usage_completion: Option<u64>,
    usage_prompt: Option<u64>,
    finish_reason: Option<String>,
    status: Option<u16>,
}

impl Timing {
    fn new() -> Timing {
        Timing {
            t0: Instant::now(),
            first: None,
            last: None,
            itl_ms: Vec::new(),
            tokens: 0,
            events: Vec::new(),
            usage_completion: None,
            usage_prompt: None,
            finish_reason: None,
            status: None,
        }
    }

    fn on_tokens(&mut self, at: Instant, n: u32) {
        if n == 0 {
            return;
        }
        if self.first.is_none() {
            self.first = Some(at);
        }
        if let Some(last) = self.last {
            self.itl_ms.push(ms(at.saturating_duration_since(last)));
        }
        self.last = Some(at);
        self.tokens += u64::from(n);
        self.events.push((at, n));
    }

    fn on_usage(&mut self, usage: &Value) {
        if let Some(c) = usage.get("completion_tokens").and_then(Value::as_u64) {
            self.usage_completion = Some(c);
        }
        if let Some(p) = usage.get("prompt_tokens").and_then(Value::as_u64) {
            self.usage_prompt = Some(p);
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Sends requests of one scenario; shared by all workers.
pub struct Client {
    target: Target,
    prompts: Arc<PromptSet>,
    http: reqwest::Client,
    api_key: Option<String>,
    ws: WsPool,
}

impl Client {
    pub fn new(target: Target, prompts: Arc<PromptSet>) -> Result<Client> {
        let api_key = match &target.api_key_env {
            Some(var) => {
                Some(std::env::var(var).map_err(|_| anyhow::anyhow!("environment variable {var} is not set"))?)
            }
            None => None,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()?;
        let ws = WsPool::new(target.ws_url(), target.ws_max_inflight_per_socket, api_key.clone());
        Ok(Client { target, prompts, http, api_key, ws })
    }

    /// Sends request number `index` (its prompt comes from the prompt set) and measures it.
    /// `phase_start` anchors `start_s` and the token event times.
    pub async fn run(&self, index: u64, warmup: bool, phase_start: Instant) -> RequestRecord {
        let kind = self.target.kind;
        let batch = if kind == Kind::Embeddings { self.target.embeddings_batch as u64 } else { 1 };
        let specs: Vec<RequestSpec> = (0..batch).map(|j| self.prompts.get(index * batch + j)).collect();
        let spec = &specs[0];
        let mut tm = Timing::new();
        let limit = Duration::from_secs_f64(self.target.request_timeout_s);
        let result = {
            let fut = async {
                match kind {
                    Kind::ChatSse | Kind::CompletionsSse => self.sse(&mut tm, spec, index).await,
                    Kind::Websocket => self.websocket(&mut tm, spec, index).await,
                    Kind::Embeddings => self.embeddings(&mut tm, &specs).await,
                }
            };
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => Err(Failure {
                    kind: ErrorKind::Timeout,
                    status: None,
                    message: format!("no complete answer within {}s", self.target.request_timeout_s),
                }),
            }
        };
        let end = Instant::now();
        let err = result.err();
        let token_mismatch = kind.streams_tokens() && tm.usage_completion.is_some_and(|u| u != tm.tokens);
        let since = |t: Instant| t.saturating_duration_since(phase_start).as_secs_f64();
        RequestRecord {
            index,
            warmup,
            start_s: since(tm.t0),
            ok: err.is_none(),
            error: err.as_ref().map(|e| e.kind),
            error_message: err.as_ref().map(|e| e.message.clone()),
            http_status: err.as_ref().and_then(|e| e.status).or(tm.status),
            ttft_ms: tm.first.map(|f| ms(f - tm.t0)),
            e2e_ms: ms(end - tm.t0),
            itl_ms: std::mem::take(&mut tm.itl_ms),
            output_tokens: tm.tokens,
            usage_completion_tokens: tm.usage_completion,
            usage_prompt_tokens: tm.usage_prompt,
            token_mismatch,
            input_tokens: specs.iter().map(|s| s.input_tokens).sum(),
            max_tokens: if kind.streams_tokens() { spec.max_tokens } else { 0 },
            finish_reason: tm.finish_reason.take(),
            token_events: tm.events.iter().map(|&(t, n)| (since(t), n)).collect(),
        }
    }

    fn post(&self, url: String, body: &Value) -> reqwest::RequestBuilder {
        let mut req = self.http.post(url).json(body);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        req
    }

    async fn send_checked(&self, tm: &mut Timing, url: String, body: &Value) -> Result<reqwest::Response, Failure> {
        let resp = self.post(url, body).send().await.map_err(Failure::from_reqwest)?;
        let status = resp.status().as_u16();
        tm.status = Some(status);
        if resp.status().is_success() {
            return Ok(resp);
        }
        let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
        let text = resp.text().await.unwrap_or_default();
        let detail = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.chars().take(300).collect());
        let mut message = format!("HTTP {status}: {detail}");
        if let Some(r) = retry_after {
            message.push_str(&format!(" (Retry-After: {r})"));
        }
        Err(Failure { kind: ErrorKind::from_status(status), status: Some(status), message })
    }

    fn generation_body(&self, spec: &RequestSpec, chat: bool) -> Value {
        let t = &self.target;
        let mut body = json!({"model": t.model, "max_tokens": spec.max_tokens});
        if chat {
            body["messages"] = Value::Array(spec.messages());
        } else {
            body["prompt"] = Value::String(spec.prompt());
        }
        if t.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if let Some(temp) = t.temperature {
            body["temperature"] = json!(temp);
        }
        if t.logprobs {
            body["logprobs"] = if chat { json!(true) } else { json!(1) };
        }
        body
    }

    async fn sse(&self, tm: &mut Timing, spec: &RequestSpec, _index: u64) -> Result<(), Failure> {
        let chat = self.target.kind == Kind::ChatSse;
        let mut body = self.generation_body(spec, chat);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let url = self.target.url(if chat { "/chat/completions" } else { "/completions" });
        tm.t0 = Instant::now();
        let resp = self.send_checked(tm, url, &body).await?;
        let mut stream = resp.bytes_stream();
        let mut parser = SseParser::default();
        let mut done = false;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(Failure::from_reqwest)?;
            let at = Instant::now();
            for data in parser.push(&chunk) {
                if done {
                    return Err(Failure::protocol("data after [DONE]"));
                }
                done = handle_sse_data(tm, &data, at, chat)?;
            }
        }
        if let Some(data) = parser.finish() {
            done = done || handle_sse_data(tm, &data, Instant::now(), chat)?;
        }
        if !done {
            return Err(Failure::protocol("the stream ended without `data: [DONE]`"));
        }
        Ok(())
    }

    async fn embeddings(&self, tm: &mut Timing, specs: &[RequestSpec]) -> Result<(), Failure> {
        let inputs: Vec<String> = specs.iter().map(RequestSpec::prompt).collect();
        let input = if inputs.len() == 1 { json!(inputs[0]) } else { json!(inputs) };
        let body = json!({"model": self.target.model, "input": input});
        tm.t0 = Instant::now();
        let resp = self.send_checked(tm, self.target.url("/embeddings"), &body).await?;
        let bytes = resp.bytes().await.map_err(Failure::from_reqwest)?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| Failure::protocol(format!("invalid JSON: {e}")))?;
        let data = v["data"].as_array().ok_or_else(|| Failure::protocol("the answer has no `data` array"))?;
        if data.len() != specs.len() {
            return Err(Failure::protocol(format!("{} embeddings for {} inputs", data.len(), specs.len())));
        }
        let bad = data.iter().any(|d| {
            d["embedding"].as_array().is_none_or(Vec::is_empty) && !d["embedding"].is_string()
            // base64
        });
        if bad {
            return Err(Failure::protocol("an embedding is missing or empty"));
        }
        if let Some(u) = v.get("usage") {
            tm.on_usage(u);
        }
        Ok(())
    }

    async fn websocket(&self, tm: &mut Timing, spec: &RequestSpec, index: u64) -> Result<(), Failure> {
        let id = format!("r{index}");
        let mut msg = self.generation_body(spec, true);
        msg["type"] = json!("generate");
        msg["id"] = json!(id);
        tm.t0 = Instant::now();
        let (conn, mut rx) = self.ws.start(&id).await?;
        let mut guard = WsGuard { conn: conn.clone(), id: id.clone(), finished: false };
        conn.send(Message::Text(msg.to_string().into()))?;
        loop {
            let Some((at, ev)) = rx.recv().await else {
                return Err(Failure::protocol("the WebSocket closed before the request finished"));
            };
            match ev["type"].as_str() {
                Some("token") => tm.on_tokens(at, 1),
                Some("done") => {
                    guard.finished = true;
                    tm.finish_reason = ev["finish_reason"].as_str().map(str::to_string);
                    if let Some(u) = ev.get("usage") {
                        tm.on_usage(u);
                    }
                    if tm.finish_reason.as_deref() == Some("cancelled") {
                        return Err(Failure::protocol("the server cancelled the generation"));
                    }
                    return Ok(());
                }
                Some("error") => {
                    guard.finished = true;
                    let code = ev["code"].as_str().unwrap_or("");
                    let kind = if ev.get("retry_after_s").is_some() {
                        ErrorKind::Http429
                    } else {
                        ErrorKind::from_ws_code(code)
                    };
                    let text = ev["message"].as_str().unwrap_or("");
                    return Err(Failure { kind, status: None, message: format!("WebSocket error {code}: {text}") });
                }
                _ => return Err(Failure::protocol(format!("unexpected WebSocket event: {ev}"))),
            }
        }
    }
}

/// Handles one SSE `data:` payload; returns true on `[DONE]`.
fn handle_sse_data(tm: &mut Timing, data: &str, at: Instant, chat: bool) -> Result<bool, Failure> {
    if data.trim() == "[DONE]" {
        return Ok(true);
    }
    let v: Value =
        serde_json::from_str(data).map_err(|e| Failure::protocol(format!("invalid JSON in the stream: {e}")))?;
    if let Some(err) = v.get("error") {
        let msg = err["message"].as_str().map(str::to_string).unwrap_or_else(|| err.to_string());
        return Err(Failure::protocol(format!("error in the stream: {msg}")));
    }
    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
        tm.on_usage(u);
    }
    if let Some(choice) = v["choices"].as_array().and_then(|c| c.first()) {
        let (text_len, lp_count) = if chat {
            let d = &choice["delta"];
            let text = d["content"].as_str().unwrap_or("").len() + d["reasoning_content"].as_str().unwrap_or("").len();
            (text, choice["logprobs"]["content"].as_array().map_or(0, Vec::len))
        } else {
            (choice["text"].as_str().unwrap_or("").len(), choice["logprobs"]["tokens"].as_array().map_or(0, Vec::len))
        };
        let n = if lp_count > 0 { lp_count as u32 } else { u32::from(text_len > 0) };
        tm.on_tokens(at, n);
        if let Some(f) = choice["finish_reason"].as_str() {
            tm.finish_reason = Some(f.to_string());
        }
    }
    Ok(false)
}

/// Incremental Server-Sent-Events parser: feed bytes, get the `data` payload of each complete
/// event (multi-line `data:` fields joined with `\n`).
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=nl).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.line(&String::from_utf8_lossy(&line), &mut out);
        }
        out
    }

    fn line(&mut self, line: &str, out: &mut Vec<String>) {
        if line.is_empty() {
            if let Some(d) = self.data.take() {
                out.push(d);
            }
        } else if let Some(rest) = line.strip_prefix("data:") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(rest);
                }
                None => self.data = Some(rest.to_string()),
            }
        }
        // Comments (`:`), `event:`, `id:` and `retry:` lines carry nothing we measure.
    }

    /// The last event when the stream ends without a trailing blank line.
    pub fn finish(&mut self) -> Option<String> {
        let mut out = Vec::new();
        if !self.buf.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
            self.line(rest.trim_end_matches('\r'), &mut out);
        }
        self.line("", &mut out);
        out.pop()
    }
}

type WsEvent = (Instant, Value);

/// One WebSocket shared by several in-flight generations, events routed by id.
struct WsConn {
    out: mpsc::UnboundedSender<Message>,
    pending: Arc<StdMutex<HashMap<String, mpsc::UnboundedSender<WsEvent>>>>,
    inflight: AtomicUsize,
    dead: Arc<AtomicBool>,
}

impl WsConn {
    fn send(&self, m: Message) -> Result<(), Failure> {
        self.out.send(m).map_err(|_| Failure::protocol("the WebSocket is closed"))
    }
}

/// Unregisters a request from its socket (and cancels it if it did not finish, e.g. on timeout).
struct WsGuard {
    conn: Arc<WsConn>,
    id: String,
    finished: bool,
}

impl Drop for WsGuard {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.conn.out.send(Message::Text(json!({"type": "cancel", "id": self.id}).to_string().into()));
        }
        self.conn.pending.lock().unwrap().remove(&self.id);
        self.conn.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

struct WsPool {
    url: String,
    cap: usize,
    api_key: Option<String>,
    conns: Mutex<Vec<Arc<WsConn>>>,
}

impl WsPool {
    fn new(url: String, cap: usize, api_key: Option<String>) -> WsPool {
        WsPool { url, cap, api_key, conns: Mutex::new(Vec::new()) }
    }

    /// Registers `id` on a socket with room (opening one if none has), returning its event stream.
    async fn start(&self, id: &str) -> Result<(Arc<WsConn>, mpsc::UnboundedReceiver<WsEvent>), Failure> {
        let mut conns = self.conns.lock().await;
        conns.retain(|c| !c.dead.load(Ordering::SeqCst));
        let conn = match conns.iter().find(|c| c.inflight.load(Ordering::SeqCst) < self.cap) {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(self.connect().await?);
                conns.push(c.clone());
                c
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        conn.inflight.fetch_add(1, Ordering::SeqCst);
        conn.pending.lock().unwrap().insert(id.to_string(), tx);
        Ok((conn, rx))
    }

    async fn connect(&self) -> Result<WsConn, Failure> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::Error as WsError;
        let mut req = self.url.as_str().into_client_request().map_err(|e| Failure::protocol(e.to_string()))?;
        if let Some(key) = &self.api_key {
            let v = format!("Bearer {key}").parse().map_err(|_| Failure::protocol("invalid API key header"))?;
            req.headers_mut().insert("authorization", v);
        }
        let (socket, _) = tokio_tungstenite::connect_async(req).await.map_err(|e| match e {
            WsError::Http(resp) => {
                let status = resp.status().as_u16();
                Failure {
                    kind: ErrorKind::from_status(status),
                    status: Some(status),
                    message: format!("WebSocket upgrade refused: HTTP {status}"),
                }
            }
            WsError::Io(e) => Failure { kind: ErrorKind::Connect, status: None, message: e.to_string() },
            e => Failure::protocol(format!("WebSocket handshake failed: {e}")),
        })?;
        let (mut sink, mut stream) = socket.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let pending: Arc<StdMutex<HashMap<String, mpsc::UnboundedSender<WsEvent>>>> = Arc::default();
        let dead = Arc::new(AtomicBool::new(false));
        let writer_dead = dead.clone();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
            writer_dead.store(true, Ordering::SeqCst);
            let _ = sink.close().await;
        });
        let reader_pending = pending.clone();
        let reader_dead = dead.clone();
        let pong = out.clone();
        tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                let at = Instant::now();
                let text = match msg {
                    Ok(Message::Text(t)) => t,
                    Ok(Message::Ping(p)) => {
                        let _ = pong.send(Message::Pong(p));
                        continue;
                    }
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    tracing::warn!("ignoring a WebSocket message that is not JSON");
                    continue;
                };
                let id = match &v["id"] {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => {
                        tracing::warn!("ignoring a WebSocket event without an id: {v}");
                        continue;
                    }
                };
                let tx = reader_pending.lock().unwrap().get(&id).cloned();
                if let Some(tx) = tx {
                    let _ = tx.send((at, v));
                }
            }
            reader_dead.store(true, Ordering::SeqCst);
            // Dropping the senders ends every waiting request with "closed".
            reader_pending.lock().unwrap().clear();
        });
        Ok(WsConn { out, pending, inflight: AtomicUsize::new(0), dead })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_any_split() {
        let stream = "data: {\"a\":1}\n\n: comment\r\ndata: {\"b\":\r\ndata: 2}\r\n\r\nevent: x\ndata: [DONE]\n\n";
        let want = vec!["{\"a\":1}".to_string(), "{\"b\":\n2}".to_string(), "[DONE]".to_string()];
        let bytes = stream.as_bytes();
        for step in 1..=bytes.len() {
            let mut p = SseParser::default();
            let mut got = Vec::new();
            for c in bytes.chunks(step) {
                got.extend(p.push(c));
            }
            assert_eq!(p.finish(), None);
            assert_eq!(got, want, "split every {step} bytes");
        }
        let mut p = SseParser::default();
        assert!(p.push(b"data: tail").is_empty());
        assert_eq!(p.finish().as_deref(), Some("tail"));
    }

    #[test]
    fn sse_token_counting() {
        let mut tm = Timing::new();
        let t = Instant::now();
        let chunk =
            |c: &str| format!(r#"{{"choices":[{{"index":0,"delta":{{"content":{c}}},"finish_reason":null}}]}}"#);
        assert!(!handle_sse_data(&mut tm, &chunk("\"\""), t, true).unwrap());
        handle_sse_data(&mut tm, &chunk("\"a\""), t, true).unwrap();
        handle_sse_data(&mut tm, &chunk("\"b\""), t + Duration::from_millis(5), true).unwrap();
        // logprobs make empty-text tokens count
        handle_sse_data(
            &mut tm,
            r#"{"choices":[{"index":0,"delta":{"content":""},"logprobs":{"content":[{"token":"x"}]}}]}"#,
            t + Duration::from_millis(9),
            true,
        )
        .unwrap();
        handle_sse_data(&mut tm, r#"{"choices":[],"usage":{"completion_tokens":3,"prompt_tokens":7}}"#, t, true)
            .unwrap();
        assert!(handle_sse_data(&mut tm, "[DONE]", t, true).unwrap());
        assert_eq!(tm.tokens, 3);
        assert_eq!((tm.usage_completion, tm.usage_prompt), (Some(3), Some(7)));
        assert_eq!(tm.itl_ms.len(), 2);
        assert!((tm.itl_ms[0] - 5.0).abs() < 1e-6 && (tm.itl_ms[1] - 4.0).abs() < 1e-6);
        let e = handle_sse_data(&mut tm, r#"{"error":{"message":"boom"}}"#, t, true).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Protocol);
        let mut tm = Timing::new();
        handle_sse_data(&mut tm, r#"{"choices":[{"index":0,"text":"hi","logprobs":null}]}"#, t, false).unwrap();
        assert_eq!(tm.tokens, 1);
    }

    #[test]
    fn error_kinds() {
        assert_eq!(ErrorKind::from_status(429), ErrorKind::Http429);
        assert_eq!(ErrorKind::from_status(404), ErrorKind::Http4xx);
        assert_eq!(ErrorKind::from_status(503), ErrorKind::Http5xx);
        assert_eq!(ErrorKind::from_ws_code("overloaded"), ErrorKind::Http429);
        assert_eq!(ErrorKind::from_ws_code("invalid_parameter"), ErrorKind::Http4xx);
        assert_eq!(ErrorKind::from_ws_code("internal_error"), ErrorKind::Http5xx);
        assert_eq!(serde_json::to_string(&ErrorKind::Http4xx).unwrap(), "\"http_4xx\"");
    }
}
