#!/usr/bin/env python3
"""Builds Kiln's Stable Diffusion reference fixtures with `diffusers` and `transformers`.

Writes `tests/fixtures/sd-tiny/`:

- `sd15/` and `sd21/`: two diffusers pipeline folders (the `text_encoder/`, `tokenizer/`,
  `unet/` and `scheduler/` components):
  - `tokenizer/`: a real CLIP BPE tokenizer (`vocab.json` + `merges.txt`, the files SD repos
    ship, no `tokenizer.json`) made from open-clip-torch's `bpe_simple_vocab_16e6.txt.gz`,
    truncated to its first `MERGES` merges to keep the fixture small: the vocabulary is the
    256 byte symbols, the same with `</w>`, one token per kept merge, then `<|startoftext|>`
    and `<|endoftext|>` (CLIP's order, so the ids are CLIP's own below the cut). `sd15` writes
    `tokenizer_config.json` the way runwayml/stable-diffusion-v1-5 does (special tokens as
    `AddedToken` dicts, pad = `<|endoftext|>`), `sd21` the way stabilityai/stable-diffusion-2-1
    does (plain strings, pad = `!`, id 0).
  - `text_encoder/`: a random-weight `CLIPTextModel` of the size diffusers' own tests use
    (hidden 32, 4 heads, ffn 37, 77 positions): `sd15` 2 layers with `quick_gelu`, `sd21` 3
    layers with `gelu` (SD 2.x's OpenCLIP-H uses exact GELU and, with `clip_skip`, the
    penultimate layer). Weights with a large spread (LayerNorm included) so that a swapped or
    missing parameter changes the output.
  - `scheduler/scheduler_config.json`: SD 1.5's (PNDMScheduler, scaled_linear, steps_offset 1,
    skip_prk_steps) and SD 2.1's (DDIMScheduler, v_prediction).
  - `unet/`: a random-weight `UNet2DConditionModel` shaped like diffusers' pipeline tests
    (DownBlock2D + CrossAttnDownBlock2D, two resnets per level, cross_attention_dim 32),
    narrowed to channels (8, 16) with 4 GroupNorm groups to fit the fixture budget, weights
    stored as float16: `sd15` conv proj_in/proj_out and 2 heads, `sd21` linear projections,
    heads per block (2, 4) and upcast_attention (SD 2.x's config).
- `vae/`: a random-weight `AutoencoderKL` (channels (8, 16), 4 groups, 4 latent channels,
  scaling_factor 0.18215), float16.
- `unet_vae_expected.safetensors` (float32): the UNet inputs (`latents` [2, 4, 16, 16],
  `timesteps` [981, 37.5]: a different one per item, `encoder_hidden_states` [2, 77, 32]) and
  `sd15.unet` / `sd21.unet`, the UNets' outputs; `vae.decoded`, the pipeline's
  `vae.decode(latents / scaling_factor)` of the same `latents`; `vae.encoded_mean` /
  `vae.encoded_logvar`, the encoder's latent distribution of `vae.image`. Computed in float32
  from the float16-rounded weights, so the stored weights reproduce them exactly.
- `expected.json`: per pipeline the prompts (empty negative prompt, punctuation, numbers,
  mixed case and whitespace, accents and an emoji, and one prompt longer than 77 tokens) and
  the ids `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)` gives;
  per scheduler case the config overrides, the step count, `timesteps`, `init_noise_sigma`, the
  `scale_model_input` factor of every step, the latents after every `step()` and, for the
  ancestral sampler, the noise `step()` drew (torch's generator cannot be reproduced in Rust,
  so the test feeds the recorded noise back).
- `expected.safetensors`: the text encoders' outputs for those prompts (`[prompts, 77, 32]`
  float32): `sd15.last_hidden_state`; `sd21.last_hidden_state`, `sd21.penultimate` (the raw
  `hidden_states[-2]`, as SDXL uses it) and `sd21.penultimate_normed` (`final_layer_norm` of
  it: diffusers' `clip_skip=1`).

The scheduler loop is the pipeline's: `latents = init * init_noise_sigma`, then for each
timestep `x = scale_model_input(latents, t)`, `out = fake_unet(x, t)`,
`latents = step(out, t, latents)`. The fake UNet is a deterministic function Rust computes
too, in float64 from the float32 input and then rounded to float32:
`out[i] = 0.9 * cos(t / 2000) * x[i] + 0.2 * sin(0.37 * i + t / 97)` (i: flat index): close
enough to a denoiser (it predicts mostly the input's noise) that the latents stay O(1) as in
a real run.

Deterministic (byte-identical reruns): fixed seeds, CPU only, float32, one thread.

    python tools/oracle/make_sd_fixtures.py --out tests/fixtures/sd-tiny
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a_module  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

HERE = Path(__file__).resolve().parent

# Kept merges of CLIP's 48894: the vocabulary has 256 + 256 + MERGES + 2 ids.
MERGES = 1000
MAX_LEN = 77

PROMPTS = [
    "",
    "a photograph of an astronaut riding a horse",
    "A  Painting of  the Kiln at SUNRISE, 4k, highly-detailed!!  (trending on artstation)",
    "café crème brûlée on a wooden table 🍰 it's delicious, isn't it?",
    "a very long prompt that keeps going " + " ".join(f"with detail number {i} and more words" for i in range(12)),
]

SCHEDULER_CLASSES = {
    "DDIMScheduler": DDIMScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "PNDMScheduler": PNDMScheduler,
}

# SD 1.5's scheduler_config.json (runwayml/stable-diffusion-v1-5), verbatim.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# SD 2.1's scheduler_config.json (stabilityai/stable-diffusion-2-1), verbatim.
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# (name, pipeline whose scheduler_config.json is the base, overrides, steps). The overrides
# are merged over the base as the server does for a per-request scheduler choice; keys absent
# from both take the chosen class's defaults, as diffusers' `from_config` does.
SCHEDULER_CASES = [
    ("pndm-plms", "sd15", {}, 10),
    ("pndm-plms-v", "sd15", {"prediction_type": "v_prediction"}, 10),
    ("pndm-prk", "sd15", {"skip_prk_steps": False}, 10),
    ("pndm-plms-trailing", "sd15", {"timestep_spacing": "trailing"}, 7),
    ("ddim", "sd15", {"_class_name": "DDIMScheduler"}, 10),
    ("ddim-sd21-v", "sd21", {}, 10),
    ("ddim-v-trailing-one", "sd21", {"timestep_spacing": "trailing", "set_alpha_to_one": True}, 7),
    ("ddim-linear-clip", "sd15", {"_class_name": "DDIMScheduler", "beta_schedule": "linear",
                                  "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": True,
                                  "clip_sample_range": 1.5, "timestep_spacing": "linspace"}, 10),
    ("euler", "sd15", {"_class_name": "EulerDiscreteScheduler"}, 10),
    ("euler-v-leading", "sd21", {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading"}, 10),
    ("euler-karras", "sd15", {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, 10),
    ("euler-a", "sd15", {"_class_name": "EulerAncestralDiscreteScheduler"}, 10),
    ("euler-a-v-trailing", "sd21", {"_class_name": "EulerAncestralDiscreteScheduler",
                                    "timestep_spacing": "trailing"}, 7),
    ("dpmpp-2m", "sd15", {"_class_name": "DPMSolverMultistepScheduler"}, 10),
    ("dpmpp-2m-karras", "sd15", {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, 10),
    ("dpmpp-2m-karras-v", "sd21", {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, 10),
    ("dpmpp-2m-leading-20", "sd15", {"_class_name": "DPMSolverMultistepScheduler",
                                     "timestep_spacing": "leading"}, 20),
]

LATENT_SHAPE = (1, 4, 4, 4)


def fake_unet(x: torch.Tensor, t: float) -> torch.Tensor:
    """out[i] = 0.9 cos(t/2000) x[i] + 0.2 sin(0.37 i + t/97), in float64 (libm), then float32."""
    flat = x.detach().reshape(-1).to(torch.float64).tolist()
    a = 0.9 * math.cos(t / 2000.0)
    out = [a * v + 0.2 * math.sin(0.37 * i + t / 97.0) for i, v in enumerate(flat)]
    return torch.tensor(out, dtype=torch.float64).to(torch.float32).reshape(x.shape)


def floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().reshape(-1).to(torch.float32).tolist()]


def timestep_values(ts: torch.Tensor) -> list:
    if ts.dtype in (torch.int64, torch.int32):
        return [int(v) for v in ts.tolist()]
    return [float(v) for v in ts.to(torch.float32).tolist()]


# --- tokenizer ------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_bpe_files() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges (open_clip's SimpleTokenizer construction), truncated."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1][:MERGES]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_tokenizer(dest: Path, vocab: dict[str, int], merges: list[str], sd2: bool) -> CLIPTokenizer:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    if sd2:
        cfg = {"add_prefix_space": False, "bos_token": "<|startoftext|>", "do_lower_case": True,
               "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": MAX_LEN,
               "pad_token": "!", "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>"}
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
                   "unk_token": "<|endoftext|>"}
    else:
        cfg = {"add_prefix_space": False, "bos_token": added("<|startoftext|>"), "do_lower_case": True,
               "eos_token": added("<|endoftext|>"), "errors": "replace", "model_max_length": MAX_LEN,
               "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
               "unk_token": added("<|endoftext|>")}
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>"}
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return CLIPTokenizer.from_pretrained(dest)


# --- text encoder ---------------------------------------------------------------------------


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Large-spread random weights so every parameter matters (LayerNorm included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def write_text_encoder(dest: Path, vocab_size: int, layers: int, act: str, seed: int, prefixed: bool) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LEN,
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(cfg).eval()
    randomize(model, seed)
    model.save_pretrained(dest, safe_serialization=True)
    if prefixed:
        # transformers 5 saves `embeddings.…`; the SD checkpoints on the Hub (saved by
        # transformers 4) say `text_model.embeddings.…`. Both layouts are covered.
        path = dest / "model.safetensors"
        tensors = load_file(path)
        save_file({f"text_model.{k}": v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    return CLIPTextModel.from_pretrained(dest).eval()


# --- UNet and VAE -------------------------------------------------------------------------

# The UNet of diffusers' SD pipeline tests (two levels, DownBlock2D + CrossAttnDownBlock2D,
# cross_attention_dim 32 = the text encoders' hidden size), narrowed to (8, 16) channels with
# 4 GroupNorm groups (2 channels per group) so that both UNets fit the fixture budget; two
# resnets per level (three per up level, so every skip connection shape occurs).
UNET_COMMON = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=4,
)
# SD 1.5-like: conv proj_in/proj_out, one head count (diffusers' legacy `attention_head_dim`
# is the number of heads). SD 2-like: linear projections, heads per block, upcast_attention.
UNET_VARIANTS = {
    "sd15": dict(attention_head_dim=2),
    "sd21": dict(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True),
}
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=0.18215,
)
# UNet inputs: 2 items at different (one fractional, as Euler gives) timesteps.
UNET_LATENT_SHAPE = (2, 4, 16, 16)
UNET_TIMESTEPS = [981.0, 37.5]


def randomize_diffusers(model: torch.nn.Module, seed: int) -> None:
    """Random norms and biases (diffusers initializes them to 1 and 0, which would hide a
    swapped or missing parameter), default-initialized weights kept; everything rounded to
    float16, the dtype the fixture stores, so the reference is exact for the stored weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name and p.dim() == 1
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())


def save_f16(model: torch.nn.Module, dest: Path) -> None:
    model.half().save_pretrained(dest, safe_serialization=True)
    model.float()


def write_unet(dest: Path, variant: str, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_COMMON, **UNET_VARIANTS[variant]).eval()
    randomize_diffusers(unet, seed)
    save_f16(unet, dest)
    return unet


def write_vae(dest: Path, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    randomize_diffusers(vae, seed)
    save_f16(vae, dest)
    return vae


# --- schedulers -----------------------------------------------------------------------------


def run_scheduler(name: str, base: dict, overrides: dict, steps: int, init: torch.Tensor) -> dict:
    config = {**base, **overrides}
    cls = SCHEDULER_CLASSES[config["_class_name"]]
    sched = cls.from_config(config)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    noises: list[torch.Tensor] = []
    original = euler_a_module.randn_tensor

    def recording_randn(*args, **kwargs):
        out = original(*args, **kwargs)
        noises.append(out.clone())
        return out

    euler_a_module.randn_tensor = recording_randn
    try:
        generator = torch.Generator().manual_seed(1234)
        init_sigma = float(sched.init_noise_sigma)
        latents = init * sched.init_noise_sigma
        scales, after = [], []
        for t in timesteps:
            x = sched.scale_model_input(latents, t)
            scales.append(float((x.reshape(-1)[0] / latents.reshape(-1)[0]).item()))
            out = fake_unet(x, float(t))
            kwargs = {"generator": generator} if cls is EulerAncestralDiscreteScheduler else {}
            latents = sched.step(out, t, latents, **kwargs).prev_sample
            after.append(floats(latents))
    finally:
        euler_a_module.randn_tensor = original
    case = {
        "name": name,
        "pipeline": None,
        "overrides": overrides,
        "steps": steps,
        "class": config["_class_name"],
        "timesteps": timestep_values(timesteps),
        "init_noise_sigma": init_sigma,
        "input_scales": scales,
        "latents": after,
    }
    if hasattr(sched, "sigmas") and isinstance(sched.sigmas, torch.Tensor) and cls is not DDIMScheduler:
        case["sigmas"] = floats(sched.sigmas)
    if noises:
        case["noise"] = [floats(n) for n in noises]
    return case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE.parent.parent / "tests" / "fixtures" / "sd-tiny")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    vocab, merges = clip_bpe_files()
    expected: dict = {"max_length": MAX_LEN, "merges": MERGES, "prompts": PROMPTS, "pipelines": {}}
    hidden: dict[str, torch.Tensor] = {}
    bases = {"sd15": SD15_SCHEDULER, "sd21": SD21_SCHEDULER}
    g = torch.Generator().manual_seed(7)
    unet_in = {
        "latents": torch.randn(UNET_LATENT_SHAPE, generator=g),
        "timesteps": torch.tensor(UNET_TIMESTEPS, dtype=torch.float32),
        "encoder_hidden_states": torch.randn((UNET_LATENT_SHAPE[0], MAX_LEN, 32), generator=g),
    }
    unet_out: dict[str, torch.Tensor] = dict(unet_in)
    for pipe, layers, act, seed in [("sd15", 2, "quick_gelu", 15), ("sd21", 3, "gelu", 21)]:
        root = out / pipe
        sd2 = pipe == "sd21"
        tok = write_tokenizer(root / "tokenizer", vocab, merges, sd2)
        enc = write_text_encoder(root / "text_encoder", len(vocab), layers, act, seed, prefixed=not sd2)
        unet = write_unet(root / "unet", pipe, seed + 100)
        with torch.no_grad():
            unet_out[f"{pipe}.unet"] = unet(
                unet_in["latents"], unet_in["timesteps"], unet_in["encoder_hidden_states"]
            ).sample.contiguous()
        (root / "scheduler").mkdir(parents=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(bases[pipe], indent=2) + "\n")

        ids = tok(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt").input_ids
        untruncated = [len(tok(p).input_ids) for p in PROMPTS]
        assert max(untruncated) > MAX_LEN, "the long prompt must be truncated"
        with torch.no_grad():
            res = enc(ids, output_hidden_states=True)
        hidden[f"{pipe}.last_hidden_state"] = res.last_hidden_state.contiguous()
        if sd2:
            penult = res.hidden_states[-2]
            hidden[f"{pipe}.penultimate"] = penult.contiguous()
            final_norm = getattr(enc, "text_model", enc).final_layer_norm
            hidden[f"{pipe}.penultimate_normed"] = final_norm(penult).contiguous()
        expected["pipelines"][pipe] = {
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "ids": ids.tolist(),
            "untruncated_lengths": untruncated,
            "tokens": [tok.convert_ids_to_tokens(t[:n]) for t, n in zip(ids.tolist(), untruncated)],
        }

    g = torch.Generator().manual_seed(42)
    init = torch.randn(LATENT_SHAPE, generator=g, dtype=torch.float32)
    expected["latent_shape"] = list(LATENT_SHAPE)
    expected["init_latents"] = floats(init)
    cases = []
    for name, pipe, overrides, steps in SCHEDULER_CASES:
        case = run_scheduler(name, bases[pipe], overrides, steps, init)
        case["pipeline"] = pipe
        cases.append(case)
    expected["schedulers"] = cases
    (out / "expected.json").write_text(json.dumps(expected, ensure_ascii=False) + "\n", encoding="utf-8")
    save_file(hidden, out / "expected.safetensors")

    # One VAE (SD 1.5 and 2.x share the architecture) in `vae/`: the decode of fixed latents as
    # the pipeline does it (`vae.decode(latents / scaling_factor)`), and the encoder's latent
    # distribution of a fixed image in [-1, 1].
    vae = write_vae(out / "vae", 200)
    latents = unet_in["latents"]
    image = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(8)) * 2.0 - 1.0
    with torch.no_grad():
        unet_out["vae.decoded"] = vae.decode(latents / vae.config.scaling_factor).sample.contiguous()
        unet_out["vae.image"] = image
        dist = vae.encode(image).latent_dist
        unet_out["vae.encoded_mean"] = dist.mean.contiguous()
        unet_out["vae.encoded_logvar"] = dist.logvar.contiguous()
    save_file({k: v.contiguous() for k, v in unet_out.items()}, out / "unet_vae_expected.safetensors")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
