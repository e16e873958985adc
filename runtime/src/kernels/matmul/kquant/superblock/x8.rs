//! Products of eight-row interleaved Q4_K matrices ([`BlockQ4Kx8`]) with
//! Q8_K activations, for the Pi cores' decode steps: the integer sums and
//! float steps of [`super::scalar`]'s reference (`matmul_q4kx8`), bit for
//! bit.
//!
//! A [`BlockQ4Kx8`] byte holds two rows' levels at the same column, so
//! both multiply the same activation value:
//!
//! - `sdot` (the Pi 5's Cortex-A76): the masked low nibbles give rows
//!   0–3's `L = Σ l·q`, the raw bytes (`l + 16·(h − 8)` as `i8`) give
//!   `B = L + 16·Σ (h − 8)·q`, so rows 4–7 take `B − L` and no unpacking
//!   at all: 16 `sdot`s and 8 `and`s a sub-block of eight rows, where the
//!   four-row layout takes 16 `sdot`s and 16 nibble operations. Their
//!   scaled sums are sixteen times the reference's, with `128·Σⱼ scaleⱼ·Σqⱼ`
//!   added for the 8 taken off each level, and divided exactly at the end.
//! - ARMv8.0 (the Pi 4's Cortex-A72): both halves' levels (`and`, and an
//!   arithmetic shift for `h − 8`) against one set of `ld4r` broadcasts.
//!
//! The int32 sums stay below 2³¹: the reference's are below 2²⁵, and the
//! `sdot` kernel's for rows 4–7 are sixteen times theirs.

use crate::quant::{BlockQ4Kx8, BlockQ8K};

mod arm {
    pub(super) use super::*;
    pub(super) use crate::kernels::matmul::kquant::interleaved::arm::*;
    pub(super) use crate::kernels::matmul::kquant::superblock::neon::{
        load64_upper, minimum_terms, q4k_head, q4k_step, settle_int,
    };
    pub(super) use crate::kernels::matmul::kquant::superblock::shape;
    pub(super) use crate::quant::MAX_ROWS;

    /// `Σⱼ (2^SHIFT·scaleⱼ)·Σqⱼ` of a header's scales against the
    /// activation's eight sums: what rows 4–7's levels, read less 8, lose
    /// (`SHIFT` = 3), or sixteen times that (7). `128·scale` ≤ 8064 fits
    /// the 16-bit lanes the products widen from.
    ///
    /// # Safety
    /// None beyond NEON, which every aarch64 core has.
    #[inline(always)]
    pub unsafe fn offset<const SHIFT: i32>(scales: [uint8x16_t; 2], sums: int16x8_t) -> int32x4_t {
        let shifted = |v: uint8x16_t| {
            [
                vreinterpretq_s16_u16(vshll_n_u8::<SHIFT>(vget_low_u8(v))),
                vreinterpretq_s16_u16(vshll_high_n_u8::<SHIFT>(v)),
            ]
        };
        let acc = minimum_terms::<0>(vdupq_n_s32(0), shifted(scales[0]), sums);
        minimum_terms::<4>(acc, shifted(scales[1]), sums)
    }

    /// Sub-blocks `2c` and `2c + 1`'s scales of four rows (lanes `[r]`)
    /// from the scales of sub-blocks `4(c / 2) ..` (lanes `[j][r]`), `UPPER`
    /// for odd `c`.
    ///
    /// # Safety
    /// None beyond NEON, which every aarch64 core has.
    #[inline(always)]
    pub unsafe fn scale_pair<const UPPER: bool>(scales: uint8x16_t) -> [int32x4_t; 2] {
        let pair = if UPPER { vmovl_high_u8(scales) } else { vmovl_u8(vget_low_u8(scales)) };
        [vmovl_u16(vget_low_u16(pair)), vmovl_high_u16(pair)].map(|v| vreinterpretq_s32_u32(v))
    }

    /// Every group against every activation, one activation at a time,
    /// `dot` giving rows 0–3's and 4–7's sums.
    ///
    /// # Safety
    /// `dot` is one of this module's, whose CPU features the caller checked.
    #[inline(always)]
    pub unsafe fn matmul(
        weights: &[BlockQ4Kx8],
        cols: usize,
        x: &[BlockQ8K],
        out: &mut [f32],
        dot: impl Fn(*const BlockQ4Kx8, usize, *const BlockQ8K) -> [float32x4_t; 2],
    ) {
        let (superblocks, batch) = shape(weights, MAX_ROWS, cols, x, out);
        for (group, outputs) in weights.chunks_exact(superblocks).zip(out.chunks_exact_mut(MAX_ROWS * batch)) {
            for (b, activation) in x.chunks_exact(superblocks).enumerate() {
                let [low, high] = dot(group.as_ptr(), superblocks, activation.as_ptr());
                let mut lanes = [0f32; MAX_ROWS];
                // SAFETY: `lanes` is eight writable f32.
                unsafe {
                    vst1q_f32(lanes.as_mut_ptr(), low);
                    vst1q_f32(lanes.as_mut_ptr().add(4), high);
                }
                if batch == 1 {
                    outputs.copy_from_slice(&lanes);
                } else {
                    for (r, lane) in lanes.into_iter().enumerate() {
                        outputs[r * batch + b] = lane;
                    }
                }
            }
        }
    }
}

/// `sdot`: the low nibbles' and the raw bytes' products.
pub mod dotprod {
    use super::arm::*;
    use crate::kernels::matmul::dotprod::available;
    use crate::kernels::matmul::kquant::interleaved::neon::load128_next;
    use crate::kernels::matmul::kquant::superblock::dotprod::sdots;

    /// Sub-blocks `2c` and `2c + 1` of eight rows against their 64 values at `*q`
    /// (a macro: as a function LLVM would not inline it into `dot`).
    macro_rules! pair {
        ($w:expr, $q:expr, $scaled_low:expr, $scaled_high:expr, ($l0:expr, $l1:expr, $h0:expr, $h1:expr)) => {{
            let nibble = vdupq_n_u8(15);
            let values = load64_upper::<true>($q).map(|v| vreinterpretq_s8_u8(v));
            for (half, (sl, sh)) in [($l0, $h0), ($l1, $h1)].into_iter().enumerate() {
                let bytes = load128_next($w);
                let levels = bytes.map(|v| vreinterpretq_s8_u8(vandq_u8(v, nibble)));
                let raw = bytes.map(|v| vreinterpretq_s8_u8(v));
                let l = sdots(&levels, &values[2 * half..][..2]);
                let b = sdots(&raw, &values[2 * half..][..2]);
                $scaled_low = vmlaq_s32($scaled_low, l, sl);
                $scaled_high = vmlaq_s32($scaled_high, b, sh);
                $scaled_high = vmlsq_s32($scaled_high, l, sh);
                settle_int(&mut $scaled_low);
                settle_int(&mut $scaled_high);
            }
        }};
    }

    /// One group's eight rows against one activation: rows 0–3's and 4–7's sums.
    ///
    /// # Safety
    /// `group` points at `superblocks` readable blocks, `x` at as many, and
    /// the CPU has the dot-product extension.
    #[target_feature(enable = "dotprod")]
    unsafe fn dot(group: *const BlockQ4Kx8, superblocks: usize, x: *const BlockQ8K) -> [float32x4_t; 2] {
        let (mut acc_low, mut acc_high) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        let mut w = group.cast::<u8>();
        for s in 0..superblocks {
            let a = x.add(s);
            let sums = vld1q_s16((*a).sums.as_ptr());
            let low = q4k_head::<false>(&mut w, a);
            let high = q4k_head::<false>(&mut w, a);
            // 16 × the high rows' sums: their levels are stored less 8.
            let mut scaled_high = offset::<7>(high.scales, sums);
            let mut scaled_low = vdupq_n_s32(0);
            let (sl, sh) = (
                [widen_unsigned(low.scales[0]), widen_unsigned(low.scales[1])],
                [widen_unsigned(high.scales[0]), widen_unsigned(high.scales[1])],
            );
            let mut q = (*a).qs.as_ptr().cast::<u8>();
            pair!(&mut w, &mut q, scaled_low, scaled_high, (sl[0][0], sl[0][1], sh[0][0], sh[0][1]));
            pair!(&mut w, &mut q, scaled_low, scaled_high, (sl[0][2], sl[0][3], sh[0][2], sh[0][3]));
            pair!(&mut w, &mut q, scaled_low, scaled_high, (sl[1][0], sl[1][1], sh[1][0], sh[1][1]));
            pair!(&mut w, &mut q, scaled_low, scaled_high, (sl[1][2], sl[1][3], sh[1][2], sh[1][3]));
            let dx = (*a).d;
            acc_low = q4k_step(acc_low, &low, scaled_low, dx);
            acc_high = q4k_step(acc_high, &high, vshrq_n_s32::<4>(scaled_high), dx);
        }
        [acc_low, acc_high]
    }

    /// Eight-row interleaved Q4_K matrix × Q8_K activations. Panics on a
    /// CPU without the dot-product extension.
    pub fn matmul_q4kx8(weights: &[BlockQ4Kx8], cols: usize, x: &[BlockQ8K], out: &mut [f32]) {
        assert!(available(), "dotprod kernel on a CPU without the dot-product extension");
        // SAFETY: the CPU has the extension (checked just above), and
        // `matmul` hands `dot` whole groups and activations (`shape`).
        unsafe { matmul(weights, cols, x, out, |w, n, a| dot(w, n, a)) }
    }
}

/// ARMv8.0: both nibbles' products against one set of broadcasts.
pub mod neon {
    use super::arm::*;
    use crate::kernels::matmul::kquant::interleaved::neon::load128_next;

    /// Rows 0–3's (`low`) and 4–7's (`high`) `Σ level·q` over the 32
    /// values at `*q`, against one set of `ld4r` broadcasts; `*q` moves
    /// past them. Eight products a 16-bit lane, then one pairwise add in 16
    /// bits: |l·q| ≤ 15·127 and |(h − 8)·q| ≤ 8·127 ([`BlockQ8K`]'s
    /// values), so sixteen stay below 2¹⁵.
    ///
    /// # Safety
    /// `*q` points at 32 readable values.
    #[inline(always)]
    unsafe fn sum32_pair(low: &[int8x16_t; 8], high: &[int8x16_t; 8], q: &mut *const i8) -> (int32x4_t, int32x4_t) {
        let (sum_low, sum_high): (int32x4_t, int32x4_t);
        asm!(
            "ld4r {{v28.4s, v29.4s, v30.4s, v31.4s}}, [{q}], #16",
            widening_products!(start "a" "b"; "l0" "v28", "l1" "v29", "l2" "v30", "l3" "v31"),
            widening_products!(start "c" "e"; "h0" "v28", "h1" "v29", "h2" "v30", "h3" "v31"),
            "ld4r {{v28.4s, v29.4s, v30.4s, v31.4s}}, [{q}], #16",
            widening_products!(more "a" "b"; "l4" "v28", "l5" "v29", "l6" "v30", "l7" "v31"),
            widening_products!(more "c" "e"; "h4" "v28", "h5" "v29", "h6" "v30", "h7" "v31"),
            "addp {a:v}.8h, {a:v}.8h, {b:v}.8h",
            "saddlp {sl:v}.4s, {a:v}.8h",
            "addp {c:v}.8h, {c:v}.8h, {e:v}.8h",
            "saddlp {sh:v}.4s, {c:v}.8h",
            q = inout(reg) *q,
            sl = out(vreg) sum_low,
            sh = out(vreg) sum_high,
            a = out(vreg) _, b = out(vreg) _, c = out(vreg) _, e = out(vreg) _,
            out("v28") _, out("v29") _, out("v30") _, out("v31") _,
            l0 = in(vreg) low[0], l1 = in(vreg) low[1], l2 = in(vreg) low[2], l3 = in(vreg) low[3],
            l4 = in(vreg) low[4], l5 = in(vreg) low[5], l6 = in(vreg) low[6], l7 = in(vreg) low[7],
            h0 = in(vreg) high[0], h1 = in(vreg) high[1], h2 = in(vreg) high[2], h3 = in(vreg) high[3],
            h4 = in(vreg) high[4], h5 = in(vreg) high[5], h6 = in(vreg) high[6], h7 = in(vreg) high[7],
            options(pure, readonly, nostack, preserves_flags),
        );
        (sum_low, sum_high)
    }

    /// One group's eight rows against one activation: rows 0–3's and 4–7's sums.
    ///
    /// # Safety
    /// `group` points at `superblocks` readable blocks and `x` at as many.
    unsafe fn dot(group: *const BlockQ4Kx8, superblocks: usize, x: *const BlockQ8K) -> [float32x4_t; 2] {
        let (mut acc_low, mut acc_high) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        let mut w = group.cast::<u8>();
        let nibble = vdupq_n_u8(15);
        for s in 0..superblocks {
            let a = x.add(s);
            let sums = vld1q_s16((*a).sums.as_ptr());
            let low = q4k_head::<true>(&mut w, a);
            let high = q4k_head::<true>(&mut w, a);
            // The high rows' levels are stored less 8.
            let mut scaled_high = offset::<3>(high.scales, sums);
            let mut scaled_low = vdupq_n_s32(0);
            let mut q = (*a).qs.as_ptr();
            let mut sub = |(s_low, s_high): (int32x4_t, int32x4_t)| {
                let bytes = load128_next(&mut w);
                let levels = bytes.map(|v| vreinterpretq_s8_u8(vandq_u8(v, nibble)));
                let highs = bytes.map(|v| vshrq_n_s8::<4>(vreinterpretq_s8_u8(v)));
                let (l, h) = sum32_pair(&levels, &highs, &mut q);
                scaled_low = vmlaq_s32(scaled_low, l, s_low);
                scaled_high = vmlaq_s32(scaled_high, h, s_high);
                settle_int(&mut scaled_low);
                settle_int(&mut scaled_high);
            };
            // Sub-blocks 2c and 2c + 1's scales, widened where they are used
            // (sixteen widened vectors would not stay in registers), the
            // four pairs spelled out so that their scales are picked at
            // compile time.
            let mut pair = |(low, high): ([int32x4_t; 2], [int32x4_t; 2])| {
                sub((low[0], high[0]));
                sub((low[1], high[1]));
            };
            pair((scale_pair::<false>(low.scales[0]), scale_pair::<false>(high.scales[0])));
            pair((scale_pair::<true>(low.scales[0]), scale_pair::<true>(high.scales[0])));
            pair((scale_pair::<false>(low.scales[1]), scale_pair::<false>(high.scales[1])));
            pair((scale_pair::<true>(low.scales[1]), scale_pair::<true>(high.scales[1])));
            let dx = (*a).d;
            acc_low = q4k_step(acc_low, &low, scaled_low, dx);
            acc_high = q4k_step(acc_high, &high, scaled_high, dx);
        }
        [acc_low, acc_high]
    }

    /// Eight-row interleaved Q4_K matrix × Q8_K activations.
    pub fn matmul_q4kx8(weights: &[BlockQ4Kx8], cols: usize, x: &[BlockQ8K], out: &mut [f32]) {
        // SAFETY: `dot` needs only NEON, and `matmul` hands it whole groups
        // and activations (`shape`).
        unsafe { matmul(weights, cols, x, out, |w, n, a| dot(w, n, a)) }
    }
}
