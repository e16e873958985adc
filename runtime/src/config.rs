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

/// Largest value of a size field, and of the widths `q_dim` and `kv_dim`
/// made from them: far above any model a board runs, far below where products
/// of a few of them could overflow 64 bits.
pub const MAX_FIELD: u32 = 1 << 24;

/// `a · b` in 64 bits, as a `usize`; `usize::MAX` when it does not fit, so
/// that a size computed from it fails its checked arithmetic or allocation
/// instead of wrapping to a small number.
fn wide_product(a: u32, b: u32) -> usize {
    usize::try_from(a as u64 * b as u64).unwrap_or(usize::MAX)
}

impl ModelConfig {
    /// Query width: `n_heads · head_dim`, computed in 64 bits (a config that
    /// passed [`validate`](Self::validate) keeps it at most [`MAX_FIELD`]).
    pub fn q_dim(&self) -> usize {
        wide_product(self.n_heads, self.head_dim)
    }
    /// Key/value width: `n_kv_heads · head_dim`, computed in 64 bits (at most
    /// [`MAX_FIELD`] once validated).
    pub fn kv_dim(&self) -> usize {
        wide_product(self.n_kv_heads, self.head_dim)
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
            if value == 0 || value > MAX_FIELD {
                return bad(&format!("{name} = {value} is out of range (1 to {MAX_FIELD})"));
            }
        }
        // The widths, in 64 bits: 32-bit products could wrap to a plausible
        // width that matches the tensors while the heads describe another.
        let too_wide: Vec<String> = [("n_heads", self.n_heads), ("n_kv_heads", self.n_kv_heads)]
            .into_iter()
            .filter_map(|(name, heads)| {
                let width = heads as u64 * self.head_dim as u64;
                (width > MAX_FIELD as u64).then(|| format!("{name} × head_dim = {heads} × {} = {width}", self.head_dim))
            })
            .collect();
        if !too_wide.is_empty() {
            let verb = if too_wide.len() == 1 { "is" } else { "are" };
            return bad(&format!("{} {verb} out of range (at most {MAX_FIELD})", too_wide.join(" and ")));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    /// A small valid config: 4 query heads of 32 sharing 2 key/value heads.
    fn config() -> ModelConfig {
        let mut c = ModelConfig::zeroed();
        c.arch = ARCH_LLAMA;
        (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) = (128, 2, 4, 2, 32, 320);
        (c.vocab_size, c.context_length, c.rope_theta, c.rope_dim, c.norm_eps) = (300, 256, 10000.0, 32, 1e-5);
        c
    }

    #[test]
    fn head_products_that_wrap_in_32_bits_are_refused_naming_the_fields() {
        assert!(config().validate().is_ok());
        // 2592 × 1657009 = 2³² + 32 and twice that: modulo 2³², the widths 64 and 32.
        let mut wrapping = config();
        (wrapping.head_dim, wrapping.n_kv_heads, wrapping.n_heads) = (2592, 1_657_009, 2 * 1_657_009);
        assert_eq!(
            (wrapping.n_heads.wrapping_mul(wrapping.head_dim), wrapping.n_kv_heads.wrapping_mul(wrapping.head_dim)),
            (64, 32)
        );
        let error = wrapping.validate().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unsupported);
        for part in ["n_heads × head_dim", "n_kv_heads × head_dim", "4294967328", "8589934656"] {
            assert!(error.message().contains(part), "{part}: {error}");
        }
        // The accessors give the true widths, not the wrapped ones.
        assert_eq!((wrapping.q_dim(), wrapping.kv_dim()), (8_589_934_656, 4_294_967_328));
        // Both widths too wide without wrapping: both named; then only the query width: one.
        let mut wide = config();
        (wide.head_dim, wide.n_heads, wide.n_kv_heads) = (1 << 22, 8, 8);
        let error = wide.validate().unwrap_err().to_string();
        assert!(error.contains("n_heads × head_dim = 8 × 4194304 = 33554432 and n_kv_heads"), "{error}");
        (wide.n_heads, wide.n_kv_heads, wide.head_dim) = (4, 2, 1 << 23);
        let error = wide.validate().unwrap_err().to_string();
        assert!(error.contains("n_heads × head_dim = 4 × 8388608 = 33554432 is out of range"), "{error}");
        assert!(!error.contains("n_kv_heads ×"), "{error}");
    }

    #[test]
    fn a_field_out_of_range_is_named() {
        for (field, value) in [("n_layers", 0), ("context_length", MAX_FIELD + 1), ("vocab_size", u32::MAX)] {
            let mut c = config();
            match field {
                "n_layers" => c.n_layers = value,
                "context_length" => c.context_length = value,
                _ => c.vocab_size = value,
            }
            let error = c.validate().unwrap_err().to_string();
            assert!(error.contains(&format!("{field} = {value} is out of range")), "{error}");
        }
    }
}
