//! Qwen2 / Llama decoder (HF layout), generic over the Burn backend, with a paged KV cache and
//! one batched forward per step over a flattened token batch that mixes prefill chunks and
//! decode tokens of different sequences.
//!
//! Per layer the number of Burn ops is constant: all linear layers run once on `[T, hidden]`;
//! attention runs once for the decode group (every `len == 1` sequence, padded to the longest
//! context) and once for the prefill group (every chunk, padded to the longest chunk), with
//! index and mask tensors built once per step on the host and reused in every layer.

use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{DType as BurnDType, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::config::DecoderConfig;
use crate::weights::{burn_dtype, WeightStore};
use crate::{DType, LoadError};

/// A linear layer stored as `[in, out]` so forward is `x.matmul(w)`.
pub struct Linear<B: Backend> {
    pub w: Tensor<B, 2>,
    pub b: Option<Tensor<B, 1>>,
}

impl<B: Backend> Linear<B> {
    /// Loads `{name}.weight` (HF `[out, in]`, stored transposed for `x.matmul(w)`) and
    /// `{name}.bias`.
    pub fn load_biased(
        store: &WeightStore,
        name: &str,
        out: usize,
        inp: usize,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self, LoadError> {
        let w = store.load::<B, 2>(&format!("{name}.weight"), [out, inp], true, device, dtype)?;
        let b = store.load::<B, 1>(&format!("{name}.bias"), [out], false, device, dtype)?;
        Ok(Linear { w, b: Some(b) })
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = x.matmul(self.w.clone());
        match &self.b {
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        }
    }
}

pub struct RmsNorm<B: Backend> {
    pub w: Tensor<B, 1>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// HF RMSNorm: statistics in f32, scale in the model dtype.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let dtype = x.dtype();
        let xf = x.cast(BurnDType::F32);
        let var = xf.clone().square().mean_dim(1);
        let y = xf * var.add_scalar(self.eps).sqrt().recip();
        y.cast(dtype) * self.w.clone().unsqueeze::<2>()
    }
}

pub struct DecoderLayer<B: Backend> {
    pub input_norm: RmsNorm<B>,
    /// q, k and v projections fused: `[hidden, (heads + 2 kv_heads) * head_dim]`.
    pub qkv: Linear<B>,
    pub o: Linear<B>,
    pub post_norm: RmsNorm<B>,
    /// gate and up projections fused: `[hidden, 2 * intermediate]`.
    pub gate_up: Linear<B>,
    pub down: Linear<B>,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3), over `head_dim`.
    pub qk_norm: Option<(RmsNorm<B>, RmsNorm<B>)>,
}

/// The paged KV cache: per layer, K and V as `[num_blocks * block_size, kv_heads, head_dim]`.
pub struct KvCache<B: Backend> {
    pub k: Vec<Option<Tensor<B, 3>>>,
    pub v: Vec<Option<Tensor<B, 3>>>,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(cfg: &DecoderConfig, block_size: usize, num_blocks: usize, device: &B::Device, dtype: DType) -> Self {
        let slots = block_size * num_blocks;
        let shape = [slots, cfg.num_key_value_heads, cfg.head_dim];
        let mk = || Some(Tensor::<B, 3>::zeros(shape, (device, burn_dtype(dtype))));
        KvCache {
            k: (0..cfg.num_hidden_layers).map(|_| mk()).collect(),
            v: (0..cfg.num_hidden_layers).map(|_| mk()).collect(),
            block_size,
            num_blocks,
        }
    }
}

/// How a step's new K/V rows are written into the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvWriteMode {
    /// One in-place `slice_assign` per contiguous run of slots (Flex: `scatter_nd` copies the
    /// whole cache there, `slice_assign` on a uniquely owned tensor does not).
    SliceRuns,
    /// One `scatter_nd` (assign) per layer (GPU backends: in place, one kernel).
    ScatterNd,
}

/// One sequence's share of a forward pass.
#[derive(Debug, Clone)]
pub struct ForwardSeq<'a> {
    /// Tokens fed now, at positions `start .. start + tokens.len()`.
    pub tokens: &'a [u32],
    pub start: usize,
    /// Blocks covering positions `0 .. start + tokens.len()`.
    pub block_table: &'a [u32],
    /// Return the logits of the last fed token.
    pub logits: bool,
}

enum KvWrite<B: Backend> {
    /// (first slot, first flat row, length).
    Runs(Vec<(usize, usize, usize)>),
    Scatter(Tensor<B, 2, Int>),
}

/// One attention call over a padded batch of sequences whose flat rows are contiguous.
struct AttnGroup<B: Backend> {
    row0: usize,
    rows: usize,
    b: usize,
    qmax: usize,
    kmax: usize,
    /// `[b * kmax]` cache slots (padding: slot 0).
    gather: Tensor<B, 1, Int>,
    /// `[b * qmax]` group-local row of each padded query (None when no padding).
    q_scatter: Option<Tensor<B, 1, Int>>,
    /// `[rows]` padded position of each real row (None when no padding).
    out_select: Option<Tensor<B, 1, Int>>,
    /// `[b, 1, 1, qmax, kmax]` additive mask (0 or -inf), f32.
    bias: Tensor<B, 5>,
}

/// Everything a step needs on the device, built once and reused by every layer.
struct StepBatch<B: Backend> {
    t: usize,
    ids: Tensor<B, 1, Int>,
    cos: Tensor<B, 3>,
    sin: Tensor<B, 3>,
    write: KvWrite<B>,
    groups: Vec<AttnGroup<B>>,
    logit_rows: Option<Tensor<B, 1, Int>>,
    n_logits: usize,
}

pub struct DecoderModel<B: Backend> {
    pub cfg: DecoderConfig,
    pub dtype: DType,
    pub device: B::Device,
    /// `[vocab, hidden]`; None for decoders fed embeddings (the Qwen3-TTS talker and code
    /// predictor), see [`DecoderModel::forward_embeds`].
    pub embed: Option<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `[hidden, vocab]`; None when tied (then `embed.transpose()`).
    pub lm_head: Option<Tensor<B, 2>>,
    pub inv_freq: Vec<f32>,
    pub kv_write_mode: KvWriteMode,
    /// Writes `(first slot, first row, length)` runs of new K/V rows into a cache in place on
    /// the host, for CPU backends whose scatter/slice-assign copy the whole cache per call.
    pub host_kv_writer: Option<HostKvWriter<B>>,
}

/// `(cache, new rows, runs) -> cache`, see [`DecoderModel::host_kv_writer`].
pub type HostKvWriter<B> = fn(Tensor<B, 3>, Tensor<B, 3>, &[(usize, usize, usize)]) -> Tensor<B, 3>;

/// The rows of a `[n, cols]` tensor as f32 host vectors (logits read back for sampling).
pub fn host_rows<B: Backend>(x: Tensor<B, 2>) -> Result<Vec<Vec<f32>>, String> {
    let [_, cols] = x.dims();
    let flat: Vec<f32> =
        x.cast(BurnDType::F32).into_data().into_vec::<f32>().map_err(|e| format!("reading logits: {e:?}"))?;
    Ok(flat.chunks(cols.max(1)).map(<[f32]>::to_vec).collect())
}

fn int_tensor<B: Backend, const D: usize>(v: Vec<i32>, shape: [usize; D], device: &B::Device) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn f32_tensor<B: Backend, const D: usize>(
    v: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
    dtype: BurnDType,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v, shape), (device, dtype))
}

impl<B: Backend> DecoderModel<B> {
    /// Loads the weights of `cfg` from `store` (HF causal-LM names: `model.*`, `lm_head`).
    pub fn load(
        cfg: &DecoderConfig,
        store: &WeightStore,
        device: &B::Device,
        dtype: DType,
        kv_write_mode: KvWriteMode,
    ) -> Result<Self, LoadError> {
        Self::load_prefixed(cfg, store, "model", true, device, dtype, kv_write_mode)
    }

    /// Loads the layers and final norm under `{prefix}.layers.*` / `{prefix}.norm`; with
    /// `with_embed`, also `{prefix}.embed_tokens` and `lm_head` (else the model is fed
    /// embeddings and returns hidden states: [`DecoderModel::forward_embeds`]).
    pub fn load_prefixed(
        cfg: &DecoderConfig,
        store: &WeightStore,
        prefix: &str,
        with_embed: bool,
        device: &B::Device,
        dtype: DType,
        kv_write_mode: KvWriteMode,
    ) -> Result<Self, LoadError> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let qd = cfg.num_attention_heads * hd;
        let kvd = cfg.num_key_value_heads * hd;
        let inter = cfg.intermediate_size;
        let lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear<B>, LoadError> {
            let w = store.load::<B, 2>(&format!("{name}.weight"), [out, inp], true, device, dtype)?;
            let b = if bias {
                Some(store.load::<B, 1>(&format!("{name}.bias"), [out], false, device, dtype)?)
            } else {
                None
            };
            Ok(Linear { w, b })
        };
        let cat = |parts: Vec<Linear<B>>| -> Linear<B> {
            let has_bias = parts[0].b.is_some();
            let ws = parts.iter().map(|p| p.w.clone()).collect();
            let b = if has_bias {
                Some(Tensor::cat(parts.iter().map(|p| p.b.clone().unwrap()).collect(), 0))
            } else {
                None
            };
            Linear { w: Tensor::cat(ws, 1), b }
        };
        let norm_of = |name: &str, dim: usize| -> Result<RmsNorm<B>, LoadError> {
            Ok(RmsNorm {
                w: store.load::<B, 1>(&format!("{name}.weight"), [dim], false, device, dtype)?,
                eps: cfg.rms_norm_eps,
            })
        };
        let norm = |name: &str| norm_of(name, h);
        let embed = if with_embed {
            Some(store.load::<B, 2>(
                &format!("{prefix}.embed_tokens.weight"),
                [cfg.vocab_size, h],
                false,
                device,
                dtype,
            )?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("{prefix}.layers.{i}");
            let qkv = cat(vec![
                lin(&format!("{p}.self_attn.q_proj"), qd, h, cfg.qkv_bias)?,
                lin(&format!("{p}.self_attn.k_proj"), kvd, h, cfg.qkv_bias)?,
                lin(&format!("{p}.self_attn.v_proj"), kvd, h, cfg.qkv_bias)?,
            ]);
            let gate_up = cat(vec![
                lin(&format!("{p}.mlp.gate_proj"), inter, h, cfg.mlp_bias)?,
                lin(&format!("{p}.mlp.up_proj"), inter, h, cfg.mlp_bias)?,
            ]);
            layers.push(DecoderLayer {
                input_norm: norm(&format!("{p}.input_layernorm"))?,
                qkv,
                o: lin(&format!("{p}.self_attn.o_proj"), h, qd, cfg.o_bias)?,
                post_norm: norm(&format!("{p}.post_attention_layernorm"))?,
                gate_up,
                down: lin(&format!("{p}.mlp.down_proj"), h, inter, cfg.mlp_bias)?,
                qk_norm: if cfg.qk_norm {
                    Some((
                        norm_of(&format!("{p}.self_attn.q_norm"), hd)?,
                        norm_of(&format!("{p}.self_attn.k_norm"), hd)?,
                    ))
                } else {
                    None
                },
            });
        }
        let norm_f = norm(&format!("{prefix}.norm"))?;
        let lm_head = if !with_embed || (cfg.tie_word_embeddings && !store.contains("lm_head.weight")) {
            None
        } else if cfg.tie_word_embeddings {
            // Tied but stored anyway: the embedding is the same matrix.
            None
        } else {
            Some(store.load::<B, 2>("lm_head.weight", [cfg.vocab_size, h], true, device, dtype)?)
        };
        Ok(DecoderModel {
            cfg: cfg.clone(),
            dtype,
            device: device.clone(),
            embed,
            layers,
            norm: norm_f,
            lm_head,
            inv_freq: cfg.rope_inv_freq(),
            kv_write_mode,
            host_kv_writer: None,
        })
    }

    /// Builds the step's index, mask and RoPE tensors.
    ///
    /// `check_ids`: token ids must be in the vocabulary (off when fed embeddings). Returns the
    /// batch and the flat order (sequence index of each flat segment).
    fn prepare(
        &self,
        seqs: &[ForwardSeq<'_>],
        cache: &KvCache<B>,
        check_ids: bool,
    ) -> Result<(StepBatch<B>, Vec<usize>), String> {
        let dev = &self.device;
        let bs = cache.block_size;
        let slots_total = cache.block_size * cache.num_blocks;
        // Flat order: decode sequences (len 1) first, then prefill chunks.
        let mut order: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].tokens.len() == 1).collect();
        let n_decode = order.len();
        order.extend((0..seqs.len()).filter(|&i| seqs[i].tokens.len() > 1));
        for s in seqs {
            if s.tokens.is_empty() {
                return Err("a scheduled sequence feeds 0 tokens".into());
            }
            let end = s.start + s.tokens.len();
            let need = end.div_ceil(bs);
            if s.block_table.len() < need {
                return Err(format!("block table has {} blocks, {} positions need {need}", s.block_table.len(), end));
            }
            if let Some(&b) = s.block_table[..need].iter().find(|&&b| b as usize >= cache.num_blocks) {
                return Err(format!("block id {b} out of range (pool has {})", cache.num_blocks));
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| check_ids && t as usize >= self.cfg.vocab_size) {
                return Err(format!("token id {t} out of range (vocab {})", self.cfg.vocab_size));
            }
        }
        let slot = |s: &ForwardSeq<'_>, pos: usize| s.block_table[pos / bs] as usize * bs + pos % bs;

        let t: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let hd = self.cfg.head_dim;
        let half = hd / 2;
        let mut ids = Vec::with_capacity(t);
        let mut cos = Vec::with_capacity(t * hd);
        let mut sin = Vec::with_capacity(t * hd);
        let mut row_of_seq = vec![0usize; seqs.len()];
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        let mut scatter: Vec<i32> = Vec::new();
        let mut row = 0usize;
        for &i in &order {
            let s = &seqs[i];
            row_of_seq[i] = row;
            for (j, &tok) in s.tokens.iter().enumerate() {
                let pos = s.start + j;
                ids.push(tok as i32);
                let p = pos as f32;
                let (c, sn): (Vec<f32>, Vec<f32>) = self
                    .inv_freq
                    .iter()
                    .map(|f| {
                        let a = p * f;
                        (a.cos(), a.sin())
                    })
                    .unzip();
                cos.extend_from_slice(&c);
                cos.extend_from_slice(&c);
                sin.extend_from_slice(&sn);
                sin.extend_from_slice(&sn);
                let sl = slot(s, pos);
                scatter.push(sl as i32);
                match runs.last_mut() {
                    Some((s0, r0, len)) if *s0 + *len == sl && *r0 + *len == row + j => *len += 1,
                    _ => runs.push((sl, row + j, 1)),
                }
            }
            row += s.tokens.len();
        }
        debug_assert_eq!(half * 2, hd);
        debug_assert!(scatter.iter().all(|&x| (x as usize) < slots_total));
        let fdt = burn_dtype(self.dtype);
        let write = match self.kv_write_mode {
            KvWriteMode::SliceRuns => KvWrite::Runs(runs),
            KvWriteMode::ScatterNd => KvWrite::Scatter(int_tensor::<B, 2>(scatter, [t, 1], dev)),
        };

        let mut groups = Vec::new();
        for (members, row0) in [(&order[..n_decode], 0usize), (&order[n_decode..], n_decode)] {
            if members.is_empty() {
                continue;
            }
            let b = members.len();
            let qmax = members.iter().map(|&i| seqs[i].tokens.len()).max().unwrap();
            let kmax = members.iter().map(|&i| seqs[i].start + seqs[i].tokens.len()).max().unwrap();
            let rows: usize = members.iter().map(|&i| seqs[i].tokens.len()).sum();
            let mut gather = vec![0i32; b * kmax];
            let mut bias = vec![f32::NEG_INFINITY; b * qmax * kmax];
            let mut q_scatter = vec![0i32; b * qmax];
            let mut out_select = Vec::with_capacity(rows);
            let mut local = 0usize;
            for (bi, &i) in members.iter().enumerate() {
                let s = &seqs[i];
                let len = s.tokens.len();
                for pos in 0..s.start + len {
                    gather[bi * kmax + pos] = slot(s, pos) as i32;
                }
                for qi in 0..qmax {
                    let brow = &mut bias[(bi * qmax + qi) * kmax..(bi * qmax + qi + 1) * kmax];
                    if qi < len {
                        for x in brow.iter_mut().take(s.start + qi + 1) {
                            *x = 0.0;
                        }
                        q_scatter[bi * qmax + qi] = (local + qi) as i32;
                        out_select.push((bi * qmax + qi) as i32);
                    } else {
                        // Padding query: attends to key 0 only, its output is dropped.
                        brow[0] = 0.0;
                    }
                }
                local += len;
            }
            let padded = rows != b * qmax;
            groups.push(AttnGroup {
                row0,
                rows,
                b,
                qmax,
                kmax,
                gather: int_tensor::<B, 1>(gather, [b * kmax], dev),
                q_scatter: padded.then(|| int_tensor::<B, 1>(q_scatter, [b * qmax], dev)),
                out_select: padded.then(|| int_tensor::<B, 1>(out_select, [rows], dev)),
                bias: f32_tensor::<B, 5>(bias, [b, 1, 1, qmax, kmax], dev, BurnDType::F32),
            });
        }

        let logit_seqs: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].logits).collect();
        let rows: Vec<i32> = logit_seqs.iter().map(|&i| (row_of_seq[i] + seqs[i].tokens.len() - 1) as i32).collect();
        let n_logits = rows.len();
        let batch = StepBatch {
            t,
            ids: int_tensor::<B, 1>(ids, [t], dev),
            cos: f32_tensor::<B, 3>(cos, [t, 1, hd], dev, BurnDType::F32).cast(fdt),
            sin: f32_tensor::<B, 3>(sin, [t, 1, hd], dev, BurnDType::F32).cast(fdt),
            write,
            groups,
            logit_rows: (n_logits > 0).then(|| int_tensor::<B, 1>(rows, [n_logits], dev)),
            n_logits,
        };
        Ok((batch, order))
    }

    fn rope(&self, x: Tensor<B, 3>, batch: &StepBatch<B>) -> Tensor<B, 3> {
        let half = self.cfg.head_dim / 2;
        let x1 = x.clone().narrow(2, 0, half);
        let x2 = x.clone().narrow(2, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
        x * batch.cos.clone() + rotated * batch.sin.clone()
    }

    fn write_kv(&self, cache: Tensor<B, 3>, new: Tensor<B, 3>, write: &KvWrite<B>) -> Tensor<B, 3> {
        match write {
            KvWrite::Runs(runs) if self.host_kv_writer.is_some() => {
                (self.host_kv_writer.expect("checked"))(cache, new, runs)
            }
            KvWrite::Runs(runs) => {
                let mut cache = cache;
                for &(slot, row, len) in runs {
                    // A one-dimension slice spec for Burn, not a vector of ranges.
                    #[allow(clippy::single_range_in_vec_init)]
                    let slots = [slot..slot + len];
                    cache = cache.slice_assign(slots, new.clone().narrow(0, row, len));
                }
                cache
            }
            KvWrite::Scatter(idx) => cache.scatter_nd(idx.clone(), new, IndexingUpdateOp::Assign),
        }
    }

    fn attention(
        &self,
        q: Tensor<B, 3>,
        k_cache: &Tensor<B, 3>,
        v_cache: &Tensor<B, 3>,
        g: &AttnGroup<B>,
    ) -> Tensor<B, 2> {
        let heads = self.cfg.num_attention_heads;
        let kvh = self.cfg.num_key_value_heads;
        let groups = heads / kvh;
        let hd = self.cfg.head_dim;
        let (b, qmax, kmax) = (g.b, g.qmax, g.kmax);
        let dtype = q.dtype();
        let mut qg = q.narrow(0, g.row0, g.rows);
        if let Some(idx) = &g.q_scatter {
            qg = qg.select(0, idx.clone());
        }
        // [b, qmax, kvh, groups, hd] -> [b, kvh, groups * qmax, hd]
        let qg = qg.reshape([b, qmax, kvh, groups, hd]).permute([0, 2, 3, 1, 4]).reshape([b, kvh, groups * qmax, hd]);
        let k = k_cache.clone().select(0, g.gather.clone()).reshape([b, kmax, kvh, hd]).swap_dims(1, 2);
        let v = v_cache.clone().select(0, g.gather.clone()).reshape([b, kmax, kvh, hd]).swap_dims(1, 2);
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = qg.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
        let scores = scores.cast(BurnDType::F32).reshape([b, kvh, groups, qmax, kmax]) + g.bias.clone();
        let probs = softmax(scores, 4).cast(dtype).reshape([b, kvh, groups * qmax, kmax]);
        let out = probs
            .matmul(v)
            .reshape([b, kvh, groups, qmax, hd])
            .permute([0, 3, 1, 2, 4])
            .reshape([b * qmax, heads * hd]);
        match &g.out_select {
            Some(idx) => out.select(0, idx.clone()),
            None => out,
        }
    }

    /// Runs one batched forward over `seqs`, writing their K/V into `cache`. Returns, for each
    /// sequence with `logits == true` (in order), the f32 logits of its last fed token.
    pub fn forward(&self, seqs: &[ForwardSeq<'_>], cache: &mut KvCache<B>) -> Result<Vec<Vec<f32>>, String> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let embed = self.embed.as_ref().ok_or("this decoder is fed embeddings, not token ids")?;
        let (batch, _order) = self.prepare(seqs, cache, true)?;
        let x = embed.clone().select(0, batch.ids.clone());
        let Some(last) = self.layers_forward(x, &batch, cache) else {
            return Ok(Vec::new());
        };
        let logits = match &self.lm_head {
            Some(w) => last.matmul(w.clone()),
            None => last.matmul(embed.clone().transpose()),
        };
        debug_assert_eq!(logits.dims(), [batch.n_logits, self.cfg.vocab_size]);
        host_rows(logits)
    }

    /// Like [`DecoderModel::forward`], but fed input embeddings: `embeds` is `[rows, hidden]`,
    /// the rows of every sequence in `seqs` order (`tokens` only give each sequence's length;
    /// their values are ignored). Returns the final-norm hidden states `[n, hidden]` of the last
    /// fed row of each sequence with `logits == true`, in order (None when there are none).
    pub fn forward_embeds(
        &self,
        seqs: &[ForwardSeq<'_>],
        embeds: Tensor<B, 2>,
        cache: &mut KvCache<B>,
    ) -> Result<Option<Tensor<B, 2>>, String> {
        if seqs.is_empty() {
            return Ok(None);
        }
        let rows: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let [n, hidden] = embeds.dims();
        if n != rows || hidden != self.cfg.hidden_size {
            return Err(format!(
                "embeddings are [{n}, {hidden}]; the sequences feed {rows} rows of {}",
                self.cfg.hidden_size
            ));
        }
        let (batch, order) = self.prepare(seqs, cache, false)?;
        // The step runs decode rows first: reorder when `seqs` interleaves the two kinds.
        let mut first_row = Vec::with_capacity(seqs.len());
        let mut acc = 0usize;
        for s in seqs {
            first_row.push(acc);
            acc += s.tokens.len();
        }
        let perm: Vec<i32> =
            order.iter().flat_map(|&i| (first_row[i]..first_row[i] + seqs[i].tokens.len()).map(|r| r as i32)).collect();
        let x = if perm.iter().enumerate().all(|(i, &r)| i as i32 == r) {
            embeds
        } else {
            embeds.select(0, int_tensor::<B, 1>(perm, [rows], &self.device))
        };
        Ok(self.layers_forward(x, &batch, cache))
    }

    /// The decoder layers over the step's flat rows `x`; the final-norm hidden states of the
    /// logit rows.
    fn layers_forward(
        &self,
        mut x: Tensor<B, 2>,
        batch: &StepBatch<B>,
        cache: &mut KvCache<B>,
    ) -> Option<Tensor<B, 2>> {
        let heads = self.cfg.num_attention_heads;
        let kvh = self.cfg.num_key_value_heads;
        let hd = self.cfg.head_dim;
        let t = batch.t;
        let inter = self.cfg.intermediate_size;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(x.clone());
            let qkv = layer.qkv.forward(h);
            let mut q = qkv.clone().narrow(1, 0, heads * hd);
            let mut k = qkv.clone().narrow(1, heads * hd, kvh * hd);
            let v = qkv.narrow(1, (heads + kvh) * hd, kvh * hd).reshape([t, kvh, hd]);
            if let Some((qn, kn)) = &layer.qk_norm {
                q = qn.forward(q.reshape([t * heads, hd])).reshape([t, heads * hd]);
                k = kn.forward(k.reshape([t * kvh, hd])).reshape([t, kvh * hd]);
            }
            let q = self.rope(q.reshape([t, heads, hd]), batch);
            let k = self.rope(k.reshape([t, kvh, hd]), batch);
            let kc = self.write_kv(cache.k[l].take().expect("k cache"), k, &batch.write);
            let vc = self.write_kv(cache.v[l].take().expect("v cache"), v, &batch.write);
            let mut parts = Vec::with_capacity(batch.groups.len());
            for g in &batch.groups {
                parts.push(self.attention(q.clone(), &kc, &vc, g));
            }
            cache.k[l] = Some(kc);
            cache.v[l] = Some(vc);
            let attn = if parts.len() == 1 { parts.pop().unwrap() } else { Tensor::cat(parts, 0) };
            x = x + layer.o.forward(attn);
            let h = layer.post_norm.forward(x.clone());
            let gu = layer.gate_up.forward(h);
            let gate = gu.clone().narrow(1, 0, inter);
            let up = gu.narrow(1, inter, inter);
            x = x + layer.down.forward(silu(gate) * up);
        }
        let rows = batch.logit_rows.clone()?;
        Some(self.norm.forward(x.select(0, rows)))
    }

    /// Parameter count of the loaded weights.
    pub fn num_params(&self) -> usize {
        self.cfg.num_params()
    }
}
