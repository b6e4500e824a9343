#!/usr/bin/env bash
# The forwarder's benchmarks (docs/scale-out.md), with the peer measured in
# the same run against one local nats-server with a file-stored stream:
#
#   benches/forward.sh [ROUNDS] [EVENTS] [SECS]   (default 3, 400000, 10)
#
# 1. Forward rate: a log of EVENTS events of 256 bytes (made once by
#    `eventstream load`), forwarded from the earliest offset into a new
#    stream (fresh cursor, new stream per run), against nats_pub: a bare
#    async-nats JetStream publisher of as many messages of the same size,
#    with Nats-Msg-Id and the same headers, the same 4,096 in flight.
#    Alternating per round; prints each run and the medians.
# 2. Ingest closed loop (SECS s, 4 connections, acks) with forwarding on
#    and off, alternating, fresh data dir each run (benches/ab.sh); the
#    nats-server, the forwarder and ingest share the two cores.
#    SKIP_RATE=1 runs only 2, SKIP_INGEST=1 only 1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
EVENTS="${2:-400000}"
SECS="${3:-10}"
command -v nats-server >/dev/null || PATH="$PATH:/usr/sbin"
cargo build --release -q -p eventstream-host
cargo build --release -q -p eventstream-benches --bin nats_pub
BIN="$PWD/target/release/eventstream"
PUB="$PWD/target/release/nats_pub"
WORK="$(mktemp -d /tmp/es-fwd.XXXXXX)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL="nats://127.0.0.1:$PORT"
nats-server -js -sd "$WORK/js" -a 127.0.0.1 -p "$PORT" > "$WORK/nats.log" 2>&1 &
NATS_PID=$!
for _ in $(seq 100); do grep -q "Server is ready" "$WORK/nats.log" && break; sleep 0.1; done

# shellcheck source=benches/serve.sh
. benches/serve.sh

if [ -z "${SKIP_RATE:-}" ]; then
echo "== 1. forward rate: $EVENTS events of 256 bytes, against a bare publisher"
start "$WORK/log"
"$BIN" load --target "$ADDR" --events "$EVENTS" --payload 256 --connections 4 --ack \
    --json > /dev/null 2>&1
stop
ours=(); peer=()
for r in $(seq "$ROUNDS"); do
    rm -f "$WORK/log/groups"
    start "$WORK/log" --forward "$URL" --forward-stream "F$r" \
        --forward-subject "F$r.{class}.{topic}" --forward-create-stream
    # One process polls /metrics every 20 ms over one connection (a
    # process per poll would take CPU from the run).
    rate=$(python3 - "$METRICS" "$EVENTS" <<'PY'
import http.client, sys, time
host, port = sys.argv[1].rsplit(":", 1)
want = int(sys.argv[2])
c = http.client.HTTPConnection(host, int(port))
def acked():
    c.request("GET", "/metrics")
    for line in c.getresponse().read().decode().splitlines():
        if line.startswith("eventstream_forward_acked_offset "):
            return int(float(line.split()[1]))
    return 0
t0 = None
while True:
    a, now = acked(), time.monotonic()
    if t0 is None and a > 0:
        t0, a0 = now, a
    if a >= want:
        break
    time.sleep(0.02)
print(round((want - a0) / (now - t0)))
PY
)
    cpu=$(awk '{print ($14 + $15) / 100}' "/proc/$PID/stat")
    stop
    "$PUB" "$URL" "F$r" --delete
    ours+=("$rate")
    echo "round $r ours: $rate msg/s (server cpu ${cpu} s over the run)"
    json=$("$PUB" "$URL" "P$r" "$EVENTS" 4096)
    p=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['rate'])" "$json")
    peer+=("$p")
    echo "round $r bare publisher: $p msg/s"
done
python3 - "${ours[*]}" "${peer[*]}" <<'PY'
import statistics, sys
o = [float(x) for x in sys.argv[1].split()]
p = [float(x) for x in sys.argv[2].split()]
mo, mp = statistics.median(o), statistics.median(p)
print(f"forward medians: ours {mo:.0f} msg/s, bare publisher {mp:.0f} msg/s, ratio {mo / mp:.3f}")
PY
fi

[ -z "${SKIP_INGEST:-}" ] || exit 0
echo "== 2. ingest closed loop with forwarding on and off (${SECS} s runs)"
# Per run: ab.sh's line (the server's CPU seconds among it), then the CPU
# seconds nats-server took in the same run.
nats_cpu() { awk '{print ($14 + $15) / 100}' "/proc/$NATS_PID/stat"; }
for r in $(seq "$ROUNDS"); do
    for side in off on; do
        flags=""
        [ "$side" = on ] && flags="--forward $URL --forward-stream INGEST --forward-subject INGEST.{class}.{topic} --forward-create-stream"
        c0=$(nats_cpu)
        RATE= SECS="$SECS" BIN="$BIN" benches/ab.sh 1 "forward $side|$flags"
        echo "  nats-server cpu $(python3 -c "print(round($(nats_cpu) - $c0, 2))") s"
    done
done
kill "$NATS_PID" 2>/dev/null || true
