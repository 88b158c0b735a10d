//! Qwen3-TTS's 12 Hz speech-tokenizer decoder (`Qwen3TTSTokenizerV2Decoder`, the `decoder.*`
//! tensors of a `speech_tokenizer/` folder) in Burn: codec frames (16 codes each) to a 24 kHz
//! waveform, `decode_upsample_rate` (1920) samples per frame.
//!
//! 1. Dequantisation (`SplitResidualVectorQuantizer`): `rvq_first` (codebook 0, semantic) and
//!    `rvq_rest` (codebooks 1..). Each codebook's table is `embedding_sum / clamp(cluster_usage,
//!    1e-5)`; the looked-up vectors are summed within each RVQ, projected by its `output_proj`
//!    (1x1 conv, no bias) and the two results added.
//! 2. `pre_conv`: causal conv k=3.
//! 3. `pre_transformer`: `input_proj`, pre-norm layers (RMSNorm, attention without q/k norm,
//!    RoPE over `head_dim`, a sliding-window causal mask where query `t` sees keys
//!    `t - W + 1 ..= t`; SwiGLU MLP; LayerScale on both residual branches), final norm,
//!    `output_proj`.
//! 4. `upsample`: per ratio a causal transposed conv (k = stride = ratio) and a ConvNeXt block
//!    (depthwise causal conv k=7, LayerNorm eps 1e-6, Linear x4, erf GELU, Linear, `gamma`,
//!    residual).
//! 5. The vocoder: causal conv k=7, per rate `u` a block (SnakeBeta, causal transposed conv
//!    k=2u stride u halving the channels, residual units with dilations 1, 3, 9), SnakeBeta,
//!    causal conv k=7 to one channel, clamped to [-1, 1].
//!
//! Causal convs pad `(k - 1) * dilation` zeros on the left; causal transposed convs drop the
//! last `k - stride` outputs. SnakeBeta stores alpha and beta in log space:
//! `x + sin²(eᵅ·x) / (eᵝ + 1e-9)`.
//!
//! Streaming, two ways:
//! - [`TtsDecoder::push`] with a [`TtsDecoderState`]: every causal conv keeps its last input
//!   columns, every transformer layer the K/V of the last `sliding_window - 1` frames, and RoPE
//!   positions continue, so each frame is computed once and the concatenated output equals
//!   the full decode (up to rounding). [`TtsDecoder::push_batch`] pushes several streams'
//!   frames at once.
//! - [`TtsChunkedDecoder`]: upstream's `chunked_decode` scheme, each chunk decoded again
//!   together with the [`TtsDecoder::left_context`] frames before it (the exact receptive field
//!   of every causal stage: 18 frames for the test fixture, 580 for the real 12 Hz decoder)
//!   whose samples are dropped. Exact too, but it recomputes the context for every chunk.
//!
//! Two implementations of the streaming decode:
//! - the tensor path, generic Burn ops (`conv1d`, `conv_transpose1d`, ...), for every backend
//!   and dtype; [`TtsDecoder::push_batch`] pushes the streams one after another there;
//! - the host path, on Flex in f32 (the default there, see [`TtsDecoder::host_path`]): the
//!   convolutions and SnakeBeta run on the host buffers (see "host f32 path" below), the
//!   streams of a [`TtsDecoder::push_batch`] go through every stage together (their columns
//!   side by side, so the weights are read once for all of them; the transformer's rows each
//!   at their own RoPE position, attending over their own K/V), and the vocoder blocks run
//!   depth first in pieces of a few frames so that their activations stay in cache. It keeps
//!   the transposed convs' weights in its own layout.

use std::cell::RefCell;
use std::path::Path;
use std::time::{Duration, Instant};

use burn::tensor::activation::{gelu, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::{conv1d, conv_transpose1d};
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions};
use burn::tensor::{DType as BurnDType, Int, Tensor, TensorData};
use serde_json::Value;

use crate::bert::LayerNorm;
use crate::qwen2::{Linear, RmsNorm};
use crate::unet::parse_err;
use crate::weights::{tensor_from_f32, WeightStore};
use crate::{DType, LoadError};

/// ConvNeXt LayerNorm eps (hard-coded upstream).
const CONVNEXT_EPS: f64 = 1e-6;
/// `EuclideanCodebook.epsilon`: the floor of `cluster_usage`.
const CODEBOOK_EPS: f32 = 1e-5;
/// SnakeBeta's `no_div_by_zero`.
const SNAKE_EPS: f32 = 1e-9;
/// Kernel of the vocoder's causal convs (hard-coded upstream).
const VOCODER_KERNEL: usize = 7;
/// Dilations of the three residual units of each vocoder block (hard-coded upstream).
const DILATIONS: [usize; 3] = [1, 3, 9];
/// Frames per push of [`TtsDecoder::decode`] (upstream's `chunk_size`).
pub const DECODE_CHUNK_FRAMES: usize = 300;

/// The fields of a `qwen3_tts_tokenizer_12hz` `config.json` the decoder reads (top level
/// `decode_upsample_rate`, `output_sample_rate` and `decoder_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct TtsDecoderConfig {
    pub codebook_size: usize,
    pub codebook_dim: usize,
    pub latent_dim: usize,
    pub decoder_dim: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub sliding_window: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub num_quantizers: usize,
    pub upsample_rates: Vec<usize>,
    pub upsampling_ratios: Vec<usize>,
    pub attention_bias: bool,
    pub output_sample_rate: usize,
}

impl TtsDecoderConfig {
    /// Reads `dir/config.json` (a `speech_tokenizer/` folder).
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("config.json");
        let v = crate::config::read_json(&path)?;
        Self::from_value(&v).map_err(|m| parse_err(&path, "speech tokenizer config", m))
    }

    pub fn from_value(v: &Value) -> Result<Self, String> {
        match &v["model_type"] {
            Value::Null => {}
            t if t == "qwen3_tts_tokenizer_12hz" => {}
            t => return Err(format!("model_type {t} is not supported (expected \"qwen3_tts_tokenizer_12hz\")")),
        }
        let d = &v["decoder_config"];
        if !d.is_object() {
            return Err("missing decoder_config".into());
        }
        let uint_in = |obj: &Value, k: &str, default: usize| -> Result<usize, String> {
            match &obj[k] {
                Value::Null => Ok(default),
                x => x.as_u64().map(|x| x as usize).ok_or_else(|| format!("invalid {k}: {x}")),
            }
        };
        let uint = |k: &str, default: usize| uint_in(d, k, default);
        let float = |k: &str, default: f64| -> Result<f64, String> {
            match &d[k] {
                Value::Null => Ok(default),
                x => x.as_f64().ok_or_else(|| format!("invalid {k}: {x}")),
            }
        };
        let list = |k: &str, default: &[usize]| -> Result<Vec<usize>, String> {
            match &d[k] {
                Value::Null => Ok(default.to_vec()),
                Value::Array(a) => a
                    .iter()
                    .map(|x| match x.as_u64() {
                        Some(x) if x > 0 => Ok(x as usize),
                        _ => Err(format!("invalid {k}: {x}")),
                    })
                    .collect(),
                x => Err(format!("invalid {k}: {x}")),
            }
        };
        match &d["hidden_act"] {
            Value::Null => {}
            a if a == "silu" => {}
            a => return Err(format!("decoder_config.hidden_act {a} is not supported (only silu)")),
        }
        match &d["rope_scaling"] {
            Value::Null => {}
            s if s["rope_type"] == "default" || s["type"] == "default" => {}
            s => return Err(format!("decoder_config.rope_scaling {s} is not supported")),
        }
        let heads = uint("num_attention_heads", 16)?;
        let hidden = uint("hidden_size", 1024)?;
        if heads == 0 {
            return Err("num_attention_heads is 0".into());
        }
        let cfg = TtsDecoderConfig {
            codebook_size: uint("codebook_size", 2048)?,
            codebook_dim: uint("codebook_dim", 512)?,
            latent_dim: uint("latent_dim", 1024)?,
            decoder_dim: uint("decoder_dim", 1536)?,
            hidden_size: hidden,
            intermediate_size: uint("intermediate_size", 3072)?,
            num_hidden_layers: uint("num_hidden_layers", 8)?,
            num_attention_heads: heads,
            num_key_value_heads: uint("num_key_value_heads", 16)?,
            head_dim: uint("head_dim", hidden / heads)?,
            sliding_window: uint("sliding_window", 72)?,
            rms_norm_eps: float("rms_norm_eps", 1e-5)?,
            rope_theta: float("rope_theta", 10000.0)?,
            num_quantizers: uint("num_quantizers", 16)?,
            upsample_rates: list("upsample_rates", &[8, 5, 4, 3])?,
            upsampling_ratios: list("upsampling_ratios", &[2, 2])?,
            attention_bias: match &d["attention_bias"] {
                Value::Null => false,
                x => x.as_bool().ok_or_else(|| format!("invalid attention_bias: {x}"))?,
            },
            output_sample_rate: uint_in(v, "output_sample_rate", 24000)?,
        };
        let kvh = cfg.num_key_value_heads;
        if kvh == 0 || !heads.is_multiple_of(kvh) {
            return Err(format!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kvh}"));
        }
        if cfg.head_dim == 0 || !cfg.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even (RoPE)", cfg.head_dim));
        }
        if cfg.num_quantizers < 2 {
            return Err(format!("num_quantizers {} < 2 (one semantic + acoustic codebooks)", cfg.num_quantizers));
        }
        if cfg.codebook_dim == 0 || !cfg.codebook_dim.is_multiple_of(2) {
            return Err(format!("codebook_dim {} must be even", cfg.codebook_dim));
        }
        if cfg.sliding_window == 0 {
            return Err("sliding_window 0 is not supported".into());
        }
        let n = cfg.upsample_rates.len();
        if n >= usize::BITS as usize || cfg.decoder_dim == 0 || !cfg.decoder_dim.is_multiple_of(1 << n) {
            return Err(format!("decoder_dim {} does not halve {n} times", cfg.decoder_dim));
        }
        for (k, x) in [
            ("codebook_size", cfg.codebook_size),
            ("latent_dim", cfg.latent_dim),
            ("hidden_size", cfg.hidden_size),
            ("intermediate_size", cfg.intermediate_size),
        ] {
            if x == 0 {
                return Err(format!("{k} is 0"));
            }
        }
        let rate = cfg.samples_per_frame();
        match &v["decode_upsample_rate"] {
            Value::Null => {}
            x if x.as_u64() == Some(rate as u64) => {}
            x => {
                return Err(format!(
                    "decode_upsample_rate {x} differs from the product of upsample_rates and upsampling_ratios ({rate})"
                ))
            }
        }
        Ok(cfg)
    }

    /// Waveform samples per codec frame: the product of `upsampling_ratios` and `upsample_rates`.
    pub fn samples_per_frame(&self) -> usize {
        self.upsampling_ratios.iter().chain(&self.upsample_rates).product()
    }

    /// Earlier frames a chunk must be decoded with so that its samples equal the full decode's:
    /// walks back from the first sample of a frame through every causal stage
    /// (`decoder_left_context` of tools/oracle/make_tts_fixtures.py).
    pub fn left_context(&self) -> usize {
        let big: i64 = 1_000_000;
        let k = (VOCODER_KERNEL - 1) as i64;
        let mut s = big * self.samples_per_frame() as i64;
        s -= k; // final causal conv
        for &u in self.upsample_rates.iter().rev() {
            for &d in DILATIONS.iter().rev() {
                s -= k * d as i64;
            }
            // transposed conv k=2u stride u: inputs floor(s/u) and floor(s/u) - 1
            s = s.div_euclid(u as i64) - 1;
        }
        s -= k; // decoder[0]
        for &f in self.upsampling_ratios.iter().rev() {
            s -= 6; // ConvNeXt depthwise causal conv k=7
            s = s.div_euclid(f as i64); // transposed conv k = stride = f
        }
        s -= (self.num_hidden_layers * self.sliding_window.saturating_sub(1)) as i64;
        s -= 2; // pre_conv k=3
        (big - s) as usize
    }
}

// --- profiling -------------------------------------------------------------------------------

thread_local! {
    /// Time per stage name while [`profile`] runs on this thread (None otherwise).
    static PROFILE: RefCell<Option<Vec<(String, Duration)>>> = const { RefCell::new(None) };
}

/// Runs `f` with stage timing on: returns its result and the wall time of every decoder stage
/// it ran, summed per stage name, in first-seen order. Stages are timed where they run, so
/// on an asynchronous backend the times are launch times, not kernel times.
pub fn profile<R>(f: impl FnOnce() -> R) -> (R, Vec<(String, Duration)>) {
    let prev = PROFILE.with(|p| p.borrow_mut().replace(Vec::new()));
    let r = f();
    let times = PROFILE.with(|p| std::mem::replace(&mut *p.borrow_mut(), prev)).unwrap_or_default();
    (r, times)
}

/// Runs `f`, adding its wall time to stage `name()` when [`profile`] is on.
fn timed<R>(name: impl FnOnce() -> String, f: impl FnOnce() -> R) -> R {
    if !PROFILE.with(|p| p.borrow().is_some()) {
        return f();
    }
    let t0 = Instant::now();
    let r = f();
    let dt = t0.elapsed();
    let name = name();
    PROFILE.with(|p| {
        if let Some(v) = p.borrow_mut().as_mut() {
            match v.iter_mut().find(|(n, _)| *n == name) {
                Some((_, d)) => *d += dt,
                None => v.push((name, dt)),
            }
        }
    });
    r
}

// --- weights ---------------------------------------------------------------------------------

fn weight_err(name: &str, message: impl Into<String>) -> LoadError {
    LoadError::Weight { name: name.to_string(), message: message.into() }
}

/// `model.safetensors` of a `speech_tokenizer/` folder; names are relative to `decoder.`.
pub struct DecoderWeights {
    store: WeightStore,
}

impl DecoderWeights {
    /// Opens `dir/model.safetensors` (or its sharded index).
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        Ok(DecoderWeights { store: WeightStore::open(dir)? })
    }

    fn name(p: &str) -> String {
        format!("decoder.{p}")
    }

    fn load<B: Backend, const D: usize>(
        &self,
        name: &str,
        expected: [usize; D],
        device: &B::Device,
        dtype: DType,
    ) -> Result<Tensor<B, D>, LoadError> {
        self.store.load(&Self::name(name), expected, false, device, dtype)
    }

    /// f32 host values of `name`, checking the shape.
    fn read(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        let full = Self::name(name);
        let (v, shape) = self.store.read_f32(&full)?;
        if shape != expected {
            return Err(weight_err(&full, format!("shape {shape:?}, expected {expected:?}")));
        }
        Ok(v)
    }

    fn linear<B: Backend>(
        &self,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Linear<B>, LoadError> {
        let w = self.store.load::<B, 2>(&Self::name(&format!("{name}.weight")), [out, inp], true, device, dtype)?;
        let b = if bias { Some(self.load::<B, 1>(&format!("{name}.bias"), [out], device, dtype)?) } else { None };
        Ok(Linear { w, b })
    }

    /// `{name}.conv.weight` `[out, inp / groups, k]` and `{name}.conv.bias`, as a causal conv.
    #[allow(clippy::too_many_arguments)]
    fn causal_conv<B: Backend>(
        &self,
        name: &str,
        out: usize,
        inp: usize,
        kernel: usize,
        dilation: usize,
        groups: usize,
        device: &B::Device,
        dtype: DType,
    ) -> Result<CausalConv1d<B>, LoadError> {
        let w_name = format!("{name}.conv.weight");
        let b_name = format!("{name}.conv.bias");
        let (cpg, k) = (inp / groups, kernel);
        let w = self.load::<B, 3>(&w_name, [out, cpg, k], device, dtype)?;
        // Depthwise: the host path reads `[C, k]` host values.
        let w_host = if groups > 1 { self.read(&w_name, &[out, cpg, k])? } else { Vec::new() };
        Ok(CausalConv1d {
            w,
            b: self.load::<B, 1>(&b_name, [out], device, dtype)?,
            dilation,
            groups,
            pad: (kernel - 1) * dilation,
            b_host: self.read(&b_name, &[out])?,
            w_host,
        })
    }

    /// `{name}.conv.weight` `[inp, out, k]` and `{name}.conv.bias`, as a causal transposed conv
    /// (stored for the host path when `host`).
    #[allow(clippy::too_many_arguments)]
    fn causal_trans_conv<B: Backend>(
        &self,
        name: &str,
        inp: usize,
        out: usize,
        kernel: usize,
        stride: usize,
        host: bool,
        device: &B::Device,
        dtype: DType,
    ) -> Result<CausalTransConv1d<B>, LoadError> {
        let w_name = format!("{name}.conv.weight");
        let b_name = format!("{name}.conv.bias");
        let w = if host {
            // The host path's layout: `[out, k, in]`, so that its matmul reads the weights as
            // a row-major `[out · k, in]` (twice as fast as the transposed `[in, out · k]`
            // when few columns go through); the tensor path sees the `[in, out, k]` view.
            let k = kernel;
            let v = self.read(&w_name, &[inp, out, k])?;
            let mut t = vec![0f32; v.len()];
            for (c, w) in v.chunks_exact(out * k).enumerate() {
                for (ok, &w) in w.iter().enumerate() {
                    t[ok * inp + c] = w;
                }
            }
            tensor_from_f32::<B, 3>(t, vec![out, k, inp], device, dtype).permute([2, 0, 1])
        } else {
            self.load::<B, 3>(&w_name, [inp, out, kernel], device, dtype)?
        };
        Ok(CausalTransConv1d {
            w,
            b: self.load::<B, 1>(&b_name, [out], device, dtype)?,
            stride,
            b_host: self.read(&b_name, &[out])?,
        })
    }

    fn snake<B: Backend>(
        &self,
        name: &str,
        c: usize,
        device: &B::Device,
        dtype: DType,
    ) -> Result<SnakeBeta<B>, LoadError> {
        let alpha: Vec<f32> = self.read(&format!("{name}.alpha"), &[c])?.into_iter().map(f32::exp).collect();
        let inv_beta: Vec<f32> =
            self.read(&format!("{name}.beta"), &[c])?.into_iter().map(|b| 1.0 / (b.exp() + SNAKE_EPS)).collect();
        Ok(SnakeBeta {
            alpha: tensor_from_f32(alpha.clone(), vec![1, c, 1], device, dtype),
            inv_beta: tensor_from_f32(inv_beta.clone(), vec![1, c, 1], device, dtype),
            alpha_host: alpha,
            inv_beta_host: inv_beta,
        })
    }
}

// --- host f32 path ----------------------------------------------------------------------------
//
// On Flex in f32 the streaming decode runs on host buffers: activations are row-major
// `[C, N]` `Vec<f32>`s whose `N` columns are the time steps of one or more streams side by
// side (see [`Cols`]). A causal conv is one matmul of its weights (`[out, in · k]`, the loaded
// tensor reshaped, no copy) by the input's shifted copies stacked by rows (im2col, with the
// stream's kept columns in front and the SnakeBeta before it applied on the way), a
// transposed conv one matmul of its weights (stored `[out · k, in]`) and an overlap-add that
// carries each stream's unfinished outputs to its next push, SnakeBeta one vectorised pass.
// The weights are the matmul's row-major left operand, which `gemm` streams fastest when few
// columns go through. Matmuls go through Burn (Flex hands the buffers to `gemm` without
// copies); the transformer and the ConvNeXt MLPs stay tensor code.

/// Whether `B` keeps its tensors in host memory (Flex), where the host path works on their
/// buffers without copies.
fn on_host<B: Backend>() -> bool {
    #[cfg(feature = "flex")]
    {
        std::any::TypeId::of::<B>() == std::any::TypeId::of::<burn::backend::Flex>()
    }
    #[cfg(not(feature = "flex"))]
    {
        false
    }
}

/// Time steps of a batch of streams in a host activation `[C, N]`: `(stream, len)` pairs,
/// streams ascending, each owning `len` columns after those of the pairs before it.
#[derive(Clone, Debug)]
struct Cols(Vec<(usize, usize)>);

impl Cols {
    fn n(&self) -> usize {
        self.0.iter().map(|&(_, l)| l).sum()
    }

    fn max(&self) -> usize {
        self.0.iter().map(|&(_, l)| l).max().unwrap_or(0)
    }

    /// Every stream's steps times `r` (after an upsampling stage).
    fn scaled(&self, r: usize) -> Cols {
        Cols(self.0.iter().map(|&(s, l)| (s, l * r)).collect())
    }

    /// `(first column, columns)` of each stream.
    fn segs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.0.iter().scan(0, |off, &(_, len)| {
            let o = *off;
            *off += len;
            Some((o, len))
        })
    }

    /// Splits the columns into pieces of at most `budget` columns, in order (a stream's
    /// columns in time order, possibly across pieces): each piece's steps and the
    /// `(first column, columns)` ranges of `self` it takes.
    fn pieces(&self, budget: usize) -> Vec<(Cols, Vec<(usize, usize)>)> {
        let budget = budget.max(1);
        let mut out = Vec::new();
        let (mut cur, mut ranges, mut room) = (Vec::new(), Vec::new(), budget);
        for (&(stream, len), (off, _)) in self.0.iter().zip(self.segs()) {
            let mut done = 0;
            while done < len {
                let m = (len - done).min(room);
                cur.push((stream, m));
                ranges.push((off + done, m));
                done += m;
                room -= m;
                if room == 0 {
                    out.push((Cols(std::mem::take(&mut cur)), std::mem::take(&mut ranges)));
                    room = budget;
                }
            }
        }
        if !cur.is_empty() {
            out.push((Cols(cur), ranges));
        }
        out
    }
}

/// Columns `ranges` of the host `[C, n]` `x`, side by side.
fn gather_cols(x: &[f32], n: usize, ranges: &[(usize, usize)]) -> Vec<f32> {
    let m: usize = ranges.iter().map(|&(_, l)| l).sum();
    let mut y = Vec::with_capacity(x.len() / n * m);
    for row in x.chunks_exact(n) {
        for &(off, len) in ranges {
            y.extend_from_slice(&row[off..off + len]);
        }
    }
    y
}

fn host_tensor<B: Backend>(v: Vec<f32>, shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(v, shape), (device, BurnDType::F32))
}

/// The f32 values of `t` in row-major order (no copy on Flex when `t` is contiguous and
/// unshared).
fn host_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().expect("f32 activations")
}

/// `w` `[m, k]` times the host matrix `x` `[k, n]`: `[m, n]`.
fn matmul_host<B: Backend>(w: Tensor<B, 2>, x: Vec<f32>, n: usize) -> Vec<f32> {
    let (k, device) = (w.dims()[1], w.device());
    host_vec(w.matmul(host_tensor::<B>(x, [k, n], &device)))
}

/// `y[c, :] += b[c]` over `[C, n]`.
fn add_rows(y: &mut [f32], n: usize, b: &[f32]) {
    for (row, &b) in y.chunks_exact_mut(n).zip(b) {
        row.iter_mut().for_each(|v| *v += b);
    }
}

/// A stream's input row with its kept columns in front: `state` (`pad` columns) then `x`
/// (`len` columns), into `p`; the last `pad` of them become the new `state`.
#[inline]
fn pad_row(p: &mut [f32], state: &mut [f32], x: &[f32]) {
    let pad = state.len();
    p[..pad].copy_from_slice(state);
    p[pad..pad + x.len()].copy_from_slice(x);
    state.copy_from_slice(&p[x.len()..x.len() + pad]);
}

/// `|alpha · x|` up to which [`snake_fast`]'s range reduction is exact (Cephes' `sinf` bound).
const SNAKE_FAST_LIMIT: f32 = 8192.0;

/// `x += inv_beta · sin²(alpha · x)` over a channel's row, branch-free so that it
/// vectorises: `y = alpha · x = n·π/2 + r` with `|r| <= π/4` (Cody–Waite, π/2 in three
/// parts), and `sin²(y)` is `sin²(r)` for even `n`, `cos²(r)` for odd, by Cephes'
/// `sinf`/`cosf` polynomials (about 1 ulp). Needs `|alpha · x| <=` [`SNAKE_FAST_LIMIT`].
#[inline(always)]
fn snake_fast(x: &mut [f32], alpha: f32, inv_beta: f32) {
    const TWO_OVER_PI: f32 = std::f32::consts::FRAC_2_PI;
    const P1: f32 = 1.570_312_5;
    const P2: f32 = 4.837_513e-4;
    const P3: f32 = 7.549_79e-8;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds to an integer
    for v in x.iter_mut() {
        let y = alpha * *v;
        // `k` holds the nearest integer `n` to `y·2/π` in its low mantissa bits.
        let k = y * TWO_OVER_PI + ROUND;
        let n = k - ROUND;
        let r = ((y - n * P1) - n * P2) - n * P3;
        let z = r * r;
        let s = r + r * z * (-1.666_665_5e-1 + z * (8.332_161e-3 + z * -1.951_529_6e-4));
        let c = 1.0 - 0.5 * z + z * z * (4.166_664_6e-2 + z * (-1.388_731_6e-3 + z * 2.443_315_7e-5));
        let t = if k.to_bits() & 1 == 0 { s } else { c };
        *v += inv_beta * (t * t);
    }
}

/// SnakeBeta over the rows of `x` `[C, n]` in place (row `c` with `alpha[c]`,
/// `inv_beta[c]`); a row with an `|alpha · x|` past [`SNAKE_FAST_LIMIT`] takes `f32::sin`.
#[inline(always)]
fn snake_rows_generic(x: &mut [f32], n: usize, alpha: &[f32], inv_beta: &[f32]) {
    for ((row, &a), &ib) in x.chunks_exact_mut(n).zip(alpha).zip(inv_beta) {
        // The largest |x| by its bits (ordered like the values; NaN above everything).
        let max = f32::from_bits(row.iter().fold(0u32, |m, &v| m.max(v.to_bits() & 0x7fff_ffff)));
        if a.abs() * max <= SNAKE_FAST_LIMIT {
            snake_fast(row, a, ib);
        } else {
            for v in row.iter_mut() {
                let s = (a * *v).sin();
                *v += ib * (s * s);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn snake_rows_avx512(x: &mut [f32], n: usize, alpha: &[f32], inv_beta: &[f32]) {
    snake_rows_generic(x, n, alpha, inv_beta)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn snake_rows_avx2(x: &mut [f32], n: usize, alpha: &[f32], inv_beta: &[f32]) {
    snake_rows_generic(x, n, alpha, inv_beta)
}

/// [`snake_rows_generic`] compiled for the widest vectors the CPU has.
fn snake_rows(x: &mut [f32], n: usize, alpha: &[f32], inv_beta: &[f32]) {
    if n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { snake_rows_avx512(x, n, alpha, inv_beta) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { snake_rows_avx2(x, n, alpha, inv_beta) };
        }
    }
    snake_rows_generic(x, n, alpha, inv_beta)
}

/// The states of one stage of the streams of `cols`, taken from all streams' host states.
fn stage<'a>(states: &'a mut [&mut Vec<Vec<f32>>], i: usize, cols: &Cols) -> Vec<&'a mut Vec<f32>> {
    let mut streams = cols.0.iter().map(|&(s, _)| s).peekable();
    let picked: Vec<_> = states
        .iter_mut()
        .enumerate()
        .filter_map(|(k, st)| (streams.next_if_eq(&k).is_some()).then(|| &mut st[i]))
        .collect();
    debug_assert_eq!(picked.len(), cols.0.len(), "streams ascending");
    picked
}

// --- layers ----------------------------------------------------------------------------------

/// `Conv1d` over `[B, C, T]` with `(k - 1) * dilation` zeros padded on the left.
pub struct CausalConv1d<B: Backend> {
    /// `[out, in / groups, k]`.
    pub w: Tensor<B, 3>,
    pub b: Tensor<B, 1>,
    pub dilation: usize,
    pub groups: usize,
    pub pad: usize,
    /// The bias on the host.
    pub b_host: Vec<f32>,
    /// Depthwise convs (`groups > 1`) only: the weights on the host, `[out, 1, k]`.
    pub w_host: Vec<f32>,
}

impl<B: Backend> CausalConv1d<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // Zeros of the activation dtype concatenated (Flex's `pad` makes f32 zeros).
        let x = if self.pad > 0 {
            let [b, c, _] = x.dims();
            let zeros = Tensor::<B, 3>::zeros([b, c, self.pad], (&x.device(), x.dtype()));
            Tensor::cat(vec![zeros, x], 2)
        } else {
            x
        };
        let opts = ConvOptions::new([1], [0], [self.dilation], self.groups);
        conv1d(x, self.w.clone(), Some(self.b.clone()), opts)
    }

    /// Streaming state: the last `pad` input columns, zeros at the start (None when `pad` is 0).
    fn init_state(&self, device: &B::Device, dtype: DType) -> ConvState<B> {
        let c = self.w.dims()[1] * self.groups;
        (self.pad > 0).then(|| tensor_from_f32(vec![0.0; c * self.pad], vec![1, c, self.pad], device, dtype))
    }

    /// `forward` of the next columns of a stream: the state replaces the zero padding.
    fn forward_stream(&self, x: Tensor<B, 3>, state: &mut ConvState<B>) -> Tensor<B, 3> {
        let Some(prev) = state.take() else { return self.forward(x) };
        let x = Tensor::cat(vec![prev, x], 2);
        let len = x.dims()[2];
        *state = Some(x.clone().narrow(2, len - self.pad, self.pad));
        let opts = ConvOptions::new([1], [0], [self.dilation], self.groups);
        conv1d(x, self.w.clone(), Some(self.b.clone()), opts)
    }
}

/// The input columns a causal (transposed) conv keeps between chunks of a stream.
type ConvState<B> = Option<Tensor<B, 3>>;

impl<B: Backend> CausalConv1d<B> {
    /// Host-path state size: the last `pad` input columns, `[C_in, pad]`.
    fn host_state_len(&self) -> usize {
        self.w.dims()[1] * self.groups * self.pad
    }

    /// Host [`Self::forward_stream`] of a batch of streams: `x` `[C_in, N]` over `cols`,
    /// `states[i]` stream `i`'s last `pad` input columns `[C_in, pad]` (updated). Returns
    /// `[C_out, N]`. Groups of 1 (one matmul over the stacked taps) or depthwise.
    fn forward_host(&self, x: Vec<f32>, cols: &Cols, states: &mut [&mut Vec<f32>]) -> Vec<f32> {
        if self.groups > 1 {
            return self.depthwise_host(&x, cols, states);
        }
        if self.w.dims()[2] > 1 {
            return self.stacked_host(&x, None, cols, states);
        }
        let [c_out, c_in, _] = self.w.dims();
        let n = cols.n();
        let mut y = matmul_host(self.w.clone().reshape([c_out, c_in]), x, n);
        add_rows(&mut y, n, &self.b_host);
        y
    }

    /// [`Self::forward_host`] of `act(x)`, the activation applied on the way (k > 1, groups 1).
    fn forward_host_act(&self, x: &[f32], act: &SnakeBeta<B>, cols: &Cols, states: &mut [&mut Vec<f32>]) -> Vec<f32> {
        self.stacked_host(x, Some(act), cols, states)
    }

    /// One matmul of the weights `[C_out, C_in · k]` by the stacked shifted inputs (im2col:
    /// row `c·k + j` holds input channel `c` shifted by tap `j`), written row after row.
    fn stacked_host(
        &self,
        x: &[f32],
        act: Option<&SnakeBeta<B>>,
        cols: &Cols,
        states: &mut [&mut Vec<f32>],
    ) -> Vec<f32> {
        let [c_out, c_in, k] = self.w.dims();
        let (n, pad, d) = (cols.n(), self.pad, self.dilation);
        let segs: Vec<(usize, usize)> = cols.segs().collect();
        // Per channel, every stream's kept columns then its (activated) new ones.
        let mut p = vec![0f32; n + segs.len() * pad];
        let mut col = Vec::with_capacity(c_in * k * n);
        for c in 0..c_in {
            let mut po = 0;
            for (&(off, len), st) in segs.iter().zip(states.iter_mut()) {
                let ps = &mut p[po..po + pad + len];
                ps[..pad].copy_from_slice(&st[c * pad..(c + 1) * pad]);
                ps[pad..].copy_from_slice(&x[c * n + off..c * n + off + len]);
                if let Some(act) = act {
                    act.row_host(&mut ps[pad..], c);
                }
                st[c * pad..(c + 1) * pad].copy_from_slice(&ps[len..]);
                po += pad + len;
            }
            for j in 0..k {
                let mut po = 0;
                for &(_, len) in &segs {
                    col.extend_from_slice(&p[po + j * d..po + j * d + len]);
                    po += pad + len;
                }
            }
        }
        let mut y = matmul_host(self.w.clone().reshape([c_out, c_in * k]), col, n);
        add_rows(&mut y, n, &self.b_host);
        y
    }

    /// Depthwise (`groups == C`) [`Self::forward_host`], directly.
    fn depthwise_host(&self, x: &[f32], cols: &Cols, states: &mut [&mut Vec<f32>]) -> Vec<f32> {
        let [ch, _, k] = self.w.dims();
        let (n, pad, d) = (cols.n(), self.pad, self.dilation);
        let mut y = vec![0f32; ch * n];
        let mut p = vec![0f32; pad + cols.max()];
        for ((off, len), st) in cols.segs().zip(states.iter_mut()) {
            for (c, st) in st.chunks_exact_mut(pad).enumerate() {
                pad_row(&mut p, st, &x[c * n + off..c * n + off + len]);
                let out = &mut y[c * n + off..c * n + off + len];
                out.fill(self.b_host[c]);
                for (j, &w) in self.w_host[c * k..(c + 1) * k].iter().enumerate() {
                    out.iter_mut().zip(&p[j * d..j * d + len]).for_each(|(o, &v)| *o += w * v);
                }
            }
        }
        y
    }
}

/// `ConvTranspose1d` over `[B, C, T]` whose last `k - stride` outputs are dropped: `T * stride`
/// samples out.
pub struct CausalTransConv1d<B: Backend> {
    /// `[in, out, k]`.
    pub w: Tensor<B, 3>,
    pub b: Tensor<B, 1>,
    pub stride: usize,
    /// The bias on the host.
    pub b_host: Vec<f32>,
}

impl<B: Backend> CausalTransConv1d<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let t = x.dims()[2];
        let opts = ConvTransposeOptions::new([self.stride], [0], [0], [1], 1);
        conv_transpose1d(x, self.w.clone(), Some(self.b.clone()), opts).narrow(2, 0, t * self.stride)
    }

    /// Earlier inputs an output column depends on: `ceil((k - stride) / stride)`.
    fn context(&self) -> usize {
        (self.w.dims()[2] - self.stride).div_ceil(self.stride)
    }

    /// Streaming state: the last [`Self::context`] input columns, zeros at the start (a zero
    /// input adds nothing; the bias is added once per output).
    fn init_state(&self, device: &B::Device, dtype: DType) -> ConvState<B> {
        let (c, p) = (self.w.dims()[0], self.context());
        (p > 0).then(|| tensor_from_f32(vec![0.0; c * p], vec![1, c, p], device, dtype))
    }

    /// `forward` of the next columns of a stream.
    fn forward_stream(&self, x: Tensor<B, 3>, state: &mut ConvState<B>) -> Tensor<B, 3> {
        let Some(prev) = state.take() else { return self.forward(x) };
        let (t, p) = (x.dims()[2], prev.dims()[2]);
        let x = Tensor::cat(vec![prev, x], 2);
        *state = Some(x.clone().narrow(2, t, p));
        let opts = ConvTransposeOptions::new([self.stride], [0], [0], [1], 1);
        conv_transpose1d(x, self.w.clone(), Some(self.b.clone()), opts).narrow(2, p * self.stride, t * self.stride)
    }
}

impl<B: Backend> CausalTransConv1d<B> {
    /// Host-path state size: the `k - stride` outputs past the last input's window that the
    /// next inputs complete, `[C_out, k - stride]` (without the bias).
    fn host_state_len(&self) -> usize {
        let [_, c_out, k] = self.w.dims();
        c_out * (k - self.stride)
    }

    /// Host [`Self::forward_stream`] of a batch of streams: `x` `[C_in, N]` over `cols`,
    /// returns `[C_out, N · stride]`. One matmul gives every input column's `k` outputs per
    /// channel; they are overlap-added, the first `k - stride` on top of what the stream's
    /// previous push left in `spills[i]`, the last `k - stride` kept there.
    fn forward_host(&self, x: Vec<f32>, cols: &Cols, spills: &mut [&mut Vec<f32>]) -> Vec<f32> {
        let [c_in, c_out, k] = self.w.dims();
        let (n, s) = (cols.n(), self.stride);
        let e = k - s;
        // [C_out · k, N]: row `o·k + j` is tap `j` of output channel `o` (the weights are
        // stored `[out, k, in]` for this, see `DecoderWeights::causal_trans_conv`).
        let z = matmul_host(self.w.clone().permute([1, 2, 0]).reshape([c_out * k, c_in]), x, n);
        let out_n = n * s;
        let mut y = vec![0f32; c_out * out_n];
        let mut acc = vec![0f32; cols.max() * s + e];
        for ((off, len), spill) in cols.segs().zip(spills.iter_mut()) {
            let acc = &mut acc[..len * s + e];
            for o in 0..c_out {
                acc[..e].copy_from_slice(&spill[o * e..(o + 1) * e]);
                acc[e..].fill(0.0);
                for j in 0..k {
                    let zr = &z[(o * k + j) * n + off..(o * k + j) * n + off + len];
                    for (a, &v) in acc[j..].iter_mut().step_by(s).zip(zr) {
                        *a += v;
                    }
                }
                let b = self.b_host[o];
                let dst = &mut y[o * out_n + off * s..o * out_n + (off + len) * s];
                dst.iter_mut().zip(&acc[..len * s]).for_each(|(d, &a)| *d = a + b);
                spill[o * e..(o + 1) * e].copy_from_slice(&acc[len * s..]);
            }
        }
        y
    }
}

/// `x + sin²(alpha·x) / beta` with `alpha = exp(α)` and `1 / (exp(β) + 1e-9)` precomputed.
pub struct SnakeBeta<B: Backend> {
    /// `[1, C, 1]`.
    pub alpha: Tensor<B, 3>,
    /// `[1, C, 1]`.
    pub inv_beta: Tensor<B, 3>,
    /// `alpha` and `inv_beta` on the host.
    pub alpha_host: Vec<f32>,
    pub inv_beta_host: Vec<f32>,
}

impl<B: Backend> SnakeBeta<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let s = (x.clone() * self.alpha.clone()).sin();
        x + s.square() * self.inv_beta.clone()
    }

    /// In place over the host `[C, n]`.
    fn forward_host(&self, x: &mut [f32], n: usize) {
        snake_rows(x, n, &self.alpha_host, &self.inv_beta_host);
    }

    /// In place over a row of channel `c`.
    fn row_host(&self, x: &mut [f32], c: usize) {
        snake_rows(x, x.len(), &self.alpha_host[c..=c], &self.inv_beta_host[c..=c]);
    }
}

/// ConvNeXt block: depthwise causal conv k=7, LayerNorm, Linear ×4, GELU (erf), Linear,
/// `gamma`, residual.
pub struct ConvNeXtBlock<B: Backend> {
    pub dwconv: CausalConv1d<B>,
    pub norm: LayerNorm<B>,
    pub pwconv1: Linear<B>,
    pub pwconv2: Linear<B>,
    pub gamma: Tensor<B, 1>,
}

impl<B: Backend> ConvNeXtBlock<B> {
    fn load(st: &DecoderWeights, p: &str, dim: usize, device: &B::Device, dtype: DType) -> Result<Self, LoadError> {
        Ok(ConvNeXtBlock {
            dwconv: st.causal_conv(&format!("{p}.dwconv"), dim, dim, 7, 1, dim, device, dtype)?,
            norm: LayerNorm {
                w: st.load::<B, 1>(&format!("{p}.norm.weight"), [dim], device, dtype)?,
                b: st.load::<B, 1>(&format!("{p}.norm.bias"), [dim], device, dtype)?,
                eps: CONVNEXT_EPS,
            },
            pwconv1: st.linear(&format!("{p}.pwconv1"), 4 * dim, dim, true, device, dtype)?,
            pwconv2: st.linear(&format!("{p}.pwconv2"), dim, 4 * dim, true, device, dtype)?,
            gamma: st.load::<B, 1>(&format!("{p}.gamma"), [dim], device, dtype)?,
        })
    }

    /// `x` `[B, C, T]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.dwconv.forward(x.clone());
        self.finish(x, h)
    }

    fn forward_stream(&self, x: Tensor<B, 3>, state: &mut ConvState<B>, name: &str) -> Tensor<B, 3> {
        let h = timed(|| format!("{name}.dwconv"), || self.dwconv.forward_stream(x.clone(), state));
        timed(|| format!("{name}.mlp"), || self.finish(x, h))
    }

    /// Host [`Self::forward_stream`] over `x` `[C, N]`: the depthwise conv on the host, the
    /// rest as tensor code over `[N, C]`.
    fn forward_host(&self, mut x: Vec<f32>, cols: &Cols, states: &mut [&mut Vec<f32>], name: &str) -> Vec<f32> {
        let n = cols.n();
        let c = x.len() / n;
        let h = timed(|| format!("{name}.dwconv"), || self.dwconv.depthwise_host(&x, cols, states));
        timed(
            || format!("{name}.mlp"),
            || {
                let h = host_tensor::<B>(h, [c, n], &self.gamma.device()).transpose();
                let h = self.norm.forward(h);
                let h = self.pwconv2.forward(gelu(self.pwconv1.forward(h)));
                let h = host_vec((h * self.gamma.clone().unsqueeze::<2>()).transpose());
                x.iter_mut().zip(&h).for_each(|(x, h)| *x += h);
                x
            },
        )
    }

    /// Everything after the depthwise conv `h`.
    fn finish(&self, x: Tensor<B, 3>, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, c, t] = x.dims();
        let h = h.swap_dims(1, 2).reshape([b * t, c]);
        let h = self.norm.forward(h);
        let h = self.pwconv2.forward(gelu(self.pwconv1.forward(h)));
        let h = h * self.gamma.clone().unsqueeze::<2>();
        x + h.reshape([b, t, c]).swap_dims(1, 2)
    }
}

/// `SnakeBeta → causal conv k=7 dilation d → SnakeBeta → conv k=1`, plus the input.
pub struct ResidualUnit<B: Backend> {
    pub act1: SnakeBeta<B>,
    pub conv1: CausalConv1d<B>,
    pub act2: SnakeBeta<B>,
    pub conv2: CausalConv1d<B>,
}

impl<B: Backend> ResidualUnit<B> {
    fn load(
        st: &DecoderWeights,
        p: &str,
        dim: usize,
        dilation: usize,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, LoadError> {
        Ok(ResidualUnit {
            act1: st.snake(&format!("{p}.act1"), dim, device, dtype)?,
            conv1: st.causal_conv(&format!("{p}.conv1"), dim, dim, VOCODER_KERNEL, dilation, 1, device, dtype)?,
            act2: st.snake(&format!("{p}.act2"), dim, device, dtype)?,
            conv2: st.causal_conv(&format!("{p}.conv2"), dim, dim, 1, 1, 1, device, dtype)?,
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.conv1.forward(self.act1.forward(x.clone()));
        let h = self.conv2.forward(self.act2.forward(h));
        h + x
    }

    fn forward_stream(&self, x: Tensor<B, 3>, state: &mut ConvState<B>, name: &str) -> Tensor<B, 3> {
        let a = timed(|| format!("{name}.snake"), || self.act1.forward(x.clone()));
        let h = timed(|| format!("{name}.conv7"), || self.conv1.forward_stream(a, state));
        let h = timed(|| format!("{name}.snake"), || self.act2.forward(h));
        let h = timed(|| format!("{name}.conv1"), || self.conv2.forward(h));
        timed(|| format!("{name}.add"), || h + x)
    }
}

impl<B: Backend> ResidualUnit<B> {
    /// Host [`Self::forward_stream`] over `x` `[C, N]`.
    fn forward_host(&self, x: Vec<f32>, cols: &Cols, state: &mut [&mut Vec<f32>], name: &str) -> Vec<f32> {
        let n = cols.n();
        let mut a = timed(|| format!("{name}.conv7"), || self.conv1.forward_host_act(&x, &self.act1, cols, state));
        timed(|| format!("{name}.snake"), || self.act2.forward_host(&mut a, n));
        let mut y = timed(|| format!("{name}.conv1"), || self.conv2.forward_host(a, cols, &mut []));
        timed(|| format!("{name}.add"), || y.iter_mut().zip(&x).for_each(|(y, x)| *y += x));
        y
    }
}

/// One vocoder block: SnakeBeta, causal transposed conv (C → C/2, k=2u, stride u), residual
/// units with dilations 1, 3, 9.
pub struct VocoderBlock<B: Backend> {
    pub act: SnakeBeta<B>,
    pub up: CausalTransConv1d<B>,
    pub units: Vec<ResidualUnit<B>>,
}

impl<B: Backend> VocoderBlock<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let mut x = self.up.forward(self.act.forward(x));
        for u in &self.units {
            x = u.forward(x);
        }
        x
    }

    /// `states[0]` is the transposed conv's, then one per residual unit.
    fn forward_stream(&self, x: Tensor<B, 3>, states: &mut [ConvState<B>], name: &str) -> Tensor<B, 3> {
        let x = timed(|| format!("{name}.snake"), || self.act.forward(x));
        let mut x = timed(|| format!("{name}.up"), || self.up.forward_stream(x, &mut states[0]));
        for (u, s) in self.units.iter().zip(&mut states[1..]) {
            x = u.forward_stream(x, s, name);
        }
        x
    }

    /// Host [`Self::forward_stream`] over `x` `[C, N]` (`cols` before upsampling); `states`
    /// are the streams' host states, this block's from stage `first` (the transposed conv's,
    /// then one per residual unit).
    fn forward_host(
        &self,
        mut x: Vec<f32>,
        cols: &Cols,
        states: &mut [&mut Vec<Vec<f32>>],
        first: usize,
        name: &str,
    ) -> Vec<f32> {
        timed(|| format!("{name}.snake"), || self.act.forward_host(&mut x, cols.n()));
        let mut x = timed(|| format!("{name}.up"), || self.up.forward_host(x, cols, &mut stage(states, first, cols)));
        let cols = cols.scaled(self.up.stride);
        for (i, u) in self.units.iter().enumerate() {
            x = u.forward_host(x, &cols, &mut stage(states, first + 1 + i, &cols), name);
        }
        x
    }
}

/// One pre-transformer layer (pre-norm attention and SwiGLU MLP, each with LayerScale).
pub struct TransformerLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub attn_scale: Tensor<B, 1>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    pub mlp_scale: Tensor<B, 1>,
}

/// Per-forward tensors shared by the layers: RoPE tables of every row and each stream's
/// sliding-window mask.
struct AttnInputs<B: Backend> {
    /// `[1, N, head_dim]`, model dtype: the rows of all streams.
    cos: Tensor<B, 3>,
    sin: Tensor<B, 3>,
    /// Per stream `[1, T, C + T]` f32 over its `C` cached keys then its `T` new ones: 0 where
    /// key `j` is visible from query `i` (`C + i - W < j <= C + i`), −inf elsewhere.
    masks: Vec<Tensor<B, 3>>,
}

/// One layer's cached keys and values `[kv_heads, C, head_dim]` (keys after RoPE).
type KvEntry<B> = Option<(Tensor<B, 3>, Tensor<B, 3>)>;

/// Streaming state of [`TtsDecoder::push`]: the frames decoded so far (the next RoPE
/// position), each layer's K/V of the last `sliding_window - 1` frames, and every causal
/// conv's last input columns. It starts with the zero padding of the full decode.
pub struct TtsDecoderState<B: Backend> {
    pos: usize,
    /// Per layer `(k, v)` `[kv_heads, C, head_dim]` (k after RoPE), `C < sliding_window`.
    kv: Vec<KvEntry<B>>,
    convs: ConvStates<B>,
}

/// The conv states of a stream, in the form of the path that decodes it.
enum ConvStates<B: Backend> {
    Tensor(TensorConvStates<B>),
    /// The host path's, one row-major f32 buffer per stage in the order of
    /// [`TtsDecoder::host_state_lens`].
    Host(Vec<Vec<f32>>),
}

/// The tensor path's conv states (`[1, C, columns]`).
struct TensorConvStates<B: Backend> {
    pre_conv: ConvState<B>,
    /// Per upsampling ratio: the transposed conv's and the ConvNeXt depthwise conv's.
    upsample: Vec<(ConvState<B>, ConvState<B>)>,
    conv_in: ConvState<B>,
    /// Per vocoder block: the transposed conv's, then one per residual unit.
    blocks: Vec<Vec<ConvState<B>>>,
    conv_out: ConvState<B>,
}

impl<B: Backend> TtsDecoderState<B> {
    /// Frames pushed so far.
    pub fn frames(&self) -> usize {
        self.pos
    }
}

/// The decoder: weights and config.
pub struct TtsDecoder<B: Backend> {
    pub cfg: TtsDecoderConfig,
    pub dtype: DType,
    pub device: B::Device,
    /// `[codebook_size, codebook_dim / 2]`: codebook 0.
    pub first_table: Tensor<B, 2>,
    /// `[(num_quantizers - 1) * codebook_size, codebook_dim / 2]`: codebooks 1.., stacked.
    pub rest_table: Tensor<B, 2>,
    /// `output_proj` of each RVQ (no bias).
    pub first_proj: Linear<B>,
    pub rest_proj: Linear<B>,
    pub pre_conv: CausalConv1d<B>,
    pub input_proj: Linear<B>,
    pub layers: Vec<TransformerLayer<B>>,
    pub norm: RmsNorm<B>,
    pub output_proj: Linear<B>,
    pub upsample: Vec<(CausalTransConv1d<B>, ConvNeXtBlock<B>)>,
    pub conv_in: CausalConv1d<B>,
    pub blocks: Vec<VocoderBlock<B>>,
    pub act_out: SnakeBeta<B>,
    pub conv_out: CausalConv1d<B>,
    inv_freq: Vec<f32>,
    /// Streams run on the host path (Flex in f32; see [`Self::host_path`]).
    host: bool,
}

impl<B: Backend> TtsDecoder<B> {
    /// Loads `dir/config.json` and the `decoder.*` tensors of `dir/model.safetensors` (a
    /// `speech_tokenizer/` folder), for the host path where it is available (Flex in f32).
    pub fn from_dir(dir: &Path, device: &B::Device, dtype: DType) -> Result<Self, LoadError> {
        Self::from_dir_with_host_path(dir, device, dtype, true)
    }

    /// [`Self::from_dir`]; with `host_path` false the streams decode on the tensor path (the
    /// generic Burn ops other backends and dtypes take) even on Flex in f32.
    pub fn from_dir_with_host_path(
        dir: &Path,
        device: &B::Device,
        dtype: DType,
        host_path: bool,
    ) -> Result<Self, LoadError> {
        let cfg = TtsDecoderConfig::from_dir(dir)?;
        let st = DecoderWeights::open(dir)?;
        Self::load_with_host_path(&cfg, &st, device, dtype, host_path)
    }

    pub fn load(
        cfg: &TtsDecoderConfig,
        st: &DecoderWeights,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, LoadError> {
        Self::load_with_host_path(cfg, st, device, dtype, true)
    }

    /// [`Self::load`], on the host path only where `host_path` and it is available (Flex in
    /// f32; it stores the transposed convs' weights in its own layout).
    pub fn load_with_host_path(
        cfg: &TtsDecoderConfig,
        st: &DecoderWeights,
        device: &B::Device,
        dtype: DType,
        host_path: bool,
    ) -> Result<Self, LoadError> {
        let host = host_path && on_host::<B>() && dtype == DType::F32;
        let (cs, cd) = (cfg.codebook_size, cfg.codebook_dim);
        let dim = cd / 2;
        let table = |p: &str| -> Result<Vec<f32>, LoadError> {
            let usage = st.read(&format!("{p}._codebook.cluster_usage"), &[cs])?;
            let mut sum = st.read(&format!("{p}._codebook.embedding_sum"), &[cs, dim])?;
            for (row, u) in sum.chunks_exact_mut(dim).zip(usage) {
                let u = u.max(CODEBOOK_EPS);
                row.iter_mut().for_each(|x| *x /= u);
            }
            Ok(sum)
        };
        let first = table("quantizer.rvq_first.vq.layers.0")?;
        let mut rest = Vec::with_capacity((cfg.num_quantizers - 1) * cs * dim);
        for i in 0..cfg.num_quantizers - 1 {
            rest.extend(table(&format!("quantizer.rvq_rest.vq.layers.{i}"))?);
        }
        // 1x1 conv `[out, in, 1]` as a linear layer.
        let proj = |p: &str| -> Result<Linear<B>, LoadError> {
            let w = st.read(&format!("{p}.output_proj.weight"), &[cd, dim, 1])?;
            let w: Tensor<B, 2> = tensor_from_f32(w, vec![cd, dim], device, dtype);
            Ok(Linear { w: w.transpose(), b: None })
        };

        let (h, heads, kvh, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let bias = cfg.attention_bias;
        let rms = |name: String| -> Result<RmsNorm<B>, LoadError> {
            Ok(RmsNorm { w: st.load::<B, 1>(&name, [h], device, dtype)?, eps: cfg.rms_norm_eps })
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("pre_transformer.layers.{i}");
            let ffn = cfg.intermediate_size;
            layers.push(TransformerLayer {
                input_layernorm: rms(format!("{p}.input_layernorm.weight"))?,
                q_proj: st.linear(&format!("{p}.self_attn.q_proj"), heads * hd, h, bias, device, dtype)?,
                k_proj: st.linear(&format!("{p}.self_attn.k_proj"), kvh * hd, h, bias, device, dtype)?,
                v_proj: st.linear(&format!("{p}.self_attn.v_proj"), kvh * hd, h, bias, device, dtype)?,
                o_proj: st.linear(&format!("{p}.self_attn.o_proj"), h, heads * hd, bias, device, dtype)?,
                attn_scale: st.load::<B, 1>(&format!("{p}.self_attn_layer_scale.scale"), [h], device, dtype)?,
                post_attention_layernorm: rms(format!("{p}.post_attention_layernorm.weight"))?,
                gate_proj: st.linear(&format!("{p}.mlp.gate_proj"), ffn, h, false, device, dtype)?,
                up_proj: st.linear(&format!("{p}.mlp.up_proj"), ffn, h, false, device, dtype)?,
                down_proj: st.linear(&format!("{p}.mlp.down_proj"), h, ffn, false, device, dtype)?,
                mlp_scale: st.load::<B, 1>(&format!("{p}.mlp_layer_scale.scale"), [h], device, dtype)?,
            });
        }

        let lat = cfg.latent_dim;
        let mut upsample = Vec::with_capacity(cfg.upsampling_ratios.len());
        for (i, &r) in cfg.upsampling_ratios.iter().enumerate() {
            upsample.push((
                st.causal_trans_conv(&format!("upsample.{i}.0"), lat, lat, r, r, host, device, dtype)?,
                ConvNeXtBlock::load(st, &format!("upsample.{i}.1"), lat, device, dtype)?,
            ));
        }

        let k = VOCODER_KERNEL;
        let mut blocks = Vec::with_capacity(cfg.upsample_rates.len());
        for (i, &u) in cfg.upsample_rates.iter().enumerate() {
            let (inp, out) = (cfg.decoder_dim >> i, cfg.decoder_dim >> (i + 1));
            let p = format!("decoder.{}.block", i + 1);
            let mut units = Vec::with_capacity(DILATIONS.len());
            for (j, &d) in DILATIONS.iter().enumerate() {
                units.push(ResidualUnit::load(st, &format!("{p}.{}", j + 2), out, d, device, dtype)?);
            }
            blocks.push(VocoderBlock {
                act: st.snake(&format!("{p}.0"), inp, device, dtype)?,
                up: st.causal_trans_conv(&format!("{p}.1"), inp, out, 2 * u, u, host, device, dtype)?,
                units,
            });
        }
        let n = cfg.upsample_rates.len();
        let out_dim = cfg.decoder_dim >> n;

        // HF "default" RoPE: inv_freq = 1 / theta^(2i / head_dim), in f32.
        let theta = cfg.rope_theta as f32;
        let inv_freq = (0..hd / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / hd as f32)).collect();

        Ok(TtsDecoder {
            first_table: tensor_from_f32(first, vec![cs, dim], device, dtype),
            rest_table: tensor_from_f32(rest, vec![(cfg.num_quantizers - 1) * cs, dim], device, dtype),
            first_proj: proj("quantizer.rvq_first")?,
            rest_proj: proj("quantizer.rvq_rest")?,
            pre_conv: st.causal_conv("pre_conv", lat, cd, 3, 1, 1, device, dtype)?,
            input_proj: st.linear("pre_transformer.input_proj", h, lat, true, device, dtype)?,
            layers,
            norm: rms("pre_transformer.norm.weight".into())?,
            output_proj: st.linear("pre_transformer.output_proj", lat, h, true, device, dtype)?,
            upsample,
            conv_in: st.causal_conv("decoder.0", cfg.decoder_dim, lat, k, 1, 1, device, dtype)?,
            blocks,
            act_out: st.snake(&format!("decoder.{}", n + 1), out_dim, device, dtype)?,
            conv_out: st.causal_conv(&format!("decoder.{}", n + 2), 1, out_dim, k, 1, 1, device, dtype)?,
            inv_freq,
            cfg: cfg.clone(),
            dtype,
            device: device.clone(),
            host,
        })
    }

    /// Whether [`Self::push`] and [`Self::push_batch`] run on the host path (Flex in f32, the
    /// default there): the vocoder on host buffers, convs as single matmuls, several streams
    /// in one pass. A state belongs to the path of the decoder that made it.
    pub fn host_path(&self) -> bool {
        self.host
    }

    /// Waveform samples per frame (1920).
    pub fn samples_per_frame(&self) -> usize {
        self.cfg.samples_per_frame()
    }

    /// Frames of left context that make a chunked decode exact (see [`TtsDecoderConfig::left_context`]).
    pub fn left_context(&self) -> usize {
        self.cfg.left_context()
    }

    /// Decodes frames (each `num_quantizers` codes, codebook 0 first) to the waveform,
    /// `frames * samples_per_frame` samples in [-1, 1]. The whole decode, exactly (not
    /// upstream's approximate 300-frame chunks with 25 frames of context): it runs as a stream
    /// of [`DECODE_CHUNK_FRAMES`]-frame pushes, which bounds the memory of long clips.
    pub fn decode<C: AsRef<[u32]>>(&self, codes: &[C]) -> Result<Vec<f32>, String> {
        self.decode_chunked(codes, DECODE_CHUNK_FRAMES)
    }

    /// [`Self::decode`] as pushes of `chunk_frames` frames onto a fresh [`TtsDecoderState`].
    pub fn decode_chunked<C: AsRef<[u32]>>(&self, codes: &[C], chunk_frames: usize) -> Result<Vec<f32>, String> {
        if codes.is_empty() {
            return Ok(Vec::new());
        }
        self.dequantize(codes)?; // reject bad codes before decoding anything
        let mut state = self.new_state();
        let mut wav = Vec::with_capacity(codes.len() * self.samples_per_frame());
        for chunk in codes.chunks(chunk_frames.max(1)) {
            wav.extend(self.push(&mut state, chunk)?);
        }
        Ok(wav)
    }

    /// The whole decode in one pass, returning the `[1, 1, frames * samples_per_frame]`
    /// tensor (on the device; attention and activations grow with the clip). Always the
    /// tensor path.
    pub fn forward<C: AsRef<[u32]>>(&self, codes: &[C]) -> Result<Tensor<B, 3>, String> {
        let x = self.dequantize(codes)?; // [T, codebook_dim]
        let t = x.dims()[0];
        let x = self.pre_conv.forward(x.transpose().unsqueeze::<3>()); // [1, latent, T]
        let x = x.squeeze_dim::<2>(0).transpose(); // [T, latent]
        let mut kv: Vec<KvEntry<B>> = self.layers.iter().map(|_| None).collect();
        let x = self.transformer(x, &[(0, t)], &mut [&mut kv]); // [T, latent]
        let mut x = x.transpose().unsqueeze::<3>(); // [1, latent, T]
        for (up, block) in &self.upsample {
            x = block.forward(up.forward(x));
        }
        let mut x = self.conv_in.forward(x);
        for block in &self.blocks {
            x = block.forward(x);
        }
        let x = self.conv_out.forward(self.act_out.forward(x));
        debug_assert_eq!(x.dims()[2], t * self.samples_per_frame());
        Ok(x.clamp(-1.0, 1.0))
    }

    /// Rejects frames of the wrong length or with codes outside the codebooks.
    fn check_codes<C: AsRef<[u32]>>(&self, codes: &[C]) -> Result<(), String> {
        let (nq, cs) = (self.cfg.num_quantizers, self.cfg.codebook_size);
        for (i, frame) in codes.iter().enumerate() {
            let frame = frame.as_ref();
            if frame.len() != nq {
                return Err(format!("frame {i} has {} codes, the decoder takes {nq}", frame.len()));
            }
            if let Some(c) = frame.iter().find(|&&c| c as usize >= cs) {
                return Err(format!("frame {i}: code {c} is out of the codebook (size {cs})"));
            }
        }
        Ok(())
    }

    /// Codebook lookups, summed per RVQ and projected: `[T, codebook_dim]`.
    fn dequantize<C: AsRef<[u32]>>(&self, codes: &[C]) -> Result<Tensor<B, 2>, String> {
        let (nq, cs) = (self.cfg.num_quantizers, self.cfg.codebook_size);
        let t = codes.len();
        if t == 0 {
            return Err("no frames".into());
        }
        self.check_codes(codes)?;
        let mut first = Vec::with_capacity(t);
        let mut rest = Vec::with_capacity(t * (nq - 1));
        for frame in codes {
            let frame = frame.as_ref();
            first.push(frame[0] as i32);
            rest.extend(frame[1..].iter().enumerate().map(|(k, &c)| (k * cs) as i32 + c as i32));
        }
        let dim = self.cfg.codebook_dim / 2;
        let dev = &self.device;
        let first = Tensor::<B, 1, Int>::from_data(TensorData::new(first, [t]), dev);
        let rest = Tensor::<B, 1, Int>::from_data(TensorData::new(rest, [t * (nq - 1)]), dev);
        let q_first = self.first_table.clone().select(0, first);
        let q_rest = self.rest_table.clone().select(0, rest).reshape([t, nq - 1, dim]).sum_dim(1).reshape([t, dim]);
        Ok(self.first_proj.forward(q_first) + self.rest_proj.forward(q_rest))
    }

    /// RoPE tables for the rows of `segs` (per stream: its first position and its rows, the
    /// streams' rows one after another) and each stream's mask of its `T` queries over its
    /// `C` cached keys (`cached[i]`) and the `T` new ones.
    fn attn_inputs(&self, segs: &[(usize, usize)], cached: &[usize]) -> AttnInputs<B> {
        let hd = self.cfg.head_dim;
        let half = hd / 2;
        let n: usize = segs.iter().map(|&(_, t)| t).sum();
        let (mut cos, mut sin) = (vec![0f32; n * hd], vec![0f32; n * hd]);
        let rows = segs.iter().flat_map(|&(pos, t)| pos..pos + t);
        for (r, p) in rows.enumerate() {
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let (s, co) = (p as f32 * f).sin_cos();
                for j in [r * hd + i, r * hd + half + i] {
                    cos[j] = co;
                    sin[j] = s;
                }
            }
        }
        let w = self.cfg.sliding_window;
        let dev = &self.device;
        let masks = segs
            .iter()
            .zip(cached)
            .map(|(&(_, t), &c)| {
                let n = c + t;
                let mut mask = vec![f32::NEG_INFINITY; t * n];
                for i in 0..t {
                    for j in (c + i + 1).saturating_sub(w)..=c + i {
                        mask[i * n + j] = 0.0;
                    }
                }
                tensor_from_f32(mask, vec![1, t, n], dev, DType::F32)
            })
            .collect();
        AttnInputs {
            cos: tensor_from_f32(cos, vec![1, n, hd], dev, self.dtype),
            sin: tensor_from_f32(sin, vec![1, n, hd], dev, self.dtype),
            masks,
        }
    }

    fn rope(&self, x: Tensor<B, 3>, a: &AttnInputs<B>) -> Tensor<B, 3> {
        let half = self.cfg.head_dim / 2;
        let x1 = x.clone().narrow(2, 0, half);
        let x2 = x.clone().narrow(2, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
        x * a.cos.clone() + rotated * a.sin.clone()
    }

    /// Sliding-window causal self-attention of `x` `[N, hidden]` (already normed; the rows of
    /// the streams of `segs`, each over its cached keys/values and its own); keeps each
    /// stream's last `sliding_window - 1` of them in its `caches[i][layer]`.
    fn attention(
        &self,
        l: &TransformerLayer<B>,
        x: Tensor<B, 2>,
        a: &AttnInputs<B>,
        segs: &[(usize, usize)],
        caches: &mut [&mut Vec<KvEntry<B>>],
        layer: usize,
    ) -> Tensor<B, 2> {
        let n = x.dims()[0];
        let (heads, kvh, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let split = |y: Tensor<B, 2>, h: usize| y.reshape([n, h, hd]).swap_dims(0, 1); // [h, N, hd]
        let q = self.rope(split(l.q_proj.forward(x.clone()), heads), a);
        let k = self.rope(split(l.k_proj.forward(x.clone()), kvh), a);
        let v = split(l.v_proj.forward(x), kvh);
        let single = segs.len() == 1;
        let mut outs = Vec::with_capacity(segs.len());
        let mut off = 0;
        for ((&(_, t), mask), cache) in segs.iter().zip(&a.masks).zip(caches.iter_mut()) {
            let rows = |y: &Tensor<B, 3>| if single { y.clone() } else { y.clone().narrow(1, off, t) };
            let (q, k, v) = (rows(&q), rows(&k), rows(&v));
            off += t;
            let cache = &mut cache[layer];
            let (k, v) = match cache.take() {
                Some((ck, cv)) => (Tensor::cat(vec![ck, k], 1), Tensor::cat(vec![cv, v], 1)),
                None => (k, v),
            };
            let len = k.dims()[1];
            let keep = len.min(self.cfg.sliding_window - 1);
            if keep > 0 {
                *cache = Some((k.clone().narrow(1, len - keep, keep), v.clone().narrow(1, len - keep, keep)));
            }
            let groups = heads / kvh;
            let (k, v) = if groups > 1 {
                let rep = |y: Tensor<B, 3>| y.unsqueeze_dim::<4>(1).repeat_dim(1, groups).reshape([heads, len, hd]);
                (rep(k), rep(v))
            } else {
                (k, v)
            };
            let dtype = q.dtype();
            let scale = 1.0 / (hd as f64).sqrt();
            let scores = q.matmul(k.swap_dims(1, 2)).mul_scalar(scale).cast(BurnDType::F32) + mask.clone();
            let probs = softmax(scores, 2).cast(dtype);
            outs.push(probs.matmul(v)); // [heads, T, hd]
        }
        let out = if single { outs.pop().expect("one stream") } else { Tensor::cat(outs, 1) };
        l.o_proj.forward(out.swap_dims(0, 1).reshape([n, heads * hd]))
    }

    /// `pre_transformer` over `x` `[N, latent]`, the rows of the streams of `segs` (first
    /// position, rows) with their K/V caches, returning `[N, latent]`.
    fn transformer(
        &self,
        x: Tensor<B, 2>,
        segs: &[(usize, usize)],
        caches: &mut [&mut Vec<KvEntry<B>>],
    ) -> Tensor<B, 2> {
        let cached: Vec<usize> =
            caches.iter().map(|kv| kv.first().and_then(|e| e.as_ref()).map_or(0, |(k, _)| k.dims()[1])).collect();
        let a = self.attn_inputs(segs, &cached);
        let mut x = self.input_proj.forward(x);
        for (i, l) in self.layers.iter().enumerate() {
            let h = self.attention(l, l.input_layernorm.forward(x.clone()), &a, segs, caches, i);
            x = x + h * l.attn_scale.clone().unsqueeze::<2>();
            let n = l.post_attention_layernorm.forward(x.clone());
            let h = l.down_proj.forward(silu(l.gate_proj.forward(n.clone())) * l.up_proj.forward(n));
            x = x + h * l.mlp_scale.clone().unsqueeze::<2>();
        }
        self.output_proj.forward(self.norm.forward(x))
    }

    /// Sizes of a stream's host-path states, stage by stage: `pre_conv`; per upsampling ratio
    /// the transposed conv's and the ConvNeXt depthwise conv's; `decoder.0`; per vocoder block
    /// the transposed conv's and one per residual unit; the last conv's.
    fn host_state_lens(&self) -> Vec<usize> {
        let mut lens = vec![self.pre_conv.host_state_len()];
        for (up, block) in &self.upsample {
            lens.extend([up.host_state_len(), block.dwconv.host_state_len()]);
        }
        lens.push(self.conv_in.host_state_len());
        for b in &self.blocks {
            lens.push(b.up.host_state_len());
            lens.extend(b.units.iter().map(|u| u.conv1.host_state_len()));
        }
        lens.push(self.conv_out.host_state_len());
        lens
    }

    /// A fresh streaming state (nothing decoded yet), for the path the decoder runs now.
    pub fn new_state(&self) -> TtsDecoderState<B> {
        let (dev, dt) = (&self.device, self.dtype);
        let convs = if self.host {
            ConvStates::Host(self.host_state_lens().into_iter().map(|n| vec![0.0; n]).collect())
        } else {
            ConvStates::Tensor(TensorConvStates {
                pre_conv: self.pre_conv.init_state(dev, dt),
                upsample: self
                    .upsample
                    .iter()
                    .map(|(up, block)| (up.init_state(dev, dt), block.dwconv.init_state(dev, dt)))
                    .collect(),
                conv_in: self.conv_in.init_state(dev, dt),
                blocks: self
                    .blocks
                    .iter()
                    .map(|b| {
                        std::iter::once(b.up.init_state(dev, dt))
                            .chain(b.units.iter().map(|u| u.conv1.init_state(dev, dt)))
                            .collect()
                    })
                    .collect(),
                conv_out: self.conv_out.init_state(dev, dt),
            })
        };
        TtsDecoderState { pos: 0, kv: self.layers.iter().map(|_| None).collect(), convs }
    }

    /// Decodes the next `frames` of a stream, returning their `frames.len() * samples_per_frame`
    /// samples: the concatenated outputs of successive pushes equal [`Self::decode`] of all the
    /// frames (every stage is causal and carries its left context in `state`; RoPE positions
    /// continue). Invalid codes are rejected before `state` changes.
    pub fn push<C: AsRef<[u32]>>(&self, state: &mut TtsDecoderState<B>, frames: &[C]) -> Result<Vec<f32>, String> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        if self.host {
            return Ok(self.push_host(&mut [state], &[frames])?.pop().expect("one stream"));
        }
        let TtsDecoderState { pos, kv, convs } = state;
        let ConvStates::Tensor(st) = convs else {
            return Err("this state was made by a decoder on the host path, this one is on the tensor path".into());
        };
        let x = timed(|| "dequantize".into(), || self.dequantize(frames))?; // [T, codebook_dim], validates the codes
        let t = x.dims()[0];
        let x = timed(
            || "pre_conv".into(),
            || self.pre_conv.forward_stream(x.transpose().unsqueeze::<3>(), &mut st.pre_conv),
        );
        let x = x.squeeze_dim::<2>(0).transpose();
        let x = timed(|| "transformer".into(), || self.transformer(x, &[(*pos, t)], &mut [kv]));
        *pos += t;
        let mut x = x.transpose().unsqueeze::<3>();
        for (i, ((up, block), (s_up, s_dw))) in self.upsample.iter().zip(&mut st.upsample).enumerate() {
            let x_up = timed(|| format!("upsample{i}.up"), || up.forward_stream(x, s_up));
            x = block.forward_stream(x_up, s_dw, &format!("upsample{i}"));
        }
        let mut x = timed(|| "conv_in".into(), || self.conv_in.forward_stream(x, &mut st.conv_in));
        for (i, (block, s)) in self.blocks.iter().zip(&mut st.blocks).enumerate() {
            x = block.forward_stream(x, s, &format!("block{i}"));
        }
        let x = timed(|| "out.snake".into(), || self.act_out.forward(x));
        let x = timed(|| "out.conv".into(), || self.conv_out.forward_stream(x, &mut st.conv_out).clamp(-1.0, 1.0));
        timed(
            || "read".into(),
            || x.cast(BurnDType::F32).into_data().into_vec::<f32>().map_err(|e| format!("reading the waveform: {e:?}")),
        )
    }

    /// [`Self::push`] of several streams at once: `frames[i]` onto `states[i]`, returning
    /// each stream's samples. On the host path the streams' frames go through every stage
    /// together (the weights are read once for all of them; counts may differ, a stream may
    /// push nothing); elsewhere they are pushed one after another. Invalid codes in any
    /// stream are rejected before a state changes.
    pub fn push_batch<C: AsRef<[u32]>>(
        &self,
        states: &mut [&mut TtsDecoderState<B>],
        frames: &[&[C]],
    ) -> Result<Vec<Vec<f32>>, String> {
        if states.len() != frames.len() {
            return Err(format!("{} states for {} frame lists", states.len(), frames.len()));
        }
        for f in frames {
            self.check_codes(f)?;
        }
        if self.host {
            return self.push_host(states, frames);
        }
        states.iter_mut().zip(frames).map(|(s, f)| self.push(s, f)).collect()
    }

    /// The host path of [`Self::push_batch`].
    fn push_host<C: AsRef<[u32]>>(
        &self,
        states: &mut [&mut TtsDecoderState<B>],
        frames: &[&[C]],
    ) -> Result<Vec<Vec<f32>>, String> {
        if states.iter().any(|s| !matches!(s.convs, ConvStates::Host(_))) {
            return Err("this state was made by a decoder on the tensor path, this one is on the host path".into());
        }
        // Streams with frames, in order.
        let live: Vec<usize> = (0..frames.len()).filter(|&i| !frames[i].is_empty()).collect();
        let mut out = vec![Vec::new(); frames.len()];
        if live.is_empty() {
            return Ok(out);
        }
        let all: Vec<&[u32]> = live.iter().flat_map(|&i| frames[i].iter().map(AsRef::as_ref)).collect();
        let x = timed(|| "dequantize".into(), || self.dequantize(&all))?; // [N, codebook_dim], validates the codes
        let cols = Cols(live.iter().enumerate().map(|(k, &i)| (k, frames[i].len())).collect());
        let mut segs = Vec::with_capacity(live.len());
        let mut kvs = Vec::with_capacity(live.len());
        let mut convs = Vec::with_capacity(live.len());
        for (i, s) in states.iter_mut().enumerate() {
            if frames[i].is_empty() {
                continue;
            }
            let TtsDecoderState { pos, kv, convs: c } = &mut **s;
            let ConvStates::Host(c) = c else { unreachable!("checked above") };
            segs.push((*pos, frames[i].len()));
            *pos += frames[i].len();
            kvs.push(kv);
            convs.push(c);
        }
        let n = cols.n();
        let x = timed(
            || "pre_conv".into(),
            || self.pre_conv.forward_host(host_vec(x.transpose()), &cols, &mut stage(&mut convs, 0, &cols)),
        );
        let x = timed(
            || "transformer".into(),
            || {
                let x = host_tensor::<B>(x, [self.cfg.latent_dim, n], &self.device).transpose();
                host_vec(self.transformer(x, &segs, &mut kvs).transpose())
            },
        );
        let (mut x, mut cols, mut si) = (x, cols, 1);
        for (i, (up, block)) in self.upsample.iter().enumerate() {
            x = timed(|| format!("upsample{i}.up"), || up.forward_host(x, &cols, &mut stage(&mut convs, si, &cols)));
            cols = cols.scaled(up.stride);
            x = block.forward_host(x, &cols, &mut stage(&mut convs, si + 1, &cols), &format!("upsample{i}"));
            si += 2;
        }
        x = timed(|| "conv_in".into(), || self.conv_in.forward_host(x, &cols, &mut stage(&mut convs, si, &cols)));
        let x = self.vocoder_host(0, si + 1, x, &cols, &mut convs);
        let spf = self.samples_per_frame();
        let mut off = 0;
        for &i in &live {
            let len = frames[i].len() * spf;
            out[i] = x[off..off + len].to_vec();
            off += len;
        }
        Ok(out)
    }

    /// Vocoder blocks `b ..` and the output layers over `x` `[C, N]` (host path; `si` is block
    /// `b`'s first state): depth first, in pieces of at most [`Self::vocoder_budget`] columns,
    /// so that the activations of the blocks that run at many columns per frame stay in
    /// cache. Returns the samples of `cols`' columns in order.
    fn vocoder_host(
        &self,
        b: usize,
        si: usize,
        x: Vec<f32>,
        cols: &Cols,
        convs: &mut [&mut Vec<Vec<f32>>],
    ) -> Vec<f32> {
        let n = cols.n();
        let Some(block) = self.blocks.get(b) else {
            return timed(
                || "out".into(),
                || {
                    let mut x = self.conv_out.forward_host_act(&x, &self.act_out, cols, &mut stage(convs, si, cols));
                    x.iter_mut().for_each(|v| *v = v.clamp(-1.0, 1.0));
                    x
                },
            );
        };
        let budget = self.vocoder_budget(b);
        if n > budget {
            // Samples per column from here on.
            let rest: usize = self.cfg.upsample_rates[b..].iter().product();
            let mut y = Vec::with_capacity(n * rest);
            for (piece, ranges) in cols.pieces(budget) {
                y.extend(self.vocoder_host(b, si, gather_cols(&x, n, &ranges), &piece, convs));
            }
            return y;
        }
        let x = block.forward_host(x, cols, convs, si, &format!("block{b}"));
        self.vocoder_host(b + 1, si + 1 + block.units.len(), x, &cols.scaled(block.up.stride), convs)
    }

    /// The most input columns vocoder block `b` takes in one pass of [`Self::vocoder_host`]:
    /// 16 frames' worth for the first block, 4 for the second, 2 for the third, then 1
    /// (measured on the real-size decoder: the later blocks' matmuls slow down once their
    /// im2col buffers leave the caches, while the first blocks' weights want many columns).
    fn vocoder_budget(&self, b: usize) -> usize {
        const FRAMES: [usize; 4] = [16, 4, 2, 1];
        let per_frame = self.samples_per_frame() / self.cfg.upsample_rates[b..].iter().product::<usize>();
        FRAMES[b.min(FRAMES.len() - 1)] * per_frame
    }
}

/// Upstream's `chunked_decode` scheme: each [`TtsChunkedDecoder::push`] decodes its frames
/// again together with up to `context` earlier frames and returns only the new frames'
/// samples. With `context >=` [`TtsDecoder::left_context`] the concatenated output equals the
/// full decode (up to rounding: RoPE positions restart in each chunk, and RoPE is relative).
/// [`TtsDecoder::push`] gives the same without recomputing the context.
pub struct TtsChunkedDecoder<'a, B: Backend> {
    model: &'a TtsDecoder<B>,
    context: usize,
    /// The last `context` frames pushed so far.
    history: Vec<Vec<u32>>,
}

impl<'a, B: Backend> TtsChunkedDecoder<'a, B> {
    /// A stream with the exact left context.
    pub fn new(model: &'a TtsDecoder<B>) -> Self {
        Self::with_context(model, model.left_context())
    }

    /// A stream with `context` frames of left context (fewer than
    /// [`TtsDecoder::left_context`] is an approximation).
    pub fn with_context(model: &'a TtsDecoder<B>, context: usize) -> Self {
        TtsChunkedDecoder { model, context, history: Vec::new() }
    }

    /// Decodes `frames`, returning `frames.len() * samples_per_frame` samples.
    pub fn push<C: AsRef<[u32]>>(&mut self, frames: &[C]) -> Result<Vec<f32>, String> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let ctx = self.history.len();
        let mut all = self.history.clone();
        all.extend(frames.iter().map(|f| f.as_ref().to_vec()));
        let mut wav = self.model.decode(&all)?;
        wav.drain(..ctx * self.model.samples_per_frame());
        let drop = all.len().saturating_sub(self.context);
        all.drain(..drop);
        self.history = all;
        Ok(wav)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised SnakeBeta against f64 over a wide range of `alpha · x` (up to the fast
    /// path's limit, past it, and non-finite values).
    #[test]
    fn snake_matches_f64() {
        let n = 4099;
        let alpha = [1.0f32, 0.37, 2.9, 0.05, 2e4];
        let inv_beta = [1.0f32, 0.8, 3.0, 0.01, 1.0];
        let mut seed = 7u64;
        let mut x: Vec<f32> = (0..alpha.len() * n)
            .map(|i| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                u * [3.0, 100.0, 2000.0, 1e4, 1.0][i / n]
            })
            .collect();
        x[3] = 0.0;
        x[4] = -0.0;
        x[5] = 1e-30;
        let want: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let (a, ib) = (alpha[i / n] as f64, inv_beta[i / n] as f64);
                v as f64 + ib * ((a * v as f64).sin()).powi(2)
            })
            .collect();
        let mut y = x.clone();
        snake_rows(&mut y, n, &alpha, &inv_beta);
        for (i, (&y, &w)) in y.iter().zip(&want).enumerate() {
            let tol = 4.0 * f32::EPSILON * (w.abs() as f32 + inv_beta[i / n] * (1.0 + (alpha[i / n] * x[i]).abs()));
            assert!((y as f64 - w).abs() <= tol as f64, "x {} alpha {}: {y} vs {w}", x[i], alpha[i / n]);
        }
        let mut z = vec![f32::NAN, 1.0, f32::INFINITY, 2.0];
        snake_rows(&mut z, 4, &[1.0], &[1.0]);
        assert!(z[0].is_nan() && z[2].is_nan());
        assert!((z[1] - (1.0 + 1f32.sin().powi(2))).abs() <= 2.0 * f32::EPSILON);
    }
}
