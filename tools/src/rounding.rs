//! Weighted rounding search for the quantizers `convert` writes: instead of
//! mapping a block's minimum and maximum to the end levels, try a range of
//! scales and keep, for each, the least-squares scale (and minimum) of the
//! levels it rounds to, judged by `Σ w·(x − x̂)²`. The same searches as
//! llama.cpp's `make_qkx3_quants`, `make_qx_quants` and `make_qp_quants`
//! (re-derived here, not copied), so a `--quant q4k` image rounds as
//! `llama-quantize` does. Q2_K without an importance matrix rounds as
//! ggml's reference `quantize_row_q2_K_ref` does instead (`make_qkx2_quants`:
//! fewer candidate scales, judged by `Σ w·|x − x̂|` with `w = |x|`).
//!
//! The weights say which values matter: by default a value's own magnitude
//! (`av_x + |x|` for the affine K-quants, `x²` for the symmetric ones, as
//! llama.cpp does without an importance matrix); with an importance vector
//! (the mean square of each input channel over calibration text, what
//! `llama-imatrix` measures), `importance[j]·√(σ² + x²)`.

use bramble_runtime::kquant::{f16_bytes, f16_value, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, QK_K};
use bramble_runtime::quant::{BlockQ4, BlockQ5, BlockQ5S, GROUP};
use half::f16;

/// Below this magnitude a block is all zero.
const ZERO: f32 = 1e-15;

/// `v` rounded to the nearest integer, halves to even, as ggml's
/// `nearest_int` does: the searches' candidate scales put the largest value
/// exactly on a half (`top − 0.5` times its step) once each, and which way
/// it goes decides that candidate.
fn nearest(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// Which candidate scales [`fit_affine_by`] tries and how it judges them.
#[derive(Debug, Clone, Copy)]
pub struct AffineSearch {
    /// The candidates are `(top + first + step·i) / (max − min)` for `i` in `0..=steps`.
    pub first: f32,
    /// See [`AffineSearch::first`].
    pub step: f32,
    /// See [`AffineSearch::first`].
    pub steps: u32,
    /// Judge by `Σ w·|x − x̂|` instead of `Σ w·(x − x̂)²`.
    pub absolute: bool,
}

impl AffineSearch {
    /// llama.cpp's `make_qkx3_quants(…, -0.9, 0.05, 36, false)`: the K-quants' search.
    pub const QKX3: AffineSearch = AffineSearch { first: -0.9, step: 0.05, steps: 36, absolute: false };
    /// `make_qkx2_quants(…, -0.5, 0.1, 15, true)`: ggml's reference Q2_K rounding.
    pub const QKX2_Q2K: AffineSearch = AffineSearch { first: -0.5, step: 0.1, steps: 15, absolute: true };
}

/// Levels `0..=top` and a scale and offset with `x̂ = scale·l − offset`
/// (offset ≥ 0, so 0 is always representable), fitted by weighted least
/// squares over the candidate scales of [`AffineSearch::QKX3`]. Returns
/// `(scale, offset)`; `levels` as long as `x`.
pub fn fit_affine(x: &[f32], w: &[f32], top: u8, levels: &mut [u8]) -> (f32, f32) {
    fit_affine_by(AffineSearch::QKX3, x, w, top, levels)
}

/// [`fit_affine`] over the candidate scales of `search`, each judged by its
/// error measure. As in llama.cpp, once a candidate fits better its
/// minimum replaces the data's as the bottom of the span the next
/// candidates divide (`(max − min)` and `x − min`).
pub fn fit_affine_by(search: AffineSearch, x: &[f32], w: &[f32], top: u8, levels: &mut [u8]) -> (f32, f32) {
    let AffineSearch { first, step, steps, absolute } = search;
    let min = x.iter().fold(0f32, |m, &v| m.min(v));
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max <= min {
        levels.fill(0);
        return (0.0, -min);
    }
    let (sum_w, sum_x) = x.iter().zip(w).fold((0f32, 0f32), |(sw, sx), (&v, &wi)| (sw + wi, sx + wi * v));
    let round_all = |inverse: f32, low: f32, out: &mut [u8]| {
        for (l, &v) in out.iter_mut().zip(x) {
            *l = nearest(inverse * (v - low)).clamp(0, top as i32) as u8;
        }
    };
    let error = |scale: f32, low: f32, ls: &[u8]| -> f32 {
        ls.iter()
            .zip(x)
            .zip(w)
            .map(|((&l, &v), &wi)| {
                let difference = scale * l as f32 + low - v;
                wi * if absolute { difference.abs() } else { difference * difference }
            })
            .sum()
    };
    let inverse = top as f32 / (max - min);
    round_all(inverse, min, levels);
    let (mut scale, mut low) = (1.0 / inverse, min);
    let mut best = error(scale, low, levels);
    let mut trial = [0u8; QK_K];
    let trial = &mut trial[..x.len()];
    for i in 0..=steps {
        // Each candidate spans from the best fit's minimum so far, not the
        // data's (llama.cpp's searches reuse one `min` for both).
        round_all((first + step * i as f32 + top as f32) / (max - low), low, trial);
        let (mut sl, mut sl2, mut sxl) = (0f32, 0f32, 0f32);
        for ((&l, &v), &wi) in trial.iter().zip(x).zip(w) {
            let l = l as f32;
            (sl, sl2, sxl) = (sl + wi * l, sl2 + wi * l * l, sxl + wi * l * v);
        }
        let det = sum_w * sl2 - sl * sl;
        if det <= 0.0 {
            continue;
        }
        let (mut s, mut m) = ((sum_w * sxl - sum_x * sl) / det, (sl2 * sum_x - sl * sxl) / det);
        if m > 0.0 {
            (s, m) = (sxl / sl2, 0.0);
        }
        let e = error(s, m, trial);
        if e < best {
            levels.copy_from_slice(trial);
            (best, scale, low) = (e, s, m);
        }
    }
    (scale, -low)
}

/// Signed levels in `−n..n` and a scale with `x̂ = scale·l`, the scale
/// mapping the value of largest magnitude to `−n` and then refined by
/// weighted least squares over nearby scales. `w` `None` weighs by `x²`.
pub fn fit_symmetric(x: &[f32], w: Option<&[f32]>, n: i32, levels: &mut [i8]) -> f32 {
    let extreme = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    if extreme.abs() < ZERO {
        levels.fill(0);
        return 0.0;
    }
    let weight = |i: usize| w.map_or(x[i] * x[i], |w| w[i]);
    let round = |inverse: f32, v: f32| nearest(inverse * v).clamp(-n, n - 1);
    let sums = |inverse: f32| {
        x.iter().enumerate().fold((0f32, 0f32), |(slx, sl2), (i, &v)| {
            let l = round(inverse, v) as f32;
            (slx + weight(i) * v * l, sl2 + weight(i) * l * l)
        })
    };
    let mut best_inverse = -(n as f32) / extreme;
    let (slx, sl2) = sums(best_inverse);
    let mut scale = if sl2 > 0.0 { slx / sl2 } else { 0.0 };
    let mut best = scale * slx;
    for i in (-9..=9).filter(|&i| i != 0) {
        let inverse = -(n as f32 + 0.1 * i as f32) / extreme;
        let (slx, sl2) = sums(inverse);
        if sl2 > 0.0 && slx * slx > best * sl2 {
            (scale, best, best_inverse) = (slx / sl2, slx * slx / sl2, inverse);
        }
    }
    for (l, &v) in levels.iter_mut().zip(x) {
        *l = round(best_inverse, v) as i8;
    }
    scale
}

/// Non-negative values (sub-block scales or minimums) as levels `0..=top`
/// of one unit, weighted; the unit is returned.
pub fn fit_unsigned(x: &[f32], w: &[f32], top: u8, levels: &mut [u8]) -> f32 {
    let max = x.iter().fold(0f32, |m, &v| m.max(v));
    if max < ZERO {
        levels.fill(0);
        return 0.0;
    }
    let round = |inverse: f32, v: f32| nearest(inverse * v).clamp(0, top as i32);
    let error = |inverse: f32| -> f32 {
        x.iter().zip(w).map(|(&v, &wi)| wi * (v - round(inverse, v) as f32 / inverse).powi(2)).sum()
    };
    let mut inverse = top as f32 / max;
    let mut best = error(inverse);
    for i in (-4..=4).filter(|&i| i != 0) {
        let candidate = (top as f32 + 0.1 * i as f32) / max;
        let e = error(candidate);
        if e < best {
            (best, inverse) = (e, candidate);
        }
    }
    for (l, &v) in levels.iter_mut().zip(x) {
        *l = round(inverse, v) as u8;
    }
    // Levels moved one at a time while that raises the fit (Σlx)²/Σl².
    let (mut slx, mut sl2) = (0f32, 0f32);
    for ((&l, &v), &wi) in levels.iter().zip(x).zip(w) {
        (slx, sl2) = (slx + wi * v * l as f32, sl2 + wi * (l as f32).powi(2));
    }
    for _ in 0..5 {
        let mut changed = false;
        for i in 0..x.len() {
            let (l, wi, v) = (levels[i] as f32, w[i], x[i]);
            let (rest_lx, rest_l2) = (slx - wi * v * l, sl2 - wi * l * l);
            if rest_lx <= 0.0 || rest_l2 <= 0.0 {
                continue;
            }
            let moved = nearest(v * rest_l2 / rest_lx).min(top as i32) as f32;
            if moved == l {
                continue;
            }
            let (new_lx, new_l2) = (rest_lx + wi * v * moved, rest_l2 + wi * moved * moved);
            if new_lx * new_lx * sl2 > slx * slx * new_l2 {
                (levels[i], slx, sl2, changed) = (moved as u8, new_lx, new_l2, true);
            }
        }
        if !changed {
            break;
        }
    }
    if sl2 > 0.0 {
        slx / sl2
    } else {
        0.0
    }
}

/// Per-value weights of a run of `x`: `importance[j]·√(σ² + x²)` with an
/// importance vector (σ² the mean square of `row`), else `av + |x|`
/// (`av` the root of twice the mean square of `row`, llama.cpp's default).
fn weights(x: &[f32], row_mean_square: f32, importance: Option<&[f32]>, out: &mut [f32]) {
    match importance {
        Some(imp) => {
            for ((o, &v), &i) in out.iter_mut().zip(x).zip(imp) {
                *o = i * (row_mean_square + v * v).sqrt();
            }
        }
        None => {
            let av = (2.0 * row_mean_square).sqrt();
            for (o, &v) in out.iter_mut().zip(x) {
                *o = av + v.abs();
            }
        }
    }
}

fn mean_square(x: &[f32]) -> f32 {
    x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32
}

/// One asymmetric block of 32 by the weighted search over levels
/// `0..=top` (llama.cpp's `make_qkx3_quants` for Q4_1 and Q5_1): the f16
/// scale, the f16 minimum and the levels.
fn affine_block(x: &[f32], top: u8, row_mean_square: f32, importance: Option<&[f32]>) -> (f16, f16, [u8; GROUP]) {
    let mut w = [0f32; GROUP];
    weights(x, row_mean_square, importance, &mut w);
    let mut levels = [0u8; GROUP];
    let (scale, offset) = fit_affine(x, &w, top, &mut levels);
    (f16::from_f32(scale), f16::from_f32(-offset), levels)
}

/// One asymmetric 4-bit block (Q4_1, our `q4`) by the weighted search.
pub fn q4_block(x: &[f32], row_mean_square: f32, importance: Option<&[f32]>) -> BlockQ4 {
    let (d, m, levels) = affine_block(x, 15, row_mean_square, importance);
    let mut qs = [0u8; GROUP / 2];
    for (j, q) in qs.iter_mut().enumerate() {
        *q = levels[j] | (levels[j + GROUP / 2] << 4);
    }
    BlockQ4 { d, m, qs }
}

/// One asymmetric 5-bit block (Q5_1, our `q5`) by the weighted search
/// (llama.cpp's `quantize_row_q5_1_impl`: `make_qkx3_quants` over levels
/// 0..=31 weighted by `importance[j]·√(σ² + x²)`). Without an importance
/// vector `convert` uses ggml's reference rounding instead, as llama.cpp does.
pub fn q5_block(x: &[f32], row_mean_square: f32, importance: Option<&[f32]>) -> BlockQ5 {
    let (d, m, levels) = affine_block(x, 31, row_mean_square, importance);
    BlockQ5::from_levels(d, m, &levels)
}

/// One symmetric 5-bit block (Q5_0, our `q5s`) by the weighted search
/// (llama.cpp's `quantize_row_q5_0_impl`: `make_qx_quants` over levels
/// −16..15 weighted by `importance[j]·√(σ² + x²)`). Without an importance
/// vector `convert` uses ggml's reference rounding instead, as llama.cpp does.
pub fn q5s_block(x: &[f32], row_mean_square: f32, importance: Option<&[f32]>) -> BlockQ5S {
    let mut w = [0f32; GROUP];
    weights(x, row_mean_square, importance, &mut w);
    let mut levels = [0i8; GROUP];
    let scale = fit_symmetric(x, importance.map(|_| &w[..]), 16, &mut levels);
    BlockQ5S::from_levels(f16::from_f32(scale), &levels.map(|l| (l + 16) as u8))
}

/// Q4_K / Q5_K's shared part: per sub-block of 32 a fitted scale and
/// offset, both then stored as 6-bit multiples of `d` and `dmin` (fitted
/// too, weighted by each sub-block's total weight); returns the packed
/// header and each value's level against the stored scales.
fn k4_block(x: &[f32], top: u8, importance: Option<&[f32]>, levels: &mut [u8; QK_K]) -> ([u8; 2], [u8; 2], [u8; 12]) {
    let row_mean_square = mean_square(x);
    let (mut scales, mut offsets, mut totals) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    for j in 0..8 {
        let sub = &x[32 * j..32 * j + 32];
        let mut w = [0f32; 32];
        weights(sub, row_mean_square, importance.map(|i| &i[32 * j..32 * j + 32]), &mut w);
        totals[j] = w.iter().sum();
        (scales[j], offsets[j]) = fit_affine(sub, &w, top, &mut levels[32 * j..32 * j + 32]);
    }
    let (mut scale_levels, mut offset_levels) = ([0u8; 8], [0u8; 8]);
    let d = f16_bytes(fit_unsigned(&scales, &totals, 63, &mut scale_levels));
    let dmin = f16_bytes(fit_unsigned(&offsets, &totals, 63, &mut offset_levels));
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let (s, m) = (scale_levels[j], offset_levels[j]);
        if j < 4 {
            packed[j] = s;
            packed[j + 4] = m;
        } else {
            packed[j + 4] = (s & 0xF) | ((m & 0xF) << 4);
            packed[j - 4] |= (s >> 4) << 6;
            packed[j] |= (m >> 4) << 6;
        }
        let (step, shift) = (f16_value(d) * s as f32, f16_value(dmin) * m as f32);
        if step == 0.0 {
            continue;
        }
        for (l, &v) in levels[32 * j..32 * j + 32].iter_mut().zip(&x[32 * j..32 * j + 32]) {
            *l = nearest((v + shift) / step).clamp(0, top as i32) as u8;
        }
    }
    (d, dmin, packed)
}

/// One Q4_K super-block (256 values) by the weighted search.
pub fn q4k_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ4K {
    let mut levels = [0u8; QK_K];
    let (d, dmin, scales) = k4_block(x, 15, importance, &mut levels);
    let mut qs = [0u8; QK_K / 2];
    for (c, chunk) in qs.chunks_exact_mut(32).enumerate() {
        for (l, q) in chunk.iter_mut().enumerate() {
            *q = levels[64 * c + l] | (levels[64 * c + 32 + l] << 4);
        }
    }
    BlockQ4K { d, dmin, scales, qs }
}

/// One Q5_K super-block by the weighted search.
pub fn q5k_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ5K {
    let mut levels = [0u8; QK_K];
    let (d, dmin, scales) = k4_block(x, 31, importance, &mut levels);
    let (mut qs, mut qh) = ([0u8; QK_K / 2], [0u8; QK_K / 8]);
    for (sub, run) in levels.chunks_exact(32).enumerate() {
        let (chunk, high) = (sub / 2, sub % 2);
        for (l, &level) in run.iter().enumerate() {
            qs[32 * chunk + l] |= (level & 0xF) << (4 * high);
            qh[l] |= (level >> 4) << sub;
        }
    }
    BlockQ5K { d, dmin, scales, qh, qs }
}

/// Q6_K / Q3_K's shared part: per sub-block of 16 a fitted signed scale
/// with levels in `−n..n`, the scales then stored as signed multiples of
/// `d` (`−128..=127` for Q6_K, `−32..=31` for Q3_K) and each value's level
/// taken again against its stored scale. Returns `d` and the scale levels.
fn signed_block(
    x: &[f32],
    n: i32,
    scale_range: i32,
    importance: Option<&[f32]>,
    levels: &mut [i8; QK_K],
) -> ([u8; 2], [i8; 16]) {
    let row_mean_square = mean_square(x);
    let mut scales = [0f32; 16];
    for j in 0..16 {
        let sub = &x[16 * j..16 * j + 16];
        let mut w = [0f32; 16];
        let weighted = importance.map(|imp| {
            weights(sub, row_mean_square, Some(&imp[16 * j..16 * j + 16]), &mut w);
            &w[..]
        });
        scales[j] = fit_symmetric(sub, weighted, n, &mut levels[16 * j..16 * j + 16]);
    }
    let mut scale_levels = [0i8; 16];
    let extreme = scales.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    if extreme.abs() < ZERO {
        levels.fill(0);
        return (f16_bytes(0.0), scale_levels);
    }
    let inverse = -(scale_range as f32) / extreme;
    let d = f16_bytes(1.0 / inverse);
    for (level, &s) in scale_levels.iter_mut().zip(&scales) {
        *level = nearest(inverse * s).clamp(-scale_range, scale_range - 1) as i8;
    }
    for j in 0..16 {
        let step = f16_value(d) * scale_levels[j] as f32;
        if step == 0.0 {
            levels[16 * j..16 * j + 16].fill(0);
            continue;
        }
        for (l, &v) in levels[16 * j..16 * j + 16].iter_mut().zip(&x[16 * j..16 * j + 16]) {
            *l = nearest(v / step).clamp(-n, n - 1) as i8;
        }
    }
    (d, scale_levels)
}

/// One Q2_K super-block (256 values): per sub-block of 16 a fitted scale and
/// offset for levels 0..=3, both stored as 4-bit multiples of `d` and
/// `dmin`, then every value's level taken against its stored scale.
/// Without an importance vector as ggml's `quantize_row_q2_K_ref`
/// ([`AffineSearch::QKX2_Q2K`] weighted by `|x|`, the units the largest
/// scale and offset over 15, each rounded to nearest); with one as
/// llama.cpp's `quantize_row_q2_K_impl` ([`AffineSearch::QKX3`] weighted by
/// `importance[j]·√(σ² + x²)`, the units fitted by [`fit_unsigned`] weighted
/// by each sub-block's total weight).
pub fn q2k_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ2K {
    let row_mean_square = mean_square(x);
    let mut levels = [0u8; QK_K];
    let (mut scales, mut offsets, mut totals) = ([0f32; 16], [0f32; 16], [0f32; 16]);
    for j in 0..16 {
        let sub = &x[16 * j..16 * j + 16];
        let mut w = [0f32; 16];
        let search = match importance {
            Some(imp) => {
                weights(sub, row_mean_square, Some(&imp[16 * j..16 * j + 16]), &mut w);
                AffineSearch::QKX3
            }
            None => {
                w.iter_mut().zip(sub).for_each(|(w, v)| *w = v.abs());
                AffineSearch::QKX2_Q2K
            }
        };
        totals[j] = w.iter().sum();
        (scales[j], offsets[j]) = fit_affine_by(search, sub, &w, 3, &mut levels[16 * j..16 * j + 16]);
    }
    let (mut scale_levels, mut offset_levels) = ([0u8; 16], [0u8; 16]);
    let (d, dmin) = match importance {
        Some(_) => (
            f16_bytes(fit_unsigned(&scales, &totals, 15, &mut scale_levels)),
            f16_bytes(fit_unsigned(&offsets, &totals, 15, &mut offset_levels)),
        ),
        None => (unit_of_largest(&scales, &mut scale_levels), unit_of_largest(&offsets, &mut offset_levels)),
    };
    let mut block = BlockQ2K { scales: [0; 16], qs: [0; QK_K / 4], d, dmin };
    for j in 0..16 {
        let (s, m) = (scale_levels[j], offset_levels[j]);
        block.scales[j] = s | (m << 4);
        let (step, shift) = (f16_value(d) * s as f32, f16_value(dmin) * m as f32);
        let run = &mut levels[16 * j..16 * j + 16];
        if step != 0.0 {
            for (l, &v) in run.iter_mut().zip(&x[16 * j..16 * j + 16]) {
                *l = nearest((v + shift) / step).clamp(0, 3) as u8;
            }
        }
        // Value 128n + 32j' + 16h + l (sub-block 8n + 2j' + h) at bits 2j' of qs[32n + 16h + l].
        let (n, field, h) = (j / 8, j % 8 / 2, j % 2);
        for (l, &level) in run.iter().enumerate() {
            block.qs[32 * n + 16 * h + l] |= level << (2 * field);
        }
    }
    block
}

/// ggml's reference units for 4-bit sub-block scales (or offsets): the
/// largest over 15, each rounded to the nearest multiple of it (of the
/// unrounded unit, as `quantize_row_q2_K_ref` does). The unit as stored.
fn unit_of_largest(values: &[f32; 16], levels: &mut [u8; 16]) -> [u8; 2] {
    let max = values.iter().fold(0f32, |m, &v| m.max(v));
    if max <= 0.0 {
        levels.fill(0);
        return f16_bytes(0.0);
    }
    let inverse = 15.0 / max;
    for (level, &v) in levels.iter_mut().zip(values) {
        *level = nearest(inverse * v).clamp(0, 15) as u8;
    }
    f16_bytes(max / 15.0)
}

/// One Q6_K super-block by the weighted search.
pub fn q6k_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ6K {
    let mut levels = [0i8; QK_K];
    let (d, scale_levels) = signed_block(x, 32, 128, importance, &mut levels);
    let (mut ql, mut qh) = ([0u8; QK_K / 2], [0u8; QK_K / 4]);
    for (index, &level) in levels.iter().enumerate() {
        let level = (level as i32 + 32) as u8;
        let (half, k, l) = (index / 128, index % 128 / 32, index % 32);
        ql[64 * half + 32 * (k % 2) + l] |= (level & 0xF) << (4 * (k / 2));
        qh[32 * half + l] |= (level >> 4) << (2 * k);
    }
    BlockQ6K { ql, qh, scales: scale_levels.map(|s| s as u8), d }
}

/// One Q3_K super-block by the weighted search.
pub fn q3k_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ3K {
    let mut levels = [0i8; QK_K];
    let (d, scale_levels) = signed_block(x, 4, 32, importance, &mut levels);
    let mut block = BlockQ3K { hmask: [0; QK_K / 8], qs: [0; QK_K / 4], scales: [0; 12], d };
    for (sub, &s) in scale_levels.iter().enumerate() {
        let stored = (s as i32 + 32) as u8;
        if sub < 8 {
            block.scales[sub] |= stored & 0xF;
        } else {
            block.scales[sub - 8] |= (stored & 0xF) << 4;
        }
        block.scales[8 + sub % 4] |= (stored >> 4) << (2 * (sub / 4));
        let (n, j, h) = (sub / 8, sub % 8 / 2, sub % 2);
        for l in 0..16 {
            let level = (levels[16 * sub + l] as i32 + 4) as u8;
            block.qs[32 * n + 16 * h + l] |= (level & 3) << (2 * j);
            block.hmask[16 * h + l] |= (level >> 2) << (4 * n + j);
        }
    }
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) >> 9;
                let u = (h % 10007) as f32 / 10007.0 - 0.5;
                // Heavy-ish tails, as weights have.
                u * (1.0 + 4.0 * u * u) * (1.0 + (i % 13) as f32 / 13.0)
            })
            .collect()
    }

    /// `Σ w·(x − y)²` with the weights the search of `name` uses by default
    /// (for Q2_K, ggml's reference: `Σ |x|·|x − y|`).
    fn objective(name: &str, x: &[f32], y: &[f32]) -> f64 {
        let mut total = 0f64;
        for (xs, ys) in x.chunks_exact(QK_K).zip(y.chunks_exact(QK_K)) {
            let av = (2.0 * mean_square(xs)).sqrt();
            for (&a, &b) in xs.iter().zip(ys) {
                let (w, error) = match name {
                    "q2k" => (a.abs(), (a - b).abs() as f64),
                    "q6k" | "q3k" => (a * a, ((a - b) as f64).powi(2)),
                    _ => (av + a.abs(), ((a - b) as f64).powi(2)),
                };
                total += w as f64 * error;
            }
        }
        total
    }

    /// The search does clearly better than min/max rounding on the error it
    /// minimises, summed over many blocks: squared error weighted by
    /// `av + |x|` for the affine types, by `x²` for the symmetric ones.
    #[test]
    fn searched_blocks_beat_min_max_rounding() {
        let n = QK_K * 64;
        let x = wave(n, 3);
        let mut searched = vec![0f32; n];
        let mut plain = vec![0f32; n];
        type Pair = (&'static str, fn(&[f32], &mut [f32]), fn(&[f32], &mut [f32]));
        let pairs: [Pair; 5] = [
            ("q4k", |x, y| q4k_block(x, None).dequantize(y), |x, y| BlockQ4K::quantize(x).dequantize(y)),
            ("q5k", |x, y| q5k_block(x, None).dequantize(y), |x, y| BlockQ5K::quantize(x).dequantize(y)),
            ("q6k", |x, y| q6k_block(x, None).dequantize(y), |x, y| BlockQ6K::quantize(x).dequantize(y)),
            ("q3k", |x, y| q3k_block(x, None).dequantize(y), |x, y| BlockQ3K::quantize(x).dequantize(y)),
            (
                "q4",
                |x, y| {
                    let ms = mean_square(x);
                    for (c, o) in x.chunks_exact(GROUP).zip(y.chunks_exact_mut(GROUP)) {
                        bramble_runtime::quant::dequantize_q4(&[q4_block(c, ms, None)], o);
                    }
                },
                |x, y| {
                    let mut b = vec![BlockQ4 { d: f16::ZERO, m: f16::ZERO, qs: [0; 16] }; x.len() / GROUP];
                    bramble_runtime::quant::quantize_q4(x, &mut b);
                    bramble_runtime::quant::dequantize_q4(&b, y);
                },
            ),
        ];
        for (name, search, min_max) in pairs {
            for (c, (s, p)) in
                x.chunks_exact(QK_K).zip(searched.chunks_exact_mut(QK_K).zip(plain.chunks_exact_mut(QK_K)))
            {
                search(c, s);
                min_max(c, p);
            }
            let (e_search, e_plain) = (objective(name, &x, &searched), objective(name, &x, &plain));
            assert!(e_search < 0.9 * e_plain, "{name}: searched {e_search} vs min/max {e_plain}");
        }
    }

    /// ggml's reference Q2_K search does better than min/max rounding on its
    /// own objective, `Σ |x|·|x − x̂|`, but by less than the searches above
    /// do on theirs: its 4-bit sub-block scales and minimums, rounded after
    /// the search, take back much of what it found (5 % lower here).
    const Q2K_SEARCH_GAIN: f64 = 0.97;

    #[test]
    fn q2k_reference_search_beats_min_max_rounding() {
        let n = QK_K * 64;
        let x = wave(n, 3);
        let (mut searched, mut plain) = (vec![0f32; n], vec![0f32; n]);
        for (c, (s, p)) in x.chunks_exact(QK_K).zip(searched.chunks_exact_mut(QK_K).zip(plain.chunks_exact_mut(QK_K))) {
            q2k_block(c, None).dequantize(s);
            BlockQ2K::quantize(c).dequantize(p);
        }
        let (e_search, e_plain) = (objective("q2k", &x, &searched), objective("q2k", &x, &plain));
        assert!(e_search < Q2K_SEARCH_GAIN * e_plain, "searched {e_search} vs min/max {e_plain}");
    }

    /// With an importance vector, the values it marks as important (every
    /// eighth channel, 100×) are reproduced more closely than without it:
    /// by the same search for the k-quants, by ggml's reference rounding
    /// (what `convert` uses without one) for Q5_0 and Q5_1.
    #[test]
    fn importance_moves_the_error_off_important_channels() {
        use bramble_runtime::quant::{dequantize_q5, dequantize_q5s, quantize_q5, quantize_q5s};
        /// `(block, its row's mean square, importance, dequantized out)`.
        type Rounding = fn(&[f32], f32, Option<&[f32]>, &mut [f32]);
        let cases: [(&str, usize, u32, Rounding); 6] = [
            ("q4k", QK_K, 5, |x, _, imp, y| q4k_block(x, imp).dequantize(y)),
            ("q6k", QK_K, 5, |x, _, imp, y| q6k_block(x, imp).dequantize(y)),
            ("q3k", QK_K, 5, |x, _, imp, y| q3k_block(x, imp).dequantize(y)),
            ("q2k", QK_K, 5, |x, _, imp, y| q2k_block(x, imp).dequantize(y)),
            ("q5s", GROUP, 9, |x, ms, imp, y| match imp {
                Some(_) => dequantize_q5s(&[q5s_block(x, ms, imp)], y),
                None => {
                    let mut reference = [BlockQ5S { d: f16::ZERO, qh: [0; 4], qs: [0; 16] }];
                    quantize_q5s(x, &mut reference);
                    dequantize_q5s(&reference, y);
                }
            }),
            ("q5", GROUP, 11, |x, ms, imp, y| match imp {
                Some(_) => dequantize_q5(&[q5_block(x, ms, imp)], y),
                None => {
                    let mut reference = [BlockQ5 { d: f16::ZERO, m: f16::ZERO, qh: [0; 4], qs: [0; 16] }];
                    quantize_q5(x, &mut reference);
                    dequantize_q5(&reference, y);
                }
            }),
        ];
        let n = QK_K * 32;
        for (name, block, seed, round) in cases {
            let x = wave(n, seed);
            let ms = mean_square(&x);
            let importance: Vec<f32> = (0..block).map(|j| if j % 8 == 0 { 100.0 } else { 1.0 }).collect();
            let important = |y: &[f32]| -> f64 {
                x.iter()
                    .zip(y)
                    .enumerate()
                    .filter(|(i, _)| i % 8 == 0)
                    .map(|(_, (a, b))| ((a - b) as f64).powi(2))
                    .sum()
            };
            let (mut with, mut without) = (vec![0f32; n], vec![0f32; n]);
            for (c, (a, b)) in
                x.chunks_exact(block).zip(with.chunks_exact_mut(block).zip(without.chunks_exact_mut(block)))
            {
                round(c, ms, Some(&importance), a);
                round(c, ms, None, b);
            }
            assert!(
                important(&with) < 0.8 * important(&without),
                "{name}: {} vs {}",
                important(&with),
                important(&without)
            );
        }
    }

    #[test]
    fn zero_blocks_stay_zero() {
        let x = [0f32; QK_K];
        let mut y = [1f32; QK_K];
        q4k_block(&x, None).dequantize(&mut y);
        assert!(y.iter().all(|&v| v == 0.0));
        q6k_block(&x, None).dequantize(&mut y);
        assert!(y.iter().all(|&v| v == 0.0));
        q3k_block(&x, None).dequantize(&mut y);
        assert!(y.iter().all(|&v| v == 0.0));
        for importance in [None, Some(&[1f32; QK_K][..])] {
            q2k_block(&x, importance).dequantize(&mut y);
            assert!(y.iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn nearest_rounds_halves_to_even_as_ggml() {
        assert_eq!([2.5, 3.5, -2.5, 14.5, 2.4999998].map(nearest), [2, 4, -2, 14, 2]);
    }

    /// `q2k_block` without an importance vector writes the bytes of ggml's
    /// `quantize_row_q2_K_ref`: two super-blocks of [`wave`], whose bytes
    /// here come from a float-for-float Python port of it, which gave
    /// llama-quantize's (llama.cpp of llama-cpp-python 0.3.36) bytes on 560
    /// of 560 blocks of a synthetic model.
    #[test]
    fn q2k_block_is_ggml_reference_rounding() {
        const EXPECTED: [&str; 2] = [
            "dbceedffbbaabadfdede9aa9dafffeaca9d5a3978f523e4afa6ae9a9a497979e527a4df939a9a5a85497565e5a4e6939a6539e5e7a7df935e9a5a4a493924e5a2e69e9a9e5a45453574e523e49e929a58a2c212f",
            "bba98decddac99bacaeefd7aaaa9efde524a6639e5e5a5d1a7509f524a463625e9a9e5959497535e4e6a79ea19a895944a3a6aa9a9a497975e537e4efa3aaaa9a4a593525e5a4e7a39a5f5a495a3504e8b2cef2e",
        ];
        let x = wave(2 * QK_K, 3);
        for (values, expected) in x.chunks_exact(QK_K).zip(EXPECTED) {
            let hex: String = bytemuck::bytes_of(&q2k_block(values, None)).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, expected);
        }
    }

    /// ggml's reference Q2_K rounding, worked by hand on one super-block:
    /// sub-block 0 holds 0, 1, 2, 3 (and zeros), whose best fit is scale 1
    /// and offset 0, levels the values; every other sub-block is zero. The
    /// largest scale sets `d` = 1/15 (scale level 15), no sub-block has an
    /// offset (`dmin` 0), and the levels land in `qs` as ggml packs them:
    /// value `l` of sub-block 0 at bits 0–1 of `qs[l]`.
    #[test]
    fn q2k_reference_rounding_packs_as_ggml() {
        let mut x = [0f32; QK_K];
        x[..4].copy_from_slice(&[0.0, 1.0, 2.0, 3.0]);
        let block = q2k_block(&x, None);
        assert_eq!(block.scales[0], 15);
        assert!(block.scales[1..].iter().all(|&s| s == 0), "{:?}", block.scales);
        assert_eq!((f16_value(block.d), f16_value(block.dmin)), (f16_value(f16_bytes(1.0 / 15.0)), 0.0));
        assert_eq!(&block.qs[..4], &[0, 1, 2, 3]);
        assert!(block.qs[4..].iter().all(|&q| q == 0));
        let mut y = [0f32; QK_K];
        block.dequantize(&mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
        // A negative run: the offset takes the minimum, in the high nibble.
        let mut x = [0f32; QK_K];
        x[16..32].iter_mut().enumerate().for_each(|(i, v)| *v = -1.0 + (i % 4) as f32 / 3.0);
        let block = q2k_block(&x, None);
        assert_eq!(block.scales[1] >> 4, 15, "{:?}", block.scales);
        block.dequantize(&mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 2e-3, "{a} vs {b}");
        }
    }
}
