//! Products of symmetric 5-bit matrices (ggml's Q5_0: [`BlockQ5S`], and its
//! four-row interleaved form [`BlockQ5Sx4`]) with int8 activations.
//!
//! - [`scalar`]: the reference, compiled everywhere: per block
//!   `sum += (d·dₓ)·Σ (n − 16)·q`, blocks in order.
//! - `neon` (aarch64, ARMv8.0: the Raspberry Pi 4's Cortex-A72): widening
//!   multiplies (`smull`, `smlal2`) into 16-bit lanes.
//! - `dotprod` (aarch64 with `sdot`: the Pi 5's Cortex-A76).
//! - `avx2` (x86-64 hosts with AVX2, FMA and F16C): `vpmaddubsw`.
//!
//! Every kernel forms each block's integer sum exactly and turns it into
//! floats with the reference's operations in the reference's order (a
//! multiply by `d·dₓ`, then an add, no fused multiply-add), so the results
//! are the reference's bit for bit, as the AVX2 kernels of the other
//! encodings are ([`super::avx2`] says why that matters).
//!
//! The levels go into the integer products signed, `n − 16` in −16..=15, so
//! there is no zero point to take out afterwards:
//!
//! - row-major blocks keep ggml's bits: the 32 fifth bits (flipped once in a
//!   general register) are spread to bytes by a table lookup (`tbl`) and
//!   tested (`cmtst`) into masks of the values whose level is negative;
//! - interleaved blocks store their fifth bits already flipped and
//!   transposed ([`BlockQ5Sx4`]): one `cmtst` of the 16 bytes against the
//!   column group's bit gives a whole column group's mask, aligned with its
//!   16 value bytes;
//!
//! and then a negative level is its nibble with `0xF0` on top, read as `i8`:
//! one bitwise insert a vector (`bit` of the low nibbles into the mask,
//! `sri` of the high nibbles under it), no subtraction.
//!
//! The interleaved kernels take a batch in tiles of up to [`TILE`] tokens,
//! a group's block unpacked once for the tile; the row-major ones go four
//! rows against one token at a time ([`super::neon::for_row_groups`]), as
//! the other row-major kernels do (row-major Q5_0 matrices are rare: `convert`
//! interleaves every matrix of whole groups of four rows).

use crate::quant::{BlockQ5S, BlockQ5Sx4, BlockQ8Act, GROUP, INTERLEAVE};

/// Tokens of a batch the interleaved kernels multiply against one group's
/// block at a time.
pub const TILE: usize = 4;

/// Checks a product's shape against the [`crate::kernels::MatmulQuantized`]
/// contract for blocks of 32 values that hold `rows_per_block` rows
/// (1, or [`INTERLEAVE`]); returns (blocks a row, row groups, batch).
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
    use crate::kernels::matmul::scalar::{f16_to_f32, matmul_interleaved};

    /// Blocks of a group's rows put back in row order at a time (on the
    /// stack: 4 × 64 blocks, 5.5 KiB).
    const STAGED: usize = 64;

    /// A block's 32 signed levels `n − 16`.
    #[inline(always)]
    pub fn signed_levels(block: &BlockQ5S) -> [i8; GROUP] {
        std::array::from_fn(|j| block.level(j) as i8 - 16)
    }

    /// `sum` plus the dot product of one Q5S row with one activation, block
    /// by block: `(d·dₓ)·Σ (n − 16)·q`.
    pub fn dot_q5s_q8_from(mut sum: f32, row: &[BlockQ5S], x: &[BlockQ8Act]) -> f32 {
        for (w, a) in row.iter().zip(x) {
            let levels = signed_levels(w);
            let mut isum = 0i32;
            for (&l, &q) in levels.iter().zip(&a.qs) {
                isum += l as i32 * q as i32;
            }
            sum += f16_to_f32(w.d) * a.d * isum as f32;
        }
        sum
    }

    /// Symmetric Q5 matrix × int8 activations.
    pub fn matmul_q5s(weights: &[BlockQ5S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        let (blocks, _, batch) = shape(weights, cols, x, out, 1);
        if batch == 0 {
            return;
        }
        for (row, outputs) in weights.chunks_exact(blocks).zip(out.chunks_exact_mut(batch)) {
            for (o, activation) in outputs.iter_mut().zip(x.chunks_exact(blocks)) {
                *o = dot_q5s_q8_from(0.0, row, activation);
            }
        }
    }

    /// Interleaved symmetric Q5 matrix × int8 activations: pieces of each
    /// group put back in row order and multiplied by the row-major reference.
    pub fn matmul_q5sx4(weights: &[BlockQ5Sx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        matmul_interleaved::<_, GROUP, STAGED>(weights, cols, x, out, dot_q5s_q8_from)
    }
}

/// What the ARMv8.0 and `sdot` kernels share: unpacking levels, the float
/// step, the loops over rows and tiles of tokens.
#[cfg(target_arch = "aarch64")]
mod arm {
    pub(super) use super::*;
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

    /// Bit `c` of every byte, for `cmtst` with the fifth bits.
    const fn bit_masks() -> [[u8; 16]; 8] {
        let mut masks = [[0u8; 16]; 8];
        let mut c = 0;
        while c < 8 {
            masks[c] = [1 << c; 16];
            c += 1;
        }
        masks
    }
    const BIT_MASKS: [[u8; 16]; 8] = bit_masks();

    /// The 32 signed levels of four rows' interleaved block, eight vectors
    /// of four rows × four columns: column groups 0–3 from the low nibbles,
    /// 4–7 from the high ones, each under its mask of negative levels
    /// (`cmtst` of the transposed, flipped fifth bits with bit `c`).
    ///
    /// # Safety
    /// `block` points at a readable block.
    #[inline(always)]
    pub(super) unsafe fn interleaved_levels(block: *const BlockQ5Sx4) -> [int8x16_t; 8] {
        let qh = vld1q_u8((*block).qh.as_ptr());
        let qs = vld1q_u8_x4((*block).qs.as_ptr());
        let qs = [qs.0, qs.1, qs.2, qs.3];
        let low_nibble = vdupq_n_u8(0x0F);
        let mask = |c: usize| vtstq_u8(qh, vld1q_u8(BIT_MASKS[c].as_ptr()));
        [
            low_levels(mask(0), qs[0], low_nibble),
            low_levels(mask(1), qs[1], low_nibble),
            low_levels(mask(2), qs[2], low_nibble),
            low_levels(mask(3), qs[3], low_nibble),
            high_levels(mask(4), qs[0]),
            high_levels(mask(5), qs[1]),
            high_levels(mask(6), qs[2]),
            high_levels(mask(7), qs[3]),
        ]
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
    pub(super) unsafe fn row_levels(block: *const BlockQ5S) -> (int8x16_t, int8x16_t) {
        let negative = !u32::from_le_bytes((*block).qh);
        let bits = vreinterpretq_u8_u32(vdupq_n_u32(negative));
        let select = vld1q_u8(BIT_OF_VALUE.as_ptr());
        let low_mask = vtstq_u8(vqtbl1q_u8(bits, vld1q_u8(SPREAD_LOW.as_ptr())), select);
        let high_mask = vtstq_u8(vqtbl1q_u8(bits, vld1q_u8(SPREAD_HIGH.as_ptr())), select);
        let qs = vld1q_u8((*block).qs.as_ptr());
        (low_levels(low_mask, qs, vdupq_n_u8(0x0F)), high_levels(high_mask, qs))
    }

    /// The float step of a block for four rows, in the reference's order:
    /// `acc + (d·dₓ)·Σ`, each product and the sum rounded on its own.
    #[inline(always)]
    pub(super) unsafe fn accumulate(acc: float32x4_t, isum: int32x4_t, d: float32x4_t, dx: f32) -> float32x4_t {
        vaddq_f32(acc, vmulq_f32(vmulq_n_f32(d, dx), vcvtq_f32_s32(isum)))
    }

    /// Four rows' f16 scales, wherever they are, as f32 lanes.
    #[inline(always)]
    pub(super) unsafe fn row_scales(rows: [*const BlockQ5S; ROWS]) -> float32x4_t {
        let bits = rows.map(|r| (*r).d.to_bits());
        widen_f16(vld1_u16(bits.as_ptr()))
    }

    /// One interleaved group's block against up to [`TILE`] tokens.
    pub(super) trait GroupKernel {
        /// The four rows' sums of `blocks` blocks from `group` against
        /// each of `N` activations (`x[t]`, `blocks` blocks each).
        ///
        /// # Safety
        /// `group` and every `x[t]` point at `blocks` readable blocks, and
        /// the CPU has the kernel's features.
        unsafe fn dot<const N: usize>(
            group: *const BlockQ5Sx4,
            blocks: usize,
            x: [*const BlockQ8Act; N],
        ) -> [float32x4_t; N];
    }

    /// Every group of `weights` against every token of `x` in tiles of up
    /// to [`TILE`], row `4g + r` against token `b` into `out[(4g + r)·batch + b]`.
    ///
    /// # Safety
    /// The CPU has `K`'s features.
    #[inline(always)]
    pub(super) unsafe fn matmul_groups<K: GroupKernel>(
        weights: &[BlockQ5Sx4],
        cols: usize,
        x: &[BlockQ8Act],
        out: &mut [f32],
    ) {
        let (blocks, _, batch) = shape(weights, cols, x, out, INTERLEAVE);
        if batch == 0 {
            return;
        }
        let activation = |b: usize| x[b * blocks..].as_ptr();
        for (group, outputs) in weights.chunks_exact(blocks).zip(out.chunks_exact_mut(INTERLEAVE * batch)) {
            let w = group.as_ptr();
            let mut start = 0;
            while start < batch {
                let tile = (batch - start).min(TILE);
                let at = |t: usize| activation(start + t);
                // SAFETY: `w` is a whole group of `blocks` blocks, each token
                // `start + t < batch` has `blocks` blocks (both checked by
                // `shape`), and the caller promises the CPU.
                let sums = unsafe {
                    match tile {
                        1 => lanes(K::dot::<1>(w, blocks, [at(0)])),
                        2 => lanes(K::dot::<2>(w, blocks, [at(0), at(1)])),
                        3 => lanes(K::dot::<3>(w, blocks, [at(0), at(1), at(2)])),
                        _ => lanes(K::dot::<TILE>(w, blocks, [at(0), at(1), at(2), at(3)])),
                    }
                };
                if batch == 1 {
                    outputs.copy_from_slice(&sums[0]);
                } else {
                    for (r, row) in outputs.chunks_exact_mut(batch).enumerate() {
                        for (o, sums) in row[start..start + tile].iter_mut().zip(&sums) {
                            *o = sums[r];
                        }
                    }
                }
                start += tile;
            }
        }
    }

    /// The lanes of up to [`TILE`] vectors of four row sums.
    #[inline(always)]
    fn lanes<const N: usize>(sums: [float32x4_t; N]) -> [[f32; INTERLEAVE]; TILE] {
        let mut out = [[0f32; INTERLEAVE]; TILE];
        for (lanes, &v) in out.iter_mut().zip(&sums) {
            // SAFETY: `lanes` is four writable f32; NEON is part of every aarch64 target.
            unsafe { vst1q_f32(lanes.as_mut_ptr(), v) };
        }
        out
    }
}

/// ARMv8.0 NEON kernels (no `sdot`): the Raspberry Pi 4's Cortex-A72.
#[cfg(target_arch = "aarch64")]
pub mod neon {
    use super::arm::*;

    /// Eight four-byte column groups of an activation block, each broadcast
    /// to a whole register (two `ld4r`).
    ///
    /// # Safety
    /// `a` points at a readable activation block.
    #[inline(always)]
    unsafe fn broadcasts(a: *const BlockQ8Act) -> [int8x16_t; 8] {
        let q = (*a).qs.as_ptr().cast::<i32>();
        let (first, second) = (vld4q_dup_s32(q), vld4q_dup_s32(q.add(4)));
        [first.0, first.1, first.2, first.3, second.0, second.1, second.2, second.3].map(|v| vreinterpretq_s8_s32(v))
    }

    /// The four rows' `Σ (n − 16)·q` over a block's eight column groups:
    /// products of rows 0–1 (low halves) and 2–3 (high halves) summed in
    /// 16-bit lanes, eight a lane (|(n − 16)·q| ≤ 16·128 = 2¹¹, eight ≤ 2¹⁴),
    /// widened pairwise (sixteen could reach 2¹⁵), then one pairwise add
    /// leaves `[r0, r1, r2, r3]`.
    #[inline(always)]
    unsafe fn sum32(w: &[int8x16_t; 8], b: &[int8x16_t; 8]) -> int32x4_t {
        let sum: int32x4_t;
        asm!(
            "smull {lo:v}.8h, {w0:v}.8b, {b0:v}.8b",
            "smull2 {hi:v}.8h, {w0:v}.16b, {b0:v}.16b",
            "smlal {lo:v}.8h, {w1:v}.8b, {b1:v}.8b",
            "smlal2 {hi:v}.8h, {w1:v}.16b, {b1:v}.16b",
            "smlal {lo:v}.8h, {w2:v}.8b, {b2:v}.8b",
            "smlal2 {hi:v}.8h, {w2:v}.16b, {b2:v}.16b",
            "smlal {lo:v}.8h, {w3:v}.8b, {b3:v}.8b",
            "smlal2 {hi:v}.8h, {w3:v}.16b, {b3:v}.16b",
            "smlal {lo:v}.8h, {w4:v}.8b, {b4:v}.8b",
            "smlal2 {hi:v}.8h, {w4:v}.16b, {b4:v}.16b",
            "smlal {lo:v}.8h, {w5:v}.8b, {b5:v}.8b",
            "smlal2 {hi:v}.8h, {w5:v}.16b, {b5:v}.16b",
            "smlal {lo:v}.8h, {w6:v}.8b, {b6:v}.8b",
            "smlal2 {hi:v}.8h, {w6:v}.16b, {b6:v}.16b",
            "smlal {lo:v}.8h, {w7:v}.8b, {b7:v}.8b",
            "smlal2 {hi:v}.8h, {w7:v}.16b, {b7:v}.16b",
            "saddlp {lo:v}.4s, {lo:v}.8h",
            "saddlp {hi:v}.4s, {hi:v}.8h",
            "addp {sum:v}.4s, {lo:v}.4s, {hi:v}.4s",
            sum = out(vreg) sum,
            lo = out(vreg) _,
            hi = out(vreg) _,
            w0 = in(vreg) w[0], w1 = in(vreg) w[1], w2 = in(vreg) w[2], w3 = in(vreg) w[3],
            w4 = in(vreg) w[4], w5 = in(vreg) w[5], w6 = in(vreg) w[6], w7 = in(vreg) w[7],
            b0 = in(vreg) b[0], b1 = in(vreg) b[1], b2 = in(vreg) b[2], b3 = in(vreg) b[3],
            b4 = in(vreg) b[4], b5 = in(vreg) b[5], b6 = in(vreg) b[6], b7 = in(vreg) b[7],
            options(pure, nomem, nostack, preserves_flags),
        );
        sum
    }

    struct Interleaved;

    impl GroupKernel for Interleaved {
        #[inline(always)]
        unsafe fn dot<const N: usize>(
            group: *const BlockQ5Sx4,
            blocks: usize,
            x: [*const BlockQ8Act; N],
        ) -> [float32x4_t; N] {
            let mut acc = [vdupq_n_f32(0.0); N];
            for k in 0..blocks {
                let block = group.add(k);
                let levels = interleaved_levels(block);
                let d = widen_f16(vld1_u16((*block).d.as_ptr().cast()));
                for t in 0..N {
                    let a = x[t].add(k);
                    acc[t] = accumulate(acc[t], sum32(&levels, &broadcasts(a)), d, (*a).d);
                }
            }
            acc
        }
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
    unsafe fn dot4(rows: [*const BlockQ5S; ROWS], x: *const BlockQ8Act, blocks: usize) -> float32x4_t {
        let mut acc = vdupq_n_f32(0.0);
        for k in 0..blocks {
            let a = x.add(k);
            let q = vld1q_s8_x2((*a).qs.as_ptr());
            let at = rows.map(|r| r.add(k));
            let s = at.map(|r| row_sum(row_levels(r), q));
            // Each row's four partial sums to one lane: [r0, r1, r2, r3].
            let isum = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
            acc = accumulate(acc, isum, row_scales(at), (*a).d);
        }
        acc
    }

    /// Symmetric Q5 matrix × int8 activations, ARMv8.0.
    pub fn matmul_q5s(weights: &[BlockQ5S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        // SAFETY: `for_row_groups` hands over pointers to `blocks` blocks;
        // NEON is part of every aarch64 target.
        for_row_groups(weights, cols, x, out, |rows, a, blocks| unsafe { dot4(rows, a, blocks) })
    }

    /// Interleaved symmetric Q5 matrix × int8 activations, ARMv8.0.
    pub fn matmul_q5sx4(weights: &[BlockQ5Sx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { matmul_groups::<Interleaved>(weights, cols, x, out) }
    }
}

/// `sdot` kernels (ARMv8.2's dot-product extension): the Raspberry Pi 5's Cortex-A76.
#[cfg(target_arch = "aarch64")]
pub mod dotprod {
    use super::arm::*;
    use crate::kernels::matmul::dotprod::available;

    /// The four rows' `Σ (n − 16)·q` over 32 columns: eight `sdot`s by lane,
    /// column group `c` (four rows × columns `4c .. 4c+4`) against lane `c`
    /// of the activation's values.
    ///
    /// # Safety
    /// The CPU has the dot-product extension.
    #[target_feature(enable = "dotprod")]
    #[inline]
    unsafe fn sum32(w: &[int8x16_t; 8], q: int8x16x2_t) -> int32x4_t {
        let mut sum = vdupq_n_s32(0);
        asm!(
            "sdot {sum:v}.4s, {w0:v}.16b, {q0:v}.4b[0]",
            "sdot {sum:v}.4s, {w1:v}.16b, {q0:v}.4b[1]",
            "sdot {sum:v}.4s, {w2:v}.16b, {q0:v}.4b[2]",
            "sdot {sum:v}.4s, {w3:v}.16b, {q0:v}.4b[3]",
            "sdot {sum:v}.4s, {w4:v}.16b, {q1:v}.4b[0]",
            "sdot {sum:v}.4s, {w5:v}.16b, {q1:v}.4b[1]",
            "sdot {sum:v}.4s, {w6:v}.16b, {q1:v}.4b[2]",
            "sdot {sum:v}.4s, {w7:v}.16b, {q1:v}.4b[3]",
            sum = inout(vreg) sum,
            w0 = in(vreg) w[0], w1 = in(vreg) w[1], w2 = in(vreg) w[2], w3 = in(vreg) w[3],
            w4 = in(vreg) w[4], w5 = in(vreg) w[5], w6 = in(vreg) w[6], w7 = in(vreg) w[7],
            q0 = in(vreg) q.0, q1 = in(vreg) q.1,
            options(pure, nomem, nostack, preserves_flags),
        );
        sum
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

    struct Interleaved;

    impl GroupKernel for Interleaved {
        #[target_feature(enable = "dotprod")]
        #[inline]
        unsafe fn dot<const N: usize>(
            group: *const BlockQ5Sx4,
            blocks: usize,
            x: [*const BlockQ8Act; N],
        ) -> [float32x4_t; N] {
            let mut acc = [vdupq_n_f32(0.0); N];
            for k in 0..blocks {
                let block = group.add(k);
                let levels = interleaved_levels(block);
                let d = widen_f16(vld1_u16((*block).d.as_ptr().cast()));
                for t in 0..N {
                    let a = x[t].add(k);
                    acc[t] = accumulate(acc[t], sum32(&levels, vld1q_s8_x2((*a).qs.as_ptr())), d, (*a).d);
                }
            }
            acc
        }
    }

    /// Four row-major rows · one activation.
    ///
    /// # Safety
    /// Every row and `x` point at `blocks` readable blocks; the CPU has the
    /// dot-product extension.
    #[target_feature(enable = "dotprod")]
    #[inline]
    unsafe fn dot4(rows: [*const BlockQ5S; ROWS], x: *const BlockQ8Act, blocks: usize) -> float32x4_t {
        let mut acc = vdupq_n_f32(0.0);
        for k in 0..blocks {
            let a = x.add(k);
            let q = vld1q_s8_x2((*a).qs.as_ptr());
            let at = rows.map(|r| r.add(k));
            let s = at.map(|r| row_sum(row_levels(r), q));
            // Each row's four partial sums to one lane: [r0, r1, r2, r3].
            let isum = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
            acc = accumulate(acc, isum, row_scales(at), (*a).d);
        }
        acc
    }

    #[target_feature(enable = "dotprod")]
    fn q5s(weights: &[BlockQ5S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        // SAFETY: `for_row_groups` hands over pointers to `blocks` blocks,
        // and this function runs only where the CPU has the extension.
        for_row_groups(weights, cols, x, out, |rows, a, blocks| unsafe { dot4(rows, a, blocks) })
    }

    /// Symmetric Q5 matrix × int8 activations, with `sdot`. Panics on a
    /// CPU without the dot-product extension.
    pub fn matmul_q5s(weights: &[BlockQ5S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: the CPU has the dot-product extension (checked just above).
        unsafe { q5s(weights, cols, x, out) }
    }

    /// Interleaved symmetric Q5 matrix × int8 activations, with `sdot`.
    /// Panics on a CPU without the dot-product extension.
    pub fn matmul_q5sx4(weights: &[BlockQ5Sx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: the CPU has the dot-product extension (checked just above).
        unsafe { matmul_groups::<Interleaved>(weights, cols, x, out) }
    }
}

/// AVX2 kernels for x86-64 hosts (perplexity, calibration, conversion):
/// levels unsigned (`n`, 0..=31) against the signed activation in
/// `vpmaddubsw`, the zero point taken out in the same 16-bit lanes
/// (`Σ n·q − Σ 16·q`, exact for any activation byte), then the reference's
/// float step on each row's integer sum.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use super::*;
    use crate::kernels::matmul::avx2::available;
    use crate::kernels::matmul::scalar::f16_to_f32;
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

    /// A row's four bytes of [`BlockQ5Sx4::qh`] (byte `j`, bit `c`: the
    /// flipped fifth bit of value `4c + j`) as byte masks: value `k` reads
    /// byte `k % 4` (the word in every lane) at bit `k / 4`, set where that
    /// bit is clear.
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
    /// rounding. `block(k)` gives block `k`'s levels and scale.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn row_against_batch(
        blocks: usize,
        x: &[BlockQ8Act],
        outputs: &mut [f32],
        block: impl Fn(usize) -> (__m256i, f32),
    ) {
        outputs.fill(0.0);
        for k in 0..blocks {
            let (levels, d) = block(k);
            for (b, o) in outputs.iter_mut().enumerate() {
                let a = &x[b * blocks + k];
                *o += d * a.d * block_sum(levels, a) as f32;
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn q5s(weights: &[BlockQ5S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        let (blocks, _, batch) = shape(weights, cols, x, out, 1);
        if batch == 0 {
            return;
        }
        for (row, outputs) in weights.chunks_exact(blocks).zip(out.chunks_exact_mut(batch)) {
            // SAFETY: AVX2 is available (this function's feature); every
            // block index is below `blocks`, inside the row.
            unsafe {
                row_against_batch(blocks, x, outputs, |k| {
                    let w = &row[k];
                    (levels(_mm_loadu_si128(w.qs.as_ptr().cast()), row_high_bits(w.qh)), f16_to_f32(w.d))
                })
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn q5sx4(weights: &[BlockQ5Sx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        let (blocks, _, batch) = shape(weights, cols, x, out, INTERLEAVE);
        if batch == 0 {
            return;
        }
        for (group, outputs) in weights.chunks_exact(blocks).zip(out.chunks_exact_mut(INTERLEAVE * batch)) {
            for (r, row_outputs) in outputs.chunks_exact_mut(batch).enumerate() {
                // SAFETY: AVX2 is available; every block index is below `blocks`.
                unsafe {
                    row_against_batch(blocks, x, row_outputs, |k| {
                        let w = &group[k];
                        // Row r's nibbles: bytes 4r .. 4r+4 of each 16-byte column vector.
                        let word = |c: usize| i32::from_le_bytes(w.qs[16 * c + 4 * r..][..4].try_into().unwrap());
                        let qs = _mm_set_epi32(word(3), word(2), word(1), word(0));
                        let transposed = w.qh[4 * r..4 * r + 4].try_into().unwrap();
                        (levels(qs, interleaved_high_bits(transposed)), f16_to_f32(w.d[r]))
                    })
                }
            }
        }
    }

    /// Symmetric Q5 matrix × int8 activations, AVX2, bit for bit the
    /// reference. Panics on a CPU without AVX2, FMA and F16C.
    pub fn matmul_q5s(weights: &[BlockQ5S], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "AVX2 kernel on a CPU without AVX2, FMA and F16C");
        // SAFETY: the CPU has the features (checked just above).
        unsafe { q5s(weights, cols, x, out) }
    }

    /// Interleaved symmetric Q5 matrix × int8 activations, AVX2, bit for
    /// bit the reference. Panics on a CPU without AVX2, FMA and F16C.
    pub fn matmul_q5sx4(weights: &[BlockQ5Sx4], cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        assert!(available(), "AVX2 kernel on a CPU without AVX2, FMA and F16C");
        // SAFETY: the CPU has the features (checked just above).
        unsafe { q5sx4(weights, cols, x, out) }
    }
}

#[cfg(test)]
mod tests;
