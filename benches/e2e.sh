#!/usr/bin/env bash
# End-to-end benchmark: `eventstream serve` on a temp data dir against
# `eventstream load` on this machine, with Redis XADD (redis-benchmark,
# pipelined, same 256-byte payload) as the peer in the same run when
# redis-server is installed.
#
#   benches/e2e.sh [RUNS] [SECONDS]      (default 3 runs of 10 s)
#
# Rows: closed-loop max throughput (mix 40/40/20, 256 B, --ack, default
# fsync), open-loop latency at 100,000 events/s, --fsync always with this
# disk's fsync latency beside it, the sequential write bandwidth dd measures
# and the log bytes/s, and the server's peak RSS; beside both 100,000/s
# runs, cpu_probe counts the milliseconds the CPUs ran over 4x slow, and
# the steal time (CPU time the hypervisor took) is printed; the 100,000/s
# row runs once more with the log on tmpfs (/dev/shm), to show what writing
# to the disk adds, and beside it echo_floor (benches/src/bin/echo_floor.rs):
# the same traffic against a bare epoll server that only appends what it
# reads to a file on the same disk (same fsync policy) and answers, and
# once more without the file, and beside the --fsync always row with an
# fdatasync per append: the least any engine could show here.
# Prints medians.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
SECS="${2:-10}"
cargo build --release -q -p eventstream-host
cargo build --release -q -p eventstream-benches --bin cpu_probe --bin echo_floor
BIN="$PWD/target/release/eventstream"
PROBE="$PWD/target/release/cpu_probe"
FLOOR="$PWD/target/release/echo_floor"
WORK="$(mktemp -d /tmp/es-e2e.XXXXXX)"
# The 100,000/s row once more with the log in memory (tmpfs), when there
# is one: what the disk adds to the latency in the same run.
SHM=""
if [ -d /dev/shm ] && [ -w /dev/shm ]; then SHM="$(mktemp -d /dev/shm/es-e2e.XXXXXX)"; fi
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK" ${SHM:+"$SHM"}' EXIT

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

serve() { # serve NAME FLAGS... -> sets PID, ADDR; the log in $DATA or $WORK/NAME
    local name="$1"; shift
    local data="${DATA:-$WORK/$name}"
    rm -rf "$data"
    "$BIN" serve --data "$data" --listen 127.0.0.1:0 --metrics 127.0.0.1:0 "$@" \
        > "$WORK/$name.out" 2> "$WORK/$name.err" &
    PID=$!
    # Up to 30 s: a start right after a closed-loop run (gigabytes still
    # being written back) once took longer than 5 s.
    for _ in $(seq 600); do grep -q '^metrics on' "$WORK/$name.out" 2>/dev/null && break; sleep 0.05; done
    ADDR=$(awk '/^listening on/ {print $3}' "$WORK/$name.out")
    if [ -z "$ADDR" ]; then
        echo "serve $name did not start within 30 s:" >&2
        tail -5 "$WORK/$name.err" >&2
        exit 1
    fi
}
stop() { kill -TERM "$PID"; wait "$PID" || true; }
# Ticks of both CPUs since boot: user (with nice), kernel (with irq and
# softirq), idle (with iowait), steal; and steal with the total.
cpu_split() { awk '/^cpu / {print $2 + $3, $4 + $7 + $8, $5 + $6, $9}' /proc/stat; }
ticks() { cpu_split | awk '{print $4, $1 + $2 + $3 + $4}'; }
# CPU time the hypervisor gave to other guests ("steal") between two
# readings of /proc/stat, in percent: runs taken while it is high measure the
# neighbours, not us.
steal_since() { ticks | awk -v s0="$1" -v t0="$2" '{printf "%.0f", ($2 > t0) ? 100 * ($1 - s0) / ($2 - t0) : 0}'; }
# Runs "$@" with cpu_probe beside it for $SECS; its JSON goes to probe.json.
probed() {
    "$PROBE" "$SECS" > "$WORK/probe.json" &
    local probe=$!
    "$@"
    wait "$probe"
}
# The open-loop run at 100,000 events/s against $ADDR; its JSON to stdout.
load_100k() {
    "$BIN" load --target "$ADDR" --duration "$SECS" --rate 100000 --connections 4 \
        --payload 256 --ack --json
}
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d'+sys.argv[1]))" "$1"; }

declare -a lat_steal mem50 mem99 mem_steal floor50 floor99 bare50 bare99 afloor99
declare -a tput lat50 lat99 bat99 always always99 fsync_ms rss ratio slow_ms always_slow
for run in $(seq "$RUNS"); do
    read -r steal0 total0 < <(ticks)
    # 1. Max throughput, closed loop.
    serve tput
    "$BIN" load --target "$ADDR" --duration "$SECS" --connections 4 --payload 256 \
        --mix realtime=40,transactional=40,batch=20 --ack --json > "$WORK/tput.json"
    rss+=("$(awk '/VmHWM/ {print $2/1024}' /proc/$PID/status)")
    stop
    tput+=("$(field '["events_per_sec"]' < "$WORK/tput.json")")
    # 2. Latency at 100,000 events/s offered, with cpu_probe beside it: the
    # milliseconds in which this VM's CPUs ran over 4 times slower than
    # their median (host episodes that steal time does not show).
    serve lat
    read -r s0 t0 < <(ticks)
    probed load_100k > "$WORK/lat.json"
    lat_steal+=("$(steal_since "$s0" "$t0")")
    stop
    mem_note=""
    if [ -n "$SHM" ]; then
        DATA="$SHM/d" serve mem
        read -r s0 t0 < <(ticks)
        load_100k > "$WORK/mem.json"
        mem_steal+=("$(steal_since "$s0" "$t0")")
        stop
        rm -rf "$SHM/d"
        mem50+=("$(field '["latency_us"]["p50"]' < "$WORK/mem.json")")
        mem99+=("$(field '["latency_us"]["p99"]' < "$WORK/mem.json")")
        mem_note="; log on tmpfs: p50 ${mem50[-1]} us p99 ${mem99[-1]} us, steal ${mem_steal[-1]} %"
    fi
    # The floor, same traffic: a bare server appending to a file on the
    # same disk, then the same without the file.
    "$FLOOR" "$SECS" "$WORK/floor" > "$WORK/floor.json"
    rm -rf "$WORK/floor"
    "$FLOOR" "$SECS" "$WORK/floor" --no-log > "$WORK/bare.json"
    floor50+=("$(field '["latency_us"]["p50"]' < "$WORK/floor.json")")
    floor99+=("$(field '["latency_us"]["p99"]' < "$WORK/floor.json")")
    bare50+=("$(field '["latency_us"]["p50"]' < "$WORK/bare.json")")
    bare99+=("$(field '["latency_us"]["p99"]' < "$WORK/bare.json")")
    floor_note="; floor p50 ${floor50[-1]} us p99 ${floor99[-1]} us, without the file p50 ${bare50[-1]} us p99 ${bare99[-1]} us"
    slow_ms+=("$(field '["slow_ms"]' < "$WORK/probe.json")")
    lat50+=("$(field '["latency_us"]["p50"]' < "$WORK/lat.json")")
    lat99+=("$(field '["latency_us"]["p99"]' < "$WORK/lat.json")")
    bat99+=("$(field '["latency_us_by_class"]["batch"]["p99"]' < "$WORK/lat.json")")
    # 3. Group commit: max throughput, and p99 at 100,000 events/s offered.
    serve always --fsync always
    "$BIN" load --target "$ADDR" --duration "$SECS" --connections 4 --payload 256 --ack --json \
        > "$WORK/always.json"
    probed load_100k > "$WORK/always-rate.json"
    stop
    always_slow+=("$(field '["slow_ms"]' < "$WORK/probe.json")")
    # Its floor: the bare server fdatasyncing each append before answering.
    "$FLOOR" "$SECS" "$WORK/floor" --fsync-always > "$WORK/afloor.json"
    rm -rf "$WORK/floor"
    afloor99+=("$(field '["latency_us"]["p99"]' < "$WORK/afloor.json")")
    always+=("$(field '["events_per_sec"]' < "$WORK/always.json")")
    always99+=("$(field '["latency_us"]["p99"]' < "$WORK/always-rate.json")")
    # This disk's fsync latency: 4 KiB writes, each fdatasynced.
    fsync_ms+=("$(dd if=/dev/zero of="$WORK/fsync.probe" bs=4k count=200 oflag=dsync 2>&1 \
        | awk '/copied/ {print $(NF-3) / 200 * 1000}')")
    rm -f "$WORK/fsync.probe"
    # 4. Redis XADD, pipelined, same payload.
    if command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null; then
        redis-server --port 16379 --bind 127.0.0.1 --save "" --appendonly no \
            --daemonize no > /dev/null &
        RPID=$!
        sleep 0.5
        rps=$(redis-benchmark -h 127.0.0.1 -p 16379 -n 1000000 -P 64 -q -d 256 \
            XADD s '*' f "$(head -c 256 /dev/zero | tr '\0' x)" 2>/dev/null \
            | tr '\r' '\n' | grep -o '[0-9.]* requests per second' | tail -1 | awk '{print $1}')
        kill "$RPID"; wait "$RPID" 2>/dev/null || true
        ratio+=("$(awk -v a="${tput[-1]}" -v b="$rps" 'BEGIN {print a / b}')")
        echo "run $run: redis XADD ${rps}/s"
    fi
    echo "run $run: ${tput[-1]} ev/s; 100k/s p50 ${lat50[-1]} us p99 ${lat99[-1]} us (CPUs slow ${slow_ms[-1]} ms; steal ${lat_steal[-1]} %${mem_note}${floor_note}); always ${always[-1]} ev/s p99 ${always99[-1]} us (CPUs slow ${always_slow[-1]} ms; fsync ${fsync_ms[-1]} ms; floor p99 ${afloor99[-1]} us); rss ${rss[-1]} MiB; steal $(steal_since "$steal0" "$total0") %"
done

# 5. Disk bandwidth over a long run, against dd in the same run.
dd_line=$(dd if=/dev/zero of="$WORK/dd.probe" bs=1M count=3000 conv=fdatasync 2>&1 | tail -1)
rm -f "$WORK/dd.probe"
# The device itself, past the page cache: what the disk could take if the
# CPUs could feed it.
direct_line=$(dd if=/dev/zero of="$WORK/dd.probe" bs=1M count=3000 oflag=direct 2>&1 | tail -1)
rm -f "$WORK/dd.probe"
# Where the two CPUs' time went during the disk run: user (server and
# generator), kernel (TCP, page cache, writeback), idle, steal.
serve disk
read -r cu0 cs0 ci0 cst0 < <(cpu_split)
"$BIN" load --target "$ADDR" --duration "$((SECS * 6))" --connections 4 --payload 256 --ack --json \
    > "$WORK/disk.json"
read -r cu1 cs1 ci1 cst1 < <(cpu_split)
stop
disk_cpu=$(awk -v u=$((cu1 - cu0)) -v s=$((cs1 - cs0)) -v i=$((ci1 - ci0)) -v st=$((cst1 - cst0)) \
    'BEGIN {t = u + s + i + st; if (t == 0) t = 1; printf "user %.0f %%, kernel %.0f %%, idle %.0f %%, steal %.0f %%", 100 * u / t, 100 * s / t, 100 * i / t, 100 * st / t}')
log_bytes=$(du -sb "$WORK/disk" | awk '{print $1}')
disk_secs=$(field '["seconds"]' < "$WORK/disk.json")

echo
echo "| row | median of $RUNS |"
echo "|---|---|"
echo "| max throughput (events/s stored and acked) | $(printf '%s\n' "${tput[@]}" | median) |"
[ ${#ratio[@]} -gt 0 ] && echo "| ratio to Redis XADD (pipelined) | $(printf '%s\n' "${ratio[@]}" | median)x |"
echo "| 100k/s offered: rt+tx ack p50 / p99 (us) | $(printf '%s\n' "${lat50[@]}" | median) / $(printf '%s\n' "${lat99[@]}" | median) |"
echo "| same runs: ms with the CPUs over 4x slower (cpu_probe) | $(printf '%s\n' "${slow_ms[@]}" | median) |"
echo "| same runs: steal, % of both CPUs' time | $(printf '%s\n' "${lat_steal[@]}" | median) |"
if [ ${#mem50[@]} -gt 0 ]; then
    echo "| 100k/s offered, the log on tmpfs: rt+tx ack p50 / p99 (us); steal % | $(printf '%s\n' "${mem50[@]}" | median) / $(printf '%s\n' "${mem99[@]}" | median); $(printf '%s\n' "${mem_steal[@]}" | median) |"
fi
echo "| same traffic, echo_floor (bare server, appends to a file on this disk): p50 / p99 (us) | $(printf '%s\n' "${floor50[@]}" | median) / $(printf '%s\n' "${floor99[@]}" | median) |"
echo "| same traffic, echo_floor --no-log (loopback and wake-ups only): p50 / p99 (us) | $(printf '%s\n' "${bare50[@]}" | median) / $(printf '%s\n' "${bare99[@]}" | median) |"
echo "| 100k/s offered: batch ack p99 (us) | $(printf '%s\n' "${bat99[@]}" | median) |"
echo "| --fsync always: max events/s; rt+tx p99 at 100k/s offered (us) | $(printf '%s\n' "${always[@]}" | median), $(printf '%s\n' "${always99[@]}" | median) |"
echo "| same runs: ms with the CPUs over 4x slower (cpu_probe) | $(printf '%s\n' "${always_slow[@]}" | median) |"
echo "| same traffic, echo_floor --fsync-always (bare server, fdatasync per append): p99 (us) | $(printf '%s\n' "${afloor99[@]}" | median) |"
echo "| this disk's fsync (ms, 4 KiB dsync write) | $(printf '%s\n' "${fsync_ms[@]}" | median) |"
echo "| peak RSS of serve, default flags (MiB) | $(printf '%s\n' "${rss[@]}" | median) |"
echo "| $((SECS * 6)) s run: log MB/s vs dd | $(awk -v b="$log_bytes" -v s="$disk_secs" 'BEGIN {printf "%.0f", b / s / 1e6}') vs dd: $dd_line |"
echo "| same run: the device, dd oflag=direct | $direct_line |"
echo "| same run: CPU time of both CPUs | $disk_cpu |"
