//! Batch invariance and preemption-by-recompute of the text engine, driven through
//! `Engine::step` by a tiny scheduler simulation with its own block allocator.

use std::collections::VecDeque;
use std::path::PathBuf;

use kiln_actors::engine::{Engine, FinishReason, ScheduledSeq, SeqId, StepPlan};
use kiln_actors::text::{SamplingParams, TextRequest};
use kiln_models::config::DecoderConfig;
use kiln_models::qwen2::{DecoderModel, ForwardSeq, KvCache, KvWriteMode};
use kiln_models::weights::WeightStore;
use kiln_models::{DType, DeviceSpec, TextEngine, TextEngineOptions};
use serde_json::Value;

const FIXTURES: [&str; 3] = ["qwen2-tied-gqa", "qwen2-untied-mha", "llama-tiny"];
const BLOCK: usize = 4;

fn fixture_dir(name: &str) -> PathBuf {
    let root = std::env::var_os("KILN_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"));
    root.join(name)
}

/// (prompt ids, expected greedy tokens) of every fixture prompt.
fn cases(name: &str) -> Vec<(Vec<u32>, Vec<u32>)> {
    let text = std::fs::read_to_string(fixture_dir(name).join("expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let ids = |x: &Value| -> Vec<u32> {
        x.as_array().map(|a| a.iter().map(|t| t.as_u64().unwrap() as u32).collect()).unwrap_or_default()
    };
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (ids(&p["ids"]), ids(&p["greedy"])))
        .filter(|(_, g)| !g.is_empty())
        .collect()
}

fn load(name: &str, kv_tokens: usize) -> TextEngine {
    let opts = TextEngineOptions {
        device: DeviceSpec::Cpu,
        dtype: DType::F32,
        block_size: BLOCK,
        kv_cache_tokens: kv_tokens,
        max_batch_tokens: 16,
        max_running: 16,
        max_model_len: None,
        host_cache: None,
    };
    TextEngine::load(&fixture_dir(name), &opts).unwrap()
}

fn greedy_request(prompt: &[u32], n: usize) -> TextRequest {
    TextRequest {
        prompt: prompt.to_vec(),
        params: SamplingParams { temperature: 0.0, ..Default::default() },
        max_new_tokens: n,
        stop_token_ids: vec![],
        ignore_eos: true,
        logprobs: None,
    }
}

struct SimSeq {
    id: SeqId,
    /// Prompt + generated so far (what the scheduler knows).
    known: usize,
    /// Tokens in the KV cache.
    cached: usize,
    table: Vec<u32>,
    out: Vec<u32>,
    finished: Option<FinishReason>,
    /// Step at which it joins.
    arrival: usize,
    /// Steps to wait before re-admission after a preemption.
    hold: usize,
}

/// A minimal scheduler: token budget per step, decode first then prefill chunks, blocks from a
/// free list (freed blocks are reused first, so a preempted sequence's blocks get overwritten).
struct Sim {
    free: VecDeque<u32>,
    budget: usize,
    max_chunk: usize,
}

impl Sim {
    fn new(num_blocks: usize, budget: usize, max_chunk: usize) -> Self {
        // Hand blocks out in a scrambled order so tables are never contiguous.
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.sort_by_key(|&b| (b * 7919) % num_blocks as u32);
        Sim { free: ids.into(), budget, max_chunk }
    }

    fn grow(&mut self, s: &mut SimSeq, upto: usize) {
        while s.table.len() * BLOCK < upto {
            s.table.push(self.free.pop_front().expect("test pool too small"));
        }
    }

    fn release(&mut self, s: &mut SimSeq) {
        for b in s.table.drain(..).rev() {
            self.free.push_front(b);
        }
        s.cached = 0;
    }

    /// Builds the next plan over `seqs` at step `step`.
    fn plan(&mut self, seqs: &mut [SimSeq], step: usize) -> Vec<ScheduledSeq> {
        let mut budget = self.budget;
        let mut out = Vec::new();
        // Decode tokens first, then prefill chunks (like the real scheduler).
        for pass in 0..2 {
            for s in seqs.iter_mut() {
                if s.finished.is_some() || s.arrival > step || s.hold > 0 {
                    continue;
                }
                let remaining = s.known - s.cached;
                let decoding = remaining == 1 && s.cached > 0;
                if (pass == 0) != decoding || budget == 0 {
                    continue;
                }
                let len = remaining.min(budget).min(self.max_chunk);
                budget -= len;
                self.grow(s, s.cached + len);
                out.push(ScheduledSeq {
                    id: s.id,
                    start: s.cached,
                    len,
                    block_table: s.table.clone(),
                    sample: s.cached + len == s.known,
                });
            }
        }
        out
    }
}

/// Runs every prompt of a fixture together; `preempt_at`: (step, seq index) pairs at which the
/// sequence loses its KV blocks and is later recomputed from position 0.
fn run_batched(name: &str, stagger: usize, preempt_at: &[(usize, usize)]) -> Vec<(Vec<u32>, Vec<u32>)> {
    let cases = cases(name);
    let mut engine = load(name, 4096);
    let mut sim = Sim::new(engine.spec().num_blocks, 16, 7);
    let mut seqs: Vec<SimSeq> = cases
        .iter()
        .enumerate()
        .map(|(i, (p, _))| SimSeq {
            id: 100 + i as u64,
            known: p.len(),
            cached: 0,
            table: vec![],
            out: vec![],
            finished: None,
            arrival: i * stagger,
            hold: 0,
        })
        .collect();
    let mut admitted = vec![false; seqs.len()];
    let mut released = Vec::new();
    let mut preemptions = 0;
    for step in 0..2000 {
        if seqs.iter().all(|s| s.finished.is_some()) {
            break;
        }
        for &(at, i) in preempt_at {
            if at == step && seqs[i].finished.is_none() && seqs[i].cached > 0 {
                sim.release(&mut seqs[i]);
                seqs[i].hold = 3;
                preemptions += 1;
            }
        }
        let scheduled = sim.plan(&mut seqs, step);
        for s in seqs.iter_mut() {
            s.hold = s.hold.saturating_sub(1);
        }
        let mut new = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            if !admitted[i] && scheduled.iter().any(|x| x.id == s.id) {
                admitted[i] = true;
                new.push((s.id, greedy_request(&cases[i].0, cases[i].1.len())));
            }
        }
        for x in &scheduled {
            let s = seqs.iter_mut().find(|s| s.id == x.id).unwrap();
            s.cached += x.len;
        }
        let plan = StepPlan { new, released: std::mem::take(&mut released), seqs: scheduled.clone() };
        let outs = engine.step(plan).unwrap();
        assert_eq!(outs.len(), scheduled.iter().filter(|x| x.sample).count());
        for o in outs {
            let s = seqs.iter_mut().find(|s| s.id == o.id).unwrap();
            s.out.push(o.output.token);
            s.known += 1;
            if let Some(f) = o.finished {
                s.finished = Some(f);
                released.push(s.id);
                sim.release(s);
            }
        }
    }
    assert!(seqs.iter().all(|s| s.finished == Some(FinishReason::Length)), "{name}: not all finished");
    if !preempt_at.is_empty() {
        assert!(preemptions > 0, "{name}: no preemption happened");
    }
    engine.step(StepPlan { released, ..Default::default() }).unwrap();
    assert_eq!(engine.num_sequences(), 0);
    seqs.into_iter().zip(cases).map(|(s, (_, want))| (s.out, want)).collect()
}

#[test]
fn batched_prefill_and_decode_match_single_sequence_greedy() {
    for name in FIXTURES {
        for stagger in [0, 3] {
            for (i, (got, want)) in run_batched(name, stagger, &[]).into_iter().enumerate() {
                assert_eq!(got, want, "{name} prompt {i} (stagger {stagger})");
            }
        }
    }
}

#[test]
fn preempted_sequences_recompute_and_continue_identically() {
    for name in FIXTURES {
        // Preempt several sequences mid-decode and one mid-prefill.
        let preempt = [(12, 0), (14, 2), (20, 4), (25, 5), (30, 1), (40, 3)];
        for (i, (got, want)) in run_batched(name, 2, &preempt).into_iter().enumerate() {
            assert_eq!(got, want, "{name} prompt {i} (with preemption)");
        }
    }
}

#[test]
fn stop_tokens_and_limits_finish_sequences() {
    let name = "qwen2-tied-gqa";
    let (prompt, greedy) = cases(name).swap_remove(2);
    let mut engine = load(name, 256);
    let table: Vec<u32> = (0..64).collect();
    // Stop token: the 4th greedy token.
    let mut req = greedy_request(&prompt, 24);
    req.stop_token_ids = vec![greedy[3]];
    let mut new = vec![(1u64, req)];
    let mut known = prompt.len();
    let mut start = 0;
    let mut got = vec![];
    loop {
        let plan = StepPlan {
            new: std::mem::take(&mut new),
            released: vec![],
            seqs: vec![ScheduledSeq { id: 1, start, len: known - start, block_table: table.clone(), sample: true }],
        };
        let outs = engine.step(plan).unwrap();
        start = known;
        known += 1;
        got.push(outs[0].output.token);
        if let Some(f) = outs[0].finished {
            assert_eq!(f, FinishReason::Stop);
            break;
        }
        assert!(got.len() < 24);
    }
    assert_eq!(got, greedy[..4].to_vec());
    assert_eq!(engine.sequence_tokens(1).unwrap().len(), prompt.len() + 4);

    // Unknown sequence and bad ranges are step errors, not panics.
    let bad = StepPlan::<TextRequest> {
        new: vec![],
        released: vec![1],
        seqs: vec![ScheduledSeq { id: 1, start: 0, len: 3, block_table: table.clone(), sample: true }],
    };
    assert!(engine.step(bad).is_err());
    let bad = StepPlan {
        new: vec![(2, greedy_request(&prompt, 4))],
        released: vec![],
        seqs: vec![ScheduledSeq { id: 2, start: 0, len: prompt.len(), block_table: vec![0], sample: true }],
    };
    assert!(engine.step(bad).is_err(), "block table too short must fail");
}

/// The GPU KV write path (one `scatter_nd` per layer) computes what the CPU path does.
#[test]
fn scatter_nd_kv_write_matches_slice_runs() {
    type B = burn::backend::Flex;
    let name = "llama-tiny";
    let dir = fixture_dir(name);
    let cfg = DecoderConfig::from_dir(&dir).unwrap();
    let store = WeightStore::open(&dir).unwrap();
    let dev = burn::backend::flex::FlexDevice;
    let cases = cases(name);
    let mut results = Vec::new();
    for mode in [KvWriteMode::SliceRuns, KvWriteMode::ScatterNd] {
        let model = DecoderModel::<B>::load(&cfg, &store, &dev, DType::F32, mode).unwrap();
        let mut cache = KvCache::<B>::new(&cfg, BLOCK, 64, &dev, DType::F32);
        let tables: Vec<Vec<u32>> = vec![(0..16).rev().collect(), (16..32).collect(), (32..48).collect()];
        // Step 1: two prefills. Step 2: one decode + one more prefill chunk.
        let a = &cases[3].0;
        let b = &cases[1].0;
        let c = &cases[4].0;
        let s1 = [
            ForwardSeq { tokens: a, start: 0, block_table: &tables[0], logits: true },
            ForwardSeq { tokens: &b[..5], start: 0, block_table: &tables[1], logits: false },
        ];
        let mut out = model.forward(&s1, &mut cache).unwrap();
        let s2 = [
            ForwardSeq { tokens: &b[5..], start: 5, block_table: &tables[1], logits: true },
            ForwardSeq { tokens: &[7], start: a.len(), block_table: &tables[0], logits: true },
            ForwardSeq { tokens: c, start: 0, block_table: &tables[2], logits: true },
        ];
        out.extend(model.forward(&s2, &mut cache).unwrap());
        results.push(out);
    }
    assert_eq!(results[0].len(), 4);
    for (x, y) in results[0].iter().zip(&results[1]) {
        for (p, q) in x.iter().zip(y) {
            assert!((p - q).abs() <= 1e-4 * p.abs().max(1.0), "{p} vs {q}");
        }
    }
}
