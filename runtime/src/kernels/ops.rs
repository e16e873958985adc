//! Element-wise and row operations of the forward pass.

/// Reference implementations.
pub mod scalar {
    /// `out = x / √(mean(x²) + eps) ⊙ weight`.
    pub fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
        let mean_square = dot(x, x) / x.len() as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
            *o = v * scale * w;
        }
    }

    /// In-place softmax.
    pub fn softmax(x: &mut [f32]) {
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0f32;
        for v in x.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inverse = 1.0 / sum;
        for v in x.iter_mut() {
            *v *= inverse;
        }
    }

    /// SwiGLU gate: `gate = silu(gate) ⊙ up`.
    pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    }

    /// GeGLU gate: `gate = gelu(gate) ⊙ up`, GELU's tanh approximation
    /// `½g(1 + tanh(t))`, `t = √(2/π)(g + 0.044715g³)`, as Gemma computes it.
    /// Written as `g / (1 + e⁻²ᵗ)` (the same function, since
    /// `1 + tanh(t) = 2 / (1 + e⁻²ᵗ)`): `1 + tanh(t)` loses the digits of a
    /// negative `g`'s small result to cancellation, the sigmoid form does not.
    pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
        const TWO_SQRT_2_OVER_PI: f32 = 2.0 * 0.797_884_6;
        for (g, u) in gate.iter_mut().zip(up) {
            let x = *g;
            let z = TWO_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
            *g = x / (1.0 + (-z).exp()) * u;
        }
    }

    /// Rotates one head's vector by RoPE with precomputed `cos`/`sin` of each
    /// pair's angle. `halves` pairs (i, i + n/2), otherwise (2i, 2i + 1).
    pub fn rope(head: &mut [f32], cos: &[f32], sin: &[f32], halves: bool) {
        let pairs = cos.len();
        for i in 0..pairs {
            let (a, b) = if halves { (i, i + pairs) } else { (2 * i, 2 * i + 1) };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }

    /// `Σ a·b`.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        crate::kernels::matmul::scalar::dot_f32(a, b)
    }

    /// The bias constraint on one hidden state: `p = h · r`, then
    /// `h ← h − w·(p − centre)·d` (skipped for `w = 0`): with `r · d = 1`
    /// (`r = d` a unit vector: an orthogonal projection) the projection moves
    /// a share `w` of the way to `centre`. Returns `p`.
    pub fn project_out(h: &mut [f32], r: &[f32], d: &[f32], w: f32, centre: f32) -> f32 {
        let p = dot(h, r);
        if w != 0.0 {
            let c = w * (p - centre);
            for (x, v) in h.iter_mut().zip(d) {
                *x -= c * v;
            }
        }
        p
    }

    /// `dst[c·rows + r] = src[r·cols + c]`: a `rows × cols` matrix (`cols =
    /// src.len() / rows`) turned `cols × rows`, as a batch's products go from
    /// rows outermost (how workers split them) to tokens outermost.
    pub fn transpose(src: &[f32], rows: usize, dst: &mut [f32]) {
        assert!(rows > 0 && src.len().is_multiple_of(rows) && dst.len() == src.len(), "transpose shapes disagree");
        let cols = src.len() / rows;
        for (r, row) in src.chunks_exact(cols).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                dst[c * rows + r] = v;
            }
        }
    }
}

/// NEON (ARMv8.0) versions. `exp` is a polynomial (`neon::exp`); the
/// reductions (dot, the sums of softmax and RMSNorm) add in a different order
/// than the reference, so results agree within the bounds named in the tests.
/// Each public function is the table entry; its body is a `*_neon` function
/// compiled with the `neon` feature, in which the intrinsics are safe calls.
#[cfg(target_arch = "aarch64")]
pub mod neon {
    use std::arch::aarch64::*;

    /// Lowest input of [`exp`] with a normal result; below it `exp` gives 0.
    const EXP_LOWEST: f32 = -87.33;
    /// Highest input of [`exp`]; above it the result stays at `exp(EXP_HIGHEST)`.
    const EXP_HIGHEST: f32 = 88.37;

    /// `eˣ` in four lanes, within a few ulp of `f32::exp` for `x` in
    /// [`EXP_LOWEST`, `EXP_HIGHEST`]: x = n·ln 2 + r with |r| ≤ ln 2 / 2,
    /// eʳ by a degree-5 polynomial (Arm optimized-routines' `v_expf`
    /// coefficients, 1.45 ulp + rounding), 2ⁿ built in the exponent field.
    #[target_feature(enable = "neon")]
    #[inline]
    pub(crate) fn exp(x: float32x4_t) -> float32x4_t {
        let clamped = vmaxq_f32(vminq_f32(x, vdupq_n_f32(EXP_HIGHEST)), vdupq_n_f32(EXP_LOWEST));
        // n = round(x / ln 2); r = x − n·ln 2 with ln 2 in two parts, the first exact in n·ln2_hi.
        let n = vrndnq_f32(vmulq_n_f32(clamped, f32::from_bits(0x3fb8_aa3b)));
        let r = vfmsq_n_f32(clamped, n, f32::from_bits(0x3f31_7200));
        let r = vfmsq_n_f32(r, n, f32::from_bits(0x35bf_be8e));
        // eʳ − 1 ≈ c4·r + c3·r² + c2·r³ + c1·r⁴ + c0·r⁵, in two halves by r².
        let r2 = vmulq_f32(r, r);
        let p = vfmaq_f32(vdupq_n_f32(f32::from_bits(0x3d2b_9f17)), vdupq_n_f32(f32::from_bits(0x3c07_2010)), r);
        let q = vfmaq_f32(vdupq_n_f32(f32::from_bits(0x3eff_fedb)), vdupq_n_f32(f32::from_bits(0x3e2a_af33)), r);
        let q = vfmaq_f32(q, p, r2);
        let poly = vfmaq_f32(vmulq_n_f32(r, f32::from_bits(0x3f7f_fff6)), q, r2);
        // 2ⁿ: n + 127 in the exponent field (n is −126 ..= 127 after the clamp).
        let scale = vreinterpretq_f32_s32(vaddq_s32(vshlq_n_s32::<23>(vcvtq_s32_f32(n)), vdupq_n_s32(0x3f80_0000)));
        let result = vfmaq_f32(scale, scale, poly);
        // Below the normal range: 0.
        vbslq_f32(vcltq_f32(x, vdupq_n_f32(EXP_LOWEST)), vdupq_n_f32(0.0), result)
    }

    /// Applies `f` to `x` four values at a time; a tail of one to three goes
    /// through a padded copy (padding `pad`), so every value sees the same
    /// arithmetic.
    #[inline(always)]
    fn map4(x: &mut [f32], pad: f32, mut f: impl FnMut(float32x4_t) -> float32x4_t) {
        let mut chunks = x.chunks_exact_mut(4);
        for chunk in &mut chunks {
            // SAFETY: `chunk` is four values.
            unsafe { vst1q_f32(chunk.as_mut_ptr(), f(vld1q_f32(chunk.as_ptr()))) };
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut padded = [pad; 4];
            padded[..rest.len()].copy_from_slice(rest);
            // SAFETY: `padded` is four values.
            unsafe { vst1q_f32(padded.as_mut_ptr(), f(vld1q_f32(padded.as_ptr()))) };
            rest.copy_from_slice(&padded[..rest.len()]);
        }
    }

    /// See `scalar::project_out`: the dot product as [`dot`], the removal four lanes a step.
    pub fn project_out(h: &mut [f32], r: &[f32], d: &[f32], w: f32, centre: f32) -> f32 {
        let p = dot(h, r);
        if w != 0.0 {
            let c = w * (p - centre);
            let n = h.len().min(d.len());
            let full = n - n % 4;
            for i in (0..full).step_by(4) {
                // SAFETY: `i + 4 ≤ full ≤ n`, within both slices.
                unsafe {
                    let x = vld1q_f32(h.as_ptr().add(i));
                    vst1q_f32(h.as_mut_ptr().add(i), vfmsq_n_f32(x, vld1q_f32(d.as_ptr().add(i)), c));
                }
            }
            for i in full..n {
                h[i] -= c * d[i];
            }
        }
        p
    }

    /// As `scalar::transpose`, in 4 × 4 blocks: four rows' four values
    /// loaded, swapped in registers (`trn1`/`trn2` on lanes, then on pairs of
    /// lanes), stored as four columns; the edges (rows or columns not a
    /// multiple of four) one value at a time.
    pub fn transpose(src: &[f32], rows: usize, dst: &mut [f32]) {
        assert!(rows > 0 && src.len().is_multiple_of(rows) && dst.len() == src.len(), "transpose shapes disagree");
        // SAFETY: NEON is part of every aarch64 target; shapes checked above.
        unsafe { transpose_neon(src, rows, dst) }
    }

    /// # Safety
    /// `src.len() == dst.len()`, a multiple of `rows > 0`.
    #[target_feature(enable = "neon")]
    unsafe fn transpose_neon(src: &[f32], rows: usize, dst: &mut [f32]) {
        let cols = src.len() / rows;
        let (whole_rows, whole_cols) = (rows - rows % 4, cols - cols % 4);
        for r in (0..whole_rows).step_by(4) {
            for c in (0..whole_cols).step_by(4) {
                // SAFETY: `r + 3 < rows` and `c + 3 < cols`, so every load
                // `(r + i)·cols + c .. + 4` is inside `src` and every store
                // `(c + i)·rows + r .. + 4` inside `dst` (same length).
                unsafe {
                    let at = src.as_ptr().add(r * cols + c);
                    let [a, b, x, y] = [0, 1, 2, 3].map(|i| vld1q_f32(at.add(i * cols)));
                    // (a0 b0 a2 b2), (a1 b1 a3 b3), (x0 y0 x2 y2), (x1 y1 x3 y3)
                    let (ab0, ab1) = (vtrn1q_f32(a, b), vtrn2q_f32(a, b));
                    let (xy0, xy1) = (vtrn1q_f32(x, y), vtrn2q_f32(x, y));
                    let pairs = |p: float32x4_t, q: float32x4_t, high: bool| {
                        let (p, q) = (vreinterpretq_f64_f32(p), vreinterpretq_f64_f32(q));
                        vreinterpretq_f32_f64(if high { vtrn2q_f64(p, q) } else { vtrn1q_f64(p, q) })
                    };
                    let columns =
                        [pairs(ab0, xy0, false), pairs(ab1, xy1, false), pairs(ab0, xy0, true), pairs(ab1, xy1, true)];
                    let to = dst.as_mut_ptr().add(c * rows + r);
                    for (i, column) in columns.into_iter().enumerate() {
                        vst1q_f32(to.add(i * rows), column);
                    }
                }
            }
            for i in r..r + 4 {
                for c in whole_cols..cols {
                    dst[c * rows + i] = src[i * cols + c];
                }
            }
        }
        for r in whole_rows..rows {
            for c in 0..cols {
                dst[c * rows + r] = src[r * cols + c];
            }
        }
    }

    /// `Σ a·b`, sixteen products a step in four accumulators.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { dot_neon(a, b) }
    }

    #[target_feature(enable = "neon")]
    fn dot_neon(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: `i + 16 ≤ n`, within both slices.
            unsafe {
                let (x, y) = (vld1q_f32_x4(a.as_ptr().add(i)), vld1q_f32_x4(b.as_ptr().add(i)));
                acc[0] = vfmaq_f32(acc[0], x.0, y.0);
                acc[1] = vfmaq_f32(acc[1], x.1, y.1);
                acc[2] = vfmaq_f32(acc[2], x.2, y.2);
                acc[3] = vfmaq_f32(acc[3], x.3, y.3);
            }
            i += 16;
        }
        while i + 4 <= n {
            // SAFETY: `i + 4 ≤ n`, within both slices.
            unsafe { acc[0] = vfmaq_f32(acc[0], vld1q_f32(a.as_ptr().add(i)), vld1q_f32(b.as_ptr().add(i))) };
            i += 4;
        }
        let mut sum = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
        for j in i..n {
            sum += a[j] * b[j];
        }
        sum
    }

    /// `out = x / √(mean(x²) + eps) ⊙ weight`.
    pub fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { rmsnorm_neon(out, x, weight, eps) }
    }

    #[target_feature(enable = "neon")]
    fn rmsnorm_neon(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
        let n = out.len().min(x.len()).min(weight.len());
        let scale = 1.0 / (dot_neon(x, x) / x.len() as f32 + eps).sqrt();
        let mut i = 0;
        while i + 4 <= n {
            // SAFETY: `i + 4 ≤ n`, within all three slices.
            unsafe {
                let v = vmulq_f32(vmulq_n_f32(vld1q_f32(x.as_ptr().add(i)), scale), vld1q_f32(weight.as_ptr().add(i)));
                vst1q_f32(out.as_mut_ptr().add(i), v);
            }
            i += 4;
        }
        for j in i..n {
            out[j] = x[j] * scale * weight[j];
        }
    }

    /// In-place softmax.
    pub fn softmax(x: &mut [f32]) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { softmax_neon(x) }
    }

    #[target_feature(enable = "neon")]
    fn softmax_neon(x: &mut [f32]) {
        // Maximum, four lanes then across.
        let mut most = vdupq_n_f32(f32::NEG_INFINITY);
        let chunks = x.chunks_exact(4);
        let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        for chunk in chunks {
            // SAFETY: `chunk` is four values.
            most = vmaxq_f32(most, unsafe { vld1q_f32(chunk.as_ptr()) });
        }
        let max = vmaxvq_f32(most).max(tail);
        // eˣ⁻ᵐᵃˣ and their sum (padding −∞ gives 0 and adds nothing).
        let mut total = vdupq_n_f32(0.0);
        map4(x, f32::NEG_INFINITY, |v| {
            let e = exp(vsubq_f32(v, vdupq_n_f32(max)));
            total = vaddq_f32(total, e);
            e
        });
        let inverse = 1.0 / vaddvq_f32(total);
        map4(x, 0.0, |v| vmulq_n_f32(v, inverse));
    }

    /// SwiGLU gate: `gate = silu(gate) ⊙ up`, as `g / (1 + e⁻ᵍ) · u`.
    pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { silu_mul_neon(gate, up) }
    }

    #[target_feature(enable = "neon")]
    fn silu_mul_neon(gate: &mut [f32], up: &[f32]) {
        let silu_times =
            |g: float32x4_t, u: float32x4_t| vmulq_f32(vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0), exp(vnegq_f32(g)))), u);
        gate_times_up(gate, up, silu_times);
    }

    /// `gate[i] = f(gate[i], up[i])` four lanes at a time, the last one to
    /// three values through padded copies, so every value sees the same
    /// arithmetic: the loop of the GLU gates.
    #[inline(always)]
    fn gate_times_up(gate: &mut [f32], up: &[f32], f: impl Fn(float32x4_t, float32x4_t) -> float32x4_t) {
        let n = gate.len().min(up.len());
        let mut i = 0;
        while i + 4 <= n {
            // SAFETY: `i + 4 ≤ n`, within both slices.
            unsafe {
                let v = f(vld1q_f32(gate.as_ptr().add(i)), vld1q_f32(up.as_ptr().add(i)));
                vst1q_f32(gate.as_mut_ptr().add(i), v);
            }
            i += 4;
        }
        if i < n {
            let (mut g, mut u) = ([0f32; 4], [0f32; 4]);
            g[..n - i].copy_from_slice(&gate[i..n]);
            u[..n - i].copy_from_slice(&up[i..n]);
            // SAFETY: `g` and `u` are four values.
            unsafe { vst1q_f32(g.as_mut_ptr(), f(vld1q_f32(g.as_ptr()), vld1q_f32(u.as_ptr()))) };
            gate[i..n].copy_from_slice(&g[..n - i]);
        }
    }

    /// GeGLU gate: `gate = gelu(gate) ⊙ up`. With `1 + tanh(t) = 2 / (1 + e⁻²ᵗ)`,
    /// GELU's tanh form is `g / (1 + e⁻ᶻ)`, `z = 2√(2/π)(g + 0.044715g³)`:
    /// SiLU's shape at another argument, through the same [`exp`].
    pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { gelu_mul_neon(gate, up) }
    }

    #[target_feature(enable = "neon")]
    fn gelu_mul_neon(gate: &mut [f32], up: &[f32]) {
        const TWO_SQRT_2_OVER_PI: f32 = 2.0 * 0.797_884_6;
        let gelu_times = |g: float32x4_t, u: float32x4_t| {
            let cubic = vmulq_f32(vmulq_f32(g, g), vmulq_n_f32(g, 0.044715));
            let z = vmulq_n_f32(vaddq_f32(g, cubic), TWO_SQRT_2_OVER_PI);
            vmulq_f32(vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0), exp(vnegq_f32(z)))), u)
        };
        gate_times_up(gate, up, gelu_times);
    }

    /// Rotates one head's vector by RoPE, four pairs a step; products and
    /// differences rounded as in the reference, so the result is identical.
    pub fn rope(head: &mut [f32], cos: &[f32], sin: &[f32], halves: bool) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { rope_neon(head, cos, sin, halves) }
    }

    #[target_feature(enable = "neon")]
    fn rope_neon(head: &mut [f32], cos: &[f32], sin: &[f32], halves: bool) {
        let pairs = cos.len();
        assert!(sin.len() == pairs && head.len() >= 2 * pairs, "rope: {} values for {pairs} pairs", head.len());
        let rotate = |x0: float32x4_t, x1: float32x4_t, c: float32x4_t, s: float32x4_t| {
            (vsubq_f32(vmulq_f32(x0, c), vmulq_f32(x1, s)), vaddq_f32(vmulq_f32(x0, s), vmulq_f32(x1, c)))
        };
        let mut i = 0;
        while i + 4 <= pairs {
            // SAFETY: `i + 4 ≤ pairs`: the four pairs, cosines and sines are in bounds.
            unsafe {
                let (c, s) = (vld1q_f32(cos.as_ptr().add(i)), vld1q_f32(sin.as_ptr().add(i)));
                if halves {
                    let (a, b) = (head.as_mut_ptr().add(i), head.as_mut_ptr().add(i + pairs));
                    let (x0, x1) = rotate(vld1q_f32(a), vld1q_f32(b), c, s);
                    vst1q_f32(a, x0);
                    vst1q_f32(b, x1);
                } else {
                    // Deinterleave (2i, 2i + 1) pairs, rotate, interleave back.
                    let p = head.as_mut_ptr().add(2 * i);
                    let v = vld2q_f32(p);
                    let (x0, x1) = rotate(v.0, v.1, c, s);
                    vst2q_f32(p, float32x4x2_t(x0, x1));
                }
            }
            i += 4;
        }
        for i in i..pairs {
            let (a, b) = if halves { (i, i + pairs) } else { (2 * i, 2 * i + 1) };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}
