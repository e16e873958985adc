//! Attention over the KV cache for one group of query heads that share a
//! key/value head (grouped-query attention): the scores of every query
//! against every cached key, and the score-weighted sum of the cached values.
//!
//! Both loop over the cache once for the whole group: on the NEON path a
//! piece of 64 query (or output) values stays in registers while the keys
//! (values) stream past, so each cached vector is loaded once a head and
//! nothing but the result is stored. The softmax between the two is
//! [`super::ops`]'s.
//!
//! Shapes: `queries` and `out` are `heads × head_dim`, consecutive; position
//! `t`'s key (value) is `cache[t·stride .. t·stride + head_dim]`; `scores`
//! are `heads × positions`, head-major.
//!
//! The `*_q8` and `*_q4` kernels read the quantized KV cache of
//! [`crate::kv`] directly (KIVI's layout, asymmetric min/max codes):
//!
//! - keys come in groups of [`KEY_GROUP`] tokens, each channel of a group
//!   with its own f16 scale and minimum (`key = min + scale·code`), stored
//!   channel-major: `codes[(g·head_dim + c)·bytes + …]` holds channel `c` of
//!   the group's 32 tokens (32 bytes at q8; 16 at q4, byte `j` holding token
//!   `j` in its low nibble and token `j + 16` in its high one);
//! - values are per token, the whole head sharing one f16 scale and minimum:
//!   `codes[t·bytes + …]` holds token `t`'s `head_dim` channels (q4: in each
//!   run of 32 channels byte `j` holds channel `j` low, `j + 16` high).
//!
//! A score is then `Σ_c (q_c·scale_c)·code_ct + Σ_c q_c·min_c` and a value
//! sum `Σ_t (w_t·scale_t)·code_t + Σ_t w_t·min_t`: the codes are widened to
//! f32 and multiplied in, never dequantized into a buffer. `scores` rows of
//! the quantized kernels are `row` apart (the caller's table also holds the
//! scores of the full-precision window after them).
//!
//! The `*_f16` kernels read the f16 cache ([`CachedVectors`] of `f16`, the
//! f32 kernels' layout): each key or value is widened to f32 as it is read
//! (`fcvtl` on NEON, part of ARMv8.0: no fp16 arithmetic is needed) and the
//! sums are f32, so the only error against the f32 cache is the rounding of
//! what was stored. On NEON a key (value) is widened once for up to
//! [`HALF_HEADS`] query heads, whose sums stay in registers; a prompt
//! batch's `causal_f16` is the f32 cache's causal tile, widening as it loads.
//! `round_to_f16` is what writes a position into that cache: f32 to f16, rounding to
//! nearest, ties to even.
//!
//! `causal` is a prompt's attention over the f32 cache for one KV head:
//! every query head of every token of a batch that shares it ([`Causal`]),
//! token `i` seeing positions `0 ..= first + i` (with a sliding window, only
//! the last `window` of them). The NEON version takes the
//! queries [`TILE_ROWS`] at a time (rows token-major, head-minor, across
//! token boundaries) and streams each cached key and value past the whole
//! tile once; the reference runs each query through `scores`, softmax and
//! `values`.

use half::f16;

/// Tokens whose keys share a scale and minimum per channel.
pub const KEY_GROUP: usize = 32;
/// Channels the quantized kernels handle together; `head_dim` must be a multiple.
pub const CHANNEL_RUN: usize = 32;

/// Query heads the NEON `*_f16` kernels take together: each cached vector is
/// widened once for all of them; their sums fill 16 of the 32 registers.
pub const HALF_HEADS: usize = 4;

/// Query rows a tile of the NEON `causal` kernel holds: three vectors of four
/// lanes (four tokens of SmolLM2's three heads a KV head). Measured on
/// SmolLM2-135M q4, cortex-a76, prompts of 64 → 192 tokens, the kernel's
/// guest instructions per prompt token: 1.70 M at 12 rows, 1.76 M at 8,
/// 2.01 M at 4 (the per-token kernels it replaces: 2.77 M).
pub const TILE_ROWS: usize = 12;

/// The shape of one [`causal`](scalar::causal) call: `tokens` consecutive
/// tokens at positions `first ..`, each with `heads` query heads of
/// `head_dim` values that share one KV head; token `i`'s head `h` is at
/// `i·query_stride + h·head_dim` of the queries (and of the output), and
/// sees the cached positions `0 ..= first + i` (with a `window`, only the
/// last `window` of them: from `first + i + 1 − window`), position `t` at
/// `t·stride` of the keys (and of the values).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Causal {
    /// Tokens of the batch.
    pub tokens: usize,
    /// Query heads a token has for this KV head.
    pub heads: usize,
    /// Values of a head.
    pub head_dim: usize,
    /// Position of the batch's first token.
    pub first: usize,
    /// Values from one token's queries (outputs) to the next's.
    pub query_stride: usize,
    /// Values from one cached position to the next (`kv_dim`).
    pub stride: usize,
    /// The factor on every score (`1/√head_dim`).
    pub scale: f32,
    /// Positions a token sees, itself included (a sliding-window layer's
    /// window); 0: every position from 0.
    pub window: usize,
}

impl Causal {
    /// The first position token `token` of the batch sees.
    pub fn lowest_seen(&self, token: usize) -> usize {
        match self.window {
            0 => 0,
            window => (self.first + token + 1).saturating_sub(window),
        }
    }

    /// Scratch values any table's `causal` needs for batches that end at or
    /// before position `positions` with heads of `head_dim` (a tile's scores,
    /// `TILE_ROWS × positions`, and its queries transposed, `TILE_ROWS ×
    /// head_dim` rounded up to 4); `None` if the size overflows.
    pub fn scratch_len(positions: usize, head_dim: usize) -> Option<usize> {
        positions.checked_add(head_dim.div_ceil(4).checked_mul(4)?)?.checked_mul(TILE_ROWS)
    }
}

/// `positions` cached vectors of one KV head in the f32 cache (or, with
/// `T = f16`, the f16 cache), keys or values: position `t`'s `head_dim`
/// values at `data[t·stride ..]`.
#[derive(Debug, Clone, Copy)]
pub struct CachedVectors<'a, T = f32> {
    /// The head's part of the cache from position 0 on (at least
    /// `(positions − 1)·stride + head_dim` values).
    pub data: &'a [T],
    /// Values from one position to the next (`kv_dim`; less for pruned keys).
    pub stride: usize,
    /// Positions to read.
    pub positions: usize,
}

/// One KV head's quantized keys, as the `*_q8`/`*_q4` score kernels read
/// them: `groups` groups of [`KEY_GROUP`] tokens, each channel of a group
/// with its codes, f16 scale and f16 minimum (layout in the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct QuantizedKeys<'a> {
    /// Codes, channel-major within a group: `groups × head_dim` runs of `KEY_GROUP·bits/8` bytes.
    pub codes: &'a [u8],
    /// A scale a channel of a group (`groups × head_dim`).
    pub scales: &'a [f16],
    /// A minimum a channel of a group (`groups × head_dim`).
    pub mins: &'a [f16],
    /// Groups of [`KEY_GROUP`] tokens.
    pub groups: usize,
}

/// One KV head's first `positions` quantized values, as the `*_q8`/`*_q4`
/// value kernels read them: per token, `head_dim` codes and one f16 scale
/// and minimum for the whole head.
#[derive(Debug, Clone, Copy)]
pub struct QuantizedValues<'a> {
    /// Codes, token-major: `positions` runs of `head_dim·bits/8` bytes.
    pub codes: &'a [u8],
    /// A scale a token (`positions`).
    pub scales: &'a [f16],
    /// A minimum a token (`positions`).
    pub mins: &'a [f16],
    /// Tokens to read.
    pub positions: usize,
}

/// Checks the shapes every `causal` caller must give (so the unchecked loads are in bounds).
fn check_causal(shape: &Causal, queries: usize, keys: usize, values: usize, scratch: usize, out: usize) {
    let Causal { tokens, heads, head_dim, first, query_stride, stride, .. } = *shape;
    let group = heads.checked_mul(head_dim);
    let batch = group.and_then(|g| tokens.checked_sub(1)?.checked_mul(query_stride)?.checked_add(g));
    let cache = (first.checked_add(tokens).and_then(|p| p.checked_sub(1)))
        .and_then(|last| last.checked_mul(stride)?.checked_add(head_dim));
    let needed = first.checked_add(tokens).and_then(|p| Causal::scratch_len(p, head_dim));
    // Positions fit 32 bits: the NEON kernel's mask compares them in 32-bit lanes.
    let positions = first.checked_add(tokens).is_some_and(|p| p <= u32::MAX as usize);
    assert!(
        positions
            && heads > 0
            && head_dim > 0
            && group.is_some_and(|g| query_stride >= g)
            && stride >= head_dim
            && batch.is_some_and(|b| queries >= b && out >= b)
            && cache.is_some_and(|c| keys >= c && values >= c)
            && needed.is_some_and(|n| scratch >= n),
        "causal attention shapes disagree: {shape:?} with {queries} query values, {out} outputs, {keys} keys, \
         {values} values and {scratch} scratch values"
    );
}

/// Reference implementations.
pub mod scalar {
    use super::{CachedVectors, QuantizedKeys, QuantizedValues, KEY_GROUP};
    use crate::kernels::matmul::scalar::dot_f32;
    use half::f16;

    /// `scores[h·positions + t] = scale · queries[h] · key[t]`.
    pub fn scores(queries: &[f32], head_dim: usize, keys: &CachedVectors, scale: f32, scores: &mut [f32]) {
        let CachedVectors { data: keys, stride, positions } = *keys;
        for (query, row) in queries.chunks_exact(head_dim).zip(scores.chunks_exact_mut(positions)) {
            for (t, score) in row.iter_mut().enumerate() {
                *score = dot_f32(query, &keys[t * stride..t * stride + head_dim]) * scale;
            }
        }
    }

    /// `out[h] = Σₜ weights[h·positions + t] · value[t]`.
    pub fn values(weights: &[f32], values: &CachedVectors, head_dim: usize, out: &mut [f32]) {
        let CachedVectors { data: values, stride, positions } = *values;
        for (head, row) in out.chunks_exact_mut(head_dim).zip(weights.chunks_exact(positions)) {
            head.fill(0.0);
            for (t, &weight) in row.iter().enumerate() {
                for (o, v) in head.iter_mut().zip(&values[t * stride..t * stride + head_dim]) {
                    *o += weight * v;
                }
            }
        }
    }

    /// As [`scores`] over keys stored as f16, each widened to f32 (exactly) before its product.
    pub fn scores_f16(queries: &[f32], head_dim: usize, keys: &CachedVectors<f16>, scale: f32, scores: &mut [f32]) {
        let CachedVectors { data: keys, stride, positions } = *keys;
        for (query, row) in queries.chunks_exact(head_dim).zip(scores.chunks_exact_mut(positions)) {
            for (t, score) in row.iter_mut().enumerate() {
                let key = &keys[t * stride..t * stride + head_dim];
                *score = dot_f32_f16(query, key) * scale;
            }
        }
    }

    /// `a · b` with `b` widened to f32, in eight partial sums as [`dot_f32`]
    /// adds (so that the compiler can vectorize it on the host).
    fn dot_f32_f16(a: &[f32], b: &[f16]) -> f32 {
        let mut partial = [0f32; 8];
        let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y.to_f32_const()).sum();
        for (x, y) in a_chunks.zip(b_chunks) {
            for k in 0..8 {
                partial[k] += x[k] * y[k].to_f32_const();
            }
        }
        partial.iter().sum::<f32>() + tail
    }

    /// As [`values`] over values stored as f16, each widened to f32 (exactly) before its product.
    pub fn values_f16(weights: &[f32], values: &CachedVectors<f16>, head_dim: usize, out: &mut [f32]) {
        let CachedVectors { data: values, stride, positions } = *values;
        for (head, row) in out.chunks_exact_mut(head_dim).zip(weights.chunks_exact(positions)) {
            head.fill(0.0);
            for (t, &weight) in row.iter().enumerate() {
                for (o, v) in head.iter_mut().zip(&values[t * stride..t * stride + head_dim]) {
                    *o += weight * v.to_f32_const();
                }
            }
        }
    }

    /// `out[i] = values[i]` rounded to the nearest f16, ties to even (beyond
    /// ±65504: infinity), as the f16 cache stores a position.
    pub fn round_to_f16(values: &[f32], out: &mut [f16]) {
        assert_eq!(values.len(), out.len(), "rounding {} values to f16 into {} places", values.len(), out.len());
        for (o, &v) in out.iter_mut().zip(values) {
            *o = f16::from_f32(v);
        }
    }

    /// As [`super::Causal`] describes: each query's scores into `scratch`,
    /// [`softmax`](crate::kernels::ops::scalar::softmax), then its weighted
    /// values, a query at a time.
    pub fn causal(
        shape: &super::Causal,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        causal_with(shape, queries, keys, values, scratch, out, scores, self::values);
    }

    /// As [`causal`] over the f16 cache: [`scores_f16`] and [`values_f16`], each
    /// cached value widened to f32 (exactly) before its product.
    pub fn causal_f16(
        shape: &super::Causal,
        queries: &[f32],
        keys: &[f16],
        values: &[f16],
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        causal_with(shape, queries, keys, values, scratch, out, scores_f16, values_f16);
    }

    /// [`causal`] with the per-query kernels of the cache's element type.
    #[allow(clippy::too_many_arguments)]
    fn causal_with<T>(
        shape: &super::Causal,
        queries: &[f32],
        keys: &[T],
        values: &[T],
        scratch: &mut [f32],
        out: &mut [f32],
        scores: fn(&[f32], usize, &CachedVectors<T>, f32, &mut [f32]),
        weighted: fn(&[f32], &CachedVectors<T>, usize, &mut [f32]),
    ) {
        super::check_causal(shape, queries.len(), keys.len(), values.len(), scratch.len(), out.len());
        let head_dim = shape.head_dim;
        for token in 0..shape.tokens {
            // Positions `lowest ..= first + token`, read from the `lowest`th on.
            let lowest = shape.lowest_seen(token);
            let seen = shape.first + token + 1 - lowest;
            let (keys, values) = (&keys[lowest * shape.stride..], &values[lowest * shape.stride..]);
            for head in 0..shape.heads {
                let at = token * shape.query_stride + head * head_dim;
                let row = &mut scratch[..seen];
                let keys = CachedVectors { data: keys, stride: shape.stride, positions: seen };
                scores(&queries[at..at + head_dim], head_dim, &keys, shape.scale, row);
                crate::kernels::ops::scalar::softmax(row);
                let values = CachedVectors { data: values, stride: shape.stride, positions: seen };
                weighted(row, &values, head_dim, &mut out[at..at + head_dim]);
            }
        }
    }

    /// The code `index` of a run of codes at `bits` bits (q4: low nibbles
    /// hold the first 16 of each 32, high nibbles the next 16).
    #[inline]
    pub fn code(codes: &[u8], bits: u32, index: usize) -> f32 {
        if bits == 8 {
            return codes[index] as f32;
        }
        let (run, j) = (index / 32, index % 32);
        let byte = codes[run * 16 + j % 16];
        (if j < 16 { byte & 0xF } else { byte >> 4 }) as f32
    }

    /// `scores[h·row + t] = scale · queries[h] · key[t]` for the `groups ·
    /// KEY_GROUP` quantized keys of one KV head, at `bits` bits (8 or 4).
    pub fn scores_quantized(
        bits: u32,
        queries: &[f32],
        head_dim: usize,
        keys: &QuantizedKeys,
        scale: f32,
        scores: &mut [f32],
        row: usize,
    ) {
        let QuantizedKeys { codes, scales: key_scales, mins: key_mins, groups } = *keys;
        let bytes = KEY_GROUP * bits as usize / 8;
        for (h, query) in queries.chunks_exact(head_dim).enumerate() {
            for g in 0..groups {
                let mut sums = [0f32; KEY_GROUP];
                let mut offset = 0f32;
                for (c, &q) in query.iter().enumerate() {
                    let at = g * head_dim + c;
                    let weight = q * key_scales[at].to_f32();
                    offset += q * key_mins[at].to_f32();
                    let channel = &codes[at * bytes..(at + 1) * bytes];
                    for (t, sum) in sums.iter_mut().enumerate() {
                        *sum += weight * code(channel, bits, t);
                    }
                }
                for (t, sum) in sums.iter().enumerate() {
                    scores[h * row + g * KEY_GROUP + t] = (sum + offset) * scale;
                }
            }
        }
    }

    /// `out[h] = Σₜ weights[h·row + t] · value[t]` over the first
    /// `positions` quantized values of one KV head, at `bits` bits (8 or 4).
    pub fn values_quantized(
        bits: u32,
        weights: &[f32],
        row: usize,
        values: &QuantizedValues,
        head_dim: usize,
        out: &mut [f32],
    ) {
        let QuantizedValues { codes, scales: value_scales, mins: value_mins, positions } = *values;
        let bytes = head_dim * bits as usize / 8;
        for (h, head) in out.chunks_exact_mut(head_dim).enumerate() {
            head.fill(0.0);
            let mut offset = 0f32;
            for t in 0..positions {
                let weight = weights[h * row + t];
                let scaled = weight * value_scales[t].to_f32();
                offset += weight * value_mins[t].to_f32();
                let token = &codes[t * bytes..(t + 1) * bytes];
                for (c, o) in head.iter_mut().enumerate() {
                    *o += scaled * code(token, bits, c);
                }
            }
            for o in head.iter_mut() {
                *o += offset;
            }
        }
    }

    /// [`scores_quantized`] at 8 bits.
    pub fn scores_q8(
        queries: &[f32],
        head_dim: usize,
        keys: &QuantizedKeys,
        scale: f32,
        scores: &mut [f32],
        row: usize,
    ) {
        scores_quantized(8, queries, head_dim, keys, scale, scores, row)
    }

    /// [`scores_quantized`] at 4 bits.
    pub fn scores_q4(
        queries: &[f32],
        head_dim: usize,
        keys: &QuantizedKeys,
        scale: f32,
        scores: &mut [f32],
        row: usize,
    ) {
        scores_quantized(4, queries, head_dim, keys, scale, scores, row)
    }

    /// [`values_quantized`] at 8 bits.
    pub fn values_q8(weights: &[f32], row: usize, values: &QuantizedValues, head_dim: usize, out: &mut [f32]) {
        values_quantized(8, weights, row, values, head_dim, out)
    }

    /// [`values_quantized`] at 4 bits.
    pub fn values_q4(weights: &[f32], row: usize, values: &QuantizedValues, head_dim: usize, out: &mut [f32]) {
        values_quantized(4, weights, row, values, head_dim, out)
    }
}

/// NEON versions (every aarch64 core). The dot products add in another
/// order than the reference; the weighted sums use fused multiply-adds.
#[cfg(target_arch = "aarch64")]
pub mod neon {
    use super::{CachedVectors, QuantizedKeys, QuantizedValues, CHANNEL_RUN, HALF_HEADS, KEY_GROUP, TILE_ROWS};
    use half::f16;
    use std::arch::aarch64::*;

    /// Values of a head held in registers at once (16 vectors).
    const PIECE: usize = 64;

    /// Checks the shapes every caller must give (so the unchecked loads are in bounds).
    fn check(heads_len: usize, head_dim: usize, cache_len: usize, stride: usize, positions: usize, table: usize) {
        assert!(
            head_dim > 0
                && heads_len.is_multiple_of(head_dim)
                && stride >= head_dim
                && positions > 0
                && cache_len >= (positions - 1) * stride + head_dim
                && table == heads_len / head_dim * positions,
            "attention shapes disagree: {heads_len} query values of heads of {head_dim}, {cache_len} cache values \
             of stride {stride} for {positions} positions, {table} scores"
        );
    }

    /// As [`super::scalar::scores`].
    pub fn scores(queries: &[f32], head_dim: usize, keys: &CachedVectors, scale: f32, scores: &mut [f32]) {
        check(queries.len(), head_dim, keys.data.len(), keys.stride, keys.positions, scores.len());
        // SAFETY: NEON is part of every aarch64 target; shapes checked above.
        unsafe { scores_neon(queries, head_dim, keys, scale, scores) }
    }

    /// # Safety
    /// Shapes as [`check`] accepts.
    #[target_feature(enable = "neon")]
    unsafe fn scores_neon(queries: &[f32], head_dim: usize, keys: &CachedVectors, scale: f32, scores: &mut [f32]) {
        let CachedVectors { data: keys, stride, positions } = *keys;
        for (query, row) in queries.chunks_exact(head_dim).zip(scores.chunks_exact_mut(positions)) {
            let mut start = 0;
            // Whole pieces of 64, the query's piece in registers across positions.
            while start + PIECE <= head_dim {
                // SAFETY: `start + 64 ≤ head_dim`: inside the query, and inside
                // every key (`t·stride + head_dim ≤ keys.len()`, checked).
                unsafe {
                    let q = query.as_ptr().add(start);
                    let q = [0, 16, 32, 48].map(|i| vld1q_f32_x4(q.add(i)));
                    for (t, score) in row.iter_mut().enumerate() {
                        let k = keys.as_ptr().add(t * stride + start);
                        let mut acc = [vdupq_n_f32(0.0); 4];
                        for (i, qs) in q.iter().enumerate() {
                            let ks = vld1q_f32_x4(k.add(16 * i));
                            acc[0] = vfmaq_f32(acc[0], qs.0, ks.0);
                            acc[1] = vfmaq_f32(acc[1], qs.1, ks.1);
                            acc[2] = vfmaq_f32(acc[2], qs.2, ks.2);
                            acc[3] = vfmaq_f32(acc[3], qs.3, ks.3);
                        }
                        let piece = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
                        *score = if start == 0 { piece } else { *score + piece };
                    }
                }
                start += PIECE;
            }
            // The rest (head_dim not a multiple of 64), four values at a time, then one.
            if start < head_dim {
                for (t, score) in row.iter_mut().enumerate() {
                    let key = &keys[t * stride + start..t * stride + head_dim];
                    let rest = &query[start..];
                    let mut acc = vdupq_n_f32(0.0);
                    let mut i = 0;
                    while i + 4 <= rest.len() {
                        // SAFETY: `i + 4 ≤ rest.len() = key.len()`.
                        unsafe {
                            acc = vfmaq_f32(acc, vld1q_f32(rest.as_ptr().add(i)), vld1q_f32(key.as_ptr().add(i)))
                        };
                        i += 4;
                    }
                    let mut piece = vaddvq_f32(acc);
                    for j in i..rest.len() {
                        piece += rest[j] * key[j];
                    }
                    *score = if start == 0 { piece } else { *score + piece };
                }
            }
            for score in row.iter_mut() {
                *score *= scale;
            }
        }
    }

    /// As [`super::scalar::values`].
    pub fn values(weights: &[f32], values: &CachedVectors, head_dim: usize, out: &mut [f32]) {
        check(out.len(), head_dim, values.data.len(), values.stride, values.positions, weights.len());
        // SAFETY: NEON is part of every aarch64 target; shapes checked above.
        unsafe { values_neon(weights, values, head_dim, out) }
    }

    /// # Safety
    /// Shapes as [`check`] accepts.
    #[target_feature(enable = "neon")]
    unsafe fn values_neon(weights: &[f32], values: &CachedVectors, head_dim: usize, out: &mut [f32]) {
        let CachedVectors { data: values, stride, positions } = *values;
        for (head, row) in out.chunks_exact_mut(head_dim).zip(weights.chunks_exact(positions)) {
            let mut start = 0;
            // Whole pieces of 64: the output piece in registers across positions.
            while start + PIECE <= head_dim {
                let zero = vdupq_n_f32(0.0);
                let mut acc = [float32x4x4_t(zero, zero, zero, zero); 4];
                for (t, &weight) in row.iter().enumerate() {
                    // SAFETY: `start + 64 ≤ head_dim` and `t·stride + head_dim ≤ values.len()` (checked).
                    unsafe {
                        let v = values.as_ptr().add(t * stride + start);
                        for (i, a) in acc.iter_mut().enumerate() {
                            let vs = vld1q_f32_x4(v.add(16 * i));
                            a.0 = vfmaq_n_f32(a.0, vs.0, weight);
                            a.1 = vfmaq_n_f32(a.1, vs.1, weight);
                            a.2 = vfmaq_n_f32(a.2, vs.2, weight);
                            a.3 = vfmaq_n_f32(a.3, vs.3, weight);
                        }
                    }
                }
                // SAFETY: `start + 64 ≤ head_dim = head.len()`.
                unsafe {
                    for (i, a) in acc.iter().enumerate() {
                        vst1q_f32_x4(head.as_mut_ptr().add(start + 16 * i), *a);
                    }
                }
                start += PIECE;
            }
            // The rest, one position at a time.
            if start < head_dim {
                let rest = &mut head[start..];
                rest.fill(0.0);
                for (t, &weight) in row.iter().enumerate() {
                    let value = &values[t * stride + start..t * stride + head_dim];
                    let mut i = 0;
                    while i + 4 <= rest.len() {
                        // SAFETY: `i + 4 ≤ rest.len() = value.len()`.
                        unsafe {
                            let o =
                                vfmaq_n_f32(vld1q_f32(rest.as_ptr().add(i)), vld1q_f32(value.as_ptr().add(i)), weight);
                            vst1q_f32(rest.as_mut_ptr().add(i), o);
                        }
                        i += 4;
                    }
                    for j in i..rest.len() {
                        rest[j] += weight * value[j];
                    }
                }
            }
        }
    }

    /// Eight f16 at `at` widened to f32, in order (two `fcvtl`).
    ///
    /// # Safety
    /// `at` must be valid for reading eight f16.
    #[inline(always)]
    unsafe fn widen_eight(at: *const f16) -> (float32x4_t, float32x4_t) {
        // SAFETY: the caller's promise; `f16` is a `repr(transparent)` u16.
        let halves = unsafe { vld1q_u16(at.cast::<u16>()) };
        (vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(halves))), vcvt_high_f32_f16(vreinterpretq_f16_u16(halves)))
    }

    /// Four f16 at `at` widened to f32 (one `fcvtl`).
    ///
    /// # Safety
    /// `at` must be valid for reading four f16.
    #[inline(always)]
    unsafe fn widen_four(at: *const f16) -> float32x4_t {
        // SAFETY: the caller's promise; `f16` is a `repr(transparent)` u16.
        unsafe { vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(at.cast::<u16>()))) }
    }

    /// As [`super::scalar::scores_f16`]: the heads [`HALF_HEADS`] at a time.
    pub fn scores_f16(queries: &[f32], head_dim: usize, keys: &CachedVectors<f16>, scale: f32, scores: &mut [f32]) {
        check(queries.len(), head_dim, keys.data.len(), keys.stride, keys.positions, scores.len());
        let heads = queries.len() / head_dim;
        let mut first = 0;
        while first < heads {
            let count = (heads - first).min(HALF_HEADS);
            // SAFETY: NEON is part of every aarch64 target; shapes checked above, heads
            // `first .. first + count` are heads of the call.
            unsafe {
                match count {
                    1 => scores_f16_heads::<1>(queries, head_dim, keys, scale, scores, first),
                    2 => scores_f16_heads::<2>(queries, head_dim, keys, scale, scores, first),
                    3 => scores_f16_heads::<3>(queries, head_dim, keys, scale, scores, first),
                    _ => scores_f16_heads::<4>(queries, head_dim, keys, scale, scores, first),
                }
            }
            first += count;
        }
    }

    /// The scores of `H` heads from `first` at every position: each key
    /// widened once for the `H` queries, sixteen channels a step (four sums
    /// a head, read from the registers only at the end), then four, then one.
    ///
    /// # Safety
    /// Shapes as [`check`] accepts; `first + H` heads.
    #[target_feature(enable = "neon")]
    unsafe fn scores_f16_heads<const H: usize>(
        queries: &[f32],
        head_dim: usize,
        keys: &CachedVectors<f16>,
        scale: f32,
        scores: &mut [f32],
        first: usize,
    ) {
        let CachedVectors { data: keys, stride, positions } = *keys;
        let query: [*const f32; H] = std::array::from_fn(|h| queries.as_ptr().wrapping_add((first + h) * head_dim));
        for t in 0..positions {
            let key = keys.as_ptr().wrapping_add(t * stride);
            let mut sums = [[vdupq_n_f32(0.0); 4]; H];
            let mut c = 0;
            // SAFETY: channels below `head_dim` of position `t < positions` lie in the keys
            // (`t·stride + head_dim ≤ keys.len()`, checked), and of heads `first .. first + H`
            // in the queries (the caller's promise).
            unsafe {
                while c + 16 <= head_dim {
                    // Widen sixteen channels of the key, then multiply-add them into every head's sums.
                    let ((k0, k1), (k2, k3)) = (widen_eight(key.add(c)), widen_eight(key.add(c + 8)));
                    for (sum, q) in sums.iter_mut().zip(&query) {
                        let q = vld1q_f32_x4(q.add(c));
                        sum[0] = vfmaq_f32(sum[0], q.0, k0);
                        sum[1] = vfmaq_f32(sum[1], q.1, k1);
                        sum[2] = vfmaq_f32(sum[2], q.2, k2);
                        sum[3] = vfmaq_f32(sum[3], q.3, k3);
                    }
                    c += 16;
                }
                while c + 4 <= head_dim {
                    let k = widen_four(key.add(c));
                    for (sum, q) in sums.iter_mut().zip(&query) {
                        sum[0] = vfmaq_f32(sum[0], vld1q_f32(q.add(c)), k);
                    }
                    c += 4;
                }
                for (h, (sum, q)) in sums.iter().zip(&query).enumerate() {
                    let mut score = vaddvq_f32(vaddq_f32(vaddq_f32(sum[0], sum[1]), vaddq_f32(sum[2], sum[3])));
                    // The last one to three channels.
                    for j in c..head_dim {
                        score += *q.add(j) * to_f32(keys[t * stride + j]);
                    }
                    scores[(first + h) * positions + t] = score * scale;
                }
            }
        }
    }

    /// As [`super::scalar::values_f16`]: the heads [`HALF_HEADS`] at a time.
    pub fn values_f16(weights: &[f32], values: &CachedVectors<f16>, head_dim: usize, out: &mut [f32]) {
        check(out.len(), head_dim, values.data.len(), values.stride, values.positions, weights.len());
        let heads = out.len() / head_dim;
        let mut first = 0;
        while first < heads {
            let count = (heads - first).min(HALF_HEADS);
            // SAFETY: NEON is part of every aarch64 target; shapes checked above, heads
            // `first .. first + count` are heads of the call.
            unsafe {
                match count {
                    1 => values_f16_heads::<1>(weights, values, head_dim, out, first),
                    2 => values_f16_heads::<2>(weights, values, head_dim, out, first),
                    3 => values_f16_heads::<3>(weights, values, head_dim, out, first),
                    _ => values_f16_heads::<4>(weights, values, head_dim, out, first),
                }
            }
            first += count;
        }
    }

    /// Adds `W` widened vectors of one position, times lane `L` of each
    /// head's weights, to the heads' sums.
    #[inline(always)]
    fn add_weighted<const H: usize, const W: usize, const L: i32>(
        sums: &mut [[float32x4_t; W]; H],
        value: &[float32x4_t; W],
        weights: &[float32x4_t; H],
    ) {
        for (sum, weight) in sums.iter_mut().zip(weights) {
            for (s, v) in sum.iter_mut().zip(value) {
                // SAFETY: NEON is part of every aarch64 target (arithmetic on registers only).
                *s = unsafe { vfmaq_laneq_f32::<L>(*s, *v, *weight) };
            }
        }
    }

    /// The outputs of `H` heads from `first`, sixteen channels at a time
    /// and then four, the sums of the `H` heads in registers while the
    /// positions stream past (each value widened once for all of them, each
    /// head's weights loaded four positions at a time); one to three last
    /// channels one at a time.
    ///
    /// # Safety
    /// Shapes as [`check`] accepts; `first + H` heads.
    #[target_feature(enable = "neon")]
    unsafe fn values_f16_heads<const H: usize>(
        weights: &[f32],
        values: &CachedVectors<f16>,
        head_dim: usize,
        out: &mut [f32],
        first: usize,
    ) {
        let CachedVectors { data: values, stride, positions } = *values;
        // SAFETY: heads `first .. first + H` have their rows of weights (the caller's promise).
        let weight: [*const f32; H] = std::array::from_fn(|h| unsafe { weights.as_ptr().add((first + h) * positions) });
        let mut c = 0;
        while c + 16 <= head_dim {
            // SAFETY: channels `c .. c + 16 ≤ head_dim` of every position and of every head's outputs.
            let sums = unsafe { values_f16_block::<H, 4>(&weight, values, positions, stride, c) };
            for (h, sum) in sums.iter().enumerate() {
                // SAFETY: `(first + h)·head_dim + c + 16 ≤ out.len()`.
                unsafe {
                    let o = out.as_mut_ptr().add((first + h) * head_dim + c);
                    vst1q_f32_x4(o, float32x4x4_t(sum[0], sum[1], sum[2], sum[3]));
                }
            }
            c += 16;
        }
        while c + 4 <= head_dim {
            // SAFETY: as above, four channels.
            let sums = unsafe { values_f16_block::<H, 1>(&weight, values, positions, stride, c) };
            for (h, sum) in sums.iter().enumerate() {
                // SAFETY: `(first + h)·head_dim + c + 4 ≤ out.len()`.
                unsafe { vst1q_f32(out.as_mut_ptr().add((first + h) * head_dim + c), sum[0]) };
            }
            c += 4;
        }
        for j in c..head_dim {
            for (h, w) in weight.iter().enumerate() {
                let mut sum = 0f32;
                for t in 0..positions {
                    // SAFETY: `t < positions`, the head's row of weights.
                    sum += unsafe { *w.add(t) } * to_f32(values[t * stride + j]);
                }
                out[(first + h) * head_dim + j] = sum;
            }
        }
    }

    /// `Σ_t weight[h][t] · value[t][channel .. channel + 4·W]` for `H` heads,
    /// `W` = 4 (sixteen channels) or 1 (four): four positions a step, then one.
    ///
    /// # Safety
    /// Channels `channel .. channel + 4·W` of positions below `positions` lie
    /// in `values`; each `weight[h]` holds `positions` weights.
    #[inline(always)]
    unsafe fn values_f16_block<const H: usize, const W: usize>(
        weight: &[*const f32; H],
        values: &[f16],
        positions: usize,
        stride: usize,
        channel: usize,
    ) -> [[float32x4_t; W]; H] {
        let mut sums = [[vdupq_n_f32(0.0); W]; H];
        // Position `t`'s channels widened.
        let widen = |t: usize| -> [float32x4_t; W] {
            let at = values.as_ptr().wrapping_add(t * stride + channel);
            // SAFETY: channels `channel .. channel + 4·W` of a position below `positions` (the caller's promise).
            unsafe {
                if W == 4 {
                    let ((v0, v1), (v2, v3)) = (widen_eight(at), widen_eight(at.add(8)));
                    std::array::from_fn(|i| [v0, v1, v2, v3][i])
                } else {
                    [widen_four(at); W]
                }
            }
        };
        let mut t = 0;
        while t + 4 <= positions {
            // Four positions' weights of each head, a lane a position.
            // SAFETY: `t + 4 ≤ positions`, inside each head's weights (the caller's promise).
            let lanes: [float32x4_t; H] = std::array::from_fn(|h| unsafe { vld1q_f32(weight[h].add(t)) });
            add_weighted::<H, W, 0>(&mut sums, &widen(t), &lanes);
            add_weighted::<H, W, 1>(&mut sums, &widen(t + 1), &lanes);
            add_weighted::<H, W, 2>(&mut sums, &widen(t + 2), &lanes);
            add_weighted::<H, W, 3>(&mut sums, &widen(t + 3), &lanes);
            t += 4;
        }
        while t < positions {
            // SAFETY: `t < positions`, inside each head's weights.
            let lanes: [float32x4_t; H] = std::array::from_fn(|h| vdupq_n_f32(unsafe { *weight[h].add(t) }));
            add_weighted::<H, W, 0>(&mut sums, &widen(t), &lanes);
            t += 1;
        }
        sums
    }

    /// As [`super::scalar::round_to_f16`]: `fcvtn`, eight values at a time
    /// (rounding as the FPCR says: nearest, ties to even, which Linux leaves
    /// set; subnormals kept), the last one to seven through a padded vector.
    pub fn round_to_f16(values: &[f32], out: &mut [f16]) {
        assert_eq!(values.len(), out.len(), "rounding {} values to f16 into {} places", values.len(), out.len());
        let mut chunks = values.chunks_exact(8);
        let mut places = out.chunks_exact_mut(8);
        for (eight, place) in (&mut chunks).zip(&mut places) {
            // SAFETY: eight values and eight places; `f16` is a `repr(transparent)` u16.
            unsafe {
                let low = vcvt_f16_f32(vld1q_f32(eight.as_ptr()));
                let both = vcvt_high_f16_f32(low, vld1q_f32(eight.as_ptr().add(4)));
                vst1q_u16(place.as_mut_ptr().cast::<u16>(), vreinterpretq_u16_f16(both));
            }
        }
        let (rest, places) = (chunks.remainder(), places.into_remainder());
        if !rest.is_empty() {
            let mut padded = [0f32; 8];
            padded[..rest.len()].copy_from_slice(rest);
            let mut rounded = [f16::ZERO; 8];
            round_to_f16(&padded, &mut rounded);
            places.copy_from_slice(&rounded[..rest.len()]);
        }
    }

    /// Checks the quantized scores kernel's shapes (so the unchecked loads are in bounds).
    fn check_scores_quantized(
        bits: u32,
        queries: usize,
        head_dim: usize,
        keys: &QuantizedKeys,
        scores: usize,
        row: usize,
    ) {
        let (codes, key_scales, key_mins, groups) = (keys.codes.len(), keys.scales.len(), keys.mins.len(), keys.groups);
        let heads = queries.checked_div(head_dim).unwrap_or(0);
        assert!(
            head_dim > 0
                && head_dim.is_multiple_of(CHANNEL_RUN)
                && queries.is_multiple_of(head_dim)
                && codes >= groups * head_dim * KEY_GROUP * bits as usize / 8
                && key_scales.min(key_mins) >= groups * head_dim
                && row >= groups * KEY_GROUP
                && (heads == 0 || scores >= (heads - 1) * row + groups * KEY_GROUP),
            "quantized attention shapes disagree: {queries} query values of heads of {head_dim}, {codes} key code \
             bytes at {bits} bits, {key_scales} scales and {key_mins} minimums for {groups} groups, {scores} scores \
             in rows of {row}"
        );
    }

    /// Checks the quantized values kernel's shapes.
    fn check_values_quantized(
        bits: u32,
        weights: usize,
        row: usize,
        values: &QuantizedValues,
        head_dim: usize,
        out: usize,
    ) {
        let (codes, value_scales, value_mins) = (values.codes.len(), values.scales.len(), values.mins.len());
        let positions = values.positions;
        let heads = out.checked_div(head_dim).unwrap_or(0);
        assert!(
            head_dim > 0
                && head_dim.is_multiple_of(CHANNEL_RUN)
                && out.is_multiple_of(head_dim)
                && row >= positions
                && (heads == 0 || weights >= (heads - 1) * row + positions)
                && codes >= positions * head_dim * bits as usize / 8
                && value_scales.min(value_mins) >= positions,
            "quantized attention shapes disagree: {weights} weights in rows of {row} for {positions} positions, \
             {codes} value code bytes at {bits} bits, {value_scales} scales and {value_mins} minimums, {out} outputs \
             of heads of {head_dim}"
        );
    }

    /// An f16 as f32 with one `fcvt` (ARMv8.0 has the conversion; without
    /// the fp16 extension `half` converts in software, ~20 instructions).
    #[inline(always)]
    fn to_f32(value: f16) -> f32 {
        let converted: f32;
        // SAFETY: `fcvt` between FP registers reads and writes only its operands.
        unsafe {
            std::arch::asm!(
                "fcvt {out:s}, {value:h}",
                value = in(vreg) value.to_bits() as i16,
                out = lateout(vreg) converted,
                options(pure, nomem, nostack, preserves_flags)
            )
        };
        converted
    }

    /// 32 codes at `at` widened to f32, in order: 32 bytes at 8 bits; 16 at
    /// 4 bits, low nibbles first (codes 0..16), then high nibbles (16..32).
    ///
    /// # Safety
    /// `at` must be valid for reading `32·BITS/8` bytes.
    #[inline(always)]
    unsafe fn widen_codes<const BITS: u32>(at: *const u8) -> [float32x4_t; 8] {
        // SAFETY: the caller's promise covers the 32 (8-bit) or 16 (4-bit) bytes read.
        let (first, second) = unsafe {
            if BITS == 8 {
                (vld1q_u8(at), vld1q_u8(at.add(16)))
            } else {
                // Unpack nibbles: low ones are codes 0..16, high ones 16..32.
                let packed = vld1q_u8(at);
                (vandq_u8(packed, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(packed))
            }
        };
        let mut widened = [vdupq_n_f32(0.0); 8];
        for (i, sixteen) in [first, second].into_iter().enumerate() {
            // Widen u8 → u16 → u32, convert to f32.
            for (j, eight) in [vmovl_u8(vget_low_u8(sixteen)), vmovl_high_u8(sixteen)].into_iter().enumerate() {
                widened[4 * i + 2 * j] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(eight)));
                widened[4 * i + 2 * j + 1] = vcvtq_f32_u32(vmovl_high_u16(eight));
            }
        }
        widened
    }

    /// As [`super::scalar::scores_q8`].
    pub fn scores_q8(
        queries: &[f32],
        head_dim: usize,
        keys: &QuantizedKeys,
        scale: f32,
        scores: &mut [f32],
        row: usize,
    ) {
        check_scores_quantized(8, queries.len(), head_dim, keys, scores.len(), row);
        // SAFETY: NEON is part of every aarch64 target; shapes checked above.
        unsafe { scores_quantized::<8>(queries, head_dim, keys, scale, scores, row) }
    }

    /// As [`super::scalar::scores_q4`].
    pub fn scores_q4(
        queries: &[f32],
        head_dim: usize,
        keys: &QuantizedKeys,
        scale: f32,
        scores: &mut [f32],
        row: usize,
    ) {
        check_scores_quantized(4, queries.len(), head_dim, keys, scores.len(), row);
        // SAFETY: NEON is part of every aarch64 target; shapes checked above.
        unsafe { scores_quantized::<4>(queries, head_dim, keys, scale, scores, row) }
    }

    /// A group's 32 scores a head at a time, held in eight registers while
    /// the group's channels stream past.
    ///
    /// # Safety
    /// Shapes as [`check_scores_quantized`] accepts.
    #[target_feature(enable = "neon")]
    unsafe fn scores_quantized<const BITS: u32>(
        queries: &[f32],
        head_dim: usize,
        keys: &QuantizedKeys,
        scale: f32,
        scores: &mut [f32],
        row: usize,
    ) {
        let QuantizedKeys { codes, scales: key_scales, mins: key_mins, groups } = *keys;
        let bytes = KEY_GROUP * BITS as usize / 8;
        for g in 0..groups {
            for (h, query) in queries.chunks_exact(head_dim).enumerate() {
                let mut sums = [vdupq_n_f32(0.0); 8];
                let mut offset = 0f32;
                for (c, &q) in query.iter().enumerate() {
                    let at = g * head_dim + c;
                    // Fold the channel's scale into the query; its minimum into one offset.
                    let weight = vdupq_n_f32(q * to_f32(key_scales[at]));
                    offset += q * to_f32(key_mins[at]);
                    // SAFETY: `(at + 1)·bytes ≤ groups·head_dim·bytes ≤ codes.len()` (checked).
                    let keys = unsafe { widen_codes::<BITS>(codes.as_ptr().add(at * bytes)) };
                    for (sum, key) in sums.iter_mut().zip(keys) {
                        *sum = vfmaq_f32(*sum, key, weight);
                    }
                }
                let (offset, scale) = (vdupq_n_f32(offset), vdupq_n_f32(scale));
                let start = h * row + g * KEY_GROUP;
                for (i, sum) in sums.into_iter().enumerate() {
                    // SAFETY: `start + 32 ≤ (heads − 1)·row + groups·32 ≤ scores.len()` (checked).
                    unsafe {
                        vst1q_f32(scores.as_mut_ptr().add(start + 4 * i), vmulq_f32(vaddq_f32(sum, offset), scale))
                    };
                }
            }
        }
    }

    /// As [`super::scalar::values_q8`].
    pub fn values_q8(weights: &[f32], row: usize, values: &QuantizedValues, head_dim: usize, out: &mut [f32]) {
        check_values_quantized(8, weights.len(), row, values, head_dim, out.len());
        // SAFETY: NEON is part of every aarch64 target; shapes checked above.
        unsafe { values_quantized::<8>(weights, row, values, head_dim, out) }
    }

    /// As [`super::scalar::values_q4`].
    pub fn values_q4(weights: &[f32], row: usize, values: &QuantizedValues, head_dim: usize, out: &mut [f32]) {
        check_values_quantized(4, weights.len(), row, values, head_dim, out.len());
        // SAFETY: NEON is part of every aarch64 target; shapes checked above.
        unsafe { values_quantized::<4>(weights, row, values, head_dim, out) }
    }

    /// A head's output 32 channels at a time, held in eight registers while
    /// the tokens stream past.
    ///
    /// # Safety
    /// Shapes as [`check_values_quantized`] accepts.
    #[target_feature(enable = "neon")]
    unsafe fn values_quantized<const BITS: u32>(
        weights: &[f32],
        row: usize,
        values: &QuantizedValues,
        head_dim: usize,
        out: &mut [f32],
    ) {
        let QuantizedValues { codes, scales: value_scales, mins: value_mins, positions } = *values;
        let bytes = head_dim * BITS as usize / 8;
        for (h, head) in out.chunks_exact_mut(head_dim).enumerate() {
            let weights = &weights[h * row..h * row + positions];
            // Every channel of a token shares its minimum: one offset for the head.
            let mut offset = 0f32;
            for (&weight, minimum) in weights.iter().zip(value_mins) {
                offset += weight * to_f32(*minimum);
            }
            for (run, channels) in head.chunks_exact_mut(CHANNEL_RUN).enumerate() {
                let mut sums = [vdupq_n_f32(0.0); 8];
                for (t, (&weight, token_scale)) in weights.iter().zip(value_scales).enumerate() {
                    let scaled = vdupq_n_f32(weight * to_f32(*token_scale));
                    // SAFETY: `t < positions` and `run·32 + 32 ≤ head_dim`: inside token `t`'s
                    // `bytes`, and `positions·bytes ≤ codes.len()` (checked).
                    let values = unsafe {
                        widen_codes::<BITS>(codes.as_ptr().add(t * bytes + run * CHANNEL_RUN * BITS as usize / 8))
                    };
                    for (sum, value) in sums.iter_mut().zip(values) {
                        *sum = vfmaq_f32(*sum, value, scaled);
                    }
                }
                let offset = vdupq_n_f32(offset);
                for (i, sum) in sums.into_iter().enumerate() {
                    // SAFETY: `4i + 4 ≤ 32 = channels.len()`.
                    unsafe { vst1q_f32(channels.as_mut_ptr().add(4 * i), vaddq_f32(sum, offset)) };
                }
            }
        }
    }

    /// As [`super::scalar::causal`]: the query rows (token-major, head-minor)
    /// [`TILE_ROWS`] at a time, the last tile of 4 or 8 rows if fewer remain.
    /// Per tile:
    ///
    /// 1. the tile's queries transposed into the scratch: for each run of
    ///    four channels, each channel's value of every row (a vector a run
    ///    of four rows);
    /// 2. scores times `scale·log₂e` (base 2): four cached keys at a time, each key's
    ///    four-channel piece multiplied by lane into the rows' vectors (`fmla`
    ///    by element), so a key is loaded once for the whole tile and no sum
    ///    crosses lanes. Stored position-major (`positions × rows`), from
    ///    the first position the tile's first token sees; a position past
    ///    what a row's token sees, or before its window, scores −∞; each
    ///    row's maximum kept in lanes;
    /// 3. `2^(score − maximum)` in place and each row's sum, in lanes;
    /// 4. values: for eight channels at a time, the weights of the whole
    ///    tile by lane against each cached value's eight channels; each row's
    ///    sum divided out once, at the end.
    pub fn causal(
        shape: &super::Causal,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        causal_over(shape, queries, keys, values, scratch, out);
    }

    /// As [`super::scalar::causal_f16`]: [`causal`]'s tiles over the f16
    /// cache, each cached key and value widened (`fcvtl`) as it is loaded.
    pub fn causal_f16(
        shape: &super::Causal,
        queries: &[f32],
        keys: &[f16],
        values: &[f16],
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        causal_over(shape, queries, keys, values, scratch, out);
    }

    /// What the causal tiles read from the cache: f32, or f16 widened as it is loaded.
    trait Cached: Copy {
        /// Four values from `at`, as f32.
        ///
        /// # Safety
        /// `at` must be valid for reading four values.
        unsafe fn four(at: *const Self) -> float32x4_t;
        /// One value as f32.
        fn one(self) -> f32;
    }

    impl Cached for f32 {
        #[inline(always)]
        unsafe fn four(at: *const f32) -> float32x4_t {
            // SAFETY: the caller's promise.
            unsafe { vld1q_f32(at) }
        }
        #[inline(always)]
        fn one(self) -> f32 {
            self
        }
    }

    impl Cached for f16 {
        #[inline(always)]
        unsafe fn four(at: *const f16) -> float32x4_t {
            // SAFETY: the caller's promise.
            unsafe { widen_four(at) }
        }
        #[inline(always)]
        fn one(self) -> f32 {
            to_f32(self)
        }
    }

    /// [`causal`] over a cache of `T`.
    fn causal_over<T: Cached>(
        shape: &super::Causal,
        queries: &[f32],
        keys: &[T],
        values: &[T],
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        super::check_causal(shape, queries.len(), keys.len(), values.len(), scratch.len(), out.len());
        let rows = shape.tokens * shape.heads;
        let mut start = 0;
        while start < rows {
            let count = (rows - start).min(TILE_ROWS);
            // SAFETY: NEON is part of every aarch64 target; shapes checked above,
            // and rows `start .. start + count` are rows of the batch.
            unsafe {
                match count.div_ceil(4) {
                    1 => causal_tile::<T, 1>(shape, start, count, queries, keys, values, scratch, out),
                    2 => causal_tile::<T, 2>(shape, start, count, queries, keys, values, scratch, out),
                    _ => causal_tile::<T, 3>(shape, start, count, queries, keys, values, scratch, out),
                }
            }
            start += count;
        }
    }

    /// Rows `start .. start + count` of a [`causal`] call, `count ≤ 4·V`;
    /// the lanes past `count` repeat the tile's first row (finite data whose
    /// results are dropped). Not inlined: each tile width gets the whole
    /// register file.
    ///
    /// # Safety
    /// Shapes as [`super::check_causal`] accepts; `start + count ≤ tokens·heads`.
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    #[target_feature(enable = "neon")]
    unsafe fn causal_tile<T: Cached, const V: usize>(
        shape: &super::Causal,
        start: usize,
        count: usize,
        queries: &[f32],
        keys: &[T],
        values: &[T],
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        let (head_dim, heads, stride) = (shape.head_dim, shape.heads, shape.stride);
        let lanes = 4 * V;
        let (full, chunks) = (head_dim / 4, head_dim.div_ceil(4));
        // The tile reads positions from the first its first token sees (`begin`,
        // 0 without a window), counted from there: the keys and values from
        // `begin`, and each lane's row's first and last position relative to it.
        let begin = shape.lowest_seen(start / heads);
        let (keys, values) = (&keys[begin * stride..], &values[begin * stride..]);
        // Each lane's row: where it is in the queries (and the output), and the
        // first and last positions its token sees (padding lanes: every position).
        let mut at = [0usize; TILE_ROWS];
        let (mut lowest, mut last) = ([0u32; TILE_ROWS], [u32::MAX; TILE_ROWS]);
        for m in 0..lanes {
            let row = start + if m < count { m } else { 0 };
            at[m] = row / heads * shape.query_stride + row % heads * head_dim;
            if m < count {
                lowest[m] = (shape.lowest_seen(row / heads) - begin) as u32;
                last[m] = (shape.first + row / heads - begin) as u32;
            }
        }
        let seen = shape.first + (start + count - 1) / heads + 1 - begin;
        // Positions every row sees: from the last token's first to the first token's own.
        let visible =
            (shape.lowest_seen((start + count - 1) / heads) - begin)..(shape.first + start / heads + 1 - begin);
        let (transposed, scores) = scratch.split_at_mut(chunks * 4 * lanes);
        let scores = &mut scores[..seen * lanes];

        // 1. Queries transposed: chunk c, row vector v, channel l of the chunk
        // at ((c·V + v)·4 + l)·4, one lane a row.
        for v in 0..V {
            let q = queries.as_ptr();
            let row = &at[4 * v..4 * v + 4];
            for c in 0..full {
                // SAFETY: each row's channels `4c .. 4c + 4 ≤ head_dim` lie inside the queries (checked);
                // the store is inside `transposed` (`(c·V + v + 1)·16 ≤ chunks·4·lanes`).
                unsafe {
                    let zero = vdupq_n_f32(0.0);
                    let mut t = float32x4x4_t(zero, zero, zero, zero);
                    t = vld4q_lane_f32::<0>(q.add(row[0] + 4 * c), t);
                    t = vld4q_lane_f32::<1>(q.add(row[1] + 4 * c), t);
                    t = vld4q_lane_f32::<2>(q.add(row[2] + 4 * c), t);
                    t = vld4q_lane_f32::<3>(q.add(row[3] + 4 * c), t);
                    vst1q_f32_x4(transposed.as_mut_ptr().add((c * V + v) * 16), t);
                }
            }
            // A last chunk of one to three channels, zero-padded.
            if full < chunks {
                for (j, &row) in row.iter().enumerate() {
                    for l in 0..4 {
                        let channel = 4 * full + l;
                        let value = if channel < head_dim { queries[row + channel] } else { 0.0 };
                        transposed[((full * V + v) * 4 + l) * 4 + j] = value;
                    }
                }
            }
        }

        // 2. Scores: positions a block at a time (as many as the registers hold beside the tile), then one.
        // In base 2, the scale applied to each sum as the reference and the per-token kernels do.
        // (Folded into the queries it costs a little less; the logits then move by rounding as far as
        // here, but tests/emulated-greedy.sh's prompt reaches a near-tie, two logits 0.18 apart on the
        // host, that the emulated run then breaks the other way.)
        let factor = shape.scale * std::f32::consts::LOG2_E;
        // SAFETY: positions `begin .. begin + seen ≤ first + tokens` are in the cache (checked); `scores` holds
        // `seen·lanes` values and `transposed` the tile's `chunks` chunks.
        let maxima = unsafe {
            match V {
                3 => score_pass::<T, V, 4>(
                    transposed,
                    keys,
                    stride,
                    head_dim,
                    factor,
                    &visible,
                    [&lowest, &last],
                    scores,
                ),
                2 => score_pass::<T, V, 6>(
                    transposed,
                    keys,
                    stride,
                    head_dim,
                    factor,
                    &visible,
                    [&lowest, &last],
                    scores,
                ),
                _ => score_pass::<T, V, 8>(
                    transposed,
                    keys,
                    stride,
                    head_dim,
                    factor,
                    &visible,
                    [&lowest, &last],
                    scores,
                ),
            }
        };

        // 3. Weights 2^(score − maximum), and their sums.
        let mut totals = [vdupq_n_f32(0.0); V];
        for position in scores.chunks_exact_mut(lanes) {
            for (v, total) in totals.iter_mut().enumerate() {
                // SAFETY: `4v + 4 ≤ lanes = position.len()`.
                unsafe {
                    let e = exp2_nonpositive(vsubq_f32(vld1q_f32(position.as_ptr().add(4 * v)), maxima[v]));
                    *total = vaddq_f32(*total, e);
                    vst1q_f32(position.as_mut_ptr().add(4 * v), e);
                }
            }
        }
        let mut inverse = [0f32; TILE_ROWS];
        for (v, total) in totals.iter().enumerate() {
            // SAFETY: `4v + 4 ≤ lanes ≤ TILE_ROWS`.
            unsafe { vst1q_f32(inverse.as_mut_ptr().add(4 * v), vdivq_f32(vdupq_n_f32(1.0), *total)) };
        }

        // 4. Values: as many channels at a time as the registers hold beside the tile, then four, then one.
        let rows = Rows { at: &at, inverse: &inverse, count };
        // SAFETY: positions `begin .. begin + seen ≤ first + tokens` are in the cache and every row's
        // `head_dim` outputs in `out` (checked); `scores` holds `seen·lanes` weights.
        let channel = unsafe {
            match V {
                3 => value_pass::<T, V, 2>(scores, values, stride, head_dim, &rows, out),
                2 => value_pass::<T, V, 3>(scores, values, stride, head_dim, &rows, out),
                _ => value_pass::<T, V, 6>(scores, values, stride, head_dim, &rows, out),
            }
        };
        for channel in channel..head_dim {
            for m in 0..count {
                let mut sum = 0f32;
                for (position, weights) in scores.chunks_exact(lanes).enumerate() {
                    sum += weights[m] * values[position * stride + channel].one();
                }
                out[at[m] + channel] = sum * inverse[m];
            }
        }
    }

    /// Where a tile's rows go: each row's place in the output and the inverse of its weights' sum.
    struct Rows<'a> {
        at: &'a [usize; TILE_ROWS],
        inverse: &'a [f32; TILE_ROWS],
        count: usize,
    }

    /// A tile's outputs, `4·W` channels at a time, then four; returns the
    /// first channel left (fewer than four remain).
    ///
    /// # Safety
    /// As [`value_block`] for every channel below `head_dim` and every
    /// position `weights` holds (`4·V` a position); each row's `head_dim`
    /// outputs lie inside `out` from `rows.at`.
    #[inline(always)]
    unsafe fn value_pass<T: Cached, const V: usize, const W: usize>(
        weights: &[f32],
        values: &[T],
        stride: usize,
        head_dim: usize,
        rows: &Rows,
        out: &mut [f32],
    ) -> usize {
        let seen = weights.len() / (4 * V);
        let mut channel = 0;
        while channel + 4 * W <= head_dim {
            // SAFETY: channels `channel .. channel + 4·W ≤ head_dim`, positions below `seen` (the caller's promise).
            let sums = unsafe { value_block::<T, V, W>(weights, values, seen, stride, channel) };
            for (m, sum) in sums.iter().enumerate().take(rows.count) {
                for (i, piece) in sum.iter().enumerate() {
                    // SAFETY: the row's channels `channel + 4i .. + 4 ≤ head_dim` lie inside `out`.
                    unsafe {
                        let o = out.as_mut_ptr().add(rows.at[m] + channel + 4 * i);
                        vst1q_f32(o, vmulq_n_f32(*piece, rows.inverse[m]));
                    }
                }
            }
            channel += 4 * W;
        }
        while channel + 4 <= head_dim {
            // SAFETY: channels `channel .. channel + 4 ≤ head_dim`, positions below `seen`.
            let sums = unsafe { value_block::<T, V, 1>(weights, values, seen, stride, channel) };
            for (m, sum) in sums.iter().enumerate().take(rows.count) {
                // SAFETY: the row's channels `channel .. channel + 4 ≤ head_dim` lie inside `out`.
                unsafe { vst1q_f32(out.as_mut_ptr().add(rows.at[m] + channel), vmulq_n_f32(sum[0], rows.inverse[m])) };
            }
            channel += 4;
        }
        channel
    }

    /// 2ˣ in four lanes for `x ≤ 0` (−∞ included), within a few ulp of the
    /// exact value down to 2⁻¹²⁶ and 0 below 2⁻¹²⁷: x = n + f with |f| ≤ ½,
    /// 2ᶠ − 1 by the degree-5 polynomial of [`crate::kernels::ops::neon`]'s
    /// `exp` in `f·ln 2` (its coefficients times powers of ln 2), 2ⁿ built in
    /// the exponent field. At the clamp, −127, that field is zero and so is
    /// the result: no select for underflow, and none for overflow (x ≤ 0).
    #[inline(always)]
    fn exp2_nonpositive(x: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of every aarch64 target (arithmetic on registers only).
        unsafe {
            let clamped = vmaxq_f32(x, vdupq_n_f32(-127.0));
            let n = vrndnq_f32(clamped);
            let f = vsubq_f32(clamped, n);
            // 2ᶠ − 1 ≈ b1·f + b2·f² + b3·f³ + b4·f⁴ + b5·f⁵, in two halves by f².
            let f2 = vmulq_f32(f, f);
            let high = vfmaq_f32(vdupq_n_f32(f32::from_bits(0x3c1e_770b)), vdupq_n_f32(f32::from_bits(0x3aac_f696)), f);
            let low = vfmaq_f32(vdupq_n_f32(f32::from_bits(0x3e75_fcd6)), vdupq_n_f32(f32::from_bits(0x3d63_5e50)), f);
            let low = vfmaq_f32(low, high, f2);
            let poly = vfmaq_f32(vmulq_n_f32(f, f32::from_bits(0x3f31_7211)), low, f2);
            // 2ⁿ: n + 127 in the exponent field (0 ..= 127 after the clamp; 0 is the value 0).
            let scale = vreinterpretq_f32_s32(vaddq_s32(vshlq_n_s32::<23>(vcvtq_s32_f32(n)), vdupq_n_s32(0x3f80_0000)));
            vfmaq_f32(scale, scale, poly)
        }
    }

    /// A tile's scores times `factor` at every position `scores` has room for
    /// (`4·V` a position), `K` positions a block, then one: positions outside
    /// `visible` score −∞ in the lanes whose row's first position (`lowest`)
    /// is after them or whose last (`last`) is before them. Returns each row's
    /// maximum (a lane a row).
    ///
    /// # Safety
    /// As [`score_block`] for every position below `scores.len() / (4·V)`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn score_pass<T: Cached, const V: usize, const K: usize>(
        transposed: &[f32],
        keys: &[T],
        stride: usize,
        head_dim: usize,
        factor: f32,
        visible: &std::ops::Range<usize>,
        [lowest, last]: [&[u32; TILE_ROWS]; 2],
        scores: &mut [f32],
    ) -> [float32x4_t; V] {
        let lanes = 4 * V;
        let seen = scores.len() / lanes;
        // SAFETY: `4v + 4 ≤ lanes ≤ TILE_ROWS = last.len() = lowest.len()`.
        let limits: [uint32x4_t; V] = std::array::from_fn(|v| unsafe { vld1q_u32(last.as_ptr().add(4 * v)) });
        // SAFETY: as above.
        let floors: [uint32x4_t; V] = std::array::from_fn(|v| unsafe { vld1q_u32(lowest.as_ptr().add(4 * v)) });
        let mut maxima = [vdupq_n_f32(f32::NEG_INFINITY); V];
        let mut t = 0;
        while t < seen {
            let block = if t + K <= seen { K } else { 1 };
            // SAFETY: positions `t .. t + block ≤ seen` are in the cache (the caller's promise).
            let sums: [[float32x4_t; V]; K] = unsafe {
                if block == K {
                    score_block::<T, V, K>(transposed, keys, t, stride, head_dim)
                } else {
                    let one = score_block::<T, V, 1>(transposed, keys, t, stride, head_dim);
                    [one[0]; K]
                }
            };
            for (k, mut sum) in sums.into_iter().enumerate().take(block) {
                for s in sum.iter_mut() {
                    *s = vmulq_n_f32(*s, factor);
                }
                let position = t + k;
                if position >= visible.end {
                    // Past what a row's token sees: −∞, weight 0.
                    let hidden = vdupq_n_u32(position as u32);
                    for (s, limit) in sum.iter_mut().zip(&limits) {
                        *s = vbslq_f32(vcgtq_u32(hidden, *limit), vdupq_n_f32(f32::NEG_INFINITY), *s);
                    }
                }
                if position < visible.start {
                    // Before a row's window: the same.
                    let hidden = vdupq_n_u32(position as u32);
                    for (s, floor) in sum.iter_mut().zip(&floors) {
                        *s = vbslq_f32(vcltq_u32(hidden, *floor), vdupq_n_f32(f32::NEG_INFINITY), *s);
                    }
                }
                for (v, s) in sum.iter().enumerate() {
                    maxima[v] = vmaxq_f32(maxima[v], *s);
                    // SAFETY: `(position + 1)·lanes ≤ seen·lanes = scores.len()`.
                    unsafe { vst1q_f32(scores.as_mut_ptr().add(position * lanes + 4 * v), *s) };
                }
            }
            t += block;
        }
        maxima
    }

    /// The scores of `K` positions from `first` against a tile's `4·V`
    /// transposed queries: for each position, a vector a run of four rows.
    ///
    /// # Safety
    /// Positions `first .. first + K` are in `keys` (`t·stride + head_dim ≤
    /// keys.len()`); `transposed` holds `head_dim.div_ceil(4)` chunks of `16·V`.
    #[inline(always)]
    unsafe fn score_block<T: Cached, const V: usize, const K: usize>(
        transposed: &[f32],
        keys: &[T],
        first: usize,
        stride: usize,
        head_dim: usize,
    ) -> [[float32x4_t; V]; K] {
        let mut sums = [[vdupq_n_f32(0.0); V]; K];
        let full = head_dim / 4;
        // SAFETY: as the caller promises.
        let key: [*const T; K] = std::array::from_fn(|k| unsafe { keys.as_ptr().add((first + k) * stride) });
        let mut q = transposed.as_ptr();
        // Chunk `c`: the transposed queries' 16·V values at `q`, each key's channels `4c .. 4c + 4`.
        let chunk = |sums: &mut [[float32x4_t; V]; K], q: *const f32, c: usize| {
            // SAFETY: `c < full`: inside every key (the caller's promise) and inside `transposed`.
            unsafe {
                let pieces: [float32x4x4_t; V] = std::array::from_fn(|v| vld1q_f32_x4(q.add(16 * v)));
                for k in 0..K {
                    let piece = T::four(key[k].add(4 * c));
                    for (sum, p) in sums[k].iter_mut().zip(&pieces) {
                        // Channel l of the key times channel l of every row.
                        *sum = vfmaq_laneq_f32::<0>(*sum, p.0, piece);
                        *sum = vfmaq_laneq_f32::<1>(*sum, p.1, piece);
                        *sum = vfmaq_laneq_f32::<2>(*sum, p.2, piece);
                        *sum = vfmaq_laneq_f32::<3>(*sum, p.3, piece);
                    }
                }
            }
        };
        // Two chunks a step, then one.
        for c in (0..full / 2).map(|i| 2 * i) {
            chunk(&mut sums, q, c);
            chunk(&mut sums, q.wrapping_add(16 * V), c + 1);
            q = q.wrapping_add(32 * V);
        }
        if full % 2 == 1 {
            chunk(&mut sums, q, full - 1);
            q = q.wrapping_add(16 * V);
        }
        if full * 4 < head_dim {
            // One to three channels left: the key's zero-padded (the queries' are zero there).
            // SAFETY: the last chunk of the transposed queries; channels `4·full .. head_dim` of each key.
            unsafe {
                let pieces: [float32x4x4_t; V] = std::array::from_fn(|v| vld1q_f32_x4(q.add(16 * v)));
                for k in 0..K {
                    let mut padded = [0f32; 4];
                    for (l, p) in padded.iter_mut().enumerate().take(head_dim - 4 * full) {
                        *p = (*key[k].add(4 * full + l)).one();
                    }
                    let piece = vld1q_f32(padded.as_ptr());
                    for (sum, p) in sums[k].iter_mut().zip(&pieces) {
                        *sum = vfmaq_laneq_f32::<0>(*sum, p.0, piece);
                        *sum = vfmaq_laneq_f32::<1>(*sum, p.1, piece);
                        *sum = vfmaq_laneq_f32::<2>(*sum, p.2, piece);
                        *sum = vfmaq_laneq_f32::<3>(*sum, p.3, piece);
                    }
                }
            }
        }
        sums
    }

    /// `Σ_t weight[t][m] · value[t][channel .. channel + 4·W]` over `seen`
    /// positions for each of a tile's `4·V` rows (`weights` position-major,
    /// `4·V` a position), four positions a step.
    ///
    /// # Safety
    /// Channels `channel .. channel + 4·W` of positions below `seen` are in
    /// `values` (`t·stride + channel + 4·W ≤ values.len()`); `weights` holds
    /// `seen·4·V` values.
    #[inline(always)]
    unsafe fn value_block<T: Cached, const V: usize, const W: usize>(
        weights: &[f32],
        values: &[T],
        seen: usize,
        stride: usize,
        channel: usize,
    ) -> [[float32x4_t; W]; TILE_ROWS] {
        let mut sums = [[vdupq_n_f32(0.0); W]; TILE_ROWS];
        // One position: its weights (a lane a row) times its values.
        let step = |sums: &mut [[float32x4_t; W]; TILE_ROWS], w: *const f32, value: *const T| {
            // SAFETY: as the caller promises: this position's 4·V weights and 4·W values.
            unsafe {
                let lanes: [float32x4_t; V] = std::array::from_fn(|v| vld1q_f32(w.add(4 * v)));
                let piece: [float32x4_t; W] = std::array::from_fn(|i| T::four(value.add(4 * i)));
                for (v, weight) in lanes.iter().enumerate() {
                    for (i, p) in piece.iter().enumerate() {
                        sums[4 * v][i] = vfmaq_laneq_f32::<0>(sums[4 * v][i], *p, *weight);
                        sums[4 * v + 1][i] = vfmaq_laneq_f32::<1>(sums[4 * v + 1][i], *p, *weight);
                        sums[4 * v + 2][i] = vfmaq_laneq_f32::<2>(sums[4 * v + 2][i], *p, *weight);
                        sums[4 * v + 3][i] = vfmaq_laneq_f32::<3>(sums[4 * v + 3][i], *p, *weight);
                    }
                }
            }
        };
        let (mut w, mut value) = (weights.as_ptr(), values.as_ptr().wrapping_add(channel));
        for _ in 0..seen / 4 {
            for i in 0..4 {
                step(&mut sums, w.wrapping_add(4 * V * i), value.wrapping_add(stride * i));
            }
            w = w.wrapping_add(16 * V);
            value = value.wrapping_add(4 * stride);
        }
        for _ in 0..seen % 4 {
            step(&mut sums, w, value);
            w = w.wrapping_add(4 * V);
            value = value.wrapping_add(stride);
        }
        sums
    }
}
