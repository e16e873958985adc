#!/usr/bin/env bash
# Where a decoded token's guest instructions go, by function: the profile
# behind scripts/insn-count.sh's single figure.
#
#   scripts/insn-profile.sh IMAGE [CPU]      # CPU: cortex-a72 (default), cortex-a76
#
# Runs `bramble bench --threads 1 --prompt-tokens 32` twice under qemu with
# scripts/insn-profile/insnprof.c (instructions per translation block),
# generating 8 and 24 tokens, and puts the difference / 16 under the function
# each block starts in. The total equals scripts/insn-count.sh's figure.
# BENCH_ARGS and BRAMBLE work as there.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?usage: scripts/insn-profile.sh IMAGE [CPU]}
cpu=${2:-cortex-a72}
out=${XDG_CACHE_HOME:-$HOME/.cache}/bramble/insn-profile
mkdir -p "$out"
cc -shared -fPIC -O2 -fvisibility=hidden -o "$out/libinsnprof.so" scripts/insn-profile/insnprof.c
if [ -n "${BRAMBLE:-}" ]; then
    bramble=$BRAMBLE
else
    cargo build --quiet --release --target aarch64-unknown-linux-gnu -p bramble-tools
    bramble=${CARGO_TARGET_DIR:-target}/aarch64-unknown-linux-gnu/release/bramble
fi
for n in 8 24; do
    # shellcheck disable=SC2086 # BENCH_ARGS is a list of options.
    INSNPROF_OUT="$out/blocks-$n.txt" QEMU_CPU=$cpu qemu-aarch64 -L /usr/aarch64-linux-gnu \
        -plugin "$out/libinsnprof.so" "$bramble" bench --model "$image" --threads 1 --json \
        --prompt-tokens 32 --gen-tokens $n ${BENCH_ARGS:-} >/dev/null
done
echo "$(basename "$image") $cpu"
python3 scripts/insn-profile/attribute.py "$bramble" "$out/blocks-8.txt" "$out/blocks-24.txt" 16
