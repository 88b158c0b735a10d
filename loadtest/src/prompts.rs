//! Prompt sets: synthetic (seeded words, lengths from distributions) or a JSONL file.
//! Request `i` is a pure function of (scenario, seed, i), so a run plan is reproducible no
//! matter which worker sends which request.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::scenario::{DistSpec, LengthDist, Prompts};

/// Short, common English words: with BPE tokenizers (GPT-2, Qwen, Llama) a space-prefixed
/// common word is one token, so `n` words is close to `n` prompt tokens.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "that",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "from",
    "have",
    "or",
    "by",
    "one",
    "had",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "an",
    "your",
    "which",
    "their",
    "said",
    "if",
    "do",
    "will",
    "each",
    "about",
    "how",
    "up",
    "out",
    "them",
    "then",
    "she",
    "many",
    "some",
    "so",
    "these",
    "would",
    "other",
    "into",
    "has",
    "more",
    "her",
    "two",
    "like",
    "him",
    "see",
    "time",
    "could",
    "no",
    "make",
    "than",
    "first",
    "been",
    "its",
    "who",
    "now",
    "people",
    "my",
    "made",
    "over",
    "did",
    "down",
    "only",
    "way",
    "find",
    "use",
    "may",
    "water",
    "long",
    "little",
    "very",
    "after",
    "words",
    "called",
    "just",
    "where",
    "most",
    "know",
    "get",
    "through",
    "back",
    "much",
    "before",
    "go",
    "good",
    "new",
    "write",
    "our",
    "used",
    "me",
    "man",
    "too",
    "any",
    "day",
    "same",
    "right",
    "look",
    "think",
    "also",
    "around",
    "another",
    "came",
    "come",
    "work",
    "three",
    "word",
    "must",
    "because",
    "does",
    "part",
    "even",
    "place",
    "well",
    "such",
    "here",
    "take",
    "why",
    "help",
    "put",
    "different",
    "away",
    "again",
    "off",
    "went",
    "old",
    "number",
    "great",
    "tell",
    "men",
    "say",
    "small",
    "every",
    "found",
    "still",
    "between",
    "name",
    "should",
    "home",
    "big",
    "give",
    "air",
    "line",
    "set",
    "own",
    "under",
    "read",
    "last",
    "never",
    "us",
    "left",
    "end",
    "along",
    "while",
    "might",
    "next",
    "sound",
    "below",
    "saw",
    "something",
    "thought",
    "both",
    "few",
    "those",
    "always",
    "show",
    "large",
    "often",
    "together",
    "asked",
    "house",
    "world",
    "going",
    "want",
    "school",
    "important",
    "until",
    "form",
    "food",
    "keep",
    "children",
    "feet",
    "land",
    "side",
    "without",
    "boy",
    "once",
    "animal",
    "life",
    "enough",
    "took",
    "four",
    "head",
    "above",
    "kind",
    "began",
    "almost",
    "live",
    "page",
    "got",
    "earth",
    "need",
    "far",
    "hand",
    "high",
    "year",
    "mother",
    "light",
    "country",
    "father",
    "let",
    "night",
    "picture",
    "being",
    "study",
    "second",
    "soon",
    "story",
    "since",
    "white",
    "ever",
    "paper",
    "hard",
    "near",
    "sentence",
    "better",
    "best",
    "across",
    "during",
    "today",
    "however",
    "sure",
];

/// What one request sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Prompt(String),
    Messages(Vec<Value>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    pub input: Input,
    pub max_tokens: u32,
    /// Intended prompt length in tokens (synthetic) or the line's word count (JSONL); the
    /// server's `usage.prompt_tokens` is the real number.
    pub input_tokens: u32,
}

impl RequestSpec {
    /// Chat messages, wrapping a bare prompt as one user message.
    pub fn messages(&self) -> Vec<Value> {
        match &self.input {
            Input::Messages(m) => m.clone(),
            Input::Prompt(p) => vec![json!({"role": "user", "content": p})],
        }
    }

    /// A plain prompt string, joining message contents when the input is a conversation.
    pub fn prompt(&self) -> String {
        match &self.input {
            Input::Prompt(p) => p.clone(),
            Input::Messages(m) => m
                .iter()
                .filter_map(|m| match &m["content"] {
                    Value::String(s) => Some(s.clone()),
                    Value::Array(parts) => {
                        Some(parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(" "))
                    }
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

pub enum PromptSet {
    Synthetic { seed: u64, input: LengthDist, output: LengthDist, system_prompt: Option<String> },
    Lines { seed: u64, lines: Vec<RequestSpec>, shuffle: bool },
}

fn rng_for(seed: u64, i: u64, stream: u64) -> StdRng {
    // SplitMix-style mixing so neighbouring indices get unrelated streams.
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// A standard normal sample (Box–Muller).
pub fn standard_normal<R: Rng>(rng: &mut R) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Draws one length from a distribution; never below 1 for normal (clipped to [min, max]).
pub fn sample_len<R: Rng>(d: &LengthDist, rng: &mut R) -> u32 {
    match d {
        LengthDist::Fixed(v) | LengthDist::Spec(DistSpec::Fixed { value: v }) => *v,
        LengthDist::Spec(DistSpec::Uniform { min, max }) => rng.random_range(*min..=*max),
        LengthDist::Spec(DistSpec::Normal { mean, sd, min, max }) => {
            let x = (mean + sd * standard_normal(rng)).round();
            let hi = max.map(f64::from).unwrap_or(f64::from(u32::MAX));
            x.clamp(f64::from(*min), hi) as u32
        }
    }
}

impl PromptSet {
    pub fn from_scenario(p: &Prompts, seed: u64) -> Result<PromptSet> {
        Ok(match p {
            Prompts::Synthetic { input_tokens, output_tokens, system_prompt } => PromptSet::Synthetic {
                seed,
                input: input_tokens.clone(),
                output: output_tokens.clone(),
                system_prompt: system_prompt.clone(),
            },
            Prompts::Jsonl { file, default_max_tokens, shuffle } => {
                PromptSet::Lines { seed, lines: read_jsonl(file, *default_max_tokens)?, shuffle: *shuffle }
            }
        })
    }

    /// The spec of request number `i` (warm-up requests come first).
    pub fn get(&self, i: u64) -> RequestSpec {
        match self {
            PromptSet::Synthetic { seed, input, output, system_prompt } => {
                let mut rng = rng_for(*seed, i, 1);
                let n_in = sample_len(input, &mut rng).max(1);
                let max_tokens = sample_len(output, &mut rng).max(1);
                let words: Vec<&str> = (0..n_in).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
                let text = words.join(" ");
                let input = match system_prompt {
                    Some(sys) => Input::Messages(vec![
                        json!({"role": "system", "content": sys}),
                        json!({"role": "user", "content": text}),
                    ]),
                    None => Input::Prompt(text),
                };
                RequestSpec { input, max_tokens, input_tokens: n_in }
            }
            PromptSet::Lines { seed, lines, shuffle } => {
                let n = lines.len() as u64;
                let round = i / n;
                let k = if *shuffle {
                    // A seeded permutation per pass over the file (Fisher–Yates on indices).
                    let mut idx: Vec<usize> = (0..lines.len()).collect();
                    let mut rng = rng_for(*seed, round, 2);
                    for j in (1..idx.len()).rev() {
                        idx.swap(j, rng.random_range(0..=j));
                    }
                    idx[(i % n) as usize]
                } else {
                    (i % n) as usize
                };
                lines[k].clone()
            }
        }
    }
}

fn read_jsonl(path: &Path, default_max_tokens: u32) -> Result<Vec<RequestSpec>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading prompt file {}", path.display()))?;
    parse_jsonl(&text, default_max_tokens).with_context(|| format!("in prompt file {}", path.display()))
}

/// Parses JSONL prompt lines: `{"prompt": "..."}` or `{"messages": [...]}` with an optional
/// `"max_tokens"`; blank lines are skipped.
pub fn parse_jsonl(text: &str, default_max_tokens: u32) -> Result<Vec<RequestSpec>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let lineno = n + 1;
        let v: Value = serde_json::from_str(line).with_context(|| format!("line {lineno}: invalid JSON"))?;
        let Value::Object(obj) = &v else { bail!("line {lineno}: expected a JSON object") };
        for k in obj.keys() {
            if !matches!(k.as_str(), "prompt" | "messages" | "max_tokens") {
                bail!("line {lineno}: unknown key {k:?} (expected prompt, messages, max_tokens)");
            }
        }
        let input = match (obj.get("prompt"), obj.get("messages")) {
            (Some(Value::String(p)), None) => Input::Prompt(p.clone()),
            (None, Some(Value::Array(m))) if !m.is_empty() => Input::Messages(m.clone()),
            (Some(_), Some(_)) => bail!("line {lineno}: give either prompt or messages, not both"),
            _ => bail!("line {lineno}: needs a string `prompt` or a non-empty `messages` array"),
        };
        let max_tokens = match obj.get("max_tokens") {
            None => default_max_tokens,
            Some(m) => m
                .as_u64()
                .and_then(|m| u32::try_from(m).ok())
                .filter(|&m| m > 0)
                .with_context(|| format!("line {lineno}: max_tokens must be a positive integer"))?,
        };
        let mut spec = RequestSpec { input, max_tokens, input_tokens: 0 };
        spec.input_tokens = spec.prompt().split_whitespace().count() as u32;
        out.push(spec);
    }
    if out.is_empty() {
        bail!("no prompts (the file is empty)");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_deterministic_and_sized() {
        let set = PromptSet::Synthetic {
            seed: 7,
            input: LengthDist::Spec(DistSpec::Uniform { min: 5, max: 9 }),
            output: LengthDist::Fixed(16),
            system_prompt: None,
        };
        for i in 0..200 {
            let a = set.get(i);
            assert_eq!(a, set.get(i));
            let n = a.prompt().split(' ').count() as u32;
            assert!((5..=9).contains(&n));
            assert_eq!(n, a.input_tokens);
            assert_eq!(a.max_tokens, 16);
        }
        assert_ne!(set.get(0), set.get(1));
    }

    #[test]
    fn normal_is_clipped_and_centred() {
        let d = LengthDist::Spec(DistSpec::Normal { mean: 100.0, sd: 30.0, min: 50, max: Some(140) });
        let mut rng = StdRng::seed_from_u64(1);
        let xs: Vec<u32> = (0..20_000).map(|_| sample_len(&d, &mut rng)).collect();
        assert!(xs.iter().all(|&x| (50..=140).contains(&x)));
        let unclipped = LengthDist::Spec(DistSpec::Normal { mean: 100.0, sd: 10.0, min: 1, max: None });
        let ys: Vec<f64> = (0..20_000).map(|_| f64::from(sample_len(&unclipped, &mut rng))).collect();
        let mean = ys.iter().sum::<f64>() / ys.len() as f64;
        let sd = (ys.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / ys.len() as f64).sqrt();
        assert!((mean - 100.0).abs() < 0.5, "{mean}");
        assert!((sd - 10.0).abs() < 0.5, "{sd}");
    }

    #[test]
    fn jsonl_lines() {
        let text = r#"{"prompt": "hello world", "max_tokens": 5}

{"messages": [{"role": "user", "content": "hi there you"}]}
"#;
        let lines = parse_jsonl(text, 9).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].max_tokens, 5);
        assert_eq!(lines[1].max_tokens, 9);
        assert_eq!(lines[1].prompt(), "hi there you");
        assert_eq!(lines[0].messages()[0]["content"], "hello world");
        assert!(parse_jsonl(r#"{"promt": "x"}"#, 1).unwrap_err().to_string().contains("promt"));
        assert!(parse_jsonl("", 1).is_err());
        let set = PromptSet::Lines { seed: 1, lines: lines.clone(), shuffle: false };
        assert_eq!(set.get(2), lines[0]);
        let set = PromptSet::Lines { seed: 1, lines, shuffle: true };
        let pass: Vec<u32> = (0..2).map(|i| set.get(i).max_tokens).collect();
        assert!(pass.contains(&5) && pass.contains(&9));
    }
}
