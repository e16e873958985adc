//! ARMv8.0 NEON products of k-quant matrices with int8 activations, for the
//! Raspberry Pi 4's Cortex-A72 (no dot-product extension).
//!
//! Four weight rows go together against each activation block, so one
//! activation load serves four rows and the scale math is one vector for the
//! four. Per super-block, the rows' scales (and minimums) are decoded once and
//! transposed so that each sub-block's four scales are one vector. Per
//! activation block, each row's 32 levels are unpacked into two byte vectors
//! (masks and shifts; the high bits of Q5_K, Q6_K and Q3_K are shifted into
//! place by a per-block count and inserted with a bit select), multiplied with
//! the activation's 32 int8 values in widening multiplies (`smull`, `smlal2`)
//! into 16-bit lanes, and the four rows' lanes reduced pairwise (`addp`,
//! `saddlp`) into one int32 per row. Then one float multiply-add per row
//! group and sub-block:
//!
//! - Q4_K, Q5_K (one scale and minimum per 32): `d·scale·dₓ·Σn·q − dmin·min·sₓ`;
//! - Q6_K, Q3_K (two signed scales per 32): the integer scales multiply the
//!   two 16-value sums in int32 (`s₀·Σ₀ + s₁·Σ₁`, as the reference), then
//!   `d·dₓ` times that;
//! - Q2_K: as Q3_K, less `dmin·dₓ·(m₀·Σ₀q + m₁·Σ₁q)`, the minimums meeting
//!   the activation's sums over the halves of its block.
//!
//! A batch of activations is walked in tiles of up to four inside the
//! super-block loop: a block's levels are unpacked once and serve every
//! activation of the tile. A last group of one to three rows repeats its last
//! row to make four and stores only the rows that exist (as the other NEON
//! kernels do), so the remainder uses the same tested four-row path.

use super::interleaved::arm::q2k_minimum_sums;
use super::scalar::ACTIVATION_BLOCKS;
use crate::kernels::matmul::neon::widen_f16;
use crate::kquant::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, QK_K};
use crate::quant::{BlockQ8Act, GROUP};
use std::arch::aarch64::*;
use std::arch::asm;

/// Rows one kernel step multiplies together.
const ROWS: usize = 4;

/// Activations of a batch whose sums stay live while a super-block's levels
/// are reused for each of them.
const TILE: usize = 4;

/// A k-quant format's four-row kernel.
trait FourRows {
    /// The format's super-block.
    type Block;
    /// Four rows of equal length · `N` activations of the matching number of
    /// activation blocks: per activation, the four rows' sums.
    ///
    /// # Safety
    /// The CPU has NEON (every aarch64 target does).
    unsafe fn dot4<const N: usize>(rows: [&[Self::Block]; ROWS], x: [&[BlockQ8Act]; N]) -> [float32x4_t; N];
}

/// Every row of `weights` against every activation of the batch in `x`,
/// stored at `out[r·batch + b]` (the contract of the scalar reference).
fn matmul_k<K: FourRows>(weights: &[K::Block], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    assert!(cols > 0 && cols.is_multiple_of(QK_K), "{cols} columns are not whole super-blocks of {QK_K}");
    let (superblocks, activation_blocks) = (cols / QK_K, cols / GROUP);
    let (rows, batch) = (weights.len() / superblocks, x.len() / activation_blocks);
    assert!(
        weights.len() == rows * superblocks && x.len() == batch * activation_blocks && out.len() == rows * batch,
        "matmul shapes disagree: {} weight super-blocks, {} activation blocks, {} outputs, {cols} columns",
        weights.len(),
        x.len(),
        out.len()
    );
    let row = |r: usize| &weights[r * superblocks..][..superblocks];
    let activation = |b: usize| &x[b * activation_blocks..][..activation_blocks];
    for first in (0..rows).step_by(ROWS) {
        let present = (rows - first).min(ROWS);
        let four = [0, 1, 2, 3].map(|i: usize| row(first + i.min(present - 1)));
        for start in (0..batch).step_by(TILE) {
            let tile = (batch - start).min(TILE);
            // SAFETY: NEON is part of every aarch64 target.
            let sums = unsafe {
                match tile {
                    1 => lanes(K::dot4::<1>(four, [activation(start)])),
                    2 => lanes(K::dot4::<2>(four, std::array::from_fn(|t| activation(start + t)))),
                    3 => lanes(K::dot4::<3>(four, std::array::from_fn(|t| activation(start + t)))),
                    _ => lanes(K::dot4::<TILE>(four, std::array::from_fn(|t| activation(start + t)))),
                }
            };
            for (i, outputs) in out[first * batch..].chunks_exact_mut(batch).take(present).enumerate() {
                for (o, activation_sums) in outputs[start..start + tile].iter_mut().zip(&sums) {
                    *o = activation_sums[i];
                }
            }
        }
    }
}

/// The lanes of up to [`TILE`] vectors of four row sums.
#[target_feature(enable = "neon")]
#[inline]
fn lanes<const N: usize>(sums: [float32x4_t; N]) -> [[f32; ROWS]; TILE] {
    let mut out = [[0f32; ROWS]; TILE];
    for (lanes, &v) in out.iter_mut().zip(&sums) {
        // SAFETY: `lanes` is four writable f32.
        unsafe { vst1q_f32(lanes.as_mut_ptr(), v) };
    }
    out
}

/// `per_row!(|r| e)` is `[e, e, e, e]` with `r` = 0, 1, 2, 3: one value per
/// row of a group, written out in the kernel's own `neon` context (through
/// `array::map`'s closures the compiler does not inline the vector code).
macro_rules! per_row {
    (|$r:ident| $value:expr) => {
        [
            {
                let $r: usize = 0;
                $value
            },
            {
                let $r: usize = 1;
                $value
            },
            {
                let $r: usize = 2;
                $value
            },
            {
                let $r: usize = 3;
                $value
            },
        ]
    };
}

/// 32 bytes as two vectors.
#[target_feature(enable = "neon")]
#[inline]
fn load32(bytes: &[u8; 32]) -> [uint8x16_t; 2] {
    // SAFETY: `bytes` is 32 readable bytes.
    let v = unsafe { vld1q_u8_x2(bytes.as_ptr()) };
    [v.0, v.1]
}

/// 16 bytes as a vector.
#[target_feature(enable = "neon")]
#[inline]
fn load16(bytes: &[u8; 16]) -> uint8x16_t {
    // SAFETY: `bytes` is 16 readable bytes.
    unsafe { vld1q_u8(bytes.as_ptr()) }
}

/// An activation block's `[d, s]` and its 32 int8 values.
#[target_feature(enable = "neon")]
#[inline]
fn load_activation(a: &BlockQ8Act) -> (float32x2_t, [int8x16_t; 2]) {
    // SAFETY: `BlockQ8Act` is `repr(C)`: `d` and `s` are its first two f32
    // (read through a pointer to the whole block), `qs` its 32 bytes.
    unsafe {
        let units = vld1_f32((a as *const BlockQ8Act).cast::<f32>());
        let q = vld1q_s8_x2(a.qs.as_ptr());
        (units, [q.0, q.1])
    }
}

/// The four rows' f16 units (`d` or `dmin`, little-endian bytes) as f32.
#[target_feature(enable = "neon")]
#[inline]
fn units(bytes: [[u8; 2]; ROWS]) -> float32x4_t {
    let bits = [0, 1, 2, 3].map(|r| u16::from_le_bytes(bytes[r]));
    // SAFETY: `bits` is four readable u16.
    widen_f16(unsafe { vld1_u16(bits.as_ptr()) })
}

/// The low nibble of each byte (0..15).
#[target_feature(enable = "neon")]
#[inline]
fn low_nibbles(v: [uint8x16_t; 2]) -> [uint8x16_t; 2] {
    let mask = vdupq_n_u8(0x0F);
    [vandq_u8(v[0], mask), vandq_u8(v[1], mask)]
}

/// The high nibble of each byte (0..15).
#[target_feature(enable = "neon")]
#[inline]
fn high_nibbles(v: [uint8x16_t; 2]) -> [uint8x16_t; 2] {
    [vshrq_n_u8::<4>(v[0]), vshrq_n_u8::<4>(v[1])]
}

/// The two bits of each byte that `shift` (negative: right) moves to bits 0, 1.
#[target_feature(enable = "neon")]
#[inline]
fn two_bits(v: [uint8x16_t; 2], shift: int8x16_t) -> [uint8x16_t; 2] {
    let mask = vdupq_n_u8(3);
    [vandq_u8(vshlq_u8(v[0], shift), mask), vandq_u8(vshlq_u8(v[1], shift), mask)]
}

/// `low` with the bits of `mask` taken from `high` shifted by `shift`
/// (negative: right): the high bits of a level put on top of its low bits
/// (`low` is clear under `mask`).
#[target_feature(enable = "neon")]
#[inline]
fn with_high_bits(low: [uint8x16_t; 2], high: [uint8x16_t; 2], shift: int8x16_t, mask: uint8x16_t) -> [uint8x16_t; 2] {
    [vbslq_u8(mask, vshlq_u8(high[0], shift), low[0]), vbslq_u8(mask, vshlq_u8(high[1], shift), low[1])]
}

/// Unsigned levels as signed bytes, minus `zero_point`.
#[target_feature(enable = "neon")]
#[inline]
fn signed(v: [uint8x16_t; 2], zero_point: u8) -> [int8x16_t; 2] {
    let z = vdupq_n_u8(zero_point);
    [vreinterpretq_s8_u8(vsubq_u8(v[0], z)), vreinterpretq_s8_u8(vsubq_u8(v[1], z))]
}

/// 16 bytes of each of four rows, transposed: vector `i` holds bytes
/// `4i .. 4i + 4` of the four rows, byte `j` of every row before byte `j + 1`
/// (`[r0[4i], r1[4i], r2[4i], r3[4i], r0[4i + 1], …]`), so the four rows'
/// values of one index are one 32-bit lane group.
#[target_feature(enable = "neon")]
#[inline]
fn transpose_rows(rows: [uint8x16_t; ROWS]) -> [uint8x16_t; 4] {
    let (ab_low, ab_high) = (vzip1q_u8(rows[0], rows[1]), vzip2q_u8(rows[0], rows[1]));
    let (cd_low, cd_high) = (vzip1q_u8(rows[2], rows[3]), vzip2q_u8(rows[2], rows[3]));
    let w = |v: uint8x16_t| vreinterpretq_u16_u8(v);
    let b = |v: uint16x8_t| vreinterpretq_u8_u16(v);
    [
        b(vzip1q_u16(w(ab_low), w(cd_low))),
        b(vzip2q_u16(w(ab_low), w(cd_low))),
        b(vzip1q_u16(w(ab_high), w(cd_high))),
        b(vzip2q_u16(w(ab_high), w(cd_high))),
    ]
}

/// A vector of 16 unsigned bytes as four vectors of four f32 (lanes
/// `4i .. 4i + 4` in vector `i`).
#[target_feature(enable = "neon")]
#[inline]
fn bytes_to_f32(v: uint8x16_t) -> [float32x4_t; 4] {
    let (low, high) = (vmovl_u8(vget_low_u8(v)), vmovl_high_u8(v));
    [
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(low))),
        vcvtq_f32_u32(vmovl_high_u16(low)),
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(high))),
        vcvtq_f32_u32(vmovl_high_u16(high)),
    ]
}

/// Per activation block `k`, the four rows' signed scales `2k` and `2k + 1`
/// as int32, from a table of signed bytes made by [`transpose_rows`].
#[target_feature(enable = "neon")]
#[inline]
fn scale_pairs(table: [uint8x16_t; 4]) -> [(int32x4_t, int32x4_t); ACTIVATION_BLOCKS] {
    let mut pairs = [(vdupq_n_s32(0), vdupq_n_s32(0)); ACTIVATION_BLOCKS];
    for (i, &bytes) in table.iter().enumerate() {
        let v = vreinterpretq_s8_u8(bytes);
        let (low, high) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
        pairs[2 * i] = (vmovl_s16(vget_low_s16(low)), vmovl_high_s16(low));
        pairs[2 * i + 1] = (vmovl_s16(vget_low_s16(high)), vmovl_high_s16(high));
    }
    pairs
}

// The widening products are written as instructions: given
// `vmlal_high_s8(p, levels, q)` the compiler extracts each row's high half
// with an `ext` and multiplies the halves (two instructions where `smlal2`
// is one).

/// `level·q` over 32 values, four products to a 16-bit lane.
#[inline(always)]
fn products32(levels: [int8x16_t; 2], q: [int8x16_t; 2]) -> int16x8_t {
    let p: int16x8_t;
    // SAFETY: register arithmetic only; NEON is part of every aarch64 target.
    unsafe {
        asm!(
            "smull {p:v}.8h, {l0:v}.8b, {q0:v}.8b",
            "smlal2 {p:v}.8h, {l0:v}.16b, {q0:v}.16b",
            "smlal {p:v}.8h, {l1:v}.8b, {q1:v}.8b",
            "smlal2 {p:v}.8h, {l1:v}.16b, {q1:v}.16b",
            p = out(vreg) p,
            l0 = in(vreg) levels[0],
            l1 = in(vreg) levels[1],
            q0 = in(vreg) q[0],
            q1 = in(vreg) q[1],
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    p
}

/// `level·q` over 16 values, two products to a 16-bit lane.
#[inline(always)]
fn products16(levels: int8x16_t, q: int8x16_t) -> int16x8_t {
    let p: int16x8_t;
    // SAFETY: register arithmetic only; NEON is part of every aarch64 target.
    unsafe {
        asm!(
            "smull {p:v}.8h, {l:v}.8b, {q:v}.8b",
            "smlal2 {p:v}.8h, {l:v}.16b, {q:v}.16b",
            p = out(vreg) p,
            l = in(vreg) levels,
            q = in(vreg) q,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    p
}

/// The sum of each row's eight 16-bit lanes. Lanes below 2¹³ in magnitude
/// (`SMALL`): two rounds of pairwise adds across rows stay in 16 bits (below
/// 2¹⁵), giving `[r0 r0 r1 r1 r2 r2 r3 r3]`, and one widening pairwise add
/// the four sums. Lanes up to 2¹⁴: one round in 16 bits, the second in 32.
#[target_feature(enable = "neon")]
#[inline]
fn sum_rows<const SMALL: bool>(p: [int16x8_t; ROWS]) -> int32x4_t {
    if SMALL {
        vpaddlq_s16(vpaddq_s16(vpaddq_s16(p[0], p[1]), vpaddq_s16(p[2], p[3])))
    } else {
        vpaddq_s32(vpaddlq_s16(vpaddq_s16(p[0], p[1])), vpaddlq_s16(vpaddq_s16(p[2], p[3])))
    }
}

/// Super-block `superblock` of each of four rows.
#[inline]
fn row_blocks<'a, B>(rows: &[&'a [B]; ROWS], superblock: usize) -> [&'a B; ROWS] {
    [&rows[0][superblock], &rows[1][superblock], &rows[2][superblock], &rows[3][superblock]]
}

/// Each activation's eight blocks that meet super-block `superblock`.
#[inline]
fn activation_blocks<'a, const N: usize>(
    x: &[&'a [BlockQ8Act]; N],
    superblock: usize,
) -> [&'a [BlockQ8Act; ACTIVATION_BLOCKS]; N] {
    x.map(|a| &a.as_chunks::<ACTIVATION_BLOCKS>().0[superblock])
}

/// Four bytes little-endian from `bytes[4i..]`.
#[inline]
fn word(bytes: &[u8; 12], i: usize) -> u32 {
    u32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]])
}

/// The low 6, 4 and 2 bits of every byte of a word.
const LOW6: u32 = 0x3f3f_3f3f;
const LOW4: u32 = 0x0f0f_0f0f;
const LOW2: u32 = 0x0303_0303;

/// A Q4_K or Q5_K super-block's eight 6-bit scales (bytes 0..8) and eight
/// minimums (bytes 8..16): [`crate::kquant::scale_min_k4`] for every
/// sub-block at once, four bytes a step (ggml's `kmask` unpacking).
#[target_feature(enable = "neon")]
#[inline]
fn scales_and_mins_k4(packed: &[u8; 12]) -> uint8x16_t {
    let (a, b, c) = (word(packed, 0), word(packed, 1), word(packed, 2));
    // Sub-blocks 0–3: the low 6 bits of bytes 0–3 (scales) and 4–7 (minimums).
    // Sub-blocks 4–7: a nibble of bytes 8–11 under the top 2 bits of bytes 0–7.
    let scales = (a & LOW6) as u64 | ((((c & LOW4) | (((a >> 6) & LOW2) << 4)) as u64) << 32);
    let mins = (b & LOW6) as u64 | (((((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4)) as u64) << 32);
    vcombine_u8(vcreate_u8(scales), vcreate_u8(mins))
}

/// A Q3_K super-block's sixteen 6-bit scales ([`BlockQ3K::scale`] for every
/// `i` at once; ggml's `kmask` unpacking), minus the offset 32: −32..32.
#[target_feature(enable = "neon")]
#[inline]
fn scales_q3k(packed: &[u8; 12]) -> uint8x16_t {
    let (a, b, c) = (word(packed, 0), word(packed, 1), word(packed, 2));
    // Scale i: the low (i < 8) or high nibble of byte i mod 8, under bits
    // 2·(i / 4) of byte 8 + i mod 4.
    let s0 = (a & LOW4) | ((c & LOW2) << 4);
    let s1 = (b & LOW4) | (((c >> 2) & LOW2) << 4);
    let s2 = ((a >> 4) & LOW4) | (((c >> 4) & LOW2) << 4);
    let s3 = ((b >> 4) & LOW4) | (((c >> 6) & LOW2) << 4);
    let unsigned = vcombine_u8(vcreate_u8(s0 as u64 | (s1 as u64) << 32), vcreate_u8(s2 as u64 | (s3 as u64) << 32));
    vsubq_u8(unsigned, vdupq_n_u8(32))
}

/// Per sub-block of 32, the four rows' `d·scale` and `−dmin·min` of a Q4_K or
/// Q5_K super-block.
#[target_feature(enable = "neon")]
#[inline]
fn steps_k4(d: float32x4_t, dmin: float32x4_t, packed: [&[u8; 12]; ROWS]) -> ([float32x4_t; 8], [float32x4_t; 8]) {
    let table = transpose_rows(per_row!(|r| scales_and_mins_k4(packed[r])));
    let [s0, s1, s2, s3] = bytes_to_f32(table[0]);
    let [s4, s5, s6, s7] = bytes_to_f32(table[1]);
    let [m0, m1, m2, m3] = bytes_to_f32(table[2]);
    let [m4, m5, m6, m7] = bytes_to_f32(table[3]);
    let negative_dmin = vnegq_f32(dmin);
    let step = |s| vmulq_f32(d, s);
    let shift = |m| vmulq_f32(negative_dmin, m);
    (
        [step(s0), step(s1), step(s2), step(s3), step(s4), step(s5), step(s6), step(s7)],
        [shift(m0), shift(m1), shift(m2), shift(m3), shift(m4), shift(m5), shift(m6), shift(m7)],
    )
}

/// One sub-block of 32 of a Q4_K / Q5_K row group against activation block
/// `sub` of each activation: `acc += (d·scale·dₓ)·Σn·q − (dmin·min)·sₓ` (the
/// reference's order of products). `SMALL`: see [`sum_rows`].
#[target_feature(enable = "neon")]
#[inline]
fn accumulate_k4<const N: usize, const SMALL: bool>(
    acc: &mut [float32x4_t; N],
    activations: &[&[BlockQ8Act; ACTIVATION_BLOCKS]; N],
    sub: usize,
    levels: [[int8x16_t; 2]; ROWS],
    step: float32x4_t,
    negative_min: float32x4_t,
) {
    for (acc, a) in acc.iter_mut().zip(activations) {
        let (units, q) = load_activation(&a[sub]);
        let isum = sum_rows::<SMALL>(per_row!(|r| products32(levels[r], q)));
        let sum = vfmaq_f32(*acc, vmulq_lane_f32::<0>(step, units), vcvtq_f32_s32(isum));
        *acc = vfmaq_lane_f32::<1>(sum, negative_min, units);
    }
}

/// Activation block `k` of a Q6_K / Q3_K row group against activation block
/// `k` of each activation: `acc += (d·dₓ)·(s₀·Σ₀ + s₁·Σ₁)` over its two
/// sub-blocks of 16, the scales applied in int32 (as the reference).
#[target_feature(enable = "neon")]
#[inline]
fn accumulate_signed<const N: usize, const SMALL: bool>(
    acc: &mut [float32x4_t; N],
    activations: &[&[BlockQ8Act; ACTIVATION_BLOCKS]; N],
    k: usize,
    levels: [[int8x16_t; 2]; ROWS],
    scales: (int32x4_t, int32x4_t),
    d: float32x4_t,
) {
    for (acc, a) in acc.iter_mut().zip(activations) {
        let (units, q) = load_activation(&a[k]);
        let first = sum_rows::<SMALL>(per_row!(|r| products16(levels[r][0], q[0])));
        let second = sum_rows::<SMALL>(per_row!(|r| products16(levels[r][1], q[1])));
        let isum = vmlaq_s32(vmulq_s32(first, scales.0), second, scales.1);
        *acc = vfmaq_f32(*acc, vmulq_lane_f32::<0>(d, units), vcvtq_f32_s32(isum));
    }
}

/// Activation block `k` of a Q2_K row group against activation block `k`
/// of each activation: as [`accumulate_signed`] with the scales, then
/// `acc −= (dmin·dₓ)·(m₀·Σ₀q + m₁·Σ₁q)` with the minimums.
#[target_feature(enable = "neon")]
#[inline]
fn accumulate_q2k<const N: usize>(
    acc: &mut [float32x4_t; N],
    activations: &[&[BlockQ8Act; ACTIVATION_BLOCKS]; N],
    k: usize,
    levels: [[int8x16_t; 2]; ROWS],
    (scales, mins): ((int32x4_t, int32x4_t), int16x8_t),
    (d, dmin): (float32x4_t, float32x4_t),
) {
    // |n·q| ≤ 3·128: two products to a lane stay far below 2¹³.
    accumulate_signed::<N, true>(acc, activations, k, levels, scales, d);
    for (acc, a) in acc.iter_mut().zip(activations) {
        let (units, q) = load_activation(&a[k]);
        let msum = q2k_minimum_sums(q, mins);
        *acc = vfmsq_f32(*acc, vmulq_lane_f32::<0>(dmin, units), vcvtq_f32_s32(msum));
    }
}

/// Q4_K: levels 0..15, the low nibbles of `qs[32c..32c + 32]` for sub-block
/// 2c and the high ones for 2c + 1.
struct Q4K;

impl FourRows for Q4K {
    type Block = BlockQ4K;

    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn dot4<const N: usize>(rows: [&[BlockQ4K]; ROWS], x: [&[BlockQ8Act]; N]) -> [float32x4_t; N] {
        let mut acc = [vdupq_n_f32(0.0); N];
        for superblock in 0..rows[0].len() {
            let blocks = row_blocks(&rows, superblock);
            let activations = activation_blocks(&x, superblock);
            let (steps, negative_mins) = steps_k4(
                units(per_row!(|r| blocks[r].d)),
                units(per_row!(|r| blocks[r].dmin)),
                per_row!(|r| &blocks[r].scales),
            );
            for chunk in 0..4 {
                let bytes = per_row!(|r| load32(&blocks[r].qs.as_chunks::<32>().0[chunk]));
                // |n·q| ≤ 15·127: four products to a lane stay below 2¹³.
                let (low, high) = (2 * chunk, 2 * chunk + 1);
                let levels = per_row!(|r| signed(low_nibbles(bytes[r]), 0));
                accumulate_k4::<N, true>(&mut acc, &activations, low, levels, steps[low], negative_mins[low]);
                let levels = per_row!(|r| signed(high_nibbles(bytes[r]), 0));
                accumulate_k4::<N, true>(&mut acc, &activations, high, levels, steps[high], negative_mins[high]);
            }
        }
        acc
    }
}

/// Q5_K: Q4_K's nibble with bit `sub` of `qh[l]` on top (levels 0..31).
struct Q5K;

impl FourRows for Q5K {
    type Block = BlockQ5K;

    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn dot4<const N: usize>(rows: [&[BlockQ5K]; ROWS], x: [&[BlockQ8Act]; N]) -> [float32x4_t; N] {
        let mut acc = [vdupq_n_f32(0.0); N];
        let fifth_bit = vdupq_n_u8(0x10);
        for superblock in 0..rows[0].len() {
            let blocks = row_blocks(&rows, superblock);
            let activations = activation_blocks(&x, superblock);
            let (steps, negative_mins) = steps_k4(
                units(per_row!(|r| blocks[r].d)),
                units(per_row!(|r| blocks[r].dmin)),
                per_row!(|r| &blocks[r].scales),
            );
            for chunk in 0..4 {
                let bytes = per_row!(|r| load32(&blocks[r].qs.as_chunks::<32>().0[chunk]));
                let high_bits = per_row!(|r| load32(&blocks[r].qh));
                // |n·q| ≤ 31·127: four products to a lane stay below 2¹⁴.
                // Bit `sub` of qh moves to bit 4 (a right shift for sub > 4).
                let (low, high) = (2 * chunk, 2 * chunk + 1);
                let shift = vdupq_n_s8(4 - low as i8);
                let levels =
                    per_row!(|r| signed(with_high_bits(low_nibbles(bytes[r]), high_bits[r], shift, fifth_bit), 0));
                accumulate_k4::<N, false>(&mut acc, &activations, low, levels, steps[low], negative_mins[low]);
                let shift = vdupq_n_s8(4 - high as i8);
                let levels =
                    per_row!(|r| signed(with_high_bits(high_nibbles(bytes[r]), high_bits[r], shift, fifth_bit), 0));
                accumulate_k4::<N, false>(&mut acc, &activations, high, levels, steps[high], negative_mins[high]);
            }
        }
        acc
    }
}

/// Q6_K: levels −32..31, a nibble of `ql` under two bits of `qh`, minus 32.
struct Q6K;

impl FourRows for Q6K {
    type Block = BlockQ6K;

    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn dot4<const N: usize>(rows: [&[BlockQ6K]; ROWS], x: [&[BlockQ8Act]; N]) -> [float32x4_t; N] {
        let mut acc = [vdupq_n_f32(0.0); N];
        let top_bits = vdupq_n_u8(0x30);
        for superblock in 0..rows[0].len() {
            let blocks = row_blocks(&rows, superblock);
            let activations = activation_blocks(&x, superblock);
            let d = units(per_row!(|r| blocks[r].d));
            let scales = scale_pairs(transpose_rows(per_row!(|r| load16(&blocks[r].scales))));
            // Half h of the super-block, quarters p and p + 2 (activation
            // blocks 4h + p, 4h + p + 2): the low and high nibbles of
            // ql[64h + 32p..][..32], under bits 2·quarter, 2·quarter + 1 of
            // qh[32h..][..32] moved to bits 4, 5.
            for half in 0..2 {
                for quarter in 0..2 {
                    let low_bits = per_row!(|r| load32(&blocks[r].ql.as_chunks::<32>().0[2 * half + quarter]));
                    let high_bits = per_row!(|r| load32(&blocks[r].qh.as_chunks::<32>().0[half]));
                    // |n·q| ≤ 32·127: two products to a lane, below 2¹⁴ after one pairwise add.
                    let k = 4 * half + quarter;
                    let shift = vdupq_n_s8(4 - 2 * quarter as i8);
                    let levels = per_row!(|r| signed(
                        with_high_bits(low_nibbles(low_bits[r]), high_bits[r], shift, top_bits),
                        32
                    ));
                    accumulate_signed::<N, false>(&mut acc, &activations, k, levels, scales[k], d);
                    let shift = vdupq_n_s8(4 - 2 * (quarter + 2) as i8);
                    let levels = per_row!(|r| signed(
                        with_high_bits(high_nibbles(low_bits[r]), high_bits[r], shift, top_bits),
                        32
                    ));
                    accumulate_signed::<N, false>(&mut acc, &activations, k + 2, levels, scales[k + 2], d);
                }
            }
        }
        acc
    }
}

/// Q3_K: levels −4..3, two bits of `qs`, and 4 subtracted where the `hmask`
/// bit is clear.
struct Q3K;

impl FourRows for Q3K {
    type Block = BlockQ3K;

    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn dot4<const N: usize>(rows: [&[BlockQ3K]; ROWS], x: [&[BlockQ8Act]; N]) -> [float32x4_t; N] {
        let mut acc = [vdupq_n_f32(0.0); N];
        let third_bit = vdupq_n_u8(4);
        for superblock in 0..rows[0].len() {
            let blocks = row_blocks(&rows, superblock);
            let activations = activation_blocks(&x, superblock);
            let d = units(per_row!(|r| blocks[r].d));
            let scales = scale_pairs(transpose_rows(per_row!(|r| scales_q3k(&blocks[r].scales))));
            let high_bits = per_row!(|r| load32(&blocks[r].hmask));
            for n in 0..2 {
                let low_bits = per_row!(|r| load32(&blocks[r].qs.as_chunks::<32>().0[n]));
                for j in 0..4 {
                    let k = 4 * n + j;
                    // Bits 2j, 2j + 1 of qs move to bits 0, 1; bit 4n + j of hmask to bit 2.
                    let (low_shift, high_shift) = (vdupq_n_s8(-2 * j as i8), vdupq_n_s8(2 - k as i8));
                    let levels = per_row!(|r| {
                        signed(with_high_bits(two_bits(low_bits[r], low_shift), high_bits[r], high_shift, third_bit), 4)
                    });
                    // |n·q| ≤ 4·127: two products to a lane stay far below 2¹³.
                    accumulate_signed::<N, true>(&mut acc, &activations, k, levels, scales[k], d);
                }
            }
        }
        acc
    }
}

/// Q2_K: levels 0..3, two bits of `qs`; a 4-bit scale and minimum per
/// sub-block of 16.
struct Q2K;

impl FourRows for Q2K {
    type Block = BlockQ2K;

    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn dot4<const N: usize>(rows: [&[BlockQ2K]; ROWS], x: [&[BlockQ8Act]; N]) -> [float32x4_t; N] {
        let mut acc = [vdupq_n_f32(0.0); N];
        let nibble = vdupq_n_u8(15);
        for superblock in 0..rows[0].len() {
            let blocks = row_blocks(&rows, superblock);
            let activations = activation_blocks(&x, superblock);
            let units = (units(per_row!(|r| blocks[r].d)), units(per_row!(|r| blocks[r].dmin)));
            // Scale i of a row in the low nibble of its byte i, minimum i in the high one.
            let table = transpose_rows(per_row!(|r| load16(&blocks[r].scales)));
            let scales = scale_pairs([0, 1, 2, 3].map(|i| vandq_u8(table[i], nibble)));
            // Activation block k's minimums: bytes 8k..8k + 8 of the table, 16-bit.
            let mins = [0, 1, 2, 3, 4, 5, 6, 7].map(|k| {
                let bytes = vshrq_n_u8::<4>(table[k / 2]);
                let half = if k % 2 == 0 { vmovl_u8(vget_low_u8(bytes)) } else { vmovl_high_u8(bytes) };
                vreinterpretq_s16_u16(half)
            });
            for n in 0..2 {
                let low_bits = per_row!(|r| load32(&blocks[r].qs.as_chunks::<32>().0[n]));
                for j in 0..4 {
                    // Bits 2j, 2j + 1 of qs move to bits 0, 1.
                    let (k, shift) = (4 * n + j, vdupq_n_s8(-2 * j as i8));
                    let levels = per_row!(|r| signed(two_bits(low_bits[r], shift), 0));
                    accumulate_q2k::<N>(&mut acc, &activations, k, levels, (scales[k], mins[k]), units);
                }
            }
        }
        acc
    }
}

/// Q4_K matrix × int8 activations.
pub fn matmul_q4k(weights: &[BlockQ4K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_k::<Q4K>(weights, cols, x, out)
}

/// Q5_K matrix × int8 activations.
pub fn matmul_q5k(weights: &[BlockQ5K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_k::<Q5K>(weights, cols, x, out)
}

/// Q6_K matrix × int8 activations.
pub fn matmul_q6k(weights: &[BlockQ6K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_k::<Q6K>(weights, cols, x, out)
}

/// Q3_K matrix × int8 activations.
pub fn matmul_q3k(weights: &[BlockQ3K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_k::<Q3K>(weights, cols, x, out)
}

/// Q2_K matrix × int8 activations.
pub fn matmul_q2k(weights: &[BlockQ2K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_k::<Q2K>(weights, cols, x, out)
}

#[cfg(all(test, target_arch = "aarch64"))]
mod tests {
    use super::super::test_support::{self, Format, Matmul, SuperBlockStyles};

    /// Kernel and reference form the same integer sums and multiply the same
    /// scales in the same order; only the order of the float additions differs
    /// (fused multiply-adds, a row's terms summed in a vector lane). Each
    /// output sums at most 2·cols/32 terms, each rounded a few times, and the
    /// roundings of a sum of terms of random signs partly cancel: the
    /// difference is a few 2⁻²⁴ (6·10⁻⁸) of the sum of the terms' magnitudes
    /// (at most 1.5·10⁻⁷ over every shape and data kind here, 11008 columns
    /// included). The budget leaves a margin of about 7 over that and still
    /// catches one wrong product in a row of 11008 columns (≈ 10⁻⁵ of it).
    const REORDERING_BUDGET: f32 = 1e-6;

    /// The kernel against the reference at every shape of [`test_support::check`].
    fn check<B: Format>(kernel: Matmul<B>) {
        test_support::check(kernel, |_| REORDERING_BUDGET, &mut SuperBlockStyles::new());
    }

    #[test]
    fn q4k_matches_the_reference() {
        check(super::matmul_q4k);
    }

    #[test]
    fn q5k_matches_the_reference() {
        check(super::matmul_q5k);
    }

    #[test]
    fn q6k_matches_the_reference() {
        check(super::matmul_q6k);
    }

    #[test]
    fn q3k_matches_the_reference() {
        check(super::matmul_q3k);
    }

    #[test]
    fn q2k_matches_the_reference() {
        check(super::matmul_q2k);
    }
}
