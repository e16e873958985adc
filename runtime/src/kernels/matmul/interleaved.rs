//! NEON kernels for the four-row interleaved blocks ([`crate::quant::Interleaved`]):
//! `neon` functions for every aarch64 core (the Raspberry Pi 4's Cortex-A72)
//! and `dotprod` functions for cores with `sdot` (the Pi 5's Cortex-A76).
//! The scalar reference is [`super::scalar::matmul_q8x4`] and its siblings.
//!
//! In an interleaved block, sixteen weight bytes are four rows' values at
//! the same four columns, so a vector's four 32-bit lanes are the four rows'
//! sums from the start, with no reduction across lanes:
//!
//! - dotprod: `sdot vS.4s, vW.16b, vA.4b[c]` multiplies those sixteen bytes
//!   by the activation's four bytes at columns `4c .. 4c+4` (lane `c` of the
//!   activation register) and adds four products into each row's lane —
//!   eight `sdot`s a block of four rows, one activation load for eight rows;
//! - ARMv8.0: each four-byte column group of the activation is loaded
//!   broadcast to a whole register (`ld4r`: two loads a block for all eight
//!   groups, no `dup`s and no scratch), then widened products (`smull`,
//!   `smlal2`) sum in 16-bit lanes as long as they cannot overflow (all
//!   eight column groups for 4-bit weights, two for Q8, then `sadalp`),
//!   and pairwise adds leave one 32-bit sum a row.
//!
//! Then a block's four integer sums become floats, are scaled by the rows'
//! scales times the activation's and added into the running float sums, all
//! four rows in one instruction each. The asymmetric Q4 minimum adds
//! `m · s` (`s = dₓ · Σq`, kept in the activation block); the symmetric Q4
//! zero point subtracts `8 · s` before the scale, so nibbles go in unsigned.
//!
//! One token at a time (a decode step), sixteen rows (four groups) go
//! together, sharing the activation's loads; the last groups go two or one
//! at a time.
//!
//! A batch of four tokens or more (a prompt) goes through GEMM tiles first:
//! one group of four rows against eight tokens, a weight block loaded, its
//! nibbles split and its scales widened once for every token of the tile;
//! then a tile of four, and the tokens left over (fewer than four) one at a
//! time as above. Measured on SmolLM2-135M (guest instructions a prompt
//! token, one thread), the ARMv8.0 tile of eight beats four (q4 27.4 M
//! against 28.9 M, q8 31.5 M against 32.2 M); a tile of eight rows would
//! share the activation's loads but needs more than the 32 registers (16
//! for two groups' unpacked weights, 8 broadcasts, 8 sums for four tokens,
//! the scales and the products).

use crate::quant::{BlockQ4Bx4, BlockQ4Sx4, BlockQ4x4, BlockQ8Act, BlockQ8x4, GROUP, INTERLEAVE};
use std::arch::aarch64::*;
use std::arch::asm;

/// The matmul's shape, checked once: blocks a row, four-row groups, tokens.
#[derive(Clone, Copy)]
struct Shape {
    blocks: usize,
    groups: usize,
    batch: usize,
}

impl Shape {
    fn check<X>(weights: &[X], cols: usize, x: &[BlockQ8Act], out: &[f32]) -> Shape {
        let blocks = cols / GROUP;
        assert!(blocks > 0 && cols.is_multiple_of(GROUP), "{cols} columns are not whole blocks of {GROUP}");
        let (groups, batch) = (weights.len() / blocks, x.len() / blocks);
        assert!(
            weights.len() == groups * blocks && x.len() == batch * blocks && out.len() == groups * INTERLEAVE * batch,
            "matmul shapes disagree: {} interleaved weight blocks, {} activation blocks, {} outputs, {blocks} blocks a row",
            weights.len(),
            x.len(),
            out.len()
        );
        Shape { blocks, groups, batch }
    }
}

/// Stores one group's four row sums for token `b` at `results[r·batch + b]`.
///
/// # Safety
/// `results` is the start of the matmul's `out`, checked against a shape
/// ([`Shape::check`]) with `batch` tokens and more than `group` groups, and
/// `b < batch`.
#[inline(always)]
unsafe fn store(results: *mut f32, batch: usize, lanes: float32x4_t, group: usize, b: usize) {
    let first_row = group * INTERLEAVE;
    // SAFETY: `group < groups` and `b < batch` (the caller's promise), so
    // every index is below `out.len()`.
    unsafe {
        if batch == 1 {
            vst1q_f32(results.add(first_row), lanes);
        } else {
            let mut values = [0f32; INTERLEAVE];
            vst1q_f32(values.as_mut_ptr(), lanes);
            for (i, v) in values.into_iter().enumerate() {
                *results.add((first_row + i) * batch + b) = v;
            }
        }
    }
}

/// Stores one group's four row sums for four tokens `b .. b + 4` (`quad[t]`
/// token `b + t`'s): a 4 × 4 transpose in registers, then each row's four
/// results with one store, as they lie side by side in `out`.
///
/// # Safety
/// As [`store`], with `b + 4 ≤ batch`.
#[inline(always)]
unsafe fn store_quad(results: *mut f32, batch: usize, quad: &[float32x4_t], group: usize, b: usize) {
    let first_row = group * INTERLEAVE;
    // Pairs of tokens, row by row: (r0 t0, r0 t1, r2 t0, r2 t1) and so on.
    let (t01_even, t01_odd) = (vtrn1q_f32(quad[0], quad[1]), vtrn2q_f32(quad[0], quad[1]));
    let (t23_even, t23_odd) = (vtrn1q_f32(quad[2], quad[3]), vtrn2q_f32(quad[2], quad[3]));
    let halves = |low: float32x4_t, high: float32x4_t| {
        let (low, high) = (vreinterpretq_f64_f32(low), vreinterpretq_f64_f32(high));
        (vreinterpretq_f32_f64(vtrn1q_f64(low, high)), vreinterpretq_f32_f64(vtrn2q_f64(low, high)))
    };
    let (row0, row2) = halves(t01_even, t23_even);
    let (row1, row3) = halves(t01_odd, t23_odd);
    for (i, row) in [row0, row1, row2, row3].into_iter().enumerate() {
        // SAFETY: `group < groups` and `b + 4 ≤ batch` (the caller's
        // promise): `out[(first_row + i)·batch + b ..][..4]` is inside it.
        unsafe { vst1q_f32(results.add((first_row + i) * batch + b), row) };
    }
}

/// The GEMM part of a batch: tiles of `TILE` tokens, then of four, for
/// every four-row group. `tile` and `quad` get one group and the activations
/// of `TILE` (four) tokens and return each token's four row sums, so a
/// weight block is loaded and unpacked once for all the tokens of a tile.
/// Returns how many tokens (from the first) it took: the rest, fewer than
/// four (every token of a decode step), are for [`for_groups`].
#[inline(always)]
fn for_tiles<X, const TILE: usize>(
    weights: &[X],
    x: &[BlockQ8Act],
    out: &mut [f32],
    shape: Shape,
    tile: impl Fn(*const X, [*const BlockQ8Act; TILE], usize) -> [float32x4_t; TILE],
    quad: impl Fn(*const X, [*const BlockQ8Act; 4], usize) -> [float32x4_t; 4],
) -> usize {
    const { assert!(TILE.is_multiple_of(4)) };
    let Shape { blocks, groups, batch } = shape;
    let tiled = batch - batch % 4;
    if tiled == 0 {
        return 0;
    }
    // SAFETY: (for the pointer arithmetic below) every group index is below
    // `groups` and every activation index below `batch`, inside the slices.
    let group_at = |g: usize| unsafe { weights.as_ptr().add(g * blocks) };
    // SAFETY: as above.
    let activation = |b: usize| unsafe { x.as_ptr().add(b * blocks) };
    let results = out.as_mut_ptr();
    // Group outermost: a group's weights (a few kilobytes) stay in the L1
    // cache while every tile of tokens passes over them.
    for group in 0..groups {
        let mut b = 0;
        while b + TILE <= batch {
            let sums = tile(group_at(group), std::array::from_fn(|i| activation(b + i)), blocks);
            for (i, quad) in sums.chunks_exact(4).enumerate() {
                // SAFETY: `group < groups`, `b + 4i + 4 ≤ b + TILE ≤ batch`.
                unsafe { store_quad(results, batch, quad, group, b + 4 * i) };
            }
            b += TILE;
        }
        while b + 4 <= batch {
            let sums = quad(group_at(group), std::array::from_fn(|i| activation(b + i)), blocks);
            // SAFETY: `group < groups`, `b + 4 ≤ batch`.
            unsafe { store_quad(results, batch, &sums, group, b) };
            b += 4;
        }
    }
    tiled
}

/// One token at a time, for tokens `first..batch`: `dot16(groups,
/// activation, blocks)` for every four consecutive four-row groups, then
/// `dot8` and `dot4` for the one to three groups left. The kernels may rely
/// on every pointer they get being valid for `blocks` blocks.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn for_groups<X>(
    weights: &[X],
    x: &[BlockQ8Act],
    out: &mut [f32],
    shape: Shape,
    first: usize,
    dot16: impl Fn([*const X; 4], *const BlockQ8Act, usize) -> [float32x4_t; 4],
    dot8: impl Fn(*const X, *const X, *const BlockQ8Act, usize) -> (float32x4_t, float32x4_t),
    dot4: impl Fn(*const X, *const BlockQ8Act, usize) -> float32x4_t,
) {
    let Shape { blocks, groups, batch } = shape;
    // SAFETY: (for the pointer arithmetic below) every group index is below
    // `groups` and every activation index below `batch`, inside the slices.
    let group_at = |g: usize| unsafe { weights.as_ptr().add(g * blocks) };
    // SAFETY: as above.
    let activation = |b: usize| unsafe { x.as_ptr().add(b * blocks) };
    let results = out.as_mut_ptr();
    let mut group = 0;
    while group + 4 <= groups {
        for b in first..batch {
            let sums = dot16(std::array::from_fn(|i| group_at(group + i)), activation(b), blocks);
            for (i, lanes) in sums.into_iter().enumerate() {
                // SAFETY: `group + i < group + 4 ≤ groups`, `b < batch`.
                unsafe { store(results, batch, lanes, group + i, b) };
            }
        }
        group += 4;
    }
    if group + 2 <= groups {
        for b in first..batch {
            let (low, high) = dot8(group_at(group), group_at(group + 1), activation(b), blocks);
            // SAFETY: `group + 1 < group + 2 ≤ groups`, `b < batch`.
            unsafe {
                store(results, batch, low, group, b);
                store(results, batch, high, group + 1, b);
            }
        }
        group += 2;
    }
    if group < groups {
        for b in first..batch {
            let sums = dot4(group_at(group), activation(b), blocks);
            // SAFETY: `group < groups`, `b < batch`.
            unsafe { store(results, batch, sums, group, b) };
        }
    }
}

/// A whole interleaved product `weights × x` into `out`: the batch's tiles
/// of `TILE` tokens, then of four, by [`for_tiles`] (`tile`, `quad`), and
/// the tokens left over by [`for_groups`] (`dot16`, `dot8`, `dot4`). Panics
/// when the shapes disagree ([`Shape::check`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn tiles_then_groups<X, const TILE: usize>(
    weights: &[X],
    cols: usize,
    x: &[BlockQ8Act],
    out: &mut [f32],
    tile: impl Fn(*const X, [*const BlockQ8Act; TILE], usize) -> [float32x4_t; TILE],
    quad: impl Fn(*const X, [*const BlockQ8Act; 4], usize) -> [float32x4_t; 4],
    dot16: impl Fn([*const X; 4], *const BlockQ8Act, usize) -> [float32x4_t; 4],
    dot8: impl Fn(*const X, *const X, *const BlockQ8Act, usize) -> (float32x4_t, float32x4_t),
    dot4: impl Fn(*const X, *const BlockQ8Act, usize) -> float32x4_t,
) {
    let shape = Shape::check(weights, cols, x, out);
    let first = for_tiles::<_, TILE>(weights, x, out, shape, tile, quad);
    for_groups(weights, x, out, shape, first, dot16, dot8, dot4)
}

/// The block loop: v0, v7, v28 and v29 the running float sums of groups A
/// (`{wa}`), B (`{wb}`, for `two` and `four`), C and D (`{wc}`, `{wd}`, for
/// `four`), v31 the nibble mask, v30 eight (for the Q4S zero point), v5
/// 7.5 (for Q4B's minimum).
/// `$load!("x")` loads the activation block ([`load_bytes`] for `sdot`,
/// [`load_broadcast`] for ARMv8.0).
#[rustfmt::skip]
macro_rules! block_loop {
    ($load:ident, $block:ident, one) => { concat!(
        loop_start!(), $load!("x"), $block!("wa", "v0"), loop_end!(),
    )};
    ($load:ident, $block:ident, two) => { concat!(
        loop_start!(), $load!("x"), $block!("wa", "v0"), $block!("wb", "v7"), loop_end!(),
    )};
    ($load:ident, $block:ident, four) => { concat!(
        "movi v28.16b, #0\n",
        "movi v29.16b, #0\n",
        loop_start!(), $load!("x"),
        $block!("wa", "v0"), $block!("wb", "v7"), $block!("wc", "v28"), $block!("wd", "v29"),
        loop_end!(),
    )};
}

#[rustfmt::skip]
macro_rules! loop_start {
    () => { concat!(
        "movi v0.16b, #0\n",
        "movi v7.16b, #0\n",
        "movi v31.16b, #0x0f\n",
        "fmov v30.4s, #8.0\n",
        "fmov v5.4s, #7.5\n",
        "2:\n",
    )};
}

#[rustfmt::skip]
macro_rules! loop_end {
    () => { concat!(
        "subs {n}, {n}, #1\n",
        "b.ne 2b\n",
    )};
}

/// `sdot`: one activation block from `{$x}`, its `d` and `s` to v6, its 32
/// values as bytes to v16–v17 (`sdot` by lane picks the four it needs).
#[rustfmt::skip]
macro_rules! load_bytes {
    ($x:literal) => { concat!(
        "ld1 {{v6.2s}}, [{", $x, "}], #8\n",
        "ld1 {{v16.16b, v17.16b}}, [{", $x, "}], #32\n",
    )};
}

/// ARMv8.0: one activation block from `{$x}`, its `d` and `s` to v6 and its
/// eight four-byte column groups each broadcast to a whole register, v8–v15,
/// ready to multiply four rows' bytes at once. `ld4r` loads four 32-bit
/// values and replicates each into its own register: two loads instead of
/// a load and eight `dup`s by lane, and no scratch to arrange them in.
#[rustfmt::skip]
macro_rules! load_broadcast {
    ($x:literal) => { concat!(
        "ld1 {{v6.2s}}, [{", $x, "}], #8\n",
        "ld4r {{v8.4s, v9.4s, v10.4s, v11.4s}}, [{", $x, "}], #16\n",
        "ld4r {{v12.4s, v13.4s, v14.4s, v15.4s}}, [{", $x, "}], #16\n",
    )};
}

/// Integer sums (v1) to a float contribution for Q8 and Q4S: `d · dₓ · Σ`,
/// less `8 · d · s` for Q4S (`$zero_point` = `"fmls v1.4s, v30.4s, v6.s[1]\n"`).
#[rustfmt::skip]
macro_rules! scale_d {
    ($acc:literal, $d:literal, $zero_point:expr) => { concat!(
        "scvtf v1.4s, v1.4s\n",
        "fcvtl ", $d, ".4s, ", $d, ".4h\n",
        "fmul v1.4s, v1.4s, v6.s[0]\n",
        $zero_point,
        "fmla ", $acc, ".4s, v1.4s, ", $d, ".4s\n",
    )};
}

/// As [`scale_d`] for Q4: `d · dₓ · Σ + m · s`.
#[rustfmt::skip]
macro_rules! scale_dm {
    ($acc:literal, $d:literal, $m:literal) => { concat!(
        "scvtf v1.4s, v1.4s\n",
        "fcvtl ", $d, ".4s, ", $d, ".4h\n",
        "fcvtl ", $m, ".4s, ", $m, ".4h\n",
        "fmul v1.4s, v1.4s, v6.s[0]\n",
        "fmla ", $acc, ".4s, v1.4s, ", $d, ".4s\n",
        "fmla ", $acc, ".4s, ", $m, ".4s, v6.s[1]\n",
    )};
}

/// Splits 64 interleaved nibble bytes (v20–v23) into low nibbles (v24–v27:
/// columns 0–15) and high nibbles (v20–v23: columns 16–31).
#[rustfmt::skip]
macro_rules! split_nibbles {
    () => { concat!(
        "and v24.16b, v20.16b, v31.16b\n", "ushr v20.16b, v20.16b, #4\n",
        "and v25.16b, v21.16b, v31.16b\n", "ushr v21.16b, v21.16b, #4\n",
        "and v26.16b, v22.16b, v31.16b\n", "ushr v22.16b, v22.16b, #4\n",
        "and v27.16b, v23.16b, v31.16b\n", "ushr v23.16b, v23.16b, #4\n",
    )};
}

/// dotprod: eight `sdot`s of the columns' vectors `$c0` … `$c7` (columns
/// `4c .. 4c+4` for c = 0..8) against the activation's lanes, into v1.
#[rustfmt::skip]
macro_rules! sdot_columns {
    ($c0:literal, $c1:literal, $c2:literal, $c3:literal, $c4:literal, $c5:literal, $c6:literal, $c7:literal) => { concat!(
        "movi v1.4s, #0\n",
        "sdot v1.4s, ", $c0, ".16b, v16.4b[0]\n", "sdot v1.4s, ", $c1, ".16b, v16.4b[1]\n",
        "sdot v1.4s, ", $c2, ".16b, v16.4b[2]\n", "sdot v1.4s, ", $c3, ".16b, v16.4b[3]\n",
        "sdot v1.4s, ", $c4, ".16b, v17.4b[0]\n", "sdot v1.4s, ", $c5, ".16b, v17.4b[1]\n",
        "sdot v1.4s, ", $c6, ".16b, v17.4b[2]\n", "sdot v1.4s, ", $c7, ".16b, v17.4b[3]\n",
    )};
}

/// One Q8 block of four rows from `{$w}` into `$acc`, with `sdot`.
#[rustfmt::skip]
macro_rules! sdot_q8x4 {
    ($w:literal, $acc:literal) => { concat!(
        "ld1 {{v18.4h}}, [{", $w, "}], #8\n",
        "ld1 {{v20.16b, v21.16b, v22.16b, v23.16b}}, [{", $w, "}], #64\n",
        "ld1 {{v24.16b, v25.16b, v26.16b, v27.16b}}, [{", $w, "}], #64\n",
        sdot_columns!("v20", "v21", "v22", "v23", "v24", "v25", "v26", "v27"),
        scale_d!($acc, "v18", ""),
    )};
}

/// One Q4 block of four rows, with `sdot`.
#[rustfmt::skip]
macro_rules! sdot_q4x4 {
    ($w:literal, $acc:literal) => { concat!(
        "ld1 {{v18.4h, v19.4h}}, [{", $w, "}], #16\n",
        "ld1 {{v20.16b, v21.16b, v22.16b, v23.16b}}, [{", $w, "}], #64\n",
        split_nibbles!(),
        sdot_columns!("v24", "v25", "v26", "v27", "v20", "v21", "v22", "v23"),
        scale_dm!($acc, "v18", "v19"),
    )};
}

/// One Q4S block of four rows, with `sdot`.
#[rustfmt::skip]
macro_rules! sdot_q4sx4 {
    ($w:literal, $acc:literal) => { concat!(
        "ld1 {{v18.4h}}, [{", $w, "}], #8\n",
        "ld1 {{v20.16b, v21.16b, v22.16b, v23.16b}}, [{", $w, "}], #64\n",
        split_nibbles!(),
        sdot_columns!("v24", "v25", "v26", "v27", "v20", "v21", "v22", "v23"),
        scale_d!($acc, "v18", "fmls v1.4s, v30.4s, v6.s[1]\n"),
    )};
}

/// ARMv8.0, Q8: two column groups' products (`$c`, `$d` against broadcasts
/// `$bc`, `$bd`) in 16-bit lanes, v16 rows 0–1 and v17 rows 2–3. Two
/// products of at most 128 · 127 fit a lane, three would not; `$add` is
/// `saddlp` for the first pair (which starts v1 and v19) and `sadalp` after.
#[rustfmt::skip]
macro_rules! smull_pair {
    ($c:literal, $d:literal, $bc:literal, $bd:literal, $add:literal) => { concat!(
        "smull v16.8h, ", $c, ".8b, ", $bc, ".8b\n",
        "smull2 v17.8h, ", $c, ".16b, ", $bc, ".16b\n",
        "smlal v16.8h, ", $d, ".8b, ", $bd, ".8b\n",
        "smlal2 v17.8h, ", $d, ".16b, ", $bd, ".16b\n",
        $add, " v1.4s, v16.8h\n",
        $add, " v19.4s, v17.8h\n",
    )};
}

/// ARMv8.0, Q8: a block's 128 weight bytes (columns 0–15 in v24–v27, 16–31
/// in v20–v23) against the broadcasts v8–v15. v1 gathers (row 0, row 0,
/// row 1, row 1) partial sums, v19 the same for rows 2–3; `addp` leaves
/// the four rows' sums in v1.
#[rustfmt::skip]
macro_rules! q8_products {
    () => { concat!(
        smull_pair!("v24", "v25", "v8", "v9", "saddlp"),
        smull_pair!("v26", "v27", "v10", "v11", "sadalp"),
        smull_pair!("v20", "v21", "v12", "v13", "sadalp"),
        smull_pair!("v22", "v23", "v14", "v15", "sadalp"),
        "addp v1.4s, v1.4s, v19.4s\n",
    )};
}

/// One Q8 block of four rows, ARMv8.0.
#[rustfmt::skip]
macro_rules! neon_q8x4 {
    ($w:literal, $acc:literal) => { concat!(
        "ld1 {{v18.4h}}, [{", $w, "}], #8\n",
        "ld1 {{v24.16b, v25.16b, v26.16b, v27.16b}}, [{", $w, "}], #64\n",
        "ld1 {{v20.16b, v21.16b, v22.16b, v23.16b}}, [{", $w, "}], #64\n",
        q8_products!(),
        scale_d!($acc, "v18", ""),
    )};
}

/// ARMv8.0, 4-bit: all eight column groups' products (low nibbles v24–v27,
/// high v20–v23, against the broadcasts v8–v15) in 16-bit lanes, v16 rows
/// 0–1 and v17 rows 2–3. Nibbles are at most 15, so a lane holds its eight
/// products (8 · 15 · 128) and, after the pairwise `addp` across columns,
/// twice that; one widening pairwise add leaves the four rows' sums in v1.
#[rustfmt::skip]
macro_rules! nibble_products4 {
    () => { concat!(
        "smull v16.8h, v24.8b, v8.8b\n", "smull2 v17.8h, v24.16b, v8.16b\n",
        "smlal v16.8h, v25.8b, v9.8b\n", "smlal2 v17.8h, v25.16b, v9.16b\n",
        "smlal v16.8h, v26.8b, v10.8b\n", "smlal2 v17.8h, v26.16b, v10.16b\n",
        "smlal v16.8h, v27.8b, v11.8b\n", "smlal2 v17.8h, v27.16b, v11.16b\n",
        "smlal v16.8h, v20.8b, v12.8b\n", "smlal2 v17.8h, v20.16b, v12.16b\n",
        "smlal v16.8h, v21.8b, v13.8b\n", "smlal2 v17.8h, v21.16b, v13.16b\n",
        "smlal v16.8h, v22.8b, v14.8b\n", "smlal2 v17.8h, v22.16b, v14.16b\n",
        "smlal v16.8h, v23.8b, v15.8b\n", "smlal2 v17.8h, v23.16b, v15.16b\n",
        "addp v16.8h, v16.8h, v17.8h\n",
        "saddlp v1.4s, v16.8h\n",
    )};
}

/// One Q4 block of four rows, ARMv8.0.
#[rustfmt::skip]
macro_rules! neon_q4x4 {
    ($w:literal, $acc:literal) => { concat!(
        "ld1 {{v18.4h, v19.4h}}, [{", $w, "}], #16\n",
        "ld1 {{v20.16b, v21.16b, v22.16b, v23.16b}}, [{", $w, "}], #64\n",
        split_nibbles!(),
        nibble_products4!(),
        scale_dm!($acc, "v18", "v19"),
    )};
}

/// One Q4S block of four rows, ARMv8.0.
#[rustfmt::skip]
macro_rules! neon_q4sx4 {
    ($w:literal, $acc:literal) => { concat!(
        "ld1 {{v18.4h}}, [{", $w, "}], #8\n",
        "ld1 {{v20.16b, v21.16b, v22.16b, v23.16b}}, [{", $w, "}], #64\n",
        split_nibbles!(),
        nibble_products4!(),
        scale_d!($acc, "v18", "fmls v1.4s, v30.4s, v6.s[1]\n"),
    )};
}

/// A Q4B block's byte scales (v19 lanes 0–3) and offsets (lanes 4–7) to
/// Q4's float scale `d` (v18) and minimum `16o − 7.5d` (v19), in units of
/// the row scale (exact in f32); `$half` holds 7.5 in every lane.
#[rustfmt::skip]
macro_rules! widen_q4b {
    ($half:literal) => { concat!(
        "uxtl v18.8h, v19.8b\n",
        "sxtl v19.8h, v19.8b\n",
        "uxtl v18.4s, v18.4h\n",
        "sshll2 v19.4s, v19.8h, #4\n",
        "scvtf v18.4s, v18.4s\n",
        "scvtf v19.4s, v19.4s\n",
        "fmls v19.4s, v18.4s, ", $half, ".4s\n",
    )};
}

/// One Q4B block of four rows, with `sdot`: Q4's products and float step,
/// 7.5 in v5 ([`loop_start`]).
#[rustfmt::skip]
macro_rules! sdot_q4bx4 {
    ($w:literal, $acc:literal) => { concat!(
        "ld1 {{v19.8b}}, [{", $w, "}], #8\n",
        "ld1 {{v20.16b, v21.16b, v22.16b, v23.16b}}, [{", $w, "}], #64\n",
        widen_q4b!("v5"),
        split_nibbles!(),
        sdot_columns!("v24", "v25", "v26", "v27", "v20", "v21", "v22", "v23"),
        tile_scale!($acc, q4),
    )};
}

/// One Q4B block of four rows, ARMv8.0.
#[rustfmt::skip]
macro_rules! neon_q4bx4 {
    ($w:literal, $acc:literal) => { concat!(
        "ld1 {{v19.8b}}, [{", $w, "}], #8\n",
        "ld1 {{v20.16b, v21.16b, v22.16b, v23.16b}}, [{", $w, "}], #64\n",
        widen_q4b!("v5"),
        split_nibbles!(),
        nibble_products4!(),
        tile_scale!($acc, q4),
    )};
}

/// Runs a block loop over two groups (`$wa`, `$wb`) and returns (v0, v7).
/// Needs `unsafe`, valid pointers for `$blocks ≥ 1` blocks, and, for the
/// `sdot` loops, the dot-product extension.
macro_rules! run_eight {
    ($load:ident, $block:ident, $wa:expr, $wb:expr, $x:expr, $blocks:expr) => {{
        let (low, high): (float32x4_t, float32x4_t);
        asm!(
            block_loop!($load, $block, two),
            x = inout(reg) $x => _,
            wa = inout(reg) $wa => _,
            wb = inout(reg) $wb => _,
            n = inout(reg) $blocks => _,
            out("v0") low, out("v7") high,
            out("v1") _, out("v2") _, out("v3") _, out("v4") _, out("v5") _, out("v6") _,
            out("v8") _, out("v9") _, out("v10") _, out("v11") _, out("v12") _, out("v13") _,
            out("v14") _, out("v15") _, out("v16") _, out("v17") _, out("v18") _, out("v19") _,
            out("v20") _, out("v21") _, out("v22") _, out("v23") _, out("v24") _, out("v25") _,
            out("v26") _, out("v27") _, out("v30") _, out("v31") _,
            options(nostack, readonly),
        );
        (low, high)
    }};
}

/// As [`run_eight`] for four groups; returns (v0, v7, v28, v29).
macro_rules! run_sixteen {
    ($load:ident, $block:ident, $w:expr, $x:expr, $blocks:expr) => {{
        let w = $w;
        let (a, b, c, d): (float32x4_t, float32x4_t, float32x4_t, float32x4_t);
        asm!(
            block_loop!($load, $block, four),
            x = inout(reg) $x => _,
            wa = inout(reg) w[0] => _,
            wb = inout(reg) w[1] => _,
            wc = inout(reg) w[2] => _,
            wd = inout(reg) w[3] => _,
            n = inout(reg) $blocks => _,
            out("v0") a, out("v7") b, out("v28") c, out("v29") d,
            out("v1") _, out("v2") _, out("v3") _, out("v4") _, out("v5") _, out("v6") _,
            out("v8") _, out("v9") _, out("v10") _, out("v11") _, out("v12") _, out("v13") _,
            out("v14") _, out("v15") _, out("v16") _, out("v17") _, out("v18") _, out("v19") _,
            out("v20") _, out("v21") _, out("v22") _, out("v23") _, out("v24") _, out("v25") _,
            out("v26") _, out("v27") _, out("v30") _, out("v31") _,
            options(nostack, readonly),
        );
        [a, b, c, d]
    }};
}

/// As [`run_eight`] for one group; returns v0.
macro_rules! run_four {
    ($load:ident, $block:ident, $wa:expr, $x:expr, $blocks:expr) => {{
        let sums: float32x4_t;
        asm!(
            block_loop!($load, $block, one),
            x = inout(reg) $x => _,
            wa = inout(reg) $wa => _,
            n = inout(reg) $blocks => _,
            out("v0") sums,
            out("v1") _, out("v2") _, out("v3") _, out("v4") _, out("v5") _, out("v6") _, out("v7") _,
            out("v8") _, out("v9") _, out("v10") _, out("v11") _, out("v12") _, out("v13") _,
            out("v14") _, out("v15") _, out("v16") _, out("v17") _, out("v18") _, out("v19") _,
            out("v20") _, out("v21") _, out("v22") _, out("v23") _, out("v24") _, out("v25") _,
            out("v26") _, out("v27") _, out("v30") _, out("v31") _,
            options(nostack, readonly),
        );
        sums
    }};
}

/// The GEMM tile loop: one group of four rows (`{w}`) against four or eight
/// tokens (`{ta}` … `{th}`), whose running float sums are v0, v7, v28, v29
/// and, for eight, v2–v5. `$unpack!()` loads a weight block once into
/// v20–v27 (columns 0–15 in v24–v27, 16–31 in v20–v23, as bytes) and its
/// scales as floats into v18 (and v19, the Q4 minimum); `$token!(pointer,
/// sum)` then takes one token's activation block against them, with v1,
/// v6, v8–v17 and (but for Q4) v19 its own.
#[rustfmt::skip]
macro_rules! tile_loop {
    ($unpack:ident, $token:ident, four) => { concat!(
        tile_start!(),
        $unpack!(),
        $token!("ta", "v0"), $token!("tb", "v7"), $token!("tc", "v28"), $token!("td", "v29"),
        loop_end!(),
    )};
    ($unpack:ident, $token:ident, eight) => { concat!(
        "movi v2.16b, #0\n", "movi v3.16b, #0\n", "movi v4.16b, #0\n", "movi v5.16b, #0\n",
        tile_start!(),
        $unpack!(),
        $token!("ta", "v0"), $token!("tb", "v7"), $token!("tc", "v28"), $token!("td", "v29"),
        $token!("te", "v2"), $token!("tf", "v3"), $token!("tg", "v4"), $token!("th", "v5"),
        loop_end!(),
    )};
}

#[rustfmt::skip]
macro_rules! tile_start {
    () => { concat!(
        "movi v0.16b, #0\n", "movi v7.16b, #0\n", "movi v28.16b, #0\n", "movi v29.16b, #0\n",
        "movi v31.16b, #0x0f\n",
        "fmov v30.4s, #8.0\n",
        "2:\n",
    )};
}

/// A Q8 weight block: scales widened to f32, 128 bytes as they are.
#[rustfmt::skip]
macro_rules! unpack_q8x4 {
    () => { concat!(
        "ld1 {{v18.4h}}, [{w}], #8\n",
        "ld1 {{v24.16b, v25.16b, v26.16b, v27.16b}}, [{w}], #64\n",
        "ld1 {{v20.16b, v21.16b, v22.16b, v23.16b}}, [{w}], #64\n",
        "fcvtl v18.4s, v18.4h\n",
    )};
}

/// A Q4 weight block: scales and minimums widened, nibbles split to bytes.
#[rustfmt::skip]
macro_rules! unpack_q4x4 {
    () => { concat!(
        "ld1 {{v18.4h, v19.4h}}, [{w}], #16\n",
        "ld1 {{v20.16b, v21.16b, v22.16b, v23.16b}}, [{w}], #64\n",
        split_nibbles!(),
        "fcvtl v18.4s, v18.4h\n",
        "fcvtl v19.4s, v19.4h\n",
    )};
}

/// A Q4S weight block: scales widened, nibbles split to bytes (unsigned; the
/// zero point is taken out in float, per token).
#[rustfmt::skip]
macro_rules! unpack_q4sx4 {
    () => { concat!(
        "ld1 {{v18.4h}}, [{w}], #8\n",
        "ld1 {{v20.16b, v21.16b, v22.16b, v23.16b}}, [{w}], #64\n",
        split_nibbles!(),
        "fcvtl v18.4s, v18.4h\n",
    )};
}

/// A Q4B weight block: scales and offsets to Q4's float scales and
/// minimums ([`widen_q4b`]), nibbles split to bytes.
#[rustfmt::skip]
macro_rules! unpack_q4bx4 {
    () => { concat!(
        "ld1 {{v19.8b}}, [{w}], #8\n",
        "ld1 {{v20.16b, v21.16b, v22.16b, v23.16b}}, [{w}], #64\n",
        "fmov v1.4s, #7.5\n",
        widen_q4b!("v1"),
        split_nibbles!(),
    )};
}

/// The four rows' integer sums (v1) of one token into its float sum `$acc`:
/// `d · dₓ · Σ`, then `$offset` (Q4: `+ m · s`; Q4S: `− 8 · d · s`, taken
/// out before the scale; Q8: nothing), with the weight scales already f32.
#[rustfmt::skip]
macro_rules! tile_scale {
    ($acc:literal, q8) => { concat!(
        "scvtf v1.4s, v1.4s\n",
        "fmul v1.4s, v1.4s, v6.s[0]\n",
        "fmla ", $acc, ".4s, v1.4s, v18.4s\n",
    )};
    ($acc:literal, q4) => { concat!(
        tile_scale!($acc, q8),
        "fmla ", $acc, ".4s, v19.4s, v6.s[1]\n",
    )};
    ($acc:literal, q4s) => { concat!(
        "scvtf v1.4s, v1.4s\n",
        "fmul v1.4s, v1.4s, v6.s[0]\n",
        "fmls v1.4s, v30.4s, v6.s[1]\n",
        "fmla ", $acc, ".4s, v1.4s, v18.4s\n",
    )};
}

/// dotprod: one token against the unpacked block, eight `sdot`s.
macro_rules! sdot_token_q8 {
    ($x:literal, $acc:literal) => {
        concat!(
            load_bytes!($x),
            sdot_columns!("v24", "v25", "v26", "v27", "v20", "v21", "v22", "v23"),
            tile_scale!($acc, q8),
        )
    };
}
macro_rules! sdot_token_q4 {
    ($x:literal, $acc:literal) => {
        concat!(
            load_bytes!($x),
            sdot_columns!("v24", "v25", "v26", "v27", "v20", "v21", "v22", "v23"),
            tile_scale!($acc, q4),
        )
    };
}
macro_rules! sdot_token_q4s {
    ($x:literal, $acc:literal) => {
        concat!(
            load_bytes!($x),
            sdot_columns!("v24", "v25", "v26", "v27", "v20", "v21", "v22", "v23"),
            tile_scale!($acc, q4s),
        )
    };
}

/// ARMv8.0: one token against the unpacked block, its column groups
/// broadcast by `ld4r`, the products summed in 16-bit lanes as far as they
/// fit ([`q8_products`], [`nibble_products4`]).
macro_rules! neon_token_q8 {
    ($x:literal, $acc:literal) => {
        concat!(load_broadcast!($x), q8_products!(), tile_scale!($acc, q8))
    };
}
macro_rules! neon_token_q4 {
    ($x:literal, $acc:literal) => {
        concat!(load_broadcast!($x), nibble_products4!(), tile_scale!($acc, q4))
    };
}
macro_rules! neon_token_q4s {
    ($x:literal, $acc:literal) => {
        concat!(load_broadcast!($x), nibble_products4!(), tile_scale!($acc, q4s))
    };
}

/// Runs the tile loop over one group (`$w`) and four tokens (`$x`, four
/// activation pointers); returns the four tokens' row sums. Needs `unsafe`,
/// pointers valid for `$blocks ≥ 1` blocks, and, for the `sdot` tokens, the
/// dot-product extension.
macro_rules! run_tile_four {
    ($unpack:ident, $token:ident, $w:expr, $x:expr, $blocks:expr) => {{
        let x = $x;
        let (a, b, c, d): (float32x4_t, float32x4_t, float32x4_t, float32x4_t);
        asm!(
            tile_loop!($unpack, $token, four),
            w = inout(reg) $w => _,
            ta = inout(reg) x[0] => _,
            tb = inout(reg) x[1] => _,
            tc = inout(reg) x[2] => _,
            td = inout(reg) x[3] => _,
            n = inout(reg) $blocks => _,
            out("v0") a, out("v7") b, out("v28") c, out("v29") d,
            out("v1") _, out("v2") _, out("v3") _, out("v4") _, out("v5") _, out("v6") _,
            out("v8") _, out("v9") _, out("v10") _, out("v11") _, out("v12") _, out("v13") _,
            out("v14") _, out("v15") _, out("v16") _, out("v17") _, out("v18") _, out("v19") _,
            out("v20") _, out("v21") _, out("v22") _, out("v23") _, out("v24") _, out("v25") _,
            out("v26") _, out("v27") _, out("v30") _, out("v31") _,
            options(nostack, readonly),
        );
        [a, b, c, d]
    }};
}

/// As [`run_tile_four`] for eight tokens.
macro_rules! run_tile_eight {
    ($unpack:ident, $token:ident, $w:expr, $x:expr, $blocks:expr) => {{
        let x = $x;
        let (a, b, c, d): (float32x4_t, float32x4_t, float32x4_t, float32x4_t);
        let (e, f, g, h): (float32x4_t, float32x4_t, float32x4_t, float32x4_t);
        asm!(
            tile_loop!($unpack, $token, eight),
            w = inout(reg) $w => _,
            ta = inout(reg) x[0] => _,
            tb = inout(reg) x[1] => _,
            tc = inout(reg) x[2] => _,
            td = inout(reg) x[3] => _,
            te = inout(reg) x[4] => _,
            tf = inout(reg) x[5] => _,
            tg = inout(reg) x[6] => _,
            th = inout(reg) x[7] => _,
            n = inout(reg) $blocks => _,
            out("v0") a, out("v7") b, out("v28") c, out("v29") d,
            out("v2") e, out("v3") f, out("v4") g, out("v5") h,
            out("v1") _, out("v6") _,
            out("v8") _, out("v9") _, out("v10") _, out("v11") _, out("v12") _, out("v13") _,
            out("v14") _, out("v15") _, out("v16") _, out("v17") _, out("v18") _, out("v19") _,
            out("v20") _, out("v21") _, out("v22") _, out("v23") _, out("v24") _, out("v25") _,
            out("v26") _, out("v27") _, out("v30") _, out("v31") _,
            options(nostack, readonly),
        );
        [a, b, c, d, e, f, g, h]
    }};
}

/// One public ARMv8.0 kernel: `$name(weights, cols, x, out)` over
/// `$blocks`. Batches of four tokens and more go through the GEMM tiles of
/// eight tokens and of four (`$unpack`, `$token`), the tokens left over one
/// at a time through the block loops of four groups, two and one (`$kernel`).
macro_rules! neon_kernel {
    ($(#[$doc:meta])* $name:ident, $blocks:ty, $kernel:ident, $unpack:ident, $token:ident) => {
        $(#[$doc])*
        pub fn $name(weights: &[$blocks], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
            tiles_then_groups::<_, 8>(
                weights,
                cols,
                x,
                out,
                // SAFETY: (all five) `for_tiles` and `for_groups` hand over
                // pointers valid for `blocks ≥ 1` blocks; the asm reads only
                // those and NEON is part of every aarch64 core.
                |w: *const $blocks, a: [*const BlockQ8Act; 8], blocks: usize| unsafe {
                    run_tile_eight!($unpack, $token, w, a, blocks)
                },
                // SAFETY: as above.
                |w: *const $blocks, a: [*const BlockQ8Act; 4], blocks: usize| unsafe {
                    run_tile_four!($unpack, $token, w, a, blocks)
                },
                // SAFETY: as above.
                |w: [*const $blocks; 4], a: *const BlockQ8Act, blocks: usize| unsafe {
                    run_sixteen!(load_broadcast, $kernel, w, a, blocks)
                },
                // SAFETY: as above.
                |wa: *const $blocks, wb: *const $blocks, a: *const BlockQ8Act, blocks: usize| unsafe {
                    run_eight!(load_broadcast, $kernel, wa, wb, a, blocks)
                },
                // SAFETY: as above.
                |wa: *const $blocks, a: *const BlockQ8Act, blocks: usize| unsafe {
                    run_four!(load_broadcast, $kernel, wa, a, blocks)
                },
            )
        }
    };
}

neon_kernel!(
    /// Interleaved Q8 matrix × int8 activations, ARMv8.0.
    matmul_q8x4, BlockQ8x4, neon_q8x4, unpack_q8x4, neon_token_q8
);
neon_kernel!(
    /// Interleaved asymmetric Q4 matrix × int8 activations, ARMv8.0.
    matmul_q4x4, BlockQ4x4, neon_q4x4, unpack_q4x4, neon_token_q4
);
neon_kernel!(
    /// Interleaved symmetric Q4 matrix × int8 activations, ARMv8.0.
    matmul_q4sx4, BlockQ4Sx4, neon_q4sx4, unpack_q4sx4, neon_token_q4s
);
neon_kernel!(
    /// Interleaved Q4B matrix × int8 activations, ARMv8.0, in units of the row scales.
    matmul_q4bx4, BlockQ4Bx4, neon_q4bx4, unpack_q4bx4, neon_token_q4
);

/// The `sdot` kernels, compiled with the dot-product extension enabled.
pub mod dotprod {
    use super::*;
    use crate::kernels::matmul::dotprod::available;

    /// One public `sdot` kernel: checks the extension once a call, then runs
    /// an inner function compiled with it.
    macro_rules! sdot_kernel {
        ($(#[$doc:meta])* $name:ident, $blocks:ty, $kernel:ident, $unpack:ident, $token:ident) => {
            $(#[$doc])*
            /// Panics on a CPU without the dot-product extension.
            pub fn $name(weights: &[$blocks], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
                /// # Safety
                /// Pointers valid for `blocks ≥ 1` blocks; the CPU has the extension.
                #[target_feature(enable = "dotprod")]
                unsafe fn sixteen(w: [*const $blocks; 4], a: *const BlockQ8Act, blocks: usize) -> [float32x4_t; 4] {
                    run_sixteen!(load_bytes, $kernel, w, a, blocks)
                }
                /// # Safety
                /// As `sixteen`.
                #[target_feature(enable = "dotprod")]
                unsafe fn eight(
                    wa: *const $blocks,
                    wb: *const $blocks,
                    a: *const BlockQ8Act,
                    blocks: usize,
                ) -> (float32x4_t, float32x4_t) {
                    run_eight!(load_bytes, $kernel, wa, wb, a, blocks)
                }
                /// # Safety
                /// As `eight`.
                #[target_feature(enable = "dotprod")]
                unsafe fn four(wa: *const $blocks, a: *const BlockQ8Act, blocks: usize) -> float32x4_t {
                    run_four!(load_bytes, $kernel, wa, a, blocks)
                }
                /// # Safety
                /// As `sixteen`.
                #[target_feature(enable = "dotprod")]
                unsafe fn tile8(w: *const $blocks, a: [*const BlockQ8Act; 8], blocks: usize) -> [float32x4_t; 8] {
                    run_tile_eight!($unpack, $token, w, a, blocks)
                }
                /// # Safety
                /// As `sixteen`.
                #[target_feature(enable = "dotprod")]
                unsafe fn tile4(w: *const $blocks, a: [*const BlockQ8Act; 4], blocks: usize) -> [float32x4_t; 4] {
                    run_tile_four!($unpack, $token, w, a, blocks)
                }
                assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
                tiles_then_groups::<_, 8>(
                    weights,
                    cols,
                    x,
                    out,
                    // SAFETY: (all five) `for_tiles` and `for_groups` hand over
                    // pointers valid for `blocks ≥ 1` blocks, and the CPU has
                    // the extension (checked above).
                    |w, a, blocks| unsafe { tile8(w, a, blocks) },
                    // SAFETY: as above.
                    |w, a, blocks| unsafe { tile4(w, a, blocks) },
                    // SAFETY: as above.
                    |w, a, blocks| unsafe { sixteen(w, a, blocks) },
                    // SAFETY: as above.
                    |wa, wb, a, blocks| unsafe { eight(wa, wb, a, blocks) },
                    // SAFETY: as above.
                    |wa, a, blocks| unsafe { four(wa, a, blocks) },
                )
            }
        };
    }

    sdot_kernel!(
        /// Interleaved Q8 matrix × int8 activations, with `sdot`.
        matmul_q8x4, BlockQ8x4, sdot_q8x4, unpack_q8x4, sdot_token_q8
    );
    sdot_kernel!(
        /// Interleaved asymmetric Q4 matrix × int8 activations, with `sdot`.
        matmul_q4x4, BlockQ4x4, sdot_q4x4, unpack_q4x4, sdot_token_q4
    );
    sdot_kernel!(
        /// Interleaved symmetric Q4 matrix × int8 activations, with `sdot`.
        matmul_q4sx4, BlockQ4Sx4, sdot_q4sx4, unpack_q4sx4, sdot_token_q4s
    );
    sdot_kernel!(
        /// Interleaved Q4B matrix × int8 activations, with `sdot`, in units of the row scales.
        matmul_q4bx4, BlockQ4Bx4, sdot_q4bx4, unpack_q4bx4, sdot_token_q4
    );
}
