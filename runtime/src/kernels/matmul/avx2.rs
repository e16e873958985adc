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
//! activation block once for every row. Each block's integer sum is exact,
//! and its float contribution is computed and added in the reference's
//! order with the reference's roundings (no fused multiply-add), four rows
//! in a vector: the results are the scalar kernels' bit for bit. That is
//! deliberate: the forward pass quantizes every layer's input to int8, so
//! a last-bit difference in one product can flip a rounding there and move
//! the logits by as much as the weights' quantization does.
//!
//! Interleaved blocks ([`crate::quant::Interleaved`]) hold four rows' values
//! four bytes at a time, so a 32-byte load is four rows at eight columns and
//! the activation's matching four-byte words are spread to fit it
//! (`vpermd`): every 32-bit lane of the sums is one row's, and no
//! horizontal reduction is needed but one add of the two 128-bit halves.
//! Row-major rows get there with two rounds of horizontal adds.

use crate::quant::{BlockQ4, BlockQ4S, BlockQ4Sx4, BlockQ4x4, BlockQ8, BlockQ8Act, BlockQ8x4, GROUP, INTERLEAVE};
use half::f16;
use std::arch::x86_64::*;

/// Whether this CPU runs these kernels.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

// Tile shapes, measured on SmolLM2-135M q4 (one thread, 128-token prompt,
// 64 decoded): eight groups for one activation decode about 1.4× as fast as
// four and 2× as fast as two (sixteen spill); four activations a tile
// prefill a little faster than two.

/// Rows of a row-major tile.
const TILE_ROWS: usize = 4;
/// Activations of a tile when the batch has more than one.
const TILE_TOKENS: usize = 4;
/// Four-row groups of an interleaved tile for one activation.
const TILE_GROUPS_SINGLE: usize = 8;
/// Four-row groups of an interleaved tile for a batch.
const TILE_GROUPS_BATCH: usize = 2;

/// Prefetches the `bytes` bytes of another tile that match block `k` of
/// this one (its `k`-th share, `bytes` a block column's worth), into L1.
///
/// One activation reads the weights once, a tile's short runs at a time:
/// too many streams, too short, for the hardware prefetcher to follow, so
/// the tiles of a one-activation product fetch the tile some way ahead
/// (contiguous in memory) as they go.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn prefetch_share(tile: *const u8, k: usize, bytes: usize) {
    for line in (0..bytes).step_by(CACHE_LINE) {
        // A hint only: it never faults, wherever it points.
        _mm_prefetch::<_MM_HINT_T0>(tile.wrapping_add(k * bytes + line).cast());
    }
}

/// Bytes a prefetch brings in.
const CACHE_LINE: usize = 64;
/// How many tiles ahead a one-activation product prefetches (four-row
/// tiles take about as long as a DRAM access).
const PREFETCH_TILES: usize = 4;

/// Four binary16 values to f32.
///
/// # Safety
/// `values` points at four readable values; F16C is available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn widen_f16x4(values: *const half::f16) -> __m128 {
    _mm_cvtph_ps(_mm_loadl_epi64(values.cast()))
}

/// Four binary16 values given as bits (four rows' scales or minimums) to f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn widen_f16_bits(bits: [u16; 4]) -> __m128 {
    let packed = bits[0] as i64 | (bits[1] as i64) << 16 | (bits[2] as i64) << 32 | (bits[3] as i64) << 48;
    _mm_cvtph_ps(_mm_cvtsi64_si128(packed))
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

/// How a block's integer sum and scales make its float contribution, in the
/// reference's order ([`super::scalar`]): `(d·dₓ)·Σ`, plus `m·s` for the
/// minimum of asymmetric Q4, and Σ is `Σ(n − 8)·q` for symmetric Q4.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Values {
    /// int8 values: the sign trick.
    Signed,
    /// Nibbles with a minimum `m` (value `d·n + m`).
    Minimum,
    /// Nibbles with the zero point 8 (value `d·(n − 8)`).
    ZeroPoint,
}

/// A row-major weight block as the kernels read it.
trait RowBlock {
    /// What its values are.
    const VALUES: Values;
    /// The 32 stored values in column order (nibbles unpacked, 0..=15).
    ///
    /// # Safety
    /// `block` is readable; AVX2 is available.
    unsafe fn values(block: *const Self) -> __m256i;
    /// The bits of `d` and of `m` (0 where there is none).
    fn scale_bits(&self) -> (u16, u16);
}

impl RowBlock for BlockQ8 {
    const VALUES: Values = Values::Signed;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn values(block: *const Self) -> __m256i {
        _mm256_loadu_si256((&raw const (*block).qs).cast())
    }
    #[inline(always)]
    fn scale_bits(&self) -> (u16, u16) {
        (self.d.to_bits(), 0)
    }
}

impl RowBlock for BlockQ4 {
    const VALUES: Values = Values::Minimum;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn values(block: *const Self) -> __m256i {
        unpack_nibbles((&raw const (*block).qs).cast())
    }
    #[inline(always)]
    fn scale_bits(&self) -> (u16, u16) {
        (self.d.to_bits(), self.m.to_bits())
    }
}

impl RowBlock for BlockQ4S {
    const VALUES: Values = Values::ZeroPoint;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn values(block: *const Self) -> __m256i {
        unpack_nibbles((&raw const (*block).qs).cast())
    }
    #[inline(always)]
    fn scale_bits(&self) -> (u16, u16) {
        (self.d.to_bits(), 0)
    }
}

/// `Σq` of an activation block's 32 values, in all four lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn activation_sum(q: __m256i) -> __m128i {
    // Pairs (× 1) into 16-bit lanes, pairs of those into 32-bit lanes.
    let pairs = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), q), _mm256_set1_epi16(1));
    // The halves, then the 64-bit halves swapped and added, then neighbours.
    let four = _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
    let two = _mm_add_epi32(four, _mm_shuffle_epi32(four, 0b01_00_11_10));
    _mm_add_epi32(two, _mm_shuffle_epi32(two, 0b10_11_00_01))
}

/// Four rows' block contributions added to their running sums `sums`, in
/// the reference's arithmetic: `sums += (d·dₓ)·Σ (+ m·s)`, each product and
/// sum rounded as the scalar code rounds it (no fused multiply-add), so the
/// results are the reference's bit for bit. `integers` are the four rows'
/// exact `Σ n·q`; `sum_q` is the activation's `Σq` (for the zero point).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn add_block(
    values: Values,
    sums: __m128,
    integers: __m128i,
    sum_q: __m128i,
    d: __m128,
    m: __m128,
    activation: *const BlockQ8Act,
) -> __m128 {
    // Σ(n − 8)·q = Σ n·q − 8·Σq, exact in integers.
    let integers =
        if values == Values::ZeroPoint { _mm_sub_epi32(integers, _mm_slli_epi32(sum_q, 3)) } else { integers };
    let scale = _mm_mul_ps(d, _mm_set1_ps((*activation).d));
    let mut term = _mm_mul_ps(scale, _mm_cvtepi32_ps(integers));
    if values == Values::Minimum {
        // Σ m·dₓ·q = m·s.
        term = _mm_add_ps(term, _mm_mul_ps(m, _mm_set1_ps((*activation).s)));
    }
    _mm_add_ps(sums, term)
}

/// Stores four rows' sums at `out[r·batch]` for `r < present`.
///
/// # Safety
/// `out` is valid for those writes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn store_rows(sums: __m128, out: *mut f32, batch: usize, present: usize) {
    let mut lanes = [0f32; 4];
    _mm_storeu_ps(lanes.as_mut_ptr(), sums);
    for (r, &v) in lanes[..present].iter().enumerate() {
        *out.add(r * batch) = v;
    }
}

/// Four rows × `T` activations of `blocks` blocks each: `out[r·batch + t] =
/// rows[r] · tokens[t]` for `r < present_rows` (the other rows are repeats
/// of a present one, computed and dropped).
///
/// # Safety
/// Every pointer in `rows` and `tokens` is valid for `blocks` blocks, `out`
/// for writes at `r·batch + t` (`r < present_rows`, `t < T`); AVX2, FMA and
/// F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_tile<B: RowBlock, const T: usize>(
    rows: [*const B; TILE_ROWS],
    tokens: [*const BlockQ8Act; T],
    blocks: usize,
    out: *mut f32,
    batch: usize,
    present_rows: usize,
    ahead: Option<*const u8>,
) {
    let ones = _mm256_set1_epi16(1);
    let mut sums = [_mm_setzero_ps(); T];
    for k in 0..blocks {
        if let Some(tile) = ahead {
            prefetch_share(tile, k, TILE_ROWS * std::mem::size_of::<B>());
        }
        let mut q = [_mm256_setzero_si256(); T];
        let mut sum_q = [_mm_setzero_si128(); T];
        for t in 0..T {
            q[t] = _mm256_loadu_si256((&raw const (*tokens[t].add(k)).qs).cast());
            if B::VALUES == Values::ZeroPoint {
                sum_q[t] = activation_sum(q[t]);
            }
        }
        let mut products = [[_mm256_setzero_si256(); TILE_ROWS]; T];
        let (mut d_bits, mut m_bits) = ([0u16; TILE_ROWS], [0u16; TILE_ROWS]);
        for r in 0..TILE_ROWS {
            let block = rows[r].add(k);
            (d_bits[r], m_bits[r]) = (*block).scale_bits();
            let values = B::values(block);
            // Sign trick, weight side: |w| as the unsigned operand (|−128|
            // wraps to 128, right as unsigned).
            let unsigned = if B::VALUES == Values::Signed { _mm256_sign_epi8(values, values) } else { values };
            for t in 0..T {
                // Sign trick, activation side: q with the weight's sign (0 where w is 0).
                let q = if B::VALUES == Values::Signed { _mm256_sign_epi8(q[t], values) } else { q[t] };
                // Pairs of products into 16-bit lanes, pairs of those into 32-bit sums.
                products[t][r] = _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, q), ones);
            }
        }
        let (d, m) = (widen_f16_bits(d_bits), widen_f16_bits(m_bits));
        for t in 0..T {
            let p = &products[t];
            // Horizontal adds, twice: rows 0–3 of the low 16 columns in the
            // lower half, of the high 16 in the upper half; then the halves:
            // each row's exact block sum in its lane.
            let both = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
            let integers = _mm_add_epi32(_mm256_castsi256_si128(both), _mm256_extracti128_si256(both, 1));
            sums[t] = add_block(B::VALUES, sums[t], integers, sum_q[t], d, m, tokens[t].add(k));
        }
    }
    for (t, &rows) in sums.iter().enumerate() {
        store_rows(rows, out.add(t), batch, present_rows);
    }
}

/// Checks the shapes of a product (weights in blocks of `rows_per_block`
/// rows) and returns `(blocks a row, rows, batch)`.
pub(super) fn shapes(
    weights: usize,
    rows_per_block: usize,
    cols: usize,
    x: usize,
    out: usize,
) -> (usize, usize, usize) {
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
        let ahead = (batch == 1).then(|| w.wrapping_add((first + PREFETCH_TILES * TILE_ROWS) * blocks).cast());
        let mut token = 0;
        while token + TILE_TOKENS <= batch {
            let mut tokens = [activations; TILE_TOKENS];
            for (t, pointer) in tokens.iter_mut().enumerate() {
                *pointer = activations.add((token + t) * blocks);
            }
            let out = results.add(first * batch + token);
            row_tile::<B, TILE_TOKENS>(four, tokens, blocks, out, batch, present, None);
            token += TILE_TOKENS;
        }
        for token in token..batch {
            let out = results.add(first * batch + token);
            row_tile::<B, 1>(four, [activations.add(token * blocks)], blocks, out, batch, present, ahead);
        }
    }
}

/// An interleaved block of four rows as the kernels read it.
trait InterleavedBlock {
    /// What its values are.
    const VALUES: Values;
    /// Piece `i` of four: the four rows' stored values at the columns of
    /// the activation's four-byte words `2i` (lower half) and `2i + 1`
    /// (upper half), row `r` at bytes `4r .. 4r+4` of each half.
    ///
    /// # Safety
    /// `block` is readable; AVX2 is available.
    unsafe fn piece(block: *const Self, i: usize) -> __m256i;
    /// `(d, m)` of the four rows (`m` zero where there is none).
    ///
    /// # Safety
    /// `block` is readable; F16C is available.
    unsafe fn scales(block: *const Self) -> (__m128, __m128);
}

impl InterleavedBlock for BlockQ8x4 {
    const VALUES: Values = Values::Signed;
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
    const VALUES: Values = Values::Minimum;
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
    const VALUES: Values = Values::ZeroPoint;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn piece(block: *const Self, i: usize) -> __m256i {
        nibble_piece((&raw const (*block).qs).cast(), i)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scales(block: *const Self) -> (__m128, __m128) {
        (widen_f16x4((&raw const (*block).d).cast()), _mm_setzero_ps())
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
    ahead: Option<*const u8>,
) {
    let ones = _mm256_set1_epi16(1);
    let mut sums = [[_mm_setzero_ps(); T]; G];
    for k in 0..blocks {
        if let Some(tile) = ahead {
            prefetch_share(tile, k, G * std::mem::size_of::<B>());
        }
        // Eight lanes a group and activation: rows 0..4 over the even column
        // groups in the lower half, over the odd ones in the upper half.
        let mut integers = [[_mm256_setzero_si256(); T]; G];
        let mut sum_q = [_mm_setzero_si128(); T];
        for i in 0..4 {
            // The activation's words 2i (lower half) and 2i+1 (upper half),
            // each repeated for the four rows.
            let (even, odd) = (2 * i as i32, 2 * i as i32 + 1);
            let spread = _mm256_setr_epi32(even, even, even, even, odd, odd, odd, odd);
            let mut q = [_mm256_setzero_si256(); T];
            for t in 0..T {
                let activation = _mm256_loadu_si256((&raw const (*tokens[t].add(k)).qs).cast());
                if i == 0 && B::VALUES == Values::ZeroPoint {
                    sum_q[t] = activation_sum(activation);
                }
                q[t] = _mm256_permutevar8x32_epi32(activation, spread);
            }
            for g in 0..G {
                let values = B::piece(groups[g].add(k), i);
                // Sign trick, weight side: |w| as the unsigned operand.
                let signed = B::VALUES == Values::Signed;
                let unsigned = if signed { _mm256_sign_epi8(values, values) } else { values };
                for t in 0..T {
                    if signed {
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
            let (d, m) = B::scales(groups[g].add(k));
            for t in 0..T {
                // Adjacent 16-bit lanes into 32-bit sums (nibbles), then the
                // even and odd column groups: each row's exact block sum.
                let whole =
                    if B::VALUES == Values::Signed { integers[g][t] } else { _mm256_madd_epi16(integers[g][t], ones) };
                let rows = _mm_add_epi32(_mm256_castsi256_si128(whole), _mm256_extracti128_si256(whole, 1));
                sums[g][t] = add_block(B::VALUES, sums[g][t], rows, sum_q[t], d, m, tokens[t].add(k));
            }
        }
    }
    for (g, group) in sums[..present_groups].iter().enumerate() {
        for (t, &rows) in group.iter().enumerate() {
            store_rows(rows, out.add(g * INTERLEAVE * batch + t), batch, INTERLEAVE);
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
        // Wide tiles of eight groups: the next one is far enough ahead.
        let ahead = (batch == 1).then(|| w.wrapping_add((first + G) * blocks).cast());
        let mut token = 0;
        while token + T <= batch {
            let mut tokens = [activations; T];
            for (t, pointer) in tokens.iter_mut().enumerate() {
                *pointer = activations.add((token + t) * blocks);
            }
            interleaved_tile::<B, G, T>(tile, tokens, blocks, out.add(token), batch, present, ahead);
            token += T;
        }
        for token in token..batch {
            let one = [activations.add(token * blocks)];
            interleaved_tile::<B, G, 1>(tile, one, blocks, out.add(token), batch, present, ahead);
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

// The float products (f16 and f32 weights × f32 activations: the f16 image
// that calibration, `--imatrix` and the bias tools run on the host). Unlike
// the integer kernels they are not the reference's bit for bit: they use
// fused multiply-adds and their own summation order, as the NEON ones do,
// within the float-dot budget the kernel tests name.

/// Values of an f16 row widened to f32 at a time (on the stack, 4 KiB), so
/// that every activation of a tile multiplies the widened piece.
const FLOAT_PIECE: usize = 1024;
/// Activations of a float tile: each weight vector loaded (and widened) once
/// serves this many.
const FLOAT_TILE_TOKENS: usize = 4;

/// The eight lanes of `v` added.
#[target_feature(enable = "avx2")]
fn lanes_sum(v: __m256) -> f32 {
    let four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)))
}

/// `out[k] += Σ_j w[j]·x[(first + k)·cols + offset + j]` for the `T`
/// activations from `first`: sixteen values a step in two accumulators an
/// activation, each weight load shared by the tile.
#[target_feature(enable = "avx2,fma")]
fn float_tile<const T: usize>(w: &[f32], x: &[f32], cols: usize, offset: usize, first: usize, out: &mut [f32]) {
    let n = w.len();
    let rows: [&[f32]; T] = std::array::from_fn(|k| &x[(first + k) * cols + offset..][..n]);
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    let mut j = 0;
    while j + 16 <= n {
        // SAFETY: `j + 16 ≤ n`, the length of `w` and of every row.
        unsafe {
            let (w0, w1) = (_mm256_loadu_ps(w.as_ptr().add(j)), _mm256_loadu_ps(w.as_ptr().add(j + 8)));
            for k in 0..T {
                let xp = rows[k].as_ptr().add(j);
                acc[k][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc[k][0]);
                acc[k][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), acc[k][1]);
            }
        }
        j += 16;
    }
    for k in 0..T {
        let tail: f32 = w[j..].iter().zip(&rows[k][j..]).map(|(a, b)| a * b).sum();
        out[k] += lanes_sum(_mm256_add_ps(acc[k][0], acc[k][1])) + tail;
    }
}

/// `out[b] += Σ w·x_b` over one piece of a row (`offset` its first column)
/// for every activation `b` of the batch, in tiles of [`FLOAT_TILE_TOKENS`].
#[target_feature(enable = "avx2,fma")]
fn float_piece(w: &[f32], x: &[f32], cols: usize, offset: usize, out: &mut [f32]) {
    let mut first = 0;
    while first < out.len() {
        let tile = &mut out[first..];
        match tile.len().min(FLOAT_TILE_TOKENS) {
            4 => float_tile::<4>(w, x, cols, offset, first, tile),
            3 => float_tile::<3>(w, x, cols, offset, first, tile),
            2 => float_tile::<2>(w, x, cols, offset, first, tile),
            _ => float_tile::<1>(w, x, cols, offset, first, tile),
        }
        first += FLOAT_TILE_TOKENS;
    }
}

/// Checks a float product's shape: `weights` whole rows of `cols`, `x` whole
/// activations, `out` one value a row and activation. Returns the batch.
fn float_shape(weights: usize, cols: usize, x: usize, out: usize) -> usize {
    assert!(
        cols > 0 && weights.is_multiple_of(cols) && x.is_multiple_of(cols),
        "float matmul: {weights} weights and {x} activation values are not whole rows of {cols}"
    );
    let batch = x / cols;
    assert_eq!(
        out,
        weights / cols * batch,
        "float matmul: {out} outputs for {} rows × {batch} activations",
        weights / cols
    );
    batch
}

/// f16 matrix × f32 activations: each row widened a piece at a time
/// (`vcvtph2ps`), the piece multiplied into every activation.
///
/// Panics on a CPU without AVX2, FMA and F16C (take the table from
/// `Kernels::detect`, which hands it out only where it runs).
pub fn matmul_f16(weights: &[f16], cols: usize, x: &[f32], out: &mut [f32]) {
    assert!(available(), "AVX2 kernel on a CPU without AVX2, FMA and F16C");
    let batch = float_shape(weights.len(), cols, x.len(), out.len());
    // SAFETY: the CPU has the features (checked above).
    unsafe { f16_rows(weights, cols, x, batch, out) }
}

/// `Σ w·x` over an f16 row and one activation, widened as it is read:
/// thirty-two values a step in four accumulators.
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_dot(w: &[f16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut j = 0;
    while j + 32 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: `j + 8k + 8 ≤ j + 32 ≤ n`, within both slices.
            unsafe {
                let h = _mm_loadu_si128(w.as_ptr().add(j + 8 * k).cast());
                *a = _mm256_fmadd_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(x.as_ptr().add(j + 8 * k)), *a);
            }
        }
        j += 32;
    }
    let tail: f32 = w[j..n].iter().zip(&x[j..n]).map(|(&a, b)| super::scalar::f16_to_f32(a) * b).sum();
    lanes_sum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) + tail
}

/// [`matmul_f16`] once the CPU is known to have the features: one
/// activation reads each row widened as it goes; a batch widens a piece of
/// a row once for all its activations.
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_rows(weights: &[f16], cols: usize, x: &[f32], batch: usize, out: &mut [f32]) {
    if batch == 1 {
        for (row, o) in weights.chunks_exact(cols).zip(out.iter_mut()) {
            *o = f16_dot(row, x);
        }
        return;
    }
    let mut widened = [0f32; FLOAT_PIECE];
    for (row, outputs) in weights.chunks_exact(cols).zip(out.chunks_exact_mut(batch)) {
        outputs.fill(0.0);
        for (p, piece) in row.chunks(FLOAT_PIECE).enumerate() {
            let w = &mut widened[..piece.len()];
            let mut j = 0;
            while j + 8 <= piece.len() {
                // SAFETY: `j + 8 ≤ piece.len() = w.len()`: eight f16 read, eight f32 written.
                unsafe {
                    let h = _mm_loadu_si128(piece.as_ptr().add(j).cast());
                    _mm256_storeu_ps(w.as_mut_ptr().add(j), _mm256_cvtph_ps(h));
                }
                j += 8;
            }
            for (o, &v) in w[j..].iter_mut().zip(&piece[j..]) {
                *o = super::scalar::f16_to_f32(v);
            }
            float_piece(w, x, cols, p * FLOAT_PIECE, outputs);
        }
    }
}

/// f32 matrix × f32 activations.
///
/// Panics on a CPU without AVX2, FMA and F16C (take the table from
/// `Kernels::detect`, which hands it out only where it runs).
pub fn matmul_f32(weights: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
    assert!(available(), "AVX2 kernel on a CPU without AVX2, FMA and F16C");
    let batch = float_shape(weights.len(), cols, x.len(), out.len());
    for (row, outputs) in weights.chunks_exact(cols).zip(out.chunks_exact_mut(batch)) {
        outputs.fill(0.0);
        // SAFETY: the CPU has the features (checked above).
        unsafe { float_piece(row, x, cols, 0, outputs) }
    }
}
