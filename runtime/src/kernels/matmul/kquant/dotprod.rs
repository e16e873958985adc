//! K-quant products with the dot-product extension (`sdot`, ARMv8.2's
//! FEAT_DotProd): the Raspberry Pi 5's Cortex-A76.
//!
//! Four weight rows go together against each activation block, so one
//! activation load serves four rows and the scale math is one vector for the
//! four (lane r for row r); the last `rows % 4` rows go one at a time. Up to
//! four activations of a batch go together against each super-block, so its
//! levels are unpacked once for them.
//!
//! Per 32-value activation block and row, the levels are unpacked into two
//! vectors of 16 int8 and meet the activation's 32 int8 values in two `sdot`s
//! (four products added into each 32-bit lane); the four rows' lanes are
//! reduced pairwise (three `addp`) into one vector of four integer sums.
//! Then, as [`super::scalar`] does, per super-block of 256 values:
//!
//! - Q4_K, Q5_K: `d·Σⱼ dₓ·(scaleⱼ·isumⱼ) − dmin·Σⱼ minⱼ·sₓ`: the integer
//!   scales multiply the integer sums (exact), the super-block's `d` and
//!   `dmin` come in once after its eight sub-blocks.
//! - Q6_K, Q3_K: `d·Σₖ dₓ·(s₂ₖ·Σ₀ + s₂ₖ₊₁·Σ₁)`: two sub-blocks of 16 with
//!   signed scales per activation block, each half's `sdot` kept apart and
//!   the scales folded into the int32 sums before converting (as llama.cpp).
//! - Q2_K: as Q3_K, less `dmin·Σₖ dₓ·(m₂ₖ·Σ₀q + m₂ₖ₊₁·Σ₁q)`, the minimums
//!   meeting the activation's sums over each half of its block.
//!
//! The sub-block scales of a super-block are decoded once for its four rows
//! (a table lookup, `tbl`, gathers them row-interleaved, `[sub-block][row]`,
//! then they are widened to 32-bit lanes), not once per activation block.
//!
//! Only the float grouping differs from the reference (the integer sums are
//! exact), so results agree with it to rounding. `vdotq_s32` is still unstable
//! in Rust; `sdot` is one `asm!` instruction (`dot32`, `dot16`).

use super::interleaved::arm::q2k_minimum_sums;
use crate::kernels::matmul::dotprod::available;
use crate::kernels::matmul::neon::widen_f16;
use crate::kquant::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, QK_K};
use crate::quant::{BlockQ8Act, GROUP};
use std::arch::aarch64::*;
use std::arch::asm;
use std::mem::offset_of;

/// Rows one kernel step multiplies together (lanes of a float vector).
const ROWS: usize = 4;

/// Activations of a batch one kernel step multiplies together.
const TILE: usize = 4;

/// Activation blocks per super-block.
const ACTIVATION_BLOCKS: usize = QK_K / GROUP;

/// The byte index, for `tbl` over four rows' 16 bytes (row r at 16r), that
/// puts byte `first + j` of row r at position `4j + r` (j < 4): four values of
/// four rows, sub-block-major.
const fn gather(first: u8) -> [u8; 16] {
    let mut index = [0u8; 16];
    let mut p = 0;
    while p < 16 {
        index[p] = 16 * (p % 4) as u8 + first + (p / 4) as u8;
        p += 1;
    }
    index
}

/// Four rows' 16 bytes from `start[r]` (rows past `R` are zero), as a `tbl` table.
///
/// # Safety
/// Each `start[r]` points at 16 readable bytes.
#[inline(always)]
unsafe fn table<const R: usize>(start: [*const u8; R]) -> uint8x16x4_t {
    let mut rows = [vdupq_n_u8(0); ROWS];
    for r in 0..R {
        rows[r] = vld1q_u8(start[r]);
    }
    uint8x16x4_t(rows[0], rows[1], rows[2], rows[3])
}

/// `table` gathered by [`gather`]`(first)`: bytes `first..first + 4` of the four rows.
#[inline(always)]
fn gathered(table: uint8x16x4_t, first: u8) -> uint8x16_t {
    let index = gather(first);
    // SAFETY: `index` is 16 readable bytes; `tbl` reads registers only.
    unsafe { vqtbl4q_u8(table, vld1q_u8(index.as_ptr())) }
}

/// Sixteen unsigned bytes `[j][r]` widened to four vectors of 32-bit lanes, one per j.
#[inline(always)]
fn widen_unsigned(v: uint8x16_t) -> [int32x4_t; 4] {
    // SAFETY: register-only NEON operations, part of every aarch64 target.
    unsafe {
        let (low, high) = (vmovl_u8(vget_low_u8(v)), vmovl_high_u8(v));
        [vmovl_u16(vget_low_u16(low)), vmovl_high_u16(low), vmovl_u16(vget_low_u16(high)), vmovl_high_u16(high)]
            .map(|w| vreinterpretq_s32_u32(w))
    }
}

/// Sixteen signed bytes `[j][r]` widened to four vectors of 32-bit lanes, one per j.
#[inline(always)]
fn widen_signed(v: int8x16_t) -> [int32x4_t; 4] {
    // SAFETY: register-only NEON operations, part of every aarch64 target.
    unsafe {
        let (low, high) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
        [vmovl_s16(vget_low_s16(low)), vmovl_high_s16(low), vmovl_s16(vget_low_s16(high)), vmovl_high_s16(high)]
    }
}

/// The f16 units of `R` rows (little-endian bytes) as lanes of an f32 vector.
#[inline(always)]
fn units<const R: usize>(bytes: [[u8; 2]; R]) -> float32x4_t {
    let mut bits = [0u16; ROWS];
    for r in 0..R {
        bits[r] = u16::from_le_bytes(bytes[r]);
    }
    // SAFETY: `bits` is four readable u16.
    widen_f16(unsafe { vld1_u16(bits.as_ptr()) })
}

/// `v` shifted left by `n` bits (right for negative `n`), each byte on its own.
#[inline(always)]
fn shift(v: uint8x16_t, n: i8) -> uint8x16_t {
    // SAFETY: register-only NEON operations (`ushl`).
    unsafe { vshlq_u8(v, vdupq_n_s8(n)) }
}

/// `Σ w·q` of 32 levels (two vectors of 16) and an activation's 32 values,
/// as four partial sums: two `sdot`s.
///
/// # Safety
/// The CPU has the dot-product extension.
#[target_feature(enable = "dotprod")]
#[inline]
unsafe fn dot32(w: (int8x16_t, int8x16_t), q: (int8x16_t, int8x16_t)) -> int32x4_t {
    let mut sum = vdupq_n_s32(0);
    asm!(
        "sdot {sum:v}.4s, {w0:v}.16b, {q0:v}.16b",
        "sdot {sum:v}.4s, {w1:v}.16b, {q1:v}.16b",
        sum = inout(vreg) sum,
        w0 = in(vreg) w.0, q0 = in(vreg) q.0, w1 = in(vreg) w.1, q1 = in(vreg) q.1,
        options(pure, nomem, nostack, preserves_flags),
    );
    sum
}

/// `Σ w·q` of 16 levels and 16 activation values, as four partial sums: one `sdot`.
///
/// # Safety
/// The CPU has the dot-product extension.
#[target_feature(enable = "dotprod")]
#[inline]
unsafe fn dot16(w: int8x16_t, q: int8x16_t) -> int32x4_t {
    let mut sum = vdupq_n_s32(0);
    asm!(
        "sdot {sum:v}.4s, {w:v}.16b, {q:v}.16b",
        sum = inout(vreg) sum, w = in(vreg) w, q = in(vreg) q,
        options(pure, nomem, nostack, preserves_flags),
    );
    sum
}

/// The whole sums of `R` rows' partial sums, lane r for row r: three
/// pairwise adds (rows past `R` add zeros).
#[inline(always)]
fn across_rows<const R: usize>(sums: [int32x4_t; R]) -> int32x4_t {
    // SAFETY: register-only NEON operations (`addp`).
    unsafe {
        let mut padded = [vdupq_n_s32(0); ROWS];
        padded[..R].copy_from_slice(&sums);
        vpaddq_s32(vpaddq_s32(padded[0], padded[1]), vpaddq_s32(padded[2], padded[3]))
    }
}

/// An activation block's 32 int8 values as two vectors, with its `d` and `s`.
///
/// # Safety
/// `a` points at a readable activation block.
#[inline(always)]
unsafe fn activation(a: *const BlockQ8Act) -> ((int8x16_t, int8x16_t), f32, f32) {
    let values = (*a).qs.as_ptr();
    ((vld1q_s8(values), vld1q_s8(values.add(16))), (*a).d, (*a).s)
}

/// 32 bytes from `p` as two vectors.
///
/// # Safety
/// `p` points at 32 readable bytes.
#[inline(always)]
unsafe fn load32(p: *const u8) -> (uint8x16_t, uint8x16_t) {
    (vld1q_u8(p), vld1q_u8(p.add(16)))
}

/// A k-quant format's kernel step.
trait Kernel {
    /// The super-block.
    type Block;

    /// `R` rows (1..=4) · `T` activations (1..=4): result t, lane r is row r
    /// against activation t; lanes past `R` are meaningless.
    ///
    /// # Safety
    /// Each row points at `superblocks` readable blocks, each activation at
    /// `superblocks · 8` readable blocks, and the CPU has the dot-product
    /// extension.
    unsafe fn rows<const R: usize, const T: usize>(
        rows: [*const Self::Block; R],
        x: [*const BlockQ8Act; T],
        superblocks: usize,
    ) -> [float32x4_t; T];
}

/// Every row of `weights` against every activation of `x`, into
/// `out[r·batch + b]`: four rows a step, then the rest one at a time.
///
/// # Safety
/// The CPU has the dot-product extension.
#[target_feature(enable = "dotprod")]
unsafe fn matmul<K: Kernel>(weights: &[K::Block], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    assert!(cols > 0 && cols.is_multiple_of(QK_K), "{cols} columns are not whole super-blocks of {QK_K}");
    let (superblocks, blocks) = (cols / QK_K, cols / GROUP);
    let (rows, batch) = (weights.len() / superblocks, x.len() / blocks);
    assert!(
        weights.len() == rows * superblocks && x.len() == batch * blocks && out.len() == rows * batch,
        "matmul shapes disagree: {} weight super-blocks, {} activation blocks, {} outputs, {superblocks} super-blocks a row",
        weights.len(),
        x.len(),
        out.len()
    );
    let (w, results) = (weights.as_ptr(), out.as_mut_ptr());
    let mut first = 0;
    while first < rows {
        // The rows `first..` and all outputs of those rows are inside the
        // slices checked above.
        let row = w.add(first * superblocks);
        let group = results.add(first * batch);
        if first + ROWS <= rows {
            row_group::<K, ROWS>(row, superblocks, x, group, batch);
            first += ROWS;
        } else {
            row_group::<K, 1>(row, superblocks, x, group, batch);
            first += 1;
        }
    }
}

/// `R` rows from `row` (each `superblocks` long) against every activation,
/// four, two or one at a time; row r's result for activation b into
/// `out[r·batch + b]`.
///
/// # Safety
/// `R` rows of `superblocks` blocks from `row` are readable, `x` holds `batch`
/// activations of `superblocks · 8` blocks, `out` has `R · batch` writable
/// floats, and the CPU has the dot-product extension.
#[target_feature(enable = "dotprod")]
unsafe fn row_group<K: Kernel, const R: usize>(
    row: *const K::Block,
    superblocks: usize,
    x: &[BlockQ8Act],
    out: *mut f32,
    batch: usize,
) {
    let rows: [*const K::Block; R] = std::array::from_fn(|r| row.wrapping_add(r * superblocks));
    let blocks = superblocks * ACTIVATION_BLOCKS;
    let activation = |b: usize| x[b * blocks..].as_ptr();
    let mut b = 0;
    while b < batch {
        let left = batch - b;
        if left >= TILE {
            store::<R, TILE>(K::rows(rows, std::array::from_fn(|t| activation(b + t)), superblocks), out, batch, b);
            b += TILE;
        } else if left >= 2 {
            store::<R, 2>(K::rows(rows, std::array::from_fn(|t| activation(b + t)), superblocks), out, batch, b);
            b += 2;
        } else {
            store::<R, 1>(K::rows(rows, [activation(b)], superblocks), out, batch, b);
            b += 1;
        }
    }
}

/// Lane r of result t into `out[r·batch + first + t]` for the `R` rows.
///
/// # Safety
/// `out` has `R · batch` writable floats and `first + T ≤ batch`.
#[inline(always)]
unsafe fn store<const R: usize, const T: usize>(results: [float32x4_t; T], out: *mut f32, batch: usize, first: usize) {
    for (t, result) in results.into_iter().enumerate() {
        let mut lanes = [0f32; ROWS];
        vst1q_f32(lanes.as_mut_ptr(), result);
        for (r, &v) in lanes[..R].iter().enumerate() {
            *out.add(r * batch + first + t) = v;
        }
    }
}

/// The eight 6-bit scales and minimums of `R` Q4_K / Q5_K super-blocks
/// (ggml's `get_scale_min_k4`, see [`crate::kquant::scale_min_k4`]), from the
/// 16 bytes at each `start[r]` (the 12 packed bytes first): sub-block j's
/// scales (as integers) and minimums (as floats), lane r for row r.
///
/// Sub-blocks 0–3 are the low 6 bits of bytes 0–3 (scales) and 4–7
/// (minimums); 4–7 take their low 4 bits from the low (scales) and high
/// (minimums) nibbles of bytes 8–11 and their top 2 bits from the top of
/// bytes 0–3 (scales) and 4–7 (minimums).
///
/// # Safety
/// Each `start[r]` points at 16 readable bytes.
#[inline(always)]
unsafe fn k4_scales<const R: usize>(start: [*const u8; R]) -> ([int32x4_t; 8], [float32x4_t; 8]) {
    let rows = table(start);
    let (first, second, third) = (gathered(rows, 0), gathered(rows, 4), gathered(rows, 8));
    let (six_bits, nibble) = (vdupq_n_u8(63), vdupq_n_u8(15));
    let top_two = |v: uint8x16_t| vshlq_n_u8::<4>(vshrq_n_u8::<6>(v));
    let scales_low = vandq_u8(first, six_bits);
    let minimums_low = vandq_u8(second, six_bits);
    let scales_high = vorrq_u8(vandq_u8(third, nibble), top_two(first));
    let minimums_high = vorrq_u8(vshrq_n_u8::<4>(third), top_two(second));
    let (sl, sh) = (widen_unsigned(scales_low), widen_unsigned(scales_high));
    let (ml, mh) = (widen_unsigned(minimums_low), widen_unsigned(minimums_high));
    let scales = [sl[0], sl[1], sl[2], sl[3], sh[0], sh[1], sh[2], sh[3]];
    let minimums = [ml[0], ml[1], ml[2], ml[3], mh[0], mh[1], mh[2], mh[3]].map(|m| vcvtq_f32_s32(m));
    (scales, minimums)
}

/// One Q4_K / Q5_K sub-block of 32 (`levels` of `R` rows, 0..32) against
/// activation block `sub` of each of `T` activations: `scaled[t]` += dₓ ·
/// (scale · Σ n·q), `minimums[t]` += min · sₓ.
///
/// # Safety
/// Each `x[t]` points at `sub + 1` readable blocks, and the CPU has the
/// dot-product extension.
#[target_feature(enable = "dotprod")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn k4_sub_block<const R: usize, const T: usize>(
    levels: &[(int8x16_t, int8x16_t); R],
    x: &[*const BlockQ8Act; T],
    sub: usize,
    scale: int32x4_t,
    minimum: float32x4_t,
    scaled: &mut [float32x4_t; T],
    minimums: &mut [float32x4_t; T],
) {
    for t in 0..T {
        let (q, d, s) = activation(x[t].add(sub));
        let mut sums = [vdupq_n_s32(0); R];
        for r in 0..R {
            sums[r] = dot32(levels[r], q);
        }
        let isum = vmulq_s32(across_rows(sums), scale);
        scaled[t] = vfmaq_n_f32(scaled[t], vcvtq_f32_s32(isum), d);
        minimums[t] = vfmaq_n_f32(minimums[t], minimum, s);
    }
}

/// One Q6_K / Q3_K activation block (`levels` of `R` rows, two sub-blocks of
/// 16 with signed scales `first` and `second`) against activation block `k`
/// of each of `T` activations: `scaled[t]` += dₓ · (s₀·Σ₀ + s₁·Σ₁).
///
/// # Safety
/// Each `x[t]` points at `k + 1` readable blocks, and the CPU has the
/// dot-product extension.
#[target_feature(enable = "dotprod")]
#[inline]
unsafe fn pair_of_sub_blocks<const R: usize, const T: usize>(
    levels: &[(int8x16_t, int8x16_t); R],
    x: &[*const BlockQ8Act; T],
    k: usize,
    (first, second): (int32x4_t, int32x4_t),
    scaled: &mut [float32x4_t; T],
) {
    for t in 0..T {
        let (q, d, _) = activation(x[t].add(k));
        let (mut low, mut high) = ([vdupq_n_s32(0); R], [vdupq_n_s32(0); R]);
        for r in 0..R {
            low[r] = dot16(levels[r].0, q.0);
            high[r] = dot16(levels[r].1, q.1);
        }
        let isum = vmlaq_s32(vmulq_s32(across_rows(low), first), across_rows(high), second);
        scaled[t] = vfmaq_n_f32(scaled[t], vcvtq_f32_s32(isum), d);
    }
}

/// Q4_K: per 32 bytes of `qs`, sub-block 2c in the low nibbles, 2c + 1 in the high.
struct Q4K;

impl Kernel for Q4K {
    type Block = BlockQ4K;

    #[target_feature(enable = "dotprod")]
    unsafe fn rows<const R: usize, const T: usize>(
        rows: [*const BlockQ4K; R],
        x: [*const BlockQ8Act; T],
        superblocks: usize,
    ) -> [float32x4_t; T] {
        let nibble = vdupq_n_u8(15);
        let mut acc = [vdupq_n_f32(0.0); T];
        for block in 0..superblocks {
            let blocks: [*const u8; R] = std::array::from_fn(|r| rows[r].add(block).cast::<u8>());
            let activations: [*const BlockQ8Act; T] = std::array::from_fn(|t| x[t].add(block * ACTIVATION_BLOCKS));
            let d = units::<R>(std::array::from_fn(|r| (*rows[r].add(block)).d));
            let dmin = units::<R>(std::array::from_fn(|r| (*rows[r].add(block)).dmin));
            let (scales, mins) = k4_scales(blocks.map(|b| b.add(offset_of!(BlockQ4K, scales))));
            let (mut scaled, mut minimums) = ([vdupq_n_f32(0.0); T], [vdupq_n_f32(0.0); T]);
            for chunk in 0..4 {
                let mut packed = [(vdupq_n_u8(0), vdupq_n_u8(0)); R];
                for r in 0..R {
                    packed[r] = load32(blocks[r].add(offset_of!(BlockQ4K, qs) + 32 * chunk));
                }
                // Low nibbles: sub-block 2·chunk.
                let mut levels = [(vdupq_n_s8(0), vdupq_n_s8(0)); R];
                for r in 0..R {
                    let (p0, p1) = packed[r];
                    levels[r] = (vreinterpretq_s8_u8(vandq_u8(p0, nibble)), vreinterpretq_s8_u8(vandq_u8(p1, nibble)));
                }
                let sub = 2 * chunk;
                k4_sub_block(&levels, &activations, sub, scales[sub], mins[sub], &mut scaled, &mut minimums);
                // High nibbles: sub-block 2·chunk + 1.
                for r in 0..R {
                    let (p0, p1) = packed[r];
                    levels[r] = (vreinterpretq_s8_u8(vshrq_n_u8::<4>(p0)), vreinterpretq_s8_u8(vshrq_n_u8::<4>(p1)));
                }
                let sub = 2 * chunk + 1;
                k4_sub_block(&levels, &activations, sub, scales[sub], mins[sub], &mut scaled, &mut minimums);
            }
            for t in 0..T {
                acc[t] = vfmsq_f32(vfmaq_f32(acc[t], scaled[t], d), minimums[t], dmin);
            }
        }
        acc
    }
}

/// Q5_K: Q4_K's nibbles with a fifth bit, bit `sub` of `qh[l]`, on top.
struct Q5K;

impl Kernel for Q5K {
    type Block = BlockQ5K;

    #[target_feature(enable = "dotprod")]
    unsafe fn rows<const R: usize, const T: usize>(
        rows: [*const BlockQ5K; R],
        x: [*const BlockQ8Act; T],
        superblocks: usize,
    ) -> [float32x4_t; T] {
        let (nibble, fifth) = (vdupq_n_u8(15), vdupq_n_u8(16));
        let mut acc = [vdupq_n_f32(0.0); T];
        for block in 0..superblocks {
            let blocks: [*const u8; R] = std::array::from_fn(|r| rows[r].add(block).cast::<u8>());
            let activations: [*const BlockQ8Act; T] = std::array::from_fn(|t| x[t].add(block * ACTIVATION_BLOCKS));
            let d = units::<R>(std::array::from_fn(|r| (*rows[r].add(block)).d));
            let dmin = units::<R>(std::array::from_fn(|r| (*rows[r].add(block)).dmin));
            let (scales, mins) = k4_scales(blocks.map(|b| b.add(offset_of!(BlockQ5K, scales))));
            let mut high_bits = [(vdupq_n_u8(0), vdupq_n_u8(0)); R];
            for r in 0..R {
                high_bits[r] = load32(blocks[r].add(offset_of!(BlockQ5K, qh)));
            }
            let (mut scaled, mut minimums) = ([vdupq_n_f32(0.0); T], [vdupq_n_f32(0.0); T]);
            for chunk in 0..4 {
                let mut packed = [(vdupq_n_u8(0), vdupq_n_u8(0)); R];
                for r in 0..R {
                    packed[r] = load32(blocks[r].add(offset_of!(BlockQ5K, qs) + 32 * chunk));
                }
                let mut levels = [(vdupq_n_s8(0), vdupq_n_s8(0)); R];
                for high in 0..2 {
                    let sub = 2 * chunk + high;
                    for r in 0..R {
                        let (p0, p1) = packed[r];
                        let (low0, low1) = if high == 0 {
                            (vandq_u8(p0, nibble), vandq_u8(p1, nibble))
                        } else {
                            (vshrq_n_u8::<4>(p0), vshrq_n_u8::<4>(p1))
                        };
                        // Bit `sub` of each qh byte moved to bit 4.
                        let (h0, h1) = high_bits[r];
                        let to_bit_4 = 4 - sub as i8;
                        let (top0, top1) = (vandq_u8(shift(h0, to_bit_4), fifth), vandq_u8(shift(h1, to_bit_4), fifth));
                        levels[r] =
                            (vreinterpretq_s8_u8(vorrq_u8(low0, top0)), vreinterpretq_s8_u8(vorrq_u8(low1, top1)));
                    }
                    k4_sub_block(&levels, &activations, sub, scales[sub], mins[sub], &mut scaled, &mut minimums);
                }
            }
            for t in 0..T {
                acc[t] = vfmsq_f32(vfmaq_f32(acc[t], scaled[t], d), minimums[t], dmin);
            }
        }
        acc
    }
}

/// The sixteen signed 8-bit scales of `R` Q6_K super-blocks from the 16
/// bytes at each `start[r]`: pairs `(s₂ₖ, s₂ₖ₊₁)` for activation block k,
/// lane r for row r.
///
/// # Safety
/// Each `start[r]` points at 16 readable bytes.
#[inline(always)]
unsafe fn q6k_scales<const R: usize>(start: [*const u8; R]) -> [(int32x4_t, int32x4_t); 8] {
    let rows = table(start);
    let mut pairs = [(vdupq_n_s32(0), vdupq_n_s32(0)); 8];
    for group in 0..4 {
        // Scales 4g..4g + 4 of the four rows: activation blocks 2g and 2g + 1.
        let wide = widen_signed(vreinterpretq_s8_u8(gathered(rows, 4 * group as u8)));
        pairs[2 * group] = (wide[0], wide[1]);
        pairs[2 * group + 1] = (wide[2], wide[3]);
    }
    pairs
}

/// Q6_K: per half of 128 values, value `32k + l` (k < 4) has its low nibble
/// in `ql[64·half + 32·(k mod 2) + l]` (low nibble for k < 2, high after) and
/// its top two bits at bit 2k of `qh[32·half + l]`; levels are that minus 32.
struct Q6K;

impl Kernel for Q6K {
    type Block = BlockQ6K;

    #[target_feature(enable = "dotprod")]
    unsafe fn rows<const R: usize, const T: usize>(
        rows: [*const BlockQ6K; R],
        x: [*const BlockQ8Act; T],
        superblocks: usize,
    ) -> [float32x4_t; T] {
        let (nibble, top_two, zero_point) = (vdupq_n_u8(15), vdupq_n_u8(0x30), vdupq_n_s8(32));
        let mut acc = [vdupq_n_f32(0.0); T];
        for block in 0..superblocks {
            let blocks: [*const u8; R] = std::array::from_fn(|r| rows[r].add(block).cast::<u8>());
            let activations: [*const BlockQ8Act; T] = std::array::from_fn(|t| x[t].add(block * ACTIVATION_BLOCKS));
            let d = units::<R>(std::array::from_fn(|r| (*rows[r].add(block)).d));
            let scales = q6k_scales(blocks.map(|b| b.add(offset_of!(BlockQ6K, scales))));
            let mut scaled = [vdupq_n_f32(0.0); T];
            for half in 0..2 {
                let (mut low_bits, mut high_bits) = ([[vdupq_n_u8(0); 4]; R], [(vdupq_n_u8(0), vdupq_n_u8(0)); R]);
                for r in 0..R {
                    let (a, b) = load32(blocks[r].add(offset_of!(BlockQ6K, ql) + 64 * half));
                    let (c, e) = load32(blocks[r].add(offset_of!(BlockQ6K, ql) + 64 * half + 32));
                    low_bits[r] = [a, b, c, e];
                    high_bits[r] = load32(blocks[r].add(offset_of!(BlockQ6K, qh) + 32 * half));
                }
                for quarter in 0..4 {
                    let mut levels = [(vdupq_n_s8(0), vdupq_n_s8(0)); R];
                    for r in 0..R {
                        let (l0, l1) = (low_bits[r][2 * (quarter % 2)], low_bits[r][2 * (quarter % 2) + 1]);
                        let (low0, low1) = if quarter < 2 {
                            (vandq_u8(l0, nibble), vandq_u8(l1, nibble))
                        } else {
                            (vshrq_n_u8::<4>(l0), vshrq_n_u8::<4>(l1))
                        };
                        // Bits 2k, 2k + 1 of each qh byte moved to bits 4, 5.
                        let to_bit_4 = 4 - 2 * quarter as i8;
                        let (h0, h1) = high_bits[r];
                        let (top0, top1) =
                            (vandq_u8(shift(h0, to_bit_4), top_two), vandq_u8(shift(h1, to_bit_4), top_two));
                        levels[r] = (
                            vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(low0, top0)), zero_point),
                            vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(low1, top1)), zero_point),
                        );
                    }
                    let k = 4 * half + quarter;
                    pair_of_sub_blocks(&levels, &activations, k, scales[k], &mut scaled);
                }
            }
            for t in 0..T {
                acc[t] = vfmaq_f32(acc[t], scaled[t], d);
            }
        }
        acc
    }
}

/// The sixteen 6-bit scales of `R` Q3_K super-blocks, minus 32, from the 16
/// bytes at each `start[r]` (two bytes before the 12 packed ones): pairs
/// `(s₂ₖ, s₂ₖ₊₁)` for activation block k, lane r for row r.
///
/// Scale i takes its low nibble from the low (i < 8) or high nibble of byte
/// `i mod 8` and its top two bits from bits `2·(i / 4)` of byte `8 + i mod 4`
/// ([`BlockQ3K::scale`]); a group of four scales `4g..4g + 4` shares the
/// shift `2g`.
///
/// # Safety
/// Each `start[r]` points at 16 readable bytes.
#[inline(always)]
unsafe fn q3k_scales<const R: usize>(start: [*const u8; R]) -> [(int32x4_t, int32x4_t); 8] {
    let rows = table(start);
    let (first, second, third) = (gathered(rows, 2), gathered(rows, 6), gathered(rows, 10));
    let (nibble, top_two, offset) = (vdupq_n_u8(15), vdupq_n_u8(0x30), vdupq_n_s8(32));
    let mut pairs = [(vdupq_n_s32(0), vdupq_n_s32(0)); 8];
    for group in 0..4 {
        let low = match group {
            0 => vandq_u8(first, nibble),
            1 => vandq_u8(second, nibble),
            2 => vshrq_n_u8::<4>(first),
            _ => vshrq_n_u8::<4>(second),
        };
        let high = vandq_u8(shift(third, 4 - 2 * group as i8), top_two);
        let wide = widen_signed(vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(low, high)), offset));
        pairs[2 * group] = (wide[0], wide[1]);
        pairs[2 * group + 1] = (wide[2], wide[3]);
    }
    pairs
}

/// The walk Q3_K and Q2_K share over a super-block's two halves of 32
/// `qs` bytes a row: activation block `k = 4n + j` of half `n` has its two
/// low bits at bit 2j, and `level(r, k, bytes)` makes row `r`'s levels of
/// it from the half's bytes; [`pair_of_sub_blocks`] multiplies them into
/// `scaled`, and `after(k)` adds what else block `k` needs (Q2_K's minimums).
///
/// # Safety
/// Each `qs[r]` points at 64 readable bytes, each `x[t]` at eight readable
/// blocks, and the CPU has the dot-product extension.
#[target_feature(enable = "dotprod")]
#[inline]
unsafe fn two_bit_walk<const R: usize, const T: usize>(
    qs: [*const u8; R],
    x: &[*const BlockQ8Act; T],
    scales: &[(int32x4_t, int32x4_t); 8],
    scaled: &mut [float32x4_t; T],
    level: impl Fn(usize, usize, (uint8x16_t, uint8x16_t)) -> (int8x16_t, int8x16_t),
    mut after: impl FnMut(usize),
) {
    for half in 0..2 {
        let mut low_bits = [(vdupq_n_u8(0), vdupq_n_u8(0)); R];
        for r in 0..R {
            low_bits[r] = load32(qs[r].add(32 * half));
        }
        for j in 0..4 {
            let k = 4 * half + j;
            let levels: [(int8x16_t, int8x16_t); R] = std::array::from_fn(|r| level(r, k, low_bits[r]));
            pair_of_sub_blocks(&levels, x, k, scales[k], scaled);
            after(k);
        }
    }
}

/// Q3_K: value `32k + l` of a half `n` (k = 4n + j) has two bits at bit 2j
/// of `qs[32n + l]`, and its level is 4 lower where bit k of `hmask[l]` is clear.
struct Q3K;

impl Kernel for Q3K {
    type Block = BlockQ3K;

    #[target_feature(enable = "dotprod")]
    unsafe fn rows<const R: usize, const T: usize>(
        rows: [*const BlockQ3K; R],
        x: [*const BlockQ8Act; T],
        superblocks: usize,
    ) -> [float32x4_t; T] {
        let (two_bits, four) = (vdupq_n_u8(3), vdupq_n_u8(4));
        let mut acc = [vdupq_n_f32(0.0); T];
        for block in 0..superblocks {
            let blocks: [*const u8; R] = std::array::from_fn(|r| rows[r].add(block).cast::<u8>());
            let activations: [*const BlockQ8Act; T] = std::array::from_fn(|t| x[t].add(block * ACTIVATION_BLOCKS));
            let d = units::<R>(std::array::from_fn(|r| (*rows[r].add(block)).d));
            let scales = q3k_scales(blocks.map(|b| b.add(offset_of!(BlockQ3K, scales) - 2)));
            let mut high_bits = [(vdupq_n_u8(0), vdupq_n_u8(0)); R];
            for r in 0..R {
                high_bits[r] = load32(blocks[r].add(offset_of!(BlockQ3K, hmask)));
            }
            let mut scaled = [vdupq_n_f32(0.0); T];
            let qs = blocks.map(|b| b.add(offset_of!(BlockQ3K, qs)));
            let level = |r: usize, k: usize, (q0, q1): (uint8x16_t, uint8x16_t)| {
                let (h0, h1) = high_bits[r];
                let bit = vdupq_n_u8(1 << k);
                let to_bit_0 = -2 * (k % 4) as i8;
                let (low0, low1) = (vandq_u8(shift(q0, to_bit_0), two_bits), vandq_u8(shift(q1, to_bit_0), two_bits));
                // 4 where the high bit is clear (`cmtst` sets all bits where it is set).
                let (minus0, minus1) = (vbicq_u8(four, vtstq_u8(h0, bit)), vbicq_u8(four, vtstq_u8(h1, bit)));
                (
                    vsubq_s8(vreinterpretq_s8_u8(low0), vreinterpretq_s8_u8(minus0)),
                    vsubq_s8(vreinterpretq_s8_u8(low1), vreinterpretq_s8_u8(minus1)),
                )
            };
            two_bit_walk(qs, &activations, &scales, &mut scaled, level, |_| ());
            for t in 0..T {
                acc[t] = vfmaq_f32(acc[t], scaled[t], d);
            }
        }
        acc
    }
}

/// The sixteen 4-bit scales and minimums of `R` Q2_K super-blocks from the
/// 16 bytes at each `start[r]` (scale `i` in the low nibble of byte `i`,
/// minimum `i` in the high one): per activation block k, the pair
/// `(s₂ₖ, s₂ₖ₊₁)` (lane r for row r) and the minimums `m₂ₖ`, `m₂ₖ₊₁` of
/// the rows in the low and high four 16-bit lanes.
///
/// # Safety
/// Each `start[r]` points at 16 readable bytes.
#[inline(always)]
unsafe fn q2k_scales<const R: usize>(start: [*const u8; R]) -> ([(int32x4_t, int32x4_t); 8], [int16x8_t; 8]) {
    let rows = table(start);
    let nibble = vdupq_n_u8(15);
    let (mut scales, mut mins) = ([(vdupq_n_s32(0), vdupq_n_s32(0)); 8], [vdupq_n_s16(0); 8]);
    for group in 0..4 {
        // Scales and minimums 4g..4g + 4 of the four rows: activation blocks 2g and 2g + 1.
        let bytes = gathered(rows, 4 * group as u8);
        let wide = widen_unsigned(vandq_u8(bytes, nibble));
        scales[2 * group] = (wide[0], wide[1]);
        scales[2 * group + 1] = (wide[2], wide[3]);
        let high = vshrq_n_u8::<4>(bytes);
        mins[2 * group] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(high)));
        mins[2 * group + 1] = vreinterpretq_s16_u16(vmovl_high_u8(high));
    }
    (scales, mins)
}

/// Q2_K: value `32k + l` of a half `n` (k = 4n + j) has its level at bit 2j
/// of `qs[32n + l]` (as Q3_K's low bits).
struct Q2K;

impl Kernel for Q2K {
    type Block = BlockQ2K;

    #[target_feature(enable = "dotprod")]
    unsafe fn rows<const R: usize, const T: usize>(
        rows: [*const BlockQ2K; R],
        x: [*const BlockQ8Act; T],
        superblocks: usize,
    ) -> [float32x4_t; T] {
        let two_bits = vdupq_n_u8(3);
        let mut acc = [vdupq_n_f32(0.0); T];
        for block in 0..superblocks {
            let blocks: [*const u8; R] = std::array::from_fn(|r| rows[r].add(block).cast::<u8>());
            let activations: [*const BlockQ8Act; T] = std::array::from_fn(|t| x[t].add(block * ACTIVATION_BLOCKS));
            let d = units::<R>(std::array::from_fn(|r| (*rows[r].add(block)).d));
            let dmin = units::<R>(std::array::from_fn(|r| (*rows[r].add(block)).dmin));
            let (scales, mins) = q2k_scales(blocks.map(|b| b.add(offset_of!(BlockQ2K, scales))));
            let (mut scaled, mut minimums) = ([vdupq_n_f32(0.0); T], [vdupq_n_f32(0.0); T]);
            let qs = blocks.map(|b| b.add(offset_of!(BlockQ2K, qs)));
            let level = |_: usize, k: usize, (q0, q1): (uint8x16_t, uint8x16_t)| {
                let to_bit_0 = -2 * (k % 4) as i8;
                (
                    vreinterpretq_s8_u8(vandq_u8(shift(q0, to_bit_0), two_bits)),
                    vreinterpretq_s8_u8(vandq_u8(shift(q1, to_bit_0), two_bits)),
                )
            };
            let minimum_terms = |k: usize| {
                for t in 0..T {
                    // SAFETY: activation `t` has the super-block's eight blocks (the caller's promise).
                    let (q, d, _) = unsafe { activation(activations[t].add(k)) };
                    let msum = q2k_minimum_sums([q.0, q.1], mins[k]);
                    minimums[t] = vfmaq_n_f32(minimums[t], vcvtq_f32_s32(msum), d);
                }
            };
            two_bit_walk(qs, &activations, &scales, &mut scaled, level, minimum_terms);
            for t in 0..T {
                acc[t] = vfmsq_f32(vfmaq_f32(acc[t], scaled[t], d), minimums[t], dmin);
            }
        }
        acc
    }
}

/// Q4_K matrix × int8 activations. Panics on a CPU without the dot-product extension.
pub fn matmul_q4k(weights: &[BlockQ4K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
    // SAFETY: the CPU has the dot-product extension (checked just above).
    unsafe { matmul::<Q4K>(weights, cols, x, out) }
}

/// Q5_K matrix × int8 activations. Panics on a CPU without the dot-product extension.
pub fn matmul_q5k(weights: &[BlockQ5K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
    // SAFETY: the CPU has the dot-product extension (checked just above).
    unsafe { matmul::<Q5K>(weights, cols, x, out) }
}

/// Q6_K matrix × int8 activations. Panics on a CPU without the dot-product extension.
pub fn matmul_q6k(weights: &[BlockQ6K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
    // SAFETY: the CPU has the dot-product extension (checked just above).
    unsafe { matmul::<Q6K>(weights, cols, x, out) }
}

/// Q3_K matrix × int8 activations. Panics on a CPU without the dot-product extension.
pub fn matmul_q3k(weights: &[BlockQ3K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
    // SAFETY: the CPU has the dot-product extension (checked just above).
    unsafe { matmul::<Q3K>(weights, cols, x, out) }
}

/// Q2_K matrix × int8 activations. Panics on a CPU without the dot-product extension.
pub fn matmul_q2k(weights: &[BlockQ2K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
    // SAFETY: the CPU has the dot-product extension (checked just above).
    unsafe { matmul::<Q2K>(weights, cols, x, out) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::kquant::test_support::{self, Format, Matmul, VariedRuns};

    /// Kernel against reference: both compute the same exact integer sums and
    /// differ only in how the float terms built from them are grouped and
    /// rounded. Each side rounds every term through at most four operations
    /// and adds it into a running sum of at most `cols/16 + 4` terms (Q4_K's
    /// two per 32 values, plus a few per super-block), so each is within
    /// `(n + 4)·u·Σ|terms|` of the exact value (u = 2⁻²⁴) and the two within
    /// `(n + 4)·2u` = `(n + 4)·ε` of each other, ε = f32::EPSILON per term
    /// counted, relative to the sum of the terms' magnitudes ([`Format::magnitude`]).
    const ROUNDING_PER_TERM: f32 = f32::EPSILON;

    /// The terms a row's sum is made of may be at most this many per column / 16, plus this.
    fn terms(cols: usize) -> f32 {
        (cols / 16 + 8) as f32
    }

    /// The kernel against the reference at every shape of [`test_support::check`].
    fn check<B: Format>(kernel: Matmul<B>) {
        if !available() {
            eprintln!("{}: no dot-product extension on this CPU, skipped", B::NAME);
            return;
        }
        test_support::check(kernel, |cols| ROUNDING_PER_TERM * terms(cols), &mut VariedRuns::new());
    }

    #[test]
    fn q4k_matches_the_reference() {
        check(matmul_q4k);
    }

    #[test]
    fn q5k_matches_the_reference() {
        check(matmul_q5k);
    }

    #[test]
    fn q6k_matches_the_reference() {
        check(matmul_q6k);
    }

    #[test]
    fn q3k_matches_the_reference() {
        check(matmul_q3k);
    }

    #[test]
    fn q2k_matches_the_reference() {
        check(matmul_q2k);
    }

    #[test]
    fn zero_rows_and_an_empty_batch_write_nothing() {
        if available() {
            test_support::check_empty(matmul_q4k, matmul_q6k);
        }
    }
}
