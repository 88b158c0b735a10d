//! The per-model batcher actor and its engine thread.
//!
//! The actor owns the scheduler and never blocks: it sends a `StepPlan` to the engine thread
//! over a flume channel and gets the outputs back as a message, so requests are admitted and
//! cancelled while the device works. The engine thread owns the model (Burn state is per
//! thread) and runs one plan at a time.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::engine::{Engine, EngineError, EngineSpec, FinishReason, SeqId, SeqOutput, SeqRequest, StepPlan};
use crate::ledger::{DeviceLedger, MemoryBytes, MemoryKind, Reservation};
use crate::metrics::ModelMetrics;
use crate::scheduler::{AdmitError, Scheduler};
use crate::supervisor::SupervisorHandle;

/// Where a batcher's engine takes its memory from: the device's ledger and the estimate to
/// reserve before loading (replaced by the engine's measurements once it has warmed up).
#[derive(Clone)]
pub struct MemoryPlan {
    pub ledger: Arc<DeviceLedger>,
    pub estimate: MemoryBytes,
}

/// Test-only fault injection (off unless the server's config enables it): the next
/// `engine_panics` steps panic inside the engine, the next `batcher_panics` step results make
/// the batcher actor itself fail (which its supervisor must handle).
#[derive(Debug, Default)]
pub struct FaultSwitch {
    pub engine_panics: AtomicU32,
    pub batcher_panics: AtomicU32,
    /// Milliseconds every engine step sleeps first (a slow device; 0: none).
    pub step_delay_ms: AtomicU32,
}

impl FaultSwitch {
    fn take(counter: &AtomicU32) -> bool {
        counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}

/// Called by the supervisor with the error when the batcher actor fails.
pub type FailureHook = Arc<dyn Fn(String) + Send + Sync>;

/// Queue limits and wiring of one model's batcher.
#[derive(Clone)]
pub struct BatcherConfig {
    /// Requests waiting (not yet running) beyond which new ones get `Overloaded`.
    pub max_waiting: usize,
    /// Prompt tokens waiting beyond which new requests get `Overloaded`.
    pub max_waiting_tokens: usize,
    /// Seconds a rejected client should wait before retrying.
    pub retry_after_s: u64,
    /// The supervisor the batcher is linked to (none: unsupervised, e.g. in tools).
    pub supervisor: Option<SupervisorHandle>,
    /// Told by the supervisor when the batcher actor fails (e.g. to reload the model).
    pub on_failure: Option<FailureHook>,
    /// The device ledger the engine reserves its memory in (none: not accounted).
    pub memory: Option<MemoryPlan>,
    /// Test-only fault injection.
    pub faults: Option<Arc<FaultSwitch>>,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            max_waiting: 256,
            max_waiting_tokens: usize::MAX,
            retry_after_s: 1,
            supervisor: None,
            on_failure: None,
            memory: None,
            faults: None,
        }
    }
}

impl std::fmt::Debug for BatcherConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatcherConfig")
            .field("max_waiting", &self.max_waiting)
            .field("max_waiting_tokens", &self.max_waiting_tokens)
            .field("retry_after_s", &self.retry_after_s)
            .field("supervised", &self.supervisor.is_some())
            .field("memory", &self.memory.as_ref().map(|m| (m.ledger.device().to_string(), m.estimate)))
            .field("faults", &self.faults.is_some())
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
    /// Prompt tokens of the waiting sequences.
    pub waiting_tokens: usize,
    pub running: usize,
    pub used_blocks: usize,
    pub total_blocks: usize,
    pub preemptions: u64,
    pub steps: u64,
    /// Times the engine was rebuilt after a failed step.
    pub engine_restarts: u64,
}

type Sink<O> = flume::Sender<SeqEvent<O>>;

pub enum BatcherMsg<E: Engine> {
    Submit {
        req: E::Request,
        sink: Sink<E::Output>,
        reply: RpcReplyPort<Result<SeqId, SubmitError>>,
    },
    Cancel(SeqId),
    /// A step's outputs; `restarted` when the engine failed and was rebuilt (`Err`: it could
    /// not be, and the batcher must stop).
    StepDone {
        result: Result<Vec<SeqOutput<E::Output>>, EngineError>,
        elapsed: Duration,
        restarted: Option<Result<(), String>>,
    },
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
    /// Becomes true once the engine thread has ended (its model and memory are freed).
    engine_exited: tokio::sync::watch::Receiver<bool>,
    /// The engine's memory as measured after warm-up (what it holds in the ledger).
    memory: MemoryBytes,
}

impl<E: Engine> Clone for BatcherHandle<E> {
    fn clone(&self) -> Self {
        BatcherHandle {
            actor: self.actor.clone(),
            spec: self.spec.clone(),
            model: self.model.clone(),
            engine_exited: self.engine_exited.clone(),
            memory: self.memory,
        }
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

    /// The engine's memory (measured where the backend allows, else the estimate reserved).
    pub fn memory(&self) -> MemoryBytes {
        self.memory
    }

    /// Waits until the engine thread has ended and freed its model (after `stop`).
    pub async fn engine_exited(&self) {
        let mut rx = self.engine_exited.clone();
        let _ = rx.wait_for(|done| *done).await;
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
    engine_restarts: u64,
    /// When each sequence not yet admitted arrived (for the queue-time histogram).
    arrived: HashMap<SeqId, Instant>,
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
            engine_restarts: 0,
            arrived: HashMap::new(),
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
                st.arrived.remove(&id);
            }
            BatcherMsg::StepDone { result, elapsed, restarted } => {
                st.step_done(result, elapsed);
                match restarted {
                    None => {}
                    Some(Ok(())) => {
                        st.engine_restarts += 1;
                        tracing::warn!(model = %st.model, restarts = st.engine_restarts, "engine rebuilt after a failed step");
                    }
                    Some(Err(e)) => {
                        st.fail_all(&format!("the engine failed and could not be rebuilt: {e}"));
                        return Err(format!("the engine of {} could not be rebuilt: {e}", st.model).into());
                    }
                }
                if st.config.faults.as_ref().is_some_and(|f| FaultSwitch::take(&f.batcher_panics)) {
                    st.fail_all("injected batcher fault");
                    return Err("injected batcher fault".into());
                }
            }
            BatcherMsg::Stats(reply) => {
                let _ = reply.send(BatcherStats {
                    waiting: st.sched.num_waiting(),
                    waiting_tokens: st.sched.waiting_tokens(),
                    running: st.sched.num_running(),
                    used_blocks: st.sched.used_blocks(),
                    total_blocks: st.sched.total_blocks(),
                    preemptions: st.sched.preemptions(),
                    steps: st.steps,
                    engine_restarts: st.engine_restarts,
                });
            }
        }
        st.kick(&myself);
        Ok(())
    }
}

impl<E: Engine> BatcherState<E> {
    fn submit(&mut self, req: E::Request, sink: Sink<E::Output>) -> Result<SeqId, SubmitError> {
        let prompt_len = req.prompt_len();
        if self.sched.num_waiting() >= self.config.max_waiting {
            return Err(SubmitError::Overloaded { retry_after_s: self.config.retry_after_s });
        }
        // An empty queue always takes one request, however long: the limit bounds queueing,
        // not the prompt size (that is `TooLarge`'s job).
        if self.sched.num_waiting() > 0
            && self.sched.waiting_tokens().saturating_add(prompt_len) > self.config.max_waiting_tokens
        {
            return Err(SubmitError::Overloaded { retry_after_s: self.config.retry_after_s });
        }
        let id = self.next_id;
        self.sched.add(id, req).map_err(|e| match e {
            AdmitError::TooLarge { needed, capacity } => SubmitError::TooLarge { needed, capacity },
        })?;
        self.next_id += 1;
        self.sinks.insert(id, sink);
        self.arrived.insert(id, Instant::now());
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
            self.arrived.remove(&id);
        }
        if self.sched.has_work() {
            let preempted_before = self.sched.preemptions();
            let schedule = self.sched.schedule();
            self.metrics.preemptions.inc_by(self.sched.preemptions() - preempted_before);
            for (id, reason) in schedule.finished {
                self.arrived.remove(&id);
                if let Some(sink) = self.sinks.remove(&id) {
                    let _ = sink.send(SeqEvent::Finished(id, reason));
                }
            }
            let plan = schedule.plan;
            for (id, _) in &plan.new {
                if let Some(t) = self.arrived.remove(id) {
                    self.metrics.queue_seconds.observe(t.elapsed().as_secs_f64());
                }
            }
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
    }

    fn fail_all(&mut self, message: &str) {
        for id in self.sched.fail_all() {
            self.arrived.remove(&id);
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

/// Builds the engine and warms it up, catching panics.
fn build_engine<E: Engine>(make_engine: &(dyn Fn() -> Result<E, EngineError> + Send + Sync)) -> Result<E, EngineError> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut engine = make_engine()?;
        engine.warmup().map_err(|e| EngineError::Load(format!("warm-up failed: {e}")))?;
        Ok(engine)
    }))
    .unwrap_or_else(|p| Err(EngineError::Load(format!("panic: {}", panic_message(&*p)))))
}

/// Replaces the estimated reservation by what the engine measured (where it measured).
fn record_measured(lease: &mut Option<Reservation>, measured: MemoryBytes, model: &str) {
    let Some(lease) = lease else { return };
    for kind in MemoryKind::ALL {
        let mut bytes = measured.get(kind);
        // A profiled workspace can miss what a different mix of sequences needs: keep the
        // larger of the formula and the measurement.
        if kind == MemoryKind::Activations {
            bytes = bytes.max(lease.bytes().activations);
        }
        if bytes > 0 && bytes != lease.bytes().get(kind) {
            if let Err(e) = lease.resize(kind, bytes) {
                tracing::warn!(model, kind = kind.as_str(), error = %e, "measured memory exceeds the ledger's free space");
            }
        }
    }
}

fn engine_loop<E: Engine>(
    mut engine: Option<E>,
    rx: flume::Receiver<EngineCmd<E>>,
    make_engine: Arc<dyn Fn() -> Result<E, EngineError> + Send + Sync>,
    faults: Option<Arc<FaultSwitch>>,
) {
    while let Ok(cmd) = rx.recv() {
        match cmd {
            EngineCmd::Step(plan, reply) => {
                let t0 = Instant::now();
                let Some(eng) = engine.as_mut() else {
                    let _ = reply.cast(BatcherMsg::StepDone {
                        result: Err(EngineError::Step("the engine is down".into())),
                        elapsed: t0.elapsed(),
                        restarted: Some(Err("the engine is down".into())),
                    });
                    continue;
                };
                let inject = faults.as_ref().is_some_and(|f| FaultSwitch::take(&f.engine_panics));
                let delay = faults.as_ref().map_or(0, |f| f.step_delay_ms.load(Ordering::Relaxed));
                if delay > 0 {
                    std::thread::sleep(Duration::from_millis(delay.into()));
                }
                let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    if inject {
                        panic!("injected engine fault");
                    }
                    eng.step(plan)
                }));
                let (result, restarted) = match stepped {
                    Ok(result) => (result, None),
                    Err(p) => {
                        // The engine's state is unknown after a panic: drop it (freeing its
                        // memory) and build a fresh one; the batcher fails the step's sequences.
                        let msg = format!("panic: {}", panic_message(&*p));
                        engine = None;
                        let rebuilt = build_engine(&*make_engine);
                        let restarted = match rebuilt {
                            Ok(e) => {
                                engine = Some(e);
                                Ok(())
                            }
                            Err(e) => Err(e.to_string()),
                        };
                        (Err(EngineError::Step(msg)), Some(restarted))
                    }
                };
                let _ = reply.cast(BatcherMsg::StepDone { result, elapsed: t0.elapsed(), restarted });
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
    let (exited_tx, exited_rx) = tokio::sync::watch::channel(false);
    let (memory, faults, thread_model) = (config.memory.clone(), config.faults.clone(), model.clone());
    std::thread::Builder::new()
        .name(format!("engine-{model}"))
        .spawn(move || {
            // Declared first so it is dropped last: the reservation outlives the engine.
            let mut lease = None;
            if let Some(plan) = &memory {
                match plan.ledger.reserve(&thread_model, plan.estimate) {
                    Ok(r) => lease = Some(r),
                    Err(e) => {
                        let _ = spec_tx.send(Err(EngineError::Load(format!("not enough memory: {e}"))));
                        let _ = exited_tx.send(true);
                        return;
                    }
                }
            }
            match build_engine(&*make_engine) {
                Ok(engine) => {
                    let measured = engine.memory();
                    record_measured(&mut lease, measured, &thread_model);
                    let held = lease.as_ref().map(|l| l.bytes()).unwrap_or(measured);
                    let _ = spec_tx.send(Ok((engine.spec(), held)));
                    engine_loop(Some(engine), engine_rx, make_engine, faults);
                }
                Err(e) => {
                    let _ = spec_tx.send(Err(e));
                }
            }
            drop(lease);
            let _ = exited_tx.send(true);
        })
        .map_err(|e| EngineError::Load(format!("cannot start the engine thread: {e}")))?;
    let (spec, memory) =
        spec_rx.await.map_err(|_| EngineError::Load("the engine thread died while loading".into()))??;
    let model: Arc<str> = model.into();
    let supervisor = config.supervisor.clone();
    let on_failure = config.on_failure.clone();
    let args = BatcherArgs { model: model.clone(), spec: spec.clone(), engine_tx, config, metrics };
    let spawned = match &supervisor {
        Some(sup) => Actor::spawn_linked(None, BatcherActor::<E>(PhantomData), args, sup.cell()).await,
        None => Actor::spawn(None, BatcherActor::<E>(PhantomData), args).await,
    };
    let (actor, _join) = spawned.map_err(|e| EngineError::Load(format!("cannot start the batcher: {e}")))?;
    if let Some(sup) = &supervisor {
        sup.register(&model, actor.get_cell(), on_failure);
    }
    tracing::info!(model = %model, blocks = spec.num_blocks, block_size = spec.block_size, max_model_len = spec.max_model_len, "batcher started");
    Ok(BatcherHandle { actor, spec: Arc::new(spec), model, engine_exited: exited_rx, memory })
}
