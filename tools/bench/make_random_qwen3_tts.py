#!/usr/bin/env python3
"""Writes a random-weight Qwen3-TTS 12 Hz CustomVoice folder with the sizes of the published
0.6B model (Qwen3-TTS-12Hz-0.6B-CustomVoice), for benchmarking Kiln's speech path against
`qwen-tts` (tools/bench/qwen_tts_baseline.py). The weights are random: the audio is noise, but
every matmul / conv has its real shape, so the compute per frame is the real model's.

Built the same way as the test fixture (tools/oracle/make_tts_fixtures.py, imported as a module
for its weight initialisation, decoder scaling and config clean-up): the `qwen-tts` package's own
classes, saved with `save_pretrained`, then reloaded with `Qwen3TTSModel.from_pretrained` and run
once (greedy, max_new_tokens 8) to prove the folder loads.

Sizes (docs/tts-design.md section 1):
  talker          hidden 1024, 28 layers, 16 heads / 8 kv heads, head_dim 128, ffn 3072,
                  codec vocab 3072 (codebook 2048 + 1024 control ids), text vocab 151936,
                  text_hidden 2048, rope_theta 1e6 with the interleaved mrope [24, 20, 20],
                  rms_norm_eps 1e-6; real control ids (pad 2148, bos 2149, eos 2150, think 2154,
                  nothink 2155, think_bos 2156, think_eos 2157), languages english 2050 /
                  chinese 2055 / sichuan_dialect 2062, speakers aiden 2861 / eric 2875
                  (sichuan dialect) / vivian 3065.
  code predictor  hidden 1024 (= talker hidden, so small_to_mtp_projection is Identity), 5 layers,
                  16 heads / 8 kv, head_dim 128, ffn 3072, vocab 2048, 16 code groups.
  tts_model_size  "0b6": generate_custom_voice silently drops `instruct` for it, as upstream.
  speech decoder  codebook 2048, codebook_dim 512, latent 1024, decoder_dim 1536, hidden 512,
                  ffn 1024, 8 layers, 16 heads / 16 kv, head_dim 64, sliding window 72,
                  upsample_rates [8,5,4,3], upsampling_ratios [2,2], 16 quantizers.
  speech encoder  (Mimi, voice cloning only - CustomVoice never runs it) kept tiny, as in the
                  fixture: it is not part of the benchmark.

Text tokenizer: the fixture's cut-down real Qwen BPE (tests/fixtures/tts-tiny/vocab.json,
merges.txt, tokenizer_config.json) is copied as is. Its special tokens have ids 1034..1066
(<|im_start|> 1035, <|im_end|> 1036, <tts_pad> 1062, <tts_text_bos> 1063, <tts_text_eod> 1064),
not the real 151643.., so config.json's im_start/im_end/tts_pad/tts_bos/tts_eos ids are set to
the fixture's ids. They are valid rows of the 151936-row text embedding (the rows above 1066 are
never looked up; they exist so the embedding has its real size).

Weights: random, initialised like the fixture (codec_head / code predictor lm_heads scaled to
logit std ~3), saved as float16 (Kiln converts to float32 at load; qwen-tts casts to the dtype
it is given). To keep generation running to the frame cap (the benchmark measures fixed frame
counts), the codec_head row of codec_eos (2150) is set to zero: the eos logit is then exactly 0
for every hidden state, while the best of the 2048 codebook logits is ~+8..10, so greedy decoding
(and top-k 50 sampling) practically never picks eos. This is checked on the load test.

    df -h /                                   # needs >= 8 GB free (the folder is ~2 GB)
    /tmp/kiln-tts-venv/bin/python tools/bench/make_random_qwen3_tts.py \
        --out /tmp/kiln-models/qwen3-tts-0.6b-random

Takes a few minutes on one CPU thread and ~6 GB of RAM.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURE_SCRIPT = REPO / "tools/oracle/make_tts_fixtures.py"
FIXTURE_DIR = REPO / "tests/fixtures/tts-tiny"


def load_fixture_module():
    """tools/oracle/make_tts_fixtures.py as a module (it sets one torch thread, CPU only, offline,
    and imports qwen_tts quietly)."""
    spec = importlib.util.spec_from_file_location("make_tts_fixtures", FIXTURE_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_tts_fixtures"] = mod
    spec.loader.exec_module(mod)
    return mod


CODEBOOK = 2048
CODEC_VOCAB = CODEBOOK + 1024
CODEC_EOS = 2150


def fixture_special_ids() -> dict[str, int]:
    cfg = json.loads((FIXTURE_DIR / "tokenizer_config.json").read_text())
    return {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}


def make_configs(fx, sp: dict[str, int]):
    talker = dict(
        vocab_size=CODEC_VOCAB,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000,
        rope_scaling={"interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        attention_bias=False,
        num_code_groups=16,
        text_hidden_size=2048,
        text_vocab_size=151936,
        codec_eos_token_id=CODEC_EOS,
        codec_think_id=2154,
        codec_nothink_id=2155,
        codec_think_bos_id=2156,
        codec_think_eos_id=2157,
        codec_pad_id=2148,
        codec_bos_id=2149,
        codec_language_id={"chinese": 2055, "english": 2050, "sichuan_dialect": 2062},
        spk_id={"aiden": 2861, "vivian": 3065, "eric": 2875},
        spk_is_dialect={"aiden": False, "vivian": False, "eric": "sichuan_dialect"},
        position_id_per_seconds=13,
        code_predictor_config=dict(
            vocab_size=CODEBOOK,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=5,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            hidden_act="silu",
            max_position_embeddings=65536,
            rms_norm_eps=1e-6,
            rope_theta=1000000,
            rope_scaling=None,
            attention_bias=False,
            num_code_groups=16,
            use_sliding_window=False,
            layer_types=["full_attention"] * 5,
        ),
    )
    config = fx.Qwen3TTSConfig(
        talker_config=talker,
        speaker_encoder_config={"enc_dim": 1024, "sample_rate": 24000},
        tokenizer_type="qwen3_tts_tokenizer_12hz",
        tts_model_size="0b6",
        tts_model_type="custom_voice",
        im_start_token_id=sp["<|im_start|>"],
        im_end_token_id=sp["<|im_end|>"],
        tts_pad_token_id=sp["<tts_pad>"],
        tts_bos_token_id=sp["<tts_text_bos>"],
        tts_eos_token_id=sp["<tts_text_eod>"],
        architectures=["Qwen3TTSForConditionalGeneration"],
    )
    decoder = dict(
        codebook_size=CODEBOOK,
        codebook_dim=512,
        hidden_size=512,
        latent_dim=1024,
        max_position_embeddings=8000,
        rope_theta=10000,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=64,
        attention_bias=False,
        sliding_window=72,
        intermediate_size=1024,
        hidden_act="silu",
        layer_scale_initial_scale=0.01,
        rms_norm_eps=1e-5,
        num_hidden_layers=8,
        num_quantizers=16,
        upsample_rates=[8, 5, 4, 3],
        upsampling_ratios=[2, 2],
        decoder_dim=1536,
        attention_dropout=0.0,
    )
    # Mimi encoder: voice cloning only, never used by CustomVoice; tiny but loadable (as the fixture).
    encoder = dict(
        sampling_rate=24000, frame_rate=12.5, audio_channels=1, hidden_size=16, num_filters=4,
        num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4], kernel_size=7, last_kernel_size=3,
        residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=True, compress=2,
        codebook_size=CODEBOOK, codebook_dim=8, num_quantizers=16,
        vector_quantization_hidden_dimension=8, num_semantic_quantizers=1, upsample_groups=16,
        num_hidden_layers=1, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, sliding_window=250, use_streaming=False,
    )
    st_config = fx.Qwen3TTSTokenizerV2Config(
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


def numel(m) -> int:
    return sum(p.numel() for p in m.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/kiln-models/qwen3-tts-0.6b-random"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--decoder-seed", type=int, default=7)
    ap.add_argument("--min-free-gb", type=float, default=8.0)
    ap.add_argument("--skip-check", action="store_true", help="do not reload and generate")
    args = ap.parse_args()

    probe = args.out.parent
    probe.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(probe).free / 1e9
    if free < args.min_free_gb:
        sys.exit(f"only {free:.1f} GB free under {probe}; need {args.min_free_gb} GB")

    fx = load_fixture_module()
    torch = fx.torch
    sp = fixture_special_ids()
    config, st_config = make_configs(fx, sp)

    work = args.out.with_name(args.out.name + ".tmp")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(FIXTURE_DIR / name, work / name)

    t0 = time.time()
    model = fx.build_model(config, args.seed)  # random init, logit std ~3, rounded to float16
    with torch.no_grad():
        model.talker.codec_head.weight[CODEC_EOS].zero_()  # eos logit == 0 < top code logit
    n_talker = numel(model)
    model.to(torch.float16).save_pretrained(work, safe_serialization=True, max_shard_size="50GB")
    del model
    fx.write_json(work / "generation_config.json", fx.GENERATION_CONFIG)
    print(f"talker + code predictor: {n_talker / 1e6:.1f} M params ({time.time() - t0:.0f} s)", flush=True)

    t0 = time.time()
    st_model = fx.build_speech_tokenizer(st_config, args.decoder_seed)
    n_decoder = numel(st_model.decoder)
    n_st = numel(st_model)
    st_dir = work / "speech_tokenizer"
    st_model.to(torch.float16).save_pretrained(st_dir, safe_serialization=True, max_shard_size="50GB")
    del st_model
    fx.EncodecFeatureExtractor(feature_size=1, sampling_rate=24000, padding_value=0.0,
                               return_attention_mask=True).save_pretrained(st_dir)
    fx.clean_config_files(work)
    print(f"speech tokenizer: {n_st / 1e6:.1f} M params (decoder {n_decoder / 1e6:.1f} M) "
          f"({time.time() - t0:.0f} s)", flush=True)

    if args.out.exists():
        shutil.rmtree(args.out)
    work.rename(args.out)

    total = 0
    for p in sorted(args.out.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"{p.stat().st_size:>12}  {p.relative_to(args.out)}")
    print(f"{total:>12}  total ({total / 1e9:.2f} GB)", flush=True)

    if args.skip_check:
        return
    t0 = time.time()
    tts = fx.Qwen3TTSModel.from_pretrained(str(args.out), device_map="cpu", dtype=torch.float32)
    print(f"reloaded in {time.time() - t0:.0f} s", flush=True)
    tts.model.talker.codec_head.register_forward_hook(
        lambda m, i, o: logits.append(o[0, -1].detach().clone()))
    logits: list = []
    t0 = time.time()
    wavs, sr = tts.generate_custom_voice(
        text="Hello world, this is Kiln speaking.", speaker="Aiden", language="English",
        instruct="ignored for 0b6", do_sample=False, subtalker_dosample=False, max_new_tokens=8)
    wav = torch.from_numpy(wavs[0])
    frames = wav.shape[0] // 1920
    eos_gap = [float(l[:CODEBOOK].max() - l[CODEC_EOS])
               for l in logits]  # top codebook logit minus eos logit, before processors
    print(f"generate (greedy, max_new_tokens 8): {frames} frames ({len(logits)} talker steps) at {sr} Hz "
          f"in {time.time() - t0:.1f} s; wav rms {float(wav.pow(2).mean().sqrt()):.3f}, "
          f"max|x| {float(wav.abs().max()):.3f}, clipped {float((wav.abs() >= 1).float().mean()):.4f}; "
          f"top code logit - eos logit: min {min(eos_gap):.1f}", flush=True)
    assert sr == 24000 and frames == 7, (sr, frames)
    assert bool(torch.isfinite(wav).all())


if __name__ == "__main__":
    main()
