//! The model's hyperparameters, as stored in the image's `config` section.

use crate::error::{Error, Result};
use bytemuck::{Pod, Zeroable};

/// `ModelConfig::arch` for the Llama architecture.
pub const ARCH_LLAMA: u32 = 1;

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimensions (2i, 2i+1) rotate together: Meta's and GGUF's layout.
    AdjacentPairs,
    /// Dimensions (i, i + rope_dim/2) rotate together: the NeoX / Hugging Face layout.
    Halves,
}

/// Hyperparameters of a Llama model. 128 bytes, `#[repr(C)]`, read in place from the image.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct ModelConfig {
    /// Architecture: [`ARCH_LLAMA`].
    pub arch: u32,
    /// Model width (residual stream).
    pub dim: u32,
    /// Number of transformer blocks.
    pub n_layers: u32,
    /// Query heads.
    pub n_heads: u32,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: u32,
    /// Width of one head.
    pub head_dim: u32,
    /// SwiGLU hidden width.
    pub ffn_dim: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Context length the model was trained for.
    pub context_length: u32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// 0: adjacent pairs, 1: halves. See [`RopeStyle`].
    pub rope_style: u32,
    /// Dimensions of each head that RoPE rotates.
    pub rope_dim: u32,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// 1 when the output layer shares `token_embd.weight`.
    pub tied_output: u32,
    /// Zero.
    pub reserved: [u32; 18],
}

const _: () = assert!(std::mem::size_of::<ModelConfig>() == 128);

impl ModelConfig {
    /// Query width: `n_heads · head_dim`.
    pub fn q_dim(&self) -> usize {
        (self.n_heads * self.head_dim) as usize
    }
    /// Key/value width: `n_kv_heads · head_dim`.
    pub fn kv_dim(&self) -> usize {
        (self.n_kv_heads * self.head_dim) as usize
    }
    /// The RoPE pairing.
    pub fn rope_style(&self) -> RopeStyle {
        if self.rope_style == 1 {
            RopeStyle::Halves
        } else {
            RopeStyle::AdjacentPairs
        }
    }

    /// Checks that the numbers describe a model this runtime can run.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::unsupported(format!("model config: {what}")));
        if self.arch != ARCH_LLAMA {
            return bad(&format!("arch {} is not llama (1)", self.arch));
        }
        for (name, value) in [
            ("dim", self.dim),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("ffn_dim", self.ffn_dim),
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
        ] {
            if value == 0 || value > 1 << 24 {
                return bad(&format!("{name} = {value} is out of range"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(&format!("n_heads {} is not a multiple of n_kv_heads {}", self.n_heads, self.n_kv_heads));
        }
        if !self.head_dim.is_multiple_of(2) || self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return bad(&format!(
                "head_dim {} / rope_dim {} must be even, rope_dim ≤ head_dim",
                self.head_dim, self.rope_dim
            ));
        }
        if self.rope_style > 1 {
            return bad(&format!("rope_style {} is unknown", self.rope_style));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(&format!("rope_theta {} is not a positive number", self.rope_theta));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return bad(&format!("norm_eps {} is not a non-negative number", self.norm_eps));
        }
        Ok(())
    }
}
