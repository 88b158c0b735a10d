#!/usr/bin/env python3
"""Builds Kiln's text-generation reference fixtures with HF `tokenizers` + `transformers`.

For each of three tiny random-weight checkpoints (Qwen2 tied/GQA, Qwen2 untied/MHA,
Llama GQA) it writes a complete HuggingFace model folder (model.safetensors, config.json,
generation_config.json, tokenizer.json, tokenizer_config.json) plus `expected.json`: the
tokenization, greedy continuation, top-5 log-probs and chat-template renderings that the
Rust tests must reproduce.

Deterministic: fixed seeds, CPU only, float32, single thread.

    python tools/oracle/make_text_fixtures.py --out tests/fixtures
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tokenizers import (  # noqa: E402
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (  # noqa: E402
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.txt"

# Qwen2's pre-tokenizer split pattern (from Qwen2.5's tokenizer.json).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIALS = [ENDOFTEXT, IM_START, IM_END]

# 1021 learned tokens (256 bytes + merges) + 3 special tokens = 1024 ids.
BPE_VOCAB = 1021

# Qwen2.5-Instruct's chat template, verbatim from Qwen/Qwen2.5-0.5B-Instruct
# tokenizer_config.json (revision 7ae557604adf67be50417f59c2c2f167def9a775).
QWEN25_INSTRUCT_TEMPLATE = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"

# SmolLM2-Instruct's chat template, verbatim from HuggingFaceTB/SmolLM2-135M-Instruct.
SMOLLM2_INSTRUCT_TEMPLATE = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

# Raw-text prompts: 1 token up to ~60 tokens, ASCII and multi-byte UTF-8.
PROMPTS = [
    "The",
    "Hello, world!",
    "The capital of France is",
    "Café crème brûlée in Zürich — 你好，世界！ 😀🎉",
    "Once upon a time there was a small robot who wanted to learn how to paint. "
    "Every day it mixed colours and every day the colours turned",
    "def greet(name):\n    return f\"Hello, {name}!\"\n# Привет, мир! こんにちは 🚀 3.14159 ❤️",
]

CHATS = [
    # user only: Qwen's template injects its default system prompt.
    {"messages": [{"role": "user", "content": "What is the capital of France?"}], "add_generation_prompt": True},
    {
        "messages": [
            {"role": "system", "content": "You are a terse assistant. Answer in one word."},
            {"role": "user", "content": "Name a colour of the sky."},
        ],
        "add_generation_prompt": True,
    },
    {
        "messages": [
            {"role": "user", "content": "Hello! Can you write a haiku about autumn?"},
            {"role": "assistant", "content": "Red leaves drift and fall / the river carries them home / the hills turn to gold."},
            {"role": "user", "content": "Now one in French, s'il vous plaît. Merci 😀"},
        ],
        "add_generation_prompt": True,
    },
    {
        "messages": [
            {"role": "user", "content": "  Whitespace\tand\nnewlines stay as they are.  "},
            {"role": "assistant", "content": "你好，世界！"},
        ],
        "add_generation_prompt": False,
    },
    # Tools: Qwen's tools branch, an assistant tool call (`tojson` of its arguments) and a
    # tool response. Dict keys are in sorted order at every level, so a renderer whose maps
    # sort keys and one that keeps insertion order must both match. SmolLM2 ignores tools.
    {
        "messages": [
            {"role": "user", "content": "What's the weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"arguments": {"city": "Paris", "unit": "celsius"}, "name": "get_weather"}, "type": "function"}
                ],
            },
            {"role": "tool", "content": '{"temp_c": 21, "sky": "clear"}'},
        ],
        "tools": [
            {
                "function": {
                    "description": "Current weather in a city.",
                    "name": "get_weather",
                    "parameters": {
                        "properties": {
                            "city": {"description": "City name, e.g. Zürich", "type": "string"},
                            "unit": {"enum": ["celsius", "fahrenheit"], "type": "string"},
                        },
                        "required": ["city"],
                        "type": "object",
                    },
                },
                "type": "function",
            }
        ],
        "add_generation_prompt": True,
        "archs": ["qwen2"],
    },
]

N_GREEDY = 24
# Seed search targets (over every greedy step of every prompt). The weights are scaled so the
# logits have a std of about 3 (2.5-3.6): float32 then reproduces log-probs to ~1e-5, well inside the
# Rust tests' 1e-4, and sampling at temperature 1 is far from one-hot.
MIN_ACCEPTED_MARGIN = 1e-2  # top-1 minus top-2 logit; the hard requirement is > 1e-3
MAX_ACCEPTED_ABS_LOGIT = 15.0  # hard limit 20
MAX_ACCEPTED_TOP1_PROB = 0.97  # softmax at temperature 1; hard limit 0.99


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    text = CORPUS.read_text(encoding="utf-8")
    # Train on lines (deterministic order) plus the whole corpus repeated so merges of
    # multi-byte characters and common words exist.
    lines = text.splitlines(keepends=True)
    tok.train_from_iterator(lines * 3, trainer=trainer, length=len(lines) * 3)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def make_hf_tokenizer(tok_json: Path, kind: str) -> PreTrainedTokenizerFast:
    if kind == "qwen2":
        return PreTrainedTokenizerFast(
            tokenizer_file=str(tok_json),
            bos_token=None,
            eos_token=IM_END,
            pad_token=ENDOFTEXT,
            unk_token=None,
            model_max_length=32768,
            chat_template=QWEN25_INSTRUCT_TEMPLATE,
            clean_up_tokenization_spaces=False,
            split_special_tokens=False,
            errors="replace",
            add_prefix_space=False,
        )
    # SmolLM2-Instruct style special tokens.
    return PreTrainedTokenizerFast(
        tokenizer_file=str(tok_json),
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=IM_END,
        unk_token=ENDOFTEXT,
        model_max_length=8192,
        chat_template=SMOLLM2_INSTRUCT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
    )


def build_model(spec: dict, vocab: int, ids: dict, seed: int):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=512,
        rms_norm_eps=spec["eps"],
        tie_word_embeddings=spec["tie"],
        rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"]},
        initializer_range=spec["init"],
        hidden_act="silu",
        attention_dropout=0.0,
        bos_token_id=ids.get("bos"),
        eos_token_id=ids["eos_config"],
        pad_token_id=ids["pad"],
        use_cache=True,
        dtype="float32",
    )
    if spec["arch"] == "qwen2":
        cfg = Qwen2Config(use_sliding_window=False, max_window_layers=spec["layers"], **common)
        cls = Qwen2ForCausalLM
    else:
        cfg = LlamaConfig(attention_bias=False, mlp_bias=False, head_dim=spec["hidden"] // spec["heads"], **common)
        cls = LlamaForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).to(torch.float32).eval()
    # Explicit init: every tensor random (biases and norm gains too, so a loader that
    # drops one of them fails the parity tests). The embedding / lm_head std sets the logit
    # scale: std(logits) ~= embed_std (tied) or head_std (untied) * sqrt(hidden), about 3.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(spec["embed_std"] * torch.randn(p.shape, generator=g))
            elif "lm_head" in name:  # untied only (a tied head is the embedding)
                p.copy_(spec["head_std"] * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1]
                p.copy_(spec["gain"] / fan_in**0.5 * torch.randn(p.shape, generator=g))
    if spec["tie"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@torch.no_grad()
def run_prompt(model, ids: list[int]):
    """Greedy loop over full forward passes (no KV cache), never stopping on eos."""
    seq = list(ids)
    greedy, margins = [], []
    first_logits = None
    max_abs, max_p1, stds = 0.0, 0.0, []
    for _ in range(N_GREEDY):
        logits = model(torch.tensor([seq], dtype=torch.long), use_cache=False).logits[0, -1].float()
        if first_logits is None:
            first_logits = logits.clone()
        top2 = torch.topk(logits, 2)
        margins.append(float(top2.values[0] - top2.values[1]))
        max_abs = max(max_abs, float(logits.abs().max()))
        max_p1 = max(max_p1, float(torch.softmax(logits, dim=-1).max()))
        stds.append(float(logits.std()))
        nxt = int(top2.indices[0])
        greedy.append(nxt)
        seq.append(nxt)
    logp = torch.log_softmax(first_logits, dim=-1)
    top5 = torch.topk(logp, 5)
    return {
        "greedy": greedy,
        "top5": [[int(i), float(v)] for v, i in zip(top5.values, top5.indices)],
        "min_margin": min(margins),
        "last_logits_head": [float(x) for x in first_logits[:16]],
        # Seed-selection statistics (printed, not written to expected.json).
        "max_abs_logit": max_abs,
        "max_top1_prob": max_p1,
        "logit_std": (min(stds), max(stds)),
    }


def stats(results: list[dict]) -> dict:
    return {
        "min_margin": min(r["min_margin"] for r in results),
        "max_abs_logit": max(r["max_abs_logit"] for r in results),
        "max_top1_prob": max(r["max_top1_prob"] for r in results),
        "std_lo": min(r["logit_std"][0] for r in results),
        "std_hi": max(r["logit_std"][1] for r in results),
    }


def acceptable(st: dict) -> bool:
    return (
        st["min_margin"] >= MIN_ACCEPTED_MARGIN
        and st["max_abs_logit"] <= MAX_ACCEPTED_ABS_LOGIT
        and st["max_top1_prob"] <= MAX_ACCEPTED_TOP1_PROB
    )


@torch.no_grad()
def f64_logprob_error(model, prompt_ids: list[list[int]], results: list[dict]) -> float:
    """Largest |f32 - f64| over the recorded top-5 log-probs: float32's own error."""
    m64 = copy.deepcopy(model).to(torch.float64)
    worst = 0.0
    for ids, r in zip(prompt_ids, results):
        logits = m64(torch.tensor([ids], dtype=torch.long), use_cache=False).logits[0, -1]
        lp = torch.log_softmax(logits, dim=-1)
        worst = max(worst, max(abs(float(lp[i]) - v) for i, v in r["top5"]))
    return worst


SPECS = [
    {
        "name": "qwen2-tied-gqa",
        "arch": "qwen2",
        "hidden": 64,
        "intermediate": 128,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "tie": True,
        "rope_theta": 1000000.0,
        "eps": 1e-6,
        "init": 0.3,
        "embed_std": 0.4,
        "gain": 4.0,
        "seed": 1000,
    },
    {
        "name": "qwen2-untied-mha",
        "arch": "qwen2",
        "hidden": 32,
        "intermediate": 96,
        "layers": 3,
        "heads": 4,
        "kv_heads": 4,
        "tie": False,
        "rope_theta": 10000.0,
        "eps": 1e-5,
        "init": 0.3,
        "embed_std": 1.0,
        "head_std": 0.56,
        "gain": 3.0,
        "seed": 2000,
    },
    {
        "name": "llama-tiny",
        "arch": "llama",
        "hidden": 48,
        "intermediate": 96,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "tie": False,
        "rope_theta": 10000.0,
        "eps": 1e-5,
        "init": 0.3,
        "embed_std": 1.0,
        "head_std": 0.46,
        "gain": 3.0,
        "seed": 3000,
    },
]


def make_fixture(spec: dict, tok_json: Path, out_root: Path, max_seed_tries: int) -> dict:
    out = out_root / spec["name"]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    hf_tok = make_hf_tokenizer(tok_json, spec["arch"])
    # save_jinja_files=False: keep the template inside tokenizer_config.json (the layout of
    # the Qwen2.5 / SmolLM2 repositories), not in a separate chat_template.jinja.
    hf_tok.save_pretrained(str(out), save_jinja_files=False)
    # transformers 5 no longer writes `added_tokens_decoder`; the published Qwen2.5 /
    # SmolLM2 configs have it (and transformers still reads it), so add it back.
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tok_cfg["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    }
    cfg_path.write_text(json.dumps(dict(sorted(tok_cfg.items())), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    # Re-load what was written, and use only that from here on.
    hf_tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    assert (out / "tokenizer_config.json").is_file() and not (out / "chat_template.jinja").exists()

    vocab = len(hf_tok)
    im_end = hf_tok.convert_tokens_to_ids(IM_END)
    eot = hf_tok.convert_tokens_to_ids(ENDOFTEXT)
    im_start = hf_tok.convert_tokens_to_ids(IM_START)
    if spec["arch"] == "qwen2":
        ids = {"bos": None, "eos_config": eot, "pad": eot, "gen_eos": [im_end, eot]}
    else:
        ids = {"bos": im_start, "eos_config": im_end, "pad": im_end, "gen_eos": im_end}

    prompt_ids = [hf_tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    assert len(prompt_ids[0]) == 1, f"first prompt must be one token, got {prompt_ids[0]}"
    for p, i in zip(PROMPTS, prompt_ids):
        assert hf_tok.decode(i) == p, (p, hf_tok.decode(i))
        assert hf_tok.encode(p, add_special_tokens=True) == i, "no special tokens are added"

    best = None
    for attempt in range(max_seed_tries):
        seed = spec["seed"] + attempt
        model = build_model(spec, vocab, ids, seed)
        results = [run_prompt(model, i) for i in prompt_ids]
        st = stats(results)
        ok = acceptable(st)
        print(
            f"  {spec['name']}: seed {seed} min margin {st['min_margin']:.4f}, max |logit| "
            f"{st['max_abs_logit']:.2f}, max top-1 prob {st['max_top1_prob']:.3f}" + (" (accepted)" if ok else ""),
            file=sys.stderr,
        )
        # If no seed is acceptable, keep the one with the largest margin (hard limits below).
        if best is None or (ok, st["min_margin"]) > (acceptable(best[0]), best[0]["min_margin"]):
            best = (st, seed, model, results)
        if ok:
            break
    st, seed, model, results = best
    min_margin = st["min_margin"]
    assert min_margin > 1e-3, f"{spec['name']}: top-1/top-2 margin {min_margin} too small"
    assert st["max_abs_logit"] <= 20.0, f"{spec['name']}: max |logit| {st['max_abs_logit']} too large"
    assert st["max_top1_prob"] <= 0.99, f"{spec['name']}: top-1 prob {st['max_top1_prob']} (near one-hot)"
    f64_err = f64_logprob_error(model, prompt_ids, results)
    assert f64_err <= 3e-5, f"{spec['name']}: float32 top-5 logprobs off float64 by {f64_err}"

    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"],
        eos_token_id=ids["gen_eos"],
        pad_token_id=ids["pad"],
        **(
            # Qwen2.5-Instruct's sampling defaults.
            dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
            if spec["arch"] == "qwen2"
            else {}
        ),
    )
    model.save_pretrained(str(out))
    assert (out / "model.safetensors").is_file()

    # Reload from disk and check the saved checkpoint reproduces the recorded outputs.
    cls = Qwen2ForCausalLM if spec["arch"] == "qwen2" else LlamaForCausalLM
    reloaded = cls.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    for i, r in zip(prompt_ids, results):
        assert run_prompt(reloaded, i)["greedy"] == r["greedy"], "reloaded checkpoint differs"

    prompts = []
    for p, i, r in zip(PROMPTS, prompt_ids, results):
        prompts.append(
            {
                "text": p,
                "ids": i,
                "greedy": r["greedy"],
                "greedy_text": hf_tok.decode(r["greedy"], skip_special_tokens=False),
                "top5": r["top5"],
                "min_margin": r["min_margin"],
                "last_logits_head": r["last_logits_head"],
            }
        )
    chats = []
    for c in CHATS:
        if spec["arch"] not in c.get("archs", [spec["arch"]]):
            continue
        text = hf_tok.apply_chat_template(
            c["messages"],
            tools=c.get("tools"),
            tokenize=False,
            add_generation_prompt=c["add_generation_prompt"],
        )
        case = {"messages": c["messages"]}
        if "tools" in c:
            case["tools"] = c["tools"]
        case.update(
            {
                "add_generation_prompt": c["add_generation_prompt"],
                "text": text,
                "ids": hf_tok.encode(text, add_special_tokens=False),
            }
        )
        chats.append(case)
    if spec["arch"] == "qwen2":
        assert "You are Qwen, created by Alibaba Cloud." in chats[0]["text"]
    else:
        assert "named SmolLM, trained by Hugging Face" in chats[0]["text"]

    expected = {
        "model": spec["name"],
        "architecture": type(model).__name__,
        "seed": seed,
        "vocab_size": vocab,
        "special_ids": {"endoftext": eot, "im_start": im_start, "im_end": im_end},
        "eos_token_ids": ids["gen_eos"] if isinstance(ids["gen_eos"], list) else [ids["gen_eos"]],
        "min_margin": min_margin,
        "prompts": prompts,
        "chat": chats,
    }
    (out / "expected.json").write_text(json.dumps(expected, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"{spec['name']}: seed {seed}, vocab {vocab}, min margin {min_margin:.4f}, max |logit| "
        f"{st['max_abs_logit']:.2f}, logit std {st['std_lo']:.2f}-{st['std_hi']:.2f}, max top-1 prob "
        f"{st['max_top1_prob']:.3f}, f32-vs-f64 top-5 logprob error {f64_err:.1e}, {size} bytes",
        file=sys.stderr,
    )
    assert size < 1_000_000, f"{spec['name']}: {size} bytes"
    return {"name": spec["name"], "min_margin": min_margin, "bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    ap.add_argument("--only", action="append", help="build only this fixture (repeatable)")
    ap.add_argument("--max-seed-tries", type=int, default=100)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    tok = train_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        tok_json = Path(tmp) / "tokenizer.json"
        tok.save(str(tok_json))
        for spec in SPECS:
            if args.only and spec["name"] not in args.only:
                continue
            make_fixture(spec, tok_json, args.out, args.max_seed_tries)


if __name__ == "__main__":
    main()
