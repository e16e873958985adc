//! Products of four-row interleaved Q3_K, Q5_K and Q2_K matrices
//! ([`BlockQ3Kx4`], [`BlockQ5Kx4`], [`BlockQ2Kx4`]) with int8 activations:
//! the walk, the scale decoding and the float accumulation are those of the
//! Q4_K and Q6_K kernels beside them ([`super::interleaved`], which
//! describes the layout's idea); what is new is how the levels come out of
//! the bytes.
//!
//! - Q3_K: each level is stored as a three-bit signed number `t` in one of
//!   three planes ([`BlockQ3Kx4`]), so one or two operations a vector give
//!   `32·t` (the `sdot` kernel multiplies those and divides by 32 once per
//!   super-block, exactly) and one more gives `t` (the ARMv8.0 kernel
//!   multiplies in 16-bit lanes, where `32·t·q` would overflow). The
//!   scales' high bits are stored flipped, so ggml's `scale − 32` is the
//!   packed 6-bit field read as signed, four times it after a shift left
//!   by two. Per activation block `k`, as Q6_K: `d·dₓ·(s₂ₖ·Σ₀ + s₂ₖ₊₁·Σ₁)`.
//! - Q5_K: Q4_K's nibbles with the fifth bit put above them by one
//!   bit-select a vector (`bit`, after a shift of the fifth-bit bytes), and
//!   Q4_K's `d·Σⱼ dₓ·(scaleⱼ·isumⱼ) − dmin·Σⱼ minⱼ·sₓ`.
//! - Q2_K: ggml's bytes, moved. Activation block `k = 4n + j` has its
//!   levels at bits `2j` of the 128 `qs` bytes at `128n`: one `and` a
//!   vector keeps them in place, `4^j` times the levels, a shift right by
//!   6 gives them for `j = 3`, and the A72's kernel, whose 16-bit sums hold
//!   levels up to 12 at most, shifts `j = 2`'s down first. Each block's
//!   scales are shifted left to match, so that every integer sum is the
//!   same power of two times the reference's, taken off `d` once a
//!   super-block. Per activation block, as Q3_K's with the minimums:
//!   `d·dₓ·(s₂ₖ·Σ₀ + s₂ₖ₊₁·Σ₁) − dmin·dₓ·(m₂ₖ·Σ₀q + m₂ₖ₊₁·Σ₁q)`.
//!
//! The scalar references put pieces back in row order and call the
//! row-major references; on x86-64 the row-major AVX2 kernels run over such
//! pieces ([`super::interleaved::through_rows`]).

use crate::kquant::{BlockQ2K, BlockQ3K, BlockQ5K, QK_K};
use crate::quant::{BlockQ2Kx4, BlockQ3Kx4, BlockQ5Kx4, BlockQ8Act, INTERLEAVE};

/// The references: deinterleave, then the row-major reference products.
pub mod scalar {
    use super::*;
    use crate::kernels::matmul::kquant::scalar::{dot_q2k_q8_from, dot_q3k_q8_from, dot_q5k_q8_from};
    use crate::kernels::matmul::scalar::matmul_interleaved;

    /// Super-blocks of a group's rows put back in row order at a time (on
    /// the stack: 4 × 16 Q5_K super-blocks, 11 KiB).
    const STAGED: usize = 16;

    /// Interleaved Q3_K matrix × int8 activations.
    pub fn matmul_q3kx4(weights: &[BlockQ3Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        matmul_interleaved::<_, QK_K, STAGED>(weights, cols, x, out, dot_q3k_q8_from)
    }

    /// Interleaved Q5_K matrix × int8 activations.
    pub fn matmul_q5kx4(weights: &[BlockQ5Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        matmul_interleaved::<_, QK_K, STAGED>(weights, cols, x, out, dot_q5k_q8_from)
    }

    /// Interleaved Q2_K matrix × int8 activations.
    pub fn matmul_q2kx4(weights: &[BlockQ2Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        matmul_interleaved::<_, QK_K, STAGED>(weights, cols, x, out, dot_q2k_q8_from)
    }

    // The interleaved blocks hold as many bytes as four row-major ones.
    const _: () = assert!(size_of::<BlockQ3K>() * INTERLEAVE == size_of::<BlockQ3Kx4>());
    const _: () = assert!(size_of::<BlockQ5K>() * INTERLEAVE == size_of::<BlockQ5Kx4>());
    const _: () = assert!(size_of::<BlockQ2K>() * INTERLEAVE == size_of::<BlockQ2Kx4>());
}

/// The AVX2 row-major k-quant kernels over interleaved matrices.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use super::*;
    use crate::kernels::matmul::kquant::avx2 as rows;
    use crate::kernels::matmul::kquant::interleaved::through_rows;

    /// Interleaved Q3_K matrix × int8 activations.
    pub fn matmul_q3kx4(weights: &[BlockQ3Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        through_rows::matmul(weights, cols, x, out, rows::matmul_q3k)
    }

    /// Interleaved Q5_K matrix × int8 activations.
    pub fn matmul_q5kx4(weights: &[BlockQ5Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        through_rows::matmul(weights, cols, x, out, rows::matmul_q5k)
    }

    /// Interleaved Q2_K matrix × int8 activations.
    pub fn matmul_q2kx4(weights: &[BlockQ2Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        through_rows::matmul(weights, cols, x, out, rows::matmul_q2k)
    }
}

/// What the ARMv8.0 and `sdot` kernels share.
#[cfg(target_arch = "aarch64")]
mod arm {
    pub(super) use super::*;
    pub(super) use crate::kernels::matmul::kquant::interleaved::arm::*;

    /// How a kernel multiplies four rows' levels by an activation block.
    ///
    /// `EXACT` kernels (the ARMv8.0 one) sum products in 16-bit lanes, so
    /// their levels must stay small: Q3_K's `t` rather than `32·t`, Q2_K's
    /// levels at most four times over.
    ///
    /// Its `asm` blocks are memory barriers on purpose (neither `pure` nor
    /// `nomem`): with the eight activation blocks of a super-block written
    /// out one after another, LLVM otherwise hoists every block's loads
    /// and level unpacking to the top of the super-block, keeps dozens of
    /// vectors live and spills them (a hundred stack loads and stores a
    /// super-block in the ARMv8.0 kernel). A barrier after each block's
    /// products keeps the next block's loads below them.
    pub(super) trait Multiply {
        /// Whether it takes Q3_K's levels `t` exactly (else `32·t`).
        const EXACT: bool;
        /// The four rows' sums over the two halves of the activation block
        /// at `*a` (columns 0–15 with `levels[0..4]`, 16–31 with
        /// `levels[4..8]`) and the block's units `[dₓ, sₓ]`; `*a` moves past
        /// the block and `skip` bytes further (the next block a
        /// super-block's walk takes need not be the one after).
        ///
        /// # Safety
        /// `*a` is readable and the CPU has the kernel's features.
        unsafe fn halves(
            levels: &[int8x16_t; 8],
            a: &mut *const BlockQ8Act,
            skip: isize,
        ) -> ((int32x4_t, int32x4_t), float32x2_t);
        /// The four rows' sum over the whole of the activation block at
        /// `*a`, for Q5_K's unsigned levels (0..32), and the block's units;
        /// `*a` moves to the next block.
        ///
        /// # Safety
        /// As [`Multiply::halves`].
        unsafe fn whole(levels: &[int8x16_t; 8], a: &mut *const BlockQ8Act) -> (int32x4_t, float32x2_t);
    }

    /// Bytes of one activation block, the walks' unit of `skip`.
    pub(super) const ACTIVATION_BYTES: isize = size_of::<BlockQ8Act>() as isize;

    /// `sli dst, src, #N`: `src << N` above `dst`'s low `N` bits (as
    /// written: LLVM would turn the intrinsic into masks, shifts and `orr`s).
    #[inline(always)]
    pub(super) unsafe fn sli<const N: u32>(dst: uint8x16_t, src: uint8x16_t) -> uint8x16_t {
        let mut out = dst;
        asm!("sli {o:v}.16b, {s:v}.16b, #{n}", o = inout(vreg) out, s = in(vreg) src, n = const N,
            options(pure, nomem, nostack, preserves_flags));
        out
    }

    /// `sri dst, src, #N`: `src >> N` below `dst`'s high `N` bits.
    #[inline(always)]
    pub(super) unsafe fn sri<const N: u32>(dst: uint8x16_t, src: uint8x16_t) -> uint8x16_t {
        let mut out = dst;
        asm!("sri {o:v}.16b, {s:v}.16b, #{n}", o = inout(vreg) out, s = in(vreg) src, n = const N,
            options(pure, nomem, nostack, preserves_flags));
        out
    }

    /// Four rows' Q3_K units and sixteen signed scales, kept packed (four
    /// vectors, lanes `[scale mod 4][row]`) and widened one activation
    /// block at a time, where they are used: sixteen widened vectors would
    /// stay live through the super-block.
    pub(super) struct Q3KScales {
        /// The rows' `d`.
        pub d: float32x4_t,
        /// Scales `4g … 4g + 4` of the four rows, `4·(scale − 32)` as `i8`.
        pub groups: [int8x16_t; 4],
    }

    impl Q3KScales {
        /// The scales `(s₂ₖ, s₂ₖ₊₁)` of activation block `K`, four times ggml's.
        #[inline(always)]
        pub(super) unsafe fn pair<const K: usize>(&self) -> (int32x4_t, int32x4_t) {
            let v = self.groups[K / 2];
            let half = if K.is_multiple_of(2) { vmovl_s8(vget_low_s8(v)) } else { vmovl_high_s8(v) };
            (vmovl_s16(vget_low_s16(half)), vmovl_high_s16(half))
        }
    }

    /// The rows' units and scales: bytes `0..4`, `4..8`, `8..12` of the
    /// rows' packed scales are the vectors `a`, `b`, `c` (lanes
    /// `[byte][row]`, `c` flipped, see [`crate::quant::Q3K_SCALE_FLIP`]);
    /// scale `4g + m` has its low nibble in byte `m` of `a` (g = 0, low
    /// nibble; 2, high), `b` (1, low; 3, high), its high two bits at bits
    /// `2g …` of byte `m` of `c`. One insert a group puts the nibble under
    /// the two bits (and two bits of garbage above them), a shift left by
    /// two drops the garbage and leaves `4·(scale − 32)`.
    ///
    /// # Safety
    /// `block` points at a readable block.
    #[inline(always)]
    pub(super) unsafe fn q3k_scales(block: *const BlockQ3Kx4) -> Q3KScales {
        let d = widen_f16(vreinterpret_u16_u8(vld1_u8((*block).d.as_ptr().cast::<u8>())));
        let packed = vld1q_u8_x3((*block).scales.as_ptr());
        let (a, b, c) = (packed.0, packed.1, packed.2);
        let c2 = vshrq_n_u8::<2>(c);
        let groups = [sli::<4>(a, c), sli::<4>(b, c2), sri::<4>(c, a), sri::<4>(c2, b)];
        Q3KScales { d, groups: groups.map(|v| vreinterpretq_s8_u8(vshlq_n_u8::<2>(v))) }
    }

    /// The four rows' levels of activation block `K` (values `32K …
    /// 32K + 32`, eight vectors of four columns), `32·t` or (`M::EXACT`) `t`,
    /// from the planes ([`BlockQ3Kx4`]): a field in bits 5–7 is cleared
    /// below (`and`) or shifted down arithmetically; one in bits 2–4 is
    /// first shifted up by 3; `t₆` and `t₇` put their sign bit (bit 0 or 1
    /// of plane 2) above their low two bits with `sli` and shift the three
    /// up to bits 5–7.
    ///
    /// # Safety
    /// `block` points at a readable block.
    #[inline(always)]
    pub(super) unsafe fn q3k_levels<const K: usize, M: Multiply>(block: *const BlockQ3Kx4) -> [int8x16_t; 8] {
        let plane = |p: usize| load128((*block).planes[p].as_ptr());
        let top = |v: uint8x16_t| {
            if M::EXACT {
                vshrq_n_s8::<5>(vreinterpretq_s8_u8(v))
            } else {
                vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0xE0)))
            }
        };
        let bottom = |v: uint8x16_t| {
            let scaled = vreinterpretq_s8_u8(vshlq_n_u8::<5>(v));
            if M::EXACT {
                vshrq_n_s8::<5>(scaled)
            } else {
                scaled
            }
        };
        match K {
            0 | 2 | 4 => plane(K / 2).map(top),
            1 | 3 | 5 => plane(K / 2).map(|v| top(vshlq_n_u8::<3>(v))),
            6 => {
                let (low, signs) = (plane(0), plane(2));
                std::array::from_fn(|i| bottom(sli::<2>(low[i], signs[i])))
            }
            _ => {
                let (low, signs) = (plane(1), plane(2));
                std::array::from_fn(|i| bottom(sli::<2>(low[i], vshrq_n_u8::<1>(signs[i]))))
            }
        }
    }

    /// Activation block `K` of a Q3_K super-block against `N` activations:
    /// `scaled[t] += dₓ·(s₂ₖ·Σ₀ + s₂ₖ₊₁·Σ₁)`. Each `activations[t]` is at
    /// block `K` and moves to block `NEXT` (8: the next super-block's first).
    #[inline(always)]
    unsafe fn q3k_block<M: Multiply, const K: usize, const NEXT: usize, const N: usize>(
        block: *const BlockQ3Kx4,
        activations: &mut [*const BlockQ8Act; N],
        scales: &Q3KScales,
        scaled: &mut [float32x4_t; N],
    ) {
        let levels = q3k_levels::<K, M>(block);
        let pair = scales.pair::<K>();
        let skip = (NEXT as isize - K as isize - 1) * ACTIVATION_BYTES;
        for t in 0..N {
            let (sums, units) = M::halves(&levels, &mut activations[t], skip);
            accumulate_pair(sums, units, pair, &mut scaled[t]);
            settle(&mut scaled[t]);
        }
    }

    /// One Q3_K super-block of a group against `N` activations into `acc`.
    ///
    /// # Safety
    /// `block` is readable, each `activations[t]` points at the
    /// super-block's eight activation blocks (and moves past them), and the
    /// CPU has `M`'s features.
    #[inline(always)]
    pub(super) unsafe fn q3k_superblock<M: Multiply, const N: usize>(
        block: *const BlockQ3Kx4,
        activations: &mut [*const BlockQ8Act; N],
        acc: &mut [float32x4_t; N],
    ) {
        let scales = q3k_scales(block);
        let mut scaled = [vdupq_n_f32(0.0); N];
        // Plane 0's quarters, then plane 1's, then plane 2's alone: 6 and 7
        // also read plane 2, so at most two planes are live at once.
        q3k_block::<M, 0, 1, N>(block, activations, &scales, &mut scaled);
        q3k_block::<M, 1, 6, N>(block, activations, &scales, &mut scaled);
        q3k_block::<M, 6, 2, N>(block, activations, &scales, &mut scaled);
        q3k_block::<M, 2, 3, N>(block, activations, &scales, &mut scaled);
        q3k_block::<M, 3, 7, N>(block, activations, &scales, &mut scaled);
        q3k_block::<M, 7, 4, N>(block, activations, &scales, &mut scaled);
        q3k_block::<M, 4, 5, N>(block, activations, &scales, &mut scaled);
        q3k_block::<M, 5, 8, N>(block, activations, &scales, &mut scaled);
        // The scales are four times ggml's, the levels 32 times (or once):
        // powers of two, so the division is exact.
        let d = vmulq_n_f32(scales.d, if M::EXACT { 0.25 } else { 1.0 / 128.0 });
        for t in 0..N {
            acc[t] = vfmaq_f32(acc[t], scaled[t], d);
        }
    }

    /// Q5_K levels of sub-block `SUB` (0..8): the low (even) or high (odd)
    /// nibbles of the chunk's eight vectors `bytes`, with bit `SUB` of the
    /// matching fifth-bit vectors `high` shifted to bit 4 and selected in.
    #[inline(always)]
    pub(super) unsafe fn q5k_levels<const SUB: usize>(bytes: [uint8x16_t; 8], high: [uint8x16_t; 8]) -> [int8x16_t; 8] {
        let fifth = vdupq_n_u8(0x10);
        std::array::from_fn(|i| {
            let nibble =
                if SUB.is_multiple_of(2) { vandq_u8(bytes[i], vdupq_n_u8(15)) } else { vshrq_n_u8::<4>(bytes[i]) };
            let h = high[i];
            let moved = match SUB {
                0 => vshlq_n_u8::<4>(h),
                1 => vshlq_n_u8::<3>(h),
                2 => vshlq_n_u8::<2>(h),
                3 => vshlq_n_u8::<1>(h),
                4 => h,
                5 => vshrq_n_u8::<1>(h),
                6 => vshrq_n_u8::<2>(h),
                _ => vshrq_n_u8::<3>(h),
            };
            vreinterpretq_s8_u8(select(nibble, moved, fifth))
        })
    }

    /// `bit dst, src, mask`: `src`'s bits where `mask` is set, `dst`'s
    /// elsewhere, as written (LLVM turns `vbslq_u8` with a constant mask
    /// into an `and` and an `orr`).
    #[inline(always)]
    unsafe fn select(dst: uint8x16_t, src: uint8x16_t, mask: uint8x16_t) -> uint8x16_t {
        let mut out = dst;
        asm!("bit {o:v}.16b, {s:v}.16b, {m:v}.16b", o = inout(vreg) out, s = in(vreg) src, m = in(vreg) mask,
            options(pure, nomem, nostack, preserves_flags));
        out
    }

    /// Four rows' Q5_K units, scales and minimums, the 6-bit values kept
    /// packed (lanes `[sub-block mod 4][row]`) and widened a sub-block at a
    /// time, where they are used (as [`Q3KScales`]).
    pub(super) struct Q5KScales {
        /// The rows' `d`.
        pub d: float32x4_t,
        /// The rows' `dmin`.
        pub dmin: float32x4_t,
        /// Sub-blocks 0–3 and 4–7's scales.
        pub scales: [uint8x16_t; 2],
        /// Sub-blocks 0–3 and 4–7's minimums.
        pub mins: [uint8x16_t; 2],
    }

    impl Q5KScales {
        /// Sub-block `SUB`'s scales (as integers) and minimums (as floats), lanes rows.
        #[inline(always)]
        pub(super) unsafe fn pair<const SUB: usize>(&self) -> (int32x4_t, float32x4_t) {
            let lanes = |v: uint8x16_t| {
                let half = if SUB % 4 < 2 { vmovl_u8(vget_low_u8(v)) } else { vmovl_high_u8(v) };
                let wide = if SUB.is_multiple_of(2) { vmovl_u16(vget_low_u16(half)) } else { vmovl_high_u16(half) };
                vreinterpretq_s32_u32(wide)
            };
            (lanes(self.scales[SUB / 4]), vcvtq_f32_s32(lanes(self.mins[SUB / 4])))
        }
    }

    /// The units, scales and minimums of four rows' Q5_K super-blocks,
    /// unpacked as [`q4k_scales`] does (ggml's `get_scale_min_k4`).
    ///
    /// # Safety
    /// `block` points at a readable block.
    #[inline(always)]
    pub(super) unsafe fn q5k_scales(block: *const BlockQ5Kx4) -> Q5KScales {
        let units = vreinterpretq_u16_u8(vld1q_u8(block.cast::<u8>()));
        let (d, dmin) = (widen_f16(vget_low_u16(units)), widen_f16(vget_high_u16(units)));
        let packed = vld1q_u8_x3((*block).scales.as_ptr());
        let (a, b, c) = (packed.0, packed.1, packed.2);
        let six_bits = vdupq_n_u8(63);
        // `sli` puts the top two bits (shifted down to 0, 1) above the nibble.
        let scales_high = vsliq_n_u8::<4>(vandq_u8(c, vdupq_n_u8(15)), vshrq_n_u8::<6>(a));
        let mins_high = vsliq_n_u8::<4>(vshrq_n_u8::<4>(c), vshrq_n_u8::<6>(b));
        Q5KScales { d, dmin, scales: [vandq_u8(a, six_bits), scales_high], mins: [vandq_u8(b, six_bits), mins_high] }
    }

    /// Sub-block `SUB` of a Q5_K super-block against `N` activations:
    /// `scaled[t] += dₓ·(scale·isum)`, `minimums[t] += min·sₓ`.
    #[inline(always)]
    unsafe fn q5k_block<M: Multiply, const SUB: usize, const N: usize>(
        block: *const BlockQ5Kx4,
        activations: &mut [*const BlockQ8Act; N],
        scales: &Q5KScales,
        (scaled, minimums): (&mut [float32x4_t; N], &mut [float32x4_t; N]),
    ) {
        // Chunk `SUB / 2` of 128 `qs` bytes holds sub-blocks `SUB` and `SUB ^ 1`.
        let bytes = load128((*block).qs.as_ptr().add(128 * (SUB / 2)));
        let levels = q5k_levels::<SUB>(bytes, load128((*block).qh.as_ptr()));
        let pair = scales.pair::<SUB>();
        for t in 0..N {
            let (isum, units) = M::whole(&levels, &mut activations[t]);
            accumulate_k4(isum, units, pair, &mut scaled[t], &mut minimums[t]);
            settle(&mut scaled[t]);
            settle(&mut minimums[t]);
        }
    }

    /// One Q5_K super-block of a group against `N` activations into `acc`.
    ///
    /// # Safety
    /// As [`q3k_superblock`].
    #[inline(always)]
    pub(super) unsafe fn q5k_superblock<M: Multiply, const N: usize>(
        block: *const BlockQ5Kx4,
        activations: &mut [*const BlockQ8Act; N],
        acc: &mut [float32x4_t; N],
    ) {
        let scales = q5k_scales(block);
        let (mut scaled, mut minimums) = ([vdupq_n_f32(0.0); N], [vdupq_n_f32(0.0); N]);
        let sums = (&mut scaled, &mut minimums);
        q5k_block::<M, 0, N>(block, activations, &scales, (sums.0, sums.1));
        q5k_block::<M, 1, N>(block, activations, &scales, (sums.0, sums.1));
        q5k_block::<M, 2, N>(block, activations, &scales, (sums.0, sums.1));
        q5k_block::<M, 3, N>(block, activations, &scales, (sums.0, sums.1));
        q5k_block::<M, 4, N>(block, activations, &scales, (sums.0, sums.1));
        q5k_block::<M, 5, N>(block, activations, &scales, (sums.0, sums.1));
        q5k_block::<M, 6, N>(block, activations, &scales, (sums.0, sums.1));
        q5k_block::<M, 7, N>(block, activations, &scales, (sums.0, sums.1));
        for t in 0..N {
            acc[t] = vfmsq_f32(vfmaq_f32(acc[t], scaled[t], scales.d), minimums[t], scales.dmin);
        }
    }

    /// The shift left of each Q2_K activation block's scales, by its field
    /// `j` (`k mod 4`): the `and` of field `j` leaves `4^j` times the levels
    /// (`j` < 3, and for `EXACT` kernels `j` < 2, whose field 2 is shifted
    /// down first), field 3 is shifted down to the levels themselves; the
    /// scales make up the difference to the largest multiple, 16 (4 for
    /// `EXACT`).
    const fn q2k_scale_shifts(exact: bool) -> [u8; 4] {
        if exact {
            [2, 0, 2, 2]
        } else {
            [4, 2, 0, 4]
        }
    }

    /// Activation block `K`'s scales `(s₂ₖ, s₂ₖ₊₁)` of the four rows, shifted
    /// left by its field's [`q2k_scale_shifts`], and its minimums
    /// `[m₂ₖ × 4 rows, m₂ₖ₊₁ × 4 rows]` in 16-bit lanes, from the eight
    /// bytes at `scales[8K]` (a row's scale in the low nibble, its minimum
    /// in the high one), read from memory a block at a time, where they are
    /// used, rather than decoded for the whole super-block and kept in
    /// registers beside the levels.
    ///
    /// # Safety
    /// `block` points at a readable block.
    #[inline(always)]
    pub(super) unsafe fn q2k_scales<const K: usize, M: Multiply>(
        block: *const BlockQ2Kx4,
    ) -> ((int32x4_t, int32x4_t), int16x8_t) {
        let bytes = vld1_u8((*block).scales.as_ptr().add(8 * K));
        let scales = vmovl_u8(match q2k_scale_shifts(M::EXACT)[K % 4] {
            0 => vand_u8(bytes, vdup_n_u8(15)),
            2 => vshl_n_u8::<2>(vand_u8(bytes, vdup_n_u8(15))),
            // 4: the shift drops the minimum's nibble.
            _ => vshl_n_u8::<4>(bytes),
        });
        let pair = (vmovl_u16(vget_low_u16(scales)), vmovl_high_u16(scales));
        let mins = vreinterpretq_s16_u16(vmovl_u8(vshr_n_u8::<4>(bytes)));
        ((vreinterpretq_s32_u32(pair.0), vreinterpretq_s32_u32(pair.1)), mins)
    }

    /// The four rows' levels of activation block `K` (eight vectors of four
    /// columns) from the 128 `qs` bytes at `128·(K / 4)`, times the power
    /// of two its field leaves (see [`q2k_scale_shifts`]).
    ///
    /// # Safety
    /// `block` points at a readable block.
    #[inline(always)]
    pub(super) unsafe fn q2k_levels<const K: usize, M: Multiply>(block: *const BlockQ2Kx4) -> [int8x16_t; 8] {
        let bytes = load128((*block).qs.as_ptr().add(128 * (K / 4)));
        bytes.map(|v| {
            vreinterpretq_s8_u8(match K % 4 {
                0 => vandq_u8(v, vdupq_n_u8(0x03)),
                1 => vandq_u8(v, vdupq_n_u8(0x0C)),
                2 if M::EXACT => vandq_u8(vshrq_n_u8::<4>(v), vdupq_n_u8(0x03)),
                2 => vandq_u8(v, vdupq_n_u8(0x30)),
                _ => vshrq_n_u8::<6>(v),
            })
        })
    }

    /// Activation block `K` of a Q2_K super-block against `N` activations:
    /// `scaled[t] += dₓ·(s₂ₖ·Σ₀ + s₂ₖ₊₁·Σ₁)`, `minimums[t] += dₓ·(m₂ₖ·Σ₀q + m₂ₖ₊₁·Σ₁q)`.
    #[inline(always)]
    unsafe fn q2k_block<M: Multiply, const K: usize, const N: usize>(
        block: *const BlockQ2Kx4,
        activations: &mut [*const BlockQ8Act; N],
        (scaled, minimums): (&mut [float32x4_t; N], &mut [float32x4_t; N]),
    ) {
        let levels = q2k_levels::<K, M>(block);
        let (pair, mins) = q2k_scales::<K, M>(block);
        for t in 0..N {
            // The values for the minimums, loaded before the products' `asm`
            // moves the pointer on (one `ldp` at an offset).
            let values = (*activations[t]).qs.as_ptr();
            let q = [vld1q_s8(values), vld1q_s8(values.add(16))];
            let (sums, units) = M::halves(&levels, &mut activations[t], 0);
            accumulate_pair(sums, units, pair, &mut scaled[t]);
            let msum = q2k_minimum_sums(q, mins);
            minimums[t] = vfmaq_lane_f32::<0>(minimums[t], vcvtq_f32_s32(msum), units);
            settle(&mut scaled[t]);
            settle(&mut minimums[t]);
        }
    }

    /// One Q2_K super-block of a group against `N` activations into `acc`.
    ///
    /// # Safety
    /// As [`q3k_superblock`].
    #[inline(always)]
    pub(super) unsafe fn q2k_superblock<M: Multiply, const N: usize>(
        block: *const BlockQ2Kx4,
        activations: &mut [*const BlockQ8Act; N],
        acc: &mut [float32x4_t; N],
    ) {
        let (mut scaled, mut minimums) = ([vdupq_n_f32(0.0); N], [vdupq_n_f32(0.0); N]);
        let sums = (&mut scaled, &mut minimums);
        q2k_block::<M, 0, N>(block, activations, (sums.0, sums.1));
        q2k_block::<M, 1, N>(block, activations, (sums.0, sums.1));
        q2k_block::<M, 2, N>(block, activations, (sums.0, sums.1));
        q2k_block::<M, 3, N>(block, activations, (sums.0, sums.1));
        q2k_block::<M, 4, N>(block, activations, (sums.0, sums.1));
        q2k_block::<M, 5, N>(block, activations, (sums.0, sums.1));
        q2k_block::<M, 6, N>(block, activations, (sums.0, sums.1));
        q2k_block::<M, 7, N>(block, activations, (sums.0, sums.1));
        // The rows' units, `d` less the power of two the sums carry.
        let units = vreinterpretq_u16_u8(vld1q_u8(block.cast::<u8>()));
        let multiple = if M::EXACT { 4.0 } else { 16.0 };
        let (d, dmin) = (vmulq_n_f32(widen_f16(vget_low_u16(units)), 1.0 / multiple), widen_f16(vget_high_u16(units)));
        for t in 0..N {
            acc[t] = vfmsq_f32(vfmaq_f32(acc[t], scaled[t], d), minimums[t], dmin);
        }
    }

    /// A format's interleaved super-block and its walk, whatever multiplies.
    pub(super) trait Superblock {
        /// The interleaved super-block.
        type Block;
        /// One super-block of a group against `N` activations into `acc`;
        /// each activation's pointer moves past the super-block's blocks.
        ///
        /// # Safety
        /// As [`q3k_superblock`].
        unsafe fn superblock<M: Multiply, const N: usize>(
            block: *const Self::Block,
            activations: &mut [*const BlockQ8Act; N],
            acc: &mut [float32x4_t; N],
        );
    }

    /// `Superblock` for a format whose walk is the function `$walk`.
    macro_rules! superblock {
        ($(#[$doc:meta])* $format:ident, $block:ty, $walk:ident) => {
            $(#[$doc])*
            pub(super) struct $format;

            impl Superblock for $format {
                type Block = $block;
                #[inline(always)]
                unsafe fn superblock<M: Multiply, const N: usize>(
                    block: *const $block,
                    activations: &mut [*const BlockQ8Act; N],
                    acc: &mut [float32x4_t; N],
                ) {
                    $walk::<M, N>(block, activations, acc)
                }
            }
        };
    }
    superblock!(
        /// Q3_K.
        Q3K, BlockQ3Kx4, q3k_superblock
    );
    superblock!(
        /// Q5_K.
        Q5K, BlockQ5Kx4, q5k_superblock
    );
    superblock!(
        /// Q2_K.
        Q2K, BlockQ2Kx4, q2k_superblock
    );

    /// Format `F`, four rows a step, multiplied by `M`: each kernel's `Group`.
    pub(super) struct Kernel<F, M>(std::marker::PhantomData<(F, M)>);

    /// A group's super-blocks one after another against `N` activations
    /// (every kernel's `Group::dot`).
    ///
    /// # Safety
    /// As `Group::dot`.
    #[inline(always)]
    pub(super) unsafe fn walk<F: Superblock, M: Multiply, const N: usize>(
        group: *const F::Block,
        superblocks: usize,
        x: [*const BlockQ8Act; N],
    ) -> [float32x4_t; N] {
        let (mut acc, mut activations) = ([vdupq_n_f32(0.0); N], x);
        // Each activation is walked front to back (the kernels' loads move
        // their pointers on), so no address is computed from `s`.
        for s in 0..superblocks {
            F::superblock::<M, N>(group.add(s), &mut activations, &mut acc);
        }
        acc
    }
}

/// ARMv8.0 NEON kernels (no `sdot`): the Raspberry Pi 4's Cortex-A72.
#[cfg(target_arch = "aarch64")]
pub mod neon {
    use super::arm::*;

    /// Widening multiplies: each four-byte column group of the activation
    /// broadcast to a whole register (`ld4r`, four groups at a time into
    /// v24–v27 and v28–v31), products of rows 0–1 (low halves) and 2–3
    /// (high halves) in 16-bit lanes. The activation's units and values are
    /// loaded inside the products' `asm` with post-increment addressing
    /// (`ldr d, [x], #8`, `ld4r {…}, [x], #16`): `ld4r` has no offset form,
    /// so each had cost an address `add`.
    struct Widening;

    impl Multiply for Widening {
        const EXACT: bool = true;

        /// Q3_K's levels are −4..4, Q2_K's at most 12 (four times 0..3):
        /// a 16-bit lane takes four products (|t·q| ≤ 12·128), then two
        /// pairwise adds in 16 bits (sixteen products, ≤ 24576 < 2¹⁵)
        /// leave both halves' four row sums in one vector, widened to two.
        #[inline(always)]
        unsafe fn halves(
            w: &[int8x16_t; 8],
            a: &mut *const BlockQ8Act,
            skip: isize,
        ) -> ((int32x4_t, int32x4_t), float32x2_t) {
            let (first, second, units): (int32x4_t, int32x4_t, float32x2_t);
            asm!(
                "ldr {units:d}, [{a}], #8",
                "ld4r {{v24.4s, v25.4s, v26.4s, v27.4s}}, [{a}], #16",
                "ld4r {{v28.4s, v29.4s, v30.4s, v31.4s}}, [{a}], {step}",
                "smull {lo0:v}.8h, {w0:v}.8b, v24.8b",
                "smull2 {hi0:v}.8h, {w0:v}.16b, v24.16b",
                "smull {lo1:v}.8h, {w4:v}.8b, v28.8b",
                "smull2 {hi1:v}.8h, {w4:v}.16b, v28.16b",
                "smlal {lo0:v}.8h, {w1:v}.8b, v25.8b",
                "smlal2 {hi0:v}.8h, {w1:v}.16b, v25.16b",
                "smlal {lo1:v}.8h, {w5:v}.8b, v29.8b",
                "smlal2 {hi1:v}.8h, {w5:v}.16b, v29.16b",
                "smlal {lo0:v}.8h, {w2:v}.8b, v26.8b",
                "smlal2 {hi0:v}.8h, {w2:v}.16b, v26.16b",
                "smlal {lo1:v}.8h, {w6:v}.8b, v30.8b",
                "smlal2 {hi1:v}.8h, {w6:v}.16b, v30.16b",
                "smlal {lo0:v}.8h, {w3:v}.8b, v27.8b",
                "smlal2 {hi0:v}.8h, {w3:v}.16b, v27.16b",
                "smlal {lo1:v}.8h, {w7:v}.8b, v31.8b",
                "smlal2 {hi1:v}.8h, {w7:v}.16b, v31.16b",
                "addp {lo0:v}.8h, {lo0:v}.8h, {hi0:v}.8h",
                "addp {lo1:v}.8h, {lo1:v}.8h, {hi1:v}.8h",
                "addp {lo0:v}.8h, {lo0:v}.8h, {lo1:v}.8h",
                "sxtl {first:v}.4s, {lo0:v}.4h",
                "sxtl2 {second:v}.4s, {lo0:v}.8h",
                a = inout(reg) *a,
                step = in(reg) 16 + skip,
                units = out(vreg) units,
                first = out(vreg) first,
                second = out(vreg) second,
                lo0 = out(vreg) _,
                hi0 = out(vreg) _,
                lo1 = out(vreg) _,
                hi1 = out(vreg) _,
                out("v24") _, out("v25") _, out("v26") _, out("v27") _,
                out("v28") _, out("v29") _, out("v30") _, out("v31") _,
                w0 = in(vreg) w[0], w1 = in(vreg) w[1], w2 = in(vreg) w[2], w3 = in(vreg) w[3],
                w4 = in(vreg) w[4], w5 = in(vreg) w[5], w6 = in(vreg) w[6], w7 = in(vreg) w[7],
                // Not `pure`, not `nomem`: a barrier (see [`Multiply`]).
                options(nostack, preserves_flags),
            );
            ((first, second), units)
        }

        /// Q5_K's levels are 0..32: eight products a 16-bit lane (|n·q| ≤
        /// 31·128, so below 2¹⁵), widened before the pairwise add (two such
        /// lanes could pass 2¹⁵).
        #[inline(always)]
        unsafe fn whole(w: &[int8x16_t; 8], a: &mut *const BlockQ8Act) -> (int32x4_t, float32x2_t) {
            let (sum, units): (int32x4_t, float32x2_t);
            asm!(
                "ldr {units:d}, [{a}], #8",
                "ld4r {{v24.4s, v25.4s, v26.4s, v27.4s}}, [{a}], #16",
                "ld4r {{v28.4s, v29.4s, v30.4s, v31.4s}}, [{a}], #16",
                widening_products!(start "lo" "hi"; "w0" "v24", "w1" "v25", "w2" "v26", "w3" "v27",
                    "w4" "v28", "w5" "v29", "w6" "v30", "w7" "v31"),
                "saddlp {lo:v}.4s, {lo:v}.8h",
                "saddlp {hi:v}.4s, {hi:v}.8h",
                "addp {sum:v}.4s, {lo:v}.4s, {hi:v}.4s",
                a = inout(reg) *a,
                units = out(vreg) units,
                sum = out(vreg) sum,
                lo = out(vreg) _,
                hi = out(vreg) _,
                out("v24") _, out("v25") _, out("v26") _, out("v27") _,
                out("v28") _, out("v29") _, out("v30") _, out("v31") _,
                w0 = in(vreg) w[0], w1 = in(vreg) w[1], w2 = in(vreg) w[2], w3 = in(vreg) w[3],
                w4 = in(vreg) w[4], w5 = in(vreg) w[5], w6 = in(vreg) w[6], w7 = in(vreg) w[7],
                // Not `pure`, not `nomem`: a barrier (see [`Multiply`]).
                options(nostack, preserves_flags),
            );
            (sum, units)
        }
    }

    impl<F: Superblock> Group for Kernel<F, Widening> {
        type Block = F::Block;
        const TILE: usize = 4;

        unsafe fn dot<const N: usize>(
            group: *const F::Block,
            superblocks: usize,
            x: [*const BlockQ8Act; N],
        ) -> [float32x4_t; N] {
            walk::<F, Widening, N>(group, superblocks, x)
        }
    }

    /// Interleaved Q3_K matrix × int8 activations.
    pub fn matmul_q3kx4(weights: &[BlockQ3Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { matmul::<Kernel<Q3K, Widening>>(weights, cols, x, out) }
    }

    /// Interleaved Q2_K matrix × int8 activations.
    pub fn matmul_q2kx4(weights: &[BlockQ2Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { matmul::<Kernel<Q2K, Widening>>(weights, cols, x, out) }
    }

    /// Interleaved Q5_K matrix × int8 activations.
    pub fn matmul_q5kx4(weights: &[BlockQ5Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { matmul::<Kernel<Q5K, Widening>>(weights, cols, x, out) }
    }
}

/// `sdot` kernels (ARMv8.2's dot-product extension): the Raspberry Pi 5's Cortex-A76.
#[cfg(target_arch = "aarch64")]
pub mod dotprod {
    use super::arm::*;
    use crate::kernels::matmul::dotprod::available;

    /// `sdot` by lane: vector `c` (four rows × columns `4c … 4c+4`) against
    /// lane `c` of the activation's sixteen columns.
    struct Dot;

    /// Four `sdot`s: the four rows' `Σ level·q` over the sixteen columns of `q`.
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
            // Not `pure`, not `nomem`: a barrier (see [`Multiply`]).
            options(nostack, preserves_flags),
        );
        sum
    }

    impl Multiply for Dot {
        const EXACT: bool = false;

        /// `32·t·q` ≤ 2¹⁴ a product, sixteen a sum: far inside 32 bits.
        #[target_feature(enable = "dotprod")]
        #[inline]
        unsafe fn halves(
            w: &[int8x16_t; 8],
            a: &mut *const BlockQ8Act,
            skip: isize,
        ) -> ((int32x4_t, int32x4_t), float32x2_t) {
            let block = *a;
            let (q, units) = (vld1q_s8_x2((*block).qs.as_ptr()), activation_units(block));
            *a = block.add(1).byte_offset(skip);
            ((sum16(&w[..4], q.0), sum16(&w[4..], q.1)), units)
        }

        /// Eight `sdot`s into one sum.
        #[target_feature(enable = "dotprod")]
        #[inline]
        unsafe fn whole(w: &[int8x16_t; 8], a: &mut *const BlockQ8Act) -> (int32x4_t, float32x2_t) {
            let block = *a;
            let (q, units) = (vld1q_s8_x2((*block).qs.as_ptr()), activation_units(block));
            *a = block.add(1);
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
                // Not `pure`, not `nomem`: a barrier (see [`Multiply`]).
                options(nostack, preserves_flags),
            );
            (sum, units)
        }
    }

    impl<F: Superblock> Group for Kernel<F, Dot> {
        type Block = F::Block;
        const TILE: usize = 8;

        #[target_feature(enable = "dotprod")]
        unsafe fn dot<const N: usize>(
            group: *const F::Block,
            superblocks: usize,
            x: [*const BlockQ8Act; N],
        ) -> [float32x4_t; N] {
            walk::<F, Dot, N>(group, superblocks, x)
        }
    }

    /// Interleaved Q3_K matrix × int8 activations. Panics on a CPU without
    /// the dot-product extension.
    pub fn matmul_q3kx4(weights: &[BlockQ3Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: the CPU has the dot-product extension (checked just above).
        unsafe { matmul::<Kernel<Q3K, Dot>>(weights, cols, x, out) }
    }

    /// Interleaved Q2_K matrix × int8 activations. Panics on a CPU without
    /// the dot-product extension.
    pub fn matmul_q2kx4(weights: &[BlockQ2Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: the CPU has the dot-product extension (checked just above).
        unsafe { matmul::<Kernel<Q2K, Dot>>(weights, cols, x, out) }
    }

    /// Interleaved Q5_K matrix × int8 activations. Panics on a CPU without
    /// the dot-product extension.
    pub fn matmul_q5kx4(weights: &[BlockQ5Kx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: the CPU has the dot-product extension (checked just above).
        unsafe { matmul::<Kernel<Q5K, Dot>>(weights, cols, x, out) }
    }
}
