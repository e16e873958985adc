//! Products of k-quant matrices (ggml's Q2_K, Q3_K, Q4_K, Q5_K, Q6_K blocks, carried
//! bit-exact from a GGUF file) with int8 activations.
//!
//! - [`scalar`]: the reference, compiled everywhere.
//! - `neon` (aarch64): ARMv8.0 NEON for the Raspberry Pi 4's Cortex-A72, four
//!   rows at a time, widening multiplies into 16-bit lanes.
//! - `dotprod` (aarch64 with the dot-product extension): `sdot` kernels, four
//!   rows against each activation block, for the Raspberry Pi 5's Cortex-A76.
//! - `avx2` (x86-64 with AVX2, FMA and F16C): `vpmaddubsw` kernels, four rows
//!   against each activation block, for the host tools (perplexity,
//!   conversion, calibration).
//!
//! Rows must be a whole number of 256-value super-blocks; activations stay
//! in the runtime's 32-value blocks ([`crate::quant::BlockQ8Act`]), so a
//! super-block meets eight of them, and each of its sub-blocks' scales meets
//! exactly one activation scale. Q2_K's minimums, one per sub-block of 16,
//! meet the sums of the activation's int8 values over each half of a block
//! (the block's `s` covers all 32), which the kernels add up as they go.

/// The widening products of the ARMv8.0 interleaved kernels, as `asm`
/// text: for each pair of a weight operand `w` (four rows' bytes) and an
/// activation register `a` (a column group broadcast), rows 0–1's products
/// go into the 16-bit lanes of operand `lo` and rows 2–3's into `hi`.
/// `start` begins the sums with the first pair (`smull`, `smull2`), `more`
/// adds every pair to sums already there (`smlal`, `smlal2`):
/// `widening_products!(start "lo" "hi"; "w0" "v28", "w1" "v29")`.
#[cfg(target_arch = "aarch64")]
macro_rules! widening_products {
    (start $lo:literal $hi:literal; $w0:literal $a0:literal $(, $w:literal $a:literal)* $(,)?) => {
        concat!(
            "smull {", $lo, ":v}.8h, {", $w0, ":v}.8b, ", $a0, ".8b\n",
            "smull2 {", $hi, ":v}.8h, {", $w0, ":v}.16b, ", $a0, ".16b\n",
            widening_products!(more $lo $hi; $($w $a),*),
        )
    };
    (more $lo:literal $hi:literal; $($w:literal $a:literal),* $(,)?) => {
        concat!($(
            "smlal {", $lo, ":v}.8h, {", $w, ":v}.8b, ", $a, ".8b\n",
            "smlal2 {", $hi, ":v}.8h, {", $w, ":v}.16b, ", $a, ".16b\n",
        )*)
    };
}

pub mod interleaved;
pub mod interleaved35;
pub mod scalar;
pub mod superblock;

#[cfg(target_arch = "x86_64")]
pub mod avx2;

#[cfg(target_arch = "aarch64")]
pub mod dotprod;
#[cfg(target_arch = "aarch64")]
pub mod neon;

#[cfg(test)]
mod test_support;

#[cfg(test)]
mod tests {
    use super::test_support::Format;
    use crate::kernels::activation::scalar::quantize_activation;
    use crate::kquant::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, QK_K};
    use crate::quant::{BlockQ8Act, GROUP};

    /// The reference against a plain f32 product of the dequantized weights
    /// and the dequantized activations: the same numbers, summed in another
    /// order, so only float rounding separates them (relative to the sum of
    /// the products' magnitudes).
    const REORDERING_BUDGET: f32 = 1e-5;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn check<B: Format>() {
        for (rows, cols, batch) in [(1, QK_K, 1), (5, 3 * QK_K, 2), (8, 6 * QK_K, 3)] {
            let w = data(rows * cols, 7);
            let blocks: Vec<B> = w.chunks_exact(QK_K).map(B::quantize).collect();
            let mut wd = vec![0f32; w.len()];
            for (b, out) in blocks.iter().zip(wd.chunks_exact_mut(QK_K)) {
                b.dequantize(out);
            }
            let x = data(batch * cols, 11);
            let mut xq = vec![BlockQ8Act { d: 0.0, s: 0.0, qs: [0; GROUP] }; batch * cols / GROUP];
            quantize_activation(&x, &mut xq);
            let xd: Vec<f32> = xq.iter().flat_map(|a| a.qs.map(|q| q as f32 * a.d)).collect();
            let mut got = vec![0f32; rows * batch];
            B::reference(&blocks, cols, &xq, &mut got);
            for r in 0..rows {
                for b in 0..batch {
                    let (row, act) = (&wd[r * cols..][..cols], &xd[b * cols..][..cols]);
                    let expected: f32 = row.iter().zip(act).map(|(a, b)| a * b).sum();
                    let magnitude: f32 = row.iter().zip(act).map(|(a, b)| (a * b).abs()).sum();
                    let g = got[r * batch + b];
                    assert!(
                        (g - expected).abs() <= REORDERING_BUDGET * magnitude,
                        "{} {rows}×{cols} batch {batch} [{r}, {b}]: {g} vs {expected}",
                        B::NAME
                    );
                }
            }
        }
    }

    #[test]
    fn reference_products_equal_the_dequantized_product() {
        check::<BlockQ4K>();
        check::<BlockQ5K>();
        check::<BlockQ6K>();
        check::<BlockQ3K>();
        check::<BlockQ2K>();
    }

    /// Every kernel table this CPU runs (the wiring, not the kernels, is
    /// what this checks: each file tests its own kernels against the
    /// reference at every size) gives the reference's products on a
    /// 256-wide and a 1536-wide matrix, within float reassociation.
    #[test]
    fn every_table_runs_its_k_quant_kernels() {
        use crate::kernels::Kernels;
        /// Sums of the same integer products in another order, relative to Σ|terms|.
        const TABLE_BUDGET: f32 = 1e-5;
        for (rows, cols, batch) in [(5, QK_K, 1), (8, 6 * QK_K, 3)] {
            let w = data(rows * cols, 3);
            let x = data(batch * cols, 5);
            let mut xq = vec![BlockQ8Act { d: 0.0, s: 0.0, qs: [0; GROUP] }; batch * cols / GROUP];
            quantize_activation(&x, &mut xq);
            let magnitude: f32 = w.iter().map(|v| v.abs()).sum::<f32>() * x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let q4k: Vec<BlockQ4K> = w.chunks_exact(QK_K).map(BlockQ4K::quantize).collect();
            let q5k: Vec<BlockQ5K> = w.chunks_exact(QK_K).map(BlockQ5K::quantize).collect();
            let q6k: Vec<BlockQ6K> = w.chunks_exact(QK_K).map(BlockQ6K::quantize).collect();
            let q3k: Vec<BlockQ3K> = w.chunks_exact(QK_K).map(BlockQ3K::quantize).collect();
            let q2k: Vec<BlockQ2K> = w.chunks_exact(QK_K).map(BlockQ2K::quantize).collect();
            let run = |k: &Kernels| -> Vec<f32> {
                let mut out = vec![0f32; 5 * rows * batch];
                let mut parts = out.chunks_exact_mut(rows * batch);
                (k.matmul_q4k)(&q4k, cols, &xq, parts.next().unwrap());
                (k.matmul_q5k)(&q5k, cols, &xq, parts.next().unwrap());
                (k.matmul_q6k)(&q6k, cols, &xq, parts.next().unwrap());
                (k.matmul_q3k)(&q3k, cols, &xq, parts.next().unwrap());
                (k.matmul_q2k)(&q2k, cols, &xq, parts.next().unwrap());
                out
            };
            let expected = run(&Kernels::SCALAR);
            for k in Kernels::all_available() {
                for (i, (g, e)) in run(k).iter().zip(&expected).enumerate() {
                    assert!((g - e).abs() <= TABLE_BUDGET * magnitude, "{} [{i}]: {g} vs {e}", k.name);
                }
            }
        }
    }
}
