# Sourced by the benchmark scripts: start and stop `eventstream serve`.
# Needs BIN (the binary) and WORK (a scratch directory).

start() { # data-dir extra-flags... ; sets PID, ADDR and METRICS
    local data="$1"; shift
    "$BIN" serve --data "$data" --listen 127.0.0.1:0 --metrics 127.0.0.1:0 "$@" \
        > "$WORK/out" 2> "$WORK/serve.err" &
    PID=$!
    for _ in $(seq 600); do grep -q '^metrics on' "$WORK/out" 2>/dev/null && break; sleep 0.05; done
    ADDR=$(awk '/^listening on/ {print $3}' "$WORK/out")
    METRICS=$(awk '/^metrics on/ {print $3}' "$WORK/out")
    [ -n "$ADDR" ] || { tail -5 "$WORK/serve.err" >&2; exit 1; }
}

stop() { kill -TERM "$PID"; wait "$PID" || true; }
