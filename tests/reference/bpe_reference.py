#!/usr/bin/env python3
"""Reference byte-level BPE encodings from Hugging Face `tokenizers`, for
tools/tests/tokenizer.rs to compare Bramble's tokenizer against.

    bpe_reference.py MODEL.gguf < texts.json

Builds a `tokenizers.Tokenizer` from the tokens and merges of a GGUF file
(read with the `gguf` package) the way SmolLM2's tokenizer.json sets it up: a
BPE model over the vocabulary and merges, the pre-tokenizer
Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False,
use_regex=True)]), the ByteLevel decoder, and the control tokens as special
added tokens.

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


def build_tokenizer(path):
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

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(text, special=True, normalized=False)
        for text, kind in zip(tokens, types)
        if kind == CONTROL
    ]
    tokenizer.add_special_tokens(specials)
    return tokenizer


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    tokenizer = build_tokenizer(sys.argv[1])
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
