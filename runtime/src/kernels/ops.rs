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

    /// `out += weight · x`.
    pub fn axpy(out: &mut [f32], weight: f32, x: &[f32]) {
        for (o, v) in out.iter_mut().zip(x) {
            *o += weight * v;
        }
    }
}
