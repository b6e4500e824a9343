#!/usr/bin/env bash
# Alternating A/B runs of `eventstream serve` variants against the same
# `eventstream load`, for comparisons on this noisy 2-core machine (each
# pair runs back to back, so drift hits both sides alike).
#
#   benches/ab.sh ROUNDS "label|serve flags" ["label|serve flags"]...
#   RATE=100000 (empty: closed loop)  SECS=8  BIN=target/release/eventstream
#   A side may name its own binary: "label|flags|path/to/eventstream".
#
# Prints per run: realtime and transactional p50/p99, batch p99 (us),
# events/s, the server's CPU seconds, and the CPU time the hypervisor gave
# to other guests during the run (steal, %; high steal means a noisy run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:?rounds}"; shift
# A given BIN is used as it is (no build: the tree may be mid-change).
[ -n "${BIN:-}" ] || cargo build --release -q -p eventstream-host
BIN="${BIN:-$PWD/target/release/eventstream}"
WORK="$(mktemp -d /tmp/es-ab.XXXXXX)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq "$ROUNDS"); do
    for spec in "$@"; do
        IFS='|' read -r label flags bin <<< "$spec"
        bin="${bin:-$BIN}"
        rm -rf "$WORK/data"
        # shellcheck disable=SC2086
        read -r steal0 total0 < <(awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print $9, t}' /proc/stat)
        "$bin" serve --data "$WORK/data" --listen 127.0.0.1:0 --metrics 127.0.0.1:0 $flags \
            > "$WORK/out" 2> "$WORK/serve.err" &
        pid=$!
        # Up to 30 s: a start right after a closed-loop run (gigabytes still
        # being written back) once took longer than 5 s.
        for _ in $(seq 600); do grep -q '^metrics on' "$WORK/out" 2>/dev/null && break; sleep 0.05; done
        addr=$(awk '/^listening on/ {print $3}' "$WORK/out")
        if [ -z "$addr" ]; then
            echo "$label: the server did not start within 30 s:" >&2
            tail -5 "$WORK/serve.err" >&2
            exit 1
        fi
        rate=()
        [ -n "${RATE-100000}" ] && rate=(--rate "${RATE-100000}")
        if ! "$BIN" load --target "$addr" --duration "${SECS:-8}" "${rate[@]}" --connections 4 \
            --payload 256 --ack --json > "$WORK/load.json" 2> "$WORK/load.err"; then
            echo "$label: load failed:" >&2
            grep -v '^load: [0-9]' "$WORK/load.err" | tail -5 >&2
            tail -5 "$WORK/serve.err" >&2
            exit 1
        fi
        cpu=$(awk '{print ($14 + $15) / 100}' "/proc/$pid/stat")
        kill -TERM "$pid"; wait "$pid" || true
        steal=$(awk -v s0="$steal0" -v t0="$total0" '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i;
            printf "%.0f", (t > t0) ? 100 * ($9 - s0) / (t - t0) : 0}' /proc/stat)
        python3 - "$label" "$cpu" "$WORK/load.json" "$steal" <<'PY'
import json, sys
label, cpu, path, steal = sys.argv[1:]
d = json.load(open(path))
l = d["latency_us_by_class"]
print(f'{label}: rt p50 {l["realtime"]["p50"]} p99 {l["realtime"]["p99"]}'
      f' | tx p50 {l["transactional"]["p50"]} p99 {l["transactional"]["p99"]}'
      f' | batch p99 {l["batch"]["p99"]} | {d["events_per_sec"]:.0f} ev/s | server cpu {cpu} s'
      f' | steal {steal} %')
PY
    done
done
