"""Baseline for `kiln bench`: transformers `generate` tokens/s on the same machine.

Same workload as `kiln bench`: prompts of exactly --prompt-tokens tokens, --max-tokens greedy
output tokens with eos ignored, batch sizes given by --batch. Prints one line per batch size.

    python tools/bench/transformers_baseline.py --model /tmp/kiln-models/qwen2.5-coder-0.5b-instruct-hf --batch 1,8
"""
import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    text = ("The quick brown fox jumps over the lazy dog while the committee reviews the quarterly "
            "report on renewable energy, inference servers, batching, and the history of kilns. ")
    base = tok(text * (a.prompt_tokens // 8 + 4), add_special_tokens=False)["input_ids"]
    print(f"torch {torch.__version__} threads {torch.get_num_threads()}")
    with torch.inference_mode():
        for b in [int(x) for x in a.batch.split(",")]:
            ids = torch.tensor([[base[(k + i * 7) % len(base)] for k in range(a.prompt_tokens)] for i in range(b)])
            mask = torch.ones_like(ids)
            model.generate(ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=a.max_tokens, min_new_tokens=a.max_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id or 0)
            wall = time.perf_counter() - t0
            new = (out.shape[1] - ids.shape[1]) * b
            print(f"batch {b:3d}: {new} tokens in {wall:.2f}s = {new / wall:.1f} tok/s; prefill (ttft) {ttft * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
