#!/usr/bin/env bash
# The aarch64 build, under qemu as a Pi 4 (cortex-a72: NEON) and a Pi 5
# (cortex-a76: NEON + dotprod), generates the same greedy tokens from the real
# default model as the host build does. Exits non-zero on any difference.
#
#   tests/emulated-greedy.sh [IMAGE]     # default: the q4 image of the default model
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${BRAMBLE_CACHE:-$HOME/.cache/bramble}
image=${1:-$cache/smollm2-135m-q4.bramble}
[ -s "$image" ] || { echo "no image at $image: run models/fetch-default.sh --images" >&2; exit 1; }
target=${CARGO_TARGET_DIR:-target}

cargo build --quiet --release -p bramble-tools
cargo build --quiet --release --target aarch64-unknown-linux-gnu -p bramble-tools
prompt="The three primary colours are"
generate() { "$@" generate --model "$image" --prompt "$prompt" --max-tokens 16 --temperature 0 --threads 1 --json |
    python3 -c 'import json, sys; print(" ".join(map(str, json.load(sys.stdin)["tokens"])))'; }

host=$(generate "$target/release/bramble")
echo "host:       $host"
status=0
for cpu in cortex-a72 cortex-a76; do
    emulated=$(generate env QEMU_CPU=$cpu qemu-aarch64 -L /usr/aarch64-linux-gnu "$target/aarch64-unknown-linux-gnu/release/bramble")
    echo "$cpu: $emulated"
    if [ "$emulated" != "$host" ]; then
        echo "FAILED: $cpu generated other tokens than the host" >&2
        status=1
    fi
done
[ $status = 0 ] && echo "emulated greedy tokens match the host: 2 passed, 0 failed"
exit $status
