//! Products of 5-bit matrices with int8 activations: ggml's Q5_0
//! ([`BlockQ5S`], symmetric) and Q5_1 ([`BlockQ5`], with a minimum), and
//! their four-row interleaved forms [`BlockQ5Sx4`] and [`BlockQ5x4`].
//!
//! - [`scalar`]: the reference, compiled everywhere: per block
//!   `sum += (d·dₓ)·Σ (n − 16)·q` for Q5_0, and for Q5_1
//!   `sum += (d·dₓ)·Σ (n − 16)·q + (m + 16·d)·s` ([`block_term`]), blocks in
//!   order.
//! - `neon` (aarch64, ARMv8.0: the Raspberry Pi 4's Cortex-A72): widening
//!   multiplies (`smull`, `smlal2`) into 16-bit lanes.
//! - `dotprod` (aarch64 with `sdot`: the Pi 5's Cortex-A76).
//! - `avx2` (x86-64 hosts with AVX2, FMA and F16C): `vpmaddubsw`.
//!
//! Every kernel forms each block's integer sum exactly and turns it into
//! floats with the reference's operations in the reference's order
//! (multiplies and adds, no fused multiply-add), so the results are the
//! reference's bit for bit, as the AVX2 kernels of the other encodings are
//! ([`super::avx2`] says why that matters).
//!
//! The two block types share everything but that float step. The levels go
//! into the integer products signed, `n − 16` in −16..=15, so there is no
//! zero point to take out afterwards; a Q5_1 value `d·n + m` is
//! `d·(n − 16) + (m + 16·d)`, so its minimum enters once a block through
//! the activation's `s = dₓ·Σq`, as Q4_1's does (`16·d` is exact: `m + 16·d`
//! is rounded once, by an `fmla` in the NEON kernels as by an add in the
//! reference). The signed levels:
//!
//! - row-major blocks keep ggml's bits: the 32 fifth bits (flipped once in a
//!   general register) are spread to bytes by a table lookup (`tbl`) and
//!   tested (`cmtst`) into masks of the values whose level is negative;
//! - interleaved blocks store their fifth bits already flipped and
//!   transposed ([`BlockQ5Sx4`], [`BlockQ5x4`]): one `cmtst` of the 16 bytes
//!   against the column group's bit gives a whole column group's mask,
//!   aligned with its 16 value bytes;
//!
//! and then a negative level is its nibble with `0xF0` on top, read as `i8`:
//! one bitwise insert a vector (`bif` of the mask over the low nibbles,
//! `sri` of the high nibbles under it), no subtraction. That is 16
//! instructions a block of four rows (a `cmtst` and an insert for each of
//! its eight column groups) where q4x4 needs 8 (an `and` or a shift each):
//! the fifth bit's price, paid once a block and token in a decode step.
//!
//! The interleaved kernels are `asm!` loops on the drivers of q8x4's and
//! q4x4's ([`super::interleaved`]): a decode step's token against four
//! groups of four rows (16 rows) a step, so one activation load serves
//! them, each group's column groups unpacked and multiplied in turn; a
//! prompt's batch in GEMM tiles (eight tokens, then four, with `sdot`;
//! four on ARMv8.0, whose tile needs every register), a group's block
//! unpacked once for the tile. One `asm!` text serves both block types,
//! which differ only in the scales' load and the float step. The row-major
//! kernels go four rows against one token at a time
//! ([`super::neon::for_row_groups`]), as the other row-major kernels do
//! (row-major 5-bit matrices are rare: `convert` interleaves every matrix
//! of whole groups of four rows).

use crate::kernels::matmul::scalar::f16_to_f32;
use crate::quant::{BlockQ5, BlockQ5S, BlockQ5Sx4, BlockQ5x4, BlockQ8Act, Interleaved, GROUP, INTERLEAVE};
use half::f16;

/// A row-major ggml 5-bit block as the kernels read it: the fifth bits and
/// nibbles both types share, the scale, and the minimum of Q5_1.
pub trait FiveBitBlock: Copy + bytemuck::Pod {
    /// Whether a value is `d·n + m` (Q5_1) rather than `d·(n − 16)` (Q5_0).
    const MINIMUM: bool;
    /// The scale.
    fn d(&self) -> f16;
    /// The minimum (Q5_1; zero for Q5_0, whose float step never reads it).
    fn m(&self) -> f16;
    /// The fifth bits, value `j`'s in bit `j` of a little-endian `u32`.
    fn qh(&self) -> [u8; 4];
    /// The nibbles: value `j`'s low in `qs[j]` (`j < 16`), else high in `qs[j − 16]`.
    fn qs(&self) -> &[u8; GROUP / 2];
}

/// A four-row interleaved 5-bit block as the kernels read it.
pub trait FiveBitBlockX4: Interleaved<Row: FiveBitBlock> {
    /// Row `r`'s scale.
    fn d(&self, r: usize) -> f16;
    /// Row `r`'s minimum (Q5_1; zero for Q5_0).
    fn m(&self, r: usize) -> f16;
    /// The fifth bits, transposed and flipped ([`BlockQ5Sx4::qh`]).
    fn qh(&self) -> &[u8; INTERLEAVE * 4];
    /// The nibbles, interleaved four bytes at a time.
    fn qs(&self) -> &[u8; INTERLEAVE * GROUP / 2];
}

impl FiveBitBlock for BlockQ5S {
    const MINIMUM: bool = false;
    fn d(&self) -> f16 {
        self.d
    }
    fn m(&self) -> f16 {
        f16::ZERO
    }
    fn qh(&self) -> [u8; 4] {
        self.qh
    }
    fn qs(&self) -> &[u8; GROUP / 2] {
        &self.qs
    }
}

impl FiveBitBlock for BlockQ5 {
    const MINIMUM: bool = true;
    fn d(&self) -> f16 {
        self.d
    }
    fn m(&self) -> f16 {
        self.m
    }
    fn qh(&self) -> [u8; 4] {
        self.qh
    }
    fn qs(&self) -> &[u8; GROUP / 2] {
        &self.qs
    }
}

impl FiveBitBlockX4 for BlockQ5Sx4 {
    fn d(&self, r: usize) -> f16 {
        self.d[r]
    }
    fn m(&self, _: usize) -> f16 {
        f16::ZERO
    }
    fn qh(&self) -> &[u8; INTERLEAVE * 4] {
        &self.qh
    }
    fn qs(&self) -> &[u8; INTERLEAVE * GROUP / 2] {
        &self.qs
    }
}

impl FiveBitBlockX4 for BlockQ5x4 {
    fn d(&self, r: usize) -> f16 {
        self.d[r]
    }
    fn m(&self, r: usize) -> f16 {
        self.m[r]
    }
    fn qh(&self) -> &[u8; INTERLEAVE * 4] {
        &self.qh
    }
    fn qs(&self) -> &[u8; INTERLEAVE * GROUP / 2] {
        &self.qs
    }
}

/// The reference's float step for one block of `B` whose signed integer
/// sum `Σ (n − 16)·q` against activation block `a` is `isum`:
/// `(d·dₓ)·Σ`, and for Q5_1 plus `(m + 16·d)·s`, each product and sum
/// rounded on its own in this order (`16·d` is exact). Every kernel
/// computes exactly this.
#[inline(always)]
pub fn block_term<B: FiveBitBlock>(d: f16, m: f16, isum: i32, a: &BlockQ8Act) -> f32 {
    let d = f16_to_f32(d);
    let product = d * a.d * isum as f32;
    if B::MINIMUM {
        product + (f16_to_f32(m) + 16.0 * d) * a.s
    } else {
        product
    }
}

/// Checks a product's shape against the [`crate::kernels::MatmulQuantized`]
/// contract for blocks of 32 values that hold `rows_per_block` rows
/// (1, or [`crate::quant::INTERLEAVE`]); returns (blocks a row, row groups, batch).
fn shape<B>(weights: &[B], cols: usize, x: &[BlockQ8Act], out: &[f32], rows_per_block: usize) -> (usize, usize, usize) {
    let blocks = cols / GROUP;
    assert!(blocks > 0 && cols.is_multiple_of(GROUP), "{cols} columns are not whole blocks of {GROUP}");
    let (groups, batch) = (weights.len() / blocks, x.len() / blocks);
    assert!(
        weights.len() == groups * blocks && x.len() == batch * blocks && out.len() == groups * rows_per_block * batch,
        "matmul shapes disagree: {} weight blocks, {} activation blocks, {} outputs, {blocks} blocks a row",
        weights.len(),
        x.len(),
        out.len()
    );
    (blocks, groups, batch)
}

/// The reference: plain loops, one row at a time.
pub mod scalar {
    use super::*;
    use crate::kernels::matmul::scalar::matmul_interleaved;

    /// Blocks of a group's rows put back in row order at a time (on the
    /// stack: 4 × 64 blocks, at most 6 KiB).
    const STAGED: usize = 64;

    /// A block's 32 signed levels `n − 16`.
    #[inline(always)]
    pub fn signed_levels<B: FiveBitBlock>(block: &B) -> [i8; GROUP] {
        let (qh, qs) = (u32::from_le_bytes(block.qh()), block.qs());
        std::array::from_fn(|j| {
            let low = if j < GROUP / 2 { qs[j] & 0xF } else { qs[j - GROUP / 2] >> 4 };
            (low | (((qh >> j) & 1) as u8) << 4) as i8 - 16
        })
    }

    /// `sum` plus the dot product of one 5-bit row with one activation,
    /// block by block: [`block_term`] of each block's `Σ (n − 16)·q`.
    pub fn dot_q8_from<B: FiveBitBlock>(mut sum: f32, row: &[B], x: &[BlockQ8Act]) -> f32 {
        for (w, a) in row.iter().zip(x) {
            let levels = signed_levels(w);
            let mut isum = 0i32;
            for (&l, &q) in levels.iter().zip(&a.qs) {
                isum += l as i32 * q as i32;
            }
            sum += block_term::<B>(w.d(), w.m(), isum, a);
        }
        sum
    }

    fn matmul_rows<B: FiveBitBlock>(weights: &[B], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        let (blocks, _, batch) = shape(weights, cols, x, out, 1);
        if batch == 0 {
            return;
        }
        for (row, outputs) in weights.chunks_exact(blocks).zip(out.chunks_exact_mut(batch)) {
            for (o, activation) in outputs.iter_mut().zip(x.chunks_exact(blocks)) {
                *o = dot_q8_from(0.0, row, activation);
            }
        }
    }

    /// Symmetric Q5 matrix (ggml's Q5_0) × int8 activations.
    pub fn matmul_q5s(weights: &[BlockQ5S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        matmul_rows(weights, cols, x, out)
    }

    /// Interleaved symmetric Q5 matrix × int8 activations: pieces of each
    /// group put back in row order and multiplied by the row-major reference.
    pub fn matmul_q5sx4(weights: &[BlockQ5Sx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        matmul_interleaved::<_, GROUP, STAGED>(weights, cols, x, out, dot_q8_from)
    }

    /// Asymmetric Q5 matrix (ggml's Q5_1) × int8 activations.
    pub fn matmul_q5(weights: &[BlockQ5], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        matmul_rows(weights, cols, x, out)
    }

    /// Interleaved asymmetric Q5 matrix × int8 activations, as [`matmul_q5sx4`].
    pub fn matmul_q5x4(weights: &[BlockQ5x4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        matmul_interleaved::<_, GROUP, STAGED>(weights, cols, x, out, dot_q8_from)
    }
}

/// What the ARMv8.0 and `sdot` kernels share: the row-major unpacking and
/// float step (intrinsics), and the interleaved kernels' `asm!` text.
///
/// The interleaved kernels are `asm!` loops, as q8x4's and q4x4's are
/// ([`super::interleaved`], whose drivers they share: one token at a time
/// through four groups, two or one a step, a prompt's batch through GEMM
/// tiles). Their text is written once for both block types: the macros
/// take the kind, `q5s` (Q5_0) or `q5` (Q5_1), where the two differ (the
/// scales' load and widening, the activation's scales, the float step).
/// Their fixed registers:
///
/// - v31: `0x0F` in every byte; v24–v30: bit 0–6 of every byte, what
///   `cmtst` tests the fifth bits against (bit 7 needs no constant: `cmlt
///   #0`). The ARMv8.0 tile needs v30 for the scales (and, for Q5_1, v29
///   for the minimums) and shifts bit 6 (and bit 5) up to bit 7 instead.
/// - v15: a block's fifth bits; v16–v19: its nibbles, then, in place, the
///   levels of column groups 0–3; v20–v23: those of column groups 4–7.
/// - v6: the activation block's `dₓ` in lane 0; for Q5_1 also its `s` in
///   lane 1 and `16.0` in lane 2, set before the loop and kept by the
///   activation loads, which insert lanes 0–1 only (`ld1 {v6.d}[0]`).
#[cfg(target_arch = "aarch64")]
mod arm {
    pub(super) use super::*;
    pub(super) use crate::kernels::matmul::interleaved::tiles_then_groups;
    pub(super) use crate::kernels::matmul::neon::{for_row_groups, widen_f16, ROWS};
    pub(super) use std::arch::aarch64::*;
    pub(super) use std::arch::asm;

    /// `bit mask, nibbles, 0x0F`: the low nibbles of `nibbles` under the
    /// high half of `mask` (0xFF where the level is negative): `n − 16` as
    /// `i8` for a negative level, `n` for the others.
    #[inline(always)]
    pub(super) unsafe fn low_levels(mask: uint8x16_t, nibbles: uint8x16_t, low_nibble: uint8x16_t) -> int8x16_t {
        let mut out = mask;
        asm!("bit {o:v}.16b, {n:v}.16b, {m:v}.16b", o = inout(vreg) out, n = in(vreg) nibbles, m = in(vreg) low_nibble,
            options(pure, nomem, nostack, preserves_flags));
        vreinterpretq_s8_u8(out)
    }

    /// `sri mask, nibbles, #4`: the high nibbles of `nibbles` shifted down
    /// under the high half of `mask`, as [`low_levels`].
    #[inline(always)]
    pub(super) unsafe fn high_levels(mask: uint8x16_t, nibbles: uint8x16_t) -> int8x16_t {
        let mut out = mask;
        asm!("sri {o:v}.16b, {n:v}.16b, #4", o = inout(vreg) out, n = in(vreg) nibbles,
            options(pure, nomem, nostack, preserves_flags));
        vreinterpretq_s8_u8(out)
    }

    /// Which byte of the fifth bits (as a `u32` in every lane) each value of
    /// a half reads: values 0–7 byte 0, 8–15 byte 1 (16–31: bytes 2, 3).
    const SPREAD_LOW: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
    const SPREAD_HIGH: [u8; 16] = [2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3];
    /// Which bit of that byte is the value's.
    const BIT_OF_VALUE: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];

    /// A row-major block's 32 signed levels (values 0–15, 16–31): ggml's
    /// fifth bits flipped (set: the level is negative), put in every lane,
    /// spread to a byte a value (`tbl`) and tested into masks (`cmtst`).
    ///
    /// # Safety
    /// `block` points at a readable block.
    #[inline(always)]
    pub(super) unsafe fn row_levels<B: FiveBitBlock>(block: *const B) -> (int8x16_t, int8x16_t) {
        let negative = !u32::from_le_bytes((*block).qh());
        let bits = vreinterpretq_u8_u32(vdupq_n_u32(negative));
        let select = vld1q_u8(BIT_OF_VALUE.as_ptr());
        let low_mask = vtstq_u8(vqtbl1q_u8(bits, vld1q_u8(SPREAD_LOW.as_ptr())), select);
        let high_mask = vtstq_u8(vqtbl1q_u8(bits, vld1q_u8(SPREAD_HIGH.as_ptr())), select);
        let qs = vld1q_u8((*block).qs().as_ptr());
        (low_levels(low_mask, qs, vdupq_n_u8(0x0F)), high_levels(high_mask, qs))
    }

    /// The float step of a block for four rows, [`block_term`]'s operations
    /// in its order: `acc + ((d·dₓ)·Σ [+ (m + 16·d)·s])`, each product and
    /// sum rounded on its own.
    ///
    /// # Safety
    /// Every row and `a` point at readable blocks.
    #[inline(always)]
    pub(super) unsafe fn accumulate<B: FiveBitBlock>(
        acc: float32x4_t,
        isum: int32x4_t,
        rows: [*const B; ROWS],
        a: *const BlockQ8Act,
    ) -> float32x4_t {
        let d = widen_f16(vld1_u16(rows.map(|r| (*r).d().to_bits()).as_ptr()));
        let mut term = vmulq_f32(vmulq_n_f32(d, (*a).d), vcvtq_f32_s32(isum));
        if B::MINIMUM {
            let m = widen_f16(vld1_u16(rows.map(|r| (*r).m().to_bits()).as_ptr()));
            // m + 16·d: the product is exact, so one rounding, the reference's.
            let minimum = vaddq_f32(m, vmulq_n_f32(d, 16.0));
            term = vaddq_f32(term, vmulq_n_f32(minimum, (*a).s));
        }
        vaddq_f32(acc, term)
    }

    /// The unpacking's constants (see the module) for kind `$kind`: all
    /// eight, or without bit 6 (`no_v30`), or without bits 5 and 6
    /// (`no_v29_v30`), for a loop that needs those registers; for Q5_1 also
    /// `16.0` in v6's lanes (lane 2 is what the loops read).
    #[rustfmt::skip]
    macro_rules! unpack_constants {
        ($kind:ident) => { concat!(unpack_constants!($kind, no_v30), "movi v30.16b, #64\n") };
        ($kind:ident, no_v30) => { concat!(unpack_constants!($kind, no_v29_v30), "movi v29.16b, #32\n") };
        (q5s, no_v29_v30) => { concat!(
            "movi v24.16b, #1\n", "movi v25.16b, #2\n", "movi v26.16b, #4\n", "movi v27.16b, #8\n",
            "movi v28.16b, #16\n", "movi v31.16b, #0x0f\n",
        )};
        (q5, no_v29_v30) => { concat!(unpack_constants!(q5s, no_v29_v30), "fmov v6.4s, #16.0\n") };
    }
    pub(super) use unpack_constants;

    /// The activation block's scales from `{$x}` into v6: `dₓ` (Q5_0), or
    /// `dₓ` and `s` into lanes 0–1 with lanes 2–3 kept (Q5_1).
    #[rustfmt::skip]
    macro_rules! load_activation_scales {
        (q5s, $x:literal) => { concat!("ldr s6, [{", $x, "}], #8\n") };
        (q5, $x:literal) => { concat!("ld1 {{v6.d}}[0], [{", $x, "}], #8\n") };
    }
    pub(super) use load_activation_scales;

    /// `$mask`: 0xFF in the bytes whose fifth bit (v15) `$bit` is set, that
    /// is, whose level at column group `$bit` is negative; `5 shifted` and
    /// `6 shifted` move bit 5 or 6 to the sign first (for the loops without
    /// v29, v30).
    #[rustfmt::skip]
    macro_rules! test_bit {
        ($mask:literal, 0) => { concat!("cmtst ", $mask, ".16b, v15.16b, v24.16b\n") };
        ($mask:literal, 1) => { concat!("cmtst ", $mask, ".16b, v15.16b, v25.16b\n") };
        ($mask:literal, 2) => { concat!("cmtst ", $mask, ".16b, v15.16b, v26.16b\n") };
        ($mask:literal, 3) => { concat!("cmtst ", $mask, ".16b, v15.16b, v27.16b\n") };
        ($mask:literal, 4) => { concat!("cmtst ", $mask, ".16b, v15.16b, v28.16b\n") };
        ($mask:literal, 5) => { concat!("cmtst ", $mask, ".16b, v15.16b, v29.16b\n") };
        ($mask:literal, 5 shifted) => { concat!(
            "shl ", $mask, ".16b, v15.16b, #2\n",
            "cmlt ", $mask, ".16b, ", $mask, ".16b, #0\n",
        )};
        ($mask:literal, 6) => { concat!("cmtst ", $mask, ".16b, v15.16b, v30.16b\n") };
        ($mask:literal, 6 shifted) => { concat!(
            "add ", $mask, ".16b, v15.16b, v15.16b\n",
            "cmlt ", $mask, ".16b, ", $mask, ".16b, #0\n",
        )};
        ($mask:literal, 7) => { concat!("cmlt ", $mask, ".16b, v15.16b, #0\n") };
    }
    pub(super) use test_bit;

    /// The signed levels of column groups `c` and `c + 4` from nibble
    /// register `$nibbles` (v16 + c): the mask of the high group's negative
    /// levels with the high nibbles shifted in under it (`sri`) into
    /// `$high`, then the low group's mask (into the scratch `$mask`) put
    /// over the low nibbles in place (`bif`), so a negative level is its
    /// nibble with `0xF0` on top, `n − 16` as `i8`.
    #[rustfmt::skip]
    macro_rules! column_pair {
        ($nibbles:literal, $high:literal, $mask:literal, $c:tt, $($c4:tt)+) => { concat!(
            test_bit!($high, $($c4)+),
            "sri ", $high, ".16b, ", $nibbles, ".16b, #4\n",
            test_bit!($mask, $c),
            "bif ", $nibbles, ".16b, ", $mask, ".16b, v31.16b\n",
        )};
    }
    pub(super) use column_pair;

    /// Loads one interleaved block from `{$w}`: its four f16 scales to
    /// `$d` (Q5_1: and its four minimums after them, `$d`'s high half), its
    /// fifth bits to v15, its nibbles to v16–v19.
    #[rustfmt::skip]
    macro_rules! load_block {
        (q5s, $w:literal, $d:literal) => { concat!(
            "ld1 {{", $d, ".4h}}, [{", $w, "}], #8\n", load_block!(bits, $w),
        )};
        (q5, $w:literal, $d:literal) => { concat!(
            "ld1 {{", $d, ".8h}}, [{", $w, "}], #16\n", load_block!(bits, $w),
        )};
        (bits, $w:literal) => { concat!(
            "ld1 {{v15.16b}}, [{", $w, "}], #16\n",
            "ld1 {{v16.16b, v17.16b, v18.16b, v19.16b}}, [{", $w, "}], #64\n",
        )};
    }
    pub(super) use load_block;

    /// The loaded block's scales widened to f32 in `$d`; for Q5_1 its
    /// minimums too, as `m + 16·d` in `$m` (`fmla` by v6's lane 2, 16: the
    /// product is exact, so the one rounding is the reference's add).
    #[rustfmt::skip]
    macro_rules! widen_scales {
        (q5s, $d:literal, $m:literal) => { concat!("fcvtl ", $d, ".4s, ", $d, ".4h\n") };
        (q5, $d:literal, $m:literal) => { concat!(
            "fcvtl2 ", $m, ".4s, ", $d, ".8h\n",
            "fcvtl ", $d, ".4s, ", $d, ".4h\n",
            "fmla ", $m, ".4s, ", $d, ".4s, v6.s[2]\n",
        )};
    }
    pub(super) use widen_scales;

    /// A whole block unpacked for a GEMM tile: the 32 levels of four rows
    /// in v16–v23 (column groups 0–7), `$mask` the scratch, the scales
    /// widened in `$d` (and `$m`); bits 5 and 6 tested as given.
    #[rustfmt::skip]
    macro_rules! unpack_block {
        ($kind:ident, $d:literal, $m:literal, $mask:literal, ($($bit5:tt)+), ($($bit6:tt)+)) => { concat!(
            load_block!($kind, "w", $d),
            column_pair!("v16", "v20", $mask, 0, 4),
            column_pair!("v17", "v21", $mask, 1, $($bit5)+),
            column_pair!("v18", "v22", $mask, 2, $($bit6)+),
            column_pair!("v19", "v23", $mask, 3, 7),
            widen_scales!($kind, $d, $m),
        )};
    }
    pub(super) use unpack_block;

    /// The float step, [`block_term`]'s operations in its order: `$sum`
    /// (four rows' integer sums) to floats, times (`$d` · `dₓ`, v6 lane 0,
    /// into the scratch `$scale`); for Q5_1 plus (`$m` · `s`, v6 lane 1);
    /// added to `$acc`. No fused multiply-add: bit for bit the scalar step.
    #[rustfmt::skip]
    macro_rules! scale_exact {
        (q5s, $sum:literal, $d:literal, $m:literal, $scale:literal, $acc:literal) => { concat!(
            "scvtf ", $sum, ".4s, ", $sum, ".4s\n",
            "fmul ", $scale, ".4s, ", $d, ".4s, v6.s[0]\n",
            "fmul ", $sum, ".4s, ", $scale, ".4s, ", $sum, ".4s\n",
            "fadd ", $acc, ".4s, ", $acc, ".4s, ", $sum, ".4s\n",
        )};
        (q5, $sum:literal, $d:literal, $m:literal, $scale:literal, $acc:literal) => { concat!(
            "scvtf ", $sum, ".4s, ", $sum, ".4s\n",
            "fmul ", $scale, ".4s, ", $d, ".4s, v6.s[0]\n",
            "fmul ", $sum, ".4s, ", $scale, ".4s, ", $sum, ".4s\n",
            "fmul ", $scale, ".4s, ", $m, ".4s, v6.s[1]\n",
            "fadd ", $sum, ".4s, ", $sum, ".4s, ", $scale, ".4s\n",
            "fadd ", $acc, ".4s, ", $acc, ".4s, ", $sum, ".4s\n",
        )};
    }
    pub(super) use scale_exact;

    /// The decode loop: one activation block (`$load!($kind)`) a step
    /// against one, two or four groups (`{wa}` … `{wd}`) into v0–v3, each
    /// group's block by `$block!($kind, pointer, sum)`; `{n}` blocks.
    #[rustfmt::skip]
    macro_rules! block_loop {
        ($kind:ident, $load:ident, $block:ident, one) => { concat!(
            "movi v0.16b, #0\n", unpack_constants!($kind), "2:\n",
            $load!($kind), $block!($kind, "wa", "v0"),
            "subs {n}, {n}, #1\n", "b.ne 2b\n",
        )};
        ($kind:ident, $load:ident, $block:ident, two) => { concat!(
            "movi v0.16b, #0\n", "movi v1.16b, #0\n", unpack_constants!($kind), "2:\n",
            $load!($kind), $block!($kind, "wa", "v0"), $block!($kind, "wb", "v1"),
            "subs {n}, {n}, #1\n", "b.ne 2b\n",
        )};
        ($kind:ident, $load:ident, $block:ident, four) => { concat!(
            "movi v0.16b, #0\n", "movi v1.16b, #0\n", "movi v2.16b, #0\n", "movi v3.16b, #0\n",
            unpack_constants!($kind), "2:\n",
            $load!($kind), $block!($kind, "wa", "v0"), $block!($kind, "wb", "v1"), $block!($kind, "wc", "v2"),
            $block!($kind, "wd", "v3"),
            "subs {n}, {n}, #1\n", "b.ne 2b\n",
        )};
    }
    pub(super) use block_loop;

    /// `asm!` (`nostack`, `readonly`) with `$text`, `$operands` and its
    /// outputs, the sums of one group (v0), two (v0, v1), four (v0–v3) or,
    /// for the eight-token tile, eight (v0–v5, v7, v8); every other vector
    /// register clobbered.
    #[rustfmt::skip]
    macro_rules! run_asm {
        ($text:expr, [$($operand:tt)*], v16_to_v31) => {
            asm!(
                $text,
                $($operand)*
                out("v16") _, out("v17") _, out("v18") _, out("v19") _, out("v20") _, out("v21") _,
                out("v22") _, out("v23") _, out("v24") _, out("v25") _, out("v26") _, out("v27") _,
                out("v28") _, out("v29") _, out("v30") _, out("v31") _,
                options(nostack, readonly),
            )
        };
        ($text:expr, [$($operand:tt)*], one($a:ident)) => {
            run_asm!($text, [$($operand)* out("v0") $a, out("v1") _, out("v2") _, out("v3") _,
                out("v4") _, out("v5") _, out("v6") _, out("v7") _, out("v8") _, out("v9") _,
                out("v10") _, out("v11") _, out("v12") _, out("v13") _, out("v14") _, out("v15") _,], v16_to_v31)
        };
        ($text:expr, [$($operand:tt)*], two($a:ident, $b:ident)) => {
            run_asm!($text, [$($operand)* out("v0") $a, out("v1") $b, out("v2") _, out("v3") _,
                out("v4") _, out("v5") _, out("v6") _, out("v7") _, out("v8") _, out("v9") _,
                out("v10") _, out("v11") _, out("v12") _, out("v13") _, out("v14") _, out("v15") _,], v16_to_v31)
        };
        ($text:expr, [$($operand:tt)*], four($a:ident, $b:ident, $c:ident, $d:ident)) => {
            run_asm!($text, [$($operand)* out("v0") $a, out("v1") $b, out("v2") $c, out("v3") $d,
                out("v4") _, out("v5") _, out("v6") _, out("v7") _, out("v8") _, out("v9") _,
                out("v10") _, out("v11") _, out("v12") _, out("v13") _, out("v14") _, out("v15") _,], v16_to_v31)
        };
        ($text:expr, [$($operand:tt)*],
         eight($a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident)) => {
            run_asm!($text, [$($operand)* out("v0") $a, out("v1") $b, out("v2") $c, out("v3") $d,
                out("v4") $e, out("v5") $f, out("v6") _, out("v7") $g, out("v8") $h, out("v9") _,
                out("v10") _, out("v11") _, out("v12") _, out("v13") _, out("v14") _, out("v15") _,], v16_to_v31)
        };
    }
    pub(super) use run_asm;

    /// Runs a decode loop over four groups against one token; returns their
    /// four rows' sums (v0–v3). Needs `unsafe`, pointers valid for
    /// `$blocks ≥ 1` blocks and the loop's CPU features.
    macro_rules! run_sixteen {
        ($kind:ident, $load:ident, $block:ident, $w:expr, $x:expr, $blocks:expr) => {{
            let w = $w;
            let (a, b, c, d): (float32x4_t, float32x4_t, float32x4_t, float32x4_t);
            run_asm!(
                block_loop!($kind, $load, $block, four),
                [x = inout(reg) $x => _, wa = inout(reg) w[0] => _, wb = inout(reg) w[1] => _,
                 wc = inout(reg) w[2] => _, wd = inout(reg) w[3] => _, n = inout(reg) $blocks => _,],
                four(a, b, c, d)
            );
            [a, b, c, d]
        }};
    }
    pub(super) use run_sixteen;

    /// As [`run_sixteen`] for two groups.
    macro_rules! run_eight {
        ($kind:ident, $load:ident, $block:ident, $wa:expr, $wb:expr, $x:expr, $blocks:expr) => {{
            let (a, b): (float32x4_t, float32x4_t);
            run_asm!(
                block_loop!($kind, $load, $block, two),
                [x = inout(reg) $x => _, wa = inout(reg) $wa => _, wb = inout(reg) $wb => _,
                 n = inout(reg) $blocks => _,],
                two(a, b)
            );
            (a, b)
        }};
    }
    pub(super) use run_eight;

    /// As [`run_sixteen`] for one group.
    macro_rules! run_four {
        ($kind:ident, $load:ident, $block:ident, $wa:expr, $x:expr, $blocks:expr) => {{
            let a: float32x4_t;
            run_asm!(
                block_loop!($kind, $load, $block, one),
                [x = inout(reg) $x => _, wa = inout(reg) $wa => _, n = inout(reg) $blocks => _,],
                one(a)
            );
            a
        }};
    }
    pub(super) use run_four;
}

/// ARMv8.0 NEON kernels (no `sdot`): the Raspberry Pi 4's Cortex-A72.
///
/// The interleaved kernel multiplies each column group's levels by the
/// activation's four bytes at those columns, broadcast to every lane
/// (`ld4r`), in widening multiplies (`smull`, `smlal2`): rows 0–1 in the
/// low halves, 2–3 in the high ones, eight products a 16-bit lane
/// (|(n − 16)·q| ≤ 16·128 = 2¹¹, eight ≤ 2¹⁴; sixteen could reach 2¹⁵, so
/// each half widens on its own, `saddlp`, before the pairwise add that
/// leaves `[r0, r1, r2, r3]`).
#[cfg(target_arch = "aarch64")]
pub mod neon {
    use super::arm::*;

    /// One activation block from `{x}`: its scales to v6, its eight
    /// four-byte column groups each broadcast to a whole register, v7–v14.
    #[rustfmt::skip]
    macro_rules! load_broadcast {
        ($kind:ident) => { concat!(
            load_activation_scales!($kind, "x"),
            "ld4r {{v7.4s, v8.4s, v9.4s, v10.4s}}, [{x}], #16\n",
            "ld4r {{v11.4s, v12.4s, v13.4s, v14.4s}}, [{x}], #16\n",
        )};
    }

    /// The products of column groups `c` (`$low`, broadcast `$bc`) and
    /// `c + 4` (`$high`, broadcast `$bd`) added into v4 (rows 0–1) and v5
    /// (rows 2–3); `smull` for the first pair.
    #[rustfmt::skip]
    macro_rules! products {
        (first, $low:literal, $bc:literal, $high:literal, $bd:literal) => { concat!(
            "smull v4.8h, ", $low, ".8b, ", $bc, ".8b\n",
            "smull2 v5.8h, ", $low, ".16b, ", $bc, ".16b\n",
            products!($high, $bd),
        )};
        ($low:literal, $bc:literal, $high:literal, $bd:literal) => { concat!(
            products!($low, $bc), products!($high, $bd),
        )};
        ($levels:literal, $b:literal) => { concat!(
            "smlal v4.8h, ", $levels, ".8b, ", $b, ".8b\n",
            "smlal2 v5.8h, ", $levels, ".16b, ", $b, ".16b\n",
        )};
    }

    /// Rows 0–1 and 2–3 of v4 and v5 widened and added pairwise: v4 =
    /// `[r0, r1, r2, r3]`.
    #[rustfmt::skip]
    macro_rules! row_sums {
        () => { concat!(
            "saddlp v4.4s, v4.8h\n",
            "saddlp v5.4s, v5.8h\n",
            "addp v4.4s, v4.4s, v5.4s\n",
        )};
    }

    /// One group's block (`{$w}`) against the broadcast activation, into
    /// `$acc`: each column pair unpacked (v20 the high group, v21 the
    /// scratch) and multiplied straight away, the scales in v22 (the
    /// minimums, Q5_1, in v23).
    #[rustfmt::skip]
    macro_rules! group_block {
        ($kind:ident, $w:literal, $acc:literal) => { concat!(
            load_block!($kind, $w, "v22"),
            column_pair!("v16", "v20", "v21", 0, 4), products!(first, "v16", "v7", "v20", "v11"),
            column_pair!("v17", "v20", "v21", 1, 5), products!("v17", "v8", "v20", "v12"),
            column_pair!("v18", "v20", "v21", 2, 6), products!("v18", "v9", "v20", "v13"),
            column_pair!("v19", "v20", "v21", 3, 7), products!("v19", "v10", "v20", "v14"),
            row_sums!(),
            widen_scales!($kind, "v22", "v23"),
            scale_exact!($kind, "v4", "v22", "v23", "v22", $acc),
        )};
    }

    /// The tile's constants: all but bit 6 (v30 holds the scales), and for
    /// Q5_1 all but bits 5 and 6 (v29 holds `m + 16·d`).
    #[rustfmt::skip]
    macro_rules! tile_constants {
        (q5s) => { unpack_constants!(q5s, no_v30) };
        (q5) => { unpack_constants!(q5, no_v29_v30) };
    }

    /// The tile's unpacking, bits tested as [`tile_constants`] allow.
    #[rustfmt::skip]
    macro_rules! tile_unpack {
        (q5s) => { unpack_block!(q5s, "v30", "v29", "v4", (5), (6 shifted)) };
        (q5) => { unpack_block!(q5, "v30", "v29", "v4", (5 shifted), (6 shifted)) };
    }

    /// The GEMM tile: one group (`{w}`) against four tokens (`{ta}` …
    /// `{td}`, sums v0–v3), the block unpacked once (scales in v30, Q5_1's
    /// minimums in v29).
    #[rustfmt::skip]
    macro_rules! tile_loop {
        ($kind:ident) => { concat!(
            "movi v0.16b, #0\n", "movi v1.16b, #0\n", "movi v2.16b, #0\n", "movi v3.16b, #0\n",
            tile_constants!($kind),
            "2:\n",
            tile_unpack!($kind),
            tile_token!($kind, "ta", "v0"), tile_token!($kind, "tb", "v1"),
            tile_token!($kind, "tc", "v2"), tile_token!($kind, "td", "v3"),
            "subs {n}, {n}, #1\n", "b.ne 2b\n",
        )};
    }

    /// One token (`{$t}`) against the unpacked block, into `$acc`.
    #[rustfmt::skip]
    macro_rules! tile_token {
        ($kind:ident, $t:literal, $acc:literal) => { concat!(
            load_activation_scales!($kind, $t),
            "ld4r {{v7.4s, v8.4s, v9.4s, v10.4s}}, [{", $t, "}], #16\n",
            "ld4r {{v11.4s, v12.4s, v13.4s, v14.4s}}, [{", $t, "}], #16\n",
            products!(first, "v16", "v7", "v20", "v11"),
            products!("v17", "v8", "v21", "v12"),
            products!("v18", "v9", "v22", "v13"),
            products!("v19", "v10", "v23", "v14"),
            row_sums!(),
            scale_exact!($kind, "v4", "v30", "v29", "v5", $acc),
        )};
    }

    /// One row's `Σ (n − 16)·q` as four partial sums: four products a
    /// 16-bit lane (at most 2¹³), widened pairwise.
    #[inline(always)]
    unsafe fn row_sum(levels: (int8x16_t, int8x16_t), q: int8x16x2_t) -> int32x4_t {
        let mut p = vmull_s8(vget_low_s8(levels.0), vget_low_s8(q.0));
        p = vmlal_high_s8(p, levels.0, q.0);
        p = vmlal_s8(p, vget_low_s8(levels.1), vget_low_s8(q.1));
        p = vmlal_high_s8(p, levels.1, q.1);
        vpaddlq_s16(p)
    }

    /// Four row-major rows · one activation.
    ///
    /// # Safety
    /// Every row and `x` point at `blocks` readable blocks.
    #[inline(always)]
    unsafe fn dot4<B: FiveBitBlock>(rows: [*const B; ROWS], x: *const BlockQ8Act, blocks: usize) -> float32x4_t {
        let mut acc = vdupq_n_f32(0.0);
        for k in 0..blocks {
            let a = x.add(k);
            let q = vld1q_s8_x2((*a).qs.as_ptr());
            let at = rows.map(|r| r.add(k));
            let s = at.map(|r| row_sum(row_levels(r), q));
            // Each row's four partial sums to one lane: [r0, r1, r2, r3].
            let isum = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
            acc = accumulate(acc, isum, at, a);
        }
        acc
    }

    fn rows<B: FiveBitBlock>(weights: &[B], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        // SAFETY: `for_row_groups` hands over pointers to `blocks` blocks;
        // NEON is part of every aarch64 target.
        for_row_groups(weights, cols, x, out, |rows, a, blocks| unsafe { dot4(rows, a, blocks) })
    }

    /// Symmetric Q5 matrix (ggml's Q5_0) × int8 activations, ARMv8.0.
    pub fn matmul_q5s(weights: &[BlockQ5S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        rows(weights, cols, x, out)
    }

    /// Asymmetric Q5 matrix (ggml's Q5_1) × int8 activations, ARMv8.0.
    pub fn matmul_q5(weights: &[BlockQ5], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        rows(weights, cols, x, out)
    }

    /// An interleaved kernel of kind `$kind` for blocks `$block`, public as
    /// `$name`: its tile and decode loops, driven by `tiles_then_groups`.
    macro_rules! interleaved_kernel {
        ($kind:ident, $block:ty, $name:ident, $what:literal) => {
            mod $kind {
                use super::*;

                /// One group against four tokens; each token's four rows' sums.
                ///
                /// # Safety
                /// `w` and every `x[t]` point at `blocks ≥ 1` readable blocks.
                #[inline(always)]
                pub(super) unsafe fn tile4(w: *const $block, x: [*const BlockQ8Act; 4], blocks: usize) -> [float32x4_t; 4] {
                    let (a, b, c, d): (float32x4_t, float32x4_t, float32x4_t, float32x4_t);
                    run_asm!(
                        tile_loop!($kind),
                        [w = inout(reg) w => _, ta = inout(reg) x[0] => _, tb = inout(reg) x[1] => _,
                         tc = inout(reg) x[2] => _, td = inout(reg) x[3] => _, n = inout(reg) blocks => _,],
                        four(a, b, c, d)
                    );
                    [a, b, c, d]
                }
            }

            #[doc = concat!("Interleaved ", $what, " matrix × int8 activations, ARMv8.0: a")]
            /// prompt's batch in tiles of four tokens (the tile needs every
            /// register: eight for the levels, eight for the broadcasts, four
            /// sums, the scales), the tokens left over (every token of a
            /// decode step) one at a time against four groups a step, then
            /// two, then one.
            pub fn $name(weights: &[$block], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
                // SAFETY: (all five) `for_tiles` and `for_groups` hand over pointers
                // valid for `blocks ≥ 1` blocks; the asm reads only those, and NEON
                // is part of every aarch64 core.
                let tile = |w, a, blocks| unsafe { $kind::tile4(w, a, blocks) };
                tiles_then_groups::<_, 4>(
                    weights,
                    cols,
                    x,
                    out,
                    tile,
                    tile,
                    // SAFETY: as above.
                    |w: [*const $block; 4], a: *const BlockQ8Act, blocks: usize| unsafe {
                        run_sixteen!($kind, load_broadcast, group_block, w, a, blocks)
                    },
                    // SAFETY: as above.
                    |wa: *const $block, wb: *const $block, a: *const BlockQ8Act, blocks: usize| unsafe {
                        run_eight!($kind, load_broadcast, group_block, wa, wb, a, blocks)
                    },
                    // SAFETY: as above.
                    |wa: *const $block, a: *const BlockQ8Act, blocks: usize| unsafe {
                        run_four!($kind, load_broadcast, group_block, wa, a, blocks)
                    },
                )
            }
        };
    }

    interleaved_kernel!(q5s, BlockQ5Sx4, matmul_q5sx4, "symmetric Q5 (ggml's Q5_0)");
    interleaved_kernel!(q5, BlockQ5x4, matmul_q5x4, "asymmetric Q5 (ggml's Q5_1)");
}

/// `sdot` kernels (ARMv8.2's dot-product extension): the Raspberry Pi 5's Cortex-A76.
///
/// The interleaved kernel: `sdot vS.4s, vL.16b, vA.4b[c]` multiplies a
/// column group's sixteen levels (four rows × four columns) by the
/// activation's four bytes at those columns and adds four products into
/// each row's lane, eight `sdot`s a block of four rows.
#[cfg(target_arch = "aarch64")]
pub mod dotprod {
    use super::arm::*;
    use crate::kernels::matmul::dotprod::available;

    /// One activation block from `{x}` (or `{$x}`): its scales to v6, its
    /// 32 values to v12–v13 (`sdot` by lane picks the four it needs).
    #[rustfmt::skip]
    macro_rules! load_bytes {
        ($kind:ident) => { load_bytes!($kind, "x") };
        ($kind:ident, $x:literal) => { concat!(
            load_activation_scales!($kind, $x),
            "ld1 {{v12.16b, v13.16b}}, [{", $x, "}], #32\n",
        )};
    }

    /// One group's block (`{$w}`) against the activation, into `$acc`:
    /// each column pair unpacked (v20 the high group, v21 the scratch) and
    /// multiplied straight away into v9, the scales in v14 (the minimums,
    /// Q5_1, in v22).
    #[rustfmt::skip]
    macro_rules! group_block {
        ($kind:ident, $w:literal, $acc:literal) => { concat!(
            load_block!($kind, $w, "v14"),
            "movi v9.4s, #0\n",
            column_pair!("v16", "v20", "v21", 0, 4),
            "sdot v9.4s, v16.16b, v12.4b[0]\n", "sdot v9.4s, v20.16b, v13.4b[0]\n",
            column_pair!("v17", "v20", "v21", 1, 5),
            "sdot v9.4s, v17.16b, v12.4b[1]\n", "sdot v9.4s, v20.16b, v13.4b[1]\n",
            column_pair!("v18", "v20", "v21", 2, 6),
            "sdot v9.4s, v18.16b, v12.4b[2]\n", "sdot v9.4s, v20.16b, v13.4b[2]\n",
            column_pair!("v19", "v20", "v21", 3, 7),
            "sdot v9.4s, v19.16b, v12.4b[3]\n", "sdot v9.4s, v20.16b, v13.4b[3]\n",
            widen_scales!($kind, "v14", "v22"),
            scale_exact!($kind, "v9", "v14", "v22", "v14", $acc),
        )};
    }

    /// One token (`{$t}`) against the unpacked block (v16–v23, scales in
    /// v14, Q5_1's minimums in v11), into `$acc`: eight `sdot`s into v9,
    /// the scale in v10.
    #[rustfmt::skip]
    macro_rules! tile_token {
        ($kind:ident, $t:literal, $acc:literal) => { concat!(
            load_bytes!($kind, $t),
            "movi v9.4s, #0\n",
            "sdot v9.4s, v16.16b, v12.4b[0]\n", "sdot v9.4s, v17.16b, v12.4b[1]\n",
            "sdot v9.4s, v18.16b, v12.4b[2]\n", "sdot v9.4s, v19.16b, v12.4b[3]\n",
            "sdot v9.4s, v20.16b, v13.4b[0]\n", "sdot v9.4s, v21.16b, v13.4b[1]\n",
            "sdot v9.4s, v22.16b, v13.4b[2]\n", "sdot v9.4s, v23.16b, v13.4b[3]\n",
            scale_exact!($kind, "v9", "v14", "v11", "v10", $acc),
        )};
    }

    /// The GEMM tile: one group (`{w}`) against four tokens (sums v0–v3)
    /// or eight (and v4, v5, v7, v8), the block unpacked once.
    #[rustfmt::skip]
    macro_rules! tile_loop {
        ($kind:ident, four) => { concat!(
            "movi v0.16b, #0\n", "movi v1.16b, #0\n", "movi v2.16b, #0\n", "movi v3.16b, #0\n",
            unpack_constants!($kind),
            "2:\n",
            unpack_block!($kind, "v14", "v11", "v9", (5), (6)),
            tile_token!($kind, "ta", "v0"), tile_token!($kind, "tb", "v1"),
            tile_token!($kind, "tc", "v2"), tile_token!($kind, "td", "v3"),
            "subs {n}, {n}, #1\n", "b.ne 2b\n",
        )};
        ($kind:ident, eight) => { concat!(
            "movi v0.16b, #0\n", "movi v1.16b, #0\n", "movi v2.16b, #0\n", "movi v3.16b, #0\n",
            "movi v4.16b, #0\n", "movi v5.16b, #0\n", "movi v7.16b, #0\n", "movi v8.16b, #0\n",
            unpack_constants!($kind),
            "2:\n",
            unpack_block!($kind, "v14", "v11", "v9", (5), (6)),
            tile_token!($kind, "ta", "v0"), tile_token!($kind, "tb", "v1"),
            tile_token!($kind, "tc", "v2"), tile_token!($kind, "td", "v3"),
            tile_token!($kind, "te", "v4"), tile_token!($kind, "tf", "v5"),
            tile_token!($kind, "tg", "v7"), tile_token!($kind, "th", "v8"),
            "subs {n}, {n}, #1\n", "b.ne 2b\n",
        )};
    }

    /// One row's `Σ (n − 16)·q` as four partial sums: two `sdot`s.
    ///
    /// # Safety
    /// The CPU has the dot-product extension.
    #[target_feature(enable = "dotprod")]
    #[inline]
    unsafe fn row_sum(levels: (int8x16_t, int8x16_t), q: int8x16x2_t) -> int32x4_t {
        let mut sum = vdupq_n_s32(0);
        asm!(
            "sdot {sum:v}.4s, {w0:v}.16b, {q0:v}.16b",
            "sdot {sum:v}.4s, {w1:v}.16b, {q1:v}.16b",
            sum = inout(vreg) sum,
            w0 = in(vreg) levels.0, q0 = in(vreg) q.0, w1 = in(vreg) levels.1, q1 = in(vreg) q.1,
            options(pure, nomem, nostack, preserves_flags),
        );
        sum
    }

    /// Four row-major rows · one activation.
    ///
    /// # Safety
    /// Every row and `x` point at `blocks` readable blocks; the CPU has the
    /// dot-product extension.
    #[target_feature(enable = "dotprod")]
    #[inline]
    unsafe fn dot4<B: FiveBitBlock>(rows: [*const B; ROWS], x: *const BlockQ8Act, blocks: usize) -> float32x4_t {
        let mut acc = vdupq_n_f32(0.0);
        for k in 0..blocks {
            let a = x.add(k);
            let q = vld1q_s8_x2((*a).qs.as_ptr());
            let at = rows.map(|r| r.add(k));
            let s = at.map(|r| row_sum(row_levels(r), q));
            // Each row's four partial sums to one lane: [r0, r1, r2, r3].
            let isum = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
            acc = accumulate(acc, isum, at, a);
        }
        acc
    }

    #[target_feature(enable = "dotprod")]
    fn rows_with_sdot<B: FiveBitBlock>(weights: &[B], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        // SAFETY: `for_row_groups` hands over pointers to `blocks` blocks,
        // and this function runs only where the CPU has the extension.
        for_row_groups(weights, cols, x, out, |rows, a, blocks| unsafe { dot4(rows, a, blocks) })
    }

    /// Symmetric Q5 matrix (ggml's Q5_0) × int8 activations, with `sdot`.
    /// Panics on a CPU without the dot-product extension.
    pub fn matmul_q5s(weights: &[BlockQ5S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: the CPU has the dot-product extension (checked just above).
        unsafe { rows_with_sdot(weights, cols, x, out) }
    }

    /// Asymmetric Q5 matrix (ggml's Q5_1) × int8 activations, with `sdot`.
    /// Panics on a CPU without the dot-product extension.
    pub fn matmul_q5(weights: &[BlockQ5], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: the CPU has the dot-product extension (checked just above).
        unsafe { rows_with_sdot(weights, cols, x, out) }
    }

    /// An interleaved kernel of kind `$kind` for blocks `$block`, public as
    /// `$name`: its tile and decode loops, driven by `tiles_then_groups`.
    macro_rules! interleaved_kernel {
        ($kind:ident, $block:ty, $name:ident, $what:literal) => {
            mod $kind {
                use super::*;

                /// # Safety
                /// Pointers valid for `blocks ≥ 1` blocks; the CPU has the extension.
                #[target_feature(enable = "dotprod")]
                pub(super) unsafe fn sixteen(
                    w: [*const $block; 4],
                    a: *const BlockQ8Act,
                    blocks: usize,
                ) -> [float32x4_t; 4] {
                    run_sixteen!($kind, load_bytes, group_block, w, a, blocks)
                }

                /// # Safety
                /// As [`sixteen`].
                #[target_feature(enable = "dotprod")]
                pub(super) unsafe fn eight(
                    wa: *const $block,
                    wb: *const $block,
                    a: *const BlockQ8Act,
                    blocks: usize,
                ) -> (float32x4_t, float32x4_t) {
                    run_eight!($kind, load_bytes, group_block, wa, wb, a, blocks)
                }

                /// # Safety
                /// As [`sixteen`].
                #[target_feature(enable = "dotprod")]
                pub(super) unsafe fn four(wa: *const $block, a: *const BlockQ8Act, blocks: usize) -> float32x4_t {
                    run_four!($kind, load_bytes, group_block, wa, a, blocks)
                }

                /// # Safety
                /// As [`sixteen`].
                #[target_feature(enable = "dotprod")]
                pub(super) unsafe fn tile4(
                    w: *const $block,
                    x: [*const BlockQ8Act; 4],
                    blocks: usize,
                ) -> [float32x4_t; 4] {
                    let (a, b, c, d): (float32x4_t, float32x4_t, float32x4_t, float32x4_t);
                    run_asm!(
                        tile_loop!($kind, four),
                        [w = inout(reg) w => _, ta = inout(reg) x[0] => _, tb = inout(reg) x[1] => _,
                         tc = inout(reg) x[2] => _, td = inout(reg) x[3] => _, n = inout(reg) blocks => _,],
                        four(a, b, c, d)
                    );
                    [a, b, c, d]
                }

                /// # Safety
                /// As [`sixteen`].
                #[target_feature(enable = "dotprod")]
                pub(super) unsafe fn tile8(
                    w: *const $block,
                    x: [*const BlockQ8Act; 8],
                    blocks: usize,
                ) -> [float32x4_t; 8] {
                    let (a, b, c, d): (float32x4_t, float32x4_t, float32x4_t, float32x4_t);
                    let (e, f, g, h): (float32x4_t, float32x4_t, float32x4_t, float32x4_t);
                    run_asm!(
                        tile_loop!($kind, eight),
                        [w = inout(reg) w => _, ta = inout(reg) x[0] => _, tb = inout(reg) x[1] => _,
                         tc = inout(reg) x[2] => _, td = inout(reg) x[3] => _, te = inout(reg) x[4] => _,
                         tf = inout(reg) x[5] => _, tg = inout(reg) x[6] => _, th = inout(reg) x[7] => _,
                         n = inout(reg) blocks => _,],
                        eight(a, b, c, d, e, f, g, h)
                    );
                    [a, b, c, d, e, f, g, h]
                }
            }

            #[doc = concat!("Interleaved ", $what, " matrix × int8 activations, with `sdot`: a")]
            /// prompt's batch in tiles of eight tokens, then four, the tokens
            /// left over (every token of a decode step) one at a time against
            /// four groups a step, then two, then one. Panics on a CPU without
            /// the dot-product extension.
            pub fn $name(weights: &[$block], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
                assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
                tiles_then_groups::<_, 8>(
                    weights,
                    cols,
                    x,
                    out,
                    // SAFETY: (all five) `for_tiles` and `for_groups` hand over
                    // pointers valid for `blocks ≥ 1` blocks, and the CPU has the
                    // extension (checked above).
                    |w, a, blocks| unsafe { $kind::tile8(w, a, blocks) },
                    // SAFETY: as above.
                    |w, a, blocks| unsafe { $kind::tile4(w, a, blocks) },
                    // SAFETY: as above.
                    |w, a, blocks| unsafe { $kind::sixteen(w, a, blocks) },
                    // SAFETY: as above.
                    |wa, wb, a, blocks| unsafe { $kind::eight(wa, wb, a, blocks) },
                    // SAFETY: as above.
                    |wa, a, blocks| unsafe { $kind::four(wa, a, blocks) },
                )
            }
        };
    }

    interleaved_kernel!(q5s, BlockQ5Sx4, matmul_q5sx4, "symmetric Q5 (ggml's Q5_0)");
    interleaved_kernel!(q5, BlockQ5x4, matmul_q5x4, "asymmetric Q5 (ggml's Q5_1)");
}

/// AVX2 kernels for x86-64 hosts (perplexity, calibration, conversion):
/// levels unsigned (`n`, 0..=31) against the signed activation in
/// `vpmaddubsw`, the zero point taken out in the same 16-bit lanes
/// (`Σ n·q − Σ 16·q`, exact for any activation byte), then the reference's
/// float step ([`block_term`]) on each row's integer sum.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use super::*;
    use crate::kernels::matmul::avx2::available;
    use std::arch::x86_64::*;

    /// 16 bytes of packed nibbles under 32 bytes of fifth-bit masks (0xFF
    /// where the bit is set): the 32 levels `n` in column order.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn levels(qs: __m128i, high: __m256i) -> __m256i {
        let both = _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs);
        let nibbles = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
        _mm256_or_si256(nibbles, _mm256_and_si256(high, _mm256_set1_epi8(0x10)))
    }

    /// ggml's 32 fifth bits as byte masks: byte `j` 0xFF where bit `j` is set
    /// (each byte of the word spread to eight lanes, then every bit but the
    /// lane's set, so only a set bit makes the byte all ones).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn row_high_bits(qh: [u8; 4]) -> __m256i {
        let spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(i32::from_le_bytes(qh)), spread);
        let others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
        _mm256_cmpeq_epi8(_mm256_or_si256(bytes, others), _mm256_set1_epi64x(-1))
    }

    /// A row's four bytes of an interleaved block's `qh` (byte `j`, bit `c`:
    /// the flipped fifth bit of value `4c + j`) as byte masks: value `k`
    /// reads byte `k % 4` (the word in every lane) at bit `k / 4`, set where
    /// that bit is clear.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn interleaved_high_bits(transposed: [u8; 4]) -> __m256i {
        let bit_of_value =
            _mm256_set_epi64x(0x8080808040404040u64 as i64, 0x2020202010101010, 0x0808080804040404, 0x0202020201010101);
        let bytes = _mm256_set1_epi32(i32::from_le_bytes(transposed));
        _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit_of_value), _mm256_setzero_si256())
    }

    /// `Σ (n − 16)·q` of 32 levels and an activation block, exactly.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block_sum(levels: __m256i, a: *const BlockQ8Act) -> i32 {
        let q = _mm256_loadu_si256((&raw const (*a).qs).cast());
        // Pairs n·q (|·| ≤ 2·31·128) less pairs 16·q (≤ 2·16·128): inside 16 bits.
        let products = _mm256_maddubs_epi16(levels, q);
        let zero_point = _mm256_maddubs_epi16(_mm256_set1_epi8(16), q);
        let pairs = _mm256_madd_epi16(_mm256_sub_epi16(products, zero_point), _mm256_set1_epi16(1));
        let four = _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
        let two = _mm_add_epi32(four, _mm_shuffle_epi32(four, 0b01_00_11_10));
        _mm_cvtsi128_si32(_mm_add_epi32(two, _mm_shuffle_epi32(two, 0b10_11_00_01)))
    }

    /// One row's blocks against every token: `outputs[b]` the row's sum
    /// with token `b`, each block added in the reference's order and
    /// rounding. `block(k)` gives block `k`'s levels, scale and minimum
    /// (read only for `B`s with one).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn row_against_batch<B: FiveBitBlock>(
        blocks: usize,
        x: &[BlockQ8Act],
        outputs: &mut [f32],
        block: impl Fn(usize) -> (__m256i, f16, f16),
    ) {
        outputs.fill(0.0);
        for k in 0..blocks {
            let (levels, d, m) = block(k);
            for (b, o) in outputs.iter_mut().enumerate() {
                let a = &x[b * blocks + k];
                *o += block_term::<B>(d, m, block_sum(levels, a), a);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows<B: FiveBitBlock>(weights: &[B], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        let (blocks, _, batch) = shape(weights, cols, x, out, 1);
        if batch == 0 {
            return;
        }
        for (row, outputs) in weights.chunks_exact(blocks).zip(out.chunks_exact_mut(batch)) {
            // SAFETY: AVX2 is available (this function's feature); every
            // block index is below `blocks`, inside the row.
            unsafe {
                row_against_batch::<B>(blocks, x, outputs, |k| {
                    let w = &row[k];
                    (levels(_mm_loadu_si128(w.qs().as_ptr().cast()), row_high_bits(w.qh())), w.d(), w.m())
                })
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn interleaved<X: FiveBitBlockX4>(weights: &[X], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        let (blocks, _, batch) = shape(weights, cols, x, out, INTERLEAVE);
        if batch == 0 {
            return;
        }
        for (group, outputs) in weights.chunks_exact(blocks).zip(out.chunks_exact_mut(INTERLEAVE * batch)) {
            for (r, row_outputs) in outputs.chunks_exact_mut(batch).enumerate() {
                // SAFETY: AVX2 is available; every block index is below `blocks`.
                unsafe {
                    row_against_batch::<X::Row>(blocks, x, row_outputs, |k| {
                        let w = &group[k];
                        // Row r's nibbles: bytes 4r .. 4r+4 of each 16-byte column vector.
                        let word = |c: usize| i32::from_le_bytes(w.qs()[16 * c + 4 * r..][..4].try_into().unwrap());
                        let qs = _mm_set_epi32(word(3), word(2), word(1), word(0));
                        let transposed = w.qh()[4 * r..4 * r + 4].try_into().unwrap();
                        (levels(qs, interleaved_high_bits(transposed)), w.d(r), w.m(r))
                    })
                }
            }
        }
    }

    /// Symmetric Q5 matrix (ggml's Q5_0) × int8 activations, AVX2, bit for
    /// bit the reference. Panics on a CPU without AVX2, FMA and F16C.
    pub fn matmul_q5s(weights: &[BlockQ5S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "AVX2 kernel on a CPU without AVX2, FMA and F16C");
        // SAFETY: the CPU has the features (checked just above).
        unsafe { rows(weights, cols, x, out) }
    }

    /// Interleaved symmetric Q5 matrix × int8 activations, AVX2, bit for
    /// bit the reference. Panics on a CPU without AVX2, FMA and F16C.
    pub fn matmul_q5sx4(weights: &[BlockQ5Sx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "AVX2 kernel on a CPU without AVX2, FMA and F16C");
        // SAFETY: the CPU has the features (checked just above).
        unsafe { interleaved(weights, cols, x, out) }
    }

    /// Asymmetric Q5 matrix (ggml's Q5_1) × int8 activations, AVX2, bit for
    /// bit the reference. Panics on a CPU without AVX2, FMA and F16C.
    pub fn matmul_q5(weights: &[BlockQ5], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "AVX2 kernel on a CPU without AVX2, FMA and F16C");
        // SAFETY: the CPU has the features (checked just above).
        unsafe { rows(weights, cols, x, out) }
    }

    /// Interleaved asymmetric Q5 matrix × int8 activations, AVX2, bit for
    /// bit the reference. Panics on a CPU without AVX2, FMA and F16C.
    pub fn matmul_q5x4(weights: &[BlockQ5x4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "AVX2 kernel on a CPU without AVX2, FMA and F16C");
        // SAFETY: the CPU has the features (checked just above).
        unsafe { interleaved(weights, cols, x, out) }
    }
}

#[cfg(test)]
mod tests;
