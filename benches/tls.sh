#!/usr/bin/env bash
# TLS against plaintext, alternating in one run (fresh data dir per run):
#
#   benches/tls.sh [ROUNDS] [SECS]   (default 5, 8)
#
# 1. Closed loop: `eventstream load` (4 connections, 256-byte events,
#    acks) for SECS s over the plaintext port, then over the TLS port
#    (TLS 1.3, AES-128-GCM, an ECDSA P-256 certificate), per round; the
#    medians and their ratio.
# 2. Connections per second, each a connect (+ handshake), one acked event
#    and a close, 2 threads (benches/src/bin/handshakes.rs), plaintext
#    then TLS, per round; the medians.
# 3. The closed loop over TLS again, alone and then beside a flood of
#    garbage handshakes (one thread connecting, sending 64 bytes that are
#    not TLS, waiting for the close), per round; the medians, the ratio,
#    and the bad handshakes the server counted. The flood's client takes
#    CPU from the same two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-5}"
SECS="${2:-8}"
cargo build --release -q -p eventstream-host
cargo build --release -q -p eventstream-benches --bin handshakes
BIN="$PWD/target/release/eventstream"
HS="$PWD/target/release/handshakes"
WORK="$(mktemp -d /tmp/es-tls.XXXXXX)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

# A CA and a server certificate for 127.0.0.1.
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -keyout "$WORK/ca.key" -out "$WORK/ca.pem" -days 7 \
    -subj /CN=bench-ca 2> /dev/null
openssl req "${ec[@]}" -keyout "$WORK/server.key" -out "$WORK/server.csr" \
    -subj /CN=127.0.0.1 2> /dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$WORK/ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" \
    -CAcreateserial -out "$WORK/server.pem" -days 7 -extfile "$WORK/ext" 2> /dev/null
TLS_FLAGS=(--tls-listen 127.0.0.1:0 --tls-cert "$WORK/server.pem" --tls-key "$WORK/server.key")

# shellcheck source=benches/serve.sh
. benches/serve.sh

tls_addr() { awk '/^listening with TLS on/ {print $5}' "$WORK/out"; }
# closed_loop OUT TARGET [--tls-ca PEM]: the closed-loop load against
# TARGET; its JSON in OUT.
closed_loop() {
    local out="$1"; shift
    "$BIN" load --target "$@" --duration "$SECS" --connections 4 \
        --payload 256 --ack --json > "$out" 2> "$WORK/load.err" \
        || { tail -5 "$WORK/load.err" "$WORK/serve.err" >&2; exit 1; }
}
median() { sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
rate() { python3 -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["events_per_sec"]))' "$1"; }

echo "== 1. closed loop, $SECS s, 4 connections, 256-byte events, acks"
plain=(); tls=()
for r in $(seq "$ROUNDS"); do
    for side in plain tls; do
        rm -rf "$WORK/data"
        start "$WORK/data" "${TLS_FLAGS[@]}"
        if [ "$side" = plain ]; then
            target=("$ADDR")
        else
            target=("$(tls_addr)" --tls-ca "$WORK/ca.pem")
        fi
        closed_loop "$WORK/load.json" "${target[@]}"
        cpu=$(awk '{print ($14 + $15) / 100}' "/proc/$PID/stat")
        stop
        ev=$(rate "$WORK/load.json")
        echo "round $r $side: $ev ev/s, server cpu $cpu s"
        if [ "$side" = plain ]; then plain+=("$ev"); else tls+=("$ev"); fi
    done
done
p=$(printf '%s\n' "${plain[@]}" | median)
t=$(printf '%s\n' "${tls[@]}" | median)
echo "median: plaintext $p ev/s, TLS $t ev/s, ratio $(python3 -c "print(round($t / $p, 3))")"

echo "== 2. connections per second (connect, handshake, one acked event, close), 2 threads"
plain=(); tls=()
for r in $(seq "$ROUNDS"); do
    rm -rf "$WORK/data"
    start "$WORK/data" "${TLS_FLAGS[@]}"
    a=$("$HS" "$ADDR" 4 2 | awk '{print $2}')
    b=$("$HS" "$(tls_addr)" 4 2 "$WORK/ca.pem" | awk '{print $2}')
    hs=$(curl -s "http://$METRICS/metrics" | awk '/^eventstream_tls_handshakes_total/ {print $2}')
    stop
    echo "round $r: plaintext $a/s, TLS $b/s (server counted $hs handshakes)"
    plain+=("$a"); tls+=("$b")
done
p=$(printf '%s\n' "${plain[@]}" | median)
t=$(printf '%s\n' "${tls[@]}" | median)
echo "median: plaintext $p connections/s, TLS $t handshakes/s, ratio $(python3 -c "print(round($t / $p, 3))")"

echo "== 3. closed loop over TLS alone and beside a flood of garbage handshakes"
alone=(); flood=()
for r in $(seq "$ROUNDS"); do
    for side in alone flood; do
        rm -rf "$WORK/data"
        start "$WORK/data" "${TLS_FLAGS[@]}"
        fpid=
        if [ "$side" = flood ]; then
            "$HS" "$(tls_addr)" "$((SECS + 1))" 1 garbage > "$WORK/flood.out" &
            fpid=$!
        fi
        closed_loop "$WORK/load.json" "$(tls_addr)" --tls-ca "$WORK/ca.pem"
        bad=0
        if [ -n "$fpid" ]; then
            wait "$fpid"
            bad=$(curl -s "http://$METRICS/metrics" | awk '/^eventstream_tls_handshake_failures_total/ {s += $2} END {print s}')
        fi
        stop
        ev=$(rate "$WORK/load.json")
        echo "round $r $side: $ev ev/s, bad handshakes $bad"
        if [ "$side" = alone ]; then alone+=("$ev"); else flood+=("$ev"); fi
    done
done
a=$(printf '%s\n' "${alone[@]}" | median)
f=$(printf '%s\n' "${flood[@]}" | median)
echo "median: alone $a ev/s, beside the flood $f ev/s, ratio $(python3 -c "print(round($f / $a, 3))")"
