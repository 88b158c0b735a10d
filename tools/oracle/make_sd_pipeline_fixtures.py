#!/usr/bin/env python3
"""Builds Kiln's full Stable Diffusion pipeline reference runs with `diffusers`.

Run it after `make_sd_fixtures.py` (which deletes and rewrites `tests/fixtures/sd-tiny/`, and
with it everything this script adds); it reads that script's outputs and never changes them.

    python tools/oracle/make_sd_pipeline_fixtures.py --root tests/fixtures/sd-tiny

Writes into `tests/fixtures/sd-tiny/`:

- `sd15/model_index.json`, `sd21/model_index.json` and byte copies of `vae/config.json` and
  `vae/diffusion_pytorch_model.safetensors` (float16) in `sd15/vae/` and `sd21/vae/`: the two
  component folders become complete `StableDiffusionPipeline` folders
  (`StableDiffusionPipeline.from_pretrained(dir, local_files_only=True)` loads them; safety
  checker, feature extractor and image encoder `[null, null]`, `requires_safety_checker` false).
- `init.png`: the img2img case's 32x32 RGB init image (a fixed pattern, see `init_pattern`).
- `pipeline_expected.json`: the cases' parameters, the schedulers' effective configs, the
  timesteps each run actually used and the facts below.
- `pipeline_expected.safetensors` (float32): per case the inputs Rust must feed back and the
  outputs it must reproduce (`{case}.init_latents`, `.prompt_embeds`, `.negative_prompt_embeds`,
  `.latents`, `.image`, `.noise`; img2img: `.init_image`, `.init_pixels`, `.encoder_eps`,
  `.image_latents`, `.add_noise`).

All runs: float32 weights (the float16 UNet and VAE upcast exactly on load), CPU, one thread,
deterministic algorithms, batch 1, `num_images_per_prompt` 1, a fresh scheduler per case.
txt2img `init_latents` come from `torch.manual_seed(seed)`, the pipeline's generator (ancestral
and img2img draws) from `seed + 1000`, so no recorded draw equals the initial latents.

What a run does (diffusers 0.42.1, `StableDiffusionPipeline.__call__`), which Rust must mirror:

1. Text: `prompt_embeds = text_encoder(tokenizer(prompt, padding="max_length", max_length=77,
   truncation=True).input_ids)[0]` (the last hidden state, after `final_layer_norm`; no
   attention mask, `clip_skip` None; the same for sd21). Classifier-free guidance happens iff
   `guidance_scale > 1`. With it, the negative text is `negative_prompt`, and a `None` negative
   prompt is tokenized as the empty string `""` (so `None` and `""` give identical embeddings:
   BOS, EOS, then the tokenizer's pad id); the empty string is NOT skipped and NOT replaced by
   zeros. Without guidance (`guidance_scale <= 1`) the negative prompt is ignored entirely,
   never encoded, and the UNet runs on batch 1.
2. txt2img latents: `latents = init_latents * scheduler.init_noise_sigma` (init_latents passed
   explicitly, `[1, 4, height/2, width/2]`: the tiny VAE has two levels, `vae_scale_factor` 2).
3. Timesteps: `scheduler.set_timesteps(steps)`; the loop runs over ALL of `scheduler.timesteps`
   (PNDM with `skip_prk_steps` has steps + 1 entries: its PLMS warm-up repeats one timestep,
   so `steps` = 5 gives 6 UNet calls and 6 `step()` calls).
4. Each step `i, t`: `x = cat([latents, latents])` with guidance (row 0 unconditional, row 1
   conditional; `encoder_hidden_states = cat([negative_prompt_embeds, prompt_embeds])`), else
   `x = latents`; `x = scheduler.scale_model_input(x, t)`; `eps = unet(x, t, ehs)`; with guidance
   `eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)` (float32; `guidance_rescale`
   is 0, so no rescale); `latents = scheduler.step(eps, t, latents, eta=0.0 [DDIM only],
   generator=g [schedulers that take one]).prev_sample`. `{case}.latents[i]` is `latents` after
   step `i` (row `i` of `.latents` belongs to `timesteps[i]`).
5. Decode: `image = vae.decode(latents / vae.config.scaling_factor).sample` (no random draw),
   then `image = (image / 2 + 0.5).clamp(0, 1)`, permuted to NHWC: `{case}.image`
   `[1, H, W, 3]` float32 in [0, 1] (no quantisation to u8; no safety checker).

Random draws (torch's generator cannot be reproduced in Rust: the recorded tensors are fed back):

- txt2img with explicit latents: the pipeline draws nothing, except EulerAncestral, whose
  `step()` draws one `randn` of the latents' shape per step, every step including the last
  (where sigma_up = 0): `{case}.noise[i]` belongs to step `i`, used as
  `prev = x + d * (sigma_down - sigma) + noise * sigma_up`.
- img2img (`StableDiffusionImg2ImgPipeline`), one generator, in this order:
  1. `vae.encode(init_image).latent_dist.sample(generator)`: `eps1` (`{case}.encoder_eps`,
     shape of the latent mean `[1, 4, 16, 16]`); `z = mean + std * eps1` with
     `std = exp(0.5 * logvar)` (logvar clamped to [-30, 20] by diffusers);
     `image_latents = vaeconfig.scaling_factor * z` (`{case}.image_latents`).
  2. `noise = randn(image_latents.shape)` (`{case}.add_noise`); `latents =
     scheduler.add_noise(image_latents, noise, timesteps[0])` = `sqrt(acp[t]) * x0 +
     sqrt(1 - acp[t]) * noise` for DDIM (`{case}.init_latents`).
  Then the loop of point 4 over the truncated timesteps.
- The img2img start: `scheduler.set_timesteps(steps)` over the full schedule, then
  `init_timestep = min(int(steps * strength), steps)`, `t_start = max(steps - init_timestep, 0)`,
  `timesteps = scheduler.timesteps[t_start * scheduler.order:]`, and `set_begin_index(t_start *
  order)` only if the scheduler has that method (DDIM and PNDM do not; Euler, Euler-a and DPM
  do). The noise is added at `timesteps[0]` (the first timestep that runs). With PNDM the
  slice indexes the PLMS list with its repeated entry: 5 steps at strength 0.6 run
  [601, 401, 201, 1] (4 UNet calls, noise at 601) where DDIM runs [401, 201, 1] (noise at 401).
- Scheduler configs: `from_config` keeps the folder's keys and fills the rest with the class's
  defaults; SD 1.5's config has no `timestep_spacing`, so DDIM/PNDM use "leading" and
  Euler/Euler-a/DPM "linspace". Each case's `scheduler_config` in the JSON is the effective one.

Init image preprocessing (`VaeImageProcessor.preprocess`, 32x32 is already a multiple of the
scale factor, so no resize): `init_image = 2 * (u8 / 255) - 1` in float32, NCHW.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from diffusers.models.autoencoders import vae as vae_module  # noqa: E402,F401
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion as txt2img_module  # noqa: E402,F401
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module  # noqa: E402,F401
from diffusers.schedulers import scheduling_ddim, scheduling_dpmsolver_multistep  # noqa: E402,F401
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_euler_discrete  # noqa: E402,F401
from diffusers.schedulers import scheduling_pndm  # noqa: E402,F401
from diffusers.utils import torch_utils  # noqa: E402

HERE = Path(__file__).resolve().parent

SCHEDULER_CLASSES = {
    "DDIMScheduler": DDIMScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "PNDMScheduler": PNDMScheduler,
}

PROMPT = "a photograph of an astronaut riding a horse"

# scheduler: None = the folder's own scheduler (its scheduler_config.json); otherwise the class
# built with `cls.from_config(folder scheduler config, **overrides)`, as diffusers users swap
# schedulers. seed: txt2img `init_latents = torch.randn(shape, generator=manual_seed(seed))`; the
# generator passed to the pipeline (ancestral and img2img draws) is `manual_seed(seed + 1000)`,
# so no recorded draw repeats the initial latents.
CASES = [
    dict(name="sd15_ddim_cfg", pipeline="sd15", kind="txt2img", prompt=PROMPT,
         negative_prompt="blurry, low quality", width=32, height=32, steps=4, guidance_scale=7.5,
         scheduler="DDIMScheduler", overrides={}, seed=101),
    dict(name="sd15_pndm_cfg", pipeline="sd15", kind="txt2img", prompt=PROMPT,
         negative_prompt="", width=24, height=40, steps=5, guidance_scale=5.0,
         scheduler=None, overrides={}, seed=102),
    dict(name="sd15_dpmpp_karras", pipeline="sd15", kind="txt2img", prompt=PROMPT,
         negative_prompt=None, width=32, height=32, steps=4, guidance_scale=3.0,
         scheduler="DPMSolverMultistepScheduler",
         overrides={"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}, seed=103),
    dict(name="sd15_euler_nocfg", pipeline="sd15", kind="txt2img", prompt=PROMPT,
         negative_prompt=None, width=32, height=32, steps=3, guidance_scale=1.0,
         scheduler="EulerDiscreteScheduler", overrides={}, seed=104),
    dict(name="sd21_ddim_vpred", pipeline="sd21", kind="txt2img", prompt=PROMPT,
         negative_prompt="ugly", width=32, height=32, steps=4, guidance_scale=6.0,
         scheduler=None, overrides={}, seed=105),
    dict(name="sd15_euler_a", pipeline="sd15", kind="txt2img", prompt=PROMPT,
         negative_prompt="blurry, low quality", width=32, height=32, steps=3, guidance_scale=7.5,
         scheduler="EulerAncestralDiscreteScheduler", overrides={}, seed=106),
    dict(name="sd15_img2img", pipeline="sd15", kind="img2img", prompt=PROMPT,
         negative_prompt="blurry, low quality", width=32, height=32, steps=5, guidance_scale=7.5,
         scheduler="DDIMScheduler", overrides={}, seed=107, strength=0.6),
]

VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
INIT_SIZE = 32


def model_index(scheduler_class: str) -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def make_pipeline_folder(root: Path, name: str) -> None:
    folder = root / name
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(model_index(sched_cfg["_class_name"]), indent=2) + "\n")
    (folder / "vae").mkdir(exist_ok=True)
    for f in VAE_FILES:
        shutil.copyfile(root / "vae" / f, folder / "vae" / f)
        assert (root / "vae" / f).read_bytes() == (folder / "vae" / f).read_bytes()


def init_pattern() -> np.ndarray:
    """[32, 32, 3] u8: R = 8x (x the column), G = 255 - 8y (y the row), B = (x*y*5 + 40) mod 256
    (every channel differs, nothing is symmetric: a transposed or flipped read shows)."""
    y, x = np.mgrid[0:INIT_SIZE, 0:INIT_SIZE]
    rgb = np.stack([8 * x, 255 - 8 * y, (x * y * 5 + 40) % 256], axis=-1)
    return rgb.astype(np.uint8)


def jsonable(v):
    """JSON-safe values; non-finite floats (DPM's `lambda_min_clipped` = -inf) become the strings
    "inf" / "-inf" / "nan" so that strict parsers (serde_json) read the file."""
    if isinstance(v, float) and not np.isfinite(v):
        return "nan" if np.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, torch.Tensor):
        return jsonable(v.tolist())
    return v


def timestep_values(ts) -> list:
    ts = torch.as_tensor(ts)
    if ts.dtype in (torch.int64, torch.int32):
        return [int(v) for v in ts.reshape(-1).tolist()]
    return [float(v) for v in ts.to(torch.float32).reshape(-1).tolist()]


class DrawRecorder:
    """Replaces `randn_tensor` in every loaded diffusers module that imported it, recording each
    draw (module, tensor) in order."""

    def __init__(self):
        self.original = torch_utils.randn_tensor
        self.draws: list[tuple[str, torch.Tensor]] = []
        self.patched: list = []

    def __enter__(self):
        for name, mod in sorted(sys.modules.items()):
            if name.startswith("diffusers") and getattr(mod, "randn_tensor", None) is self.original:
                setattr(mod, "randn_tensor", self._wrapper(name))
                self.patched.append(mod)
        assert any(m is scheduling_euler_ancestral_discrete for m in self.patched)
        assert any(m is vae_module for m in self.patched)
        assert any(m is img2img_module for m in self.patched)
        return self

    def _wrapper(self, module_name: str):
        def recording_randn(*args, **kwargs):
            out = self.original(*args, **kwargs)
            self.draws.append((module_name, out.detach().clone()))
            return out

        return recording_randn

    def __exit__(self, *exc):
        for mod in self.patched:
            setattr(mod, "randn_tensor", self.original)
        return False


def effective_config(sched) -> dict:
    return {k: jsonable(v) for k, v in sorted(dict(sched.config).items()) if not k.startswith("_")}


def make_scheduler(base_pipe, case):
    base = base_pipe.scheduler.config
    cls_name = case["scheduler"] or base["_class_name"]
    return SCHEDULER_CLASSES[cls_name].from_config(base, **case["overrides"]), cls_name


def run_case(pipes: dict, case: dict, root: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    name = case["name"]
    base = pipes[case["pipeline"]]
    sched, cls_name = make_scheduler(base, case)
    comps = {**base.components, "scheduler": sched}
    img2img = case["kind"] == "img2img"
    pipe = (StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline)(**comps, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cfg = case["guidance_scale"] > 1.0
    tensors: dict[str, torch.Tensor] = {}

    with torch.no_grad():
        pos, neg = pipe.encode_prompt(case["prompt"], "cpu", 1, cfg, case["negative_prompt"])
    tensors[f"{name}.prompt_embeds"] = pos
    if cfg:
        tensors[f"{name}.negative_prompt_embeds"] = neg
    else:
        assert neg is None

    h, w = case["height"], case["width"]
    assert h % 2 == 0 and w % 2 == 0 and pipe.vae_scale_factor == 2
    generator = torch.Generator().manual_seed(case["seed"] + 1000)
    kwargs = dict(prompt=case["prompt"], negative_prompt=case["negative_prompt"],
                  num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"],
                  generator=generator, output_type="np", eta=0.0, guidance_rescale=0.0)
    meta_extra: dict = {}
    if img2img:
        pixels = init_pattern()
        png = root / "init.png"
        Image.fromarray(pixels, mode="RGB").save(png, format="PNG")
        init = Image.open(png)
        init.load()
        assert np.array_equal(np.asarray(init), pixels) and init.mode == "RGB"
        tensors[f"{name}.init_pixels"] = torch.from_numpy(pixels.astype(np.float32))[None]
        kwargs.update(image=init, strength=case["strength"])
        captured: dict = {}
        orig_pre = pipe.image_processor.preprocess

        def preprocess(*a, **k):
            out = orig_pre(*a, **k)
            captured["init_image"] = out.detach().clone()
            return out

        pipe.image_processor.preprocess = preprocess
        orig_add = sched.add_noise

        def add_noise(original, noise, timestep):
            out = orig_add(original, noise, timestep)
            captured["add_noise"] = (original.detach().clone(), noise.detach().clone(), timestep_values(timestep),
                                     out.detach().clone())
            return out

        sched.add_noise = add_noise
        orig_begin = getattr(sched, "set_begin_index", None)
        if orig_begin is not None:
            def set_begin_index(i):
                captured["begin_index"] = i
                return orig_begin(i)

            sched.set_begin_index = set_begin_index
    else:
        g = torch.Generator().manual_seed(case["seed"])
        init_latents = torch.randn((1, 4, h // 2, w // 2), generator=g, dtype=torch.float32)
        tensors[f"{name}.init_latents"] = init_latents
        kwargs.update(height=h, width=w, latents=init_latents.clone())

    steps_latents: list[torch.Tensor] = []
    ran: list = []

    def on_step_end(_pipe, i, t, kw):
        assert i == len(steps_latents)
        steps_latents.append(kw["latents"].detach().clone())
        ran.append(t)
        expect = torch.cat([neg, pos]) if cfg else pos
        assert torch.equal(kw["prompt_embeds"], expect), "the pipeline's embeddings differ from encode_prompt's"
        return {}

    with DrawRecorder() as rec, torch.no_grad():
        out = pipe(**kwargs, callback_on_step_end=on_step_end,
                   callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    image = torch.from_numpy(np.ascontiguousarray(out.images)).to(torch.float32)
    assert image.shape == (1, h, w, 3), image.shape

    # Check the documented decode: (vae.decode(latents / sf) / 2 + 0.5).clamp(0, 1), NHWC.
    with torch.no_grad():
        dec = pipe.vae.decode(steps_latents[-1] / pipe.vae.config.scaling_factor).sample
    assert torch.equal((dec / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), image)

    timesteps = timestep_values(torch.stack([torch.as_tensor(t) for t in ran]))
    draws = rec.draws
    meta = dict(
        name=name, pipeline=case["pipeline"], kind=case["kind"], prompt=case["prompt"],
        negative_prompt=case["negative_prompt"],
        negative_prompt_as_encoded=(("" if case["negative_prompt"] is None else case["negative_prompt"])
                                    if cfg else None),
        width=w, height=h, latent_shape=[1, 4, h // 2, w // 2], steps=case["steps"],
        guidance_scale=case["guidance_scale"], classifier_free_guidance=cfg, guidance_rescale=0.0,
        eta=0.0, scheduler_class=cls_name, scheduler_overrides=case["overrides"],
        scheduler_config=effective_config(sched), scheduler_order=int(sched.order),
        init_noise_sigma=float(sched.init_noise_sigma), latents_seed=None if img2img else case["seed"],
        generator_seed=case["seed"] + 1000,
        timesteps=timesteps, unet_calls=len(timesteps),
        full_schedule=timestep_values(sched.timesteps),
        draws=[{"module": m.split(".")[-1], "shape": list(t.shape)} for m, t in draws],
    )
    if hasattr(sched, "sigmas") and isinstance(sched.sigmas, torch.Tensor) and cls_name != "DDIMScheduler":
        meta["sigmas"] = [float(v) for v in sched.sigmas.to(torch.float32).tolist()]

    if img2img:
        assert [m for m, _ in draws] == [vae_module.__name__, img2img_module.__name__], [m for m, _ in draws]
        eps1, eps2 = draws[0][1], draws[1][1]
        x0, noise_arg, t_noise, noised = captured["add_noise"]
        assert torch.equal(noise_arg, eps2)
        init_image = captured["init_image"]
        assert torch.equal(init_image, 2.0 * (torch.from_numpy(init_pattern().astype(np.float32) / 255.0)
                                               .permute(2, 0, 1)[None]) - 1.0)
        with torch.no_grad():
            dist = pipe.vae.encode(init_image).latent_dist
        assert torch.equal(pipe.vae.config.scaling_factor * (dist.mean + dist.std * eps1), x0)
        tensors[f"{name}.init_image"] = init_image
        tensors[f"{name}.encoder_eps"] = eps1
        tensors[f"{name}.image_latents"] = x0
        tensors[f"{name}.add_noise"] = eps2
        tensors[f"{name}.init_latents"] = noised
        steps = case["steps"]
        init_timestep = min(int(steps * case["strength"]), steps)
        t_start = max(steps - init_timestep, 0)
        assert timesteps == meta["full_schedule"][t_start * sched.order:]
        meta.update(
            strength=case["strength"], init_image_file="init.png", init_timestep=init_timestep,
            t_start=t_start, begin_index=t_start * int(sched.order),
            set_begin_index_called="begin_index" in captured,
            noise_timestep=t_noise, steps_run=len(timesteps),
        )
        if "begin_index" in captured:
            assert captured["begin_index"] == t_start * sched.order
    else:
        noise_modules = {m for m, _ in draws}
        if cls_name == "EulerAncestralDiscreteScheduler":
            assert noise_modules == {scheduling_euler_ancestral_discrete.__name__}
            assert len(draws) == len(timesteps)
        else:
            assert not draws, [m for m, _ in draws]
        assert timesteps == meta["full_schedule"]
    if draws and not img2img:
        tensors[f"{name}.noise"] = torch.stack([t for _, t in draws])
    tensors[f"{name}.latents"] = torch.stack(steps_latents)
    tensors[f"{name}.image"] = image
    return meta, tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=HERE.parent.parent / "tests" / "fixtures" / "sd-tiny")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    root: Path = args.root

    pipes = {}
    for name in ("sd15", "sd21"):
        make_pipeline_folder(root, name)
        pipe = StableDiffusionPipeline.from_pretrained(root / name, local_files_only=True, dtype=torch.float32)
        assert pipe.safety_checker is None and pipe.feature_extractor is None
        for comp in (pipe.unet, pipe.vae, pipe.text_encoder):
            assert all(p.dtype == torch.float32 for p in comp.parameters())
        assert pipe.vae_scale_factor == 2
        pipes[name] = pipe

    cases, tensors = [], {}
    for case in CASES:
        meta, t = run_case(pipes, case, root)
        cases.append(meta)
        tensors.update({k: v.detach().to(torch.float32).contiguous() for k, v in t.items()})

    expected = {
        "diffusers_version": diffusers.__version__,
        "dtype": "float32",
        "vae_scale_factor": 2,
        "vae_scaling_factor": float(pipes["sd15"].vae.config.scaling_factor),
        "image_formula": "image = clamp(vae.decode(latents / vae_scaling_factor) / 2 + 0.5, 0, 1), NHWC",
        "cfg_formula": "eps = eps_uncond + guidance_scale * (eps_text - eps_uncond); UNet batch = [uncond, cond]; "
                       "only when guidance_scale > 1 (else batch 1, negative prompt ignored)",
        "negative_prompt_rule": "None -> \"\" (tokenized like any prompt: BOS, EOS, padding); \"\" is encoded, not skipped",
        "draw_order": {
            "txt2img": "latents passed explicitly (`init_latents`): no draw, except EulerAncestral: one randn "
                       "(latent shape) inside every step() incl. the last -> `noise[i]` for step i",
            "img2img": "1) vae.encode(init_image).latent_dist.sample(g) -> `encoder_eps`; "
                       "image_latents = scaling_factor * (mean + exp(0.5*logvar) * encoder_eps); "
                       "2) randn(image_latents.shape) -> `add_noise`; "
                       "init_latents = scheduler.add_noise(image_latents, add_noise, timesteps[0])",
        },
        "img2img_start": "set_timesteps(steps); init_timestep = min(int(steps * strength), steps); "
                         "t_start = max(steps - init_timestep, 0); timesteps = schedule[t_start * order:]; "
                         "set_begin_index(t_start * order) only if the scheduler has it (not DDIM/PNDM); noise added "
                         "at timesteps[0]; PNDM's schedule repeats a PLMS timestep, so 5 steps at 0.6 run "
                         "[601, 401, 201, 1] with PNDM vs [401, 201, 1] with DDIM",
        "scheduler_config_note": "cases' scheduler_config is the effective config (folder keys + class "
                                 "defaults: no timestep_spacing in SD 1.5's file, so DDIM/PNDM 'leading', "
                                 "Euler/Euler-a/DPM 'linspace'); non-finite floats are the strings "
                                 "'inf'/'-inf'/'nan'",
        "init_image_formula": "init_image = 2 * (u8 / 255) - 1 (float32, NCHW); no resize at 32x32",
        "latents_rows": "`{case}.latents[i]` = latents after scheduler.step at timesteps[i]",
        "tensors": {
            "{case}.init_latents": "txt2img: the explicit latents [1,4,h/2,w/2] before * init_noise_sigma; "
                                   "img2img: the latents after add_noise, entering the loop",
            "{case}.prompt_embeds": "[1,77,32]",
            "{case}.negative_prompt_embeds": "[1,77,32], CFG cases only",
            "{case}.latents": "[len(timesteps),1,4,h/2,w/2]",
            "{case}.image": "[1,H,W,3] in [0,1]",
            "{case}.noise": "[draws,1,4,h/2,w/2], EulerAncestral only",
            "{case}.init_pixels": "img2img: [1,32,32,3] the PNG's u8 values as floats (0..255)",
            "{case}.init_image": "img2img: [1,3,32,32] in [-1,1]",
            "{case}.encoder_eps": "img2img: [1,4,16,16]",
            "{case}.image_latents": "img2img: [1,4,16,16] scaling_factor * z",
            "{case}.add_noise": "img2img: [1,4,16,16]",
        },
        "cases": cases,
    }
    (root / "pipeline_expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False, allow_nan=False) + "\n",
                                                 encoding="utf-8")
    save_file(tensors, root / "pipeline_expected.safetensors")
    written = [root / n / "model_index.json" for n in ("sd15", "sd21")]
    written += [root / n / "vae" / f for n in ("sd15", "sd21") for f in VAE_FILES]
    written += [root / "init.png", root / "pipeline_expected.json", root / "pipeline_expected.safetensors"]
    for p in written:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        print(f"{p.relative_to(root)}  {p.stat().st_size} B  sha256 {digest}")
    print(f"added {sum(p.stat().st_size for p in written) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
