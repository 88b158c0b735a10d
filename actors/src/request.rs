//! The request actor: one per client request. It turns engine outputs into client events
//! (incremental detokenization, stop strings, logprob texts), enforces the deadline, records the
//! request's latency metrics, and cancels its sequences when the client goes away.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, oneshot};

use crate::batcher::{BatcherHandle, SeqEvent, SubmitError};
use crate::detok::{Detokenize, IncrementalDecoder, StopMatcher};
use crate::engine::{Engine, FinishReason, SeqId, SeqOutput};
use crate::metrics::{reject_reason, ModelMetrics};
use crate::text::{TextRequest, TokenOutput};

/// One client request: `n` choices (one sequence each) sharing stop strings and a deadline.
#[derive(Debug, Clone)]
pub struct Generation {
    pub choices: Vec<TextRequest>,
    /// Stop strings: generation ends before them; they are not included in the output.
    pub stop: Vec<String>,
    pub deadline: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token: u32,
    pub text: String,
    pub logprob: f32,
}

/// What the client side (SSE, WebSocket, JSON) receives, in order per choice.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// A text delta for choice `index`. `text` may be empty (token held back: partial UTF-8 or
    /// a possible stop-string prefix); every generated token yields exactly one event.
    Token {
        index: usize,
        text: String,
        token: u32,
        token_text: String,
        logprob: Option<f32>,
        top_logprobs: Vec<TopLogprob>,
    },
    /// Choice `index` ended. `completion_tokens` counts the tokens of this choice.
    Done { index: usize, finish_reason: FinishReason, prompt_tokens: usize, completion_tokens: usize },
    /// Choice `index` failed.
    Error { index: usize, message: String },
}

/// Submits every choice of `gen` to the batcher and spawns the request actor that turns engine
/// outputs into client events. Dropping the receiver cancels the sequences.
pub async fn start_generation<E>(
    batcher: BatcherHandle<E>,
    detok: Arc<dyn Detokenize>,
    gen: Generation,
    metrics: ModelMetrics,
) -> Result<mpsc::Receiver<ClientEvent>, SubmitError>
where
    E: Engine<Request = TextRequest, Output = TokenOutput>,
{
    let started = Instant::now();
    let (seq_tx, seq_rx) = flume::unbounded();
    let mut choices = Vec::with_capacity(gen.choices.len());
    let prompt_tokens = gen.choices.first().map_or(0, |c| c.prompt.len());
    let mut capacity = 8;
    for (index, req) in gen.choices.into_iter().enumerate() {
        let decoder = IncrementalDecoder::with_context(&req.prompt);
        capacity += req.max_new_tokens + 2;
        match batcher.submit(req, seq_tx.clone()).await {
            Ok(id) => choices.push(Choice::new(index, id, decoder, gen.stop.clone())),
            Err(e) => {
                for c in &choices {
                    batcher.cancel(c.id);
                }
                metrics.reject(submit_reject_reason(&e));
                return Err(e);
            }
        }
    }
    drop(seq_tx);
    // Room for every event the request can produce, so the actor never waits on the client.
    let (client_tx, client_rx) = mpsc::channel(capacity.min(1 << 20));
    let args = RequestArgs {
        batcher,
        detok,
        choices,
        prompt_tokens,
        deadline: gen.deadline,
        metrics,
        client_tx,
        seq_rx,
        started,
    };
    if let Err(e) = Actor::spawn(None, RequestActor::<E>(std::marker::PhantomData), args).await {
        // The arguments (and the sequence receiver) are gone with the failed actor: the batcher
        // drops the sequences at its next step.
        return Err(SubmitError::Unavailable(format!("cannot start the request actor: {e}")));
    }
    Ok(client_rx)
}

/// The `kiln_rejected_total` reason of a refused submission.
pub fn submit_reject_reason(e: &SubmitError) -> &'static str {
    match e {
        SubmitError::Overloaded { .. } => reject_reason::OVERLOADED,
        SubmitError::TooLarge { .. } => reject_reason::TOO_LARGE,
        SubmitError::Unavailable(_) => reject_reason::UNAVAILABLE,
    }
}

struct Choice {
    index: usize,
    id: SeqId,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    tokens: usize,
    last_token_at: Option<Instant>,
    done: bool,
}

impl Choice {
    fn new(index: usize, id: SeqId, decoder: IncrementalDecoder, stop: Vec<String>) -> Self {
        Choice { index, id, decoder, stop: StopMatcher::new(stop), tokens: 0, last_token_at: None, done: false }
    }
}

pub enum RequestMsg {
    Seq(SeqEvent<TokenOutput>),
    ClientGone,
    Deadline,
    /// Every sequence sender is gone: the batcher stopped without ending some choices.
    BatcherGone,
}

pub struct RequestActor<E>(std::marker::PhantomData<fn() -> E>);

pub struct RequestArgs<E: Engine> {
    batcher: BatcherHandle<E>,
    detok: Arc<dyn Detokenize>,
    choices: Vec<Choice>,
    prompt_tokens: usize,
    deadline: Option<Instant>,
    metrics: ModelMetrics,
    client_tx: mpsc::Sender<ClientEvent>,
    seq_rx: flume::Receiver<SeqEvent<TokenOutput>>,
    started: Instant,
}

pub struct RequestState<E: Engine> {
    batcher: BatcherHandle<E>,
    detok: Arc<dyn Detokenize>,
    choices: Vec<Choice>,
    by_id: HashMap<SeqId, usize>,
    prompt_tokens: usize,
    metrics: ModelMetrics,
    client_tx: mpsc::Sender<ClientEvent>,
    started: Instant,
    first_token: bool,
    /// The request's outcome so far (`kiln_requests_total{status}`), the most severe choice's.
    outcome: Option<Outcome>,
    /// Dropped with the state, which ends the forwarding task.
    _stopped: oneshot::Sender<()>,
}

impl<E> Actor for RequestActor<E>
where
    E: Engine<Request = TextRequest, Output = TokenOutput>,
{
    type Msg = RequestMsg;
    type State = RequestState<E>;
    type Arguments = RequestArgs<E>;

    async fn pre_start(
        &self,
        myself: ActorRef<RequestMsg>,
        args: RequestArgs<E>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (stopped_tx, mut stopped_rx) = oneshot::channel::<()>();
        // The mailbox feeder: engine outputs, client departure and the deadline become messages.
        let seq_rx = args.seq_rx;
        let client = args.client_tx.clone();
        let deadline = args.deadline;
        tokio::spawn(async move {
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(sleep);
            loop {
                let msg = tokio::select! {
                    ev = seq_rx.recv_async() => match ev {
                        Ok(ev) => RequestMsg::Seq(ev),
                        Err(_) => RequestMsg::BatcherGone,
                    },
                    _ = client.closed() => RequestMsg::ClientGone,
                    _ = &mut sleep => RequestMsg::Deadline,
                    _ = &mut stopped_rx => break,
                };
                let terminal = !matches!(msg, RequestMsg::Seq(_));
                if myself.cast(msg).is_err() || terminal {
                    break;
                }
            }
        });
        let by_id = args.choices.iter().map(|c| (c.id, c.index)).collect();
        Ok(RequestState {
            batcher: args.batcher,
            detok: args.detok,
            choices: args.choices,
            by_id,
            prompt_tokens: args.prompt_tokens,
            metrics: args.metrics,
            client_tx: args.client_tx,
            started: args.started,
            first_token: true,
            outcome: None,
            _stopped: stopped_tx,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<RequestMsg>,
        msg: RequestMsg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RequestMsg::Seq(SeqEvent::Output(out)) => st.on_output(out),
            RequestMsg::Seq(SeqEvent::Finished(id, reason)) => {
                if let Some(&i) = st.by_id.get(&id) {
                    st.finish(i, reason);
                }
            }
            RequestMsg::Seq(SeqEvent::Failed(id, message)) => {
                if let Some(&i) = st.by_id.get(&id) {
                    st.fail(i, message);
                }
            }
            RequestMsg::BatcherGone => {
                for i in 0..st.choices.len() {
                    st.fail(i, "the model's batcher stopped before this choice finished".to_string());
                }
            }
            RequestMsg::ClientGone => {
                for i in 0..st.choices.len() {
                    if !st.choices[i].done {
                        st.batcher.cancel(st.choices[i].id);
                        st.choices[i].done = true;
                        st.record(Outcome::Finished(FinishReason::Cancelled));
                    }
                }
            }
            RequestMsg::Deadline => {
                if st.first_token {
                    // Still queued: the request was never served.
                    st.metrics.rejected(reject_reason::TIMEOUT).inc();
                }
                for i in 0..st.choices.len() {
                    if !st.choices[i].done {
                        st.batcher.cancel(st.choices[i].id);
                        st.finish(i, FinishReason::Timeout);
                    }
                }
            }
        }
        if st.choices.iter().all(|c| c.done) {
            if let Some(outcome) = st.outcome.take() {
                st.metrics.e2e.observe(st.started.elapsed().as_secs_f64());
                st.metrics.request_finished(outcome.as_str());
            }
            myself.stop(None);
        }
        Ok(())
    }
}

impl<E: Engine> RequestState<E> {
    fn on_output(&mut self, out: SeqOutput<TokenOutput>) {
        let Some(&i) = self.by_id.get(&out.id) else { return };
        let now = Instant::now();
        if self.first_token {
            self.first_token = false;
            self.metrics.ttft.observe((now - self.started).as_secs_f64());
        }
        let detok = &*self.detok;
        let c = &mut self.choices[i];
        if c.done {
            return; // stopped by a stop string; the batcher has not seen the cancel yet
        }
        if let Some(prev) = c.last_token_at.replace(now) {
            self.metrics.itl.observe((now - prev).as_secs_f64());
        }
        c.tokens += 1;
        let TokenOutput { token, logprob, top_logprobs } = out.output;
        // A stop token ends the text: its own text (e.g. "<|im_end|>") is not part of the output.
        let mut text =
            if out.finished == Some(FinishReason::Stop) { String::new() } else { c.decoder.push(detok, token) };
        if out.finished.is_some() {
            text.push_str(&c.decoder.finish(detok));
        }
        let stop = c.stop.push(&text);
        let mut emit = stop.emit;
        let finish = if stop.stopped {
            self.batcher.cancel(c.id);
            Some(FinishReason::Stop)
        } else {
            if out.finished.is_some() {
                emit.push_str(&c.stop.flush());
            }
            out.finished
        };
        let top_logprobs = top_logprobs
            .into_iter()
            .map(|(t, lp)| TopLogprob { token: t, text: detok.token_text(t), logprob: lp })
            .collect();
        let _ = self.client_tx.try_send(ClientEvent::Token {
            index: c.index,
            text: emit,
            token,
            token_text: detok.token_text(token),
            logprob,
            top_logprobs,
        });
        if let Some(reason) = finish {
            self.finish(i, reason);
        }
    }

    fn finish(&mut self, i: usize, reason: FinishReason) {
        let c = &mut self.choices[i];
        if c.done {
            return;
        }
        c.done = true;
        let _ = self.client_tx.try_send(ClientEvent::Done {
            index: c.index,
            finish_reason: reason,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: c.tokens,
        });
        self.record(Outcome::Finished(reason));
    }

    fn fail(&mut self, i: usize, message: String) {
        let c = &mut self.choices[i];
        if c.done {
            return;
        }
        c.done = true;
        let _ = self.client_tx.try_send(ClientEvent::Error { index: c.index, message });
        self.record(Outcome::Failed);
    }

    fn record(&mut self, outcome: Outcome) {
        if self.outcome.is_none_or(|o| outcome.severity() > o.severity()) {
            self.outcome = Some(outcome);
        }
    }
}

/// How one choice ended; a request's outcome is its most severe choice's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Finished(FinishReason),
    Failed,
}

impl Outcome {
    fn severity(self) -> u8 {
        match self {
            Outcome::Finished(FinishReason::Stop | FinishReason::Length) => 0,
            Outcome::Finished(FinishReason::Cancelled) => 1,
            Outcome::Finished(FinishReason::Timeout) => 2,
            Outcome::Finished(FinishReason::Error) | Outcome::Failed => 3,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Finished(r) => r.as_str(),
            Outcome::Failed => "error",
        }
    }
}
