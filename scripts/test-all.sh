#!/usr/bin/env bash
# The whole test suite of EventStreamCore, as CI runs it. Installs what it
# needs (idempotently), then runs every step and prints how long each took.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
export PROPTEST_CASES="${PROPTEST_CASES:-256}"
suite_start=$(date +%s)
declare -a summary=()
budget_total=0

# step NAME BUDGET COMMAND...: runs COMMAND and prints its time against
# BUDGET seconds (the whole run must stay under 30 minutes; a step over its
# budget is named at the end).
step() {
    local name="$1" budget="$2"
    shift 2
    budget_total=$((budget_total + budget))
    echo
    echo "==> $name (budget ${budget}s)"
    local t0
    t0=$(date +%s)
    "$@"
    local dt=$(($(date +%s) - t0))
    local over=""
    ((dt <= budget)) || over="  OVER BUDGET"
    summary+=("$(printf '%5ss of %5ss  %s%s' "$dt" "$budget" "$name" "$over")")
    echo "<== $name: ${dt}s of ${budget}s${over}"
}

apt_install() {
    # Debian packages the tests run for real (idempotent: only what is missing).
    local missing=()
    command -v promtool >/dev/null || missing+=(prometheus)
    command -v qemu-system-arm >/dev/null || missing+=(qemu-system-arm)
    command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
    if ((${#missing[@]})); then
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        local as_root=($sudo env DEBIAN_FRONTEND=noninteractive)
        local apt=("${as_root[@]}" apt-get -y -qq -o DPkg::Lock::Timeout=600)
        # An install that was cut short (a killed run) leaves dpkg half-done,
        # and apt then refuses every install until it is finished: finish it.
        if [ -n "$(dpkg --audit 2>/dev/null)" ]; then
            echo "dpkg was interrupted earlier; finishing its configuration"
            "${as_root[@]}" dpkg --force-confdef --force-confold --configure -a
            "${apt[@]}" --fix-broken install
        fi
        "${apt[@]}" update
        "${apt[@]}" install --no-install-recommends "${missing[@]}"
    fi
}

install_toolchains() {
    rustup component add rustfmt clippy
    rustup target add thumbv7em-none-eabihf
    rustup toolchain install nightly --profile minimal --component miri,rust-src
    cargo +nightly miri setup
    command -v defmt-print >/dev/null || cargo install defmt-print --locked --version 1.2.0
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
}

core_never_links_alloc() {
    # The sources never name the alloc crate ...
    if grep -rnE 'extern crate alloc|alloc::' core/src; then
        echo "core names the alloc crate" >&2
        return 1
    fi
    # ... and the firmware image, which has no global allocator, links the
    # whole pipeline without any allocator symbol.
    local elf=linker/firmware/target/thumbv7em-none-eabihf/release/eventstream-firmware
    cargo build --release --manifest-path linker/firmware/Cargo.toml --target thumbv7em-none-eabihf
    local symbols
    symbols=$(nm "$elf")
    [ -n "$symbols" ] || { echo "no symbols read from $elf" >&2; return 1; }
    if grep -E '__rust_(alloc|dealloc|realloc)|__rg_alloc|__rdl_alloc' <<<"$symbols"; then
        echo "the firmware image links an allocator" >&2
        return 1
    fi
}

# The appliance image under QEMU: its UART0 a TCP link to a real
# `eventstream serve --legacy deny` through a proxy the test cuts, its flash
# log in file-backed PSRAM across a QEMU restart (host/tests/appliance.rs).
appliance_under_qemu() {
    cargo build --release --manifest-path linker/firmware/Cargo.toml --target thumbv7em-none-eabihf --bin appliance
    cargo test -p eventstream-host --test appliance -- --ignored --nocapture
}

firmware_under_qemu() {
    cargo fmt --manifest-path linker/firmware/Cargo.toml -- --check
    cargo clippy --manifest-path linker/firmware/Cargo.toml --target thumbv7em-none-eabihf -- -D warnings
    FIRMWARE_TIMEOUT=120 cargo firmware
}

no_std_builds() {
    cargo build -p eventstream-core --release --target thumbv7em-none-eabihf
    cargo build -p eventstream-core --release --target thumbv7em-none-eabihf --features defmt
}

loom_models() {
    RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 \
        cargo test -p eventstream-core --test loom --release --target-dir target/loom
}

miri_core() {
    # Every unsafe block of the core lives in ring, pool and crc32c; their
    # tests (threads included) run under miri's UB and data-race checks.
    MIRIFLAGS="-Zmiri-strict-provenance" cargo +nightly miri test -p eventstream-core --lib
}

fuzz_targets() {
    # Each target for FUZZ_SECONDS (20 by default) from the committed seed
    # corpus (tests/fuzz/make_corpus.py); new inputs go to a temp dir. For
    # hours: cargo +nightly fuzz run --fuzz-dir tests/fuzz TARGET -- -max_total_time=14400
    cargo fmt --manifest-path tests/fuzz/Cargo.toml -- --check
    cargo +nightly fuzz build --fuzz-dir tests/fuzz
    local t tmp log
    for t in frame stream legacy record recover; do
        tmp=$(mktemp -d)
        log="$tmp/log"
        if ! cargo +nightly fuzz run --fuzz-dir tests/fuzz "$t" "$tmp" "tests/fuzz/corpus/$t" \
            -- -max_total_time="${FUZZ_SECONDS:-20}" -print_final_stats=1 > "$log" 2>&1; then
            tail -40 "$log" >&2
            echo "fuzz target $t failed" >&2
            return 1
        fi
        echo "fuzz $t: $(awk '/stat::number_of_executed_units/ {print $2}' "$log") executions, 0 crashes"
        rm -rf "$tmp"
    done
}

step "install Debian packages (prometheus for promtool, qemu-system-arm, nats-server)" 90 apt_install
step "install toolchains, targets and components" 240 install_toolchains
step "cargo fmt --check" 20 cargo fmt --all -- --check
step "cargo clippy --workspace --all-targets -D warnings" 160 cargo clippy --workspace --all-targets -- -D warnings
step "cargo clippy core (thumbv7em, defmt) -D warnings" 60 cargo clippy -p eventstream-core --target thumbv7em-none-eabihf --features defmt -- -D warnings
step "cargo test --workspace" 420 cargo test --workspace
# The client library's example against a server it starts (the binary the
# tests built).
step "client example against a real server" 20 cargo run -q -p eventstream-client --example produce
# The server tests once more in the other processor and storage modes (the
# run above has the defaults: on at most 2 CPUs, the processors inline and
# storage shared between ingest and its thread).
# The suites that exercise the engine's paths; the endpoint, repair and
# hostile-client suites run once, above (their subject is the same in every
# layout).
LAYOUT_SUITES=(--lib --test server_ingest --test server_storage --test server_vectors --test server_close --test load)
step "server tests with --processors threads" 60 env ES_TEST_PROCESSORS=threads cargo test -p eventstream-host "${LAYOUT_SUITES[@]}"
step "server tests with --processors inline --storage-thread on" 60 env ES_TEST_PROCESSORS=inline ES_TEST_STORAGE_THREAD=on cargo test -p eventstream-host "${LAYOUT_SUITES[@]}"
step "server tests with --processors inline --storage-thread off" 60 env ES_TEST_PROCESSORS=inline ES_TEST_STORAGE_THREAD=off cargo test -p eventstream-host "${LAYOUT_SUITES[@]}"
step "no_std build for thumbv7em-none-eabihf (with and without defmt)" 30 no_std_builds
step "loom models of ring, pool and dedup" 60 loom_models
step "miri on the core's unsafe code" 150 miri_core
step "fuzz targets, 20 s each (cargo fuzz)" 200 fuzz_targets
step "core never links alloc (sources, firmware symbols)" 30 core_never_links_alloc
step "firmware image under QEMU mps2-an386 (cargo firmware)" 70 firmware_under_qemu
step "appliance under QEMU streaming to serve (link cut, power cut)" 60 appliance_under_qemu

echo
echo "==> step times"
printf '%s\n' "${summary[@]}"
echo "total: $(($(date +%s) - suite_start))s of ${budget_total}s budgeted (at most 1800s)"
