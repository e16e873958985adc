#!/usr/bin/env bash
# How far llama.cpp's own greedy tokens move when only its arithmetic's
# precision changes: the four prompts of scripts/peer-reference.sh rerun
# with options that change rounding, not the model (an f32 KV cache without
# flash attention, flash attention off, the prompt a token at a time), each
# compared with the reference run (greedy.json). A target of "equal to
# llama.cpp's greedy tokens" means little on a model whose tokens llama.cpp
# itself does not keep under these.
#
#   scripts/peer-greedy-spread.sh GGUF OUTDIR    # OUTDIR holds greedy.json
#
# Writes OUTDIR/greedy-spread/NAME.json per variant and prints, per variant,
# how many of the four continuations equal the reference's (and where the
# others first differ). The x86-64 build of scripts/peer-build.sh runs it
# (PEER_DIR), THREADS threads (2), as scripts/peer-reference.sh does.
# PEER_ARM=1 also runs llama.cpp's own Pi builds under qemu with their
# defaults (the armv8-a build as cortex-a72, the dotprod one as cortex-a76,
# one thread; llama-completion added to them if missing): NAME cortex-a72,
# cortex-a76. scripts/extra-compare.sh with QEMU_CPU and REFERENCE sets
# Bramble's aarch64 build beside them on the same core.
set -euo pipefail
gguf=${1:?usage: scripts/peer-greedy-spread.sh GGUF OUTDIR}
outdir=${2:?usage: scripts/peer-greedy-spread.sh GGUF OUTDIR}
cd "$(dirname "$0")/.."
bin=${PEER_DIR:-$HOME/.cache/bramble/peer}/build-x86-64/bin
[ -f "$outdir/greedy.json" ] || { echo "peer-greedy-spread: no $outdir/greedy.json (scripts/peer-reference.sh)" >&2; exit 1; }
for tool in llama-completion llama-tokenize; do
    [ -x "$bin/$tool" ] || { echo "peer-greedy-spread: no $bin/$tool (scripts/peer-reference.sh builds it)" >&2; exit 1; }
done
mkdir -p "$outdir/greedy-spread"
compare() { # NAME LABEL: the variant's run beside the reference
    python3 - "$outdir/greedy.json" "$outdir/greedy-spread/$1.json" "$2" <<'PY'
import json, sys
reference, variant = (json.load(open(p)) for p in sys.argv[1:3])
firsts = [next((i + 1 for i, (a, b) in enumerate(zip(r["ids"], v["ids"])) if a != b), None) for r, v in zip(reference, variant)]
same = sum(r["ids"] == v["ids"] for r, v in zip(reference, variant))
print(f"{sys.argv[3]}: {same} of {len(reference)} equal the reference; first differences at tokens "
      f"{[f for f in firsts if f] or 'none'}")
PY
}
variants=(
    "kv-f32:-ctk f32 -ctv f32 -fa off"
    "fa-off:-fa off"
    "token-at-a-time:-b 1 -ub 1"
)
for variant in "${variants[@]}"; do
    name=${variant%%:*}
    read -r -a extra <<<"${variant#*:}"
    python3 scripts/peer_greedy.py "$gguf" "$outdir/greedy-spread/$name.json" "$bin" "${THREADS:-2}" "${extra[@]}" 2>/dev/null
    compare "$name" "$name (${variant#*:})"
done
if [ "${PEER_ARM:-0}" = 1 ]; then
    peer=${PEER_DIR:-$HOME/.cache/bramble/peer}
    wrappers=$(mktemp -d)
    trap 'rm -rf "$wrappers"' EXIT
    for pair in cortex-a72:armv8-a cortex-a76:armv8.2-a+dotprod; do
        cpu=${pair%%:*} build=$peer/build-${pair#*:}
        [ -f "$build/CMakeCache.txt" ] ||
            { echo "peer-greedy-spread: $build missing: run scripts/peer-build.sh ${pair#*:}" >&2; exit 1; }
        [ -x "$build/bin/llama-completion" ] || cmake --build "$build" --target llama-completion -j "${PEER_JOBS:-2}" >/dev/null
        # peer_greedy.py runs BIN_DIR/llama-completion: here the Pi build under qemu; the
        # tokenizer is the host's (the same vocabulary code).
        mkdir -p "$wrappers/$cpu"
        printf '#!/bin/sh\nQEMU_CPU=%s exec qemu-aarch64 -L /usr/aarch64-linux-gnu %s/bin/llama-completion "$@"\n' \
            "$cpu" "$build" >"$wrappers/$cpu/llama-completion"
        chmod +x "$wrappers/$cpu/llama-completion"
        ln -s "$bin/llama-tokenize" "$wrappers/$cpu/llama-tokenize"
        python3 scripts/peer_greedy.py "$gguf" "$outdir/greedy-spread/$cpu.json" "$wrappers/$cpu" 1 2>/dev/null
        compare "$cpu" "$cpu (llama.cpp's ${pair#*:} build under qemu, defaults, one thread)"
    done
fi
