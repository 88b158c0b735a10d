//! BERT and XLM-RoBERTa encoders (HF `BertModel` / `XLMRobertaModel` layout), generic over the
//! Burn backend, with the sentence-transformers pooling (mean, CLS, max, mean-sqrt-len) and
//! optional L2 normalisation.
//!
//! One forward runs a padded `[B, L]` batch: every linear layer runs once on `[B * L, hidden]`,
//! attention once on `[B, heads, L, L]` with an additive key-padding mask. Post-LN encoder
//! layers, exact (erf) GELU. LayerNorm, softmax and pooling run in f32 whatever the weights'
//! dtype. XLM-R differs only in its position ids (`padding_idx + 1 + i` for real tokens, as
//! `create_position_ids_from_input_ids`) and its config.

use std::path::Path;

use burn::tensor::activation::{gelu, gelu_approximate, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{DType as BurnDType, Int, Tensor, TensorData};

use crate::qwen2::Linear;
use crate::weights::WeightStore;
use crate::{DType, LoadError};

/// Which encoder family a `config.json` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderKind {
    /// `bert` (MiniLM, bge, e5): positions `0 .. L`.
    Bert,
    /// `xlm-roberta` / `roberta` (multilingual e5, paraphrase-multilingual): positions offset
    /// by `pad_token_id + 1`.
    XlmRoberta,
}

/// The feed-forward activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: exact, with erf.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    Relu,
}

/// The fields of a BERT / XLM-R `config.json` the encoder needs.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    pub kind: EncoderKind,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    pub pad_token_id: u32,
}

fn parse_err(path: &Path, message: String) -> LoadError {
    LoadError::Parse { path: path.display().to_string(), what: "encoder config", message }
}

impl EncoderConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("config.json");
        let v = crate::config::read_json(&path)?;
        Self::from_value(&v).map_err(|m| parse_err(&path, m))
    }

    pub fn from_value(v: &serde_json::Value) -> Result<Self, String> {
        let model_type = v["model_type"].as_str().unwrap_or("");
        let kind = match model_type {
            "bert" => EncoderKind::Bert,
            "xlm-roberta" | "roberta" | "camembert" => EncoderKind::XlmRoberta,
            other => {
                return Err(format!(
                    "model_type {other:?} is not an encoder Kiln implements (bert, xlm-roberta, roberta)"
                ))
            }
        };
        if let Some(p) = v["position_embedding_type"].as_str() {
            if p != "absolute" {
                return Err(format!("position_embedding_type {p:?} is not supported (only \"absolute\")"));
            }
        }
        let usize_field = |k: &str| -> Result<usize, String> {
            v[k].as_u64().map(|x| x as usize).ok_or_else(|| format!("missing or invalid {k}"))
        };
        let activation = match v["hidden_act"].as_str().unwrap_or("gelu") {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => return Err(format!("hidden_act {other:?} is not supported")),
        };
        let cfg = EncoderConfig {
            kind,
            vocab_size: usize_field("vocab_size")?,
            hidden_size: usize_field("hidden_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads: usize_field("num_attention_heads")?,
            intermediate_size: usize_field("intermediate_size")?,
            max_position_embeddings: usize_field("max_position_embeddings")?,
            type_vocab_size: v["type_vocab_size"].as_u64().unwrap_or(2) as usize,
            layer_norm_eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-12),
            activation,
            pad_token_id: v["pad_token_id"].as_u64().unwrap_or(match kind {
                EncoderKind::Bert => 0,
                EncoderKind::XlmRoberta => 1,
            }) as u32,
        };
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            ));
        }
        Ok(cfg)
    }

    /// Position id of the first token.
    pub fn position_offset(&self) -> usize {
        match self.kind {
            EncoderKind::Bert => 0,
            EncoderKind::XlmRoberta => self.pad_token_id as usize + 1,
        }
    }

    /// Longest input the position table allows.
    pub fn max_input_len(&self) -> usize {
        self.max_position_embeddings.saturating_sub(self.position_offset())
    }

    pub fn num_params(&self) -> usize {
        let (h, f) = (self.hidden_size, self.intermediate_size);
        let emb = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h;
        let layer = 4 * (h * h + h) + 2 * (h * f) + f + h + 4 * h;
        emb + self.num_hidden_layers * layer
    }
}

/// How token embeddings become one sentence vector (`1_Pooling/config.json`). Several modes
/// are concatenated in the order cls, max, mean, mean_sqrt_len (sentence-transformers' order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pooling {
    pub cls: bool,
    pub max: bool,
    pub mean: bool,
    pub mean_sqrt_len: bool,
}

impl Pooling {
    pub const MEAN: Pooling = Pooling { cls: false, max: false, mean: true, mean_sqrt_len: false };
    pub const CLS: Pooling = Pooling { cls: true, max: false, mean: false, mean_sqrt_len: false };
    pub const MAX: Pooling = Pooling { cls: false, max: true, mean: false, mean_sqrt_len: false };
    pub const MEAN_SQRT_LEN: Pooling = Pooling { cls: false, max: false, mean: false, mean_sqrt_len: true };

    /// Number of pooled vectors concatenated.
    pub fn num_modes(&self) -> usize {
        [self.cls, self.max, self.mean, self.mean_sqrt_len].iter().filter(|x| **x).count()
    }

    /// e.g. `mean` or `cls+mean`.
    pub fn describe(&self) -> String {
        let names = [(self.cls, "cls"), (self.max, "max"), (self.mean, "mean"), (self.mean_sqrt_len, "mean_sqrt_len")];
        names.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect::<Vec<_>>().join("+")
    }
}

/// HF LayerNorm: statistics in f32.
pub struct LayerNorm<B: Backend> {
    pub w: Tensor<B, 1>,
    pub b: Tensor<B, 1>,
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let dtype = x.dtype();
        let xf = x.cast(BurnDType::F32);
        let mean = xf.clone().mean_dim(1);
        let centered = xf - mean;
        let var = centered.clone().square().mean_dim(1);
        let y = centered * var.add_scalar(self.eps).sqrt().recip();
        y.cast(dtype) * self.w.clone().unsqueeze::<2>() + self.b.clone().unsqueeze::<2>()
    }
}

pub struct EncoderLayer<B: Backend> {
    /// query, key and value fused: `[hidden, 3 * hidden]`.
    pub qkv: Linear<B>,
    pub attn_out: Linear<B>,
    pub attn_norm: LayerNorm<B>,
    pub intermediate: Linear<B>,
    pub output: Linear<B>,
    pub output_norm: LayerNorm<B>,
}

/// A BERT / XLM-R encoder (no pooler head: sentence-transformers reads the token embeddings).
pub struct BertModel<B: Backend> {
    pub cfg: EncoderConfig,
    /// Compute the exact GELU on the host with a vectorized erf (the CPU backend's erf is a
    /// scalar libm call per element, ~20% of a forward). Only for f32 on the host backend.
    pub host_gelu: bool,
    pub dtype: DType,
    pub device: B::Device,
    pub word: Tensor<B, 2>,
    pub position: Tensor<B, 2>,
    /// Row 0 of the token-type table (every input is a single segment), `[1, hidden]`.
    pub token_type0: Tensor<B, 2>,
    pub embed_norm: LayerNorm<B>,
    pub layers: Vec<EncoderLayer<B>>,
}

/// Finds the prefix under which a checkpoint stores the encoder (`""` for `BertModel`
/// checkpoints, `bert.` / `roberta.` for ones saved from a task head).
fn weight_prefix(store: &WeightStore) -> Result<&'static str, LoadError> {
    for p in ["", "bert.", "roberta.", "model.", "xlm_roberta."] {
        if store.contains(&format!("{p}embeddings.word_embeddings.weight")) {
            return Ok(p);
        }
    }
    Err(LoadError::Weight {
        name: "embeddings.word_embeddings.weight".into(),
        message: "missing from checkpoint (also tried the bert., roberta. and model. prefixes)".into(),
    })
}

impl<B: Backend> BertModel<B> {
    pub fn load(cfg: &EncoderConfig, store: &WeightStore, device: &B::Device, dtype: DType) -> Result<Self, LoadError> {
        let pre = weight_prefix(store)?;
        let h = cfg.hidden_size;
        let f = cfg.intermediate_size;
        let lin = |name: &str, out: usize, inp: usize| -> Result<Linear<B>, LoadError> {
            let w = store.load::<B, 2>(&format!("{pre}{name}.weight"), [out, inp], true, device, dtype)?;
            let b = store.load::<B, 1>(&format!("{pre}{name}.bias"), [out], false, device, dtype)?;
            Ok(Linear { w, b: Some(b) })
        };
        let norm = |name: &str| -> Result<LayerNorm<B>, LoadError> {
            Ok(LayerNorm {
                w: store.load::<B, 1>(&format!("{pre}{name}.weight"), [h], false, device, dtype)?,
                b: store.load::<B, 1>(&format!("{pre}{name}.bias"), [h], false, device, dtype)?,
                eps: cfg.layer_norm_eps,
            })
        };
        let word = store.load::<B, 2>(
            &format!("{pre}embeddings.word_embeddings.weight"),
            [cfg.vocab_size, h],
            false,
            device,
            dtype,
        )?;
        let position = store.load::<B, 2>(
            &format!("{pre}embeddings.position_embeddings.weight"),
            [cfg.max_position_embeddings, h],
            false,
            device,
            dtype,
        )?;
        let token_type0 = store
            .load::<B, 2>(
                &format!("{pre}embeddings.token_type_embeddings.weight"),
                [cfg.type_vocab_size, h],
                false,
                device,
                dtype,
            )?
            .narrow(0, 0, 1);
        let embed_norm = norm("embeddings.LayerNorm")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let q = lin(&format!("{p}.attention.self.query"), h, h)?;
            let k = lin(&format!("{p}.attention.self.key"), h, h)?;
            let v = lin(&format!("{p}.attention.self.value"), h, h)?;
            let qkv = Linear {
                w: Tensor::cat(vec![q.w, k.w, v.w], 1),
                b: Some(Tensor::cat(vec![q.b.unwrap(), k.b.unwrap(), v.b.unwrap()], 0)),
            };
            layers.push(EncoderLayer {
                qkv,
                attn_out: lin(&format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                intermediate: lin(&format!("{p}.intermediate.dense"), f, h)?,
                output: lin(&format!("{p}.output.dense"), h, f)?,
                output_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(BertModel {
            cfg: cfg.clone(),
            host_gelu: false,
            dtype,
            device: device.clone(),
            word,
            position,
            token_type0,
            embed_norm,
            layers,
        })
    }

    /// Position ids of one input, as HF computes them (XLM-R: pad tokens keep `padding_idx`).
    fn positions(&self, tokens: &[u32], out: &mut Vec<i32>) {
        match self.cfg.kind {
            EncoderKind::Bert => out.extend((0..tokens.len()).map(|i| i as i32)),
            EncoderKind::XlmRoberta => {
                let pad = self.cfg.pad_token_id;
                let mut n = 0;
                out.extend(tokens.iter().map(|&t| {
                    if t == pad {
                        pad as i32
                    } else {
                        n += 1;
                        (pad + n) as i32
                    }
                }));
            }
        }
    }

    /// Runs the encoder over `inputs` padded to the longest one and pools each. Returns
    /// `[inputs.len(), num_modes * hidden]` f32 values, row-major, normalized when asked.
    /// Every input must be non-empty, within `max_input_len` and the vocabulary.
    pub fn embed(&self, inputs: &[&[u32]], pooling: Pooling, normalize: bool) -> Result<Vec<Vec<f32>>, String> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let b = inputs.len();
        let l = inputs.iter().map(|t| t.len()).max().unwrap_or(0);
        if l == 0 || inputs.iter().any(|t| t.is_empty()) {
            return Err("empty input".into());
        }
        if l > self.cfg.max_input_len() {
            return Err(format!("input of {l} tokens exceeds the model's {} positions", self.cfg.max_input_len()));
        }
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = inputs.iter().flat_map(|t| t.iter()).find(|&&t| t >= vocab) {
            return Err(format!("token id {bad} is outside the vocabulary ({vocab} ids)"));
        }
        let dev = &self.device;
        let (h, heads) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let hd = h / heads;
        let pad = self.cfg.pad_token_id;
        let mut ids = Vec::with_capacity(b * l);
        let mut pos = Vec::with_capacity(b * l);
        let mut mask = Vec::with_capacity(b * l);
        let mut padded = Vec::with_capacity(l);
        for t in inputs {
            padded.clear();
            padded.extend_from_slice(t);
            padded.resize(l, pad);
            ids.extend(padded.iter().map(|&x| x as i32));
            self.positions(&padded, &mut pos);
            mask.extend((0..l).map(|i| if i < t.len() { 1f32 } else { 0f32 }));
        }
        // Padding positions get a real (in-range) id; their rows are masked everywhere.
        for p in pos.iter_mut() {
            *p = (*p).min(self.cfg.max_position_embeddings as i32 - 1);
        }
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [b * l]), dev);
        let pos = Tensor::<B, 1, Int>::from_data(TensorData::new(pos, [b * l]), dev);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [b, l]), (dev, BurnDType::F32));
        let padding = inputs.iter().any(|t| t.len() < l);
        // [b, 1, 1, l]: 0 for real keys, a large negative for padding (as HF's finfo.min).
        let bias = padding.then(|| (mask.clone() - 1.0).mul_scalar(1e30).reshape([b, 1, 1, l]));

        let x = self.word.clone().select(0, ids) + self.position.clone().select(0, pos) + self.token_type0.clone();
        let mut x = self.embed_norm.forward(x);
        let scale = 1.0 / (hd as f64).sqrt();
        let dtype = x.dtype();
        for layer in &self.layers {
            let qkv = layer.qkv.forward(x.clone());
            let split = |i: usize| qkv.clone().narrow(1, i * h, h).reshape([b, l, heads, hd]).swap_dims(1, 2);
            let (q, k, v) = (split(0), split(1), split(2));
            let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale).cast(BurnDType::F32);
            let scores = match &bias {
                Some(bias) => scores + bias.clone(),
                None => scores,
            };
            let probs = softmax(scores, 3).cast(dtype);
            let ctx = probs.matmul(v).swap_dims(1, 2).reshape([b * l, h]);
            x = layer.attn_norm.forward(layer.attn_out.forward(ctx) + x);
            let inter = layer.intermediate.forward(x.clone());
            let inter = match self.cfg.activation {
                Activation::Gelu if self.host_gelu && dtype == BurnDType::F32 => gelu_on_host(inter)?,
                Activation::Gelu => gelu(inter),
                Activation::GeluTanh => gelu_approximate(inter),
                Activation::Relu => burn::tensor::activation::relu(inter),
            };
            x = layer.output_norm.forward(layer.output.forward(inter) + x);
        }
        let tokens = x.cast(BurnDType::F32).reshape([b, l, h]);
        let pooled = pool(tokens, mask, pooling);
        let pooled = if normalize { l2_normalize(pooled) } else { pooled };
        let dim = pooled.dims()[1];
        let flat: Vec<f32> = pooled.into_data().into_vec::<f32>().map_err(|e| format!("reading embeddings: {e:?}"))?;
        Ok(flat.chunks(dim).map(<[f32]>::to_vec).collect())
    }
}

/// erf as XLA and Eigen compute it in f32: a rational function of x on [-4, 4] (outside, erf is
/// ±1 in f32), |error| below 1e-6. Branch-free, so a loop over a slice vectorizes.
#[inline]
pub fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.9546e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_474e-2;
    x * p / q
}

/// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))`, in place.
pub fn gelu_slice(v: &mut [f32]) {
    for x in v.iter_mut() {
        *x = 0.5 * *x * (1.0 + erf_f32(*x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

fn gelu_on_host<B: Backend>(x: Tensor<B, 2>) -> Result<Tensor<B, 2>, String> {
    let shape = x.dims();
    let device = x.device();
    let mut v: Vec<f32> = x.into_data().into_vec::<f32>().map_err(|e| format!("gelu: {e:?}"))?;
    gelu_slice(&mut v);
    Ok(Tensor::from_data(TensorData::new(v, shape), (&device, BurnDType::F32)))
}

/// sentence-transformers `Pooling` over `[b, l, h]` f32 token embeddings with a `[b, l]` mask.
pub fn pool<B: Backend>(tokens: Tensor<B, 3>, mask: Tensor<B, 2>, pooling: Pooling) -> Tensor<B, 2> {
    let [b, l, h] = tokens.dims();
    let m = mask.clone().reshape([b, l, 1]);
    let count = mask.sum_dim(1).clamp_min(1e-9); // [b, 1]
    let mut parts = Vec::new();
    if pooling.cls {
        parts.push(tokens.clone().narrow(1, 0, 1).reshape([b, h]));
    }
    if pooling.max {
        // Padding rows become -1e9, as sentence-transformers sets them.
        let masked = tokens.clone() * m.clone() + (m.clone() - 1.0).mul_scalar(1e9);
        parts.push(masked.max_dim(1).reshape([b, h]));
    }
    if pooling.mean || pooling.mean_sqrt_len {
        let sum = (tokens * m).sum_dim(1).reshape([b, h]);
        if pooling.mean {
            parts.push(sum.clone() / count.clone());
        }
        if pooling.mean_sqrt_len {
            parts.push(sum / count.sqrt());
        }
    }
    if parts.len() == 1 {
        parts.pop().unwrap()
    } else {
        Tensor::cat(parts, 1)
    }
}

/// `torch.nn.functional.normalize(x, p=2, dim=1)` (eps 1e-12).
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn fast_erf_matches_libm_erf() {
        let xs: Vec<f32> = (-80_000..=80_000).map(|i| i as f32 * 1e-4).collect();
        let dev = Default::default();
        let reference: Vec<f32> = Tensor::<Flex, 1>::from_data(TensorData::new(xs.clone(), [xs.len()]), &dev)
            .erf()
            .into_data()
            .into_vec()
            .unwrap();
        let worst = xs.iter().zip(&reference).map(|(x, r)| (erf_f32(*x) - r).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-6, "max abs error {worst:e}");
        let mut g = vec![-3.0f32, -0.5, 0.0, 0.5, 3.0];
        gelu_slice(&mut g);
        let want = [-0.004_049_7, -0.154_268_5, 0.0, 0.345_731_5, 2.995_950_3];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
