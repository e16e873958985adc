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

/// Reference implementations.
pub mod scalar {
    use crate::kernels::matmul::scalar::dot_f32;

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
}

/// NEON versions (every aarch64 core). The dot products add in another
/// order than the reference; the weighted sums use fused multiply-adds.
#[cfg(target_arch = "aarch64")]
pub mod neon {
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
}
