//! Quantization of activations to int8 blocks ([`BlockQ8Act`]) for the integer dot products.

/// Reference implementation.
pub mod scalar {
    use crate::quant::{BlockQ8Act, GROUP};

    /// Per block of 32: `d = max|x| / 127`, `q = round(x / d)`, `s = d · Σq`.
    pub fn quantize_activation(x: &[f32], out: &mut [BlockQ8Act]) {
        debug_assert_eq!(x.len(), out.len() * GROUP);
        for (block, values) in out.iter_mut().zip(x.chunks_exact(GROUP)) {
            let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in block.qs.iter_mut().zip(values) {
                *q = (v * id).round() as i8;
                sum += *q as i32;
            }
            block.d = d;
            block.s = d * sum as f32;
        }
    }
}
