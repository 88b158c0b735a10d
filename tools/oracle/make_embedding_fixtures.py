#!/usr/bin/env python3
"""Builds Kiln's embedding reference fixtures with HF `tokenizers`, `transformers` and
`sentence-transformers`.

Writes two tiny random-weight sentence-transformers folders and what
`SentenceTransformer.encode()` returns for them:

- `bert-tiny-st`: `BertModel` (hidden 32, 2 layers, 4 heads, ffn 64) with a WordPiece
  tokenizer built from `corpus.txt` (lower-casing, BERT pre-tokenizer, `[CLS] $A [SEP]`),
  mean pooling, then `Normalize`; max_seq_length 24 so the long sentences are truncated.
- `xlmr-tiny-st`: `XLMRobertaModel` (same sizes, position ids offset by padding_idx + 1) with
  a Unigram (SentencePiece-style, `Metaspace`) tokenizer built from `corpus.txt`
  (`<s> $A </s>`), CLS pooling, no Normalize; query/passage prompts in
  `config_sentence_transformers.json`; rewritten in the sentence-transformers 2.x file layout
  (boolean pooling flags, `max_seq_length` 20 in `sentence_bert_config.json`, tokenizer
  `model_max_length` 512) so both layouts are covered.

Each folder gets `expected.json`: per sentence the token ids (after truncation, with special
tokens), the `encode()` vector, and for the BERT folder the vectors every pooling mode gives
on the same token embeddings (mean, cls, max, mean_sqrt_len) so the Rust pooling is checked
mode by mode. The weights are random with a large spread (LayerNorm weights and biases too)
so that a swapped or missing parameter changes the output.

With `--minilm DIR` (a sentence-transformers all-MiniLM-L6-v2 folder, e.g. the one
`../shared/tools/real-models.sh` puts in /tmp/kiln-models/minilm) it also writes
`minilm-expected.json`: the normalized float32 vectors of ~50 sentences (never the weights).

Deterministic (byte-identical reruns): fixed seeds, CPU only, float32, single thread, and
vocabularies built by frequency counts rather than HF trainers (whose ties are broken by hash
order, so their vocabularies change from run to run).

    python tools/oracle/make_embedding_fixtures.py --out tests/fixtures --minilm /tmp/kiln-models/minilm
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.models import Normalize, Pooling, Transformer  # noqa: E402
from tokenizers import (  # noqa: E402
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    BertTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaModel,
    XLMRobertaTokenizerFast,
)

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.txt"

# Mixed lengths and languages; the long ones exceed the tiny models' max_seq_length.
SENTENCES = [
    "Hello world.",
    "The kiln was warm long before sunrise.",
    "A continuous-batching server keeps the accelerator busy: new requests join between steps, "
    "finished ones leave, and nobody waits for the slowest sequence, which matters a great deal "
    "when many clients share one machine.",
    "Tokens stream back to the client one by one.",
    "Le café était chaud et la boulangerie sentait le pain frais.",
    "Москва — столица России.",
    "Η γρήγορη καφέ αλεπού.",
    "東京は日本の首都です。",
    "서울은 한국의 수도입니다.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "ok",
    "Emoji 🔥 and numbers 12345 mixed with UPPER case.",
]

MINILM_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "A cheetah is running behind its prey.",
    "The new movie is awesome.",
    "The cat sits outside.",
    "A man is playing guitar.",
    "The new movie is so great.",
    "I love pasta.",
    "Do you like pizza?",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "How do I bake sourdough bread at home?",
    "Continuous batching lets an inference server admit new requests between decoding steps.",
    "Vector databases store embeddings and answer nearest-neighbour queries.",
    "PostgreSQL with pgvector can index embeddings with HNSW or IVFFlat.",
    "The quick brown fox jumps over the lazy dog.",
    "Sphinx of black quartz, judge my vow!",
    "It rained all day, so the match was postponed until next weekend.",
    "Rust guarantees memory safety without a garbage collector.",
    "The mitochondria is the powerhouse of the cell.",
    "She sells sea shells by the sea shore.",
    "Quantum computers use qubits that can be in superposition.",
    "The stock market fell sharply after the announcement.",
    "Please remember to water the plants while I am away.",
    "Le chat est assis sur le tapis.",
    "Der Hund spielt im Garten.",
    "Москва — столица России.",
    "東京は日本の首都です。",
    "ok",
    "Yes.",
    "No, thank you.",
    "Emoji 🔥 and numbers 12345 mixed with UPPER case.",
    "An embedding maps a sentence to a point in a high-dimensional space where similar "
    "meanings are close together, which is what semantic search and retrieval-augmented "
    "generation rely on when they look for the passages most relevant to a question.",
    "The kiln was warm long before sunrise. Mara checked the thermocouple, wrote the reading in "
    "her notebook, and poured a second cup of coffee.",
    "Astronomers discovered a new exoplanet orbiting a nearby red dwarf star.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "He forgot his umbrella at the train station.",
    "Machine learning models can be biased if the training data is biased.",
    "The orchestra played Beethoven's ninth symphony.",
    "Our flight was delayed by three hours because of the storm.",
    "Electric cars are becoming cheaper every year.",
    "A child is flying a kite on the beach.",
    "How many tokens fit in the cache? It depends on the number of layers, the number of "
    "key-value heads, the head dimension, and the block size. " * 12,
]

HIDDEN, LAYERS, HEADS, FFN = 32, 2, 4, 64
MAX_SEQ = 24


def corpus_lines() -> list[str]:
    return [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Large-spread random weights so every parameter matters (LayerNorm included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or name.endswith("LayerNorm.bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def counted(words) -> list[tuple[str, int]]:
    """(item, count), most frequent first, ties by item: deterministic (HF trainers are not)."""
    return sorted(Counter(words).items(), key=lambda kv: (-kv[1], kv[0]))


def wordpiece_tokenizer(tmp: Path) -> BertTokenizerFast:
    """A WordPiece vocabulary built from `corpus.txt` in a fixed way: the special tokens, every
    character alone and as a `##` continuation, then the most frequent words."""
    normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words = [w for line in corpus_lines() for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(line))]
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    vocab += [w for w, _ in counted(words) if len(w) > 1][: max(0, 600 - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tok.decoder = decoders.WordPiece()
    path = tmp / "wordpiece.json"
    tok.save(str(path))
    return BertTokenizerFast(
        tokenizer_file=str(path),
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        do_lower_case=True,
        model_max_length=512,
    )


def unigram_tokenizer(tmp: Path) -> XLMRobertaTokenizerFast:
    """A SentencePiece-style Unigram vocabulary built from `corpus.txt` in a fixed way: the
    special tokens (XLM-R's ids: <s> 0, <pad> 1, </s> 2, <unk> 3), every character, then the
    most frequent `▁`-prefixed words and 2-3 character pieces, scored by log frequency;
    `<mask>` last."""
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    words = [w for line in corpus_lines() for w, _ in pre.pre_tokenize_str(line)]
    chars = counted(c for w in words for c in w)
    grams = counted(w[i : i + n] for w in words for n in (2, 3) for i in range(len(w) - n + 1))
    whole = counted(w for w in words if len(w) > 3)
    total = sum(n for _, n in chars)
    pieces: dict[str, float] = {}
    for piece, n in chars + whole[:150] + grams:
        if len(pieces) >= 496:
            break
        # Longer pieces get a bonus so frequent words stay whole.
        pieces.setdefault(piece, round(math.log(n / total) + 0.5 * len(piece), 4))
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + list(pieces.items())
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    path = tmp / "unigram.json"
    tok.save(str(path))
    return XLMRobertaTokenizerFast(
        tokenizer_file=str(path),
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=512,
    )


def save_hf(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def legacy_layout(folder: Path, pooling: str, max_seq_length: int) -> None:
    """Rewrites a saved folder in the sentence-transformers 2.x layout most published models
    still use (all-MiniLM-L6-v2, multilingual-e5): boolean pooling flags, `max_seq_length` in
    `sentence_bert_config.json` (which then wins over the tokenizer's `model_max_length`),
    `sentence_transformers.models.*` module types."""
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": HIDDEN,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": pooling == "max",
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
            indent=2,
        )
    )
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2)
    )
    modules = json.loads((folder / "modules.json").read_text())
    for m in modules:
        m["type"] = "sentence_transformers.models." + m["type"].rsplit(".", 1)[1]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg["model_max_length"] = 512
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))


def st_folder(
    hf_dir: Path,
    out: Path,
    pooling: str,
    normalize: bool,
    prompts: dict[str, str] | None,
    legacy_max_seq_length: int | None = None,
) -> SentenceTransformer:
    transformer = Transformer(str(hf_dir), max_seq_length=MAX_SEQ)
    mods = [transformer, Pooling(HIDDEN, pooling_mode=pooling)]
    if normalize:
        mods.append(Normalize())
    st = SentenceTransformer(modules=mods, device="cpu", prompts=prompts)
    if out.exists():
        shutil.rmtree(out)
    st.save(str(out))
    (out / "README.md").unlink(missing_ok=True)
    (out / "model.safetensors").chmod(0o644)
    if legacy_max_seq_length is not None:
        legacy_layout(out, pooling, legacy_max_seq_length)
    # Record what a user gets when loading the saved folder, not the in-memory object.
    return SentenceTransformer(str(out), device="cpu")


def token_ids(st: SentenceTransformer, texts: list[str]) -> list[list[int]]:
    ids = []
    for t in texts:
        feats = st.tokenize([t])
        ids.append(feats["input_ids"][0][feats["attention_mask"][0].bool()].tolist())
    return ids


def floats(a: np.ndarray) -> list:
    return np.asarray(a, dtype=np.float32).astype(float).tolist()


def pooled_all_modes(st: SentenceTransformer, texts: list[str]) -> dict[str, list]:
    """Every pooling mode on the same token embeddings (no Normalize)."""
    transformer = st[0]
    out: dict[str, list] = {}
    for mode in ["mean", "cls", "max", "mean_sqrt_len_tokens"]:
        pool = Pooling(HIDDEN, pooling_mode=mode)
        vecs = []
        for t in texts:
            feats = st.tokenize([t])
            with torch.no_grad():
                feats = transformer(feats)
                vecs.append(pool(feats)["sentence_embedding"][0].numpy())
        out[mode] = floats(np.stack(vecs))
    return out


def record(st: SentenceTransformer, texts: list[str], extra: dict) -> dict:
    vectors = st.encode(texts, batch_size=4, convert_to_numpy=True)
    exp = {
        "max_seq_length": st.max_seq_length,
        "sentences": texts,
        "token_ids": token_ids(st, texts),
        "vectors": floats(vectors),
    }
    exp.update(extra)
    return exp


def build_bert(out_dir: Path, tmp: Path) -> None:
    tokenizer = wordpiece_tokenizer(tmp)
    cfg = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    randomize(model, 11)
    hf_dir = tmp / "bert-hf"
    save_hf(model, tokenizer, hf_dir)
    folder = out_dir / "bert-tiny-st"
    st = st_folder(hf_dir, folder, "mean", True, None)
    exp = record(st, SENTENCES, {"pooling": pooled_all_modes(st, SENTENCES)})
    (folder / "expected.json").write_text(json.dumps(exp, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def build_xlmr(out_dir: Path, tmp: Path) -> None:
    tokenizer = unigram_tokenizer(tmp)
    cfg = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_SEQ + 2 + 16,
        type_vocab_size=1,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(2)
    model = XLMRobertaModel(cfg, add_pooling_layer=False).eval()
    randomize(model, 22)
    hf_dir = tmp / "xlmr-hf"
    save_hf(model, tokenizer, hf_dir)
    folder = out_dir / "xlmr-tiny-st"
    prompts = {"query": "query: ", "passage": "passage: "}
    st = st_folder(hf_dir, folder, "cls", False, prompts, legacy_max_seq_length=20)
    queries = SENTENCES[:4]
    extra = {
        "prompts": prompts,
        "query_sentences": queries,
        "query_token_ids": token_ids(st, ["query: " + q for q in queries]),
        "query_vectors": floats(st.encode(queries, prompt_name="query", batch_size=4, convert_to_numpy=True)),
    }
    exp = record(st, SENTENCES, extra)
    (folder / "expected.json").write_text(json.dumps(exp, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def build_minilm(minilm: Path, out: Path) -> None:
    st = SentenceTransformer(str(minilm), device="cpu")
    vectors = st.encode(MINILM_SENTENCES, batch_size=8, convert_to_numpy=True, normalize_embeddings=True)
    exp = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "max_seq_length": st.max_seq_length,
        "sentences": MINILM_SENTENCES,
        "token_ids": token_ids(st, MINILM_SENTENCES),
        # 7 decimals keep the file small; far below the test's cosine tolerance.
        "vectors": [[round(float(x), 7) for x in v] for v in np.asarray(vectors, dtype=np.float32)],
    }
    out.write_text(json.dumps(exp, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE.parent.parent / "tests" / "fixtures")
    ap.add_argument("--minilm", type=Path, default=None, help="all-MiniLM-L6-v2 sentence-transformers folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        build_bert(args.out, tmp)
        build_xlmr(args.out, tmp)
    if args.minilm is not None:
        build_minilm(args.minilm, args.out / "minilm-expected.json")
    print(f"wrote fixtures under {args.out}")


if __name__ == "__main__":
    main()
