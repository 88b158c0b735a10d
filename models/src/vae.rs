//! Stable Diffusion's image autoencoder: diffusers' `AutoencoderKL` (the `vae/` of a diffusers
//! pipeline folder) in Burn, decoder and encoder.
//!
//! Decoder: `post_quant_conv` (1x1), `conv_in`, a mid block (resnet, single-head spatial
//! self-attention with GroupNorm, resnet), `UpDecoderBlock2D`s (`layers_per_block + 1`
//! resnets, nearest 2x + conv upsampling except the last), GroupNorm + SiLU + `conv_out`.
//! Encoder: `conv_in`, `DownEncoderBlock2D`s (resnets, a stride-2 conv after zero padding the
//! bottom and right by one, except the last), the mid block, GroupNorm + SiLU + `conv_out` to
//! `2 * latent_channels`, `quant_conv`: the mean and log-variance of the latent distribution.
//! Every norm uses eps 1e-6 and `norm_num_groups` groups.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::ops::PadMode;
use burn::tensor::{DType as BurnDType, Tensor};
use serde_json::Value;

use crate::qwen2::Linear;
use crate::unet::{
    attention, linear3, parse_err, upsample_nearest2x, ComponentWeights, Conv2d, GroupNorm, ResnetBlock2D,
};
use crate::{DType, LoadError};

const EPS: f64 = 1e-6;

/// The fields of an `AutoencoderKL` config.json Kiln reads.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl VaeConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("config.json");
        let v = crate::config::read_json(&path)?;
        Self::from_value(&v).map_err(|m| parse_err(&path, "VAE config", m))
    }

    pub fn from_value(v: &Value) -> Result<Self, String> {
        let uint = |k: &str, d: usize| -> Result<usize, String> {
            match &v[k] {
                Value::Null => Ok(d),
                x => x.as_u64().map(|x| x as usize).ok_or_else(|| format!("invalid {k}: {x}")),
            }
        };
        if !(v["act_fn"].is_null() || v["act_fn"] == "silu") {
            return Err(format!("act_fn {} is not supported", v["act_fn"]));
        }
        if v["mid_block_add_attention"] == false {
            return Err("mid_block_add_attention false is not supported".into());
        }
        if !v["shift_factor"].is_null() && v["shift_factor"].as_f64() != Some(0.0) {
            return Err("shift_factor is not supported".into());
        }
        let channels: Vec<usize> = match v["block_out_channels"].as_array() {
            Some(a) => a
                .iter()
                .map(|x| x.as_u64().map(|x| x as usize).ok_or_else(|| format!("invalid block_out_channels: {x}")))
                .collect::<Result<_, _>>()?,
            None => vec![64],
        };
        let n = channels.len();
        for (k, want) in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")] {
            if let Some(a) = v[k].as_array() {
                if a.len() != n || a.iter().any(|t| t != want) {
                    return Err(format!("{k} must be {n} x {want}"));
                }
            }
        }
        let cfg = VaeConfig {
            in_channels: uint("in_channels", 3)?,
            out_channels: uint("out_channels", 3)?,
            latent_channels: uint("latent_channels", 4)?,
            layers_per_block: uint("layers_per_block", 1)?,
            norm_num_groups: uint("norm_num_groups", 32)?,
            scaling_factor: v["scaling_factor"].as_f64().unwrap_or(0.18215),
            use_quant_conv: v["use_quant_conv"].as_bool().unwrap_or(true),
            use_post_quant_conv: v["use_post_quant_conv"].as_bool().unwrap_or(true),
            block_out_channels: channels,
        };
        let g = cfg.norm_num_groups;
        if n == 0 || g == 0 || cfg.block_out_channels.iter().any(|&c| c == 0 || !c.is_multiple_of(g)) {
            return Err(format!("block_out_channels {:?} do not split into {g} groups", cfg.block_out_channels));
        }
        Ok(cfg)
    }

    /// Image pixels per latent pixel along each side.
    pub fn scale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The mid block's spatial self-attention (one head, q/k/v with biases, residual).
pub struct SpatialAttention<B: Backend> {
    pub norm: GroupNorm<B>,
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    pub to_out: Linear<B>,
}

impl<B: Backend> SpatialAttention<B> {
    fn load(
        st: &ComponentWeights,
        p: &str,
        c: usize,
        groups: usize,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, LoadError> {
        Ok(SpatialAttention {
            norm: st.group_norm(&format!("{p}.group_norm"), c, groups, EPS, device, dtype)?,
            to_q: st.linear(&format!("{p}.to_q"), c, c, true, device, dtype)?,
            to_k: st.linear(&format!("{p}.to_k"), c, c, true, device, dtype)?,
            to_v: st.linear(&format!("{p}.to_v"), c, c, true, device, dtype)?,
            to_out: st.linear(&format!("{p}.to_out.0"), c, c, true, device, dtype)?,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let t = self.norm.forward(x.clone()).reshape([b, c, h * w]).swap_dims(1, 2);
        let (q, k, v) = (linear3(&self.to_q, t.clone()), linear3(&self.to_k, t.clone()), linear3(&self.to_v, t));
        let out = linear3(&self.to_out, attention(q, k, v, 1));
        out.swap_dims(1, 2).reshape([b, c, h, w]) + x
    }
}

/// `UNetMidBlock2D` without a time embedding: resnet, attention, resnet.
pub struct VaeMidBlock<B: Backend> {
    pub resnets: [ResnetBlock2D<B>; 2],
    pub attention: SpatialAttention<B>,
}

impl<B: Backend> VaeMidBlock<B> {
    fn load(
        st: &ComponentWeights,
        p: &str,
        c: usize,
        groups: usize,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, LoadError> {
        let r = |i: usize| ResnetBlock2D::load(st, &format!("{p}.resnets.{i}"), c, c, None, groups, EPS, device, dtype);
        Ok(VaeMidBlock {
            resnets: [r(0)?, r(1)?],
            attention: SpatialAttention::load(st, &format!("{p}.attentions.0"), c, groups, device, dtype)?,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self.resnets[0].forward(x, None);
        let x = self.attention.forward(x);
        self.resnets[1].forward(x, None)
    }
}

/// One encoder or decoder level: resnets, then a resampling conv (except the last level).
pub struct VaeBlock<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub resample: Option<Conv2d<B>>,
}

pub struct VaeDecoder<B: Backend> {
    pub post_quant_conv: Option<Conv2d<B>>,
    pub conv_in: Conv2d<B>,
    pub mid: VaeMidBlock<B>,
    pub up_blocks: Vec<VaeBlock<B>>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
}

pub struct VaeEncoder<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub down_blocks: Vec<VaeBlock<B>>,
    pub mid: VaeMidBlock<B>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
    pub quant_conv: Option<Conv2d<B>>,
}

/// diffusers' `AutoencoderKL`.
pub struct AutoencoderKL<B: Backend> {
    pub cfg: VaeConfig,
    pub dtype: DType,
    pub device: B::Device,
    pub decoder: VaeDecoder<B>,
    pub encoder: VaeEncoder<B>,
}

impl<B: Backend> AutoencoderKL<B> {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (a diffusers `vae/`).
    pub fn from_dir(dir: &Path, device: &B::Device, dtype: DType) -> Result<Self, LoadError> {
        let cfg = VaeConfig::from_dir(dir)?;
        let st = ComponentWeights::open(dir)?;
        Self::load(&cfg, &st, device, dtype)
    }

    pub fn load(cfg: &VaeConfig, st: &ComponentWeights, device: &B::Device, dtype: DType) -> Result<Self, LoadError> {
        let ch = &cfg.block_out_channels;
        let (n, g, lat) = (ch.len(), cfg.norm_num_groups, cfg.latent_channels);
        let resnet =
            |p: String, inp: usize, out: usize| ResnetBlock2D::load(st, &p, inp, out, None, g, EPS, device, dtype);
        let top = ch[n - 1];

        let mut up_blocks = Vec::with_capacity(n);
        let mut prev = top;
        for i in 0..n {
            let out = ch[n - 1 - i];
            let mut resnets = Vec::new();
            for j in 0..=cfg.layers_per_block {
                resnets.push(resnet(
                    format!("decoder.up_blocks.{i}.resnets.{j}"),
                    if j == 0 { prev } else { out },
                    out,
                )?);
            }
            let resample = if i + 1 < n {
                Some(st.conv(&format!("decoder.up_blocks.{i}.upsamplers.0.conv"), out, out, 3, 1, 1, device, dtype)?)
            } else {
                None
            };
            up_blocks.push(VaeBlock { resnets, resample });
            prev = out;
        }
        let decoder = VaeDecoder {
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(st.conv("post_quant_conv", lat, lat, 1, 1, 0, device, dtype)?)
            } else {
                None
            },
            conv_in: st.conv("decoder.conv_in", top, lat, 3, 1, 1, device, dtype)?,
            mid: VaeMidBlock::load(st, "decoder.mid_block", top, g, device, dtype)?,
            up_blocks,
            conv_norm_out: st.group_norm("decoder.conv_norm_out", ch[0], g, EPS, device, dtype)?,
            conv_out: st.conv("decoder.conv_out", cfg.out_channels, ch[0], 3, 1, 1, device, dtype)?,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut prev = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block {
                resnets.push(resnet(
                    format!("encoder.down_blocks.{i}.resnets.{j}"),
                    if j == 0 { prev } else { out },
                    out,
                )?);
            }
            // Padding (0, 1, 0, 1) is applied before the conv, which itself pads nothing.
            let resample = if i + 1 < n {
                Some(st.conv(
                    &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                    out,
                    out,
                    3,
                    2,
                    0,
                    device,
                    dtype,
                )?)
            } else {
                None
            };
            down_blocks.push(VaeBlock { resnets, resample });
            prev = out;
        }
        let encoder = VaeEncoder {
            conv_in: st.conv("encoder.conv_in", ch[0], cfg.in_channels, 3, 1, 1, device, dtype)?,
            down_blocks,
            mid: VaeMidBlock::load(st, "encoder.mid_block", top, g, device, dtype)?,
            conv_norm_out: st.group_norm("encoder.conv_norm_out", top, g, EPS, device, dtype)?,
            conv_out: st.conv("encoder.conv_out", 2 * lat, top, 3, 1, 1, device, dtype)?,
            quant_conv: if cfg.use_quant_conv {
                Some(st.conv("quant_conv", 2 * lat, 2 * lat, 1, 1, 0, device, dtype)?)
            } else {
                None
            },
        };
        Ok(AutoencoderKL { cfg: cfg.clone(), dtype, device: device.clone(), decoder, encoder })
    }

    /// `vae.decode(z).sample`: `z` `[B, latent_channels, h, w]` (already divided by the
    /// scaling factor) to an image `[B, out_channels, h * scale, w * scale]`, about [-1, 1].
    pub fn decode(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 4>, String> {
        let c = z.dims()[1];
        if c != self.cfg.latent_channels {
            return Err(format!("latents have {c} channels, the VAE takes {}", self.cfg.latent_channels));
        }
        let d = &self.decoder;
        let z = match &d.post_quant_conv {
            Some(conv) => conv.forward(z),
            None => z,
        };
        let mut x = d.mid.forward(d.conv_in.forward(z));
        for block in &d.up_blocks {
            for r in &block.resnets {
                x = r.forward(x, None);
            }
            if let Some(u) = &block.resample {
                x = u.forward(upsample_nearest2x(x));
            }
        }
        Ok(d.conv_out.forward(d.conv_norm_out.forward_fused(x, None, true)))
    }

    /// The pipeline's decode of denoised latents: `vae.decode(latents / scaling_factor)`.
    pub fn decode_latents(&self, latents: Tensor<B, 4>) -> Result<Tensor<B, 4>, String> {
        self.decode(latents.div_scalar(self.cfg.scaling_factor))
    }

    /// `vae.encode(image).latent_dist`: the mean and the log-variance (clamped to [-30, 20]),
    /// each `[B, latent_channels, H / scale, W / scale]`, of `image` `[B, in_channels, H, W]`
    /// in [-1, 1]. The pipeline's latents are `scaling_factor * (mean + exp(logvar / 2) * noise)`.
    pub fn encode(&self, image: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 4>), String> {
        let [_, c, h, w] = image.dims();
        let s = self.cfg.scale();
        if c != self.cfg.in_channels {
            return Err(format!("image has {c} channels, the VAE takes {}", self.cfg.in_channels));
        }
        if h == 0 || w == 0 || !h.is_multiple_of(s) || !w.is_multiple_of(s) {
            return Err(format!("image {h}x{w} is not a multiple of {s}"));
        }
        let e = &self.encoder;
        let mut x = e.conv_in.forward(image);
        for block in &e.down_blocks {
            for r in &block.resnets {
                x = r.forward(x, None);
            }
            if let Some(d) = &block.resample {
                x = d.forward(x.pad((0, 1, 0, 1), PadMode::Constant(0.0)));
            }
        }
        let x = e.conv_out.forward(e.conv_norm_out.forward_fused(e.mid.forward(x), None, true));
        let x = match &e.quant_conv {
            Some(conv) => conv.forward(x),
            None => x,
        };
        let lat = self.cfg.latent_channels;
        let mean = x.clone().narrow(1, 0, lat);
        let logvar = x.narrow(1, lat, lat).cast(BurnDType::F32).clamp(-30.0, 20.0).cast(mean.dtype());
        Ok((mean, logvar))
    }
}
