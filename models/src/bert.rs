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
    /// Loads `{name}.weight` and `{name}.bias` of width `h`.
    pub fn load(
        store: &WeightStore,
        name: &str,
        h: usize,
        eps: f64,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, LoadError> {
        Ok(LayerNorm {
            w: store.load::<B, 1>(&format!("{name}.weight"), [h], false, device, dtype)?,
            b: store.load::<B, 1>(&format!("{name}.bias"), [h], false, device, dtype)?,
            eps,
        })
    }

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
    /// The host (Flex, f32) forward: set by [`BertModel::use_host_path`]. `None`: every op
    /// runs as Burn tensor ops on padded batches (CUDA, f16, bf16).
    pub host: Option<HostParams>,
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
        let lin = |name: &str, out: usize, inp: usize| {
            Linear::<B>::load_biased(store, &format!("{pre}{name}"), out, inp, device, dtype)
        };
        let norm =
            |name: &str| LayerNorm::<B>::load(store, &format!("{pre}{name}"), h, cfg.layer_norm_eps, device, dtype);
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
            host: None,
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

    /// Runs the encoder over `inputs` and pools each. Returns `[inputs.len(), num_modes *
    /// hidden]` f32 values, row-major, normalized when asked. Every input must be non-empty,
    /// within `max_input_len` and the vocabulary. On the host path the inputs are packed
    /// without padding; otherwise they are padded to the longest one.
    pub fn embed(&self, inputs: &[&[u32]], pooling: Pooling, normalize: bool) -> Result<Vec<Vec<f32>>, String> {
        if let Some(host) = &self.host {
            return self.embed_host(host, inputs, pooling, normalize);
        }
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

// ---------------------------------------------------------------------------------------------
// Host path (Flex, f32): the inputs of a forward are packed one after another without padding
// (`[tokens, hidden]`), every linear layer is one Burn matmul over all of them, and the rest
// (bias adds, residuals, LayerNorm, GELU, per-sequence attention, pooling) runs as fused loops
// over host memory, compiled for AVX-512 / AVX2 where the CPU has them and split over the
// cores. Burn's elementwise ops on broadcast operands walk a scalar strided iterator; fused
// loops touch each activation once.
// ---------------------------------------------------------------------------------------------

/// LayerNorm parameters on the host.
pub struct HostNorm {
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}

/// Biases and norms of one encoder layer on the host (the weights stay Burn tensors).
pub struct HostLayer {
    qkv_b: Vec<f32>,
    attn_out_b: Vec<f32>,
    attn_norm: HostNorm,
    inter_b: Vec<f32>,
    out_b: Vec<f32>,
    output_norm: HostNorm,
}

/// What the host forward reads besides the linear weights.
pub struct HostParams {
    position: Vec<f32>,
    token_type0: Vec<f32>,
    embed_norm: HostNorm,
    layers: Vec<HostLayer>,
}

fn host_vec<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Result<Vec<f32>, LoadError> {
    t.clone().cast(BurnDType::F32).into_data().into_vec::<f32>().map_err(|e| LoadError::Weight {
        name: "encoder parameter".into(),
        message: format!("reading to the host: {e:?}"),
    })
}

impl<B: Backend> BertModel<B> {
    /// Switches to the host forward (only meaningful on the CPU backend with f32 weights;
    /// a no-op otherwise).
    pub fn use_host_path(&mut self) -> Result<(), LoadError> {
        if self.dtype != DType::F32 {
            return Ok(());
        }
        let norm = |n: &LayerNorm<B>| -> Result<HostNorm, LoadError> {
            Ok(HostNorm { w: host_vec(&n.w)?, b: host_vec(&n.b)?, eps: n.eps as f32 })
        };
        let bias = |l: &Linear<B>| -> Result<Vec<f32>, LoadError> {
            match &l.b {
                Some(b) => host_vec(b),
                None => Ok(vec![0.0; l.w.dims()[1]]),
            }
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(HostLayer {
                qkv_b: bias(&l.qkv)?,
                attn_out_b: bias(&l.attn_out)?,
                attn_norm: norm(&l.attn_norm)?,
                inter_b: bias(&l.intermediate)?,
                out_b: bias(&l.output)?,
                output_norm: norm(&l.output_norm)?,
            });
        }
        self.host = Some(HostParams {
            position: host_vec(&self.position)?,
            token_type0: host_vec(&self.token_type0)?,
            embed_norm: norm(&self.embed_norm)?,
            layers,
        });
        Ok(())
    }

    /// `x [rows, k] · w [k, n]` through the backend's gemm; gives `x` back with the product
    /// (both stay in the backend's buffers: no copies).
    fn host_matmul(&self, x: TensorData, w: &Tensor<B, 2>) -> (TensorData, TensorData) {
        let t = Tensor::<B, 2>::from_data(x, (&self.device, BurnDType::F32));
        let y = t.clone().matmul(w.clone()).into_data();
        (t.into_data(), y)
    }

    fn embed_host(
        &self,
        hp: &HostParams,
        inputs: &[&[u32]],
        pooling: Pooling,
        normalize: bool,
    ) -> Result<Vec<Vec<f32>>, String> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        if inputs.iter().any(|t| t.is_empty()) {
            return Err("empty input".into());
        }
        let longest = inputs.iter().map(|t| t.len()).max().unwrap_or(0);
        if longest > self.cfg.max_input_len() {
            return Err(format!(
                "input of {longest} tokens exceeds the model's {} positions",
                self.cfg.max_input_len()
            ));
        }
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = inputs.iter().flat_map(|t| t.iter()).find(|&&t| t >= vocab) {
            return Err(format!("token id {bad} is outside the vocabulary ({vocab} ids)"));
        }
        let (h, heads, f) = (self.cfg.hidden_size, self.cfg.num_attention_heads, self.cfg.intermediate_size);
        let hd = h / heads;
        let lens: Vec<usize> = inputs.iter().map(|t| t.len()).collect();
        let mut starts = Vec::with_capacity(lens.len() + 1);
        starts.push(0);
        for l in &lens {
            starts.push(starts.last().unwrap() + l);
        }
        let total = *starts.last().unwrap();
        let mut ids = Vec::with_capacity(total);
        let mut pos = Vec::with_capacity(total);
        for t in inputs {
            ids.extend(t.iter().map(|&x| x as i32));
            self.positions(t, &mut pos);
        }
        let max_pos = self.cfg.max_position_embeddings - 1;
        let pos: Vec<usize> = pos.iter().map(|&p| (p as usize).min(max_pos)).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [total]), &self.device);
        let mut x = self.word.clone().select(0, ids).into_data();
        let even = even_rows(total, h);
        par_rows(f32s(&mut x)?, h, &even, |r0, chunk| {
            embed_rows(chunk, &pos[r0..], &hp.position, &hp.token_type0, &hp.embed_norm)
        });
        let scale = 1.0 / (hd as f32).sqrt();
        let attn_split = attention_split(&starts, h);
        let geom = AttnGeom { hidden: h, heads, head_dim: hd, scale };
        let act = self.cfg.activation;
        // Every element is written by the attention of each layer; one buffer serves them all.
        let mut ctx = TensorData::new(vec![0f32; total * h], [total, h]);
        for (layer, hl) in self.layers.iter().zip(&hp.layers) {
            let (xs, mut qkv) = self.host_matmul(x, &layer.qkv.w);
            x = xs;
            let qkv = f32s(&mut qkv)?;
            par_rows(qkv, 3 * h, &even, |_, chunk| add_bias(chunk, &hl.qkv_b));
            par_rows(f32s(&mut ctx)?, h, &attn_split, |r0, chunk| attend(qkv, &starts, r0, chunk, &geom));
            let (c, mut y) = self.host_matmul(ctx, &layer.attn_out.w);
            ctx = c;
            par_rows2(f32s(&mut y)?, f32s(&mut x)?, h, &even, |c, r| {
                bias_residual_norm(c, r, &hl.attn_out_b, &hl.attn_norm)
            });
            let (xs, mut inter) = self.host_matmul(y, &layer.intermediate.w);
            x = xs;
            par_rows(f32s(&mut inter)?, f, &even, |_, chunk| bias_activation(chunk, &hl.inter_b, act));
            let (_, mut y) = self.host_matmul(inter, &layer.output.w);
            par_rows2(f32s(&mut y)?, f32s(&mut x)?, h, &even, |c, r| {
                bias_residual_norm(c, r, &hl.out_b, &hl.output_norm)
            });
            x = y;
        }
        let x = f32s(&mut x)?;
        Ok(lens
            .iter()
            .zip(&starts)
            .map(|(&n, &s)| {
                let mut v = pool_rows(&x[s * h..(s + n) * h], h, pooling);
                if normalize {
                    let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
                    v.iter_mut().for_each(|a| *a /= norm);
                }
                v
            })
            .collect())
    }
}

fn f32s(d: &mut TensorData) -> Result<&mut [f32], String> {
    d.as_mut_slice::<f32>().map_err(|e| format!("host activations: {e:?}"))
}

/// sentence-transformers pooling of one input's `[n, h]` token embeddings.
fn pool_rows(rows: &[f32], h: usize, pooling: Pooling) -> Vec<f32> {
    let n = rows.len() / h;
    let mut out = Vec::with_capacity(h * pooling.num_modes());
    if pooling.cls {
        out.extend_from_slice(&rows[..h]);
    }
    if pooling.max {
        let mut m = rows[..h].to_vec();
        for r in rows.chunks_exact(h).skip(1) {
            m.iter_mut().zip(r).for_each(|(a, b)| *a = a.max(*b));
        }
        out.extend(m);
    }
    if pooling.mean || pooling.mean_sqrt_len {
        let mut sum = vec![0f32; h];
        for r in rows.chunks_exact(h) {
            sum.iter_mut().zip(r).for_each(|(a, b)| *a += b);
        }
        if pooling.mean {
            out.extend(sum.iter().map(|s| s / n as f32));
        }
        if pooling.mean_sqrt_len {
            let d = (n as f32).sqrt();
            out.extend(sum.iter().map(|s| s / d));
        }
    }
    out
}

// ----- splitting work over the cores -----

fn num_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 16))
}

/// Below this many elements a part is not worth a thread.
const MIN_PART_ELEMS: usize = 32 * 1024;

/// Row boundaries `[0, .., rows]` cutting `rows` into equal parts, one per core (fewer when
/// small).
fn even_rows(rows: usize, row_len: usize) -> Vec<usize> {
    let parts = num_threads().min((rows * row_len / MIN_PART_ELEMS).max(1)).min(rows.max(1));
    (0..=parts).map(|i| i * rows / parts).collect()
}

/// Row boundaries for the attention: at input boundaries, balancing `n²` work.
fn attention_split(starts: &[usize], h: usize) -> Vec<usize> {
    let total = *starts.last().unwrap();
    let cost: Vec<usize> = starts.windows(2).map(|w| (w[1] - w[0]) * (w[1] - w[0] + 8)).collect();
    let all: usize = cost.iter().sum();
    let parts = num_threads().min((all * h / (4 * MIN_PART_ELEMS)).max(1)).min(cost.len());
    let mut bounds = vec![0];
    let mut acc = 0;
    for (i, c) in cost.iter().enumerate() {
        acc += c;
        if bounds.len() < parts && acc * parts >= all * bounds.len() && starts[i + 1] < total {
            bounds.push(starts[i + 1]);
        }
    }
    bounds.push(total);
    bounds
}

/// Runs `f(first_row, rows)` on the parts of `data` that `bounds` cuts, in parallel.
fn par_rows<F: Fn(usize, &mut [f32]) + Sync>(data: &mut [f32], row_len: usize, bounds: &[usize], f: F) {
    if bounds.len() <= 2 {
        f(0, data);
        return;
    }
    std::thread::scope(|s| {
        let mut rest = data;
        let mut parts = Vec::new();
        for w in bounds.windows(2) {
            let (a, b) = rest.split_at_mut((w[1] - w[0]) * row_len);
            parts.push((w[0], a));
            rest = b;
        }
        let mut parts = parts.into_iter();
        let (r0, first) = parts.next().unwrap();
        for (r, part) in parts {
            let f = &f;
            s.spawn(move || f(r, part));
        }
        f(r0, first);
    });
}

/// `par_rows` over `data` with the matching rows of `other`.
fn par_rows2<F: Fn(&mut [f32], &[f32]) + Sync>(
    data: &mut [f32],
    other: &[f32],
    row_len: usize,
    bounds: &[usize],
    f: F,
) {
    par_rows(data, row_len, bounds, |r0, chunk| {
        let n = chunk.len();
        f(chunk, &other[r0 * row_len..r0 * row_len + n])
    });
}

// ----- kernels (compiled for AVX-512 and AVX2+FMA, picked at run time) -----

#[cfg(target_arch = "x86_64")]
fn simd_level() -> u8 {
    static L: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *L.get_or_init(|| {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("fma")
        {
            2
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            1
        } else {
            0
        }
    })
}

/// Defines `$name` calling `$imp` compiled for the best instruction set the CPU has.
macro_rules! simd_kernel {
    ($name:ident => $imp:ident ($($a:ident : $t:ty),* $(,)?)) => {
        fn $name($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
                unsafe fn v4($($a: $t),*) {
                    $imp($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($a: $t),*) {
                    $imp($($a),*)
                }
                match simd_level() {
                    // SAFETY: the CPU has the features (checked at run time).
                    2 => return unsafe { v4($($a),*) },
                    1 => return unsafe { v3($($a),*) },
                    _ => {}
                }
            }
            $imp($($a),*)
        }
    };
}

/// Sum with 16 independent lanes (so it vectorizes).
#[inline(always)]
fn lane_sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            acc[k] += c[k];
        }
    }
    let mut s = 0.0;
    for a in &acc {
        s += a;
    }
    for v in chunks.remainder() {
        s += v;
    }
    s
}

#[inline(always)]
fn lane_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            acc[k] = acc[k].max(c[k]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for a in acc {
        m = m.max(a);
    }
    for v in chunks.remainder() {
        m = m.max(*v);
    }
    m
}

/// HF LayerNorm of one row, in place.
#[inline(always)]
fn layer_norm_row(row: &mut [f32], n: &HostNorm) {
    let inv_len = 1.0 / row.len() as f32;
    let mean = lane_sum(row) * inv_len;
    for v in row.iter_mut() {
        *v -= mean;
    }
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            acc[k] += c[k] * c[k];
        }
    }
    let mut ss = 0.0;
    for a in &acc {
        ss += a;
    }
    for v in chunks.remainder() {
        ss += v * v;
    }
    let r = 1.0 / (ss * inv_len + n.eps).sqrt();
    for ((v, w), b) in row.iter_mut().zip(&n.w).zip(&n.b) {
        *v = *v * r * w + b;
    }
}

#[inline(always)]
fn embed_rows_imp(x: &mut [f32], pos: &[usize], table: &[f32], tt: &[f32], n: &HostNorm) {
    let h = tt.len();
    for (row, &p) in x.chunks_exact_mut(h).zip(pos) {
        for ((v, a), b) in row.iter_mut().zip(&table[p * h..(p + 1) * h]).zip(tt) {
            *v = *v + a + b;
        }
        layer_norm_row(row, n);
    }
}
simd_kernel!(embed_rows => embed_rows_imp(x: &mut [f32], pos: &[usize], table: &[f32], tt: &[f32], n: &HostNorm));

#[inline(always)]
fn add_bias_imp(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        for (v, b) in row.iter_mut().zip(b) {
            *v += b;
        }
    }
}
simd_kernel!(add_bias => add_bias_imp(x: &mut [f32], b: &[f32]));

/// `LayerNorm(y + bias + residual)` row by row, in place in `y`.
#[inline(always)]
fn bias_residual_norm_imp(y: &mut [f32], residual: &[f32], b: &[f32], n: &HostNorm) {
    let h = b.len();
    for (row, res) in y.chunks_exact_mut(h).zip(residual.chunks_exact(h)) {
        for ((v, r), b) in row.iter_mut().zip(res).zip(b) {
            *v = *v + b + r;
        }
        layer_norm_row(row, n);
    }
}
simd_kernel!(bias_residual_norm => bias_residual_norm_imp(y: &mut [f32], residual: &[f32], b: &[f32], n: &HostNorm));

#[inline(always)]
fn bias_activation_imp(x: &mut [f32], b: &[f32], act: Activation) {
    for row in x.chunks_exact_mut(b.len()) {
        match act {
            Activation::Gelu => {
                for (v, b) in row.iter_mut().zip(b) {
                    let t = *v + b;
                    *v = 0.5 * t * (1.0 + erf_f32(t * std::f32::consts::FRAC_1_SQRT_2));
                }
            }
            Activation::GeluTanh => {
                for (v, b) in row.iter_mut().zip(b) {
                    let t = *v + b;
                    let c = 0.797_884_6_f32; // sqrt(2 / pi)
                    *v = 0.5 * t * (1.0 + (c * (t + 0.044_715 * t * t * t)).tanh());
                }
            }
            Activation::Relu => {
                for (v, b) in row.iter_mut().zip(b) {
                    *v = (*v + b).max(0.0);
                }
            }
        }
    }
}
simd_kernel!(bias_activation => bias_activation_imp(x: &mut [f32], b: &[f32], act: Activation));

/// Shape of the attention.
struct AttnGeom {
    hidden: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
}

/// Queries and keys per register tile of the attention kernel.
const QB: usize = 4;
const KB: usize = 16;

/// Self-attention of the inputs whose rows `ctx` holds (from row `r0`), reading the biased
/// `qkv [tokens, 3 * hidden]` (q, k, v, each heads × head_dim); writes the context rows.
/// Scores and context are computed in `QB × KB` register tiles (a small gemm), keys padded to
/// a multiple of `KB` with zeros that the softmax leaves out.
#[inline(always)]
fn attend_imp(qkv: &[f32], starts: &[usize], r0: usize, ctx: &mut [f32], g: &AttnGeom) {
    let (h, hd) = (g.hidden, g.head_dim);
    let stride = 3 * h;
    let r1 = r0 + ctx.len() / h;
    let mut kt: Vec<f32> = Vec::new();
    let mut scores: Vec<f32> = Vec::new();
    let mut qbuf = vec![0f32; QB * hd];
    for w in starts.windows(2) {
        let (s, e) = (w[0], w[1]);
        if s < r0 || e > r1 {
            continue;
        }
        let n = e - s;
        let np = n.div_ceil(KB) * KB;
        kt.clear();
        kt.resize(hd * np, 0.0);
        scores.clear();
        scores.resize(QB * np, 0.0);
        for head in 0..g.heads {
            let qo = head * hd;
            let ko = h + head * hd;
            let vo = 2 * h + head * hd;
            // Kᵀ [head_dim, np].
            for j in 0..n {
                let krow = &qkv[(s + j) * stride + ko..][..hd];
                for (d, &kv) in krow.iter().enumerate() {
                    kt[d * np + j] = kv;
                }
            }
            for i0 in (0..n).step_by(QB) {
                let qn = QB.min(n - i0);
                qbuf.fill(0.0);
                for r in 0..qn {
                    qbuf[r * hd..(r + 1) * hd].copy_from_slice(&qkv[(s + i0 + r) * stride + qo..][..hd]);
                }
                for jb in (0..np).step_by(KB) {
                    let mut acc = [[0f32; KB]; QB];
                    for d in 0..hd {
                        let kv: &[f32; KB] = kt[d * np + jb..][..KB].try_into().unwrap();
                        for r in 0..QB {
                            let qd = qbuf[r * hd + d];
                            for k in 0..KB {
                                acc[r][k] = qd.mul_add(kv[k], acc[r][k]);
                            }
                        }
                    }
                    for r in 0..QB {
                        scores[r * np + jb..][..KB].copy_from_slice(&acc[r]);
                    }
                }
                for r in 0..qn {
                    let row = &mut scores[r * np..(r + 1) * np];
                    for sc in row.iter_mut() {
                        *sc *= g.scale;
                    }
                    let m = lane_max(&row[..n]);
                    for sc in row.iter_mut() {
                        *sc = exp_f32(*sc - m);
                    }
                    let inv = 1.0 / lane_sum(&row[..n]);
                    for sc in row.iter_mut() {
                        *sc *= inv;
                    }
                }
                let mut cb = 0;
                while cb + KB <= hd {
                    let mut acc = [[0f32; KB]; QB];
                    for j in 0..n {
                        let vv: &[f32; KB] = qkv[(s + j) * stride + vo + cb..][..KB].try_into().unwrap();
                        for r in 0..QB {
                            let p = scores[r * np + j];
                            for k in 0..KB {
                                acc[r][k] = p.mul_add(vv[k], acc[r][k]);
                            }
                        }
                    }
                    for r in 0..qn {
                        ctx[(s + i0 + r - r0) * h + qo + cb..][..KB].copy_from_slice(&acc[r]);
                    }
                    cb += KB;
                }
                if cb < hd {
                    for r in 0..qn {
                        let out = &mut ctx[(s + i0 + r - r0) * h + qo + cb..][..hd - cb];
                        out.fill(0.0);
                        for j in 0..n {
                            let p = scores[r * np + j];
                            for (o, &vv) in out.iter_mut().zip(&qkv[(s + j) * stride + vo + cb..][..hd - cb]) {
                                *o += p * vv;
                            }
                        }
                    }
                }
            }
        }
    }
}
simd_kernel!(attend => attend_imp(qkv: &[f32], starts: &[usize], r0: usize, ctx: &mut [f32], g: &AttnGeom));

/// `exp` in f32 (Cephes' expf: range reduction by ln 2, degree-5 polynomial), branch-free so
/// a loop over a slice vectorizes; within 2 ulp of libm over the softmax range.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let r2 = r * r;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r2 + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn fast_exp_matches_libm_exp() {
        let mut worst = 0.0f32;
        for i in -800_000..=100_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (exp_f32(x), x.exp());
            worst = worst.max((got - want).abs() / want.max(f32::MIN_POSITIVE));
        }
        assert!(worst < 3e-7, "max relative error {worst:e}");
    }

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
