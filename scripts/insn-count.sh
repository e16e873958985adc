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
# scripts/insn-count-prefill.sh is the same for a prompt token.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?usage: scripts/insn-count.sh IMAGE [CPU...]}
shift
cpus=("$@")
[ ${#cpus[@]} -gt 0 ] || cpus=(cortex-a72 cortex-a76)
source scripts/insn-count-common.sh

for cpu in "${cpus[@]}"; do
    short=$(count "$cpu" "$image" --prompt-tokens 32 --gen-tokens 8)
    long=$(count "$cpu" "$image" --prompt-tokens 32 --gen-tokens 24)
    report "$image" "$cpu" "$short" "$long" 16 token
done
