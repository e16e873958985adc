//! Products of four-row interleaved k-quant matrices ([`BlockQ4Kx4`],
//! [`BlockQ6Kx4`]) with int8 activations.
//!
//! - [`scalar`]: the reference, compiled everywhere: a piece of each group's
//!   super-blocks put back in row order on the stack and multiplied by the
//!   row-major reference, so the results are its results bit for bit.
//! - `neon` (aarch64, ARMv8.0, the Raspberry Pi 4's Cortex-A72) and
//!   `dotprod` (with `sdot`, the Pi 5's Cortex-A76).
//! - `avx2` (x86-64 hosts): the row-major AVX2 kernels over pieces put back
//!   in row order ([`through_rows`]).
//!
//! In an interleaved super-block sixteen value bytes are four rows' values
//! at the same four columns, so a vector's four 32-bit lanes are the four
//! rows' sums from the start, with no reduction across rows:
//!
//! - dotprod: `sdot vS.4s, vW.16b, vA.4b[c]` multiplies those sixteen bytes
//!   by the activation's four values at columns `4c .. 4c+4` and adds four
//!   products into each row's lane: eight `sdot`s a sub-block of 32 for four
//!   rows;
//! - ARMv8.0: each four-byte column group of the activation is loaded
//!   broadcast to a whole register (`ld4r`), widening multiplies (`smull`,
//!   `smlal2`) sum the column groups in 16-bit lanes, and two pairwise adds
//!   leave one 32-bit sum a row.
//!
//! The rows' packed scales are interleaved a byte at a time, so ggml's
//! unpacking (masks and shifts of byte `i` with bytes `i + 4`, `i + 8`)
//! runs once for the four rows on whole vectors and leaves each sub-block's
//! four scales side by side, one vector of lanes `[row]` after widening:
//! no per-row decoding and no transposes.
//!
//! Then, as the row-major `sdot` kernels do, per super-block:
//!
//! - Q4_K: `d·Σⱼ dₓ·(scaleⱼ·isumⱼ) − dmin·Σⱼ minⱼ·sₓ`, the integer scales
//!   multiplying the exact integer sums, `d` and `dmin` applied once after
//!   the eight sub-blocks;
//! - Q6_K: `d·Σₖ dₓ·(s₂ₖ·Σ₀ + s₂ₖ₊₁·Σ₁)` over each activation block's two
//!   sub-blocks of 16 with signed scales.
//!
//! A batch goes in tiles of activations inside the super-block loop (up to
//! eight with `sdot`, four on ARMv8.0, whose broadcast activations take
//! twice the registers): a super-block's scales are decoded once for every
//! activation of the tile, its levels once per sub-block.

use crate::kquant::{BlockQ4K, BlockQ6K, QK_K};
use crate::quant::{BlockQ4Kx4, BlockQ4Kx8, BlockQ6Kx4, BlockQ8Act, GROUP, INTERLEAVE, MAX_ROWS};

/// The reference: deinterleave, then the row-major reference products.
pub mod scalar {
    use super::*;
    use crate::kernels::matmul::kquant::scalar::{dot_q4k_q8_from, dot_q6k_q8_from};
    use crate::kernels::matmul::scalar::matmul_interleaved;

    /// Super-blocks of a row put back in row order at a time (on the
    /// stack: 16 Q6_K super-blocks, 3.3 KiB).
    const STAGED: usize = 16;

    /// Interleaved Q4_K matrix × int8 activations.
    pub fn matmul_q4kx4(weights: &[BlockQ4Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        matmul_interleaved::<_, QK_K, STAGED>(weights, cols, x, out, dot_q4k_q8_from)
    }

    /// Eight-row interleaved Q4_K matrix × int8 activations.
    pub fn matmul_q4kx8(weights: &[BlockQ4Kx8], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        matmul_interleaved::<_, QK_K, STAGED>(weights, cols, x, out, dot_q4k_q8_from)
    }

    /// Interleaved Q6_K matrix × int8 activations.
    pub fn matmul_q6kx4(weights: &[BlockQ6Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        matmul_interleaved::<_, QK_K, STAGED>(weights, cols, x, out, dot_q6k_q8_from)
    }

    // Both row-major blocks are what the interleaved ones hold.
    const _: () = assert!(size_of::<BlockQ4K>() * INTERLEAVE == size_of::<BlockQ4Kx4>());
    const _: () = assert!(size_of::<BlockQ6K>() * INTERLEAVE == size_of::<BlockQ6Kx4>());
    const _: () = assert!(size_of::<BlockQ4K>() * MAX_ROWS == size_of::<BlockQ4Kx8>());
}

/// Interleaved super-blocks through a row-major kernel, for tables that
/// have row-major k-quant kernels but no interleaved ones (x86-64 hosts): a
/// piece of each group is put back in row order on the stack and handed to
/// the row-major kernel one activation at a time, its four results added to
/// the group's running sums. Images are interleaved by default, so host
/// tools (perplexity, calibration) would otherwise run the scalar reference.
pub mod through_rows {
    use super::*;
    use crate::kernels::matmul::kquant::scalar::ACTIVATION_BLOCKS;
    use crate::kernels::MatmulQuantized;
    use crate::quant::Interleaved;
    use bytemuck::Zeroable;

    /// Super-blocks of a group's rows staged at a time (8 × 16 Q4_K: 18 KiB;
    /// 4 × 16 Q6_K: 13 KiB).
    const STAGED: usize = 16;

    /// `rows_kernel` over the interleaved `weights`, with the contract of
    /// [`MatmulQuantized`].
    pub fn matmul<X: Interleaved>(
        weights: &[X],
        cols: usize,
        x: &[BlockQ8Act],
        out: &mut [f32],
        rows_kernel: MatmulQuantized<X::Row>,
    ) {
        assert!(cols > 0 && cols.is_multiple_of(QK_K), "{cols} columns are not whole super-blocks of {QK_K}");
        let (superblocks, activation_blocks) = (cols / QK_K, cols / GROUP);
        let (groups, batch) = (weights.len() / superblocks, x.len() / activation_blocks);
        assert!(
            weights.len() == groups * superblocks
                && x.len() == batch * activation_blocks
                && out.len() == groups * X::ROWS * batch,
            "matmul shapes disagree: {} interleaved super-blocks, {} activation blocks, {} outputs, {cols} columns",
            weights.len(),
            x.len(),
            out.len()
        );
        if batch == 0 {
            return;
        }
        let mut staged = [X::Row::zeroed(); STAGED * MAX_ROWS];
        let mut sums = [0f32; MAX_ROWS];
        for (group, outputs) in weights.chunks_exact(superblocks).zip(out.chunks_exact_mut(X::ROWS * batch)) {
            outputs.fill(0.0);
            for first in (0..superblocks).step_by(STAGED) {
                let n = STAGED.min(superblocks - first);
                for (k, block) in group[first..first + n].iter().enumerate() {
                    for r in 0..X::ROWS {
                        staged[r * n + k] = block.row(r);
                    }
                }
                let piece = first * ACTIVATION_BLOCKS..(first + n) * ACTIVATION_BLOCKS;
                for (b, activation) in x.chunks_exact(activation_blocks).enumerate() {
                    rows_kernel(&staged[..X::ROWS * n], n * QK_K, &activation[piece.clone()], &mut sums[..X::ROWS]);
                    for (r, sum) in sums[..X::ROWS].iter().enumerate() {
                        outputs[r * batch + b] += sum;
                    }
                }
            }
        }
    }
}

/// The AVX2 row-major k-quant kernels over interleaved matrices ([`through_rows`]).
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use super::*;
    use crate::kernels::matmul::kquant::avx2 as rows;

    /// Interleaved Q4_K matrix × int8 activations.
    pub fn matmul_q4kx4(weights: &[BlockQ4Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        through_rows::matmul(weights, cols, x, out, rows::matmul_q4k)
    }

    /// Interleaved Q6_K matrix × int8 activations.
    pub fn matmul_q6kx4(weights: &[BlockQ6Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        through_rows::matmul(weights, cols, x, out, rows::matmul_q6k)
    }

    /// Eight-row interleaved Q4_K matrix × int8 activations.
    pub fn matmul_q4kx8(weights: &[BlockQ4Kx8], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        through_rows::matmul(weights, cols, x, out, rows::matmul_q4k)
    }
}

/// What the ARMv8.0 and `sdot` kernels share: the walk over groups and
/// tiles, the scale decoding and the float accumulation.
#[cfg(target_arch = "aarch64")]
pub(in crate::kernels::matmul::kquant) mod arm {
    pub(in crate::kernels::matmul::kquant) use super::*;
    pub(in crate::kernels::matmul::kquant) use crate::kernels::matmul::neon::widen_f16;
    pub(in crate::kernels::matmul::kquant) use crate::quant::Q4K_HEAD;
    pub(in crate::kernels::matmul::kquant) use std::arch::aarch64::*;
    pub(in crate::kernels::matmul::kquant) use std::arch::asm;

    /// Activation blocks per super-block.
    pub(in crate::kernels::matmul::kquant) const ACTIVATION_BLOCKS: usize = QK_K / GROUP;

    /// The most activations of a batch any kernel step takes together.
    pub(in crate::kernels::matmul::kquant) const MAX_TILE: usize = 8;

    /// A kernel step: one group of four rows against `N` activations.
    pub(in crate::kernels::matmul::kquant) trait Group {
        /// The interleaved super-block.
        type Block;
        /// Activations of a batch one step takes together (1 ..= [`MAX_TILE`]):
        /// a super-block's levels are unpacked once per tile, so a larger
        /// tile unpacks less per activation as long as the tile's running
        /// sums still fit in the 32 vector registers beside the levels.
        const TILE: usize;
        /// Per activation `t`, the four rows' sums (lane `r`: row `r`).
        ///
        /// # Safety
        /// `group` points at `superblocks` readable blocks, each `x[t]` at
        /// `superblocks · 8` readable activation blocks, and the CPU has the
        /// kernel's features.
        unsafe fn dot<const N: usize>(
            group: *const Self::Block,
            superblocks: usize,
            x: [*const BlockQ8Act; N],
        ) -> [float32x4_t; N];
    }

    /// Every group of `weights` against every activation of `x`, row `4g + r`
    /// against activation `b` into `out[(4g + r)·batch + b]`.
    ///
    /// # Safety
    /// The CPU has `K`'s features.
    pub(in crate::kernels::matmul::kquant) unsafe fn matmul<K: Group>(
        weights: &[K::Block],
        cols: usize,
        x: &[BlockQ8Act],
        out: &mut [f32],
    ) {
        let (superblocks, batch) = shape(weights, INTERLEAVE, cols, x, out);
        if batch == 0 {
            return;
        }
        for (group, outputs) in weights.chunks_exact(superblocks).zip(out.chunks_exact_mut(INTERLEAVE * batch)) {
            // SAFETY: `group` is a whole group and `x` whole activations
            // (`shape`), and the caller promises the CPU.
            unsafe { tiles::<K>(group.as_ptr(), superblocks, x, batch, outputs) };
        }
    }

    /// [`matmul`] for blocks of eight rows, whose rows 0–3 go through `K0`
    /// and rows 4–7 through `K1` (the same walk over the same blocks).
    ///
    /// # Safety
    /// The CPU has `K0`'s and `K1`'s features.
    pub(in crate::kernels::matmul::kquant) unsafe fn matmul_halves<K0: Group, K1: Group<Block = K0::Block>>(
        weights: &[K0::Block],
        cols: usize,
        x: &[BlockQ8Act],
        out: &mut [f32],
    ) {
        let (superblocks, batch) = shape(weights, 2 * INTERLEAVE, cols, x, out);
        if batch == 0 {
            return;
        }
        for (group, outputs) in weights.chunks_exact(superblocks).zip(out.chunks_exact_mut(2 * INTERLEAVE * batch)) {
            let (low, high) = outputs.split_at_mut(INTERLEAVE * batch);
            // SAFETY: as in `matmul`.
            unsafe {
                tiles::<K0>(group.as_ptr(), superblocks, x, batch, low);
                tiles::<K1>(group.as_ptr(), superblocks, x, batch, high);
            }
        }
    }

    /// Super-blocks a row and activations of the batch, checked against the
    /// matmul's slices (groups of `rows` rows).
    fn shape<W>(weights: &[W], rows: usize, cols: usize, x: &[BlockQ8Act], out: &[f32]) -> (usize, usize) {
        assert!(cols > 0 && cols.is_multiple_of(QK_K), "{cols} columns are not whole super-blocks of {QK_K}");
        let (superblocks, activation_blocks) = (cols / QK_K, cols / GROUP);
        let (groups, batch) = (weights.len() / superblocks, x.len() / activation_blocks);
        assert!(
            weights.len() == groups * superblocks
                && x.len() == batch * activation_blocks
                && out.len() == groups * rows * batch,
            "matmul shapes disagree: {} interleaved super-blocks, {} activation blocks, {} outputs, {cols} columns",
            weights.len(),
            x.len(),
            out.len()
        );
        (superblocks, batch)
    }

    /// One group's four rows (`K`'s) against every activation, row `r`
    /// against activation `b` into `outputs[r·batch + b]`.
    ///
    /// # Safety
    /// `w` points at `superblocks` readable blocks, `x` holds `batch`
    /// activations of `superblocks · 8` blocks, and the CPU has `K`'s features.
    #[inline(always)]
    unsafe fn tiles<K: Group>(
        w: *const K::Block,
        superblocks: usize,
        x: &[BlockQ8Act],
        batch: usize,
        outputs: &mut [f32],
    ) {
        const { assert!(K::TILE >= 1 && K::TILE <= MAX_TILE) };
        if batch == 1 {
            // Decoding: one activation, the four sums stored whole. The
            // tiled walk below spends about a hundred instructions a group
            // around the kernel (2.3 M of a TinyLlama-shaped Q4_K_M token
            // on the A72, 0.26 M this way).
            // SAFETY: the caller's promises; `outputs` is four writable f32.
            unsafe {
                let [sums] = K::dot::<1>(w, superblocks, [x.as_ptr()]);
                vst1q_f32(outputs.as_mut_ptr(), sums);
            }
            return;
        }
        let activation_blocks = superblocks * ACTIVATION_BLOCKS;
        let activation = |b: usize| x[b * activation_blocks..].as_ptr();
        let mut start = 0;
        while start < batch {
            // A batch's tail that does not fill a tile goes in one smaller step.
            let tile = (batch - start).min(K::TILE);
            let at = |t: usize| activation(start + t);
            // `K::dot` at the tile's size, up to `K::TILE` (larger sizes are never taken).
            macro_rules! step {
                ($($n:literal)*) => {
                    match tile {
                        $($n if $n <= K::TILE => lanes(K::dot::<$n>(w, superblocks, std::array::from_fn(at))),)*
                        _ => unreachable!("tile of {tile} beyond {}", K::TILE),
                    }
                };
            }
            // SAFETY: each activation `start + t < batch` is whole, and the
            // caller's promises.
            let sums = unsafe { step!(1 2 3 4 5 6 7 8) };
            for (r, row) in outputs.chunks_exact_mut(batch).enumerate() {
                for (o, sums) in row[start..start + tile].iter_mut().zip(&sums) {
                    *o = sums[r];
                }
            }
            start += tile;
        }
    }

    /// The lanes of up to [`MAX_TILE`] vectors of four row sums.
    #[inline(always)]
    fn lanes<const N: usize>(sums: [float32x4_t; N]) -> [[f32; INTERLEAVE]; MAX_TILE] {
        let mut out = [[0f32; INTERLEAVE]; MAX_TILE];
        for (lanes, &v) in out.iter_mut().zip(&sums) {
            // SAFETY: `lanes` is four writable f32; NEON is part of every aarch64 target.
            unsafe { vst1q_f32(lanes.as_mut_ptr(), v) };
        }
        out
    }

    /// 128 bytes from `p` as eight vectors.
    ///
    /// # Safety
    /// `p` points at 128 readable bytes.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn load128(p: *const u8) -> [uint8x16_t; 8] {
        let (a, b) = (vld1q_u8_x4(p), vld1q_u8_x4(p.add(64)));
        [a.0, a.1, a.2, a.3, b.0, b.1, b.2, b.3]
    }

    /// An activation block's `[d, s]`.
    ///
    /// # Safety
    /// `a` points at a readable activation block.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn activation_units(a: *const BlockQ8Act) -> float32x2_t {
        // `d` and `s` are the first two f32 of the `repr(C)` block.
        vld1_f32(a.cast::<f32>())
    }

    /// Sixteen unsigned bytes `[j][r]` widened to four vectors of 32-bit lanes, one per `j`.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn widen_unsigned(v: uint8x16_t) -> [int32x4_t; 4] {
        let (low, high) = (vmovl_u8(vget_low_u8(v)), vmovl_high_u8(v));
        [vmovl_u16(vget_low_u16(low)), vmovl_high_u16(low), vmovl_u16(vget_low_u16(high)), vmovl_high_u16(high)]
            .map(|w| vreinterpretq_s32_u32(w))
    }

    /// Sixteen signed bytes `[j][r]` widened to four vectors of 32-bit lanes, one per `j`.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn widen_signed(v: int8x16_t) -> [int32x4_t; 4] {
        let (low, high) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
        [vmovl_s16(vget_low_s16(low)), vmovl_high_s16(low), vmovl_s16(vget_low_s16(high)), vmovl_high_s16(high)]
    }

    /// A Q4_K group's super-block units and sub-block scales, lane `r` for row `r`.
    pub(in crate::kernels::matmul::kquant) struct K4Scales {
        /// The rows' `d`.
        pub d: float32x4_t,
        /// The rows' `dmin`.
        pub dmin: float32x4_t,
        /// Sub-block `j`'s 6-bit scales, as integers.
        pub scales: [int32x4_t; 8],
        /// Sub-block `j`'s 6-bit minimums, as floats.
        pub mins: [float32x4_t; 8],
    }

    /// The units and the eight scales and minimums of four rows' Q4_K
    /// super-blocks (ggml's `get_scale_min_k4`, see
    /// [`crate::kquant::scale_min_k4`]) from the interleaved block: bytes
    /// `0..4`, `4..8`, `8..12` of the rows are the vectors `a`, `b`, `c`
    /// (lanes `[byte][row]`). Sub-blocks 0–3: the low 6 bits of `a`
    /// (scales) and `b` (minimums); 4–7: the low (scales) and high
    /// (minimums) nibbles of `c` under the top 2 bits of `a` and `b`.
    ///
    /// # Safety
    /// `block` points at a readable block.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn q4k_scales(block: *const BlockQ4Kx4) -> K4Scales {
        let units = vreinterpretq_u16_u8(vld1q_u8(block.cast::<u8>()));
        let (d, dmin) = (widen_f16(vget_low_u16(units)), widen_f16(vget_high_u16(units)));
        let packed = vld1q_u8_x3((*block).scales.as_ptr());
        let (a, b, c) = (packed.0, packed.1, packed.2);
        let six_bits = vdupq_n_u8(63);
        let scales_low = vandq_u8(a, six_bits);
        let mins_low = vandq_u8(b, six_bits);
        // `sli` puts the top two bits (shifted down to 0, 1) above the nibble.
        let scales_high = vsliq_n_u8::<4>(vandq_u8(c, vdupq_n_u8(15)), vshrq_n_u8::<6>(a));
        let mins_high = vsliq_n_u8::<4>(vshrq_n_u8::<4>(c), vshrq_n_u8::<6>(b));
        let (sl, sh) = (widen_unsigned(scales_low), widen_unsigned(scales_high));
        let (ml, mh) = (widen_unsigned(mins_low), widen_unsigned(mins_high));
        K4Scales {
            d,
            dmin,
            scales: [sl[0], sl[1], sl[2], sl[3], sh[0], sh[1], sh[2], sh[3]],
            mins: [ml[0], ml[1], ml[2], ml[3], mh[0], mh[1], mh[2], mh[3]].map(|m| vcvtq_f32_s32(m)),
        }
    }

    /// The rows' units and the sixteen signed 8-bit scales of four rows'
    /// Q6_K super-blocks: pairs `(s₂ₖ, s₂ₖ₊₁)` for activation block `k`.
    ///
    /// # Safety
    /// `block` points at a readable block.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn q6k_scales(
        block: *const BlockQ6Kx4,
    ) -> (float32x4_t, [(int32x4_t, int32x4_t); 8]) {
        let d = widen_f16(vreinterpret_u16_u8(vld1_u8(block.cast::<u8>())));
        let packed = vld1q_s8_x4((*block).scales.as_ptr().cast::<i8>());
        (d, q6k_scale_pairs([packed.0, packed.1, packed.2, packed.3]))
    }

    /// A Q6_K group's 64 scale bytes (`[k][r]`, four vectors) as the
    /// `(int32x4_t, int32x4_t)` pairs of [`q6k_scales`].
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn q6k_scale_pairs(
        packed: [int8x16_t; 4],
    ) -> [(int32x4_t, int32x4_t); 8] {
        let mut pairs = [(vdupq_n_s32(0), vdupq_n_s32(0)); 8];
        for (g, v) in packed.into_iter().enumerate() {
            // Scales 4g .. 4g + 4: activation blocks 2g and 2g + 1.
            let wide = widen_signed(v);
            pairs[2 * g] = (wide[0], wide[1]);
            pairs[2 * g + 1] = (wide[2], wide[3]);
        }
        pairs
    }

    /// One Q4_K sub-block's integer sums `isum` (lanes rows) against an
    /// activation block with units `[dₓ, sₓ]`: `scaled += dₓ·(scale·isum)`,
    /// `minimums += min·sₓ`.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn accumulate_k4(
        isum: int32x4_t,
        units: float32x2_t,
        (scale, min): (int32x4_t, float32x4_t),
        scaled: &mut float32x4_t,
        minimums: &mut float32x4_t,
    ) {
        *scaled = vfmaq_lane_f32::<0>(*scaled, vcvtq_f32_s32(vmulq_s32(isum, scale)), units);
        *minimums = vfmaq_lane_f32::<1>(*minimums, min, units);
    }

    /// One Q6_K activation block's two half sums against an activation with
    /// units `[dₓ, sₓ]`: `scaled += dₓ·(s₀·Σ₀ + s₁·Σ₁)`.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn accumulate_pair(
        (first, second): (int32x4_t, int32x4_t),
        units: float32x2_t,
        (s0, s1): (int32x4_t, int32x4_t),
        scaled: &mut float32x4_t,
    ) {
        let isum = vmlaq_s32(vmulq_s32(first, s0), second, s1);
        *scaled = vfmaq_lane_f32::<0>(*scaled, vcvtq_f32_s32(isum), units);
    }

    /// Q4_K levels: the low nibbles of eight interleaved vectors (sub-block
    /// `2c`) or their high nibbles (`2c + 1`).
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn q4k_levels<const HIGH: bool>(
        bytes: [uint8x16_t; 8],
    ) -> [int8x16_t; 8] {
        let nibble = vdupq_n_u8(15);
        bytes.map(|v| vreinterpretq_s8_u8(if HIGH { vshrq_n_u8::<4>(v) } else { vandq_u8(v, nibble) }))
    }

    /// [`BlockQ4Kx8`] levels of a sub-block: rows 0–3's (the low nibbles)
    /// or (`HIGH`) rows 4–7's, the high nibbles, which are stored XOR 8.
    /// (The `sdot` decode kernel reads those as `h − 8` at no cost; here
    /// the 8 would have to come back through float terms larger than the
    /// reference's, which would round differently.)
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn q4kx8_levels<const HIGH: bool>(
        bytes: [uint8x16_t; 8],
    ) -> [int8x16_t; 8] {
        let (nibble, flip) = (vdupq_n_u8(15), vdupq_n_u8(8));
        bytes.map(|v| vreinterpretq_s8_u8(if HIGH { veorq_u8(vshrq_n_u8::<4>(v), flip) } else { vandq_u8(v, nibble) }))
    }

    /// Q6_K levels of quarter `K` (0..4) of a half, times four:
    /// `4·(level − 32)` as `i8`. `low` are vectors of `ql` it reads (bytes
    /// `32·(K mod 2)` of the half's 64 per row), `high` the matching vectors
    /// of the half's `qh` (stored flipped, [`crate::quant::Q6K_HIGH_FLIP`]: the
    /// field's signed value is `t − 2`). The nibble goes to bits 2–5, the
    /// flipped field to bits 6–7, so the byte is `4·nibble + 64·(t − 2)`:
    /// one insert a vector, two where the field must first be shifted down
    /// (`sli` keeps a source's bits 0–1) or up (`sri` keeps the
    /// destination's bits 6–7).
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn q6k_levels_x4<const K: usize, const V: usize>(
        low: [uint8x16_t; V],
        high: [uint8x16_t; V],
    ) -> [int8x16_t; V] {
        let high_nibble = vdupq_n_u8(0xF0);
        let mut levels = [vdupq_n_s8(0); V];
        for i in 0..V {
            let (l, h) = (low[i], high[i]);
            let byte = match K {
                // The low nibble shifted up by two under the field at bits 0–1 (2–3).
                0 => insert::<true>(vshlq_n_u8::<2>(l), h),
                1 => insert::<true>(vshlq_n_u8::<2>(l), vshrq_n_u8::<2>(h)),
                // The high nibble shifted down by two under the field at bits 4–5 (6–7).
                2 => insert::<false>(vshlq_n_u8::<2>(h), vandq_u8(l, high_nibble)),
                _ => insert::<false>(h, vandq_u8(l, high_nibble)),
            };
            levels[i] = vreinterpretq_s8_u8(byte);
        }
        levels
    }

    /// `sli dst, src, #6` (`LEFT`: `src`'s bits 0–1 over `dst`'s 6–7) or
    /// `sri dst, src, #2` (`src >> 2` under `dst`'s bits 6–7), as written:
    /// LLVM turns the intrinsics into masks, shifts and `orr`s.
    #[inline(always)]
    unsafe fn insert<const LEFT: bool>(dst: uint8x16_t, src: uint8x16_t) -> uint8x16_t {
        let mut out = dst;
        if LEFT {
            asm!("sli {o:v}.16b, {s:v}.16b, #6", o = inout(vreg) out, s = in(vreg) src,
                options(pure, nomem, nostack, preserves_flags));
        } else {
            asm!("sri {o:v}.16b, {s:v}.16b, #2", o = inout(vreg) out, s = in(vreg) src,
                options(pure, nomem, nostack, preserves_flags));
        }
        out
    }

    /// `v` as it stands, through an empty `asm` block with side effects,
    /// which LLVM keeps in order with the products' `asm`: a block's sums
    /// are accumulated before the next block's products begin. Left free,
    /// LLVM sinks each block's accumulation below the products of the
    /// blocks after it and spills the sums it keeps waiting (about thirty
    /// stack stores and loads a super-block in the Q2_K `sdot` kernel, and
    /// in the ARMv8.0 Q4_K kernel).
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn settle(v: &mut float32x4_t) {
        asm!("/* {v:v} */", v = inout(vreg) * v, options(nomem, nostack, preserves_flags));
    }

    /// 64 bytes from `p` as four vectors.
    ///
    /// # Safety
    /// `p` points at 64 readable bytes.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn load64(p: *const u8) -> [uint8x16_t; 4] {
        let v = vld1q_u8_x4(p);
        [v.0, v.1, v.2, v.3]
    }

    /// A Q2_K activation block's minimum terms in int32, `m₀·Σ₀q + m₁·Σ₁q`
    /// for four rows (`minimums`: lanes 0–3 the rows' `m₀`, 4–7 their
    /// `m₁`, 16-bit), `Σₕq` the sum of the activation's values `q` over half
    /// `h` of the block. Every kernel family's Q2_K (row-major and
    /// interleaved, ARMv8.0 and `sdot`) takes its minimums through this:
    /// pairwise adds in 16 bits (|Σₕq| ≤ 16·128) leave `[Σ₀, Σ₁, …]`, and two
    /// widening multiplies by lane (`m·Σq` ≤ 15·2048 fits 16 bits, the sum
    /// of two does not) give the rows' sums.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) fn q2k_minimum_sums(q: [int8x16_t; 2], minimums: int16x8_t) -> int32x4_t {
        // SAFETY: register-only NEON operations, part of every aarch64 target.
        unsafe {
            let eights = vpaddq_s16(vpaddlq_s8(q[0]), vpaddlq_s8(q[1]));
            let quarters = vpaddq_s16(eights, eights);
            let halves = vpaddq_s16(quarters, quarters);
            vmlal_high_laneq_s16::<1>(vmull_laneq_s16::<0>(vget_low_s16(minimums), halves), minimums, halves)
        }
    }
}

/// ARMv8.0 NEON kernels (no `sdot`): the Raspberry Pi 4's Cortex-A72.
///
/// Every load walks its array with post-increment addressing inside small
/// `asm!` blocks (`ld1 {…}, [x], #64`, `ld4r {…}, [x], #16`, `ldr d, [x],
/// #8`): `ld4r` has no offset form, so the compiler spent an address `add`
/// on each, and it loads the weights two vectors at a time (`ldp`). Each
/// step's vectors (64 or 128 weight bytes, one activation block) are loaded
/// where they are used, so few stay live (a decoded Q6_K super-block
/// spills nothing, a Q4_K one a handful of vectors).
#[cfg(target_arch = "aarch64")]
pub mod neon {
    use super::arm::*;
    use crate::kernels::matmul::neon::widen_f16_high;

    /// 64 bytes from `*p` as four vectors (v16–v19); `*p` moves past them.
    ///
    /// # Safety
    /// `*p` points at 64 readable bytes.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn load64_next(p: &mut *const u8) -> [uint8x16_t; 4] {
        let (v0, v1, v2, v3);
        asm!(
            "ld1 {{v16.16b, v17.16b, v18.16b, v19.16b}}, [{p}], #64",
            p = inout(reg) *p,
            out("v16") v0, out("v17") v1, out("v18") v2, out("v19") v3,
            options(pure, readonly, nostack, preserves_flags),
        );
        [v0, v1, v2, v3]
    }

    /// 64 bytes from `*p` as four vectors (v20–v23); `*p` moves by `step` bytes.
    ///
    /// # Safety
    /// `*p` points at 64 readable bytes.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn load64_step(p: &mut *const u8, step: isize) -> [uint8x16_t; 4] {
        let (v0, v1, v2, v3);
        asm!(
            "ld1 {{v20.16b, v21.16b, v22.16b, v23.16b}}, [{p}], {step}",
            p = inout(reg) *p,
            step = in(reg) step,
            out("v20") v0, out("v21") v1, out("v22") v2, out("v23") v3,
            options(pure, readonly, nostack, preserves_flags),
        );
        [v0, v1, v2, v3]
    }

    /// 128 bytes from `*p` as eight vectors (v16–v23); `*p` moves past them.
    ///
    /// # Safety
    /// `*p` points at 128 readable bytes.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn load128_next(p: &mut *const u8) -> [uint8x16_t; 8] {
        let (v0, v1, v2, v3, v4, v5, v6, v7);
        asm!(
            "ld1 {{v16.16b, v17.16b, v18.16b, v19.16b}}, [{p}], #64",
            "ld1 {{v20.16b, v21.16b, v22.16b, v23.16b}}, [{p}], #64",
            p = inout(reg) *p,
            out("v16") v0, out("v17") v1, out("v18") v2, out("v19") v3,
            out("v20") v4, out("v21") v5, out("v22") v6, out("v23") v7,
            options(pure, readonly, nostack, preserves_flags),
        );
        [v0, v1, v2, v3, v4, v5, v6, v7]
    }

    /// The four rows' `Σ level·q` over the 32 columns of the activation
    /// block at `*a`, and the block's `[dₓ, sₓ]`; `*a` moves to the next
    /// block: the units loaded with post-increment, then [`sum32`] on the
    /// block's values.
    ///
    /// # Safety
    /// `*a` points at a readable activation block.
    #[inline(always)]
    unsafe fn sum32_next(w: &[int8x16_t; 8], a: &mut *const BlockQ8Act) -> (int32x4_t, float32x2_t) {
        let units: float32x2_t;
        let mut q = a.cast::<i8>();
        asm!("ldr {units:d}, [{q}], #8", q = inout(reg) q, units = out(vreg) units,
            options(pure, readonly, nostack, preserves_flags));
        let sum = sum32(w, &mut q);
        *a = q.cast();
        (sum, units)
    }

    /// The four rows' `Σ level·q` over the 32 activation values at `*q`;
    /// `*q` moves past them. Each four-byte column group of the activation
    /// is loaded broadcast to a whole register (`ld4r`, four groups at a
    /// time into v28–v31); products of rows 0–1 (low halves) and 2–3 (high
    /// halves) are summed in 16-bit lanes, eight products a lane (|n·q| ≤
    /// 15·128 for Q4_K's levels: below 2¹⁴), then one pairwise add in 16
    /// bits (below 2¹⁵) and one widening pairwise add leave `[r0, r1, r2,
    /// r3]`.
    ///
    /// # Safety
    /// `*q` points at 32 readable bytes.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn sum32(w: &[int8x16_t; 8], q: &mut *const i8) -> int32x4_t {
        let sum: int32x4_t;
        asm!(
            "ld4r {{v28.4s, v29.4s, v30.4s, v31.4s}}, [{q}], #16",
            widening_products!(start "lo" "hi"; "w0" "v28", "w1" "v29", "w2" "v30", "w3" "v31"),
            "ld4r {{v28.4s, v29.4s, v30.4s, v31.4s}}, [{q}], #16",
            widening_products!(more "lo" "hi"; "w4" "v28", "w5" "v29", "w6" "v30", "w7" "v31"),
            "addp {lo:v}.8h, {lo:v}.8h, {hi:v}.8h",
            "saddlp {sum:v}.4s, {lo:v}.8h",
            q = inout(reg) *q,
            sum = out(vreg) sum,
            lo = out(vreg) _,
            hi = out(vreg) _,
            out("v28") _, out("v29") _, out("v30") _, out("v31") _,
            w0 = in(vreg) w[0], w1 = in(vreg) w[1], w2 = in(vreg) w[2], w3 = in(vreg) w[3],
            w4 = in(vreg) w[4], w5 = in(vreg) w[5], w6 = in(vreg) w[6], w7 = in(vreg) w[7],
            options(pure, readonly, nostack, preserves_flags),
        );
        sum
    }

    /// The four rows' `Σ (level − 32)·q` over the sixteen activation values
    /// at `*q` (four column groups, one `ld4r`), for Q6_K's signed levels;
    /// `*q` moves by `step` bytes. Four products a 16-bit lane (|n·q| ≤
    /// 32·128, so at most 2¹⁴), then widened before the pairwise add (eight
    /// could reach 2¹⁵ with an activation of −128).
    ///
    /// # Safety
    /// `*q` points at 16 readable bytes.
    #[inline(always)]
    unsafe fn sum16_step(w: &[int8x16_t; 4], q: &mut *const i8, step: isize) -> int32x4_t {
        let sum: int32x4_t;
        asm!(
            "ld4r {{v28.4s, v29.4s, v30.4s, v31.4s}}, [{q}], {step}",
            widening_products!(start "lo" "hi"; "w0" "v28", "w1" "v29", "w2" "v30", "w3" "v31"),
            "saddlp {lo:v}.4s, {lo:v}.8h",
            "saddlp {hi:v}.4s, {hi:v}.8h",
            "addp {sum:v}.4s, {lo:v}.4s, {hi:v}.4s",
            q = inout(reg) *q,
            step = in(reg) step,
            sum = out(vreg) sum,
            lo = out(vreg) _,
            hi = out(vreg) _,
            out("v28") _, out("v29") _, out("v30") _, out("v31") _,
            w0 = in(vreg) w[0], w1 = in(vreg) w[1], w2 = in(vreg) w[2], w3 = in(vreg) w[3],
            options(pure, readonly, nostack, preserves_flags),
        );
        sum
    }

    /// `bif dst, src, keep`: `src`'s bits where `keep` is clear, `dst`'s where it is set.
    #[inline(always)]
    unsafe fn insert_where_clear(dst: int8x16_t, src: uint8x16_t, keep: uint8x16_t) -> int8x16_t {
        let mut out = dst;
        asm!("bif {o:v}.16b, {s:v}.16b, {k:v}.16b", o = inout(vreg) out, s = in(vreg) src, k = in(vreg) keep,
            options(pure, nomem, nostack, preserves_flags));
        out
    }

    /// `sri dst, src, #4`: `src`'s high nibble under `dst`'s.
    #[inline(always)]
    unsafe fn insert_high_nibble(dst: int8x16_t, src: uint8x16_t) -> int8x16_t {
        let mut out = dst;
        asm!("sri {o:v}.16b, {s:v}.16b, #4", o = inout(vreg) out, s = in(vreg) src,
            options(pure, nomem, nostack, preserves_flags));
        out
    }

    /// Q6_K levels `level − 32` (−32..32) of `quarter` (0..4) of a half,
    /// sixteen columns of four rows: `low` the `ql` vectors it reads (bytes
    /// `32·(quarter mod 2)` of the half's 64 per row), `high` the matching vectors
    /// of the half's `qh`, stored flipped ([`crate::quant::Q6K_HIGH_FLIP`]:
    /// the field's signed value is `t − 2`, so `level − 32` is the nibble
    /// with the signed field above it). The field is shifted to bits 6–7 and
    /// back down by two with the sign (`sshr`), which leaves it
    /// sign-extended in bits 4–7; the nibble goes under it with one insert:
    /// `bif` under the mask `keep_high` (0xF0) for a low nibble, `sri #4`
    /// for a high one. Three instructions a vector, two for quarter 3, whose
    /// field is already at the top; the products then need no shift.
    #[inline(always)]
    pub(in crate::kernels::matmul::kquant) unsafe fn q6k_levels(
        quarter: usize,
        low: [uint8x16_t; 4],
        high: [uint8x16_t; 4],
        keep_high: uint8x16_t,
    ) -> [int8x16_t; 4] {
        std::array::from_fn(|i| {
            let (l, h) = (low[i], high[i]);
            // SAFETY: register-only NEON operations, part of every aarch64 target.
            unsafe {
                let field = |up: uint8x16_t| vshrq_n_s8::<2>(vreinterpretq_s8_u8(up));
                match quarter {
                    0 => insert_where_clear(field(vshlq_n_u8::<6>(h)), l, keep_high),
                    1 => insert_where_clear(field(vshlq_n_u8::<4>(h)), l, keep_high),
                    2 => insert_high_nibble(field(vshlq_n_u8::<2>(h)), l),
                    _ => insert_high_nibble(field(h), l),
                }
            }
        })
    }

    /// The 6-bit scales (int32) and minimums (f32) of sub-blocks `2c` and
    /// `2c + 1`, lanes rows, from the packed bytes (`[sub-block mod 4][row]`)
    /// of sub-blocks 0–3 (`c` < 2) or 4–7: widened where they are used, as
    /// sixteen widened vectors would not stay in registers.
    #[inline(always)]
    unsafe fn q4k_pair(scales: uint8x16_t, mins: uint8x16_t, c: usize) -> ([int32x4_t; 2], [float32x4_t; 2]) {
        let (s, m) = if c.is_multiple_of(2) {
            (vmovl_u8(vget_low_u8(scales)), vmovl_u8(vget_low_u8(mins)))
        } else {
            (vmovl_high_u8(scales), vmovl_high_u8(mins))
        };
        let s = [vmovl_u16(vget_low_u16(s)), vmovl_high_u16(s)].map(|v| vreinterpretq_s32_u32(v));
        let m = [vmovl_u16(vget_low_u16(m)), vmovl_high_u16(m)].map(|v| vcvtq_f32_u32(v));
        (s, m)
    }

    /// Q4_K, four rows a step.
    struct Q4K;

    impl Group for Q4K {
        type Block = BlockQ4Kx4;
        const TILE: usize = 4;

        unsafe fn dot<const N: usize>(
            group: *const BlockQ4Kx4,
            superblocks: usize,
            x: [*const BlockQ8Act; N],
        ) -> [float32x4_t; N] {
            let mut acc = [vdupq_n_f32(0.0); N];
            // The group's bytes and each activation, read front to back.
            let (mut w, mut a) = (group.cast::<u8>(), x);
            let (six_bits, nibble) = (vdupq_n_u8(63), vdupq_n_u8(15));
            for _ in 0..superblocks {
                // The units (16 bytes) and packed scales (48) of the four rows,
                // then 512 bytes of levels.
                let [units, a6, b6, c6] = load64_next(&mut w);
                let units = vreinterpretq_u16_u8(units);
                let (d, dmin) = (widen_f16(vget_low_u16(units)), widen_f16_high(units));
                // ggml's unpacking for the four rows at once (see [`q4k_scales`]):
                // sub-blocks 0–3 the low 6 bits of `a6` (scales) and `b6`
                // (minimums); 4–7 the nibbles of `c6` under their top 2 bits.
                let (scales_low, mins_low) = (vandq_u8(a6, six_bits), vandq_u8(b6, six_bits));
                let scales_high = vsliq_n_u8::<4>(vandq_u8(c6, nibble), vshrq_n_u8::<6>(a6));
                let mins_high = vsliq_n_u8::<4>(vshrq_n_u8::<4>(c6), vshrq_n_u8::<6>(b6));
                let (mut scaled, mut minimums) = ([vdupq_n_f32(0.0); N], [vdupq_n_f32(0.0); N]);
                for chunk in 0..4 {
                    let (scales, mins) = if chunk < 2 { (scales_low, mins_low) } else { (scales_high, mins_high) };
                    let (scale, min) = q4k_pair(scales, mins, chunk);
                    // Sub-block `2·chunk` in the low nibbles, `2·chunk + 1` in the high.
                    let bytes = load128_next(&mut w);
                    let levels = bytes.map(|v| vreinterpretq_s8_u8(vandq_u8(v, nibble)));
                    for t in 0..N {
                        let (isum, units) = sum32_next(&levels, &mut a[t]);
                        accumulate_k4(isum, units, (scale[0], min[0]), &mut scaled[t], &mut minimums[t]);
                        settle(&mut scaled[t]);
                        settle(&mut minimums[t]);
                    }
                    let levels = bytes.map(|v| vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)));
                    for t in 0..N {
                        let (isum, units) = sum32_next(&levels, &mut a[t]);
                        accumulate_k4(isum, units, (scale[1], min[1]), &mut scaled[t], &mut minimums[t]);
                        settle(&mut scaled[t]);
                        settle(&mut minimums[t]);
                    }
                }
                for t in 0..N {
                    acc[t] = vfmsq_f32(vfmaq_f32(acc[t], scaled[t], d), minimums[t], dmin);
                }
            }
            acc
        }
    }

    /// Q4_K of eight-row blocks ([`BlockQ4Kx8`]), four rows a step: rows
    /// 0–3 (`HIGH` false) or 4–7 ([`q4kx8_levels`]),
    /// as [`Q4K`] walks a four-row block, a sub-block's 128 bytes at a time.
    struct Q4KHalf<const HIGH: bool>;

    impl<const HIGH: bool> Group for Q4KHalf<HIGH> {
        type Block = BlockQ4Kx8;
        const TILE: usize = 4;

        unsafe fn dot<const N: usize>(
            group: *const BlockQ4Kx8,
            superblocks: usize,
            x: [*const BlockQ8Act; N],
        ) -> [float32x4_t; N] {
            let mut acc = [vdupq_n_f32(0.0); N];
            let mut a = x;
            let (six_bits, nibble) = (vdupq_n_u8(63), vdupq_n_u8(15));
            for s in 0..superblocks {
                let block = group.add(s).cast::<u8>();
                // This half's units and packed scales, then the levels.
                let mut head = block.add(if HIGH { Q4K_HEAD } else { 0 });
                let [units, a6, b6, c6] = load64_next(&mut head);
                let units = vreinterpretq_u16_u8(units);
                let (d, dmin) = (widen_f16(vget_low_u16(units)), widen_f16_high(units));
                let (scales_low, mins_low) = (vandq_u8(a6, six_bits), vandq_u8(b6, six_bits));
                let scales_high = vsliq_n_u8::<4>(vandq_u8(c6, nibble), vshrq_n_u8::<6>(a6));
                let mins_high = vsliq_n_u8::<4>(vshrq_n_u8::<4>(c6), vshrq_n_u8::<6>(b6));
                let mut w = block.add(2 * Q4K_HEAD);
                let (mut scaled, mut minimums) = ([vdupq_n_f32(0.0); N], [vdupq_n_f32(0.0); N]);
                for chunk in 0..4 {
                    let (scales, mins) = if chunk < 2 { (scales_low, mins_low) } else { (scales_high, mins_high) };
                    let (scale, min) = q4k_pair(scales, mins, chunk);
                    for sub in 0..2 {
                        let levels = q4kx8_levels::<HIGH>(load128_next(&mut w));
                        for t in 0..N {
                            let (isum, units) = sum32_next(&levels, &mut a[t]);
                            accumulate_k4(isum, units, (scale[sub], min[sub]), &mut scaled[t], &mut minimums[t]);
                            settle(&mut scaled[t]);
                            settle(&mut minimums[t]);
                        }
                    }
                }
                for t in 0..N {
                    acc[t] = vfmsq_f32(vfmaq_f32(acc[t], scaled[t], d), minimums[t], dmin);
                }
            }
            acc
        }
    }

    /// Q6_K, four rows a step.
    struct Q6K;

    impl Group for Q6K {
        type Block = BlockQ6Kx4;
        const TILE: usize = 4;

        unsafe fn dot<const N: usize>(
            group: *const BlockQ6Kx4,
            superblocks: usize,
            x: [*const BlockQ8Act; N],
        ) -> [float32x4_t; N] {
            let mut acc = [vdupq_n_f32(0.0); N];
            let keep_high = vdupq_n_u8(0xF0);
            let mut walk = Q6KWalk { first: x.map(|a| (*a).qs.as_ptr()), second: x.map(|a| (*a.add(2)).qs.as_ptr()) };
            for s in 0..superblocks {
                let block = group.add(s);
                let d = widen_f16(vreinterpret_u16_u8(vld1_u8(block.cast::<u8>())));
                // Scales `4g .. 4g + 4` of the four rows (activation blocks 2g, 2g + 1).
                let packed = vld1q_s8_x4((*block).scales.as_ptr().cast::<i8>());
                let packed = [packed.0, packed.1, packed.2, packed.3];
                let (mut ql, mut qh) = ((*block).ql.as_ptr(), (*block).qh.as_ptr());
                let mut scaled = [vdupq_n_f32(0.0); N];
                // Each half and quarter pair spelled out: their scales and
                // levels are picked at compile time.
                walk.quarters::<0>(&mut ql, &mut qh, keep_high, &packed, &mut scaled);
                walk.quarters::<1>(&mut ql, &mut qh, keep_high, &packed, &mut scaled);
                walk.next_half();
                walk.quarters::<4>(&mut ql, &mut qh, keep_high, &packed, &mut scaled);
                walk.quarters::<5>(&mut ql, &mut qh, keep_high, &packed, &mut scaled);
                walk.next_half();
                for t in 0..N {
                    acc[t] = vfmaq_f32(acc[t], scaled[t], d);
                }
            }
            acc
        }
    }

    /// Where each activation of a Q6_K step is: `first[t]` and `second[t]`
    /// walk the values of the activation blocks that quarters `K` and
    /// `K + 2` of a half read (`K` = 0, 1).
    struct Q6KWalk<const N: usize> {
        first: [*const i8; N],
        second: [*const i8; N],
    }

    impl<const N: usize> Q6KWalk<N> {
        /// Bytes from one activation block's values to the next's.
        const NEXT_BLOCK: isize = size_of::<BlockQ8Act>() as isize;

        /// Activation blocks `FIRST` and `FIRST + 2` (quarters `K` and `K +
        /// 2` of a half, `K = FIRST mod 4` = 0 or 1) against their levels,
        /// `scaled[t] += dₓ·(s₀·Σ₀ + s₁·Σ₁)` for each. Both quarters read the
        /// same `ql` bytes, so each 64-byte piece of `ql` and `qh` (sixteen
        /// columns of four rows) gives both quarters' levels; `qh`'s 128
        /// bytes of the half are read for each `K`, and `*ql` moves on by
        /// 128 bytes, `*qh` by 128 after `K` = 1.
        ///
        /// # Safety
        /// `*ql` and `*qh` point into a readable block as described, and the
        /// activations have the blocks the walk reaches.
        #[inline(always)]
        unsafe fn quarters<const FIRST: usize>(
            &mut self,
            ql: &mut *const u8,
            qh: &mut *const u8,
            keep_high: uint8x16_t,
            packed: &[int8x16_t; 4],
            scaled: &mut [float32x4_t; N],
        ) {
            let k = FIRST % 4;
            let mut sums = [[[vdupq_n_s32(0); 2]; 2]; N];
            #[allow(clippy::needless_range_loop)]
            for piece in 0..2 {
                let back = if piece == 1 && k == 0 { -64 } else { 64 };
                let (low, high) = (load64_next(ql), load64_step(qh, back));
                // The second piece moves on to the next activation block's values.
                let step = if piece == 0 { 16 } else { Self::NEXT_BLOCK - 16 };
                let levels = q6k_levels(k, low, high, keep_high);
                for t in 0..N {
                    sums[t][0][piece] = sum16_step(&levels, &mut self.first[t], step);
                }
                let levels = q6k_levels(k + 2, low, high, keep_high);
                for t in 0..N {
                    sums[t][1][piece] = sum16_step(&levels, &mut self.second[t], step);
                }
            }
            for t in 0..N {
                // `first[t]`, `second[t]` are at the values of the blocks after.
                let done = [self.first[t], self.second[t]];
                for (quarter, index) in [FIRST, FIRST + 2].into_iter().enumerate() {
                    let block = done[quarter].offset(-Self::NEXT_BLOCK).sub(8).cast::<BlockQ8Act>();
                    let pair = q6k_pair(packed[index / 2], index % 2);
                    accumulate_pair(
                        (sums[t][quarter][0], sums[t][quarter][1]),
                        activation_units(block),
                        pair,
                        &mut scaled[t],
                    );
                    settle(&mut scaled[t]);
                }
            }
        }

        /// Blocks 4h + 2, 4h + 3 are done: the next half starts at 4h + 4.
        #[inline(always)]
        unsafe fn next_half(&mut self) {
            for t in 0..N {
                self.first[t] = self.second[t];
                self.second[t] = self.second[t].offset(2 * Self::NEXT_BLOCK);
            }
        }
    }

    /// Activation block `2g + j`'s two signed scales `(s₀, s₁)`, lanes rows,
    /// from `packed` (scales `4g .. 4g + 4`, lanes `[scale][row]`).
    #[inline(always)]
    unsafe fn q6k_pair(packed: int8x16_t, j: usize) -> (int32x4_t, int32x4_t) {
        let pair = if j == 0 { vmovl_s8(vget_low_s8(packed)) } else { vmovl_high_s8(packed) };
        (vmovl_s16(vget_low_s16(pair)), vmovl_high_s16(pair))
    }

    /// Interleaved Q4_K matrix × int8 activations.
    pub fn matmul_q4kx4(weights: &[BlockQ4Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { matmul::<Q4K>(weights, cols, x, out) }
    }

    /// Interleaved Q6_K matrix × int8 activations.
    pub fn matmul_q6kx4(weights: &[BlockQ6Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { matmul::<Q6K>(weights, cols, x, out) }
    }

    /// Eight-row interleaved Q4_K matrix × int8 activations.
    pub fn matmul_q4kx8(weights: &[BlockQ4Kx8], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { matmul_halves::<Q4KHalf<false>, Q4KHalf<true>>(weights, cols, x, out) }
    }
}

/// `sdot` kernels (ARMv8.2's dot-product extension): the Raspberry Pi 5's Cortex-A76.
#[cfg(target_arch = "aarch64")]
pub mod dotprod {
    use super::arm::*;
    use crate::kernels::matmul::dotprod::available;

    /// An activation block's 32 values as two vectors (lanes `c`: columns `4c .. 4c+4`).
    ///
    /// # Safety
    /// `a` points at a readable activation block.
    #[inline(always)]
    unsafe fn values(a: *const BlockQ8Act) -> (int8x16_t, int8x16_t) {
        let q = vld1q_s8_x2((*a).qs.as_ptr());
        (q.0, q.1)
    }

    /// The four rows' `Σ level·q` over 32 columns: eight `sdot`s by lane,
    /// vector `c` (four rows × columns `4c .. 4c+4`) against the
    /// activation's lane `c`.
    ///
    /// # Safety
    /// The CPU has the dot-product extension.
    #[target_feature(enable = "dotprod")]
    #[inline]
    unsafe fn sum32(w: &[int8x16_t; 8], q: (int8x16_t, int8x16_t)) -> int32x4_t {
        let mut sum = vdupq_n_s32(0);
        asm!(
            "sdot {sum:v}.4s, {w0:v}.16b, {q0:v}.4b[0]",
            "sdot {sum:v}.4s, {w1:v}.16b, {q0:v}.4b[1]",
            "sdot {sum:v}.4s, {w2:v}.16b, {q0:v}.4b[2]",
            "sdot {sum:v}.4s, {w3:v}.16b, {q0:v}.4b[3]",
            "sdot {sum:v}.4s, {w4:v}.16b, {q1:v}.4b[0]",
            "sdot {sum:v}.4s, {w5:v}.16b, {q1:v}.4b[1]",
            "sdot {sum:v}.4s, {w6:v}.16b, {q1:v}.4b[2]",
            "sdot {sum:v}.4s, {w7:v}.16b, {q1:v}.4b[3]",
            sum = inout(vreg) sum,
            w0 = in(vreg) w[0], w1 = in(vreg) w[1], w2 = in(vreg) w[2], w3 = in(vreg) w[3],
            w4 = in(vreg) w[4], w5 = in(vreg) w[5], w6 = in(vreg) w[6], w7 = in(vreg) w[7],
            q0 = in(vreg) q.0, q1 = in(vreg) q.1,
            options(pure, nomem, nostack, preserves_flags),
        );
        sum
    }

    /// The four rows' `Σ level·q` over 16 columns (four `sdot`s by lane)
    /// against the four lanes of `q`.
    ///
    /// # Safety
    /// The CPU has the dot-product extension.
    #[target_feature(enable = "dotprod")]
    #[inline]
    unsafe fn sum16(w: &[int8x16_t], q: int8x16_t) -> int32x4_t {
        let mut sum = vdupq_n_s32(0);
        asm!(
            "sdot {sum:v}.4s, {w0:v}.16b, {q:v}.4b[0]",
            "sdot {sum:v}.4s, {w1:v}.16b, {q:v}.4b[1]",
            "sdot {sum:v}.4s, {w2:v}.16b, {q:v}.4b[2]",
            "sdot {sum:v}.4s, {w3:v}.16b, {q:v}.4b[3]",
            sum = inout(vreg) sum,
            w0 = in(vreg) w[0], w1 = in(vreg) w[1], w2 = in(vreg) w[2], w3 = in(vreg) w[3],
            q = in(vreg) q,
            options(pure, nomem, nostack, preserves_flags),
        );
        sum
    }

    /// One Q4_K super-block of four rows against `N` activations: `head`
    /// the rows' units and packed scales (a [`BlockQ4Kx4`]'s first 64
    /// bytes), `levels(j)` their levels of sub-block `j`,
    /// `product(levels, a)` their `Σ level·q` against activation block `a`.
    /// Adds `d·Σⱼ dₓ·(scaleⱼ·isumⱼ) − dmin·Σⱼ minⱼ·sₓ` into `acc`.
    ///
    /// # Safety
    /// `head` is readable, and each `activations[t]` has the super-block's
    /// eight activation blocks.
    #[inline(always)]
    unsafe fn q4k_superblock<const N: usize>(
        head: *const BlockQ4Kx4,
        activations: [*const BlockQ8Act; N],
        levels: impl Fn(usize) -> [int8x16_t; 8],
        product: impl Fn(&[int8x16_t; 8], *const BlockQ8Act) -> int32x4_t,
        acc: &mut [float32x4_t; N],
    ) {
        let k4 = q4k_scales(head);
        let (mut scaled, mut minimums) = ([vdupq_n_f32(0.0); N], [vdupq_n_f32(0.0); N]);
        let mut sub_block = |levels: [int8x16_t; 8], sub: usize| {
            for t in 0..N {
                // SAFETY: activation `t` has the super-block's eight blocks (the caller's promise).
                unsafe {
                    let a = activations[t].add(sub);
                    let pair = (k4.scales[sub], k4.mins[sub]);
                    accumulate_k4(product(&levels, a), activation_units(a), pair, &mut scaled[t], &mut minimums[t]);
                }
            }
        };
        for c in 0..4 {
            sub_block(levels(2 * c), 2 * c);
            sub_block(levels(2 * c + 1), 2 * c + 1);
        }
        for t in 0..N {
            acc[t] = vfmsq_f32(vfmaq_f32(acc[t], scaled[t], k4.d), minimums[t], k4.dmin);
        }
    }

    /// Q4_K, four rows a step.
    struct Q4K;

    impl Group for Q4K {
        type Block = BlockQ4Kx4;
        const TILE: usize = 8;

        #[target_feature(enable = "dotprod")]
        unsafe fn dot<const N: usize>(
            group: *const BlockQ4Kx4,
            superblocks: usize,
            x: [*const BlockQ8Act; N],
        ) -> [float32x4_t; N] {
            let mut acc = [vdupq_n_f32(0.0); N];
            let product = |levels: &[int8x16_t; 8], a| {
                // SAFETY: `a` is a readable activation block (`q4k_superblock`'s
                // promise), and the CPU has the extension (this function's).
                unsafe { sum32(levels, values(a)) }
            };
            for s in 0..superblocks {
                let block = group.add(s);
                let activations = x.map(|a| a.add(s * ACTIVATION_BLOCKS));
                // Sub-blocks 2c and 2c + 1: the low and high nibbles of the
                // same 128 bytes (loaded once: the loads are pure).
                let levels = |j: usize| {
                    // SAFETY: `j` < 8, so the bytes are the block's; NEON
                    // is part of every aarch64 target.
                    unsafe {
                        let bytes = load128((*block).qs.as_ptr().add(128 * (j / 2)));
                        if j.is_multiple_of(2) {
                            q4k_levels::<false>(bytes)
                        } else {
                            q4k_levels::<true>(bytes)
                        }
                    }
                };
                q4k_superblock(block, activations, levels, product, &mut acc);
            }
            acc
        }
    }

    /// Q4_K of eight-row blocks ([`BlockQ4Kx8`]), four rows a step: rows
    /// 0–3 (`HIGH` false) or 4–7 ([`q4kx8_levels`]),
    /// as [`Q4K`] walks a four-row block.
    struct Q4KHalf<const HIGH: bool>;

    impl<const HIGH: bool> Group for Q4KHalf<HIGH> {
        type Block = BlockQ4Kx8;
        const TILE: usize = 8;

        #[target_feature(enable = "dotprod")]
        unsafe fn dot<const N: usize>(
            group: *const BlockQ4Kx8,
            superblocks: usize,
            x: [*const BlockQ8Act; N],
        ) -> [float32x4_t; N] {
            let mut acc = [vdupq_n_f32(0.0); N];
            let product = |levels: &[int8x16_t; 8], a| {
                // SAFETY: `a` is a readable activation block (`q4k_superblock`'s
                // promise), and the CPU has the extension (this function's).
                unsafe { sum32(levels, values(a)) }
            };
            for s in 0..superblocks {
                let block = group.add(s);
                let activations = x.map(|a| a.add(s * ACTIVATION_BLOCKS));
                // This half's head is laid out as a four-row block's start.
                let head = block.cast::<u8>().add(if HIGH { Q4K_HEAD } else { 0 }).cast::<BlockQ4Kx4>();
                // Sub-block j: 128 bytes.
                let levels = |j: usize| {
                    // SAFETY: `j` < 8, so the bytes are the block's; NEON
                    // is part of every aarch64 target.
                    unsafe { q4kx8_levels::<HIGH>(load128((*block).qs.as_ptr().add(128 * j))) }
                };
                q4k_superblock(head, activations, levels, product, &mut acc);
            }
            acc
        }
    }

    /// One Q6_K super-block of a group against `N` activations: per half,
    /// quarters `K` and `K + 2` (`K` = 0, 1) read the same `ql` bytes, so
    /// each 64-byte piece of `ql` and `qh` (sixteen columns of four rows)
    /// gives both quarters' levels, multiplied at once while few registers
    /// are live. `sum16(levels, a, piece)` is `Σ 4·(level −
    /// 32)·q` of four rows over columns `16·piece ..` of activation block
    /// `a` (four `sdot`s). Adds `d·Σ dₓ·(s₀·Σ₀ + s₁·Σ₁)` into `acc`. (The
    /// ARMv8.0 kernel keeps whole 128-byte halves instead: with its
    /// broadcast activations, this walk spills more than it saves.)
    ///
    /// # Safety
    /// `block` is readable, each `activations[t]` has the super-block's
    /// eight activation blocks, and `sum16` is safe to call on them.
    #[inline(always)]
    unsafe fn q6k_superblock<const N: usize>(
        block: *const BlockQ6Kx4,
        activations: [*const BlockQ8Act; N],
        sum16: impl Fn(&[int8x16_t; 4], *const BlockQ8Act, usize) -> int32x4_t,
        acc: &mut [float32x4_t; N],
    ) {
        let (d, pairs) = q6k_scales(block);
        let mut scaled = [vdupq_n_f32(0.0); N];
        let zero = vdupq_n_s32(0);
        for half in 0..2 {
            let qh = (*block).qh.as_ptr().add(128 * half);
            for k in 0..2 {
                // `ql` bytes `32k ..` of the half's 64 a row: 128 interleaved bytes from `128k`.
                let ql = (*block).ql.as_ptr().add(256 * half + 128 * k);
                let (first, second) = (4 * half + k, 4 * half + k + 2);
                let mut sums = [[[zero; 2]; 2]; N];
                // `piece` also offsets the loads and the activation columns.
                #[allow(clippy::needless_range_loop)]
                for piece in 0..2 {
                    let (low, high) = (load64(ql.add(64 * piece)), load64(qh.add(64 * piece)));
                    let levels = if k == 0 {
                        (q6k_levels_x4::<0, 4>(low, high), q6k_levels_x4::<2, 4>(low, high))
                    } else {
                        (q6k_levels_x4::<1, 4>(low, high), q6k_levels_x4::<3, 4>(low, high))
                    };
                    for t in 0..N {
                        sums[t][0][piece] = sum16(&levels.0, activations[t].add(first), piece);
                        sums[t][1][piece] = sum16(&levels.1, activations[t].add(second), piece);
                    }
                }
                for t in 0..N {
                    for (quarter, index) in [first, second].into_iter().enumerate() {
                        let [s0, s1] = sums[t][quarter];
                        let units = activation_units(activations[t].add(index));
                        accumulate_pair((s0, s1), units, pairs[index], &mut scaled[t]);
                    }
                }
            }
        }
        // The sums are of four times the levels.
        let d = vmulq_n_f32(d, 0.25);
        for t in 0..N {
            acc[t] = vfmaq_f32(acc[t], scaled[t], d);
        }
    }

    /// Q6_K, four rows a step.
    struct Q6K;

    impl Group for Q6K {
        type Block = BlockQ6Kx4;
        const TILE: usize = 8;

        #[target_feature(enable = "dotprod")]
        unsafe fn dot<const N: usize>(
            group: *const BlockQ6Kx4,
            superblocks: usize,
            x: [*const BlockQ8Act; N],
        ) -> [float32x4_t; N] {
            let mut acc = [vdupq_n_f32(0.0); N];
            for s in 0..superblocks {
                let activations = x.map(|a| a.add(s * ACTIVATION_BLOCKS));
                let sum = |levels: &[int8x16_t; 4], a: *const BlockQ8Act, piece: usize| {
                    // SAFETY: `a` is one of the super-block's activation blocks (the caller's
                    // promise), and the CPU has the dot-product extension.
                    unsafe { sum16(levels, vld1q_s8((*a).qs.as_ptr().add(16 * piece))) }
                };
                q6k_superblock(group.add(s), activations, sum, &mut acc);
            }
            acc
        }
    }

    /// Interleaved Q4_K matrix × int8 activations. Panics on a CPU without
    /// the dot-product extension.
    pub fn matmul_q4kx4(weights: &[BlockQ4Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: the CPU has the dot-product extension (checked just above).
        unsafe { matmul::<Q4K>(weights, cols, x, out) }
    }

    /// Interleaved Q6_K matrix × int8 activations. Panics on a CPU without
    /// the dot-product extension.
    pub fn matmul_q6kx4(weights: &[BlockQ6Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: the CPU has the dot-product extension (checked just above).
        unsafe { matmul::<Q6K>(weights, cols, x, out) }
    }

    /// Eight-row interleaved Q4_K matrix × int8 activations. Panics on a
    /// CPU without the dot-product extension.
    pub fn matmul_q4kx8(weights: &[BlockQ4Kx8], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: the CPU has the dot-product extension (checked just above).
        unsafe { matmul_halves::<Q4KHalf<false>, Q4KHalf<true>>(weights, cols, x, out) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::kquant::test_support::{row_magnitude, Format, Matmul, TestData, VariedRuns, Weights};
    use crate::quant::{interleave, Interleaved};

    /// Kernel against reference: both form the same exact integer sums and
    /// differ only in how the float terms built from them are grouped and
    /// rounded (the kernels group them as the row-major `sdot` kernels do).
    /// Each side rounds every term through at most four operations and adds
    /// it into a running sum of at most `cols/16 + 8` terms, so the two are
    /// within `(n + 8)·2u` = `(n + 8)·ε` of each other (u = 2⁻²⁴), relative
    /// to the sum of the terms' magnitudes.
    const ROUNDING_PER_TERM: f32 = f32::EPSILON;

    /// The terms a row's sum is made of, at most (see [`ROUNDING_PER_TERM`]).
    fn terms(cols: usize) -> f32 {
        (cols / 16 + 8) as f32
    }

    const ROW_COUNTS: [usize; 4] = [4, 8, 12, 16];
    const COLUMNS: [usize; 5] = [256, 512, 1536, 2048, 5632];
    const BATCHES: [usize; 4] = [1, 2, 3, 5];

    /// One interleaved format: its reference and kernels (the row-major
    /// block `B` brings its quantizer, reference and term magnitudes).
    struct Interleaving<B: Format, X: Interleaved<Row = B>> {
        name: &'static str,
        interleaved_reference: Matmul<X>,
        /// The kernels under test on this CPU, by table name.
        kernels: Vec<(&'static str, Matmul<X>)>,
    }

    /// The interleaved reference equals the row-major one bit for bit, and
    /// each kernel is within the rounding budget of it.
    fn compare<B: Format, X: Interleaved<Row = B>>(
        format: &Interleaving<B, X>,
        what: &str,
        rows: &[B],
        cols: usize,
        x: &[BlockQ8Act],
    ) {
        let superblocks = cols / QK_K;
        let row_count = rows.len() / superblocks;
        let batch = x.len() / (cols / GROUP);
        let mut mixed = vec![X::zeroed(); rows.len() / X::ROWS];
        interleave(rows, superblocks, &mut mixed);
        let mut expected = vec![f32::NAN; row_count * batch];
        B::reference(rows, cols, x, &mut expected);
        let mut staged = vec![f32::NAN; row_count * batch];
        (format.interleaved_reference)(&mixed, cols, x, &mut staged);
        assert_eq!(
            staged.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{} {what} {row_count}×{cols} batch {batch}: the interleaved reference is not the row-major one",
            format.name
        );
        for (table, kernel) in &format.kernels {
            let mut got = vec![f32::NAN; row_count * batch];
            kernel(&mixed, cols, x, &mut got);
            for r in 0..row_count {
                for b in 0..batch {
                    let row = &rows[r * superblocks..][..superblocks];
                    let activation = &x[b * cols / GROUP..][..cols / GROUP];
                    let tolerance = ROUNDING_PER_TERM * terms(cols) * row_magnitude(row, activation) as f32;
                    let (g, e) = (got[r * batch + b], expected[r * batch + b]);
                    assert!(
                        (g - e).abs() <= tolerance,
                        "{} {table} {what} {row_count}×{cols} batch {batch} [{r}, {b}]: {g} vs reference {e} (tolerance {tolerance})",
                        format.name
                    );
                }
            }
        }
    }

    fn check<B: Format, X: Interleaved<Row = B>>(format: Interleaving<B, X>) {
        check_at(format, &COLUMNS)
    }

    /// [`check`] at the given row lengths.
    fn check_at<B: Format, X: Interleaved<Row = B>>(format: Interleaving<B, X>, columns: &[usize]) {
        let mut data = VariedRuns::new();
        for rows in ROW_COUNTS.into_iter().filter(|r| r.is_multiple_of(X::ROWS)) {
            for &cols in columns {
                for batch in BATCHES {
                    let quantized: Vec<B> = data.weights(Weights::Quantized, rows * cols / QK_K);
                    let x = data.activations(Weights::Quantized, batch * cols);
                    compare(&format, "quantized", &quantized, cols, &x);

                    let noise: Vec<B> = data.filled_or_random_bytes(rows * cols / QK_K);
                    let x = data.activations(Weights::RandomBytes, batch * cols);
                    compare(&format, "random bytes", &noise, cols, &x);
                }
            }
        }
    }

    /// Batches through every tile size and tail: 1..=4 one tile of four or
    /// fewer, 5..=9 one tile of eight or fewer (or four and a tail), 16 and
    /// 17 whole tiles of eight (and one more activation).
    const TILED_BATCHES: [usize; 11] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17];

    /// Each kernel on a whole batch against the reference, and bit for bit
    /// against itself on one activation at a time: an activation's sums do
    /// not depend on the tile it goes in or its place there.
    fn check_tiles<B: Format, X: Interleaved<Row = B>>(format: &Interleaving<B, X>) {
        let mut data = VariedRuns::seeded(3);
        for rows in [X::ROWS, 3 * X::ROWS] {
            for cols in [256, 1536] {
                let (superblocks, activation_blocks) = (cols / QK_K, cols / GROUP);
                for batch in TILED_BATCHES {
                    for kind in [Weights::Quantized, Weights::RandomBytes] {
                        let weights: Vec<B> = data.weights(kind, rows * superblocks);
                        let x = data.activations(kind, batch * cols);
                        compare(format, "tiled", &weights, cols, &x);
                        let mut mixed = vec![X::zeroed(); weights.len() / X::ROWS];
                        interleave(&weights, superblocks, &mut mixed);
                        for (table, kernel) in &format.kernels {
                            let mut whole = vec![f32::NAN; rows * batch];
                            kernel(&mixed, cols, &x, &mut whole);
                            for (b, activation) in x.chunks_exact(activation_blocks).enumerate() {
                                let mut alone = vec![f32::NAN; rows];
                                kernel(&mixed, cols, activation, &mut alone);
                                for (r, one) in alone.iter().enumerate() {
                                    let tiled = whole[r * batch + b];
                                    assert_eq!(
                                        tiled.to_bits(),
                                        one.to_bits(),
                                        "{} {table} {rows}×{cols} batch {batch} [{r}, {b}]: {tiled} in the batch, {one} alone",
                                        format.name
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_tile_and_tail_matches_one_activation_at_a_time() {
        use crate::kernels::matmul::kquant::interleaved35::scalar as scalar35;
        check_tiles(&Interleaving {
            name: "q4kx4",
            interleaved_reference: scalar::matmul_q4kx4,
            kernels: kernels(|k| k.matmul_q4kx4),
        });
        check_tiles(&Interleaving {
            name: "q4kx8",
            interleaved_reference: scalar::matmul_q4kx8,
            kernels: kernels(|k| k.matmul_q4kx8),
        });
        check_tiles(&Interleaving {
            name: "q6kx4",
            interleaved_reference: scalar::matmul_q6kx4,
            kernels: kernels(|k| k.matmul_q6kx4),
        });
        check_tiles(&Interleaving {
            name: "q3kx4",
            interleaved_reference: scalar35::matmul_q3kx4,
            kernels: kernels(|k| k.matmul_q3kx4),
        });
        check_tiles(&Interleaving {
            name: "q5kx4",
            interleaved_reference: scalar35::matmul_q5kx4,
            kernels: kernels(|k| k.matmul_q5kx4),
        });
        check_tiles(&Interleaving {
            name: "q2kx4",
            interleaved_reference: scalar35::matmul_q2kx4,
            kernels: kernels(|k| k.matmul_q2kx4),
        });
    }

    /// The kernels of every table this CPU runs (the scalar one included:
    /// the tables hand out the reference where there is nothing faster).
    fn kernels<X>(pick: fn(&crate::kernels::Kernels) -> Matmul<X>) -> Vec<(&'static str, Matmul<X>)> {
        crate::kernels::Kernels::all_available().into_iter().map(|k| (k.name, pick(k))).collect()
    }

    #[test]
    fn q4kx4_kernels_match_the_reference() {
        check(Interleaving {
            name: "q4kx4",
            interleaved_reference: scalar::matmul_q4kx4,
            kernels: kernels(|k| k.matmul_q4kx4),
        });
    }

    #[test]
    fn q4kx8_kernels_match_the_reference() {
        check(Interleaving {
            name: "q4kx8",
            interleaved_reference: scalar::matmul_q4kx8,
            kernels: kernels(|k| k.matmul_q4kx8),
        });
    }

    #[test]
    fn q6kx4_kernels_match_the_reference() {
        check(Interleaving {
            name: "q6kx4",
            interleaved_reference: scalar::matmul_q6kx4,
            kernels: kernels(|k| k.matmul_q6kx4),
        });
    }

    /// Row lengths of Llama-2-7B's matrices (4096, 11008) among others:
    /// Q3_K is the bulk of the Q3_K_M mix a 4 GB board runs it in.
    const COLUMNS_35: [usize; 5] = [256, 512, 2048, 4096, 11008];

    #[test]
    fn q3kx4_kernels_match_the_reference() {
        use crate::kernels::matmul::kquant::interleaved35::scalar;
        check_at(
            Interleaving {
                name: "q3kx4",
                interleaved_reference: scalar::matmul_q3kx4,
                kernels: kernels(|k| k.matmul_q3kx4),
            },
            &COLUMNS_35,
        );
    }

    #[test]
    fn q5kx4_kernels_match_the_reference() {
        use crate::kernels::matmul::kquant::interleaved35::scalar;
        check_at(
            Interleaving {
                name: "q5kx4",
                interleaved_reference: scalar::matmul_q5kx4,
                kernels: kernels(|k| k.matmul_q5kx4),
            },
            &COLUMNS_35,
        );
    }

    /// Row lengths for Q2_K: one super-block, a few, and Llama-2-7B's
    /// (4096, 11008), the model a 4 GB board runs at Q2_K.
    const COLUMNS_2: [usize; 5] = [256, 768, 2048, 4096, 11008];

    #[test]
    fn q2kx4_kernels_match_the_reference() {
        use crate::kernels::matmul::kquant::interleaved35::scalar;
        check_at(
            Interleaving {
                name: "q2kx4",
                interleaved_reference: scalar::matmul_q2kx4,
                kernels: kernels(|k| k.matmul_q2kx4),
            },
            &COLUMNS_2,
        );
    }

    /// As [`one_changed_level_is_caught`] for the Q2_K kernels, one row
    /// each: a level in the top field of `qs` (value 255, bits 6–7 of
    /// `qs[63]`), a level in a middle field (value 160, bits 2–3 of
    /// `qs[32]`: the field the kernels scale by four), and the minimum of
    /// sub-block 15 (the high nibble of `scales[15]`).
    #[test]
    fn one_changed_q2k_level_or_minimum_is_caught() {
        use crate::kquant::BlockQ2K;
        use crate::quant::BlockQ2Kx4;
        let mut data = VariedRuns::seeded(13);
        let (rows, cols) = (8, 1536);
        let values = data.values(rows * cols);
        let mut x = data.activations(Weights::RandomBytes, cols);
        let mut q2k: Vec<BlockQ2K> = values.chunks_exact(QK_K).map(BlockQ2K::quantize).collect();
        // Row r, super-block 2: unit 1, every scale and minimum 15, and
        // activations that make the changed values count.
        for r in [1, 3, 6] {
            let block = &mut q2k[r * 6 + 2];
            (block.d, block.dmin) = (crate::kquant::f16_bytes(1.0), crate::kquant::f16_bytes(1.0));
            block.scales = [0xFF; 16];
        }
        x[2 * 8 + 7].qs[16..].fill(100);
        x[2 * 8 + 5].qs[0] = 100;
        type Change = fn(&mut BlockQ2K);
        let changes: [(usize, Change); 3] =
            [(1, |b| b.qs[63] ^= 0x80), (3, |b| b.qs[32] ^= 0x08), (6, |b| b.scales[15] ^= 0x80)];
        for (row, change) in changes {
            let mut changed = q2k.clone();
            change(&mut changed[row * 6 + 2]);
            for (name, kernel) in kernels(|k| k.matmul_q2kx4) {
                let mut mixed = vec![<BlockQ2Kx4 as bytemuck::Zeroable>::zeroed(); rows * cols / QK_K / INTERLEAVE];
                interleave(&changed, cols / QK_K, &mut mixed);
                let (mut got, mut expected) = (vec![0f32; rows], vec![0f32; rows]);
                kernel(&mixed, cols, &x, &mut got);
                BlockQ2K::reference(&q2k, cols, &x, &mut expected);
                for r in 0..rows {
                    let tolerance = ROUNDING_PER_TERM * terms(cols) * row_magnitude(&q2k[r * 6..][..6], &x) as f32;
                    assert_eq!((got[r] - expected[r]).abs() > tolerance, r == row, "{name} q2kx4 row {r}");
                }
            }
        }
    }

    /// As [`one_changed_level_is_caught`] for the Q3_K and Q5_K kernels:
    /// Q3_K's `hmask` bit of value 255 (sub-block 15, the last plane-2
    /// sign bit `t₇` takes), Q5_K's fifth bit of value 255 (bit 7 of
    /// `qh[31]`, the largest shift), each in one row only.
    #[test]
    fn one_changed_q3k_or_q5k_level_is_caught() {
        use crate::kquant::{BlockQ3K, BlockQ5K};
        use crate::quant::{BlockQ3Kx4, BlockQ5Kx4};
        let mut data = VariedRuns::seeded(11);
        let (rows, cols) = (8, 1536);
        let values = data.values(rows * cols);
        let mut x = data.activations(Weights::RandomBytes, cols);
        x[2 * 8 + 7].qs[31] = 100;
        let mut q3k: Vec<BlockQ3K> = values.chunks_exact(QK_K).map(BlockQ3K::quantize).collect();
        let block = &mut q3k[5 * 6 + 2];
        block.d = crate::kquant::f16_bytes(1.0);
        // Scale 15 at 63 (31 once 32 is taken off).
        block.scales[7] |= 0xF0;
        block.scales[11] |= 0xC0;
        let mut changed = q3k.clone();
        changed[5 * 6 + 2].hmask[31] ^= 0x80;
        for (name, kernel) in kernels(|k| k.matmul_q3kx4) {
            let mut mixed = vec![<BlockQ3Kx4 as bytemuck::Zeroable>::zeroed(); rows * cols / QK_K / INTERLEAVE];
            interleave(&changed, cols / QK_K, &mut mixed);
            let (mut got, mut expected) = (vec![0f32; rows], vec![0f32; rows]);
            kernel(&mixed, cols, &x, &mut got);
            BlockQ3K::reference(&q3k, cols, &x, &mut expected);
            for r in 0..rows {
                let tolerance = ROUNDING_PER_TERM * terms(cols) * row_magnitude(&q3k[r * 6..][..6], &x) as f32;
                assert_eq!((got[r] - expected[r]).abs() > tolerance, r == 5, "{name} q3kx4 row {r}");
            }
        }
        let mut q5k: Vec<BlockQ5K> = values.chunks_exact(QK_K).map(BlockQ5K::quantize).collect();
        let block = &mut q5k[5 * 6 + 2];
        block.d = crate::kquant::f16_bytes(1.0);
        block.scales[11] |= 0x0F;
        let mut changed = q5k.clone();
        changed[5 * 6 + 2].qh[31] ^= 0x80;
        for (name, kernel) in kernels(|k| k.matmul_q5kx4) {
            let mut mixed = vec![<BlockQ5Kx4 as bytemuck::Zeroable>::zeroed(); rows * cols / QK_K / INTERLEAVE];
            interleave(&changed, cols / QK_K, &mut mixed);
            let (mut got, mut expected) = (vec![0f32; rows], vec![0f32; rows]);
            kernel(&mixed, cols, &x, &mut got);
            BlockQ5K::reference(&q5k, cols, &x, &mut expected);
            for r in 0..rows {
                let tolerance = ROUNDING_PER_TERM * terms(cols) * row_magnitude(&q5k[r * 6..][..6], &x) as f32;
                assert_eq!((got[r] - expected[r]).abs() > tolerance, r == 5, "{name} q5kx4 row {r}");
            }
        }
    }

    /// The comparison can fail: one level changed in one row (a nibble of
    /// Q4_K's last sub-block, a Q6_K high bit) moves that row's product
    /// beyond the budget, and only that row's.
    #[test]
    fn one_changed_level_is_caught() {
        let mut data = VariedRuns::seeded(7);
        let (rows, cols) = (8, 1536);
        let values = data.values(rows * cols);
        let mut x = data.activations(Weights::RandomBytes, cols);
        // Row 5, super-block 2: value 255 (sub-block 7, the high nibble of
        // qs[127]), with a unit, a scale and an activation that let it count.
        let mut q4k: Vec<BlockQ4K> = values.chunks_exact(QK_K).map(BlockQ4K::quantize).collect();
        let block = &mut q4k[5 * 6 + 2];
        block.d = crate::kquant::f16_bytes(1.0);
        block.scales[11] |= 0x0F;
        x[2 * 8 + 7].qs[31] = 100;
        let mut changed = q4k.clone();
        changed[5 * 6 + 2].qs[127] ^= 0x80;
        for (name, kernel) in kernels(|k| k.matmul_q4kx4) {
            let mut mixed = vec![<BlockQ4Kx4 as bytemuck::Zeroable>::zeroed(); rows * cols / QK_K / INTERLEAVE];
            interleave(&changed, cols / QK_K, &mut mixed);
            let (mut got, mut expected) = (vec![0f32; rows], vec![0f32; rows]);
            kernel(&mixed, cols, &x, &mut got);
            BlockQ4K::reference(&q4k, cols, &x, &mut expected);
            for r in 0..rows {
                let tolerance = ROUNDING_PER_TERM * terms(cols) * row_magnitude(&q4k[r * 6..][..6], &x) as f32;
                assert_eq!((got[r] - expected[r]).abs() > tolerance, r == 5, "{name} q4kx4 row {r}");
            }
        }
        // The same in eight-row blocks, where row 5's level is a high nibble.
        for (name, kernel) in kernels(|k| k.matmul_q4kx8) {
            let mut mixed = vec![<BlockQ4Kx8 as bytemuck::Zeroable>::zeroed(); rows * cols / QK_K / MAX_ROWS];
            interleave(&changed, cols / QK_K, &mut mixed);
            let (mut got, mut expected) = (vec![0f32; rows], vec![0f32; rows]);
            kernel(&mixed, cols, &x, &mut got);
            BlockQ4K::reference(&q4k, cols, &x, &mut expected);
            for r in 0..rows {
                let tolerance = ROUNDING_PER_TERM * terms(cols) * row_magnitude(&q4k[r * 6..][..6], &x) as f32;
                assert_eq!((got[r] - expected[r]).abs() > tolerance, r == 5, "{name} q4kx8 row {r}");
            }
        }
        // Row 2, super-block 4: the top bit of value 31 (bit 1 of qh[31]).
        let mut q6k: Vec<BlockQ6K> = values.chunks_exact(QK_K).map(BlockQ6K::quantize).collect();
        let block = &mut q6k[2 * 6 + 4];
        block.d = crate::kquant::f16_bytes(1.0);
        block.scales[1] = 100;
        x[4 * 8].qs[31] = 100;
        let mut changed = q6k.clone();
        changed[2 * 6 + 4].qh[31] ^= 0x02;
        for (name, kernel) in kernels(|k| k.matmul_q6kx4) {
            let mut mixed = vec![<BlockQ6Kx4 as bytemuck::Zeroable>::zeroed(); rows * cols / QK_K / INTERLEAVE];
            interleave(&changed, cols / QK_K, &mut mixed);
            let (mut got, mut expected) = (vec![0f32; rows], vec![0f32; rows]);
            kernel(&mixed, cols, &x, &mut got);
            BlockQ6K::reference(&q6k, cols, &x, &mut expected);
            for r in 0..rows {
                let tolerance = ROUNDING_PER_TERM * terms(cols) * row_magnitude(&q6k[r * 6..][..6], &x) as f32;
                assert_eq!((got[r] - expected[r]).abs() > tolerance, r == 2, "{name} q6kx4 row {r}");
            }
        }
    }

    #[test]
    fn no_groups_or_an_empty_batch_write_nothing() {
        let x = vec![BlockQ8Act { d: 1.0, s: 0.0, qs: [1; GROUP] }; QK_K / GROUP];
        let group = [BlockQ6Kx4::from_rows(&[BlockQ6K::quantize(&[0.5; QK_K]); INTERLEAVE])];
        for (_, kernel) in kernels(|k| k.matmul_q4kx4) {
            kernel(&[], QK_K, &x, &mut []);
        }
        for (_, kernel) in kernels(|k| k.matmul_q4kx8) {
            kernel(&[], QK_K, &x, &mut []);
        }
        for (_, kernel) in kernels(|k| k.matmul_q6kx4) {
            kernel(&group, QK_K, &[], &mut []);
        }
    }
}
