//! Scenario files (TOML): what to load, how hard, for how long, with which prompts, and the SLO
//! that defines goodput. Every table rejects unknown keys so a typo is an error, not a silent
//! default.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// One load-test scenario, as read from a TOML file (and then overridden by CLI flags).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A label carried into the result file and the report.
    #[serde(default = "default_name")]
    pub name: String,
    /// Seeds the prompt generator and the arrival process: the same seed gives the same run plan.
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub target: Target,
    #[serde(default)]
    pub load: Load,
    #[serde(default)]
    pub bounds: Bounds,
    #[serde(default)]
    pub prompts: Prompts,
    #[serde(default)]
    pub slo: Slo,
}

fn default_name() -> String {
    "scenario".into()
}
fn default_seed() -> u64 {
    42
}

/// Which API a scenario exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `POST /v1/chat/completions` with `stream: true` (SSE).
    ChatSse,
    /// `POST /v1/completions` with `stream: true` (SSE).
    CompletionsSse,
    /// Kiln's multiplexed WebSocket protocol on `/v1/ws`.
    Websocket,
    /// `POST /v1/embeddings` (one JSON response per request).
    Embeddings,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ChatSse => "chat_sse",
            Kind::CompletionsSse => "completions_sse",
            Kind::Websocket => "websocket",
            Kind::Embeddings => "embeddings",
        }
    }

    /// Whether the kind streams tokens (so TTFT and ITL mean something).
    pub fn streams_tokens(self) -> bool {
        !matches!(self, Kind::Embeddings)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// `http://host:port` or `http://host:port/v1` (both work).
    pub base_url: String,
    pub model: String,
    pub kind: Kind,
    /// Name of an environment variable holding a bearer token (never the token itself).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Ask the server to ignore EOS so every request produces exactly `max_tokens` tokens
    /// (Kiln and vLLM honour it; other servers may ignore it).
    #[serde(default = "yes")]
    pub ignore_eos: bool,
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Request logprobs so that every token arrives as its own counted entry even when its
    /// text is empty (an incomplete UTF-8 sequence); makes SSE token counts exact.
    #[serde(default)]
    pub logprobs: bool,
    /// A request still running after this long ends as a `timeout` error.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_s: f64,
    /// WebSocket path (kind = websocket).
    #[serde(default = "default_ws_path")]
    pub ws_path: String,
    /// At most this many generations share one WebSocket; more open another socket.
    #[serde(default = "default_ws_inflight")]
    pub ws_max_inflight_per_socket: usize,
    /// Inputs per embeddings request (kind = embeddings).
    #[serde(default = "one")]
    pub embeddings_batch: usize,
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn default_request_timeout() -> f64 {
    300.0
}
fn default_ws_path() -> String {
    "/v1/ws".into()
}
fn default_ws_inflight() -> usize {
    16
}

impl Target {
    /// `base_url` joined with an OpenAI path such as `/chat/completions` (the `/v1` prefix is
    /// added unless the base URL already ends with it).
    pub fn url(&self, path: &str) -> String {
        let base = self.base_url.trim_end_matches('/');
        if base.ends_with("/v1") {
            format!("{base}{path}")
        } else {
            format!("{base}/v1{path}")
        }
    }

    /// The WebSocket URL: the base URL's host with a `ws://` (or `wss://`) scheme and `ws_path`.
    pub fn ws_url(&self) -> String {
        let base = self.base_url.trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base);
        let base = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            base.to_string()
        };
        format!("{base}{}", self.ws_path)
    }
}

/// Closed loop (`concurrency` workers, each sending its next request when the last finishes) or
/// open loop (`rate` arrivals per second, Poisson by default, independent of completions).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    #[serde(default)]
    pub concurrency: Option<usize>,
    #[serde(default)]
    pub rate: Option<f64>,
    #[serde(default)]
    pub arrival: Arrival,
    /// Open loop only: cap on requests in flight (arrivals beyond it wait). None = no cap.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrival {
    /// Exponential inter-arrival times (a Poisson process).
    #[default]
    Poisson,
    /// Evenly spaced arrivals, `1/rate` apart.
    Constant,
}

/// The run plan after validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoadMode {
    Closed { concurrency: usize },
    Open { rate: f64, arrival: Arrival, max_in_flight: Option<usize> },
}

impl Load {
    pub fn mode(&self) -> Result<LoadMode> {
        match (self.concurrency, self.rate) {
            (Some(_), Some(_)) => {
                bail!("[load]: give either `concurrency` (closed loop) or `rate` (open loop), not both")
            }
            (None, None) => Ok(LoadMode::Closed { concurrency: 1 }),
            (Some(0), None) => bail!("[load] concurrency must be at least 1"),
            (Some(c), None) => Ok(LoadMode::Closed { concurrency: c }),
            (None, Some(r)) if !(r.is_finite() && r > 0.0) => bail!("[load] rate must be a positive number"),
            (None, Some(r)) => {
                if self.max_in_flight == Some(0) {
                    bail!("[load] max_in_flight must be at least 1");
                }
                Ok(LoadMode::Open { rate: r, arrival: self.arrival, max_in_flight: self.max_in_flight })
            }
        }
    }
}

impl fmt::Display for LoadMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadMode::Closed { concurrency } => write!(f, "closed loop, concurrency {concurrency}"),
            LoadMode::Open { rate, arrival, max_in_flight } => {
                let a = match arrival {
                    Arrival::Poisson => "Poisson",
                    Arrival::Constant => "constant",
                };
                write!(f, "open loop, {a} arrivals at {rate} req/s")?;
                if let Some(m) = max_in_flight {
                    write!(f, ", at most {m} in flight")?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Bounds {
    /// Measured requests (after warm-up). The run ends when they are all done...
    #[serde(default)]
    pub requests: Option<usize>,
    /// ...or when this many seconds have passed (no new requests start after it; running ones
    /// finish or time out).
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// Requests sent first, with the same load pattern, and left out of the statistics.
    #[serde(default)]
    pub warmup_requests: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds { requests: Some(100), duration_s: None, warmup_requests: 0 }
    }
}

/// Where prompts come from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum Prompts {
    /// Words drawn from a seeded generator; lengths from distributions (1 word ≈ 1 token).
    Synthetic {
        #[serde(default = "default_input")]
        input_tokens: LengthDist,
        #[serde(default = "default_output")]
        output_tokens: LengthDist,
        #[serde(default)]
        system_prompt: Option<String>,
    },
    /// One JSON object a line: `{"prompt": "..."}` or `{"messages": [...]}`, optional
    /// `"max_tokens"` (else `default_max_tokens`). A relative path is relative to the scenario file.
    Jsonl {
        file: PathBuf,
        #[serde(default = "default_max_tokens")]
        default_max_tokens: u32,
        /// Shuffle the lines (seeded); otherwise they are used in order, cycling.
        #[serde(default)]
        shuffle: bool,
    },
}

fn default_input() -> LengthDist {
    LengthDist::Fixed(128)
}
fn default_output() -> LengthDist {
    LengthDist::Fixed(64)
}
fn default_max_tokens() -> u32 {
    64
}

impl Default for Prompts {
    fn default() -> Self {
        Prompts::Synthetic { input_tokens: default_input(), output_tokens: default_output(), system_prompt: None }
    }
}

/// A length distribution: a plain integer (fixed), or
/// `{ dist = "uniform", min = 32, max = 256 }`, or
/// `{ dist = "normal", mean = 128, sd = 32, min = 1, max = 512 }` (clipped to [min, max]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum LengthDist {
    Fixed(u32),
    Spec(DistSpec),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "dist", rename_all = "snake_case", deny_unknown_fields)]
pub enum DistSpec {
    Fixed {
        value: u32,
    },
    Uniform {
        min: u32,
        max: u32,
    },
    Normal {
        mean: f64,
        sd: f64,
        #[serde(default = "one_u32")]
        min: u32,
        #[serde(default)]
        max: Option<u32>,
    },
}

fn one_u32() -> u32 {
    1
}

impl<'de> Deserialize<'de> for LengthDist {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LengthDist;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a token count or a table with `dist = \"fixed\" | \"uniform\" | \"normal\"`")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<LengthDist, E> {
                u32::try_from(v).map(LengthDist::Fixed).map_err(|_| E::custom(format!("invalid token count {v}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<LengthDist, E> {
                u32::try_from(v).map(LengthDist::Fixed).map_err(|_| E::custom(format!("invalid token count {v}")))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> std::result::Result<LengthDist, A::Error> {
                DistSpec::deserialize(de::value::MapAccessDeserializer::new(map)).map(LengthDist::Spec)
            }
        }
        d.deserialize_any(V)
    }
}

impl LengthDist {
    pub fn validate(&self, what: &str) -> Result<()> {
        match self {
            LengthDist::Fixed(_) | LengthDist::Spec(DistSpec::Fixed { .. }) => Ok(()),
            LengthDist::Spec(DistSpec::Uniform { min, max }) if min > max => {
                bail!("{what}: uniform min {min} is above max {max}")
            }
            LengthDist::Spec(DistSpec::Normal { sd, .. }) if !(sd.is_finite() && *sd >= 0.0) => {
                bail!("{what}: normal sd must be a non-negative number")
            }
            LengthDist::Spec(DistSpec::Normal { min, max: Some(max), .. }) if min > max => {
                bail!("{what}: normal min {min} is above max {max}")
            }
            _ => Ok(()),
        }
    }
}

/// Service-level objective: a request counts toward goodput when it succeeded and met every
/// bound given here. `itl_ms` bounds the request's mean inter-token latency (TPOT).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    #[serde(default)]
    pub ttft_ms: Option<f64>,
    #[serde(default)]
    pub itl_ms: Option<f64>,
    #[serde(default)]
    pub e2e_ms: Option<f64>,
}

impl Scenario {
    /// Parses a scenario from TOML text. `dir` resolves relative prompt file paths.
    pub fn parse(text: &str, dir: Option<&Path>) -> Result<Scenario> {
        let mut s: Scenario = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        if let (Prompts::Jsonl { file, .. }, Some(dir)) = (&mut s.prompts, dir) {
            if file.is_relative() {
                *file = dir.join(&*file);
            }
        }
        Ok(s)
    }

    pub fn load(path: &Path) -> Result<Scenario> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading scenario {}", path.display()))?;
        Scenario::parse(&text, path.parent()).with_context(|| format!("in scenario {}", path.display()))
    }

    /// Checks the combinations serde cannot: call after CLI overrides.
    pub fn validate(&self) -> Result<LoadMode> {
        let mode = self.load.mode()?;
        if self.bounds.requests.is_none() && self.bounds.duration_s.is_none() {
            bail!("[bounds]: give `requests`, `duration_s` or both (a run must be bounded)");
        }
        if self.bounds.requests == Some(0) {
            bail!("[bounds] requests must be at least 1");
        }
        if let Some(d) = self.bounds.duration_s {
            if !(d.is_finite() && d > 0.0) {
                bail!("[bounds] duration_s must be a positive number");
            }
        }
        if !(self.target.request_timeout_s.is_finite() && self.target.request_timeout_s > 0.0) {
            bail!("[target] request_timeout_s must be a positive number");
        }
        if self.target.ws_max_inflight_per_socket == 0 || self.target.embeddings_batch == 0 {
            bail!("[target] ws_max_inflight_per_socket and embeddings_batch must be at least 1");
        }
        if !self.target.base_url.starts_with("http://") && !self.target.base_url.starts_with("https://") {
            bail!("[target] base_url must start with http:// or https:// (got {:?})", self.target.base_url);
        }
        if let Prompts::Synthetic { input_tokens, output_tokens, .. } = &self.prompts {
            input_tokens.validate("[prompts] input_tokens")?;
            output_tokens.validate("[prompts] output_tokens")?;
        }
        Ok(mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [target]
        base_url = "http://127.0.0.1:8080"
        model = "m"
        kind = "chat_sse"
    "#;

    #[test]
    fn minimal_scenario_gets_defaults() {
        let s = Scenario::parse(MINIMAL, None).unwrap();
        assert_eq!(s.target.kind, Kind::ChatSse);
        assert!(s.target.ignore_eos);
        assert_eq!(s.validate().unwrap(), LoadMode::Closed { concurrency: 1 });
        assert_eq!(s.bounds.requests, Some(100));
        assert!(matches!(s.prompts, Prompts::Synthetic { input_tokens: LengthDist::Fixed(128), .. }));
    }

    #[test]
    fn distributions_parse() {
        let text = format!(
            "{MINIMAL}\n[prompts]\nsource = \"synthetic\"\ninput_tokens = {{ dist = \"uniform\", min = 4, max = 9 }}\n\
             output_tokens = {{ dist = \"normal\", mean = 20.0, sd = 5.0, max = 40 }}\n"
        );
        let s = Scenario::parse(&text, None).unwrap();
        let Prompts::Synthetic { input_tokens, output_tokens, .. } = s.prompts else { panic!() };
        assert_eq!(input_tokens, LengthDist::Spec(DistSpec::Uniform { min: 4, max: 9 }));
        assert_eq!(output_tokens, LengthDist::Spec(DistSpec::Normal { mean: 20.0, sd: 5.0, min: 1, max: Some(40) }));
    }

    fn err(text: &str) -> String {
        format!("{:#}", Scenario::parse(text, None).unwrap_err())
    }

    #[test]
    fn unknown_keys_are_errors_everywhere() {
        let e = err(&format!("{MINIMAL}\nconcurency = 3\n"));
        assert!(e.contains("concurency"), "{e}");
        let e = err(&MINIMAL.replace("kind = ", "modle = \"x\"\nkind = "));
        assert!(e.contains("modle"), "{e}");
        let e = err(&format!("{MINIMAL}\n[load]\nconcurency = 3\n"));
        assert!(e.contains("concurency"), "{e}");
        let e = err(&format!("{MINIMAL}\n[bounds]\nrequest = 3\n"));
        assert!(e.contains("request"), "{e}");
        let e = err(&format!("{MINIMAL}\n[slo]\nttft = 3\n"));
        assert!(e.contains("ttft"), "{e}");
        let e = err(&format!("{MINIMAL}\n[prompts]\nsource = \"synthetic\"\ninput_len = 3\n"));
        assert!(e.contains("input_len"), "{e}");
        let e = err(&format!(
            "{MINIMAL}\n[prompts]\nsource = \"synthetic\"\ninput_tokens = {{ dist = \"uniform\", min = 1, maxx = 3 }}\n"
        ));
        assert!(e.contains("maxx"), "{e}");
        let e = err(&format!("{MINIMAL}\n[prompts]\nsource = \"csv\"\n"));
        assert!(e.contains("csv"), "{e}");
        let e = err(&MINIMAL.replace("chat_sse", "grpc"));
        assert!(e.contains("grpc"), "{e}");
    }

    #[test]
    fn invalid_combinations_are_errors() {
        let s = Scenario::parse(&format!("{MINIMAL}\n[load]\nconcurrency = 2\nrate = 3.0\n"), None).unwrap();
        assert!(s.validate().is_err());
        let s = Scenario::parse(&format!("{MINIMAL}\n[load]\nrate = -1.0\n"), None).unwrap();
        assert!(s.validate().is_err());
        let s = Scenario::parse(&format!("{MINIMAL}\n[bounds]\nwarmup_requests = 2\n"), None).unwrap();
        assert!(s.validate().unwrap_err().to_string().contains("bounded"));
        let s = Scenario::parse(
            &format!("{MINIMAL}\n[prompts]\nsource = \"synthetic\"\ninput_tokens = {{ dist = \"uniform\", min = 9, max = 3 }}\n"),
            None,
        )
        .unwrap();
        assert!(s.validate().is_err());
    }

    #[test]
    fn urls() {
        let mut s = Scenario::parse(MINIMAL, None).unwrap();
        assert_eq!(s.target.url("/chat/completions"), "http://127.0.0.1:8080/v1/chat/completions");
        assert_eq!(s.target.ws_url(), "ws://127.0.0.1:8080/v1/ws");
        s.target.base_url = "https://api.example.com/v1/".into();
        assert_eq!(s.target.url("/embeddings"), "https://api.example.com/v1/embeddings");
        assert_eq!(s.target.ws_url(), "wss://api.example.com/v1/ws");
    }

    #[test]
    fn shipped_scenarios_parse_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                s.validate().unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 4, "expected the four shipped scenarios, found {n}");
    }
}
