//! Matrix × activation-batch products, by weight encoding.
//!
//! - [`scalar`]: the reference, plain loops, compiled everywhere.
//! - `neon` (aarch64): ARMv8.0 NEON, for the Raspberry Pi 4's Cortex-A72.
//!   Widening multiplies (`smull`, `smlal2`) into 16-bit lanes, pairwise
//!   accumulation (`sadalp`) into 32-bit sums.
//! - `dotprod` (aarch64 with the dot-product extension): the same kernels
//!   with `sdot`, for the Raspberry Pi 5's Cortex-A76.
//!
//! - `interleaved` (aarch64): both of those for the four-row interleaved
//!   blocks that images of layout 2 store (`crate::quant::Interleaved`).
//! - `avx2` (x86-64 with AVX2, FMA and F16C): the integer kernels for the
//!   host tools, `vpmaddubsw` with the sign trick for int8 weights, tiles of
//!   rows × activations for a batch.
//! - `avx512` (x86-64 with AVX-512 F, BW, VL and VNNI): the same products
//!   with `vpdpbusd`, weights as the unsigned operand with a zero point,
//!   16 rows a vector.
//! - [`channels`]: channel-major matrices over the active input channels
//!   only (R-Sparse's exact part), scalar and NEON, and their GEMM for a
//!   prompt (scalar, ARMv8.0, `sdot`, AVX2), in one file.
//!
//! The row-major integer kernels take four weight rows at a time against each
//! activation block, so one activation load serves four rows and the scale
//! math of a block is done for the four rows in one vector.

pub mod channels;
pub mod kquant;
pub mod q5;
pub mod scalar;

// `neon` first: its `asm!` text macros are in textual scope for `dotprod`.
#[cfg(target_arch = "aarch64")]
#[macro_use]
pub mod neon;
#[cfg(target_arch = "aarch64")]
pub mod dotprod;
#[cfg(target_arch = "aarch64")]
pub mod interleaved;

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;

#[cfg(test)]
mod tests {
    #[test]
    fn f16_conversion_is_exact_for_every_value() {
        for bits in 0..=u16::MAX {
            let h = half::f16::from_bits(bits);
            let (ours, theirs) = (super::scalar::f16_to_f32(h), h.to_f32());
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "{bits:#06x}: {ours} vs {theirs}"
            );
        }
    }

    use super::scalar::*;
    use crate::kernels::activation::scalar::quantize_activation;
    use crate::quant::*;

    /// Integer paths against a plain f32 product of the dequantized weights and
    /// the unquantized activations: the only error is activation rounding.
    const ACTIVATION_ROUNDING_BUDGET: f32 = 0.01;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn quantized_matmuls_match_f32_on_dequantized_weights() {
        let (rows, cols, batch) = (7, 96, 3);
        let w = data(rows * cols, 1);
        let x = data(batch * cols, 2);
        let mut xq = vec![BlockQ8Act { d: 0.0, s: 0.0, qs: [0; GROUP] }; batch * cols / GROUP];
        quantize_activation(&x, &mut xq);
        for enc in [Encoding::Q8, Encoding::Q4, Encoding::Q4S] {
            let mut bytes = vec![0u8; enc.bytes_for(w.len())];
            quantize_into(enc, &w, &mut bytes);
            let mut wd = vec![0f32; w.len()];
            dequantize_from(enc, &bytes, &mut wd);
            let mut expected = vec![0f32; rows * batch];
            matmul_f32(&wd, cols, &x, &mut expected);
            let mut got = vec![0f32; rows * batch];
            match enc {
                Encoding::Q8 => matmul_q8(&bytemuck::pod_collect_to_vec(&bytes), cols, &xq, &mut got),
                Encoding::Q4 => matmul_q4(&bytemuck::pod_collect_to_vec(&bytes), cols, &xq, &mut got),
                _ => matmul_q4s(&bytemuck::pod_collect_to_vec(&bytes), cols, &xq, &mut got),
            }
            let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (e, g) in expected.iter().zip(&got) {
                assert!((e - g).abs() <= ACTIVATION_ROUNDING_BUDGET * scale, "{enc:?}: {e} vs {g}");
            }
        }
    }
}
