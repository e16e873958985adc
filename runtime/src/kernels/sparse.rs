//! R-Sparse's split of a linear layer's input: channel `i` is exact when
//! `|x_i · c_i| > τ` (its column score `c_i`), else it goes to the low-rank
//! part. One pass writes both halves (`x ⊙ m`, `x ⊙ (1 − m)`) and the mask
//! as bits, 32 channels a word, for the channel-major kernels.

/// `(x, scores, threshold, exact, rest, mask)`: fills `exact`, `rest` and
/// `mask` (`x.len() / 32` words, bit `j` of word `b` for channel `32b + j`)
/// and returns how many channels went to the low-rank part.
pub type Split = fn(&[f32], &[f32], f32, &mut [f32], &mut [f32], &mut [u32]) -> usize;

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

/// Reference loop.
pub mod scalar {
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
    use std::arch::aarch64::*;

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
