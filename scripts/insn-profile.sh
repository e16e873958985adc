#!/usr/bin/env bash
# Where the guest instructions of a decoded token go, by function, on an
# emulated Raspberry Pi core (companion of scripts/insn-count.sh):
#
#   scripts/insn-profile.sh IMAGE CPU [TOP]
#
# Runs `bramble bench --threads 1` for 8 and 24 generated tokens under qemu
# with scripts/insn-profile/insnprofile.c, and prints per-function
# instructions per token ((long − short) / 16). Inlined code counts in its caller.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?usage: scripts/insn-profile.sh IMAGE CPU [TOP]}
cpu=${2:?usage: scripts/insn-profile.sh IMAGE CPU [TOP]}
top=${3:-25}
out=${XDG_CACHE_HOME:-$HOME/.cache}/insn-profile
mkdir -p "$out"
cc -shared -fPIC -O2 -fvisibility=hidden -o "$out/libinsnprofile.so" scripts/insn-profile/insnprofile.c
cargo build --quiet --release --target aarch64-unknown-linux-gnu -p bramble-tools
bramble=${CARGO_TARGET_DIR:-target}/aarch64-unknown-linux-gnu/release/bramble
for n in 8 24; do
    INSN_PROFILE_OUT="$out/$cpu-$n.txt" QEMU_CPU=$cpu qemu-aarch64 -L /usr/aarch64-linux-gnu \
        -plugin "$out/libinsnprofile.so" "$bramble" bench --model "$image" --prompt-tokens 32 \
        --gen-tokens "$n" --threads 1 --json >/dev/null
done
python3 scripts/insn-profile/symbolize.py "$bramble" "$out/$cpu-8.txt" "$out/$cpu-24.txt" 16 "$top"
