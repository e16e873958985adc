#!/usr/bin/env python3
"""Reference byte-level BPE encodings from Hugging Face `tokenizers`, for
tools/tests/tokenizer.rs to compare Bramble's tokenizer against.

    bpe_reference.py MODEL.gguf [smollm|gpt2|llama3] < texts.json

Builds a `tokenizers.Tokenizer` from the tokens and merges of a GGUF file
(read with the `gguf` package) the way SmolLM2's tokenizer.json sets it up: a
BPE model over the vocabulary and merges, the pre-tokenizer
Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False,
use_regex=True)]), the ByteLevel decoder, and the control tokens as special
added tokens. The optional second argument swaps the pre-tokenizer for GPT-2's
(ByteLevel alone) or Llama-3's (its Split regex, then ByteLevel without a
regex, and the BPE model's ignore_merges), to check those splitters on the
same vocabulary.

Standard input is a JSON list. Each item is a string, encoded with special
tokens not parsed (so "<|im_start|>" is plain text), or an object
{"text": ..., "parse_special": true} to have special tokens matched in the
text. Standard output is a JSON list with the ids of each item, in order,
without BOS or EOS.

Exit status 3 means the `tokenizers` or `gguf` package is missing.
"""

import json
import sys

try:
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
except ImportError as error:
    print(f"bpe_reference.py: {error}; run `pip install tokenizers gguf numpy`", file=sys.stderr)
    sys.exit(3)

# GGUF's token type for control tokens.
CONTROL = 3

# Llama-3's pre-tokenizer regex, from its tokenizer.json.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer_for(name):
    from tokenizers import Regex

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name == "gpt2":
        return byte_level
    if name == "llama3":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    print(f"bpe_reference.py: unknown pre-tokenizer {name!r}", file=sys.stderr)
    sys.exit(2)


def build_tokenizer(path, pre_tokenizer):
    reader = GGUFReader(path)

    def field(name):
        value = reader.fields.get(name)
        if value is None:
            print(f"bpe_reference.py: {path} has no {name}", file=sys.stderr)
            sys.exit(2)
        return value.contents()

    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = [tuple(merge.split(" ", 1)) for merge in field("tokenizer.ggml.merges")]
    vocab = {text: index for index, text in enumerate(tokens)}

    model = models.BPE(
        vocab=vocab,
        merges=merges,
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=pre_tokenizer == "llama3",
    )
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizer_for(pre_tokenizer)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(text, special=True, normalized=False)
        for text, kind in zip(tokens, types)
        if kind == CONTROL
    ]
    tokenizer.add_special_tokens(specials)
    return tokenizer


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    tokenizer = build_tokenizer(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "smollm")
    results = []
    for request in json.load(sys.stdin):
        if isinstance(request, str):
            text, parse_special = request, False
        else:
            text, parse_special = request["text"], bool(request.get("parse_special", False))
        # With encode_special_tokens on, special added tokens are left in the
        # text to be tokenized like any other (llama.cpp's parse_special=false).
        tokenizer.encode_special_tokens = not parse_special
        results.append(tokenizer.encode(text, add_special_tokens=False).ids)
    json.dump(results, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
