//! The batcher and request actors driven by a fake engine: continuous batching, cancellation,
//! overload, engine failure, stop strings, and KV blocks returned when clients leave.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_actors::*;

/// Emits token `last + 1` each step; panics when a prompt starts with 666 and `PANIC` is set.
struct CountingEngine {
    spec: EngineSpec,
    seqs: HashMap<SeqId, (TextRequest, Vec<u32>)>,
    step_delay: Duration,
}

static PANIC: AtomicBool = AtomicBool::new(false);

impl Engine for CountingEngine {
    type Request = TextRequest;
    type Output = TokenOutput;
    fn spec(&self) -> EngineSpec {
        self.spec.clone()
    }
    fn step(&mut self, plan: StepPlan<TextRequest>) -> Result<Vec<SeqOutput<TokenOutput>>, EngineError> {
        for id in &plan.released {
            self.seqs.remove(id);
        }
        for (id, req) in plan.new {
            let toks = req.prompt.clone();
            self.seqs.insert(id, (req, toks));
        }
        std::thread::sleep(self.step_delay);
        let mut outs = Vec::new();
        for s in plan.seqs {
            let (req, toks) = self.seqs.get_mut(&s.id).expect("known seq");
            assert!(s.block_table.len() * self.spec.block_size >= s.start + s.len, "blocks cover the step");
            if PANIC.load(Ordering::SeqCst) && req.prompt[0] == 666 {
                panic!("injected engine fault");
            }
            if !s.sample {
                continue;
            }
            let token = toks.last().unwrap() + 1;
            toks.push(token);
            let generated = toks.len() - req.prompt.len();
            let finished = if req.stop_token_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if generated >= req.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            outs.push(SeqOutput {
                id: s.id,
                output: TokenOutput { token, logprob: None, top_logprobs: vec![] },
                finished,
            });
        }
        Ok(outs)
    }
}

/// Token t decodes to the letter ('a' + t % 26).
struct Letters;
impl Detokenize for Letters {
    fn decode(&self, ids: &[u32]) -> String {
        ids.iter().map(|t| (b'a' + (t % 26) as u8) as char).collect()
    }
    fn token_text(&self, id: u32) -> String {
        self.decode(&[id])
    }
}

fn request(prompt: Vec<u32>, max_new_tokens: usize) -> TextRequest {
    TextRequest {
        prompt,
        params: SamplingParams { temperature: 0.0, ..Default::default() },
        max_new_tokens,
        stop_token_ids: vec![],
        ignore_eos: false,
        logprobs: None,
    }
}

async fn batcher(num_blocks: usize, max_waiting: usize, delay_ms: u64) -> BatcherHandle<CountingEngine> {
    let spec = EngineSpec { block_size: 4, num_blocks, max_model_len: 256, max_batch_tokens: 16, max_running: 8 };
    spawn_batcher(
        "fake".into(),
        Arc::new(move || {
            Ok(CountingEngine { spec: spec.clone(), seqs: HashMap::new(), step_delay: Duration::from_millis(delay_ms) })
        }),
        BatcherConfig { max_waiting, retry_after_s: 2, ..BatcherConfig::default() },
        ModelMetrics::unregistered("fake"),
    )
    .await
    .unwrap()
}

async fn collect(mut rx: tokio::sync::mpsc::Receiver<ClientEvent>) -> (String, Vec<ClientEvent>) {
    let mut text = String::new();
    let mut events = Vec::new();
    while let Some(ev) = rx.recv().await {
        if let ClientEvent::Token { text: t, .. } = &ev {
            text.push_str(t);
        }
        events.push(ev);
    }
    (text, events)
}

async fn wait_idle(b: &BatcherHandle<CountingEngine>) -> BatcherStats {
    let t0 = Instant::now();
    loop {
        let s = b.stats().await.unwrap();
        if (s.used_blocks == 0 && s.running == 0 && s.waiting == 0) || t0.elapsed() > Duration::from_secs(5) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn generation(req: TextRequest) -> Generation {
    Generation { choices: vec![req], stop: vec![], deadline: None }
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_stream() {
    let b = batcher(64, 64, 1).await;
    let mut handles = Vec::new();
    for i in 0..12u32 {
        let b = b.clone();
        handles.push(tokio::spawn(async move {
            let prompt: Vec<u32> = (0..(1 + i * 3)).map(|k| k + i).collect();
            let last = *prompt.last().unwrap();
            let rx = start_generation(
                b,
                Arc::new(Letters),
                generation(request(prompt, 5 + i as usize)),
                ModelMetrics::unregistered("fake"),
            )
            .await
            .unwrap();
            let (text, events) = collect(rx).await;
            let expected: String = (1..=5 + i).map(|k| (b'a' + ((last + k) % 26) as u8) as char).collect();
            assert_eq!(text, expected);
            match events.last().unwrap() {
                ClientEvent::Done { finish_reason, completion_tokens, .. } => {
                    assert_eq!(*finish_reason, FinishReason::Length);
                    assert_eq!(*completion_tokens, 5 + i as usize);
                }
                other => panic!("last event {other:?}"),
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let s = wait_idle(&b).await;
    assert_eq!((s.used_blocks, s.running, s.waiting), (0, 0, 0));
    assert!(s.steps > 0);
}

#[tokio::test]
async fn stop_strings_end_the_choice_and_are_not_emitted() {
    let b = batcher(64, 64, 0).await;
    // Prompt ends at 0 ('a'): generates b c d e f ...; stop at "de".
    let gen = Generation { choices: vec![request(vec![0], 20)], stop: vec!["de".into()], deadline: None };
    let (text, events) =
        collect(start_generation(b.clone(), Arc::new(Letters), gen, ModelMetrics::unregistered("f")).await.unwrap())
            .await;
    assert_eq!(text, "bc");
    assert!(matches!(
        events.last().unwrap(),
        ClientEvent::Done { finish_reason: FinishReason::Stop, completion_tokens: 4, .. }
    ));
    assert_eq!(wait_idle(&b).await.used_blocks, 0);
}

#[tokio::test]
async fn stop_token_text_is_not_emitted() {
    let b = batcher(64, 64, 0).await;
    let mut req = request(vec![0], 20);
    req.stop_token_ids = vec![3];
    let (text, events) = collect(
        start_generation(b, Arc::new(Letters), generation(req), ModelMetrics::unregistered("f")).await.unwrap(),
    )
    .await;
    assert_eq!(text, "bc");
    assert!(matches!(
        events.last().unwrap(),
        ClientEvent::Done { finish_reason: FinishReason::Stop, completion_tokens: 3, .. }
    ));
}

#[tokio::test]
async fn dropping_the_receiver_cancels_and_frees_blocks() {
    let b = batcher(64, 64, 5).await;
    let mut rx = start_generation(
        b.clone(),
        Arc::new(Letters),
        generation(request(vec![1; 10], 200)),
        ModelMetrics::unregistered("f"),
    )
    .await
    .unwrap();
    for _ in 0..3 {
        rx.recv().await.unwrap();
    }
    assert!(b.stats().await.unwrap().used_blocks > 0);
    drop(rx);
    let s = wait_idle(&b).await;
    assert_eq!((s.used_blocks, s.running), (0, 0));
}

#[tokio::test]
async fn deadline_ends_with_timeout() {
    let b = batcher(64, 64, 5).await;
    let gen = Generation {
        choices: vec![request(vec![1], 10_000)],
        stop: vec![],
        deadline: Some(Instant::now() + Duration::from_millis(60)),
    };
    let (_, events) =
        collect(start_generation(b.clone(), Arc::new(Letters), gen, ModelMetrics::unregistered("f")).await.unwrap())
            .await;
    assert!(matches!(events.last().unwrap(), ClientEvent::Done { finish_reason: FinishReason::Timeout, .. }));
    assert_eq!(wait_idle(&b).await.used_blocks, 0);
}

#[tokio::test]
async fn overload_is_refused_with_retry_after() {
    // One block: only one sequence runs; the rest wait, and past max_waiting are refused.
    let b = batcher(1, 2, 20).await;
    let (tx, _rx) = flume::unbounded();
    let mut results = Vec::new();
    for _ in 0..4 {
        results.push(b.submit(request(vec![1, 2], 2), tx.clone()).await);
    }
    assert!(results[..3].iter().all(|r| r.is_ok()), "{results:?}");
    assert!(matches!(results[3], Err(SubmitError::Overloaded { retry_after_s: 2 })), "{results:?}");
}

#[tokio::test]
async fn prompt_larger_than_the_pool_is_refused() {
    let b = batcher(2, 8, 0).await;
    let (tx, _rx) = flume::unbounded();
    let r = b.submit(request(vec![1; 8], 2), tx).await;
    assert!(matches!(r, Err(SubmitError::TooLarge { needed: 9, capacity: 8 })), "{r:?}");
}

#[tokio::test]
async fn n_choices_stream_independently() {
    let b = batcher(64, 64, 0).await;
    let gen = Generation { choices: vec![request(vec![0], 3), request(vec![5], 2)], stop: vec![], deadline: None };
    let (_, events) =
        collect(start_generation(b, Arc::new(Letters), gen, ModelMetrics::unregistered("f")).await.unwrap()).await;
    let texts: Vec<String> = (0..2)
        .map(|i| {
            events
                .iter()
                .filter_map(|e| match e {
                    ClientEvent::Token { index, text, .. } if *index == i => Some(text.as_str()),
                    _ => None,
                })
                .collect()
        })
        .collect();
    assert_eq!(texts, vec!["bcd".to_string(), "gh".to_string()]);
    assert_eq!(events.iter().filter(|e| matches!(e, ClientEvent::Done { .. })).count(), 2);
}

#[tokio::test]
async fn engine_panic_fails_its_sequences_and_the_batcher_keeps_serving() {
    let b = batcher(64, 64, 0).await;
    PANIC.store(true, Ordering::SeqCst);
    let (_, events) = collect(
        start_generation(
            b.clone(),
            Arc::new(Letters),
            generation(request(vec![666], 5)),
            ModelMetrics::unregistered("f"),
        )
        .await
        .unwrap(),
    )
    .await;
    PANIC.store(false, Ordering::SeqCst);
    assert!(
        matches!(&events[0], ClientEvent::Error { message, .. } if message.contains("injected engine fault")),
        "{events:?}"
    );
    let (text, _) = collect(
        start_generation(
            b.clone(),
            Arc::new(Letters),
            generation(request(vec![0], 2)),
            ModelMetrics::unregistered("f"),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(text, "bc");
}

#[tokio::test]
async fn supervisor_tracks_its_batchers() {
    let sup = SupervisorHandle::start().await.unwrap();
    let spec = EngineSpec { block_size: 4, num_blocks: 8, max_model_len: 64, max_batch_tokens: 16, max_running: 4 };
    let b: BatcherHandle<CountingEngine> = spawn_batcher(
        "watched".into(),
        Arc::new(move || Ok(CountingEngine { spec: spec.clone(), seqs: HashMap::new(), step_delay: Duration::ZERO })),
        BatcherConfig { supervisor: Some(sup.clone()), ..BatcherConfig::default() },
        ModelMetrics::unregistered("watched"),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(sup.health().await.get("watched"), Some(&BatcherHealth::Running));
    b.stop();
    let t0 = Instant::now();
    while sup.health().await.get("watched") != Some(&BatcherHealth::Stopped) {
        assert!(t0.elapsed() < Duration::from_secs(3), "supervisor never saw the batcher stop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn fake_engine(
    spec: EngineSpec,
    made: Arc<std::sync::atomic::AtomicUsize>,
) -> Arc<dyn Fn() -> Result<CountingEngine, EngineError> + Send + Sync> {
    Arc::new(move || {
        made.fetch_add(1, Ordering::SeqCst);
        Ok(CountingEngine { spec: spec.clone(), seqs: HashMap::new(), step_delay: Duration::from_millis(5) })
    })
}

fn small_spec() -> EngineSpec {
    EngineSpec { block_size: 4, num_blocks: 1, max_model_len: 64, max_batch_tokens: 16, max_running: 4 }
}

#[tokio::test]
async fn waiting_tokens_past_the_limit_are_refused() {
    // One block: one sequence runs, the rest queue. The queue holds at most 10 prompt tokens.
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let b = spawn_batcher(
        "tokens".into(),
        fake_engine(small_spec(), made),
        BatcherConfig { max_waiting_tokens: 10, ..BatcherConfig::default() },
        ModelMetrics::unregistered("tokens"),
    )
    .await
    .unwrap();
    let (tx, _rx) = flume::unbounded();
    let mut results = Vec::new();
    for _ in 0..4 {
        results.push(b.submit(request(vec![1; 3], 30), tx.clone()).await);
    }
    // The first runs; 3 + 3 + 3 = 9 prompt tokens wait; one more would make 12.
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let stats = b.stats().await.unwrap();
    assert_eq!((stats.running, stats.waiting, stats.waiting_tokens), (1, 3, 9), "{stats:?}");
    let r = b.submit(request(vec![1; 3], 30), tx.clone()).await;
    assert!(matches!(r, Err(SubmitError::Overloaded { .. })), "{r:?}");
}

#[tokio::test]
async fn the_engine_holds_its_reservation_until_its_thread_ends() {
    let ledger = DeviceLedger::new("test-device", 1000);
    let estimate = MemoryBytes { weights: 300, kv: 200, activations: 100 };
    let config =
        BatcherConfig { memory: Some(MemoryPlan { ledger: ledger.clone(), estimate }), ..BatcherConfig::default() };
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let b = spawn_batcher(
        "m".into(),
        fake_engine(small_spec(), made.clone()),
        config.clone(),
        ModelMetrics::unregistered("m"),
    )
    .await
    .unwrap();
    assert_eq!(ledger.held_by("m"), estimate, "a fake engine measures nothing: the estimate stays");
    assert_eq!(b.memory(), estimate);
    // A second engine of the same size does not fit beside it.
    let e = spawn_batcher(
        "n".into(),
        fake_engine(small_spec(), made.clone()),
        config.clone(),
        ModelMetrics::unregistered("n"),
    )
    .await
    .err()
    .expect("600 + 600 > 1000");
    assert!(e.to_string().contains("not enough memory"), "{e}");
    assert_eq!(made.load(Ordering::SeqCst), 1, "the refused engine was never built");
    b.stop();
    tokio::time::timeout(Duration::from_secs(5), b.engine_exited()).await.expect("engine thread ended");
    assert_eq!(ledger.used(), 0);
    assert_eq!(ledger.peak(), 600);
    spawn_batcher("n".into(), fake_engine(small_spec(), made), config, ModelMetrics::unregistered("n"))
        .await
        .expect("fits once the first is gone");
}

#[tokio::test]
async fn a_panicking_engine_is_rebuilt() {
    let faults = Arc::new(FaultSwitch::default());
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let spec = EngineSpec { block_size: 4, num_blocks: 64, max_model_len: 64, max_batch_tokens: 16, max_running: 4 };
    let b = spawn_batcher(
        "rebuilt".into(),
        fake_engine(spec, made.clone()),
        BatcherConfig { faults: Some(faults.clone()), ..BatcherConfig::default() },
        ModelMetrics::unregistered("rebuilt"),
    )
    .await
    .unwrap();
    faults.engine_panics.store(1, Ordering::SeqCst);
    let m = ModelMetrics::unregistered("f");
    let (_, events) = collect(
        start_generation(b.clone(), Arc::new(Letters), generation(request(vec![0], 3)), m.clone()).await.unwrap(),
    )
    .await;
    assert!(
        matches!(&events[0], ClientEvent::Error { message, .. } if message.contains("injected engine fault")),
        "{events:?}"
    );
    let (text, _) =
        collect(start_generation(b.clone(), Arc::new(Letters), generation(request(vec![0], 2)), m).await.unwrap())
            .await;
    assert_eq!(text, "bc");
    assert_eq!(made.load(Ordering::SeqCst), 2, "built at start and once after the panic");
    let stats = wait_idle_any(&b).await;
    assert_eq!((stats.engine_restarts, stats.used_blocks), (1, 0));
}

async fn wait_idle_any(b: &BatcherHandle<CountingEngine>) -> BatcherStats {
    let t0 = Instant::now();
    loop {
        let s = b.stats().await.unwrap();
        if s.running == 0 && s.waiting == 0 {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "never idle: {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_failed_batcher_is_reported_to_its_supervisor_hook() {
    let sup = SupervisorHandle::start().await.unwrap();
    let faults = Arc::new(FaultSwitch::default());
    let (hook_tx, hook_rx) = flume::unbounded::<String>();
    let hook: FailureHook = Arc::new(move |e| {
        let _ = hook_tx.send(e);
    });
    let spec = EngineSpec { block_size: 4, num_blocks: 64, max_model_len: 64, max_batch_tokens: 16, max_running: 4 };
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let b = spawn_batcher(
        "doomed".into(),
        fake_engine(spec, made),
        BatcherConfig {
            supervisor: Some(sup.clone()),
            on_failure: Some(hook),
            faults: Some(faults.clone()),
            ..BatcherConfig::default()
        },
        ModelMetrics::unregistered("doomed"),
    )
    .await
    .unwrap();
    faults.batcher_panics.store(1, Ordering::SeqCst);
    let (_, events) = collect(
        start_generation(
            b.clone(),
            Arc::new(Letters),
            generation(request(vec![0], 5)),
            ModelMetrics::unregistered("f"),
        )
        .await
        .unwrap(),
    )
    .await;
    assert!(matches!(events.last().unwrap(), ClientEvent::Error { .. }), "{events:?}");
    let err = tokio::time::timeout(Duration::from_secs(5), hook_rx.recv_async()).await.unwrap().unwrap();
    assert!(err.contains("injected batcher fault"), "{err}");
    assert!(matches!(sup.health().await.get("doomed"), Some(BatcherHealth::Failed(_))));
    tokio::time::timeout(Duration::from_secs(5), b.engine_exited()).await.expect("its engine thread ends");
}
