//! Every kernel table this CPU runs ([`Kernels::all_available`]) against the
//! scalar reference, on deterministic synthetic data, at every size class the
//! kernels special-case: rows 1..=9 and 16..=20 (groups of four and eight
//! and the tails), 1..=16
//! blocks a row, batches 1..=5, and f32 lengths that are not multiples of
//! 4, 8 or 16. On x86-64 it checks `avx2` and `avx512-vnni` where the CPU
//! has them; under `qemu-aarch64` `neon` (cortex-a72) and `neon-dotprod`
//! (cortex-a76).

use super::attention::{CachedVectors, QuantizedKeys, QuantizedValues};
use super::matmul::channels::ChannelMatrix;
use super::Kernels;
use crate::quant::{self, BlockQ4, BlockQ4S, BlockQ8, BlockQ8Act, Encoding, GROUP};
use bytemuck::Zeroable;
use half::f16;

/// Integer matrix products: the block sums are exact integers in every
/// table; only the order of the float sums differs, and the zero point of Q4S
/// is taken out in float by the NEON kernels. Relative to `Σ |terms|`.
const INTEGER_MATMUL_RELATIVE: f32 = 1e-5;
/// f16 and f32 matrix products and dot products: summation order only.
const FLOAT_DOT_RELATIVE: f32 = 1e-5;
/// RMSNorm: the sum of squares in another order.
const RMSNORM_RELATIVE: f32 = 1e-5;
/// The polynomial `exp` against `f32::exp`: a few ulp.
#[cfg(target_arch = "aarch64")]
const EXP_RELATIVE: f32 = 1e-6;
/// Softmax and SiLU: `exp` as above, plus the sum's order and a division.
const EXP_BASED_RELATIVE: f32 = 1e-5;
/// Absolute floor for values near zero: `exp` flushes results below
/// `f32::MIN_POSITIVE` to zero where `f32::exp` returns subnormals.
const TINY: f32 = 1e-30;

/// Deterministic values in [-1, 1], different for each seed.
fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503)) ^ seed;
            ((h.wrapping_mul(2_246_822_519) >> 8) % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// `data`, with every seventh block scaled down and block 2 zero, so blocks differ in scale.
fn activations(n: usize, seed: u32) -> Vec<f32> {
    let mut x = data(n, seed);
    for (b, block) in x.chunks_mut(GROUP).enumerate() {
        let factor = if b == 2 {
            0.0
        } else if b % 7 == 3 {
            0.01
        } else {
            1.0 + b as f32 * 0.1
        };
        block.iter_mut().for_each(|v| *v *= factor);
    }
    x
}

fn quantize_activations(x: &[f32]) -> Vec<BlockQ8Act> {
    let mut out = vec![BlockQ8Act { d: 0.0, s: 0.0, qs: [0; GROUP] }; x.len() / GROUP];
    (Kernels::SCALAR.quantize_activation)(x, &mut out);
    out
}

fn close(got: f32, expected: f32, bound: f32) -> bool {
    (got - expected).abs() <= bound
}

#[test]
fn detect_picks_the_table_for_this_cpu() {
    let chosen = Kernels::detect();
    println!("Kernels::detect(): {}", chosen.name);
    let names: Vec<_> = Kernels::all_available().iter().map(|k| k.name).collect();
    println!("Kernels::all_available(): {names:?}");
    assert_eq!(names.first(), Some(&"scalar"));
    assert_eq!(names.last(), Some(&chosen.name));
    #[cfg(target_arch = "aarch64")]
    {
        let dotprod = std::arch::is_aarch64_feature_detected!("dotprod");
        assert_eq!(chosen.name, if dotprod { "neon-dotprod" } else { "neon" });
        // Under qemu-user the emulated core is named in the environment.
        match std::env::var("QEMU_CPU").as_deref() {
            Ok("cortex-a72") => assert!(!dotprod && chosen.name == "neon"),
            Ok("cortex-a76") => assert!(dotprod && chosen.name == "neon-dotprod"),
            _ => {}
        }
    }
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        chosen.name,
        if super::matmul::avx512::available() {
            "avx512-vnni"
        } else if super::matmul::avx2::available() {
            "avx2"
        } else {
            "scalar"
        }
    );
    #[cfg(not(any(target_arch = "aarch64", target_arch = "x86_64")))]
    assert_eq!(chosen.name, "scalar");
}

#[test]
fn quantize_activation_is_bit_exact() {
    for blocks in 1..=16 {
        let x = activations(blocks * GROUP, blocks as u32);
        let expected = quantize_activations(&x);
        for k in Kernels::all_available() {
            let mut got = vec![BlockQ8Act { d: 1.0, s: 1.0, qs: [1; GROUP] }; blocks];
            (k.quantize_activation)(&x, &mut got);
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    g.qs == e.qs && g.d.to_bits() == e.d.to_bits() && g.s.to_bits() == e.s.to_bits(),
                    "{}: {g:?} vs {e:?}",
                    k.name
                );
            }
        }
    }
}

/// The 256-value activations ([`crate::quant::BlockQ8K`]): every table that
/// has them equals the reference bit for bit, and the reference's values
/// are the input within half a step, |q| ≤ 127, each sum its 32 values'.
#[test]
fn superblock_activations_are_bit_exact_and_within_half_a_step() {
    use crate::kquant::QK_K;
    use crate::quant::BlockQ8K;
    let empty = BlockQ8K { d: 1.0, sums: [1; QK_K / GROUP], qs: [1; QK_K] };
    for superblocks in 1..=4 {
        let mut x = activations(superblocks * QK_K, 40 + superblocks as u32);
        // One spike a super-block sets its scale; a NaN and an infinity go to 0.
        x[17] = -30.0;
        x[QK_K - 1] = f32::NAN;
        if superblocks > 1 {
            x[QK_K + 5] = f32::INFINITY;
        }
        let mut expected = vec![empty; superblocks];
        crate::kernels::activation::scalar::quantize_activation_q8k(&x, &mut expected);
        for (block, values) in expected.iter().zip(x.chunks_exact(QK_K)) {
            for (k, sum) in block.sums.iter().enumerate() {
                assert_eq!(*sum, block.qs[k * GROUP..][..GROUP].iter().map(|&q| q as i16).sum::<i16>());
            }
            assert!(block.qs.iter().all(|&q| q != i8::MIN));
            if block.d.is_finite() {
                for (&q, &v) in block.qs.iter().zip(values).filter(|(_, v)| v.is_finite()) {
                    assert!((block.d * q as f32 - v).abs() <= 0.5001 * block.d, "{v} as {q} · {}", block.d);
                }
            }
        }
        for k in Kernels::all_available() {
            let Some(superblock) = k.superblock else { continue };
            let mut got = vec![empty; superblocks];
            (superblock.quantize)(&x, &mut got);
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    g.qs == e.qs && g.sums == e.sums && g.d.to_bits() == e.d.to_bits(),
                    "{}: {g:?} vs {e:?}",
                    k.name
                );
            }
        }
    }
}

/// One quantized weight matrix, the blocks of every row, and per block the
/// stored integers `n[j]` and what a value is: `d·n + offset`.
/// Interleaved encodings keep the row-major bytes too (`row_major`), for the
/// reference and for the term sizes.
/// Q4B's bytes start with the row scales; its kernels take only the
/// blocks and sum in units of the row scales ([`QuantizedMatrix::row_scales`]).
struct QuantizedMatrix {
    encoding: Encoding,
    bytes: Vec<u8>,
    row_major: Vec<u8>,
    values: usize,
}

impl QuantizedMatrix {
    fn new(encoding: Encoding, w: &[f32], cols: usize) -> Self {
        let base = encoding.row_major();
        let mut row_major = vec![0u8; base.tensor_bytes(w.len() / cols, cols)];
        quant::quantize_into(base, w, &mut row_major);
        let bytes = if encoding == base {
            row_major.clone()
        } else {
            let mut mixed = vec![0u8; row_major.len()];
            quant::interleave_bytes(encoding, &row_major, cols, &mut mixed);
            mixed
        };
        Self { encoding, bytes, row_major, values: w.len() }
    }

    /// What each row's kernel sum is multiplied by: Q4B's row scales, else 1.
    fn row_scales(&self, rows: usize) -> Vec<f32> {
        match self.encoding.row_major() {
            Encoding::Q4B => quant::split_q4b(&self.row_major, self.values).0,
            _ => vec![1.0; rows],
        }
    }

    /// The bytes a kernel takes: all but Q4B's row scales.
    fn kernel_bytes(&self) -> &[u8] {
        &self.bytes[self.bytes.len() - self.encoding.bytes_for(self.values)..]
    }

    /// `(d, offset, n[32])` of each block.
    fn blocks(&self) -> Vec<(f32, f32, [i32; GROUP])> {
        let nibbles = |qs: &[u8; GROUP / 2]| -> [i32; GROUP] {
            std::array::from_fn(|j| if j < GROUP / 2 { (qs[j] & 0xF) as i32 } else { (qs[j - GROUP / 2] >> 4) as i32 })
        };
        match self.encoding.row_major() {
            Encoding::Q8 => bytemuck::pod_collect_to_vec::<u8, BlockQ8>(&self.row_major)
                .iter()
                .map(|b| (b.d.to_f32(), 0.0, b.qs.map(|q| q as i32)))
                .collect(),
            Encoding::Q4 => bytemuck::pod_collect_to_vec::<u8, BlockQ4>(&self.row_major)
                .iter()
                .map(|b| (b.d.to_f32(), b.m.to_f32(), nibbles(&b.qs)))
                .collect(),
            Encoding::Q4S => bytemuck::pod_collect_to_vec::<u8, BlockQ4S>(&self.row_major)
                .iter()
                .map(|b| (b.d.to_f32(), -8.0 * b.d.to_f32(), nibbles(&b.qs)))
                .collect(),
            Encoding::Q4B => quant::split_q4b(&self.row_major, self.values)
                .1
                .iter()
                .map(|b| {
                    let (d, m) = b.scale_and_minimum();
                    (d, m, nibbles(&b.qs))
                })
                .collect(),
            other => unreachable!("{other:?} is not blocked"),
        }
    }

    fn run(&self, k: &Kernels, cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        match self.encoding {
            Encoding::Q8 => (k.matmul_q8)(&bytemuck::pod_collect_to_vec(&self.bytes), cols, x, out),
            Encoding::Q4 => (k.matmul_q4)(&bytemuck::pod_collect_to_vec(&self.bytes), cols, x, out),
            Encoding::Q4S => (k.matmul_q4s)(&bytemuck::pod_collect_to_vec(&self.bytes), cols, x, out),
            Encoding::Q8X4 => (k.matmul_q8x4)(&bytemuck::pod_collect_to_vec(&self.bytes), cols, x, out),
            Encoding::Q4X4 => (k.matmul_q4x4)(&bytemuck::pod_collect_to_vec(&self.bytes), cols, x, out),
            Encoding::Q4SX4 => (k.matmul_q4sx4)(&bytemuck::pod_collect_to_vec(&self.bytes), cols, x, out),
            Encoding::Q4B => (k.matmul_q4b)(bytemuck::cast_slice(self.kernel_bytes()), cols, x, out),
            Encoding::Q4BX4 => (k.matmul_q4bx4)(bytemuck::cast_slice(self.kernel_bytes()), cols, x, out),
            other => unreachable!("{other:?} is not blocked"),
        }
    }
}

/// `Σ |d·n| · |dₓ·q| + |offset| · |dₓ·q|` over a row and an activation: the
/// size of the terms the kernels add, which bounds their rounding.
fn term_magnitude(row: &[(f32, f32, [i32; GROUP])], x: &[BlockQ8Act]) -> f32 {
    row.iter()
        .zip(x)
        .map(|((d, offset, n), a)| {
            (0..GROUP).map(|j| ((d * n[j] as f32).abs() + offset.abs()) * (a.d * a.qs[j] as f32).abs()).sum::<f32>()
        })
        .sum()
}

fn check_quantized(encoding: Encoding, rows: usize, blocks: usize, batch: usize, w: &[f32], x: &[BlockQ8Act]) {
    let cols = blocks * GROUP;
    let matrix = QuantizedMatrix::new(encoding, w, cols);
    let all_blocks = matrix.blocks();
    let mut expected = vec![0f32; rows * batch];
    matrix.run(&Kernels::SCALAR, cols, x, &mut expected);
    if encoding != encoding.row_major() {
        // The interleaved reference does the row-major reference's arithmetic in its order.
        let row_major = QuantizedMatrix::new(encoding.row_major(), w, cols);
        let mut by_rows = vec![0f32; rows * batch];
        row_major.run(&Kernels::SCALAR, cols, x, &mut by_rows);
        assert_eq!(expected, by_rows, "scalar {encoding:?} against its row-major reference");
    }
    for k in Kernels::all_available() {
        let mut got = vec![f32::NAN; rows * batch];
        matrix.run(k, cols, x, &mut got);
        for r in 0..rows {
            for b in 0..batch {
                let bound = INTEGER_MATMUL_RELATIVE
                    * term_magnitude(&all_blocks[r * blocks..(r + 1) * blocks], &x[b * blocks..(b + 1) * blocks]);
                let (g, e) = (got[r * batch + b], expected[r * batch + b]);
                assert!(
                    close(g, e, bound),
                    "{} {encoding:?} rows {rows} blocks {blocks} batch {batch} [{r}, {b}]: {g} vs {e}",
                    k.name
                );
            }
        }
    }
}

#[test]
fn quantized_matmuls_match_the_reference_at_every_size() {
    // 1..=9 rows: every tail after groups of four and of eight; 16..=20: two groups of eight.
    for rows in (1..=9).chain([16, 17, 20]) {
        for blocks in 1..=16 {
            for batch in 1..=5 {
                let w = data(rows * blocks * GROUP, (rows * 100 + blocks) as u32);
                let x = quantize_activations(&activations(batch * blocks * GROUP, (batch * 1000 + blocks) as u32));
                for encoding in [Encoding::Q8, Encoding::Q4, Encoding::Q4S, Encoding::Q4B] {
                    check_quantized(encoding, rows, blocks, batch, &w, &x);
                }
                // Interleaved: 1, 2, 3, 4, 5 and 7 groups of four rows (the
                // kernels take four groups, then two, then one).
                if rows % 4 == 0 || rows == 9 || rows == 17 {
                    let rows = match rows {
                        9 => 12,
                        17 => 28,
                        other => other,
                    };
                    let w = data(rows * blocks * GROUP, (rows * 100 + blocks + 7) as u32);
                    for encoding in [Encoding::Q8X4, Encoding::Q4X4, Encoding::Q4SX4, Encoding::Q4BX4] {
                        check_quantized(encoding, rows, blocks, batch, &w, &x);
                    }
                }
            }
        }
    }
}

/// The interleaved kernels' GEMM tiles (eight tokens a tile, then a tile of
/// four, then the tokens left over one at a time, on both NEON tables):
/// every batch from 1 to 25 (three tiles of eight and one token left), so
/// every mix of tiles and leftovers, on 1, 2, 3, 4, 5, 7 and 8 groups of
/// four rows (the leftovers take four groups at a time, then two, then one)
/// and rows of 1, 2, 5 and 17 blocks.
#[test]
fn interleaved_gemm_tiles_match_the_reference_at_every_batch() {
    for groups in [1, 2, 3, 4, 5, 7, 8] {
        let rows = groups * quant::INTERLEAVE;
        for blocks in [1, 2, 5, 17] {
            let w = data(rows * blocks * GROUP, (rows * 100 + blocks + 11) as u32);
            for batch in 1..=25 {
                let x = quantize_activations(&activations(batch * blocks * GROUP, (batch * 1000 + blocks + 3) as u32));
                for encoding in [Encoding::Q8X4, Encoding::Q4X4, Encoding::Q4SX4, Encoding::Q4BX4] {
                    check_quantized(encoding, rows, blocks, batch, &w, &x);
                }
            }
        }
    }
}

/// Activations of ±127 and Q8 weights of 127 and −128, for the overflow tests.
fn extreme_operands(rows: usize, blocks: usize) -> (Vec<BlockQ8Act>, Vec<BlockQ8>) {
    let x = (0..blocks)
        .map(|b| {
            let sign = if b % 3 == 0 { -1 } else { 1 };
            BlockQ8Act { d: 0.5, s: 0.5 * (127 * sign * GROUP as i32) as f32, qs: [(127 * sign) as i8; GROUP] }
        })
        .collect();
    let q8 = (0..rows * blocks)
        .map(|i| BlockQ8 { d: f16::from_f32(0.25), qs: [if i % 3 == 0 { -128 } else { 127 }; GROUP] })
        .collect();
    (x, q8)
}

/// The extreme weights of [`extreme_operands`] in every integer encoding:
/// `q8` as given, Q4 and Q4S nibbles of 15 (Q4's minimum −1 − (i mod
/// `spread`)), and the three interleaved; `rows` a multiple of four.
struct ExtremeWeights {
    q4: Vec<BlockQ4>,
    q4s: Vec<BlockQ4S>,
    q8x4: Vec<quant::BlockQ8x4>,
    q4x4: Vec<quant::BlockQ4x4>,
    q4sx4: Vec<quant::BlockQ4Sx4>,
}

fn extreme_weights(q8: &[BlockQ8], rows: usize, blocks: usize, spread: usize) -> ExtremeWeights {
    use crate::quant::{interleave, BlockQ4Sx4, BlockQ4x4, BlockQ8x4, INTERLEAVE};
    let q4: Vec<BlockQ4> = (0..rows * blocks)
        .map(|i| BlockQ4 {
            d: f16::from_f32(0.25),
            m: f16::from_f32(-1.0 - (i % spread) as f32),
            qs: [0xFF; GROUP / 2],
        })
        .collect();
    let q4s: Vec<BlockQ4S> =
        (0..rows * blocks).map(|_| BlockQ4S { d: f16::from_f32(0.25), qs: [0xFF; GROUP / 2] }).collect();
    let mut q8x4 = vec![BlockQ8x4::zeroed(); rows * blocks / INTERLEAVE];
    let mut q4x4 = vec![BlockQ4x4::zeroed(); rows * blocks / INTERLEAVE];
    let mut q4sx4 = vec![BlockQ4Sx4::zeroed(); rows * blocks / INTERLEAVE];
    interleave(q8, blocks, &mut q8x4);
    interleave(&q4, blocks, &mut q4x4);
    interleave(&q4s, blocks, &mut q4sx4);
    ExtremeWeights { q4, q4s, q8x4, q4x4, q4sx4 }
}

/// The largest products a lane can meet: int8 weights of −128 (which a file
/// may hold, though the quantizer never writes it) and 15-valued nibbles,
/// against activations of ±127, so the 16-bit partial sums are at their
/// bounds and the running 32-bit sums grow for many blocks.
#[test]
fn quantized_matmuls_do_not_overflow_at_extremes() {
    let (rows, blocks) = (5, 64);
    let cols = blocks * GROUP;
    let (x, q8) = extreme_operands(rows, blocks);
    let q4: Vec<BlockQ4> = (0..rows * blocks)
        .map(|_| BlockQ4 { d: f16::from_f32(0.25), m: f16::from_f32(-1.0), qs: [0xFF; GROUP / 2] })
        .collect();
    let q4s: Vec<BlockQ4S> =
        (0..rows * blocks).map(|_| BlockQ4S { d: f16::from_f32(0.25), qs: [0xFF; GROUP / 2] }).collect();
    for k in Kernels::all_available() {
        let mut out = vec![0f32; rows];
        (k.matmul_q8)(&q8, cols, &x, &mut out);
        for (r, &v) in out.iter().enumerate() {
            let expected: f32 = (0..blocks)
                .map(|b| {
                    let w = if (r * blocks + b) % 3 == 0 { -128.0 } else { 127.0 };
                    0.25 * 0.5 * w * x[b].qs[0] as f32 * GROUP as f32
                })
                .sum();
            assert_eq!(v, expected, "{} q8 row {r}", k.name);
        }
        let mut expected = vec![0f32; rows];
        (Kernels::SCALAR.matmul_q4)(&q4, cols, &x, &mut expected);
        (k.matmul_q4)(&q4, cols, &x, &mut out);
        assert!(
            out.iter().zip(&expected).all(|(g, e)| close(*g, *e, 1e-5 * e.abs())),
            "{} q4: {out:?} vs {expected:?}",
            k.name
        );
        (Kernels::SCALAR.matmul_q4s)(&q4s, cols, &x, &mut expected);
        (k.matmul_q4s)(&q4s, cols, &x, &mut out);
        assert!(
            out.iter().zip(&expected).all(|(g, e)| close(*g, *e, 1e-5 * e.abs())),
            "{} q4s: {out:?} vs {expected:?}",
            k.name
        );
    }
}

/// As above for the interleaved kernels: 28 rows (four groups, two, one) of
/// extreme blocks, interleaved, against the row-major reference, for one
/// token (the per-token kernels) and for 13 (a GEMM tile of eight, one of
/// four, one token left), every token its own sign pattern.
#[test]
fn interleaved_matmuls_do_not_overflow_at_extremes() {
    let (rows, blocks) = (28, 64);
    let cols = blocks * GROUP;
    let (one, q8) = extreme_operands(rows, blocks);
    let ExtremeWeights { q4, q4s, q8x4, q4x4, q4sx4 } = extreme_weights(&q8, rows, blocks, 5);
    for (batch, k) in
        [1, 13].into_iter().flat_map(|batch| Kernels::all_available().into_iter().map(move |k| (batch, k)))
    {
        // Token t is the extreme activation with the signs of every
        // (t+1)-th block flipped.
        let x: Vec<BlockQ8Act> = (0..batch)
            .flat_map(|t| {
                one.iter().enumerate().map(move |(b, a)| {
                    if t > 0 && b % (t + 1) == 0 {
                        BlockQ8Act { d: a.d, s: -a.s, qs: a.qs.map(|q| -q) }
                    } else {
                        *a
                    }
                })
            })
            .collect();
        let (mut expected, mut out) = (vec![0f32; rows * batch], vec![0f32; rows * batch]);
        (Kernels::SCALAR.matmul_q8)(&q8, cols, &x, &mut expected);
        (k.matmul_q8x4)(&q8x4, cols, &x, &mut out);
        assert_eq!(out, expected, "{} q8x4 batch {batch}", k.name);
        for (name, run_expected, run) in [
            (
                "q4x4",
                &(|e: &mut [f32]| (Kernels::SCALAR.matmul_q4)(&q4, cols, &x, e)) as &dyn Fn(&mut [f32]),
                &(|o: &mut [f32]| (k.matmul_q4x4)(&q4x4, cols, &x, o)) as &dyn Fn(&mut [f32]),
            ),
            ("q4sx4", &|e: &mut [f32]| (Kernels::SCALAR.matmul_q4s)(&q4s, cols, &x, e), &|o: &mut [f32]| {
                (k.matmul_q4sx4)(&q4sx4, cols, &x, o)
            }),
        ] {
            run_expected(&mut expected);
            run(&mut out);
            assert!(
                out.iter().zip(&expected).all(|(g, e)| close(*g, *e, 1e-5 * e.abs())),
                "{} {name} batch {batch}: {out:?} vs {expected:?}",
                k.name
            );
        }
    }
}

/// Rows longer than the scalar interleaved kernel's staging piece (64 blocks)
/// still sum in the row-major reference's order, and the NEON kernels agree.
#[test]
fn interleaved_matmuls_on_long_rows() {
    let (rows, blocks, batch) = (8, 130, 2);
    let w = data(rows * blocks * GROUP, 77);
    let x = quantize_activations(&activations(batch * blocks * GROUP, 78));
    for encoding in [Encoding::Q8X4, Encoding::Q4X4, Encoding::Q4SX4] {
        check_quantized(encoding, rows, blocks, batch, &w, &x);
    }
}

#[test]
fn quantized_matmuls_match_f32_on_dequantized_weights() {
    /// The only error left is the rounding of the activations to int8.
    const ACTIVATION_ROUNDING_BUDGET: f32 = 0.01;
    let (rows, cols, batch) = (13, 96, 3);
    let w = data(rows * cols, 1);
    let x = data(batch * cols, 2);
    let xq = quantize_activations(&x);
    for encoding in [
        Encoding::Q8,
        Encoding::Q4,
        Encoding::Q4S,
        Encoding::Q4B,
        Encoding::Q8X4,
        Encoding::Q4X4,
        Encoding::Q4SX4,
        Encoding::Q4BX4,
    ] {
        let rows = rows - rows % encoding.rows_interleaved();
        let w = &w[..rows * cols];
        let matrix = QuantizedMatrix::new(encoding, w, cols);
        let mut dequantized = vec![0f32; w.len()];
        quant::dequantize_rows(encoding, &matrix.bytes, cols, &mut dequantized);
        let mut expected = vec![0f32; rows * batch];
        (Kernels::SCALAR.matmul_f32)(&dequantized, cols, &x, &mut expected);
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        for k in Kernels::all_available() {
            let mut got = vec![0f32; rows * batch];
            matrix.run(k, cols, &xq, &mut got);
            for (row, scale) in got.chunks_exact_mut(batch).zip(matrix.row_scales(rows)) {
                row.iter_mut().for_each(|v| *v *= scale);
            }
            for (e, g) in expected.iter().zip(&got) {
                assert!(close(*g, *e, ACTIVATION_ROUNDING_BUDGET * scale), "{} {encoding:?}: {g} vs {e}", k.name);
            }
        }
    }
}

#[test]
fn float_matmuls_match_the_reference() {
    for rows in 1..=9 {
        for cols in [1, 3, 8, 15, 16, 17, 31, 32, 33, 64, 100, 257, 512, 1100] {
            for batch in 1..=5 {
                let w = data(rows * cols, (rows * 31 + cols) as u32);
                let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                let x = data(batch * cols, (batch * 17 + cols) as u32);
                let (mut expected16, mut expected32) = (vec![0f32; rows * batch], vec![0f32; rows * batch]);
                (Kernels::SCALAR.matmul_f16)(&w16, cols, &x, &mut expected16);
                (Kernels::SCALAR.matmul_f32)(&w, cols, &x, &mut expected32);
                for k in Kernels::all_available() {
                    let (mut got16, mut got32) = (vec![f32::NAN; rows * batch], vec![f32::NAN; rows * batch]);
                    (k.matmul_f16)(&w16, cols, &x, &mut got16);
                    (k.matmul_f32)(&w, cols, &x, &mut got32);
                    for r in 0..rows {
                        for b in 0..batch {
                            let (row, act) = (r * cols..(r + 1) * cols, b * cols..(b + 1) * cols);
                            let m16: f32 =
                                w16[row.clone()].iter().zip(&x[act.clone()]).map(|(w, x)| (w.to_f32() * x).abs()).sum();
                            let m32: f32 = w[row].iter().zip(&x[act]).map(|(w, x)| (w * x).abs()).sum();
                            let i = r * batch + b;
                            assert!(
                                close(got16[i], expected16[i], FLOAT_DOT_RELATIVE * m16),
                                "{} f16 {rows}×{cols}×{batch}",
                                k.name
                            );
                            assert!(
                                close(got32[i], expected32[i], FLOAT_DOT_RELATIVE * m32),
                                "{} f32 {rows}×{cols}×{batch}",
                                k.name
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Lengths around every step the f32 kernels take (4, 8, 16) and model sizes.
const LENGTHS: [usize; 20] = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 47, 63, 64, 65, 100, 576, 1537];

/// Head sizes around the NEON kernels' pieces of 64 and their tails of 4 and 1.
const HEAD_DIMS: [usize; 9] = [1, 4, 6, 16, 60, 64, 68, 128, 131];

#[test]
fn attention_matches_the_reference() {
    for head_dim in HEAD_DIMS {
        for heads in 1..=3 {
            for positions in [1, 2, 5, 17, 40] {
                let stride = head_dim * 3 + 4;
                let cache_len = (positions - 1) * stride + head_dim;
                let (queries, keys) = (data(heads * head_dim, 3), data(cache_len, 4));
                let scale = 0.125;
                let mut expected = vec![0f32; heads * positions];
                let cached_keys = CachedVectors { data: &keys, stride, positions };
                (Kernels::SCALAR.attention_scores)(&queries, head_dim, &cached_keys, scale, &mut expected);
                // Score weights as a softmax would leave them (positive, summing to one).
                let weights: Vec<f32> =
                    data(heads * positions, 6).iter().map(|v| (v + 1.5) / positions as f32).collect();
                let values = data(cache_len, 5);
                let mut expected_out = vec![0f32; heads * head_dim];
                let cached_values = CachedVectors { data: &values, stride, positions };
                (Kernels::SCALAR.attention_values)(&weights, &cached_values, head_dim, &mut expected_out);
                for k in Kernels::all_available() {
                    let label = format!("{} head_dim {head_dim} heads {heads} positions {positions}", k.name);
                    let mut got = vec![f32::NAN; heads * positions];
                    (k.attention_scores)(&queries, head_dim, &cached_keys, scale, &mut got);
                    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                        let (h, t) = (i / positions, i % positions);
                        let magnitude: f32 = (0..head_dim)
                            .map(|j| (queries[h * head_dim + j] * keys[t * stride + j] * scale).abs())
                            .sum();
                        assert!(close(*g, *e, FLOAT_DOT_RELATIVE * magnitude), "{label}: score {i}: {g} vs {e}");
                    }
                    let mut got = vec![f32::NAN; heads * head_dim];
                    (k.attention_values)(&weights, &cached_values, head_dim, &mut got);
                    for (i, (g, e)) in got.iter().zip(&expected_out).enumerate() {
                        let (h, j) = (i / head_dim, i % head_dim);
                        let magnitude: f32 =
                            (0..positions).map(|t| (weights[h * positions + t] * values[t * stride + j]).abs()).sum();
                        assert!(close(*g, *e, FLOAT_DOT_RELATIVE * magnitude), "{label}: value {i}: {g} vs {e}");
                    }
                }
            }
        }
    }
}

/// The f16 cache's kernels against their reference: summation order only
/// (both widen each stored f16 exactly). Relative to `Σ |terms|`.
const F16_ATTENTION_RELATIVE: f32 = 1e-5;

/// The f16 KV cache's kernels (`*_f16`): every table against the reference at
/// every head size (the NEON pieces of 16, 4 and the last 1 to 3 channels)
/// and lengths around its steps of four positions, one to five heads (its
/// groups of [`super::attention::HALF_HEADS`] and what is left); and the
/// reference against the f32 kernels on the widened values.
#[test]
fn f16_attention_matches_the_reference_and_f32() {
    for head_dim in HEAD_DIMS.into_iter().chain([17, 20, 35]) {
        for heads in 1..=5 {
            for positions in [1, 2, 3, 4, 5, 8, 17, 40] {
                let stride = head_dim * 3 + 4;
                let cache_len = (positions - 1) * stride + head_dim;
                let halves =
                    |seed| -> Vec<f16> { data(cache_len, seed).iter().map(|&v| f16::from_f32(4.0 * v)).collect() };
                let (queries, keys, values) = (data(heads * head_dim, 3), halves(4), halves(5));
                let widened = |h: &[f16]| -> Vec<f32> { h.iter().map(|v| v.to_f32()).collect() };
                let (keys_f32, values_f32) = (widened(&keys), widened(&values));
                let scale = 0.125;
                let weights: Vec<f32> =
                    data(heads * positions, 6).iter().map(|v| (v + 1.5) / positions as f32).collect();
                let cached_keys = CachedVectors { data: &keys[..], stride, positions };
                let cached_values = CachedVectors { data: &values[..], stride, positions };
                let mut expected = vec![0f32; heads * positions];
                (Kernels::SCALAR.attention_scores_f16)(&queries, head_dim, &cached_keys, scale, &mut expected);
                let mut expected_out = vec![0f32; heads * head_dim];
                (Kernels::SCALAR.attention_values_f16)(&weights, &cached_values, head_dim, &mut expected_out);
                let score_magnitude = |i: usize| -> f32 {
                    let (h, t) = (i / positions, i % positions);
                    (0..head_dim).map(|j| (queries[h * head_dim + j] * keys_f32[t * stride + j] * scale).abs()).sum()
                };
                let value_magnitude = |i: usize| -> f32 {
                    let (h, j) = (i / head_dim, i % head_dim);
                    (0..positions).map(|t| (weights[h * positions + t] * values_f32[t * stride + j]).abs()).sum()
                };
                // The reference against the f32 kernels on the same values, widened.
                let mut f32_scores = vec![0f32; heads * positions];
                let keys_as_f32 = CachedVectors { data: &keys_f32[..], stride, positions };
                (Kernels::SCALAR.attention_scores)(&queries, head_dim, &keys_as_f32, scale, &mut f32_scores);
                let mut f32_out = vec![0f32; heads * head_dim];
                let values_as_f32 = CachedVectors { data: &values_f32[..], stride, positions };
                (Kernels::SCALAR.attention_values)(&weights, &values_as_f32, head_dim, &mut f32_out);
                let label = format!("head_dim {head_dim} heads {heads} positions {positions}");
                for (i, (e, f)) in expected.iter().zip(&f32_scores).enumerate() {
                    let bound = F16_ATTENTION_RELATIVE * score_magnitude(i);
                    assert!(close(*e, *f, bound), "reference {label}: score {i}: {e} vs f32 {f}");
                }
                for (i, (e, f)) in expected_out.iter().zip(&f32_out).enumerate() {
                    let bound = F16_ATTENTION_RELATIVE * value_magnitude(i);
                    assert!(close(*e, *f, bound), "reference {label}: value {i}: {e} vs f32 {f}");
                }
                for k in Kernels::all_available() {
                    let label = format!("{} {label}", k.name);
                    let mut got = vec![f32::NAN; heads * positions];
                    (k.attention_scores_f16)(&queries, head_dim, &cached_keys, scale, &mut got);
                    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                        let bound = F16_ATTENTION_RELATIVE * score_magnitude(i);
                        assert!(close(*g, *e, bound), "{label}: score {i}: {g} vs {e}");
                    }
                    let mut got = vec![f32::NAN; heads * head_dim];
                    (k.attention_values_f16)(&weights, &cached_values, head_dim, &mut got);
                    for (i, (g, e)) in got.iter().zip(&expected_out).enumerate() {
                        let bound = F16_ATTENTION_RELATIVE * value_magnitude(i);
                        assert!(close(*g, *e, bound), "{label}: value {i}: {g} vs {e}");
                    }
                }
            }
        }
    }
}

/// Rounding a position to f16 as the cache stores it: every table bit for bit
/// `half`'s round to nearest, ties to even, at every length around the NEON
/// steps of eight and four, on values that include ties, subnormals, values
/// that overflow to infinity, infinities and signed zeros; NaN stays NaN.
#[test]
fn round_to_f16_is_bit_exact_against_half() {
    let specials = [
        0.0,
        -0.0,
        1.0 + 1.0 / 2048.0, // a tie between 1 and the next f16: to even (1)
        1.0 + 3.0 / 2048.0, // a tie: to even (upward)
        65504.0,            // the largest f16
        65520.0,            // halfway to the next binade: rounds to infinity
        -1e6,               // overflows to −∞
        f32::INFINITY,
        f32::NEG_INFINITY,
        5.96e-8,           // about the smallest subnormal f16
        2.9e-8,            // below half of it: to zero
        -3.0e-5,           // a subnormal f16
        6.1e-5,            // near the smallest normal
        f32::MIN_POSITIVE, // far below every f16: zero
        0.1,
        -1234.5678,
    ];
    for length in [0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 23, 64, 100] {
        let values: Vec<f32> = (0..length)
            .map(|i| if i % 3 == 0 { specials[i / 3 % specials.len()] } else { 100.0 * data(length, 7)[i] })
            .collect();
        let expected: Vec<u16> = values.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
        for k in Kernels::all_available() {
            let mut got = vec![f16::from_bits(0x7E01); length];
            (k.round_to_f16)(&values, &mut got);
            let got: Vec<u16> = got.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, expected, "{}: {length} values", k.name);
        }
    }
    for k in Kernels::all_available() {
        let mut got = [f16::ZERO; 9];
        (k.round_to_f16)(&[f32::NAN; 9], &mut got);
        assert!(got.iter().all(|v| v.is_nan()), "{}: NaN rounded to {got:?}", k.name);
    }
}

/// Key widths key-channel pruning leaves (`kv::kept_channels` of 32 and 64 at 0.3 and 0.5), each at the thin keys'
/// stride of three KV heads (SmolLM2's), as `KvCache`'s pruned attention calls the f32 scores kernel.
#[test]
fn attention_scores_match_the_reference_at_pruned_widths() {
    for kept in [16, 23, 32, 45] {
        for positions in [1, 7, 64, 200] {
            let (heads, stride) = (3, 3 * kept);
            let queries = data(heads * kept, 7);
            let keys = data((positions - 1) * stride + kept, 8);
            let mut expected = vec![0f32; heads * positions];
            let cached_keys = CachedVectors { data: &keys, stride, positions };
            (Kernels::SCALAR.attention_scores)(&queries, kept, &cached_keys, 0.125, &mut expected);
            for k in Kernels::all_available() {
                let mut got = vec![f32::NAN; heads * positions];
                (k.attention_scores)(&queries, kept, &cached_keys, 0.125, &mut got);
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    let (h, t) = (i / positions, i % positions);
                    let magnitude: f32 =
                        (0..kept).map(|j| (queries[h * kept + j] * keys[t * stride + j] * 0.125).abs()).sum();
                    let label = format!("{} kept {kept} positions {positions}", k.name);
                    assert!(close(*g, *e, FLOAT_DOT_RELATIVE * magnitude), "{label}: score {i}: {g} vs {e}");
                }
            }
        }
    }
}

/// Batched causal attention against the reference, and the reference against
/// f64: the scores differ by summation order (and the NEON kernel's scale is
/// applied to the query, not the sum), the weights by `exp`'s few ulp, the
/// weighted sums by order. Relative to `Σₜ pₜ·|vₜ|` times one plus the
/// largest `scale·Σ|q·k|` of the row (a score's error moves every weight).
const CAUSAL_RELATIVE: f32 = 2e-6;

/// Sliding windows of the batched kernel's tests: none, a token itself only, and two shorter than a tile's span.
const CAUSAL_WINDOWS: [usize; 4] = [0, 1, 5, 14];

/// Head sizes around the batched kernel's runs of 8 and 4 channels and their tails (48 and 40: not multiples of 16).
const CAUSAL_HEAD_DIMS: [usize; 7] = [64, 48, 40, 12, 6, 3, 131];

/// A causal attention problem: queries of `tokens` tokens × `heads` heads
/// (token stride `query_stride`, with a gap), the cache of `first + tokens`
/// positions (stride `stride`, with a gap), in f32 or, when `half`, in f16
/// (`keys` and `values` then hold the f16 values widened, exactly).
struct CausalCase {
    shape: super::attention::Causal,
    queries: Vec<f32>,
    keys: Vec<f32>,
    values: Vec<f32>,
    half: bool,
}

impl CausalCase {
    #[allow(clippy::too_many_arguments)]
    fn new(
        tokens: usize,
        heads: usize,
        head_dim: usize,
        first: usize,
        window: usize,
        spread: f32,
        seed: u32,
        half: bool,
    ) -> Self {
        let query_stride = heads * head_dim * 2 + 3;
        let stride = head_dim * 3 + 4;
        let positions = first + tokens;
        let shape = super::attention::Causal {
            tokens,
            heads,
            head_dim,
            first,
            query_stride,
            stride,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window,
        };
        let queries = data((tokens - 1) * query_stride + heads * head_dim, seed).iter().map(|v| v * spread).collect();
        let cache = (positions - 1) * stride + head_dim;
        let stored = |seed| -> Vec<f32> {
            let values = data(cache, seed);
            if half {
                values.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
            } else {
                values
            }
        };
        CausalCase { shape, queries, keys: stored(seed + 1), values: stored(seed + 2), half }
    }

    /// The outputs of `k` (NaN where the layout has gaps), with the scratch
    /// exactly as long as [`super::attention::Causal::scratch_len`] asks and
    /// checked for writes past it.
    fn run(&self, k: &Kernels) -> Vec<f32> {
        let s = &self.shape;
        let needed = super::attention::Causal::scratch_len(s.first + s.tokens, s.head_dim).unwrap();
        let mut scratch = vec![f32::NAN; needed + 16];
        scratch[needed..].fill(-9.0);
        let mut out = vec![f32::NAN; self.queries.len()];
        if self.half {
            let (keys, values) = (f16s(&self.keys), f16s(&self.values));
            (k.attention_causal_f16)(s, &self.queries, &keys, &values, &mut scratch[..needed], &mut out);
        } else {
            (k.attention_causal)(s, &self.queries, &self.keys, &self.values, &mut scratch[..needed], &mut out);
        }
        assert!(scratch[needed..].iter().all(|&v| v == -9.0), "{}: wrote past the scratch", k.name);
        out
    }

    /// The outputs of `(token, head)` in f64, each with its error scale (see [`CAUSAL_RELATIVE`]).
    fn exact(&self, token: usize, head: usize) -> Vec<(f64, f32)> {
        let s = &self.shape;
        let query = &self.queries[token * s.query_stride + head * s.head_dim..][..s.head_dim];
        let seen = s.lowest_seen(token)..s.first + token + 1;
        let key = |t: usize| &self.keys[t * s.stride..][..s.head_dim];
        let terms = |t: usize| query.iter().zip(key(t)).map(|(&q, &k)| s.scale as f64 * q as f64 * k as f64);
        let scores: Vec<f64> = seen.clone().map(|t| terms(t).sum::<f64>()).collect();
        let largest = seen.clone().map(|t| terms(t).map(f64::abs).sum::<f64>()).fold(0.0, f64::max);
        let max = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        (0..s.head_dim)
            .map(|channel| {
                let value = |t: usize| self.values[t * s.stride + channel] as f64;
                let weighted = || seen.clone().zip(&weights);
                let output = weighted().map(|(t, w)| w / total * value(t)).sum::<f64>();
                let magnitude = weighted().map(|(t, w)| w / total * value(t).abs()).sum::<f64>();
                (output, (magnitude * (1.0 + largest)) as f32)
            })
            .collect()
    }
}

/// Every table's batched causal attention against the scalar reference, and
/// the reference against f64: heads of 64, 48, 40 and tails down to 3; one to
/// four heads a KV head; batches from one token to more than a tile of rows
/// plus every tail (rows cross tokens); first positions 0 and above, so that
/// the positions a tile reads end at every remainder of its blocks of four;
/// no window, and windows of 1 (a token sees itself only), 5 and 14 (shorter
/// than what a tile's rows span, so that its tokens' first positions differ).
#[test]
fn causal_attention_matches_the_reference_and_f64() {
    check_causal_attention(false);
}

/// As [`causal_attention_matches_the_reference_and_f64`] over the f16 cache
/// (`attention_causal_f16`), against f64 on the same f16 values.
#[test]
fn causal_f16_attention_matches_the_reference_and_f64() {
    check_causal_attention(true);
}

/// The values as f16 (exact for values that came from f16).
fn f16s(values: &[f32]) -> Vec<f16> {
    values.iter().map(|&v| f16::from_f32(v)).collect()
}

fn check_causal_attention(half: bool) {
    use super::attention::TILE_ROWS;
    // The largest error seen as a share of its bound, per table (the reference: against f64).
    let mut worst = vec![0f32; Kernels::all_available().len()];
    for head_dim in CAUSAL_HEAD_DIMS {
        for heads in 1..=4 {
            let most_tokens = (TILE_ROWS + 3) / heads + 2;
            for tokens in 1..=most_tokens {
                for first in [0, 1, 2, 3, 6, 37] {
                    for (window, spread) in CAUSAL_WINDOWS.into_iter().flat_map(|w| [(w, 1.0), (w, 6.0)]) {
                        let label = format!(
                            "half {half} head_dim {head_dim} heads {heads} tokens {tokens} first {first} \
                             window {window} spread {spread}"
                        );
                        let seed = (head_dim + tokens) as u32;
                        let case = CausalCase::new(tokens, heads, head_dim, first, window, spread, seed, half);
                        let expected = case.run(&Kernels::SCALAR);
                        let s = &case.shape;
                        let exact: Vec<Vec<(f64, f32)>> =
                            (0..tokens * heads).map(|row| case.exact(row / heads, row % heads)).collect();
                        for (table, k) in Kernels::all_available().into_iter().enumerate() {
                            let got = if k.name == "scalar" { expected.clone() } else { case.run(k) };
                            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                                let (token, within) = (i / s.query_stride, i % s.query_stride);
                                if within >= heads * head_dim {
                                    assert!(g.is_nan(), "{}: {label}: wrote into the gap at {i}", k.name);
                                    continue;
                                }
                                let (head, channel) = (within / head_dim, within % head_dim);
                                let (exact, bound) = exact[token * heads + head][channel];
                                let error = if k.name == "scalar" { (e - exact as f32).abs() } else { (g - e).abs() };
                                worst[table] = worst[table].max(error / (CAUSAL_RELATIVE * bound));
                                if k.name == "scalar" {
                                    assert!(
                                        close(*e, exact as f32, CAUSAL_RELATIVE * bound),
                                        "{label}: reference {token}, {head}, {channel}: {e} vs f64 {exact}"
                                    );
                                } else {
                                    assert!(
                                        close(*g, *e, CAUSAL_RELATIVE * bound),
                                        "{}: {label}: output {token}, {head}, {channel}: {g} vs {e}",
                                        k.name
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    for (k, worst) in Kernels::all_available().into_iter().zip(worst) {
        eprintln!("{}: the largest error is {worst:.3} of its bound", k.name);
    }
}

/// Synthetic quantized KV data: codes in their full range for `bits`
/// (every byte is valid), f16 scales in (0, 0.02] and minimums in [−1, 1].
fn kv_codes(count: usize, bits: u32, seed: u32) -> (Vec<u8>, Vec<f16>, Vec<f16>) {
    let (scaled, per) = (count, if bits == 8 { 1 } else { 2 });
    let codes = data(scaled.div_ceil(per).max(1), seed).iter().map(|v| ((v + 1.0) * 127.5) as u8).collect();
    let scales = data(count, seed + 1).iter().map(|v| f16::from_f32(0.01 * (v + 1.0) + 1e-4)).collect();
    let mins = data(count, seed + 2).iter().map(|&v| f16::from_f32(v)).collect();
    (codes, scales, mins)
}

/// The stored integer of code `index` (low nibbles first in each run of 32 at 4 bits).
fn kv_code(codes: &[u8], bits: u32, index: usize) -> f32 {
    super::attention::scalar::code(codes, bits, index)
}

/// Quantized attention (the KV cache's `*_q8`/`*_q4` kernels): every table
/// against the reference, and the reference against the f32 kernels on the
/// dequantized cache; score rows longer than the quantized part must keep
/// what follows it.
#[test]
fn quantized_attention_matches_the_reference_and_f32() {
    use super::attention::KEY_GROUP;
    for bits in [8u32, 4] {
        for head_dim in [32, 64, 96, 128] {
            for heads in 1..=3 {
                for groups in [0, 1, 2, 5] {
                    let label = format!("q{bits} head_dim {head_dim} heads {heads} groups {groups}");
                    let positions = groups * KEY_GROUP;
                    let row = positions + 3;
                    let queries = data(heads * head_dim, 7);
                    let key_bytes = KEY_GROUP * bits as usize / 8;
                    let (codes, key_scales, key_mins) =
                        kv_codes(groups * head_dim * key_bytes * 8 / bits as usize, bits, 11);
                    let (codes, key_scales, key_mins) = (
                        &codes[..groups * head_dim * key_bytes],
                        &key_scales[..groups * head_dim],
                        &key_mins[..groups * head_dim],
                    );
                    let scale = 0.125;
                    let scores_of = |k: &Kernels| {
                        let mut scores = vec![-7.0f32; heads * row];
                        let kernel = if bits == 8 { k.attention_scores_q8 } else { k.attention_scores_q4 };
                        let keys = QuantizedKeys { codes, scales: key_scales, mins: key_mins, groups };
                        kernel(&queries, head_dim, &keys, scale, &mut scores, row);
                        scores
                    };
                    let expected = scores_of(&Kernels::SCALAR);
                    // The keys as f32, position-major, for the f32 kernel and the term sizes.
                    let key = |t: usize, c: usize| {
                        let at = (t / KEY_GROUP) * head_dim + c;
                        key_mins[at].to_f32()
                            + key_scales[at].to_f32() * kv_code(&codes[at * key_bytes..], bits, t % KEY_GROUP)
                    };
                    let magnitude = |h: usize, t: usize| -> f32 {
                        (0..head_dim)
                            .map(|c| {
                                let at = (t / KEY_GROUP) * head_dim + c;
                                let q = queries[h * head_dim + c];
                                (q * key_scales[at].to_f32() * kv_code(&codes[at * key_bytes..], bits, t % KEY_GROUP))
                                    .abs()
                                    + (q * key_mins[at].to_f32()).abs()
                            })
                            .sum::<f32>()
                            * scale
                    };
                    if positions > 0 {
                        let keys: Vec<f32> =
                            (0..positions * head_dim).map(|i| key(i / head_dim, i % head_dim)).collect();
                        let mut f32_scores = vec![0f32; heads * positions];
                        let keys = CachedVectors { data: &keys, stride: head_dim, positions };
                        (Kernels::SCALAR.attention_scores)(&queries, head_dim, &keys, scale, &mut f32_scores);
                        for (i, f) in f32_scores.iter().enumerate() {
                            let (h, t) = (i / positions, i % positions);
                            let e = expected[h * row + t];
                            assert!(
                                close(e, *f, FLOAT_DOT_RELATIVE * magnitude(h, t)),
                                "{label}: reference score {i}: {e} vs f32 {f}"
                            );
                        }
                    }
                    for k in Kernels::all_available() {
                        let got = scores_of(k);
                        for h in 0..heads {
                            for t in 0..row {
                                let (g, e) = (got[h * row + t], expected[h * row + t]);
                                if t >= positions {
                                    assert_eq!(
                                        g, -7.0,
                                        "{}: {label}: wrote past the quantized part at {h}, {t}",
                                        k.name
                                    );
                                } else {
                                    assert!(
                                        close(g, e, FLOAT_DOT_RELATIVE * magnitude(h, t)),
                                        "{}: {label}: score {h}, {t}: {g} vs {e}",
                                        k.name
                                    );
                                }
                            }
                        }
                    }

                    // Values: per token, the head sharing one scale and minimum.
                    for positions in [0, 1, 5, 33, positions] {
                        let value_bytes = head_dim * bits as usize / 8;
                        let (codes, value_scales, value_mins) = kv_codes(positions.max(1) * head_dim, bits, 13);
                        let (codes, value_scales, value_mins) =
                            (&codes[..positions * value_bytes], &value_scales[..positions], &value_mins[..positions]);
                        let row = positions + 2;
                        let weights: Vec<f32> =
                            data(heads * row, 17).iter().map(|v| (v + 1.5) / (positions + 1) as f32).collect();
                        let values_of = |k: &Kernels| {
                            let mut out = vec![f32::NAN; heads * head_dim];
                            let kernel = if bits == 8 { k.attention_values_q8 } else { k.attention_values_q4 };
                            let values = QuantizedValues { codes, scales: value_scales, mins: value_mins, positions };
                            kernel(&weights, row, &values, head_dim, &mut out);
                            out
                        };
                        let expected = values_of(&Kernels::SCALAR);
                        let value = |t: usize, c: usize| {
                            value_mins[t].to_f32()
                                + value_scales[t].to_f32() * kv_code(&codes[t * value_bytes..], bits, c)
                        };
                        let magnitude = |h: usize, c: usize| -> f32 {
                            (0..positions)
                                .map(|t| {
                                    let w = weights[h * row + t];
                                    (w * value_scales[t].to_f32() * kv_code(&codes[t * value_bytes..], bits, c)).abs()
                                        + (w * value_mins[t].to_f32()).abs()
                                })
                                .sum()
                        };
                        let label = format!("{label} value positions {positions}");
                        if positions > 0 {
                            let values: Vec<f32> =
                                (0..positions * head_dim).map(|i| value(i / head_dim, i % head_dim)).collect();
                            let packed: Vec<f32> =
                                (0..heads).flat_map(|h| weights[h * row..h * row + positions].to_vec()).collect();
                            let mut f32_out = vec![0f32; heads * head_dim];
                            let values = CachedVectors { data: &values, stride: head_dim, positions };
                            (Kernels::SCALAR.attention_values)(&packed, &values, head_dim, &mut f32_out);
                            for (i, f) in f32_out.iter().enumerate() {
                                let e = expected[i];
                                assert!(
                                    close(e, *f, FLOAT_DOT_RELATIVE * magnitude(i / head_dim, i % head_dim)),
                                    "{label}: reference value {i}: {e} vs f32 {f}"
                                );
                            }
                        } else {
                            assert!(expected.iter().all(|&v| v == 0.0), "{label}: no positions must give zeros");
                        }
                        for k in Kernels::all_available() {
                            let got = values_of(k);
                            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                                assert!(
                                    close(*g, *e, FLOAT_DOT_RELATIVE * magnitude(i / head_dim, i % head_dim)),
                                    "{}: {label}: value {i}: {g} vs {e}",
                                    k.name
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn rmsnorm_matches_the_reference() {
    for n in LENGTHS {
        let (x, weight) = (data(n, 6), data(n, 7));
        let mut expected = vec![0f32; n];
        (Kernels::SCALAR.rmsnorm)(&mut expected, &x, &weight, 1e-5);
        for k in Kernels::all_available() {
            let mut got = vec![f32::NAN; n];
            (k.rmsnorm)(&mut got, &x, &weight, 1e-5);
            for (g, e) in got.iter().zip(&expected) {
                assert!(close(*g, *e, RMSNORM_RELATIVE * e.abs() + TINY), "{} n={n}: {g} vs {e}", k.name);
            }
        }
    }
}

#[test]
fn softmax_matches_the_reference() {
    for n in LENGTHS {
        // Scores over a wide range, some far enough below the maximum to underflow.
        for spread in [1.0, 30.0, 120.0] {
            let scores: Vec<f32> = data(n, 8).iter().map(|v| v * spread).collect();
            let mut expected = scores.clone();
            (Kernels::SCALAR.softmax)(&mut expected);
            for k in Kernels::all_available() {
                let mut got = scores.clone();
                (k.softmax)(&mut got);
                for (g, e) in got.iter().zip(&expected) {
                    assert!(
                        close(*g, *e, EXP_BASED_RELATIVE * e.abs() + TINY),
                        "{} n={n} spread {spread}: {g} vs {e}",
                        k.name
                    );
                }
            }
        }
    }
}

/// A GLU gate kernel: `gate = act(gate) ⊙ up`.
type GateKernel = fn(&mut [f32], &[f32]);

/// Every kernel table's GLU gate `pick` against the reference's, on gates
/// spread 1, 10 and 100 wide: the reference and the kernels differ by exp's
/// few ulp (the gates are exp-based in both).
fn check_gate_kernel(pick: fn(&Kernels) -> GateKernel, seeds: (u32, u32)) {
    for n in LENGTHS {
        for spread in [1.0, 10.0, 100.0] {
            let gate: Vec<f32> = data(n, seeds.0).iter().map(|v| v * spread).collect();
            let up = data(n, seeds.1);
            let mut expected = gate.clone();
            pick(&Kernels::SCALAR)(&mut expected, &up);
            for k in Kernels::all_available() {
                let mut got = gate.clone();
                pick(k)(&mut got, &up);
                for (g, e) in got.iter().zip(&expected) {
                    assert!(
                        close(*g, *e, EXP_BASED_RELATIVE * e.abs() + TINY),
                        "{} n={n} spread {spread}: {g} vs {e}",
                        k.name
                    );
                }
            }
        }
    }
}

#[test]
fn gelu_mul_matches_the_reference() {
    check_gate_kernel(|k| k.gelu_mul, (11, 12));
    // GELU itself, at points whose values are known: gelu(0) = 0, gelu(1) ≈ 0.841192,
    // gelu(−1) ≈ −0.158808, and gelu(x) → x, 0 far out.
    for k in Kernels::all_available() {
        let mut gate = [0.0, 1.0, -1.0, 12.0, -12.0];
        (k.gelu_mul)(&mut gate, &[1.0; 5]);
        for (got, want) in gate.iter().zip([0.0, 0.841192, -0.158808, 12.0, 0.0]) {
            assert!((got - want).abs() < 1e-5, "{}: {gate:?}", k.name);
        }
    }
}

#[test]
fn silu_mul_matches_the_reference() {
    check_gate_kernel(|k| k.silu_mul, (9, 10));
}

#[test]
fn rope_is_identical_to_the_reference() {
    for pairs in [1, 2, 3, 4, 5, 7, 8, 9, 16, 31, 32, 33] {
        let (cos, sin) = (data(pairs, 11), data(pairs, 12));
        for halves in [false, true] {
            let head = data(2 * pairs + 3, 13);
            let mut expected = head.clone();
            (Kernels::SCALAR.rope)(&mut expected[..2 * pairs], &cos, &sin, halves);
            for k in Kernels::all_available() {
                let mut got = head.clone();
                (k.rope)(&mut got[..2 * pairs], &cos, &sin, halves);
                assert_eq!(got, expected, "{} pairs {pairs} halves {halves}", k.name);
            }
        }
    }
}

#[test]
fn transpose_is_identical_to_the_reference() {
    // Every edge of the 4 × 4 blocks in both dimensions, and a batch's shape.
    let shapes = (1..=9).flat_map(|r| (1..=9).map(move |c| (r, c))).chain([(576, 32), (1536, 17), (33, 64)]);
    for (rows, cols) in shapes {
        let src = data(rows * cols, 21);
        let mut expected = vec![0f32; rows * cols];
        (Kernels::SCALAR.transpose)(&src, rows, &mut expected);
        assert_eq!(expected[rows.min(2) - 1 + (cols - 1) * rows], src[(rows.min(2) - 1) * cols + cols - 1]);
        for k in Kernels::all_available() {
            let mut got = vec![f32::NAN; rows * cols];
            (k.transpose)(&src, rows, &mut got);
            assert_eq!(got, expected, "{} {rows} × {cols}", k.name);
        }
    }
}

#[cfg(target_arch = "aarch64")]
#[test]
fn polynomial_exp_is_within_a_few_ulp() {
    use std::arch::aarch64::*;
    let mut worst = 0f32;
    for i in 0..=400_000 {
        let x = -87.0 + 175.0 * i as f32 / 400_000.0;
        let mut lanes = [0f32; 4];
        // SAFETY: `lanes` is four values.
        unsafe { vst1q_f32(lanes.as_mut_ptr(), super::ops::neon::exp(vdupq_n_f32(x))) };
        let expected = x.exp();
        let relative = ((lanes[0] - expected) / expected).abs();
        worst = worst.max(relative);
        assert!(relative <= EXP_RELATIVE, "exp({x}) = {} vs {expected}", lanes[0]);
    }
    println!("polynomial exp: worst relative error {worst:e}");
    let mut lanes = [1f32; 4];
    // SAFETY: `lanes` is four values.
    unsafe {
        vst1q_f32(
            lanes.as_mut_ptr(),
            super::ops::neon::exp(vld1q_f32([-88.0, -1000.0, f32::NEG_INFINITY, 0.0].as_ptr())),
        )
    };
    assert_eq!(lanes, [0.0, 0.0, 0.0, 1.0]);
}

/// Deterministic channel masks of about `percent` % active channels.
fn channel_mask(blocks: usize, percent: u32, seed: u32) -> Vec<u32> {
    (0..blocks)
        .map(|b| {
            (0..GROUP as u32).fold(0u32, |bits, j| {
                let h = (b as u32 * 32 + j).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503);
                bits | (((h.wrapping_mul(2_246_822_519) >> 8) % 100 < percent) as u32) << j
            })
        })
        .collect()
}

/// Channel-major products over a mask against the row-major reference on
/// the masked activation: the scalar kernels give its bits, every table
/// stays within the integer-product bound; 1 to 18 column blocks (the NEON
/// kernel gathers 16 at a time); for whole and partial row ranges
/// (threads split by tiles), one to five tiles (the NEON kernel takes two
/// at a time, then one), masks from empty to full and `None`.
#[test]
fn channel_major_matmuls_match_the_row_major_reference() {
    for tiles in 1..=5 {
        let rows = tiles * quant::CHANNEL_TILE;
        for blocks in [1, 2, 5, 18] {
            let cols = blocks * GROUP;
            let w = data(rows * cols, (rows * 10 + blocks) as u32);
            for encoding in [Encoding::Q8C, Encoding::Q4C] {
                let row_major = QuantizedMatrix::new(encoding.row_major(), &w, cols);
                let mut columns = vec![0u8; row_major.bytes.len()];
                quant::to_channel_major(encoding, &row_major.bytes, cols, &mut columns);
                let all_blocks = row_major.blocks();
                for (percent, seed) in [(0, 1), (10, 2), (50, 3), (90, 4), (100, 5), (101, 6)] {
                    // 101: no mask at all (every channel).
                    let mask = (percent <= 100).then(|| channel_mask(blocks, percent, seed));
                    let mut x = activations(cols, seed * 7 + blocks as u32);
                    if let Some(mask) = &mask {
                        for (i, v) in x.iter_mut().enumerate() {
                            if mask[i / GROUP] >> (i % GROUP) & 1 == 0 {
                                *v = 0.0;
                            }
                        }
                    }
                    let xq = quantize_activations(&x);
                    let mut expected = vec![0f32; rows];
                    row_major.run(&Kernels::SCALAR, cols, &xq, &mut expected);
                    for range in [0..rows, quant::CHANNEL_TILE..rows, 0..quant::CHANNEL_TILE] {
                        let run = |k: &Kernels| {
                            let mut got = vec![f32::NAN; range.len()];
                            let kernel = if encoding == Encoding::Q8C { k.matmul_q8c } else { k.matmul_q4c };
                            kernel(
                                &ChannelMatrix { weights: &columns, total_rows: rows, cols },
                                range.clone(),
                                &xq,
                                mask.as_deref(),
                                &mut got,
                            );
                            got
                        };
                        let what = format!("{encoding:?} rows {rows} blocks {blocks} mask {percent}% range {range:?}");
                        assert_eq!(run(&Kernels::SCALAR), expected[range.clone()], "scalar {what}");
                        for k in Kernels::all_available() {
                            for (r, g) in range.clone().zip(run(k)) {
                                let bound = INTEGER_MATMUL_RELATIVE
                                    * term_magnitude(&all_blocks[r * blocks..(r + 1) * blocks], &xq);
                                assert!(
                                    close(g, expected[r], bound),
                                    "{} {what} row {r}: {g} vs {}",
                                    k.name,
                                    expected[r]
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Channel-major Q4 at the 16-bit partial sums' bound: 32 active channels
/// of ±127 against nibbles of 0 and 15 (stored −8 and 7).
#[test]
fn channel_major_q4_does_not_overflow_at_extremes() {
    let (rows, blocks) = (2 * quant::CHANNEL_TILE, 3);
    let cols = blocks * GROUP;
    let row_major: Vec<BlockQ4> = (0..rows * blocks)
        .map(|i| BlockQ4 {
            d: f16::from_f32(0.25),
            m: f16::from_f32(-1.0),
            qs: [if i % 2 == 0 { 0x00 } else { 0xFF }; GROUP / 2],
        })
        .collect();
    let (x, _) = extreme_operands(rows, blocks);
    let bytes: &[u8] = bytemuck::cast_slice(&row_major);
    let mut columns = vec![0u8; bytes.len()];
    quant::to_channel_major(Encoding::Q4C, bytes, cols, &mut columns);
    let mut expected = vec![0f32; rows];
    (Kernels::SCALAR.matmul_q4)(&row_major, cols, &x, &mut expected);
    for k in Kernels::all_available() {
        let mut got = vec![f32::NAN; rows];
        (k.matmul_q4c)(&ChannelMatrix { weights: &columns, total_rows: rows, cols }, 0..rows, &x, None, &mut got);
        for (r, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!(close(*g, *e, INTEGER_MATMUL_RELATIVE * e.abs().max(1.0)), "{} row {r}: {g} vs {e}", k.name);
        }
    }
}

/// The channel-major GEMMs (every channel, a batch of tokens) against the
/// one-token reference, token by token: the scalar and AVX2 GEMMs give its
/// bits, every table stays within the integer-product bound. Batches 1 to 17 (the
/// `sdot` tiles take 8, 4, 2 and 1 tokens, the ARMv8.0 ones 6, 4 and 1 for
/// Q4C and 4 and 1 for Q8C) and 32 (a prompt's micro-batch, on SmolLM2's
/// 192 × 576 keys and values), 1 to 33 column blocks (the `sdot` GEMM packs
/// up to 16 at a time, in runs of equal length: 17 as 9 + 8, 33 as 3 × 11),
/// one to six tiles of rows, whole and partial row ranges (threads split by
/// tiles).
#[test]
fn channel_major_gemms_match_the_one_token_reference() {
    let shapes = [
        (6, 18, 32..=32),
        (1, 1, 1..=17),
        (2, 8, 1..=17),
        (1, 9, 1..=17),
        (3, 17, 1..=10),
        (2, 16, 15..=17),
        (1, 33, 7..=9),
    ];
    for (tiles, blocks, batches) in shapes {
        let rows = tiles * quant::CHANNEL_TILE;
        let cols = blocks * GROUP;
        let w = data(rows * cols, (rows * 100 + blocks) as u32);
        for encoding in [Encoding::Q8C, Encoding::Q4C] {
            let row_major = QuantizedMatrix::new(encoding.row_major(), &w, cols);
            let mut columns = vec![0u8; row_major.bytes.len()];
            quant::to_channel_major(encoding, &row_major.bytes, cols, &mut columns);
            let all_blocks = row_major.blocks();
            let one = |k: &Kernels| if encoding == Encoding::Q8C { k.matmul_q8c } else { k.matmul_q4c };
            let gemm = |k: &Kernels| if encoding == Encoding::Q8C { k.gemm_q8c } else { k.gemm_q4c };
            for batch in batches.clone() {
                let xq = quantize_activations(&activations(batch * cols, (batch * 31 + blocks) as u32));
                // Every row, and with more than one tile, the parts threads take.
                let mut ranges = Vec::new();
                ranges.push(0..rows);
                if tiles > 1 {
                    ranges.extend([quant::CHANNEL_TILE..rows, 0..quant::CHANNEL_TILE]);
                }
                for range in ranges {
                    let n = range.len();
                    let mut expected = vec![0f32; batch * n];
                    for (token, out) in xq.chunks_exact(blocks).zip(expected.chunks_exact_mut(n)) {
                        one(&Kernels::SCALAR)(
                            &ChannelMatrix { weights: &columns, total_rows: rows, cols },
                            range.clone(),
                            token,
                            None,
                            out,
                        );
                    }
                    let run = |k: &Kernels| {
                        let mut got = vec![f32::NAN; batch * n];
                        gemm(k)(
                            &ChannelMatrix { weights: &columns, total_rows: rows, cols },
                            range.clone(),
                            &xq,
                            &mut got,
                        );
                        got
                    };
                    let what = format!("{encoding:?} rows {rows} blocks {blocks} batch {batch} range {range:?}");
                    let scalar = run(&Kernels::SCALAR);
                    assert!(
                        scalar.iter().zip(&expected).all(|(g, e)| g.to_bits() == e.to_bits()),
                        "scalar {what}: {scalar:?} vs {expected:?}"
                    );
                    for k in Kernels::all_available() {
                        // The AVX2 table promises the reference's bits (`avx2` below).
                        let exact = k.name == "avx2";
                        for (i, (g, e)) in run(k).into_iter().zip(&expected).enumerate() {
                            let (token, r) = (i / n, range.start + i % n);
                            assert!(
                                !exact || g.to_bits() == e.to_bits(),
                                "avx2 {what} token {token} row {r}: {g} vs {e}"
                            );
                            let bound = INTEGER_MATMUL_RELATIVE
                                * term_magnitude(
                                    &all_blocks[r * blocks..(r + 1) * blocks],
                                    &xq[token * blocks..(token + 1) * blocks],
                                );
                            assert!(close(g, *e, bound), "{} {what} token {token} row {r}: {g} vs {e}", k.name);
                        }
                    }
                }
            }
        }
    }
}

/// The channel-major GEMMs at the bounds of their integer sums: Q4 nibbles
/// of 0 and 15 (stored −8 and 7, the ARMv8.0 16-bit sums' extremes) and Q8
/// values of −128 and 127, against blocks of ±127, for a batch of eleven
/// (every tile size).
#[test]
fn channel_major_gemms_do_not_overflow_at_extremes() {
    let (rows, blocks, batch) = (2 * quant::CHANNEL_TILE, 10, 11);
    let cols = blocks * GROUP;
    let (one_token, q8) = extreme_operands(rows, blocks);
    let one_token = &one_token;
    // Each token its own signs: block b of token t negative when (b + t) % 3 == 0.
    let x: Vec<BlockQ8Act> = (0..batch)
        .flat_map(|t| {
            (0..blocks).map(move |b| {
                let a = one_token[(b + t) % blocks];
                BlockQ8Act { d: 0.5 + t as f32 * 0.125, s: (0.5 + t as f32 * 0.125) / 0.5 * a.s, qs: a.qs }
            })
        })
        .collect();
    let q4: Vec<BlockQ4> = (0..rows * blocks)
        .map(|i| BlockQ4 {
            d: f16::from_f32(0.25),
            m: f16::from_f32(-1.0),
            qs: [if i % 2 == 0 { 0x00 } else { 0xFF }; GROUP / 2],
        })
        .collect();
    for (encoding, bytes) in
        [(Encoding::Q4C, bytemuck::cast_slice::<BlockQ4, u8>(&q4)), (Encoding::Q8C, bytemuck::cast_slice(&q8))]
    {
        let mut columns = vec![0u8; bytes.len()];
        quant::to_channel_major(encoding, bytes, cols, &mut columns);
        let mut expected = vec![0f32; rows * batch];
        for (token, out) in x.chunks_exact(blocks).zip(expected.chunks_exact_mut(rows)) {
            match encoding {
                Encoding::Q4C => (Kernels::SCALAR.matmul_q4)(&q4, cols, token, out),
                _ => (Kernels::SCALAR.matmul_q8)(&q8, cols, token, out),
            }
        }
        for k in Kernels::all_available() {
            let gemm = if encoding == Encoding::Q4C { k.gemm_q4c } else { k.gemm_q8c };
            let mut got = vec![f32::NAN; rows * batch];
            gemm(&ChannelMatrix { weights: &columns, total_rows: rows, cols }, 0..rows, &x, &mut got);
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    close(*g, *e, INTEGER_MATMUL_RELATIVE * e.abs().max(1.0)),
                    "{} {encoding:?} token {} row {}: {g} vs {e}",
                    k.name,
                    i / rows,
                    i % rows
                );
            }
        }
    }
}

/// The bias constraint: the projection is a dot product (summation order
/// only, [`FLOAT_DOT_RELATIVE`] of `Σ |h·r|`), and the removal leaves the
/// projection `h · r` at `centre` when `w = 1`, for a unit `d` read along
/// itself (`r = d`) and read along an oblique `r` with `r · d = 1` (the
/// whitened erasure).
#[test]
fn project_out_matches_the_reference() {
    for n in [1, 3, 4, 17, 64, 577] {
        let h = data(n, n as u32);
        let mut d = data(n, 7 + n as u32);
        let norm = d.iter().map(|v| v * v).sum::<f32>().sqrt();
        d.iter_mut().for_each(|v| *v /= norm);
        // d plus half of a unit vector orthogonal to it (none when n = 1).
        let mut e = data(n, 13 + n as u32);
        let along: f32 = e.iter().zip(&d).map(|(a, b)| a * b).sum();
        e.iter_mut().zip(&d).for_each(|(v, d)| *v -= along * d);
        let e_norm = e.iter().map(|v| v * v).sum::<f32>().sqrt();
        let oblique: Vec<f32> = d.iter().zip(&e).map(|(d, e)| if n > 1 { d + 0.5 * e / e_norm } else { *d }).collect();
        for r in [&d, &oblique] {
            let magnitude: f32 = h.iter().zip(r).map(|(a, b)| (a * b).abs()).sum();
            for centre in [0.0, 0.75] {
                for w in [0.0, 0.5, 1.0] {
                    let mut expected = h.clone();
                    let p_ref = (Kernels::SCALAR.project_out)(&mut expected, r, &d, w, centre);
                    if w == 0.0 {
                        assert_eq!(expected, h, "w = 0 leaves h alone");
                    }
                    for k in Kernels::all_available() {
                        let mut got = h.clone();
                        let p = (k.project_out)(&mut got, r, &d, w, centre);
                        let tolerance = FLOAT_DOT_RELATIVE * magnitude + TINY;
                        assert!(close(p, p_ref, tolerance), "{} n={n}: {p} vs {p_ref}", k.name);
                        for (g, e) in got.iter().zip(&expected) {
                            assert!(
                                close(*g, *e, 2.0 * FLOAT_DOT_RELATIVE * (magnitude + centre + e.abs()) + TINY),
                                "{} n={n} w={w} centre={centre}: {g} vs {e}",
                                k.name
                            );
                        }
                        if w == 1.0 {
                            let left: f32 = got.iter().zip(r).map(|(a, b)| a * b).sum();
                            assert!(
                                (left - centre).abs() <= 1e-4 * (1.0 + magnitude),
                                "{} n={n}: {left} along r, not {centre}",
                                k.name
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The x86-64 host table: every test above runs it through
/// [`Kernels::all_available`]; these add the batch and tile shapes its
/// GEMM kernels special-case.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    /// On a CPU with AVX2, FMA and F16C (`grep avx2 /proc/cpuinfo`), the
    /// table is chosen and held to the reference by every test here; on one
    /// without, it is handed out nowhere.
    #[test]
    fn the_avx2_table_is_chosen_and_tested_where_the_cpu_has_it() {
        let available = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        let names: Vec<_> = Kernels::all_available().iter().map(|k| k.name).collect();
        assert_eq!(names.contains(&"avx2"), available, "{names:?}");
        let vnni = super::super::matmul::avx512::available();
        assert_eq!(Kernels::detect().name == "avx2", available && !vnni);
    }

    /// The table named `table` computes the products as the reference does,
    /// bit for bit (the x86 kernels promise it: a last-bit difference moves
    /// the logits through the next layer's int8 rounding), on top of
    /// [`check_quantized`]'s bound; nothing when this CPU lacks the table.
    pub(super) fn check_bit_exact(
        table: &str,
        encoding: Encoding,
        rows: usize,
        blocks: usize,
        batch: usize,
        w: &[f32],
        x: &[BlockQ8Act],
    ) {
        check_quantized(encoding, rows, blocks, batch, w, x);
        let Some(kernels) = Kernels::all_available().into_iter().find(|k| k.name == table) else { return };
        let cols = blocks * GROUP;
        let matrix = QuantizedMatrix::new(encoding, w, cols);
        let (mut expected, mut got) = (vec![0f32; rows * batch], vec![f32::NAN; rows * batch]);
        matrix.run(&Kernels::SCALAR, cols, x, &mut expected);
        matrix.run(kernels, cols, x, &mut got);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!(
                g.to_bits() == e.to_bits(),
                "{table} {encoding:?} rows {rows} blocks {blocks} batch {batch} [{}, {}]: {g} vs {e}",
                i / batch,
                i % batch
            );
        }
    }

    /// Activation quantization, bit for bit, where the rounding and the
    /// casts have their edge cases: ties at .5 either side of zero (rounded
    /// away from zero, as `f32::round`), zero blocks, ±0, a scale so small
    /// that 1/d overflows (`as i8` saturates), NaN and infinities (`as i8`
    /// of NaN is 0; `f32::max` skips NaN).
    #[test]
    fn quantize_activation_is_bit_exact_at_the_edges() {
        let Some(avx2) = Kernels::all_available().into_iter().find(|k| k.name == "avx2") else { return };
        let ties: Vec<f32> = (0..GROUP).map(|j| if j == 0 { 127.0 } else { (j as f32 - 16.0) + 0.5 }).collect();
        let mut edges: Vec<Vec<f32>> = vec![
            ties.clone(),
            ties.iter().map(|v| -v).collect(),
            vec![0.0; GROUP],
            (0..GROUP).map(|j| if j % 2 == 0 { 0.0 } else { -0.0 }).collect(),
            (0..GROUP).map(|j| f32::from_bits(1 + j as u32)).collect(),
            (0..GROUP).map(|j| (j as f32 - 16.0) * 1e-38).collect(),
        ];
        for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut block = data(GROUP, 5);
            block[3] = special;
            edges.push(block);
        }
        let x: Vec<f32> = edges.concat();
        let blocks = x.len() / GROUP;
        let expected = quantize_activations(&x);
        let mut got = vec![BlockQ8Act { d: 1.0, s: 1.0, qs: [1; GROUP] }; blocks];
        (avx2.quantize_activation)(&x, &mut got);
        for (b, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!(
                g.qs == e.qs && g.d.to_bits() == e.d.to_bits() && g.s.to_bits() == e.s.to_bits(),
                "block {b}: {g:?} vs {e:?}"
            );
        }
    }

    /// Row-major rows in tiles of four (1..=9 and 13: every tail), interleaved
    /// groups in tiles of eight for one activation and two for a batch (1..=5,
    /// 8, 9, 15 and 17 groups), activations in tiles of four with the last
    /// ones alone (batches 1..=9, 16, 17, 33), at the model's row lengths (18
    /// and 48 blocks: 576 and 1536 columns) and short ones; bit for bit.
    #[test]
    fn quantized_gemm_matches_the_reference_at_every_tile_and_tail() {
        for blocks in [1, 3, 18, 48] {
            for batch in (1..=9).chain([16, 17, 33]) {
                let x = quantize_activations(&activations(batch * blocks * GROUP, (batch * 7919 + blocks) as u32));
                for rows in (1..=9).chain([13]) {
                    let w = data(rows * blocks * GROUP, (rows * 31 + blocks * 5 + batch) as u32);
                    for encoding in [Encoding::Q8, Encoding::Q4, Encoding::Q4S] {
                        check_bit_exact("avx2", encoding, rows, blocks, batch, &w, &x);
                    }
                }
                for groups in (1..=5).chain([8, 9, 15, 17]) {
                    let rows = groups * quant::INTERLEAVE;
                    let w = data(rows * blocks * GROUP, (rows * 37 + blocks * 3 + batch) as u32);
                    for encoding in [Encoding::Q8X4, Encoding::Q4X4, Encoding::Q4SX4] {
                        check_bit_exact("avx2", encoding, rows, blocks, batch, &w, &x);
                    }
                }
            }
        }
    }

    /// Extreme operands (int8 weights of −128 and 127, nibbles of 15,
    /// activations of ±127) through the batched tiles, not only through
    /// one activation: the 16-bit partial sums at their bounds for every
    /// tile shape.
    #[test]
    fn batched_products_do_not_overflow_at_extremes() {
        let (rows, blocks, batch) = (12, 40, 5);
        let cols = blocks * GROUP;
        let (one, q8) = extreme_operands(rows, blocks);
        // Each activation its own sign pattern: the first `blocks` blocks, rotated.
        let x: Vec<BlockQ8Act> =
            (0..batch).flat_map(|b| (0..blocks).map(move |k| (b, k))).map(|(b, k)| one[(k + b) % blocks]).collect();
        let ExtremeWeights { q4, q4s, q8x4, q4x4, q4sx4 } = extreme_weights(&q8, rows, blocks, 3);
        let reference = |run: &dyn Fn(&mut [f32])| {
            let mut out = vec![f32::NAN; rows * batch];
            run(&mut out);
            out
        };
        let scalar = Kernels::SCALAR;
        let expected_q8 = reference(&|o| (scalar.matmul_q8)(&q8, cols, &x, o));
        let expected_q4 = reference(&|o| (scalar.matmul_q4)(&q4, cols, &x, o));
        let expected_q4s = reference(&|o| (scalar.matmul_q4s)(&q4s, cols, &x, o));
        for k in Kernels::all_available() {
            let runs: [(&str, &[f32], Vec<f32>); 6] = [
                ("q8", &expected_q8, reference(&|o| (k.matmul_q8)(&q8, cols, &x, o))),
                ("q8x4", &expected_q8, reference(&|o| (k.matmul_q8x4)(&q8x4, cols, &x, o))),
                ("q4", &expected_q4, reference(&|o| (k.matmul_q4)(&q4, cols, &x, o))),
                ("q4x4", &expected_q4, reference(&|o| (k.matmul_q4x4)(&q4x4, cols, &x, o))),
                ("q4s", &expected_q4s, reference(&|o| (k.matmul_q4s)(&q4s, cols, &x, o))),
                ("q4sx4", &expected_q4s, reference(&|o| (k.matmul_q4sx4)(&q4sx4, cols, &x, o))),
            ];
            for (name, expected, got) in runs {
                assert!(
                    got.iter().zip(expected).all(|(g, e)| close(*g, *e, INTEGER_MATMUL_RELATIVE * e.abs())),
                    "{} {name}: {got:?} vs {expected:?}",
                    k.name
                );
            }
        }
    }
}

/// The x86-64 AVX-512 VNNI table: every test above runs it through
/// [`Kernels::all_available`] where the CPU has it; these add its tile
/// shapes and the operands only it takes exactly. Each says when it skipped.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::avx2::check_bit_exact;
    use super::*;

    const TABLE: &str = "avx512-vnni";

    /// The table, or `None` after saying why this test checks nothing here.
    fn table(test: &str) -> Option<&'static Kernels> {
        let found = Kernels::all_available().into_iter().find(|k| k.name == TABLE);
        if found.is_none() {
            println!("{test}: skipped, this CPU lacks AVX-512 F, BW, VL or VNNI (grep avx512 /proc/cpuinfo)");
        }
        found
    }

    /// On a CPU with AVX-512 F, BW, VL and VNNI (and AVX2, FMA, F16C), the
    /// table is handed out and chosen; on one without, nowhere.
    #[test]
    fn the_avx512_vnni_table_is_chosen_where_the_cpu_has_it() {
        let available = ["avx512f", "avx512bw", "avx512vl", "avx512vnni"].iter().all(|f| match *f {
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
            "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
            _ => std::arch::is_x86_feature_detected!("avx512vnni"),
        }) && super::super::matmul::avx2::available();
        let names: Vec<_> = Kernels::all_available().iter().map(|k| k.name).collect();
        println!("AVX-512 VNNI {}: tables {names:?}", if available { "present" } else { "absent" });
        assert_eq!(names.contains(&TABLE), available, "{names:?}");
        assert_eq!(Kernels::detect().name == TABLE, available);
    }

    /// Row-major rows in units of 16, two units a tile for one activation
    /// and one for a batch (1..=17, 31..=33, 47..=49: every tail of both),
    /// interleaved groups four to a unit (1..=9, 12, 13, 16, 17), activations
    /// in tiles of four with the last ones alone (batches 1..=9, 16, 17), at
    /// the model's row lengths (18 and 48 blocks) and short ones; bit for bit.
    #[test]
    fn quantized_products_match_the_reference_bit_for_bit_at_every_tile_and_tail() {
        if table("quantized_products_match_the_reference_bit_for_bit_at_every_tile_and_tail").is_none() {
            return;
        }
        for blocks in [1, 3, 18, 48] {
            for batch in (1..=9).chain([16, 17]) {
                let x = quantize_activations(&activations(batch * blocks * GROUP, (batch * 7907 + blocks) as u32));
                for rows in (1..=17).chain(31..=33).chain(47..=49) {
                    let w = data(rows * blocks * GROUP, (rows * 29 + blocks * 5 + batch) as u32);
                    for encoding in [Encoding::Q8, Encoding::Q4, Encoding::Q4S] {
                        check_bit_exact(TABLE, encoding, rows, blocks, batch, &w, &x);
                    }
                }
                for groups in (1..=9).chain([12, 13, 16, 17]) {
                    let rows = groups * quant::INTERLEAVE;
                    let w = data(rows * blocks * GROUP, (rows * 41 + blocks * 3 + batch) as u32);
                    for encoding in [Encoding::Q8X4, Encoding::Q4X4, Encoding::Q4SX4] {
                        check_bit_exact(TABLE, encoding, rows, blocks, batch, &w, &x);
                    }
                }
            }
        }
    }

    /// Every int8 operand the kernels can meet, against the reference bit
    /// for bit: Q8 weights of −128 and 127 (a file may hold −128), nibbles
    /// of 0 and 15, and activations of −128 (`quantize_activation` saturates
    /// to it where 1/d overflows), −127 and 127, so the zero-point
    /// corrections (−128·Σq for Q8, −8·Σq for Q4S) and the 32-bit sums are
    /// at their bounds; one activation and a batch of five.
    #[test]
    fn extreme_operands_are_exact() {
        let Some(vnni) = table("extreme_operands_are_exact") else { return };
        let (rows, blocks) = (36, 40);
        let cols = blocks * GROUP;
        let q8: Vec<BlockQ8> = (0..rows * blocks)
            .map(|i| BlockQ8 {
                d: f16::from_f32(0.25 + (i % 5) as f32),
                qs: std::array::from_fn(|j| if (i + j) % 3 == 0 { -128 } else { 127 }),
            })
            .collect();
        let ExtremeWeights { q4, q4s, q8x4, q4x4, q4sx4 } = extreme_weights(&q8, rows, blocks, 3);
        for batch in [1, 5] {
            let x: Vec<BlockQ8Act> = (0..batch * blocks)
                .map(|b| {
                    let qs: [i8; GROUP] = std::array::from_fn(|j| match (b + j) % 4 {
                        0 => -128,
                        1 => -127,
                        2 => 127,
                        _ => (j as i8) - 16,
                    });
                    let d = 0.5 + (b % 3) as f32;
                    BlockQ8Act { d, s: d * qs.iter().map(|&q| q as i32).sum::<i32>() as f32, qs }
                })
                .collect();
            let run = |f: &dyn Fn(&mut [f32])| {
                let mut out = vec![f32::NAN; rows * batch];
                f(&mut out);
                out
            };
            let s = Kernels::SCALAR;
            let pairs: [(&str, Vec<f32>, Vec<f32>); 6] = [
                ("q8", run(&|o| (s.matmul_q8)(&q8, cols, &x, o)), run(&|o| (vnni.matmul_q8)(&q8, cols, &x, o))),
                ("q8x4", run(&|o| (s.matmul_q8)(&q8, cols, &x, o)), run(&|o| (vnni.matmul_q8x4)(&q8x4, cols, &x, o))),
                ("q4", run(&|o| (s.matmul_q4)(&q4, cols, &x, o)), run(&|o| (vnni.matmul_q4)(&q4, cols, &x, o))),
                ("q4x4", run(&|o| (s.matmul_q4)(&q4, cols, &x, o)), run(&|o| (vnni.matmul_q4x4)(&q4x4, cols, &x, o))),
                ("q4s", run(&|o| (s.matmul_q4s)(&q4s, cols, &x, o)), run(&|o| (vnni.matmul_q4s)(&q4s, cols, &x, o))),
                (
                    "q4sx4",
                    run(&|o| (s.matmul_q4s)(&q4s, cols, &x, o)),
                    run(&|o| (vnni.matmul_q4sx4)(&q4sx4, cols, &x, o)),
                ),
            ];
            for (name, expected, got) in pairs {
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&expected), "{name} batch {batch}: {got:?} vs {expected:?}");
            }
        }
    }
}
