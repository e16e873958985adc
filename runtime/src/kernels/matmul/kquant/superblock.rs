//! Products of four-row interleaved Q4_K and Q6_K matrices ([`BlockQ4Kx4`],
//! [`BlockQ6Kx4`]) with activations under one scale a super-block
//! ([`BlockQ8K`], ggml's Q8_K), for the Pi cores' decode steps.
//!
//! - [`scalar`]: the reference, compiled everywhere, the same integer sums
//!   and the same fused float steps in the same order, so the NEON and
//!   `sdot` kernels equal it bit for bit;
//! - `neon` (aarch64, the Raspberry Pi 4's Cortex-A72);
//! - `dotprod` (with `sdot`, the Raspberry Pi 5's Cortex-A76).
//!
//! Why a second activation format: with the runtime's 32-value activation
//! blocks ([`crate::quant::BlockQ8Act`]) each sub-block's integer sum meets
//! its own activation scale, so it becomes a float on its own (`mul`,
//! `scvtf`, `fmla`, and an `fmla` for Q4_K's minimum, four instructions a
//! sub-block of four rows). Under one activation scale a super-block the
//! integer scales multiply the integer sums and add up in integers (one
//! `mla`), Q4_K's minimums meet the activation's integer sums per 32 (one
//! widening multiply by lane a sub-block), and the super-block becomes a
//! float once:
//!
//! - Q4_K: `d·dₓ·Σⱼ scaleⱼ·isumⱼ − dmin·dₓ·Σⱼ minⱼ·Σqⱼ`;
//! - Q6_K: `d·dₓ·Σₖ sₖ·isumₖ` over its sixteen sub-blocks of 16.
//!
//! The int32 sums cannot overflow: Q4_K's `Σⱼ scaleⱼ·isumⱼ` is at most
//! 8·63·32·15·128 < 2²⁵, Q6_K's at most 16·128·16·32·128 = 2²⁷ (2²⁹ in
//! the `sdot` kernel, which sums four times the levels).
//!
//! The price is coarser activations (one scale for 256 values instead of
//! eight), which is what llama.cpp's k-quant products use everywhere.
//! Prompts (batches) keep the 32-value blocks and the tiled kernels of
//! [`super::interleaved`].

use crate::kquant::BlockQ4K;
use crate::kquant::{scale_min_k4, QK_K};
use crate::quant::{BlockQ4Kx4, BlockQ4Kx8, BlockQ6Kx4, BlockQ8K, Interleaved, GROUP};

#[cfg(target_arch = "aarch64")]
pub mod x8;

/// Where a [`BlockQ6Kx4`]'s `qh` starts, and its size: the Q6_K kernels walk
/// the units, scales and `ql` with one pointer and `qh` with another.
#[cfg(target_arch = "aarch64")]
const Q6K_QH: usize = std::mem::offset_of!(BlockQ6Kx4, qh);
#[cfg(target_arch = "aarch64")]
const Q6K_SIZE: usize = std::mem::size_of::<BlockQ6Kx4>();

/// Super-blocks a row and activations of the batch, checked against the
/// matmul's slices (groups of `rows` rows: [`Interleaved::ROWS`]).
fn shape<W>(weights: &[W], rows: usize, cols: usize, x: &[BlockQ8K], out: &[f32]) -> (usize, usize) {
    assert!(cols > 0 && cols.is_multiple_of(QK_K), "{cols} columns are not whole super-blocks of {QK_K}");
    let superblocks = cols / QK_K;
    let (groups, batch) = (weights.len() / superblocks, x.len() / superblocks);
    assert!(
        weights.len() == groups * superblocks && x.len() == batch * superblocks && out.len() == groups * rows * batch,
        "matmul shapes disagree: {} interleaved super-blocks, {} activation super-blocks, {} outputs, {cols} columns",
        weights.len(),
        x.len(),
        out.len()
    );
    (superblocks, batch)
}

/// The reference.
pub mod scalar {
    use super::*;
    use crate::kernels::matmul::kquant::scalar::{levels_q4k, levels_q6k};
    use crate::kquant::f16_value;

    /// `Σ a[j]·b[j]` as integers.
    fn dot(a: &[i8], b: &[i8]) -> i32 {
        a.iter().zip(b).map(|(&a, &b)| a as i32 * b as i32).sum()
    }

    /// Every group's rows against every activation, row `Rg + r` against
    /// activation `b` into `out[(Rg + r)·batch + b]` (`R` = `W::ROWS`).
    fn matmul<W: Interleaved>(
        weights: &[W],
        cols: usize,
        x: &[BlockQ8K],
        out: &mut [f32],
        dot_row: impl Fn(&[W], usize, &[BlockQ8K]) -> f32,
    ) {
        let (superblocks, batch) = shape(weights, W::ROWS, cols, x, out);
        for (group, outputs) in weights.chunks_exact(superblocks).zip(out.chunks_exact_mut(W::ROWS * batch)) {
            for (r, row) in outputs.chunks_exact_mut(batch).enumerate() {
                for (o, activation) in row.iter_mut().zip(x.chunks_exact(superblocks)) {
                    *o = dot_row(group, r, activation);
                }
            }
        }
    }

    /// Row `r` of a group of interleaved Q4_K super-blocks against one activation.
    fn q4k_row<W: Interleaved<Row = BlockQ4K>>(group: &[W], r: usize, x: &[BlockQ8K]) -> f32 {
        let mut sum = 0f32;
        for (block, a) in group.iter().zip(x) {
            let row = block.row(r);
            let (mut scaled, mut minimums) = (0i32, 0i32);
            for sub in 0..QK_K / GROUP {
                let (scale, min) = scale_min_k4(sub, &row.scales);
                scaled += scale as i32 * dot(&levels_q4k(&row, sub), &a.qs[GROUP * sub..][..GROUP]);
                minimums += min as i32 * a.sums[sub] as i32;
            }
            sum = (f16_value(row.d) * a.d).mul_add(scaled as f32, sum);
            sum = (-(f16_value(row.dmin) * a.d)).mul_add(minimums as f32, sum);
        }
        sum
    }

    /// Interleaved Q4_K matrix × Q8_K activations.
    pub fn matmul_q4kx4(weights: &[BlockQ4Kx4], cols: usize, x: &[BlockQ8K], out: &mut [f32]) {
        matmul(weights, cols, x, out, q4k_row)
    }

    /// Eight-row interleaved Q4_K matrix × Q8_K activations.
    pub fn matmul_q4kx8(weights: &[BlockQ4Kx8], cols: usize, x: &[BlockQ8K], out: &mut [f32]) {
        matmul(weights, cols, x, out, q4k_row)
    }

    /// Interleaved Q6_K matrix × Q8_K activations.
    pub fn matmul_q6kx4(weights: &[BlockQ6Kx4], cols: usize, x: &[BlockQ8K], out: &mut [f32]) {
        matmul(weights, cols, x, out, |group, r, x| {
            let mut sum = 0f32;
            for (block, a) in group.iter().zip(x) {
                let row = block.row(r);
                let mut scaled = 0i32;
                for k in 0..QK_K / GROUP {
                    let (levels, q) = (levels_q6k(&row, k), &a.qs[GROUP * k..][..GROUP]);
                    let (s0, s1) = (row.scales[2 * k] as i8 as i32, row.scales[2 * k + 1] as i8 as i32);
                    scaled += s0 * dot(&levels[..16], &q[..16]) + s1 * dot(&levels[16..], &q[16..]);
                }
                sum = (f16_value(row.d) * a.d).mul_add(scaled as f32, sum);
            }
            sum
        })
    }
}

/// ARMv8.0 NEON, one activation at a time (decoding), four rows a step:
/// the products of [`super::interleaved`]'s `neon` kernels (`ld4r`
/// broadcasts, widening multiplies in 16-bit lanes), the activation's
/// values read front to back.
#[cfg(target_arch = "aarch64")]
pub mod neon {
    use super::*;
    use crate::kernels::matmul::kquant::interleaved::arm::*;
    use crate::kernels::matmul::kquant::interleaved::neon::q6k_levels;
    use crate::kernels::matmul::kquant::interleaved::neon::{load128_next, load64_next, load64_step, sum32};
    use crate::kernels::matmul::neon::widen_f16_high;
    use crate::quant::INTERLEAVE;

    /// The four rows' `Σ (level − 32)·q` over sixteen values at `*q`, as
    /// two 16-bit halves a row (lanes `[r0, r0, r1, r1, r2, r2, r3, r3]`);
    /// `*q` moves by `step`. Four products a 16-bit lane, then one pairwise add
    /// in 16 bits: eight products of |level − 32| ≤ 32 and |q| ≤ 127 (what
    /// [`BlockQ8K`] holds) are at most 32 512, below 2¹⁵. (The 32-value
    /// kernels' activations may hold −128, so theirs widen first.)
    ///
    /// # Safety
    /// `*q` points at 16 readable bytes.
    #[inline(always)]
    unsafe fn sum16(w: &[int8x16_t; 4], q: &mut *const i8, step: isize) -> int16x8_t {
        let sum: int16x8_t;
        asm!(
            "ld4r {{v28.4s, v29.4s, v30.4s, v31.4s}}, [{q}], {step}",
            widening_products!(start "lo" "hi"; "w0" "v28", "w1" "v29", "w2" "v30", "w3" "v31"),
            "addp {sum:v}.8h, {lo:v}.8h, {hi:v}.8h",
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

    /// Q6_K's sixteen-value sums of four rows into their running int32
    /// sums: `low += s·pairs` for rows 0–1 (lanes `[r0, r0, r1, r1]`),
    /// `high += s·pairs` for rows 2–3, the scales `s` in the same lanes.
    #[inline(always)]
    unsafe fn scale_pairs(pairs: int16x8_t, scales: int16x8_t, (low, high): &mut (int32x4_t, int32x4_t)) {
        *low = vmlal_s16(*low, vget_low_s16(pairs), vget_low_s16(scales));
        *high = vmlal_high_s16(*high, pairs, scales);
    }

    /// Sixteen signed scale bytes `[k][r]` (four sub-blocks of four rows)
    /// as 16-bit lanes each twice, one vector a sub-block:
    /// `[s_r0, s_r0, s_r1, s_r1, s_r2, s_r2, s_r3, s_r3]`, the lanes of
    /// [`sum16`]'s pairs.
    #[inline(always)]
    unsafe fn doubled_scales(packed: int8x16_t) -> [int16x8_t; 4] {
        let (first, second) = (vzip1q_s8(packed, packed), vzip2q_s8(packed, packed));
        [vmovl_s8(vget_low_s8(first)), vmovl_high_s8(first), vmovl_s8(vget_low_s8(second)), vmovl_high_s8(second)]
    }

    /// `v` as it stands, kept in order with the products' `asm` (see
    /// `settle` in [`super::interleaved`]).
    #[inline(always)]
    pub(super) unsafe fn settle_int(v: &mut int32x4_t) {
        asm!("/* {v:v} */", v = inout(vreg) * v, options(nomem, nostack, preserves_flags));
    }

    /// Sixteen unsigned bytes `[j][r]` (four sub-blocks' values of four
    /// rows), widened to 16 bits: `[j0 | j1]` and `[j2 | j3]`.
    #[inline(always)]
    unsafe fn widen_pairs(v: uint8x16_t) -> [int16x8_t; 2] {
        [vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(v))), vreinterpretq_s16_u16(vmovl_high_u8(v))]
    }

    /// `Σⱼ minⱼ·Σqⱼ` over four sub-blocks: `mins` from [`widen_pairs`],
    /// `sums` the activation's eight sums, `FIRST` = 0 (sub-blocks 0–3) or 4.
    #[inline(always)]
    pub(super) unsafe fn minimum_terms<const FIRST: i32>(
        acc: int32x4_t,
        mins: [int16x8_t; 2],
        sums: int16x8_t,
    ) -> int32x4_t {
        // (Each lane index spelled out: the intrinsics take them as constants.)
        if FIRST == 0 {
            let acc = vmlal_laneq_s16::<0>(acc, vget_low_s16(mins[0]), sums);
            let acc = vmlal_high_laneq_s16::<1>(acc, mins[0], sums);
            let acc = vmlal_laneq_s16::<2>(acc, vget_low_s16(mins[1]), sums);
            vmlal_high_laneq_s16::<3>(acc, mins[1], sums)
        } else {
            let acc = vmlal_laneq_s16::<4>(acc, vget_low_s16(mins[0]), sums);
            let acc = vmlal_high_laneq_s16::<5>(acc, mins[0], sums);
            let acc = vmlal_laneq_s16::<6>(acc, vget_low_s16(mins[1]), sums);
            vmlal_high_laneq_s16::<7>(acc, mins[1], sums)
        }
    }

    /// Sub-blocks `2c` (the low nibbles of `bytes`) and `2c + 1` (the high
    /// ones) of four rows against the 64 activation values at `*q`, each
    /// sum scaled into `scaled` (`s0`, `s1`); `*q` moves past them.
    ///
    /// # Safety
    /// `*q` points at 64 readable values.
    #[inline(always)]
    unsafe fn q4k_pair(
        bytes: [uint8x16_t; 8],
        q: &mut *const i8,
        scaled: &mut int32x4_t,
        (s0, s1): (int32x4_t, int32x4_t),
    ) {
        *scaled = vmlaq_s32(*scaled, sum32(&q4k_levels::<false>(bytes), q), s0);
        settle_int(scaled);
        *scaled = vmlaq_s32(*scaled, sum32(&q4k_levels::<true>(bytes), q), s1);
        settle_int(scaled);
    }

    /// 64 bytes from `*p` into v24–v27 (`V24`) or v28–v31, registers the
    /// weights' loads (v16–v23) never take; `*p` moves past them. A Q4_K
    /// group's header (units and packed scales) goes where the products do
    /// not load next (a move a vector otherwise): v24–v27 in the ARMv8.0
    /// kernel, whose `ld4r`s take v28–v31, v28–v31 in the `sdot` one, whose
    /// activation values this loads into v24–v27.
    ///
    /// # Safety
    /// `*p` points at 64 readable bytes.
    #[inline(always)]
    pub(super) unsafe fn load64_upper<const V24: bool>(p: &mut *const u8) -> [uint8x16_t; 4] {
        let (v0, v1, v2, v3);
        if V24 {
            asm!("ld1 {{v24.16b, v25.16b, v26.16b, v27.16b}}, [{p}], #64", p = inout(reg) *p,
                out("v24") v0, out("v25") v1, out("v26") v2, out("v27") v3,
                options(pure, readonly, nostack, preserves_flags));
        } else {
            asm!("ld1 {{v28.16b, v29.16b, v30.16b, v31.16b}}, [{p}], #64", p = inout(reg) *p,
                out("v28") v0, out("v29") v1, out("v30") v2, out("v31") v3,
                options(pure, readonly, nostack, preserves_flags));
        }
        [v0, v1, v2, v3]
    }

    /// One group's four rows against one activation, `pair` the products
    /// of two sub-blocks' 128 interleaved bytes as [`q4k_pair`] (moving
    /// `*q` past their 64 values): [`q4k_pair`] here, `sdot`s in
    /// [`super::dotprod`].
    ///
    /// # Safety
    /// `group` points at `superblocks` readable blocks, `x` at as many, and
    /// `pair` may be called on 64 of their values at a time.
    #[inline(always)]
    pub(super) unsafe fn q4k_dot<const V24: bool>(
        group: *const BlockQ4Kx4,
        superblocks: usize,
        x: *const BlockQ8K,
        pair: impl Fn([uint8x16_t; 8], &mut *const i8, &mut int32x4_t, (int32x4_t, int32x4_t)),
    ) -> float32x4_t {
        let mut acc = vdupq_n_f32(0.0);
        let mut w = group.cast::<u8>();
        for s in 0..superblocks {
            let a = x.add(s);
            let mut q = (*a).qs.as_ptr();
            // The units (16 bytes) and packed scales (48) of the four rows,
            // then 512 bytes of levels.
            let head = q4k_head::<V24>(&mut w, a);
            let mut scaled = vdupq_n_s32(0);
            // Sub-blocks 2c (low nibbles) and 2c + 1 (high) of 128 bytes,
            // chunk by chunk; spelled out, so that each chunk's scales are
            // picked at compile time (a loop the `sdot` kernel's LLVM kept
            // went through the stack for them).
            let (low, high) = (widen_unsigned(head.scales[0]), widen_unsigned(head.scales[1]));
            let mut chunk = |scales| pair(load128_next(&mut w), &mut q, &mut scaled, scales);
            chunk((low[0], low[1]));
            chunk((low[2], low[3]));
            chunk((high[0], high[1]));
            chunk((high[2], high[3]));
            acc = q4k_step(acc, &head, scaled, (*a).d);
        }
        acc
    }

    /// A Q4_K group's header (four rows' units and packed scales), unpacked:
    /// the units, the scales of sub-blocks 0–3 and 4–7 (lanes `[j][r]`), and
    /// the minimums against the activation's sums in integers, `Σⱼ minⱼ·Σqⱼ`.
    pub(super) struct Q4KHead {
        pub(super) d: float32x4_t,
        pub(super) dmin: float32x4_t,
        pub(super) scales: [uint8x16_t; 2],
        pub(super) minimums: int32x4_t,
    }

    /// The header at `*w` ([`load64_upper`] into `V24`'s registers; `*w`
    /// moves past it) against the eight sums of the activation at `a`, by
    /// ggml's unpacking for the four rows at once (see `q4k_scales`).
    ///
    /// # Safety
    /// `*w` points at 64 readable bytes and `a` at a readable activation.
    #[inline(always)]
    pub(super) unsafe fn q4k_head<const V24: bool>(w: &mut *const u8, a: *const BlockQ8K) -> Q4KHead {
        let (six_bits, nibble) = (vdupq_n_u8(63), vdupq_n_u8(15));
        let [units, a6, b6, c6] = load64_upper::<V24>(w);
        let sums = vld1q_s16((*a).sums.as_ptr());
        let units = vreinterpretq_u16_u8(units);
        let (d, dmin) = (widen_f16(vget_low_u16(units)), widen_f16_high(units));
        let (scales_low, mins_low) = (vandq_u8(a6, six_bits), vandq_u8(b6, six_bits));
        let scales_high = vsliq_n_u8::<4>(vandq_u8(c6, nibble), vshrq_n_u8::<6>(a6));
        let mins_high = vsliq_n_u8::<4>(vshrq_n_u8::<4>(c6), vshrq_n_u8::<6>(b6));
        let minimums = minimum_terms::<0>(vdupq_n_s32(0), widen_pairs(mins_low), sums);
        let mut minimums = minimum_terms::<4>(minimums, widen_pairs(mins_high), sums);
        settle_int(&mut minimums);
        Q4KHead { d, dmin, scales: [scales_low, scales_high], minimums }
    }

    /// The reference's float step for a group's super-block: `scaled` and
    /// the minimums become floats once, under `d·dₓ` and `dmin·dₓ`.
    #[inline(always)]
    pub(super) unsafe fn q4k_step(acc: float32x4_t, head: &Q4KHead, scaled: int32x4_t, dx: f32) -> float32x4_t {
        let acc = vfmaq_f32(acc, vcvtq_f32_s32(scaled), vmulq_n_f32(head.d, dx));
        vfmsq_f32(acc, vcvtq_f32_s32(head.minimums), vmulq_n_f32(head.dmin, dx))
    }

    /// Quarters `K` and `K + 2` (values `32K ..`, `32(K + 2) ..`) of half
    /// `HALF` of a Q6_K super-block against the activation's values at
    /// `*qs` (quarter `4·HALF + K`'s), each piece of sixteen values scaled
    /// into `scaled` ([`scale_pairs`]). Both quarters read the same `ql`
    /// bytes; `qh`'s 128 bytes of the half are read for each `K`. `*ql`
    /// moves on by 128 bytes, `*qh` by 128 after `K` = 1 (`back` = −64
    /// returns it to the half's start after `K` = 0), `*qs` to the next
    /// call's quarter (`steps` = [64, −48, 16], below).
    ///
    /// # Safety
    /// The pointers point into a readable block and activation as described.
    #[inline(always)]
    unsafe fn q6k_quarters<const HALF: usize, const K: usize>(
        (ql, qh, qs): (&mut *const u8, &mut *const u8, &mut *const i8),
        (back, [ahead, behind, next_half]): (isize, [isize; 3]),
        keep_high: uint8x16_t,
        packed: &[int8x16_t; 4],
        scaled: &mut (int32x4_t, int32x4_t),
    ) {
        // Sub-blocks of sixteen: 8·HALF + 2·quarter and the next, their
        // scales in `packed[2·HALF + quarter / 2]`.
        let scales = |quarter: usize| {
            let four = doubled_scales(packed[2 * HALF + quarter / 2]);
            [four[2 * (quarter % 2)], four[2 * (quarter % 2) + 1]]
        };
        let (first_scales, second_scales) = (scales(K), scales(K + 2));
        for piece in 0..2 {
            // Back to the half's `qh` after the second piece of `K` = 0.
            let (low, high) = (load64_next(ql), load64_step(qh, if piece == 1 && K == 0 { back } else { 64 }));
            // `*qs` from quarter `K`'s sixteen values to quarter `K + 2`'s
            // (+64), back to `K`'s next sixteen (−48), and after the last
            // piece on to quarter `K + 1` (−48) or the next half (+16).
            let pairs = sum16(&q6k_levels(K, low, high, keep_high), qs, ahead);
            scale_pairs(pairs, first_scales[piece], scaled);
            let after = if piece == 1 && K == 1 { next_half } else { behind };
            let pairs = sum16(&q6k_levels(K + 2, low, high, keep_high), qs, after);
            scale_pairs(pairs, second_scales[piece], scaled);
            settle_int(&mut scaled.0);
            settle_int(&mut scaled.1);
        }
    }

    /// The eight bytes at `*p` (a group's four f16 units); `*p` moves past them.
    ///
    /// # Safety
    /// `*p` points at 8 readable bytes.
    #[inline(always)]
    pub(super) unsafe fn load8_next(p: &mut *const u8) -> uint8x8_t {
        let v;
        asm!("ldr {v:d}, [{p}], #8", p = inout(reg) *p, v = out(vreg) v,
            options(pure, readonly, nostack, preserves_flags));
        v
    }

    /// One group's four rows against one activation. Two pointers walk the
    /// blocks with post-increment loads, one through the units, scales and
    /// `ql` (in the order they are stored), one through `qh`, so that a
    /// super-block costs two address additions.
    ///
    /// # Safety
    /// `group` points at `superblocks` readable blocks, `x` at as many.
    unsafe fn q6k_dot(group: *const BlockQ6Kx4, superblocks: usize, x: *const BlockQ8K) -> float32x4_t {
        let mut acc = vdupq_n_f32(0.0);
        let keep_high = vdupq_n_u8(0xF0);
        let mut p = group.cast::<u8>();
        let steps = (-64, [64, -48, 16]);
        for s in 0..superblocks {
            let a = x.add(s);
            let mut qh = p.add(Q6K_QH);
            let d = widen_f16(vreinterpret_u16_u8(load8_next(&mut p)));
            // Scales `4g .. 4g + 4` of the four rows (values 64g .. 64g + 64).
            let packed = load64_upper::<true>(&mut p).map(|v| vreinterpretq_s8_u8(v));
            let mut qs = (*a).qs.as_ptr();
            let mut scaled = (vdupq_n_s32(0), vdupq_n_s32(0));
            // Each half (128 values) in two steps: quarters 0 and 2, then 1
            // and 3, which read the same `ql` bytes (low and high nibbles);
            // spelled out, so that each step's levels and scales are picked
            // at compile time.
            let walk = (&mut p, &mut qh, &mut qs);
            q6k_quarters::<0, 0>(walk, steps, keep_high, &packed, &mut scaled);
            let walk = (&mut p, &mut qh, &mut qs);
            q6k_quarters::<0, 1>(walk, steps, keep_high, &packed, &mut scaled);
            let walk = (&mut p, &mut qh, &mut qs);
            q6k_quarters::<1, 0>(walk, steps, keep_high, &packed, &mut scaled);
            let walk = (&mut p, &mut qh, &mut qs);
            q6k_quarters::<1, 1>(walk, steps, keep_high, &packed, &mut scaled);
            // `p` is at the block's `qh`: on to the next block.
            p = p.add(Q6K_SIZE - Q6K_QH);
            // `[r0, r0, r1, r1]` and `[r2, r2, r3, r3]` to the rows' sums.
            let scaled = vpaddq_s32(scaled.0, scaled.1);
            acc = vfmaq_f32(acc, vcvtq_f32_s32(scaled), vmulq_n_f32(d, (*a).d));
        }
        acc
    }

    /// Every group against every activation, one activation at a time
    /// (`dot` inlined into the loop: a call a group cost about 25
    /// instructions, 0.6 M a TinyLlama-shaped token).
    ///
    /// # Safety
    /// `dot` is one of this module's, whose CPU features every aarch64 core has.
    #[inline(always)]
    pub(super) unsafe fn matmul<W>(
        weights: &[W],
        cols: usize,
        x: &[BlockQ8K],
        out: &mut [f32],
        dot: impl Fn(*const W, usize, *const BlockQ8K) -> float32x4_t,
    ) {
        let (superblocks, batch) = shape(weights, INTERLEAVE, cols, x, out);
        for (group, outputs) in weights.chunks_exact(superblocks).zip(out.chunks_exact_mut(INTERLEAVE * batch)) {
            for (b, activation) in x.chunks_exact(superblocks).enumerate() {
                let sums = dot(group.as_ptr(), superblocks, activation.as_ptr());
                if batch == 1 {
                    // SAFETY: `outputs` is four writable f32.
                    unsafe { vst1q_f32(outputs.as_mut_ptr(), sums) };
                } else {
                    let mut lanes = [0f32; INTERLEAVE];
                    // SAFETY: `lanes` is four writable f32.
                    unsafe { vst1q_f32(lanes.as_mut_ptr(), sums) };
                    for (r, lane) in lanes.into_iter().enumerate() {
                        outputs[r * batch + b] = lane;
                    }
                }
            }
        }
    }

    /// Interleaved Q4_K matrix × Q8_K activations.
    pub fn matmul_q4kx4(weights: &[BlockQ4Kx4], cols: usize, x: &[BlockQ8K], out: &mut [f32]) {
        // SAFETY: `q4k_dot` needs only NEON, and `matmul` hands it whole
        // groups and activations of `superblocks` blocks (checked by `shape`).
        unsafe {
            matmul(weights, cols, x, out, |w, n, a| {
                q4k_dot::<true>(w, n, a, |bytes, q, scaled, scales| q4k_pair(bytes, q, scaled, scales))
            })
        }
    }

    /// Interleaved Q6_K matrix × Q8_K activations.
    pub fn matmul_q6kx4(weights: &[BlockQ6Kx4], cols: usize, x: &[BlockQ8K], out: &mut [f32]) {
        // SAFETY: as in `matmul_q4kx4`.
        unsafe { matmul(weights, cols, x, out, |w, n, a| q6k_dot(w, n, a)) }
    }
}

/// `sdot` (the Raspberry Pi 5's Cortex-A76), one activation at a time:
/// Q4_K as the ARMv8.0 kernel with eight `sdot`s by lane for its products;
/// Q6_K with the `sdot` kernels' levels (`4·(level − 32)`, one insert a
/// vector, [`super::interleaved`]) and each sixteen columns' sum scaled by
/// one `mla`.
#[cfg(target_arch = "aarch64")]
pub mod dotprod {
    use super::*;
    use crate::kernels::matmul::dotprod::available;
    use crate::kernels::matmul::kquant::interleaved::arm::*;
    use crate::kernels::matmul::kquant::interleaved::neon::{load64_next, load64_step};

    /// `Σ w·q` of four rows over `4·W` columns: `sdot` by lane, vector `c`
    /// against the activation's lane `c mod 4` of its `c / 4`th vector.
    ///
    /// # Safety
    /// The CPU has the dot-product extension.
    #[target_feature(enable = "dotprod")]
    #[inline]
    pub(super) unsafe fn sdots<const W: usize>(w: &[int8x16_t; W], q: &[int8x16_t]) -> int32x4_t {
        let mut sum = vdupq_n_s32(0);
        for (c, &w) in w.iter().enumerate() {
            let q = q[c / 4];
            // (The lane is a constant of the instruction.)
            match c % 4 {
                0 => asm!("sdot {s:v}.4s, {w:v}.16b, {q:v}.4b[0]", s = inout(vreg) sum, w = in(vreg) w, q = in(vreg) q,
                    options(pure, nomem, nostack, preserves_flags)),
                1 => asm!("sdot {s:v}.4s, {w:v}.16b, {q:v}.4b[1]", s = inout(vreg) sum, w = in(vreg) w, q = in(vreg) q,
                    options(pure, nomem, nostack, preserves_flags)),
                2 => asm!("sdot {s:v}.4s, {w:v}.16b, {q:v}.4b[2]", s = inout(vreg) sum, w = in(vreg) w, q = in(vreg) q,
                    options(pure, nomem, nostack, preserves_flags)),
                _ => asm!("sdot {s:v}.4s, {w:v}.16b, {q:v}.4b[3]", s = inout(vreg) sum, w = in(vreg) w, q = in(vreg) q,
                    options(pure, nomem, nostack, preserves_flags)),
            }
        }
        sum
    }

    /// One group's four rows against one activation, Q4_K.
    ///
    /// # Safety
    /// As [`super::neon::q4k_dot`], and the CPU has the dot-product extension.
    #[target_feature(enable = "dotprod")]
    unsafe fn q4k_dot(group: *const BlockQ4Kx4, superblocks: usize, x: *const BlockQ8K) -> float32x4_t {
        super::neon::q4k_dot::<false>(group, superblocks, x, |bytes, q, scaled, (s0, s1)| {
            // SAFETY: `*q` has 64 values (the caller's promise), and the
            // CPU has the dot-product extension.
            unsafe {
                // One load for the 64 values (LLVM splits `vld1q_s8_x2`
                // into a load a vector).
                let mut p = q.cast::<u8>();
                let values = super::neon::load64_upper::<true>(&mut p).map(|v| vreinterpretq_s8_u8(v));
                *q = p.cast();
                *scaled = vmlaq_s32(*scaled, sdots(&q4k_levels::<false>(bytes), &values[..2]), s0);
                *scaled = vmlaq_s32(*scaled, sdots(&q4k_levels::<true>(bytes), &values[2..]), s1);
                super::neon::settle_int(scaled);
            }
        })
    }

    /// The 32 activation values at `*q` as two vectors in one load, into
    /// v24–v25 (`SECOND` false) or v26–v27 (the two quarters a step reads
    /// must not share registers: moves); `*q` moves by `step` values.
    ///
    /// # Safety
    /// `*q` points at 32 readable values.
    #[inline(always)]
    unsafe fn load32_values_step<const SECOND: bool>(q: &mut *const i8, step: isize) -> [int8x16_t; 2] {
        let (v0, v1);
        if SECOND {
            asm!("ld1 {{v26.16b, v27.16b}}, [{q}], {step}", q = inout(reg) *q, step = in(reg) step,
                out("v26") v0, out("v27") v1, options(pure, readonly, nostack, preserves_flags));
        } else {
            asm!("ld1 {{v24.16b, v25.16b}}, [{q}], {step}", q = inout(reg) *q, step = in(reg) step,
                out("v24") v0, out("v25") v1, options(pure, readonly, nostack, preserves_flags));
        }
        [v0, v1]
    }

    /// Quarters `K` and `K + 2` of half `HALF` of a Q6_K super-block
    /// against the activation's values at `*qs` (quarter `4·HALF + K`'s),
    /// a 64-byte piece of `ql` and `qh` (sixteen columns of four rows) at a
    /// time, each piece's sums scaled into `scaled` by one `mla`: sums of
    /// four times the levels. `*ql` moves past the 128 bytes it reads;
    /// `*qh` reads the half's 128 bytes and moves past them when `K` = 1,
    /// back to their start when `K` = 0 (`back` = −64); `*qs` moves on to
    /// the next call's quarter (`K` = 0: 1; `K` = 1: the next half's 0).
    ///
    /// # Safety
    /// The pointers point at the quarters' bytes and values, and the CPU has
    /// the dot-product extension.
    #[inline(always)]
    unsafe fn q6k_quarters<const HALF: usize, const K: usize>(
        (ql, qh, qs): (&mut *const u8, &mut *const u8, &mut *const i8),
        back: isize,
        pairs: &[(int32x4_t, int32x4_t); 8],
        scaled: &mut int32x4_t,
    ) {
        let (first, second) = (4 * HALF + K, 4 * HALF + K + 2);
        // The two quarters' values, 32 each; `*qs` moves on from quarter
        // `first` to `second` (+64), then back to `first + 1` (`K` = 0) or
        // on to the next half's first (`K` = 1).
        let first_values = load32_values_step::<false>(qs, 64);
        let second_values = load32_values_step::<true>(qs, if K == 0 { -32 } else { 32 });
        for piece in 0..2 {
            // `ql` into v16–v19 and `qh` into v20–v23: the same registers
            // for both would cost four moves a piece.
            let low = load64_next(ql);
            let high = load64_step(qh, if piece == 1 && K == 0 { back } else { 64 });
            let levels = if K == 0 {
                (q6k_levels_x4::<0, 4>(low, high), q6k_levels_x4::<2, 4>(low, high))
            } else {
                (q6k_levels_x4::<1, 4>(low, high), q6k_levels_x4::<3, 4>(low, high))
            };
            let (s_first, s_second) =
                if piece == 0 { (pairs[first].0, pairs[second].0) } else { (pairs[first].1, pairs[second].1) };
            *scaled = vmlaq_s32(*scaled, sdots(&levels.0, &first_values[piece..][..1]), s_first);
            *scaled = vmlaq_s32(*scaled, sdots(&levels.1, &second_values[piece..][..1]), s_second);
            super::neon::settle_int(scaled);
        }
    }

    /// One group's four rows against one activation, Q6_K: `Σ sₖ·Σₖ` over
    /// the sixteen sub-blocks in integers ([`q6k_quarters`]). Two pointers
    /// walk the blocks with post-increment loads, one through the units,
    /// scales and `ql` (in the order they are stored), one through `qh`,
    /// so that a super-block costs two address additions.
    ///
    /// # Safety
    /// `group` points at `superblocks` readable blocks, `x` at as many, and
    /// the CPU has the dot-product extension.
    #[target_feature(enable = "dotprod")]
    unsafe fn q6k_dot(group: *const BlockQ6Kx4, superblocks: usize, x: *const BlockQ8K) -> float32x4_t {
        let mut acc = vdupq_n_f32(0.0);
        let mut p = group.cast::<u8>();
        let back = -64;
        for s in 0..superblocks {
            let a = x.add(s);
            let mut qh = p.add(Q6K_QH);
            let d = widen_f16(vreinterpret_u16_u8(super::neon::load8_next(&mut p)));
            let pairs = q6k_scale_pairs(super::neon::load64_upper::<false>(&mut p).map(|v| vreinterpretq_s8_u8(v)));
            let mut qs = (*a).qs.as_ptr();
            let mut scaled = vdupq_n_s32(0);
            q6k_quarters::<0, 0>((&mut p, &mut qh, &mut qs), back, &pairs, &mut scaled);
            q6k_quarters::<0, 1>((&mut p, &mut qh, &mut qs), back, &pairs, &mut scaled);
            q6k_quarters::<1, 0>((&mut p, &mut qh, &mut qs), back, &pairs, &mut scaled);
            q6k_quarters::<1, 1>((&mut p, &mut qh, &mut qs), back, &pairs, &mut scaled);
            // `p` is at the block's `qh`: on to the next block.
            p = p.add(Q6K_SIZE - Q6K_QH);
            // The sums are of four times the levels: divided exactly, then
            // the reference's float step.
            let scaled = vshrq_n_s32::<2>(scaled);
            acc = vfmaq_f32(acc, vcvtq_f32_s32(scaled), vmulq_n_f32(d, (*a).d));
        }
        acc
    }

    /// Interleaved Q4_K matrix × Q8_K activations. Panics on a CPU without
    /// the dot-product extension.
    pub fn matmul_q4kx4(weights: &[BlockQ4Kx4], cols: usize, x: &[BlockQ8K], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: the CPU has the extension (checked just above), and
        // `matmul` hands `q4k_dot` whole groups and activations.
        unsafe { super::neon::matmul(weights, cols, x, out, |w, n, a| q4k_dot(w, n, a)) }
    }

    /// Interleaved Q6_K matrix × Q8_K activations. Panics on a CPU without
    /// the dot-product extension.
    pub fn matmul_q6kx4(weights: &[BlockQ6Kx4], cols: usize, x: &[BlockQ8K], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: as in `matmul_q4kx4`.
        unsafe { super::neon::matmul(weights, cols, x, out, |w, n, a| q6k_dot(w, n, a)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::activation::scalar::quantize_activation_q8k;
    use crate::kernels::matmul::kquant::interleaved::scalar as per_block;
    use crate::kernels::matmul::kquant::test_support::{row_magnitude, Format, TestData, VariedRuns, Weights};
    use crate::kquant::{BlockQ4K, BlockQ6K};
    use crate::quant::INTERLEAVE;
    use crate::quant::{interleave, BlockQ8Act};
    use bytemuck::Zeroable;

    /// A Q8_K product: `(weights, cols, activations, out)`.
    type MatmulQ8K<X> = fn(&[X], usize, &[BlockQ8K], &mut [f32]);

    /// The reference against the 32-value reference on the same activation
    /// values: both form the same exact integer sums (levels, scales,
    /// minimums), so they differ only in the float rounding of their terms.
    /// Each rounds a term through at most four operations into a running sum
    /// of at most `cols/16 + 8` terms: within `(n + 8)·ε` relative to the
    /// sum of the terms' magnitudes (as the interleaved kernels' tests).
    const ROUNDING_PER_TERM: f32 = f32::EPSILON;

    const COLUMNS: [usize; 4] = [256, 512, 2048, 5632];
    const ROW_COUNTS: [usize; 3] = [4, 8, 12];
    const BATCHES: [usize; 3] = [1, 2, 3];

    /// `n` activation values as Q8_K blocks: quantized from varied data, or
    /// (against random-byte weights) random int8 values, −127 to 127 (what
    /// the quantizer writes; the Q6_K kernel's 16-bit sums count on it),
    /// under the scale of each super-block's first 32-value block.
    fn activations(data: &mut VariedRuns, kind: Weights, n: usize) -> Vec<BlockQ8K> {
        let empty = BlockQ8K { d: 0.0, sums: [0; QK_K / GROUP], qs: [0; QK_K] };
        let mut x = vec![empty; n / QK_K];
        match kind {
            Weights::Quantized => quantize_activation_q8k(&data.values(n), &mut x),
            Weights::RandomBytes => {
                for (block, blocks) in x.iter_mut().zip(data.activations(kind, n).chunks_exact(QK_K / GROUP)) {
                    block.d = blocks[0].d;
                    for (k, b) in blocks.iter().enumerate() {
                        let qs = b.qs.map(|q| q.max(-127));
                        block.qs[GROUP * k..][..GROUP].copy_from_slice(&qs);
                        block.sums[k] = qs.iter().map(|&q| q as i16).sum();
                    }
                }
            }
        }
        x
    }

    /// The same values as 32-value blocks (each under the super-block's scale).
    fn per_block(x: &[BlockQ8K]) -> Vec<BlockQ8Act> {
        x.iter()
            .flat_map(|block| {
                (0..QK_K / GROUP).map(move |k| {
                    let qs: [i8; GROUP] = block.qs[GROUP * k..][..GROUP].try_into().unwrap();
                    BlockQ8Act { d: block.d, s: block.d * block.sums[k] as f32, qs }
                })
            })
            .collect()
    }

    /// On every shape and both kinds of data: the reference within the
    /// rounding budget of the 32-value reference, and each kernel equal to
    /// the reference bit for bit.
    fn check<B: Format, X: Interleaved<Row = B>>(
        name: &str,
        reference: MatmulQ8K<X>,
        per_block_reference: fn(&[X], usize, &[BlockQ8Act], &mut [f32]),
        kernels: &[(&str, MatmulQ8K<X>)],
    ) {
        let mut data = VariedRuns::seeded(11);
        for rows in ROW_COUNTS.into_iter().map(|n| n * X::ROWS / INTERLEAVE) {
            for cols in COLUMNS {
                for batch in BATCHES {
                    for kind in [Weights::Quantized, Weights::RandomBytes] {
                        let superblocks = cols / QK_K;
                        let weights: Vec<B> = data.weights(kind, rows * superblocks);
                        let mut mixed = vec![X::zeroed(); weights.len() / X::ROWS];
                        interleave(&weights, superblocks, &mut mixed);
                        let x = activations(&mut data, kind, batch * cols);
                        let blocks = per_block(&x);
                        let mut expected = vec![f32::NAN; rows * batch];
                        reference(&mixed, cols, &x, &mut expected);
                        let mut by_block = vec![f32::NAN; rows * batch];
                        per_block_reference(&mixed, cols, &blocks, &mut by_block);
                        let shape = format!("{name} {kind:?} {rows}×{cols} batch {batch}");
                        for r in 0..rows {
                            for b in 0..batch {
                                let row = &weights[r * superblocks..][..superblocks];
                                let activation = &blocks[b * cols / GROUP..][..cols / GROUP];
                                let magnitude = row_magnitude(row, activation) as f32;
                                let tolerance = ROUNDING_PER_TERM * (cols / 16 + 8) as f32 * magnitude;
                                let (e, p) = (expected[r * batch + b], by_block[r * batch + b]);
                                assert!(
                                    (e - p).abs() <= tolerance,
                                    "{shape} [{r}, {b}]: {e} against the 32-value reference's {p} (tolerance {tolerance})"
                                );
                            }
                        }
                        for (table, kernel) in kernels {
                            let mut got = vec![f32::NAN; rows * batch];
                            kernel(&mixed, cols, &x, &mut got);
                            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                            assert_eq!(bits(&got), bits(&expected), "{shape} {table}: {got:?} against {expected:?}");
                        }
                    }
                }
            }
        }
    }

    /// Of the two kernels, those this CPU runs (the `sdot` one where it has the extension).
    #[cfg(target_arch = "aarch64")]
    fn kernels<X>(neon: MatmulQ8K<X>, sdot: MatmulQ8K<X>) -> Vec<(&'static str, MatmulQ8K<X>)> {
        let mut kernels = vec![("neon", neon)];
        if crate::kernels::matmul::dotprod::available() {
            kernels.push(("dotprod", sdot));
        }
        kernels
    }

    #[test]
    fn q4kx4_products_match_the_references() {
        #[cfg(target_arch = "aarch64")]
        let kernels = kernels(neon::matmul_q4kx4, dotprod::matmul_q4kx4);
        #[cfg(not(target_arch = "aarch64"))]
        let kernels = Vec::new();
        check::<BlockQ4K, _>("q4kx4", scalar::matmul_q4kx4, per_block::matmul_q4kx4, &kernels);
    }

    #[test]
    fn q4kx8_products_match_the_references() {
        #[cfg(target_arch = "aarch64")]
        let kernels = kernels(x8::neon::matmul_q4kx8, x8::dotprod::matmul_q4kx8);
        #[cfg(not(target_arch = "aarch64"))]
        let kernels = Vec::new();
        check::<BlockQ4K, _>("q4kx8", scalar::matmul_q4kx8, per_block::matmul_q4kx8, &kernels);
    }

    #[test]
    fn q6kx4_products_match_the_references() {
        #[cfg(target_arch = "aarch64")]
        let kernels = kernels(neon::matmul_q6kx4, dotprod::matmul_q6kx4);
        #[cfg(not(target_arch = "aarch64"))]
        let kernels = Vec::new();
        check::<BlockQ6K, _>("q6kx4", scalar::matmul_q6kx4, per_block::matmul_q6kx4, &kernels);
    }

    /// One level, scale or minimum changed moves the product: the
    /// comparisons above would see a kernel that skipped a sub-block.
    #[test]
    fn one_changed_level_or_minimum_is_seen() {
        let mut data = VariedRuns::seeded(5);
        let weights: Vec<BlockQ4K> = data.weights(Weights::RandomBytes, 4);
        let x = activations(&mut data, Weights::RandomBytes, QK_K);
        let product = |weights: &[BlockQ4K]| {
            let mut mixed = vec![BlockQ4Kx4::zeroed(); 1];
            interleave(weights, 1, &mut mixed);
            let mut out = [0f32; INTERLEAVE];
            scalar::matmul_q4kx4(&mixed, QK_K, &x, &mut out);
            out
        };
        let before = product(&weights);
        let (mut level, mut minimum) = (weights.clone(), weights.clone());
        level[2].qs[77] ^= 0x10;
        minimum[1].scales[5] ^= 0x01;
        assert_ne!(product(&level)[2], before[2], "a changed level");
        assert_ne!(product(&minimum)[1], before[1], "a changed minimum");
    }
}
