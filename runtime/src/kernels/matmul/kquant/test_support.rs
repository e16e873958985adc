//! The test harness every k-quant kernel file shares: each SIMD kernel
//! against the scalar reference on the same blocks and activations, at every
//! shape of [`check`], each output within a tolerance the kernel's file
//! names, relative to the sum of its terms' magnitudes
//! ([`Format::magnitude`]).
//!
//! What a file chooses: the kernel (one per format), its tolerance (why it
//! is that size lives beside it), and where its data comes from
//! ([`VariedRuns`] or [`SuperBlockStyles`], each with its own generator).

// Only the x86-64 and aarch64 kernel files call the harness.
#![cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]

use super::scalar::{
    self, levels_q2k, levels_q3k, levels_q4k, levels_q5k, levels_q6k, scale_min_q2k, ACTIVATION_BLOCKS,
};
use crate::kernels::activation::scalar::quantize_activation;
use crate::kquant::{f16_value, scale_min_k4, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, QK_K};
use crate::quant::{BlockQ8Act, GROUP};
use bytemuck::Pod;
use std::mem::offset_of;
use std::ops::Range;

/// A k-quant product: `(weights, cols, activations, out)`, the contract of
/// [`crate::kernels::MatmulQuantized`].
pub(super) type Matmul<B> = fn(&[B], usize, &[BlockQ8Act], &mut [f32]);

/// A k-quant format under test: its block, its reference product, and what
/// the harness needs to make blocks and bound a sum's rounding.
pub(super) trait Format: Pod {
    /// Short name in failure messages.
    const NAME: &'static str;
    /// Byte offsets of the block's f16 units (`d`, and `dmin` where it has one).
    const UNITS: &'static [usize];
    /// The simple quantizer of 256 values.
    fn quantize(values: &[f32]) -> Self;
    /// The block's 256 values.
    fn dequantize(&self, out: &mut [f32]);
    /// The scalar reference product.
    fn reference(weights: &[Self], cols: usize, x: &[BlockQ8Act], out: &mut [f32]);
    /// Σ|terms| of the block's dot product with its eight activation blocks,
    /// in f64: what the float rounding of a row's sum is relative to.
    fn magnitude(&self, x: &[BlockQ8Act]) -> f64;
}

/// `Σ|n·q|` over `range` of a block's levels and an activation's values.
fn absolute_dot(levels: &[i8; GROUP], a: &BlockQ8Act, range: Range<usize>) -> f64 {
    range.map(|l| (levels[l] as i32 * a.qs[l] as i32).unsigned_abs() as f64).sum()
}

/// Q4_K and Q5_K: per sub-block, `|d·scale|·|dₓ|·Σ|n·q| + |dmin·min|·|dₓ|·Σ|q|`.
fn magnitude_k4(
    (d, dmin): ([u8; 2], [u8; 2]),
    packed: &[u8; 12],
    levels: impl Fn(usize) -> [i8; GROUP],
    x: &[BlockQ8Act],
) -> f64 {
    let (d, dmin) = (f16_value(d) as f64, f16_value(dmin) as f64);
    let mut sum = 0.0;
    for (sub, a) in x.iter().enumerate() {
        let (scale, min) = scale_min_k4(sub, packed);
        let dx = a.d.abs() as f64;
        let sum_q: f64 = a.qs.iter().map(|&q| (q as i32).unsigned_abs() as f64).sum();
        sum += (d * scale as f64).abs() * dx * absolute_dot(&levels(sub), a, 0..GROUP)
            + (dmin * min as f64).abs() * dx * sum_q;
    }
    sum
}

/// Q6_K and Q3_K: per sub-block of 16, `|d|·|dₓ|·|scale|·Σ|n·q|`.
fn magnitude_pairs(
    d: [u8; 2],
    scale: impl Fn(usize) -> i32,
    levels: impl Fn(usize) -> [i8; GROUP],
    x: &[BlockQ8Act],
) -> f64 {
    let unit = f16_value(d).abs() as f64;
    let mut sum = 0.0;
    for (k, a) in x.iter().enumerate() {
        let n = levels(k);
        let (s0, s1) = (scale(2 * k).unsigned_abs() as f64, scale(2 * k + 1).unsigned_abs() as f64);
        sum += unit * a.d.abs() as f64 * (s0 * absolute_dot(&n, a, 0..16) + s1 * absolute_dot(&n, a, 16..32));
    }
    sum
}

impl Format for BlockQ4K {
    const NAME: &'static str = "q4k";
    const UNITS: &'static [usize] = &[offset_of!(BlockQ4K, d), offset_of!(BlockQ4K, dmin)];
    fn quantize(values: &[f32]) -> Self {
        BlockQ4K::quantize(values)
    }
    fn dequantize(&self, out: &mut [f32]) {
        BlockQ4K::dequantize(self, out)
    }
    fn reference(weights: &[Self], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        scalar::matmul_q4k(weights, cols, x, out)
    }
    fn magnitude(&self, x: &[BlockQ8Act]) -> f64 {
        magnitude_k4((self.d, self.dmin), &self.scales, |sub| levels_q4k(self, sub), x)
    }
}

impl Format for BlockQ5K {
    const NAME: &'static str = "q5k";
    const UNITS: &'static [usize] = &[offset_of!(BlockQ5K, d), offset_of!(BlockQ5K, dmin)];
    fn quantize(values: &[f32]) -> Self {
        BlockQ5K::quantize(values)
    }
    fn dequantize(&self, out: &mut [f32]) {
        BlockQ5K::dequantize(self, out)
    }
    fn reference(weights: &[Self], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        scalar::matmul_q5k(weights, cols, x, out)
    }
    fn magnitude(&self, x: &[BlockQ8Act]) -> f64 {
        magnitude_k4((self.d, self.dmin), &self.scales, |sub| levels_q5k(self, sub), x)
    }
}

impl Format for BlockQ6K {
    const NAME: &'static str = "q6k";
    const UNITS: &'static [usize] = &[offset_of!(BlockQ6K, d)];
    fn quantize(values: &[f32]) -> Self {
        BlockQ6K::quantize(values)
    }
    fn dequantize(&self, out: &mut [f32]) {
        BlockQ6K::dequantize(self, out)
    }
    fn reference(weights: &[Self], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        scalar::matmul_q6k(weights, cols, x, out)
    }
    fn magnitude(&self, x: &[BlockQ8Act]) -> f64 {
        magnitude_pairs(self.d, |i| self.scales[i] as i8 as i32, |k| levels_q6k(self, k), x)
    }
}

impl Format for BlockQ3K {
    const NAME: &'static str = "q3k";
    const UNITS: &'static [usize] = &[offset_of!(BlockQ3K, d)];
    fn quantize(values: &[f32]) -> Self {
        BlockQ3K::quantize(values)
    }
    fn dequantize(&self, out: &mut [f32]) {
        BlockQ3K::dequantize(self, out)
    }
    fn reference(weights: &[Self], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        scalar::matmul_q3k(weights, cols, x, out)
    }
    fn magnitude(&self, x: &[BlockQ8Act]) -> f64 {
        magnitude_pairs(self.d, |i| self.scale(i) as i32 - 32, |k| levels_q3k(self, k), x)
    }
}

impl Format for BlockQ2K {
    const NAME: &'static str = "q2k";
    const UNITS: &'static [usize] = &[offset_of!(BlockQ2K, d), offset_of!(BlockQ2K, dmin)];
    fn quantize(values: &[f32]) -> Self {
        BlockQ2K::quantize(values)
    }
    fn dequantize(&self, out: &mut [f32]) {
        BlockQ2K::dequantize(self, out)
    }
    fn reference(weights: &[Self], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        scalar::matmul_q2k(weights, cols, x, out)
    }
    /// The scales' terms as Q3_K's, plus per sub-block of 16
    /// `|dmin·min|·|dₓ|·Σ|q|`.
    fn magnitude(&self, x: &[BlockQ8Act]) -> f64 {
        let scales = magnitude_pairs(self.d, |i| scale_min_q2k(self, i).0, |k| levels_q2k(self, k), x);
        let dmin = f16_value(self.dmin).abs() as f64;
        let mut minimums = 0.0;
        for (k, a) in x.iter().enumerate() {
            let sum_q = |range: Range<usize>| -> f64 { range.map(|l| (a.qs[l] as i32).unsigned_abs() as f64).sum() };
            let (m0, m1) = (scale_min_q2k(self, 2 * k).1 as f64, scale_min_q2k(self, 2 * k + 1).1 as f64);
            minimums += dmin * a.d.abs() as f64 * (m0 * sum_q(0..16) + m1 * sum_q(16..32));
        }
        scales + minimums
    }
}

/// The two kinds of weight blocks every shape is checked on.
#[derive(Clone, Copy, Debug)]
pub(super) enum Weights {
    /// The format's quantizer on structured data.
    Quantized,
    /// Random bytes in every field (f16 units kept finite): every level,
    /// scale and mask pattern, including ones no quantizer writes.
    RandomBytes,
}

/// In which order [`check`] visits its shapes and weight kinds.
pub(super) enum Sweep {
    /// Each shape on quantized weights, then on random bytes.
    ShapeMajor,
    /// Every shape on quantized weights, then every shape on random bytes
    /// (the NEON kernels' data, built only for aarch64).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    KindMajor,
}

/// Deterministic test data: weight blocks of a kind, and activations to
/// multiply them with.
pub(super) trait TestData {
    /// The order the data is drawn in: each source keeps the one its
    /// kernels' tolerances were measured against, so the same draws meet
    /// the same shapes.
    const SWEEP: Sweep;
    /// `count` blocks of `kind`.
    fn weights<B: Format>(&mut self, kind: Weights, count: usize) -> Vec<B>;
    /// The activation blocks of `n` values, to meet weights of `kind`.
    fn activations(&mut self, kind: Weights, n: usize) -> Vec<BlockQ8Act>;
}

/// A 64-bit generator, and the draws the test data is made of.
trait Generator {
    fn next(&mut self) -> u64;

    /// Uniform in [−1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        bytes.iter_mut().for_each(|b| *b = self.next() as u8);
    }

    /// Random bytes, or one time in sixteen all 0x00, 0x80 or 0xFF (Q6_K
    /// scales of −128, every high bit set or clear).
    fn fill_or_uniform(&mut self, bytes: &mut [u8]) {
        match self.next() % 16 {
            0 => bytes.fill(0x00),
            1 => bytes.fill(0x80),
            2 => bytes.fill(0xFF),
            _ => self.fill(bytes),
        }
    }
}

/// The block's f16 units with an all-ones exponent (infinities, NaNs)
/// cleared by one bit, so they are finite.
fn keep_units_finite<B: Format>(bytes: &mut [u8]) {
    for &at in B::UNITS {
        let bits = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let finite = if bits & 0x7C00 == 0x7C00 { bits & !0x0400 } else { bits };
        bytes[at..at + 2].copy_from_slice(&finite.to_le_bytes());
    }
}

/// xorshift64*.
struct XorShift64Star(u64);

impl Generator for XorShift64Star {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Weights whose structure changes every 16 values (zero runs, tiny, unit
/// and large amplitudes, one-signed runs, single spikes); random bytes with
/// their f16 units' all-ones exponents cleared by one bit; activations
/// quantized from the same kind of data, or (against random bytes) random
/// int8 values, −128 included, with random scales. Used by the AVX2 and
/// dotprod kernels, and (with [`VariedRuns::filled_or_random_bytes`] for
/// the random bytes) by the x4 kernels.
pub(super) struct VariedRuns(XorShift64Star);

impl VariedRuns {
    pub(super) fn new() -> Self {
        Self::seeded(0x9E37_79B9_7F4A_7C15)
    }

    pub(super) fn seeded(seed: u64) -> Self {
        VariedRuns(XorShift64Star(seed))
    }

    /// `count` blocks of random bytes, one time in sixteen all 0x00, 0x80
    /// or 0xFF instead, f16 units kept finite.
    pub(super) fn filled_or_random_bytes<B: Format>(&mut self, count: usize) -> Vec<B> {
        (0..count)
            .map(|_| {
                let mut block = B::zeroed();
                let bytes = bytemuck::bytes_of_mut(&mut block);
                self.0.fill_or_uniform(bytes);
                keep_units_finite::<B>(bytes);
                block
            })
            .collect()
    }

    /// `n` values whose structure changes every 16.
    pub(super) fn values(&mut self, n: usize) -> Vec<f32> {
        let random = &mut self.0;
        let mut values = Vec::with_capacity(n);
        while values.len() < n {
            let amplitude = [0.0, 1e-3, 0.05, 1.0, 40.0][(random.next() % 5) as usize];
            let kind = random.next() % 4;
            for i in 0..16 {
                let u = random.unit();
                values.push(match kind {
                    0 => amplitude * u,
                    1 => amplitude * (u.abs() + 0.5),
                    2 => -amplitude * (u.abs() + 0.1),
                    _ => amplitude * if i == 7 { 10.0 } else { 0.01 * u },
                });
            }
        }
        values.truncate(n);
        values
    }
}

impl TestData for VariedRuns {
    const SWEEP: Sweep = Sweep::ShapeMajor;

    fn weights<B: Format>(&mut self, kind: Weights, count: usize) -> Vec<B> {
        match kind {
            Weights::Quantized => self.values(count * QK_K).chunks_exact(QK_K).map(B::quantize).collect(),
            Weights::RandomBytes => (0..count)
                .map(|_| {
                    let mut block = B::zeroed();
                    let bytes = bytemuck::bytes_of_mut(&mut block);
                    self.0.fill(bytes);
                    keep_units_finite::<B>(bytes);
                    block
                })
                .collect(),
        }
    }

    fn activations(&mut self, kind: Weights, n: usize) -> Vec<BlockQ8Act> {
        match kind {
            Weights::Quantized => {
                let mut x = vec![BlockQ8Act { d: 0.0, s: 0.0, qs: [0; GROUP] }; n / GROUP];
                quantize_activation(&self.values(n), &mut x);
                x
            }
            Weights::RandomBytes => (0..n / GROUP)
                .map(|_| {
                    let mut qs = [0i8; GROUP];
                    self.0.fill(bytemuck::cast_slice_mut(&mut qs));
                    let d = self.0.unit() * 0.05;
                    BlockQ8Act { d, s: d * qs.iter().map(|&q| q as i32).sum::<i32>() as f32, qs }
                })
                .collect(),
        }
    }
}

/// SplitMix64.
#[cfg(target_arch = "aarch64")]
struct SplitMix64(u64);

#[cfg(target_arch = "aarch64")]
impl Generator for SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(target_arch = "aarch64")]
impl SplitMix64 {
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A power of ten from 10⁻³ to 10².
    fn amplitude(&mut self) -> f32 {
        10f32.powi(self.below(6) as i32 - 3)
    }

    /// Any finite f16 (either sign, subnormals and zero included), little-endian.
    fn finite_f16(&mut self) -> [u8; 2] {
        let mut bits = self.next() as u16;
        if bits & 0x7C00 == 0x7C00 {
            bits &= !0x4000;
        }
        bits.to_le_bytes()
    }
}

/// Weights in a different style in each super-block (centred, one-signed
/// either way, sparse spikes, constant) at amplitudes 10⁻³ to 10²; random
/// bytes with fresh finite f16 units and now and then a block of all 0x00,
/// 0x80 or 0xFF bytes (Q6_K scales of −128, every high bit set or clear);
/// activations quantized, each block of 32 at its own amplitude (zero now
/// and then), some all at the extremes ±127. Used by the NEON kernels.
#[cfg(target_arch = "aarch64")]
pub(super) struct SuperBlockStyles(SplitMix64);

#[cfg(target_arch = "aarch64")]
impl SuperBlockStyles {
    pub(super) fn new() -> Self {
        SuperBlockStyles(SplitMix64(0x6b71_6e65_6f6e))
    }
}

#[cfg(target_arch = "aarch64")]
impl TestData for SuperBlockStyles {
    const SWEEP: Sweep = Sweep::KindMajor;

    fn weights<B: Format>(&mut self, kind: Weights, count: usize) -> Vec<B> {
        let random = &mut self.0;
        match kind {
            Weights::Quantized => {
                let mut values = vec![0f32; count * QK_K];
                for block in values.chunks_exact_mut(QK_K) {
                    let (style, amplitude) = (random.below(5), random.amplitude());
                    for v in block.iter_mut() {
                        let u = random.unit();
                        *v = amplitude
                            * match style {
                                0 => u,
                                1 => 1.0 + u / 2.0,
                                2 => -1.0 + u / 2.0,
                                3 if random.below(16) == 0 => 20.0 * u,
                                3 => 0.0,
                                _ => 1.0,
                            };
                    }
                }
                values.chunks_exact(QK_K).map(B::quantize).collect()
            }
            Weights::RandomBytes => (0..count)
                .map(|_| {
                    let mut block = B::zeroed();
                    let bytes = bytemuck::bytes_of_mut(&mut block);
                    random.fill_or_uniform(bytes);
                    for &at in B::UNITS {
                        bytes[at..at + 2].copy_from_slice(&random.finite_f16());
                    }
                    block
                })
                .collect(),
        }
    }

    fn activations(&mut self, _: Weights, n: usize) -> Vec<BlockQ8Act> {
        let random = &mut self.0;
        let mut values = vec![0f32; n];
        for block in values.chunks_exact_mut(GROUP) {
            let amplitude = if random.below(8) == 0 { 0.0 } else { random.amplitude() };
            let extreme = random.below(4) == 0;
            for v in block.iter_mut() {
                let u = random.unit();
                *v = amplitude * if extreme { u.signum() } else { u };
            }
        }
        let mut blocks = vec![BlockQ8Act { d: 0.0, s: 0.0, qs: [0; GROUP] }; n / GROUP];
        quantize_activation(&values, &mut blocks);
        blocks
    }
}

/// The kernel against the reference on the same blocks and activations,
/// each output within `relative_tolerance(cols)` of the magnitude of its
/// terms.
fn compare<B: Format>(
    kernel: Matmul<B>,
    relative_tolerance: fn(usize) -> f32,
    kind: Weights,
    weights: &[B],
    (rows, cols, batch): (usize, usize, usize),
    x: &[BlockQ8Act],
) {
    let (mut got, mut expected) = (vec![f32::NAN; rows * batch], vec![f32::NAN; rows * batch]);
    kernel(weights, cols, x, &mut got);
    B::reference(weights, cols, x, &mut expected);
    let superblocks = cols / QK_K;
    for r in 0..rows {
        for b in 0..batch {
            let row = &weights[r * superblocks..][..superblocks];
            let activation = &x[b * cols / GROUP..][..cols / GROUP];
            let tolerance = relative_tolerance(cols) * row_magnitude(row, activation) as f32;
            let (g, e) = (got[r * batch + b], expected[r * batch + b]);
            assert!(
                (g - e).abs() <= tolerance,
                "{} {kind:?} {rows}×{cols} batch {batch} [{r}, {b}]: {g} vs reference {e} (tolerance {tolerance})",
                B::NAME
            );
        }
    }
}

/// Σ|terms| of a row's dot product with an activation, block by block
/// ([`Format::magnitude`]).
pub(super) fn row_magnitude<B: Format>(row: &[B], x: &[BlockQ8Act]) -> f64 {
    row.iter().zip(x.chunks_exact(ACTIVATION_BLOCKS)).map(|(block, a)| block.magnitude(a)).sum()
}

/// Every shape: rows 1, 3, 4, 5, 8, 13 (groups of four rows, a short last
/// group, a single row), batches 1, 2, 3, 5 (tiles of four, two, one), cols
/// from one super-block to 5632, and once 11008 (LLaMA-7B's feed-forward
/// width); on quantized weights and on random bytes, in the order of the
/// data's [`Sweep`].
pub(super) fn check<B: Format, D: TestData>(kernel: Matmul<B>, relative_tolerance: fn(usize) -> f32, data: &mut D) {
    const KINDS: [Weights; 2] = [Weights::Quantized, Weights::RandomBytes];
    let mut shapes: Vec<(usize, usize, usize)> = Vec::new();
    for rows in [1, 3, 4, 5, 8, 13] {
        for cols in [256, 512, 1536, 2048, 5632] {
            for batch in [1, 2, 3, 5] {
                shapes.push((rows, cols, batch));
            }
        }
    }
    shapes.push((5, 11008, 3));
    let cases: Vec<(Weights, (usize, usize, usize))> = match D::SWEEP {
        Sweep::ShapeMajor => shapes.iter().flat_map(|&shape| KINDS.map(|kind| (kind, shape))).collect(),
        Sweep::KindMajor => KINDS.iter().flat_map(|&kind| shapes.iter().map(move |&shape| (kind, shape))).collect(),
    };
    for (kind, shape @ (rows, cols, batch)) in cases {
        let weights: Vec<B> = data.weights(kind, rows * cols / QK_K);
        let x = data.activations(kind, batch * cols);
        compare(kernel, relative_tolerance, kind, &weights, shape, &x);
    }
}

/// Degenerate shapes: zero rows against one super-block of activations, and
/// one row against an empty batch; each writes nothing, into an empty `out`.
pub(super) fn check_empty(zero_rows: Matmul<BlockQ4K>, empty_batch: Matmul<BlockQ6K>) {
    let x = vec![BlockQ8Act { d: 1.0, s: 0.0, qs: [1; GROUP] }; ACTIVATION_BLOCKS];
    zero_rows(&[], QK_K, &x, &mut []);
    let weights = [BlockQ6K::quantize(&[0.5; QK_K])];
    empty_batch(&weights, QK_K, &[], &mut []);
}
