//! Quantization of activations to int8 blocks ([`BlockQ8Act`]) for the integer dot products.

/// Reference implementation.
pub mod scalar {
    use crate::kquant::QK_K;
    use crate::quant::{BlockQ8Act, BlockQ8K, GROUP};

    /// Per block of 32: `d = max|x| / 127`, `q = round(x / d)`, `s = d · Σq`.
    pub fn quantize_activation(x: &[f32], out: &mut [BlockQ8Act]) {
        debug_assert_eq!(x.len(), out.len() * GROUP);
        for (block, values) in out.iter_mut().zip(x.chunks_exact(GROUP)) {
            let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in block.qs.iter_mut().zip(values) {
                *q = (v * id).round() as i8;
                sum += *q as i32;
            }
            block.d = d;
            block.s = d * sum as f32;
        }
    }

    /// Per 256 values ([`BlockQ8K`]): `d = max|x| / 127`, `q = round(x / d)`
    /// (the rule of [`quantize_activation`] over a whole super-block), and
    /// `Σq` over each 32.
    pub fn quantize_activation_q8k(x: &[f32], out: &mut [BlockQ8K]) {
        assert_eq!(x.len(), out.len() * QK_K, "{} values into {} blocks of {QK_K}", x.len(), out.len());
        for (block, values) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
            let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (q, &v) in block.qs.iter_mut().zip(values) {
                *q = (v * id).round() as i8;
            }
            for (sum, qs) in block.sums.iter_mut().zip(block.qs.chunks_exact(GROUP)) {
                *sum = qs.iter().map(|&q| q as i16).sum();
            }
            block.d = d;
        }
    }
}

/// NEON (ARMv8.0), bit-for-bit the reference: the same scale, the same
/// product `x · (1/d)`, rounded half away from zero (`fcvtas`, as `f32::round`).
#[cfg(target_arch = "aarch64")]
pub mod neon {
    use crate::kquant::QK_K;
    use crate::quant::{BlockQ8Act, BlockQ8K, GROUP};
    use std::arch::aarch64::*;

    /// Per block of 32: `d = max|x| / 127`, `q = round(x / d)`, `s = d · Σq`.
    pub fn quantize_activation(x: &[f32], out: &mut [BlockQ8Act]) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { quantize_activation_neon(x, out) }
    }

    #[target_feature(enable = "neon")]
    fn quantize_activation_neon(x: &[f32], out: &mut [BlockQ8Act]) {
        assert_eq!(x.len(), out.len() * GROUP, "{} values into {} blocks", x.len(), out.len());
        for (block, values) in out.iter_mut().zip(x.chunks_exact(GROUP)) {
            // SAFETY: `values` is 32 floats, `block.qs` 32 bytes.
            unsafe {
                let v = load_32(values);
                // Largest magnitude: |x| lane-wise, a tree of maxima, then across lanes.
                let m = v.map(|lane| vabsq_f32(lane));
                let m = [vmaxq_f32(m[0], m[1]), vmaxq_f32(m[2], m[3]), vmaxq_f32(m[4], m[5]), vmaxq_f32(m[6], m[7])];
                let amax = vmaxvq_f32(vmaxq_f32(vmaxq_f32(m[0], m[1]), vmaxq_f32(m[2], m[3])));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let sum = rounded_32(v, id, block.qs.as_mut_ptr());
                block.d = d;
                block.s = d * sum as f32;
            }
        }
    }

    /// 32 floats from `values` as eight vectors.
    ///
    /// # Safety
    /// `values` has 32 floats.
    #[inline(always)]
    unsafe fn load_32(values: &[f32]) -> [float32x4_t; 8] {
        let v = [vld1q_f32_x4(values.as_ptr()), vld1q_f32_x4(values.as_ptr().add(16))];
        [v[0].0, v[0].1, v[0].2, v[0].3, v[1].0, v[1].1, v[1].2, v[1].3]
    }

    /// `v · id` rounded half away from zero (`fcvtas`, as `f32::round`) and
    /// narrowed 32 → 16 → 8 bits into `qs` (|q| ≤ 127, nothing is lost);
    /// returns `Σq`.
    ///
    /// # Safety
    /// `qs` has 32 writable bytes.
    #[inline(always)]
    unsafe fn rounded_32(v: [float32x4_t; 8], id: f32, qs: *mut i8) -> i16 {
        let q = v.map(|lane| vcvtaq_s32_f32(vmulq_n_f32(lane, id)));
        let h = [
            vmovn_high_s32(vmovn_s32(q[0]), q[1]),
            vmovn_high_s32(vmovn_s32(q[2]), q[3]),
            vmovn_high_s32(vmovn_s32(q[4]), q[5]),
            vmovn_high_s32(vmovn_s32(q[6]), q[7]),
        ];
        vst1q_s8_x2(qs, int8x16x2_t(vmovn_high_s16(vmovn_s16(h[0]), h[1]), vmovn_high_s16(vmovn_s16(h[2]), h[3])));
        vaddvq_s16(vaddq_s16(vaddq_s16(h[0], h[1]), vaddq_s16(h[2], h[3])))
    }

    /// Per 256 values ([`BlockQ8K`]), bit for bit
    /// [`super::scalar::quantize_activation_q8k`].
    pub fn quantize_activation_q8k(x: &[f32], out: &mut [BlockQ8K]) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { quantize_activation_q8k_neon(x, out) }
    }

    #[target_feature(enable = "neon")]
    fn quantize_activation_q8k_neon(x: &[f32], out: &mut [BlockQ8K]) {
        assert_eq!(x.len(), out.len() * QK_K, "{} values into {} blocks of {QK_K}", x.len(), out.len());
        for (block, values) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
            // Largest magnitude over the 256 values, 16 at a time; `fmaxnm`
            // passes over a NaN as `f32::max` does.
            let mut m = vdupq_n_f32(0.0);
            for sixteen in values.chunks_exact(16) {
                // SAFETY: `sixteen` is 16 readable floats.
                let v = unsafe { vld1q_f32_x4(sixteen.as_ptr()) };
                let pairs = [vmaxnmq_f32(vabsq_f32(v.0), vabsq_f32(v.1)), vmaxnmq_f32(vabsq_f32(v.2), vabsq_f32(v.3))];
                m = vmaxnmq_f32(m, vmaxnmq_f32(pairs[0], pairs[1]));
            }
            let d = vmaxnmvq_f32(m) / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for ((values, qs), sum) in
                values.chunks_exact(GROUP).zip(block.qs.chunks_exact_mut(GROUP)).zip(&mut block.sums)
            {
                // SAFETY: `values` is 32 floats, `qs` 32 bytes.
                *sum = unsafe { rounded_32(load_32(values), id, qs.as_mut_ptr()) };
            }
            block.d = d;
        }
    }
}

/// AVX2 (x86-64 hosts), bit-for-bit the reference on every input, NaN and
/// infinities included: the same scale and product, rounded half away from
/// zero as `f32::round`, saturated as `as i8`.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use crate::kernels::matmul::avx2::available;
    use crate::quant::{BlockQ8Act, GROUP};
    use std::arch::x86_64::*;

    /// Per block of 32: `d = max|x| / 127`, `q = round(x / d)`, `s = d · Σq`.
    /// Panics on a CPU without AVX2, FMA and F16C.
    pub fn quantize_activation(x: &[f32], out: &mut [BlockQ8Act]) {
        assert!(available(), "AVX2 kernel on a CPU without AVX2, FMA and F16C");
        assert_eq!(x.len(), out.len() * GROUP, "{} values into {} blocks", x.len(), out.len());
        // SAFETY: the CPU has the features (checked above).
        unsafe { quantize_activation_avx2(x, out) }
    }

    /// `f32::round` then `as i8` on eight lanes, as int32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn round_to_int8(p: __m256) -> __m256i {
        let sign = _mm256_set1_ps(-0.0);
        // Truncate, then step one away from zero where the dropped fraction
        // (exact: p − trunc(p)) is at least a half.
        let truncated = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
        let fraction = _mm256_andnot_ps(sign, _mm256_sub_ps(p, truncated));
        let away = _mm256_or_ps(_mm256_set1_ps(1.0), _mm256_and_ps(p, sign));
        let half_or_more = _mm256_cmp_ps::<_CMP_GE_OQ>(fraction, _mm256_set1_ps(0.5));
        let rounded = _mm256_add_ps(truncated, _mm256_and_ps(half_or_more, away));
        // `as i8`: NaN to 0, then saturate (±∞ where 1/d overflowed).
        let rounded = _mm256_and_ps(rounded, _mm256_cmp_ps::<_CMP_ORD_Q>(p, p));
        let clamped = _mm256_min_ps(_mm256_max_ps(rounded, _mm256_set1_ps(-128.0)), _mm256_set1_ps(127.0));
        _mm256_cvtps_epi32(clamped)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn quantize_activation_avx2(x: &[f32], out: &mut [BlockQ8Act]) {
        let sign = _mm256_set1_ps(-0.0);
        for (block, values) in out.iter_mut().zip(x.chunks_exact(GROUP)) {
            // SAFETY: `values` is 32 floats (four loads of 8), `block.qs` 32 bytes.
            unsafe {
                let v = [
                    _mm256_loadu_ps(values.as_ptr()),
                    _mm256_loadu_ps(values.as_ptr().add(8)),
                    _mm256_loadu_ps(values.as_ptr().add(16)),
                    _mm256_loadu_ps(values.as_ptr().add(24)),
                ];
                // Largest magnitude, NaN skipped as `f32::max` skips it
                // (`maxps` returns its second operand when either is NaN).
                let mut largest = _mm256_setzero_ps();
                for lane in v {
                    largest = _mm256_max_ps(_mm256_andnot_ps(sign, lane), largest);
                }
                let four = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
                let two = _mm_max_ps(four, _mm_movehl_ps(four, four));
                let amax = _mm_cvtss_f32(_mm_max_ss(two, _mm_movehdup_ps(two)));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let scale = _mm256_set1_ps(id);
                let q = [
                    round_to_int8(_mm256_mul_ps(v[0], scale)),
                    round_to_int8(_mm256_mul_ps(v[1], scale)),
                    round_to_int8(_mm256_mul_ps(v[2], scale)),
                    round_to_int8(_mm256_mul_ps(v[3], scale)),
                ];
                // Σq in 32-bit lanes, then across them.
                let total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                let four = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
                let two = _mm_add_epi32(four, _mm_shuffle_epi32::<0b01_00_11_10>(four));
                let sum = _mm_cvtsi128_si32(_mm_add_epi32(two, _mm_shuffle_epi32::<0b10_11_00_01>(two)));
                // Narrow 32 → 16 → 8 bits (within ±128, nothing is lost); the
                // packs work within 128-bit halves, so the four-byte words come
                // out as 0, 2, 4, 6 | 1, 3, 5, 7 of the wanted order: put back.
                let words = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
                let bytes = _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(block.qs.as_mut_ptr().cast(), bytes);
                block.d = d;
                block.s = d * sum as f32;
            }
        }
    }
}
