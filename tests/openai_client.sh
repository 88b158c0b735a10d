#!/usr/bin/env bash
# The official OpenAI Python client against a real kiln (issue 4): start kiln serving the tiny
# sentence-transformers fixture on an ephemeral loopback port, run tests/openai_client.py with
# a Python that has `openai` installed, stop kiln.
#
# Installs nothing: .ci/run makes target/ci-venv with the pinned client.
# Run from anywhere:  tests/openai_client.sh
# Env: KILN_BIN (default: target/debug/kiln), PYTHON (default: target/ci-venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-target/ci-venv/bin/python}
KILN=${KILN_BIN:-target/debug/kiln}
MODEL_DIR=tests/fixtures/bert-tiny-st

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kiln-openai.XXXXXX")
KILN_PID=
fail() {
    echo "openai client: FAILED: $*" >&2
    [[ -s "$WORK/kiln.log" ]] && { echo "---- last lines of kiln.log ----" >&2; tail -n 30 "$WORK/kiln.log" >&2; }
    exit 1
}
cleanup() {
    if [[ -n "$KILN_PID" ]]; then
        kill "$KILN_PID" 2>/dev/null || true
        wait "$KILN_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[[ -x "$KILN" ]] || fail "kiln binary not found at $KILN (cargo build --bin kiln)"
"$PYTHON" -c 'import openai' 2>/dev/null || fail "$PYTHON cannot import openai (pip install openai, or run .ci/run)"

NO_COLOR=1 RUST_LOG=info "$KILN" serve --model "$MODEL_DIR" --device cpu --host 127.0.0.1 --port 0 \
    >"$WORK/kiln.log" 2>&1 &
KILN_PID=$!

ADDR=
for _ in $(seq 1 200); do
    ADDR=$(grep -a 'kiln listening' "$WORK/kiln.log" 2>/dev/null | grep -aoE '127\.0\.0\.1:[0-9]+' | head -n1 || true)
    [[ -n "$ADDR" ]] && break
    kill -0 "$KILN_PID" 2>/dev/null || fail "kiln exited during startup"
    sleep 0.1
done
[[ -n "$ADDR" ]] || fail "kiln did not report its listening address within 20 s"
for _ in $(seq 1 300); do
    curl -fsS -o /dev/null "http://$ADDR/ready" 2>/dev/null && break
    kill -0 "$KILN_PID" 2>/dev/null || fail "kiln exited before it was ready"
    sleep 0.2
done
curl -fsS -o /dev/null "http://$ADDR/ready" || fail "kiln at $ADDR not ready within 60 s"

"$PYTHON" tests/openai_client.py "http://$ADDR" bert-tiny-st 32 || fail "tests/openai_client.py"
echo "openai client: 1 passed"
