//! AVX-512 VNNI kernels for x86-64 hosts (with AVX-512 F, BW, VL and VNNI,
//! beside AVX2, FMA and F16C): the quantized matrix × int8 activation
//! products, row-major and four-row interleaved, for one activation
//! (decode) and for a batch (a prompt), bit for bit the scalar reference
//! [`super::scalar`], as the AVX2 kernels ([`super::avx2`]) are and for the
//! same reason (a last-bit difference in one product moves the logits
//! through the next layer's int8 rounding).
//!
//! The integer step is `vpdpbusd`: unsigned bytes × signed bytes, four
//! adjacent products added into a 32-bit lane, exactly (no 16-bit pairs and
//! no saturation on the way, unlike `vpmaddubsw`). The weights are the
//! unsigned operand, as stored plus a zero point `z`: nibbles 0..=15 (`z` = 0
//! for Q4, whose minimum is added in float, `z` = 8 for Q4S) and int8 values
//! with the sign bit flipped, `w + 128` in 0..=255 (`z` = 128). The
//! activation is the signed operand, any int8 value, −128 included (which the
//! sign trick cannot negate). `Σ(u − z)·q = Σu·q − z·Σq`: the accumulators
//! start at `−z·Σq`, itself a `vpdpbusd` of a vector of `z`, once for each
//! activation block.
//!
//! A tile is units of 16 rows × `T` activations. For each column block, a
//! unit takes eight `vpdpbusd` (two for each four rows), which leave every
//! row's sum spread over four 32-bit lanes; a tree of shuffles and adds turns
//! the four accumulators into one vector of the 16 rows' exact block sums,
//! row `i` in lane `i`. The block's float contribution is then computed and
//! added in the reference's order with its roundings (no fused
//! multiply-add), 16 rows a vector.
//!
//! - Row-major rows: four rows' 16-byte runs (packed nibbles, or half an
//!   int8 block) go to the four 128-bit lanes, the activation's 16 matching
//!   bytes are broadcast to every lane. Rows `R, R+4, R+8, R+12` share a
//!   vector, so that the tree (unpacks within 128-bit lanes) leaves row `i`
//!   in lane `i`; the scales come in the same way.
//! - Interleaved groups ([`crate::quant::Interleaved`]): one 64-byte load is
//!   a group's four rows at four activation words (word `c` in 128-bit lane
//!   `c`, row `r` at 32-bit lane `r`), so the activation word `c` is spread
//!   over lane `c` (`vpermd`) and the tree adds across 128-bit lanes.
//!
//! Tiles: two units (32 rows) for one activation, which prefetch the next
//! tile as they go (decode is bound by memory: SmolLM2-135M's 92 MiB of
//! weights a token); one unit × four activations for a batch.

use super::avx2::shapes;
use crate::quant::{BlockQ4, BlockQ4S, BlockQ4Sx4, BlockQ4x4, BlockQ8, BlockQ8Act, BlockQ8x4, INTERLEAVE};
use std::arch::x86_64::*;

/// Whether this CPU runs these kernels (and the AVX2 activation
/// quantization the table pairs them with).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && super::avx2::available()
}

/// Rows of a unit: one 512-bit vector of 32-bit sums.
const UNIT_ROWS: usize = 16;
/// Units of a tile for one activation.
const UNITS_SINGLE: usize = 2;
/// Units of a tile for a batch.
const UNITS_BATCH: usize = 1;
/// Activations of a tile when the batch has more than one.
const TILE_TOKENS: usize = 4;
/// Bytes a prefetch brings in.
const CACHE_LINE: usize = 64;

/// How a layout's weights meet the activation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Row-major blocks: a block is one row's 32 values.
    Rows,
    /// Interleaved blocks: a block is four rows' 32 values.
    Interleaved,
}

/// A unit's weights at one column block, as the products read them.
struct Unit {
    /// Unsigned values at activation words 0–3 (per 128-bit lane, as the
    /// layout places them), for each four rows.
    low: [__m512i; 4],
    /// The same at activation words 4–7.
    high: [__m512i; 4],
    /// The 16 rows' scales, row `i` in lane `i`.
    d: __m512,
    /// The 16 rows' minimums (Q4), else unused.
    m: __m512,
}

/// A weight block as these kernels read it.
trait Weights: Sized {
    /// Where its rows' values sit in the vectors.
    const LAYOUT: Layout;
    /// The zero point `z`: the unsigned operand is the value plus `z`.
    const ZERO: u8;
    /// Whether a value has a minimum `m` added (`d·n + m`, Q4).
    const MINIMUM: bool;
    /// Rows a block holds.
    const ROWS: usize = match Self::LAYOUT {
        Layout::Rows => 1,
        Layout::Interleaved => INTERLEAVE,
    };
    /// A unit's values and scales at one column block. Row-major: `blocks`
    /// are the 16 rows' blocks. Interleaved: `blocks[..4]` are the four groups' blocks.
    ///
    /// # Safety
    /// Those blocks are readable; the CPU has the features of [`available`].
    unsafe fn unit(blocks: &[*const Self; UNIT_ROWS]) -> Unit;
}

/// Four 16-byte runs to the four 128-bit lanes of a vector.
///
/// # Safety
/// Each pointer is valid for 16 bytes; AVX-512 F is available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn four_runs(runs: [*const u8; 4]) -> __m512i {
    let v = _mm512_castsi128_si512(_mm_loadu_si128(runs[0].cast()));
    let v = _mm512_inserti32x4::<1>(v, _mm_loadu_si128(runs[1].cast()));
    let v = _mm512_inserti32x4::<2>(v, _mm_loadu_si128(runs[2].cast()));
    _mm512_inserti32x4::<3>(v, _mm_loadu_si128(runs[3].cast()))
}

/// Packed nibbles to (low nibbles, high nibbles), each 0..=15 a byte.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn nibbles(packed: __m512i) -> (__m512i, __m512i) {
    let mask = _mm512_set1_epi8(0x0F);
    // 16-bit shifts: the mask drops what crosses from the neighbouring byte.
    (_mm512_and_si512(packed, mask), _mm512_and_si512(_mm512_srli_epi16::<4>(packed), mask))
}

/// int8 values to `w + 128` as unsigned bytes (the sign bit flipped).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn offset_binary(values: __m512i) -> __m512i {
    _mm512_xor_si512(values, _mm512_set1_epi8(-128))
}

/// The scales (a block's first two bytes) and minimums (the next two) of a
/// unit's 16 row-major blocks to f32, row `i` in lane `i`. Sixteen-byte
/// loads of the four rows of each quad put each row's first four bytes at
/// 32-bit lane 0 of a 128-bit lane; two rounds of unpacks bring lane 0 of
/// rows `4j .. 4j+4` together into 128-bit lane `j`. (A `vpgatherdd` of the
/// sixteen words took a third of the Q8 product's time.)
///
/// # Safety
/// Every block is readable for 16 bytes; AVX-512 F is available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn row_scales(blocks: &[*const u8; UNIT_ROWS]) -> (__m512, __m512) {
    let [a, b, c, d] = [0, 1, 2, 3].map(|r| four_runs(quad(blocks, r)));
    let words = _mm512_unpacklo_epi64(_mm512_unpacklo_epi32(a, b), _mm512_unpacklo_epi32(c, d));
    let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words));
    let m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(words)));
    (d, m)
}

/// Row-major rows `R, R+4, R+8, R+12` of a unit: the rows whose sums the
/// tree puts in lanes `R, R+4, R+8, R+12`.
#[inline(always)]
fn quad<T: Copy>(rows: &[T; UNIT_ROWS], r: usize) -> [T; 4] {
    [rows[r], rows[r + 4], rows[r + 8], rows[r + 12]]
}

/// A unit of row-major 4-bit blocks (Q4 and Q4S alike): each row's packed
/// nibbles (`runs`) split into columns 0–15 (low nibbles) and 16–31 (high),
/// and the blocks' scales (for Q4S the "minimum" is its first two value
/// bytes, unused).
///
/// # Safety
/// Every block and run is readable for 16 bytes; AVX-512 F/BW is available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn nibble_unit(blocks: &[*const u8; UNIT_ROWS], runs: [*const u8; UNIT_ROWS]) -> Unit {
    let (mut low, mut high) = ([_mm512_setzero_si512(); 4], [_mm512_setzero_si512(); 4]);
    for r in 0..4 {
        (low[r], high[r]) = nibbles(four_runs(quad(&runs, r)));
    }
    let (d, m) = row_scales(blocks);
    Unit { low, high, d, m }
}

impl Weights for BlockQ8 {
    const LAYOUT: Layout = Layout::Rows;
    const ZERO: u8 = 128;
    const MINIMUM: bool = false;
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn unit(blocks: &[*const Self; UNIT_ROWS]) -> Unit {
        let runs: [*const u8; UNIT_ROWS] = blocks.map(|b| (&raw const (*b).qs).cast());
        let (mut low, mut high) = ([_mm512_setzero_si512(); 4], [_mm512_setzero_si512(); 4]);
        for r in 0..4 {
            // Columns 0–15 and 16–31 of four rows.
            low[r] = offset_binary(four_runs(quad(&runs, r)));
            high[r] = offset_binary(four_runs(quad(&runs, r).map(|p| p.add(16))));
        }
        let (d, m) = row_scales(&blocks.map(|b| b.cast()));
        Unit { low, high, d, m }
    }
}

impl Weights for BlockQ4 {
    const LAYOUT: Layout = Layout::Rows;
    const ZERO: u8 = 0;
    const MINIMUM: bool = true;
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn unit(blocks: &[*const Self; UNIT_ROWS]) -> Unit {
        nibble_unit(&blocks.map(|b| b.cast()), blocks.map(|b| (&raw const (*b).qs).cast()))
    }
}

impl Weights for BlockQ4S {
    const LAYOUT: Layout = Layout::Rows;
    const ZERO: u8 = 8;
    const MINIMUM: bool = false;
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn unit(blocks: &[*const Self; UNIT_ROWS]) -> Unit {
        nibble_unit(&blocks.map(|b| b.cast()), blocks.map(|b| (&raw const (*b).qs).cast()))
    }
}

/// Four interleaved blocks' first 16 bytes (four scales, then four
/// minimums or the first values) to f32 (scales, minimums), group `g`'s row
/// `r` in lane `4g + r`.
///
/// # Safety
/// Each pointer is valid for 16 bytes; AVX-512 F is available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn group_scales(blocks: [*const u8; 4]) -> (__m512, __m512) {
    // Each lane's first eight bytes to the lower half, the second eight to the upper.
    let halves = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), four_runs(blocks));
    (_mm512_cvtph_ps(_mm512_castsi512_si256(halves)), _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(halves)))
}

/// The first four pointers of a unit (an interleaved unit's four groups).
#[inline(always)]
fn groups<T: Copy>(blocks: &[T; UNIT_ROWS]) -> [T; 4] {
    [blocks[0], blocks[1], blocks[2], blocks[3]]
}

impl Weights for BlockQ8x4 {
    const LAYOUT: Layout = Layout::Interleaved;
    const ZERO: u8 = 128;
    const MINIMUM: bool = false;
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn unit(blocks: &[*const Self; UNIT_ROWS]) -> Unit {
        let (mut low, mut high) = ([_mm512_setzero_si512(); 4], [_mm512_setzero_si512(); 4]);
        for (g, &block) in groups(blocks).iter().enumerate() {
            // Bytes 0–63: column words 0–3 of the four rows; 64–127: words 4–7.
            let values = (&raw const (*block).qs).cast::<u8>();
            low[g] = offset_binary(_mm512_loadu_si512(values.cast()));
            high[g] = offset_binary(_mm512_loadu_si512(values.add(64).cast()));
        }
        let (d, m) = group_scales(groups(blocks).map(|b| b.cast()));
        Unit { low, high, d, m }
    }
}

impl Weights for BlockQ4x4 {
    const LAYOUT: Layout = Layout::Interleaved;
    const ZERO: u8 = 0;
    const MINIMUM: bool = true;
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn unit(blocks: &[*const Self; UNIT_ROWS]) -> Unit {
        let (mut low, mut high) = ([_mm512_setzero_si512(); 4], [_mm512_setzero_si512(); 4]);
        for (g, &block) in groups(blocks).iter().enumerate() {
            // Low nibbles: column words 0–3 of the four rows; high: words 4–7.
            (low[g], high[g]) = nibbles(_mm512_loadu_si512((&raw const (*block).qs).cast()));
        }
        let (d, m) = group_scales(groups(blocks).map(|b| b.cast()));
        Unit { low, high, d, m }
    }
}

impl Weights for BlockQ4Sx4 {
    const LAYOUT: Layout = Layout::Interleaved;
    const ZERO: u8 = 8;
    const MINIMUM: bool = false;
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn unit(blocks: &[*const Self; UNIT_ROWS]) -> Unit {
        let (mut low, mut high) = ([_mm512_setzero_si512(); 4], [_mm512_setzero_si512(); 4]);
        for (g, &block) in groups(blocks).iter().enumerate() {
            (low[g], high[g]) = nibbles(_mm512_loadu_si512((&raw const (*block).qs).cast()));
        }
        let (d, m) = group_scales(groups(blocks).map(|b| b.cast()));
        Unit { low, high, d, m }
    }
}

/// One activation block as the products read it, for a layout: its bytes at
/// words 0–3 and 4–7 placed to meet [`Unit::low`] and [`Unit::high`], and
/// `−z·Σq` spread so that the tree of [`block_sums`] adds it up once a row.
struct Activation {
    low: __m512i,
    high: __m512i,
    start: __m512i,
}

/// # Safety
/// `block` is readable; the CPU has the features of [`available`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn activation<W: Weights>(block: *const BlockQ8Act) -> Activation {
    let q = (&raw const (*block).qs).cast::<u8>();
    let (low, high) = match W::LAYOUT {
        // Bytes 0–15 and 16–31 to every 128-bit lane (a row each).
        Layout::Rows => (
            _mm512_broadcast_i32x4(_mm_loadu_si128(q.cast())),
            _mm512_broadcast_i32x4(_mm_loadu_si128(q.add(16).cast())),
        ),
        // Word c over 128-bit lane c (words 0–3), word 4 + c (4–7).
        Layout::Interleaved => {
            let words = _mm512_castsi256_si512(_mm256_loadu_si256(q.cast()));
            (
                _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), words),
                _mm512_permutexvar_epi32(_mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7), words),
            )
        }
    };
    let start = if W::ZERO == 0 {
        _mm512_setzero_si512()
    } else {
        // z·q over the same lanes the products take, negated: each row's
        // tree adds −z·Σq into its sum.
        let z = _mm512_set1_epi8(W::ZERO as i8);
        let zq = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), z, low), z, high);
        _mm512_sub_epi32(_mm512_setzero_si512(), zq)
    };
    Activation { low, high, start }
}

/// The 16 rows' exact block sums, row `i` in lane `i`, from the four
/// accumulators of a unit (one for each four rows).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn block_sums<W: Weights>(sums: [__m512i; 4]) -> __m512i {
    match W::LAYOUT {
        // Accumulator R: row 4j + R's four partial sums in 128-bit lane j.
        // Unpacks pair them up within each lane: [a0+a2, b0+b2, a1+a3, b1+b3],
        // then [a, b, c, d] = rows 4j .. 4j+4 in lane j.
        Layout::Rows => {
            let [a, b, c, d] = sums;
            let ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
            let cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
            _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd))
        }
        // Accumulator g: group g's rows at 32-bit lanes 0–3 of every
        // 128-bit lane c (one partial sum a lane). Lanes 0+2 and 1+3 of two
        // groups, then the two partials of four groups: group g in lane g.
        Layout::Interleaved => {
            let [a, b, c, d] = sums;
            let ab = _mm512_add_epi32(
                _mm512_shuffle_i32x4::<0b01_00_01_00>(a, b),
                _mm512_shuffle_i32x4::<0b11_10_11_10>(a, b),
            );
            let cd = _mm512_add_epi32(
                _mm512_shuffle_i32x4::<0b01_00_01_00>(c, d),
                _mm512_shuffle_i32x4::<0b11_10_11_10>(c, d),
            );
            _mm512_add_epi32(
                _mm512_shuffle_i32x4::<0b10_00_10_00>(ab, cd),
                _mm512_shuffle_i32x4::<0b11_01_11_01>(ab, cd),
            )
        }
    }
}

/// `U` units of 16 rows × `T` activations of `blocks` blocks: row `16u + i`
/// with activation `t` to `out[(16u + i)·batch + t]` for `16u + i < present`
/// (the other rows repeat a present one and are dropped).
///
/// # Safety
/// Every pointer in `units` (the rows' or groups' first blocks, as
/// [`Weights::unit`] takes them) and `tokens` is valid
/// for `blocks` blocks, `out` for those writes; the CPU has the features of
/// [`available`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile<W: Weights, const U: usize, const T: usize>(
    units: &[[*const W; UNIT_ROWS]; U],
    tokens: [*const BlockQ8Act; T],
    blocks: usize,
    out: *mut f32,
    batch: usize,
    present: usize,
    next: Option<*const u8>,
) {
    // The next tile's bytes, a column block's worth at each block of this one.
    let ahead = U * UNIT_ROWS / W::ROWS * std::mem::size_of::<W>();
    let mut sums = [[_mm512_setzero_ps(); T]; U];
    for k in 0..blocks {
        if let Some(next) = next {
            for line in (0..ahead).step_by(CACHE_LINE) {
                // A hint only: it never faults, wherever it points.
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(k * ahead + line).cast());
            }
        }
        for u in 0..U {
            let weights = W::unit(&units[u].map(|b| b.add(k)));
            for t in 0..T {
                let token = tokens[t].add(k);
                let x = activation::<W>(token);
                // Each four rows' products, from −z·Σq.
                let mut integers = [x.start; 4];
                for (r, sum) in integers.iter_mut().enumerate() {
                    *sum = _mm512_dpbusd_epi32(*sum, weights.low[r], x.low);
                    *sum = _mm512_dpbusd_epi32(*sum, weights.high[r], x.high);
                }
                let integers = block_sums::<W>(integers);
                // The reference's float steps: (d·dₓ)·Σ, plus m·s for Q4, added to the sum.
                let scale = _mm512_mul_ps(weights.d, _mm512_set1_ps((*token).d));
                let mut term = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(integers));
                if W::MINIMUM {
                    term = _mm512_add_ps(term, _mm512_mul_ps(weights.m, _mm512_set1_ps((*token).s)));
                }
                sums[u][t] = _mm512_add_ps(sums[u][t], term);
            }
        }
    }
    for (u, unit) in sums.iter().enumerate() {
        let rows = present.saturating_sub(u * UNIT_ROWS).min(UNIT_ROWS);
        for (t, &sum) in unit.iter().enumerate() {
            let mut lanes = [0f32; UNIT_ROWS];
            _mm512_storeu_ps(lanes.as_mut_ptr(), sum);
            for (i, &v) in lanes[..rows].iter().enumerate() {
                *out.add((u * UNIT_ROWS + i) * batch + t) = v;
            }
        }
    }
}

/// Every tile of a product: `16·U` rows at a time (the last tile repeats its
/// last row or group) × `T` activations, the activations left over one at a time.
///
/// # Safety
/// The CPU has the features of [`available`]; `blocks`, `rows` and `batch`
/// are the checked shapes of `weights`, `x` and `out`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tiles<W: Weights, const U: usize, const T: usize>(
    weights: &[W],
    blocks: usize,
    rows: usize,
    x: &[BlockQ8Act],
    batch: usize,
    out: &mut [f32],
) {
    let (w, activations, results) = (weights.as_ptr(), x.as_ptr(), out.as_mut_ptr());
    let last_block = weights.len() / blocks - 1;
    for first in (0..rows).step_by(U * UNIT_ROWS) {
        let present = (U * UNIT_ROWS).min(rows - first);
        // Row `first + 16u + i` (row-major) or group `first/4 + 4u + i`
        // (interleaved, i < 4) as lane `i` of unit `u`, clamped to the last.
        let mut units = [[w; UNIT_ROWS]; U];
        for (u, unit) in units.iter_mut().enumerate() {
            for (i, block) in unit.iter_mut().enumerate() {
                *block = w.add((first / W::ROWS + u * UNIT_ROWS / W::ROWS + i).min(last_block) * blocks);
            }
        }
        let out = results.add(first * batch);
        // One activation reads the weights once, 16·U rows' short runs at a
        // time, too many streams for the hardware prefetcher to follow: the
        // tile prefetches the next one (contiguous in memory) as it goes.
        // A batch reads a tile's weights once for each tile of activations.
        let next = (batch == 1).then(|| w.wrapping_add((first + U * UNIT_ROWS) / W::ROWS * blocks).cast::<u8>());
        let mut token = 0;
        while token + T <= batch {
            let tokens: [*const BlockQ8Act; T] = std::array::from_fn(|t| activations.add((token + t) * blocks));
            tile::<W, U, T>(&units, tokens, blocks, out.add(token), batch, present, next);
            token += T;
        }
        for token in token..batch {
            let one = [activations.add(token * blocks)];
            tile::<W, U, 1>(&units, one, blocks, out.add(token), batch, present, next);
        }
    }
}

/// A product: wide tiles of rows for one activation, tiles of rows ×
/// activations for a batch.
///
/// # Safety
/// The CPU has the features of [`available`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn matmul<W: Weights>(weights: &[W], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    let (blocks, rows, batch) = shapes(weights.len(), W::ROWS, cols, x.len(), out.len());
    if batch == 1 {
        tiles::<W, UNITS_SINGLE, 1>(weights, blocks, rows, x, batch, out)
    } else {
        tiles::<W, UNITS_BATCH, TILE_TOKENS>(weights, blocks, rows, x, batch, out)
    }
}

/// One public kernel: checks the CPU once a call, then runs the AVX-512 code.
macro_rules! avx512_kernel {
    ($(#[$doc:meta])* $name:ident, $block:ty) => {
        $(#[$doc])*
        ///
        /// Panics on a CPU without AVX-512 F, BW, VL and VNNI, AVX2, FMA and
        /// F16C (take the table from `Kernels::detect`, which hands it out
        /// only where it runs).
        pub fn $name(weights: &[$block], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
            assert!(available(), "AVX-512 VNNI kernel on a CPU without it");
            // SAFETY: the CPU has the features (checked above); `matmul`
            // checks the shapes before it reads or writes.
            unsafe { matmul(weights, cols, x, out) }
        }
    };
}

avx512_kernel!(
    /// Q8 matrix × int8 activations.
    matmul_q8, BlockQ8
);
avx512_kernel!(
    /// Asymmetric Q4 matrix × int8 activations.
    matmul_q4, BlockQ4
);
avx512_kernel!(
    /// Symmetric Q4 matrix × int8 activations.
    matmul_q4s, BlockQ4S
);
avx512_kernel!(
    /// Interleaved Q8 matrix × int8 activations.
    matmul_q8x4, BlockQ8x4
);
avx512_kernel!(
    /// Interleaved asymmetric Q4 matrix × int8 activations.
    matmul_q4x4, BlockQ4x4
);
avx512_kernel!(
    /// Interleaved symmetric Q4 matrix × int8 activations.
    matmul_q4sx4, BlockQ4Sx4
);
