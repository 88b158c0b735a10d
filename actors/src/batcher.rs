//! The per-model batcher actor and its engine thread.
//!
//! The actor owns the scheduler and never blocks: it sends a `StepPlan` to the engine thread
//! over a flume channel and gets the outputs back as a message, so requests are admitted and
//! cancelled while the device works. The engine thread owns the model (Burn state is per
//! thread) and runs one plan at a time.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::engine::{Engine, EngineError, EngineSpec, FinishReason, SeqId, SeqOutput, SeqRequest, StepPlan};
use crate::metrics::ModelMetrics;
use crate::scheduler::{AdmitError, Scheduler};
use crate::supervisor::SupervisorHandle;

/// Queue limits of one model's batcher.
#[derive(Clone)]
pub struct BatcherConfig {
    /// Requests waiting (not yet running) beyond which new ones get `Overloaded`.
    pub max_waiting: usize,
    /// Seconds a rejected client should wait before retrying.
    pub retry_after_s: u64,
    /// The supervisor the batcher is linked to (none: unsupervised, e.g. in tools).
    pub supervisor: Option<SupervisorHandle>,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig { max_waiting: 256, retry_after_s: 1, supervisor: None }
    }
}

impl std::fmt::Debug for BatcherConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatcherConfig")
            .field("max_waiting", &self.max_waiting)
            .field("retry_after_s", &self.retry_after_s)
            .field("supervised", &self.supervisor.is_some())
            .finish()
    }
}

/// What a sequence's subscriber receives.
#[derive(Debug, Clone)]
pub enum SeqEvent<O> {
    Output(SeqOutput<O>),
    /// The batcher ended the sequence without an output (e.g. it outgrew the KV pool).
    Finished(SeqId, FinishReason),
    /// The engine failed; the sequence is gone.
    Failed(SeqId, String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is overloaded; retry after {retry_after_s} s")]
    Overloaded { retry_after_s: u64 },
    #[error("the request needs {needed} tokens of KV cache but the model holds at most {capacity}")]
    TooLarge { needed: usize, capacity: usize },
    #[error("model unavailable: {0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatcherStats {
    pub waiting: usize,
    pub running: usize,
    pub used_blocks: usize,
    pub total_blocks: usize,
    pub preemptions: u64,
    pub steps: u64,
}

type Sink<O> = flume::Sender<SeqEvent<O>>;

pub enum BatcherMsg<E: Engine> {
    Submit { req: E::Request, sink: Sink<E::Output>, reply: RpcReplyPort<Result<SeqId, SubmitError>> },
    Cancel(SeqId),
    StepDone { result: Result<Vec<SeqOutput<E::Output>>, EngineError>, elapsed: Duration },
    Stats(RpcReplyPort<BatcherStats>),
}

enum EngineCmd<E: Engine> {
    Step(StepPlan<E::Request>, ActorRef<BatcherMsg<E>>),
}

/// A cheap, cloneable handle to one model's batcher.
pub struct BatcherHandle<E: Engine> {
    actor: ActorRef<BatcherMsg<E>>,
    spec: Arc<EngineSpec>,
    model: Arc<str>,
}

impl<E: Engine> Clone for BatcherHandle<E> {
    fn clone(&self) -> Self {
        BatcherHandle { actor: self.actor.clone(), spec: self.spec.clone(), model: self.model.clone() }
    }
}

fn gone(model: &str) -> SubmitError {
    SubmitError::Unavailable(format!("the batcher of {model} is not running"))
}

impl<E: Engine> BatcherHandle<E> {
    pub fn model(&self) -> &str {
        &self.model
    }
    pub fn spec(&self) -> &EngineSpec {
        &self.spec
    }
    pub fn actor(&self) -> &ActorRef<BatcherMsg<E>> {
        &self.actor
    }

    /// Queues one sequence; its outputs go to `sink` until it finishes.
    pub async fn submit(&self, req: E::Request, sink: Sink<E::Output>) -> Result<SeqId, SubmitError> {
        let res = self.actor.call(|reply| BatcherMsg::Submit { req, sink, reply }, None).await;
        match res {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            _ => Err(gone(&self.model)),
        }
    }

    /// Stops a sequence at the next step boundary and frees its blocks.
    pub fn cancel(&self, id: SeqId) {
        let _ = self.actor.cast(BatcherMsg::Cancel(id));
    }

    pub async fn stats(&self) -> Result<BatcherStats, SubmitError> {
        match self.actor.call(BatcherMsg::Stats, None).await {
            Ok(ractor::rpc::CallResult::Success(s)) => Ok(s),
            _ => Err(gone(&self.model)),
        }
    }

    /// Stops the batcher; its engine thread ends when the last plan sender is gone.
    pub fn stop(&self) {
        self.actor.stop(None);
    }
}

/// The batcher actor (stateless struct; the state lives in `BatcherState`).
pub struct BatcherActor<E>(PhantomData<fn() -> E>);

pub struct BatcherState<E: Engine> {
    model: Arc<str>,
    sched: Scheduler<E::Request>,
    sinks: HashMap<SeqId, Sink<E::Output>>,
    engine_tx: flume::Sender<EngineCmd<E>>,
    config: BatcherConfig,
    metrics: ModelMetrics,
    next_id: SeqId,
    steps: u64,
}

pub struct BatcherArgs<E: Engine> {
    model: Arc<str>,
    spec: EngineSpec,
    engine_tx: flume::Sender<EngineCmd<E>>,
    config: BatcherConfig,
    metrics: ModelMetrics,
}

impl<E: Engine> Actor for BatcherActor<E> {
    type Msg = BatcherMsg<E>;
    type State = BatcherState<E>;
    type Arguments = BatcherArgs<E>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: BatcherArgs<E>,
    ) -> Result<Self::State, ActorProcessingErr> {
        args.metrics.kv_blocks_total.set(args.spec.num_blocks as i64);
        Ok(BatcherState {
            model: args.model,
            sched: Scheduler::new(args.spec),
            sinks: HashMap::new(),
            engine_tx: args.engine_tx,
            config: args.config,
            metrics: args.metrics,
            next_id: 0,
            steps: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            BatcherMsg::Submit { req, sink, reply } => {
                let _ = reply.send(st.submit(req, sink));
            }
            BatcherMsg::Cancel(id) => {
                st.sched.cancel(id);
                st.sinks.remove(&id);
            }
            BatcherMsg::StepDone { result, elapsed } => st.step_done(result, elapsed),
            BatcherMsg::Stats(reply) => {
                let _ = reply.send(BatcherStats {
                    waiting: st.sched.num_waiting(),
                    running: st.sched.num_running(),
                    used_blocks: st.sched.used_blocks(),
                    total_blocks: st.sched.total_blocks(),
                    preemptions: st.sched.preemptions(),
                    steps: st.steps,
                });
            }
        }
        st.kick(&myself);
        Ok(())
    }
}

impl<E: Engine> BatcherState<E> {
    fn submit(&mut self, req: E::Request, sink: Sink<E::Output>) -> Result<SeqId, SubmitError> {
        if self.sched.num_waiting() >= self.config.max_waiting {
            return Err(SubmitError::Overloaded { retry_after_s: self.config.retry_after_s });
        }
        let id = self.next_id;
        let prompt_len = req.prompt_len();
        self.sched.add(id, req).map_err(|e| match e {
            AdmitError::TooLarge { needed, capacity } => SubmitError::TooLarge { needed, capacity },
        })?;
        self.next_id += 1;
        self.sinks.insert(id, sink);
        self.metrics.prompt_tokens.inc_by(prompt_len as u64);
        Ok(id)
    }

    /// Starts the next step unless one is running or there is nothing to do.
    fn kick(&mut self, myself: &ActorRef<BatcherMsg<E>>) {
        if self.sched.step_in_flight() {
            return;
        }
        // Clients that went away are dropped here, where the state already is.
        let gone: Vec<SeqId> = self.sinks.iter().filter(|(_, s)| s.is_disconnected()).map(|(id, _)| *id).collect();
        for id in gone {
            self.sched.cancel(id);
            self.sinks.remove(&id);
        }
        if self.sched.has_work() {
            let schedule = self.sched.schedule();
            for (id, reason) in schedule.finished {
                if let Some(sink) = self.sinks.remove(&id) {
                    let _ = sink.send(SeqEvent::Finished(id, reason));
                }
            }
            let plan = schedule.plan;
            if !plan.seqs.is_empty() || !plan.released.is_empty() {
                self.metrics.batch_size.observe(plan.seqs.len() as f64);
                if self.engine_tx.send(EngineCmd::Step(plan, myself.clone())).is_err() {
                    self.fail_all("the engine thread has stopped");
                }
            }
        }
        self.metrics.waiting.set(self.sched.num_waiting() as i64);
        self.metrics.running.set(self.sched.num_running() as i64);
        self.metrics.kv_blocks_used.set(self.sched.used_blocks() as i64);
    }

    fn step_done(&mut self, result: Result<Vec<SeqOutput<E::Output>>, EngineError>, elapsed: Duration) {
        self.steps += 1;
        self.metrics.steps.inc();
        self.metrics.step_seconds.observe(elapsed.as_secs_f64());
        let preempted_before = self.sched.preemptions();
        let outputs = match result {
            Ok(outputs) => outputs,
            Err(e) => {
                tracing::error!(model = %self.model, error = %e, "engine step failed; failing its sequences");
                self.fail_all(&e.to_string());
                return;
            }
        };
        let ended: HashMap<SeqId, FinishReason> = self.sched.update(&outputs).into_iter().collect();
        self.metrics.generation_tokens.inc_by(outputs.len() as u64);
        for out in outputs {
            let id = out.id;
            let finished = ended.contains_key(&id);
            let delivered = match self.sinks.get(&id) {
                Some(sink) => sink.send(SeqEvent::Output(out)).is_ok(),
                None => true,
            };
            if finished {
                self.sinks.remove(&id);
            } else if !delivered {
                self.sched.cancel(id);
                self.sinks.remove(&id);
            }
        }
        for (id, _) in ended {
            self.sinks.remove(&id);
        }
        self.metrics.preemptions.inc_by(self.sched.preemptions() - preempted_before);
    }

    fn fail_all(&mut self, message: &str) {
        for id in self.sched.fail_all() {
            if let Some(sink) = self.sinks.remove(&id) {
                let _ = sink.send(SeqEvent::Failed(id, message.to_string()));
            }
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn engine_loop<E: Engine>(mut engine: E, rx: flume::Receiver<EngineCmd<E>>) {
    while let Ok(cmd) = rx.recv() {
        match cmd {
            EngineCmd::Step(plan, reply) => {
                let t0 = Instant::now();
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| engine.step(plan)))
                    .unwrap_or_else(|p| Err(EngineError::Step(format!("panic: {}", panic_message(&*p)))));
                let _ = reply.cast(BatcherMsg::StepDone { result, elapsed: t0.elapsed() });
            }
        }
    }
}

/// Starts a batcher actor for `model`; `make_engine` runs on the new engine thread (Burn
/// state never leaves it). Returns once the engine is loaded, or its load error.
pub async fn spawn_batcher<E: Engine>(
    model: String,
    make_engine: Arc<dyn Fn() -> Result<E, EngineError> + Send + Sync>,
    config: BatcherConfig,
    metrics: ModelMetrics,
) -> Result<BatcherHandle<E>, EngineError> {
    let (engine_tx, engine_rx) = flume::unbounded::<EngineCmd<E>>();
    let (spec_tx, spec_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("engine-{model}"))
        .spawn(move || {
            let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| make_engine()))
                .unwrap_or_else(|p| Err(EngineError::Load(format!("panic: {}", panic_message(&*p)))));
            match loaded {
                Ok(engine) => {
                    let _ = spec_tx.send(Ok(engine.spec()));
                    engine_loop(engine, engine_rx);
                }
                Err(e) => {
                    let _ = spec_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| EngineError::Load(format!("cannot start the engine thread: {e}")))?;
    let spec = spec_rx.await.map_err(|_| EngineError::Load("the engine thread died while loading".into()))??;
    let model: Arc<str> = model.into();
    let supervisor = config.supervisor.clone();
    let args = BatcherArgs { model: model.clone(), spec: spec.clone(), engine_tx, config, metrics };
    let spawned = match &supervisor {
        Some(sup) => Actor::spawn_linked(None, BatcherActor::<E>(PhantomData), args, sup.cell()).await,
        None => Actor::spawn(None, BatcherActor::<E>(PhantomData), args).await,
    };
    let (actor, _join) = spawned.map_err(|e| EngineError::Load(format!("cannot start the batcher: {e}")))?;
    if let Some(sup) = &supervisor {
        sup.register(&model, actor.get_cell());
    }
    tracing::info!(model = %model, blocks = spec.num_blocks, block_size = spec.block_size, max_model_len = spec.max_model_len, "batcher started");
    Ok(BatcherHandle { actor, spec: Arc::new(spec), model })
}
