//! Iteration-level scheduling (vLLM v1 style): there is no prefill or decode phase, each
//! sequence has `computed` tokens in the KV cache out of `total` known tokens, and a step gives
//! sequences a number of tokens under a token budget. Running sequences go first (decode keeps
//! flowing), then waiting ones are admitted FIFO while their blocks fit. When a running
//! sequence needs a block and none is free, the newest running sequence is preempted by
//! recompute: its blocks are freed and it goes back to the front of the queue.
//!
//! The scheduler never calls the model; the batcher hands its plans to the engine.

use std::collections::{HashMap, VecDeque};

use crate::engine::{EngineSpec, FinishReason, ScheduledSeq, SeqId, SeqOutput, SeqRequest, StepPlan};
use crate::kv::KvBlockPool;

#[derive(Debug)]
struct SeqEntry<R> {
    /// The request, until the engine has been given it.
    req: Option<R>,
    /// Admission order; the newest running sequence is preempted first.
    arrival: u64,
    /// Known tokens: prompt + generated.
    total: usize,
    /// Tokens whose KV is in the cache.
    computed: usize,
    blocks: Vec<u32>,
    /// Cancelled while its step was running: dropped when the step comes back.
    cancelled: bool,
}

/// Why a sequence was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmitError {
    /// The prompt (plus one generated token) can never fit in the KV pool or the context.
    TooLarge { needed: usize, capacity: usize },
}

/// The result of one `schedule` call.
#[derive(Debug)]
pub struct Schedule<R> {
    pub plan: StepPlan<R>,
    /// Sequences the scheduler ended on its own (e.g. one that alone outgrew the KV pool).
    pub finished: Vec<(SeqId, FinishReason)>,
}

/// Waiting and running sequences, the KV block pool, and the step being executed.
#[derive(Debug)]
pub struct Scheduler<R> {
    spec: EngineSpec,
    pool: KvBlockPool,
    seqs: HashMap<SeqId, SeqEntry<R>>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    /// Sequences the engine knows and must drop at the next step.
    to_release: Vec<SeqId>,
    /// (id, tokens fed) of the step in flight.
    in_flight: Vec<(SeqId, usize)>,
    /// A step was handed out and its outputs have not come back: also a step that only
    /// releases sequences, whose `in_flight` is empty. Its outputs must not be taken for the
    /// next step's.
    step_pending: bool,
    next_arrival: u64,
    preemptions: u64,
}

impl<R: SeqRequest> Scheduler<R> {
    pub fn new(spec: EngineSpec) -> Self {
        let pool = KvBlockPool::new(spec.num_blocks, spec.block_size);
        Scheduler {
            spec,
            pool,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            to_release: Vec::new(),
            in_flight: Vec::new(),
            step_pending: false,
            next_arrival: 0,
            preemptions: 0,
        }
    }

    pub fn spec(&self) -> &EngineSpec {
        &self.spec
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    /// Prompt tokens of the waiting sequences (what admission still has to prefill).
    pub fn waiting_tokens(&self) -> usize {
        self.waiting.iter().filter_map(|id| self.seqs.get(id)).map(|s| s.total - s.computed).sum()
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn used_blocks(&self) -> usize {
        self.pool.num_used()
    }
    pub fn total_blocks(&self) -> usize {
        self.pool.total()
    }
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }
    /// Whether a step is being executed.
    pub fn step_in_flight(&self) -> bool {
        self.step_pending
    }
    /// Whether `id` is still scheduled (waiting or running).
    pub fn contains(&self, id: SeqId) -> bool {
        self.seqs.get(&id).is_some_and(|s| !s.cancelled)
    }
    /// Whether anything is left to run or release.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || !self.to_release.is_empty()
    }

    /// Queues a new sequence.
    pub fn add(&mut self, id: SeqId, req: R) -> Result<(), AdmitError> {
        let prompt = req.prompt_len().max(1);
        let capacity = (self.pool.total() * self.pool.block_size()).min(self.spec.max_model_len);
        // The prompt and the first generated token must fit, or the sequence could never run.
        if prompt + 1 > capacity {
            return Err(AdmitError::TooLarge { needed: prompt + 1, capacity });
        }
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.seqs.insert(
            id,
            SeqEntry { req: Some(req), arrival, total: prompt, computed: 0, blocks: Vec::new(), cancelled: false },
        );
        self.waiting.push_back(id);
        Ok(())
    }

    /// Removes a sequence now, or when its running step comes back. Unknown ids are ignored.
    pub fn cancel(&mut self, id: SeqId) {
        let in_flight = self.in_flight.iter().any(|(s, _)| *s == id);
        match self.seqs.get_mut(&id) {
            None => {}
            Some(seq) if in_flight => seq.cancelled = true,
            Some(_) => self.remove(id),
        }
    }

    fn remove(&mut self, id: SeqId) {
        if let Some(mut seq) = self.seqs.remove(&id) {
            self.pool.release(&mut seq.blocks);
            self.waiting.retain(|s| *s != id);
            self.running.retain(|s| *s != id);
            if seq.req.is_none() {
                self.to_release.push(id);
            }
        }
    }

    /// Plans the next step. Must not be called while a step is in flight.
    pub fn schedule(&mut self) -> Schedule<R> {
        assert!(!self.step_pending, "schedule() while a step is in flight");
        let mut budget = self.spec.max_batch_tokens;
        let mut plan = StepPlan { released: std::mem::take(&mut self.to_release), ..StepPlan::default() };
        let mut finished = Vec::new();

        // Running sequences, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let len = (seq.total - seq.computed).min(budget);
            if len == 0 {
                i += 1;
                continue;
            }
            let target = seq.computed + len;
            loop {
                let seq = self.seqs.get_mut(&id).expect("running seq");
                if self.pool.grow(&mut seq.blocks, target).is_ok() {
                    break;
                }
                let victim = *self.running.last().expect("non-empty");
                if victim == id && self.running.len() == 1 {
                    // Alone and still out of blocks: it has outgrown the pool.
                    self.remove(id);
                    finished.push((id, FinishReason::Length));
                    break;
                }
                self.preempt(victim);
                if victim == id {
                    break;
                }
            }
            if !self.running.contains(&id) {
                // Preempted itself or finished; `i` now points at the next sequence.
                continue;
            }
            self.push_scheduled(&mut plan, id, len);
            budget -= len;
            i += 1;
        }

        // Waiting sequences, FIFO, while blocks and slots allow.
        while budget > 0 && self.running.len() < self.spec.max_running {
            let Some(&id) = self.waiting.front() else { break };
            let seq = self.seqs.get_mut(&id).expect("waiting seq");
            let len = (seq.total - seq.computed).min(budget);
            // Admit only when the whole prompt fits now, so chunked prefill cannot stall halfway.
            let needed = self.pool.blocks_for(seq.total) - seq.blocks.len();
            if needed > self.pool.num_free() {
                break;
            }
            self.pool.grow(&mut seq.blocks, seq.computed + len).expect("checked free blocks");
            if let Some(req) = seq.req.take() {
                plan.new.push((id, req));
            }
            self.waiting.pop_front();
            self.running.push(id);
            self.push_scheduled(&mut plan, id, len);
            budget -= len;
        }

        self.in_flight = plan.seqs.iter().map(|s| (s.id, s.len)).collect();
        // The batcher hands out exactly the plans with work or releases.
        self.step_pending = !plan.seqs.is_empty() || !plan.released.is_empty();
        Schedule { plan, finished }
    }

    fn push_scheduled(&self, plan: &mut StepPlan<R>, id: SeqId, len: usize) {
        let seq = &self.seqs[&id];
        plan.seqs.push(ScheduledSeq {
            id,
            start: seq.computed,
            len,
            block_table: seq.blocks.clone(),
            sample: seq.computed + len == seq.total,
        });
    }

    fn preempt(&mut self, id: SeqId) {
        let seq = self.seqs.get_mut(&id).expect("preempted seq");
        self.pool.release(&mut seq.blocks);
        seq.computed = 0;
        let arrival = seq.arrival;
        self.running.retain(|s| *s != id);
        // Back to the front of the queue, oldest preempted first.
        let pos = self.waiting.iter().position(|w| self.seqs[w].arrival > arrival).unwrap_or(self.waiting.len());
        self.waiting.insert(pos, id);
        self.preemptions += 1;
    }

    /// Applies the outputs of the step in flight. Returns the sequences that ended
    /// (finished by the engine, or cancelled while running) with the reason.
    pub fn update<O>(&mut self, outputs: &[SeqOutput<O>]) -> Vec<(SeqId, FinishReason)> {
        let mut ended = Vec::new();
        self.step_pending = false;
        for (id, len) in std::mem::take(&mut self.in_flight) {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.computed += len;
            }
        }
        for out in outputs {
            let Some(seq) = self.seqs.get_mut(&out.id) else { continue };
            match out.finished {
                Some(reason) => {
                    self.remove(out.id);
                    ended.push((out.id, reason));
                }
                None => seq.total += 1,
            }
        }
        let cancelled: Vec<SeqId> = self.seqs.iter().filter(|(_, s)| s.cancelled).map(|(id, _)| *id).collect();
        for id in cancelled {
            self.remove(id);
            ended.push((id, FinishReason::Cancelled));
        }
        ended
    }

    /// Drops every sequence (after an engine failure). Returns their ids.
    pub fn fail_all(&mut self) -> Vec<SeqId> {
        self.in_flight.clear();
        self.step_pending = false;
        let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        for &id in &ids {
            self.remove(id);
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone)]
    struct Req(usize);
    impl SeqRequest for Req {
        fn prompt_len(&self) -> usize {
            self.0
        }
        fn max_new_tokens(&self) -> usize {
            100
        }
    }

    fn spec(num_blocks: usize, budget: usize) -> EngineSpec {
        EngineSpec { block_size: 4, num_blocks, max_model_len: 1024, max_batch_tokens: budget, max_running: 8 }
    }

    fn out(id: SeqId, finished: Option<FinishReason>) -> SeqOutput<()> {
        SeqOutput { id, output: (), finished }
    }

    /// Runs a step: every sampling sequence produces an unfinished output.
    fn step(s: &mut Scheduler<Req>) -> StepPlan<Req> {
        let sched = s.schedule();
        let outs: Vec<_> = sched.plan.seqs.iter().filter(|x| x.sample).map(|x| out(x.id, None)).collect();
        s.update(&outs);
        sched.plan
    }

    #[test]
    fn chunked_prefill_under_budget_then_decode() {
        let mut s = Scheduler::new(spec(16, 8));
        s.add(1, Req(10)).unwrap();
        let p = step(&mut s);
        assert_eq!(p.new.len(), 1);
        assert_eq!((p.seqs[0].start, p.seqs[0].len, p.seqs[0].sample), (0, 8, false));
        assert_eq!(p.seqs[0].block_table.len(), 2);
        let p = step(&mut s);
        assert!(p.new.is_empty());
        assert_eq!((p.seqs[0].start, p.seqs[0].len, p.seqs[0].sample), (8, 2, true));
        assert_eq!(p.seqs[0].block_table.len(), 3);
        let p = step(&mut s);
        assert_eq!((p.seqs[0].start, p.seqs[0].len, p.seqs[0].sample), (10, 1, true));
    }

    #[test]
    fn decode_first_then_admit_waiting_within_budget() {
        let mut s = Scheduler::new(spec(64, 6));
        s.add(1, Req(3)).unwrap();
        step(&mut s);
        s.add(2, Req(20)).unwrap();
        let p = step(&mut s);
        assert_eq!(p.seqs.len(), 2);
        assert_eq!((p.seqs[0].id, p.seqs[0].len), (1, 1));
        assert_eq!((p.seqs[1].id, p.seqs[1].len, p.seqs[1].sample), (2, 5, false));
    }

    #[test]
    fn admission_waits_for_blocks_and_finish_frees_them() {
        let mut s = Scheduler::new(spec(4, 64));
        s.add(1, Req(12)).unwrap(); // 3 blocks
        s.add(2, Req(8)).unwrap(); // 2 blocks: must wait
        let p = step(&mut s);
        assert_eq!(p.seqs.len(), 1);
        assert_eq!(s.num_waiting(), 1);
        let sched = s.schedule();
        let ended = s.update(&[out(1, Some(FinishReason::Stop))]);
        assert_eq!(ended, vec![(1, FinishReason::Stop)]);
        assert_eq!(sched.plan.seqs.len(), 1);
        assert_eq!(s.used_blocks(), 0);
        let p = s.schedule();
        assert_eq!(p.plan.released, vec![1]);
        assert_eq!(p.plan.seqs[0].id, 2);
    }

    #[test]
    fn preempts_newest_by_recompute_when_decode_runs_out() {
        let mut s = Scheduler::new(spec(4, 64));
        s.add(1, Req(4)).unwrap();
        s.add(2, Req(4)).unwrap();
        step(&mut s); // both prefilled: 1 block each, 5 tokens known each
                      // Decode needs a second block each; 2 free: fine.
        step(&mut s);
        assert_eq!(s.used_blocks(), 4);
        // Tokens 0..9 known; next step needs a third block for seq 1: preempt seq 2.
        for _ in 0..3 {
            step(&mut s);
        }
        let p = s.schedule();
        assert_eq!(s.preemptions(), 1);
        assert_eq!(p.plan.seqs.len(), 1);
        assert_eq!(p.plan.seqs[0].id, 1);
        assert_eq!(s.num_waiting(), 1);
        s.update(&[out(1, Some(FinishReason::Stop))]);
        // Seq 2 comes back from scratch with every token it had: a recompute, not a new request.
        let p = s.schedule();
        assert!(p.plan.new.is_empty());
        assert_eq!((p.plan.seqs[0].id, p.plan.seqs[0].start, p.plan.seqs[0].len), (2, 0, 9));
        assert!(p.plan.seqs[0].sample);
    }

    #[test]
    fn lone_sequence_that_outgrows_the_pool_ends_with_length() {
        let mut s = Scheduler::new(spec(1, 64));
        s.add(1, Req(3)).unwrap();
        step(&mut s); // 4 tokens known: the one block is full after the next step
        step(&mut s);
        let sched = s.schedule();
        assert_eq!(sched.finished, vec![(1, FinishReason::Length)]);
        assert_eq!(s.used_blocks(), 0);
    }

    #[test]
    fn rejects_prompts_that_can_never_fit() {
        let mut s = Scheduler::new(spec(2, 64));
        assert!(matches!(s.add(1, Req(8)), Err(AdmitError::TooLarge { needed: 9, capacity: 8 })));
    }

    #[test]
    fn cancel_in_flight_is_deferred_and_frees_blocks() {
        let mut s = Scheduler::new(spec(8, 64));
        s.add(1, Req(5)).unwrap();
        let sched = s.schedule();
        s.cancel(1);
        assert!(!s.contains(1));
        let ended = s.update(&[out(1, None)]);
        assert_eq!(ended, vec![(1, FinishReason::Cancelled)]);
        assert_eq!(s.used_blocks(), 0);
        assert_eq!(sched.plan.seqs.len(), 1);
        assert_eq!(s.schedule().plan.released, vec![1]);
    }

    /// A step that only releases finished sequences is in flight like any other: a sequence
    /// that arrives meanwhile must wait for it, or the release's (empty) outputs would be
    /// taken for the new sequence's step and the two would stay one step out of phase.
    #[test]
    fn a_release_only_step_is_in_flight_until_it_comes_back() {
        let mut s = Scheduler::new(spec(8, 64));
        s.add(1, Req(2)).unwrap();
        s.schedule();
        assert_eq!(s.update(&[out(1, Some(FinishReason::Stop))]), vec![(1, FinishReason::Stop)]);
        let release = s.schedule();
        assert!(release.plan.seqs.is_empty() && release.plan.released == vec![1]);
        assert!(s.step_in_flight(), "the release-only step is in flight");
        s.add(2, Req(2)).unwrap();
        s.add(3, Req(2)).unwrap();
        s.update::<()>(&[]);
        assert!(!s.step_in_flight());
        let p = s.schedule();
        assert_eq!(p.plan.seqs.iter().map(|x| (x.id, x.start, x.len)).collect::<Vec<_>>(), vec![(2, 0, 2), (3, 0, 2)]);
        s.update(&[out(2, None), out(3, None)]);
        let p = s.schedule();
        assert_eq!(p.plan.seqs.iter().map(|x| (x.id, x.start, x.len)).collect::<Vec<_>>(), vec![(2, 2, 1), (3, 2, 1)]);
    }

    #[test]
    fn cancel_waiting_never_reaches_the_engine() {
        let mut s = Scheduler::new(spec(8, 64));
        s.add(1, Req(5)).unwrap();
        s.cancel(1);
        let p = s.schedule();
        assert!(p.plan.seqs.is_empty() && p.plan.released.is_empty());
        assert!(!s.has_work());
    }

    #[test]
    fn max_running_caps_admission() {
        let mut s = Scheduler::new(EngineSpec { max_running: 2, ..spec(64, 64) });
        for id in 0..4 {
            s.add(id, Req(2)).unwrap();
        }
        let p = step(&mut s);
        assert_eq!(p.seqs.len(), 2);
        assert_eq!(s.num_waiting(), 2);
    }
}
