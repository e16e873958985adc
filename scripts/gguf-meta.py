#!/usr/bin/env python3
"""What a GGUF holds, as text: the facts a new architecture's importer needs.

    python3 scripts/gguf-meta.py GGUF > results/extra-models/NAME.meta.txt

Needs the PyPI package gguf (`pip install gguf`). Prints the file's size and
sha256, general.architecture, every metadata key with its value (arrays by
type and length only, the chat template in full at the end), the tokenizer's
model, pre-tokenizer, special ids and add_bos/add_eos flags, the tensors of
layer 0 and every tensor outside the layers with type and shape (ggml order:
the first dimension is the contiguous one), and a count of tensors per ggml
type (with their bytes) over the whole file.
"""
import collections
import hashlib
import os
import re
import sys

from gguf import GGUFReader, GGUFValueType


def field_value(field):
    """A scalar or string field's value; arrays as (element type, length)."""
    kind = field.types[0] if field.types else None
    if kind == GGUFValueType.ARRAY:
        return ("array", field.types[1].name if len(field.types) > 1 else "?", len(field.data))
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]]
    return value.tolist()[0] if len(value) == 1 else value.tolist()


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gguf-meta.py GGUF")
    path = sys.argv[1]
    reader = GGUFReader(path)
    fields = {name: field_value(field) for name, field in reader.fields.items()}
    out = []
    out.append(f"file: {os.path.basename(path)}")
    out.append(f"bytes: {os.path.getsize(path)}")
    out.append(f"sha256: {sha256(path)}")
    out.append(f"general.architecture: {fields.get('general.architecture')}")
    out.append("")

    out.append("## metadata (arrays: element type and length)")
    template = None
    for name, value in fields.items():
        if name.startswith("GGUF."):
            continue
        if name == "tokenizer.chat_template":
            template = value
            out.append(f"{name} = <{len(value)} chars, below>")
        elif isinstance(value, tuple) and value[0] == "array":
            out.append(f"{name} = [{value[1]}; {value[2]}]")
        else:
            out.append(f"{name} = {value!r}")
    out.append("")

    out.append("## tokenizer")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        out.append(f"{key}: {fields.get(key)!r}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")

    def token_text(token_id):
        if tokens is None or not isinstance(token_id, int) or token_id >= len(tokens.data):
            return None
        return bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8", errors="replace")

    for key in sorted(k for k in fields if re.match(r"tokenizer\.ggml\..*_token_id$", k)):
        out.append(f"{key}: {fields[key]} {token_text(fields[key])!r}")
    for key in sorted(k for k in fields if re.match(r"tokenizer\.ggml\.add_.*", k)):
        out.append(f"{key}: {fields[key]}")
    if tokens is not None:
        # Tokens llama.cpp treats as end of generation when no eot id is given.
        named = [
            f"{i} {token_text(i)!r}"
            for i in range(len(tokens.data))
            if token_text(i) in ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|end|>", "<|eom_id|>")
        ]
        out.append("end-like tokens: " + ", ".join(named))
    out.append("")

    out.append("## tensors of layer 0 and outside the layers (type, shape in ggml order)")
    per_type = collections.Counter()
    bytes_per_type = collections.Counter()
    layers = set()
    for tensor in reader.tensors:
        per_type[tensor.tensor_type.name] += 1
        bytes_per_type[tensor.tensor_type.name] += int(tensor.n_bytes)
        m = re.match(r"blk\.(\d+)\.", tensor.name)
        if m:
            layers.add(int(m.group(1)))
        if not m or m.group(1) == "0":
            shape = "x".join(str(int(d)) for d in tensor.shape)
            out.append(f"{tensor.name:40} {tensor.tensor_type.name:8} {shape}")
    out.append(f"layers: {len(layers)}; tensors: {len(reader.tensors)}")
    out.append("")
    out.append("## tensors per ggml type (whole file)")
    for name, count in sorted(per_type.items(), key=lambda kv: -bytes_per_type[kv[0]]):
        out.append(f"{name:8} {count:5} tensors {bytes_per_type[name]:12} bytes")
    # Types that differ between layers (a quant mix such as Q4_K_M varies by layer).
    by_role = collections.defaultdict(collections.Counter)
    for tensor in reader.tensors:
        m = re.match(r"blk\.\d+\.(.*)", tensor.name)
        if m:
            by_role[m.group(1)][tensor.tensor_type.name] += 1
    out.append("")
    out.append("## per-layer tensor roles: types across the layers")
    for role, counts in by_role.items():
        out.append(f"{role:32} " + ", ".join(f"{t}×{n}" for t, n in counts.most_common()))
    out.append("")
    out.append("## tokenizer.chat_template")
    out.append(template if template is not None else "(none)")
    print("\n".join(out))


if __name__ == "__main__":
    main()
