//! Matrix × activation-batch products, by weight encoding.

/// Reference implementations: plain loops, one weight row at a time against
/// every activation of the batch, so a row is read from memory once.
pub mod scalar {
    use crate::quant::{BlockQ4, BlockQ4S, BlockQ8, BlockQ8Act, GROUP};
    use half::f16;

    /// Integer dot product of one Q8 row with one activation.
    pub fn dot_q8_q8(row: &[BlockQ8], x: &[BlockQ8Act]) -> f32 {
        let mut sum = 0f32;
        for (w, a) in row.iter().zip(x) {
            let mut isum = 0i32;
            for j in 0..GROUP {
                isum += w.qs[j] as i32 * a.qs[j] as i32;
            }
            sum += w.d.to_f32() * a.d * isum as f32;
        }
        sum
    }

    /// Dot product of one asymmetric Q4 row with one activation:
    /// Σ (d·n + m)·(dₓ·q) = d·dₓ·Σ n·q + m·(dₓ·Σq), the last factor being `s`.
    pub fn dot_q4_q8(row: &[BlockQ4], x: &[BlockQ8Act]) -> f32 {
        let mut sum = 0f32;
        for (w, a) in row.iter().zip(x) {
            let mut isum = 0i32;
            for j in 0..GROUP / 2 {
                isum += (w.qs[j] & 0xF) as i32 * a.qs[j] as i32;
                isum += (w.qs[j] >> 4) as i32 * a.qs[j + GROUP / 2] as i32;
            }
            sum += w.d.to_f32() * a.d * isum as f32 + w.m.to_f32() * a.s;
        }
        sum
    }

    /// Dot product of one symmetric Q4 row with one activation.
    pub fn dot_q4s_q8(row: &[BlockQ4S], x: &[BlockQ8Act]) -> f32 {
        let mut sum = 0f32;
        for (w, a) in row.iter().zip(x) {
            let mut isum = 0i32;
            for j in 0..GROUP / 2 {
                isum += ((w.qs[j] & 0xF) as i32 - 8) * a.qs[j] as i32;
                isum += ((w.qs[j] >> 4) as i32 - 8) * a.qs[j + GROUP / 2] as i32;
            }
            sum += w.d.to_f32() * a.d * isum as f32;
        }
        sum
    }

    fn matmul_blocks<B>(weights: &[B], rows: usize, cols: usize, x: &[BlockQ8Act], out: &mut [f32], dot: fn(&[B], &[BlockQ8Act]) -> f32) {
        let blocks = cols / GROUP;
        let batch = x.len() / blocks;
        debug_assert_eq!(weights.len(), rows * blocks);
        debug_assert_eq!(out.len(), rows * batch);
        for (r, row) in weights.chunks_exact(blocks).enumerate() {
            for (b, activation) in x.chunks_exact(blocks).enumerate() {
                out[b * rows + r] = dot(row, activation);
            }
        }
    }

    /// Q8 matrix × int8 activations.
    pub fn matmul_q8(weights: &[BlockQ8], rows: usize, cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        matmul_blocks(weights, rows, cols, x, out, dot_q8_q8)
    }
    /// Asymmetric Q4 matrix × int8 activations.
    pub fn matmul_q4(weights: &[BlockQ4], rows: usize, cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        matmul_blocks(weights, rows, cols, x, out, dot_q4_q8)
    }
    /// Symmetric Q4 matrix × int8 activations.
    pub fn matmul_q4s(weights: &[BlockQ4S], rows: usize, cols: usize, x: &[BlockQ8Act], out: &mut [f32]) {
        matmul_blocks(weights, rows, cols, x, out, dot_q4s_q8)
    }

    /// f16 matrix × f32 activations, accumulated in f32.
    pub fn matmul_f16(weights: &[f16], rows: usize, cols: usize, x: &[f32], out: &mut [f32]) {
        let batch = x.len() / cols;
        for (r, row) in weights.chunks_exact(cols).enumerate() {
            for (b, activation) in x.chunks_exact(cols).enumerate() {
                let mut sum = 0f32;
                for (w, a) in row.iter().zip(activation) {
                    sum += w.to_f32() * a;
                }
                out[b * rows + r] = sum;
            }
        }
        debug_assert_eq!(out.len(), rows * batch);
    }

    /// f32 matrix × f32 activations.
    pub fn matmul_f32(weights: &[f32], rows: usize, cols: usize, x: &[f32], out: &mut [f32]) {
        for (r, row) in weights.chunks_exact(cols).enumerate() {
            for (b, activation) in x.chunks_exact(cols).enumerate() {
                out[b * rows + r] = row.iter().zip(activation).map(|(w, a)| w * a).sum();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::scalar::*;
    use crate::kernels::activation::scalar::quantize_activation;
    use crate::quant::*;

    /// Integer paths against a plain f32 product of the dequantized weights and
    /// the unquantized activations: the only error is activation rounding.
    const ACTIVATION_ROUNDING_BUDGET: f32 = 0.01;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn quantized_matmuls_match_f32_on_dequantized_weights() {
        let (rows, cols, batch) = (7, 96, 3);
        let w = data(rows * cols, 1);
        let x = data(batch * cols, 2);
        let mut xq = vec![BlockQ8Act { d: 0.0, s: 0.0, qs: [0; GROUP] }; batch * cols / GROUP];
        quantize_activation(&x, &mut xq);
        for enc in [Encoding::Q8, Encoding::Q4, Encoding::Q4S] {
            let mut bytes = vec![0u8; enc.bytes_for(w.len())];
            quantize_into(enc, &w, &mut bytes);
            let mut wd = vec![0f32; w.len()];
            dequantize_from(enc, &bytes, &mut wd);
            let mut expected = vec![0f32; rows * batch];
            matmul_f32(&wd, rows, cols, &x, &mut expected);
            let mut got = vec![0f32; rows * batch];
            match enc {
                Encoding::Q8 => matmul_q8(&bytemuck::pod_collect_to_vec(&bytes), rows, cols, &xq, &mut got),
                Encoding::Q4 => matmul_q4(&bytemuck::pod_collect_to_vec(&bytes), rows, cols, &xq, &mut got),
                _ => matmul_q4s(&bytemuck::pod_collect_to_vec(&bytes), rows, cols, &xq, &mut got),
            }
            let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (e, g) in expected.iter().zip(&got) {
                assert!((e - g).abs() <= ACTIVATION_ROUNDING_BUDGET * scale, "{enc:?}: {e} vs {g}");
            }
        }
    }
}
