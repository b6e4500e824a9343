#!/usr/bin/env bash
# Ingest beside a scrape flood: closed-loop `eventstream load` against a
# fresh `eventstream serve` (default flags: 2,097,152 dedup ids), alone and
# with scrape_flood (benches/src/bin/scrape_flood.rs: GET /metrics over one
# kept-alive connection as fast as it answers) for the whole run,
# alternating in one run.
#
#   benches/scrape.sh [ROUNDS] [SECONDS]      (default 4 rounds of 8 s)
#
# Prints per run events/s, and for the flood runs the scrapes answered and
# the housekeeping thread's CPU per scrape; then the medians and the ratio
# of ingest with the flood to ingest alone.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-4}"
SECS="${2:-8}"
cargo build --release -q -p eventstream-host
cargo build --release -q -p eventstream-benches --bin scrape_flood
BIN="$PWD/target/release/eventstream"
FLOOD="$PWD/target/release/scrape_flood"
WORK="$(mktemp -d /tmp/es-scrape.XXXXXX)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

housekeeping_ticks() { # PID -> utime+stime of es-housekeeping, clock ticks
    local t
    for t in /proc/"$1"/task/*; do
        if [ "$(cat "$t/comm")" = "es-housekeeping" ]; then
            awk '{sub(/.*\) /, ""); print $12 + $13}' "$t/stat"
            return
        fi
    done
    echo "no es-housekeeping thread in $1" >&2
    return 1
}

run() { # run LABEL FLOOD(0|1) -> prints a row, appends events/s to $WORK/LABEL
    local label="$1" flood="$2"
    rm -rf "$WORK/data"
    "$BIN" serve --data "$WORK/data" --listen 127.0.0.1:0 --metrics 127.0.0.1:0 \
        > "$WORK/out" 2> "$WORK/serve.err" &
    local pid=$!
    for _ in $(seq 600); do grep -q '^metrics on' "$WORK/out" 2>/dev/null && break; sleep 0.05; done
    local addr metrics
    addr=$(awk '/^listening on/ {print $3}' "$WORK/out")
    metrics=$(awk '/^metrics on/ {print $3}' "$WORK/out")
    [ -n "$metrics" ] || { echo "the server did not start:" >&2; tail -5 "$WORK/serve.err" >&2; exit 1; }
    local ticks0 fpid=""
    ticks0=$(housekeeping_ticks "$pid")
    if [ "$flood" = 1 ]; then
        "$FLOOD" "$metrics" "$SECS" > "$WORK/flood.json" &
        fpid=$!
    fi
    "$BIN" load --target "$addr" --duration "$SECS" --connections 4 --payload 256 --ack --json \
        > "$WORK/load.json" 2> "$WORK/load.err"
    [ -z "$fpid" ] || wait "$fpid"
    local ticks1
    ticks1=$(housekeeping_ticks "$pid")
    kill -TERM "$pid"; wait "$pid" || true
    local eps
    eps=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["events_per_sec"]))' "$WORK/load.json")
    echo "$eps" >> "$WORK/$label"
    if [ "$flood" = 1 ]; then
        python3 - "$label" "$eps" "$WORK/flood.json" "$((ticks1 - ticks0))" "$(getconf CLK_TCK)" <<'PY'
import json, sys
label, eps, path, ticks, hz = sys.argv[1:]
d = json.load(open(path))
ms = int(ticks) * 1000 / int(hz)
print(f'{label}: {eps} ev/s | {d["scrapes"]} scrapes, answer p50 {d["answer_us_p50"]} us'
      f' max {d["answer_us_max"]} us | housekeeping {ms:.0f} ms CPU,'
      f' {ms / max(d["scrapes"], 1):.3f} ms per scrape')
PY
    else
        echo "$label: $eps ev/s"
    fi
}

for _ in $(seq "$ROUNDS"); do
    run alone 0
    run flood 1
done
a=$(median < "$WORK/alone")
f=$(median < "$WORK/flood")
echo "median: alone $a ev/s, with the scrape flood $f ev/s, ratio $(awk -v a="$a" -v f="$f" 'BEGIN {printf "%.3f", f / a}')"
