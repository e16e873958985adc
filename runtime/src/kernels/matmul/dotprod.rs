//! NEON kernels with the dot-product extension (`sdot`, ARMv8.2's
//! FEAT_DotProd): the Raspberry Pi 5's Cortex-A76.
//!
//! Same structure as [`super::neon`] (four rows a step, running int32 sums,
//! the scale math in one vector for four rows); each 16 bytes of weights meet
//! their 16 activation bytes in one `sdot`, which adds four products into each
//! 32-bit lane.
//!
//! The kernels are compiled with `#[target_feature(enable = "dotprod")]`.
//! The public functions are safe: each checks the feature (a cached load,
//! once per call) before entering them, and [`crate::kernels::Kernels::detect`]
//! puts them in a table only on CPUs that have it.

use super::neon::{
    for_row_groups, gather_q4_scales, gather_q4s_scales, gather_q8_scales, load_activation, load_activation_scales,
    unpack_nibbles, BlockSums, ROWS,
};
use crate::quant::{BlockQ4, BlockQ4S, BlockQ8, BlockQ8Act};
use std::arch::aarch64::*;
use std::arch::asm;

/// Whether this CPU has the dot-product instructions.
pub fn available() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// `acc[i] += Σⱼ a[4i + j]·b[4i + j]` over `j < 4`, for each of the four lanes.
/// (`vdotq_s32` is still unstable in Rust, so the instruction itself.)
#[target_feature(enable = "dotprod")]
#[inline]
fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: `sdot` reads and writes registers only; this function is
    // compiled for, and only reachable on, CPUs with the dot-product extension.
    unsafe {
        asm!("sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b", acc = inout(vreg) acc, a = in(vreg) a, b = in(vreg) b,
             options(pure, nomem, nostack, preserves_flags))
    };
    acc
}

/// Four Q8 rows · one activation.
#[target_feature(enable = "dotprod")]
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
                // Multiply and accumulate: each half's 16 products, four per lane.
                running[r] = sdot(sdot(running[r], w.0, x0), w.1, x1);
            }
            // Scale: the four rows' integer sums × d_w × d_x.
            let scale = vmulq_n_f32(gather_q8_scales(&rows, k), a.d);
            acc = vfmaq_f32(acc, vcvtq_f32_s32(sums.next(&running)), scale);
        }
    }
    acc
}

/// Four Q4 rows · one activation.
#[target_feature(enable = "dotprod")]
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
                // Multiply and accumulate: low nibbles with the first half, high with the second.
                running[r] = sdot(sdot(running[r], low, x0), high, x1);
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

/// Four Q4S rows · one activation: Σ d·(n − 8)·dₓ·q = d·dₓ·Σ n·q − 8·d·s.
#[target_feature(enable = "dotprod")]
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
                // Multiply and accumulate.
                running[r] = sdot(sdot(running[r], low, x0), high, x1);
            }
            // Scale, and the zero point.
            let d = gather_q4s_scales(&rows, k);
            acc = vfmaq_f32(acc, vcvtq_f32_s32(sums.next(&running)), vmulq_n_f32(d, a.d));
            acc = vfmaq_n_f32(acc, d, -8.0 * a.s);
        }
    }
    acc
}

#[target_feature(enable = "dotprod")]
fn q8(weights: &[BlockQ8], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    for_row_groups(weights, cols, x, out, |rows, a| dot4_q8(rows, a))
}

#[target_feature(enable = "dotprod")]
fn q4(weights: &[BlockQ4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    for_row_groups(weights, cols, x, out, |rows, a| dot4_q4(rows, a))
}

#[target_feature(enable = "dotprod")]
fn q4s(weights: &[BlockQ4S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    for_row_groups(weights, cols, x, out, |rows, a| dot4_q4s(rows, a))
}

/// Q8 matrix × int8 activations. Panics on a CPU without the dot-product extension.
pub fn matmul_q8(weights: &[BlockQ8], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
    // SAFETY: the CPU has the dot-product extension (checked just above).
    unsafe { q8(weights, cols, x, out) }
}

/// Asymmetric Q4 matrix × int8 activations. Panics on a CPU without the dot-product extension.
pub fn matmul_q4(weights: &[BlockQ4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
    // SAFETY: the CPU has the dot-product extension (checked just above).
    unsafe { q4(weights, cols, x, out) }
}

/// Symmetric Q4 matrix × int8 activations. Panics on a CPU without the dot-product extension.
pub fn matmul_q4s(weights: &[BlockQ4S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
    // SAFETY: the CPU has the dot-product extension (checked just above).
    unsafe { q4s(weights, cols, x, out) }
}
