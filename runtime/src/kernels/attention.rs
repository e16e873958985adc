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

/// Tokens whose keys share a scale and minimum per channel.
pub const KEY_GROUP: usize = 32;
/// Channels the quantized kernels handle together; `head_dim` must be a multiple.
pub const CHANNEL_RUN: usize = 32;

/// Reference implementations.
pub mod scalar {
    use super::KEY_GROUP;
    use crate::kernels::matmul::scalar::dot_f32;
    use half::f16;

    /// `scores[h·positions + t] = scale · queries[h] · key[t]`.
    pub fn scores(
        queries: &[f32],
        head_dim: usize,
        keys: &[f32],
        stride: usize,
        positions: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        for (query, row) in queries.chunks_exact(head_dim).zip(scores.chunks_exact_mut(positions)) {
            for (t, score) in row.iter_mut().enumerate() {
                *score = dot_f32(query, &keys[t * stride..t * stride + head_dim]) * scale;
            }
        }
    }

    /// `out[h] = Σₜ weights[h·positions + t] · value[t]`.
    pub fn values(weights: &[f32], positions: usize, values: &[f32], stride: usize, head_dim: usize, out: &mut [f32]) {
        for (head, row) in out.chunks_exact_mut(head_dim).zip(weights.chunks_exact(positions)) {
            head.fill(0.0);
            for (t, &weight) in row.iter().enumerate() {
                for (o, v) in head.iter_mut().zip(&values[t * stride..t * stride + head_dim]) {
                    *o += weight * v;
                }
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
    #[allow(clippy::too_many_arguments)]
    pub fn scores_quantized(
        bits: u32,
        queries: &[f32],
        head_dim: usize,
        codes: &[u8],
        key_scales: &[f16],
        key_mins: &[f16],
        groups: usize,
        scale: f32,
        scores: &mut [f32],
        row: usize,
    ) {
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
    #[allow(clippy::too_many_arguments)]
    pub fn values_quantized(
        bits: u32,
        weights: &[f32],
        row: usize,
        positions: usize,
        codes: &[u8],
        value_scales: &[f16],
        value_mins: &[f16],
        head_dim: usize,
        out: &mut [f32],
    ) {
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
    #[allow(clippy::too_many_arguments)]
    pub fn scores_q8(
        queries: &[f32],
        head_dim: usize,
        codes: &[u8],
        key_scales: &[f16],
        key_mins: &[f16],
        groups: usize,
        scale: f32,
        scores: &mut [f32],
        row: usize,
    ) {
        scores_quantized(8, queries, head_dim, codes, key_scales, key_mins, groups, scale, scores, row)
    }

    /// [`scores_quantized`] at 4 bits.
    #[allow(clippy::too_many_arguments)]
    pub fn scores_q4(
        queries: &[f32],
        head_dim: usize,
        codes: &[u8],
        key_scales: &[f16],
        key_mins: &[f16],
        groups: usize,
        scale: f32,
        scores: &mut [f32],
        row: usize,
    ) {
        scores_quantized(4, queries, head_dim, codes, key_scales, key_mins, groups, scale, scores, row)
    }

    /// [`values_quantized`] at 8 bits.
    #[allow(clippy::too_many_arguments)]
    pub fn values_q8(
        weights: &[f32],
        row: usize,
        positions: usize,
        codes: &[u8],
        value_scales: &[f16],
        value_mins: &[f16],
        head_dim: usize,
        out: &mut [f32],
    ) {
        values_quantized(8, weights, row, positions, codes, value_scales, value_mins, head_dim, out)
    }

    /// [`values_quantized`] at 4 bits.
    #[allow(clippy::too_many_arguments)]
    pub fn values_q4(
        weights: &[f32],
        row: usize,
        positions: usize,
        codes: &[u8],
        value_scales: &[f16],
        value_mins: &[f16],
        head_dim: usize,
        out: &mut [f32],
    ) {
        values_quantized(4, weights, row, positions, codes, value_scales, value_mins, head_dim, out)
    }
}

/// NEON versions (every aarch64 core). The dot products add in another
/// order than the reference; the weighted sums use fused multiply-adds.
#[cfg(target_arch = "aarch64")]
pub mod neon {
    use super::{CHANNEL_RUN, KEY_GROUP};
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
    pub fn scores(
        queries: &[f32],
        head_dim: usize,
        keys: &[f32],
        stride: usize,
        positions: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        check(queries.len(), head_dim, keys.len(), stride, positions, scores.len());
        // SAFETY: NEON is part of every aarch64 target; shapes checked above.
        unsafe { scores_neon(queries, head_dim, keys, stride, positions, scale, scores) }
    }

    /// # Safety
    /// Shapes as [`check`] accepts.
    #[target_feature(enable = "neon")]
    unsafe fn scores_neon(
        queries: &[f32],
        head_dim: usize,
        keys: &[f32],
        stride: usize,
        positions: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
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
    pub fn values(weights: &[f32], positions: usize, values: &[f32], stride: usize, head_dim: usize, out: &mut [f32]) {
        check(out.len(), head_dim, values.len(), stride, positions, weights.len());
        // SAFETY: NEON is part of every aarch64 target; shapes checked above.
        unsafe { values_neon(weights, positions, values, stride, head_dim, out) }
    }

    /// # Safety
    /// Shapes as [`check`] accepts.
    #[target_feature(enable = "neon")]
    unsafe fn values_neon(
        weights: &[f32],
        positions: usize,
        values: &[f32],
        stride: usize,
        head_dim: usize,
        out: &mut [f32],
    ) {
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

    /// Checks the quantized scores kernel's shapes (so the unchecked loads are in bounds).
    #[allow(clippy::too_many_arguments)]
    fn check_scores_quantized(
        bits: u32,
        queries: usize,
        head_dim: usize,
        codes: usize,
        key_scales: usize,
        key_mins: usize,
        groups: usize,
        scores: usize,
        row: usize,
    ) {
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
    #[allow(clippy::too_many_arguments)]
    fn check_values_quantized(
        bits: u32,
        weights: usize,
        row: usize,
        positions: usize,
        codes: usize,
        value_scales: usize,
        value_mins: usize,
        head_dim: usize,
        out: usize,
    ) {
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
    #[allow(clippy::too_many_arguments)]
    pub fn scores_q8(
        queries: &[f32],
        head_dim: usize,
        codes: &[u8],
        key_scales: &[f16],
        key_mins: &[f16],
        groups: usize,
        scale: f32,
        scores: &mut [f32],
        row: usize,
    ) {
        let shapes = (codes.len(), key_scales.len(), key_mins.len());
        check_scores_quantized(8, queries.len(), head_dim, shapes.0, shapes.1, shapes.2, groups, scores.len(), row);
        // SAFETY: NEON is part of every aarch64 target; shapes checked above.
        unsafe { scores_quantized::<8>(queries, head_dim, codes, key_scales, key_mins, groups, scale, scores, row) }
    }

    /// As [`super::scalar::scores_q4`].
    #[allow(clippy::too_many_arguments)]
    pub fn scores_q4(
        queries: &[f32],
        head_dim: usize,
        codes: &[u8],
        key_scales: &[f16],
        key_mins: &[f16],
        groups: usize,
        scale: f32,
        scores: &mut [f32],
        row: usize,
    ) {
        let shapes = (codes.len(), key_scales.len(), key_mins.len());
        check_scores_quantized(4, queries.len(), head_dim, shapes.0, shapes.1, shapes.2, groups, scores.len(), row);
        // SAFETY: NEON is part of every aarch64 target; shapes checked above.
        unsafe { scores_quantized::<4>(queries, head_dim, codes, key_scales, key_mins, groups, scale, scores, row) }
    }

    /// A group's 32 scores a head at a time, held in eight registers while
    /// the group's channels stream past.
    ///
    /// # Safety
    /// Shapes as [`check_scores_quantized`] accepts.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "neon")]
    unsafe fn scores_quantized<const BITS: u32>(
        queries: &[f32],
        head_dim: usize,
        codes: &[u8],
        key_scales: &[f16],
        key_mins: &[f16],
        groups: usize,
        scale: f32,
        scores: &mut [f32],
        row: usize,
    ) {
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
    #[allow(clippy::too_many_arguments)]
    pub fn values_q8(
        weights: &[f32],
        row: usize,
        positions: usize,
        codes: &[u8],
        value_scales: &[f16],
        value_mins: &[f16],
        head_dim: usize,
        out: &mut [f32],
    ) {
        let shapes = (codes.len(), value_scales.len(), value_mins.len());
        check_values_quantized(8, weights.len(), row, positions, shapes.0, shapes.1, shapes.2, head_dim, out.len());
        // SAFETY: NEON is part of every aarch64 target; shapes checked above.
        unsafe { values_quantized::<8>(weights, row, positions, codes, value_scales, value_mins, head_dim, out) }
    }

    /// As [`super::scalar::values_q4`].
    #[allow(clippy::too_many_arguments)]
    pub fn values_q4(
        weights: &[f32],
        row: usize,
        positions: usize,
        codes: &[u8],
        value_scales: &[f16],
        value_mins: &[f16],
        head_dim: usize,
        out: &mut [f32],
    ) {
        let shapes = (codes.len(), value_scales.len(), value_mins.len());
        check_values_quantized(4, weights.len(), row, positions, shapes.0, shapes.1, shapes.2, head_dim, out.len());
        // SAFETY: NEON is part of every aarch64 target; shapes checked above.
        unsafe { values_quantized::<4>(weights, row, positions, codes, value_scales, value_mins, head_dim, out) }
    }

    /// A head's output 32 channels at a time, held in eight registers while
    /// the tokens stream past.
    ///
    /// # Safety
    /// Shapes as [`check_values_quantized`] accepts.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "neon")]
    unsafe fn values_quantized<const BITS: u32>(
        weights: &[f32],
        row: usize,
        positions: usize,
        codes: &[u8],
        value_scales: &[f16],
        value_mins: &[f16],
        head_dim: usize,
        out: &mut [f32],
    ) {
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
}
