//! R-Sparse's split of a linear layer's input: channel `i` is exact when
//! `|x_i · c_i| > τ` (its column score `c_i`), else it goes to the low-rank
//! part. One pass writes both halves (`x ⊙ m`, `x ⊙ (1 − m)`) and the mask
//! as bits, 32 channels a word, for the channel-major kernels.

/// `(x, scores, threshold, exact, rest, mask)`: fills `exact`, `rest` and
/// `mask` (`x.len() / 32` words, bit `j` of word `b` for channel `32b + j`)
/// and returns how many channels went to the low-rank part.
pub type Split = fn(&[f32], &[f32], f32, &mut [f32], &mut [f32], &mut [u32]) -> usize;

/// `(u_columns, low, out)`: `out += Σ_k low[k] · u_columns[k·rows ..][..rows]`
/// with `rows = out.len()` and `k < low.len()`: the low-rank part's `U · low`,
/// `U` stored column by column (f16).
pub type LowRankAdd = fn(&[f16], &[f32], &mut [f32]);

/// Checks the shapes both versions of the low-rank addition rely on.
#[inline(always)]
fn check_low_rank(u_columns: &[f16], low: &[f32], out: &[f32]) {
    assert!(
        u_columns.len() == low.len() * out.len(),
        "low-rank shapes disagree: {} values of U for rank {} and {} rows",
        u_columns.len(),
        low.len(),
        out.len()
    );
}

/// Checks the shapes both versions rely on.
#[inline(always)]
fn check(x: &[f32], scores: &[f32], exact: &[f32], rest: &[f32], mask: &[u32]) {
    let n = x.len();
    assert!(
        n.is_multiple_of(32) && scores.len() == n && exact.len() == n && rest.len() == n && mask.len() == n / 32,
        "split shapes disagree: {n} values, {} scores, {} + {} outputs, {} mask words",
        scores.len(),
        exact.len(),
        rest.len(),
        mask.len()
    );
}

use half::f16;

/// Reference loops.
pub mod scalar {
    use super::f16;

    /// See [`super::LowRankAdd`]. Each row's sum in `k` order, then added.
    pub fn low_rank_add(u_columns: &[f16], low: &[f32], out: &mut [f32]) {
        super::check_low_rank(u_columns, low, out);
        low_rank_add_rows(u_columns, low, out, 0);
    }

    /// [`low_rank_add`] for the rows from `first` on (the NEON version's tail).
    pub(super) fn low_rank_add_rows(u_columns: &[f16], low: &[f32], out: &mut [f32], first: usize) {
        let rows = out.len();
        for (r, o) in out.iter_mut().enumerate().skip(first) {
            let mut sum = 0f32;
            for (k, &l) in low.iter().enumerate() {
                sum += l * crate::kernels::matmul::scalar::f16_to_f32(u_columns[k * rows + r]);
            }
            *o += sum;
        }
    }

    /// See [`super::Split`].
    pub fn split(
        x: &[f32],
        scores: &[f32],
        threshold: f32,
        exact: &mut [f32],
        rest: &mut [f32],
        mask: &mut [u32],
    ) -> usize {
        super::check(x, scores, exact, rest, mask);
        let mut masked = 0;
        for (i, (&v, &c)) in x.iter().zip(scores).enumerate() {
            let keep = (v * c).abs() > threshold;
            (exact[i], rest[i]) = if keep { (v, 0.0) } else { (0.0, v) };
            if i % 32 == 0 {
                mask[i / 32] = 0;
            }
            mask[i / 32] |= (keep as u32) << (i % 32);
            masked += !keep as usize;
        }
        masked
    }
}

/// NEON: four channels a step; the comparison's all-ones lanes select the
/// halves (`and`, `bic`) and, masked to one bit each, add up to the mask's
/// four bits (`addv`).
#[cfg(target_arch = "aarch64")]
pub mod neon {
    use super::f16;
    use crate::kernels::matmul::neon::{widen_f16, widen_f16_high};
    use std::arch::aarch64::*;

    /// See [`super::LowRankAdd`]: 16 rows a step, their sums in four
    /// registers across the rank, each column's f16 values widened (`fcvtl`).
    pub fn low_rank_add(u_columns: &[f16], low: &[f32], out: &mut [f32]) {
        super::check_low_rank(u_columns, low, out);
        let rows = out.len();
        let full = rows - rows % 16;
        let u = u_columns.as_ptr() as *const u16;
        // SAFETY: column `k` is `u_columns[k·rows .. (k+1)·rows]` (`check_low_rank`);
        // the steps read rows `first .. first + 16 ≤ full` of it and write those of `out`.
        unsafe {
            for first in (0..full).step_by(16) {
                let mut sums = [vdupq_n_f32(0.0); 4];
                for (k, &l) in low.iter().enumerate() {
                    let column = u.add(k * rows + first);
                    let (a, b) = (vld1q_u16(column), vld1q_u16(column.add(8)));
                    let wide =
                        [widen_f16(vget_low_u16(a)), widen_f16_high(a), widen_f16(vget_low_u16(b)), widen_f16_high(b)];
                    for (sum, w) in sums.iter_mut().zip(wide) {
                        *sum = vfmaq_n_f32(*sum, w, l);
                    }
                }
                for (e, sum) in sums.into_iter().enumerate() {
                    let o = out.as_mut_ptr().add(first + 4 * e);
                    vst1q_f32(o, vaddq_f32(vld1q_f32(o), sum));
                }
            }
        }
        super::scalar::low_rank_add_rows(u_columns, low, out, full);
    }

    /// See [`super::Split`].
    pub fn split(
        x: &[f32],
        scores: &[f32],
        threshold: f32,
        exact: &mut [f32],
        rest: &mut [f32],
        mask: &mut [u32],
    ) -> usize {
        super::check(x, scores, exact, rest, mask);
        let mut kept = 0;
        // SAFETY: `check` gave every slice `x.len()` values (a multiple of
        // 32) and `mask` one word per 32; the loops stay inside them.
        unsafe {
            let tau = vdupq_n_f32(threshold);
            let weights = vld1q_u32([1u32, 2, 4, 8].as_ptr());
            for (b, word) in mask.iter_mut().enumerate() {
                let mut bits = 0u32;
                for step in 0..8 {
                    let i = 32 * b + 4 * step;
                    let v = vld1q_f32(x.as_ptr().add(i));
                    let c = vld1q_f32(scores.as_ptr().add(i));
                    let keep = vcgtq_f32(vabsq_f32(vmulq_f32(v, c)), tau);
                    let raw = vreinterpretq_u32_f32(v);
                    vst1q_f32(exact.as_mut_ptr().add(i), vreinterpretq_f32_u32(vandq_u32(raw, keep)));
                    vst1q_f32(rest.as_mut_ptr().add(i), vreinterpretq_f32_u32(vbicq_u32(raw, keep)));
                    bits |= vaddvq_u32(vandq_u32(keep, weights)) << (4 * step);
                }
                *word = bits;
                kept += bits.count_ones() as usize;
            }
        }
        x.len() - kept
    }
}

#[cfg(test)]
mod tests {
    use super::super::Kernels;
    use half::f16;

    /// The low-rank addition: f32 sums of `rank` products in another order
    /// (NEON fuses the multiply-adds), relative to `Σ |terms|`.
    const LOW_RANK_RELATIVE: f32 = 1e-6;

    #[test]
    fn low_rank_add_matches_the_reference() {
        for rows in [1, 15, 16, 17, 48, 100] {
            for rank in [0, 1, 3, 7, 16] {
                let u: Vec<f16> =
                    (0..rows * rank).map(|i| f16::from_f32(((i * 29 % 41) as f32 - 20.0) / 13.0)).collect();
                let low: Vec<f32> = (0..rank).map(|k| (k as f32 - 2.5) * 0.75).collect();
                let start: Vec<f32> = (0..rows).map(|r| r as f32 * 0.125 - 3.0).collect();
                let mut expected = start.clone();
                (Kernels::SCALAR.low_rank_add)(&u, &low, &mut expected);
                for k in Kernels::all_available() {
                    let mut got = start.clone();
                    (k.low_rank_add)(&u, &low, &mut got);
                    for r in 0..rows {
                        let terms: f32 =
                            start[r].abs() + (0..rank).map(|j| (low[j] * u[j * rows + r].to_f32()).abs()).sum::<f32>();
                        let (g, e) = (got[r], expected[r]);
                        assert!(
                            (g - e).abs() <= LOW_RANK_RELATIVE * terms,
                            "{} rows {rows} rank {rank} [{r}]: {g} vs {e}",
                            k.name
                        );
                    }
                    if rank > 0 {
                        let direct: f32 = start[0] + (0..rank).map(|j| low[j] * u[j * rows].to_f32()).sum::<f32>();
                        assert!(
                            (expected[0] - direct).abs() <= LOW_RANK_RELATIVE * 100.0,
                            "scalar row 0: {} vs {direct}",
                            expected[0]
                        );
                    }
                }
            }
        }
    }

    /// Every table splits as the reference does, bit for bit (a comparison
    /// and a selection, no arithmetic but one product), on values around
    /// the threshold, zeros, negative zeros and NaN.
    #[test]
    fn split_matches_the_reference() {
        let n = 96;
        let x: Vec<f32> = (0..n)
            .map(|i| match i % 11 {
                0 => 0.0,
                1 => -0.0,
                2 => f32::NAN,
                _ => ((i * 37 % 23) as f32 - 11.0) / 7.0,
            })
            .collect();
        let scores: Vec<f32> = (0..n).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect();
        for threshold in [0.0, 0.5, 1.0, f32::INFINITY] {
            let run = |k: &Kernels| {
                let (mut exact, mut rest, mut mask) = (vec![9f32; n], vec![9f32; n], vec![7u32; n / 32]);
                let masked = (k.sparse_split)(&x, &scores, threshold, &mut exact, &mut rest, &mut mask);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                (masked, bits(&exact), bits(&rest), mask)
            };
            let expected = run(&Kernels::SCALAR);
            let ones: u32 = expected.3.iter().map(|w| w.count_ones()).sum();
            assert_eq!(expected.0 + ones as usize, n, "τ {threshold}: mask and count agree");
            for k in Kernels::all_available() {
                assert_eq!(run(k), expected, "{} τ {threshold}", k.name);
            }
        }
    }
}
