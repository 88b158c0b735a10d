"""The official `openai` Python client against a running kiln (issue 4's proof): embeddings.create
with float, base64 and the client's default (base64 decoded by the client), `dimensions`, a
single string, and a 400 for an empty input.

Run by tests/openai_client.sh (which starts kiln with the tiny sentence-transformers fixture);
by hand:  python tests/openai_client.py http://127.0.0.1:8080 bert-tiny-st 32
Needs `openai` (pinned in .ci/run: OPENAI_VERSION); nothing else beyond the standard library.
"""

import base64
import math
import struct
import sys

import openai
from openai import OpenAI

INPUTS = ["hello world", "the cat sees the river", "a much longer sentence about kilns, batching and vectors"]


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    base, model, dims = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)

    floats = client.embeddings.create(model=model, input=INPUTS, encoding_format="float")
    check(floats.model == model, f"model {floats.model!r}")
    check([d.index for d in floats.data] == [0, 1, 2], "indices")
    check(floats.usage.prompt_tokens > len(INPUTS), f"usage {floats.usage}")
    vectors = [d.embedding for d in floats.data]
    for i, v in enumerate(vectors):
        check(isinstance(v, list) and len(v) == dims, f"float vector {i}: {type(v)} of {len(v)}")
        check(abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-5, f"vector {i} is not unit length")
    check(vectors[0] != vectors[1], "different texts, same vector")

    raw = client.embeddings.create(model=model, input=INPUTS, encoding_format="base64")
    for i, d in enumerate(raw.data):
        check(isinstance(d.embedding, str), f"base64 item {i} is {type(d.embedding)}")
        decoded = struct.unpack(f"<{dims}f", base64.b64decode(d.embedding))
        check(list(decoded) == [f32(x) for x in vectors[i]], f"base64 {i} differs from float")

    # The client's default: it asks for base64 and decodes it itself.
    default = client.embeddings.create(model=model, input=INPUTS)
    for i, d in enumerate(default.data):
        check([f32(x) for x in d.embedding] == [f32(x) for x in vectors[i]], f"default encoding {i} differs")

    single = client.embeddings.create(model=model, input=INPUTS[1], encoding_format="float")
    check(len(single.data) == 1, "one input, one vector")
    check(max(abs(a - b) for a, b in zip(single.data[0].embedding, vectors[1])) < 1e-5, "alone vs in a batch")

    short = client.embeddings.create(model=model, input=INPUTS[0], dimensions=8, encoding_format="float")
    v8 = short.data[0].embedding
    check(len(v8) == 8 and abs(math.sqrt(sum(x * x for x in v8)) - 1.0) < 1e-5, "dimensions=8")

    try:
        client.embeddings.create(model=model, input=[])
        raise AssertionError("an empty input was accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400, f"status {e.status_code}")

    print(f"openai {openai.__version__} client: float, base64, default, dimensions and errors OK against {base}")


if __name__ == "__main__":
    main()
