#!/usr/bin/env bash
# llama.cpp's reference figures on a GGUF, for checking a new architecture in
# Bramble against the peer: the Tempest perplexity at ctx 256 and the first 16
# greedy tokens of four fixed raw prompts (no chat template).
#
#   scripts/peer-reference.sh GGUF OUTDIR
#
# Writes into OUTDIR:
#   perplexity.txt   scripts/peer-perplexity.sh GGUF 256's line, and its wall time
#   greedy.json      [{prompt, prompt_ids, ids, text, eog, ids_checked}, ...]
#   peer.txt         the llama.cpp build and the commands
#   llama-info.txt   how llama.cpp reads the file: its print_info lines (hparams
#                    with its defaults filled in, e.g. freq_base_swa, f_attn_scale;
#                    vocab type; BOS/EOS/EOT and every end-of-generation id)
#
# The x86-64 build of scripts/peer-build.sh runs it (PEER_DIR as there), with
# THREADS threads (2). PEER_SKIP_PPL=1 skips the perplexity.
#
# How the greedy tokens are taken. llama-simple is greedy but hard-codes 4
# threads, which on 2 shared cores spin against each other (16 tokens of a
# 270M model took 65-108 s, against 0.3 s with one thread), and prints text
# only. So the generation is llama-completion (the old `main`, this version's
# plain completion tool) with greedy sampling (--temp 0 --top-k 1: only the
# argmax survives), no chat template (-no-cnv), the raw prompt tokenized as
# llama.cpp does by default (BOS first when the model's add_bos_token says
# so; special tokens parsed) and 16 tokens (-n 16), stopping early at an
# end-of-generation token. Its --verbose-prompt log gives the prompt's ids
# exactly. It prints the generated text (special tokens shown, -sp) but not
# the ids, so the ids are llama-tokenize's tokenization of the generated text
# alone (no BOS; not prompt + text, whose tokenization can merge across the
# boundary: Qwen's "):" + "\n" is one token). That is the generated sequence
# when the model chose the canonical split of its own text, which is checked
# only by count: ids_checked says the tokenization has exactly as many tokens
# as were generated (the sampler's count less the prompt's). (A tokenizer
# that adds a space prefix, SPM with add_space_prefix, would need more care;
# none of these does.) When generation stopped at an
# end-of-generation token, eog is true and that token is the last of ids and
# its text (e.g. <|im_end|>) ends text.
# Both tools are built into the x86-64 build if missing (a few seconds: they
# only add their own source to libllama and libcommon).
set -euo pipefail
gguf=${1:?usage: scripts/peer-reference.sh GGUF OUTDIR}
outdir=${2:?usage: scripts/peer-reference.sh GGUF OUTDIR}
cd "$(dirname "$0")/.."
peer=${PEER_DIR:-$HOME/.cache/bramble/peer}
bin=$peer/build-x86-64/bin
threads=${THREADS:-2}
[ -f "$gguf" ] || { echo "peer-reference: $gguf: no such file" >&2; exit 1; }
for tool in llama-completion llama-tokenize; do
    if [ ! -x "$bin/$tool" ]; then
        [ -f "$peer/build-x86-64/CMakeCache.txt" ] ||
            { echo "peer-reference: $peer/build-x86-64 missing: run scripts/peer-build.sh x86-64" >&2; exit 1; }
        cmake --build "$peer/build-x86-64" --target "$tool" -j "${PEER_JOBS:-2}" >/dev/null
    fi
done
mkdir -p "$outdir"

{
    echo "llama.cpp: $("$bin/llama-completion" --version 2>&1 | grep -m1 version)"
    echo "greedy: llama-completion -m GGUF -p PROMPT -n 16 -t $threads -c 128 --temp 0 --top-k 1 --seed 0 -no-cnv -sp --no-escape --no-warmup --verbose-prompt --no-display-prompt"
    echo "ids: llama-tokenize -m GGUF --stdin --ids --no-escape  (of prompt + text)"
    echo "perplexity: scripts/peer-perplexity.sh GGUF 256  (THREADS=$threads)"
} >"$outdir/peer.txt"

"$bin/llama-completion" -m "$gguf" -p hi -n 1 -t 1 -c 32 -no-cnv --no-warmup -v </dev/null 2>&1 >/dev/null |
    sed -n 's/^.* I print_info: //p' | awk '!seen[$0]++' | grep -v -e '^no_alloc' -e '^vocab_only' >"$outdir/llama-info.txt"

python3 scripts/peer_greedy.py "$gguf" "$outdir/greedy.json" "$bin" "$threads"

if [ "${PEER_SKIP_PPL:-0}" != 1 ]; then
    start=$(date +%s)
    line=$(THREADS=$threads scripts/peer-perplexity.sh "$gguf" 256)
    echo "$line; $(($(date +%s) - start)) s wall with $threads threads" | tee "$outdir/perplexity.txt"
fi
