//! Reference implementations: plain loops, one weight row at a time against
//! every activation of the batch, so a row is read from memory once.

use crate::quant::{
    BlockQ4, BlockQ4B, BlockQ4Bx4, BlockQ4S, BlockQ4Sx4, BlockQ4x4, BlockQ8, BlockQ8Act, BlockQ8x4, Interleaved, GROUP,
};
use bytemuck::Zeroable;
use half::f16;

/// binary16 → binary32, exactly, without a call: the exponent and mantissa
/// shifted into place and rescaled by 2¹¹² (exact for normal and subnormal
/// values alike), then the sign; infinities and NaNs get the all-ones exponent.
#[inline(always)]
pub fn f16_to_f32(h: f16) -> f32 {
    let bits = h.to_bits() as u32;
    let magnitude = f32::from_bits((bits & 0x7FFF) << 13) * f32::from_bits(0x7780_0000);
    let mut out = magnitude.to_bits() | ((bits & 0x8000) << 16);
    if bits & 0x7C00 == 0x7C00 {
        out |= 0x7F80_0000;
    }
    f32::from_bits(out)
}

/// `Σ a[j]·b[j]` over one block of int8 values. Written as a plain loop
/// over fixed-size arrays so the compiler vectorizes it on any target.
#[inline(always)]
fn block_dot(a: &[i8; GROUP], b: &[i8; GROUP]) -> i32 {
    let mut sum = 0i32;
    for j in 0..GROUP {
        sum += a[j] as i32 * b[j] as i32;
    }
    sum
}

/// The 32 nibbles of a 4-bit block as int8, minus `zero`: value `j` from the
/// low nibble of byte `j`, value `j + 16` from its high nibble.
#[inline(always)]
fn unpack_nibbles(qs: &[u8; GROUP / 2], zero: i8) -> [i8; GROUP] {
    let mut out = [0i8; GROUP];
    for j in 0..GROUP / 2 {
        out[j] = (qs[j] & 0xF) as i8 - zero;
        out[j + GROUP / 2] = (qs[j] >> 4) as i8 - zero;
    }
    out
}

/// Integer dot product of one Q8 row with one activation.
pub fn dot_q8_q8(row: &[BlockQ8], x: &[BlockQ8Act]) -> f32 {
    dot_q8_q8_from(0.0, row, x)
}

/// [`dot_q8_q8`] added to a running `sum`, block by block.
#[inline(always)]
fn dot_q8_q8_from(mut sum: f32, row: &[BlockQ8], x: &[BlockQ8Act]) -> f32 {
    for (w, a) in row.iter().zip(x) {
        sum += f16_to_f32(w.d) * a.d * block_dot(&w.qs, &a.qs) as f32;
    }
    sum
}

/// Dot product of one asymmetric Q4 row with one activation:
/// Σ (d·n + m)·(dₓ·q) = d·dₓ·Σ n·q + m·(dₓ·Σq), the last factor being `s`.
pub fn dot_q4_q8(row: &[BlockQ4], x: &[BlockQ8Act]) -> f32 {
    dot_q4_q8_from(0.0, row, x)
}

/// [`dot_q4_q8`] added to a running `sum`, block by block.
#[inline(always)]
fn dot_q4_q8_from(mut sum: f32, row: &[BlockQ4], x: &[BlockQ8Act]) -> f32 {
    for (w, a) in row.iter().zip(x) {
        let isum = block_dot(&unpack_nibbles(&w.qs, 0), &a.qs);
        sum += f16_to_f32(w.d) * a.d * isum as f32 + f16_to_f32(w.m) * a.s;
    }
    sum
}

/// Dot product of one symmetric Q4 row with one activation.
pub fn dot_q4s_q8(row: &[BlockQ4S], x: &[BlockQ8Act]) -> f32 {
    dot_q4s_q8_from(0.0, row, x)
}

/// [`dot_q4s_q8`] added to a running `sum`, block by block.
#[inline(always)]
fn dot_q4s_q8_from(mut sum: f32, row: &[BlockQ4S], x: &[BlockQ8Act]) -> f32 {
    for (w, a) in row.iter().zip(x) {
        sum += f16_to_f32(w.d) * a.d * block_dot(&unpack_nibbles(&w.qs, 8), &a.qs) as f32;
    }
    sum
}

/// Dot product of one Q4B row with one activation, in units of the row's
/// scale: Q4's block term with the block's integer scale and minimum
/// ([`BlockQ4B::scale_and_minimum`]). The caller multiplies by the row scale.
fn dot_q4b_q8(row: &[BlockQ4B], x: &[BlockQ8Act]) -> f32 {
    dot_q4b_q8_from(0.0, row, x)
}

#[inline(always)]
fn dot_q4b_q8_from(mut sum: f32, row: &[BlockQ4B], x: &[BlockQ8Act]) -> f32 {
    for (w, a) in row.iter().zip(x) {
        let isum = block_dot(&unpack_nibbles(&w.qs, 0), &a.qs);
        let (d, m) = w.scale_and_minimum();
        sum += d * a.d * isum as f32 + m * a.s;
    }
    sum
}

/// `Σ a·b` with eight partial sums, so the loop vectorizes without
/// reassociating a single floating-point chain.
#[inline(always)]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut partial = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for k in 0..8 {
            partial[k] += x[k] * y[k];
        }
    }
    partial.iter().sum::<f32>() + tail
}

fn matmul_blocks<B>(
    weights: &[B],
    cols: usize,
    x: &[BlockQ8Act],
    out: &mut [f32],
    dot: fn(&[B], &[BlockQ8Act]) -> f32,
) {
    let blocks = cols / GROUP;
    let batch = x.len() / blocks;
    debug_assert_eq!(weights.len() / blocks * batch, out.len());
    for (row, outputs) in weights.chunks_exact(blocks).zip(out.chunks_exact_mut(batch)) {
        for (o, activation) in outputs.iter_mut().zip(x.chunks_exact(blocks)) {
            *o = dot(row, activation);
        }
    }
}

/// Q8 matrix × int8 activations.
pub fn matmul_q8(weights: &[BlockQ8], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_blocks(weights, cols, x, out, dot_q8_q8)
}
/// Asymmetric Q4 matrix × int8 activations.
pub fn matmul_q4(weights: &[BlockQ4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_blocks(weights, cols, x, out, dot_q4_q8)
}
/// Symmetric Q4 matrix × int8 activations.
pub fn matmul_q4s(weights: &[BlockQ4S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_blocks(weights, cols, x, out, dot_q4s_q8)
}
/// Q4B matrix × int8 activations, each row's sum in units of its row scale
/// (the caller multiplies by the scales).
pub fn matmul_q4b(weights: &[BlockQ4B], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_blocks(weights, cols, x, out, dot_q4b_q8)
}

/// Blocks of a row put back in row order at a time (on the stack: 64
/// blocks, at most 2.2 KiB).
const STAGED_BLOCKS: usize = 64;

/// Every group of interleaved rows ([`Interleaved::ROWS`]) against every
/// activation, for weight blocks of `VALUES` values (`VALUES / GROUP`
/// activation blocks each): `STAGED` of the group's blocks at a time are
/// put back into each row-major row in turn ([`Interleaved::row`]), then
/// the row goes through the row-major reference `dot` (continuing its
/// running sum from the previous piece), so the results are the row-major
/// reference's, bit for bit. Staging a whole piece before reading it keeps
/// the copies out of the loads' way. The reference of the q4x4 family and
/// of the k-quant x4 and x8 blocks alike.
pub(crate) fn matmul_interleaved<X: Interleaved, const VALUES: usize, const STAGED: usize>(
    weights: &[X],
    cols: usize,
    x: &[BlockQ8Act],
    out: &mut [f32],
    dot: fn(f32, &[X::Row], &[BlockQ8Act]) -> f32,
) {
    let per_block = VALUES / GROUP;
    assert!(cols > 0 && cols.is_multiple_of(VALUES), "{cols} columns are not whole blocks of {VALUES}");
    let (blocks, activation_blocks) = (cols / VALUES, cols / GROUP);
    let (groups, batch) = (weights.len() / blocks, x.len() / activation_blocks);
    assert!(
        weights.len() == groups * blocks
            && x.len() == batch * activation_blocks
            && out.len() == groups * X::ROWS * batch,
        "matmul shapes disagree: {} interleaved blocks, {} activation blocks, {} outputs, {cols} columns",
        weights.len(),
        x.len(),
        out.len()
    );
    if batch == 0 {
        return;
    }
    let mut staged = [X::Row::zeroed(); STAGED];
    for (group, outputs) in weights.chunks_exact(blocks).zip(out.chunks_exact_mut(X::ROWS * batch)) {
        outputs.fill(0.0);
        for first in (0..blocks).step_by(STAGED) {
            let n = STAGED.min(blocks - first);
            let piece = first * per_block..(first + n) * per_block;
            for r in 0..X::ROWS {
                for (row, block) in staged.iter_mut().zip(&group[first..first + n]) {
                    *row = block.row(r);
                }
                for (b, activation) in x.chunks_exact(activation_blocks).enumerate() {
                    let sum = &mut outputs[r * batch + b];
                    *sum = dot(*sum, &staged[..n], &activation[piece.clone()]);
                }
            }
        }
    }
}

/// Interleaved Q8 matrix × int8 activations.
pub fn matmul_q8x4(weights: &[BlockQ8x4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_interleaved::<_, GROUP, STAGED_BLOCKS>(weights, cols, x, out, dot_q8_q8_from)
}
/// Interleaved asymmetric Q4 matrix × int8 activations.
pub fn matmul_q4x4(weights: &[BlockQ4x4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_interleaved::<_, GROUP, STAGED_BLOCKS>(weights, cols, x, out, dot_q4_q8_from)
}
/// Interleaved symmetric Q4 matrix × int8 activations.
pub fn matmul_q4sx4(weights: &[BlockQ4Sx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_interleaved::<_, GROUP, STAGED_BLOCKS>(weights, cols, x, out, dot_q4s_q8_from)
}

/// Interleaved Q4B matrix × int8 activations, in units of the row scales.
pub fn matmul_q4bx4(weights: &[BlockQ4Bx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    matmul_interleaved::<_, GROUP, STAGED_BLOCKS>(weights, cols, x, out, dot_q4b_q8_from)
}

/// f16 matrix × f32 activations, accumulated in f32. Rows are widened to
/// f32 a piece at a time and reused for every activation of the batch.
pub fn matmul_f16(weights: &[f16], cols: usize, x: &[f32], out: &mut [f32]) {
    const PIECE: usize = 256;
    let batch = x.len() / cols;
    let mut widened = [0f32; PIECE];
    for (row, outputs) in weights.chunks_exact(cols).zip(out.chunks_exact_mut(batch)) {
        outputs.fill(0.0);
        for (p, piece) in row.chunks(PIECE).enumerate() {
            let w = &mut widened[..piece.len()];
            for (o, &v) in w.iter_mut().zip(piece) {
                *o = f16_to_f32(v);
            }
            for (b, o) in outputs.iter_mut().enumerate() {
                let start = b * cols + p * PIECE;
                *o += dot_f32(w, &x[start..start + piece.len()]);
            }
        }
    }
}

/// f32 matrix × f32 activations.
pub fn matmul_f32(weights: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
    for (row, outputs) in weights.chunks_exact(cols).zip(out.chunks_exact_mut(x.len() / cols)) {
        for (o, activation) in outputs.iter_mut().zip(x.chunks_exact(cols)) {
            *o = dot_f32(row, activation);
        }
    }
}
