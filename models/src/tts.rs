//! Qwen3-TTS (12 Hz) in Burn: the talker (a Qwen3 decoder over the dual-track text + codec
//! input), the code predictor (codebooks 1..15 of every frame) and, in [`TtsEngine`], the
//! generation loop in the generic batcher with the streaming codec decoder of
//! [`crate::tts_decoder`]. See `docs/tts-design.md` for the reference behaviour reproduced here.
//!
//! One engine step runs the talker once over every scheduled utterance (prefill chunks and one
//! row per generating utterance, paged KV cache), picks codebook 0 for each utterance that
//! reached the end of its known rows, runs the code predictor's 15 steps batched over those
//! utterances (a fresh, per-frame KV cache), and decodes the new frames to audio with each
//! utterance's streaming decoder state, so audio leaves the step that generated it.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_actors::engine::{Engine, EngineError, EngineSpec, FinishReason, SeqId, SeqOutput, StepPlan};
use kiln_actors::{Sampler, SamplingParams, SpeechOutput, SpeechRequest, SpeechSampling};
use serde_json::Value;

use crate::backend::{choose_backend, dtype_bytes, BackendChoice};
use crate::config::{read_json, DecoderConfig};
use crate::qwen2::{host_rows, DecoderModel, ForwardSeq, KvCache, KvWriteMode, Linear};
use crate::tts_decoder::{TtsDecoder, TtsDecoderState};
use crate::weights::WeightStore;
use crate::{DType, DeviceSpec, LoadError};

/// Ids at the top of the codec vocabulary that are never sampled (control, language and
/// speaker ids): upstream suppresses `[vocab - 1024, vocab)` except the codec eos.
const SUPPRESSED_TOP: usize = 1024;
/// Codebook 0 cannot end the utterance before this many frames (`min_new_tokens`).
const MIN_FRAMES: usize = 2;

/// What the engine needs from `config.json` (the prompt side is `crate::tts_prompt`).
#[derive(Debug, Clone, PartialEq)]
pub struct TalkerSpec {
    pub talker: DecoderConfig,
    pub code_predictor: DecoderConfig,
    /// Codebooks per frame (16).
    pub num_code_groups: usize,
    /// Codebook size (the code predictor's vocabulary, 2048 in the real model).
    pub codebook_size: usize,
    pub text_vocab_size: usize,
    pub text_hidden_size: usize,
    pub codec_eos: u32,
    /// Text id fed once the trailing text is used up.
    pub tts_pad: u32,
}

impl TalkerSpec {
    /// Reads `dir/config.json` (a Qwen3-TTS folder).
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("config.json");
        let v = read_json(&path)?;
        Self::from_value(&v).map_err(|message| LoadError::Parse {
            path: path.display().to_string(),
            what: "Qwen3-TTS config",
            message,
        })
    }

    pub fn from_value(v: &Value) -> Result<Self, String> {
        if v["model_type"].as_str() != Some("qwen3_tts") {
            return Err(format!("model_type {:?}, expected \"qwen3_tts\"", v["model_type"]));
        }
        let tc = &v["talker_config"];
        let cc = &tc["code_predictor_config"];
        if !tc.is_object() || !cc.is_object() {
            return Err("talker_config.code_predictor_config is missing".into());
        }
        let uint = |o: &Value, k: &str| -> Result<usize, String> {
            o[k].as_u64().map(|x| x as usize).ok_or_else(|| format!("{k} is missing or not an integer"))
        };
        let talker = DecoderConfig::qwen3_from_value(tc).map_err(|e| format!("talker_config: {e}"))?;
        let code_predictor = DecoderConfig::qwen3_from_value(cc).map_err(|e| format!("code_predictor_config: {e}"))?;
        let num_code_groups = uint(tc, "num_code_groups")?;
        if num_code_groups < 2 || uint(cc, "num_code_groups").unwrap_or(num_code_groups) != num_code_groups {
            return Err(format!("num_code_groups {num_code_groups}: talker and code predictor disagree or < 2"));
        }
        let codebook_size = code_predictor.vocab_size;
        if talker.vocab_size < codebook_size + SUPPRESSED_TOP.min(talker.vocab_size) {
            return Err(format!(
                "codec vocab {} must hold the codebook ({codebook_size}) below its top {SUPPRESSED_TOP} control ids",
                talker.vocab_size
            ));
        }
        let codec_eos = uint(tc, "codec_eos_token_id")? as u32;
        if codec_eos as usize >= talker.vocab_size {
            return Err(format!("codec_eos_token_id {codec_eos} is outside the codec vocab"));
        }
        Ok(TalkerSpec {
            num_code_groups,
            codebook_size,
            text_vocab_size: uint(tc, "text_vocab_size")?,
            text_hidden_size: uint(tc, "text_hidden_size")?,
            codec_eos,
            tts_pad: uint(v, "tts_pad_token_id")? as u32,
            talker,
            code_predictor,
        })
    }

    /// Parameters of talker + code predictor (what the engine loads).
    pub fn num_params(&self) -> usize {
        let (t, c) = (&self.talker, &self.code_predictor);
        let (h, th) = (t.hidden_size, self.text_hidden_size);
        // `num_params` counts embed + untied head; the talker's embed is the codec embedding.
        let talker = t.num_params();
        let text = self.text_vocab_size * th + th * th + th + h * th + h;
        let groups = self.num_code_groups - 1;
        let cp_layers = c.num_params() - c.vocab_size * c.hidden_size * 2;
        let cp = cp_layers + groups * (self.codebook_size * h + c.hidden_size * self.codebook_size);
        let proj = if h != c.hidden_size { h * c.hidden_size + c.hidden_size } else { 0 };
        talker + text + cp + proj
    }
}

fn int_tensor<B: Backend>(v: Vec<i32>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// Talker + code predictor weights.
pub struct TtsModel<B: Backend> {
    pub spec: TalkerSpec,
    pub device: B::Device,
    pub dtype: DType,
    /// The talker's layers (fed embeddings; `forward_embeds` returns final-norm hidden states).
    pub talker: DecoderModel<B>,
    /// `[text_vocab, text_hidden]`.
    pub text_embedding: Tensor<B, 2>,
    /// `text_projection`: `fc2(silu(fc1(x)))`, text_hidden -> hidden.
    pub text_fc1: Linear<B>,
    pub text_fc2: Linear<B>,
    /// `[codec_vocab, hidden]`: codebook 0 and the control ids.
    pub codec_embedding: Tensor<B, 2>,
    /// `[hidden, codec_vocab]`.
    pub codec_head: Tensor<B, 2>,
    pub code_predictor: DecoderModel<B>,
    /// Codebooks 1.. embedded at the talker's width, stacked: `[(groups - 1) * codebook, hidden]`.
    pub cp_embedding: Tensor<B, 2>,
    /// `small_to_mtp_projection` (None when the widths are equal: Identity upstream).
    pub cp_projection: Option<Linear<B>>,
    /// One head per codebook 1..: `[cp_hidden, codebook]`.
    pub cp_heads: Vec<Tensor<B, 2>>,
}

impl<B: Backend> TtsModel<B> {
    pub fn load(
        spec: &TalkerSpec,
        store: &WeightStore,
        device: &B::Device,
        dtype: DType,
        kv_write_mode: KvWriteMode,
    ) -> Result<Self, LoadError> {
        let (h, th) = (spec.talker.hidden_size, spec.text_hidden_size);
        let ch = spec.code_predictor.hidden_size;
        let cb = spec.codebook_size;
        let talker =
            DecoderModel::load_prefixed(&spec.talker, store, "talker.model", false, device, dtype, kv_write_mode)?;
        let code_predictor = DecoderModel::load_prefixed(
            &spec.code_predictor,
            store,
            "talker.code_predictor.model",
            false,
            device,
            dtype,
            kv_write_mode,
        )?;
        let load2 =
            |name: &str, shape: [usize; 2], transpose: bool| store.load::<B, 2>(name, shape, transpose, device, dtype);
        let groups = spec.num_code_groups - 1;
        let cp_embedding = Tensor::cat(
            (0..groups)
                .map(|k| load2(&format!("talker.code_predictor.model.codec_embedding.{k}.weight"), [cb, h], false))
                .collect::<Result<Vec<_>, _>>()?,
            0,
        );
        let cp_heads = (0..groups)
            .map(|k| load2(&format!("talker.code_predictor.lm_head.{k}.weight"), [cb, ch], true))
            .collect::<Result<Vec<_>, _>>()?;
        let cp_projection = if store.contains("talker.code_predictor.small_to_mtp_projection.weight") {
            Some(Linear::load_biased(store, "talker.code_predictor.small_to_mtp_projection", ch, h, device, dtype)?)
        } else if h == ch {
            None
        } else {
            return Err(LoadError::Weight {
                name: "talker.code_predictor.small_to_mtp_projection.weight".into(),
                message: format!("missing, and the talker ({h}) and code predictor ({ch}) widths differ"),
            });
        };
        Ok(TtsModel {
            spec: spec.clone(),
            device: device.clone(),
            dtype,
            talker,
            text_embedding: load2("talker.model.text_embedding.weight", [spec.text_vocab_size, th], false)?,
            text_fc1: Linear::load_biased(store, "talker.text_projection.linear_fc1", th, th, device, dtype)?,
            text_fc2: Linear::load_biased(store, "talker.text_projection.linear_fc2", h, th, device, dtype)?,
            codec_embedding: load2("talker.model.codec_embedding.weight", [spec.talker.vocab_size, h], false)?,
            codec_head: load2("talker.codec_head.weight", [spec.talker.vocab_size, h], true)?,
            code_predictor,
            cp_embedding,
            cp_projection,
            cp_heads,
        })
    }

    /// `text_projection(text_embedding[ids])`: `[ids, hidden]`.
    pub fn text_rows(&self, ids: &[u32]) -> Tensor<B, 2> {
        let x = self
            .text_embedding
            .clone()
            .select(0, int_tensor::<B>(ids.iter().map(|&i| i as i32).collect(), &self.device));
        self.text_fc2.forward(silu(self.text_fc1.forward(x)))
    }

    /// Talker input rows of a prompt: `T(text) + C(codec)` (the codec part only where given).
    pub fn prompt_rows(&self, text: &[u32], codec: &[Option<u32>]) -> Tensor<B, 2> {
        let x = self.text_rows(text);
        let n = codec.len();
        let ids: Vec<i32> = codec.iter().map(|c| c.unwrap_or(0) as i32).collect();
        let mask: Vec<f32> = codec.iter().map(|c| if c.is_some() { 1.0 } else { 0.0 }).collect();
        let c = self.codec_embedding.clone().select(0, int_tensor::<B>(ids, &self.device));
        if mask.iter().all(|&m| m == 1.0) {
            return x + c;
        }
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [n, 1]), (&self.device, x.dtype()));
        x + c * mask
    }

    /// Talker input rows of generated frames: `C(code0) + sum_k E_k(code_k) + T(text)`, one row
    /// per frame.
    pub fn frame_rows(&self, frames: &[&[u32]], text: &[u32]) -> Tensor<B, 2> {
        let g = self.spec.num_code_groups;
        let cb = self.spec.codebook_size;
        let n = frames.len();
        let c0: Vec<i32> = frames.iter().map(|f| f[0] as i32).collect();
        let rest: Vec<i32> =
            frames.iter().flat_map(|f| (1..g).map(move |k| ((k - 1) * cb) as i32 + f[k] as i32)).collect();
        let h = self.spec.talker.hidden_size;
        let mut x = self.codec_embedding.clone().select(0, int_tensor::<B>(c0, &self.device));
        // Summed in codebook order, as upstream's Python loop.
        let r = self.cp_embedding.clone().select(0, int_tensor::<B>(rest, &self.device)).reshape([n, g - 1, h]);
        for k in 0..g - 1 {
            x = x + r.clone().narrow(1, k, 1).reshape([n, h]);
        }
        x + self.text_rows(text)
    }

    /// Codec logits of final-norm talker hidden states `[n, hidden]`, one f32 row each.
    pub fn codec_logits(&self, hidden: Tensor<B, 2>) -> Result<Vec<Vec<f32>>, String> {
        host_rows(hidden.matmul(self.codec_head.clone()))
    }

    fn project(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.cp_projection {
            Some(p) => p.forward(x),
            None => x,
        }
    }

    /// Codebooks 1.. of one frame for each of `n` utterances, batched: `hidden` is each
    /// utterance's final-norm talker state that produced `code0`. `pick(i, k, logits)` chooses
    /// codebook `k + 1` of utterance `i` from the raw logits. `cache` holds at least `n` blocks
    /// of `num_code_groups` positions; it is overwritten.
    pub fn predict_codes(
        &self,
        hidden: Tensor<B, 2>,
        code0: &[u32],
        cache: &mut KvCache<B>,
        mut pick: impl FnMut(usize, usize, &mut [f32]) -> u32,
    ) -> Result<Vec<Vec<u32>>, String> {
        let n = code0.len();
        let g = self.spec.num_code_groups;
        let h = self.spec.talker.hidden_size;
        if cache.block_size < g || cache.num_blocks < n {
            return Err(format!("code predictor cache too small for {n} frames"));
        }
        let tables: Vec<[u32; 1]> = (0..n as u32).map(|i| [i]).collect();
        let zeros = [0u32; 2];
        let c0 = self
            .codec_embedding
            .clone()
            .select(0, int_tensor::<B>(code0.iter().map(|&c| c as i32).collect(), &self.device));
        // Rows [h_i, C(code0_i)] per utterance.
        let first = Tensor::cat(vec![hidden.unsqueeze_dim::<3>(1), c0.unsqueeze_dim::<3>(1)], 1).reshape([2 * n, h]);
        let mut input = Some(self.project(first));
        let mut codes: Vec<Vec<u32>> = code0.iter().map(|&c| vec![c]).collect();
        for k in 0..g - 1 {
            let (start, len) = if k == 0 { (0, 2) } else { (k + 1, 1) };
            let seqs: Vec<ForwardSeq<'_>> = tables
                .iter()
                .map(|t| ForwardSeq { tokens: &zeros[..len], start, block_table: t, logits: true })
                .collect();
            let hs = self
                .code_predictor
                .forward_embeds(&seqs, input.take().ok_or("no input")?, cache)?
                .ok_or("no code predictor output")?;
            let logits = host_rows(hs.matmul(self.cp_heads[k].clone()))?;
            let mut picked = Vec::with_capacity(n);
            for (i, mut row) in logits.into_iter().enumerate() {
                let c = pick(i, k, &mut row);
                codes[i].push(c);
                picked.push(((k) * self.spec.codebook_size) as i32 + c as i32);
            }
            if k + 1 < g - 1 {
                input = Some(self.project(self.cp_embedding.clone().select(0, int_tensor::<B>(picked, &self.device))));
            }
        }
        Ok(codes)
    }
}

/// Codebook 0 logits processing upstream applies before sampling: the codec eos is blocked for
/// the first [`MIN_FRAMES`] picks, and the control ids at the top of the vocabulary never come.
pub fn mask_code0_logits(logits: &mut [f32], picks_so_far: usize, eos: u32) {
    let v = logits.len();
    let eos_logit = logits.get(eos as usize).copied();
    for x in &mut logits[v.saturating_sub(SUPPRESSED_TOP)..] {
        *x = f32::NEG_INFINITY;
    }
    if let Some(e) = eos_logit {
        logits[eos as usize] = if picks_so_far < MIN_FRAMES { f32::NEG_INFINITY } else { e };
    }
}

/// The samplers of one utterance: codebook 0 with the repetition penalty over its own picks,
/// codebooks 1.. without.
pub fn speech_samplers(s: &SpeechSampling) -> (Sampler, Sampler) {
    let p0 = SamplingParams {
        temperature: if s.do_sample { s.temperature } else { 0.0 },
        top_p: s.top_p,
        top_k: s.top_k,
        repetition_penalty: s.repetition_penalty,
        seed: Some(s.seed),
        ..Default::default()
    };
    let p1 = SamplingParams {
        temperature: if s.sub_do_sample { s.sub_temperature } else { 0.0 },
        top_p: s.sub_top_p,
        top_k: s.sub_top_k,
        seed: Some(s.seed ^ 0x9e37_79b9_7f4a_7c15),
        ..Default::default()
    };
    (Sampler::new(&p0, &[], None), Sampler::new(&p1, &[], None))
}

/// How to build a speech engine.
#[derive(Debug, Clone)]
pub struct TtsEngineOptions {
    pub device: DeviceSpec,
    pub dtype: DType,
    /// Tokens per KV block of the talker's cache.
    pub block_size: usize,
    /// Talker positions the KV pool holds (prompt rows + frames of all running utterances).
    pub kv_cache_tokens: usize,
    /// Talker rows of one step (prefill rows + one per generating utterance).
    pub max_batch_tokens: usize,
    /// Most utterances in one step.
    pub max_running: usize,
    /// Longest utterance: prompt rows + frames.
    pub max_model_len: usize,
}

impl Default for TtsEngineOptions {
    fn default() -> Self {
        TtsEngineOptions {
            device: DeviceSpec::Auto,
            dtype: DType::F32,
            block_size: 16,
            kv_cache_tokens: 16 * 1024,
            max_batch_tokens: 1024,
            max_running: 16,
            max_model_len: 4096,
        }
    }
}

/// Facts about a loaded speech model (logs, `/v1/models`, the memory ledger).
#[derive(Debug, Clone, PartialEq)]
pub struct TtsModelInfo {
    pub num_params: usize,
    pub weights_bytes: usize,
    pub dtype: DType,
    pub device: String,
    pub kv_bytes_per_token: usize,
    pub kv_cache_bytes: usize,
    pub sample_rate: u32,
    pub samples_per_frame: usize,
    pub num_code_groups: usize,
    pub load_seconds: f64,
}

struct Utterance<B: Backend> {
    req: SpeechRequest,
    /// Codes of every frame generated so far.
    frames: Vec<Vec<u32>>,
    /// Frames not yet decoded to audio.
    pending: usize,
    code0: Sampler,
    rest: Sampler,
    decoder: TtsDecoderState<B>,
}

/// An utterance with audio due this step: its slot in the batched decode, its decoder state
/// and its pending frames.
type DueDecode<'a, B> = (usize, &'a mut TtsDecoderState<B>, &'a [Vec<u32>]);

struct Runner<B: Backend> {
    model: TtsModel<B>,
    decoder: TtsDecoder<B>,
    cache: KvCache<B>,
    cp_cache: KvCache<B>,
    seqs: HashMap<SeqId, Utterance<B>>,
}

impl<B: Backend> Runner<B> {
    #[allow(clippy::too_many_arguments)]
    fn load(
        dir: &Path,
        spec: &TalkerSpec,
        store: &WeightStore,
        device: B::Device,
        opts: &TtsEngineOptions,
        num_blocks: usize,
        mode: KvWriteMode,
        host_kv_writer: Option<crate::qwen2::HostKvWriter<B>>,
    ) -> Result<Self, LoadError> {
        let mut model = TtsModel::<B>::load(spec, store, &device, opts.dtype, mode)?;
        model.talker.host_kv_writer = host_kv_writer;
        model.code_predictor.host_kv_writer = host_kv_writer;
        let decoder = TtsDecoder::<B>::from_dir(&dir.join("speech_tokenizer"), &device, opts.dtype)?;
        let cache = KvCache::new(&spec.talker, opts.block_size, num_blocks, &device, opts.dtype);
        let cp_cache =
            KvCache::new(&spec.code_predictor, spec.num_code_groups, opts.max_running.max(1), &device, opts.dtype);
        Ok(Runner { model, decoder, cache, cp_cache, seqs: HashMap::new() })
    }

    /// Runs the largest steps `spec` allows without touching live utterances: a prefill of the
    /// whole row budget, then `max_running` utterances generating at the end of the context
    /// (talker, code predictor for all of them, one decoded frame each).
    fn warmup(&mut self, spec: &EngineSpec) -> Result<(), String> {
        let (bs, nb) = (spec.block_size, spec.num_blocks);
        let cap = (nb * bs).min(spec.max_model_len).max(1);
        let h = self.model.spec.talker.hidden_size;
        let dev = self.model.device.clone();
        let dt = crate::weights::burn_dtype(self.model.dtype);
        let t = spec.max_batch_tokens.min(cap).max(1);
        let zeros = vec![0u32; t];
        let blocks: Vec<u32> = (0..t.div_ceil(bs) as u32).collect();
        let seq = ForwardSeq { tokens: &zeros, start: 0, block_table: &blocks, logits: true };
        self.model.talker.forward_embeds(&[seq], Tensor::zeros([t, h], (&dev, dt)), &mut self.cache)?;
        let rows = spec.max_running.min(spec.max_batch_tokens).max(1);
        let table: Vec<u32> = (0..cap.div_ceil(bs) as u32).collect();
        let decode: Vec<ForwardSeq<'_>> = (0..rows)
            .map(|_| ForwardSeq { tokens: &zeros[..1], start: cap - 1, block_table: &table, logits: true })
            .collect();
        let hidden =
            self.model.talker.forward_embeds(&decode, Tensor::zeros([rows, h], (&dev, dt)), &mut self.cache)?;
        let hidden = hidden.ok_or("no talker output")?;
        let _ = self.model.codec_logits(hidden.clone())?;
        let codes = self.model.predict_codes(hidden, &vec![0; rows], &mut self.cp_cache, |_, _, _| 0)?;
        for frame in codes {
            let mut state = self.decoder.new_state();
            self.decoder.push(&mut state, &[frame])?;
        }
        Ok(())
    }

    fn step(&mut self, plan: StepPlan<SpeechRequest>) -> Result<Vec<SeqOutput<SpeechOutput>>, EngineError> {
        for id in &plan.released {
            self.seqs.remove(id);
        }
        for (id, req) in plan.new {
            let (code0, rest) = speech_samplers(&req.sampling);
            let decoder = self.decoder.new_state();
            self.seqs.insert(id, Utterance { req, frames: Vec::new(), pending: 0, code0, rest, decoder });
        }
        if plan.seqs.is_empty() {
            return Ok(Vec::new());
        }
        let err = |m: String| EngineError::Step(m);
        // Talker input rows, in plan order.
        let pad = self.model.spec.tts_pad;
        let mut parts = Vec::new();
        let mut frame_refs: Vec<&[u32]> = Vec::new();
        let mut frame_text: Vec<u32> = Vec::new();
        let mut frame_part_pos: Vec<usize> = Vec::new();
        for s in &plan.seqs {
            let u = self.seqs.get(&s.id).ok_or_else(|| err(format!("sequence {} is unknown", s.id)))?;
            let plen = u.req.text_track.len();
            if s.start + s.len <= plen {
                let (a, b) = (s.start, s.start + s.len);
                parts.push(Some(self.model.prompt_rows(&u.req.text_track[a..b], &u.req.codec_track[a..b])));
            } else if s.start == plen + u.frames.len() - 1 && s.len == 1 && !u.frames.is_empty() {
                let g = u.frames.len() - 1;
                frame_refs.push(&u.frames[g]);
                frame_text.push(u.req.trailing_text.get(g).copied().unwrap_or(pad));
                frame_part_pos.push(parts.len());
                parts.push(None);
            } else {
                return Err(err(format!(
                    "sequence {}: scheduled rows {}..{} do not follow its {} prompt rows and {} frames",
                    s.id,
                    s.start,
                    s.start + s.len,
                    plen,
                    u.frames.len()
                )));
            }
        }
        if !frame_refs.is_empty() {
            let rows = self.model.frame_rows(&frame_refs, &frame_text);
            let h = self.model.spec.talker.hidden_size;
            for (j, &p) in frame_part_pos.iter().enumerate() {
                parts[p] = Some(rows.clone().narrow(0, j, 1).reshape([1, h]));
            }
        }
        let parts: Vec<Tensor<B, 2>> = parts.into_iter().map(|p| p.expect("every part built")).collect();
        let x = if parts.len() == 1 { parts.into_iter().next().expect("one part") } else { Tensor::cat(parts, 0) };
        let dummy = vec![0u32; plan.seqs.iter().map(|s| s.len).max().unwrap_or(1)];
        let fseqs: Vec<ForwardSeq<'_>> = plan
            .seqs
            .iter()
            .map(|s| ForwardSeq {
                tokens: &dummy[..s.len],
                start: s.start,
                block_table: &s.block_table,
                logits: s.sample,
            })
            .collect();
        let t_prof = Instant::now();
        let Some(hidden) = self.model.talker.forward_embeds(&fseqs, x, &mut self.cache).map_err(err)? else {
            return Ok(Vec::new());
        };
        let sampled: Vec<SeqId> = plan.seqs.iter().filter(|s| s.sample).map(|s| s.id).collect();
        let logits = self.model.codec_logits(hidden.clone()).map_err(err)?;
        let t_talker = t_prof.elapsed();
        let eos = self.model.spec.codec_eos;
        let mut outputs = Vec::with_capacity(sampled.len());
        // Utterances that got a new frame: (row in `hidden`, id, code0).
        let mut framed: Vec<(usize, SeqId, u32)> = Vec::new();
        for (row, (&id, mut l)) in sampled.iter().zip(logits).enumerate() {
            let u = self.seqs.get_mut(&id).expect("checked above");
            mask_code0_logits(&mut l, u.frames.len(), eos);
            let code0 = u.code0.sample(&mut l).token;
            if code0 == eos {
                outputs.push((id, Some(FinishReason::Stop)));
            } else {
                framed.push((row, id, code0));
                outputs.push((id, None));
            }
        }
        if !framed.is_empty() {
            let rows = int_tensor::<B>(framed.iter().map(|&(r, _, _)| r as i32).collect(), &self.model.device);
            let h = if framed.len() == sampled.len() { hidden } else { hidden.select(0, rows) };
            let code0: Vec<u32> = framed.iter().map(|&(_, _, c)| c).collect();
            let seqs = &mut self.seqs;
            let ids: Vec<SeqId> = framed.iter().map(|&(_, id, _)| id).collect();
            let codes = self
                .model
                .predict_codes(h, &code0, &mut self.cp_cache, |i, _k, l| {
                    seqs.get_mut(&ids[i]).expect("framed utterance").rest.sample(l).token
                })
                .map_err(err)?;
            for (id, frame) in ids.iter().zip(codes) {
                let u = self.seqs.get_mut(id).expect("framed utterance");
                u.frames.push(frame);
                u.pending += 1;
            }
        }
        let t_cp = t_prof.elapsed();
        // Which utterances end now and which have audio due; then one batched decode for all.
        let mut ends = Vec::with_capacity(outputs.len());
        let mut due: HashMap<SeqId, usize> = HashMap::new();
        for (id, mut finished) in outputs {
            let u = &self.seqs[&id];
            let new_frame = finished.is_none();
            if new_frame && u.frames.len() >= u.req.max_frames {
                finished = Some(FinishReason::Length);
            }
            let chunk = if u.pending == u.frames.len() { u.req.first_chunk_frames } else { u.req.chunk_frames };
            if u.pending > 0 && (u.pending >= chunk.max(1) || finished.is_some()) {
                due.insert(id, due.len());
            }
            ends.push((id, new_frame, finished));
        }
        let mut audio: Vec<Vec<f32>> = Vec::new();
        if !due.is_empty() {
            let mut states: Vec<DueDecode<'_, B>> = self
                .seqs
                .iter_mut()
                .filter_map(|(id, u)| {
                    let slot = *due.get(id)?;
                    let from = u.frames.len() - u.pending;
                    u.pending = 0;
                    Some((slot, &mut u.decoder, &u.frames[from..]))
                })
                .collect();
            states.sort_by_key(|s| s.0);
            let frames: Vec<&[Vec<u32>]> = states.iter().map(|s| s.2).collect();
            let mut refs: Vec<&mut TtsDecoderState<B>> = Vec::with_capacity(states.len());
            for (_, st, _) in states.iter_mut() {
                refs.push(st);
            }
            audio = self.decoder.push_batch(&mut refs, &frames).map_err(err)?;
        }
        let mut out = Vec::with_capacity(ends.len());
        for (id, new_frame, finished) in ends {
            let u = &self.seqs[&id];
            let audio = due.get(&id).map(|&slot| std::mem::take(&mut audio[slot])).unwrap_or_default();
            let frames =
                if new_frame { vec![u.frames.last().expect("a frame was pushed").clone()] } else { Vec::new() };
            out.push(SeqOutput { id, output: SpeechOutput { frames, audio, frames_total: u.frames.len() }, finished });
        }
        tracing::trace!(
            rows = plan.seqs.len(),
            talker_ms = t_talker.as_secs_f64() * 1e3,
            code_predictor_ms = (t_cp - t_talker).as_secs_f64() * 1e3,
            decoder_ms = (t_prof.elapsed() - t_cp).as_secs_f64() * 1e3,
            "speech step"
        );
        Ok(out)
    }
}

enum Inner {
    Flex(Box<Runner<burn::backend::Flex>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<Runner<burn::backend::Cuda>>, usize),
}

/// A Qwen3-TTS CustomVoice engine (talker + code predictor + 12 Hz decoder) on Flex or CUDA.
pub struct TtsEngine {
    inner: Inner,
    spec: EngineSpec,
    info: TtsModelInfo,
    talker: TalkerSpec,
    /// Peak host-memory growth seen by `warmup` on the CPU, or the CUDA pool growth (0: not
    /// measured).
    activation_peak: u64,
}

impl TtsEngine {
    /// Loads a Qwen3-TTS folder (`config.json`, `model.safetensors`, `speech_tokenizer/`).
    /// Runs on the engine thread.
    pub fn load(dir: &Path, opts: &TtsEngineOptions) -> Result<TtsEngine, LoadError> {
        let t0 = Instant::now();
        if opts.block_size == 0 || opts.max_running == 0 {
            return Err(LoadError::Unsupported("block_size and max_running must be > 0".into()));
        }
        let talker = TalkerSpec::from_dir(dir)?;
        let backend = choose_backend(opts.device)?;
        let store = WeightStore::open(dir)?;
        let num_blocks = opts.kv_cache_tokens.div_ceil(opts.block_size).max(1);
        let inner = match backend {
            BackendChoice::Flex => Inner::Flex(Box::new(Runner::load(
                dir,
                &talker,
                &store,
                burn::backend::flex::FlexDevice,
                opts,
                num_blocks,
                KvWriteMode::SliceRuns,
                Some(crate::flex_kv::write_runs),
            )?)),
            #[cfg(feature = "cuda")]
            BackendChoice::Cuda(n) => Inner::Cuda(
                Box::new(Runner::load(
                    dir,
                    &talker,
                    &store,
                    burn::backend::cuda::CudaDevice::new(n),
                    opts,
                    num_blocks,
                    KvWriteMode::ScatterNd,
                    None,
                )?),
                n,
            ),
            #[cfg(not(feature = "cuda"))]
            BackendChoice::Cuda(n) => {
                return Err(LoadError::Unsupported(format!("cuda:{n} requested but this build has no CUDA backend")))
            }
        };
        let (samples_per_frame, sample_rate) = match &inner {
            Inner::Flex(r) => (r.decoder.samples_per_frame(), r.decoder.cfg.output_sample_rate),
            #[cfg(feature = "cuda")]
            Inner::Cuda(r, _) => (r.decoder.samples_per_frame(), r.decoder.cfg.output_sample_rate),
        };
        let eb = dtype_bytes(opts.dtype);
        let kv_bytes_per_token = talker.talker.kv_elements_per_token() * eb;
        let num_params = talker.num_params();
        let info = TtsModelInfo {
            num_params,
            weights_bytes: num_params * eb,
            dtype: opts.dtype,
            device: backend.describe(),
            kv_bytes_per_token,
            kv_cache_bytes: kv_bytes_per_token * num_blocks * opts.block_size,
            sample_rate: sample_rate as u32,
            samples_per_frame,
            num_code_groups: talker.num_code_groups,
            load_seconds: t0.elapsed().as_secs_f64(),
        };
        let spec = EngineSpec {
            block_size: opts.block_size,
            num_blocks,
            max_model_len: opts.max_model_len,
            max_batch_tokens: opts.max_batch_tokens,
            max_running: opts.max_running,
        };
        tracing::info!(device = %info.device, params = num_params, kv_blocks = num_blocks, seconds = info.load_seconds, "speech model loaded");
        Ok(TtsEngine { inner, spec, info, talker, activation_peak: 0 })
    }

    pub fn model_info(&self) -> &TtsModelInfo {
        &self.info
    }

    pub fn talker_spec(&self) -> &TalkerSpec {
        &self.talker
    }
}

impl Engine for TtsEngine {
    type Request = SpeechRequest;
    type Output = SpeechOutput;

    fn spec(&self) -> EngineSpec {
        self.spec.clone()
    }

    fn warmup(&mut self) -> Result<(), EngineError> {
        let spec = self.spec.clone();
        match &mut self.inner {
            Inner::Flex(r) => {
                let probe = crate::memory::PeakProbe::start();
                r.warmup(&spec).map_err(EngineError::Step)?;
                if let Some(p) = probe {
                    self.activation_peak = p.finish();
                }
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda(r, n) => {
                let n = *n;
                let before = crate::engine::cuda_reserved_bytes(n);
                r.warmup(&spec).map_err(EngineError::Step)?;
                if let (Some(b), Some(a)) = (before, crate::engine::cuda_reserved_bytes(n)) {
                    self.activation_peak = a.saturating_sub(b);
                }
            }
        }
        Ok(())
    }

    fn memory(&self) -> kiln_actors::MemoryBytes {
        kiln_actors::MemoryBytes {
            weights: self.info.weights_bytes as u64,
            kv: self.info.kv_cache_bytes as u64,
            activations: self.activation_peak,
        }
    }

    fn step(&mut self, plan: StepPlan<SpeechRequest>) -> Result<Vec<SeqOutput<SpeechOutput>>, EngineError> {
        match &mut self.inner {
            Inner::Flex(r) => r.step(plan),
            #[cfg(feature = "cuda")]
            Inner::Cuda(r, _) => r.step(plan),
        }
    }
}
