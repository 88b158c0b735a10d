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
//!   the full decode (up to rounding).
//! - [`TtsChunkedDecoder`]: upstream's `chunked_decode` scheme, each chunk decoded again
//!   together with the [`TtsDecoder::left_context`] frames before it (the exact receptive field
//!   of every causal stage: 18 frames for the test fixture, 580 for the real 12 Hz decoder)
//!   whose samples are dropped. Exact too, but it recomputes the context for every chunk.

use std::path::Path;

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
        Ok(CausalConv1d {
            w: self.load::<B, 3>(&format!("{name}.conv.weight"), [out, inp / groups, kernel], device, dtype)?,
            b: self.load::<B, 1>(&format!("{name}.conv.bias"), [out], device, dtype)?,
            dilation,
            groups,
            pad: (kernel - 1) * dilation,
        })
    }

    /// `{name}.conv.weight` `[inp, out, k]` and `{name}.conv.bias`, as a causal transposed conv.
    #[allow(clippy::too_many_arguments)]
    fn causal_trans_conv<B: Backend>(
        &self,
        name: &str,
        inp: usize,
        out: usize,
        kernel: usize,
        stride: usize,
        device: &B::Device,
        dtype: DType,
    ) -> Result<CausalTransConv1d<B>, LoadError> {
        Ok(CausalTransConv1d {
            w: self.load::<B, 3>(&format!("{name}.conv.weight"), [inp, out, kernel], device, dtype)?,
            b: self.load::<B, 1>(&format!("{name}.conv.bias"), [out], device, dtype)?,
            stride,
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
            alpha: tensor_from_f32(alpha, vec![1, c, 1], device, dtype),
            inv_beta: tensor_from_f32(inv_beta, vec![1, c, 1], device, dtype),
        })
    }
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

/// `ConvTranspose1d` over `[B, C, T]` whose last `k - stride` outputs are dropped: `T * stride`
/// samples out.
pub struct CausalTransConv1d<B: Backend> {
    /// `[in, out, k]`.
    pub w: Tensor<B, 3>,
    pub b: Tensor<B, 1>,
    pub stride: usize,
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

/// `x + sin²(alpha·x) / beta` with `alpha = exp(α)` and `1 / (exp(β) + 1e-9)` precomputed.
pub struct SnakeBeta<B: Backend> {
    /// `[1, C, 1]`.
    pub alpha: Tensor<B, 3>,
    /// `[1, C, 1]`.
    pub inv_beta: Tensor<B, 3>,
}

impl<B: Backend> SnakeBeta<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let s = (x.clone() * self.alpha.clone()).sin();
        x + s.square() * self.inv_beta.clone()
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

    fn forward_stream(&self, x: Tensor<B, 3>, state: &mut ConvState<B>) -> Tensor<B, 3> {
        let h = self.dwconv.forward_stream(x.clone(), state);
        self.finish(x, h)
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

    fn forward_stream(&self, x: Tensor<B, 3>, state: &mut ConvState<B>) -> Tensor<B, 3> {
        let h = self.conv1.forward_stream(self.act1.forward(x.clone()), state);
        let h = self.conv2.forward(self.act2.forward(h));
        h + x
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
    fn forward_stream(&self, x: Tensor<B, 3>, states: &mut [ConvState<B>]) -> Tensor<B, 3> {
        let mut x = self.up.forward_stream(self.act.forward(x), &mut states[0]);
        for (u, s) in self.units.iter().zip(&mut states[1..]) {
            x = u.forward_stream(x, s);
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

/// Per-forward tensors shared by the layers: RoPE tables and the sliding-window mask.
struct AttnInputs<B: Backend> {
    /// `[1, T, head_dim]`, model dtype.
    cos: Tensor<B, 3>,
    sin: Tensor<B, 3>,
    /// `[1, T, C + T]` f32 over the `C` cached keys then the `T` new ones: 0 where key `j` is
    /// visible from query `i` (`C + i - W < j <= C + i`), −inf elsewhere.
    mask: Tensor<B, 3>,
}

/// Streaming state of [`TtsDecoder::push`]: the frames decoded so far (the next RoPE
/// position), each layer's K/V of the last `sliding_window - 1` frames, and every causal
/// conv's last input columns. It starts with the zero padding of the full decode.
pub struct TtsDecoderState<B: Backend> {
    pos: usize,
    /// Per layer `(k, v)` `[kv_heads, C, head_dim]` (k after RoPE), `C < sliding_window`.
    kv: Vec<Option<(Tensor<B, 3>, Tensor<B, 3>)>>,
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
}

impl<B: Backend> TtsDecoder<B> {
    /// Loads `dir/config.json` and the `decoder.*` tensors of `dir/model.safetensors` (a
    /// `speech_tokenizer/` folder).
    pub fn from_dir(dir: &Path, device: &B::Device, dtype: DType) -> Result<Self, LoadError> {
        let cfg = TtsDecoderConfig::from_dir(dir)?;
        let st = DecoderWeights::open(dir)?;
        Self::load(&cfg, &st, device, dtype)
    }

    pub fn load(
        cfg: &TtsDecoderConfig,
        st: &DecoderWeights,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, LoadError> {
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
                st.causal_trans_conv(&format!("upsample.{i}.0"), lat, lat, r, r, device, dtype)?,
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
                up: st.causal_trans_conv(&format!("{p}.1"), inp, out, 2 * u, u, device, dtype)?,
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
        })
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
    /// tensor (on the device; attention and activations grow with the clip).
    pub fn forward<C: AsRef<[u32]>>(&self, codes: &[C]) -> Result<Tensor<B, 3>, String> {
        let x = self.dequantize(codes)?; // [T, codebook_dim]
        let t = x.dims()[0];
        let x = self.pre_conv.forward(x.transpose().unsqueeze::<3>()); // [1, latent, T]
        let x = x.squeeze_dim::<2>(0).transpose(); // [T, latent]
        let x = self.transformer(x, 0, &mut self.layers.iter().map(|_| None).collect::<Vec<_>>()); // [T, latent]
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

    /// Codebook lookups, summed per RVQ and projected: `[T, codebook_dim]`.
    fn dequantize<C: AsRef<[u32]>>(&self, codes: &[C]) -> Result<Tensor<B, 2>, String> {
        let (nq, cs) = (self.cfg.num_quantizers, self.cfg.codebook_size);
        let t = codes.len();
        if t == 0 {
            return Err("no frames".into());
        }
        let mut first = Vec::with_capacity(t);
        let mut rest = Vec::with_capacity(t * (nq - 1));
        for (i, frame) in codes.iter().enumerate() {
            let frame = frame.as_ref();
            if frame.len() != nq {
                return Err(format!("frame {i} has {} codes, the decoder takes {nq}", frame.len()));
            }
            if let Some(c) = frame.iter().find(|&&c| c as usize >= cs) {
                return Err(format!("frame {i}: code {c} is out of the codebook (size {cs})"));
            }
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

    /// RoPE tables for positions `pos .. pos + t` and the mask of `t` queries over `c` cached
    /// keys and the `t` new ones.
    fn attn_inputs(&self, pos: usize, t: usize, c: usize) -> AttnInputs<B> {
        let hd = self.cfg.head_dim;
        let half = hd / 2;
        let (mut cos, mut sin) = (vec![0f32; t * hd], vec![0f32; t * hd]);
        for r in 0..t {
            let p = (pos + r) as f32;
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let (s, co) = (p * f).sin_cos();
                for j in [r * hd + i, r * hd + half + i] {
                    cos[j] = co;
                    sin[j] = s;
                }
            }
        }
        let w = self.cfg.sliding_window;
        let n = c + t;
        let mut mask = vec![f32::NEG_INFINITY; t * n];
        for i in 0..t {
            for j in (c + i + 1).saturating_sub(w)..=c + i {
                mask[i * n + j] = 0.0;
            }
        }
        let dev = &self.device;
        AttnInputs {
            cos: tensor_from_f32(cos, vec![1, t, hd], dev, self.dtype),
            sin: tensor_from_f32(sin, vec![1, t, hd], dev, self.dtype),
            mask: tensor_from_f32(mask, vec![1, t, n], dev, DType::F32),
        }
    }

    fn rope(&self, x: Tensor<B, 3>, a: &AttnInputs<B>) -> Tensor<B, 3> {
        let half = self.cfg.head_dim / 2;
        let x1 = x.clone().narrow(2, 0, half);
        let x2 = x.clone().narrow(2, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
        x * a.cos.clone() + rotated * a.sin.clone()
    }

    /// Sliding-window causal self-attention of `x` `[T, hidden]` (already normed) over the
    /// cached keys/values and its own; keeps the last `sliding_window - 1` of them in `cache`.
    fn attention(
        &self,
        l: &TransformerLayer<B>,
        x: Tensor<B, 2>,
        a: &AttnInputs<B>,
        cache: &mut Option<(Tensor<B, 3>, Tensor<B, 3>)>,
    ) -> Tensor<B, 2> {
        let t = x.dims()[0];
        let (heads, kvh, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let split = |y: Tensor<B, 2>, n: usize| y.reshape([t, n, hd]).swap_dims(0, 1); // [n, T, hd]
        let q = self.rope(split(l.q_proj.forward(x.clone()), heads), a);
        let k = self.rope(split(l.k_proj.forward(x.clone()), kvh), a);
        let v = split(l.v_proj.forward(x), kvh);
        let (k, v) = match cache.take() {
            Some((ck, cv)) => (Tensor::cat(vec![ck, k], 1), Tensor::cat(vec![cv, v], 1)),
            None => (k, v),
        };
        let n = k.dims()[1];
        let keep = n.min(self.cfg.sliding_window - 1);
        if keep > 0 {
            *cache = Some((k.clone().narrow(1, n - keep, keep), v.clone().narrow(1, n - keep, keep)));
        }
        let groups = heads / kvh;
        let (k, v) = if groups > 1 {
            let rep = |y: Tensor<B, 3>| y.unsqueeze_dim::<4>(1).repeat_dim(1, groups).reshape([heads, n, hd]);
            (rep(k), rep(v))
        } else {
            (k, v)
        };
        let dtype = q.dtype();
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = q.matmul(k.swap_dims(1, 2)).mul_scalar(scale).cast(BurnDType::F32) + a.mask.clone();
        let probs = softmax(scores, 2).cast(dtype);
        let out = probs.matmul(v).swap_dims(0, 1).reshape([t, heads * hd]);
        l.o_proj.forward(out)
    }

    /// `pre_transformer` over `x` `[T, latent]` at positions `pos ..`, returning `[T, latent]`.
    fn transformer(
        &self,
        x: Tensor<B, 2>,
        pos: usize,
        kv: &mut [Option<(Tensor<B, 3>, Tensor<B, 3>)>],
    ) -> Tensor<B, 2> {
        let t = x.dims()[0];
        let c = kv.first().and_then(|e| e.as_ref()).map_or(0, |(k, _)| k.dims()[1]);
        let a = self.attn_inputs(pos, t, c);
        let mut x = self.input_proj.forward(x);
        for (l, cache) in self.layers.iter().zip(kv) {
            let h = self.attention(l, l.input_layernorm.forward(x.clone()), &a, cache);
            x = x + h * l.attn_scale.clone().unsqueeze::<2>();
            let n = l.post_attention_layernorm.forward(x.clone());
            let h = l.down_proj.forward(silu(l.gate_proj.forward(n.clone())) * l.up_proj.forward(n));
            x = x + h * l.mlp_scale.clone().unsqueeze::<2>();
        }
        self.output_proj.forward(self.norm.forward(x))
    }

    /// A fresh streaming state (nothing decoded yet).
    pub fn new_state(&self) -> TtsDecoderState<B> {
        let (dev, dt) = (&self.device, self.dtype);
        TtsDecoderState {
            pos: 0,
            kv: self.layers.iter().map(|_| None).collect(),
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
        }
    }

    /// Decodes the next `frames` of a stream, returning their `frames.len() * samples_per_frame`
    /// samples: the concatenated outputs of successive pushes equal [`Self::decode`] of all the
    /// frames (every stage is causal and carries its left context in `state`; RoPE positions
    /// continue). Invalid codes are rejected before `state` changes.
    pub fn push<C: AsRef<[u32]>>(&self, state: &mut TtsDecoderState<B>, frames: &[C]) -> Result<Vec<f32>, String> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let x = self.dequantize(frames)?; // [T, codebook_dim], validates the codes
        let t = x.dims()[0];
        let x = self.pre_conv.forward_stream(x.transpose().unsqueeze::<3>(), &mut state.pre_conv);
        let x = x.squeeze_dim::<2>(0).transpose();
        let x = self.transformer(x, state.pos, &mut state.kv);
        state.pos += t;
        let mut x = x.transpose().unsqueeze::<3>();
        for ((up, block), (s_up, s_dw)) in self.upsample.iter().zip(&mut state.upsample) {
            x = block.forward_stream(up.forward_stream(x, s_up), s_dw);
        }
        let mut x = self.conv_in.forward_stream(x, &mut state.conv_in);
        for (block, s) in self.blocks.iter().zip(&mut state.blocks) {
            x = block.forward_stream(x, s);
        }
        let x = self.conv_out.forward_stream(self.act_out.forward(x), &mut state.conv_out).clamp(-1.0, 1.0);
        x.cast(BurnDType::F32).into_data().into_vec::<f32>().map_err(|e| format!("reading the waveform: {e:?}"))
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
