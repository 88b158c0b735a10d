//! Request and output types of text-to-speech models (Qwen3-TTS), and the client side of a
//! speech request.
//!
//! An utterance is a sequence of the generic batcher: its prompt is the talker's prefill rows
//! (text track + codec track, built before submission), and it generates one position per
//! codec frame (12.5 frames per second of audio). Each engine step runs the talker once for
//! every running utterance (continuous batching over the paged KV cache), then the code
//! predictor for the frames produced, then the streaming codec decoder, so audio leaves as it is
//! generated.

use crate::batcher::{BatcherHandle, SeqEvent, SubmitError};
use crate::engine::{Engine, FinishReason, SeqId, SeqRequest};

/// Sampling of one utterance. Codebook 0 (the talker) uses the first group with a repetition
/// penalty over the utterance's own codebook-0 history; codebooks 1..15 (the code predictor) use
/// the `sub_*` group without penalty. `do_sample == false` is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeechSampling {
    pub do_sample: bool,
    pub temperature: f32,
    /// 0: no top-k.
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub sub_do_sample: bool,
    pub sub_temperature: f32,
    pub sub_top_k: usize,
    pub sub_top_p: f32,
    /// Seeds this utterance's random draws: the same seed and input give the same audio, alone
    /// or batched with others.
    pub seed: u64,
}

impl SpeechSampling {
    /// Greedy on both groups (what the parity fixtures record).
    pub fn greedy() -> Self {
        SpeechSampling {
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.05,
            sub_do_sample: false,
            sub_temperature: 1.0,
            sub_top_k: 0,
            sub_top_p: 1.0,
            seed: 0,
        }
    }
}

/// One utterance to speak. Prompt construction and validation happen before: the engine
/// trusts it.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeechRequest {
    /// Text-vocabulary id of every prefill row.
    pub text_track: Vec<u32>,
    /// Codec id of every prefill row (`None`: the row has no codec part). Same length as
    /// `text_track`.
    pub codec_track: Vec<Option<u32>>,
    /// Text ids fed with the generated frames, one per frame; `tts_pad` once they run out.
    pub trailing_text: Vec<u32>,
    /// Most frames to generate (the utterance ends earlier at the codec eos).
    pub max_frames: usize,
    pub sampling: SpeechSampling,
    /// The first audio is decoded once this many frames exist (>= 1): the latency to first
    /// audio.
    pub first_chunk_frames: usize,
    /// Later audio is decoded every this many frames (>= 1): larger chunks cost less per frame.
    pub chunk_frames: usize,
}

impl SeqRequest for SpeechRequest {
    fn prompt_len(&self) -> usize {
        self.text_track.len()
    }
    fn max_new_tokens(&self) -> usize {
        // One talker step per frame plus the step whose code is eos (or is dropped at the cap).
        self.max_frames + 1
    }
}

/// What one engine step produced for one utterance.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SpeechOutput {
    /// Codes (16 per frame) of the frames generated this step (0 or 1 frames).
    pub frames: Vec<Vec<u32>>,
    /// Audio decoded this step (mono, f32 in [-1, 1], the model's sample rate): the samples of
    /// every frame not yet decoded once `chunk_frames` are pending or the utterance ends.
    pub audio: Vec<f32>,
    /// Frames generated so far, this step's included.
    pub frames_total: usize,
}

/// What the client side of a speech request receives.
#[derive(Debug, Clone, PartialEq)]
pub enum SpeechEvent {
    /// New frames and/or audio.
    Output(SpeechOutput),
    /// The utterance is complete (`Stop`: eos, `Length`: `max_frames`) or ended early
    /// (cancelled, timed out, failed in the engine).
    Done(FinishReason),
    Failed(String),
}

/// One running utterance. Dropping it cancels the utterance if it has not ended.
pub struct SpeechStream<E: Engine<Request = SpeechRequest, Output = SpeechOutput>> {
    batcher: BatcherHandle<E>,
    rx: flume::Receiver<SeqEvent<SpeechOutput>>,
    id: SeqId,
    /// The engine finished the utterance with its last output; `Done` is still to be returned.
    pending_done: Option<FinishReason>,
    done: bool,
}

impl<E: Engine<Request = SpeechRequest, Output = SpeechOutput>> SpeechStream<E> {
    /// Queues the utterance (`Overloaded` when the queue is full).
    pub async fn start(batcher: &BatcherHandle<E>, request: SpeechRequest) -> Result<Self, SubmitError> {
        let (tx, rx) = flume::unbounded();
        let id = batcher.submit(request, tx).await?;
        Ok(SpeechStream { batcher: batcher.clone(), rx, id, pending_done: None, done: false })
    }

    /// The next event; `None` after `Done` / `Failed`.
    pub async fn next(&mut self) -> Option<SpeechEvent> {
        if self.done {
            return None;
        }
        if let Some(reason) = self.pending_done.take() {
            self.done = true;
            return Some(SpeechEvent::Done(reason));
        }
        loop {
            let event = match self.rx.recv_async().await {
                Ok(e) => e,
                Err(_) => {
                    self.done = true;
                    return Some(SpeechEvent::Failed("the model's batcher stopped".into()));
                }
            };
            match event {
                SeqEvent::Output(out) if out.id == self.id => match out.finished {
                    None => return Some(SpeechEvent::Output(out.output)),
                    Some(reason) => {
                        // The final output carries the last frames and audio; `Done` follows
                        // on the next call.
                        if out.output == SpeechOutput::default() {
                            self.done = true;
                            return Some(SpeechEvent::Done(reason));
                        }
                        self.pending_done = Some(reason);
                        return Some(SpeechEvent::Output(out.output));
                    }
                },
                SeqEvent::Output(_) => continue,
                SeqEvent::Finished(id, reason) if id == self.id => {
                    self.done = true;
                    return Some(SpeechEvent::Done(reason));
                }
                SeqEvent::Failed(id, message) if id == self.id => {
                    self.done = true;
                    return Some(SpeechEvent::Failed(message));
                }
                _ => continue,
            }
        }
    }

    /// Cancels the utterance if it is still running.
    pub fn cancel(&mut self) {
        if !self.done {
            self.done = true;
            self.batcher.cancel(self.id);
        }
    }
}

impl<E: Engine<Request = SpeechRequest, Output = SpeechOutput>> Drop for SpeechStream<E> {
    fn drop(&mut self) {
        self.cancel();
    }
}
