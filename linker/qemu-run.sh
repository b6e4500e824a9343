#!/usr/bin/env bash
# Cargo runner of the firmware image: boots ELF on QEMU's mps2-an386
# (Cortex-M4F) with semihosting, decodes its defmt log with defmt-print,
# and exits with the image's status (124 if it ran past the time limit).
set -uo pipefail
ELF="$1"
LIMIT="${FIRMWARE_TIMEOUT:-60}"
timeout "$LIMIT" qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic \
    -monitor none -serial none \
    -semihosting-config enable=on,target=native -kernel "$ELF" \
    | defmt-print -e "$ELF"
status=${PIPESTATUS[0]}
if [ "$status" -eq 124 ]; then
    echo "firmware: no exit within ${LIMIT}s" >&2
fi
exit "$status"
