#!/usr/bin/env bash
# The read path's benchmarks (PROTOCOL.md section 7), on this machine, with
# the peer or the baseline measured in the same run:
#
#   benches/read.sh [ROUNDS] [SECS]       (default 3 rounds, 8 s)
#
# 1. Catch-up: a log of about 2 GiB of 256-byte events (made by
#    `eventstream load`), read from the page cache from the earliest
#    offset by a raw read session that discards, and by the client
#    library's Consumer, beside a bare sendfile of the same segment files
#    over loopback to a reader that discards (the floor). read_bench
#    alternates the three per round and prints medians.
# 2. One follower at the producers' closed-loop rate: ingest events/s with
#    and without a follower (alternating, fresh data dir each run), and
#    the follower's produce-to-consume latency (its lag, in time).
#    SKIP_CATCHUP=1 runs only 2 and 3.
# 3. At 100,000 events/s offered: the follower's produce-to-consume p50
#    and p99 beside the acks' p50 and p99 of the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
SECS="${2:-8}"
cargo build --release -q -p eventstream-host
cargo build --release -q -p eventstream-benches --bin read_bench
BIN="$PWD/target/release/eventstream"
RB="$PWD/target/release/read_bench"
WORK="$(mktemp -d /tmp/es-read.XXXXXX)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

# shellcheck source=benches/serve.sh
. benches/serve.sh

if [ -z "${SKIP_CATCHUP:-}" ]; then
echo "== 1. catch-up read of about 2 GiB from the page cache"
start "$WORK/log" --segment-bytes 256MiB
"$BIN" load --target "$ADDR" --events 6500000 --payload 256 --connections 4 --ack \
    --json > "$WORK/fill.json" 2> /dev/null
du -sh "$WORK/log" | awk '{print "log: " $1}'
# Warm the page cache with the segments (the run reads from it).
cat "$WORK"/log/*.log > /dev/null
"$RB" catchup "$ADDR" "$WORK/log" "$ROUNDS"
stop
rm -rf "$WORK/log"
fi

echo "== 2. ingest with and without one follower (closed loop, ${SECS} s)"
for r in $(seq "$ROUNDS"); do
    for side in without with; do
        rm -rf "$WORK/d"
        start "$WORK/d"
        if [ "$side" = with ]; then
            "$RB" follow "$ADDR" "$SECS" > "$WORK/follow.json" &
            FPID=$!
            sleep 0.2
        fi
        "$BIN" load --target "$ADDR" --duration "$((SECS + 2))" --connections 4 --payload 256 \
            --ack --json > "$WORK/load.json" 2> /dev/null
        extra=""
        if [ "$side" = with ]; then
            wait "$FPID"
            extra=" | follower $(cat "$WORK/follow.json")"
        fi
        python3 - "$WORK/load.json" "$r" "$side" "$extra" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
eps = d["events_per_sec"]
print(f"round {sys.argv[2]} {sys.argv[3]:>7}: {eps:.0f} ev/s{sys.argv[4]}")
PY
        stop
    done
done

echo "== 3. produce-to-consume latency at 100,000 events/s"
for r in $(seq "$ROUNDS"); do
    rm -rf "$WORK/d"
    start "$WORK/d"
    "$RB" follow "$ADDR" "$SECS" > "$WORK/follow.json" &
    FPID=$!
    sleep 0.2
    "$BIN" load --target "$ADDR" --duration "$((SECS + 2))" --rate 100000 --connections 4 \
        --payload 256 --ack --json > "$WORK/load.json" 2> /dev/null
    wait "$FPID"
    python3 - "$WORK/load.json" "$WORK/follow.json" "$r" <<'PY'
import json, sys
load = json.load(open(sys.argv[1]))
f = json.loads(open(sys.argv[2]).read())
l = load["latency_us_by_class"]
print(f'round {sys.argv[3]}: follower {f["events"]} events;' + ' |'.join(
    f' {c}: consumed p50 {f[c]["p50_us"]} p99 {f[c]["p99_us"]} us, acked p50 {l[c]["p50"]} p99 {l[c]["p99"]} us'
    for c in ("realtime", "transactional", "batch")))
PY
    stop
done
