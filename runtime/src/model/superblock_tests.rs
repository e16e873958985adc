//! The decode step's 256-value activations ([`crate::kernels::SuperblockKernels`])
//! through the whole forward pass: a small model whose matrices are all
//! interleaved Q4_K (four and eight rows) and Q6_K, decoded a token at a time with a kernel table
//! that has them and with the same table without, and run as one batch
//! (which keeps the 32-value blocks).

use super::window_tests::write_test_image;
use super::*;
use crate::architecture::Family;
use crate::config::ARCH_LLAMA;
use crate::kquant::{BlockQ4K, BlockQ6K};
use crate::quant::{interleave, BlockQ4Kx4, BlockQ4Kx8, BlockQ6Kx4, MAX_ROWS};
use bytemuck::Zeroable;
use std::path::Path;

fn config() -> ModelConfig {
    let mut c = ModelConfig::zeroed();
    c.arch = ARCH_LLAMA;
    (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) = (256, 2, 4, 2, 64, 512);
    (c.vocab_size, c.context_length, c.rope_theta, c.rope_dim, c.norm_eps) = (40, 64, 10000.0, 64, 1e-5);
    c.tied_output = 1;
    c
}

/// Writes the model: norms and the (tied) embedding f32, `ffn_down`
/// interleaved Q6_K, `attn_q` Q4_K four rows interleaved, every other
/// matrix Q4_K eight rows interleaved.
fn write_image(path: &Path) {
    let c = config();
    write_test_image(path, &c, &Architecture::plain(Family::Llama, &c), 3, |w, name, shape, values| {
        if shape.len() == 1 || name == "token_embd.weight" {
            w.add_tensor(name, Encoding::F32, shape, bytemuck::cast_slice(&values)).unwrap();
        } else if name.contains("ffn_down") {
            let rows: Vec<BlockQ6K> = values.chunks_exact(QK_K).map(BlockQ6K::quantize).collect();
            let mut mixed = vec![BlockQ6Kx4::zeroed(); rows.len() / INTERLEAVE];
            interleave(&rows, shape[1] / QK_K, &mut mixed);
            w.add_tensor(name, Encoding::Q6KX4, shape, bytemuck::cast_slice(&mixed)).unwrap();
        } else if name.contains("attn_q") {
            let rows: Vec<BlockQ4K> = values.chunks_exact(QK_K).map(BlockQ4K::quantize).collect();
            let mut mixed = vec![BlockQ4Kx4::zeroed(); rows.len() / INTERLEAVE];
            interleave(&rows, shape[1] / QK_K, &mut mixed);
            w.add_tensor(name, Encoding::Q4KX4, shape, bytemuck::cast_slice(&mixed)).unwrap();
        } else {
            let rows: Vec<BlockQ4K> = values.chunks_exact(QK_K).map(BlockQ4K::quantize).collect();
            let mut mixed = vec![BlockQ4Kx8::zeroed(); rows.len() / MAX_ROWS];
            interleave(&rows, shape[1] / QK_K, &mut mixed);
            w.add_tensor(name, Encoding::Q4KX8, shape, bytemuck::cast_slice(&mixed)).unwrap();
        }
    });
}

/// The scalar table with the scalar 256-value products, so that every
/// machine runs the path.
static SCALAR_SUPERBLOCK: Kernels = Kernels {
    superblock: Some(crate::kernels::SuperblockKernels {
        quantize: crate::kernels::activation::scalar::quantize_activation_q8k,
        matmul_q4kx4: crate::kernels::matmul::kquant::superblock::scalar::matmul_q4kx4,
        matmul_q4kx8: crate::kernels::matmul::kquant::superblock::scalar::matmul_q4kx8,
        matmul_q6kx4: crate::kernels::matmul::kquant::superblock::scalar::matmul_q6kx4,
    }),
    ..Kernels::SCALAR
};

/// Every position's logits, a token at a time.
fn decoded(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut state = model.new_state(tokens.len(), 1);
    let mut all = Vec::new();
    for (pos, &t) in tokens.iter().enumerate() {
        all.extend_from_slice(model.forward(&mut state, &[t], pos, Logits::Last).unwrap());
    }
    all
}

/// The largest difference between two runs' logits.
fn worst(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// One scale for 256 activation values instead of eight for 32: each value
/// moves by up to half a step of its super-block's largest (the FFN's
/// hidden values are heavy-tailed, so that step is coarser than the 32-value
/// blocks'), through two layers to logits up to about 2.3. Measured 2.7 %
/// of the largest logit when written (6.2e-2); `wo` handed the attention's
/// input instead of its output, as a wrong turn of the plumbing would,
/// measured 134 %.
const ACTIVATION_SCALE_TOLERANCE: f32 = 0.05;

#[test]
fn decode_steps_with_superblock_activations_follow_the_32_value_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kquants.bramble");
    write_image(&path);
    let image = ModelImage::open(&path).unwrap();
    let tokens: Vec<u32> = (0..12u32).map(|i| 3 + (i * 17 + i / 3) % 37).collect();
    let mut model = Model::new(&image).unwrap();
    // The scalar pair everywhere; the NEON table against itself without them where it runs.
    let detected = Kernels::detect();
    let per_block = Kernels { superblock: None, ..*detected };
    let per_block: &'static Kernels = Box::leak(Box::new(per_block));
    let mut pairs = vec![("scalar", &SCALAR_SUPERBLOCK, &Kernels::SCALAR)];
    if detected.superblock.is_some() {
        pairs.push((detected.name, detected, per_block));
    }
    for (name, with, without) in pairs {
        model.kernels = without;
        let expected = decoded(&model, &tokens);
        let range = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        model.kernels = with;
        let got = decoded(&model, &tokens);
        let gap = worst(&got, &expected);
        eprintln!("{name}: max |Δlogit| {gap:e} against the 32-value blocks, |logit| up to {range:.2}");
        assert!(gap > 0.0, "{name}: the decode steps did not take the 256-value activations");
        assert!(gap <= ACTIVATION_SCALE_TOLERANCE * range, "{name}: max |Δlogit| {gap} against the 32-value blocks");
        // A batch keeps the 32-value blocks: as the table without them.
        let mut state = model.new_state(tokens.len(), tokens.len());
        let batch = model.forward(&mut state, &tokens, 0, Logits::All).unwrap().to_vec();
        model.kernels = without;
        let mut state = model.new_state(tokens.len(), tokens.len());
        let batch_without = model.forward(&mut state, &tokens, 0, Logits::All).unwrap().to_vec();
        assert_eq!(batch, batch_without, "{name}: a batch took the 256-value activations");
    }
}
