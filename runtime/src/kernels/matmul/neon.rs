//! ARMv8.0 NEON kernels: every aarch64 core has them, and they are the best
//! the Raspberry Pi 4's Cortex-A72 can do (it has no dot-product extension).
//!
//! Integer products widen int8 × int8 into 16-bit lanes (`smull`, then
//! `smlal`/`smlal2` for as many more products as a lane holds without
//! overflow) and add pairs of lanes into 32-bit running sums (`sadalp`).
//!
//! Four rows go together ([`for_row_groups`]): one activation block is loaded
//! once for the four, and a block's scale math is one vector for the four.
//! Each row keeps a running int32 sum in four lanes that is never reset; a
//! block's four row sums are a pairwise reduction of the running sums minus
//! the previous one ([`BlockSums`]), one subtraction per block instead of
//! zeroing four accumulators.

use super::scalar;
use crate::quant::{BlockQ4, BlockQ4S, BlockQ8, BlockQ8Act, GROUP};
use half::f16;
use std::arch::aarch64::*;
use std::arch::asm;

/// Rows one kernel step multiplies together.
pub(super) const ROWS: usize = 4;

/// Runs `dot4` (four rows, each exactly `x.len()` blocks, against one
/// activation of as many blocks) for every group of four rows and every
/// activation of the batch, and stores its four sums at `out[r·batch + b]`.
/// A last group of one to three rows repeats its last row to make four and
/// stores only the rows that exist.
#[inline(always)]
pub(super) fn for_row_groups<B>(
    weights: &[B],
    cols: usize,
    x: &[BlockQ8Act],
    out: &mut [f32],
    dot4: impl Fn([&[B]; ROWS], &[BlockQ8Act]) -> float32x4_t,
) {
    let blocks = cols / GROUP;
    assert!(blocks > 0 && cols % GROUP == 0, "{cols} columns are not whole blocks of {GROUP}");
    let (rows, batch) = (weights.len() / blocks, x.len() / blocks);
    assert!(
        weights.len() == rows * blocks && x.len() == batch * blocks && out.len() == rows * batch,
        "matmul shapes disagree: {} weight blocks, {} activation blocks, {} outputs, {blocks} blocks a row",
        weights.len(),
        x.len(),
        out.len()
    );
    for (group, outputs) in weights.chunks(ROWS * blocks).zip(out.chunks_mut(ROWS * batch)) {
        let present = group.len() / blocks;
        let row = |i: usize| &group[i.min(present - 1) * blocks..][..blocks];
        let rows = [row(0), row(1), row(2), row(3)];
        for (b, activation) in x.chunks_exact(blocks).enumerate() {
            let sums = dot4(rows, activation);
            if batch == 1 && present == ROWS {
                // SAFETY: with one activation and four rows, `outputs` is four values.
                unsafe { vst1q_f32(outputs.as_mut_ptr(), sums) };
            } else {
                let mut lanes = [0f32; ROWS];
                // SAFETY: `lanes` is four values.
                unsafe { vst1q_f32(lanes.as_mut_ptr(), sums) };
                for (i, &v) in lanes[..present].iter().enumerate() {
                    outputs[i * batch + b] = v;
                }
            }
        }
    }
}

/// Turns four rows' running int32 sums into each block's four row sums.
#[derive(Clone, Copy)]
pub(super) struct BlockSums {
    previous: int32x4_t,
}

impl BlockSums {
    /// Before the first block: every running sum is zero.
    #[target_feature(enable = "neon")]
    #[inline]
    pub(super) fn new() -> Self {
        Self { previous: vdupq_n_s32(0) }
    }

    /// This block's sums `[row 0, row 1, row 2, row 3]`: the running sums
    /// reduced pairwise (three `addp`) minus that reduction after the previous
    /// block. Wrapping arithmetic keeps the difference exact even if a running
    /// sum wraps, as a block's own sum always fits.
    #[target_feature(enable = "neon")]
    #[inline]
    pub(super) fn next(&mut self, running: &[int32x4_t; ROWS]) -> int32x4_t {
        let totals = vpaddq_s32(vpaddq_s32(running[0], running[1]), vpaddq_s32(running[2], running[3]));
        let block = vsubq_s32(totals, self.previous);
        self.previous = totals;
        block
    }
}

/// Four binary16 values (as bits) to f32 with `fcvtl`: exact, subnormals included.
#[inline(always)]
pub(crate) fn widen_f16(bits: uint16x4_t) -> float32x4_t {
    let wide: float32x4_t;
    // SAFETY: `fcvtl` reads and writes registers only, and FP/NEON is part of
    // every aarch64 target. (An instruction rather than `vcvt_f32_f16`, which
    // needs Rust 1.94; the workspace supports 1.87.)
    unsafe {
        asm!("fcvtl {wide:v}.4s, {bits:v}.4h", wide = lateout(vreg) wide, bits = in(vreg) bits,
             options(pure, nomem, nostack, preserves_flags))
    };
    wide
}

/// The upper four of eight binary16 values to f32 with `fcvtl2`.
#[inline(always)]
pub(crate) fn widen_f16_high(bits: uint16x8_t) -> float32x4_t {
    let wide: float32x4_t;
    // SAFETY: as `widen_f16`.
    unsafe {
        asm!("fcvtl2 {wide:v}.4s, {bits:v}.8h", wide = lateout(vreg) wide, bits = in(vreg) bits,
             options(pure, nomem, nostack, preserves_flags))
    };
    wide
}

/// The f16 scale of block `k` of each of four rows, gathered into one vector
/// (one lane load per row) and widened.
///
/// # Safety
/// `k` is a block index of every row.
#[inline(always)]
unsafe fn gather_scales<B>(rows: &[&[B]; ROWS], k: usize, scale: impl Fn(&B) -> &f16) -> float32x4_t {
    let at = |r: usize| -> *const u16 { (scale(rows[r].get_unchecked(k)) as *const f16).cast() };
    let bits = vld1_lane_u16::<0>(at(0), vdup_n_u16(0));
    let bits = vld1_lane_u16::<1>(at(1), bits);
    let bits = vld1_lane_u16::<2>(at(2), bits);
    let bits = vld1_lane_u16::<3>(at(3), bits);
    widen_f16(bits)
}

/// The scales and minimums of block `k` of four Q4 rows, `(d, m)`: `ld2`
/// reads each row's adjacent pair into lane `r` of two vectors at once.
///
/// # Safety
/// `k` is a block index of every row.
#[inline(always)]
pub(super) unsafe fn gather_q4_scales(rows: &[&[BlockQ4]; ROWS], k: usize) -> (float32x4_t, float32x4_t) {
    let at = |r: usize| -> *const u16 { (&rows[r].get_unchecked(k).d as *const f16).cast() };
    let pairs = uint16x4x2_t(vdup_n_u16(0), vdup_n_u16(0));
    let pairs = vld2_lane_u16::<0>(at(0), pairs);
    let pairs = vld2_lane_u16::<1>(at(1), pairs);
    let pairs = vld2_lane_u16::<2>(at(2), pairs);
    let pairs = vld2_lane_u16::<3>(at(3), pairs);
    (widen_f16(pairs.0), widen_f16(pairs.1))
}

/// Q8 block scales of four rows.
///
/// # Safety
/// `k` is a block index of every row.
#[inline(always)]
pub(super) unsafe fn gather_q8_scales(rows: &[&[BlockQ8]; ROWS], k: usize) -> float32x4_t {
    gather_scales(rows, k, |b: &BlockQ8| &b.d)
}

/// Q4S block scales of four rows.
///
/// # Safety
/// `k` is a block index of every row.
#[inline(always)]
pub(super) unsafe fn gather_q4s_scales(rows: &[&[BlockQ4S]; ROWS], k: usize) -> float32x4_t {
    gather_scales(rows, k, |b: &BlockQ4S| &b.d)
}

/// An activation block's int8 values as two halves of 16.
///
/// # Safety
/// None beyond holding a reference; `unsafe` for the loads.
#[inline(always)]
pub(super) unsafe fn load_activation(a: &BlockQ8Act) -> (int8x16_t, int8x16_t) {
    let halves = vld1q_s8_x2(a.qs.as_ptr());
    (halves.0, halves.1)
}

/// An activation block's `[d, s]`, adjacent in the block.
///
/// # Safety
/// None beyond holding a reference; `unsafe` for the load.
#[inline(always)]
pub(super) unsafe fn load_activation_scales(a: &BlockQ8Act) -> float32x2_t {
    vld1_f32(&a.d)
}

/// A Q4 block's nibbles unpacked to int8: low nibbles are values 0..16 (they
/// meet the activation's first half), high nibbles values 16..32. Both are
/// 0..15, valid as signed bytes.
#[target_feature(enable = "neon")]
#[inline]
pub(super) fn unpack_nibbles(packed: uint8x16_t) -> (int8x16_t, int8x16_t) {
    let low = vandq_u8(packed, vdupq_n_u8(0x0F));
    let high = vshrq_n_u8::<4>(packed);
    (vreinterpretq_s8_u8(low), vreinterpretq_s8_u8(high))
}

/// Four Q8 rows · one activation.
#[target_feature(enable = "neon")]
#[inline]
fn dot4_q8(rows: [&[BlockQ8]; ROWS], x: &[BlockQ8Act]) -> float32x4_t {
    let mut running = [vdupq_n_s32(0); ROWS];
    let mut sums = BlockSums::new();
    let mut acc = vdupq_n_f32(0.0);
    for (k, a) in x.iter().enumerate() {
        // SAFETY: every row has `x.len()` blocks (`for_row_groups`), so `k`
        // indexes each; the loads read inside the blocks.
        unsafe {
            let (x0, x1) = load_activation(a);
            for (r, row) in rows.iter().enumerate() {
                let w = vld1q_s8_x2(row.get_unchecked(k).qs.as_ptr());
                // Multiply: the low and high eight bytes of each half, two
                // products per 16-bit lane (|w·x| ≤ 128·127, two fit in i16).
                let p = vmlal_high_s8(vmull_s8(vget_low_s8(w.0), vget_low_s8(x0)), w.0, x0);
                let q = vmlal_high_s8(vmull_s8(vget_low_s8(w.1), vget_low_s8(x1)), w.1, x1);
                // Widen and accumulate: adjacent lanes into the row's 32-bit sums.
                running[r] = vpadalq_s16(vpadalq_s16(running[r], p), q);
            }
            // Scale: the four rows' integer sums × d_w × d_x.
            let scale = vmulq_n_f32(gather_q8_scales(&rows, k), a.d);
            acc = vfmaq_f32(acc, vcvtq_f32_s32(sums.next(&running)), scale);
        }
    }
    acc
}

/// Four Q4 rows · one activation.
#[target_feature(enable = "neon")]
#[inline]
fn dot4_q4(rows: [&[BlockQ4]; ROWS], x: &[BlockQ8Act]) -> float32x4_t {
    let mut running = [vdupq_n_s32(0); ROWS];
    let mut sums = BlockSums::new();
    let mut acc = vdupq_n_f32(0.0);
    for (k, a) in x.iter().enumerate() {
        // SAFETY: as in `dot4_q8`.
        unsafe {
            let (x0, x1) = load_activation(a);
            for (r, row) in rows.iter().enumerate() {
                let (low, high) = unpack_nibbles(vld1q_u8(row.get_unchecked(k).qs.as_ptr()));
                // Multiply and add in 16-bit lanes: four products a lane, each ≤ 15·127.
                let p = vmull_s8(vget_low_s8(low), vget_low_s8(x0));
                let p = vmlal_high_s8(p, low, x0);
                let p = vmlal_s8(p, vget_low_s8(high), vget_low_s8(x1));
                let p = vmlal_high_s8(p, high, x1);
                // Widen and accumulate.
                running[r] = vpadalq_s16(running[r], p);
            }
            // Scale: Σ (d·n + m)·(dₓ·q) = d·dₓ·Σ n·q + m·s, four rows at once.
            let (d, m) = gather_q4_scales(&rows, k);
            let dx_s = load_activation_scales(a);
            acc = vfmaq_f32(acc, vcvtq_f32_s32(sums.next(&running)), vmulq_lane_f32::<0>(d, dx_s));
            acc = vfmaq_lane_f32::<1>(acc, m, dx_s);
        }
    }
    acc
}

/// Four Q4S rows · one activation. The zero point 8 is taken out in float:
/// Σ d·(n − 8)·dₓ·q = d·dₓ·Σ n·q − 8·d·s.
#[target_feature(enable = "neon")]
#[inline]
fn dot4_q4s(rows: [&[BlockQ4S]; ROWS], x: &[BlockQ8Act]) -> float32x4_t {
    let mut running = [vdupq_n_s32(0); ROWS];
    let mut sums = BlockSums::new();
    let mut acc = vdupq_n_f32(0.0);
    for (k, a) in x.iter().enumerate() {
        // SAFETY: as in `dot4_q8`.
        unsafe {
            let (x0, x1) = load_activation(a);
            for (r, row) in rows.iter().enumerate() {
                let (low, high) = unpack_nibbles(vld1q_u8(row.get_unchecked(k).qs.as_ptr()));
                // Multiply and add in 16-bit lanes: four products a lane, each ≤ 15·127.
                let p = vmull_s8(vget_low_s8(low), vget_low_s8(x0));
                let p = vmlal_high_s8(p, low, x0);
                let p = vmlal_s8(p, vget_low_s8(high), vget_low_s8(x1));
                let p = vmlal_high_s8(p, high, x1);
                // Widen and accumulate.
                running[r] = vpadalq_s16(running[r], p);
            }
            // Scale, and the zero point.
            let d = gather_q4s_scales(&rows, k);
            acc = vfmaq_f32(acc, vcvtq_f32_s32(sums.next(&running)), vmulq_n_f32(d, a.d));
            acc = vfmaq_n_f32(acc, d, -8.0 * a.s);
        }
    }
    acc
}

/// Q8 matrix × int8 activations.
pub fn matmul_q8(weights: &[BlockQ8], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    // SAFETY: NEON is part of every aarch64 target.
    unsafe { q8(weights, cols, x, out) }
}

#[target_feature(enable = "neon")]
fn q8(weights: &[BlockQ8], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    for_row_groups(weights, cols, x, out, |rows, a| dot4_q8(rows, a))
}

/// Asymmetric Q4 matrix × int8 activations.
pub fn matmul_q4(weights: &[BlockQ4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    // SAFETY: NEON is part of every aarch64 target.
    unsafe { q4(weights, cols, x, out) }
}

#[target_feature(enable = "neon")]
fn q4(weights: &[BlockQ4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    for_row_groups(weights, cols, x, out, |rows, a| dot4_q4(rows, a))
}

/// Symmetric Q4 matrix × int8 activations.
pub fn matmul_q4s(weights: &[BlockQ4S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    // SAFETY: NEON is part of every aarch64 target.
    unsafe { q4s(weights, cols, x, out) }
}

#[target_feature(enable = "neon")]
fn q4s(weights: &[BlockQ4S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    for_row_groups(weights, cols, x, out, |rows, a| dot4_q4s(rows, a))
}

/// `Σ w·x` over an f16 row and an f32 activation, sixteen values a step.
#[target_feature(enable = "neon")]
#[inline]
fn dot_f16_f32(w: &[f16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: `i + 16 ≤ n`, within both slices.
        unsafe {
            let h = vld1q_u16_x2(w.as_ptr().add(i).cast());
            let v = vld1q_f32_x4(x.as_ptr().add(i));
            // Widen eight f16 to two f32 vectors (fcvtl, fcvtl2), multiply, accumulate.
            acc[0] = vfmaq_f32(acc[0], widen_f16(vget_low_u16(h.0)), v.0);
            acc[1] = vfmaq_f32(acc[1], widen_f16_high(h.0), v.1);
            acc[2] = vfmaq_f32(acc[2], widen_f16(vget_low_u16(h.1)), v.2);
            acc[3] = vfmaq_f32(acc[3], widen_f16_high(h.1), v.3);
        }
        i += 16;
    }
    let mut sum = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
    for j in i..n {
        sum += scalar::f16_to_f32(w[j]) * x[j];
    }
    sum
}

/// f16 matrix × f32 activations.
pub fn matmul_f16(weights: &[f16], cols: usize, x: &[f32], out: &mut [f32]) {
    let batch = x.len() / cols;
    for (row, outputs) in weights.chunks_exact(cols).zip(out.chunks_exact_mut(batch)) {
        for (o, activation) in outputs.iter_mut().zip(x.chunks_exact(cols)) {
            // SAFETY: NEON is part of every aarch64 target.
            *o = unsafe { dot_f16_f32(row, activation) };
        }
    }
}

/// f32 matrix × f32 activations.
pub fn matmul_f32(weights: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
    let batch = x.len() / cols;
    for (row, outputs) in weights.chunks_exact(cols).zip(out.chunks_exact_mut(batch)) {
        for (o, activation) in outputs.iter_mut().zip(x.chunks_exact(cols)) {
            *o = crate::kernels::ops::neon::dot(row, activation);
        }
    }
}
