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
variants=(
    "kv-f32:-ctk f32 -ctv f32 -fa off"
    "fa-off:-fa off"
    "token-at-a-time:-b 1 -ub 1"
)
for variant in "${variants[@]}"; do
    name=${variant%%:*}
    read -r -a extra <<<"${variant#*:}"
    python3 scripts/peer_greedy.py "$gguf" "$outdir/greedy-spread/$name.json" "$bin" "${THREADS:-2}" "${extra[@]}" 2>/dev/null
    python3 - "$outdir/greedy.json" "$outdir/greedy-spread/$name.json" "$name (${variant#*:})" <<'PY'
import json, sys
reference, variant = (json.load(open(p)) for p in sys.argv[1:3])
firsts = [next((i + 1 for i, (a, b) in enumerate(zip(r["ids"], v["ids"])) if a != b), None) for r, v in zip(reference, variant)]
same = sum(r["ids"] == v["ids"] for r, v in zip(reference, variant))
print(f"{sys.argv[3]}: {same} of {len(reference)} equal the reference; first differences at tokens "
      f"{[f for f in firsts if f] or 'none'}")
PY
done
