//! Quantization of activations to int8 blocks ([`BlockQ8Act`]) for the integer dot products.

/// Reference implementation.
pub mod scalar {
    use crate::quant::{BlockQ8Act, GROUP};

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
}

/// NEON (ARMv8.0), bit-for-bit the reference: the same scale, the same
/// product `x · (1/d)`, rounded half away from zero (`fcvtas`, as `f32::round`).
#[cfg(target_arch = "aarch64")]
pub mod neon {
    use crate::quant::{BlockQ8Act, GROUP};
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
            // SAFETY: `values` is 32 floats (two loads of 16), `block.qs` 32 bytes.
            unsafe {
                let v = [vld1q_f32_x4(values.as_ptr()), vld1q_f32_x4(values.as_ptr().add(16))];
                let v = [v[0].0, v[0].1, v[0].2, v[0].3, v[1].0, v[1].1, v[1].2, v[1].3];
                // Largest magnitude: |x| lane-wise, a tree of maxima, then across lanes.
                let m = v.map(|lane| vabsq_f32(lane));
                let m = [vmaxq_f32(m[0], m[1]), vmaxq_f32(m[2], m[3]), vmaxq_f32(m[4], m[5]), vmaxq_f32(m[6], m[7])];
                let amax = vmaxvq_f32(vmaxq_f32(vmaxq_f32(m[0], m[1]), vmaxq_f32(m[2], m[3])));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                // Scale and round to int32, half away from zero.
                let q = v.map(|lane| vcvtaq_s32_f32(vmulq_n_f32(lane, id)));
                // Σq for s, in 32-bit lanes.
                let total = vaddq_s32(
                    vaddq_s32(vaddq_s32(q[0], q[1]), vaddq_s32(q[2], q[3])),
                    vaddq_s32(vaddq_s32(q[4], q[5]), vaddq_s32(q[6], q[7])),
                );
                // Narrow 32 → 16 → 8 bits (|q| ≤ 127, nothing is lost).
                let h = [
                    vmovn_high_s32(vmovn_s32(q[0]), q[1]),
                    vmovn_high_s32(vmovn_s32(q[2]), q[3]),
                    vmovn_high_s32(vmovn_s32(q[4]), q[5]),
                    vmovn_high_s32(vmovn_s32(q[6]), q[7]),
                ];
                let bytes = int8x16x2_t(vmovn_high_s16(vmovn_s16(h[0]), h[1]), vmovn_high_s16(vmovn_s16(h[2]), h[3]));
                vst1q_s8_x2(block.qs.as_mut_ptr(), bytes);
                block.d = d;
                block.s = d * vaddvq_s32(total) as f32;
            }
        }
    }
}
