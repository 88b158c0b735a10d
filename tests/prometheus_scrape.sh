#!/usr/bin/env bash
# Real Prometheus scrape test (issue 5): start Kiln with the demo model on loopback, start a
# real Prometheus (the `prometheus` binary on PATH, e.g. the Debian package) scraping it every
# second, send a few chat completions, then check through Prometheus' HTTP API that the Kiln
# series were ingested with model="kiln-demo" and non-zero values.
#
# Installs nothing: .ci/run installs the Debian package when `prometheus` is missing.
# Run from anywhere:  tests/prometheus_scrape.sh
# Env: KILN_BIN (default: target/debug/kiln, built with `cargo build --bin kiln`),
#      PROMETHEUS (default: prometheus), SCRAPE_TIMEOUT_S (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."

PROMETHEUS=${PROMETHEUS:-prometheus}
TIMEOUT_S=${SCRAPE_TIMEOUT_S:-60}

fail() {
    echo "prometheus scrape: FAILED: $*" >&2
    for f in kiln.log prometheus.log; do
        if [[ -s "$WORK/$f" ]]; then
            echo "---- last lines of $f ----" >&2
            tail -n 30 "$WORK/$f" >&2
        fi
    done
    echo "prometheus scrape: 0 passed, 1 failed" >&2
    exit 1
}

command -v "$PROMETHEUS" >/dev/null || {
    echo "prometheus scrape: FAILED: '$PROMETHEUS' is not on PATH (apt-get install prometheus)" >&2
    exit 1
}
command -v curl >/dev/null || { echo "prometheus scrape: FAILED: curl is not on PATH" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kiln-prom-scrape.XXXXXX")
KILN_PID=
PROM_PID=
cleanup() {
    for pid in $PROM_PID $KILN_PID; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in $PROM_PID $KILN_PID; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- Kiln on an ephemeral port (it logs the address it bound) ----
if [[ -n "${KILN_BIN:-}" ]]; then
    KILN=$KILN_BIN
else
    cargo build --quiet --bin kiln # a no-op after `cargo test --workspace`
    KILN=target/debug/kiln
fi
[[ -x "$KILN" ]] || fail "kiln binary not found at $KILN"
START=$(date +%s) # the test proper, without the build

NO_COLOR=1 RUST_LOG=info "$KILN" serve --config config/default.toml --host 127.0.0.1 --port 0 \
    >"$WORK/kiln.log" 2>&1 &
KILN_PID=$!

KILN_ADDR=
for _ in $(seq 1 200); do
    KILN_ADDR=$(grep -a 'kiln listening' "$WORK/kiln.log" 2>/dev/null | grep -aoE '127\.0\.0\.1:[0-9]+' | head -n1 || true)
    [[ -n "$KILN_ADDR" ]] && break
    kill -0 "$KILN_PID" 2>/dev/null || fail "kiln exited during startup"
    sleep 0.1
done
[[ -n "$KILN_ADDR" ]] || fail "kiln did not report its listening address within 20 s"

ready=0
for _ in $(seq 1 $((TIMEOUT_S * 5))); do
    if curl -fsS -o /dev/null "http://$KILN_ADDR/ready" 2>/dev/null; then ready=1; break; fi
    kill -0 "$KILN_PID" 2>/dev/null || fail "kiln exited before it was ready"
    sleep 0.2
done
((ready)) || fail "kiln at $KILN_ADDR not ready within ${TIMEOUT_S}s"
echo "kiln ready at $KILN_ADDR"

# ---- Prometheus on a free loopback port with its own storage (never the system service) ----
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: kiln
    metrics_path: /metrics
    static_configs:
      - targets: ['$KILN_ADDR']
EOF

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

PROM_ADDR=
for attempt in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 40000))
    port_in_use "$port" && continue
    rm -rf "$WORK/tsdb"
    "$PROMETHEUS" --config.file="$WORK/prometheus.yml" \
        --storage.tsdb.path="$WORK/tsdb" \
        --web.listen-address="127.0.0.1:$port" \
        --log.level=warn >"$WORK/prometheus.log" 2>&1 &
    PROM_PID=$!
    for _ in $(seq 1 150); do
        if curl -fsS -o /dev/null "http://127.0.0.1:$port/-/ready" 2>/dev/null; then
            PROM_ADDR=127.0.0.1:$port
            break
        fi
        kill -0 "$PROM_PID" 2>/dev/null || break
        sleep 0.2
    done
    [[ -n "$PROM_ADDR" ]] && break
    echo "prometheus did not start on port $port (attempt $attempt), retrying" >&2
    kill "$PROM_PID" 2>/dev/null || true
    wait "$PROM_PID" 2>/dev/null || true
    PROM_PID=
done
[[ -n "$PROM_ADDR" ]] || fail "could not start prometheus ($("$PROMETHEUS" --version 2>&1 | head -n1))"
echo "prometheus ready at $PROM_ADDR ($("$PROMETHEUS" --version 2>&1 | head -n1))"

# ---- traffic ----
for i in 1 2 3; do
    body=$(curl -fsS "http://$KILN_ADDR/v1/chat/completions" -H 'content-type: application/json' \
        -d "{\"model\":\"kiln-demo\",\"messages\":[{\"role\":\"user\",\"content\":\"hi $i\"}],\"max_tokens\":8}") ||
        fail "chat completion $i failed"
    grep -q '"completion_tokens"' <<<"$body" || fail "chat completion $i: unexpected body: $body"
done
echo "sent 3 chat completions"

# ---- poll Prometheus' HTTP API ----
# Succeeds when the query returns a sample labelled model="kiln-demo" whose value is > 0.
# Result shape: {"status":"success","data":{"resultType":"vector","result":[{"metric":{...},"value":[ts,"8"]}]}}
LAST=
query_positive() {
    LAST=$(curl -fsS -G "http://$PROM_ADDR/api/v1/query" --data-urlencode "query=$1" 2>/dev/null) || return 1
    grep -q '"status":"success"' <<<"$LAST" || return 1
    grep -q '"model":"kiln-demo"' <<<"$LAST" || return 1
    grep -qE '"value":\[[0-9.e+]+,"([1-9][0-9.e+]*|0\.[0-9]*[1-9][0-9]*)"\]' <<<"$LAST"
}

DEADLINE=$(($(date +%s) + TIMEOUT_S))
for q in 'kiln_generated_tokens_total{model="kiln-demo"}' \
    'kiln_time_to_first_token_seconds_count{model="kiln-demo"}' \
    'kiln_requests_total{model="kiln-demo"}'; do
    until query_positive "$q"; do
        if (($(date +%s) >= DEADLINE)); then
            targets=$(curl -fsS "http://$PROM_ADDR/api/v1/targets" 2>/dev/null || echo unavailable)
            fail "no sample > 0 with model=\"kiln-demo\" for $q after ${TIMEOUT_S}s; last answer: ${LAST:-none}; targets: $targets"
        fi
        sleep 0.5
    done
    echo "ok: $q -> $LAST"
done

# The scrape target itself must be healthy.
UP=$(curl -fsS -G "http://$PROM_ADDR/api/v1/query" --data-urlencode 'query=up{job="kiln"}') ||
    fail "querying up{job=\"kiln\"} failed"
grep -qE '"value":\[[0-9.e+]+,"1"\]' <<<"$UP" || fail "up{job=\"kiln\"} is not 1: $UP"
echo "ok: up{job=\"kiln\"} == 1"

echo "prometheus scrape took $(($(date +%s) - START))s (after the kiln build)"
echo "prometheus scrape: 1 passed, 0 failed"
