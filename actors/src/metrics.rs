//! Prometheus metrics, labelled by model. One `Metrics` per server; each batcher and request
//! actor holds the `ModelMetrics` children of its model so the hot path does no label lookups.
//!
//! Exposed series (every one has a `model` label):
//! `kiln_requests_total{status}` (one per request: a finish reason `stop`/`length`, or
//! `cancelled`, `timeout`, `error`, `rejected`), `kiln_rejected_total{reason}` (`overloaded`,
//! `too_large`, `unavailable`, `draining`, `timeout` = the deadline passed before the first
//! token), `kiln_queue_depth`, `kiln_running_sequences`, `kiln_batch_size`,
//! `kiln_step_duration_seconds`, `kiln_engine_steps_total`, `kiln_time_to_first_token_seconds`,
//! `kiln_inter_token_latency_seconds`, `kiln_request_duration_seconds`,
//! `kiln_queue_duration_seconds`, `kiln_prompt_tokens_total`, `kiln_generated_tokens_total`,
//! `kiln_kv_cache_usage_ratio`, `kiln_kv_blocks_used`, `kiln_kv_blocks_total`,
//! `kiln_preemptions_total`, `kiln_memory_bytes{kind=weights|kv|activations}`,
//! `kiln_model_loaded`, `kiln_model_loads_total`, `kiln_model_unloads_total`; speech models
//! also `kiln_generated_audio_seconds_total` and `kiln_time_to_first_audio_seconds`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Why a request was refused (the `reason` of `kiln_rejected_total`).
pub mod reject_reason {
    /// The model's queue is full (429).
    pub const OVERLOADED: &str = "overloaded";
    /// The request can never fit the model's KV pool.
    pub const TOO_LARGE: &str = "too_large";
    /// The model's batcher is not running or failed to load (503).
    pub const UNAVAILABLE: &str = "unavailable";
    /// The server is shutting down (503).
    pub const DRAINING: &str = "draining";
    /// The deadline passed before the first token (still queued).
    pub const TIMEOUT: &str = "timeout";
    pub const ALL: [&str; 5] = [OVERLOADED, TOO_LARGE, UNAVAILABLE, DRAINING, TIMEOUT];
}

/// The registry and metric families of one server.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    rejected: IntCounterVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    waiting: IntGaugeVec,
    running: IntGaugeVec,
    kv_blocks_used: IntGaugeVec,
    kv_blocks_total: IntGaugeVec,
    kv_usage_ratio: GaugeVec,
    preemptions: IntCounterVec,
    steps: IntCounterVec,
    batch_size: HistogramVec,
    step_seconds: HistogramVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    e2e: HistogramVec,
    queue_seconds: HistogramVec,
    memory: IntGaugeVec,
    model_loaded: IntGaugeVec,
    model_loads: IntCounterVec,
    model_unloads: IntCounterVec,
    audio_seconds: CounterVec,
    ttfa: HistogramVec,
    /// Every model's children, to derive `kiln_kv_cache_usage_ratio` at scrape time.
    models: Arc<Mutex<BTreeMap<String, ModelMetrics>>>,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
}

fn long_buckets() -> Vec<f64> {
    vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = ["model"];
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &m).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let kv_usage_ratio =
            GaugeVec::new(Opts::new("kiln_kv_cache_usage_ratio", "Fraction of the KV cache blocks in use (0..1)."), &m)
                .expect("valid metric");
        registry.register(Box::new(kv_usage_ratio.clone())).expect("unique metric");
        Metrics {
            requests: counter(
                "kiln_requests_total",
                "Requests by outcome: a finish reason (stop, length), cancelled, timeout, error or rejected.",
                &["model", "status"],
            ),
            rejected: counter(
                "kiln_rejected_total",
                "Requests refused, by reason (overloaded, too_large, unavailable, draining, timeout).",
                &["model", "reason"],
            ),
            prompt_tokens: counter("kiln_prompt_tokens_total", "Prompt tokens admitted.", &m),
            generation_tokens: counter("kiln_generated_tokens_total", "Tokens generated.", &m),
            waiting: gauge("kiln_queue_depth", "Sequences waiting for admission.", &m),
            running: gauge("kiln_running_sequences", "Sequences in the running batch.", &m),
            kv_blocks_used: gauge("kiln_kv_blocks_used", "KV cache blocks in use.", &m),
            kv_blocks_total: gauge("kiln_kv_blocks_total", "KV cache blocks in the pool.", &m),
            kv_usage_ratio,
            preemptions: counter("kiln_preemptions_total", "Sequences preempted by recompute.", &m),
            steps: counter("kiln_engine_steps_total", "Engine steps executed.", &m),
            batch_size: histogram(
                "kiln_batch_size",
                "Sequences per engine step.",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            ),
            step_seconds: histogram("kiln_step_duration_seconds", "Engine step duration.", latency_buckets()),
            ttft: histogram("kiln_time_to_first_token_seconds", "Time from request to first token.", latency_buckets()),
            itl: histogram("kiln_inter_token_latency_seconds", "Time between consecutive tokens.", latency_buckets()),
            e2e: histogram(
                "kiln_request_duration_seconds",
                "Time from a request's submission to its end (any outcome).",
                long_buckets(),
            ),
            queue_seconds: histogram(
                "kiln_queue_duration_seconds",
                "Time a sequence waited in the queue before admission.",
                long_buckets(),
            ),
            memory: gauge(
                "kiln_memory_bytes",
                "Device memory reserved by kind (weights, kv, activations).",
                &["model", "kind"],
            ),
            model_loaded: gauge("kiln_model_loaded", "1 while the model is loaded on its device.", &m),
            model_loads: counter("kiln_model_loads_total", "Times the model was loaded.", &m),
            model_unloads: counter("kiln_model_unloads_total", "Times the model was unloaded.", &m),
            audio_seconds: {
                let c = CounterVec::new(
                    Opts::new("kiln_generated_audio_seconds_total", "Seconds of audio generated (speech models)."),
                    &m,
                )
                .expect("valid metric");
                registry.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            ttfa: histogram(
                "kiln_time_to_first_audio_seconds",
                "Time from a speech request's submission to its first audio (speech models).",
                latency_buckets(),
            ),
            models: Default::default(),
            registry,
        }
    }

    /// The metric children of `model` (the same children on every call).
    pub fn for_model(&self, model: &str) -> ModelMetrics {
        let mut models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = models.get(model) {
            return m.clone();
        }
        let l = &[model];
        // Every usual outcome and reason exists from the start (at 0), so rates see them.
        for status in ["stop", "length", "cancelled", "timeout", "error", "rejected"] {
            self.requests.with_label_values(&[model, status]);
        }
        let rejected = reject_reason::ALL
            .iter()
            .map(|r| (*r, self.rejected.with_label_values(&[model, r])))
            .collect::<BTreeMap<_, _>>();
        let m = ModelMetrics {
            model: model.to_string(),
            requests: self.requests.clone(),
            rejected_vec: self.rejected.clone(),
            rejected: Arc::new(rejected),
            prompt_tokens: self.prompt_tokens.with_label_values(l),
            generation_tokens: self.generation_tokens.with_label_values(l),
            waiting: self.waiting.with_label_values(l),
            running: self.running.with_label_values(l),
            kv_blocks_used: self.kv_blocks_used.with_label_values(l),
            kv_blocks_total: self.kv_blocks_total.with_label_values(l),
            kv_usage_ratio: self.kv_usage_ratio.with_label_values(l),
            preemptions: self.preemptions.with_label_values(l),
            steps: self.steps.with_label_values(l),
            batch_size: self.batch_size.with_label_values(l),
            step_seconds: self.step_seconds.with_label_values(l),
            ttft: self.ttft.with_label_values(l),
            itl: self.itl.with_label_values(l),
            e2e: self.e2e.with_label_values(l),
            queue_seconds: self.queue_seconds.with_label_values(l),
            mem_weights: self.memory.with_label_values(&[model, "weights"]),
            mem_kv: self.memory.with_label_values(&[model, "kv"]),
            mem_activations: self.memory.with_label_values(&[model, "activations"]),
            model_loaded: self.model_loaded.with_label_values(l),
            model_loads: self.model_loads.with_label_values(l),
            model_unloads: self.model_unloads.with_label_values(l),
            audio_seconds: self.audio_seconds.with_label_values(l),
            ttfa: self.ttfa.with_label_values(l),
        };
        models.insert(model.to_string(), m.clone());
        m
    }

    /// The text exposition format of every metric.
    pub fn render(&self) -> String {
        for m in self.models.lock().unwrap_or_else(|e| e.into_inner()).values() {
            m.refresh_kv_usage();
        }
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The metric children of one model.
#[derive(Clone)]
pub struct ModelMetrics {
    model: String,
    requests: IntCounterVec,
    rejected_vec: IntCounterVec,
    rejected: Arc<BTreeMap<&'static str, IntCounter>>,
    pub prompt_tokens: IntCounter,
    /// `kiln_generated_tokens_total`.
    pub generation_tokens: IntCounter,
    /// `kiln_queue_depth`.
    pub waiting: IntGauge,
    /// `kiln_running_sequences`.
    pub running: IntGauge,
    pub kv_blocks_used: IntGauge,
    pub kv_blocks_total: IntGauge,
    /// `kiln_kv_cache_usage_ratio`; also derived from the two block gauges at every scrape.
    pub kv_usage_ratio: Gauge,
    pub preemptions: IntCounter,
    /// `kiln_engine_steps_total`.
    pub steps: IntCounter,
    pub batch_size: Histogram,
    /// `kiln_step_duration_seconds`.
    pub step_seconds: Histogram,
    pub ttft: Histogram,
    pub itl: Histogram,
    /// `kiln_request_duration_seconds`: generations (request actor) and embedding requests.
    pub e2e: Histogram,
    /// `kiln_queue_duration_seconds`: submission to admission (the batcher observes it).
    pub queue_seconds: Histogram,
    /// `kiln_memory_bytes{kind="weights"}`.
    pub mem_weights: IntGauge,
    /// `kiln_memory_bytes{kind="kv"}`.
    pub mem_kv: IntGauge,
    /// `kiln_memory_bytes{kind="activations"}`.
    pub mem_activations: IntGauge,
    /// `kiln_model_loaded`: 1 while loaded, 0 otherwise.
    pub model_loaded: IntGauge,
    pub model_loads: IntCounter,
    pub model_unloads: IntCounter,
    /// `kiln_generated_audio_seconds_total` (speech models; the API counts what it sends).
    pub audio_seconds: Counter,
    /// `kiln_time_to_first_audio_seconds` (speech models).
    pub ttfa: Histogram,
}

impl ModelMetrics {
    /// The model these children are labelled with.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Counts a request's outcome in `kiln_requests_total{status}`: once per request.
    pub fn request_finished(&self, status: &str) {
        self.requests.with_label_values(&[&self.model, status]).inc();
    }

    /// The `kiln_rejected_total{reason}` child of `reason` (see `reject_reason`).
    pub fn rejected(&self, reason: &str) -> IntCounter {
        match self.rejected.get(reason) {
            Some(c) => c.clone(),
            None => self.rejected_vec.with_label_values(&[&self.model, reason]),
        }
    }

    /// A refused request: `kiln_rejected_total{reason}` and `kiln_requests_total{status="rejected"}`.
    pub fn reject(&self, reason: &str) {
        self.rejected(reason).inc();
        self.request_finished("rejected");
    }

    /// Sets `kiln_kv_cache_usage_ratio` from the block gauges (0 when the pool is empty).
    pub fn refresh_kv_usage(&self) {
        let total = self.kv_blocks_total.get();
        let ratio = if total > 0 { self.kv_blocks_used.get() as f64 / total as f64 } else { 0.0 };
        self.kv_usage_ratio.set(ratio);
    }

    /// Children detached from any registry, for tests and tools.
    pub fn unregistered(model: &str) -> Self {
        Metrics::new().for_model(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names the issue lists; dashboards and alerts depend on them.
    const EXPOSED: [&str; 20] = [
        "kiln_requests_total",
        "kiln_queue_depth",
        "kiln_running_sequences",
        "kiln_batch_size",
        "kiln_step_duration_seconds",
        "kiln_time_to_first_token_seconds",
        "kiln_inter_token_latency_seconds",
        "kiln_request_duration_seconds",
        "kiln_queue_duration_seconds",
        "kiln_prompt_tokens_total",
        "kiln_generated_tokens_total",
        "kiln_kv_cache_usage_ratio",
        "kiln_preemptions_total",
        "kiln_rejected_total",
        "kiln_memory_bytes",
        "kiln_model_loaded",
        "kiln_model_loads_total",
        "kiln_model_unloads_total",
        "kiln_kv_blocks_used",
        "kiln_engine_steps_total",
    ];

    #[test]
    fn renders_series_labelled_by_model() {
        let metrics = Metrics::new();
        let m = metrics.for_model("demo");
        m.generation_tokens.inc_by(3);
        m.ttft.observe(0.02);
        m.request_finished("stop");
        m.reject(reject_reason::OVERLOADED);
        m.mem_kv.set(1024);
        let text = metrics.render();
        assert!(text.contains("kiln_generated_tokens_total{model=\"demo\"} 3"), "{text}");
        assert!(text.contains("kiln_requests_total{model=\"demo\",status=\"stop\"} 1"), "{text}");
        assert!(text.contains("kiln_requests_total{model=\"demo\",status=\"rejected\"} 1"), "{text}");
        assert!(text.contains("kiln_rejected_total{model=\"demo\",reason=\"overloaded\"} 1"), "{text}");
        assert!(text.contains("kiln_rejected_total{model=\"demo\",reason=\"draining\"} 0"), "{text}");
        assert!(text.contains("kiln_memory_bytes{kind=\"kv\",model=\"demo\"} 1024"), "{text}");
        assert!(text.contains("kiln_time_to_first_token_seconds_count{model=\"demo\"} 1"), "{text}");
    }

    #[test]
    fn every_listed_name_is_exposed_for_each_model() {
        let metrics = Metrics::new();
        metrics.for_model("a");
        metrics.for_model("b");
        let text = metrics.render();
        for name in EXPOSED {
            for model in ["a", "b"] {
                let found = text.lines().any(|l| {
                    !l.starts_with('#')
                        && l.starts_with(name)
                        && l[name.len()..].starts_with(['{', '_'])
                        && l.contains(&format!("model=\"{model}\""))
                });
                assert!(found, "no {name} series for model {model}:\n{text}");
            }
        }
    }

    /// The `kiln_*` names in `text`, without a histogram's `_bucket`/`_sum`/`_count` suffix.
    fn names_in(text: &str) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        let bytes = text.as_bytes();
        let mut i = 0;
        while let Some(at) = text[i..].find("kiln_") {
            let start = i + at;
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
                end += 1;
            }
            let name = &text[start..end];
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            names.insert(base.to_string());
            i = end;
        }
        names
    }

    #[test]
    fn the_dashboard_and_deploy_docs_query_only_exposed_metrics() {
        let metrics = Metrics::new();
        metrics.for_model("m");
        let exposed = names_in(&metrics.render());
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for file in ["deploy/grafana/dashboards/kiln.json", "deploy/README.md", "tests/prometheus_scrape.sh"] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            let unknown: Vec<String> = names_in(&text)
                .into_iter()
                .filter(|n| !exposed.contains(n) && !n.ends_with('_') && n != "kiln_demo")
                .collect();
            assert!(unknown.is_empty(), "{file} names metrics Kiln does not export: {unknown:?}");
        }
    }

    #[test]
    fn kv_usage_ratio_follows_the_block_gauges() {
        let metrics = Metrics::new();
        let m = metrics.for_model("kv");
        m.kv_blocks_total.set(8);
        m.kv_blocks_used.set(2);
        assert!(metrics.render().contains("kiln_kv_cache_usage_ratio{model=\"kv\"} 0.25"));
        m.kv_blocks_used.set(0);
        assert!(metrics.render().contains("kiln_kv_cache_usage_ratio{model=\"kv\"} 0"));
    }

    #[test]
    fn for_model_returns_the_same_children() {
        let metrics = Metrics::new();
        metrics.for_model("x").prompt_tokens.inc();
        metrics.for_model("x").prompt_tokens.inc();
        assert_eq!(metrics.for_model("x").prompt_tokens.get(), 2);
    }
}
