//! Request and output types of image-generation (diffusion) models, and the client side of an
//! image request.
//!
//! A diffusion request is a sequence that needs one engine step per denoising step: its
//! "prompt" is one position (the engine encodes the text when the sequence is admitted) and it
//! "generates" one position per denoising step, so the generic scheduler runs every admitted
//! request once per tick, whatever step it is at, and requests join and leave between ticks
//! (step-level continuous batching). The engine's spec makes one KV block hold a whole request
//! (`block_size` >= the most steps), so `num_blocks` is the number of images that fit at once.

use std::collections::HashMap;

use crate::batcher::{BatcherHandle, SeqEvent, SubmitError};
use crate::engine::{Engine, FinishReason, SeqId, SeqRequest};

/// An 8-bit RGB image, rows top to bottom, 3 bytes per pixel.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}x{}, {} bytes)", self.width, self.height, self.data.len())
    }
}

/// The image an img2img request starts from, already decoded and sized to the request's
/// `width` x `height`.
#[derive(Debug, Clone, PartialEq)]
pub struct InitImage {
    pub image: RgbImage,
    /// How much of the schedule runs (diffusers' `strength`, in (0, 1]): the image is noised to
    /// the timestep `strength` of the way into the schedule and denoised from there, so
    /// [`img2img_steps`] steps run. f64 as in diffusers (Python floats): `10 * 0.3` is 2.999..., 2 steps.
    pub strength: f64,
}

/// Denoising steps an img2img request of `steps` and `strength` runs: diffusers'
/// `min(int(steps * strength), steps)`.
pub fn img2img_steps(steps: usize, strength: f64) -> usize {
    ((steps as f64 * strength).floor().max(0.0) as usize).min(steps)
}

/// One image to generate. Tokenization and validation happen before: the engine trusts it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    /// The prompt's token ids, padded/truncated to the text encoder's length (77 for CLIP).
    pub prompt_ids: Vec<u32>,
    /// The negative prompt's ids ("" when none), used for classifier-free guidance.
    pub negative_ids: Vec<u32>,
    /// Pixels; multiples of the model's size multiple (`vae_scale * 2^downsamplings`, 64 for SD).
    pub width: usize,
    pub height: usize,
    /// Denoising steps of the schedule (`num_inference_steps`).
    pub steps: usize,
    /// Classifier-free guidance scale; <= 1 runs the conditional branch only.
    pub guidance_scale: f32,
    /// A scheduler name (`ddim`, `euler`, `euler_a`, `dpmpp_2m`, `pndm`, with `_karras` for the
    /// sigma-based ones); `None`: the model's `scheduler_config.json`.
    pub scheduler: Option<String>,
    /// Seeds the initial noise (and the ancestral sampler's noise): the same seed, prompt
    /// and settings give the same image, alone or batched with others.
    pub seed: u64,
    pub init_image: Option<InitImage>,
    /// Send a preview every this many steps (0: none).
    pub preview_every: usize,
}

impl SeqRequest for ImageRequest {
    fn prompt_len(&self) -> usize {
        1
    }
    fn max_new_tokens(&self) -> usize {
        // PNDM's schedule has one UNet call more than the steps asked for.
        self.steps + 1
    }
}

/// What one engine step produced for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageOutput {
    /// Denoising steps done so far (1-based).
    pub step: usize,
    /// Steps this image runs (fewer than `steps` for img2img).
    pub total: usize,
    /// The timestep of the step just run.
    pub timestep: f32,
    /// A cheap preview (the latents projected to RGB, at latent resolution), when asked for.
    pub preview: Option<RgbImage>,
    /// The decoded image, on the last step (the output is then `finished`).
    pub image: Option<RgbImage>,
}

/// What the client side of an image request receives, per image `index`.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageEvent {
    Step {
        index: usize,
        output: ImageOutput,
    },
    /// The image ended without an image (cancelled, timed out, or failed).
    Ended {
        index: usize,
        reason: FinishReason,
    },
    Failed {
        index: usize,
        message: String,
    },
}

/// The running images of one request. Dropping it cancels those not finished.
pub struct ImageStream<E: Engine<Request = ImageRequest, Output = ImageOutput>> {
    batcher: BatcherHandle<E>,
    rx: flume::Receiver<SeqEvent<ImageOutput>>,
    /// Sequence -> image index, for images still running.
    running: HashMap<SeqId, usize>,
}

impl<E: Engine<Request = ImageRequest, Output = ImageOutput>> ImageStream<E> {
    /// Submits every image. When one is refused (queue full), the ones already queued are
    /// cancelled and the error is returned.
    pub async fn start(batcher: &BatcherHandle<E>, requests: Vec<ImageRequest>) -> Result<Self, SubmitError> {
        let (tx, rx) = flume::unbounded();
        let mut stream = ImageStream { batcher: batcher.clone(), rx, running: HashMap::new() };
        for (index, req) in requests.into_iter().enumerate() {
            // On error `stream` drops here and cancels what was queued.
            let id = batcher.submit(req, tx.clone()).await?;
            stream.running.insert(id, index);
        }
        Ok(stream)
    }

    /// Images still running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// The next event, `None` once every image has ended.
    pub async fn next(&mut self) -> Option<ImageEvent> {
        while !self.running.is_empty() {
            let event = match self.rx.recv_async().await {
                Ok(e) => e,
                Err(_) => {
                    // The batcher is gone: every running image failed.
                    let (&id, &index) = self.running.iter().next()?;
                    self.running.remove(&id);
                    return Some(ImageEvent::Failed { index, message: "the model's batcher stopped".into() });
                }
            };
            match event {
                SeqEvent::Output(out) => {
                    let Some(&index) = self.running.get(&out.id) else { continue };
                    match out.finished {
                        None | Some(FinishReason::Stop) | Some(FinishReason::Length) => {
                            if out.finished.is_some() {
                                self.running.remove(&out.id);
                            }
                            return Some(ImageEvent::Step { index, output: out.output });
                        }
                        Some(reason) => {
                            self.running.remove(&out.id);
                            return Some(ImageEvent::Ended { index, reason });
                        }
                    }
                }
                SeqEvent::Finished(id, reason) => {
                    if let Some(index) = self.running.remove(&id) {
                        return Some(ImageEvent::Ended { index, reason });
                    }
                }
                SeqEvent::Failed(id, message) => {
                    if let Some(index) = self.running.remove(&id) {
                        return Some(ImageEvent::Failed { index, message });
                    }
                }
            }
        }
        None
    }

    /// Cancels every image still running.
    pub fn cancel(&mut self) {
        for (id, _) in self.running.drain() {
            self.batcher.cancel(id);
        }
    }
}

impl<E: Engine<Request = ImageRequest, Output = ImageOutput>> Drop for ImageStream<E> {
    fn drop(&mut self) {
        self.cancel();
    }
}
