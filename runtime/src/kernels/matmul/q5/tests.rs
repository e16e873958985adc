//! Every 5-bit kernel (Q5_0 as q5s/q5sx4, Q5_1 as q5/q5x4) of every table
//! this CPU runs against the scalar reference on the same data (run under
//! `QEMU_CPU=cortex-a72` and `cortex-a76` for the ARMv8.0 and `sdot`
//! kernels). Each test runs for both block types through [`Case`].

use super::*;
use crate::kernels::activation::scalar::quantize_activation;
use crate::kernels::{Kernels, MatmulQuantized};
use crate::quant::{dequantize_q5, dequantize_q5s, interleave, quantize_q5, quantize_q5s};
use bytemuck::Zeroable;

/// How far a kernel's product may be from the reference's: nowhere. Each
/// kernel forms the same exact integer sum a block and the same float
/// operations on it in the same order ([`block_term`]: `(d·dₓ)·Σ`, for
/// Q5_1 plus `(m + 16·d)·s`, then one add, blocks in order, no fused
/// multiply-add), so any difference at all is a bug.
const KERNEL_TOLERANCE: f32 = 0.0;

const ROW_COUNTS: [usize; 9] = [1, 2, 3, 4, 5, 6, 7, 8, 9];
/// One, two and three groups of four rows (the decode loop's ends), four
/// (one step of sixteen rows) and seven (a step, then two, then one).
const GROUPED_ROW_COUNTS: [usize; 5] = [4, 8, 12, 16, 28];
const COLUMNS: [usize; 5] = [32, 64, 576, 1536, 2048];
/// The interleaved kernels' ways through a batch: one to three tokens (one
/// at a time), a tile of four, of four and one left, of eight (`sdot`; two
/// of four on ARMv8.0), eight and one, eight and four, and all three.
const BATCHES: [usize; 9] = [1, 2, 3, 4, 5, 8, 9, 12, 13];

/// A small deterministic generator (64-bit LCG, high bits out).
struct Random(u64);

impl Random {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 32) as u32
    }
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.next() as u8)
    }
    /// A uniform value in `[-1, 1)`.
    fn unit(&mut self) -> f32 {
        (self.next() >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    }
    /// A finite f16 of either sign (the exponent's top bit cleared: below 2
    /// in magnitude, subnormals too).
    fn finite_f16(&mut self) -> f16 {
        f16::from_bits(self.next() as u16 & 0xBFFF)
    }

    /// Blocks of random bytes with finite scales (and minimums).
    fn random_blocks<C: Case>(&mut self, n: usize) -> Vec<C> {
        (0..n).map(|_| C::from_parts(self.finite_f16(), self.finite_f16(), self.bytes(), self.bytes())).collect()
    }

    /// Blocks ggml's reference quantizer makes of values of varied scale
    /// (and, for Q5_1's minimum, varied offset).
    fn quantized_blocks<C: Case>(&mut self, n: usize) -> Vec<C> {
        let values: Vec<f32> = (0..n * GROUP)
            .map(|i| self.unit() * (1.0 + (i / GROUP % 7) as f32) + (i / GROUP % 3) as f32 * 0.5)
            .collect();
        let mut blocks = vec![C::zeroed(); n];
        C::quantize(&values, &mut blocks);
        blocks
    }

    /// Activation blocks of random bytes (−128 included) with a small scale.
    fn random_activations(&mut self, n: usize) -> Vec<BlockQ8Act> {
        (0..n)
            .map(|_| {
                let qs: [i8; GROUP] = bytemuck::cast(self.bytes::<GROUP>());
                let d = (self.next() >> 8) as f32 / (1u32 << 24) as f32 * 0.05;
                BlockQ8Act { d, s: d * qs.iter().map(|&q| q as i32).sum::<i32>() as f32, qs }
            })
            .collect()
    }

    /// Activations as the forward pass quantizes them.
    fn quantized_activations(&mut self, n: usize) -> Vec<BlockQ8Act> {
        let values: Vec<f32> = (0..n * GROUP).map(|_| self.unit()).collect();
        let mut blocks = vec![BlockQ8Act::zeroed(); n];
        quantize_activation(&values, &mut blocks);
        blocks
    }
}

/// One 5-bit block type under test: its interleaved form, its kernels in a
/// table and in the reference, ggml's quantizer and expansion.
trait Case: FiveBitBlock + std::fmt::Debug {
    type X4: FiveBitBlockX4<Row = Self> + std::fmt::Debug;
    const NAME: &'static str;
    /// A block of these fields (`m` ignored by Q5_0).
    fn from_parts(d: f16, m: f16, qh: [u8; 4], qs: [u8; GROUP / 2]) -> Self;
    /// The row-major and interleaved kernels of a table.
    fn kernels(k: &Kernels) -> (MatmulQuantized<Self>, MatmulQuantized<Self::X4>);
    /// The scalar reference's two.
    fn reference() -> (MatmulQuantized<Self>, MatmulQuantized<Self::X4>);
    /// ggml's reference quantizer.
    fn quantize(values: &[f32], out: &mut [Self]);
    /// ggml's expansion.
    fn dequantize(blocks: &[Self], out: &mut [f32]);
    /// A mutable view of the minimum, if the block has one.
    fn minimum(&mut self) -> Option<&mut f16>;
    fn fifth_bits(&mut self) -> &mut [u8; 4];
}

impl Case for BlockQ5S {
    type X4 = BlockQ5Sx4;
    const NAME: &'static str = "q5s";
    fn from_parts(d: f16, _: f16, qh: [u8; 4], qs: [u8; GROUP / 2]) -> Self {
        BlockQ5S { d, qh, qs }
    }
    fn kernels(k: &Kernels) -> (MatmulQuantized<Self>, MatmulQuantized<Self::X4>) {
        (k.matmul_q5s, k.matmul_q5sx4)
    }
    fn reference() -> (MatmulQuantized<Self>, MatmulQuantized<Self::X4>) {
        (scalar::matmul_q5s, scalar::matmul_q5sx4)
    }
    fn quantize(values: &[f32], out: &mut [Self]) {
        quantize_q5s(values, out)
    }
    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        dequantize_q5s(blocks, out)
    }
    fn minimum(&mut self) -> Option<&mut f16> {
        None
    }
    fn fifth_bits(&mut self) -> &mut [u8; 4] {
        &mut self.qh
    }
}

impl Case for BlockQ5 {
    type X4 = BlockQ5x4;
    const NAME: &'static str = "q5";
    fn from_parts(d: f16, m: f16, qh: [u8; 4], qs: [u8; GROUP / 2]) -> Self {
        BlockQ5 { d, m, qh, qs }
    }
    fn kernels(k: &Kernels) -> (MatmulQuantized<Self>, MatmulQuantized<Self::X4>) {
        (k.matmul_q5, k.matmul_q5x4)
    }
    fn reference() -> (MatmulQuantized<Self>, MatmulQuantized<Self::X4>) {
        (scalar::matmul_q5, scalar::matmul_q5x4)
    }
    fn quantize(values: &[f32], out: &mut [Self]) {
        quantize_q5(values, out)
    }
    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        dequantize_q5(blocks, out)
    }
    fn minimum(&mut self) -> Option<&mut f16> {
        Some(&mut self.m)
    }
    fn fifth_bits(&mut self) -> &mut [u8; 4] {
        &mut self.qh
    }
}

/// Runs `kernel`, checks it against `expected` within [`KERNEL_TOLERANCE`],
/// and returns the rows that differ.
fn differing_rows<B>(
    kernel: MatmulQuantized<B>,
    weights: &[B],
    cols: usize,
    x: &[BlockQ8Act],
    expected: &[f32],
) -> Vec<usize> {
    let batch = x.len() / (cols / GROUP);
    let mut got = vec![f32::NAN; expected.len()];
    kernel(weights, cols, x, &mut got);
    let mut rows: Vec<usize> = (0..expected.len())
        .filter(|&i| {
            let (g, e) = (got[i], expected[i]);
            !((g - e).abs() <= KERNEL_TOLERANCE || g.to_bits() == e.to_bits())
        })
        .map(|i| i / batch)
        .collect();
    rows.dedup();
    rows
}

/// Both kinds of data for one shape: ggml-quantized weights with
/// activations as the forward pass makes them, and random bytes.
fn data<C: Case>(
    random: &mut Random,
    rows: usize,
    cols: usize,
    batch: usize,
) -> [(&'static str, Vec<C>, Vec<BlockQ8Act>); 2] {
    let (blocks, activation_blocks) = (rows * cols / GROUP, batch * cols / GROUP);
    [
        ("quantized", random.quantized_blocks(blocks), random.quantized_activations(activation_blocks)),
        ("random bytes", random.random_blocks(blocks), random.random_activations(activation_blocks)),
    ]
}

fn interleaved<C: Case>(weights: &[C], cols: usize) -> Vec<C::X4> {
    let mut mixed = vec![C::X4::zeroed(); weights.len() / INTERLEAVE];
    interleave(weights, cols / GROUP, &mut mixed);
    mixed
}

fn row_major_kernels_match_the_reference_for<C: Case>(seed: u64) {
    let mut random = Random(seed);
    for rows in ROW_COUNTS {
        for cols in COLUMNS {
            for batch in BATCHES {
                for (what, weights, x) in data::<C>(&mut random, rows, cols, batch) {
                    let mut expected = vec![f32::NAN; rows * batch];
                    C::reference().0(&weights, cols, &x, &mut expected);
                    for k in Kernels::all_available() {
                        let wrong = differing_rows(C::kernels(k).0, &weights, cols, &x, &expected);
                        assert!(
                            wrong.is_empty(),
                            "{} {} {what} {rows}×{cols} batch {batch}: rows {wrong:?}",
                            k.name,
                            C::NAME
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn row_major_kernels_match_the_reference() {
    row_major_kernels_match_the_reference_for::<BlockQ5S>(1);
    row_major_kernels_match_the_reference_for::<BlockQ5>(11);
}

fn interleaved_kernels_match_the_reference_for<C: Case>(seed: u64) {
    let mut random = Random(seed);
    for rows in GROUPED_ROW_COUNTS {
        for cols in COLUMNS {
            for batch in BATCHES {
                for (what, weights, x) in data::<C>(&mut random, rows, cols, batch) {
                    let mixed = interleaved(&weights, cols);
                    let mut expected = vec![f32::NAN; rows * batch];
                    C::reference().0(&weights, cols, &x, &mut expected);
                    let staged = differing_rows(C::reference().1, &mixed, cols, &x, &expected);
                    assert!(
                        staged.is_empty(),
                        "{}x4 reference {what} {rows}×{cols} batch {batch}: rows {staged:?}",
                        C::NAME
                    );
                    for k in Kernels::all_available() {
                        let wrong = differing_rows(C::kernels(k).1, &mixed, cols, &x, &expected);
                        assert!(
                            wrong.is_empty(),
                            "{} {}x4 {what} {rows}×{cols} batch {batch}: rows {wrong:?}",
                            k.name,
                            C::NAME
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn interleaved_kernels_match_the_reference() {
    interleaved_kernels_match_the_reference_for::<BlockQ5S>(2);
    interleaved_kernels_match_the_reference_for::<BlockQ5>(12);
}

/// The largest products: every level −16 or 15 (`n` 0 or 31) against
/// activations all −128 or 127 (eight −16·−128 products fill half a 16-bit
/// lane of the ARMv8.0 kernels; sixteen would overflow it). Scales of 1 and
/// a minimum of 0.5 keep every float step exact, so the sums are known.
fn kernels_do_not_overflow_at_extremes_for<C: Case>() {
    let (rows, cols, batch) = (8, 2048, 5);
    let blocks = rows * cols / GROUP;
    let (one, half) = (f16::from_f32(1.0), f16::from_f32(0.5));
    let lowest = C::from_parts(one, half, [0; 4], [0; 16]);
    let highest = C::from_parts(one, half, [0xFF; 4], [0xFF; 16]);
    for (n, level) in [(0, lowest), (31, highest)] {
        let weights = vec![level; blocks];
        let mixed = interleaved(&weights, cols);
        let value = if C::MINIMUM { n as f32 + 0.5 } else { (n - 16) as f32 };
        for q in [-128i8, 127] {
            let x = vec![BlockQ8Act { d: 1.0, s: q as f32 * GROUP as f32, qs: [q; GROUP] }; batch * cols / GROUP];
            let mut expected = vec![0f32; rows * batch];
            C::reference().0(&weights, cols, &x, &mut expected);
            let exact = value * q as f32 * cols as f32;
            assert!(expected.iter().all(|&e| e == exact), "{} {expected:?} vs {exact}", C::NAME);
            for k in Kernels::all_available() {
                let (row_major, x4) = C::kernels(k);
                assert!(
                    differing_rows(row_major, &weights, cols, &x, &expected).is_empty(),
                    "{} {} {q}",
                    k.name,
                    C::NAME
                );
                assert!(differing_rows(x4, &mixed, cols, &x, &expected).is_empty(), "{} {}x4 {q}", k.name, C::NAME);
            }
        }
    }
}

#[test]
fn kernels_do_not_overflow_at_extremes() {
    kernels_do_not_overflow_at_extremes_for::<BlockQ5S>();
    kernels_do_not_overflow_at_extremes_for::<BlockQ5>();
}

/// The comparison can fail: one change to the weights the kernels get (row
/// 5, block 7) and not in the reference's moves that row's products, and
/// only that row's, out of the tolerance, for every table. The changes: a
/// fifth bit flipped (value 31: the last bit of the block, the top bit of
/// `qh[3]`), and for Q5_1 the minimum one f16 step larger (a kernel that
/// dropped or misplaced the minimum's term would be caught the same way).
fn one_planted_change_is_caught_for<C: Case>(change: fn(&mut C)) {
    let mut random = Random(3);
    let (rows, cols, batch) = (8, 576, 2);
    let blocks = cols / GROUP;
    let weights: Vec<C> = random.quantized_blocks(rows * blocks);
    let mut x = random.quantized_activations(batch * blocks);
    x[7].qs[31] = 100;
    x[blocks + 7].qs[31] = -90;
    let mut changed = weights.clone();
    change(&mut changed[5 * blocks + 7]);
    let mixed = interleaved(&changed, cols);
    let mut expected = vec![0f32; rows * batch];
    C::reference().0(&weights, cols, &x, &mut expected);
    for k in Kernels::all_available() {
        let (row_major, x4) = C::kernels(k);
        assert_eq!(differing_rows(row_major, &changed, cols, &x, &expected), [5], "{} {}", k.name, C::NAME);
        assert_eq!(differing_rows(x4, &mixed, cols, &x, &expected), [5], "{} {}x4", k.name, C::NAME);
    }
}

#[test]
fn one_flipped_fifth_bit_is_caught() {
    fn flip<C: Case>(block: &mut C) {
        block.fifth_bits()[3] ^= 0x80;
    }
    one_planted_change_is_caught_for::<BlockQ5S>(flip);
    one_planted_change_is_caught_for::<BlockQ5>(flip);
}

#[test]
fn one_changed_minimum_is_caught() {
    one_planted_change_is_caught_for::<BlockQ5>(|block| {
        let m = block.minimum().unwrap();
        *m = f16::from_bits(m.to_bits() + 1);
    });
}

/// The reference is the dequantized product: `Σ w·dₓq` with ggml's
/// expansion `w` summed in f64 agrees with it to float rounding, relative
/// to the sum of the magnitudes of the terms the reference rounds (each
/// block's `(d·dₓ)·Σ` and, for Q5_1, `(m + 16·d)·s`: rounded a few times
/// and added once into at most 64 terms).
fn reference_is_the_dequantized_product_for<C: Case>() {
    const REFERENCE_BUDGET: f64 = 1e-5;
    let mut random = Random(4);
    let (rows, cols, batch) = (5, 2048, 3);
    let weights: Vec<C> = random.quantized_blocks(rows * cols / GROUP);
    let x = random.quantized_activations(batch * cols / GROUP);
    let mut w = vec![0f32; rows * cols];
    C::dequantize(&weights, &mut w);
    let mut got = vec![0f32; rows * batch];
    C::reference().0(&weights, cols, &x, &mut got);
    for r in 0..rows {
        for b in 0..batch {
            let (mut sum, mut magnitude) = (0f64, 0f64);
            for c in 0..cols {
                let a = &x[b * cols / GROUP + c / GROUP];
                let block = &weights[(r * cols + c) / GROUP];
                let (d, m) = (block.d().to_f64(), block.m().to_f64());
                let level = scalar::signed_levels(block)[c % GROUP] as f64;
                let q = a.d as f64 * a.qs[c % GROUP] as f64;
                sum += w[r * cols + c] as f64 * q;
                magnitude += ((d * level).abs() + if C::MINIMUM { (m + 16.0 * d).abs() } else { 0.0 }) * q.abs();
            }
            let g = got[r * batch + b] as f64;
            assert!((g - sum).abs() <= REFERENCE_BUDGET * magnitude, "{} [{r}, {b}]: {g} vs {sum}", C::NAME);
        }
    }
}

#[test]
fn reference_is_the_dequantized_product() {
    reference_is_the_dequantized_product_for::<BlockQ5S>();
    reference_is_the_dequantized_product_for::<BlockQ5>();
}

/// Q5_1's float step is [`block_term`]'s, in its order: on one block the
/// reference gives exactly `(d·dₓ)·Σ + (m + 16·d)·s` rounded as written,
/// and not the same sum rounded another way (here, the unsigned `Σ n·q`
/// with the minimum alone, ggml's own order, differs in the last bits).
#[test]
fn q5_reference_rounds_in_its_order() {
    let mut random = Random(5);
    let mut differs = 0;
    for _ in 0..256 {
        let block = random.quantized_blocks::<BlockQ5>(1)[0];
        let a = random.quantized_activations(1)[0];
        let levels = scalar::signed_levels(&block);
        let isum: i32 = levels.iter().zip(&a.qs).map(|(&l, &q)| l as i32 * q as i32).sum();
        let (d, m) = (block.d.to_f32(), block.m.to_f32());
        let written = d * a.d * isum as f32 + (m + 16.0 * d) * a.s;
        let mut got = [0f32];
        scalar::matmul_q5(&[block], GROUP, &[a], &mut got);
        assert_eq!(got[0].to_bits(), written.to_bits());
        let unsigned: i32 = levels.iter().zip(&a.qs).map(|(&l, &q)| (l as i32 + 16) * q as i32).sum();
        differs += (d * a.d * unsigned as f32 + m * a.s != written) as usize;
    }
    assert!(differs > 0, "the two orders never differed: the test would not see a kernel using ggml's");
}

#[test]
fn no_groups_or_an_empty_batch_write_nothing() {
    let x = vec![BlockQ8Act { d: 1.0, s: 0.0, qs: [1; GROUP] }; 2];
    for k in Kernels::all_available() {
        (k.matmul_q5s)(&[], 64, &x, &mut []);
        (k.matmul_q5sx4)(&[], 64, &x, &mut []);
        (k.matmul_q5sx4)(&[BlockQ5Sx4::zeroed(); 2], 64, &[], &mut []);
        (k.matmul_q5)(&[], 64, &x, &mut []);
        (k.matmul_q5x4)(&[], 64, &x, &mut []);
        (k.matmul_q5x4)(&[BlockQ5x4::zeroed(); 2], 64, &[], &mut []);
    }
}
