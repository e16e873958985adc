#!/usr/bin/env python3
"""Reference answers from Hugging Face `tokenizers` and Google `sentencepiece`
for the Hugging Face reader's tests (tools/tests/hf.rs).

Subcommands (JSON in on standard input where noted, JSON out on standard output):

  encode-json TOKENIZER_JSON        stdin: list of texts. Loads the file with
                                    tokenizers.Tokenizer.from_file and prints the
                                    ids of each text, without special tokens.
  rebuild-json IN_JSON OUT_JSON STYLE
                                    Rebuilds a byte-level BPE tokenizer.json with
                                    the library's own API (so OUT_JSON is exactly
                                    how `tokenizers` serializes it), taking the
                                    vocabulary, merges and added tokens of IN_JSON.
                                    STYLE: smollm (Digits + ByteLevel), llama3
                                    (Split regex + ByteLevel) or gpt2 (ByteLevel).
  sp-describe MODEL                 Prints what sentencepiece reads from a
                                    tokenizer.model: pieces, scores, types, ids.
  sp-encode MODEL                   stdin: list of texts. Prints sentencepiece's ids.
  sp-train CORPUS PREFIX VOCAB_SIZE Trains a small BPE model with byte fallback,
                                    writing PREFIX.model.

Exits with status 3 and a message when a needed module is missing, so the Rust
tests can skip rather than fail on a machine without them.
Needs: pip install tokenizers sentencepiece
"""

import json
import sys


def need(module):
    try:
        return __import__(module)
    except ImportError:
        print(f"missing python module {module}", file=sys.stderr)
        sys.exit(3)


def encode_json(path):
    tokenizers = need("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_file(path)
    texts = json.load(sys.stdin)
    print(json.dumps([tokenizer.encode(t, add_special_tokens=False).ids for t in texts]))


def rebuild_json(source, target, style):
    need("tokenizers")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    with open(source, encoding="utf-8") as f:
        data = json.load(f)
    model = data["model"]
    merges = []
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merges.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=model["vocab"], merges=merges))
    if style == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif style == "llama3":
        regex = (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif style == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        sys.exit(f"unknown style {style}")
    tokenizer.decoder = decoders.ByteLevel()
    added = sorted(data.get("added_tokens") or [], key=lambda t: t["id"])
    tokenizer.add_special_tokens([AddedToken(t["content"], special=True, normalized=False) for t in added if t["special"]])
    tokenizer.add_tokens([AddedToken(t["content"], normalized=True) for t in added if not t["special"]])
    tokenizer.save(target)


SP_TYPES = ["normal", "unknown", "control", "user_defined", "unused", "byte"]


def sp_describe(path):
    spm = need("sentencepiece")
    processor = spm.SentencePieceProcessor(model_file=path)
    pieces, scores, types = [], [], []
    for i in range(processor.get_piece_size()):
        pieces.append(processor.id_to_piece(i))
        scores.append(processor.get_score(i))
        if processor.is_unknown(i):
            types.append("unknown")
        elif processor.is_control(i):
            types.append("control")
        elif processor.is_byte(i):
            types.append("byte")
        elif processor.is_unused(i):
            types.append("unused")
        else:
            types.append("normal")
    print(
        json.dumps(
            {
                "pieces": pieces,
                "scores": scores,
                "types": types,
                "unk": processor.unk_id(),
                "bos": processor.bos_id(),
                "eos": processor.eos_id(),
                "pad": processor.pad_id(),
            }
        )
    )


def sp_encode(path):
    spm = need("sentencepiece")
    processor = spm.SentencePieceProcessor(model_file=path)
    texts = json.load(sys.stdin)
    print(json.dumps([processor.encode(t) for t in texts]))


def sp_train(corpus, prefix, vocab_size):
    spm = need("sentencepiece")
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=prefix,
        vocab_size=int(vocab_size),
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        # As Llama's tokenizer.model: no NFKC, whitespace kept as written.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    command, args = sys.argv[1], sys.argv[2:]
    commands = {
        "encode-json": encode_json,
        "rebuild-json": rebuild_json,
        "sp-describe": sp_describe,
        "sp-encode": sp_encode,
        "sp-train": sp_train,
    }
    if command not in commands:
        sys.exit(__doc__)
    commands[command](*args)


if __name__ == "__main__":
    main()
