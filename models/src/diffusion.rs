//! Stable Diffusion 1.x / 2.x: the text-to-image and image-to-image pipeline over a diffusers
//! folder (`model_index.json`, `tokenizer/`, `text_encoder/`, `unet/`, `vae/`, `scheduler/`),
//! and [`DiffusionEngine`], which batches denoising steps across requests.
//!
//! The pipeline follows diffusers' `StableDiffusionPipeline` / `StableDiffusionImg2ImgPipeline`:
//! - the prompt and the negative prompt are CLIP-encoded separately (`last_hidden_state`);
//! - classifier-free guidance runs the UNet on the unconditional and the conditional input in
//!   one batch and combines `uncond + scale * (cond - uncond)`; a scale <= 1 runs the
//!   conditional branch only (diffusers' `do_classifier_free_guidance` is `scale > 1`);
//! - txt2img starts from Gaussian noise times the scheduler's `init_noise_sigma`; img2img
//!   encodes the image (`scaling_factor * (mean + std * eps)`), starts the schedule at
//!   `steps - floor(steps * strength)` and noises the latents to that step (`add_noise`);
//! - the image is `clamp(decode(latents / scaling_factor) / 2 + 0.5, 0, 1)`, rounded to 8 bits.
//!
//! Latents and scheduler state live on the host per request (a few hundred KB at 512x512), so
//! requests at different timesteps, with different schedulers, guidance scales and step
//! counts share one UNet forward per engine step; requests of different resolutions run in one
//! forward per resolution in the same step. Randomness comes from a per-request generator
//! seeded by the request (Box-Muller over SplitMix64), so an image depends only on its request,
//! not on what it was batched with.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{DType as BurnDType, Tensor};
use kiln_actors::{
    Engine, EngineError, EngineSpec, FinishReason, ImageOutput, ImageRequest, MemoryBytes, RgbImage, SeqId, SeqOutput,
    StepPlan,
};

use crate::backend::{choose_backend, dtype_bytes, BackendChoice};
use crate::clip::{ClipOutput, ClipTextConfig, ClipTextModel, ClipTokenizer};
use crate::schedulers::{PredictionType, Scheduler, SchedulerConfig, SchedulerKind};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::weights::tensor_from_f32;
use crate::{DType, DeviceSpec, LoadError};

fn load_err(what: &str, e: impl std::fmt::Display) -> LoadError {
    LoadError::Unsupported(format!("{what}: {e}"))
}

// --- what a folder holds -----------------------------------------------------------------------

/// Facts of a diffusers folder, read from its configs (no weights).
#[derive(Debug, Clone)]
pub struct DiffusionInfo {
    pub dir: PathBuf,
    /// `model_index.json` `_class_name`.
    pub pipeline_class: String,
    /// The resolution the UNet was trained at (`sample_size * vae_scale`).
    pub default_width: usize,
    pub default_height: usize,
    /// Image pixels per latent pixel (8 for SD).
    pub vae_scale: usize,
    /// Width and height must be multiples of this (`vae_scale * 2^downsamplings`).
    pub size_multiple: usize,
    pub latent_channels: usize,
    pub scheduler: SchedulerConfig,
    pub prediction_type: PredictionType,
    /// Text encoder input length (77).
    pub text_length: usize,
    pub text_hidden: usize,
    /// Parameters of the text encoder, UNet and VAE (safetensors headers).
    pub num_params: u64,
    /// Per latent pixel per image, a rough activation figure (see [`DiffusionInfo::activation_bytes`]).
    unet_channels: Vec<usize>,
    unet_heads: Vec<usize>,
    vae_channels: Vec<usize>,
}

fn count_params(dir: &Path) -> Result<u64, LoadError> {
    let mut n = 0u64;
    for stem in ["diffusion_pytorch_model", "model"] {
        for f in crate::memory::checkpoint_files_named(dir, stem)? {
            let header = crate::memory::read_safetensors_header(&f)?;
            n += header.iter().map(|t| t.shape.iter().product::<u64>()).sum::<u64>();
        }
    }
    if n == 0 {
        return Err(LoadError::Io { path: dir.display().to_string(), message: "no safetensors weights".into() });
    }
    Ok(n)
}

impl DiffusionInfo {
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let index = crate::config::read_json(&dir.join("model_index.json"))?;
        let pipeline_class = index["_class_name"].as_str().unwrap_or("StableDiffusionPipeline").to_string();
        if pipeline_class.contains("XL") || !index["text_encoder_2"].is_null() {
            return Err(LoadError::Unsupported(format!(
                "{}: {pipeline_class} is not supported yet: Kiln serves Stable Diffusion 1.x and 2.x pipelines",
                dir.display()
            )));
        }
        let unet = UNetConfig::from_dir(&dir.join("unet"))?;
        let vae = VaeConfig::from_dir(&dir.join("vae"))?;
        let text = ClipTextConfig::from_dir(&dir.join("text_encoder"))?;
        let sched_path = dir.join("scheduler").join("scheduler_config.json");
        let scheduler = SchedulerConfig::from_file(&sched_path).map_err(|e| load_err("scheduler", e))?;
        let tok = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        let vae_scale = vae.scale();
        let sample = unet.sample_size.max(1);
        let num_params = ["text_encoder", "unet", "vae"]
            .iter()
            .map(|c| count_params(&dir.join(c)))
            .sum::<Result<u64, LoadError>>()?;
        Ok(DiffusionInfo {
            dir: dir.to_path_buf(),
            pipeline_class,
            default_width: sample * vae_scale,
            default_height: sample * vae_scale,
            vae_scale,
            size_multiple: vae_scale << unet.downsamplings(),
            latent_channels: vae.latent_channels,
            prediction_type: scheduler.prediction_type,
            scheduler,
            text_length: tok.max_length(),
            text_hidden: text.hidden_size,
            num_params,
            unet_channels: unet.block_out_channels.clone(),
            unet_heads: unet.heads.clone(),
            vae_channels: vae.block_out_channels.clone(),
        })
    }

    /// Weights at `dtype`.
    pub fn weights_bytes(&self, dtype: DType) -> u64 {
        self.num_params * dtype_bytes(dtype) as u64
    }

    /// An upper estimate of the activation workspace of one engine step running `images`
    /// images of `width` x `height` (CFG doubles the UNet batch): the UNet's skip connections
    /// and working feature maps, its largest self-attention score matrix (f32), and the VAE
    /// decoder's full-resolution feature maps for one image at a time.
    pub fn activation_bytes(&self, width: usize, height: usize, images: usize, dtype: DType) -> u64 {
        let eb = dtype_bytes(dtype) as u64;
        let lat = ((width / self.vae_scale.max(1)) * (height / self.vae_scale.max(1))) as u64;
        let batch = 2 * images.max(1) as u64;
        // Skips: 3 per level at that level's resolution, plus ~6 working maps at the top.
        let mut unet = 0u64;
        for (i, &c) in self.unet_channels.iter().enumerate() {
            unet += 3 * c as u64 * (lat >> (2 * i));
        }
        let top = *self.unet_channels.first().unwrap_or(&320) as u64;
        unet += 6 * top * lat + 8 * top * lat; // feature maps + the GEGLU hidden (4x inner, 2 halves)
        let heads = *self.unet_heads.first().unwrap_or(&8) as u64;
        let scores = heads * lat * lat * 4 * 2; // scores and probabilities, f32
        let unet_total = batch * (unet * eb + scores);
        let vae_top = *self.vae_channels.first().unwrap_or(&128) as u64;
        let vae = 4 * vae_top * (width * height) as u64 * eb + lat * lat * 4 * 2;
        unet_total + images.max(1) as u64 * vae
    }
}

// --- randomness --------------------------------------------------------------------------------

/// Standard normal values from a seed: SplitMix64 and Box-Muller. Deterministic across
/// platforms and independent of batching.
#[derive(Debug, Clone)]
pub struct NoiseRng {
    state: u64,
    spare: Option<f32>,
}

impl NoiseRng {
    pub fn new(seed: u64) -> Self {
        NoiseRng { state: seed ^ 0x6b69_6c6e_6469_6666, spare: None }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        self.spare = Some((r * a.sin()) as f32);
        (r * a.cos()) as f32
    }

    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
}

/// Where a job's Gaussian draws come from: a seeded [`NoiseRng`] when serving; recorded
/// draws in parity tests (diffusers' torch generator cannot be reproduced).
pub trait NoiseSource: Send {
    /// `n` standard normal values.
    fn normals(&mut self, n: usize) -> Vec<f32>;
}

impl NoiseSource for NoiseRng {
    fn normals(&mut self, n: usize) -> Vec<f32> {
        NoiseRng::normals(self, n)
    }
}

// --- the pipeline ------------------------------------------------------------------------------

/// A scheduler chosen by name: a [`SchedulerKind`] name, optionally with a `_karras` suffix
/// (Karras sigmas, for the sigma-based samplers).
pub fn scheduler_config(base: &SchedulerConfig, name: Option<&str>) -> Result<SchedulerConfig, String> {
    let Some(name) = name else { return Ok(base.clone()) };
    let norm = name.trim().to_ascii_lowercase();
    let (kind_name, karras) = match norm.strip_suffix("karras") {
        Some(k) => (k.trim_end_matches(['_', '-', ' ']), true),
        None => (norm.as_str(), false),
    };
    let kind: SchedulerKind = kind_name.parse().map_err(|e| format!("{e}"))?;
    let mut cfg = base.with_kind(kind).map_err(|e| e.to_string())?;
    if karras {
        if matches!(kind, SchedulerKind::Ddim | SchedulerKind::Pndm) {
            return Err(format!("{name}: Karras sigmas need euler, euler_a or dpmpp_2m"));
        }
        cfg.use_karras_sigmas = true;
    }
    Ok(cfg)
}

/// The scheduler names requests may use.
pub fn scheduler_names() -> Vec<String> {
    let mut v: Vec<String> = SchedulerKind::ALL.iter().map(|k| k.name().to_string()).collect();
    v.extend(["euler_karras", "euler_a_karras", "dpmpp_2m_karras"].map(String::from));
    v
}

/// The models of a Stable Diffusion pipeline on one backend.
pub struct DiffusionPipeline<B: Backend> {
    pub text_encoder: ClipTextModel<B>,
    pub unet: UNet2DConditionModel<B>,
    pub vae: AutoencoderKL<B>,
    pub device: B::Device,
    pub dtype: DType,
    pub latent_channels: usize,
    pub vae_scale: usize,
    pub scaling_factor: f64,
}

impl<B: Backend> DiffusionPipeline<B> {
    pub fn load(dir: &Path, device: &B::Device, dtype: DType) -> Result<Self, LoadError> {
        let text_encoder = ClipTextModel::from_dir(&dir.join("text_encoder"), device, dtype)?;
        let unet = UNet2DConditionModel::from_dir(&dir.join("unet"), device, dtype)?;
        let vae = AutoencoderKL::from_dir(&dir.join("vae"), device, dtype)?;
        let vcfg = VaeConfig::from_dir(&dir.join("vae"))?;
        Ok(DiffusionPipeline {
            text_encoder,
            unet,
            vae,
            device: device.clone(),
            dtype,
            latent_channels: vcfg.latent_channels,
            vae_scale: vcfg.scale(),
            scaling_factor: vcfg.scaling_factor,
        })
    }

    /// The text encoder's `last_hidden_state` for padded prompts: `[B, L, hidden]`.
    pub fn encode_prompts(&self, ids: &[&[u32]]) -> Result<Tensor<B, 3>, String> {
        self.text_encoder.encode(ids, ClipOutput::LAST)
    }

    /// Guided model outputs for a batch of items of one latent shape `[c, h, w]`: per item the
    /// scheduler-scaled input, its timestep, its conditional context `[1, L, D]`, and, when
    /// guided (scale > 1), its unconditional context and scale. Returns one host vector per item.
    pub fn guided_unet(&self, shape: [usize; 3], items: &[GuidedInput<'_, B>]) -> Result<Vec<Vec<f32>>, String> {
        let [c, h, w] = shape;
        let n = c * h * w;
        let mut rows: Vec<f32> = Vec::new();
        let mut timesteps = Vec::new();
        let mut contexts = Vec::new();
        // Conditional rows first, then the unconditional rows of the guided items.
        for it in items {
            if it.sample.len() != n {
                return Err(format!("sample of {} values for latents {c}x{h}x{w}", it.sample.len()));
            }
            rows.extend_from_slice(it.sample);
            timesteps.push(it.timestep);
            contexts.push(it.cond.clone());
        }
        let guided: Vec<usize> = (0..items.len()).filter(|&i| items[i].uncond.is_some()).collect();
        for &i in &guided {
            rows.extend_from_slice(items[i].sample);
            timesteps.push(items[i].timestep);
            contexts.push(items[i].uncond.expect("filtered").clone());
        }
        let b = timesteps.len();
        let x = tensor_from_f32::<B, 4>(rows, vec![b, c, h, w], &self.device, self.dtype);
        let ctx = Tensor::cat(contexts, 0);
        let out = self.unet.forward(x, &timesteps, &ctx)?;
        let flat = out
            .cast(BurnDType::F32)
            .into_data()
            .into_vec::<f32>()
            .map_err(|e| format!("reading the UNet output: {e:?}"))?;
        let mut result: Vec<Vec<f32>> = flat.chunks(n).take(items.len()).map(<[f32]>::to_vec).collect();
        for (j, &i) in guided.iter().enumerate() {
            let uncond = &flat[(items.len() + j) * n..(items.len() + j + 1) * n];
            let g = items[i].guidance;
            for (o, u) in result[i].iter_mut().zip(uncond) {
                *o = u + g * (*o - u);
            }
        }
        Ok(result)
    }

    /// Decodes latents `[c, h, w]` (several images of one shape) into images in [0, 1],
    /// `[3, H, W]` row-major each: `clamp(vae.decode(latents / scaling_factor) / 2 + 0.5)`.
    pub fn decode(&self, shape: [usize; 3], latents: &[&[f32]]) -> Result<Vec<Vec<f32>>, String> {
        let [c, h, w] = shape;
        let flat: Vec<f32> = latents.iter().flat_map(|l| l.iter().copied()).collect();
        let z = tensor_from_f32::<B, 4>(flat, vec![latents.len(), c, h, w], &self.device, self.dtype);
        let img = self.vae.decode_latents(z)?;
        let [_, ic, ih, iw] = img.dims();
        let img = img.cast(BurnDType::F32).div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0);
        let data = img.into_data().into_vec::<f32>().map_err(|e| format!("reading the image: {e:?}"))?;
        Ok(data.chunks(ic * ih * iw).map(<[f32]>::to_vec).collect())
    }

    /// The latents img2img starts from: `scaling_factor * (mean + std * eps)` of `image`
    /// `[3, H, W]` in [-1, 1]; `eps` is standard normal noise of the latents' size.
    pub fn encode_image(&self, image: &[f32], height: usize, width: usize, eps: &[f32]) -> Result<Vec<f32>, String> {
        let x = tensor_from_f32::<B, 4>(image.to_vec(), vec![1, 3, height, width], &self.device, self.dtype);
        let (mean, logvar) = self.vae.encode(x)?;
        let read = |t: Tensor<B, 4>| -> Result<Vec<f32>, String> {
            t.cast(BurnDType::F32).into_data().into_vec::<f32>().map_err(|e| format!("reading the encoding: {e:?}"))
        };
        let (mean, logvar) = (read(mean)?, read(logvar)?);
        if eps.len() != mean.len() {
            return Err(format!("eps of {} values for latents of {}", eps.len(), mean.len()));
        }
        let s = self.scaling_factor as f32;
        Ok(mean.iter().zip(&logvar).zip(eps).map(|((m, lv), e)| s * (m + (0.5 * lv).exp() * e)).collect())
    }
}

/// One item of [`DiffusionPipeline::guided_unet`].
pub struct GuidedInput<'a, B: Backend> {
    pub sample: &'a [f32],
    pub timestep: f32,
    pub cond: &'a Tensor<B, 3>,
    pub uncond: Option<&'a Tensor<B, 3>>,
    pub guidance: f32,
}

/// `[3, H, W]` floats in [0, 1] to 8-bit RGB (numpy's `(x * 255).round()`).
pub fn to_rgb8(chw: &[f32], height: usize, width: usize) -> RgbImage {
    let plane = height * width;
    let mut data = vec![0u8; plane * 3];
    for p in 0..plane {
        for ch in 0..3 {
            data[p * 3 + ch] = (chw[ch * plane + p] * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
    RgbImage { width, height, data }
}

/// 8-bit RGB to `[3, H, W]` in [-1, 1] (the pipelines' image preprocessing).
pub fn from_rgb8(img: &RgbImage) -> Vec<f32> {
    let plane = img.width * img.height;
    let mut out = vec![0f32; plane * 3];
    for p in 0..plane {
        for ch in 0..3 {
            out[ch * plane + p] = img.data[p * 3 + ch] as f32 / 255.0 * 2.0 - 1.0;
        }
    }
    out
}

/// A cheap preview: SD latents projected to RGB with a fixed 4x3 matrix (the widely used
/// "latent2rgb" approximation), at latent resolution. Other latent widths give grey levels of
/// the first channel.
pub fn latent_preview(latents: &[f32], c: usize, h: usize, w: usize) -> RgbImage {
    const M: [[f32; 3]; 4] =
        [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]];
    let plane = h * w;
    let mut data = vec![0u8; plane * 3];
    for p in 0..plane {
        for ch in 0..3 {
            let v = if c == 4 { (0..4).map(|k| latents[k * plane + p] * M[k][ch]).sum::<f32>() } else { latents[p] };
            data[p * 3 + ch] = (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    RgbImage { width: w, height: h, data }
}

// --- the engine --------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct DiffusionEngineOptions {
    pub device: DeviceSpec,
    pub dtype: DType,
    /// Most images in flight (admitted, at some denoising step).
    pub max_running: usize,
    /// The largest image served (pixels, width x height).
    pub max_pixels: usize,
    /// Images of `max_pixels` one UNet forward may hold (each counts twice with guidance):
    /// the activation budget. Smaller images batch more, in proportion to their workspace
    /// estimate ([`DiffusionInfo::activation_bytes`]); the warm-up runs this many of the
    /// largest.
    pub max_batch_images: usize,
    /// Most denoising steps a request may ask for.
    pub max_steps: usize,
    /// Run the warm-up step at start (measures the workspace; off in tests that don't need it).
    pub warmup: bool,
}

impl Default for DiffusionEngineOptions {
    fn default() -> Self {
        DiffusionEngineOptions {
            device: DeviceSpec::Auto,
            dtype: DType::F32,
            max_running: 4,
            max_pixels: 512 * 512,
            max_batch_images: 4,
            max_steps: 150,
            warmup: true,
        }
    }
}

enum Inner {
    Flex(DiffusionPipeline<burn::backend::Flex>, Seqs<burn::backend::Flex>),
    #[cfg(feature = "cuda")]
    Cuda(DiffusionPipeline<burn::backend::Cuda>, Seqs<burn::backend::Cuda>, usize),
}

type Seqs<B> = HashMap<SeqId, ImageJob<B>>;

/// One image being generated: its prompt embeddings, latents and scheduler state. Built by
/// [`DiffusionPipeline::start_job`], advanced by [`DiffusionPipeline::step_jobs`].
pub struct ImageJob<B: Backend> {
    /// Latent shape `[c, h, w]`.
    shape: [usize; 3],
    cond: Tensor<B, 3>,
    uncond: Option<Tensor<B, 3>>,
    guidance: f32,
    latents: Vec<f32>,
    scheduler: Scheduler<Vec<f32>>,
    noise: Box<dyn NoiseSource>,
    total: usize,
    done: usize,
    preview_every: usize,
}

impl<B: Backend> ImageJob<B> {
    /// The current latents `[c, h, w]` (after the steps done so far).
    pub fn latents(&self) -> &[f32] {
        &self.latents
    }
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }
    /// The timesteps this job runs, in order.
    pub fn timesteps(&self) -> Vec<f32> {
        self.scheduler.timesteps()[self.scheduler.step_index() - self.done..].to_vec()
    }
    pub fn is_done(&self) -> bool {
        self.scheduler.is_done()
    }
    /// The conditional and (when guided) unconditional prompt embeddings, `[1, L, D]`.
    pub fn embeddings(&self) -> (&Tensor<B, 3>, Option<&Tensor<B, 3>>) {
        (&self.cond, self.uncond.as_ref())
    }
}

/// Stable Diffusion behind the batcher: one UNet forward per resolution per step, over every
/// running image (see the module docs).
pub struct DiffusionEngine {
    inner: Inner,
    info: DiffusionInfo,
    spec: EngineSpec,
    opts: DiffusionEngineOptions,
    activation_peak: u64,
    /// Activation estimate of one forward of `max_batch_images` of the largest size.
    budget: u64,
}

impl DiffusionEngine {
    pub fn load(dir: &Path, opts: &DiffusionEngineOptions) -> Result<Self, LoadError> {
        let t0 = Instant::now();
        let info = DiffusionInfo::from_dir(dir)?;
        let backend = choose_backend(opts.device)?;
        let inner = match backend {
            BackendChoice::Flex => {
                Inner::Flex(DiffusionPipeline::load(dir, &burn::backend::flex::FlexDevice, opts.dtype)?, HashMap::new())
            }
            #[cfg(feature = "cuda")]
            BackendChoice::Cuda(n) => Inner::Cuda(
                DiffusionPipeline::load(dir, &burn::backend::cuda::CudaDevice::new(n), opts.dtype)?,
                HashMap::new(),
                n,
            ),
            #[cfg(not(feature = "cuda"))]
            BackendChoice::Cuda(n) => {
                return Err(LoadError::Unsupported(format!("cuda:{n} requested but this build has no CUDA backend")))
            }
        };
        let max_running = opts.max_running.max(1);
        // One block holds a whole request: the prompt position plus one per UNet call (PNDM
        // makes one more call than the steps asked for), so an image never needs a second
        // block and is never preempted (which would restart it).
        let block = opts.max_steps.max(1) + 2;
        let spec = EngineSpec {
            block_size: block,
            num_blocks: max_running,
            max_model_len: block,
            max_batch_tokens: max_running,
            max_running,
        };
        tracing::info!(
            pipeline = %info.pipeline_class,
            device = %backend.describe(),
            params = info.num_params,
            seconds = t0.elapsed().as_secs_f64(),
            "diffusion pipeline loaded"
        );
        let side = largest_side(&info, opts.max_pixels);
        let budget = info.activation_bytes(side, side, opts.max_batch_images.max(1), opts.dtype);
        Ok(DiffusionEngine { inner, info, spec, opts: opts.clone(), activation_peak: 0, budget })
    }

    pub fn info(&self) -> &DiffusionInfo {
        &self.info
    }

    /// Images in flight.
    pub fn num_sequences(&self) -> usize {
        match &self.inner {
            Inner::Flex(_, s) => s.len(),
            #[cfg(feature = "cuda")]
            Inner::Cuda(_, s, _) => s.len(),
        }
    }
}

/// The largest square image within `max_pixels`, a multiple of the size multiple.
pub fn largest_side(info: &DiffusionInfo, max_pixels: usize) -> usize {
    let m = info.size_multiple.max(1);
    (((max_pixels as f64).sqrt() as usize) / m).max(1) * m
}

/// Images of latent shape `shape` one forward may hold within `budget`.
fn batch_limit(info: &DiffusionInfo, shape: [usize; 3], budget: u64, dtype: DType) -> usize {
    let s = info.vae_scale;
    let one = info.activation_bytes(shape[2] * s, shape[1] * s, 1, dtype).max(1);
    ((budget / one) as usize).max(1)
}

impl<B: Backend> DiffusionPipeline<B> {
    /// Starts one image: encodes its prompts, draws its initial latents (or encodes its init
    /// image and noises it to the first step run) and builds its scheduler. Draw order: txt2img
    /// the initial noise; img2img the encoder's sample, then the `add_noise` noise; then
    /// Euler Ancestral one draw per step.
    pub fn start_job(
        &self,
        info: &DiffusionInfo,
        req: &ImageRequest,
        mut noise: Box<dyn NoiseSource>,
    ) -> Result<ImageJob<B>, String> {
        let p = self;
        let s = p.vae_scale;
        if req.width == 0 || req.height == 0 || !req.width.is_multiple_of(s) || !req.height.is_multiple_of(s) {
            return Err(format!("{}x{} is not a multiple of {s}", req.width, req.height));
        }
        let shape = [p.latent_channels, req.height / s, req.width / s];
        let n = shape.iter().product::<usize>();
        let guided = req.guidance_scale > 1.0;
        let embeds = if guided {
            p.encode_prompts(&[&req.prompt_ids, &req.negative_ids])?
        } else {
            p.encode_prompts(&[&req.prompt_ids])?
        };
        let cond = embeds.clone().narrow(0, 0, 1);
        let uncond = guided.then(|| embeds.narrow(0, 1, 1));
        let cfg = scheduler_config(&info.scheduler, req.scheduler.as_deref())?;
        let mut scheduler = Scheduler::<Vec<f32>>::new(&cfg, req.steps).map_err(|e| e.to_string())?;
        let latents = match &req.init_image {
            None => {
                let sigma = scheduler.init_noise_sigma() as f32;
                noise.normals(n).into_iter().map(|x| x * sigma).collect()
            }
            Some(init) => {
                if init.image.width != req.width || init.image.height != req.height {
                    return Err("the init image must have the request's size".into());
                }
                let run = kiln_actors::img2img_steps(req.steps, init.strength);
                if run == 0 {
                    return Err(format!("strength {} runs no step of {}", init.strength, req.steps));
                }
                // diffusers: `timesteps[steps - floor(steps * strength):]` (PNDM's list is one longer).
                let start = req.steps - run;
                scheduler.begin_at(start).map_err(|e| e.to_string())?;
                let eps = noise.normals(n);
                let encoded = p.encode_image(&from_rgb8(&init.image), req.height, req.width, &eps)?;
                let added = noise.normals(n);
                scheduler.add_noise(&encoded, &added).map_err(|e| e.to_string())?
            }
        };
        let total = scheduler.steps_left();
        Ok(ImageJob {
            shape,
            cond,
            uncond,
            guidance: req.guidance_scale,
            latents,
            scheduler,
            noise,
            total,
            done: 0,
            preview_every: req.preview_every,
        })
    }
}

/// What one step did to one job.
pub struct JobStep {
    pub output: ImageOutput,
    pub finished: bool,
}

impl<B: Backend> DiffusionPipeline<B> {
    /// One denoising step of every job, batched per latent shape in forwards of at most
    /// `limit(shape)` images, then the VAE decode of the jobs that finished. Results in
    /// `jobs` order.
    pub fn step_jobs(
        &self,
        jobs: &mut [&mut ImageJob<B>],
        limit: &dyn Fn([usize; 3]) -> usize,
    ) -> Result<Vec<JobStep>, String> {
        let mut groups: BTreeMap<[usize; 3], Vec<usize>> = BTreeMap::new();
        for (i, j) in jobs.iter().enumerate() {
            if !j.is_done() {
                groups.entry(j.shape).or_default().push(i);
            }
        }
        let chunks: Vec<([usize; 3], Vec<usize>)> = groups
            .into_iter()
            .flat_map(|(shape, g)| g.chunks(limit(shape).max(1)).map(|c| (shape, c.to_vec())).collect::<Vec<_>>())
            .collect();
        let mut results: Vec<Option<JobStep>> = (0..jobs.len()).map(|_| None).collect();
        for (shape, group) in chunks {
            let inputs: Vec<(Vec<f32>, f32)> = group
                .iter()
                .map(|&i| {
                    let j = &jobs[i];
                    (j.scheduler.scale_model_input(&j.latents), j.scheduler.timestep().unwrap_or(0.0))
                })
                .collect();
            let items: Vec<GuidedInput<'_, B>> = group
                .iter()
                .zip(&inputs)
                .map(|(&i, (x, t))| {
                    let j = &jobs[i];
                    GuidedInput {
                        sample: x,
                        timestep: *t,
                        cond: &j.cond,
                        uncond: j.uncond.as_ref(),
                        guidance: j.guidance,
                    }
                })
                .collect();
            let preds = self.guided_unet(shape, &items)?;
            drop(items);
            let mut finished = Vec::new();
            for ((&i, pred), (_, t)) in group.iter().zip(preds).zip(&inputs) {
                let j = &mut *jobs[i];
                let drawn = j.scheduler.needs_noise().then(|| j.noise.normals(j.latents.len()));
                j.latents = j.scheduler.step(&pred, &j.latents, drawn.as_ref()).map_err(|e| e.to_string())?;
                j.done += 1;
                let done = j.scheduler.is_done();
                let preview = (j.preview_every > 0 && j.done.is_multiple_of(j.preview_every) && !done)
                    .then(|| latent_preview(&j.latents, shape[0], shape[1], shape[2]));
                let output = ImageOutput { step: j.done, total: j.total, timestep: *t, preview, image: None };
                if done {
                    finished.push(i);
                }
                results[i] = Some(JobStep { output, finished: done });
            }
            if finished.is_empty() {
                continue;
            }
            let lat: Vec<&[f32]> = finished.iter().map(|&i| jobs[i].latents.as_slice()).collect();
            let images = self.decode(shape, &lat)?;
            let (h, w) = (shape[1] * self.vae_scale, shape[2] * self.vae_scale);
            for (&i, img) in finished.iter().zip(images) {
                if let Some(r) = results[i].as_mut() {
                    r.output.image = Some(to_rgb8(&img, h, w));
                }
            }
        }
        results.into_iter().enumerate().map(|(i, r)| r.ok_or_else(|| format!("job {i} had no step left"))).collect()
    }

    /// The images of `jobs` before 8-bit rounding, `[3, H, W]` in [0, 1] (parity tests).
    pub fn decode_jobs(&self, jobs: &[&ImageJob<B>]) -> Result<Vec<Vec<f32>>, String> {
        let Some(first) = jobs.first() else { return Ok(Vec::new()) };
        if jobs.iter().any(|j| j.shape != first.shape) {
            return Err("jobs of one decode must share a shape".into());
        }
        let lat: Vec<&[f32]> = jobs.iter().map(|j| j.latents.as_slice()).collect();
        self.decode(first.shape, &lat)
    }
}

fn engine_step<B: Backend>(
    p: &DiffusionPipeline<B>,
    info: &DiffusionInfo,
    seqs: &mut Seqs<B>,
    plan: StepPlan<ImageRequest>,
    limit: &dyn Fn([usize; 3]) -> usize,
) -> Result<Vec<SeqOutput<ImageOutput>>, EngineError> {
    for id in &plan.released {
        seqs.remove(id);
    }
    let mut outputs = Vec::new();
    for (id, req) in plan.new {
        match p.start_job(info, &req, Box::new(NoiseRng::new(req.seed))) {
            Ok(job) => {
                seqs.insert(id, job);
            }
            Err(e) => {
                tracing::warn!(seq = id, error = %e, "image request refused by the engine");
                outputs.push(SeqOutput {
                    id,
                    output: ImageOutput { step: 0, total: 0, timestep: 0.0, preview: None, image: None },
                    finished: Some(FinishReason::Error),
                });
            }
        }
    }
    let scheduled: std::collections::HashSet<SeqId> = plan.seqs.iter().filter(|s| s.sample).map(|s| s.id).collect();
    // In arrival order (ids grow), so a batch's composition is reproducible.
    let mut pairs: Vec<(SeqId, &mut ImageJob<B>)> =
        seqs.iter_mut().filter(|(id, _)| scheduled.contains(id)).map(|(id, j)| (*id, j)).collect();
    pairs.sort_by_key(|(id, _)| *id);
    let (ids, mut jobs): (Vec<SeqId>, Vec<&mut ImageJob<B>>) = pairs.into_iter().unzip();
    let steps = p.step_jobs(&mut jobs, limit).map_err(EngineError::Step)?;
    for (id, st) in ids.into_iter().zip(steps) {
        if st.finished {
            seqs.remove(&id);
        }
        outputs.push(SeqOutput { id, output: st.output, finished: st.finished.then_some(FinishReason::Stop) });
    }
    Ok(outputs)
}

impl Engine for DiffusionEngine {
    type Request = ImageRequest;
    type Output = ImageOutput;

    fn spec(&self) -> EngineSpec {
        self.spec.clone()
    }

    fn step(&mut self, plan: StepPlan<ImageRequest>) -> Result<Vec<SeqOutput<ImageOutput>>, EngineError> {
        let (info, budget, dtype) = (&self.info, self.budget, self.opts.dtype);
        let limit = move |shape: [usize; 3]| batch_limit(info, shape, budget, dtype);
        match &mut self.inner {
            Inner::Flex(p, seqs) => engine_step(p, info, seqs, plan, &limit),
            #[cfg(feature = "cuda")]
            Inner::Cuda(p, seqs, _) => engine_step(p, info, seqs, plan, &limit),
        }
    }

    /// Runs one guided UNet step over `max_batch_images` images of the largest size and
    /// their VAE decode, measuring the workspace (peak RSS growth on the CPU, the CUDA pool's growth).
    fn warmup(&mut self) -> Result<(), EngineError> {
        if !self.opts.warmup {
            return Ok(());
        }
        let side = largest_side(&self.info, self.opts.max_pixels);
        let probe = match self.inner {
            Inner::Flex(..) => crate::memory::PeakProbe::start(),
            #[cfg(feature = "cuda")]
            Inner::Cuda(..) => None,
        };
        #[cfg(feature = "cuda")]
        let cuda_before = match self.inner {
            Inner::Cuda(_, _, n) => crate::engine::cuda_reserved_bytes(n).map(|b| (n, b)),
            _ => None,
        };
        let req = ImageRequest {
            prompt_ids: vec![0; self.info.text_length],
            negative_ids: vec![0; self.info.text_length],
            width: side,
            height: side,
            steps: 1,
            guidance_scale: 2.0,
            scheduler: Some("ddim".into()),
            seed: 0,
            init_image: None,
            preview_every: 0,
        };
        let n = self.opts.max_batch_images.clamp(1, self.spec.max_running) as u64;
        let plan = || StepPlan {
            new: (0..n).map(|i| (u64::MAX - i, req.clone())).collect(),
            released: Vec::new(),
            seqs: (0..n)
                .map(|i| kiln_actors::ScheduledSeq {
                    id: u64::MAX - i,
                    start: 0,
                    len: 1,
                    block_table: vec![],
                    sample: true,
                })
                .collect(),
        };
        let out = self.step(plan())?;
        if out.iter().any(|o| o.finished == Some(FinishReason::Error)) {
            return Err(EngineError::Load(format!("the warm-up image ({side}x{side}) was refused")));
        }
        if let Some(p) = probe {
            self.activation_peak = p.finish();
        }
        #[cfg(feature = "cuda")]
        if let Some((n, before)) = cuda_before {
            if let Some(after) = crate::engine::cuda_reserved_bytes(n) {
                self.activation_peak = after.saturating_sub(before);
            }
        }
        Ok(())
    }

    fn memory(&self) -> MemoryBytes {
        MemoryBytes { weights: self.info.weights_bytes(self.opts.dtype), kv: 0, activations: self.activation_peak }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_standard_normal_and_seeded() {
        let a = NoiseRng::new(7).normals(20000);
        let b = NoiseRng::new(7).normals(20000);
        assert_eq!(a, b);
        assert_ne!(a, NoiseRng::new(8).normals(20000));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
    }

    #[test]
    fn scheduler_names_parse() {
        let base = SchedulerConfig::from_value(&serde_json::json!({"_class_name": "PNDMScheduler"})).unwrap();
        for name in scheduler_names() {
            let c = scheduler_config(&base, Some(&name)).unwrap();
            assert_eq!(c.use_karras_sigmas, name.ends_with("karras"), "{name}");
        }
        assert!(scheduler_config(&base, Some("ddim_karras")).is_err());
        assert!(scheduler_config(&base, Some("heun")).is_err());
        assert_eq!(scheduler_config(&base, None).unwrap(), base);
    }

    #[test]
    fn rgb_round_trip() {
        let img = RgbImage { width: 2, height: 1, data: vec![0, 128, 255, 10, 20, 30] };
        let chw = from_rgb8(&img);
        let back: Vec<f32> = chw.iter().map(|x| x / 2.0 + 0.5).collect();
        assert_eq!(to_rgb8(&back, 1, 2), img);
    }
}
