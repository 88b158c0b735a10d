//! Per-sequence sampling on the host.
//!
//! One [`Sampler`] per sequence, called on the engine thread once per generated token over the
//! full-vocabulary logits. The work per call is linear in the vocabulary: no full sort, scratch
//! buffers are allocated once per sampler and reused.
//!
//! Order of operations (vLLM semantics):
//! 1. logprobs (when asked) from the raw logits: stable log-softmax, f64 accumulation;
//! 2. repetition penalty (HF, prompt + output tokens), frequency and presence penalties (output
//!    tokens);
//! 3. greedy argmax when `temperature < 1e-5` (ties: lowest id), otherwise temperature, top-k,
//!    top-p, min-p, renormalisation and a draw from the sequence's own RNG.

use std::cmp::Ordering;
use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::text::{SamplingParams, TokenOutput};

/// Temperatures below this are greedy.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// Up to this many top logprobs are tracked with an insertion list; above, by selection.
const SMALL_TOP_K: usize = 64;
/// The top-p search sorts the candidates once their unresolved range is this small.
const NUCLEUS_SORT_LEN: usize = 64;

/// Owns one sequence's RNG and penalty counts, so its output never depends on the batch.
pub struct Sampler {
    params: SamplingParams,
    logprobs: Option<usize>,
    rng: ChaCha8Rng,
    /// Distinct tokens subject to penalties: the prompt's (only when the repetition penalty is
    /// active) and every generated token, in first-seen order.
    seen: Vec<u32>,
    /// Token -> index in `seen`.
    seen_index: HashMap<u32, usize>,
    /// Occurrences of `seen[i]` in the output.
    out_counts: Vec<u32>,
    generated: usize,
    /// Scratch: raw logits of `seen` before penalties (to report the chosen token's logprob).
    saved: Vec<f32>,
    /// Scratch: (token, logit or weight) candidates.
    cands: Vec<(u32, f32)>,
    /// Scratch: top raw logits for logprobs.
    top: Vec<(u32, f32)>,
    /// Scratch: per-token weights and their chunk sums (whole-vocabulary draws).
    weights: Vec<f32>,
    chunk_sums: Vec<f64>,
}

impl Sampler {
    /// `logprobs`: Some(k) to report the sampled token's logprob and the top-k.
    pub fn new(params: &SamplingParams, prompt: &[u32], logprobs: Option<usize>) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        let mut s = Sampler {
            params: params.clone(),
            logprobs,
            rng,
            seen: Vec::new(),
            seen_index: HashMap::new(),
            out_counts: Vec::new(),
            generated: 0,
            saved: Vec::new(),
            cands: Vec::new(),
            top: Vec::new(),
            weights: Vec::new(),
            chunk_sums: Vec::new(),
        };
        if s.repetition_active() {
            for &t in prompt {
                s.index_of(t);
            }
        }
        s
    }

    /// The parameters this sampler runs with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether this sampler always picks the argmax.
    pub fn is_greedy(&self) -> bool {
        is_greedy(self.params.temperature)
    }

    /// Tokens recorded as generated so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// How many times `token` was generated so far.
    pub fn output_count(&self, token: u32) -> u32 {
        self.seen_index.get(&token).map_or(0, |&i| self.out_counts[i])
    }

    /// Records a token appended to the output without [`Sampler::sample`] (e.g. forced), so
    /// penalties see it. `sample` records its own choice: do not call this for it.
    pub fn record(&mut self, token: u32) {
        let i = self.index_of(token);
        self.out_counts[i] += 1;
        self.generated += 1;
    }

    /// Picks the next token from raw logits (used as scratch) and records it for penalties.
    ///
    /// NaN logits are treated as `-inf`, `+inf` as `f32::MAX`. If every logit is `-inf`, the
    /// distribution is taken as uniform.
    pub fn sample(&mut self, logits: &mut [f32]) -> TokenOutput {
        assert!(!logits.is_empty(), "sampling over an empty vocabulary");
        assert!(logits.len() <= u32::MAX as usize);
        let raw_max = sanitize_max(logits);

        // 1. Logprobs over the raw logits.
        let mut lse = None;
        let mut top_logprobs = Vec::new();
        if let Some(k) = self.logprobs {
            let l = LogSoftmax::new(logits, raw_max);
            if k > 0 {
                top_raw_logits(logits, k, &mut self.top, &mut self.cands);
                top_logprobs = self.top.iter().map(|&(t, v)| (t, l.logprob(v))).collect();
            }
            lse = Some(l);
        }

        // 2. Penalties.
        let penalized = self.apply_penalties(logits);

        // 3. Choice.
        let token = if self.is_greedy() { argmax(logits) } else { self.draw(logits) };

        let logprob = lse.map(|l| {
            let raw = match (penalized, self.seen_index.get(&token)) {
                (true, Some(&i)) => self.saved[i],
                _ => logits[token as usize],
            };
            l.logprob(raw)
        });
        self.record(token);
        TokenOutput { token, logprob, top_logprobs }
    }

    fn repetition_active(&self) -> bool {
        self.params.repetition_penalty != 1.0
    }

    fn index_of(&mut self, token: u32) -> usize {
        if let Some(&i) = self.seen_index.get(&token) {
            return i;
        }
        let i = self.seen.len();
        self.seen.push(token);
        self.out_counts.push(0);
        self.seen_index.insert(token, i);
        i
    }

    /// Applies repetition, frequency and presence penalties in place; saves the raw values of
    /// the touched logits in `saved` (parallel to `seen`). Returns whether anything was touched.
    fn apply_penalties(&mut self, logits: &mut [f32]) -> bool {
        let rep = self.params.repetition_penalty;
        let freq = self.params.frequency_penalty;
        let pres = self.params.presence_penalty;
        let additive = (freq != 0.0 || pres != 0.0) && self.generated > 0;
        if (rep == 1.0 && !additive) || self.seen.is_empty() {
            return false;
        }
        self.saved.clear();
        for (i, &tok) in self.seen.iter().enumerate() {
            let Some(l) = logits.get_mut(tok as usize) else {
                self.saved.push(f32::NEG_INFINITY);
                continue;
            };
            self.saved.push(*l);
            if rep != 1.0 {
                *l = if *l > 0.0 { *l / rep } else { *l * rep };
            }
            let c = self.out_counts[i];
            if c > 0 {
                *l -= freq * c as f32 + pres;
            }
        }
        true
    }

    /// Temperature, top-k, top-p, min-p, then a draw. `logits` are penalised but unscaled.
    ///
    /// Weights are probabilities relative to the max (the argmax has weight exactly 1), so
    /// min-p is a fixed threshold and nothing needs normalising before the draw.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let SamplingParams { temperature, top_k, top_p, min_p, .. } = self.params;
        let n = logits.len();
        let m = max_f32(logits);
        if m == f32::NEG_INFINITY {
            return self.rng.random_range(0..n as u32);
        }
        let inv_t = 1.0 / temperature;
        let min_w = min_p.max(0.0);
        let cands = &mut self.cands;
        cands.clear();

        if top_k > 0 && top_k < n {
            // top-k on logits (same order as probabilities), best first.
            top_raw_logits(logits, top_k, cands, &mut self.top);
            let mut total = 0.0f64;
            for c in cands.iter_mut() {
                c.1 = exp_nonpos((c.1 - m) * inv_t);
                total += c.1 as f64;
            }
            if top_p < 1.0 {
                nucleus(cands, total, top_p);
            }
            if min_w > 0.0 {
                cands.retain(|c| c.1 >= min_w);
            }
            return draw_from(cands, &mut self.rng);
        }

        // Whole vocabulary: weights for every token, in a vectorisable pass.
        let weights = &mut self.weights;
        weights.clear();
        weights.extend(logits.iter().map(|&l| exp_nonpos((l - m) * inv_t)));
        self.chunk_sums.clear();
        self.chunk_sums.extend(weights.chunks(DRAW_CHUNK).map(sum_f64));
        let total: f64 = self.chunk_sums.iter().sum();

        if top_p >= 1.0 && min_w <= 0.0 {
            return draw_chunked(weights, &self.chunk_sums, total, &mut self.rng);
        }

        // Only tokens that can survive become candidates: below `tau`, all tokens together
        // weigh at most n * tau <= (1 - top_p) * total, so the nucleus never reaches them; below
        // `min_w`, min-p drops them anyway.
        let tau = if top_p < 1.0 { (0.5 * (1.0 - top_p as f64) * total / n as f64) as f32 } else { 0.0 };
        let thr = tau.max(min_w);
        cands.extend(weights.iter().enumerate().filter(|(_, &w)| w > 0.0 && w >= thr).map(|(i, &w)| (i as u32, w)));
        if top_p < 1.0 {
            // Against the full total: if the candidates never reach it, min-p cut the nucleus.
            nucleus(cands, total, top_p);
        }
        draw_from(cands, &mut self.rng)
    }
}

/// Tokens per chunk of the whole-vocabulary draw (chunk sums first, then one chunk).
const DRAW_CHUNK: usize = 1024;

/// Draws from `(token, weight)` candidates proportionally to their weights.
fn draw_from(cands: &[(u32, f32)], rng: &mut ChaCha8Rng) -> u32 {
    let total: f64 = cands.iter().map(|c| c.1 as f64).sum();
    // The argmax (weight 1) always survives the filters, so `total > 0`; never panic anyway.
    if cands.is_empty() || total <= 0.0 || !total.is_finite() {
        return cands.first().map_or(0, |c| c.0);
    }
    let u = rng.random::<f64>() * total;
    let mut cum = 0.0f64;
    let mut last = cands[0].0;
    for &(t, w) in cands {
        if w > 0.0 {
            cum += w as f64;
            last = t;
            if cum > u {
                return t;
            }
        }
    }
    last
}

/// Draws a token from per-token weights, using precomputed sums of `DRAW_CHUNK`-sized chunks.
fn draw_chunked(weights: &[f32], chunk_sums: &[f64], total: f64, rng: &mut ChaCha8Rng) -> u32 {
    let last_positive = |ws: &[f32], base: usize| ws.iter().rposition(|&w| w > 0.0).map(|j| (base + j) as u32);
    let u = rng.random::<f64>() * total;
    let mut cum = 0.0f64;
    for (ci, &cs) in chunk_sums.iter().enumerate() {
        if cum + cs > u {
            let base = ci * DRAW_CHUNK;
            let chunk = &weights[base..(base + DRAW_CHUNK).min(weights.len())];
            for (j, &w) in chunk.iter().enumerate() {
                cum += w as f64;
                if w > 0.0 && cum > u {
                    return (base + j) as u32;
                }
            }
            // Rounding between the chunk sum and the running sum.
            if let Some(t) = last_positive(chunk, base) {
                return t;
            }
        } else {
            cum += cs;
        }
    }
    last_positive(weights, 0).unwrap_or(0)
}

/// `exp(x)` for `x <= 0` (positive `x` is taken as 0), exactly 0 below -87 and for `-inf`, exactly
/// 1 at 0. Relative error ~1e-7; branch-free so that loops over it vectorise.
#[inline(always)]
pub fn exp_nonpos(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to an integer.
    let xc = if x > -87.0 { x } else { -87.0 };
    let xc = if xc < 0.0 { xc } else { 0.0 };
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p =
        1.0 + r * (1.0 + r * (1.0 / 2.0 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `shifted` is exactly ROUND + n, in the same binade as ROUND: its bits differ by n.
    let ni = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// Sum of `f(x)` over `xs`: f32 lanes inside blocks of 256 (vectorisable), f64 across blocks.
#[inline(always)]
fn block_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0.0f64;
    for blk in xs.chunks(256) {
        let mut acc = [0.0f32; 16];
        let lanes = blk.chunks_exact(16);
        let rest = lanes.remainder();
        for c in lanes {
            for j in 0..16 {
                acc[j] += f(c[j]);
            }
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>();
        total += rest.iter().map(|&x| f(x) as f64).sum::<f64>();
    }
    total
}

/// Sum in f64 of non-negative weights (vectorisable).
fn sum_f64(xs: &[f32]) -> f64 {
    block_sum(xs, |x| x)
}

/// Max of non-NaN values (`-inf` for none), vectorisable.
fn max_f32(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..16 {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    acc.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

fn is_greedy(temperature: f32) -> bool {
    temperature.is_nan() || temperature < GREEDY_TEMPERATURE
}

/// Descending by value, ties by ascending id (a total order: values are never NaN here).
fn desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Replaces NaN by `-inf` and `+inf` by `f32::MAX`; returns the max.
fn sanitize_max(logits: &mut [f32]) -> f32 {
    // Fast path: one vectorisable pass checking finiteness.
    let bad = logits.iter().fold(false, |b, l| b | (l.is_nan() | (*l == f32::INFINITY)));
    if bad {
        for l in logits.iter_mut() {
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            } else if *l == f32::INFINITY {
                *l = f32::MAX;
            }
        }
    }
    max_f32(logits)
}

/// Index of the max, lowest index on ties (0 if all are `-inf`); NaN is ignored.
pub fn argmax(logits: &[f32]) -> u32 {
    let m = max_f32(logits);
    logits.iter().position(|&l| l == m).unwrap_or(0) as u32
}

/// Stable log-softmax normaliser: `logprob(l) = l - max - ln(sum exp(l_i - max))`.
#[derive(Debug, Clone, Copy)]
struct LogSoftmax {
    max: f32,
    log_sum: f64,
    /// All logits are -inf: uniform.
    uniform: Option<f32>,
}

impl LogSoftmax {
    fn new(logits: &[f32], max: f32) -> Self {
        if max == f32::NEG_INFINITY {
            return LogSoftmax { max, log_sum: 0.0, uniform: Some(-(logits.len() as f64).ln() as f32) };
        }
        let sum = block_sum(logits, |l| exp_nonpos(l - max));
        LogSoftmax { max, log_sum: sum.ln(), uniform: None }
    }

    fn logprob(&self, raw: f32) -> f32 {
        match self.uniform {
            Some(u) => u,
            None => ((raw - self.max) as f64 - self.log_sum) as f32,
        }
    }
}

/// The `k` largest logits (never NaN: sanitized), best first (ties: lowest id), into `top`.
fn top_raw_logits(logits: &[f32], k: usize, top: &mut Vec<(u32, f32)>, scratch: &mut Vec<(u32, f32)>) {
    top.clear();
    if k == 0 {
        return;
    }
    if k <= SMALL_TOP_K && k < logits.len() {
        const BLOCK: usize = 32;
        for (b, blk) in logits.chunks(BLOCK).enumerate() {
            // Skip whole blocks that cannot enter the list (a vectorisable max).
            if top.len() == k && max_f32(blk) <= top[k - 1].1 {
                continue;
            }
            for (j, &l) in blk.iter().enumerate() {
                if top.len() == k {
                    if l <= top[k - 1].1 {
                        continue;
                    }
                    top.pop();
                }
                let pos = top.partition_point(|&(_, v)| v >= l);
                top.insert(pos, ((b * BLOCK + j) as u32, l));
            }
        }
        return;
    }
    scratch.clear();
    scratch.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
    if k < scratch.len() {
        scratch.select_nth_unstable_by(k - 1, desc);
        scratch.truncate(k);
    }
    scratch.sort_unstable_by(desc);
    top.extend_from_slice(scratch);
}

/// Keeps the smallest set of highest-weight candidates whose cumulative weight reaches
/// `top_p * total` (at least one), in expected linear time: halves the unresolved range with a
/// selection, keeping the upper half whole when its mass is not enough, and sorts only the last
/// small range.
fn nucleus(c: &mut Vec<(u32, f32)>, total: f64, top_p: f32) {
    let target = top_p as f64 * total;
    // c[..lo] is kept (each better than everything in c[lo..]), with mass `cum`; the cut lies in
    // c[lo..hi]; c[hi..] is dropped.
    let (mut lo, mut hi) = (0, c.len());
    let mut cum = 0.0f64;
    while hi - lo > NUCLEUS_SORT_LEN {
        let m = (hi - lo) / 2;
        c[lo..hi].select_nth_unstable_by(m, desc);
        let upper: f64 = c[lo..lo + m].iter().map(|x| x.1 as f64).sum();
        if cum + upper >= target {
            hi = lo + m;
        } else {
            cum += upper;
            lo += m;
        }
    }
    c[lo..hi].sort_unstable_by(desc);
    for i in lo..hi {
        cum += c[i].1 as f64;
        if cum >= target {
            c.truncate(i + 1);
            return;
        }
    }
    // Only reachable through rounding: keep the whole range.
    c.truncate(hi.max(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, seed: Some(7), ..Default::default() }
    }

    fn naive_log_softmax(logits: &[f32]) -> Vec<f64> {
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let s: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
        logits.iter().map(|&l| l as f64 - m - s.ln()).collect()
    }

    fn softmax(logits: &[f32]) -> Vec<f64> {
        naive_log_softmax(logits).into_iter().map(f64::exp).collect()
    }

    /// A deterministic pseudo-random logits vector.
    fn noisy_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-10.0f32..10.0)).collect()
    }

    #[test]
    fn exp_nonpos_is_accurate() {
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(-88.0), 0.0);
        assert_eq!(exp_nonpos(1.0), 1.0);
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_nonpos(x) as f64;
            assert!(((got - want) / want).abs() < 5e-7, "{x}: {got} vs {want}");
            x += 0.001_3;
        }
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(&params(0.0), &[], None);
        let mut l = vec![0.1, 3.0, -1.0, 2.9];
        assert_eq!(s.sample(&mut l).token, 1);
        // Ties -> lowest id.
        let mut s = Sampler::new(&params(0.0), &[], None);
        let mut l = vec![0.1, 3.0, -1.0, 3.0];
        assert_eq!(s.sample(&mut l).token, 1);
        // Tiny temperature is greedy too.
        let mut s = Sampler::new(&params(1e-6), &[], None);
        let mut l = noisy_logits(1000, 3);
        let want = argmax(&l);
        assert_eq!(s.sample(&mut l).token, want);
    }

    #[test]
    fn logprobs_match_reference() {
        let raw = noisy_logits(5000, 11);
        let want = naive_log_softmax(&raw);
        for k in [0usize, 1, 5, 20, 100] {
            let mut s = Sampler::new(&params(0.8), &[], Some(k));
            let mut l = raw.clone();
            let out = s.sample(&mut l);
            let lp = out.logprob.unwrap();
            assert!((lp as f64 - want[out.token as usize]).abs() < 1e-4);
            assert_eq!(out.top_logprobs.len(), k);
            let mut order: Vec<usize> = (0..raw.len()).collect();
            order.sort_by(|&a, &b| raw[b].total_cmp(&raw[a]).then(a.cmp(&b)));
            for (j, &(t, v)) in out.top_logprobs.iter().enumerate() {
                assert_eq!(t as usize, order[j]);
                assert!((v as f64 - want[t as usize]).abs() < 1e-4);
            }
        }
        // None: no logprobs.
        let mut s = Sampler::new(&params(1.0), &[], None);
        let out = s.sample(&mut raw.clone());
        assert_eq!(out.logprob, None);
        assert!(out.top_logprobs.is_empty());
    }

    #[test]
    fn logprobs_are_raw_despite_penalties() {
        let raw = vec![2.0f32, 1.0, 0.5, -1.0];
        let want = naive_log_softmax(&raw);
        let p = SamplingParams {
            temperature: 0.0,
            repetition_penalty: 1.5,
            frequency_penalty: 1.0,
            presence_penalty: 0.5,
            ..params(0.0)
        };
        let mut s = Sampler::new(&p, &[0, 1], Some(4));
        for _ in 0..3 {
            let out = s.sample(&mut raw.clone());
            let lp = out.logprob.unwrap() as f64;
            assert!((lp - want[out.token as usize]).abs() < 1e-5, "{out:?}");
            for &(t, v) in &out.top_logprobs {
                assert!((v as f64 - want[t as usize]).abs() < 1e-5);
            }
            assert_eq!(out.top_logprobs[0].0, 0);
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let raw = noisy_logits(2000, 5);
        let want = argmax(&raw);
        for t in [0.5f32, 1.0, 2.0, 100.0] {
            let p = SamplingParams { top_k: 1, ..params(t) };
            let mut s = Sampler::new(&p, &[], None);
            for _ in 0..20 {
                assert_eq!(s.sample(&mut raw.clone()).token, want);
            }
        }
    }

    #[test]
    fn tiny_top_p_picks_max() {
        let raw = noisy_logits(2000, 6);
        let want = argmax(&raw);
        let p = SamplingParams { top_p: 1e-6, ..params(5.0) };
        let mut s = Sampler::new(&p, &[], None);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut raw.clone()).token, want);
        }
    }

    #[test]
    fn top_p_keeps_nucleus() {
        // probs ~ [0.5, 0.25, 0.125, 0.125]: top_p 0.7 keeps {0, 1}.
        let raw: Vec<f32> = [0.5f64, 0.25, 0.125, 0.125].iter().map(|p| p.ln() as f32).collect();
        let p = SamplingParams { top_p: 0.7, ..params(1.0) };
        let mut s = Sampler::new(&p, &[], None);
        let mut seen = [0usize; 4];
        for _ in 0..3000 {
            seen[s.sample(&mut raw.clone()).token as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0);
        let f0 = seen[0] as f64 / 3000.0;
        assert!((f0 - 2.0 / 3.0).abs() < 0.04, "{seen:?}");

        // Large vocab: nucleus spans several chunks.
        let raw = noisy_logits(20_000, 9);
        let probs = softmax(&raw);
        let mut order: Vec<usize> = (0..raw.len()).collect();
        order.sort_by(|&a, &b| raw[b].total_cmp(&raw[a]));
        let mut cum = 0.0;
        let mut keep = std::collections::HashSet::new();
        for &i in &order {
            keep.insert(i as u32);
            cum += probs[i];
            if cum >= 0.9 {
                break;
            }
        }
        assert!(keep.len() > 200);
        let p = SamplingParams { top_p: 0.9, ..params(1.0) };
        let mut s = Sampler::new(&p, &[], None);
        for _ in 0..2000 {
            let t = s.sample(&mut raw.clone()).token;
            assert!(keep.contains(&t));
        }
    }

    #[test]
    fn min_p_filters() {
        // probs ∝ [1, 0.5, 0.09, 0.01]; min_p 0.1 keeps {0, 1}.
        let raw: Vec<f32> = [1.0f64, 0.5, 0.09, 0.01].iter().map(|p| p.ln() as f32).collect();
        let p = SamplingParams { min_p: 0.1, ..params(1.0) };
        let mut s = Sampler::new(&p, &[], None);
        let mut seen = [0usize; 4];
        for _ in 0..3000 {
            seen[s.sample(&mut raw.clone()).token as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[1] > 700, "{seen:?}");
        // Without min_p, the small ones do show up.
        let mut s = Sampler::new(&params(1.0), &[], None);
        let mut seen = [0usize; 4];
        for _ in 0..3000 {
            seen[s.sample(&mut raw.clone()).token as usize] += 1;
        }
        assert!(seen[2] > 0);
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let raw: Vec<f32> = (0..64).map(|i| (i % 7) as f32 * 0.05).collect();
        let run = |seed: Option<u64>| -> Vec<u32> {
            let p = SamplingParams { seed, ..params(1.0) };
            let mut s = Sampler::new(&p, &[1, 2, 3], None);
            (0..50).map(|_| s.sample(&mut raw.clone()).token).collect()
        };
        assert_eq!(run(Some(42)), run(Some(42)));
        assert_ne!(run(Some(42)), run(Some(43)));
        assert_ne!(run(None), run(None));
        // Same seed, independent of other samplers drawing in between.
        let p = SamplingParams { seed: Some(42), ..params(1.0) };
        let mut a = Sampler::new(&p, &[1, 2, 3], None);
        let mut other = Sampler::new(&SamplingParams { seed: Some(1), ..params(1.0) }, &[], None);
        let interleaved: Vec<u32> = (0..50)
            .map(|_| {
                other.sample(&mut raw.clone());
                a.sample(&mut raw.clone()).token
            })
            .collect();
        assert_eq!(interleaved, run(Some(42)));
    }

    #[test]
    fn empirical_distribution_matches_softmax() {
        let raw = vec![1.0f32, 0.5, -0.3, 0.0];
        let want = softmax(&raw);
        let mut s = Sampler::new(&params(1.0), &[], None);
        let n = 20_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[s.sample(&mut raw.clone()).token as usize] += 1;
        }
        for i in 0..4 {
            let f = counts[i] as f64 / n as f64;
            assert!((f - want[i]).abs() < 0.02, "{i}: {f} vs {}", want[i]);
        }
        // Temperature 2 flattens: matches softmax(l / 2).
        let scaled: Vec<f32> = raw.iter().map(|l| l / 2.0).collect();
        let want = softmax(&scaled);
        let mut s = Sampler::new(&params(2.0), &[], None);
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[s.sample(&mut raw.clone()).token as usize] += 1;
        }
        for i in 0..4 {
            let f = counts[i] as f64 / n as f64;
            assert!((f - want[i]).abs() < 0.02, "{i}: {f} vs {}", want[i]);
        }
    }

    #[test]
    fn repetition_penalty_applies_to_prompt_and_output() {
        let p = SamplingParams { repetition_penalty: 2.0, ..params(0.0) };
        let mut s = Sampler::new(&p, &[0, 1], None);
        let mut l = vec![4.0f32, -1.0, 3.0, 1.0];
        assert_eq!(s.sample(&mut l).token, 2);
        assert_eq!(l, vec![2.0, -2.0, 3.0, 1.0]);
        // 2 is now in the output: 3.0 -> 1.5.
        let mut l = vec![4.0f32, -1.0, 3.0, 1.0];
        assert_eq!(s.sample(&mut l).token, 0);
        assert_eq!(l, vec![2.0, -2.0, 1.5, 1.0]);
    }

    #[test]
    fn frequency_and_presence_penalties_apply_to_output_only() {
        let p = SamplingParams { frequency_penalty: 0.5, presence_penalty: 0.25, ..params(0.0) };
        let mut s = Sampler::new(&p, &[3, 3, 3], None);
        let mut l = vec![1.0f32, 0.0, 0.0, 0.5];
        assert_eq!(s.sample(&mut l).token, 0);
        // Prompt tokens untouched.
        assert_eq!(l, vec![1.0, 0.0, 0.0, 0.5]);
        s.record(0);
        // 0 generated twice: 1.0 - 0.5*2 - 0.25 = -0.25.
        let mut l = vec![1.0f32, 0.0, 0.0, 0.5];
        assert_eq!(s.sample(&mut l).token, 3);
        assert_eq!(l, vec![-0.25, 0.0, 0.0, 0.5]);
        assert_eq!(s.output_count(0), 2);
        assert_eq!(s.output_count(3), 1);
        assert_eq!(s.generated(), 3);
        // 3 once: 0.5 - 0.5 - 0.25 = -0.25, so 1 (lowest of the 0.0 ties) wins.
        let mut l = vec![1.0f32, 0.0, 0.0, 0.5];
        assert_eq!(s.sample(&mut l).token, 1);
        assert_eq!(l, vec![-0.25, 0.0, 0.0, -0.25]);
    }

    #[test]
    fn neg_inf_and_nan_logits_are_safe() {
        let raw = vec![f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY, 0.5, f32::NAN];
        for t in [0.0f32, 0.7, 1.0] {
            for (k, tp, mp) in [(0usize, 1.0f32, 0.0f32), (2, 0.9, 0.05), (0, 0.5, 0.0)] {
                let p = SamplingParams {
                    top_k: k,
                    top_p: tp,
                    min_p: mp,
                    repetition_penalty: 1.3,
                    frequency_penalty: 0.2,
                    presence_penalty: 0.1,
                    ..params(t)
                };
                let mut s = Sampler::new(&p, &[0, 1], Some(5));
                for _ in 0..20 {
                    let out = s.sample(&mut raw.clone());
                    assert!(out.token == 1 || out.token == 3, "{out:?}");
                    let lp = out.logprob.unwrap();
                    assert!(!lp.is_nan() && lp <= 0.0);
                    for &(_, v) in &out.top_logprobs {
                        assert!(!v.is_nan());
                    }
                }
            }
        }
        // All -inf: uniform, no NaN, no panic.
        let raw = vec![f32::NEG_INFINITY; 8];
        for t in [0.0f32, 1.0] {
            let mut s = Sampler::new(&params(t), &[], Some(3));
            let out = s.sample(&mut raw.clone());
            assert!(out.token < 8);
            assert!((out.logprob.unwrap() + (8f32).ln()).abs() < 1e-6);
        }
    }
}
