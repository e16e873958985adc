#!/usr/bin/env bash
# Guest instructions per decoded token on an emulated Raspberry Pi core: the
# repeatable aarch64 cost figure (timings under emulation mean nothing).
#
#   scripts/insn-count.sh IMAGE [CPU...]        # CPU: cortex-a72 (Pi 4), cortex-a76 (Pi 5)
#
# Runs `bramble bench --threads 1 --prompt-tokens 32` twice under qemu with the
# counting plugin of ../shared/tools/qemu-insn-count, generating 8 and 24
# tokens; per token = (count(24) − count(8)) / 16, so loading and prefill
# cancel out and the context depth is about 32–56. BENCH_ARGS adds options to
# both runs, e.g. BENCH_ARGS="--feedback off" or "--kv q4".
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?usage: scripts/insn-count.sh IMAGE [CPU...]}
shift
cpus=("$@")
[ ${#cpus[@]} -gt 0 ] || cpus=(cortex-a72 cortex-a76)

plugin=$(bash ../shared/tools/qemu-insn-count/build.sh)
cargo build --quiet --release --target aarch64-unknown-linux-gnu -p bramble-tools
bramble=${CARGO_TARGET_DIR:-target}/aarch64-unknown-linux-gnu/release/bramble

count() { # CPU GEN_TOKENS
    QEMU_CPU=$1 qemu-aarch64 -L /usr/aarch64-linux-gnu -plugin "$plugin" \
        "$bramble" bench --model "$image" --prompt-tokens 32 --gen-tokens "$2" --threads 1 --json ${BENCH_ARGS:-} 2>&1 >/dev/null |
        sed -n 's/^guest-instructions: //p'
}
for cpu in "${cpus[@]}"; do
    short=$(count "$cpu" 8)
    long=$(count "$cpu" 24)
    kernels=$(QEMU_CPU=$cpu qemu-aarch64 -L /usr/aarch64-linux-gnu "$bramble" bench --model "$image" --prompt-tokens 2 --gen-tokens 1 --threads 1 --json |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["kernels"])')
    awk -v cpu="$cpu" -v k="$kernels" -v a="$short" -v b="$long" -v img="$(basename "$image")" \
        -v extra="${BENCH_ARGS:+ [$BENCH_ARGS]}" \
        'BEGIN { printf "%s%s %s (%s kernels): %.2f M guest instructions per token\n", img, extra, cpu, k, (b - a) / 16 / 1e6 }'
done
