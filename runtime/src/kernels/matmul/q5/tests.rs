//! Every Q5S kernel of every table this CPU runs against the scalar
//! reference on the same data (run under `QEMU_CPU=cortex-a72` and
//! `cortex-a76` for the ARMv8.0 and `sdot` kernels).

use super::*;
use crate::kernels::activation::scalar::quantize_activation;
use crate::kernels::{Kernels, MatmulQuantized};
use crate::quant::{interleave, quantize_q5s, INTERLEAVE};
use bytemuck::Zeroable;
use half::f16;

/// How far a kernel's product may be from the reference's: nowhere. Each
/// kernel forms the same exact integer sum a block and the same float
/// operations on it in the same order (`(d·dₓ)·Σ`, then one add, blocks in
/// order, no fused multiply-add), so any difference at all is a bug.
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

    /// Blocks of random bytes with a finite scale of either sign (the
    /// exponent's top bit cleared: below 2 in magnitude, subnormals too).
    fn random_blocks(&mut self, n: usize) -> Vec<BlockQ5S> {
        (0..n)
            .map(|_| BlockQ5S { d: f16::from_bits(self.next() as u16 & 0xBFFF), qh: self.bytes(), qs: self.bytes() })
            .collect()
    }

    /// Blocks ggml's reference quantizer makes of values of varied scale.
    fn quantized_blocks(&mut self, n: usize) -> Vec<BlockQ5S> {
        let values: Vec<f32> = (0..n * GROUP).map(|i| self.unit() * (1.0 + (i / GROUP % 7) as f32)).collect();
        let mut blocks = vec![BlockQ5S::zeroed(); n];
        quantize_q5s(&values, &mut blocks);
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
fn data(
    random: &mut Random,
    rows: usize,
    cols: usize,
    batch: usize,
) -> [(&'static str, Vec<BlockQ5S>, Vec<BlockQ8Act>); 2] {
    let (blocks, activation_blocks) = (rows * cols / GROUP, batch * cols / GROUP);
    [
        ("quantized", random.quantized_blocks(blocks), random.quantized_activations(activation_blocks)),
        ("random bytes", random.random_blocks(blocks), random.random_activations(activation_blocks)),
    ]
}

#[test]
fn row_major_kernels_match_the_reference() {
    let mut random = Random(1);
    for rows in ROW_COUNTS {
        for cols in COLUMNS {
            for batch in BATCHES {
                for (what, weights, x) in data(&mut random, rows, cols, batch) {
                    let mut expected = vec![f32::NAN; rows * batch];
                    scalar::matmul_q5s(&weights, cols, &x, &mut expected);
                    for k in Kernels::all_available() {
                        let wrong = differing_rows(k.matmul_q5s, &weights, cols, &x, &expected);
                        assert!(wrong.is_empty(), "{} q5s {what} {rows}×{cols} batch {batch}: rows {wrong:?}", k.name);
                    }
                }
            }
        }
    }
}

#[test]
fn interleaved_kernels_match_the_reference() {
    let mut random = Random(2);
    for rows in GROUPED_ROW_COUNTS {
        for cols in COLUMNS {
            for batch in BATCHES {
                for (what, weights, x) in data(&mut random, rows, cols, batch) {
                    let mut mixed = vec![BlockQ5Sx4::zeroed(); weights.len() / INTERLEAVE];
                    interleave(&weights, cols / GROUP, &mut mixed);
                    let mut expected = vec![f32::NAN; rows * batch];
                    scalar::matmul_q5s(&weights, cols, &x, &mut expected);
                    let staged = differing_rows(scalar::matmul_q5sx4, &mixed, cols, &x, &expected);
                    assert!(staged.is_empty(), "q5sx4 reference {what} {rows}×{cols} batch {batch}: rows {staged:?}");
                    for k in Kernels::all_available() {
                        let wrong = differing_rows(k.matmul_q5sx4, &mixed, cols, &x, &expected);
                        assert!(
                            wrong.is_empty(),
                            "{} q5sx4 {what} {rows}×{cols} batch {batch}: rows {wrong:?}",
                            k.name
                        );
                    }
                }
            }
        }
    }
}

/// The largest products: every level −16 or 15 against activations all
/// −128 or 127 (eight −16·−128 products fill half a 16-bit lane of the
/// ARMv8.0 kernels; sixteen would overflow it).
#[test]
fn kernels_do_not_overflow_at_extremes() {
    let (rows, cols, batch) = (8, 2048, 5);
    let blocks = rows * cols / GROUP;
    let lowest = BlockQ5S { d: f16::from_f32(1.0), qh: [0; 4], qs: [0; 16] };
    let highest = BlockQ5S { d: f16::from_f32(1.0), qh: [0xFF; 4], qs: [0xFF; 16] };
    for level in [lowest, highest] {
        let weights = vec![level; blocks];
        let mut mixed = vec![BlockQ5Sx4::zeroed(); blocks / INTERLEAVE];
        interleave(&weights, cols / GROUP, &mut mixed);
        for q in [-128i8, 127] {
            let x = vec![BlockQ8Act { d: 1.0, s: q as f32 * GROUP as f32, qs: [q; GROUP] }; batch * cols / GROUP];
            let mut expected = vec![0f32; rows * batch];
            scalar::matmul_q5s(&weights, cols, &x, &mut expected);
            let exact = (level.level(0) as i32 - 16) * q as i32 * cols as i32;
            assert!(expected.iter().all(|&e| e == exact as f32), "{expected:?} vs {exact}");
            for k in Kernels::all_available() {
                assert!(differing_rows(k.matmul_q5s, &weights, cols, &x, &expected).is_empty(), "{} q5s {q}", k.name);
                assert!(differing_rows(k.matmul_q5sx4, &mixed, cols, &x, &expected).is_empty(), "{} q5sx4 {q}", k.name);
            }
        }
    }
}

/// The comparison can fail: one fifth bit flipped in the weights the
/// kernels get (row 5, block 7, value 31: the last bit of the block, the
/// top bit of `qh[3]`) and not in the reference's moves that row's
/// products, and only that row's, out of the tolerance, for every table.
#[test]
fn one_flipped_fifth_bit_is_caught() {
    let mut random = Random(3);
    let (rows, cols, batch) = (8, 576, 2);
    let blocks = cols / GROUP;
    let weights = random.quantized_blocks(rows * blocks);
    let mut x = random.quantized_activations(batch * blocks);
    x[7].qs[31] = 100;
    x[blocks + 7].qs[31] = -90;
    let mut changed = weights.clone();
    changed[5 * blocks + 7].qh[3] ^= 0x80;
    let mut mixed = vec![BlockQ5Sx4::zeroed(); weights.len() / INTERLEAVE];
    interleave(&changed, blocks, &mut mixed);
    let mut expected = vec![0f32; rows * batch];
    scalar::matmul_q5s(&weights, cols, &x, &mut expected);
    for k in Kernels::all_available() {
        assert_eq!(differing_rows(k.matmul_q5s, &changed, cols, &x, &expected), [5], "{} q5s", k.name);
        assert_eq!(differing_rows(k.matmul_q5sx4, &mixed, cols, &x, &expected), [5], "{} q5sx4", k.name);
    }
}

/// The reference is the dequantized product: `Σ d(n − 16)·dₓq` summed in
/// f64 agrees with it to float rounding (relative to `Σ|terms|`: each
/// block's term is rounded twice and added once into at most 64 terms).
#[test]
fn reference_is_the_dequantized_product() {
    const REFERENCE_BUDGET: f64 = 1e-5;
    let mut random = Random(4);
    let (rows, cols, batch) = (5, 2048, 3);
    let weights = random.quantized_blocks(rows * cols / GROUP);
    let x = random.quantized_activations(batch * cols / GROUP);
    let mut w = vec![0f32; rows * cols];
    crate::quant::dequantize_q5s(&weights, &mut w);
    let mut got = vec![0f32; rows * batch];
    scalar::matmul_q5s(&weights, cols, &x, &mut got);
    for r in 0..rows {
        for b in 0..batch {
            let (mut sum, mut magnitude) = (0f64, 0f64);
            for c in 0..cols {
                let a = &x[b * cols / GROUP + c / GROUP];
                let term = w[r * cols + c] as f64 * a.d as f64 * a.qs[c % GROUP] as f64;
                (sum, magnitude) = (sum + term, magnitude + term.abs());
            }
            let g = got[r * batch + b] as f64;
            assert!((g - sum).abs() <= REFERENCE_BUDGET * magnitude, "[{r}, {b}]: {g} vs {sum}");
        }
    }
}

#[test]
fn no_groups_or_an_empty_batch_write_nothing() {
    let x = vec![BlockQ8Act { d: 1.0, s: 0.0, qs: [1; GROUP] }; 2];
    let group = [BlockQ5Sx4::zeroed(); 2];
    for k in Kernels::all_available() {
        (k.matmul_q5s)(&[], 64, &x, &mut []);
        (k.matmul_q5sx4)(&[], 64, &x, &mut []);
        (k.matmul_q5sx4)(&group, 64, &[], &mut []);
    }
}
