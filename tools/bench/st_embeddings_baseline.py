"""Baseline for Kiln's embeddings numbers (issue 4): sentence-transformers `encode` on the same machine.

Workload: --n sentences of --min-words..--max-words common English words (seeded), embedded with
`encode(batch_size=32)` (sentences/s, median of --runs), and single-sentence latency (`encode([s])`,
p50 over --single calls). --prompts also writes the sentences as JSON lines ({"prompt": ...})
so that kiln-loadtest sends Kiln exactly the same texts:

    python tools/bench/st_embeddings_baseline.py --model /tmp/kiln-models/minilm --prompts /tmp/st-sentences.jsonl
    target/release/kiln serve --config config/minilm.toml &
    target/release/kiln-loadtest loadtest/scenarios/embeddings.toml --base-url http://127.0.0.1:8080 \
        ...   (the full recipe: docs/vector-search.md, "Measured")

Versions: tools/oracle/requirements.txt (torch 2.15.0, sentence-transformers 6.2.0).
"""
import argparse
import json
import random
import statistics
import time

import torch
from sentence_transformers import SentenceTransformer

WORDS = """the of and to in is it that was for on are with as his they be at one have this from by hot
word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him
two has look more day could go come did number sound no most people my over know water than call
first who may down side been now find any new work part take get place made live where after back
little only round man year came show every good me give our under name very through just form
sentence great think say help low line differ turn cause much mean before move right boy old too
same tell does set three want air well also play small end put home read hand port large spell add
even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father head stand own page
should country found answer school grow study still learn plant cover food sun four between state
keep eye never last let thought city tree cross farm hard start might story saw far sea draw left
late run while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river car
feet care second book carry took science eat room friend began idea fish mountain stop once base
hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red
list though feel talk bird soon body dog family direct pose leave song measure door product black
short numeral class wind question happen complete ship area half rock order fire south problem
piece told knew pass since top whole king space heard best hour better true during hundred five
remember step early hold west ground interest reach fast verb sing listen six table travel less
morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead
cry dark machine note wait plan figure star box noun field rest correct able pound done beauty
drive stood contain front teach week final gave green quick develop ocean warm free minute strong
special mind behind clear tail produce fact street inch multiply nothing course stay wheel full
force blue object decide surface deep moon island foot system busy test record boat common gold
possible plane stead dry wonder laugh thousand ago ran check game shape equate miss brought heat
snow tire bring yes distant fill east paint language among""".split()


def sentences(n, lo, hi, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
        out.append(" ".join(words).capitalize() + ".")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/kiln-models/minilm")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--min-words", type=int, default=8)
    ap.add_argument("--max-words", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--single", type=int, default=200, help="single-sentence encode calls for the latency p50")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--prompts", help="write the sentences here as JSON lines for kiln-loadtest")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    texts = sentences(a.n, a.min_words, a.max_words, a.seed)
    if a.prompts:
        with open(a.prompts, "w") as f:
            for t in texts:
                f.write(json.dumps({"prompt": t}) + "\n")
    model = SentenceTransformer(a.model, device="cpu")
    tokens = sum(len(model.tokenizer(t)["input_ids"]) for t in texts)
    print(f"torch {torch.__version__} threads {torch.get_num_threads()}; {a.n} sentences, "
          f"{a.min_words}-{a.max_words} words, {tokens / a.n:.1f} tokens on average")
    with torch.inference_mode():
        model.encode(texts[:64], batch_size=a.batch_size)  # warm-up
        walls = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            model.encode(texts, batch_size=a.batch_size)
            walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)
        lat = []
        for i in range(a.single):
            t0 = time.perf_counter()
            model.encode([texts[i % len(texts)]], batch_size=1)
            lat.append((time.perf_counter() - t0) * 1e3)
    lat.sort()
    result = {
        "sentences": a.n,
        "batch_size": a.batch_size,
        "sentences_per_s": a.n / wall,
        "runs_s": walls,
        "single_p50_ms": lat[len(lat) // 2],
        "single_p90_ms": lat[int(len(lat) * 0.9)],
        "torch_threads": torch.get_num_threads(),
    }
    print(f"encode(batch_size={a.batch_size}): {result['sentences_per_s']:.1f} sentences/s "
          f"(runs {', '.join(f'{w:.2f}s' for w in walls)})")
    print(f"single sentence: p50 {result['single_p50_ms']:.1f} ms, p90 {result['single_p90_ms']:.1f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
