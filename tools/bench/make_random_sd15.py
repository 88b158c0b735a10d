#!/usr/bin/env python3
"""Builds a random-weight Stable Diffusion 1.5-sized diffusers folder for benchmarks.

Every component has the exact config of runwayml/stable-diffusion-v1-5, only the weights are
random (torch's default initialization, fixed seeds), so Kiln and diffusers do the same
amount of work as on the real model without downloading it:

- `unet/`: `UNet2DConditionModel` (block_out_channels [320, 640, 1280, 1280],
  CrossAttnDownBlock2D x3 + DownBlock2D, UpBlock2D + CrossAttnUpBlock2D x3, layers_per_block 2,
  attention_head_dim 8, cross_attention_dim 768, sample_size 64), about 860M parameters.
- `text_encoder/`: `CLIPTextModel` with CLIP ViT-L/14's text config (hidden 768, 12 layers,
  12 heads, ffn 3072, quick_gelu, 77 positions, vocabulary 49408). The tensors are stored
  with the `text_model.` prefix, as the checkpoints on the Hub (saved by transformers 4) are.
- `vae/`: `AutoencoderKL` (block_out_channels [128, 256, 512, 512], layers_per_block 2,
  4 latent channels, scaling_factor 0.18215).
- `scheduler/scheduler_config.json`: SD 1.5's PNDMScheduler config, verbatim.
- `tokenizer/`: CLIP's real BPE tokenizer (`vocab.json` + `merges.txt`, the full 49408-id
  vocabulary) made from open-clip-torch's `bpe_simple_vocab_16e6.txt.gz`, with SD 1.5's
  `tokenizer_config.json` / `special_tokens_map.json` (the writer of
  tools/oracle/make_sd_fixtures.py, which truncates the same vocabulary for the fixtures).
- `model_index.json`: StableDiffusionPipeline, no safety checker / feature extractor.

Weights are stored as float16 safetensors (`diffusion_pytorch_model.safetensors`,
`model.safetensors`), as the fp16 variant of SD 1.5 is; about 2.1 GB in all.

Needs diffusers, transformers and open-clip-torch (`pip install --no-deps open-clip-torch==3.3.0`:
only its BPE vocabulary file is read). Takes a minute or two and about 4 GB of RAM on CPU.

    python tools/bench/make_random_sd15.py                 # -> /tmp/kiln-models/sd15-random
    python tools/bench/make_random_sd15.py --out DIR --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _fixture_module():
    """tools/oracle/make_sd_fixtures.py, for its CLIP byte table and tokenizer writer."""
    path = REPO / "tools" / "oracle" / "make_sd_fixtures.py"
    spec = importlib.util.spec_from_file_location("kiln_make_sd_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# runwayml/stable-diffusion-v1-5 unet/config.json (diffusers fills in the keys not listed).
UNET_CONFIG = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)

# runwayml/stable-diffusion-v1-5 vae/config.json.
VAE_CONFIG = dict(
    act_fn="silu",
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=512,
    up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)

# runwayml/stable-diffusion-v1-5 text_encoder/config.json (openai/clip-vit-large-patch14's
# text tower; bos 0 / eos 2 as in that file).
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_factor=1.0,
    initializer_range=0.02,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, verbatim.
SCHEDULER_CONFIG = {
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

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def full_clip_bpe(bytes_to_unicode) -> tuple[dict[str, int], list[str]]:
    """CLIP's whole vocabulary and merges (open_clip's SimpleTokenizer construction)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open-clip-torch is not installed (pip install --no-deps open-clip-torch==3.3.0)")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def params(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/kiln-models/sd15-random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-check", action="store_true", help="skip loading it back with StableDiffusionPipeline")
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t_start = time.perf_counter()

    fixtures = _fixture_module()
    vocab, merges = full_clip_bpe(fixtures.bytes_to_unicode)
    tok = fixtures.write_tokenizer(out / "tokenizer", vocab, merges, sd2=False)
    ids = tok("a photograph of an astronaut riding a horse")["input_ids"]
    print(f"tokenizer: {len(tok)} ids; 'a photograph of an astronaut riding a horse' -> {ids}")

    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")

    torch.manual_seed(a.seed + 1)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval()
    text.to(torch.float16).save_pretrained(out / "text_encoder", safe_serialization=True)
    del text
    path = out / "text_encoder" / "model.safetensors"
    tensors = load_file(path)
    if not any(k.startswith("text_model.") for k in tensors):
        save_file({f"text_model.{k}": v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    print(f"text_encoder: {len(tensors)} tensors")
    del tensors

    torch.manual_seed(a.seed + 2)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    print(f"vae: {params(vae)}")
    vae.to(torch.float16).save_pretrained(out / "vae", safe_serialization=True)
    del vae

    torch.manual_seed(a.seed + 3)
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    print(f"unet: {params(unet)}")
    unet.to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    del unet

    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    print(f"built in {time.perf_counter() - t_start:.0f}s")

    if not a.no_check:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, dtype=torch.float32)
        te = pipe.text_encoder
        assert te.config.hidden_size == 768 and te.config.num_hidden_layers == 12
        assert pipe.unet.config.block_out_channels == [320, 640, 1280, 1280] or tuple(
            pipe.unet.config.block_out_channels) == (320, 640, 1280, 1280)
        assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "PNDMScheduler"
        print(f"loaded back: {type(pipe).__name__}, unet {params(pipe.unet)}, text {params(te)}, vae {params(pipe.vae)}")

    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {total / 1e9:.2f} GB ({total / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
