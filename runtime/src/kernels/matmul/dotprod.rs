//! NEON kernels with the dot-product extension (`sdot`, ARMv8.2's
//! FEAT_DotProd): the Raspberry Pi 5's Cortex-A76.
//!
//! Same structure as [`super::neon`] (running int32 sums, the scale math in
//! one vector for four rows), eight rows a step so that one activation load
//! serves eight rows (four for the last rows of a matrix); each 16 bytes of weights meet
//! their 16 activation bytes in one `sdot`, which adds four products into each
//! 32-bit lane. (`vdotq_s32` is still unstable in Rust; the kernels are
//! `asm!` loops anyway, see [`super::neon`].)
//!
//! The kernels are compiled with `#[target_feature(enable = "dotprod")]`.
//! The public functions are safe: each checks the feature (a cached load,
//! once per call) before entering them, and [`crate::kernels::Kernels::detect`]
//! puts them in a table only on CPUs that have it.

use super::neon::{for_row_groups, ROWS};
use crate::quant::{BlockQ4, BlockQ4S, BlockQ8, BlockQ8Act, GROUP};
use std::arch::aarch64::*;
use std::arch::asm;

/// Whether this CPU has the dot-product instructions.
pub fn available() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// The eight-row loop: as `four_row_loop!`, with a second set of registers
/// for rows 4–7: v7 their results, v8–v11 their running sums, v12 and v13
/// their reduced running sums (alternating), v14 and v15 their scales (and
/// minimums). Operands `{w4}` … `{w7}` point at those rows. One activation
/// load serves eight rows.
#[rustfmt::skip]
macro_rules! eight_row_loop {
    ($block:ident) => { concat!(
        "movi v0.16b, #0\n",
        "movi v1.16b, #0\n",
        "movi v2.16b, #0\n",
        "movi v3.16b, #0\n",
        "movi v4.16b, #0\n",
        "movi v5.16b, #0\n",
        "movi v7.16b, #0\n",
        "movi v8.16b, #0\n",
        "movi v9.16b, #0\n",
        "movi v10.16b, #0\n",
        "movi v11.16b, #0\n",
        "movi v12.16b, #0\n",
        "movi v31.16b, #0x0f\n",
        "fmov v30.4s, #-8.0\n",
        "cbz {pairs}, 3f\n",
        "2:\n",
        $block!("v5", "v28", "v12", "v13"),
        $block!("v28", "v5", "v13", "v12"),
        "subs {pairs}, {pairs}, #1\n",
        "b.ne 2b\n",
        "3:\n",
        "cbz {odd}, 4f\n",
        $block!("v5", "v28", "v12", "v13"),
        "4:\n",
    )};
}

/// One Q8 row: its scale into lane `$lane` of `$d`, its 32 int8 values, each
/// half's 16 products added four a lane into the row's running sums (`sdot`).
#[rustfmt::skip]
macro_rules! sdot_q8_row {
    ($lane:literal, $w:literal, $sum:literal, $t0:literal, $t1:literal, $d:literal) => { concat!(
        "ld1 {{", $d, ".h}}[", $lane, "], [{", $w, "}], #2\n",
        "ld1 {{", $t0, ".16b, ", $t1, ".16b}}, [{", $w, "}], #32\n",
        "sdot ", $sum, ".4s, ", $t0, ".16b, v16.16b\n",
        "sdot ", $sum, ".4s, ", $t1, ".16b, v17.16b\n",
    )};
}

/// One Q4 row: its d and m into lane `$lane` of `$d` and `$m` (consecutive
/// registers, `ld2` deinterleaves the pair), its nibbles; low nibbles meet
/// the first half of the activation, high the second.
#[rustfmt::skip]
macro_rules! sdot_q4_row {
    ($lane:literal, $w:literal, $sum:literal, $t0:literal, $t1:literal, $d:literal, $m:literal) => { concat!(
        "ld2 {{", $d, ".h, ", $m, ".h}}[", $lane, "], [{", $w, "}], #4\n",
        unpack_nibbles!($w, $t0, $t1),
        "sdot ", $sum, ".4s, ", $t0, ".16b, v16.16b\n",
        "sdot ", $sum, ".4s, ", $t1, ".16b, v17.16b\n",
    )};
}

/// One Q4S row: its d into lane `$lane` of `$d`, its nibbles, `sdot`.
#[rustfmt::skip]
macro_rules! sdot_q4s_row {
    ($lane:literal, $w:literal, $sum:literal, $t0:literal, $t1:literal, $d:literal) => { concat!(
        "ld1 {{", $d, ".h}}[", $lane, "], [{", $w, "}], #2\n",
        unpack_nibbles!($w, $t0, $t1),
        "sdot ", $sum, ".4s, ", $t0, ".16b, v16.16b\n",
        "sdot ", $sum, ".4s, ", $t1, ".16b, v17.16b\n",
    )};
}

/// Rows 0–3 of a block, `$row` of each in register set A (v1–v4 sums, v18/v19 scales).
#[rustfmt::skip]
macro_rules! rows_a {
    (sdot_q8_row) => { concat!(
        sdot_q8_row!("0", "w0", "v1", "v20", "v21", "v18"),
        sdot_q8_row!("1", "w1", "v2", "v22", "v23", "v18"),
        sdot_q8_row!("2", "w2", "v3", "v24", "v25", "v18"),
        sdot_q8_row!("3", "w3", "v4", "v26", "v27", "v18"),
    )};
    (sdot_q4_row) => { concat!(
        sdot_q4_row!("0", "w0", "v1", "v20", "v21", "v18", "v19"),
        sdot_q4_row!("1", "w1", "v2", "v22", "v23", "v18", "v19"),
        sdot_q4_row!("2", "w2", "v3", "v24", "v25", "v18", "v19"),
        sdot_q4_row!("3", "w3", "v4", "v26", "v27", "v18", "v19"),
    )};
    (sdot_q4s_row) => { concat!(
        sdot_q4s_row!("0", "w0", "v1", "v20", "v21", "v18"),
        sdot_q4s_row!("1", "w1", "v2", "v22", "v23", "v18"),
        sdot_q4s_row!("2", "w2", "v3", "v24", "v25", "v18"),
        sdot_q4s_row!("3", "w3", "v4", "v26", "v27", "v18"),
    )};
}

/// Rows 4–7 of an eight-row block, in register set B (v8–v11 sums, v14/v15 scales).
#[rustfmt::skip]
macro_rules! rows_b {
    (sdot_q8_row) => { concat!(
        sdot_q8_row!("0", "w4", "v8", "v20", "v21", "v14"),
        sdot_q8_row!("1", "w5", "v9", "v22", "v23", "v14"),
        sdot_q8_row!("2", "w6", "v10", "v24", "v25", "v14"),
        sdot_q8_row!("3", "w7", "v11", "v26", "v27", "v14"),
    )};
    (sdot_q4_row) => { concat!(
        sdot_q4_row!("0", "w4", "v8", "v20", "v21", "v14", "v15"),
        sdot_q4_row!("1", "w5", "v9", "v22", "v23", "v14", "v15"),
        sdot_q4_row!("2", "w6", "v10", "v24", "v25", "v14", "v15"),
        sdot_q4_row!("3", "w7", "v11", "v26", "v27", "v14", "v15"),
    )};
    (sdot_q4s_row) => { concat!(
        sdot_q4s_row!("0", "w4", "v8", "v20", "v21", "v14"),
        sdot_q4s_row!("1", "w5", "v9", "v22", "v23", "v14"),
        sdot_q4s_row!("2", "w6", "v10", "v24", "v25", "v14"),
        sdot_q4s_row!("3", "w7", "v11", "v26", "v27", "v14"),
    )};
}

/// A Q8 block of four rows.
#[rustfmt::skip]
macro_rules! sdot_q8_block {
    ($previous:literal, $totals:literal) => { concat!(
        load_activation!(),
        rows_a!(sdot_q8_row),
        block_sums!("v1", "v2", "v3", "v4", $previous, $totals),
        scale_by_d!("v0", "v18"),
    )};
}

/// A Q8 block of eight rows.
#[rustfmt::skip]
macro_rules! sdot_q8_block8 {
    ($previous_a:literal, $totals_a:literal, $previous_b:literal, $totals_b:literal) => { concat!(
        load_activation!(),
        rows_a!(sdot_q8_row),
        rows_b!(sdot_q8_row),
        block_sums!("v1", "v2", "v3", "v4", $previous_a, $totals_a),
        scale_by_d!("v0", "v18"),
        block_sums!("v8", "v9", "v10", "v11", $previous_b, $totals_b),
        scale_by_d!("v7", "v14"),
    )};
}

/// A Q4 block of four rows.
#[rustfmt::skip]
macro_rules! sdot_q4_block {
    ($previous:literal, $totals:literal) => { concat!(
        load_activation!(),
        rows_a!(sdot_q4_row),
        block_sums!("v1", "v2", "v3", "v4", $previous, $totals),
        scale_q4!("v0", "v18", "v19"),
    )};
}

/// A Q4 block of eight rows.
#[rustfmt::skip]
macro_rules! sdot_q4_block8 {
    ($previous_a:literal, $totals_a:literal, $previous_b:literal, $totals_b:literal) => { concat!(
        load_activation!(),
        rows_a!(sdot_q4_row),
        rows_b!(sdot_q4_row),
        block_sums!("v1", "v2", "v3", "v4", $previous_a, $totals_a),
        scale_q4!("v0", "v18", "v19"),
        block_sums!("v8", "v9", "v10", "v11", $previous_b, $totals_b),
        scale_q4!("v7", "v14", "v15"),
    )};
}

/// A Q4S block of four rows.
#[rustfmt::skip]
macro_rules! sdot_q4s_block {
    ($previous:literal, $totals:literal) => { concat!(
        load_activation!(),
        rows_a!(sdot_q4s_row),
        block_sums!("v1", "v2", "v3", "v4", $previous, $totals),
        scale_by_d!("v0", "v18"),
        subtract_zero_point!("v0", "v18"),
    )};
}

/// A Q4S block of eight rows.
#[rustfmt::skip]
macro_rules! sdot_q4s_block8 {
    ($previous_a:literal, $totals_a:literal, $previous_b:literal, $totals_b:literal) => { concat!(
        load_activation!(),
        rows_a!(sdot_q4s_row),
        rows_b!(sdot_q4s_row),
        block_sums!("v1", "v2", "v3", "v4", $previous_a, $totals_a),
        scale_by_d!("v0", "v18"),
        subtract_zero_point!("v0", "v18"),
        block_sums!("v8", "v9", "v10", "v11", $previous_b, $totals_b),
        scale_by_d!("v7", "v14"),
        subtract_zero_point!("v7", "v14"),
    )};
}

/// Runs `eight_row_loop!($block)` over eight rows and one activation and
/// returns (v0, v7). Needs `unsafe` and the kernel's contract.
macro_rules! run_eight_rows {
    ($block:ident, $rows:expr, $x:expr, $blocks:expr) => {{
        let rows = $rows;
        let blocks: usize = $blocks;
        let (low, high): (float32x4_t, float32x4_t);
        asm!(
            eight_row_loop!($block),
            x = inout(reg) $x => _,
            w0 = inout(reg) rows[0] => _,
            w1 = inout(reg) rows[1] => _,
            w2 = inout(reg) rows[2] => _,
            w3 = inout(reg) rows[3] => _,
            w4 = inout(reg) rows[4] => _,
            w5 = inout(reg) rows[5] => _,
            w6 = inout(reg) rows[6] => _,
            w7 = inout(reg) rows[7] => _,
            pairs = inout(reg) blocks / 2 => _,
            odd = in(reg) blocks % 2,
            out("v0") low, out("v7") high,
            out("v1") _, out("v2") _, out("v3") _, out("v4") _, out("v5") _, out("v6") _,
            out("v8") _, out("v9") _, out("v10") _, out("v11") _, out("v12") _, out("v13") _,
            out("v14") _, out("v15") _, out("v16") _, out("v17") _, out("v18") _, out("v19") _,
            out("v20") _, out("v21") _, out("v22") _, out("v23") _, out("v24") _, out("v25") _,
            out("v26") _, out("v27") _, out("v28") _, out("v29") _, out("v30") _, out("v31") _,
            options(nostack, readonly),
        );
        (low, high)
    }};
}

/// Runs `dot8` for every group of eight rows and every activation of the
/// batch (stores as [`for_row_groups`]), then `for_row_groups` with `dot4`
/// over the rest. `dot8` may rely on every pointer it gets being valid for
/// `blocks` blocks.
#[inline(always)]
fn for_eight_row_groups<B>(
    weights: &[B],
    cols: usize,
    x: &[BlockQ8Act],
    out: &mut [f32],
    dot8: impl Fn([*const B; 2 * ROWS], *const BlockQ8Act, usize) -> (float32x4_t, float32x4_t),
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
    let full = rows / (2 * ROWS);
    for group in 0..full {
        let first = group * 2 * ROWS;
        // SAFETY: rows `first .. first + 8` and every activation are inside
        // the slices checked above, and so are the outputs written.
        unsafe {
            let row = w.add(first * blocks);
            let eight = std::array::from_fn(|i| row.add(i * blocks));
            for b in 0..batch {
                let (low, high) = dot8(eight, activations.add(b * blocks), blocks);
                if batch == 1 {
                    vst1q_f32(results.add(first), low);
                    vst1q_f32(results.add(first + ROWS), high);
                } else {
                    let mut lanes = [0f32; 2 * ROWS];
                    vst1q_f32(lanes.as_mut_ptr(), low);
                    vst1q_f32(lanes.as_mut_ptr().add(ROWS), high);
                    for (i, &v) in lanes.iter().enumerate() {
                        *results.add((first + i) * batch + b) = v;
                    }
                }
            }
        }
    }
    let done = full * 2 * ROWS;
    for_row_groups(&weights[done * blocks..], cols, x, &mut out[done * batch..], dot4);
}

/// Eight Q8 rows · one activation.
///
/// # Safety
/// Every row and `x` point at `blocks` readable blocks, and the CPU has the
/// dot-product extension.
#[target_feature(enable = "dotprod")]
#[inline]
unsafe fn dot8_q8(rows: [*const BlockQ8; 2 * ROWS], x: *const BlockQ8Act, blocks: usize) -> (float32x4_t, float32x4_t) {
    run_eight_rows!(sdot_q8_block8, rows, x, blocks)
}

/// Eight Q4 rows · one activation.
///
/// # Safety
/// As [`dot8_q8`].
#[target_feature(enable = "dotprod")]
#[inline]
unsafe fn dot8_q4(rows: [*const BlockQ4; 2 * ROWS], x: *const BlockQ8Act, blocks: usize) -> (float32x4_t, float32x4_t) {
    run_eight_rows!(sdot_q4_block8, rows, x, blocks)
}

/// Eight Q4S rows · one activation.
///
/// # Safety
/// As [`dot8_q8`].
#[target_feature(enable = "dotprod")]
#[inline]
unsafe fn dot8_q4s(
    rows: [*const BlockQ4S; 2 * ROWS],
    x: *const BlockQ8Act,
    blocks: usize,
) -> (float32x4_t, float32x4_t) {
    run_eight_rows!(sdot_q4s_block8, rows, x, blocks)
}

/// Four Q8 rows · one activation.
///
/// # Safety
/// Every row and `x` point at `blocks` readable blocks, and the CPU has the
/// dot-product extension.
#[target_feature(enable = "dotprod")]
#[inline]
unsafe fn dot4_q8(rows: [*const BlockQ8; ROWS], x: *const BlockQ8Act, blocks: usize) -> float32x4_t {
    run_four_rows!(sdot_q8_block, rows, x, blocks)
}

/// Four Q4 rows · one activation.
///
/// # Safety
/// As [`dot4_q8`].
#[target_feature(enable = "dotprod")]
#[inline]
unsafe fn dot4_q4(rows: [*const BlockQ4; ROWS], x: *const BlockQ8Act, blocks: usize) -> float32x4_t {
    run_four_rows!(sdot_q4_block, rows, x, blocks)
}

/// Four Q4S rows · one activation.
///
/// # Safety
/// As [`dot4_q8`].
#[target_feature(enable = "dotprod")]
#[inline]
unsafe fn dot4_q4s(rows: [*const BlockQ4S; ROWS], x: *const BlockQ8Act, blocks: usize) -> float32x4_t {
    run_four_rows!(sdot_q4s_block, rows, x, blocks)
}

#[target_feature(enable = "dotprod")]
fn q8(weights: &[BlockQ8], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    for_eight_row_groups(
        weights,
        cols,
        x,
        out,
        // SAFETY: `for_eight_row_groups` hands over pointers to `blocks`
        // blocks, and this function runs only where the CPU has the extension.
        |rows, a, blocks| unsafe { dot8_q8(rows, a, blocks) },
        // SAFETY: as above, from `for_row_groups`.
        |rows, a, blocks| unsafe { dot4_q8(rows, a, blocks) },
    )
}

#[target_feature(enable = "dotprod")]
fn q4(weights: &[BlockQ4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    for_eight_row_groups(
        weights,
        cols,
        x,
        out,
        // SAFETY: `for_eight_row_groups` hands over pointers to `blocks`
        // blocks, and this function runs only where the CPU has the extension.
        |rows, a, blocks| unsafe { dot8_q4(rows, a, blocks) },
        // SAFETY: as above, from `for_row_groups`.
        |rows, a, blocks| unsafe { dot4_q4(rows, a, blocks) },
    )
}

#[target_feature(enable = "dotprod")]
fn q4s(weights: &[BlockQ4S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    for_eight_row_groups(
        weights,
        cols,
        x,
        out,
        // SAFETY: `for_eight_row_groups` hands over pointers to `blocks`
        // blocks, and this function runs only where the CPU has the extension.
        |rows, a, blocks| unsafe { dot8_q4s(rows, a, blocks) },
        // SAFETY: as above, from `for_row_groups`.
        |rows, a, blocks| unsafe { dot4_q4s(rows, a, blocks) },
    )
}

/// Q8 matrix × int8 activations. Panics on a CPU without the dot-product extension.
pub fn matmul_q8(weights: &[BlockQ8], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
    // SAFETY: the CPU has the dot-product extension (checked just above).
    unsafe { q8(weights, cols, x, out) }
}

/// Asymmetric Q4 matrix × int8 activations. Panics on a CPU without the dot-product extension.
pub fn matmul_q4(weights: &[BlockQ4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
    // SAFETY: the CPU has the dot-product extension (checked just above).
    unsafe { q4(weights, cols, x, out) }
}

/// Symmetric Q4 matrix × int8 activations. Panics on a CPU without the dot-product extension.
pub fn matmul_q4s(weights: &[BlockQ4S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
    assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
    // SAFETY: the CPU has the dot-product extension (checked just above).
    unsafe { q4s(weights, cols, x, out) }
}
