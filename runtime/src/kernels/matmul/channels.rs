//! Products of channel-major matrices (`crate::quant::to_channel_major`)
//! with one activation, over the input channels a mask marks: the exact
//! part of R-Sparse, `W (x ⊙ m)`, reading only the active channels' columns;
//! and with a batch of activations over every channel (a prompt, which
//! R-Sparse runs dense): the GEMM, [`GemmChannels`].
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
//!
//! The GEMM (every channel, a batch of tokens) loads and unpacks each
//! weight column once for a tile of tokens:
//! - `neon` (ARMv8.0, the Cortex-A72): a tile of 32 rows (one
//!   [`CHANNEL_TILE`]) × 6 or 4 tokens; Q4C as above, each column's nibbles
//!   split once and multiplied by every token's broadcast value into 16-bit
//!   sums (the `8·Σq` taken as `8·d·s` in float, which needs no sum of the
//!   token's values);
//!   Q8C 16 rows × 4 tokens, the values widened to 16 bits once and
//!   multiplied by each token's value as a lane (`smlal` by element) into
//!   32-bit sums.
//! - `dotprod` (the Cortex-A76): a tile's columns of up to eight blocks are
//!   first transposed onto the stack into 4 rows × 4 channels of int8 a
//!   vector (Q4C's nibbles made `n` again), the layout `sdot` by lane wants
//!   and the interleaved images store; then each four rows meet eight
//!   tokens, eight `sdot`s a token and block. The transposition costs once
//!   per tile and block for the whole batch.
//! - `avx2` (x86-64 hosts): a tile's block transposed into rows of 32
//!   channel bytes, then `vpmaddubsw` eight rows a token; the reference's
//!   bits, as the other AVX2 kernels.
use crate::quant::{BlockQ8Act, ChannelBlock, Encoding, CHANNEL_TILE, GROUP};
use std::ops::Range;

/// A channel-major matrix of `total_rows × cols` ([`Encoding::Q8C`] or
/// [`Encoding::Q4C`] bytes, laid out as [`ChannelBlock`] says), as the
/// channel kernels take it.
#[derive(Debug, Clone, Copy)]
pub struct ChannelMatrix<'a> {
    /// The stored bytes.
    pub weights: &'a [u8],
    /// Rows of the whole matrix (a call's `rows` are some of them).
    pub total_rows: usize,
    /// Columns (inputs), a multiple of 32.
    pub cols: usize,
}

/// `out[r − rows.start] = Σ_b` (block `b` of row `r`) · (block `b` of `x`)
/// for the rows `rows` (whole tiles of [`CHANNEL_TILE`]) of a channel-major
/// `weights` matrix of `total_rows × cols`, summing only the channels
/// `mask` marks (bit `j` of `mask[b]` is channel `32b + j`; `None`: all).
/// Channels the mask leaves out must be zero in `x`.
pub type MatmulChannels =
    fn(matrix: &ChannelMatrix, rows: Range<usize>, x: &[BlockQ8Act], mask: Option<&[u32]>, out: &mut [f32]);

/// Checks the shapes every implementation relies on (its `unsafe` reads stay inside `weights`).
#[inline(always)]
fn check(
    encoding: Encoding,
    matrix: &ChannelMatrix,
    rows: &Range<usize>,
    x: &[BlockQ8Act],
    mask: Option<&[u32]>,
    out: &[f32],
) {
    let ChannelMatrix { weights, total_rows, cols } = *matrix;
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

/// `out[t·n + r − rows.start] = W[r] · x[t]` (`n = rows.len()`) for every
/// row `r` in `rows` (whole tiles of [`CHANNEL_TILE`]) of a channel-major
/// `weights` matrix of `total_rows × cols` and every token `t` of a batch of
/// `x.len() / (cols / 32)` activations, over every channel. Tokens
/// outermost in `out`, so a thread's rows are one contiguous piece of it
/// and one thread over all rows writes the model's token-major layout.
pub type GemmChannels = fn(matrix: &ChannelMatrix, rows: Range<usize>, x: &[BlockQ8Act], out: &mut [f32]);

/// Checks a GEMM's shapes (its `unsafe` reads stay inside `weights`, `x`
/// and `out`); returns the batch.
#[inline(always)]
fn check_batch(
    encoding: Encoding,
    matrix: &ChannelMatrix,
    rows: &Range<usize>,
    x: &[BlockQ8Act],
    out: &[f32],
) -> usize {
    let ChannelMatrix { weights, total_rows, cols } = *matrix;
    let blocks = cols / GROUP;
    let batch = x.len() / blocks.max(1);
    assert!(
        blocks > 0
            && cols.is_multiple_of(GROUP)
            && total_rows.is_multiple_of(CHANNEL_TILE)
            && weights.len() == encoding.bytes_for(total_rows * cols)
            && rows.start.is_multiple_of(CHANNEL_TILE)
            && rows.end.is_multiple_of(CHANNEL_TILE)
            && rows.start <= rows.end
            && rows.end <= total_rows
            && x.len() == batch * blocks
            && out.len() == batch * rows.len(),
        "{} GEMM shapes disagree: {} bytes for {total_rows} × {cols}, rows {rows:?}, {} activation blocks, {} outputs",
        encoding.name(),
        weights.len(),
        x.len(),
        out.len()
    );
    batch
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
#[inline(always)]
fn for_active_blocks(
    encoding: Encoding,
    matrix: &ChannelMatrix,
    rows: &Range<usize>,
    x: &[BlockQ8Act],
    mask: Option<&[u32]>,
    out: &mut [f32],
    mut block: impl FnMut(&mut [f32], &BlockQ8Act, &ChannelBlock, &[usize], &[i8], i32),
) {
    let ChannelMatrix { total_rows, .. } = *matrix;
    check(encoding, matrix, rows, x, mask, out);
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
        matrix: &ChannelMatrix,
        rows: Range<usize>,
        x: &[BlockQ8Act],
        mask: Option<&[u32]>,
        out: &mut [f32],
    ) {
        let ChannelMatrix { weights, .. } = *matrix;
        for_active_blocks(Encoding::Q4C, matrix, &rows, x, mask, out, |out, a, at, channels, values, sum_q| {
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
        });
    }

    /// Channel-major Q8 ([`Encoding::Q8C`]).
    pub fn matmul_q8c(
        matrix: &ChannelMatrix,
        rows: Range<usize>,
        x: &[BlockQ8Act],
        mask: Option<&[u32]>,
        out: &mut [f32],
    ) {
        let ChannelMatrix { weights, .. } = *matrix;
        for_active_blocks(Encoding::Q8C, matrix, &rows, x, mask, out, |out, a, at, channels, values, _| {
            for r in rows.clone() {
                let mut isum = 0i32;
                for (&j, &q) in channels.iter().zip(values) {
                    isum += weights[at.columns + j * at.column_bytes + r] as i8 as i32 * q as i32;
                }
                out[r - rows.start] += f16_at(weights, at.scales + 2 * r) * a.d * isum as f32;
            }
        });
    }

    /// The GEMM over channel-major asymmetric Q4 ([`Encoding::Q4C`],
    /// [`GemmChannels`]): per tile of rows and column block, the values
    /// unpacked once (as `n`, the row-major blocks' nibbles) for every token.
    /// Each output is [`matmul_q4c`]'s sum for its token, in its order: the
    /// same bits.
    pub fn gemm_q4c(matrix: &ChannelMatrix, rows: Range<usize>, x: &[BlockQ8Act], out: &mut [f32]) {
        gemm(Encoding::Q4C, matrix, rows, x, out, |column, values| {
            for (k, &byte) in column[..CHANNEL_TILE / 2].iter().enumerate() {
                // Stored as n ^ 8: row k in the low nibble, row k + 16 in the high.
                values[k] = ((byte & 0xF) ^ 8) as i8;
                values[k + 16] = ((byte >> 4) ^ 8) as i8;
            }
        });
    }

    /// The GEMM over channel-major Q8 ([`Encoding::Q8C`], [`GemmChannels`]),
    /// [`matmul_q8c`]'s bits for every token.
    pub fn gemm_q8c(matrix: &ChannelMatrix, rows: Range<usize>, x: &[BlockQ8Act], out: &mut [f32]) {
        gemm(Encoding::Q8C, matrix, rows, x, out, |column, values| {
            for (v, &byte) in values.iter_mut().zip(&column[..CHANNEL_TILE]) {
                *v = byte as i8;
            }
        });
    }

    /// The reference GEMM's loops; `unpack(column, values)` writes one
    /// column's values for a tile's 32 rows (the column starting at the
    /// tile's first byte).
    #[inline(always)]
    fn gemm(
        encoding: Encoding,
        matrix: &ChannelMatrix,
        rows: Range<usize>,
        x: &[BlockQ8Act],
        out: &mut [f32],
        unpack: impl Fn(&[u8], &mut [i8; CHANNEL_TILE]),
    ) {
        let ChannelMatrix { weights, total_rows, cols } = *matrix;
        let batch = check_batch(encoding, matrix, &rows, x, out);
        let (blocks, n) = (cols / GROUP, rows.len());
        out.fill(0.0);
        // One tile's block, unpacked: [channel][row] values, each row's scale and minimum.
        let mut values = [[0i8; CHANNEL_TILE]; GROUP];
        let (mut d, mut m) = ([0f32; CHANNEL_TILE], [0f32; CHANNEL_TILE]);
        for tile in rows.clone().step_by(CHANNEL_TILE) {
            for b in 0..blocks {
                let at = ChannelBlock::new(encoding, total_rows, b);
                let first_byte = tile * at.column_bytes / total_rows;
                for (j, values) in values.iter_mut().enumerate() {
                    unpack(&weights[at.columns + j * at.column_bytes + first_byte..], values);
                }
                for k in 0..CHANNEL_TILE {
                    d[k] = f16_at(weights, at.scales + 2 * (tile + k));
                    m[k] = if encoding == Encoding::Q4C { f16_at(weights, at.mins + 2 * (tile + k)) } else { 0.0 };
                }
                for t in 0..batch {
                    let a = &x[t * blocks + b];
                    let mut sums = [0i32; CHANNEL_TILE];
                    for (column, &q) in values.iter().zip(&a.qs) {
                        for (sum, &v) in sums.iter_mut().zip(column) {
                            *sum += v as i32 * q as i32;
                        }
                    }
                    let out = &mut out[t * n + tile - rows.start..][..CHANNEL_TILE];
                    for (k, (o, &isum)) in out.iter_mut().zip(&sums).enumerate() {
                        // The one-token kernels' expressions, term for term.
                        *o += match encoding {
                            Encoding::Q4C => d[k] * a.d * isum as f32 + m[k] * a.s,
                            _ => d[k] * a.d * isum as f32,
                        };
                    }
                }
            }
        }
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
        // SAFETY: (whole body) the reads are inside the chunk's columns and
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
        matrix: &ChannelMatrix,
        rows: Range<usize>,
        x: &[BlockQ8Act],
        mask: Option<&[u32]>,
        out: &mut [f32],
    ) {
        let ChannelMatrix { weights, total_rows, .. } = *matrix;
        check(Encoding::Q4C, matrix, &rows, x, mask, out);
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
        matrix: &ChannelMatrix,
        rows: Range<usize>,
        x: &[BlockQ8Act],
        mask: Option<&[u32]>,
        out: &mut [f32],
    ) {
        let ChannelMatrix { weights, .. } = *matrix;
        for_active_blocks(Encoding::Q8C, matrix, &rows, x, mask, out, |out, a, at, channels, values, _| {
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
        });
    }

    /// Tokens an ARMv8.0 Q8C tile takes: four 32-bit sums a token, sixteen
    /// registers. (Q4C tiles take six tokens, 24 registers of 16-bit sums,
    /// then four: [`tiles_of_six`].)
    const TOKENS: usize = 4;

    /// `smlal2 acc.8h, w.16b, q.16b`: the high eight lanes' products. An
    /// instruction, because the compiler turns `vmlal_high_s8` against a
    /// broadcast `q` into `ext` + `smlal`.
    #[inline(always)]
    fn smlal2(acc: int16x8_t, w: int8x16_t, q: int8x16_t) -> int16x8_t {
        let mut acc = acc;
        // SAFETY: registers only; NEON is part of every aarch64 target.
        unsafe {
            asm!("smlal2 {acc:v}.8h, {w:v}.16b, {q:v}.16b", acc = inout(vreg) acc, w = in(vreg) w, q = in(vreg) q,
                 options(pure, nomem, nostack, preserves_flags));
        }
        acc
    }

    /// Runs `four(t)` for tiles of [`TOKENS`] tokens from `t`, then `one(t)`
    /// for each token left.
    #[inline(always)]
    fn for_token_tiles(batch: usize, mut four: impl FnMut(usize), mut one: impl FnMut(usize)) {
        let mut t = 0;
        while t + TOKENS <= batch {
            four(t);
            t += TOKENS;
        }
        for t in t..batch {
            one(t);
        }
    }

    /// One token's products in [`q4c_channel_loop`]: its values at the two
    /// channels broadcast (`ld2r` into v30 and v31, the pointer `{$t}` moved
    /// on by two channels), times each channel's 32 rows into the token's
    /// four 16-bit sums `{$s0}`…`{$s3}`.
    #[rustfmt::skip]
    macro_rules! q4c_token {
        ($t:literal, $s:literal) => { concat!(
            "ld2r {{v30.16b, v31.16b}}, [{", $t, "}], #2\n",
            "smlal {", $s, "0:v}.8h, {low0:v}.8b, v30.8b\n",
            "smlal2 {", $s, "1:v}.8h, {low0:v}.16b, v30.16b\n",
            "smlal {", $s, "2:v}.8h, {high0:v}.8b, v30.8b\n",
            "smlal2 {", $s, "3:v}.8h, {high0:v}.16b, v30.16b\n",
            "smlal {", $s, "0:v}.8h, {low1:v}.8b, v31.8b\n",
            "smlal2 {", $s, "1:v}.8h, {low1:v}.16b, v31.16b\n",
            "smlal {", $s, "2:v}.8h, {high1:v}.8b, v31.8b\n",
            "smlal2 {", $s, "3:v}.8h, {high1:v}.16b, v31.16b\n",
        )};
    }

    /// The loop over a block's 32 channels, two at a time (`{n}` = 16):
    /// each channel's 16 bytes loaded (`{column}` moved on by
    /// `{column_bytes}`) and split into low nibbles (rows 0–15, `{low0}`,
    /// `{low1}`) and high (rows 16–31, `{high0}`, `{high1}`),
    /// sign-extended, then the tokens' products ([`q4c_token`]).
    #[rustfmt::skip]
    macro_rules! q4c_channel_loop {
        ($($token:expr),*) => { concat!(
            "2:\n",
            "ld1 {{{high0:v}.16b}}, [{column}], {column_bytes}\n",
            "ld1 {{{high1:v}.16b}}, [{column}], {column_bytes}\n",
            "shl {low0:v}.16b, {high0:v}.16b, #4\n",
            "shl {low1:v}.16b, {high1:v}.16b, #4\n",
            "sshr {high0:v}.16b, {high0:v}.16b, #4\n",
            "sshr {high1:v}.16b, {high1:v}.16b, #4\n",
            "sshr {low0:v}.16b, {low0:v}.16b, #4\n",
            "sshr {low1:v}.16b, {low1:v}.16b, #4\n",
            $($token,)*
            "subs {n}, {n}, #1\n",
            "b.ne 2b\n",
        )};
    }

    /// The 16-bit sums of one column block's 32 channels for a tile of 32
    /// rows and `T` tokens: `[token][rows 0–7, 8–15, 16–23, 24–31]`. Each
    /// channel's 16 bytes are split once (low nibbles rows 0–15, high
    /// 16–31, sign-extended from `n − 8`), then multiplied by each token's
    /// broadcast value. Six and four tokens run as one `asm!` loop over
    /// pairs of channels (64 and 44 instructions a pair: each token's two
    /// values broadcast by one `ld2r`, the pointers post-incremented),
    /// others as intrinsics.
    ///
    /// # Safety
    /// `columns` points at the tile's first byte of the block's first
    /// column, 32 columns `column_bytes` apart, 16 readable bytes each.
    #[inline(always)]
    unsafe fn q4c_sums<const T: usize>(
        columns: *const i8,
        column_bytes: usize,
        tokens: &[&BlockQ8Act; T],
    ) -> [[int16x8_t; 4]; T] {
        let zero = vdupq_n_s16(0);
        let mut sums = [[zero; 4]; T];
        if T == 6 {
            let [a, b, c, d, e, f] = &mut [[zero; 4]; 6];
            // SAFETY: reads 16 bytes of each of the 32 columns and the 32
            // values of each token's block (caller's contract); registers
            // otherwise.
            unsafe {
                asm!(
                    q4c_channel_loop!(
                        q4c_token!("t0", "a"),
                        q4c_token!("t1", "b"),
                        q4c_token!("t2", "c"),
                        q4c_token!("t3", "d"),
                        q4c_token!("t4", "e"),
                        q4c_token!("t5", "f")
                    ),
                    column = inout(reg) columns => _,
                    column_bytes = in(reg) column_bytes,
                    t0 = inout(reg) tokens[0].qs.as_ptr() => _,
                    t1 = inout(reg) tokens[1].qs.as_ptr() => _,
                    t2 = inout(reg) tokens[2].qs.as_ptr() => _,
                    t3 = inout(reg) tokens[3].qs.as_ptr() => _,
                    t4 = inout(reg) tokens[4].qs.as_ptr() => _,
                    t5 = inout(reg) tokens[5].qs.as_ptr() => _,
                    n = inout(reg) GROUP / 2 => _,
                    high0 = out(vreg) _, low0 = out(vreg) _, high1 = out(vreg) _, low1 = out(vreg) _,
                    out("v30") _, out("v31") _,
                    a0 = inout(vreg) a[0], a1 = inout(vreg) a[1], a2 = inout(vreg) a[2], a3 = inout(vreg) a[3],
                    b0 = inout(vreg) b[0], b1 = inout(vreg) b[1], b2 = inout(vreg) b[2], b3 = inout(vreg) b[3],
                    c0 = inout(vreg) c[0], c1 = inout(vreg) c[1], c2 = inout(vreg) c[2], c3 = inout(vreg) c[3],
                    d0 = inout(vreg) d[0], d1 = inout(vreg) d[1], d2 = inout(vreg) d[2], d3 = inout(vreg) d[3],
                    e0 = inout(vreg) e[0], e1 = inout(vreg) e[1], e2 = inout(vreg) e[2], e3 = inout(vreg) e[3],
                    f0 = inout(vreg) f[0], f1 = inout(vreg) f[1], f2 = inout(vreg) f[2], f3 = inout(vreg) f[3],
                    options(nostack, readonly),
                );
            }
            let all = [*a, *b, *c, *d, *e, *f];
            return std::array::from_fn(|t| all[t]);
        }
        if T == 4 {
            let [a, b, c, d] = &mut [[zero; 4]; 4];
            // SAFETY: as above.
            unsafe {
                asm!(
                    q4c_channel_loop!(
                        q4c_token!("t0", "a"),
                        q4c_token!("t1", "b"),
                        q4c_token!("t2", "c"),
                        q4c_token!("t3", "d")
                    ),
                    column = inout(reg) columns => _,
                    column_bytes = in(reg) column_bytes,
                    t0 = inout(reg) tokens[0].qs.as_ptr() => _,
                    t1 = inout(reg) tokens[1].qs.as_ptr() => _,
                    t2 = inout(reg) tokens[2].qs.as_ptr() => _,
                    t3 = inout(reg) tokens[3].qs.as_ptr() => _,
                    n = inout(reg) GROUP / 2 => _,
                    high0 = out(vreg) _, low0 = out(vreg) _, high1 = out(vreg) _, low1 = out(vreg) _,
                    out("v30") _, out("v31") _,
                    a0 = inout(vreg) a[0], a1 = inout(vreg) a[1], a2 = inout(vreg) a[2], a3 = inout(vreg) a[3],
                    b0 = inout(vreg) b[0], b1 = inout(vreg) b[1], b2 = inout(vreg) b[2], b3 = inout(vreg) b[3],
                    c0 = inout(vreg) c[0], c1 = inout(vreg) c[1], c2 = inout(vreg) c[2], c3 = inout(vreg) c[3],
                    d0 = inout(vreg) d[0], d1 = inout(vreg) d[1], d2 = inout(vreg) d[2], d3 = inout(vreg) d[3],
                    options(nostack, readonly),
                );
            }
            let all = [*a, *b, *c, *d];
            return std::array::from_fn(|t| all[t]);
        }
        for j in 0..GROUP {
            // SAFETY: 16 bytes of column `j` (caller's contract).
            let v = unsafe { vld1q_s8(columns.add(j * column_bytes)) };
            let (low, high) = (vshrq_n_s8::<4>(vshlq_n_s8::<4>(v)), vshrq_n_s8::<4>(v));
            for (sums, a) in sums.iter_mut().zip(tokens) {
                // SAFETY: `a.qs[j]` is one readable byte.
                let q = unsafe { vld1q_dup_s8(&a.qs[j]) };
                sums[0] = vmlal_s8(sums[0], vget_low_s8(low), vget_low_s8(q));
                sums[1] = smlal2(sums[1], low, q);
                sums[2] = vmlal_s8(sums[2], vget_low_s8(high), vget_low_s8(q));
                sums[3] = smlal2(sums[3], high, q);
            }
        }
        sums
    }

    /// Adds one token's block to its 32 results (`results[k]` for the
    /// tile's row `k`): `d·dₓ·Σ + (m + 8·d)·s`, four rows a vector, from
    /// the token's 16-bit sums of `(n − 8)·q` (`sums`, rows 0–7, 8–15,
    /// 16–23, 24–31), the rows' scales `d` and `m + 8·d` (`m8`), and the
    /// token's `dₓ` and `s = dₓ·Σq`. (`8·d·s` stands for `d·dₓ·8·Σq`, one
    /// rounding apart, and costs no sum of the token's values.)
    ///
    /// # Safety
    /// `results` points at 32 readable and writable values.
    #[inline(always)]
    unsafe fn q4c_finish(
        sums: &[int16x8_t; 4],
        d: &[float32x4_t; 8],
        m8: &[float32x4_t; 8],
        (dx, s): (f32, f32),
        results: *mut f32,
    ) {
        for (e, &sum) in sums.iter().enumerate() {
            for (h, isum) in [vmovl_s16(vget_low_s16(sum)), vmovl_high_s16(sum)].into_iter().enumerate() {
                let quad = 2 * e + h;
                // SAFETY: four of the 32 results (caller's contract).
                unsafe {
                    let r = results.add(4 * quad);
                    let sum = vfmaq_n_f32(vld1q_f32(r), vmulq_f32(vcvtq_f32_s32(isum), d[quad]), dx);
                    vst1q_f32(r, vfmaq_n_f32(sum, m8[quad], s));
                }
            }
        }
    }

    /// Adds `T` tokens' products with one tile of 32 rows of a Q4C matrix to
    /// their results, `out[t·n + k]` for the tile's row `k`: per column
    /// block, the 16-bit sums of every channel ([`q4c_sums`]), then the
    /// block scaled into the results ([`q4c_finish`]).
    ///
    /// # Safety
    /// `weights` is a Q4C matrix of `total_rows` rows and `blocks` column
    /// blocks with rows `first .. first + 32`; `x` points at `T` tokens'
    /// activations, `blocks` blocks apart; `out` at `T` runs of 32 results,
    /// `n` apart.
    #[inline(always)]
    unsafe fn q4c_gemm_tile<const T: usize>(
        weights: *const u8,
        total_rows: usize,
        blocks: usize,
        first: usize,
        x: *const BlockQ8Act,
        out: *mut f32,
        n: usize,
    ) {
        const { assert!(T <= 6) };
        // SAFETY: (whole body) reads inside the tile's columns, scales and
        // minimums and the tokens' blocks, writes inside the `T` runs of
        // `out` (caller's contract).
        unsafe {
            for b in 0..blocks {
                let at = ChannelBlock::new(Encoding::Q4C, total_rows, b);
                let columns = weights.add(at.columns + first / 2) as *const i8;
                let tokens: [&BlockQ8Act; T] = std::array::from_fn(|t| &*x.add(t * blocks + b));
                // Each token's dₓ and s, read before any result is written.
                let scales: [(f32, f32); T] = tokens.map(|a| (a.d, a.s));
                let sums = q4c_sums(columns, at.column_bytes, &tokens);
                // The 32 rows' scales and m + 8·d, four rows a vector.
                let (mut d, mut m8) = ([vdupq_n_f32(0.0); 8], [vdupq_n_f32(0.0); 8]);
                for h in 0..4 {
                    let (dh, mh) = (
                        vld1q_u16(weights.add(at.scales + 2 * (first + 8 * h)) as *const u16),
                        vld1q_u16(weights.add(at.mins + 2 * (first + 8 * h)) as *const u16),
                    );
                    (d[2 * h], d[2 * h + 1]) = (widen_f16(vget_low_u16(dh)), widen_f16_high(dh));
                    m8[2 * h] = vfmaq_n_f32(widen_f16(vget_low_u16(mh)), d[2 * h], 8.0);
                    m8[2 * h + 1] = vfmaq_n_f32(widen_f16_high(mh), d[2 * h + 1], 8.0);
                }
                // Written out token by token (`t < T` is decided at compile
                // time): as a loop the compiler keeps the sums in memory.
                macro_rules! tokens {
                    ($($t:literal)*) => {$(
                        if $t < T {
                            q4c_finish(&sums[$t], &d, &m8, scales[$t], out.add($t * n));
                        }
                    )*};
                }
                tokens!(0 1 2 3 4 5);
            }
        }
    }

    /// How many tiles of six tokens a Q4C batch takes before its tiles of
    /// four: as many as leave a multiple of four (32 = 4·6 + 2·4), else as
    /// many as fit.
    fn tiles_of_six(batch: usize) -> usize {
        (0..=batch / 6).rev().find(|six| (batch - 6 * six).is_multiple_of(4)).unwrap_or(batch / 6)
    }

    /// The GEMM over channel-major asymmetric Q4 ([`Encoding::Q4C`],
    /// [`GemmChannels`]), ARMv8.0: tiles of 32 rows × 6 tokens, then 4
    /// ([`tiles_of_six`]), then one by one (`q4c_gemm_tile`).
    pub fn gemm_q4c(matrix: &ChannelMatrix, rows: Range<usize>, x: &[BlockQ8Act], out: &mut [f32]) {
        let ChannelMatrix { weights, total_rows, cols } = *matrix;
        let batch = check_batch(Encoding::Q4C, matrix, &rows, x, out);
        let (blocks, n) = (cols / GROUP, rows.len());
        out.fill(0.0);
        let (w, results) = (weights.as_ptr(), out.as_mut_ptr());
        let sixes = tiles_of_six(batch);
        let fours = (batch - 6 * sixes) / 4;
        for first in rows.clone().step_by(CHANNEL_TILE) {
            let tile = |t: usize, tokens: usize| {
                let (x, out) = (x.as_ptr().wrapping_add(t * blocks), results.wrapping_add(t * n + first - rows.start));
                // SAFETY: `check_batch` put the tile's rows and every block
                // inside `weights`, `batch` tokens in `x` and `batch` runs of
                // `n` results in `out`; tokens `t .. t + tokens ≤ batch`.
                unsafe {
                    match tokens {
                        6 => q4c_gemm_tile::<6>(w, total_rows, blocks, first, x, out, n),
                        4 => q4c_gemm_tile::<4>(w, total_rows, blocks, first, x, out, n),
                        _ => q4c_gemm_tile::<1>(w, total_rows, blocks, first, x, out, n),
                    }
                }
            };
            (0..sixes).for_each(|i| tile(6 * i, 6));
            (0..fours).for_each(|i| tile(6 * sixes + 4 * i, 4));
            (6 * sixes + 4 * fours..batch).for_each(|t| tile(t, 1));
        }
    }

    /// One channel `j` (lane `L` of the tokens' 16-bit values `a`) of a Q8C
    /// GEMM tile: its 16 rows widened once, each token's value by lane
    /// (`smlal` by element) into the rows' 32-bit sums.
    ///
    /// # Safety
    /// `column` points at 16 readable bytes.
    #[inline(always)]
    unsafe fn q8c_channel<const L: i32, const T: usize>(
        column: *const i8,
        a: &[int16x8_t; T],
        sums: &mut [[int32x4_t; 4]; T],
    ) {
        // SAFETY: 16 bytes at `column` (caller's contract).
        let v = unsafe { vld1q_s8(column) };
        let (low, high) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
        for (sums, &a) in sums.iter_mut().zip(a) {
            sums[0] = vmlal_laneq_s16::<L>(sums[0], vget_low_s16(low), a);
            sums[1] = vmlal_high_laneq_s16::<L>(sums[1], low, a);
            sums[2] = vmlal_laneq_s16::<L>(sums[2], vget_low_s16(high), a);
            sums[3] = vmlal_high_laneq_s16::<L>(sums[3], high, a);
        }
    }

    /// Adds `T` tokens' products with 16 rows from `first` of a Q8C matrix
    /// to their results, `out[t·n + k]` for row `first + k`: per column
    /// block, eight channels at a time, each token's eight values widened
    /// to 16 bits once and each channel's 16 rows once (`q8c_channel`).
    ///
    /// # Safety
    /// `weights` is a Q8C matrix of `total_rows` rows and `blocks` column
    /// blocks with rows `first .. first + 16`; `x` points at `T` tokens'
    /// activations, `blocks` blocks apart; `out` at `T` runs of 16 results,
    /// `n` apart.
    #[inline(always)]
    unsafe fn q8c_gemm_tile<const T: usize>(
        weights: *const u8,
        total_rows: usize,
        blocks: usize,
        first: usize,
        x: *const BlockQ8Act,
        out: *mut f32,
        n: usize,
    ) {
        // SAFETY: (whole body) reads inside the 16 rows' columns and scales
        // and the tokens' blocks, writes inside the `T` runs of `out`
        // (caller's contract).
        unsafe {
            for b in 0..blocks {
                let at = ChannelBlock::new(Encoding::Q8C, total_rows, b);
                let columns = weights.add(at.columns + first) as *const i8;
                let tokens: [&BlockQ8Act; T] = std::array::from_fn(|t| &*x.add(t * blocks + b));
                let mut sums = [[vdupq_n_s32(0); 4]; T];
                for eight in 0..GROUP / 8 {
                    let a = tokens.map(|a| vmovl_s8(vld1_s8(a.qs.as_ptr().add(8 * eight))));
                    let column = |lane: usize| columns.add((8 * eight + lane) * at.column_bytes);
                    q8c_channel::<0, T>(column(0), &a, &mut sums);
                    q8c_channel::<1, T>(column(1), &a, &mut sums);
                    q8c_channel::<2, T>(column(2), &a, &mut sums);
                    q8c_channel::<3, T>(column(3), &a, &mut sums);
                    q8c_channel::<4, T>(column(4), &a, &mut sums);
                    q8c_channel::<5, T>(column(5), &a, &mut sums);
                    q8c_channel::<6, T>(column(6), &a, &mut sums);
                    q8c_channel::<7, T>(column(7), &a, &mut sums);
                }
                let scales = [
                    vld1q_u16(weights.add(at.scales + 2 * first) as *const u16),
                    vld1q_u16(weights.add(at.scales + 2 * first + 16) as *const u16),
                ];
                let d = [
                    widen_f16(vget_low_u16(scales[0])),
                    widen_f16_high(scales[0]),
                    widen_f16(vget_low_u16(scales[1])),
                    widen_f16_high(scales[1]),
                ];
                for (t, (sums, a)) in sums.iter().zip(&tokens).enumerate() {
                    for (quad, (&isum, &d)) in sums.iter().zip(&d).enumerate() {
                        // results += d·dₓ·Σ, four rows.
                        let r = out.add(t * n + 4 * quad);
                        vst1q_f32(r, vfmaq_n_f32(vld1q_f32(r), vmulq_f32(vcvtq_f32_s32(isum), d), a.d));
                    }
                }
            }
        }
    }

    /// The GEMM over channel-major Q8 ([`Encoding::Q8C`], [`GemmChannels`]),
    /// ARMv8.0: tiles of 16 rows × [`TOKENS`] tokens (`q8c_gemm_tile`).
    pub fn gemm_q8c(matrix: &ChannelMatrix, rows: Range<usize>, x: &[BlockQ8Act], out: &mut [f32]) {
        let ChannelMatrix { weights, total_rows, cols } = *matrix;
        let batch = check_batch(Encoding::Q8C, matrix, &rows, x, out);
        let (blocks, n) = (cols / GROUP, rows.len());
        out.fill(0.0);
        let (w, results) = (weights.as_ptr(), out.as_mut_ptr());
        for first in rows.clone().step_by(16) {
            let row = first - rows.start;
            // SAFETY: `check_batch` put the rows (whole tiles, so whole
            // sixteens) and every block inside `weights`, `batch` tokens in
            // `x` and `batch` runs of `n` results in `out`; tiles stop at `batch`.
            for_token_tiles(
                batch,
                |t| unsafe {
                    q8c_gemm_tile::<TOKENS>(
                        w,
                        total_rows,
                        blocks,
                        first,
                        x.as_ptr().add(t * blocks),
                        results.add(t * n + row),
                        n,
                    )
                },
                // SAFETY: as above.
                |t| unsafe {
                    q8c_gemm_tile::<1>(
                        w,
                        total_rows,
                        blocks,
                        first,
                        x.as_ptr().add(t * blocks),
                        results.add(t * n + row),
                        n,
                    )
                },
            );
        }
    }
}

/// The GEMM with the dot-product extension (`sdot`, the Cortex-A76).
#[cfg(target_arch = "aarch64")]
pub mod dotprod {
    use super::super::dotprod::available;
    use super::super::neon::{widen_f16, widen_f16_high};
    use super::*;
    use std::arch::aarch64::*;
    use std::arch::asm;

    /// Column blocks of a tile transposed at a time, at most (a [`Panel`],
    /// 20 KiB of stack); the results are loaded and stored once a run.
    const PANEL_BLOCKS: usize = 16;
    /// Groups of four rows in a tile.
    const QUADS: usize = CHANNEL_TILE / 4;
    /// Groups of four channels in a block: one `sdot` each.
    const GROUPS: usize = GROUP / 4;
    /// Tokens a micro-kernel takes; the rest go four, two and one at a time.
    const TOKENS: usize = 8;

    /// One tile's weights for up to [`PANEL_BLOCKS`] column blocks, in the
    /// layout `sdot` by lane multiplies: `values[block][quad][group]` holds
    /// rows `4·quad .. +4` of the tile at channels `4·group .. +4`, row by
    /// row (the values `n`, int8); `scales[block][quad]` those four rows'
    /// scales and (Q4C) minimums as f32.
    struct Panel {
        values: [[[int8x16_t; GROUPS]; QUADS]; PANEL_BLOCKS],
        scales: [[[float32x4_t; 2]; QUADS]; PANEL_BLOCKS],
    }

    /// Four columns' 16 bytes each (rows `k`) to four vectors of four rows
    /// × four columns: vector `i` holds bytes `4i .. 4i+4` of each column,
    /// column by column within a row.
    #[inline(always)]
    fn transpose(c: [uint8x16_t; 4]) -> [uint8x16_t; 4] {
        // SAFETY: registers only; NEON is part of every aarch64 target.
        unsafe {
            // Pairs of columns byte by byte, then the pairs two bytes at a time.
            let (ab_low, ab_high) = (vzip1q_u8(c[0], c[1]), vzip2q_u8(c[0], c[1]));
            let (cd_low, cd_high) = (vzip1q_u8(c[2], c[3]), vzip2q_u8(c[2], c[3]));
            let zip = |ab: uint8x16_t, cd: uint8x16_t| {
                let (ab, cd) = (vreinterpretq_u16_u8(ab), vreinterpretq_u16_u8(cd));
                (vreinterpretq_u8_u16(vzip1q_u16(ab, cd)), vreinterpretq_u8_u16(vzip2q_u16(ab, cd)))
            };
            let ((q0, q1), (q2, q3)) = (zip(ab_low, cd_low), zip(ab_high, cd_high));
            [q0, q1, q2, q3]
        }
    }

    /// Transposes block `b` of the tile from row `first` of a Q4C matrix
    /// into `values`/`scales` (a [`Panel`]'s block): the stored `n ^ 8`
    /// back to `n` (0–15), low nibbles to quads 0–3, high to 4–7.
    ///
    /// # Safety
    /// `weights` is a Q4C matrix of `total_rows` rows with block `b` and rows
    /// `first .. first + 32`.
    #[inline(always)]
    unsafe fn pack_q4c(
        weights: *const u8,
        total_rows: usize,
        first: usize,
        b: usize,
        values: &mut [[int8x16_t; GROUPS]; QUADS],
        scales: &mut [[float32x4_t; 2]; QUADS],
    ) {
        let at = ChannelBlock::new(Encoding::Q4C, total_rows, b);
        // SAFETY: (whole body) reads the tile's 16 bytes of each of the
        // block's columns and its 32 rows' scales and minimums (caller's
        // contract).
        unsafe {
            let columns = weights.add(at.columns + first / 2);
            let (flip, nibble) = (vdupq_n_u8(0x88), vdupq_n_u8(0x0F));
            // `g` picks four columns and every quad's vector for them.
            #[allow(clippy::needless_range_loop)]
            for g in 0..GROUPS {
                let c: [uint8x16_t; 4] = std::array::from_fn(|k| vld1q_u8(columns.add((4 * g + k) * at.column_bytes)));
                for (i, q) in transpose(c).into_iter().enumerate() {
                    let n = veorq_u8(q, flip);
                    values[i][g] = vreinterpretq_s8_u8(vandq_u8(n, nibble));
                    values[i + 4][g] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(n));
                }
            }
            for h in 0..CHANNEL_TILE / 8 {
                let d = vld1q_u16(weights.add(at.scales + 2 * (first + 8 * h)) as *const u16);
                let m = vld1q_u16(weights.add(at.mins + 2 * (first + 8 * h)) as *const u16);
                scales[2 * h] = [widen_f16(vget_low_u16(d)), widen_f16(vget_low_u16(m))];
                scales[2 * h + 1] = [widen_f16_high(d), widen_f16_high(m)];
            }
        }
    }

    /// As [`pack_q4c`] for Q8C: rows 0–15 to quads 0–3, 16–31 to 4–7.
    ///
    /// # Safety
    /// `weights` is a Q8C matrix of `total_rows` rows with block `b` and rows
    /// `first .. first + 32`.
    #[inline(always)]
    unsafe fn pack_q8c(
        weights: *const u8,
        total_rows: usize,
        first: usize,
        b: usize,
        values: &mut [[int8x16_t; GROUPS]; QUADS],
        scales: &mut [[float32x4_t; 2]; QUADS],
    ) {
        let at = ChannelBlock::new(Encoding::Q8C, total_rows, b);
        // SAFETY: (whole body) reads the tile's 32 bytes of each of the
        // block's columns and its 32 rows' scales (caller's contract).
        unsafe {
            let columns = weights.add(at.columns + first);
            // `g` picks four columns and every quad's vector for them.
            #[allow(clippy::needless_range_loop)]
            for g in 0..GROUPS {
                for half in 0..2 {
                    let c: [uint8x16_t; 4] =
                        std::array::from_fn(|k| vld1q_u8(columns.add((4 * g + k) * at.column_bytes + 16 * half)));
                    for (i, q) in transpose(c).into_iter().enumerate() {
                        values[4 * half + i][g] = vreinterpretq_s8_u8(q);
                    }
                }
            }
            let zero = vdupq_n_f32(0.0);
            for h in 0..CHANNEL_TILE / 8 {
                let d = vld1q_u16(weights.add(at.scales + 2 * (first + 8 * h)) as *const u16);
                scales[2 * h] = [widen_f16(vget_low_u16(d)), zero];
                scales[2 * h + 1] = [widen_f16_high(d), zero];
            }
        }
    }

    /// `acc += ` the dot products of `w`'s four rows of four bytes with
    /// bytes `4·LANE .. +4` of `a`.
    #[inline]
    #[target_feature(enable = "dotprod")]
    fn sdot<const LANE: i32>(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: registers only; the extension is enabled for this function.
        unsafe {
            asm!("sdot {acc:v}.4s, {w:v}.16b, {a:v}.4b[{lane}]", acc = inout(vreg) acc, w = in(vreg) w, a = in(vreg) a,
                 lane = const LANE, options(pure, nomem, nostack, preserves_flags));
        }
        acc
    }

    /// One token's block against a quad's eight vectors `w`: eight `sdot`s,
    /// then `result + d·dₓ·Σ (+ m·s)`.
    #[inline]
    #[target_feature(enable = "dotprod")]
    fn token_block<const MINS: bool>(
        w: &[int8x16_t; GROUPS],
        [d, m]: [float32x4_t; 2],
        a: &BlockQ8Act,
        result: float32x4_t,
    ) -> float32x4_t {
        // SAFETY: `a.qs` is 32 bytes, two loads of 16.
        let (low, high) = unsafe { (vld1q_s8(a.qs.as_ptr()), vld1q_s8(a.qs.as_ptr().add(16))) };
        let mut sum = vdupq_n_s32(0);
        sum = sdot::<0>(sum, w[0], low);
        sum = sdot::<1>(sum, w[1], low);
        sum = sdot::<2>(sum, w[2], low);
        sum = sdot::<3>(sum, w[3], low);
        sum = sdot::<0>(sum, w[4], high);
        sum = sdot::<1>(sum, w[5], high);
        sum = sdot::<2>(sum, w[6], high);
        sum = sdot::<3>(sum, w[7], high);
        let result = vfmaq_n_f32(result, vmulq_f32(vcvtq_f32_s32(sum), d), a.d);
        if MINS {
            vfmaq_n_f32(result, m, a.s)
        } else {
            result
        }
    }

    /// `+ m·s` for Q4C (`mins`): the rows' minimums (v25) times the
    /// token's `s` (lane 1 of `$ds`); nothing for Q8C (`none`).
    #[rustfmt::skip]
    macro_rules! min_term {
        (mins, $r:literal, $ds:literal) => { concat!("fmla v", $r, ".4s, v25.4s, v", $ds, ".s[1]\n") };
        (none, $r:literal, $ds:literal) => { "" };
    }

    /// One token's block in [`eight_token_loop`]: its `dₓ, s` (the eight
    /// bytes before the values `{$t}` points at) and its 32 values (one
    /// load into two consecutive registers, which moves `{$t}` on to its
    /// next block), eight `sdot`s against the quad's vectors (v16–v23),
    /// then `v$r += d·dₓ·Σ` (v24 the rows' d) and the minimum's term.
    /// `$acc $low $high $ds` are the token's scratch registers (`$high` =
    /// `$low + 1`).
    #[rustfmt::skip]
    macro_rules! sdot_token {
        ($mins:ident, $t:literal, $r:literal, $acc:literal, $low:literal, $high:literal, $ds:literal) => { concat!(
            "ldur d", $ds, ", [{", $t, "}, #-8]\n",
            "ld1 {{v", $low, ".16b, v", $high, ".16b}}, [{", $t, "}], {step}\n",
            "movi v", $acc, ".4s, #0\n",
            "sdot v", $acc, ".4s, v16.16b, v", $low, ".4b[0]\n",
            "sdot v", $acc, ".4s, v17.16b, v", $low, ".4b[1]\n",
            "sdot v", $acc, ".4s, v18.16b, v", $low, ".4b[2]\n",
            "sdot v", $acc, ".4s, v19.16b, v", $low, ".4b[3]\n",
            "sdot v", $acc, ".4s, v20.16b, v", $high, ".4b[0]\n",
            "sdot v", $acc, ".4s, v21.16b, v", $high, ".4b[1]\n",
            "sdot v", $acc, ".4s, v22.16b, v", $high, ".4b[2]\n",
            "sdot v", $acc, ".4s, v23.16b, v", $high, ".4b[3]\n",
            "scvtf v", $acc, ".4s, v", $acc, ".4s\n",
            "fmul v", $acc, ".4s, v", $acc, ".4s, v24.4s\n",
            "fmla v", $r, ".4s, v", $acc, ".4s, v", $ds, ".s[0]\n",
            min_term!($mins, $r, $ds),
        )};
    }

    /// The eight-token quad tile over `{blocks}` panel blocks: per block the
    /// quad's eight vectors (`{w}`, then a block on) and its scales and
    /// minimums (`{scales}`), then the eight tokens (`{t0}`…`{t7}`, their
    /// results v0–v7), two sets of scratch registers taking turns.
    #[rustfmt::skip]
    macro_rules! eight_token_loop {
        ($mins:ident) => { concat!(
            "2:\n",
            "ldp q16, q17, [{w}]\n",
            "ldp q18, q19, [{w}, #32]\n",
            "ldp q20, q21, [{w}, #64]\n",
            "ldp q22, q23, [{w}, #96]\n",
            "add {w}, {w}, {panel_step}\n",
            "ldp q24, q25, [{scales}], #256\n",
            sdot_token!($mins, "t0", "0", "26", "27", "28", "29"),
            sdot_token!($mins, "t1", "1", "30", "8", "9", "31"),
            sdot_token!($mins, "t2", "2", "26", "27", "28", "29"),
            sdot_token!($mins, "t3", "3", "30", "8", "9", "31"),
            sdot_token!($mins, "t4", "4", "26", "27", "28", "29"),
            sdot_token!($mins, "t5", "5", "30", "8", "9", "31"),
            sdot_token!($mins, "t6", "6", "26", "27", "28", "29"),
            sdot_token!($mins, "t7", "7", "30", "8", "9", "31"),
            "subs {blocks}, {blocks}, #1\n",
            "b.ne 2b\n",
        )};
    }

    /// Runs [`eight_token_loop`] (`mins` or `none`) on results `r`, the
    /// quad's vectors from `w` and scales from `scales` (a block apart:
    /// 1024 and 256 bytes), the tokens' values (`qs` of their first
    /// blocks) from `t`.
    macro_rules! run_eight_tokens {
        ($mins:ident, $r:ident, $w:expr, $scales:expr, $t:ident, $blocks:expr) => {
            asm!(
                eight_token_loop!($mins),
                w = inout(reg) $w => _,
                scales = inout(reg) $scales => _,
                panel_step = in(reg) QUADS * GROUPS * 16,
                step = in(reg) std::mem::size_of::<BlockQ8Act>(),
                t0 = inout(reg) $t[0] => _, t1 = inout(reg) $t[1] => _,
                t2 = inout(reg) $t[2] => _, t3 = inout(reg) $t[3] => _,
                t4 = inout(reg) $t[4] => _, t5 = inout(reg) $t[5] => _,
                t6 = inout(reg) $t[6] => _, t7 = inout(reg) $t[7] => _,
                blocks = inout(reg) $blocks => _,
                inout("v0") $r[0], inout("v1") $r[1], inout("v2") $r[2], inout("v3") $r[3],
                inout("v4") $r[4], inout("v5") $r[5], inout("v6") $r[6], inout("v7") $r[7],
                out("v8") _, out("v9") _,
                out("v16") _, out("v17") _, out("v18") _, out("v19") _, out("v20") _, out("v21") _,
                out("v22") _, out("v23") _, out("v24") _, out("v25") _, out("v26") _, out("v27") _,
                out("v28") _, out("v29") _, out("v30") _, out("v31") _,
                options(nostack, readonly),
            )
        };
    }

    /// Adds `T` (at most [`TOKENS`]) tokens' products with rows
    /// `4·quad .. +4` of the panel's first `blocks` blocks to their results
    /// (`out[t·n ..][..4]`), held in registers across the blocks: per block
    /// the quad's eight vectors loaded once for the `T` tokens.
    ///
    /// # Safety
    /// `x` points at `T` tokens' activations for the panel's blocks,
    /// `stride` blocks apart, and `out` at `T` runs of 4 results, `n` apart.
    #[inline]
    #[target_feature(enable = "dotprod")]
    unsafe fn quad_tile<const T: usize, const MINS: bool>(
        panel: &Panel,
        blocks: usize,
        quad: usize,
        x: *const BlockQ8Act,
        stride: usize,
        out: *mut f32,
        n: usize,
    ) {
        const { assert!(T <= TOKENS) };
        // SAFETY: (whole body) reads the tokens' blocks and the results,
        // writes the results (caller's contract).
        unsafe {
            let mut results: [float32x4_t; T] = std::array::from_fn(|t| vld1q_f32(out.add(t * n)));
            if T == TOKENS && blocks > 0 {
                // Each token's values: its pointer is `qs` of its first block.
                let tokens: [*const i8; TOKENS] = std::array::from_fn(|t| (*x.add(t * stride)).qs.as_ptr());
                let (w, scales) = (panel.values[0][quad].as_ptr(), panel.scales[0][quad].as_ptr());
                if MINS {
                    run_eight_tokens!(mins, results, w, scales, tokens, blocks);
                } else {
                    run_eight_tokens!(none, results, w, scales, tokens, blocks);
                }
                for (t, &result) in results.iter().enumerate() {
                    vst1q_f32(out.add(t * n), result);
                }
                return;
            }
            let blocks = panel.values.iter().zip(&panel.scales).take(blocks).enumerate();
            for (b, (values, scales)) in blocks {
                let (w, scales) = (&values[quad], scales[quad]);
                // Written out token by token (`t < T` is decided at compile
                // time): as a loop over eight tokens the compiler keeps the
                // results in memory.
                macro_rules! tokens {
                    ($($t:literal)*) => {$(
                        if $t < T {
                            results[$t] = token_block::<MINS>(w, scales, &*x.add($t * stride + b), results[$t]);
                        }
                    )*};
                }
                tokens!(0 1 2 3 4 5 6 7);
            }
            for (t, &result) in results.iter().enumerate() {
                vst1q_f32(out.add(t * n), result);
            }
        }
    }

    /// The frame of both GEMMs (Q4C with `Q4`, else Q8C): per tile and
    /// run of [`PANEL_BLOCKS`] blocks, the panel packed, then every quad of
    /// rows against tiles of [`TOKENS`], 4, 2 and 1 tokens.
    #[inline]
    #[target_feature(enable = "dotprod")]
    fn gemm<const Q4: bool>(matrix: &ChannelMatrix, rows: Range<usize>, x: &[BlockQ8Act], out: &mut [f32]) {
        let ChannelMatrix { weights, total_rows, cols } = *matrix;
        let encoding = if Q4 { Encoding::Q4C } else { Encoding::Q8C };
        let batch = check_batch(encoding, matrix, &rows, x, out);
        let (blocks, n) = (cols / GROUP, rows.len());
        out.fill(0.0);
        let zero = (vdupq_n_s8(0), vdupq_n_f32(0.0));
        let mut panel =
            Panel { values: [[[zero.0; GROUPS]; QUADS]; PANEL_BLOCKS], scales: [[[zero.1; 2]; QUADS]; PANEL_BLOCKS] };
        let (w, results) = (weights.as_ptr(), out.as_mut_ptr());
        for first in rows.clone().step_by(CHANNEL_TILE) {
            // Runs of equal length (18 blocks: two of 9, not 16 and 2).
            let per_run = blocks.div_ceil(blocks.div_ceil(PANEL_BLOCKS));
            for start in (0..blocks).step_by(per_run) {
                let count = per_run.min(blocks - start);
                for (i, (values, scales)) in panel.values.iter_mut().zip(&mut panel.scales).take(count).enumerate() {
                    // SAFETY: `check_batch` put the tile's rows and every
                    // block inside `weights`.
                    unsafe {
                        if Q4 {
                            pack_q4c(w, total_rows, first, start + i, values, scales)
                        } else {
                            pack_q8c(w, total_rows, first, start + i, values, scales)
                        }
                    };
                }
                for quad in 0..QUADS {
                    // SAFETY: (every tile below) tokens `t .. t + T ≤ batch`
                    // of `x` from block `start` (`count` blocks of each
                    // inside it) and their results for the quad's rows,
                    // inside `out` (`check_batch`).
                    let run = |t: usize| unsafe {
                        (x.as_ptr().add(t * blocks + start), results.add(t * n + first - rows.start + 4 * quad))
                    };
                    let mut t = 0;
                    while t + TOKENS <= batch {
                        let (x, out) = run(t);
                        // SAFETY: as above.
                        unsafe { quad_tile::<TOKENS, Q4>(&panel, count, quad, x, blocks, out, n) };
                        t += TOKENS;
                    }
                    if t + 4 <= batch {
                        let (x, out) = run(t);
                        // SAFETY: as above.
                        unsafe { quad_tile::<4, Q4>(&panel, count, quad, x, blocks, out, n) };
                        t += 4;
                    }
                    if t + 2 <= batch {
                        let (x, out) = run(t);
                        // SAFETY: as above.
                        unsafe { quad_tile::<2, Q4>(&panel, count, quad, x, blocks, out, n) };
                        t += 2;
                    }
                    if t < batch {
                        let (x, out) = run(t);
                        // SAFETY: as above.
                        unsafe { quad_tile::<1, Q4>(&panel, count, quad, x, blocks, out, n) };
                    }
                }
            }
        }
    }

    /// The GEMM over channel-major asymmetric Q4 ([`Encoding::Q4C`],
    /// [`GemmChannels`]) with `sdot`. Panics on a CPU without the
    /// dot-product extension.
    pub fn gemm_q4c(matrix: &ChannelMatrix, rows: Range<usize>, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: the CPU has the extension (checked above).
        unsafe { gemm::<true>(matrix, rows, x, out) }
    }

    /// The GEMM over channel-major Q8 ([`Encoding::Q8C`], [`GemmChannels`])
    /// with `sdot`. Panics on a CPU without the dot-product extension.
    pub fn gemm_q8c(matrix: &ChannelMatrix, rows: Range<usize>, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: the CPU has the extension (checked above).
        unsafe { gemm::<false>(matrix, rows, x, out) }
    }
}

/// The GEMM with AVX2 (x86-64 hosts, with FMA and F16C): bit for bit the
/// scalar reference, as the other AVX2 kernels ([`super::avx2`]).
///
/// Per tile of 32 rows and column block, the block is transposed into 32
/// rows of 32 channel bytes (two 16 × 16 byte transposes a half, `punpck*`),
/// once for the batch; then per token and eight rows, `vpmaddubsw` (4-bit
/// values unsigned; int8 with the sign trick) and `vpmaddwd` by ones, two
/// rounds of horizontal adds for the eight rows' sums, and the block's
/// float terms in the reference's order and roundings.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use super::super::avx2::available;
    use super::*;
    use std::arch::x86_64::*;

    /// A 16 × 16 byte transpose: `out[c]` byte `r` is `rows[r]` byte `c`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn transpose16(rows: [__m128i; 16]) -> [__m128i; 16] {
        // Pairs of rows byte by byte (16-bit lanes: columns 8h..8h+8), then
        // fours (32-bit lanes: columns 4c..4c+4), eights (64-bit: 2c..2c+2),
        // all sixteen (one column a vector).
        let pairs: [[__m128i; 2]; 8] = std::array::from_fn(|p| {
            [_mm_unpacklo_epi8(rows[2 * p], rows[2 * p + 1]), _mm_unpackhi_epi8(rows[2 * p], rows[2 * p + 1])]
        });
        let fours: [[__m128i; 4]; 4] = std::array::from_fn(|q| {
            std::array::from_fn(|c| {
                let (a, b) = (pairs[2 * q][c / 2], pairs[2 * q + 1][c / 2]);
                if c % 2 == 0 {
                    _mm_unpacklo_epi16(a, b)
                } else {
                    _mm_unpackhi_epi16(a, b)
                }
            })
        });
        let eights: [[__m128i; 8]; 2] = std::array::from_fn(|o| {
            std::array::from_fn(|c| {
                let (a, b) = (fours[2 * o][c / 2], fours[2 * o + 1][c / 2]);
                if c % 2 == 0 {
                    _mm_unpacklo_epi32(a, b)
                } else {
                    _mm_unpackhi_epi32(a, b)
                }
            })
        });
        std::array::from_fn(|c| {
            let (a, b) = (eights[0][c / 2], eights[1][c / 2]);
            if c % 2 == 0 {
                _mm_unpacklo_epi64(a, b)
            } else {
                _mm_unpackhi_epi64(a, b)
            }
        })
    }

    /// One tile's block: each row's 32 channel values, its scale and (Q4C)
    /// minimum.
    struct Tile {
        rows: [[__m128i; 2]; CHANNEL_TILE],
        d: [f32; CHANNEL_TILE],
        m: [f32; CHANNEL_TILE],
    }

    /// Transposes block `b` of the tile from row `first` into `tile`: Q4C's
    /// stored `n ^ 8` back to `n` (0–15), Q8C's bytes as they are.
    ///
    /// # Safety
    /// `weights` is a matrix of `encoding` (Q4C or Q8C) with `total_rows`
    /// rows, block `b` and rows `first .. first + 32`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pack(encoding: Encoding, weights: *const u8, total_rows: usize, first: usize, b: usize, tile: &mut Tile) {
        let at = ChannelBlock::new(encoding, total_rows, b);
        let first_byte = first * at.column_bytes / total_rows;
        // SAFETY: (whole body) reads the tile's bytes of the block's 32
        // columns and its 32 rows' scales and minimums (caller's contract).
        unsafe {
            let column = |j: usize, byte: usize| {
                _mm_loadu_si128(weights.add(at.columns + j * at.column_bytes + first_byte + byte) as *const __m128i)
            };
            for half in 0..2 {
                if encoding == Encoding::Q4C {
                    // Bytes k of sixteen channels: row k low, row k + 16 high.
                    let bytes = transpose16(std::array::from_fn(|j| column(16 * half + j, 0)));
                    let (flip, nibble) = (_mm_set1_epi8(0x88u8 as i8), _mm_set1_epi8(0x0F));
                    for (k, byte) in bytes.into_iter().enumerate() {
                        let n = _mm_xor_si128(byte, flip);
                        tile.rows[k][half] = _mm_and_si128(n, nibble);
                        tile.rows[k + 16][half] = _mm_and_si128(_mm_srli_epi16::<4>(n), nibble);
                    }
                } else {
                    for rows in 0..2 {
                        let bytes = transpose16(std::array::from_fn(|j| column(16 * half + j, 16 * rows)));
                        for (k, byte) in bytes.into_iter().enumerate() {
                            tile.rows[16 * rows + k][half] = byte;
                        }
                    }
                }
            }
            for k in 0..CHANNEL_TILE {
                tile.d[k] = f16_at_ptr(weights, at.scales + 2 * (first + k));
                tile.m[k] =
                    if encoding == Encoding::Q4C { f16_at_ptr(weights, at.mins + 2 * (first + k)) } else { 0.0 };
            }
        }
    }

    /// The f16 at byte `at` of `bytes`, as f32.
    ///
    /// # Safety
    /// Two readable bytes at `bytes + at`.
    #[inline(always)]
    unsafe fn f16_at_ptr(bytes: *const u8, at: usize) -> f32 {
        // SAFETY: two bytes (caller's contract).
        let pair = unsafe { [*bytes.add(at), *bytes.add(at + 1)] };
        super::super::scalar::f16_to_f32(half::f16::from_le_bytes(pair))
    }

    /// Eight rows' integer sums against one token's 32 values `a`: per row
    /// `vpmaddubsw` and `vpmaddwd` by ones (eight 32-bit partial sums), then
    /// two rounds of horizontal adds and the two halves added.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn eight_rows<const Q4: bool>(rows: &[[__m128i; 2]], a: __m256i) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        let partial: [__m256i; 8] = std::array::from_fn(|r| {
            let w = _mm256_set_m128i(rows[r][1], rows[r][0]);
            let products = if Q4 {
                _mm256_maddubs_epi16(w, a)
            } else {
                // |w| unsigned, the value with w's sign: |w|·sign(w)·q = w·q.
                _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
            };
            _mm256_madd_epi16(products, ones)
        });
        let pairs = [
            _mm256_hadd_epi32(partial[0], partial[1]),
            _mm256_hadd_epi32(partial[2], partial[3]),
            _mm256_hadd_epi32(partial[4], partial[5]),
            _mm256_hadd_epi32(partial[6], partial[7]),
        ];
        // Rows 0–3 and 4–7, each 128-bit half a part of every row's sum.
        let (low, high) = (_mm256_hadd_epi32(pairs[0], pairs[1]), _mm256_hadd_epi32(pairs[2], pairs[3]));
        _mm256_add_epi32(_mm256_permute2x128_si256::<0x20>(low, high), _mm256_permute2x128_si256::<0x31>(low, high))
    }

    /// The GEMM's loops for `encoding` (Q4C with `Q4`, else Q8C).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn gemm<const Q4: bool>(matrix: &ChannelMatrix, rows: Range<usize>, x: &[BlockQ8Act], out: &mut [f32]) {
        let ChannelMatrix { weights, total_rows, cols } = *matrix;
        let encoding = if Q4 { Encoding::Q4C } else { Encoding::Q8C };
        let batch = check_batch(encoding, matrix, &rows, x, out);
        let (blocks, n) = (cols / GROUP, rows.len());
        out.fill(0.0);
        let zero = _mm_setzero_si128();
        let mut tile = Tile { rows: [[zero; 2]; CHANNEL_TILE], d: [0.0; CHANNEL_TILE], m: [0.0; CHANNEL_TILE] };
        for first in rows.clone().step_by(CHANNEL_TILE) {
            for b in 0..blocks {
                // SAFETY: `check_batch` put the tile's rows and every block inside `weights`.
                unsafe { pack(encoding, weights.as_ptr(), total_rows, first, b, &mut tile) };
                for t in 0..batch {
                    let a = &x[t * blocks + b];
                    // SAFETY: `a.qs` is 32 bytes.
                    let values = unsafe { _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i) };
                    let (dx, s) = (_mm256_set1_ps(a.d), _mm256_set1_ps(a.s));
                    let results = &mut out[t * n + first - rows.start..][..CHANNEL_TILE];
                    for (e, results) in results.chunks_exact_mut(8).enumerate() {
                        let isum = _mm256_cvtepi32_ps(eight_rows::<Q4>(&tile.rows[8 * e..8 * e + 8], values));
                        // SAFETY: (the loads and the store) eight values
                        // each of `tile.d`, `tile.m` and `results`.
                        unsafe {
                            let d = _mm256_loadu_ps(tile.d.as_ptr().add(8 * e));
                            // The reference's d·dₓ·Σ (+ m·s), rounding for rounding.
                            let mut term = _mm256_mul_ps(_mm256_mul_ps(d, dx), isum);
                            if Q4 {
                                let m = _mm256_loadu_ps(tile.m.as_ptr().add(8 * e));
                                term = _mm256_add_ps(term, _mm256_mul_ps(m, s));
                            }
                            let sum = _mm256_add_ps(_mm256_loadu_ps(results.as_ptr()), term);
                            _mm256_storeu_ps(results.as_mut_ptr(), sum);
                        }
                    }
                }
            }
        }
    }

    /// The GEMM over channel-major asymmetric Q4 ([`Encoding::Q4C`],
    /// [`GemmChannels`]) with AVX2, the reference's bits. Panics on a CPU
    /// without AVX2, FMA and F16C.
    pub fn gemm_q4c(matrix: &ChannelMatrix, rows: Range<usize>, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "AVX2 kernel on a CPU without AVX2, FMA and F16C");
        // SAFETY: the CPU has the features (checked above).
        unsafe { gemm::<true>(matrix, rows, x, out) }
    }

    /// The GEMM over channel-major Q8 ([`Encoding::Q8C`], [`GemmChannels`])
    /// with AVX2, the reference's bits. Panics on a CPU without AVX2, FMA
    /// and F16C.
    pub fn gemm_q8c(matrix: &ChannelMatrix, rows: Range<usize>, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "AVX2 kernel on a CPU without AVX2, FMA and F16C");
        // SAFETY: the CPU has the features (checked above).
        unsafe { gemm::<false>(matrix, rows, x, out) }
    }
}
