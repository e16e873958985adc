#!/usr/bin/env bash
# The converter's memory bound on a real size: a Llama-2-7B-shaped f16 model
# (13.5 GB, made by `bramble synth --shape llama2-7b`, seeded random weights)
# converts to q4 with a peak resident set under 2 GiB, from GGUF and from a
# sharded Hugging Face directory. Exits non-zero when a peak is over the limit.
#
#   tests/convert-7b-rss.sh                    # GGUF and Hugging Face
#   tests/convert-7b-rss.sh --formats gguf     # GGUF only
#   tests/convert-7b-rss.sh --shape tiny       # the script itself, in seconds
#   tests/convert-7b-rss.sh --layers 8         # 7B-sized tensors, 8 blocks
#
# The full shape needs about 19 GB free under the cargo target directory (one
# input and its image at a time); every file it makes is deleted on exit.
# `--layers auto` (the default) keeps all 32 blocks when they fit and
# otherwise as many as the free disk holds, at least 4: every tensor keeps
# its 7B size, so the per-tensor peak the limit bounds is the same, and even
# 4 blocks are 2.1 GB of f16, more than the limit, so a converter holding the
# model in memory still fails. The summary names the count used. The peak is the
# converter's own VmHWM (`convert --json`'s peak_rss_bytes), and GNU time's
# maximum RSS when /usr/bin/time is installed. Page cache is not RSS; mapped
# input pages are, until the reader releases them after each tensor.
set -euo pipefail
cd "$(dirname "$0")/.."

shape=llama2-7b
formats="gguf hf"
limit_mib=2048
layers=auto
while [ $# -gt 0 ]; do
    case "$1" in
        --shape) shape=$2; shift 2 ;;
        --formats) formats=${2//,/ }; shift 2 ;;
        --limit-mib) limit_mib=$2; shift 2 ;;
        --layers) layers=$2; shift 2 ;;
        *) echo "usage: $0 [--shape llama2-7b|tiny] [--formats gguf,hf] [--limit-mib N] [--layers N|auto]" >&2; exit 2 ;;
    esac
done

say() { printf '\n== %s\n' "$*"; }
started=$SECONDS

say "release build"
cargo build --release --quiet -p bramble-tools
target=${CARGO_TARGET_DIR:-target}
bramble=$target/release/bramble

work=$(mktemp -d "$target/convert-rss.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ "$shape" = llama2-7b ]; then
    # Disk for one input and its image: per block 405 MB of f16 and 127 MB of
    # q4; embedding and output 524 MB of f16 and about 400 MB in the image;
    # 1 GiB to spare.
    per_layer_kib=$((532 * 1000 * 1000 / 1024))
    fixed_kib=$(((924 * 1000 * 1000 + 1024 * 1024 * 1024) / 1024))
    free_kib=$(df -Pk "$work" | awk 'NR == 2 { print $4 }')
    fits=$(((free_kib - fixed_kib) / per_layer_kib))
    if [ "$layers" = auto ]; then
        layers=$((fits < 32 ? fits : 32))
        if [ "$layers" -lt 4 ]; then
            echo "only $((free_kib / 1024 / 1024)) GiB free under $target: not even 4 blocks of the 7B shape fit (about $(((fixed_kib + 4 * per_layer_kib) / 1024 / 1024)) GiB needed)" >&2
            exit 1
        fi
        [ "$layers" -lt 32 ] && echo "only $((free_kib / 1024 / 1024)) GiB free under $target: converting $layers of the 32 blocks (every tensor at its 7B size)"
    elif [ "$layers" -gt "$fits" ]; then
        echo "only $((free_kib / 1024 / 1024)) GiB free under $target; $layers blocks need about $(((fixed_kib + layers * per_layer_kib) / 1024 / 1024)) GiB" >&2
        exit 1
    fi
    layers_arg=(--layers "$layers")
else
    [ "$layers" = auto ] && layers_arg=() || layers_arg=(--layers "$layers")
fi

# Runs "$@" under GNU time when there is one; sets max_rss_kib (or "n/a").
timed() {
    if [ -x /usr/bin/time ]; then
        /usr/bin/time -v -o "$work/time.txt" "$@"
        max_rss_kib=$(sed -n 's/.*Maximum resident set size (kbytes): *//p' "$work/time.txt")
    else
        "$@"
        max_rss_kib=n/a
    fi
}

failed=0
summary=()
for format in $formats; do
    case "$format" in
        gguf) input=$work/model.gguf ;;
        hf) input=$work/model-hf ;;
        *) echo "unknown format $format (gguf, hf)" >&2; exit 2 ;;
    esac
    say "$format: synth --shape $shape (f16)"
    step=$SECONDS
    timed "$bramble" synth --format "$format" --shape "$shape" "${layers_arg[@]}" --weights f16 --output "$input"
    synth_seconds=$((SECONDS - step))
    du -sh "$input"

    say "$format: convert --quant q4"
    step=$SECONDS
    timed "$bramble" convert --input "$input" --output "$work/model.bramble" --quant q4 --json >"$work/report.json"
    convert_seconds=$((SECONDS - step))
    peak=$(sed -n 's/.*"peak_rss_bytes":\([0-9]*\).*/\1/p' "$work/report.json")
    tensors=$(sed -n 's/.*"tensors":\([0-9]*\).*/\1/p' "$work/report.json")
    image_bytes=$(sed -n 's/.*"image_bytes":\([0-9]*\).*/\1/p' "$work/report.json")
    if [ -z "$peak" ]; then
        echo "convert --json reported no peak_rss_bytes" >&2
        exit 1
    fi
    peak_mib=$((peak / 1024 / 1024))
    line="$format: $tensors tensors, image $((image_bytes / 1024 / 1024)) MiB; synth ${synth_seconds} s, convert ${convert_seconds} s; peak RSS ${peak_mib} MiB (VmHWM), GNU time max RSS ${max_rss_kib} KiB; limit ${limit_mib} MiB"
    echo "$line"
    if [ "$peak_mib" -ge "$limit_mib" ]; then
        echo "FAIL: $format conversion peaked at ${peak_mib} MiB, not under ${limit_mib} MiB" >&2
        failed=1
        line="FAIL $line"
    fi
    summary+=("$line")
    rm -rf "$input" "$work/model.bramble"
done

say "summary ($shape${layers_arg:+, ${layers_arg[1]} blocks}, $((SECONDS - started)) s in all)"
printf '%s\n' "${summary[@]}"
exit $failed
