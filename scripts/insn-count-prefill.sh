#!/usr/bin/env bash
# Guest instructions per prompt token on an emulated Raspberry Pi core, the
# way docs/status.md reports prompt processing (companion of scripts/insn-count.sh).
#
#   scripts/insn-count-prefill.sh IMAGE [CPU...]   # CPU: cortex-a72 (Pi 4), cortex-a76 (Pi 5)
#
# Runs `bramble bench --threads 1 --gen-tokens 1` under qemu with the counting
# plugin for prompts of 64 and 192 tokens; per prompt token =
# (count(192) − count(64)) / 128, so loading, the one decoded token and the
# last token's logits cancel out. Both lengths are whole micro-batches of the
# session's default batch (32). BENCH_ARGS adds options to both runs.
# PROMPTS="576 704" counts other lengths (per prompt token = the difference
# over theirs; e.g. past Gemma-3's 512-position window, with
# BENCH_ARGS="--ctx 1024").
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?usage: scripts/insn-count-prefill.sh IMAGE [CPU...]}
shift
cpus=("$@")
[ ${#cpus[@]} -gt 0 ] || cpus=(cortex-a72 cortex-a76)
source scripts/insn-count-common.sh

read -r shortest longest <<<"${PROMPTS:-64 192}"
for cpu in "${cpus[@]}"; do
    short=$(count "$cpu" "$image" --prompt-tokens "$shortest" --gen-tokens 1)
    long=$(count "$cpu" "$image" --prompt-tokens "$longest" --gen-tokens 1)
    report "$image" "$cpu" "$short" "$long" $((longest - shortest)) "prompt token"
done
