//! ARMv8.0 NEON kernels: every aarch64 core has them, and they are the best
//! the Raspberry Pi 4's Cortex-A72 can do (it has no dot-product extension).
//!
//! Integer products widen int8 × int8 into 16-bit lanes (`smull`, then
//! `smlal`/`smlal2` for as many more products as a lane holds without
//! overflow) and add pairs of lanes into 32-bit running sums (`sadalp`).
//!
//! Four rows go together ([`for_row_groups`]): one activation block is loaded
//! once for the four, and a block's scale math is one vector for the four.
//! Q8 rows keep running int32 sums that are never reset, and a block's four
//! row sums are a pairwise reduction of them minus the previous one (one
//! subtraction a block instead of zeroing four accumulators). Q4 products are
//! small enough to reduce across the four rows in 16-bit lanes.

use super::scalar;
use crate::quant::{BlockQ4, BlockQ4S, BlockQ8, BlockQ8Act, GROUP};
use half::f16;
use std::arch::aarch64::*;
use std::arch::asm;

/// Rows one kernel step multiplies together.
pub(super) const ROWS: usize = 4;

/// Runs `dot4(rows, activation, blocks)` (four rows and one activation, as
/// pointers to `blocks` blocks each) for every group of four rows and every
/// activation of the batch, and stores its four sums at `out[r·batch + b]`.
/// A last group of one to three rows repeats its last row to make four and
/// stores only the rows that exist. `dot4` may rely on every pointer it gets
/// being valid for `blocks` blocks.
#[inline(always)]
pub(super) fn for_row_groups<B>(
    weights: &[B],
    cols: usize,
    x: &[BlockQ8Act],
    out: &mut [f32],
    dot4: impl Fn([*const B; ROWS], *const BlockQ8Act, usize) -> float32x4_t,
) {
    let blocks = cols / GROUP;
    assert!(blocks > 0 && cols.is_multiple_of(GROUP), "{cols} columns are not whole blocks of {GROUP}");
    let (rows, batch) = (weights.len() / blocks, x.len() / blocks);
    assert!(
        weights.len() == rows * blocks && x.len() == batch * blocks && out.len() == rows * batch,
        "matmul shapes disagree: {} weight blocks, {} activation blocks, {} outputs, {blocks} blocks a row",
        weights.len(),
        x.len(),
        out.len()
    );
    let (w, activations, results) = (weights.as_ptr(), x.as_ptr(), out.as_mut_ptr());
    let full = rows / ROWS;
    for group in 0..full {
        let first = group * ROWS;
        // SAFETY: rows `first .. first + 4` and every activation are inside
        // the slices checked above, and so are the outputs written.
        unsafe {
            let row = w.add(first * blocks);
            let four = [row, row.add(blocks), row.add(2 * blocks), row.add(3 * blocks)];
            if batch == 1 {
                vst1q_f32(results.add(first), dot4(four, activations, blocks));
            } else {
                for b in 0..batch {
                    let mut lanes = [0f32; ROWS];
                    vst1q_f32(lanes.as_mut_ptr(), dot4(four, activations.add(b * blocks), blocks));
                    for (i, &v) in lanes.iter().enumerate() {
                        *results.add((first + i) * batch + b) = v;
                    }
                }
            }
        }
    }
    let present = rows - full * ROWS;
    if present > 0 {
        let first = full * ROWS;
        // SAFETY: as above; rows past the last are replaced by the last.
        unsafe {
            let four = [0, 1, 2, 3].map(|i: usize| w.add((first + i.min(present - 1)) * blocks));
            for b in 0..batch {
                let mut lanes = [0f32; ROWS];
                vst1q_f32(lanes.as_mut_ptr(), dot4(four, activations.add(b * blocks), blocks));
                for (i, &v) in lanes[..present].iter().enumerate() {
                    *results.add((first + i) * batch + b) = v;
                }
            }
        }
    }
}

/// Four binary16 values (as bits) to f32 with `fcvtl`: exact, subnormals included.
#[inline(always)]
pub(crate) fn widen_f16(bits: uint16x4_t) -> float32x4_t {
    let wide: float32x4_t;
    // SAFETY: `fcvtl` reads and writes registers only, and FP/NEON is part of
    // every aarch64 target. (An instruction rather than `vcvt_f32_f16`, which
    // needs Rust 1.94; the workspace supports 1.87.)
    unsafe {
        asm!("fcvtl {wide:v}.4s, {bits:v}.4h", wide = lateout(vreg) wide, bits = in(vreg) bits,
             options(pure, nomem, nostack, preserves_flags))
    };
    wide
}

/// The upper four of eight binary16 values to f32 with `fcvtl2`.
#[inline(always)]
pub(crate) fn widen_f16_high(bits: uint16x8_t) -> float32x4_t {
    let wide: float32x4_t;
    // SAFETY: as `widen_f16`.
    unsafe {
        asm!("fcvtl2 {wide:v}.4s, {bits:v}.8h", wide = lateout(vreg) wide, bits = in(vreg) bits,
             options(pure, nomem, nostack, preserves_flags))
    };
    wide
}

// The integer kernels are one `asm!` loop each, so that the loads walk every
// row and the activation with post-increment addressing (`ld1 …, [x], #n`),
// which the compiler does not reliably produce, and a block costs the fewest
// instructions. The loop and its fixed registers are shared
// (`four_row_loop!`); each kernel supplies one block of four rows. The
// macros build the text: one instruction a line, each step documented.
//
// Registers: v0 the four rows' f32 results; v1–v4 each row's running int32
// sums (four lanes each, for kernels that need them); v5 and v28 the reduced
// running sums after the previous block (they alternate, so a step of two
// blocks needs no move); v6 the activation's [d, s]; v16, v17 its 32 int8
// values; v18, v19 the four rows' scales (and minimums); v20–v27 weights and
// products; v29 the block's four sums; v30 = −8.0, v31 = 0x0F in every byte.
// v7–v15 are left to `dotprod`'s eight-row loop (v8–v15 are callee-saved:
// declaring them clobbered makes the compiler save them).

/// The loop around `$block!(previous, totals)`: two blocks a step, then a
/// last odd block. Operands: `{x}`, `{w0}` … `{w3}` (pointers, advanced),
/// `{pairs}` (blocks / 2, counted down) and `{odd}` (blocks % 2).
#[rustfmt::skip]
macro_rules! four_row_loop {
    ($block:ident) => { concat!(
        "movi v0.16b, #0\n",
        "movi v1.16b, #0\n",
        "movi v2.16b, #0\n",
        "movi v3.16b, #0\n",
        "movi v4.16b, #0\n",
        "movi v5.16b, #0\n",
        "movi v31.16b, #0x0f\n",
        "fmov v30.4s, #-8.0\n",
        "cbz {pairs}, 3f\n",
        "2:\n",
        $block!("v5", "v28"),
        $block!("v28", "v5"),
        "subs {pairs}, {pairs}, #1\n",
        "b.ne 2b\n",
        "3:\n",
        "cbz {odd}, 4f\n",
        $block!("v5", "v28"),
        "4:\n",
    )};
}

/// The activation block: its [d, s] into v6, its 32 int8 values into v16, v17.
#[rustfmt::skip]
macro_rules! load_activation {
    () => { concat!(
        "ld1 {{v6.2s}}, [{x}], #8\n",
        "ld1 {{v16.16b, v17.16b}}, [{x}], #32\n",
    )};
}

/// This block's four row sums as f32 in v29, from the running sums `$s0` …
/// `$s3` of four rows: reduced pairwise (three `addp`) into `$totals`, minus
/// `$previous`, the same after the block before. Wrapping arithmetic keeps
/// the difference exact even if a running sum wraps, as a block's own sum
/// always fits.
#[rustfmt::skip]
macro_rules! block_sums {
    ($s0:literal, $s1:literal, $s2:literal, $s3:literal, $previous:literal, $totals:literal) => { concat!(
        "addp ", $totals, ".4s, ", $s0, ".4s, ", $s1, ".4s\n",
        "addp v29.4s, ", $s2, ".4s, ", $s3, ".4s\n",
        "addp ", $totals, ".4s, ", $totals, ".4s, v29.4s\n",
        "sub v29.4s, ", $totals, ".4s, ", $previous, ".4s\n",
        "scvtf v29.4s, v29.4s\n",
    )};
}

/// Q8 and Q4S scale: `$acc` += sums (v29) × d_w × d_x, with d_w the f16
/// lanes of `$d` (widened in place); v19 is scratch.
#[rustfmt::skip]
macro_rules! scale_by_d {
    ($acc:literal, $d:literal) => { concat!(
        "fcvtl ", $d, ".4s, ", $d, ".4h\n",
        "fmul v19.4s, ", $d, ".4s, v6.s[0]\n",
        "fmla ", $acc, ".4s, v29.4s, v19.4s\n",
    )};
}

/// Q4S zero point, after `scale_by_d`: Σ d·(n − 8)·dₓ·q = d·dₓ·Σ n·q − 8·d·s.
/// `$d` holds the widened d_w; v20 is scratch.
#[rustfmt::skip]
macro_rules! subtract_zero_point {
    ($acc:literal, $d:literal) => { concat!(
        "fmul v20.2s, v6.2s, v30.2s\n",
        "fmla ", $acc, ".4s, ", $d, ".4s, v20.s[1]\n",
    )};
}

/// Q4 scale into `$acc`: Σ (d·n + m)·(dₓ·q) = d·dₓ·Σ n·q + m·s, with d and
/// m the f16 lanes of `$d` and `$m` (widened in place) and the sums in v29.
#[rustfmt::skip]
macro_rules! scale_q4 {
    ($acc:literal, $d:literal, $m:literal) => { concat!(
        "fcvtl ", $d, ".4s, ", $d, ".4h\n",
        "fcvtl ", $m, ".4s, ", $m, ".4h\n",
        "fmul ", $d, ".4s, ", $d, ".4s, v6.s[0]\n",
        "fmla ", $acc, ".4s, v29.4s, ", $d, ".4s\n",
        "fmla ", $acc, ".4s, ", $m, ".4s, v6.s[1]\n",
    )};
}

/// One Q4 or Q4S row's 16 bytes of nibbles (after its scale): `$t0` takes the
/// low nibbles (values 0..16), `$t1` the high ones (values 16..32); both are
/// 0..15, valid as signed bytes.
#[rustfmt::skip]
macro_rules! unpack_nibbles {
    ($w:literal, $t0:literal, $t1:literal) => { concat!(
        "ld1 {{", $t1, ".16b}}, [{", $w, "}], #16\n",
        "and ", $t0, ".16b, ", $t1, ".16b, v31.16b\n",
        "ushr ", $t1, ".16b, ", $t1, ".16b, #4\n",
    )};
}

/// One Q8 row: its scale into lane `$lane` of v18, its 32 int8 values; the
/// products of the low and high eight bytes of each half, two per 16-bit lane
/// (|w·x| ≤ 128·127, two fit in i16); adjacent lanes added into the row's
/// running sums.
#[rustfmt::skip]
macro_rules! q8_row {
    ($lane:literal, $w:literal, $sum:literal, $t0:literal, $t1:literal, $t2:literal, $t3:literal) => { concat!(
        "ld1 {{v18.h}}[", $lane, "], [{", $w, "}], #2\n",
        "ld1 {{", $t0, ".16b, ", $t1, ".16b}}, [{", $w, "}], #32\n",
        "smull ", $t2, ".8h, ", $t0, ".8b, v16.8b\n",
        "smlal2 ", $t2, ".8h, ", $t0, ".16b, v16.16b\n",
        "smull ", $t3, ".8h, ", $t1, ".8b, v17.8b\n",
        "smlal2 ", $t3, ".8h, ", $t1, ".16b, v17.16b\n",
        "sadalp ", $sum, ".4s, ", $t2, ".8h\n",
        "sadalp ", $sum, ".4s, ", $t3, ".8h\n",
    )};
}

/// Four products of nibble (≤ 15) × int8 (|q| ≤ 127) per 16-bit lane
/// (|p| ≤ 7620) into `$t2`, not yet accumulated (see `nibble_sums`).
#[rustfmt::skip]
macro_rules! nibble_products {
    ($t0:literal, $t1:literal, $t2:literal) => { concat!(
        "smull ", $t2, ".8h, ", $t0, ".8b, v16.8b\n",
        "smlal2 ", $t2, ".8h, ", $t0, ".16b, v16.16b\n",
        "smlal ", $t2, ".8h, ", $t1, ".8b, v17.8b\n",
        "smlal2 ", $t2, ".8h, ", $t1, ".16b, v17.16b\n",
    )};
}

/// The four rows' block sums as f32 in v29, from their 16-bit products in
/// v22, v23, v26, v27. Small products leave room to reduce in 16 bits: two
/// rounds of pairwise adds across rows (lanes ≤ 4·7620 = 30480 < 2¹⁵) give
/// `[r0 r0 r1 r1 r2 r2 r3 r3]`, one widening pairwise add the four sums. No
/// running sums.
#[rustfmt::skip]
macro_rules! nibble_sums {
    () => { concat!(
        "addp v22.8h, v22.8h, v23.8h\n",
        "addp v26.8h, v26.8h, v27.8h\n",
        "addp v22.8h, v22.8h, v26.8h\n",
        "saddlp v29.4s, v22.8h\n",
        "scvtf v29.4s, v29.4s\n",
    )};
}

/// One Q4 row: its d and m into lane `$lane` of v18 and v19 (`ld2`
/// deinterleaves the adjacent pair), its nibbles, the products.
#[rustfmt::skip]
macro_rules! q4_row {
    ($lane:literal, $w:literal, $t0:literal, $t1:literal, $t2:literal) => { concat!(
        "ld2 {{v18.h, v19.h}}[", $lane, "], [{", $w, "}], #4\n",
        unpack_nibbles!($w, $t0, $t1),
        nibble_products!($t0, $t1, $t2),
    )};
}

/// One Q4S row: its d into lane `$lane` of v18, its nibbles, the products.
#[rustfmt::skip]
macro_rules! q4s_row {
    ($lane:literal, $w:literal, $t0:literal, $t1:literal, $t2:literal) => { concat!(
        "ld1 {{v18.h}}[", $lane, "], [{", $w, "}], #2\n",
        unpack_nibbles!($w, $t0, $t1),
        nibble_products!($t0, $t1, $t2),
    )};
}

/// A Q8 block of four rows.
#[rustfmt::skip]
macro_rules! q8_block {
    ($previous:literal, $totals:literal) => { concat!(
        load_activation!(),
        q8_row!("0", "w0", "v1", "v20", "v21", "v22", "v23"),
        q8_row!("1", "w1", "v2", "v24", "v25", "v26", "v27"),
        q8_row!("2", "w2", "v3", "v20", "v21", "v22", "v23"),
        q8_row!("3", "w3", "v4", "v24", "v25", "v26", "v27"),
        block_sums!("v1", "v2", "v3", "v4", $previous, $totals),
        scale_by_d!("v0", "v18"),
    )};
}

/// A Q4 block of four rows (no running sums: `$previous`, `$totals` unused).
#[rustfmt::skip]
macro_rules! q4_block {
    ($previous:literal, $totals:literal) => { concat!(
        load_activation!(),
        q4_row!("0", "w0", "v20", "v21", "v22"),
        q4_row!("1", "w1", "v24", "v25", "v23"),
        q4_row!("2", "w2", "v20", "v21", "v26"),
        q4_row!("3", "w3", "v24", "v25", "v27"),
        nibble_sums!(),
        scale_q4!("v0", "v18", "v19"),
    )};
}

/// A Q4S block of four rows (no running sums).
#[rustfmt::skip]
macro_rules! q4s_block {
    ($previous:literal, $totals:literal) => { concat!(
        load_activation!(),
        q4s_row!("0", "w0", "v20", "v21", "v22"),
        q4s_row!("1", "w1", "v24", "v25", "v23"),
        q4s_row!("2", "w2", "v20", "v21", "v26"),
        q4s_row!("3", "w3", "v24", "v25", "v27"),
        nibble_sums!(),
        scale_by_d!("v0", "v18"),
        subtract_zero_point!("v0", "v18"),
    )};
}

/// Runs `four_row_loop!($block)` over four rows and one activation and
/// returns v0. Needs `unsafe` and the kernel's contract: each row and the
/// activation point at `$blocks` readable blocks.
macro_rules! run_four_rows {
    ($block:ident, $rows:expr, $x:expr, $blocks:expr) => {{
        let rows = $rows;
        let blocks: usize = $blocks;
        let acc: float32x4_t;
        asm!(
            four_row_loop!($block),
            x = inout(reg) $x => _,
            w0 = inout(reg) rows[0] => _,
            w1 = inout(reg) rows[1] => _,
            w2 = inout(reg) rows[2] => _,
            w3 = inout(reg) rows[3] => _,
            pairs = inout(reg) blocks / 2 => _,
            odd = in(reg) blocks % 2,
            out("v0") acc,
            out("v1") _, out("v2") _, out("v3") _, out("v4") _, out("v5") _, out("v6") _,
            out("v16") _, out("v17") _, out("v18") _, out("v19") _, out("v20") _, out("v21") _,
            out("v22") _, out("v23") _, out("v24") _, out("v25") _, out("v26") _, out("v27") _,
            out("v28") _, out("v29") _, out("v30") _, out("v31") _,
            options(nostack, readonly),
        );
        acc
    }};
}

/// Four Q8 rows · one activation.
///
/// # Safety
/// Every row and `x` point at `blocks` readable blocks.
#[inline(always)]
unsafe fn dot4_q8(rows: [*const BlockQ8; ROWS], x: *const BlockQ8Act, blocks: usize) -> float32x4_t {
    run_four_rows!(q8_block, rows, x, blocks)
}

/// Four Q4 rows · one activation.
///
/// # Safety
/// Every row and `x` point at `blocks` readable blocks.
#[inline(always)]
unsafe fn dot4_q4(rows: [*const BlockQ4; ROWS], x: *const BlockQ8Act, blocks: usize) -> float32x4_t {
    run_four_rows!(q4_block, rows, x, blocks)
}

/// Four Q4S rows · one activation.
///
/// # Safety
/// Every row and `x` point at `blocks` readable blocks.
#[inline(always)]
unsafe fn dot4_q4s(rows: [*const BlockQ4S; ROWS], x: *const BlockQ8Act, blocks: usize) -> float32x4_t {
    run_four_rows!(q4s_block, rows, x, blocks)
}

/// Q8 matrix × int8 activations.
pub fn matmul_q8(weights: &[BlockQ8], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    // SAFETY: `for_row_groups` hands over pointers to `blocks` blocks.
    for_row_groups(weights, cols, x, out, |rows, a, blocks| unsafe { dot4_q8(rows, a, blocks) })
}

/// Asymmetric Q4 matrix × int8 activations.
pub fn matmul_q4(weights: &[BlockQ4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    // SAFETY: `for_row_groups` hands over pointers to `blocks` blocks.
    for_row_groups(weights, cols, x, out, |rows, a, blocks| unsafe { dot4_q4(rows, a, blocks) })
}

/// Symmetric Q4 matrix × int8 activations.
pub fn matmul_q4s(weights: &[BlockQ4S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    // SAFETY: `for_row_groups` hands over pointers to `blocks` blocks.
    for_row_groups(weights, cols, x, out, |rows, a, blocks| unsafe { dot4_q4s(rows, a, blocks) })
}

/// `Σ w·x` over an f16 row and an f32 activation, sixteen values a step.
#[target_feature(enable = "neon")]
#[inline]
fn dot_f16_f32(w: &[f16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: `i + 16 ≤ n`, within both slices.
        unsafe {
            let h = vld1q_u16_x2(w.as_ptr().add(i).cast());
            let v = vld1q_f32_x4(x.as_ptr().add(i));
            // Widen eight f16 to two f32 vectors (fcvtl, fcvtl2), multiply, accumulate.
            acc[0] = vfmaq_f32(acc[0], widen_f16(vget_low_u16(h.0)), v.0);
            acc[1] = vfmaq_f32(acc[1], widen_f16_high(h.0), v.1);
            acc[2] = vfmaq_f32(acc[2], widen_f16(vget_low_u16(h.1)), v.2);
            acc[3] = vfmaq_f32(acc[3], widen_f16_high(h.1), v.3);
        }
        i += 16;
    }
    let mut sum = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
    for j in i..n {
        sum += scalar::f16_to_f32(w[j]) * x[j];
    }
    sum
}

/// f16 matrix × f32 activations.
pub fn matmul_f16(weights: &[f16], cols: usize, x: &[f32], out: &mut [f32]) {
    let batch = x.len() / cols;
    for (row, outputs) in weights.chunks_exact(cols).zip(out.chunks_exact_mut(batch)) {
        for (o, activation) in outputs.iter_mut().zip(x.chunks_exact(cols)) {
            // SAFETY: NEON is part of every aarch64 target.
            *o = unsafe { dot_f16_f32(row, activation) };
        }
    }
}

/// f32 matrix × f32 activations.
pub fn matmul_f32(weights: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
    let batch = x.len() / cols;
    for (row, outputs) in weights.chunks_exact(cols).zip(out.chunks_exact_mut(batch)) {
        for (o, activation) in outputs.iter_mut().zip(x.chunks_exact(cols)) {
            *o = crate::kernels::ops::neon::dot(row, activation);
        }
    }
}
