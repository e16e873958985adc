//! A tiny valid image for the runtime's integration tests.
#![allow(dead_code)]

use bramble_runtime::config::ARCH_LLAMA;
use bramble_runtime::image::layout::section;
use bramble_runtime::image::{encode_vocab, ImageWriter};
use bramble_runtime::quant::{interleave_bytes, quantize_into, to_channel_major, Encoding};
use bramble_runtime::vocab::{TokenType, Vocab};
use bramble_runtime::ModelConfig;
use bytemuck::Zeroable;
use std::path::Path;

pub fn tiny_config() -> ModelConfig {
    let mut c = ModelConfig::zeroed();
    c.arch = ARCH_LLAMA;
    c.dim = 32;
    c.n_layers = 1;
    c.n_heads = 2;
    c.n_kv_heads = 1;
    c.head_dim = 16;
    c.ffn_dim = 64;
    c.vocab_size = 6;
    c.context_length = 16;
    c.rope_theta = 10000.0;
    c.rope_dim = 16;
    c.norm_eps = 1e-5;
    c.tied_output = 1;
    c
}

pub fn tiny_vocab() -> Vocab {
    let tokens = ["<unk>", "<s>", "</s>", "▁a", "b", "▁ab"];
    Vocab::llama_sentencepiece(
        tokens.iter().map(|t| t.as_bytes().to_vec()).collect(),
        vec![0.0, 0.0, 0.0, -1.0, -2.0, -3.0],
        vec![
            TokenType::Unknown,
            TokenType::Control,
            TokenType::Control,
            TokenType::Normal,
            TokenType::Normal,
            TokenType::Normal,
        ],
    )
}

/// Writes a valid tiny image (q4 matrices, q8 embedding) and returns its bytes.
pub fn write_tiny(path: &Path, extra: impl FnOnce(&mut ImageWriter)) -> Vec<u8> {
    write_tiny_with_layout(path, false, extra)
}

/// As [`write_tiny`], the same values; with `interleave`, the quantized
/// matrices of whole groups of four rows are stored four rows interleaved
/// (the six-row embedding stays row-major).
pub fn write_tiny_with_layout(path: &Path, interleave: bool, extra: impl FnOnce(&mut ImageWriter)) -> Vec<u8> {
    write_tiny_stored(path, if interleave { Store::Interleaved } else { Store::Rows }, extra)
}

/// How [`write_tiny_stored`] stores the Q8 and Q4 matrices.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// Row-major.
    Rows,
    /// Four rows interleaved, where the rows are whole groups of four.
    Interleaved,
    /// Channel-major projections (`q8c`/`q4c`), where the rows are whole tiles of 32.
    Channels,
}

/// The tiny image with its quantized matrices stored as `store` says.
pub fn write_tiny_stored(path: &Path, store: Store, extra: impl FnOnce(&mut ImageWriter)) -> Vec<u8> {
    let c = tiny_config();
    let mut w = ImageWriter::create(path).unwrap();
    w.add_section(section::CONFIG, bytemuck::bytes_of(&c), true).unwrap();
    w.add_section(section::TOKENIZER, &encode_vocab(&tiny_vocab()).unwrap(), true).unwrap();
    extra(&mut w);
    let mut seed = 1u32;
    let mut tensor = |w: &mut ImageWriter, name: &str, enc: Encoding, shape: &[usize]| {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        let mut bytes = vec![0u8; enc.bytes_for(n)];
        quantize_into(enc, &values, &mut bytes);
        let projection = name.starts_with("blk.");
        match (store, enc.interleaved(), enc.channel_major()) {
            (Store::Interleaved, Some(mixed), _) if shape[0].is_multiple_of(4) => {
                let mut interleaved = vec![0u8; bytes.len()];
                interleave_bytes(mixed, &bytes, shape[1], &mut interleaved);
                w.add_tensor(name, mixed, shape, &interleaved).unwrap();
            }
            (Store::Channels, _, Some(columns)) if projection && shape[0].is_multiple_of(32) => {
                let mut by_channel = vec![0u8; bytes.len()];
                to_channel_major(columns, &bytes, shape[1], &mut by_channel);
                w.add_tensor(name, columns, shape, &by_channel).unwrap();
            }
            _ => w.add_tensor(name, enc, shape, &bytes).unwrap(),
        }
    };
    tensor(&mut w, "token_embd.weight", Encoding::Q8, &[6, 32]);
    tensor(&mut w, "blk.0.attn_norm.weight", Encoding::F32, &[32]);
    tensor(&mut w, "blk.0.attn_q.weight", Encoding::Q4, &[32, 32]);
    tensor(&mut w, "blk.0.attn_k.weight", Encoding::Q4S, &[16, 32]);
    tensor(&mut w, "blk.0.attn_v.weight", Encoding::F16, &[16, 32]);
    tensor(&mut w, "blk.0.attn_output.weight", Encoding::Q4, &[32, 32]);
    tensor(&mut w, "blk.0.ffn_norm.weight", Encoding::F32, &[32]);
    tensor(&mut w, "blk.0.ffn_gate.weight", Encoding::Q4, &[64, 32]);
    tensor(&mut w, "blk.0.ffn_up.weight", Encoding::Q8, &[64, 32]);
    tensor(&mut w, "blk.0.ffn_down.weight", Encoding::F32, &[32, 64]);
    tensor(&mut w, "output_norm.weight", Encoding::F32, &[32]);
    w.finish().unwrap();
    std::fs::read(path).unwrap()
}
