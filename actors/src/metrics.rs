//! Prometheus metrics, labelled by model. One `Metrics` per server; each batcher and request
//! actor holds the `ModelMetrics` children of its model so the hot path does no label lookups.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// The registry and metric families of one server.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    waiting: IntGaugeVec,
    running: IntGaugeVec,
    kv_blocks_used: IntGaugeVec,
    kv_blocks_total: IntGaugeVec,
    preemptions: IntCounterVec,
    steps: IntCounterVec,
    batch_size: HistogramVec,
    step_seconds: HistogramVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    e2e: HistogramVec,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
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
        let gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &m).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &m).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        Metrics {
            requests: counter(
                "kiln_requests_total",
                "Finished requests by finish reason.",
                &["model", "finish_reason"],
            ),
            prompt_tokens: counter("kiln_prompt_tokens_total", "Prompt tokens admitted.", &m),
            generation_tokens: counter("kiln_generation_tokens_total", "Tokens generated.", &m),
            waiting: gauge("kiln_queue_depth", "Sequences waiting for admission."),
            running: gauge("kiln_running_sequences", "Sequences in the running batch."),
            kv_blocks_used: gauge("kiln_kv_blocks_used", "KV cache blocks in use."),
            kv_blocks_total: gauge("kiln_kv_blocks_total", "KV cache blocks in the pool."),
            preemptions: counter("kiln_preemptions_total", "Sequences preempted by recompute.", &m),
            steps: counter("kiln_engine_steps_total", "Engine steps executed.", &m),
            batch_size: histogram(
                "kiln_batch_size",
                "Sequences per engine step.",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            ),
            step_seconds: histogram("kiln_step_seconds", "Engine step duration.", latency_buckets()),
            ttft: histogram("kiln_time_to_first_token_seconds", "Time from request to first token.", latency_buckets()),
            itl: histogram("kiln_inter_token_latency_seconds", "Time between consecutive tokens.", latency_buckets()),
            e2e: histogram("kiln_e2e_request_latency_seconds", "Time from request to its end.", latency_buckets()),
            registry,
        }
    }

    /// The metric children of `model`.
    pub fn for_model(&self, model: &str) -> ModelMetrics {
        let l = &[model];
        ModelMetrics {
            model: model.to_string(),
            requests: self.requests.clone(),
            prompt_tokens: self.prompt_tokens.with_label_values(l),
            generation_tokens: self.generation_tokens.with_label_values(l),
            waiting: self.waiting.with_label_values(l),
            running: self.running.with_label_values(l),
            kv_blocks_used: self.kv_blocks_used.with_label_values(l),
            kv_blocks_total: self.kv_blocks_total.with_label_values(l),
            preemptions: self.preemptions.with_label_values(l),
            steps: self.steps.with_label_values(l),
            batch_size: self.batch_size.with_label_values(l),
            step_seconds: self.step_seconds.with_label_values(l),
            ttft: self.ttft.with_label_values(l),
            itl: self.itl.with_label_values(l),
            e2e: self.e2e.with_label_values(l),
        }
    }

    /// The text exposition format of every metric.
    pub fn render(&self) -> String {
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
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub waiting: IntGauge,
    pub running: IntGauge,
    pub kv_blocks_used: IntGauge,
    pub kv_blocks_total: IntGauge,
    pub preemptions: IntCounter,
    pub steps: IntCounter,
    pub batch_size: Histogram,
    pub step_seconds: Histogram,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
}

impl ModelMetrics {
    /// Counts a finished request.
    pub fn request_finished(&self, finish_reason: &str) {
        self.requests.with_label_values(&[&self.model, finish_reason]).inc();
    }

    /// Children detached from any registry, for tests and tools.
    pub fn unregistered(model: &str) -> Self {
        Metrics::new().for_model(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_series_labelled_by_model() {
        let metrics = Metrics::new();
        let m = metrics.for_model("demo");
        m.generation_tokens.inc_by(3);
        m.ttft.observe(0.02);
        m.request_finished("stop");
        let text = metrics.render();
        assert!(text.contains("kiln_generation_tokens_total{model=\"demo\"} 3"), "{text}");
        assert!(text.contains("kiln_requests_total{finish_reason=\"stop\",model=\"demo\"} 1"), "{text}");
        assert!(text.contains("kiln_time_to_first_token_seconds_count{model=\"demo\"} 1"), "{text}");
    }
}
