#!/usr/bin/env python3
"""Dequantizes every tensor of a GGUF file with the reference `gguf` package
(llama.cpp's gguf-py), for tools/tests/gguf.rs to compare its reader against.

    gguf_dequant.py MODEL.gguf OUT_DIR

Writes OUT_DIR/<tensor name>.f32: the tensor's values as little-endian f32,
rows one after another (GGUF's innermost dimension is the row).

Exit status 3 means the `gguf` or `numpy` package is missing.
"""

import os
import sys

try:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
except ImportError as error:
    print(f"gguf_dequant.py: {error}; run `pip install gguf numpy`", file=sys.stderr)
    sys.exit(3)


def main() -> None:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    model, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    reader = GGUFReader(model)
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        values = np.asarray(values, dtype="<f4").reshape(-1)
        values.tofile(os.path.join(out_dir, f"{tensor.name}.f32"))


if __name__ == "__main__":
    main()
