//! Stable Diffusion's denoiser: diffusers' `UNet2DConditionModel` (the `unet/` of a diffusers
//! pipeline folder) in Burn, and the building blocks the VAE ([`crate::vae`]) shares.
//!
//! Supported: the SD 1.x / 2.x layout. `DownBlock2D` / `CrossAttnDownBlock2D` down blocks,
//! `UNetMidBlock2DCrossAttn`, `UpBlock2D` / `CrossAttnUpBlock2D` up blocks; `ResnetBlock2D`
//! (GroupNorm, SiLU, 3x3 conv, the time embedding added after the first conv, a 1x1
//! `conv_shortcut` when the channel count changes); `Transformer2DModel` with a 1x1 conv
//! `proj_in`/`proj_out` (SD 1.x) or linear ones (`use_linear_projection`, SD 2.x) around
//! `BasicTransformerBlock`s (LayerNorm + self-attention, LayerNorm + cross-attention over the
//! text encoder's hidden states, LayerNorm + GEGLU feed-forward); stride-2 conv downsampling
//! and nearest 2x + conv upsampling; the sinusoidal timestep embedding (`flip_sin_to_cos`,
//! `freq_shift`) and its two-layer SiLU MLP. Head counts follow diffusers' legacy rule: a
//! config's `attention_head_dim` (an int or one per block) is the number of heads unless
//! `num_attention_heads` is given. `upcast_attention` needs nothing here: attention scores
//! and softmax are always computed in f32.
//!
//! Timesteps are per batch item (`&[f32]`, one per row of the sample): the engine batches
//! requests that are at different denoising steps into one forward.
//!
//! Weights come from `diffusion_pytorch_model.safetensors` ([`ComponentWeights`]), f32, f16
//! or bf16, converted to the requested dtype; the shapes are checked against `config.json`.

use std::path::Path;

use burn::tensor::activation::{gelu, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType as BurnDType, Tensor};
use serde_json::Value;

use crate::bert::LayerNorm;
use crate::qwen2::Linear;
use crate::weights::tensor_from_f32;
use crate::{DType, LoadError};

// --- weights ---------------------------------------------------------------------------------

/// The safetensors file of one diffusers component folder (`unet/`, `vae/`):
/// `diffusion_pytorch_model.safetensors`, memory-mapped.
pub struct ComponentWeights {
    store: crate::weights::WeightStore,
}

fn weight_err(name: &str, message: impl Into<String>) -> LoadError {
    LoadError::Weight { name: name.to_string(), message: message.into() }
}

pub(crate) fn parse_err(path: &Path, what: &'static str, message: impl Into<String>) -> LoadError {
    LoadError::Parse { path: path.display().to_string(), what, message: message.into() }
}

impl ComponentWeights {
    /// Opens `dir/diffusion_pytorch_model.safetensors` (or its sharded index).
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        Ok(ComponentWeights { store: crate::weights::WeightStore::open_named(dir, "diffusion_pytorch_model")? })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(name)
    }

    /// Loads `name`, checking its shape is `expected`.
    pub fn load<B: Backend, const D: usize>(
        &self,
        name: &str,
        expected: [usize; D],
        device: &B::Device,
        dtype: DType,
    ) -> Result<Tensor<B, D>, LoadError> {
        self.store.load(name, expected, false, device, dtype)
    }

    /// A 2-D `[out, in]` linear weight (and bias when `bias`) as a [`Linear`] (`x.matmul(w)`).
    pub fn linear<B: Backend>(
        &self,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Linear<B>, LoadError> {
        let w = self.load::<B, 2>(&format!("{name}.weight"), [out, inp], device, dtype)?.transpose();
        let b = if bias { Some(self.load::<B, 1>(&format!("{name}.bias"), [out], device, dtype)?) } else { None };
        Ok(Linear { w, b })
    }

    /// A `[parts * out, in]` linear layer (and its bias) split into `parts` layers of `out`
    /// outputs each, in order: the halves of a fused projection such as GEGLU's, so each
    /// half's output is contiguous.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_split<B: Backend>(
        &self,
        name: &str,
        parts: usize,
        out: usize,
        inp: usize,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Vec<Linear<B>>, LoadError> {
        let w = self.load::<B, 2>(&format!("{name}.weight"), [parts * out, inp], device, dtype)?;
        let b = self.load::<B, 1>(&format!("{name}.bias"), [parts * out], device, dtype)?;
        Ok((0..parts)
            .map(|i| Linear {
                w: w.clone().narrow(0, i * out, out).transpose(),
                b: Some(b.clone().narrow(0, i * out, out)),
            })
            .collect())
    }

    /// A 2-D convolution with a bias.
    #[allow(clippy::too_many_arguments)]
    pub fn conv<B: Backend>(
        &self,
        name: &str,
        out: usize,
        inp: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Conv2d<B>, LoadError> {
        Ok(Conv2d {
            w: self.load::<B, 4>(&format!("{name}.weight"), [out, inp, kernel, kernel], device, dtype)?,
            b: self.load::<B, 1>(&format!("{name}.bias"), [out], device, dtype)?,
            stride,
            padding,
        })
    }

    pub fn group_norm<B: Backend>(
        &self,
        name: &str,
        channels: usize,
        groups: usize,
        eps: f64,
        device: &B::Device,
        dtype: DType,
    ) -> Result<GroupNorm<B>, LoadError> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(weight_err(name, format!("{channels} channels do not split into {groups} groups")));
        }
        let w = self.load::<B, 1>(&format!("{name}.weight"), [channels], device, dtype)?;
        let b = self.load::<B, 1>(&format!("{name}.bias"), [channels], device, dtype)?;
        let read = |t: &Tensor<B, 1>| t.clone().cast(BurnDType::F32).into_data().into_vec::<f32>().unwrap_or_default();
        let host = on_host::<B>().then(|| (read(&w), read(&b)));
        Ok(GroupNorm { w, b, groups, eps, host })
    }

    pub fn layer_norm<B: Backend>(
        &self,
        name: &str,
        dim: usize,
        eps: f64,
        device: &B::Device,
        dtype: DType,
    ) -> Result<LayerNorm<B>, LoadError> {
        Ok(LayerNorm {
            w: self.load::<B, 1>(&format!("{name}.weight"), [dim], device, dtype)?,
            b: self.load::<B, 1>(&format!("{name}.bias"), [dim], device, dtype)?,
            eps,
        })
    }
}

// --- layers ----------------------------------------------------------------------------------

/// A 2-D convolution (square kernel, symmetric padding) with a bias.
pub struct Conv2d<B: Backend> {
    /// `[out, in, k, k]`.
    pub w: Tensor<B, 4>,
    pub b: Tensor<B, 1>,
    pub stride: usize,
    pub padding: usize,
}

impl<B: Backend> Conv2d<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let opts = ConvOptions::new([self.stride; 2], [self.padding; 2], [1, 1], 1);
        conv2d(x, self.w.clone(), Some(self.b.clone()), opts)
    }
}

/// `torch.nn.GroupNorm` over `[B, C, H, W]`, statistics in f32.
pub struct GroupNorm<B: Backend> {
    pub w: Tensor<B, 1>,
    pub b: Tensor<B, 1>,
    pub groups: usize,
    pub eps: f64,
    /// gamma and beta as f32 on the host, for the fused CPU path (read once at load).
    pub host: Option<(Vec<f32>, Vec<f32>)>,
}

/// Whether `B` is the CPU backend, where a fused host loop beats a chain of tensor ops.
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

/// GroupNorm over `x` `[B, C, HW]` (f32, row-major) in place: `shift[b * C + c]` is added
/// first when given (the resnets' time embedding), then each group is normalised with its
/// mean and biased variance (accumulated in f64), scaled by `gamma`, shifted by `beta`, and
/// SiLU applied when `silu`. One pass for the statistics and one for the output.
#[allow(clippy::too_many_arguments)]
fn group_norm_host(
    x: &mut [f32],
    [b, c, hw]: [usize; 3],
    groups: usize,
    eps: f64,
    gamma: &[f32],
    beta: &[f32],
    shift: Option<&[f32]>,
    silu: bool,
) {
    let cg = c / groups;
    for bi in 0..b {
        for g in 0..groups {
            let start = (bi * c + g * cg) * hw;
            let chunk = &mut x[start..start + cg * hw];
            if let Some(shift) = shift {
                for (ci, row) in chunk.chunks_exact_mut(hw).enumerate() {
                    let s = shift[bi * c + g * cg + ci];
                    row.iter_mut().for_each(|v| *v += s);
                }
            }
            let (mut sum, mut sq) = (0f64, 0f64);
            for row in chunk.chunks_exact(hw) {
                let (s1, s2) = row.iter().fold((0f32, 0f32), |(a, q), &v| (a + v, q + v * v));
                sum += s1 as f64;
                sq += s2 as f64;
            }
            let n = (cg * hw) as f64;
            let mean = sum / n;
            let var = (sq / n - mean * mean).max(0.0);
            let inv = 1.0 / (var + eps).sqrt();
            for (ci, row) in chunk.chunks_exact_mut(hw).enumerate() {
                let ch = g * cg + ci;
                let scale = (inv * gamma[ch] as f64) as f32;
                let offset = (beta[ch] as f64 - mean * inv * gamma[ch] as f64) as f32;
                if silu {
                    row.iter_mut().for_each(|v| {
                        let y = *v * scale + offset;
                        *v = y / (1.0 + (-y).exp());
                    });
                } else {
                    row.iter_mut().for_each(|v| *v = *v * scale + offset);
                }
            }
        }
    }
}

impl<B: Backend> GroupNorm<B> {
    /// `silu(norm(x + shift))` with `shift` `[B, C]` added per channel when given.
    pub fn forward_fused(&self, x: Tensor<B, 4>, shift: Option<Tensor<B, 2>>, silu_out: bool) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        if let (Some((gamma, beta)), BurnDType::F32) = (&self.host, x.dtype()) {
            let device = x.device();
            let mut v = x.into_data().into_vec::<f32>().expect("f32 data");
            let shift = shift.map(|s| s.cast(BurnDType::F32).into_data().into_vec::<f32>().expect("f32 data"));
            group_norm_host(&mut v, [b, c, h * w], self.groups, self.eps, gamma, beta, shift.as_deref(), silu_out);
            return Tensor::from_data(burn::tensor::TensorData::new(v, [b, c, h, w]), (&device, BurnDType::F32));
        }
        let x = match shift {
            Some(s) => x + s.reshape([b, c, 1, 1]),
            None => x,
        };
        let y = self.forward(x);
        if silu_out {
            silu(y)
        } else {
            y
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let dtype = x.dtype();
        let xf = x.cast(BurnDType::F32).reshape([b, self.groups, (c / self.groups) * h * w]);
        let mean = xf.clone().mean_dim(2);
        let centered = xf - mean;
        let var = centered.clone().square().mean_dim(2);
        let y = (centered * var.add_scalar(self.eps).sqrt().recip()).reshape([b, c, h, w]).cast(dtype);
        y * self.w.clone().reshape([1, c, 1, 1]) + self.b.clone().reshape([1, c, 1, 1])
    }
}

/// A linear layer over the last dimension of `[B, L, in]`.
pub fn linear3<B: Backend>(l: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, n, c] = x.dims();
    let y = l.forward(x.reshape([b * n, c]));
    let out = y.dims()[1];
    y.reshape([b, n, out])
}

/// Multi-head scaled dot-product attention: `q` `[B, Lq, C]`, `k`/`v` `[B, Lk, C]`, no mask;
/// scores and softmax in f32.
pub fn attention<B: Backend>(q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
    let [b, lq, c] = q.dims();
    let lk = k.dims()[1];
    let hd = c / heads;
    let dtype = q.dtype();
    let split = |t: Tensor<B, 3>, l: usize| t.reshape([b, l, heads, hd]).swap_dims(1, 2);
    let (q, k, v) = (split(q, lq), split(k, lk), split(v, lk));
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = q.cast(BurnDType::F32).mul_scalar(scale).matmul(k.cast(BurnDType::F32).swap_dims(2, 3));
    let probs = softmax(scores, 3).cast(dtype);
    probs.matmul(v).swap_dims(1, 2).reshape([b, lq, c])
}

/// Nearest-neighbour 2x upsampling of `[B, C, H, W]`.
pub fn upsample_nearest2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
    let [_, _, h, w] = x.dims();
    burn::tensor::module::interpolate(x, [2 * h, 2 * w], InterpolateOptions::new(InterpolateMode::Nearest))
}

/// `[B, C, H, W]` -> `[B, H * W, C]`.
fn to_tokens<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h * w]).swap_dims(1, 2)
}

/// `[B, H * W, C]` -> `[B, C, H, W]`.
fn from_tokens<B: Backend>(x: Tensor<B, 3>, h: usize, w: usize) -> Tensor<B, 4> {
    let [b, _, c] = x.dims();
    x.swap_dims(1, 2).reshape([b, c, h, w])
}

/// diffusers' `ResnetBlock2D` (`resnet_time_scale_shift` "default", output scale 1).
pub struct ResnetBlock2D<B: Backend> {
    pub norm1: GroupNorm<B>,
    pub conv1: Conv2d<B>,
    /// `time_emb_proj`, absent in the VAE.
    pub time_emb_proj: Option<Linear<B>>,
    pub norm2: GroupNorm<B>,
    pub conv2: Conv2d<B>,
    pub conv_shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> ResnetBlock2D<B> {
    /// Loads `{p}.…`; `temb` is the time embedding width (None: no time embedding).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        st: &ComponentWeights,
        p: &str,
        inp: usize,
        out: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, LoadError> {
        Ok(ResnetBlock2D {
            norm1: st.group_norm(&format!("{p}.norm1"), inp, groups, eps, device, dtype)?,
            conv1: st.conv(&format!("{p}.conv1"), out, inp, 3, 1, 1, device, dtype)?,
            time_emb_proj: match temb {
                Some(t) => Some(st.linear(&format!("{p}.time_emb_proj"), out, t, true, device, dtype)?),
                None => None,
            },
            norm2: st.group_norm(&format!("{p}.norm2"), out, groups, eps, device, dtype)?,
            conv2: st.conv(&format!("{p}.conv2"), out, out, 3, 1, 1, device, dtype)?,
            conv_shortcut: if inp != out {
                Some(st.conv(&format!("{p}.conv_shortcut"), out, inp, 1, 1, 0, device, dtype)?)
            } else {
                None
            },
        })
    }

    /// `x` `[B, C, H, W]`; `temb` `[B, T]` the SiLU-activated time embedding.
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<&Tensor<B, 2>>) -> Tensor<B, 4> {
        let h = self.conv1.forward(self.norm1.forward_fused(x.clone(), None, true));
        let shift = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => Some(proj.forward(t.clone())),
            _ => None,
        };
        let h = self.conv2.forward(self.norm2.forward_fused(h, shift, true));
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x,
        };
        shortcut + h
    }
}

/// `to_q`, `to_k`, `to_v` (no bias in the UNet) and `to_out.0`.
pub struct Attention<B: Backend> {
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    pub to_out: Linear<B>,
    pub heads: usize,
}

impl<B: Backend> Attention<B> {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        st: &ComponentWeights,
        p: &str,
        dim: usize,
        context_dim: usize,
        heads: usize,
        qkv_bias: bool,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, LoadError> {
        Ok(Attention {
            to_q: st.linear(&format!("{p}.to_q"), dim, dim, qkv_bias, device, dtype)?,
            to_k: st.linear(&format!("{p}.to_k"), dim, context_dim, qkv_bias, device, dtype)?,
            to_v: st.linear(&format!("{p}.to_v"), dim, context_dim, qkv_bias, device, dtype)?,
            to_out: st.linear(&format!("{p}.to_out.0"), dim, dim, true, device, dtype)?,
            heads,
        })
    }

    /// `x` `[B, L, dim]` attending over `context` `[B, Lc, context_dim]` (or itself).
    pub fn forward(&self, x: Tensor<B, 3>, context: Option<&Tensor<B, 3>>) -> Tensor<B, 3> {
        let ctx = context.cloned().unwrap_or_else(|| x.clone());
        let q = linear3(&self.to_q, x);
        let k = linear3(&self.to_k, ctx.clone());
        let v = linear3(&self.to_v, ctx);
        linear3(&self.to_out, attention(q, k, v, self.heads))
    }
}

/// diffusers' `BasicTransformerBlock` (layer_norm, GEGLU).
pub struct BasicTransformerBlock<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn1: Attention<B>,
    pub norm2: LayerNorm<B>,
    pub attn2: Attention<B>,
    pub norm3: LayerNorm<B>,
    /// GEGLU projection (`ff.net.0.proj`, `[2 * inner, dim]`) as its two halves: the value
    /// and the gate.
    pub ff_value: Linear<B>,
    pub ff_gate: Linear<B>,
    /// `ff.net.2`.
    pub ff_out: Linear<B>,
}

impl<B: Backend> BasicTransformerBlock<B> {
    pub fn forward(&self, x: Tensor<B, 3>, context: &Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, l, c] = x.dims();
        let norm = |n: &LayerNorm<B>, x: Tensor<B, 3>| n.forward(x.reshape([b * l, c])).reshape([b, l, c]);
        let x = self.attn1.forward(norm(&self.norm1, x.clone()), None) + x;
        let x = self.attn2.forward(norm(&self.norm2, x.clone()), Some(context)) + x;
        let n = norm(&self.norm3, x.clone());
        let gated = linear3(&self.ff_value, n.clone()) * gelu(linear3(&self.ff_gate, n));
        linear3(&self.ff_out, gated) + x
    }
}

/// `proj_in` / `proj_out`: 1x1 convs (SD 1.x) or linear layers (`use_linear_projection`).
pub enum Projection<B: Backend> {
    Conv(Conv2d<B>),
    Linear(Linear<B>),
}

/// diffusers' `Transformer2DModel` (continuous input).
pub struct Transformer2D<B: Backend> {
    pub norm: GroupNorm<B>,
    pub proj_in: Projection<B>,
    pub blocks: Vec<BasicTransformerBlock<B>>,
    pub proj_out: Projection<B>,
}

impl<B: Backend> Transformer2D<B> {
    #[allow(clippy::too_many_arguments)]
    fn load(
        st: &ComponentWeights,
        p: &str,
        channels: usize,
        heads: usize,
        cfg: &UNetConfig,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, LoadError> {
        let proj = |name: &str| -> Result<Projection<B>, LoadError> {
            let name = format!("{p}.{name}");
            Ok(if cfg.use_linear_projection {
                Projection::Linear(st.linear(&name, channels, channels, true, device, dtype)?)
            } else {
                Projection::Conv(st.conv(&name, channels, channels, 1, 1, 0, device, dtype)?)
            })
        };
        let (c, ctx) = (channels, cfg.cross_attention_dim);
        let inner = 4 * c;
        let mut blocks = Vec::new();
        for i in 0..cfg.transformer_layers_per_block {
            let q = format!("{p}.transformer_blocks.{i}");
            let mut geglu = st.linear_split(&format!("{q}.ff.net.0.proj"), 2, inner, c, device, dtype)?;
            let ff_gate = geglu.pop().expect("two halves");
            let ff_value = geglu.pop().expect("two halves");
            blocks.push(BasicTransformerBlock {
                norm1: st.layer_norm(&format!("{q}.norm1"), c, 1e-5, device, dtype)?,
                attn1: Attention::load(st, &format!("{q}.attn1"), c, c, heads, false, device, dtype)?,
                norm2: st.layer_norm(&format!("{q}.norm2"), c, 1e-5, device, dtype)?,
                attn2: Attention::load(st, &format!("{q}.attn2"), c, ctx, heads, false, device, dtype)?,
                norm3: st.layer_norm(&format!("{q}.norm3"), c, 1e-5, device, dtype)?,
                ff_value,
                ff_gate,
                ff_out: st.linear(&format!("{q}.ff.net.2"), c, inner, true, device, dtype)?,
            });
        }
        Ok(Transformer2D {
            norm: st.group_norm(&format!("{p}.norm"), c, cfg.norm_num_groups, 1e-6, device, dtype)?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    pub fn forward(&self, x: Tensor<B, 4>, context: &Tensor<B, 3>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let residual = x.clone();
        let x = self.norm.forward_fused(x, None, false);
        let mut t = match &self.proj_in {
            Projection::Conv(c) => to_tokens(c.forward(x)),
            Projection::Linear(l) => linear3(l, to_tokens(x)),
        };
        for block in &self.blocks {
            t = block.forward(t, context);
        }
        let out = match &self.proj_out {
            Projection::Conv(c) => c.forward(from_tokens(t, h, w)),
            Projection::Linear(l) => from_tokens(linear3(l, t), h, w),
        };
        out + residual
    }
}

// --- config ----------------------------------------------------------------------------------

/// The fields of a `UNet2DConditionModel` config.json Kiln reads.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    /// Per down block: whether it is a `CrossAttnDownBlock2D` (else `DownBlock2D`).
    pub down_cross_attn: Vec<bool>,
    /// Per up block: whether it is a `CrossAttnUpBlock2D` (else `UpBlock2D`).
    pub up_cross_attn: Vec<bool>,
    /// Attention heads per down block (diffusers' legacy `attention_head_dim`).
    pub heads: Vec<usize>,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub use_linear_projection: bool,
    pub transformer_layers_per_block: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    /// The sample's height and width (in latent pixels) the model was trained at.
    pub sample_size: usize,
}

fn usize_list(v: &Value, k: &str, n: usize, default: Option<usize>) -> Result<Vec<usize>, String> {
    match &v[k] {
        Value::Null => default.map(|d| vec![d; n]).ok_or_else(|| format!("missing {k}")),
        Value::Number(x) => Ok(vec![x.as_u64().ok_or_else(|| format!("invalid {k}: {x}"))? as usize; n]),
        Value::Array(a) if a.len() == n => {
            a.iter().map(|x| x.as_u64().map(|x| x as usize).ok_or_else(|| format!("invalid {k}: {x}"))).collect()
        }
        other => Err(format!("{k} {other} does not give one value per block ({n} blocks)")),
    }
}

impl UNetConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("config.json");
        let v = crate::config::read_json(&path)?;
        Self::from_value(&v).map_err(|m| parse_err(&path, "UNet config", m))
    }

    pub fn from_value(v: &Value) -> Result<Self, String> {
        let uint = |k: &str, d: usize| -> Result<usize, String> {
            match &v[k] {
                Value::Null => Ok(d),
                x => x.as_u64().map(|x| x as usize).ok_or_else(|| format!("invalid {k}: {x}")),
            }
        };
        // Settings Kiln does not implement must hold their SD 1.x / 2.x values.
        let expect = |k: &str, ok: &[Value]| -> Result<(), String> {
            if v[k].is_null() || ok.contains(&v[k]) {
                Ok(())
            } else {
                Err(format!("{k} {} is not supported", v[k]))
            }
        };
        expect("act_fn", &["silu".into()])?;
        expect("resnet_time_scale_shift", &["default".into()])?;
        expect("time_embedding_type", &["positional".into()])?;
        expect("mid_block_type", &["UNetMidBlock2DCrossAttn".into()])?;
        expect("attention_type", &["default".into()])?;
        expect("conv_in_kernel", &[3.into()])?;
        expect("conv_out_kernel", &[3.into()])?;
        expect("downsample_padding", &[1.into()])?;
        expect("mid_block_scale_factor", &[1.into(), 1.0.into()])?;
        expect("resnet_out_scale_factor", &[1.into(), 1.0.into()])?;
        expect("center_input_sample", &[false.into()])?;
        expect("only_cross_attention", &[false.into()])?;
        expect("dual_cross_attention", &[false.into()])?;
        expect("resnet_skip_time_act", &[false.into()])?;
        for k in [
            "class_embed_type",
            "num_class_embeds",
            "addition_embed_type",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "time_cond_proj_dim",
            "time_embedding_dim",
            "time_embedding_act_fn",
            "timestep_post_act",
            "cross_attention_norm",
            "reverse_transformer_layers_per_block",
        ] {
            if !v[k].is_null() {
                return Err(format!("{k} {} is not supported", v[k]));
            }
        }
        let n = v["block_out_channels"].as_array().ok_or("missing block_out_channels")?.len();
        let block_out_channels = usize_list(v, "block_out_channels", n, None)?;
        if n == 0 || block_out_channels.contains(&0) {
            return Err("block_out_channels is empty or has a 0".into());
        }
        let types = |k: &str, cross: &str, plain: &str| -> Result<Vec<bool>, String> {
            let a = v[k].as_array().ok_or_else(|| format!("missing {k}"))?;
            if a.len() != n {
                return Err(format!("{k} has {} entries for {n} blocks", a.len()));
            }
            a.iter()
                .map(|t| match t.as_str() {
                    Some(s) if s == cross => Ok(true),
                    Some(s) if s == plain => Ok(false),
                    _ => Err(format!("{k} entry {t} is not supported ({cross}, {plain})")),
                })
                .collect()
        };
        let down_cross_attn = types("down_block_types", "CrossAttnDownBlock2D", "DownBlock2D")?;
        let up_cross_attn = types("up_block_types", "CrossAttnUpBlock2D", "UpBlock2D")?;
        let heads_key = if v["num_attention_heads"].is_null() { "attention_head_dim" } else { "num_attention_heads" };
        let heads = usize_list(v, heads_key, n, Some(8))?;
        for (i, (&h, &c)) in heads.iter().zip(&block_out_channels).enumerate() {
            if h == 0 || !c.is_multiple_of(h) {
                return Err(format!("block {i}: {c} channels do not split into {h} heads"));
            }
        }
        let transformer_layers = usize_list(v, "transformer_layers_per_block", n, Some(1))?;
        if transformer_layers.iter().any(|&l| l != transformer_layers[0]) {
            return Err("transformer_layers_per_block per block is not supported".into());
        }
        let layers_per_block = match &v["layers_per_block"] {
            Value::Null => 2,
            x => x.as_u64().ok_or("layers_per_block per block is not supported")? as usize,
        };
        let cross_attention_dim = match &v["cross_attention_dim"] {
            Value::Null => 1280,
            x => x.as_u64().ok_or("cross_attention_dim per block is not supported")? as usize,
        };
        let cfg = UNetConfig {
            in_channels: uint("in_channels", 4)?,
            out_channels: uint("out_channels", 4)?,
            layers_per_block,
            down_cross_attn,
            up_cross_attn,
            heads,
            cross_attention_dim,
            norm_num_groups: uint("norm_num_groups", 32)?,
            norm_eps: v["norm_eps"].as_f64().unwrap_or(1e-5),
            use_linear_projection: v["use_linear_projection"].as_bool().unwrap_or(false),
            transformer_layers_per_block: transformer_layers[0],
            flip_sin_to_cos: v["flip_sin_to_cos"].as_bool().unwrap_or(true),
            freq_shift: v["freq_shift"].as_f64().unwrap_or(0.0),
            sample_size: uint("sample_size", 64)?,
            block_out_channels,
        };
        let g = cfg.norm_num_groups;
        if g == 0 || cfg.block_out_channels.iter().any(|c| !c.is_multiple_of(g)) {
            return Err(format!("block_out_channels {:?} do not split into {g} groups", cfg.block_out_channels));
        }
        if cfg.layers_per_block == 0 {
            return Err("layers_per_block is 0".into());
        }
        Ok(cfg)
    }

    /// Width of the sinusoidal timestep features (`block_out_channels[0]`).
    pub fn timestep_dim(&self) -> usize {
        self.block_out_channels[0]
    }

    /// Width of the time embedding (`4 * block_out_channels[0]`).
    pub fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }

    /// How many times the sample is downsampled (its height and width must divide by 2^this).
    pub fn downsamplings(&self) -> usize {
        self.block_out_channels.len() - 1
    }
}

/// diffusers' `get_timestep_embedding` for `timesteps`, `[N, dim]`, computed as torch does in
/// float32 (frequencies and arguments rounded to f32).
pub fn timestep_embedding(timesteps: &[f32], dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Vec<f32> {
    let half = dim / 2;
    let ln = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half).map(|i| (ln * i as f32 / (half as f64 - freq_shift) as f32).exp()).collect();
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f64> = freqs.iter().map(|&f| (t * f) as f64).collect();
        let sin = args.iter().map(|a| a.sin() as f32);
        let cos = args.iter().map(|a| a.cos() as f32);
        if flip_sin_to_cos {
            out.extend(cos.chain(sin));
        } else {
            out.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

// --- model -----------------------------------------------------------------------------------

pub struct DownBlock<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2D<B>>,
    pub downsampler: Option<Conv2d<B>>,
}

pub struct UpBlock<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2D<B>>,
    pub upsampler: Option<Conv2d<B>>,
}

/// diffusers' `UNet2DConditionModel` (SD 1.x / 2.x layout).
pub struct UNet2DConditionModel<B: Backend> {
    pub cfg: UNetConfig,
    pub dtype: DType,
    pub device: B::Device,
    pub conv_in: Conv2d<B>,
    pub time_linear_1: Linear<B>,
    pub time_linear_2: Linear<B>,
    pub down_blocks: Vec<DownBlock<B>>,
    pub mid_resnets: [ResnetBlock2D<B>; 2],
    pub mid_attention: Transformer2D<B>,
    pub up_blocks: Vec<UpBlock<B>>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (a diffusers `unet/`).
    pub fn from_dir(dir: &Path, device: &B::Device, dtype: DType) -> Result<Self, LoadError> {
        let cfg = UNetConfig::from_dir(dir)?;
        let st = ComponentWeights::open(dir)?;
        Self::load(&cfg, &st, device, dtype)
    }

    pub fn load(cfg: &UNetConfig, st: &ComponentWeights, device: &B::Device, dtype: DType) -> Result<Self, LoadError> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let (groups, eps, temb) = (cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim());
        let resnet = |p: String, inp: usize, out: usize| {
            ResnetBlock2D::load(st, &p, inp, out, Some(temb), groups, eps, device, dtype)
        };
        let transformer = |p: String, c: usize, heads: usize| Transformer2D::load(st, &p, c, heads, cfg, device, dtype);
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            let inp = out_ch;
            out_ch = out;
            let mut block = DownBlock { resnets: Vec::new(), attentions: Vec::new(), downsampler: None };
            for j in 0..cfg.layers_per_block {
                block.resnets.push(resnet(
                    format!("down_blocks.{i}.resnets.{j}"),
                    if j == 0 { inp } else { out },
                    out,
                )?);
                if cfg.down_cross_attn[i] {
                    block.attentions.push(transformer(format!("down_blocks.{i}.attentions.{j}"), out, cfg.heads[i])?);
                }
            }
            if i + 1 < n {
                let p = format!("down_blocks.{i}.downsamplers.0.conv");
                block.downsampler = Some(st.conv(&p, out, out, 3, 2, 1, device, dtype)?);
            }
            down_blocks.push(block);
        }
        let top = ch[n - 1];
        let mid_resnets =
            [resnet("mid_block.resnets.0".into(), top, top)?, resnet("mid_block.resnets.1".into(), top, top)?];
        let mid_attention = transformer("mid_block.attentions.0".into(), top, cfg.heads[n - 1])?;
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev = top;
        for i in 0..n {
            let out = ch[n - 1 - i];
            let inp = ch[(n - 1).saturating_sub(i + 1)];
            let mut block = UpBlock { resnets: Vec::new(), attentions: Vec::new(), upsampler: None };
            let layers = cfg.layers_per_block + 1;
            for j in 0..layers {
                let skip = if j == layers - 1 { inp } else { out };
                let rin = if j == 0 { prev } else { out };
                block.resnets.push(resnet(format!("up_blocks.{i}.resnets.{j}"), rin + skip, out)?);
                if cfg.up_cross_attn[i] {
                    block.attentions.push(transformer(
                        format!("up_blocks.{i}.attentions.{j}"),
                        out,
                        cfg.heads[n - 1 - i],
                    )?);
                }
            }
            if i + 1 < n {
                let p = format!("up_blocks.{i}.upsamplers.0.conv");
                block.upsampler = Some(st.conv(&p, out, out, 3, 1, 1, device, dtype)?);
            }
            prev = out;
            up_blocks.push(block);
        }
        Ok(UNet2DConditionModel {
            cfg: cfg.clone(),
            dtype,
            device: device.clone(),
            conv_in: st.conv("conv_in", ch[0], cfg.in_channels, 3, 1, 1, device, dtype)?,
            time_linear_1: st.linear("time_embedding.linear_1", temb, cfg.timestep_dim(), true, device, dtype)?,
            time_linear_2: st.linear("time_embedding.linear_2", temb, temb, true, device, dtype)?,
            down_blocks,
            mid_resnets,
            mid_attention,
            up_blocks,
            conv_norm_out: st.group_norm("conv_norm_out", ch[0], groups, eps, device, dtype)?,
            conv_out: st.conv("conv_out", cfg.out_channels, ch[0], 3, 1, 1, device, dtype)?,
        })
    }

    /// The predicted noise (or v) for `sample` `[B, in_channels, H, W]` at `timesteps` (one
    /// per item) given `context` `[B, L, cross_attention_dim]` (the text encoder's hidden
    /// states). H and W must divide by `2^downsamplings`.
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timesteps: &[f32],
        context: &Tensor<B, 3>,
    ) -> Result<Tensor<B, 4>, String> {
        let [b, c, h, w] = sample.dims();
        let [cb, _, cd] = context.dims();
        if c != self.cfg.in_channels {
            return Err(format!("sample has {c} channels, the UNet takes {}", self.cfg.in_channels));
        }
        if timesteps.len() != b || cb != b {
            return Err(format!("{b} samples, {} timesteps and {cb} contexts: one of each per item", timesteps.len()));
        }
        if cd != self.cfg.cross_attention_dim {
            return Err(format!("context width {cd}, the UNet attends over {}", self.cfg.cross_attention_dim));
        }
        let f = 1usize << self.cfg.downsamplings();
        if h == 0 || w == 0 || !h.is_multiple_of(f) || !w.is_multiple_of(f) {
            return Err(format!("sample {h}x{w} is not a multiple of {f}"));
        }
        let dim = self.cfg.timestep_dim();
        let t = timestep_embedding(timesteps, dim, self.cfg.flip_sin_to_cos, self.cfg.freq_shift);
        let t = tensor_from_f32::<B, 2>(t, vec![b, dim], &self.device, self.dtype);
        let temb = self.time_linear_2.forward(silu(self.time_linear_1.forward(t)));
        // Every resnet applies SiLU to the embedding before its projection.
        let temb = silu(temb);
        let temb = Some(&temb);

        let mut x = self.conv_in.forward(sample);
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            for (j, r) in block.resnets.iter().enumerate() {
                x = r.forward(x, temb);
                if let Some(a) = block.attentions.get(j) {
                    x = a.forward(x, context);
                }
                skips.push(x.clone());
            }
            if let Some(d) = &block.downsampler {
                x = d.forward(x);
                skips.push(x.clone());
            }
        }
        x = self.mid_resnets[0].forward(x, temb);
        x = self.mid_attention.forward(x, context);
        x = self.mid_resnets[1].forward(x, temb);
        for block in &self.up_blocks {
            for (j, r) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                x = r.forward(Tensor::cat(vec![x, skip], 1), temb);
                if let Some(a) = block.attentions.get(j) {
                    x = a.forward(x, context);
                }
            }
            if let Some(u) = &block.upsampler {
                x = u.forward(upsample_nearest2x(x));
            }
        }
        Ok(self.conv_out.forward(self.conv_norm_out.forward_fused(x, None, true)))
    }

    /// [`forward`](Self::forward) on host f32 values (`sample` `[B, C, H, W]` and `context`
    /// `[B, L, D]` flattened), returning the flattened output.
    pub fn forward_host(
        &self,
        sample: &[f32],
        shape: [usize; 4],
        timesteps: &[f32],
        context: &[f32],
        context_shape: [usize; 3],
    ) -> Result<Vec<f32>, String> {
        if sample.len() != shape.iter().product::<usize>() || context.len() != context_shape.iter().product::<usize>() {
            return Err("host buffer sizes do not match their shapes".into());
        }
        let x = tensor_from_f32::<B, 4>(sample.to_vec(), shape.to_vec(), &self.device, self.dtype);
        let ctx = tensor_from_f32::<B, 3>(context.to_vec(), context_shape.to_vec(), &self.device, self.dtype);
        let out = self.forward(x, timesteps, &ctx)?;
        out.cast(BurnDType::F32).into_data().into_vec::<f32>().map_err(|e| format!("reading the UNet output: {e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestep_embedding_orders_cos_sin() {
        let e = timestep_embedding(&[0.0, 1.0], 4, true, 0.0);
        // t = 0: cos = 1, sin = 0; freqs [1, 0.01].
        assert_eq!(&e[..4], &[1.0, 1.0, 0.0, 0.0]);
        assert!((e[4] - 1f32.cos()).abs() < 1e-7 && (e[6] - 1f32.sin()).abs() < 1e-7);
        let e = timestep_embedding(&[1.0], 4, false, 1.0);
        // freq_shift 1: freqs exp(-ln(1e4) * i / (2 - 1)) = [1, 1e-4]; sin first.
        assert!((e[0] - 1f32.sin()).abs() < 1e-7 && (e[1] - 1e-4).abs() < 1e-9);
    }

    #[test]
    fn config_rejects_unsupported_settings() {
        let base = json!({
            "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4,
            "attention_head_dim": [2, 4], "cross_attention_dim": 32
        });
        let cfg = UNetConfig::from_value(&base).unwrap();
        assert_eq!(cfg.heads, vec![2, 4]);
        assert_eq!(cfg.time_embed_dim(), 32);
        let mut bad = base.clone();
        bad["class_embed_type"] = json!("timestep");
        assert!(UNetConfig::from_value(&bad).unwrap_err().contains("class_embed_type"));
        let mut bad = base.clone();
        bad["down_block_types"][0] = json!("AttnDownBlock2D");
        assert!(UNetConfig::from_value(&bad).unwrap_err().contains("AttnDownBlock2D"));
        let mut bad = base;
        bad["attention_head_dim"] = json!(3);
        assert!(UNetConfig::from_value(&bad).unwrap_err().contains("heads"));
    }
}
