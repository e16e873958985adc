//! AVX2 kernels for x86-64 hosts (with FMA and F16C, which every AVX2 CPU
//! has): the quantized matrix × int8 activation products, row-major and
//! four-row interleaved, for one activation (decode) and for a batch (a
//! prompt). The scalar reference is [`super::scalar`].
//!
//! The integer step is `vpmaddubsw`, unsigned bytes × signed bytes, adjacent
//! pairs added into 16-bit lanes, then `vpmaddwd` by ones, adjacent 16-bit
//! lanes added into 32-bit sums. 4-bit values (0..=15) are unsigned already,
//! and their zero point or minimum is taken out afterwards in float with the
//! activation's `s = dₓ·Σq`. int8 weights take the sign trick: `|w|` as the
//! unsigned operand and the activation with the weight's sign as the signed
//! one (`vpsignb`), so `|w|·sign(w)·q = w·q`; `|w| ≤ 128` and `|q| ≤ 127`
//! keep a pair of products within 16 bits.
//!
//! Kernels work on a tile of rows × activations: one block of a row is
//! loaded and unpacked once for every activation of the tile, one
//! activation block once for every row. Float sums stay in vectors until the
//! end of the row.
//!
//! Interleaved blocks ([`crate::quant::Interleaved`]) hold four rows' values
//! four bytes at a time, so a 32-byte load is four rows at eight columns and
//! the activation's matching four-byte words are spread to fit it
//! (`vpermd`): every 32-bit lane of the sums is one row's, and no
//! horizontal reduction is needed but one add of the two 128-bit halves.

use crate::quant::{BlockQ4, BlockQ4S, BlockQ4Sx4, BlockQ4x4, BlockQ8, BlockQ8Act, BlockQ8x4, GROUP, INTERLEAVE};
use std::arch::x86_64::*;

/// Whether this CPU runs these kernels.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// Rows of a row-major tile.
const TILE_ROWS: usize = 4;
/// Activations of a tile when the batch has more than one.
const TILE_TOKENS: usize = 2;
/// Four-row groups of an interleaved tile for one activation.
const TILE_GROUPS_SINGLE: usize = 4;
/// Four-row groups of an interleaved tile for a batch.
const TILE_GROUPS_BATCH: usize = 2;

/// binary16 (as its bits) to f32 with `vcvtph2ps`: exact, subnormals included.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn widen_f16(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Four binary16 values to f32.
///
/// # Safety
/// `values` points at four readable values; F16C is available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn widen_f16x4(values: *const half::f16) -> __m128 {
    _mm_cvtph_ps(_mm_loadl_epi64(values.cast()))
}

/// The sum of a vector's eight lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn horizontal_sum(v: __m256) -> f32 {
    let four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)))
}

/// 16 bytes of packed nibbles as 32 bytes 0..=15 in column order: value `j`
/// from the low nibble of byte `j`, value `j + 16` from its high nibble.
///
/// # Safety
/// `packed` points at 16 readable bytes; AVX2 is available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn unpack_nibbles(packed: *const u8) -> __m256i {
    let bytes = _mm_loadu_si128(packed.cast());
    // The high nibbles shifted down (16-bit shifts: the mask drops what
    // crosses from the neighbouring byte), into the upper half.
    let both = _mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// A row-major weight block as the kernels read it: value `j` is `d·n[j] + c`.
trait RowBlock {
    /// int8 values (the sign trick) rather than nibbles 0..=15.
    const SIGNED: bool;
    /// Whether `c` is ever non-zero.
    const OFFSET: bool;
    /// The 32 `n[j]` in column order.
    ///
    /// # Safety
    /// `block` is readable; AVX2 and F16C are available.
    unsafe fn values(block: *const Self) -> __m256i;
    /// `(d, c)`.
    ///
    /// # Safety
    /// As [`RowBlock::values`].
    unsafe fn scales(block: *const Self) -> (f32, f32);
}

impl RowBlock for BlockQ8 {
    const SIGNED: bool = true;
    const OFFSET: bool = false;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn values(block: *const Self) -> __m256i {
        _mm256_loadu_si256((&raw const (*block).qs).cast())
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scales(block: *const Self) -> (f32, f32) {
        (widen_f16((*block).d.to_bits()), 0.0)
    }
}

impl RowBlock for BlockQ4 {
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn values(block: *const Self) -> __m256i {
        unpack_nibbles((&raw const (*block).qs).cast())
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scales(block: *const Self) -> (f32, f32) {
        (widen_f16((*block).d.to_bits()), widen_f16((*block).m.to_bits()))
    }
}

impl RowBlock for BlockQ4S {
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn values(block: *const Self) -> __m256i {
        unpack_nibbles((&raw const (*block).qs).cast())
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scales(block: *const Self) -> (f32, f32) {
        // d·(n − 8) = d·n − 8d: the zero point comes out as an offset.
        let d = widen_f16((*block).d.to_bits());
        (d, -8.0 * d)
    }
}

/// `R` rows × `T` activations of `blocks` blocks each: `out[r·batch + t] =
/// rows[r] · tokens[t]` for `r < present_rows` (the other rows are repeats
/// of a present one, computed and dropped).
///
/// # Safety
/// Every pointer in `rows` and `tokens` is valid for `blocks` blocks, `out`
/// for writes at `r·batch + t` (`r < present_rows`, `t < T`); AVX2, FMA and
/// F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_tile<B: RowBlock, const R: usize, const T: usize>(
    rows: [*const B; R],
    tokens: [*const BlockQ8Act; T],
    blocks: usize,
    out: *mut f32,
    batch: usize,
    present_rows: usize,
) {
    let ones = _mm256_set1_epi16(1);
    let mut sums = [[_mm256_setzero_ps(); T]; R];
    let mut offsets = [[0f32; T]; R];
    for k in 0..blocks {
        for r in 0..R {
            let block = rows[r].add(k);
            let values = B::values(block);
            let (d, c) = B::scales(block);
            // Sign trick, weight side: |w| as the unsigned operand (|−128|
            // wraps to 128, right as unsigned).
            let unsigned = if B::SIGNED { _mm256_sign_epi8(values, values) } else { values };
            for t in 0..T {
                let activation = tokens[t].add(k);
                let q = _mm256_loadu_si256((&raw const (*activation).qs).cast());
                // Sign trick, activation side: q with the weight's sign (0 where w is 0).
                let q = if B::SIGNED { _mm256_sign_epi8(q, values) } else { q };
                // Pairs of products into 16-bit lanes, pairs of those into 32-bit sums.
                let products = _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, q), ones);
                // Into the float sums with the block's scale d·dₓ.
                let scale = _mm256_set1_ps(d * (*activation).d);
                sums[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), scale, sums[r][t]);
                if B::OFFSET {
                    // Σ c·dₓ·q = c·s.
                    offsets[r][t] += c * (*activation).s;
                }
            }
        }
    }
    for r in 0..present_rows {
        for t in 0..T {
            *out.add(r * batch + t) = horizontal_sum(sums[r][t]) + offsets[r][t];
        }
    }
}

/// Checks the shapes of a product (weights in blocks of `rows_per_block`
/// rows) and returns `(blocks a row, rows, batch)`.
fn shapes(weights: usize, rows_per_block: usize, cols: usize, x: usize, out: usize) -> (usize, usize, usize) {
    let blocks = cols / GROUP;
    assert!(blocks > 0 && cols.is_multiple_of(GROUP), "{cols} columns are not whole blocks of {GROUP}");
    let (rows, batch) = (weights / blocks * rows_per_block, x / blocks);
    assert!(
        weights == rows / rows_per_block * blocks && x == batch * blocks && out == rows * batch,
        "matmul shapes disagree: {weights} weight blocks, {x} activation blocks, {out} outputs, {blocks} blocks a row"
    );
    (blocks, rows, batch)
}

/// Every tile of a row-major product: rows in fours (the last tile repeats
/// its last row), activations in [`TILE_TOKENS`] and then one at a time.
///
/// # Safety
/// AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matmul_rows<B: RowBlock>(weights: &[B], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    let (blocks, rows, batch) = shapes(weights.len(), 1, cols, x.len(), out.len());
    let (w, activations, results) = (weights.as_ptr(), x.as_ptr(), out.as_mut_ptr());
    for first in (0..rows).step_by(TILE_ROWS) {
        let present = TILE_ROWS.min(rows - first);
        let mut four = [w; TILE_ROWS];
        for (r, row) in four.iter_mut().enumerate() {
            *row = w.add((first + r.min(present - 1)) * blocks);
        }
        let mut token = 0;
        while token + TILE_TOKENS <= batch {
            let mut tokens = [activations; TILE_TOKENS];
            for (t, pointer) in tokens.iter_mut().enumerate() {
                *pointer = activations.add((token + t) * blocks);
            }
            let out = results.add(first * batch + token);
            row_tile::<B, TILE_ROWS, TILE_TOKENS>(four, tokens, blocks, out, batch, present);
            token += TILE_TOKENS;
        }
        for token in token..batch {
            let out = results.add(first * batch + token);
            row_tile::<B, TILE_ROWS, 1>(four, [activations.add(token * blocks)], blocks, out, batch, present);
        }
    }
}

/// An interleaved block of four rows as the kernels read it: row `r`'s
/// value `j` is `d[r]·n[j] + c[r]`.
trait InterleavedBlock {
    /// int8 values (the sign trick) rather than nibbles 0..=15.
    const SIGNED: bool;
    /// Whether `c` is ever non-zero.
    const OFFSET: bool;
    /// Piece `i` of four: the four rows' `n` at the columns of the
    /// activation's four-byte words `2i` (lower half) and `2i + 1` (upper
    /// half), row `r` at bytes `4r .. 4r+4` of each half.
    ///
    /// # Safety
    /// `block` is readable; AVX2 and F16C are available.
    unsafe fn piece(block: *const Self, i: usize) -> __m256i;
    /// `(d, c)` of the four rows.
    ///
    /// # Safety
    /// As [`InterleavedBlock::piece`].
    unsafe fn scales(block: *const Self) -> (__m128, __m128);
}

impl InterleavedBlock for BlockQ8x4 {
    const SIGNED: bool = true;
    const OFFSET: bool = false;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn piece(block: *const Self, i: usize) -> __m256i {
        // Bytes 32i .. 32i+32 are column groups 2i and 2i+1 (columns 8i .. 8i+8).
        _mm256_loadu_si256((&raw const (*block).qs).cast::<u8>().add(32 * i).cast())
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scales(block: *const Self) -> (__m128, __m128) {
        (widen_f16x4((&raw const (*block).d).cast()), _mm_setzero_ps())
    }
}

/// Piece `i` of 64 interleaved nibble bytes: bytes `32(i mod 2) ..` are
/// column groups `c = 2(i mod 2)` and `c + 1`; their low nibbles are
/// columns `4c ..` (pieces 0, 1: words 0–3), their high nibbles columns
/// `16 + 4c ..` (pieces 2, 3: words 4–7).
///
/// # Safety
/// `qs` points at 64 readable bytes; AVX2 is available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibble_piece(qs: *const u8, i: usize) -> __m256i {
    let bytes = _mm256_loadu_si256(qs.add(32 * (i % 2)).cast());
    let shifted = if i >= 2 { _mm256_srli_epi16(bytes, 4) } else { bytes };
    _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F))
}

impl InterleavedBlock for BlockQ4x4 {
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn piece(block: *const Self, i: usize) -> __m256i {
        nibble_piece((&raw const (*block).qs).cast(), i)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scales(block: *const Self) -> (__m128, __m128) {
        (widen_f16x4((&raw const (*block).d).cast()), widen_f16x4((&raw const (*block).m).cast()))
    }
}

impl InterleavedBlock for BlockQ4Sx4 {
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn piece(block: *const Self, i: usize) -> __m256i {
        nibble_piece((&raw const (*block).qs).cast(), i)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scales(block: *const Self) -> (__m128, __m128) {
        let d = widen_f16x4((&raw const (*block).d).cast());
        // d·(n − 8) = d·n − 8d.
        (d, _mm_mul_ps(d, _mm_set1_ps(-8.0)))
    }
}

/// `G` groups of four interleaved rows × `T` activations of `blocks` blocks:
/// row `4g + r`'s sum with activation `t` to `out[(4g + r)·batch + t]` for
/// `g < present_groups` (the other groups are repeats, dropped).
///
/// # Safety
/// Every pointer in `groups` and `tokens` is valid for `blocks` blocks,
/// `out` for those writes; AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn interleaved_tile<B: InterleavedBlock, const G: usize, const T: usize>(
    groups: [*const B; G],
    tokens: [*const BlockQ8Act; T],
    blocks: usize,
    out: *mut f32,
    batch: usize,
    present_groups: usize,
) {
    let ones = _mm256_set1_epi16(1);
    // Eight lanes a group and activation: rows 0..4 over the even column
    // groups in the lower half, over the odd ones in the upper half.
    let mut sums = [[_mm256_setzero_ps(); T]; G];
    for k in 0..blocks {
        let mut integers = [[_mm256_setzero_si256(); T]; G];
        for i in 0..4 {
            // The activation's words 2i (lower half) and 2i+1 (upper half),
            // each repeated for the four rows.
            let (even, odd) = (2 * i as i32, 2 * i as i32 + 1);
            let spread = _mm256_setr_epi32(even, even, even, even, odd, odd, odd, odd);
            let mut q = [_mm256_setzero_si256(); T];
            for t in 0..T {
                let activation = _mm256_loadu_si256((&raw const (*tokens[t].add(k)).qs).cast());
                q[t] = _mm256_permutevar8x32_epi32(activation, spread);
            }
            for g in 0..G {
                let values = B::piece(groups[g].add(k), i);
                // Sign trick, weight side: |w| as the unsigned operand.
                let unsigned = if B::SIGNED { _mm256_sign_epi8(values, values) } else { values };
                for t in 0..T {
                    if B::SIGNED {
                        // Activation with the weight's sign; two products of
                        // up to 128·127 fill a 16-bit lane, so widen at once.
                        let products = _mm256_maddubs_epi16(unsigned, _mm256_sign_epi8(q[t], values));
                        integers[g][t] = _mm256_add_epi32(integers[g][t], _mm256_madd_epi16(products, ones));
                    } else {
                        // Nibble products (≤ 2·15·128 a lane) add up in 16 bits
                        // over all four pieces (≤ 15 360).
                        integers[g][t] = _mm256_add_epi16(integers[g][t], _mm256_maddubs_epi16(unsigned, q[t]));
                    }
                }
            }
        }
        for g in 0..G {
            let (d, c) = B::scales(groups[g].add(k));
            let d = _mm256_set_m128(d, d);
            // The offset goes into the lower half only: the halves are added at the end.
            let c = _mm256_set_m128(_mm_setzero_ps(), c);
            for t in 0..T {
                let activation = tokens[t].add(k);
                // Adjacent 16-bit lanes into 32-bit sums (nibbles).
                let whole = if B::SIGNED { integers[g][t] } else { _mm256_madd_epi16(integers[g][t], ones) };
                // Into the float sums with the rows' scales times the activation's.
                let scale = _mm256_mul_ps(d, _mm256_set1_ps((*activation).d));
                sums[g][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(whole), scale, sums[g][t]);
                if B::OFFSET {
                    // Σ c·dₓ·q = c·s.
                    sums[g][t] = _mm256_fmadd_ps(c, _mm256_set1_ps((*activation).s), sums[g][t]);
                }
            }
        }
    }
    for g in 0..present_groups {
        for t in 0..T {
            // Even and odd column groups together: one sum a row.
            let rows = _mm_add_ps(_mm256_castps256_ps128(sums[g][t]), _mm256_extractf128_ps(sums[g][t], 1));
            let mut lanes = [0f32; INTERLEAVE];
            _mm_storeu_ps(lanes.as_mut_ptr(), rows);
            for (r, &v) in lanes.iter().enumerate() {
                *out.add((g * INTERLEAVE + r) * batch + t) = v;
            }
        }
    }
}

/// The tiles of an interleaved product: `G` groups at a time (the last tile
/// repeats its last group) × `T` activations, then one at a time.
///
/// # Safety
/// AVX2, FMA and F16C are available; `blocks`, `groups` and `batch` are the
/// checked shapes of `weights`, `x` and `out`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn interleaved_tiles<B: InterleavedBlock, const G: usize, const T: usize>(
    weights: &[B],
    blocks: usize,
    groups: usize,
    x: &[BlockQ8Act],
    batch: usize,
    out: &mut [f32],
) {
    let (w, activations, results) = (weights.as_ptr(), x.as_ptr(), out.as_mut_ptr());
    for first in (0..groups).step_by(G) {
        let present = G.min(groups - first);
        let mut tile = [w; G];
        for (g, group) in tile.iter_mut().enumerate() {
            *group = w.add((first + g.min(present - 1)) * blocks);
        }
        let out = results.add(first * INTERLEAVE * batch);
        let mut token = 0;
        while token + T <= batch {
            let mut tokens = [activations; T];
            for (t, pointer) in tokens.iter_mut().enumerate() {
                *pointer = activations.add((token + t) * blocks);
            }
            interleaved_tile::<B, G, T>(tile, tokens, blocks, out.add(token), batch, present);
            token += T;
        }
        for token in token..batch {
            let one = [activations.add(token * blocks)];
            interleaved_tile::<B, G, 1>(tile, one, blocks, out.add(token), batch, present);
        }
    }
}

/// An interleaved product: wide tiles of groups for one activation, tiles
/// of groups × activations for a batch.
///
/// # Safety
/// AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matmul_interleaved<B: InterleavedBlock>(weights: &[B], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    let (blocks, rows, batch) = shapes(weights.len(), INTERLEAVE, cols, x.len(), out.len());
    let groups = rows / INTERLEAVE;
    if batch == 1 {
        interleaved_tiles::<B, TILE_GROUPS_SINGLE, 1>(weights, blocks, groups, x, batch, out)
    } else {
        interleaved_tiles::<B, TILE_GROUPS_BATCH, TILE_TOKENS>(weights, blocks, groups, x, batch, out)
    }
}

/// One public kernel: checks the CPU once a call, then runs the AVX2 code.
macro_rules! avx2_kernel {
    ($(#[$doc:meta])* $name:ident, $block:ty, $driver:ident) => {
        $(#[$doc])*
        ///
        /// Panics on a CPU without AVX2, FMA and F16C (take the table from
        /// `Kernels::detect`, which hands it out only where it runs).
        pub fn $name(weights: &[$block], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
            assert!(available(), "AVX2 kernel on a CPU without AVX2, FMA and F16C");
            // SAFETY: the CPU has the features (checked above); the driver
            // checks the shapes before it reads or writes.
            unsafe { $driver(weights, cols, x, out) }
        }
    };
}

avx2_kernel!(
    /// Q8 matrix × int8 activations.
    matmul_q8, BlockQ8, matmul_rows
);
avx2_kernel!(
    /// Asymmetric Q4 matrix × int8 activations.
    matmul_q4, BlockQ4, matmul_rows
);
avx2_kernel!(
    /// Symmetric Q4 matrix × int8 activations.
    matmul_q4s, BlockQ4S, matmul_rows
);
avx2_kernel!(
    /// Interleaved Q8 matrix × int8 activations.
    matmul_q8x4, BlockQ8x4, matmul_interleaved
);
avx2_kernel!(
    /// Interleaved asymmetric Q4 matrix × int8 activations.
    matmul_q4x4, BlockQ4x4, matmul_interleaved
);
avx2_kernel!(
    /// Interleaved symmetric Q4 matrix × int8 activations.
    matmul_q4sx4, BlockQ4Sx4, matmul_interleaved
);
