//! K-quant products with AVX2 (and FMA and F16C, which every AVX2 CPU has):
//! the x86-64 hosts that run the tools (perplexity, conversion, calibration).
//!
//! Four weight rows go together against each activation block, so one
//! activation load serves four rows and the float scale math is one 128-bit
//! vector for the four (lane r for row r); the last tile of a matrix repeats
//! its last row where it has fewer than four, computed and dropped. Up to
//! four activations of a batch go together against each super-block, so its
//! levels are unpacked once for them.
//!
//! The integer step is `vpmaddubsw` (unsigned bytes × signed bytes, adjacent
//! pairs added into 16-bit lanes) and `vpmaddwd` by ones (adjacent 16-bit
//! lanes into 32-bit sums). The weight levels go in as the unsigned operand:
//!
//! - Q4_K, Q5_K: the levels are 0..16 and 0..32 already; `d·Σⱼ dₓ·(scaleⱼ·Σ
//!   n·q) − dmin·Σⱼ minⱼ·sₓ` as [`super::scalar`].
//! - Q6_K, Q3_K: the levels are signed (−32..32, −4..4), so the stored
//!   unsigned value `u = level + z` (zero point z = 32, 4) goes in, and the
//!   pair's `z·q₀ + z·q₁` (one more `vpmaddubsw`, of z against the
//!   activation, shared by the four rows) is subtracted from each 16-bit
//!   lane: `Σ level·q = Σ u·q − z·Σq`, exact in the lane (|level·q| ≤ 32·128,
//!   two of them fit). The sign trick (`vpsignb`) would not be exact here: an
//!   activation of −128 cannot take a weight's minus sign in int8.
//! - Q2_K: the levels are 0..4 and go in as they are, with Q6_K's pairs of
//!   scales; the minimums meet the activation's sums over each half of its
//!   block (`vpmaddubsw` of ones, shared by the four rows):
//!   `d·Σₖ dₓ·(s₀·Σ₀ + s₁·Σ₁) − dmin·Σₖ dₓ·(m₀·Σ₀q + m₁·Σ₁q)`.
//!
//! The four rows' 32-bit sums go through two rounds of horizontal adds
//! (`vphaddd`) into one vector: the lower half holds the rows' sums over the
//! first 16 values of the block, the upper half over the last 16, so Q6_K's
//! and Q3_K's two sub-block scales per activation block multiply the halves
//! (in float, exactly: the products stay below 2²⁴) before they are added.
//!
//! The sub-block scales of a super-block are unpacked once for its four rows
//! (32-bit shifts and masks on each row's packed bytes, then byte unpacks
//! that interleave the rows, `[sub-block][row]`) and widened to floats.
//!
//! The integer sums are exact; only the grouping of the float terms differs
//! from the reference, so results agree with it to rounding.

use crate::kernels::matmul::avx2::available;
use crate::kquant::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, QK_K};
use crate::quant::{BlockQ8Act, GROUP};
use std::arch::x86_64::*;
use std::mem::offset_of;

/// Rows one kernel step multiplies together (lanes of a 128-bit float vector).
const ROWS: usize = 4;

/// Activations of a batch one kernel step multiplies together.
const TILE: usize = 4;

/// Activation blocks per super-block.
const ACTIVATION_BLOCKS: usize = QK_K / GROUP;

/// A k-quant format's kernel step.
trait Kernel {
    /// The super-block.
    type Block;

    /// Four rows · `T` activations (1..=4): result t, lane r is row r against
    /// activation t.
    ///
    /// # Safety
    /// Each row points at `superblocks` readable blocks, each activation at
    /// `superblocks · 8` readable blocks; AVX2, FMA and F16C are available.
    unsafe fn tile<const T: usize>(
        rows: [*const Self::Block; ROWS],
        x: [*const BlockQ8Act; T],
        superblocks: usize,
    ) -> [__m128; T];
}

/// Every row of `weights` against every activation of `x`, into
/// `out[r·batch + b]`: four rows a step (the last step repeats its last row
/// where fewer are left), activations four, two or one at a time.
///
/// # Safety
/// AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let (w, activations, results) = (weights.as_ptr(), x.as_ptr(), out.as_mut_ptr());
    for first in (0..rows).step_by(ROWS) {
        // Rows `first..first + present` are inside `weights`, and so are the
        // repeats of the last of them.
        let present = ROWS.min(rows - first);
        let mut tile = [w; ROWS];
        for (r, row) in tile.iter_mut().enumerate() {
            *row = w.add((first + r.min(present - 1)) * superblocks);
        }
        let out = results.add(first * batch);
        let mut b = 0;
        while b < batch {
            let left = batch - b;
            if left >= TILE {
                let mut tokens = [activations; TILE];
                for (t, token) in tokens.iter_mut().enumerate() {
                    *token = activations.add((b + t) * blocks);
                }
                store(K::tile(tile, tokens, superblocks), out, batch, b, present);
                b += TILE;
            } else if left >= 2 {
                let tokens = [activations.add(b * blocks), activations.add((b + 1) * blocks)];
                store(K::tile(tile, tokens, superblocks), out, batch, b, present);
                b += 2;
            } else {
                store(K::tile(tile, [activations.add(b * blocks)], superblocks), out, batch, b, present);
                b += 1;
            }
        }
    }
}

/// Lane r of result t into `out[r·batch + first + t]` for the `present` rows.
///
/// # Safety
/// `out` has `present · batch` writable floats and `first + T ≤ batch`; AVX2
/// is available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn store<const T: usize>(results: [__m128; T], out: *mut f32, batch: usize, first: usize, present: usize) {
    for (t, &result) in results.iter().enumerate() {
        let mut lanes = [0f32; ROWS];
        _mm_storeu_ps(lanes.as_mut_ptr(), result);
        for (r, &v) in lanes[..present].iter().enumerate() {
            *out.add(r * batch + first + t) = v;
        }
    }
}

/// The four rows' f16 units (little-endian bytes) as the lanes of an f32 vector.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn units(bytes: [[u8; 2]; ROWS]) -> __m128 {
    let bits = bytes.map(u16::from_le_bytes);
    let packed = bits[0] as i64 | (bits[1] as i64) << 16 | (bits[2] as i64) << 32 | (bits[3] as i64) << 48;
    _mm_cvtph_ps(_mm_cvtsi64_si128(packed))
}

/// 32 bytes from `p`.
///
/// # Safety
/// `p` points at 32 readable bytes; AVX is available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load32(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

/// 16 bytes from `p`.
///
/// # Safety
/// `p` points at 16 readable bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load16(p: *const u8) -> __m128i {
    _mm_loadu_si128(p.cast())
}

/// The four rows' exact sums of their 32-bit lanes' halves: lane r of the
/// lower half is Σ of row r's lanes 0..4 (the block's first 16 values),
/// lane r of the upper half Σ of its lanes 4..8 (the last 16).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn halves_by_row(sums: [__m256i; ROWS]) -> __m256i {
    _mm256_hadd_epi32(_mm256_hadd_epi32(sums[0], sums[1]), _mm256_hadd_epi32(sums[2], sums[3]))
}

/// Four consecutive `[sub-block][row]` groups of `bytes` (unsigned) as
/// floats: `result[j]` lane r is byte `4j + r`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn widen_unsigned(bytes: __m128i) -> [__m128; 4] {
    let first = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
    let second = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes)));
    [
        _mm256_castps256_ps128(first),
        _mm256_extractf128_ps::<1>(first),
        _mm256_castps256_ps128(second),
        _mm256_extractf128_ps::<1>(second),
    ]
}

/// The eight 6-bit scales and minimums of four Q4_K / Q5_K super-blocks
/// (ggml's `get_scale_min_k4`, see [`crate::kquant::scale_min_k4`]), from the
/// 16 bytes at each `start[r]` (the 12 packed bytes first): sub-block j's
/// scales and minimums as floats, lane r for row r.
///
/// In 32-bit words `u₀ u₁ u₂` of the packed bytes, each byte on its own:
/// scales 0–3 are `u₀ & 63`, minimums 0–3 `u₁ & 63`; scales 4–7 are the low
/// nibbles of `u₂` with the top two bits of `u₀` above them, minimums 4–7
/// the high nibbles of `u₂` with the top two bits of `u₁` (llama.cpp's
/// `utmp` shuffle, here one row in one vector).
///
/// # Safety
/// Each `start[r]` points at 16 readable bytes; AVX2 is available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k4_scales(start: [*const u8; ROWS]) -> ([__m128; 8], [__m128; 8]) {
    let (six_bits, nibble, two_bits) = (0x3F3F_3F3F, 0x0F0F_0F0F, 0x0303_0303);
    let mut unpacked = [_mm_setzero_si128(); ROWS];
    for r in 0..ROWS {
        let packed = load16(start[r]);
        // Words u₀ u₂ u₁ u₂: the low bits of scales 0–3, 4–7, minimums 0–3, 4–7.
        let low_words = _mm_shuffle_epi32::<0b10_01_10_00>(packed);
        let low = _mm_and_si128(
            _mm_srlv_epi32(low_words, _mm_setr_epi32(0, 0, 0, 4)),
            _mm_setr_epi32(six_bits, nibble, six_bits, nibble),
        );
        // Words · u₀ · u₁: the top two bits of scales 4–7 and minimums 4–7.
        let top_words = _mm_shuffle_epi32::<0b01_00_00_00>(packed);
        let top = _mm_slli_epi32::<4>(_mm_and_si128(
            _mm_srli_epi32::<6>(top_words),
            _mm_setr_epi32(0, two_bits, 0, two_bits),
        ));
        // Bytes 0..8 the row's scales, 8..16 its minimums.
        unpacked[r] = _mm_or_si128(low, top);
    }
    let scales_01 = _mm_unpacklo_epi8(unpacked[0], unpacked[1]);
    let scales_23 = _mm_unpacklo_epi8(unpacked[2], unpacked[3]);
    let minimums_01 = _mm_unpackhi_epi8(unpacked[0], unpacked[1]);
    let minimums_23 = _mm_unpackhi_epi8(unpacked[2], unpacked[3]);
    let (s0, s1) = (
        widen_unsigned(_mm_unpacklo_epi16(scales_01, scales_23)),
        widen_unsigned(_mm_unpackhi_epi16(scales_01, scales_23)),
    );
    let (m0, m1) = (
        widen_unsigned(_mm_unpacklo_epi16(minimums_01, minimums_23)),
        widen_unsigned(_mm_unpackhi_epi16(minimums_01, minimums_23)),
    );
    ([s0[0], s0[1], s0[2], s0[3], s1[0], s1[1], s1[2], s1[3]], [m0[0], m0[1], m0[2], m0[3], m1[0], m1[1], m1[2], m1[3]])
}

/// Sixteen signed scales of each of four rows (`rows[r]` byte i is row r's
/// scale i) as the eight pairs of an activation block: `pairs[k]` holds
/// scales 2k (lower half) and 2k + 1 (upper half) of rows 0..4, as floats.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn scale_pairs(rows: [__m128i; ROWS]) -> [__m256; 8] {
    // Bytes [i][r]: rows 0, 1 and 2, 3 interleaved, then the pairs of rows.
    let (first_01, first_23) = (_mm_unpacklo_epi8(rows[0], rows[1]), _mm_unpacklo_epi8(rows[2], rows[3]));
    let (last_01, last_23) = (_mm_unpackhi_epi8(rows[0], rows[1]), _mm_unpackhi_epi8(rows[2], rows[3]));
    let groups = [
        _mm_unpacklo_epi16(first_01, first_23),
        _mm_unpackhi_epi16(first_01, first_23),
        _mm_unpacklo_epi16(last_01, last_23),
        _mm_unpackhi_epi16(last_01, last_23),
    ];
    let mut pairs = [_mm256_setzero_ps(); 8];
    for (g, &group) in groups.iter().enumerate() {
        pairs[2 * g] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(group));
        pairs[2 * g + 1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(group, group)));
    }
    pairs
}

/// One Q4_K / Q5_K sub-block of 32 (`levels` of four rows, unsigned)
/// against activation block `sub` of each of `T` activations: `scaled[t]` +=
/// dₓ · (scale · Σ n·q), lane r for row r.
///
/// # Safety
/// Each `x[t]` points at `sub + 1` readable blocks; AVX2 and FMA are available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k4_sub_block<const T: usize>(
    levels: &[__m256i; ROWS],
    x: &[*const BlockQ8Act; T],
    sub: usize,
    scale: __m128,
    scaled: &mut [__m128; T],
) {
    let ones = _mm256_set1_epi16(1);
    for t in 0..T {
        let activation = x[t].add(sub);
        let q = load32((&raw const (*activation).qs).cast());
        let mut sums = [_mm256_setzero_si256(); ROWS];
        for r in 0..ROWS {
            // Level · q in pairs (16-bit lanes), pairs of pairs (32-bit lanes).
            sums[r] = _mm256_madd_epi16(_mm256_maddubs_epi16(levels[r], q), ones);
        }
        let halves = halves_by_row(sums);
        let isum = _mm_add_epi32(_mm256_castsi256_si128(halves), _mm256_extracti128_si256::<1>(halves));
        // scale · Σ n·q is an integer below 2²³ (63 · 32·31·128), exact in f32.
        let term = _mm_mul_ps(_mm_cvtepi32_ps(isum), scale);
        scaled[t] = _mm_fmadd_ps(term, _mm_set1_ps((*activation).d), scaled[t]);
    }
}

/// `Σⱼ minⱼ · sₓⱼ` over the eight activation blocks of a super-block from
/// each `x[t]`, lane r for row r (`minimums[j]` lane r is row r's minimum j).
///
/// # Safety
/// Each `x[t]` points at eight readable blocks; AVX2 and FMA are available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k4_minimum_terms<const T: usize>(minimums: &[__m128; 8], x: &[*const BlockQ8Act; T]) -> [__m128; T] {
    let mut terms = [_mm_setzero_ps(); T];
    for t in 0..T {
        for (j, &minimum) in minimums.iter().enumerate() {
            terms[t] = _mm_fmadd_ps(minimum, _mm_set1_ps((*x[t].add(j)).s), terms[t]);
        }
    }
    terms
}

/// One Q6_K / Q3_K / Q2_K activation block (`levels` of four rows as
/// unsigned values `level + z`, z in every byte of `zero_point`, none for
/// Q2_K's unsigned levels; two sub-blocks of 16 with the scales of `pair`,
/// see [`scale_pairs`]) against activation block `k` of each of `T`
/// activations: `scaled[t]` += dₓ · (s₀·Σ₀ + s₁·Σ₁).
///
/// # Safety
/// Each `x[t]` points at `k + 1` readable blocks; AVX2 and FMA are available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pair_of_sub_blocks<const T: usize>(
    levels: &[__m256i; ROWS],
    zero_point: Option<__m256i>,
    x: &[*const BlockQ8Act; T],
    k: usize,
    pair: __m256,
    scaled: &mut [__m128; T],
) {
    let ones = _mm256_set1_epi16(1);
    for t in 0..T {
        let activation = x[t].add(k);
        let q = load32((&raw const (*activation).qs).cast());
        // z·(q₀ + q₁) per pair, the same for every row.
        let offset = zero_point.map(|z| _mm256_maddubs_epi16(z, q));
        let mut sums = [_mm256_setzero_si256(); ROWS];
        for r in 0..ROWS {
            // (u₀·q₀ + u₁·q₁) − z·(q₀ + q₁) = level₀·q₀ + level₁·q₁, exact in 16 bits.
            let products = _mm256_maddubs_epi16(levels[r], q);
            let pairs = offset.map_or(products, |offset| _mm256_sub_epi16(products, offset));
            sums[r] = _mm256_madd_epi16(pairs, ones);
        }
        // Σ₀ of the rows in the lower half, Σ₁ in the upper; times s₀ and s₁
        // (at most 2²³ each, 128 · 16·32·128, their sum at most 2²⁴: exact),
        // then the halves added.
        let weighted = _mm256_mul_ps(_mm256_cvtepi32_ps(halves_by_row(sums)), pair);
        let isum = _mm_add_ps(_mm256_castps256_ps128(weighted), _mm256_extractf128_ps::<1>(weighted));
        scaled[t] = _mm_fmadd_ps(isum, _mm_set1_ps((*activation).d), scaled[t]);
    }
}

/// The four rows' pointers at super-block `block`, as bytes, and the
/// activations' pointers at its first activation block.
#[inline(always)]
fn at<B, const T: usize>(
    rows: [*const B; ROWS],
    x: [*const BlockQ8Act; T],
    block: usize,
) -> ([*const u8; ROWS], [*const BlockQ8Act; T]) {
    let mut blocks = [std::ptr::null::<u8>(); ROWS];
    for r in 0..ROWS {
        blocks[r] = rows[r].wrapping_add(block).cast();
    }
    let mut activations = x;
    for activation in activations.iter_mut() {
        *activation = activation.wrapping_add(block * ACTIVATION_BLOCKS);
    }
    (blocks, activations)
}

/// Q4_K: per 32 bytes of `qs`, sub-block 2c in the low nibbles, 2c + 1 in the high.
struct Q4K;

impl Kernel for Q4K {
    type Block = BlockQ4K;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const T: usize>(
        rows: [*const BlockQ4K; ROWS],
        x: [*const BlockQ8Act; T],
        superblocks: usize,
    ) -> [__m128; T] {
        let nibble = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm_setzero_ps(); T];
        for block in 0..superblocks {
            let (blocks, activations) = at(rows, x, block);
            let d = units([0, 1, 2, 3].map(|r| (*rows[r].add(block)).d));
            let dmin = units([0, 1, 2, 3].map(|r| (*rows[r].add(block)).dmin));
            let (scales, minimums) = k4_scales(blocks.map(|b| b.add(offset_of!(BlockQ4K, scales))));
            let mut scaled = [_mm_setzero_ps(); T];
            for chunk in 0..4 {
                let mut packed = [_mm256_setzero_si256(); ROWS];
                for r in 0..ROWS {
                    packed[r] = load32(blocks[r].add(offset_of!(BlockQ4K, qs) + 32 * chunk));
                }
                // Low nibbles: sub-block 2·chunk.
                let mut levels = [_mm256_setzero_si256(); ROWS];
                for r in 0..ROWS {
                    levels[r] = _mm256_and_si256(packed[r], nibble);
                }
                k4_sub_block(&levels, &activations, 2 * chunk, scales[2 * chunk], &mut scaled);
                // High nibbles (16-bit shifts: the mask drops what crosses
                // from the neighbouring byte): sub-block 2·chunk + 1.
                for r in 0..ROWS {
                    levels[r] = _mm256_and_si256(_mm256_srli_epi16::<4>(packed[r]), nibble);
                }
                k4_sub_block(&levels, &activations, 2 * chunk + 1, scales[2 * chunk + 1], &mut scaled);
            }
            let minimum_terms = k4_minimum_terms(&minimums, &activations);
            for t in 0..T {
                acc[t] = _mm_fnmadd_ps(minimum_terms[t], dmin, _mm_fmadd_ps(scaled[t], d, acc[t]));
            }
        }
        acc
    }
}

/// Q5_K: Q4_K's nibbles with a fifth bit, bit `sub` of `qh[l]`, on top.
struct Q5K;

impl Kernel for Q5K {
    type Block = BlockQ5K;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const T: usize>(
        rows: [*const BlockQ5K; ROWS],
        x: [*const BlockQ8Act; T],
        superblocks: usize,
    ) -> [__m128; T] {
        let (nibble, sixteen) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(16));
        let mut acc = [_mm_setzero_ps(); T];
        for block in 0..superblocks {
            let (blocks, activations) = at(rows, x, block);
            let d = units([0, 1, 2, 3].map(|r| (*rows[r].add(block)).d));
            let dmin = units([0, 1, 2, 3].map(|r| (*rows[r].add(block)).dmin));
            let (scales, minimums) = k4_scales(blocks.map(|b| b.add(offset_of!(BlockQ5K, scales))));
            let mut high_bits = [_mm256_setzero_si256(); ROWS];
            for r in 0..ROWS {
                high_bits[r] = load32(blocks[r].add(offset_of!(BlockQ5K, qh)));
            }
            let mut scaled = [_mm_setzero_ps(); T];
            for chunk in 0..4 {
                let mut packed = [_mm256_setzero_si256(); ROWS];
                for r in 0..ROWS {
                    packed[r] = load32(blocks[r].add(offset_of!(BlockQ5K, qs) + 32 * chunk));
                }
                let mut levels = [_mm256_setzero_si256(); ROWS];
                for high in 0..2 {
                    let sub = 2 * chunk + high;
                    let bit = _mm256_set1_epi8((1u8 << sub) as i8);
                    for r in 0..ROWS {
                        let low = if high == 0 { packed[r] } else { _mm256_srli_epi16::<4>(packed[r]) };
                        // 16 where bit `sub` of the qh byte is set.
                        let set = _mm256_cmpeq_epi8(_mm256_and_si256(high_bits[r], bit), bit);
                        levels[r] = _mm256_or_si256(_mm256_and_si256(low, nibble), _mm256_and_si256(set, sixteen));
                    }
                    k4_sub_block(&levels, &activations, sub, scales[sub], &mut scaled);
                }
            }
            let minimum_terms = k4_minimum_terms(&minimums, &activations);
            for t in 0..T {
                acc[t] = _mm_fnmadd_ps(minimum_terms[t], dmin, _mm_fmadd_ps(scaled[t], d, acc[t]));
            }
        }
        acc
    }
}

/// Bits `2·QUARTER` and `2·QUARTER + 1` of each byte of `v` moved to bits 4
/// and 5, the others cleared (16-bit shifts: the mask drops what crosses
/// from the neighbouring byte).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn q6k_top_bits<const QUARTER: usize>(v: __m256i) -> __m256i {
    let moved = match QUARTER {
        0 => _mm256_slli_epi16::<4>(v),
        1 => _mm256_slli_epi16::<2>(v),
        2 => v,
        _ => _mm256_srli_epi16::<2>(v),
    };
    _mm256_and_si256(moved, _mm256_set1_epi8(0x30))
}

/// Q6_K: quarter `QUARTER` (values `32·QUARTER..` of half `half`) of four
/// rows' super-blocks `blocks` against activation block `4·half + QUARTER`.
///
/// # Safety
/// Each `blocks[r]` points at a readable [`BlockQ6K`], each `x[t]` at eight
/// readable activation blocks; AVX2 and FMA are available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q6k_quarter<const QUARTER: usize, const T: usize>(
    blocks: &[*const u8; ROWS],
    x: &[*const BlockQ8Act; T],
    half: usize,
    pairs: &[__m256; 8],
    scaled: &mut [__m128; T],
) {
    let nibble = _mm256_set1_epi8(0x0F);
    let mut levels = [_mm256_setzero_si256(); ROWS];
    for r in 0..ROWS {
        // Low four bits: the low (quarters 0, 1) or high nibbles of `ql`.
        let low_bits = load32(blocks[r].add(offset_of!(BlockQ6K, ql) + 64 * half + 32 * (QUARTER % 2)));
        let low = if QUARTER < 2 { low_bits } else { _mm256_srli_epi16::<4>(low_bits) };
        let high_bits = load32(blocks[r].add(offset_of!(BlockQ6K, qh) + 32 * half));
        // The stored 6-bit value: level + 32.
        levels[r] = _mm256_or_si256(_mm256_and_si256(low, nibble), q6k_top_bits::<QUARTER>(high_bits));
    }
    let k = 4 * half + QUARTER;
    pair_of_sub_blocks(&levels, Some(_mm256_set1_epi8(32)), x, k, pairs[k], scaled);
}

/// The sixteen signed 8-bit scales of four Q6_K super-blocks, from the 16
/// bytes at each `start[r]`, as [`scale_pairs`].
///
/// # Safety
/// Each `start[r]` points at 16 readable bytes; AVX2 is available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q6k_scales(start: [*const u8; ROWS]) -> [__m256; 8] {
    let mut rows = [_mm_setzero_si128(); ROWS];
    for r in 0..ROWS {
        rows[r] = load16(start[r]);
    }
    scale_pairs(rows)
}

/// Q6_K: per half of 128 values, value `32k + l` (k < 4) has its low nibble
/// in `ql[64·half + 32·(k mod 2) + l]` (low nibble for k < 2, high after) and
/// its top two bits at bit 2k of `qh[32·half + l]`; levels are that minus 32.
struct Q6K;

impl Kernel for Q6K {
    type Block = BlockQ6K;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const T: usize>(
        rows: [*const BlockQ6K; ROWS],
        x: [*const BlockQ8Act; T],
        superblocks: usize,
    ) -> [__m128; T] {
        let mut acc = [_mm_setzero_ps(); T];
        for block in 0..superblocks {
            let (blocks, activations) = at(rows, x, block);
            let d = units([0, 1, 2, 3].map(|r| (*rows[r].add(block)).d));
            let pairs = q6k_scales(blocks.map(|b| b.add(offset_of!(BlockQ6K, scales))));
            let mut scaled = [_mm_setzero_ps(); T];
            for half in 0..2 {
                q6k_quarter::<0, T>(&blocks, &activations, half, &pairs, &mut scaled);
                q6k_quarter::<1, T>(&blocks, &activations, half, &pairs, &mut scaled);
                q6k_quarter::<2, T>(&blocks, &activations, half, &pairs, &mut scaled);
                q6k_quarter::<3, T>(&blocks, &activations, half, &pairs, &mut scaled);
            }
            for t in 0..T {
                acc[t] = _mm_fmadd_ps(scaled[t], d, acc[t]);
            }
        }
        acc
    }
}

/// The sixteen 6-bit scales of four Q3_K super-blocks, minus 32, from the 16
/// bytes at each `start[r]` (two bytes before the 12 packed ones, so the
/// load ends with the block), as [`scale_pairs`].
///
/// In 32-bit words `a₀ a₁ a₂` of the packed bytes, each byte on its own,
/// scales 4w..4w + 4 are the low (w < 2) or high nibbles of `a_(w mod 2)`
/// with bits `2w, 2w + 1` of `a₂` above them ([`BlockQ3K::scale`]).
///
/// # Safety
/// Each `start[r]` points at 16 readable bytes; AVX2 is available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q3k_scales(start: [*const u8; ROWS]) -> [__m256; 8] {
    let mut rows = [_mm_setzero_si128(); ROWS];
    for r in 0..ROWS {
        let packed = _mm_srli_si128::<2>(load16(start[r]));
        let low = _mm_and_si128(
            _mm_srlv_epi32(_mm_shuffle_epi32::<0b01_00_01_00>(packed), _mm_setr_epi32(0, 0, 4, 4)),
            _mm_set1_epi8(0x0F),
        );
        let high = _mm_and_si128(
            _mm_srlv_epi32(_mm_shuffle_epi32::<0b10_10_10_10>(packed), _mm_setr_epi32(0, 2, 4, 6)),
            _mm_set1_epi8(0x03),
        );
        rows[r] = _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi32::<4>(high)), _mm_set1_epi8(32));
    }
    scale_pairs(rows)
}

/// Bits `2·J` and `2·J + 1` of each byte of `v` moved to bits 0 and 1, the
/// others cleared.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn two_bits<const J: usize>(v: __m256i) -> __m256i {
    let moved = match J {
        0 => v,
        1 => _mm256_srli_epi16::<2>(v),
        2 => _mm256_srli_epi16::<4>(v),
        _ => _mm256_srli_epi16::<6>(v),
    };
    _mm256_and_si256(moved, _mm256_set1_epi8(3))
}

/// Q3_K: the 32 values `32·(4n + J)..` of four rows' super-blocks `blocks`
/// against activation block `4n + J`.
///
/// # Safety
/// Each `blocks[r]` points at a readable [`BlockQ3K`], each `x[t]` at eight
/// readable activation blocks; AVX2 and FMA are available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q3k_quarter<const J: usize, const T: usize>(
    blocks: &[*const u8; ROWS],
    x: &[*const BlockQ8Act; T],
    n: usize,
    pairs: &[__m256; 8],
    scaled: &mut [__m128; T],
) {
    let k = 4 * n + J;
    let (bit, four) = (_mm256_set1_epi8((1u8 << k) as i8), _mm256_set1_epi8(4));
    let mut levels = [_mm256_setzero_si256(); ROWS];
    for r in 0..ROWS {
        let low = two_bits::<J>(load32(blocks[r].add(offset_of!(BlockQ3K, qs) + 32 * n)));
        let high_bits = load32(blocks[r].add(offset_of!(BlockQ3K, hmask)));
        // 4 where bit k of the hmask byte is set: the stored 3-bit value is level + 4.
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(high_bits, bit), bit);
        levels[r] = _mm256_or_si256(low, _mm256_and_si256(set, four));
    }
    pair_of_sub_blocks(&levels, Some(four), x, k, pairs[k], scaled);
}

/// Q3_K: value `32k + l` of a half `n` (k = 4n + j) has two bits at bit 2j
/// of `qs[32n + l]`, and its level is 4 lower where bit k of `hmask[l]` is clear.
struct Q3K;

impl Kernel for Q3K {
    type Block = BlockQ3K;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const T: usize>(
        rows: [*const BlockQ3K; ROWS],
        x: [*const BlockQ8Act; T],
        superblocks: usize,
    ) -> [__m128; T] {
        let mut acc = [_mm_setzero_ps(); T];
        for block in 0..superblocks {
            let (blocks, activations) = at(rows, x, block);
            let d = units([0, 1, 2, 3].map(|r| (*rows[r].add(block)).d));
            let pairs = q3k_scales(blocks.map(|b| b.add(offset_of!(BlockQ3K, scales) - 2)));
            let mut scaled = [_mm_setzero_ps(); T];
            for n in 0..2 {
                q3k_quarter::<0, T>(&blocks, &activations, n, &pairs, &mut scaled);
                q3k_quarter::<1, T>(&blocks, &activations, n, &pairs, &mut scaled);
                q3k_quarter::<2, T>(&blocks, &activations, n, &pairs, &mut scaled);
                q3k_quarter::<3, T>(&blocks, &activations, n, &pairs, &mut scaled);
            }
            for t in 0..T {
                acc[t] = _mm_fmadd_ps(scaled[t], d, acc[t]);
            }
        }
        acc
    }
}

/// Q2_K's minimum terms of activation block `k` (minimums `m₀`, `m₁` of
/// its two sub-blocks of 16 in `pair`, as [`scale_pairs`] lays out scales)
/// against each of `T` activations: `minimums[t]` += dₓ · (m₀·Σ₀q + m₁·Σ₁q),
/// `Σₕq` the sum of the activation's values over half `h` of the block.
///
/// # Safety
/// Each `x[t]` points at `k + 1` readable blocks; AVX2 and FMA are available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q2k_minimums<const T: usize>(x: &[*const BlockQ8Act; T], k: usize, pair: __m256, minimums: &mut [__m128; T]) {
    let (ones8, ones16) = (_mm256_set1_epi8(1), _mm256_set1_epi16(1));
    for t in 0..T {
        let activation = x[t].add(k);
        let q = load32((&raw const (*activation).qs).cast());
        // Sums of four values (the first 16 values' in the lower half), then
        // of sixteen, in every lane of each half: [Σ₀ × 4 | Σ₁ × 4].
        let fours = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, q), ones16);
        let pairs = _mm256_hadd_epi32(fours, fours);
        let halves = _mm256_hadd_epi32(pairs, pairs);
        // m·Σq ≤ 15 · 16·128 and the pair's sum are exact in f32.
        let weighted = _mm256_mul_ps(_mm256_cvtepi32_ps(halves), pair);
        let msum = _mm_add_ps(_mm256_castps256_ps128(weighted), _mm256_extractf128_ps::<1>(weighted));
        minimums[t] = _mm_fmadd_ps(msum, _mm_set1_ps((*activation).d), minimums[t]);
    }
}

/// The sixteen 4-bit scales and minimums of four Q2_K super-blocks, from the
/// 16 bytes at each `start[r]` (scale in the low nibble, minimum in the
/// high one), each as [`scale_pairs`].
///
/// # Safety
/// Each `start[r]` points at 16 readable bytes; AVX2 is available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q2k_scales(start: [*const u8; ROWS]) -> ([__m256; 8], [__m256; 8]) {
    let nibble = _mm_set1_epi8(0x0F);
    let (mut scales, mut minimums) = ([_mm_setzero_si128(); ROWS], [_mm_setzero_si128(); ROWS]);
    for r in 0..ROWS {
        let packed = load16(start[r]);
        scales[r] = _mm_and_si128(packed, nibble);
        // 16-bit shifts: the mask drops what crosses from the neighbouring byte.
        minimums[r] = _mm_and_si128(_mm_srli_epi16::<4>(packed), nibble);
    }
    (scale_pairs(scales), scale_pairs(minimums))
}

/// Q2_K: the 32 values `32·(4n + J)..` of four rows' super-blocks `blocks`
/// against activation block `4n + J`: levels are bits `2J, 2J + 1` of
/// `qs[32n + l]`, as Q3_K's low bits.
///
/// # Safety
/// Each `blocks[r]` points at a readable [`BlockQ2K`], each `x[t]` at eight
/// readable activation blocks; AVX2 and FMA are available.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q2k_quarter<const J: usize, const T: usize>(
    blocks: &[*const u8; ROWS],
    x: &[*const BlockQ8Act; T],
    n: usize,
    (pairs, minimum_pairs): (&[__m256; 8], &[__m256; 8]),
    (scaled, minimums): (&mut [__m128; T], &mut [__m128; T]),
) {
    let k = 4 * n + J;
    let mut levels = [_mm256_setzero_si256(); ROWS];
    for r in 0..ROWS {
        levels[r] = two_bits::<J>(load32(blocks[r].add(offset_of!(BlockQ2K, qs) + 32 * n)));
    }
    pair_of_sub_blocks(&levels, None, x, k, pairs[k], scaled);
    q2k_minimums(x, k, minimum_pairs[k], minimums);
}

/// Q2_K: value `32k + l` of a half `n` (k = 4n + j) has its level at bits
/// 2j of `qs[32n + l]`; sub-block `i` of 16 its scale and minimum in the
/// low and high nibbles of `scales[i]`.
struct Q2K;

impl Kernel for Q2K {
    type Block = BlockQ2K;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const T: usize>(
        rows: [*const BlockQ2K; ROWS],
        x: [*const BlockQ8Act; T],
        superblocks: usize,
    ) -> [__m128; T] {
        let mut acc = [_mm_setzero_ps(); T];
        for block in 0..superblocks {
            let (blocks, activations) = at(rows, x, block);
            let d = units([0, 1, 2, 3].map(|r| (*rows[r].add(block)).d));
            let dmin = units([0, 1, 2, 3].map(|r| (*rows[r].add(block)).dmin));
            let (pairs, minimum_pairs) = q2k_scales(blocks.map(|b| b.add(offset_of!(BlockQ2K, scales))));
            let (mut scaled, mut minimums) = ([_mm_setzero_ps(); T], [_mm_setzero_ps(); T]);
            let (scales, sums) = ((&pairs, &minimum_pairs), (&mut scaled, &mut minimums));
            for n in 0..2 {
                q2k_quarter::<0, T>(&blocks, &activations, n, scales, (sums.0, sums.1));
                q2k_quarter::<1, T>(&blocks, &activations, n, scales, (sums.0, sums.1));
                q2k_quarter::<2, T>(&blocks, &activations, n, scales, (sums.0, sums.1));
                q2k_quarter::<3, T>(&blocks, &activations, n, scales, (sums.0, sums.1));
            }
            for t in 0..T {
                acc[t] = _mm_fnmadd_ps(minimums[t], dmin, _mm_fmadd_ps(scaled[t], d, acc[t]));
            }
        }
        acc
    }
}

/// One public kernel: checks the CPU once a call, then runs the AVX2 code.
macro_rules! avx2_kernel {
    ($(#[$doc:meta])* $name:ident, $block:ty, $format:ty) => {
        $(#[$doc])*
        ///
        /// Panics on a CPU without AVX2, FMA and F16C.
        pub fn $name(weights: &[$block], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
            assert!(available(), "AVX2 kernel on a CPU without AVX2, FMA and F16C");
            // SAFETY: the CPU has the features (checked above); the driver
            // checks the shapes before it reads or writes.
            unsafe { matmul::<$format>(weights, cols, x, out) }
        }
    };
}

avx2_kernel!(
    /// Q4_K matrix × int8 activations.
    matmul_q4k, BlockQ4K, Q4K
);
avx2_kernel!(
    /// Q5_K matrix × int8 activations.
    matmul_q5k, BlockQ5K, Q5K
);
avx2_kernel!(
    /// Q6_K matrix × int8 activations.
    matmul_q6k, BlockQ6K, Q6K
);
avx2_kernel!(
    /// Q3_K matrix × int8 activations.
    matmul_q3k, BlockQ3K, Q3K
);
avx2_kernel!(
    /// Q2_K matrix × int8 activations.
    matmul_q2k, BlockQ2K, Q2K
);
#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kernels::matmul::kquant::test_support::{self, Format, Matmul, VariedRuns};

    /// Kernel against reference: both compute the same exact integer sums and
    /// differ only in how the float terms built from them are grouped and
    /// rounded. The reference rounds each term through at most four products
    /// and a subtraction, then adds it into one running sum of `cols/32`
    /// terms; the kernel rounds each term once (the fused multiply-add that
    /// adds it to its super-block's sum of eight), then once more scaling that
    /// sum by `d` (or `dmin`) into a running sum of `2·cols/256` terms. Either
    /// side is so within `n·u·Σ|terms|` of the exact value (u = 2⁻²⁴, n ≤
    /// `cols/32 + 10` roundings on any term's path), and the two within
    /// `n·2u` = `n·ε` of each other: ε = f32::EPSILON per rounding counted,
    /// relative to the sum of the terms' magnitudes ([`Format::magnitude`]),
    /// with [`terms`] counting generously.
    const ROUNDING_PER_TERM: f32 = f32::EPSILON;

    /// A bound on the roundings on any term's path, either side: at most
    /// this many per column / 16, plus this.
    fn terms(cols: usize) -> f32 {
        (cols / 16 + 8) as f32
    }

    /// The kernel against the reference at every shape of [`test_support::check`].
    fn check<B: Format>(kernel: Matmul<B>) {
        if !available() {
            eprintln!("{}: no AVX2, FMA and F16C on this CPU, skipped", B::NAME);
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
