//! Corpus files and in-process embedding for the offline commands (`kiln pca fit`,
//! `kiln index`): the server's tokenization (sentence-transformers' prompt and truncation)
//! and the same `EmbeddingEngine`, without the batcher or HTTP.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use kiln_models::{DeviceSpec, EmbeddingEngine, EmbeddingEngineOptions};

use crate::server::EmbeddingModel;

/// The texts of a corpus file: one per line, or JSON lines with a string `text` field (when the
/// first non-blank line is a JSON object). Blank lines are skipped.
pub fn read_corpus(path: &Path) -> anyhow::Result<Vec<String>> {
    let content = std::fs::read_to_string(path).with_context(|| format!("reading the corpus {}", path.display()))?;
    let jsonl = content
        .lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| l.trim_start().starts_with('{') && serde_json::from_str::<serde_json::Value>(l).is_ok());
    let mut texts = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if jsonl {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not a JSON object", path.display(), i + 1))?;
            match v.get("text") {
                Some(serde_json::Value::String(t)) if !t.is_empty() => texts.push(t.clone()),
                _ => {
                    bail!("{} line {}: expected a JSON object with a non-empty string \"text\"", path.display(), i + 1)
                }
            }
        } else {
            texts.push(line.to_string());
        }
    }
    if texts.is_empty() {
        bail!("the corpus {} has no texts", path.display());
    }
    Ok(texts)
}

/// An embedding model loaded in this process.
pub struct CorpusEmbedder {
    model: EmbeddingModel,
    engine: EmbeddingEngine,
    name: String,
    max_batch_tokens: usize,
}

impl CorpusEmbedder {
    pub fn load(dir: &Path, device: DeviceSpec, max_batch_tokens: usize) -> anyhow::Result<CorpusEmbedder> {
        let model = EmbeddingModel::from_dir(dir)
            .with_context(|| format!("reading the embedding model at {}", dir.display()))?;
        let opts = EmbeddingEngineOptions { device, max_batch_tokens, ..EmbeddingEngineOptions::default() };
        let engine = EmbeddingEngine::load(dir, &opts)
            .with_context(|| format!("loading the embedding model at {}", dir.display()))?;
        let name = crate::config::folder_name(dir).unwrap_or_default();
        Ok(CorpusEmbedder { model, engine, name, max_batch_tokens: max_batch_tokens.max(1) })
    }

    /// The model folder's name.
    pub fn model_name(&self) -> &str {
        &self.name
    }

    pub fn dimensions(&self) -> usize {
        self.model.dimensions
    }

    /// The model's vectors are unit length.
    pub fn normalize(&self) -> bool {
        self.model.normalize
    }

    /// Vectors of `texts` in order, tokenized as the API does (inputs longer than
    /// max_seq_length are cut), run in forwards of at most `max_batch_tokens` padded tokens.
    pub fn embed(&self, texts: &[String], prompt_name: Option<&str>) -> anyhow::Result<Vec<Vec<f32>>> {
        let t0 = Instant::now();
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                self.model.tokenizer.encode(t, prompt_name, true).with_context(|| format!("text {} ({t:?})", i + 1))
            })
            .collect::<anyhow::Result<_>>()?;
        let tokens: usize = ids.iter().map(Vec::len).sum();
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut out = vec![Vec::new(); ids.len()];
        let mut start = 0;
        let mut last_report = Instant::now();
        while start < order.len() {
            // Longest first: the batch's padded size is its first input's length × its count.
            let longest = ids[order[start]].len().max(1);
            let count = (self.max_batch_tokens / longest).max(1);
            let end = (start + count).min(order.len());
            let batch: Vec<&[u32]> = order[start..end].iter().map(|&i| ids[i].as_slice()).collect();
            let vectors = self.engine.embed(&batch).map_err(|e| anyhow::anyhow!("embedding failed: {e}"))?;
            for (&i, v) in order[start..end].iter().zip(vectors) {
                out[i] = v;
            }
            start = end;
            if last_report.elapsed().as_secs() >= 5 {
                tracing::info!(done = start, of = order.len(), "embedding the corpus");
                last_report = Instant::now();
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        tracing::info!(
            texts = texts.len(),
            tokens,
            seconds = secs,
            texts_per_s = texts.len() as f64 / secs.max(1e-9),
            "corpus embedded"
        );
        Ok(out)
    }
}
