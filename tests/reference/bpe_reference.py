#!/usr/bin/env python3
"""Reference byte-level BPE encodings from Hugging Face `tokenizers`.

Builds a `tokenizers.Tokenizer` from the vocabulary and merges of a GGUF file
(SmolLM2's, by default) the way SmolLM2's own tokenizer.json sets it up: a BPE
model, the pre-tokenizer Sequence([Digits(individual_digits=True),
ByteLevel(add_prefix_space=False, use_regex=True)]), the ByteLevel decoder, and
the control tokens as special added tokens.

Reads a JSON list from standard input. Each item is either a string (encoded
with special-token parsing off, so "<|im_start|>" is plain text) or an object
{"text": ..., "parse_special": true|false}. Prints a JSON list with the ids of
each item, in order, without BOS/EOS.

Usage: bpe_reference.py MODEL.gguf < texts.json
Needs: pip install tokenizers gguf numpy
"""

import json
import sys


def build_tokenizer(path):
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = GGUFReader(path)

    def field(name):
        value = reader.fields.get(name)
        if value is None:
            raise SystemExit(f"{path}: no {name} in the GGUF metadata")
        return value.contents()

    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = [tuple(merge.split(" ", 1)) for merge in field("tokenizer.ggml.merges")]
    vocab = {text: index for index, text in enumerate(tokens)}

    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    control = 3  # GGUF token type CONTROL
    specials = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == control]
    tokenizer.add_special_tokens(specials)
    return tokenizer


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    tokenizer = build_tokenizer(sys.argv[1])
    requests = json.load(sys.stdin)
    results = []
    for request in requests:
        if isinstance(request, str):
            text, parse_special = request, False
        else:
            text, parse_special = request["text"], bool(request.get("parse_special", False))
        # With encode_special_tokens on, special added tokens are not matched in the text.
        tokenizer.encode_special_tokens = not parse_special
        results.append(tokenizer.encode(text, add_special_tokens=False).ids)
    json.dump(results, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
