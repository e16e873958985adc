#!/usr/bin/env python3
"""Independent numpy reference for Bramble: Llama forward pass, greedy decoding
and llama.cpp-style perplexity, read straight from a GGUF file.

Written from the maths, not from the Rust runtime, so the Rust end-to-end tests
can compare logits and perplexity against it.

* Metadata and raw tensor bytes come from `gguf.GGUFReader`; dequantization is
  our own numpy code for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K,
  Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS (`selfcheck` compares it with
  `gguf.quants.dequantize`, bit for bit). Pass
  `--gguf-dequant` to use gguf-py's dequantizer instead (not independent).
* Numerics: weights are dequantized once to float32 and cached. Every weight
  matmul (q/k/v/o, gate/up/down, logits) is float32 x float32 with BLAS. The
  residual stream, RMSNorm, RoPE, attention (QK^T, softmax, weighted sum of V),
  SiLU and the log-softmax of the perplexity are float64. `--f64` makes the
  weight matmuls float64 as well (2x the memory, slower), to measure how much
  float32 rounding matters.

Subcommands (all print JSON on stdout; progress goes to stderr):

  logits     --gguf M --tokens "1 2 3" --out FILE [--all]
  greedy     --gguf M (--tokens "1 2 3" | --prompt TEXT) --n N
  perplexity --gguf M (--text FILE | --tokens-file FILE) --ctx N [--max-chunks K]
  tokenize   --gguf M (--text FILE | --prompt TEXT) [--out FILE] [--bos]
  selfcheck  [--gguf M]

See README.md next to this file for details.
"""

import argparse
import json
import math
import os
import sys
import time

# One BLAS thread unless the caller says otherwise: on a busy shared 2-core
# machine, OpenBLAS with 2 threads measured ~5x slower than with 1.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

# ggml type ids (ggml.h, enum ggml_type)
GGML_F32 = 0
GGML_F16 = 1
GGML_Q4_0 = 2
GGML_Q4_1 = 3
GGML_Q5_0 = 6
GGML_Q5_1 = 7
GGML_Q8_0 = 8
GGML_Q2_K = 10
GGML_Q3_K = 11
GGML_Q4_K = 12
GGML_Q5_K = 13
GGML_Q6_K = 14
GGML_IQ4_NL = 20
GGML_IQ4_XS = 23
GGML_BF16 = 30

TYPE_NAMES = {
    GGML_F32: "F32",
    GGML_F16: "F16",
    GGML_Q4_0: "Q4_0",
    GGML_Q4_1: "Q4_1",
    GGML_Q5_0: "Q5_0",
    GGML_Q5_1: "Q5_1",
    GGML_Q8_0: "Q8_0",
    GGML_Q2_K: "Q2_K",
    GGML_Q3_K: "Q3_K",
    GGML_Q4_K: "Q4_K",
    GGML_Q5_K: "Q5_K",
    GGML_Q6_K: "Q6_K",
    GGML_IQ4_NL: "IQ4_NL",
    GGML_IQ4_XS: "IQ4_XS",
    GGML_BF16: "BF16",
}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Dequantization (own implementation; layouts from ggml-common.h / ggml-quants.c)
# ---------------------------------------------------------------------------


def _f16(blocks, lo, hi):
    """The little-endian f16 at bytes [lo, hi) of each block, as float32 column."""
    return np.ascontiguousarray(blocks[:, lo:hi]).view("<f2").astype(np.float32)


def _blocks(raw, n, block_elems, block_bytes):
    if n % block_elems:
        raise ValueError(f"{n} elements is not a multiple of the block size {block_elems}")
    nb = n // block_elems
    if raw.size < nb * block_bytes:
        raise ValueError(f"need {nb * block_bytes} bytes, have {raw.size}")
    return raw[: nb * block_bytes].reshape(nb, block_bytes)


def dequant_f32(raw, n):
    return raw[: 4 * n].view("<f4").astype(np.float32)


def dequant_f16(raw, n):
    return raw[: 2 * n].view("<f2").astype(np.float32)


def dequant_bf16(raw, n):
    bits = raw[: 2 * n].view("<u2").astype(np.uint32) << 16
    return bits.view(np.float32)


def dequant_q8_0(raw, n):
    # block_q8_0 { ggml_half d; int8_t qs[32]; }   value = d * q
    b = _blocks(raw, n, 32, 34)
    d = _f16(b, 0, 2)
    q = b[:, 2:34].view(np.int8).astype(np.float32)
    return (d * q).reshape(-1)


def _nibbles32(qs):
    """16 bytes -> 32 values: element j is the low nibble of byte j, element
    j+16 the high nibble of byte j."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def dequant_q4_0(raw, n):
    # block_q4_0 { ggml_half d; uint8_t qs[16]; }   value = d * (q - 8)
    b = _blocks(raw, n, 32, 18)
    d = _f16(b, 0, 2)
    q = _nibbles32(b[:, 2:18]).astype(np.float32) - 8.0
    return (d * q).reshape(-1)


def dequant_q4_1(raw, n):
    # block_q4_1 { ggml_half d; ggml_half m; uint8_t qs[16]; }   value = d * q + m
    b = _blocks(raw, n, 32, 20)
    d = _f16(b, 0, 2)
    m = _f16(b, 2, 4)
    q = _nibbles32(b[:, 4:20]).astype(np.float32)
    return (d * q + m).reshape(-1)


def dequant_q4_k(raw, n):
    # block_q4_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qs[128]; }
    # 8 sub-blocks of 32 with 6-bit scale sc and 6-bit min mn:
    # value = (d * sc) * q - (dmin * mn)
    b = _blocks(raw, n, 256, 144)
    nb = b.shape[0]
    d = _f16(b, 0, 2)
    dmin = _f16(b, 2, 4)
    sc, mn = _k4_scale_min(b[:, 4:16])
    qs = b[:, 16:144].reshape(nb, 4, 32)
    # chunk j of 64 values: low nibbles are sub-block 2j, high nibbles 2j+1
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 8, 32).astype(np.float32)
    scale = (d * sc.astype(np.float32))[:, :, None]
    minimum = (dmin * mn.astype(np.float32))[:, :, None]
    return (scale * q - minimum).reshape(-1)


def dequant_q6_k(raw, n):
    # block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d; }
    # Per 128-value half h: ql64 = ql[64h:64h+64], qh32 = qh[32h:32h+32]; for l < 32
    #   out[l]    = lo4(ql64[l])    | bits0-1(qh32[l]) << 4
    #   out[l+32] = lo4(ql64[l+32]) | bits2-3(qh32[l]) << 4
    #   out[l+64] = hi4(ql64[l])    | bits4-5(qh32[l]) << 4
    #   out[l+96] = hi4(ql64[l+32]) | bits6-7(qh32[l]) << 4
    # minus 32; the 16 scales apply to consecutive groups of 16 values in order.
    b = _blocks(raw, n, 256, 210)
    nb = b.shape[0]
    ql = b[:, 0:128].reshape(nb, 2, 2, 32)  # [half][first/second 32][l]
    qh = b[:, 128:192].reshape(nb, 2, 1, 32)  # [half][l]
    sc = b[:, 192:208].view(np.int8).astype(np.float32)  # (nb, 16)
    d = _f16(b, 208, 210)
    low = ql & 0x0F  # quarters 0, 1
    high = ql >> 4  # quarters 2, 3
    nib = np.concatenate([low, high], axis=2)  # (nb, 2, 4, 32) quarter k
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    hbits = (qh >> shifts) & 3  # (nb, 2, 4, 32)
    q = (nib | (hbits << 4)).astype(np.float32) - 32.0
    q = q.reshape(nb, 16, 16)
    scale = (d * sc)[:, :, None]
    return (scale * q).reshape(-1)


def _bits32(qh):
    """4 bytes per block -> 32 bits per block (bit j of the little-endian u32 is element j)."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def dequant_q5_0(raw, n):
    # block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; }   value = d * (q - 16),
    # q = nibble (as Q4_0) | bit j of qh << 4
    b = _blocks(raw, n, 32, 22)
    d = _f16(b, 0, 2)
    q = _nibbles32(b[:, 6:22]) | (_bits32(b[:, 2:6]) << 4)
    return (d * (q.astype(np.float32) - 16.0)).reshape(-1)


def dequant_q5_1(raw, n):
    # block_q5_1 { ggml_half d; ggml_half m; uint8_t qh[4]; uint8_t qs[16]; }   value = d * q + m
    b = _blocks(raw, n, 32, 24)
    d = _f16(b, 0, 2)
    m = _f16(b, 2, 4)
    q = _nibbles32(b[:, 8:24]) | (_bits32(b[:, 4:8]) << 4)
    return (d * q.astype(np.float32) + m).reshape(-1)


def _two_bit_planes(qs):
    """block_q2_K / block_q3_K qs[64] -> 256 values of 2 bits: for half n and
    shift j, 32 values are bits 2j..2j+2 of qs[32n:32n+32]."""
    nb = qs.shape[0]
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(nb, 2, 1, 32) >> shifts) & 3).reshape(nb, 256)


def dequant_q2_k(raw, n):
    # block_q2_K { uint8_t scales[16]; uint8_t qs[64]; ggml_half d; ggml_half dmin; }
    # 16 sub-blocks of 16: scale = low nibble, min = high nibble of scales[i];
    # value = (d * scale) * q - (dmin * min)
    b = _blocks(raw, n, 256, 84)
    nb = b.shape[0]
    sc = b[:, 0:16]
    d = _f16(b, 80, 82)
    dmin = _f16(b, 82, 84)
    q = _two_bit_planes(b[:, 16:80]).reshape(nb, 16, 16).astype(np.float32)
    scale = (d * (sc & 0x0F).astype(np.float32))[:, :, None]
    minimum = (dmin * (sc >> 4).astype(np.float32))[:, :, None]
    return (scale * q - minimum).reshape(-1)


def dequant_q3_k(raw, n):
    # block_q3_K { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; ggml_half d; }
    # q = low 2 bits (as Q2_K) - 4 unless the high bit is set; the high bit of
    # value 32k + l (k = 4n + j) is bit k of hmask[l]. Scale i (6 bits): low
    # nibble from byte i % 8 (low nibble if i < 8), top 2 bits from byte
    # 8 + i % 4 at bit 2 * (i // 4). value = (d * (scale - 32)) * q
    b = _blocks(raw, n, 256, 110)
    nb = b.shape[0]
    hmask = b[:, 0:32]
    s = b[:, 96:108]
    d = _f16(b, 108, 110)
    i = np.arange(16)
    low = np.where(i < 8, s[:, i % 8] & 0x0F, s[:, i % 8] >> 4)
    high = (s[:, 8 + i % 4] >> (2 * (i // 4)).astype(np.uint8)) & 3
    scale = (low | (high << 4)).astype(np.float32) - 32.0
    bit = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (nb, 8, 32)
    q = _two_bit_planes(b[:, 32:96]).astype(np.int16) - 4 * (1 - bit.reshape(nb, 256).astype(np.int16))
    step = (d * scale)[:, :, None]
    return (step * q.reshape(nb, 16, 16).astype(np.float32)).reshape(-1)


def _k4_scale_min(s):
    """The 8 six-bit scales and minimums packed in 12 bytes (Q4_K, Q5_K)."""
    nb = s.shape[0]
    sc = np.empty((nb, 8), np.uint8)
    mn = np.empty((nb, 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def dequant_q5_k(raw, n):
    # block_q5_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; }
    # As Q4_K, plus a fifth bit: value 32s + l has bit s of qh[l].
    b = _blocks(raw, n, 256, 176)
    nb = b.shape[0]
    d = _f16(b, 0, 2)
    dmin = _f16(b, 2, 4)
    sc, mn = _k4_scale_min(b[:, 4:16])
    qh = b[:, 16:48]
    qs = b[:, 48:176].reshape(nb, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (nb, 8, 32)
    q = (low | (high << 4)).astype(np.float32)
    scale = (d * sc.astype(np.float32))[:, :, None]
    minimum = (dmin * mn.astype(np.float32))[:, :, None]
    return (scale * q - minimum).reshape(-1)


# kvalues_iq4nl: the 16 levels a 4-bit IQ4 index selects
IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


def dequant_iq4_nl(raw, n):
    # block_iq4_nl { ggml_half d; uint8_t qs[16]; }   value = d * IQ4_LEVELS[index],
    # indices ordered as Q4_0's nibbles
    b = _blocks(raw, n, 32, 18)
    d = _f16(b, 0, 2)
    return (d * IQ4_LEVELS[_nibbles32(b[:, 2:18])]).reshape(-1)


def dequant_iq4_xs(raw, n):
    # block_iq4_xs { ggml_half d; uint16_t scales_h; uint8_t scales_l[4]; uint8_t qs[128]; }
    # 8 sub-blocks of 32, each as IQ4_NL with step d * (scale - 32); scale j's low
    # nibble is nibble j % 2 of scales_l[j // 2], its top 2 bits bits 2j..2j+2 of scales_h.
    b = _blocks(raw, n, 256, 136)
    nb = b.shape[0]
    d = _f16(b, 0, 2)
    scales_h = np.ascontiguousarray(b[:, 2:4]).view("<u2").astype(np.uint32)  # (nb, 1)
    j = np.arange(8)
    low = (b[:, 4 + j // 2] >> (4 * (j % 2)).astype(np.uint8)) & 0x0F
    high = (scales_h >> (2 * j).astype(np.uint32)) & 3
    scale = (low.astype(np.uint32) | (high << 4)).astype(np.float32) - 32.0
    indices = _nibbles32(b[:, 8:136].reshape(nb * 8, 16)).reshape(nb, 8, 32)
    step = (d * scale)[:, :, None]
    return (step * IQ4_LEVELS[indices]).reshape(-1)


DEQUANT = {
    GGML_F32: dequant_f32,
    GGML_F16: dequant_f16,
    GGML_BF16: dequant_bf16,
    GGML_Q8_0: dequant_q8_0,
    GGML_Q4_0: dequant_q4_0,
    GGML_Q4_1: dequant_q4_1,
    GGML_Q5_0: dequant_q5_0,
    GGML_Q5_1: dequant_q5_1,
    GGML_Q2_K: dequant_q2_k,
    GGML_Q3_K: dequant_q3_k,
    GGML_Q4_K: dequant_q4_k,
    GGML_Q5_K: dequant_q5_k,
    GGML_Q6_K: dequant_q6_k,
    GGML_IQ4_NL: dequant_iq4_nl,
    GGML_IQ4_XS: dequant_iq4_xs,
}


def dequantize(raw, ggml_type, n, use_gguf=False):
    """`n` values of type `ggml_type` from the uint8 array `raw`, as float32 1-D."""
    if use_gguf:
        # NOT independent: gguf-py's own dequantizer, for cross-checking only.
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gg_dequant

        qtype = GGMLQuantizationType(ggml_type)
        if qtype == GGMLQuantizationType.F32:
            return raw[: 4 * n].view("<f4").astype(np.float32)
        if qtype == GGMLQuantizationType.F16:
            return raw[: 2 * n].view("<f2").astype(np.float32)
        return gg_dequant(raw, qtype).astype(np.float32).reshape(-1)[:n]
    fn = DEQUANT.get(ggml_type)
    if fn is None:
        raise NotImplementedError(f"tensor type {ggml_type} is not supported")
    return fn(np.ascontiguousarray(raw).reshape(-1), n)


# ---------------------------------------------------------------------------
# GGUF model
# ---------------------------------------------------------------------------


class GGUFModel:
    """Hyperparameters, dequantized weights and the vocabulary of a GGUF file."""

    def __init__(self, path, dtype=np.float32, use_gguf_dequant=False, rope_style=None):
        from gguf import GGUFReader

        t0 = time.time()
        self.path = path
        self.reader = GGUFReader(path)
        self.dtype = dtype
        self.use_gguf_dequant = use_gguf_dequant
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._cache = {}

        arch = self.meta("general.architecture", "llama")
        if arch not in ARCHITECTURES:
            raise ValueError(f"{path}: general.architecture {arch!r} is not one of {sorted(ARCHITECTURES)}")
        self.arch = arch
        a = arch + "."
        self.dim = int(self.meta(a + "embedding_length"))
        self.n_layers = int(self.meta(a + "block_count"))
        self.n_heads = int(self.meta(a + "attention.head_count"))
        self.n_kv_heads = int(self.meta(a + "attention.head_count_kv", self.n_heads))
        self.ffn_dim = int(self.meta(a + "feed_forward_length"))
        self.head_dim = int(self.meta(a + "attention.key_length", self.dim // self.n_heads))
        self.n_rot = int(self.meta(a + "rope.dimension_count", self.head_dim))
        self.rope_theta = float(self.meta(a + "rope.freq_base", 10000.0))
        self.eps = float(self.meta(a + "attention.layer_norm_rms_epsilon", 1e-5))
        self.rope_scale = 1.0
        scaling = self.meta(a + "rope.scaling.type", None)
        if scaling == "linear":
            self.rope_scale = 1.0 / float(self.meta(a + "rope.scaling.factor", 1.0))
        elif scaling not in (None, "none"):
            log(f"warning: rope scaling {scaling!r} is not implemented; ignored")
        # llama.cpp uses NORM (adjacent pairs) RoPE for LLM_ARCH_LLAMA and
        # NEOX (halves) for Qwen2, Qwen3 and Gemma-3, whose q/k rows it does not permute.
        self.rope_style = rope_style or ("norm" if arch == "llama" else "neox")
        # Gemma-3 (as llama.cpp's gemma3 model reads it): the embedding times
        # sqrt(dim), queries times 1/sqrt(head_dim) (1/sqrt(dim/heads) for the
        # 62-layer 27B), and with a sliding window, layer l local unless
        # l % pattern == pattern - 1 (or per a bool array), local layers
        # turning RoPE by freq_base_swa (10000 unless given), unscaled.
        self.embedding_scale = 1.0
        self.attention_scale = 1.0 / math.sqrt(self.head_dim)
        self.windows = [0] * self.n_layers
        self.local_theta = self.rope_theta
        if arch == "gemma3":
            self.embedding_scale = math.sqrt(self.dim)
            if self.n_layers == 62:
                self.attention_scale = 1.0 / math.sqrt(self.dim // self.n_heads)
            window = int(self.meta(a + "attention.sliding_window", 0) or 0)
            if window:
                pattern = self.meta(a + "attention.sliding_window_pattern", 6)
                if isinstance(pattern, (list, tuple)):
                    local = [bool(p) for p in pattern]
                else:
                    pattern = int(pattern)
                    local = [pattern == 0 or (l % pattern) < pattern - 1 for l in range(self.n_layers)]
                self.windows = [window if is_local else 0 for is_local in local]
                self.local_theta = float(self.meta(a + "rope.freq_base_swa", 10000.0))
        if self.n_heads % self.n_kv_heads:
            raise ValueError("head_count is not a multiple of head_count_kv")

        emb = self.tensors["token_embd.weight"]
        self.vocab_size = int(emb.shape[1]) if len(emb.shape) > 1 else None
        self.tied = "output.weight" not in self.tensors

        self.tokens_vocab = self.meta("tokenizer.ggml.tokens", None)
        self.bos_id = self.meta("tokenizer.ggml.bos_token_id", None)
        self.eos_id = self.meta("tokenizer.ggml.eos_token_id", None)
        tok_model = self.meta("tokenizer.ggml.model", None)
        self.tokenizer_model = tok_model
        default_bos = tok_model == "llama"
        self.add_bos = bool(self.meta("tokenizer.ggml.add_bos_token", default_bos))
        self.add_eos = bool(self.meta("tokenizer.ggml.add_eos_token", False))
        self.load_seconds = time.time() - t0

    def meta(self, key, default=KeyError):
        field = self.reader.fields.get(key)
        if field is None:
            if default is KeyError:
                raise KeyError(f"{self.path}: no {key} in the GGUF metadata")
            return default
        value = field.contents()
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", "replace")
        return value

    def describe(self):
        types = {}
        for t in self.reader.tensors:
            name = TYPE_NAMES.get(int(t.tensor_type), str(t.tensor_type))
            types[name] = types.get(name, 0) + 1
        return {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "n_rot": self.n_rot,
            "ffn_dim": self.ffn_dim,
            "vocab": self.vocab_size,
            "rope_theta": self.rope_theta,
            "eps": self.eps,
            "tied": self.tied,
            "add_bos": self.add_bos,
            "tensor_types": types,
        }

    def weight(self, name):
        """The tensor `name` as a numpy array in row-major order: GGUF lists
        dims innermost first, so GGUF shape [in, out] becomes (out, in)."""
        w = self._cache.get(name)
        if w is not None:
            return w
        t = self.tensors.get(name)
        if t is None:
            raise KeyError(f"{self.path}: no tensor {name}")
        shape = tuple(int(x) for x in reversed(list(t.shape)))
        n = int(np.prod(shape))
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        values = dequantize(raw, int(t.tensor_type), n, use_gguf=self.use_gguf_dequant)
        w = np.ascontiguousarray(values.reshape(shape), dtype=self.dtype)
        self._cache[name] = w
        return w

    def load_all(self):
        t0 = time.time()
        names = ["token_embd.weight", "output_norm.weight"]
        names += ["output.weight"] if not self.tied else []
        for i in range(self.n_layers):
            for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                         "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"):
                names.append(f"blk.{i}.{part}.weight")
        if "rope_freqs.weight" in self.tensors:
            names.append("rope_freqs.weight")
        for name in names:
            self.weight(name)
        return time.time() - t0


# ---------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------


# The architectures the reference computes: Llama, and Qwen2's q/k/v biases
# and Qwen3's per-head RMSNorm of q and k (before RoPE) on top of it; Gemma-3
# adds to Qwen3's norms a scaled embedding, GELU (tanh) gate, norms of the
# attention's and FFN's outputs, a query scale and sliding-window layers.
ARCHITECTURES = {"llama", "qwen2", "qwen3", "gemma3"}


def rms_norm(x, w, eps):
    """x / sqrt(mean(x^2) + eps) * w, in float64."""
    x = x.astype(np.float64, copy=False)
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * w.astype(np.float64)


def rope_tables(model, positions, local=False):
    """cos/sin of shape (T, n_rot/2): angle_i = pos * theta^(-2i/n_rot); a
    local (sliding-window) layer's at its own base, with no scaling."""
    half = model.n_rot // 2
    theta = model.local_theta if local else model.rope_theta
    inv_freq = theta ** (-2.0 * np.arange(half, dtype=np.float64) / model.n_rot)
    scale = 1.0 if local else model.rope_scale
    if "rope_freqs.weight" in model.tensors and not local:  # llama3-style per-frequency factors
        inv_freq = inv_freq / model.weight("rope_freqs.weight").astype(np.float64)[:half]
    ang = (np.asarray(positions, np.float64) * scale)[:, None] * inv_freq[None, :]
    return np.cos(ang), np.sin(ang)


def apply_rope(x, cos, sin, n_rot, style):
    """x: (T, heads, head_dim) float64. Rotates the first n_rot dims of each head.
    norm (GGUF/Meta llama): pairs (2i, 2i+1). neox: pairs (i, i + n_rot/2)."""
    out = x.copy()
    c = cos[:, None, :]
    s = sin[:, None, :]
    if style == "norm":
        a = x[..., 0:n_rot:2]
        b = x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * c - b * s
        out[..., 1:n_rot:2] = a * s + b * c
    elif style == "neox":
        h = n_rot // 2
        a = x[..., :h]
        b = x[..., h:n_rot]
        out[..., :h] = a * c - b * s
        out[..., h:n_rot] = a * s + b * c
    else:
        raise ValueError(f"unknown rope style {style}")
    return out


def forward(model, tokens, logit_rows=None, start_pos=0):
    """Logits (float32) for `tokens` processed as one causal sequence starting
    at position `start_pos`. `logit_rows` (slice or index array) limits which
    positions get logits; default all."""
    m = model
    dt = m.dtype
    tokens = np.asarray(tokens, dtype=np.int64)
    T = tokens.shape[0]
    H, KV, hd = m.n_heads, m.n_kv_heads, m.head_dim
    group = H // KV
    emb = m.weight("token_embd.weight")
    if tokens.min() < 0 or tokens.max() >= emb.shape[0]:
        raise ValueError(f"token id out of range 0..{emb.shape[0] - 1}")
    x = emb[tokens].astype(np.float64) * m.embedding_scale  # residual stream, float64

    positions = np.arange(start_pos, start_pos + T)
    tables = {False: rope_tables(m, positions), True: rope_tables(m, positions, local=True)}
    mask = np.triu(np.full((T, T), -np.inf), k=1)  # causal: j > i is masked
    scale = m.attention_scale

    for layer in range(m.n_layers):
        window = m.windows[layer]
        cos, sin = tables[window > 0]
        layer_mask = mask
        if window:  # a token sees itself and the window - 1 before it
            distance = positions[:, None] - positions[None, :]
            layer_mask = np.where(distance >= window, -np.inf, mask)
        w = lambda part: m.weight(f"blk.{layer}.{part}.weight")  # noqa: E731
        # --- attention ---
        h = rms_norm(x, w("attn_norm"), m.eps).astype(dt)
        q = (h @ w("attn_q").T).astype(np.float64)
        k = (h @ w("attn_k").T).astype(np.float64)
        v = (h @ w("attn_v").T).astype(np.float64)
        if m.arch == "qwen2":  # q/k/v biases
            q = q + m.weight(f"blk.{layer}.attn_q.bias").astype(np.float64)
            k = k + m.weight(f"blk.{layer}.attn_k.bias").astype(np.float64)
            v = v + m.weight(f"blk.{layer}.attn_v.bias").astype(np.float64)
        q = q.reshape(T, H, hd)
        k = k.reshape(T, KV, hd)
        v = v.reshape(T, KV, hd)
        if m.arch in ("qwen3", "gemma3"):  # RMSNorm of each head, before RoPE
            q = rms_norm(q, w("attn_q_norm"), m.eps)
            k = rms_norm(k, w("attn_k_norm"), m.eps)
        q = apply_rope(q, cos, sin, m.n_rot, m.rope_style)
        k = apply_rope(k, cos, sin, m.n_rot, m.rope_style)
        # query head h uses kv head h // group
        qg = q.transpose(1, 0, 2).reshape(KV, group, T, hd)
        kt = k.transpose(1, 2, 0)[:, None]  # (KV, 1, hd, T)
        vv = v.transpose(1, 0, 2)[:, None]  # (KV, 1, T, hd)
        scores = (qg @ kt) * scale + layer_mask  # (KV, group, T, T)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        att = (p @ vv).reshape(H, T, hd).transpose(1, 0, 2).reshape(T, H * hd)
        out = (att.astype(dt) @ w("attn_output").T).astype(np.float64)
        if m.arch == "gemma3":  # the attention's output normalized before the residual
            out = rms_norm(out, w("post_attention_norm"), m.eps)
        x = x + out
        # --- SwiGLU (GeGLU for Gemma) feed-forward ---
        h = rms_norm(x, w("ffn_norm"), m.eps).astype(dt)
        gate = (h @ w("ffn_gate").T).astype(np.float64)
        up = (h @ w("ffn_up").T).astype(np.float64)
        if m.arch == "gemma3":  # GELU, tanh approximation
            act = 0.5 * gate * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3))) * up
        else:
            with np.errstate(over="ignore"):  # exp overflow -> inf -> silu = -0, correct
                act = gate / (1.0 + np.exp(-gate)) * up  # silu(gate) * up
        out = (act.astype(dt) @ w("ffn_down").T).astype(np.float64)
        if m.arch == "gemma3":
            out = rms_norm(out, w("post_ffw_norm"), m.eps)
        x = x + out

    if logit_rows is not None:
        x = x[logit_rows]
    h = rms_norm(x, m.weight("output_norm.weight"), m.eps).astype(dt)
    out_w = m.weight("token_embd.weight" if m.tied else "output.weight")
    return (h @ out_w.T).astype(np.float32)


def log_softmax64(logits):
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------------------
# Tokenizer (byte-level BPE via Hugging Face `tokenizers`, built from the GGUF)
# ---------------------------------------------------------------------------


def build_tokenizer(model, parse_special=False):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = model.tokenizer_model
    if kind != "gpt2":
        raise SystemExit(
            f"tokenizer.ggml.model is {kind!r}: only byte-level BPE ('gpt2') text is supported; "
            "use --tokens/--tokens-file with ids from elsewhere"
        )
    tokens = model.meta("tokenizer.ggml.tokens")
    types = model.meta("tokenizer.ggml.token_type", None)
    merges = [tuple(x.split(" ", 1)) for x in model.meta("tokenizer.ggml.merges")]
    vocab = {text: i for i, text in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    pre = model.meta("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        if pre not in ("default", "gpt2", "gpt-2"):
            log(f"warning: pre-tokenizer {pre!r} not implemented; using plain GPT-2 ByteLevel")
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    if types is not None:
        control = [AddedToken(tokens[i], special=True, normalized=False)
                   for i, t in enumerate(types) if t == 3]  # CONTROL
        tok.add_special_tokens(control)
    # llama.cpp tokenizes perplexity text with parse_special=false:
    # "<|im_start|>" in the text is ordinary text, not the control token.
    tok.encode_special_tokens = not parse_special
    return tok


def encode_text(model, text, add_bos, parse_special=False):
    ids = build_tokenizer(model, parse_special).encode(text, add_special_tokens=False).ids
    if add_bos:
        if model.bos_id is None:
            raise SystemExit("model adds BOS but has no tokenizer.ggml.bos_token_id")
        ids = [int(model.bos_id)] + ids
    return ids


def read_text_llama_cpp(path):
    """The file as llama.cpp's `-f` reads it: bytes as-is, one trailing '\\n' removed."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8")
    if text.endswith("\n"):
        text = text[:-1]
    return text


def parse_ids(s):
    return [int(x) for x in s.replace(",", " ").split()]


# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------


def open_model(args):
    dtype = np.float64 if getattr(args, "f64", False) else np.float32
    model = GGUFModel(args.gguf, dtype=dtype, use_gguf_dequant=args.gguf_dequant,
                      rope_style=args.rope)
    secs = model.load_all()
    log(f"loaded {args.gguf}: {json.dumps(model.describe())} (dequant {secs:.1f}s)")
    return model


def cmd_logits(args):
    model = open_model(args)
    tokens = parse_ids(args.tokens)
    if not tokens:
        raise SystemExit("no tokens")
    t0 = time.time()
    rows = None if args.all else slice(len(tokens) - 1, len(tokens))
    logits = forward(model, tokens, logit_rows=rows)
    secs = time.time() - t0
    logits = np.ascontiguousarray(logits, dtype="<f4")
    with open(args.out, "wb") as f:
        f.write(logits.tobytes())
    info = {
        "rows": int(logits.shape[0]),
        "vocab": int(logits.shape[1]),
        "shape": list(logits.shape),
        "n_tokens": len(tokens),
        "positions": list(range(len(tokens))) if args.all else [len(tokens) - 1],
        "argmax": [int(i) for i in logits.argmax(axis=-1)],
        "dtype": "f32le",
        "out": args.out,
        "seconds": round(secs, 3),
    }
    print(json.dumps(info))


def cmd_greedy(args):
    model = open_model(args)
    if args.tokens is not None:
        tokens = parse_ids(args.tokens)
    elif args.prompt is not None:
        tokens = encode_text(model, args.prompt, model.add_bos, args.parse_special)
    else:
        raise SystemExit("give --tokens or --prompt")
    prompt = list(tokens)
    out = []
    t0 = time.time()
    for _ in range(args.n):
        # full recompute each step: simple and obviously right
        logits = forward(model, prompt + out, logit_rows=slice(-1, None))[0]
        nxt = int(np.argmax(logits))
        out.append(nxt)
        if args.stop_eos and model.eos_id is not None and nxt == int(model.eos_id):
            break
    secs = time.time() - t0
    result = {"tokens": out, "prompt_tokens": prompt, "seconds": round(secs, 3)}
    if model.tokenizer_model == "gpt2":
        try:
            tok = build_tokenizer(model)
            result["prompt_text"] = tok.decode(prompt, skip_special_tokens=False)
            result["text"] = tok.decode(out, skip_special_tokens=False)
        except Exception as e:  # decoding is a convenience only
            log(f"warning: could not decode: {e}")
    print(json.dumps(result))


def cmd_tokenize(args):
    model = GGUFModel(args.gguf)
    if args.text is not None:
        text = read_text_llama_cpp(args.text)
    elif args.prompt is not None:
        text = args.prompt
    else:
        raise SystemExit("give --text or --prompt")
    add_bos = model.add_bos if args.bos is None else args.bos
    ids = encode_text(model, text, add_bos, args.parse_special)
    if args.out:
        with open(args.out, "w") as f:
            f.write(" ".join(map(str, ids)) + "\n")
        print(json.dumps({"tokens": len(ids), "add_bos": add_bos, "out": args.out}))
    else:
        print(json.dumps({"tokens": ids, "add_bos": add_bos}))


def cmd_perplexity(args):
    model = open_model(args)
    n_ctx = args.ctx
    if args.tokens_file is not None:
        with open(args.tokens_file) as f:
            tokens = parse_ids(f.read())
        source = args.tokens_file
    elif args.text is not None:
        t0 = time.time()
        tokens = encode_text(model, read_text_llama_cpp(args.text), model.add_bos)
        log(f"tokenized {args.text}: {len(tokens)} tokens in {time.time() - t0:.2f}s")
        source = args.text
    else:
        raise SystemExit("give --text or --tokens-file")
    if len(tokens) < 2 * n_ctx:
        log(f"warning: {len(tokens)} tokens < 2*ctx; llama-perplexity would refuse this")
    n_chunk = len(tokens) // n_ctx
    if args.max_chunks is not None and args.max_chunks >= 0:
        n_chunk = min(n_chunk, args.max_chunks)
    if n_chunk == 0:
        raise SystemExit(f"need at least {n_ctx} tokens, have {len(tokens)}")
    first = n_ctx // 2
    add_bos = model.add_bos
    log(f"perplexity over {n_chunk} chunks of {n_ctx} (first scored logit {first}, add_bos={add_bos})")

    nll = 0.0
    nll2 = 0.0
    count = 0
    chunk_nll = []
    t_start = time.time()
    for i in range(n_chunk):
        t0 = time.time()
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if add_bos:
            chunk[0] = int(model.bos_id)  # llama.cpp replaces the first token by BOS
        # logits at positions first .. n_ctx-2 predict tokens first+1 .. n_ctx-1
        logits = forward(model, chunk, logit_rows=slice(first, n_ctx - 1))
        target = np.asarray(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx], dtype=np.int64)
        lp = log_softmax64(logits)[np.arange(len(target)), target]
        c_nll = float(-lp.sum())
        nll += c_nll
        nll2 += float((lp * lp).sum())
        count += len(target)
        chunk_nll.append(c_nll / len(target))
        log(f"[{i + 1}/{n_chunk}] chunk ppl {math.exp(c_nll / len(target)):.4f} "
            f"running ppl {math.exp(nll / count):.4f} ({time.time() - t0:.2f}s)")
    secs = time.time() - t_start
    mean = nll / count
    ppl = math.exp(mean)
    var = nll2 / count - mean * mean
    err = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else None
    result = {
        "perplexity": ppl,
        "ppl_error": err,
        "mean_nll": mean,
        "tokens": len(tokens),
        "chunks": n_chunk,
        "ctx": n_ctx,
        "scored": count,
        "add_bos": add_bos,
        "source": source,
        "chunk_ppl": [math.exp(x) for x in chunk_nll],
        "seconds": round(secs, 2),
        "seconds_per_chunk": round(secs / n_chunk, 3),
    }
    print(json.dumps(result))
    print(f"perplexity: {ppl:.6f}")


# ---------------------------------------------------------------------------
# Self-check
# ---------------------------------------------------------------------------

BLOCK_INFO = {  # type: (elements, bytes, byte offsets of f16 fields)
    GGML_Q8_0: (32, 34, [0]),
    GGML_Q4_0: (32, 18, [0]),
    GGML_Q4_1: (32, 20, [0, 2]),
    GGML_Q5_0: (32, 22, [0]),
    GGML_Q5_1: (32, 24, [0, 2]),
    GGML_Q2_K: (256, 84, [80, 82]),
    GGML_Q3_K: (256, 110, [108]),
    GGML_Q4_K: (256, 144, [0, 2]),
    GGML_Q5_K: (256, 176, [0, 2]),
    GGML_Q6_K: (256, 210, [208]),
    GGML_IQ4_NL: (32, 18, [0]),
    GGML_IQ4_XS: (256, 136, [0]),
}


def random_blocks(ggml_type, nblocks, rng, scale=0.05):
    """Random block bytes with finite, modest f16 scale fields."""
    elems, size, f16_offsets = BLOCK_INFO[ggml_type]
    raw = rng.integers(0, 256, size=(nblocks, size), dtype=np.uint8)
    for off in f16_offsets:
        vals = (rng.standard_normal(nblocks) * scale).astype("<f2")
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(nblocks, 2)
    return raw.reshape(-1), nblocks * elems


def selfcheck_dequant(rng):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gg_dequant

    ok = True
    for ggml_type in BLOCK_INFO:
        raw, n = random_blocks(ggml_type, 64, rng)
        ours = dequantize(raw, ggml_type, n)
        ref = gg_dequant(raw, GGMLQuantizationType(ggml_type)).astype(np.float32).reshape(-1)
        # The same float operations in the same order: equal bit for bit.
        good = ours.shape == ref.shape and bool(np.array_equal(ours.view(np.uint32), ref.view(np.uint32)))
        diff = float(np.max(np.abs(ours - ref))) if ours.shape == ref.shape else float("inf")
        ok &= good
        log(f"dequant {TYPE_NAMES[ggml_type]:6s} random blocks: max |ours - gguf| = {diff:.3g} "
            f"{'bit-exact' if good else 'MISMATCH'}")
    # F16 / BF16 / F32
    x = rng.standard_normal(256).astype(np.float32)
    ok &= bool(np.array_equal(dequant_f32(x.view(np.uint8), 256), x))
    h = x.astype("<f2")
    ok &= bool(np.array_equal(dequant_f16(h.view(np.uint8), 256), h.astype(np.float32)))
    bf = (x.view(np.uint32) >> 16).astype("<u2")
    expect = (bf.astype(np.uint32) << 16).view(np.float32)
    ok &= bool(np.array_equal(dequant_bf16(bf.view(np.uint8), 256), expect))
    # Round trip through gguf's quantizer for the simple types
    from gguf.quants import quantize as gg_quant

    for ggml_type in (GGML_Q8_0, GGML_Q4_0, GGML_Q4_1):
        w = rng.standard_normal((8, 64)).astype(np.float32)
        q = gg_quant(w, GGMLQuantizationType(ggml_type))
        ours = dequantize(q.reshape(-1), ggml_type, w.size).reshape(w.shape)
        err = float(np.max(np.abs(ours - w)))
        bound = {GGML_Q8_0: 0.05, GGML_Q4_0: 0.6, GGML_Q4_1: 0.6}[ggml_type]
        good = err < bound
        ok &= good
        log(f"quantize->dequant {TYPE_NAMES[ggml_type]:5s} max error {err:.3g} {'ok' if good else 'BAD'}")
    return ok


def write_tiny_gguf(path, rng, weight_type=GGML_F32, tied=True, dim=64, n_layers=2,
                    n_heads=4, n_kv_heads=2, ffn=96, vocab=64):
    """A tiny random llama GGUF (for self-tests only)."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(n_layers)
    w.add_context_length(128)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(dim // n_heads)
    hd = dim // n_heads
    dense = {}

    def add(name, shape, values, qtype):
        values = values.astype(np.float32)
        if qtype == GGML_F32 or len(shape) == 1:
            w.add_tensor(name, values)
            dense[name] = values
        else:
            gq = gguf.GGMLQuantizationType(qtype)
            if qtype in (GGML_Q4_K, GGML_Q6_K):  # no quantizer in gguf-py: random blocks
                raw, n = random_blocks(qtype, values.size // 256, rng, scale=0.003)
                data = raw.reshape(shape[0], -1)
            elif qtype == GGML_F16:
                data = values.astype(np.float16)
            else:
                data = gguf.quants.quantize(values, gq)
            w.add_tensor(name, data, raw_dtype=gq if qtype != GGML_F16 else None)
            dense[name] = None

    def mat(out, inp):
        return rng.standard_normal((out, inp)) / math.sqrt(inp) * 1.7

    add("token_embd.weight", (vocab, dim), rng.standard_normal((vocab, dim)), weight_type)
    for i in range(n_layers):
        add(f"blk.{i}.attn_norm.weight", (dim,), 1 + 0.2 * rng.standard_normal(dim), GGML_F32)
        add(f"blk.{i}.attn_q.weight", (dim, dim), mat(dim, dim), weight_type)
        add(f"blk.{i}.attn_k.weight", (n_kv_heads * hd, dim), mat(n_kv_heads * hd, dim), weight_type)
        add(f"blk.{i}.attn_v.weight", (n_kv_heads * hd, dim), mat(n_kv_heads * hd, dim), weight_type)
        add(f"blk.{i}.attn_output.weight", (dim, dim), mat(dim, dim), weight_type)
        add(f"blk.{i}.ffn_norm.weight", (dim,), 1 + 0.2 * rng.standard_normal(dim), GGML_F32)
        add(f"blk.{i}.ffn_gate.weight", (ffn, dim), mat(ffn, dim), weight_type)
        add(f"blk.{i}.ffn_up.weight", (ffn, dim), mat(ffn, dim), weight_type)
        add(f"blk.{i}.ffn_down.weight", (dim, ffn), mat(dim, ffn), weight_type)
    add("output_norm.weight", (dim,), 1 + 0.2 * rng.standard_normal(dim), GGML_F32)
    if not tied:
        add("output.weight", (vocab, dim), mat(vocab, dim), weight_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dense


def naive_forward(model, tokens):
    """Token-by-token loop with an explicit KV cache, written separately from
    forward(), to check the batched/masked implementation."""
    m = model
    H, KV, hd = m.n_heads, m.n_kv_heads, m.head_dim
    group = H // KV
    W = lambda n: m.weight(n).astype(np.float64)  # noqa: E731
    keys = [[] for _ in range(m.n_layers)]
    vals = [[] for _ in range(m.n_layers)]
    out = []
    for pos, tok in enumerate(tokens):
        x = W("token_embd.weight")[tok].copy()
        for L in range(m.n_layers):
            p = f"blk.{L}."
            h = x / math.sqrt(np.mean(x * x) + m.eps) * W(p + "attn_norm.weight")
            q = (W(p + "attn_q.weight") @ h).reshape(H, hd)
            k = (W(p + "attn_k.weight") @ h).reshape(KV, hd)
            v = (W(p + "attn_v.weight") @ h).reshape(KV, hd)
            for vec in (q, k):
                for head in range(vec.shape[0]):
                    for i in range(m.n_rot // 2):
                        ang = pos * m.rope_theta ** (-2.0 * i / m.n_rot)
                        a, b = vec[head, 2 * i], vec[head, 2 * i + 1]
                        vec[head, 2 * i] = a * math.cos(ang) - b * math.sin(ang)
                        vec[head, 2 * i + 1] = a * math.sin(ang) + b * math.cos(ang)
            keys[L].append(k)
            vals[L].append(v)
            att = np.zeros((H, hd))
            for head in range(H):
                kvh = head // group
                s = np.array([q[head] @ kk[kvh] for kk in keys[L]]) / math.sqrt(hd)
                pr = np.exp(s - s.max())
                pr /= pr.sum()
                att[head] = sum(pr[j] * vals[L][j][kvh] for j in range(len(pr)))
            x = x + W(p + "attn_output.weight") @ att.reshape(-1)
            h = x / math.sqrt(np.mean(x * x) + m.eps) * W(p + "ffn_norm.weight")
            g = W(p + "ffn_gate.weight") @ h
            u = W(p + "ffn_up.weight") @ h
            with np.errstate(over="ignore"):
                x = x + W(p + "ffn_down.weight") @ (g / (1 + np.exp(-g)) * u)
        h = x / math.sqrt(np.mean(x * x) + m.eps) * W("output_norm.weight")
        ow = W("token_embd.weight" if m.tied else "output.weight")
        out.append(ow @ h)
    return np.array(out)


def selfcheck_model(rng, tmpdir):
    ok = True
    cases = [(GGML_F32, True), (GGML_F32, False), (GGML_F16, True), (GGML_Q8_0, False),
             (GGML_Q4_0, True), (GGML_Q4_1, False), (GGML_Q4_K, True), (GGML_Q6_K, False)]
    for qtype, tied in cases:
        path = os.path.join(tmpdir, f"tiny_{TYPE_NAMES[qtype]}_{'tied' if tied else 'untied'}.gguf")
        write_tiny_gguf(path, rng, weight_type=qtype, tied=tied,
                        dim=256 if qtype in (GGML_Q4_K, GGML_Q6_K) else 64,
                        ffn=512 if qtype in (GGML_Q4_K, GGML_Q6_K) else 96,
                        vocab=256 if qtype in (GGML_Q4_K, GGML_Q6_K) else 64)
        m32 = GGUFModel(path)
        mg = GGUFModel(path, use_gguf_dequant=True)
        tokens = rng.integers(0, m32.weight("token_embd.weight").shape[0], size=9).tolist()
        a = forward(m32, tokens)
        b = forward(mg, tokens)
        prefix = forward(m32, tokens[:5])
        naive = naive_forward(m32, tokens)
        d_gguf = float(np.max(np.abs(a - b)))
        d_prefix = float(np.max(np.abs(a[:5] - prefix)))
        d_naive = float(np.max(np.abs(a - naive)))
        scale = float(np.max(np.abs(naive)))
        good = d_gguf < 1e-6 * scale and d_prefix < 1e-4 * scale and d_naive < 1e-4 * scale
        ok &= good
        log(f"tiny {TYPE_NAMES[qtype]:5s} {'tied  ' if tied else 'untied'}: vs gguf-dequant {d_gguf:.2g}, "
            f"causal prefix {d_prefix:.2g}, vs naive f64 loop {d_naive:.2g} (|logit| max {scale:.3g}) "
            f"{'ok' if good else 'MISMATCH'}")
    return ok


def selfcheck_real(path):
    """Our dequantization of the first tensor of each type in a GGUF vs gguf-py's, bit for bit."""
    from gguf import GGUFReader
    from gguf.quants import dequantize as gg_dequant

    ok = True
    reader = GGUFReader(path)
    seen = set()
    for t in reader.tensors:
        tt = int(t.tensor_type)
        if tt in seen or tt not in DEQUANT:
            continue
        seen.add(tt)
        n = int(np.prod([int(x) for x in t.shape]))
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        ours = dequantize(raw, tt, n)
        ref = np.asarray(gg_dequant(np.asarray(t.data), t.tensor_type), dtype=np.float32).reshape(-1)
        good = ours.shape == ref.shape and bool(np.array_equal(ours.view(np.uint32), ref.view(np.uint32)))
        diff = float(np.max(np.abs(ours - ref))) if ours.shape == ref.shape else float("inf")
        ok &= good
        log(f"{path}: {t.name} ({TYPE_NAMES[tt]}, {n} values): max |ours - gguf| = {diff:.3g} "
            f"{'bit-exact' if good else 'MISMATCH'}")
    return ok


def cmd_selfcheck(args):
    import tempfile

    rng = np.random.default_rng(1234)
    ok = selfcheck_dequant(rng)
    with tempfile.TemporaryDirectory() as tmp:
        ok &= selfcheck_model(rng, tmp)
    if args.gguf:
        ok &= selfcheck_real(args.gguf)
    print(json.dumps({"selfcheck": "ok" if ok else "FAILED"}))
    if not ok:
        sys.exit(1)


# ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, needs_model=True):
        p.add_argument("--gguf", required=needs_model, help="model file")
        p.add_argument("--gguf-dequant", action="store_true",
                       help="use gguf.quants.dequantize instead of our own (NOT independent)")
        p.add_argument("--f64", action="store_true", help="float64 weight matmuls too")
        p.add_argument("--rope", choices=["norm", "neox"], default=None,
                       help="override RoPE pairing (default norm = adjacent pairs, as llama.cpp for llama)")

    p = sub.add_parser("logits", help="logits of the last (or every) position")
    common(p)
    p.add_argument("--tokens", required=True, help='ids, e.g. "1 2 3"')
    p.add_argument("--out", required=True, help="raw little-endian f32 output, row per position")
    p.add_argument("--all", action="store_true", help="write every position's logits")
    p.set_defaults(fn=cmd_logits)

    p = sub.add_parser("greedy", help="greedy generation")
    common(p)
    p.add_argument("--tokens", help='prompt ids, e.g. "1 2 3" (used as given)')
    p.add_argument("--prompt", help="prompt text (tokenized here; BOS added if the model adds BOS)")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--stop-eos", action="store_true", help="stop at the EOS token")
    p.add_argument("--parse-special", action="store_true",
                   help="treat control-token text like <|im_start|> in --prompt as the control token")
    p.set_defaults(fn=cmd_greedy)

    p = sub.add_parser("perplexity", help="llama-perplexity method")
    common(p)
    p.add_argument("--text", help="text file (read like llama.cpp -f: one trailing newline dropped)")
    p.add_argument("--tokens-file", help="whitespace-separated ids, BOS included if wanted")
    p.add_argument("--ctx", type=int, required=True)
    p.add_argument("--max-chunks", type=int, default=None)
    p.set_defaults(fn=cmd_perplexity)

    p = sub.add_parser("tokenize", help="tokenize text the way `perplexity --text` does")
    p.add_argument("--gguf", required=True)
    p.add_argument("--text", help="text file (one trailing newline dropped)")
    p.add_argument("--prompt", help="text")
    p.add_argument("--out", help="write whitespace-separated ids here (for --tokens-file)")
    p.add_argument("--parse-special", action="store_true",
                   help="treat control-token text like <|im_start|> as the control token")
    bos = p.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="bos", action="store_const", const=True, default=None,
                     help="force a BOS at the start")
    bos.add_argument("--no-bos", dest="bos", action="store_const", const=False)
    p.set_defaults(fn=cmd_tokenize)

    p = sub.add_parser("selfcheck", help="check dequantization and the forward pass")
    p.add_argument("--gguf", help="also compare dequantization of this file's tensors with gguf-py")
    p.set_defaults(fn=cmd_selfcheck)

    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
