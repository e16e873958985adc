#!/usr/bin/env bash
# Guest instructions per decoded token of llama.cpp on an emulated Raspberry Pi
# core: the peer figure beside scripts/insn-count.sh's for Bramble.
#
#   scripts/peer-insn-count.sh GGUF [CPU...]     # CPU: cortex-a72 (Pi 4), cortex-a76 (Pi 5)
#   PEER_PREFILL=1 scripts/peer-insn-count.sh GGUF [CPU...]   # per prompt token instead
#
# Counted as scripts/insn-count.sh counts Bramble: the qemu plugin of
# ../shared/tools/qemu-insn-count, one thread, two runs generating 8 and 24
# tokens after a 32-token prompt, per token = (count(24) − count(8)) / 16, so
# loading, weight repacking and the prompt cancel out and the context depth is
# 32–56. The program is scripts/peer-build.sh's llama-bench:
#   llama-bench -m GGUF -t 1 -r 1 --no-warmup -p 0 -d 32 -n N
# (-d 32 decodes the 32-token prompt into the KV cache before the timed
# generation; -p 0 runs no separate prompt test). cortex-a72 runs the
# -march=armv8-a build, cortex-a76 the -march=armv8.2-a+dotprod build.
# With PEER_PREFILL=1 it counts prompt processing as scripts/insn-count-prefill.sh
# counts Bramble's: `llama-bench -p N -n 0` for prompts of 64 and 192 tokens,
# per prompt token = (count(192) − count(64)) / 128; PROMPTS="576 704" counts
# other lengths, as it does for scripts/insn-count-prefill.sh.
# PEER_DIR is scripts/peer-build.sh's directory (~/.cache/bramble/peer).
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=${1:?usage: scripts/peer-insn-count.sh GGUF [CPU...]}
shift
[ -f "$gguf" ] || { echo "peer-insn-count: $gguf: no such file" >&2; exit 1; }
cpus=("$@")
[ ${#cpus[@]} -gt 0 ] || cpus=(cortex-a72 cortex-a76)
peer=${PEER_DIR:-$HOME/.cache/bramble/peer}
plugin=$(bash ../shared/tools/qemu-insn-count/build.sh)

# bench CPU → the llama-bench built for that core.
bench() {
    local build
    case $1 in
    cortex-a72) build=armv8-a ;;
    cortex-a76) build=armv8.2-a+dotprod ;;
    *)
        echo "peer-insn-count: unknown CPU $1 (cortex-a72, cortex-a76)" >&2
        return 1
        ;;
    esac
    local path=$peer/build-$build/bin/llama-bench
    [ -x "$path" ] || { echo "peer-insn-count: $path missing: run scripts/peer-build.sh $build" >&2; return 1; }
    echo "$path"
}

# count CPU TOKENS → guest instructions of one llama-bench run (TOKENS
# generated after a 32-token context, or with PEER_PREFILL=1 a TOKENS-token prompt).
count() {
    local cpu=$1 tokens=$2 program output args
    program=$(bench "$cpu")
    if [ "${PEER_PREFILL:-0}" = 1 ]; then
        args=(-p "$tokens" -n 0)
    else
        args=(-p 0 -d 32 -n "$tokens")
    fi
    output=$(QEMU_CPU=$cpu qemu-aarch64 -L /usr/aarch64-linux-gnu -plugin "$plugin" \
        "$program" -m "$gguf" -t 1 -r 1 --no-warmup "${args[@]}" 2>&1 >/dev/null)
    local n
    n=$(sed -n 's/^guest-instructions: //p' <<<"$output")
    if [ -z "$n" ]; then
        echo "peer-insn-count: llama-bench failed on $cpu:" >&2
        echo "$output" | tail -5 >&2
        return 1
    fi
    echo "$n"
}

if [ "${PEER_PREFILL:-0}" = 1 ]; then
    read -r -a lengths <<<"${PROMPTS:-64 192}"
    unit="prompt token"
else
    lengths=(8 24) unit=token
fi
for cpu in "${cpus[@]}"; do
    short=$(count "$cpu" "${lengths[0]}")
    long=$(count "$cpu" "${lengths[1]}")
    awk -v cpu="$cpu" -v a="$short" -v b="$long" -v n=$((lengths[1] - lengths[0])) -v u="$unit" \
        -v f="$(basename "$gguf")" \
        'BEGIN { printf "%s %s (llama.cpp): %.2f M guest instructions per %s\n", f, cpu, (b - a) / n / 1e6, u }'
done
