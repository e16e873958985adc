//! Products of channel-major matrices (`crate::quant::to_channel_major`)
//! with one activation, over the input channels a mask marks: the exact
//! part of R-Sparse, `W (x ⊙ m)`, reading only the active channels' columns.
//!
//! The arithmetic is the row-major kernels', reordered: per column block
//! `b`, `out[r] += d[r]·dₓ·Σⱼ n[r][j]·q[j] + m[r]·s`, the integer sum over
//! the block's active channels only. With the inactive channels' activation
//! values zero (as the model quantizes `x ⊙ m`), that is exactly the dense
//! product of `x ⊙ m`; the scalar reference gives the row-major reference's
//! bits.
//!
//! Loop order: column blocks outermost (so each block's active channels are
//! found once), then tiles of rows, then the block's active channels. A
//! tile keeps one 16-bit sum per row: Q4C values are stored as `n − 8`, so a
//! product is at most 8·127 in magnitude and 32 of them fit in 16 bits;
//! `8·Σq` is added back in 32 bits before the scales.
//!
//! - [`scalar`]: the reference.
//! - `neon` (aarch64): one NEON version for the Cortex-A72 and the A76.
//!   There is no reduction axis for `sdot` here (each channel adds one
//!   product to every row), so widening multiply-accumulates by a
//!   broadcast activation value (`smlal`, 8 rows a step) serve both cores.

use crate::quant::{BlockQ8Act, ChannelBlock, Encoding, CHANNEL_TILE, GROUP};
use std::ops::Range;

/// `out[r − rows.start] = Σ_b` (block `b` of row `r`) · (block `b` of `x`)
/// for the rows `rows` (whole tiles of [`CHANNEL_TILE`]) of a channel-major
/// `weights` matrix of `total_rows × cols`, summing only the channels
/// `mask` marks (bit `j` of `mask[b]` is channel `32b + j`; `None`: all).
/// Channels the mask leaves out must be zero in `x`.
pub type MatmulChannels = fn(
    weights: &[u8],
    total_rows: usize,
    cols: usize,
    rows: Range<usize>,
    x: &[BlockQ8Act],
    mask: Option<&[u32]>,
    out: &mut [f32],
);

/// Checks the shapes every implementation relies on (its `unsafe` reads stay inside `weights`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn check(
    encoding: Encoding,
    weights: &[u8],
    total_rows: usize,
    cols: usize,
    rows: &Range<usize>,
    x: &[BlockQ8Act],
    mask: Option<&[u32]>,
    out: &[f32],
) {
    let blocks = cols / GROUP;
    assert!(
        cols.is_multiple_of(GROUP)
            && total_rows.is_multiple_of(CHANNEL_TILE)
            && weights.len() == encoding.bytes_for(total_rows * cols)
            && rows.start.is_multiple_of(CHANNEL_TILE)
            && rows.end.is_multiple_of(CHANNEL_TILE)
            && rows.start <= rows.end
            && rows.end <= total_rows
            && x.len() == blocks
            && mask.is_none_or(|m| m.len() >= blocks)
            && out.len() == rows.len(),
        "{} product shapes disagree: {} bytes for {total_rows} × {cols}, rows {rows:?}, {} activation blocks, {} outputs",
        encoding.name(),
        weights.len(),
        x.len(),
        out.len()
    );
}

/// The block's active channels: their positions `j` in the block and their
/// activation values, and `Σq` over them. Returns how many.
#[inline(always)]
fn active_channels(bits: u32, a: &BlockQ8Act, channels: &mut [usize; GROUP], values: &mut [i8; GROUP]) -> (usize, i32) {
    let (mut n, mut sum, mut bits) = (0, 0i32, bits);
    while bits != 0 {
        let j = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        channels[n] = j;
        values[n] = a.qs[j];
        sum += a.qs[j] as i32;
        n += 1;
    }
    (n, sum)
}

/// The frame of a product over column blocks: checks the shapes, zeroes
/// `out`, and calls `block(out, a, at, channels, values, Σq)` for each
/// column block with an active channel (`a` its activation block, `at` its
/// offsets, `channels`/`values` its active channels and their values).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn for_active_blocks(
    encoding: Encoding,
    weights: &[u8],
    total_rows: usize,
    cols: usize,
    rows: &Range<usize>,
    x: &[BlockQ8Act],
    mask: Option<&[u32]>,
    out: &mut [f32],
    mut block: impl FnMut(&mut [f32], &BlockQ8Act, &ChannelBlock, &[usize], &[i8], i32),
) {
    check(encoding, weights, total_rows, cols, rows, x, mask, out);
    out.fill(0.0);
    let (mut channels, mut values) = ([0usize; GROUP], [0i8; GROUP]);
    for (b, a) in x.iter().enumerate() {
        let (n, sum_q) = active_channels(mask.map_or(u32::MAX, |m| m[b]), a, &mut channels, &mut values);
        if n > 0 {
            block(out, a, &ChannelBlock::new(encoding, total_rows, b), &channels[..n], &values[..n], sum_q);
        }
    }
}

/// The f16 at byte `at` of `bytes`, as f32.
#[inline(always)]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    super::scalar::f16_to_f32(half::f16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

pub mod scalar {
    //! Reference loops.
    use super::*;

    /// Channel-major asymmetric Q4 ([`Encoding::Q4C`]).
    pub fn matmul_q4c(
        weights: &[u8],
        total_rows: usize,
        cols: usize,
        rows: Range<usize>,
        x: &[BlockQ8Act],
        mask: Option<&[u32]>,
        out: &mut [f32],
    ) {
        for_active_blocks(
            Encoding::Q4C,
            weights,
            total_rows,
            cols,
            &rows,
            x,
            mask,
            out,
            |out, a, at, channels, values, sum_q| {
                for tile in rows.clone().step_by(CHANNEL_TILE) {
                    let mut sums = [0i32; CHANNEL_TILE];
                    for (&j, &q) in channels.iter().zip(values) {
                        let column = &weights[at.columns + j * at.column_bytes + tile / 2..][..CHANNEL_TILE / 2];
                        for (k, &byte) in column.iter().enumerate() {
                            // Sign-extend the stored n − 8 from each nibble.
                            sums[k] += ((byte << 4) as i8 >> 4) as i32 * q as i32;
                            sums[k + 16] += (byte as i8 >> 4) as i32 * q as i32;
                        }
                    }
                    for (k, &sum) in sums.iter().enumerate() {
                        let r = tile + k;
                        let isum = sum + 8 * sum_q;
                        let (d, m) = (f16_at(weights, at.scales + 2 * r), f16_at(weights, at.mins + 2 * r));
                        out[r - rows.start] += d * a.d * isum as f32 + m * a.s;
                    }
                }
            },
        );
    }

    /// Channel-major Q8 ([`Encoding::Q8C`]).
    pub fn matmul_q8c(
        weights: &[u8],
        total_rows: usize,
        cols: usize,
        rows: Range<usize>,
        x: &[BlockQ8Act],
        mask: Option<&[u32]>,
        out: &mut [f32],
    ) {
        for_active_blocks(
            Encoding::Q8C,
            weights,
            total_rows,
            cols,
            &rows,
            x,
            mask,
            out,
            |out, a, at, channels, values, _| {
                for r in rows.clone() {
                    let mut isum = 0i32;
                    for (&j, &q) in channels.iter().zip(values) {
                        isum += weights[at.columns + j * at.column_bytes + r] as i8 as i32 * q as i32;
                    }
                    out[r - rows.start] += f16_at(weights, at.scales + 2 * r) * a.d * isum as f32;
                }
            },
        );
    }
}

#[cfg(target_arch = "aarch64")]
pub mod neon {
    //! NEON, ARMv8.0 (both Raspberry Pi cores).
    use super::super::neon::{widen_f16, widen_f16_high};
    use super::*;
    use std::arch::aarch64::*;
    use std::arch::asm;

    /// Column blocks whose active channels are gathered at once: the rows'
    /// results then stay in registers across these many blocks.
    const CHUNK_BLOCKS: usize = 16;

    /// The active channels of up to [`CHUNK_BLOCKS`] column blocks: each
    /// channel's column (a pointer to its first row) and activation value,
    /// and per block with any, its channels' range, `Σq` and offsets.
    struct Chunk {
        columns: [*const u8; CHUNK_BLOCKS * GROUP],
        values: [i8; CHUNK_BLOCKS * GROUP],
        blocks: [(usize, usize, i32, usize); CHUNK_BLOCKS], // (first channel, end, Σq, block index)
        n_blocks: usize,
    }

    /// Each row's 16-bit sum of its values times the activation values over
    /// `n` (≥ 1) channels, for `T` (1 or 2) tiles of rows starting at byte
    /// `offset` of each column: `[tile][rows 0–7, 8–15, 16–23, 24–31]`.
    /// One `asm!` loop (20 instructions a channel): the compiler splits
    /// `smlal2` into `ext` + `smlal` against a broadcast operand.
    ///
    /// # Safety
    /// `columns` and `values` have `n` entries, and each column holds
    /// `offset + 16·T` bytes.
    #[inline(always)]
    unsafe fn channel_sums<const T: usize>(
        columns: *const *const u8,
        values: *const i8,
        n: usize,
        offset: usize,
    ) -> [[int16x8_t; 4]; T] {
        let zero = vdupq_n_s16(0);
        let (mut s0, mut s1, mut s2, mut s3, mut s4, mut s5, mut s6, mut s7) =
            (zero, zero, zero, zero, zero, zero, zero, zero);
        // SAFETY: reads `n` pointers and values, and 16·T bytes at `offset`
        // of each column (caller's contract); registers otherwise.
        unsafe {
            if T == 2 {
                asm!(
                    "2:",
                    "ldr {p}, [{columns}], #8",
                    "ld1r {{{q:v}.16b}}, [{values}], #1",
                    "add {p}, {p}, {offset}",
                    "ldp {a:q}, {b:q}, [{p}]",
                    // Low nibbles: rows 0–15 of each tile; high: rows 16–31.
                    "shl {la:v}.16b, {a:v}.16b, #4",
                    "shl {lb:v}.16b, {b:v}.16b, #4",
                    "sshr {a:v}.16b, {a:v}.16b, #4",
                    "sshr {b:v}.16b, {b:v}.16b, #4",
                    "sshr {la:v}.16b, {la:v}.16b, #4",
                    "sshr {lb:v}.16b, {lb:v}.16b, #4",
                    "smlal {s0:v}.8h, {la:v}.8b, {q:v}.8b",
                    "smlal2 {s1:v}.8h, {la:v}.16b, {q:v}.16b",
                    "smlal {s2:v}.8h, {a:v}.8b, {q:v}.8b",
                    "smlal2 {s3:v}.8h, {a:v}.16b, {q:v}.16b",
                    "smlal {s4:v}.8h, {lb:v}.8b, {q:v}.8b",
                    "smlal2 {s5:v}.8h, {lb:v}.16b, {q:v}.16b",
                    "smlal {s6:v}.8h, {b:v}.8b, {q:v}.8b",
                    "smlal2 {s7:v}.8h, {b:v}.16b, {q:v}.16b",
                    "subs {n}, {n}, #1",
                    "b.ne 2b",
                    columns = inout(reg) columns => _,
                    values = inout(reg) values => _,
                    n = inout(reg) n => _,
                    offset = in(reg) offset,
                    p = out(reg) _,
                    q = out(vreg) _, a = out(vreg) _, b = out(vreg) _, la = out(vreg) _, lb = out(vreg) _,
                    s0 = inout(vreg) s0, s1 = inout(vreg) s1, s2 = inout(vreg) s2, s3 = inout(vreg) s3,
                    s4 = inout(vreg) s4, s5 = inout(vreg) s5, s6 = inout(vreg) s6, s7 = inout(vreg) s7,
                    options(nostack, readonly),
                );
            } else {
                asm!(
                    "2:",
                    "ldr {p}, [{columns}], #8",
                    "ld1r {{{q:v}.16b}}, [{values}], #1",
                    "ldr {a:q}, [{p}, {offset}]",
                    "shl {la:v}.16b, {a:v}.16b, #4",
                    "sshr {a:v}.16b, {a:v}.16b, #4",
                    "sshr {la:v}.16b, {la:v}.16b, #4",
                    "smlal {s0:v}.8h, {la:v}.8b, {q:v}.8b",
                    "smlal2 {s1:v}.8h, {la:v}.16b, {q:v}.16b",
                    "smlal {s2:v}.8h, {a:v}.8b, {q:v}.8b",
                    "smlal2 {s3:v}.8h, {a:v}.16b, {q:v}.16b",
                    "subs {n}, {n}, #1",
                    "b.ne 2b",
                    columns = inout(reg) columns => _,
                    values = inout(reg) values => _,
                    n = inout(reg) n => _,
                    offset = in(reg) offset,
                    p = out(reg) _,
                    q = out(vreg) _, a = out(vreg) _, la = out(vreg) _,
                    s0 = inout(vreg) s0, s1 = inout(vreg) s1, s2 = inout(vreg) s2, s3 = inout(vreg) s3,
                    options(nostack, readonly),
                );
            }
        }
        let all = [[s0, s1, s2, s3], [s4, s5, s6, s7]];
        std::array::from_fn(|t| all[t])
    }

    /// Adds the chunk's blocks' contributions for `T` tiles of rows from
    /// `first` to `out` (row `first` at `out[0]`), the results held in
    /// registers across the blocks.
    ///
    /// # Safety
    /// `weights` is a Q4C matrix of `total_rows` rows, the chunk's column
    /// pointers point into it at channels of its blocks, rows
    /// `first .. first + 32·T` exist, and `out` has `32·T` values.
    #[inline(always)]
    unsafe fn q4c_tiles<const T: usize>(
        weights: *const u8,
        total_rows: usize,
        chunk: &Chunk,
        x: &[BlockQ8Act],
        first: usize,
        out: *mut f32,
    ) {
        // SAFETY (whole body): the reads are inside the chunk's columns and
        // its blocks' scales for rows `first .. first + 32·T` (caller's
        // contract), the writes inside `out[..32·T]`.
        unsafe {
            let mut results = [[vdupq_n_f32(0.0); 8]; T];
            for (t, results) in results.iter_mut().enumerate() {
                for (e, r) in results.iter_mut().enumerate() {
                    *r = vld1q_f32(out.add(32 * t + 4 * e));
                }
            }
            for &(start, end, sum_q, b) in &chunk.blocks[..chunk.n_blocks] {
                let sums = channel_sums::<T>(
                    chunk.columns.as_ptr().add(start),
                    chunk.values.as_ptr().add(start),
                    end - start,
                    first / 2,
                );
                // results[r] += d·dₓ·(sum + 8·Σq) + m·s, four rows a vector.
                let at = ChannelBlock::new(Encoding::Q4C, total_rows, b);
                let (bias, dx, s) = (vdupq_n_s32(8 * sum_q), x[b].d, x[b].s);
                for (t, (sums, results)) in sums.iter().zip(results.iter_mut()).enumerate() {
                    for (e, &sum) in sums.iter().enumerate() {
                        let row = first + 32 * t + 8 * e;
                        let d = vld1q_u16(weights.add(at.scales + 2 * row) as *const u16);
                        let m = vld1q_u16(weights.add(at.mins + 2 * row) as *const u16);
                        let halves = [
                            (
                                vaddw_s16(bias, vget_low_s16(sum)),
                                widen_f16(vget_low_u16(d)),
                                widen_f16(vget_low_u16(m)),
                            ),
                            (vaddw_high_s16(bias, sum), widen_f16_high(d), widen_f16_high(m)),
                        ];
                        for (h, (isum, d, m)) in halves.into_iter().enumerate() {
                            let r = &mut results[2 * e + h];
                            *r = vfmaq_f32(*r, vmulq_n_f32(d, dx), vcvtq_f32_s32(isum));
                            *r = vfmaq_n_f32(*r, m, s);
                        }
                    }
                }
            }
            for (t, results) in results.iter().enumerate() {
                for (e, &r) in results.iter().enumerate() {
                    vst1q_f32(out.add(32 * t + 4 * e), r);
                }
            }
        }
    }

    /// Channel-major asymmetric Q4 ([`Encoding::Q4C`]): per chunk of column
    /// blocks, the active channels gathered once, then 64 rows a pass (32
    /// for an odd last tile), each row's 16-bit sum per block and f32
    /// result in registers.
    pub fn matmul_q4c(
        weights: &[u8],
        total_rows: usize,
        cols: usize,
        rows: Range<usize>,
        x: &[BlockQ8Act],
        mask: Option<&[u32]>,
        out: &mut [f32],
    ) {
        check(Encoding::Q4C, weights, total_rows, cols, &rows, x, mask, out);
        out.fill(0.0);
        let mut chunk = Chunk {
            columns: [std::ptr::null(); CHUNK_BLOCKS * GROUP],
            values: [0; CHUNK_BLOCKS * GROUP],
            blocks: [(0, 0, 0, 0); CHUNK_BLOCKS],
            n_blocks: 0,
        };
        let w = weights.as_ptr();
        for chunk_start in (0..x.len()).step_by(CHUNK_BLOCKS) {
            chunk.n_blocks = 0;
            let mut n = 0;
            for b in chunk_start..x.len().min(chunk_start + CHUNK_BLOCKS) {
                let (start, mut bits, mut sum_q) = (n, mask.map_or(u32::MAX, |m| m[b]), 0);
                let at = ChannelBlock::new(Encoding::Q4C, total_rows, b);
                while bits != 0 {
                    let j = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    // SAFETY: channel `j` of block `b` is inside `weights` (`check`).
                    chunk.columns[n] = unsafe { w.add(at.columns + j * at.column_bytes) };
                    chunk.values[n] = x[b].qs[j];
                    sum_q += x[b].qs[j] as i32;
                    n += 1;
                }
                if n > start {
                    chunk.blocks[chunk.n_blocks] = (start, n, sum_q, b);
                    chunk.n_blocks += 1;
                }
            }
            if chunk.n_blocks == 0 {
                continue;
            }
            let pass = 2 * CHANNEL_TILE;
            let mut first = rows.start;
            // SAFETY: `check` put every block and the rows `rows` (whole
            // tiles) inside `weights`, and gave `out` one value per row.
            unsafe {
                while first + pass <= rows.end {
                    q4c_tiles::<2>(w, total_rows, &chunk, x, first, out.as_mut_ptr().add(first - rows.start));
                    first += pass;
                }
                if first < rows.end {
                    q4c_tiles::<1>(w, total_rows, &chunk, x, first, out.as_mut_ptr().add(first - rows.start));
                }
            }
        }
    }

    /// Channel-major Q8 ([`Encoding::Q8C`]): 16 rows a step, the int8
    /// values widened to 16 bits and multiply-accumulated into 32-bit sums
    /// (`smlal` by the channel's value as a lane).
    pub fn matmul_q8c(
        weights: &[u8],
        total_rows: usize,
        cols: usize,
        rows: Range<usize>,
        x: &[BlockQ8Act],
        mask: Option<&[u32]>,
        out: &mut [f32],
    ) {
        for_active_blocks(
            Encoding::Q8C,
            weights,
            total_rows,
            cols,
            &rows,
            x,
            mask,
            out,
            |out, a, at, channels, values, _| {
                // SAFETY: `for_active_blocks` checked that the block and rows `rows` (whole tiles, so
                // whole steps of 16) inside `weights`, and `out` one value per row.
                unsafe {
                    let w = weights.as_ptr();
                    for first in rows.clone().step_by(16) {
                        let mut sums = [vdupq_n_s32(0); 4];
                        let base = w.add(at.columns + first);
                        for (&j, &value) in channels.iter().zip(values) {
                            let wide = vld1q_s8(base.add(j * at.column_bytes) as *const i8);
                            let q = vdup_n_s16(value as i16);
                            let (low, high) = (vmovl_s8(vget_low_s8(wide)), vmovl_high_s8(wide));
                            sums[0] = vmlal_s16(sums[0], vget_low_s16(low), q);
                            sums[1] = vmlal_high_s16(sums[1], low, vcombine_s16(q, q));
                            sums[2] = vmlal_s16(sums[2], vget_low_s16(high), q);
                            sums[3] = vmlal_high_s16(sums[3], high, vcombine_s16(q, q));
                        }
                        let d = [
                            vld1q_u16(w.add(at.scales + 2 * first) as *const u16),
                            vld1q_u16(w.add(at.scales + 2 * first + 16) as *const u16),
                        ];
                        let scales = [
                            widen_f16(vget_low_u16(d[0])),
                            widen_f16_high(d[0]),
                            widen_f16(vget_low_u16(d[1])),
                            widen_f16_high(d[1]),
                        ];
                        for (e, (sum, d)) in sums.into_iter().zip(scales).enumerate() {
                            let o = out.as_mut_ptr().add(first - rows.start + 4 * e);
                            let product = vmulq_f32(vmulq_n_f32(d, a.d), vcvtq_f32_s32(sum));
                            vst1q_f32(o, vaddq_f32(vld1q_f32(o), product));
                        }
                    }
                }
            },
        );
    }
}
