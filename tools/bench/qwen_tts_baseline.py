#!/usr/bin/env python3
"""Baseline for Kiln's speech benchmark: `qwen-tts` (0.1.1) CustomVoice on the CPU.

Loads a Qwen3-TTS folder with `Qwen3TTSModel.from_pretrained(dir, device_map="cpu",
dtype=torch.float32)`, runs one warm-up utterance (not timed), then --n utterances one after
another with `generate_custom_voice` (sequential, as a qwen-tts server would serve a queue), and
prints one JSON line:

  wall_s           wall time of the n timed utterances
  audio_s          audio generated: sum of len(wav) / sample_rate
  rtf              aggregate real-time factor = audio_s / wall_s (higher = faster; > 1 is
                   faster than real time)
  frames           12.5 Hz codec frames per utterance (len(wav) / 1920)
  first_audio_queued_s   time to first audio of each utterance measured from the start of the
                   whole run (all n requests queued at t=0, served in order). qwen-tts returns the
                   whole waveform at the end, so first audio = completion time of the utterance.
  first_audio_own_s      the same, measured from the utterance's own start (= its latency).
  both with mean / p50 / max and the per-utterance values; plus torch threads and versions.

Decoding: --greedy (default; do_sample=False for the talker and subtalker_dosample=False for
the code predictor, the rest from generation_config.json: repetition_penalty 1.05) or --sample
(generation_config.json's sampling settings; torch.manual_seed(seed + i) before utterance i).
--max-new-tokens caps talker steps: an utterance that never emits eos gives max_new_tokens - 1
frames (tools/bench/make_random_qwen3_tts.py makes such a model).

    /tmp/kiln-tts-venv/bin/python tools/bench/qwen_tts_baseline.py \
        --model /tmp/kiln-models/qwen3-tts-0.6b-random --n 4 --max-new-tokens 25 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
import warnings
from importlib import metadata

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

warnings.filterwarnings("ignore")


def stats(xs: list[float]) -> dict:
    return dict(mean=round(statistics.fmean(xs), 4), p50=round(statistics.median(xs), 4), max=round(max(xs), 4),
                values=[round(x, 4) for x in xs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Qwen3-TTS CustomVoice folder")
    ap.add_argument("--n", type=int, default=4, help="timed utterances, run sequentially")
    ap.add_argument("--text", default="Hello world, this is Kiln speaking. The quick brown fox jumps over the lazy dog.")
    ap.add_argument("--speaker", default="Aiden")
    ap.add_argument("--language", default="English")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="talker steps per utterance")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--greedy", dest="greedy", action="store_true", default=True)
    mode.add_argument("--sample", dest="greedy", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.n < 1:
        sys.exit("--n must be >= 1")

    if a.threads:
        torch.set_num_threads(a.threads)
    with contextlib.redirect_stdout(io.StringIO()):  # qwen_tts prints flash-attn / SoX notices
        from qwen_tts import Qwen3TTSModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    t0 = time.perf_counter()
    tts = Qwen3TTSModel.from_pretrained(a.model, device_map="cpu", dtype=torch.float32)
    load_s = time.perf_counter() - t0
    spf = int(tts.model.speech_tokenizer.get_decode_upsample_rate())

    kwargs = dict(max_new_tokens=a.max_new_tokens)
    if a.greedy:
        kwargs.update(do_sample=False, subtalker_dosample=False)

    def utterance(i: int):
        if not a.greedy:
            torch.manual_seed(a.seed + i)
        wavs, sr = tts.generate_custom_voice(text=a.text, speaker=a.speaker, language=a.language, **kwargs)
        return len(wavs[0]), sr

    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    utterance(-1)  # warm-up, not timed
    warmup_s = time.perf_counter() - t0

    samples, own, queued = [], [], []
    sr = None
    run_start = time.perf_counter()
    for i in range(a.n):
        t_utt = time.perf_counter()
        n_samples, sr = utterance(i)
        t_done = time.perf_counter()
        samples.append(n_samples)
        own.append(t_done - t_utt)
        queued.append(t_done - run_start)
    wall_s = time.perf_counter() - run_start
    audio_s = sum(samples) / sr

    print(json.dumps(dict(
        engine="qwen-tts",
        model=a.model,
        n=a.n,
        text=a.text,
        speaker=a.speaker,
        language=a.language,
        decoding="greedy" if a.greedy else "sample",
        seed=a.seed,
        max_new_tokens=a.max_new_tokens,
        wall_s=round(wall_s, 4),
        audio_s=round(audio_s, 4),
        rtf=round(audio_s / wall_s, 4),
        frames=[s // spf for s in samples],
        sample_rate=sr,
        first_audio_queued_s=stats(queued),
        first_audio_own_s=stats(own),
        load_s=round(load_s, 3),
        warmup_s=round(warmup_s, 3),
        torch_threads=torch.get_num_threads(),
        versions=dict(qwen_tts=metadata.version("qwen-tts"), transformers=metadata.version("transformers"),
                      torch=torch.__version__, python=platform.python_version()),
        cpu=platform.processor() or platform.machine(),
    )), flush=True)


if __name__ == "__main__":
    main()
