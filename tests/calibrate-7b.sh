#!/usr/bin/env bash
# `bramble calibrate` on a real size: a Llama-2-7B-shaped model (made by
# `bramble synth --shape llama2-7b`, seeded random f16 weights, converted to
# q4) calibrated for R-Sparse at 50 % sparsity. Reports the time of each
# phase (SVD of the 224 projections, activation collection, writing) and the
# peak resident set. Too slow for CI; run by hand:
#
#   tests/calibrate-7b.sh                       # 7B, 64 calibration tokens
#   tests/calibrate-7b.sh --tokens 256          # more tokens (≈ linear in time)
#   tests/calibrate-7b.sh --shape tiny          # the script itself, in seconds
#
# Needs about 18 GB free under the cargo target directory (the f16 GGUF is
# deleted once converted; the q4 image and its calibrated copy stay until
# exit). The peak is calibrate's own VmHWM (`--json`'s peak_rss_bytes), and
# GNU time's maximum RSS when /usr/bin/time is installed. Both count the
# mapped image pages the model touched (file-backed, reclaimable), on top of
# the calibration's own memory (one dequantized f32 matrix, its SVD
# workspace, the reservoirs: 4 sites × layers × --samples × 8 bytes).
set -euo pipefail
cd "$(dirname "$0")/.."

shape=llama2-7b
tokens=64
sparsity=0.5
while [ $# -gt 0 ]; do
    case "$1" in
        --shape) shape=$2; shift 2 ;;
        --tokens) tokens=$2; shift 2 ;;
        --sparsity) sparsity=$2; shift 2 ;;
        *) echo "usage: $0 [--shape llama2-7b|tiny] [--tokens N] [--sparsity S]" >&2; exit 2 ;;
    esac
done

say() { printf '\n== %s\n' "$*"; }
started=$SECONDS

target=${CARGO_TARGET_DIR:-target}
if [ -n "${BRAMBLE_BIN:-}" ]; then
    bramble=$BRAMBLE_BIN # a binary built elsewhere, as the end-to-end tests take it
else
    say "release build"
    cargo build --release --quiet -p bramble-tools
    bramble=$target/release/bramble
fi

work=$(mktemp -d "$target/calibrate-7b.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ "$shape" = llama2-7b ]; then
    free_kib=$(df -Pk "$work" | awk 'NR == 2 { print $4 }')
    if [ "$free_kib" -lt $((18 * 1024 * 1024)) ]; then
        echo "only $((free_kib / 1024 / 1024)) GiB free under $target; 18 GiB are needed" >&2
        exit 1
    fi
fi

say "synth --shape $shape (f16 GGUF), convert --quant q4"
step=$SECONDS
"$bramble" synth --format gguf --shape "$shape" --weights f16 --output "$work/model.gguf"
"$bramble" convert --input "$work/model.gguf" --output "$work/model.bramble" --quant q4
rm -f "$work/model.gguf"
prepare_seconds=$((SECONDS - step))

# Calibration text: any English prose the synthetic tokenizer spells (its
# vocabulary is random, so only time and memory mean anything here).
for i in $(seq 1 400); do
    echo "Now is the winter of our discontent made glorious summer by this sun of York; line $i."
done >"$work/text.txt"

say "calibrate --sparsity $sparsity --tokens $tokens"
step=$SECONDS
if [ -x /usr/bin/time ]; then
    /usr/bin/time -v -o "$work/time.txt" "$bramble" calibrate --model "$work/model.bramble" --text "$work/text.txt" \
        --sparsity "$sparsity" --tokens "$tokens" --ctx 64 --output "$work/sparse.bramble" --json >"$work/report.json"
    max_rss_kib=$(sed -n 's/.*Maximum resident set size (kbytes): *//p' "$work/time.txt")
else
    "$bramble" calibrate --model "$work/model.bramble" --text "$work/text.txt" \
        --sparsity "$sparsity" --tokens "$tokens" --ctx 64 --output "$work/sparse.bramble" --json >"$work/report.json"
    max_rss_kib=n/a
fi
calibrate_seconds=$((SECONDS - step))
"$bramble" inspect "$work/sparse.bramble" | grep rsparse

field() { sed -n "s/.*\"$1\":\([0-9.e+-]*\).*/\1/p" "$work/report.json"; }
peak=$(field peak_rss_bytes)
say "summary ($shape, $((SECONDS - started)) s in all)"
echo "$shape q4, sparsity $sparsity, $(field tokens) calibration tokens:" \
    "calibrate ${calibrate_seconds} s (SVD $(field svd_seconds) s, activations $(field activation_seconds) s);" \
    "peak RSS $((peak / 1024 / 1024)) MiB (VmHWM), GNU time max RSS ${max_rss_kib} KiB;" \
    "image $(($(field image_bytes) / 1024 / 1024)) MiB; synth+convert ${prepare_seconds} s"
