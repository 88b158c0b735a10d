//! `kiln plan`: which of the configured models fit on a GPU of a given size, how many KV-cache
//! tokens each gets and how many full-context sequences that holds — computed from the model
//! folders (`config.json` and the safetensors headers) without loading any weights.
//!
//! The arithmetic, per card (all models of the config share one device):
//! - `capacity = gpu bytes × memory_fraction`;
//! - per model: weights ([`kiln_models::memory::estimate`]: header element count × configured
//!   dtype bytes) and an activation reserve ([`kiln_models::memory::activation_bytes`] for its
//!   `max_batch_tokens`, `max_running` and the planned context);
//! - `KV pool = capacity − Σ weights − Σ activation reserves`;
//! - the pool is split between the text models **in proportion to their configured
//!   `kv_cache_tokens`** (embedding models take no KV); when some say `kv_cache_tokens = "auto"`,
//!   the others get what they configured and the `auto` ones split the rest evenly (each capped
//!   at `max_running` sequences of the context: the server sizes them the same way); a model's
//!   share, in whole blocks of `block_size` tokens, is its KV capacity in tokens; `max sequences
//!   = KV blocks / ceil(context / block_size)`;
//! - the set **fits** when `Σ weights + Σ reserves ≤ capacity` and every text model can hold
//!   at least one sequence of the planned context.
//!
//! Sizes: every unit is binary. `GB`, `G` and `GiB` all mean 2^30 bytes (a "24 GB" card
//! reports 24 GiB or a hair less; an "80 GB" A100/H100 reports 80 GiB), `MB`/`MiB` 2^20,
//! `KB`/`KiB` 2^10, `TB`/`TiB` 2^40; a bare number is bytes.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use kiln_models::memory::{activation_bytes, estimate, ModelMemory};
use kiln_models::DType;
use serde::Serialize;

use crate::config::{Config, KvCacheTokens, ModelConfig};

const GIB: u64 = 1 << 30;

/// The cards printed when no `--gpu` is given.
pub const STANDARD_CARDS: [u64; 3] = [24 * GIB, 48 * GIB, 80 * GIB];

#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// TOML config file whose models are planned.
    #[arg(long, env = "KILN_CONFIG", default_value = "config/default.toml")]
    pub config: PathBuf,
    /// Plan this HuggingFace model folder instead of the config's models (repeatable).
    #[arg(long = "model", value_name = "DIR")]
    pub models: Vec<PathBuf>,
    /// Card memory: 24GB, 48GB, 80GB, 80GiB, 24576MB or bytes (GB = GiB = 2^30). Repeatable;
    /// without it the 24, 48 and 80 GB cards are shown side by side.
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub gpu: Vec<u64>,
    /// Context (prompt + output tokens) of one sequence; capped by each model's own limit.
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
    /// Share of the card Kiln may use.
    #[arg(long, default_value_t = 0.9)]
    pub memory_fraction: f64,
    /// Dtype of every model (overrides each model's `dtype`): f32, f16 or bf16.
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<DType>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Parses a card size; see the module documentation for the units.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    let value: f64 = num.parse().map_err(|_| format!("invalid size {s:?}: expected e.g. 24GB, 80GiB or bytes"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("invalid size {s:?}: unknown unit {unit:?} (use B, KB, MB, GB, TB; all binary)")),
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("invalid size {s:?}: out of range"));
    }
    if unit.is_empty() && num.contains('.') {
        return Err(format!("invalid size {s:?}: a byte count must be a whole number"));
    }
    Ok(bytes.round() as u64)
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s.to_ascii_lowercase().as_str() {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(format!("unknown dtype {s:?}: expected f32, f16 or bf16")),
    }
}

/// A card's name: "24 GB" for whole GiB, else GiB (or MiB) with two decimals.
pub fn card_label(bytes: u64) -> String {
    if bytes.is_multiple_of(GIB) {
        format!("{} GB", bytes / GIB)
    } else {
        gib(bytes)
    }
}

/// One model's card-independent figures.
#[derive(Debug, Clone, Serialize)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    pub block_size: usize,
    pub kv_cache_tokens: KvCacheTokens,
    pub max_batch_tokens: usize,
    pub max_running: usize,
    /// The planned context for this model: `--context` capped by `max_model_len` and the
    /// model's position table.
    pub context: usize,
    pub memory: ModelMemory,
    pub activation_bytes: u64,
}

impl ModelEntry {
    /// Estimates `m` (no weights are read) for sequences of `context` tokens.
    pub fn new(m: &ModelConfig, context: usize) -> anyhow::Result<ModelEntry> {
        let mut memory = estimate(&m.path, m.dtype).with_context(|| format!("model {:?}", m.name))?;
        let limit = m.max_model_len.unwrap_or(usize::MAX).min(memory.shape.max_positions);
        let image = memory.family == "image-generation";
        let ctx = if image { context } else { context.min(limit).max(1) };
        if ctx < context {
            memory.notes.push(format!("context capped at {ctx} tokens (the model's limit)"));
        }
        let activation = if image {
            crate::server::image_memory(m)?.activations
        } else {
            activation_bytes(&memory, m.max_batch_tokens, m.max_running, ctx)
        };
        Ok(ModelEntry {
            name: m.name.clone(),
            path: m.path.clone(),
            block_size: m.block_size,
            kv_cache_tokens: m.kv_cache_tokens,
            max_batch_tokens: m.max_batch_tokens,
            max_running: m.max_running,
            context: ctx,
            memory,
            activation_bytes: activation,
        })
    }
}

/// One model on one card.
#[derive(Debug, Clone, Serialize)]
pub struct CardModel {
    pub name: String,
    /// Its share of the KV pool in bytes (0 for embedding models).
    pub kv_share_bytes: u64,
    /// KV-cache capacity in tokens (whole blocks).
    pub kv_tokens: u64,
    /// Sequences of `context` tokens the KV capacity holds at once (before `max_running`).
    pub max_sequences: u64,
    /// `min(max_sequences, max_running)`.
    pub max_running_sequences: u64,
    pub context: usize,
}

/// The plan for one card.
#[derive(Debug, Clone, Serialize)]
pub struct CardPlan {
    pub label: String,
    pub gpu_bytes: u64,
    pub memory_fraction: f64,
    pub capacity_bytes: u64,
    pub weights_bytes: u64,
    pub activation_bytes: u64,
    /// `capacity − weights − activations`; negative when they do not fit.
    pub kv_pool_bytes: i64,
    pub models: Vec<CardModel>,
    pub fits: bool,
    /// Why it does not fit, and warnings (e.g. a configured `kv_cache_tokens` above capacity).
    pub reasons: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub context: usize,
    pub memory_fraction: f64,
    pub models: Vec<ModelEntry>,
    pub cards: Vec<CardPlan>,
}

/// A text model's claim on a device's KV pool (see [`kv_shares`]).
#[derive(Debug, Clone, Copy)]
pub struct KvClaim {
    /// Configured tokens; `None` for `auto`.
    pub tokens: Option<usize>,
    pub kv_bytes_per_token: u64,
    /// Most tokens an `auto` pool may take (`max_running` sequences of the context).
    pub cap_tokens: usize,
}

/// Splits `usable` KV bytes between text models. Without `auto` claims the split is in
/// proportion to the configured tokens; otherwise configured claims get their bytes and `auto`
/// claims share what is left evenly, each capped at its `cap_tokens`.
pub fn kv_shares(claims: &[KvClaim], usable: u64) -> Vec<u64> {
    let autos = claims.iter().filter(|c| c.tokens.is_none()).count() as u64;
    if autos == 0 {
        let total: u128 = claims.iter().map(|c| c.tokens.unwrap_or(0) as u128).sum();
        return claims
            .iter()
            .map(|c| (usable as u128 * c.tokens.unwrap_or(0) as u128).checked_div(total).unwrap_or(0) as u64)
            .collect();
    }
    let fixed: u64 = claims.iter().filter_map(|c| c.tokens.map(|t| t as u64 * c.kv_bytes_per_token)).sum();
    let each = usable.saturating_sub(fixed) / autos;
    claims
        .iter()
        .map(|c| match c.tokens {
            Some(t) => t as u64 * c.kv_bytes_per_token,
            None => each.min(c.cap_tokens as u64 * c.kv_bytes_per_token),
        })
        .collect()
}

/// Plans `models` on a card of `gpu_bytes`.
pub fn plan_card(models: &[ModelEntry], gpu_bytes: u64, memory_fraction: f64) -> CardPlan {
    let capacity = (gpu_bytes as f64 * memory_fraction).floor() as u64;
    let weights: u64 = models.iter().map(|m| m.memory.weights_bytes).sum();
    let activations: u64 = models.iter().map(|m| m.activation_bytes).sum();
    let pool = capacity as i64 - weights as i64 - activations as i64;
    let usable = pool.max(0) as u128;
    let claims: Vec<KvClaim> = models
        .iter()
        .map(|m| KvClaim {
            tokens: if m.memory.is_text() { m.kv_cache_tokens.tokens() } else { Some(0) },
            kv_bytes_per_token: m.memory.kv_bytes_per_token,
            cap_tokens: m.max_running * m.context.div_ceil(m.block_size) * m.block_size,
        })
        .collect();
    let shares = kv_shares(&claims, usable as u64);
    let (mut reasons, mut warnings) = (Vec::new(), Vec::new());
    if pool < 0 {
        reasons.push(format!(
            "weights {} + activation reserves {} exceed the capacity {}",
            gib(weights),
            gib(activations),
            gib(capacity)
        ));
    }
    let mut out = Vec::new();
    for (m, &share) in models.iter().zip(&shares) {
        let (share, kv_tokens, seqs) = if m.memory.is_text() && share > 0 {
            let block_bytes = m.memory.kv_bytes_per_token * m.block_size as u64;
            let blocks = share / block_bytes;
            let per_seq = m.context.div_ceil(m.block_size) as u64;
            (share, blocks * m.block_size as u64, blocks / per_seq)
        } else {
            (0, 0, 0)
        };
        if m.memory.is_text() {
            if pool >= 0 && seqs == 0 {
                reasons.push(format!(
                    "{}: its KV share ({kv_tokens} tokens) cannot hold one {}-token sequence",
                    m.name, m.context
                ));
            } else if pool >= 0 && m.kv_cache_tokens.tokens().is_some_and(|t| t as u64 > kv_tokens) {
                warnings.push(format!(
                    "{}: kv_cache_tokens = {} is more than the {kv_tokens} tokens that fit",
                    m.name, m.kv_cache_tokens
                ));
            }
        }
        out.push(CardModel {
            name: m.name.clone(),
            kv_share_bytes: share,
            kv_tokens,
            max_sequences: seqs,
            max_running_sequences: seqs.min(m.max_running as u64),
            context: m.context,
        });
    }
    CardPlan {
        label: card_label(gpu_bytes),
        gpu_bytes,
        memory_fraction,
        capacity_bytes: capacity,
        weights_bytes: weights,
        activation_bytes: activations,
        kv_pool_bytes: pool,
        models: out,
        fits: reasons.is_empty(),
        reasons,
        warnings,
    }
}

/// Plans the models of a config on each card.
pub fn plan(models: &[ModelConfig], context: usize, cards: &[u64], memory_fraction: f64) -> anyhow::Result<Plan> {
    anyhow::ensure!(!models.is_empty(), "no models to plan: the config has none and no --model was given");
    anyhow::ensure!(context >= 1, "--context must be at least 1");
    anyhow::ensure!(
        memory_fraction > 0.0 && memory_fraction <= 1.0,
        "--memory-fraction must be in (0, 1], got {memory_fraction}"
    );
    let entries = models.iter().map(|m| ModelEntry::new(m, context)).collect::<anyhow::Result<Vec<_>>>()?;
    let cards = cards.iter().map(|&g| plan_card(&entries, g, memory_fraction)).collect();
    Ok(Plan { context, memory_fraction, models: entries, cards })
}

fn gib(bytes: u64) -> String {
    if bytes >= GIB / 10 {
        format!("{:.2} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{:.2} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn signed_gib(bytes: i64) -> String {
    if bytes < 0 {
        format!("-{}", gib((-bytes) as u64))
    } else {
        gib(bytes as u64)
    }
}

fn params(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c == 0 {
                let _ = write!(line, "{cell:<w$}", w = widths[c]);
            } else {
                let _ = write!(line, "  {cell:>w$}", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The human-readable plan: a per-model table, then the cards side by side, then a verdict
/// line per card.
pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "context {} tokens per sequence, memory_fraction {:.2}; GB = GiB = 2^30 bytes\n",
        plan.context, plan.memory_fraction
    );
    let mut rows = vec![[
        "model",
        "family",
        "dtype",
        "params",
        "weights",
        "act. reserve",
        "KV/token",
        "context",
        "kv_cache_tokens",
    ]
    .map(String::from)
    .to_vec()];
    for m in &plan.models {
        let text = m.memory.is_text();
        rows.push(vec![
            m.name.clone(),
            m.memory.family.to_string(),
            format!("{:?}", m.memory.dtype).to_lowercase(),
            params(m.memory.params),
            gib(m.memory.weights_bytes),
            gib(m.activation_bytes),
            if text { format!("{:.1} KiB", m.memory.kv_bytes_per_token as f64 / 1024.0) } else { "-".into() },
            m.context.to_string(),
            if text { m.kv_cache_tokens.to_string() } else { "-".into() },
        ]);
    }
    out.push_str(&table(&rows));
    for m in &plan.models {
        for n in &m.memory.notes {
            let _ = writeln!(out, "  note: {}: {n}", m.name);
        }
    }
    out.push('\n');

    let mut rows =
        vec![std::iter::once("card".to_string()).chain(plan.cards.iter().map(|c| c.label.clone())).collect()];
    let mut row = |label: String, f: &dyn Fn(&CardPlan) -> String| {
        rows.push(std::iter::once(label).chain(plan.cards.iter().map(f)).collect::<Vec<_>>());
    };
    row(format!("capacity (x{:.2})", plan.memory_fraction), &|c| gib(c.capacity_bytes));
    row("weights".into(), &|c| gib(c.weights_bytes));
    row("activation reserves".into(), &|c| gib(c.activation_bytes));
    row("KV pool".into(), &|c| signed_gib(c.kv_pool_bytes));
    for (i, m) in plan.models.iter().enumerate() {
        if !m.memory.is_text() {
            continue;
        }
        row(format!("{}: KV tokens", m.name), &|c| c.models[i].kv_tokens.to_string());
        row(format!("{}: sequences @{}", m.name, m.context), &|c| {
            let cm = &c.models[i];
            if cm.max_sequences > cm.max_running_sequences {
                format!("{} (run {})", cm.max_sequences, cm.max_running_sequences)
            } else {
                cm.max_sequences.to_string()
            }
        });
    }
    row("fits".into(), &|c| if c.fits { "yes".into() } else { "NO".into() });
    out.push_str(&table(&rows));
    out.push('\n');
    for c in &plan.cards {
        let _ = writeln!(out, "{}", verdict(c));
        for w in &c.warnings {
            let _ = writeln!(out, "  warning: {w}");
        }
    }
    out
}

/// "24 GB: fits — ..." or "24 GB: does NOT fit — reasons".
pub fn verdict(c: &CardPlan) -> String {
    if c.fits {
        let seqs: Vec<String> = c
            .models
            .iter()
            .filter(|m| m.kv_tokens > 0)
            .map(|m| {
                format!("{} {} KV tokens = {} x {}-token sequences", m.name, m.kv_tokens, m.max_sequences, m.context)
            })
            .collect();
        let tail = if seqs.is_empty() { String::new() } else { format!("; {}", seqs.join("; ")) };
        format!("{}: fits — {} KV pool{tail}", c.label, gib(c.kv_pool_bytes.max(0) as u64))
    } else {
        format!("{}: does NOT fit — {}", c.label, c.reasons.join("; "))
    }
}

/// `kiln plan`.
pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let mut models = if args.models.is_empty() {
        Config::load(&args.config)?.models
    } else {
        args.models.iter().map(|d| ModelConfig::from_dir(d)).collect()
    };
    if let Some(dtype) = args.dtype {
        for m in &mut models {
            m.dtype = dtype;
        }
    }
    let cards = if args.gpu.is_empty() { STANDARD_CARDS.to_vec() } else { args.gpu.clone() };
    let plan = plan(&models, args.context, &cards, args.memory_fraction)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", render(&plan));
    }
    Ok(())
}
