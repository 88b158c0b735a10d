//! Prometheus metrics, labelled by model. (implementation in progress)

/// The registry and metric families of one server.
#[derive(Clone)]
pub struct Metrics {
    pub registry: prometheus::Registry,
}

impl Metrics {
    pub fn new() -> Self {
        todo!()
    }
    pub fn for_model(&self, _model: &str) -> ModelMetrics {
        todo!()
    }
    /// The text exposition format of every metric.
    pub fn render(&self) -> String {
        todo!()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The metric children of one model.
#[derive(Clone)]
pub struct ModelMetrics {}
