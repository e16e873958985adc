//! Reference products of k-quant rows with int8 activations: each activation
//! block of 32 values is matched with the 32 weight levels it covers, as
//! plain integers, and scaled once per sub-block.
//!
//! A super-block of 256 weights covers 8 activation blocks. Q4_K and Q5_K
//! have one scale and one minimum per 32 values (one activation block);
//! Q6_K and Q3_K one signed scale per 16 (two per activation block); Q2_K
//! one scale and one minimum per 16, the minimums meeting the sums of the
//! activation's values over each half of its block.

use crate::kquant::{scale_min_k4, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, QK_K};
use crate::quant::{BlockQ8Act, GROUP};
use half::f16;

/// Activation blocks per k-quant super-block.
pub const ACTIVATION_BLOCKS: usize = QK_K / GROUP;

/// The f16 unit stored little-endian in a block, as f32.
#[inline(always)]
fn unit(bytes: [u8; 2]) -> f32 {
    super::super::scalar::f16_to_f32(f16::from_le_bytes(bytes))
}

/// `Σ a[j]·b[j]` over `range` of two blocks of levels.
#[inline(always)]
fn dot_range(a: &[i8; GROUP], b: &[i8; GROUP], range: std::ops::Range<usize>) -> i32 {
    range.map(|j| a[j] as i32 * b[j] as i32).sum()
}

/// The 32 levels of sub-block `sub` of a Q4_K super-block (0..16): the low
/// (even `sub`) or high nibbles of `qs[32·(sub/2)..][..32]`.
#[inline(always)]
pub fn levels_q4k(block: &BlockQ4K, sub: usize) -> [i8; GROUP] {
    let (chunk, shift) = (sub / 2, 4 * (sub % 2));
    std::array::from_fn(|l| ((block.qs[32 * chunk + l] >> shift) & 0xF) as i8)
}

/// The 32 levels of sub-block `sub` of a Q5_K super-block (0..32): Q4_K's
/// nibble with bit `sub` of `qh[l]` on top.
#[inline(always)]
pub fn levels_q5k(block: &BlockQ5K, sub: usize) -> [i8; GROUP] {
    let (chunk, shift) = (sub / 2, 4 * (sub % 2));
    std::array::from_fn(|l| {
        let low = (block.qs[32 * chunk + l] >> shift) & 0xF;
        (low | (((block.qh[l] >> sub) & 1) << 4)) as i8
    })
}

/// The 32 levels of values `32k..32k + 32` of a Q6_K super-block, minus the
/// zero point 32 (−32..32).
#[inline(always)]
pub fn levels_q6k(block: &BlockQ6K, k: usize) -> [i8; GROUP] {
    let (half, quarter) = (k / 4, k % 4);
    let low = &block.ql[64 * half + 32 * (quarter % 2)..][..32];
    let high = &block.qh[32 * half..][..32];
    std::array::from_fn(|l| {
        let level = ((low[l] >> (4 * (quarter / 2))) & 0xF) | (((high[l] >> (2 * quarter)) & 3) << 4);
        level as i8 - 32
    })
}

/// The two-bit fields of values `32k..32k + 32` in Q2_K's and Q3_K's `qs`
/// (0..4): value `128n + 32j + l` (`k = 4n + j`) at bits `2j` of `qs[32n + l]`.
#[inline(always)]
fn two_bit_levels(qs: &[u8; QK_K / 4], k: usize) -> [i8; GROUP] {
    let (n, j) = (k / 4, k % 4);
    std::array::from_fn(|l| ((qs[32 * n + l] >> (2 * j)) & 3) as i8)
}

/// The 32 levels of values `32k..32k + 32` of a Q2_K super-block (0..4).
#[inline(always)]
pub fn levels_q2k(block: &BlockQ2K, k: usize) -> [i8; GROUP] {
    two_bit_levels(&block.qs, k)
}

/// The 32 levels of values `32k..32k + 32` of a Q3_K super-block (−4..4):
/// two bits from `qs`, and 4 subtracted where the `hmask` bit is clear.
#[inline(always)]
pub fn levels_q3k(block: &BlockQ3K, k: usize) -> [i8; GROUP] {
    let mask = 1u8 << k;
    let low = two_bit_levels(&block.qs, k);
    std::array::from_fn(|l| low[l] - if block.hmask[l] & mask != 0 { 0 } else { 4 })
}

/// Sub-block `i` of 16 of a Q2_K super-block: its 4-bit scale and minimum.
#[inline(always)]
pub fn scale_min_q2k(block: &BlockQ2K, i: usize) -> (i32, i32) {
    ((block.scales[i] & 0xF) as i32, (block.scales[i] >> 4) as i32)
}

/// `s₀·Σ₀ + s₁·Σ₁`: `Σₕ` the sum of `a·b` over half `h` (16 values) of two
/// blocks, each weighted by its sub-block's integer scale.
#[inline(always)]
fn pair_sum(a: &[i8; GROUP], b: &[i8; GROUP], (s0, s1): (i32, i32)) -> i32 {
    s0 * dot_range(a, b, 0..16) + s1 * dot_range(a, b, 16..32)
}

/// Q4_K row · activation: per sub-block `d·scale·dₓ·Σ n·q − dmin·min·(dₓ·Σ q)`.
pub fn dot_q4k_q8(row: &[BlockQ4K], x: &[BlockQ8Act]) -> f32 {
    dot_q4k_q8_from(0.0, row, x)
}

/// [`dot_q4k_q8`] added to a running `sum`, super-block by super-block (the
/// interleaved reference continues a row's sum piece by piece).
pub fn dot_q4k_q8_from(mut sum: f32, row: &[BlockQ4K], x: &[BlockQ8Act]) -> f32 {
    for (block, activations) in row.iter().zip(x.chunks_exact(ACTIVATION_BLOCKS)) {
        let (d, dmin) = (unit(block.d), unit(block.dmin));
        for (sub, a) in activations.iter().enumerate() {
            let (scale, min) = scale_min_k4(sub, &block.scales);
            let isum = dot_range(&levels_q4k(block, sub), &a.qs, 0..GROUP);
            sum += d * scale as f32 * a.d * isum as f32 - dmin * min as f32 * a.s;
        }
    }
    sum
}

/// Q5_K row · activation, as [`dot_q4k_q8`] with five-bit levels.
pub fn dot_q5k_q8(row: &[BlockQ5K], x: &[BlockQ8Act]) -> f32 {
    dot_q5k_q8_from(0.0, row, x)
}

/// [`dot_q5k_q8`] added to a running `sum`, super-block by super-block.
pub fn dot_q5k_q8_from(mut sum: f32, row: &[BlockQ5K], x: &[BlockQ8Act]) -> f32 {
    for (block, activations) in row.iter().zip(x.chunks_exact(ACTIVATION_BLOCKS)) {
        let (d, dmin) = (unit(block.d), unit(block.dmin));
        for (sub, a) in activations.iter().enumerate() {
            let (scale, min) = scale_min_k4(sub, &block.scales);
            let isum = dot_range(&levels_q5k(block, sub), &a.qs, 0..GROUP);
            sum += d * scale as f32 * a.d * isum as f32 - dmin * min as f32 * a.s;
        }
    }
    sum
}

/// Q6_K row · activation: per activation block `d·dₓ·(s₀·Σ₀ + s₁·Σ₁)` over
/// its two sub-blocks of 16 with signed 8-bit scales.
pub fn dot_q6k_q8(row: &[BlockQ6K], x: &[BlockQ8Act]) -> f32 {
    dot_q6k_q8_from(0.0, row, x)
}

/// [`dot_q6k_q8`] added to a running `sum`, super-block by super-block.
pub fn dot_q6k_q8_from(mut sum: f32, row: &[BlockQ6K], x: &[BlockQ8Act]) -> f32 {
    for (block, activations) in row.iter().zip(x.chunks_exact(ACTIVATION_BLOCKS)) {
        let d = unit(block.d);
        for (k, a) in activations.iter().enumerate() {
            let scales = (block.scales[2 * k] as i8 as i32, block.scales[2 * k + 1] as i8 as i32);
            let isum = pair_sum(&levels_q6k(block, k), &a.qs, scales);
            sum += d * a.d * isum as f32;
        }
    }
    sum
}

/// Q3_K row · activation: as [`dot_q6k_q8`], the 6-bit scales offset by 32.
pub fn dot_q3k_q8(row: &[BlockQ3K], x: &[BlockQ8Act]) -> f32 {
    dot_q3k_q8_from(0.0, row, x)
}

/// [`dot_q3k_q8`] added to a running `sum`, super-block by super-block.
pub fn dot_q3k_q8_from(mut sum: f32, row: &[BlockQ3K], x: &[BlockQ8Act]) -> f32 {
    for (block, activations) in row.iter().zip(x.chunks_exact(ACTIVATION_BLOCKS)) {
        let d = unit(block.d);
        for (k, a) in activations.iter().enumerate() {
            let scales = (block.scale(2 * k) as i32 - 32, block.scale(2 * k + 1) as i32 - 32);
            let isum = pair_sum(&levels_q3k(block, k), &a.qs, scales);
            sum += d * a.d * isum as f32;
        }
    }
    sum
}

/// Q2_K row · activation: per activation block, its two sub-blocks of 16
/// with scales `s` and minimums `m`, `d·dₓ·(s₀·Σ₀n·q + s₁·Σ₁n·q) −
/// dmin·dₓ·(m₀·Σ₀q + m₁·Σ₁q)`, the scales and minimums applied in int32.
pub fn dot_q2k_q8(row: &[BlockQ2K], x: &[BlockQ8Act]) -> f32 {
    dot_q2k_q8_from(0.0, row, x)
}

/// [`dot_q2k_q8`] added to a running `sum`, super-block by super-block.
pub fn dot_q2k_q8_from(mut sum: f32, row: &[BlockQ2K], x: &[BlockQ8Act]) -> f32 {
    const ONES: [i8; GROUP] = [1; GROUP];
    for (block, activations) in row.iter().zip(x.chunks_exact(ACTIVATION_BLOCKS)) {
        let (d, dmin) = (unit(block.d), unit(block.dmin));
        for (k, a) in activations.iter().enumerate() {
            let ((s0, m0), (s1, m1)) = (scale_min_q2k(block, 2 * k), scale_min_q2k(block, 2 * k + 1));
            let isum = pair_sum(&levels_q2k(block, k), &a.qs, (s0, s1));
            let msum = pair_sum(&ONES, &a.qs, (m0, m1));
            sum += d * a.d * isum as f32 - dmin * a.d * msum as f32;
        }
    }
    sum
}

/// Every row of a k-quant matrix against every activation of the batch.
fn matmul_k<B>(weights: &[B], cols: usize, x: &[BlockQ8Act], out: &mut [f32], dot: fn(&[B], &[BlockQ8Act]) -> f32) {
    let (blocks, activation_blocks) = (cols / QK_K, cols / GROUP);
    let batch = x.len() / activation_blocks;
    debug_assert_eq!(cols % QK_K, 0);
    debug_assert_eq!(weights.len() / blocks * batch, out.len());
    for (row, outputs) in weights.chunks_exact(blocks).zip(out.chunks_exact_mut(batch)) {
        for (o, activation) in outputs.iter_mut().zip(x.chunks_exact(activation_blocks)) {
            *o = dot(row, activation);
        }
    }
}

/// Q4_K matrix × int8 activations.
pub fn matmul_q4k(weights: &[BlockQ4K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_k(weights, cols, x, out, dot_q4k_q8)
}
/// Q5_K matrix × int8 activations.
pub fn matmul_q5k(weights: &[BlockQ5K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_k(weights, cols, x, out, dot_q5k_q8)
}
/// Q6_K matrix × int8 activations.
pub fn matmul_q6k(weights: &[BlockQ6K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_k(weights, cols, x, out, dot_q6k_q8)
}
/// Q3_K matrix × int8 activations.
pub fn matmul_q3k(weights: &[BlockQ3K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_k(weights, cols, x, out, dot_q3k_q8)
}
/// Q2_K matrix × int8 activations.
pub fn matmul_q2k(weights: &[BlockQ2K], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_k(weights, cols, x, out, dot_q2k_q8)
}
