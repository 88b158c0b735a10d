#!/usr/bin/env python3
"""Baseline for Kiln's image-generation benchmark: diffusers' StableDiffusionPipeline on CPU.

The workload Kiln is compared against: N requests for the same prompt ("a photograph of an
astronaut riding a horse", empty negative prompt, a different seed each), --steps denoising
steps, classifier-free guidance --guidance, --width x --height, float32 on the CPU. For each
N in --requests the N requests run ONE AFTER ANOTHER (one pipeline call each, as a plain
diffusers server would serve them), after --warmup warm-up calls. With --batched, the N requests
also run as ONE pipeline call (a list of N prompts and N generators: diffusers' own static
batching) as a second reference line.

Reported per N and mode:
- images/s: N / wall time.
- UNet forwards/s: UNet calls per second, a CFG-doubled batch counting as one forward (of
  batch 2 sequentially, of batch 2N batched). Counted with a hook, so PNDM's extra PLMS
  warm-up evaluation (steps + 1 UNet calls per image) is included.
- UNet image-steps/s: images x UNet calls per image / wall time (the same as forwards/s when
  sequential; N times more per forward when batched).
- latency p50 / max: the service time of each pipeline call, and the completion time counted
  from the start of the run (what N requests arriving together would see if served in turn).
- the share of wall time spent inside the UNet, the text encoder and the VAE decoder.

    python tools/bench/diffusers_baseline.py --model tests/fixtures/sd-tiny/sd15 --width 32 --height 32 --steps 20 \
        --batched --warmup 3 --repeat 5
    python tools/bench/diffusers_baseline.py --model /tmp/kiln-models/sd15-random --steps 4 --requests 1,4 --batched --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Timer:
    """Counts calls of a module and the wall time spent inside them (outermost calls only)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.batch = 0
        self.seconds = 0.0
        self._t0 = None
        module.register_forward_pre_hook(self._pre, with_kwargs=True)
        module.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self._t0 = time.perf_counter()
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            self.batch += x.shape[0]

    def _post(self, module, args, kwargs, out):
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def reset(self):
        self.calls, self.batch, self.seconds = 0, 0, 0.0


class DecodeTimer:
    """Times `vae.decode` (the pipeline calls the method, not the module's forward)."""

    def __init__(self, vae):
        self.calls, self.seconds = 0, 0.0
        inner = vae.decode

        def decode(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        vae.decode = decode

    def reset(self):
        self.calls, self.seconds = 0, 0.0


def p50(xs):
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description="diffusers StableDiffusionPipeline CPU baseline")
    ap.add_argument("--model", required=True, help="diffusers StableDiffusionPipeline folder")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--scheduler", default=None,
                    help="scheduler class (e.g. DDIMScheduler, EulerDiscreteScheduler); default: the folder's")
    ap.add_argument("--requests", default="1,4,8", help="comma-separated concurrency levels N")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--batched", action="store_true",
                    help="also run the N requests as one pipeline call (diffusers' static batching)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per level; the median-wall run is reported (use 3-5 on a tiny model)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up pipeline calls")
    ap.add_argument("--seed", type=int, default=1000, help="request i uses seed + i")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()

    warnings.filterwarnings("ignore")  # random weights: NaN casts in image post-processing etc.
    torch.set_num_threads(a.threads)
    import diffusers
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    try:
        from transformers.utils import logging as tlogging

        tlogging.set_verbosity_error()
        tlogging.disable_progress_bar()
    except Exception:
        pass

    loadavg_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        a.model, local_files_only=True, dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False)
    pipe = pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    if a.scheduler:
        cls = getattr(diffusers, a.scheduler)
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    load_s = time.perf_counter() - t0
    unet_t = Timer(pipe.unet)
    text_t = Timer(pipe.text_encoder)
    vae_t = DecodeTimer(pipe.vae)
    timers = (unet_t, text_t, vae_t)

    def call(n_prompts: int, seeds: list[int]):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        kwargs = dict(num_inference_steps=a.steps, guidance_scale=a.guidance, width=a.width, height=a.height)
        if n_prompts == 1:
            return pipe(PROMPT, negative_prompt=NEGATIVE, generator=gens[0], **kwargs).images
        return pipe([PROMPT] * n_prompts, negative_prompt=[NEGATIVE] * n_prompts, generator=gens, **kwargs).images

    info = {
        "tool": "diffusers StableDiffusionPipeline",
        "model": os.path.abspath(a.model),
        "scheduler": type(pipe.scheduler).__name__,
        "width": a.width, "height": a.height, "steps": a.steps, "guidance": a.guidance,
        "prompt": PROMPT, "negative_prompt": NEGATIVE, "dtype": "float32", "device": "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(), "nproc": os.cpu_count(), "cpu": cpu_model(),
        "load_s": round(load_s, 3), "loadavg_before": loadavg_before,
    }
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs ({info['cpu']})")
    print(f"{a.model}: {info['scheduler']}, {a.width}x{a.height}, {a.steps} steps, guidance {a.guidance}; "
          f"loaded in {load_s:.1f}s")

    with torch.inference_mode():
        warm = []
        for i in range(max(a.warmup, 1)):
            t0 = time.perf_counter()
            call(1, [a.seed - 1])
            warm.append(time.perf_counter() - t0)
            if i == 0:
                unet_per_image = unet_t.calls
        info["warmup_s"] = [round(w, 3) for w in warm]
        info["unet_calls_per_image"] = unet_per_image
        print(f"warm-up: {', '.join(f'{w:.2f}s' for w in warm)} per image; {unet_per_image} UNet calls per image")

        results = []
        modes = ["sequential"] + (["batched"] if a.batched else [])
        for n in [int(x) for x in a.requests.split(",") if x.strip()]:
            for mode in modes:
                if mode == "batched" and n == 1:
                    continue  # the same as sequential
                runs = []
                for _ in range(a.repeat):
                    for t in timers:
                        t.reset()
                    seeds = [a.seed + i for i in range(n)]
                    service, done = [], []
                    start = time.perf_counter()
                    if mode == "sequential":
                        for s in seeds:
                            t1 = time.perf_counter()
                            call(1, [s])
                            now = time.perf_counter()
                            service.append(now - t1)
                            done.append(now - start)
                    else:
                        call(n, seeds)
                        now = time.perf_counter()
                        service = [now - start] * n
                        done = [now - start] * n
                    wall = time.perf_counter() - start
                    runs.append(dict(wall=wall, service=service, done=done, unet_calls=unet_t.calls,
                                     unet_batch=unet_t.batch, unet_s=unet_t.seconds, text_s=text_t.seconds,
                                     vae_s=vae_t.seconds))
                # The run with the median wall time stands for the level (the others are kept in
                # the JSON): a shared machine gives the odd outlier.
                walls = [x["wall"] for x in runs]
                m = sorted(runs, key=lambda x: x["wall"])[(len(runs) - 1) // 2]
                wall = m["wall"]
                image_steps = n * unet_per_image
                r = {
                    "mode": mode, "requests": n, "wall_s": round(wall, 4),
                    "wall_s_all": [round(w, 4) for w in walls],
                    "images_per_s": n / wall,
                    "unet_forwards": m["unet_calls"],
                    "unet_forward_batch": m["unet_batch"] / max(m["unet_calls"], 1),
                    "unet_forwards_per_s": m["unet_calls"] / wall,
                    "unet_image_steps_per_s": image_steps / wall,
                    "latency_p50_s": p50(m["service"]), "latency_max_s": max(m["service"]),
                    "completion_p50_s": p50(m["done"]), "completion_max_s": max(m["done"]),
                    "unet_share": m["unet_s"] / wall,
                    "text_encoder_share": m["text_s"] / wall,
                    "vae_decode_share": m["vae_s"] / wall,
                }
                results.append(r)
                print(f"  N={n} {mode}: " + ", ".join(f"{w:.2f}s" for w in walls), flush=True)

    info["results"] = results
    hdr = (f"{'mode':<10} {'N':>3} {'wall s':>8} {'images/s':>9} {'UNet fwd/s':>10} {'fwd batch':>9} "
           f"{'img-steps/s':>11} {'lat p50 s':>9} {'done p50 s':>10} {'done max s':>10} {'unet%':>6} "
           f"{'text%':>6} {'vae%':>5}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r['mode']:<10} {r['requests']:>3} {r['wall_s']:>8.2f} {r['images_per_s']:>9.3f} "
              f"{r['unet_forwards_per_s']:>10.2f} {r['unet_forward_batch']:>9.0f} "
              f"{r['unet_image_steps_per_s']:>11.2f} {r['latency_p50_s']:>9.3f} {r['completion_p50_s']:>10.3f} "
              f"{r['completion_max_s']:>10.3f} {100 * r['unet_share']:>5.1f}% {100 * r['text_encoder_share']:>5.1f}% "
              f"{100 * r['vae_decode_share']:>4.1f}%")
    try:
        info["loadavg_after"] = os.getloadavg()
    except OSError:
        pass
    if a.json:
        with open(a.json, "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
