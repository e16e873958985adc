//! Compute kernels, one file per family, each with a scalar reference
//! (`scalar` submodule, compiled everywhere). Architecture-specific versions
//! sit beside it and are chosen once, at load, into a [`Kernels`] table of
//! function pointers; model code calls through the table and contains no `cfg`.
//!
//! Tables: [`Kernels::SCALAR`] everywhere; on aarch64 `Kernels::NEON`
//! (ARMv8.0, the Raspberry Pi 4) and `Kernels::NEON_DOTPROD` (with `sdot`,
//! the Raspberry Pi 5); on x86-64 `Kernels::AVX2` (the host tools, with FMA
//! and F16C) and `Kernels::AVX512_VNNI` (with AVX-512 F, BW, VL and VNNI).
//! [`Kernels::detect`] picks one with
//! `is_aarch64_feature_detected!("dotprod")` or
//! `is_x86_feature_detected!` ("avx512vnni" and the rest, else "avx2",
//! "fma", "f16c"); `tests.rs` checks every table the CPU runs against the
//! reference.

pub mod activation;
pub mod attention;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod sparse;
#[cfg(test)]
mod tests;

use crate::kquant::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K};
use crate::quant::{BlockQ2Kx4, BlockQ3Kx4, BlockQ5Kx4};
use crate::quant::{
    BlockQ4, BlockQ4Kx4, BlockQ4Kx8, BlockQ4S, BlockQ4Sx4, BlockQ4x4, BlockQ6Kx4, BlockQ8, BlockQ8Act, BlockQ8K,
    BlockQ8x4,
};
use crate::quant::{BlockQ4B, BlockQ4Bx4, BlockQ5, BlockQ5S, BlockQ5Sx4, BlockQ5x4};
use half::f16;

/// `out[r·batch + b] = W[r] · x[b]` for every row `r` of `weights` (some whole
/// rows of `cols` values; for the interleaved blocks, whole groups of four
/// rows) and every activation `b` of a batch of `x.len() / (cols / 32)`. Rows
/// outermost in `out`, so that a range of rows is a contiguous piece of it
/// and workers can split a product by rows.
pub type MatmulQuantized<Block> = fn(weights: &[Block], cols: usize, x: &[BlockQ8Act], out: &mut [f32]);
/// As [`MatmulQuantized`] for float weights and f32 activations (batch `x.len() / cols`).
pub type MatmulFloat<T> = fn(weights: &[T], cols: usize, x: &[f32], out: &mut [f32]);

/// Attention scores of a group of query heads against the cached keys:
/// `(queries, head_dim, keys, scale, scores)` ([`attention`]).
pub type AttentionScores = fn(&[f32], usize, &attention::CachedVectors, f32, &mut [f32]);
/// Score-weighted sums of the cached values for a group of heads:
/// `(weights, values, head_dim, out)` ([`attention`]).
pub type AttentionValues = fn(&[f32], &attention::CachedVectors, usize, &mut [f32]);
/// Attention scores of a group of query heads against quantized keys:
/// `(queries, head_dim, keys, scale, scores, row)` ([`attention`]).
pub type AttentionScoresQuantized = fn(&[f32], usize, &attention::QuantizedKeys, f32, &mut [f32], usize);
/// Score-weighted sums of quantized values for a group of heads:
/// `(weights, row, values, head_dim, out)` ([`attention`]).
pub type AttentionValuesQuantized = fn(&[f32], usize, &attention::QuantizedValues, usize, &mut [f32]);
/// As [`AttentionScores`] over keys stored as f16 (the f16 KV cache).
pub type AttentionScoresF16 = fn(&[f32], usize, &attention::CachedVectors<f16>, f32, &mut [f32]);
/// As [`AttentionValues`] over values stored as f16.
pub type AttentionValuesF16 = fn(&[f32], &attention::CachedVectors<f16>, usize, &mut [f32]);
/// Causal attention of a batch of tokens' query heads that share a KV head, over the f32 cache:
/// `(shape, queries, keys, values, scratch, out)` ([`attention::Causal`]).
pub type AttentionCausal = fn(&attention::Causal, &[f32], &[f32], &[f32], &mut [f32], &mut [f32]);
/// As [`AttentionCausal`] over the f16 cache.
pub type AttentionCausalF16 = fn(&attention::Causal, &[f32], &[f16], &[f16], &mut [f32], &mut [f32]);
/// The bias constraint on one hidden state: `(h, r, d, w, centre)`, `p = h · r`,
/// `h ← h − w (p − centre) d`; returns `p`.
pub type ProjectOut = fn(h: &mut [f32], r: &[f32], d: &[f32], w: f32, centre: f32) -> f32;

/// A product of interleaved k-quant weights with [`BlockQ8K`] activations
/// (one scale a super-block), the contract of [`MatmulQuantized`] otherwise.
pub type MatmulSuperblock<Block> = fn(weights: &[Block], cols: usize, x: &[BlockQ8K], out: &mut [f32]);

/// Decode-step products of Q4_K and Q6_K matrices with activations under
/// one scale a super-block, for tables whose 32-value products pay a float
/// step a sub-block ([`matmul::kquant::superblock`]).
#[derive(Debug, Clone, Copy)]
pub struct SuperblockKernels {
    /// Quantizes f32 activations to [`BlockQ8K`] (a multiple of 256 values).
    pub quantize: fn(x: &[f32], out: &mut [BlockQ8K]),
    /// Interleaved Q4_K weights × Q8_K activations.
    pub matmul_q4kx4: MatmulSuperblock<BlockQ4Kx4>,
    /// Eight-row interleaved Q4_K weights × Q8_K activations.
    pub matmul_q4kx8: MatmulSuperblock<BlockQ4Kx8>,
    /// Interleaved Q6_K weights × Q8_K activations.
    pub matmul_q6kx4: MatmulSuperblock<BlockQ6Kx4>,
}

/// The kernels a model runs with, chosen once at load.
#[derive(Debug, Clone, Copy)]
pub struct Kernels {
    /// Which implementation: `"scalar"`, `"neon"`, `"neon-dotprod"`, `"avx2"` or `"avx512-vnni"`.
    pub name: &'static str,
    /// Quantizes f32 activations to int8 blocks.
    pub quantize_activation: fn(x: &[f32], out: &mut [BlockQ8Act]),
    /// What a decode step's interleaved Q4_K and Q6_K products take
    /// instead of the 32-value blocks, where this table has them.
    pub superblock: Option<SuperblockKernels>,
    /// Q8 weights × int8 activations.
    pub matmul_q8: MatmulQuantized<BlockQ8>,
    /// Asymmetric Q4 weights × int8 activations.
    pub matmul_q4: MatmulQuantized<BlockQ4>,
    /// Symmetric Q4 weights × int8 activations.
    pub matmul_q4s: MatmulQuantized<BlockQ4S>,
    /// Interleaved Q8 weights × int8 activations.
    pub matmul_q8x4: MatmulQuantized<BlockQ8x4>,
    /// Interleaved asymmetric Q4 weights × int8 activations.
    pub matmul_q4x4: MatmulQuantized<BlockQ4x4>,
    /// Interleaved symmetric Q4 weights × int8 activations.
    pub matmul_q4sx4: MatmulQuantized<BlockQ4Sx4>,
    /// ggml Q4_K weights (row-major super-blocks of 256) × int8 activations.
    pub matmul_q4k: MatmulQuantized<BlockQ4K>,
    /// ggml Q5_K weights × int8 activations.
    pub matmul_q5k: MatmulQuantized<BlockQ5K>,
    /// ggml Q6_K weights × int8 activations.
    pub matmul_q6k: MatmulQuantized<BlockQ6K>,
    /// ggml Q3_K weights × int8 activations.
    pub matmul_q3k: MatmulQuantized<BlockQ3K>,
    /// ggml Q2_K weights × int8 activations.
    pub matmul_q2k: MatmulQuantized<BlockQ2K>,
    /// ggml Q4_K weights, four rows interleaved, × int8 activations.
    pub matmul_q4kx4: MatmulQuantized<BlockQ4Kx4>,
    /// ggml Q4_K weights, eight rows interleaved, × int8 activations.
    pub matmul_q4kx8: MatmulQuantized<BlockQ4Kx8>,
    /// ggml Q6_K weights, four rows interleaved, × int8 activations.
    pub matmul_q6kx4: MatmulQuantized<BlockQ6Kx4>,
    /// ggml Q3_K weights, four rows interleaved, × int8 activations.
    pub matmul_q3kx4: MatmulQuantized<BlockQ3Kx4>,
    /// ggml Q5_K weights, four rows interleaved, × int8 activations.
    pub matmul_q5kx4: MatmulQuantized<BlockQ5Kx4>,
    /// ggml Q2_K weights, four rows interleaved, × int8 activations.
    pub matmul_q2kx4: MatmulQuantized<BlockQ2Kx4>,
    /// Symmetric Q5 weights (ggml's Q5_0) × int8 activations.
    pub matmul_q5s: MatmulQuantized<BlockQ5S>,
    /// Interleaved symmetric Q5 weights × int8 activations.
    pub matmul_q5sx4: MatmulQuantized<BlockQ5Sx4>,
    /// Asymmetric Q5 weights (ggml's Q5_1) × int8 activations.
    pub matmul_q5: MatmulQuantized<BlockQ5>,
    /// Interleaved asymmetric Q5 weights × int8 activations.
    pub matmul_q5x4: MatmulQuantized<BlockQ5x4>,
    /// Q4B weights × int8 activations, each row's sum in units of its row
    /// scale (the caller multiplies by the scales).
    pub matmul_q4b: MatmulQuantized<BlockQ4B>,
    /// Interleaved Q4B weights × int8 activations, in units of the row scales.
    pub matmul_q4bx4: MatmulQuantized<BlockQ4Bx4>,
    /// Channel-major Q8 weights × one int8 activation, over the active channels.
    pub matmul_q8c: matmul::channels::MatmulChannels,
    /// Channel-major asymmetric Q4 weights × one int8 activation, over the active channels.
    pub matmul_q4c: matmul::channels::MatmulChannels,
    /// Channel-major Q8 weights × a batch of int8 activations, every channel (a prompt's GEMM).
    pub gemm_q8c: matmul::channels::GemmChannels,
    /// Channel-major asymmetric Q4 weights × a batch of int8 activations, every channel.
    pub gemm_q4c: matmul::channels::GemmChannels,
    /// f16 weights × f32 activations.
    pub matmul_f16: MatmulFloat<f16>,
    /// f32 weights × f32 activations.
    pub matmul_f32: MatmulFloat<f32>,
    /// RMSNorm: `(out, x, weight, eps)`.
    pub rmsnorm: fn(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32),
    /// In-place softmax.
    pub softmax: fn(x: &mut [f32]),
    /// `gate = silu(gate) ⊙ up`.
    pub silu_mul: fn(gate: &mut [f32], up: &[f32]),
    /// `gate = gelu(gate) ⊙ up` (GELU's tanh approximation; Gemma's GeGLU).
    pub gelu_mul: fn(gate: &mut [f32], up: &[f32]),
    /// RoPE on one head: `(head, cos, sin, halves)`.
    pub rope: fn(head: &mut [f32], cos: &[f32], sin: &[f32], halves: bool),
    /// Attention scores over the KV cache.
    pub attention_scores: AttentionScores,
    /// Attention-weighted values over the KV cache.
    pub attention_values: AttentionValues,
    /// Attention scores over 8-bit quantized keys.
    pub attention_scores_q8: AttentionScoresQuantized,
    /// Attention scores over 4-bit quantized keys.
    pub attention_scores_q4: AttentionScoresQuantized,
    /// Attention-weighted 8-bit quantized values.
    pub attention_values_q8: AttentionValuesQuantized,
    /// Attention-weighted 4-bit quantized values.
    pub attention_values_q4: AttentionValuesQuantized,
    /// A prompt batch's causal attention over the f32 cache, a KV head at a time.
    pub attention_causal: AttentionCausal,
    /// A prompt batch's causal attention over the f16 cache, a KV head at a time.
    pub attention_causal_f16: AttentionCausalF16,
    /// Attention scores over f16 keys.
    pub attention_scores_f16: AttentionScoresF16,
    /// Attention-weighted f16 values.
    pub attention_values_f16: AttentionValuesF16,
    /// `(values, out)`: a position's keys or values rounded to f16 as the f16 cache stores them.
    pub round_to_f16: fn(values: &[f32], out: &mut [f16]),
    /// R-Sparse's split of a layer input into exact and low-rank channels.
    pub sparse_split: sparse::Split,
    /// R-Sparse's `out += U · low`, `U` stored column by column.
    pub low_rank_add: sparse::LowRankAdd,
    /// The bias constraint on one hidden state: `(h, r, d, w, centre) → h · r`, `h −= w·(h·r − centre)·d`.
    pub project_out: ProjectOut,
    /// `(src, rows, dst)`: a batch's products from rows outermost to tokens outermost.
    pub transpose: fn(src: &[f32], rows: usize, dst: &mut [f32]),
}

impl Kernels {
    /// The scalar reference kernels.
    pub const SCALAR: Kernels = Kernels {
        name: "scalar",
        quantize_activation: activation::scalar::quantize_activation,
        superblock: None,
        matmul_q8: matmul::scalar::matmul_q8,
        matmul_q4: matmul::scalar::matmul_q4,
        matmul_q4s: matmul::scalar::matmul_q4s,
        matmul_q8x4: matmul::scalar::matmul_q8x4,
        matmul_q4x4: matmul::scalar::matmul_q4x4,
        matmul_q4sx4: matmul::scalar::matmul_q4sx4,
        matmul_q4k: matmul::kquant::scalar::matmul_q4k,
        matmul_q5k: matmul::kquant::scalar::matmul_q5k,
        matmul_q6k: matmul::kquant::scalar::matmul_q6k,
        matmul_q3k: matmul::kquant::scalar::matmul_q3k,
        matmul_q2k: matmul::kquant::scalar::matmul_q2k,
        matmul_q4kx4: matmul::kquant::interleaved::scalar::matmul_q4kx4,
        matmul_q4kx8: matmul::kquant::interleaved::scalar::matmul_q4kx8,
        matmul_q6kx4: matmul::kquant::interleaved::scalar::matmul_q6kx4,
        matmul_q3kx4: matmul::kquant::interleaved35::scalar::matmul_q3kx4,
        matmul_q5kx4: matmul::kquant::interleaved35::scalar::matmul_q5kx4,
        matmul_q2kx4: matmul::kquant::interleaved35::scalar::matmul_q2kx4,
        matmul_q5s: matmul::q5::scalar::matmul_q5s,
        matmul_q5sx4: matmul::q5::scalar::matmul_q5sx4,
        matmul_q5: matmul::q5::scalar::matmul_q5,
        matmul_q5x4: matmul::q5::scalar::matmul_q5x4,
        matmul_q4b: matmul::scalar::matmul_q4b,
        matmul_q4bx4: matmul::scalar::matmul_q4bx4,
        matmul_q8c: matmul::channels::scalar::matmul_q8c,
        matmul_q4c: matmul::channels::scalar::matmul_q4c,
        gemm_q8c: matmul::channels::scalar::gemm_q8c,
        gemm_q4c: matmul::channels::scalar::gemm_q4c,
        matmul_f16: matmul::scalar::matmul_f16,
        matmul_f32: matmul::scalar::matmul_f32,
        rmsnorm: ops::scalar::rmsnorm,
        softmax: ops::scalar::softmax,
        silu_mul: ops::scalar::silu_mul,
        gelu_mul: ops::scalar::gelu_mul,
        rope: ops::scalar::rope,
        attention_scores: attention::scalar::scores,
        attention_values: attention::scalar::values,
        attention_scores_q8: attention::scalar::scores_q8,
        attention_scores_q4: attention::scalar::scores_q4,
        attention_values_q8: attention::scalar::values_q8,
        attention_values_q4: attention::scalar::values_q4,
        attention_causal: attention::scalar::causal,
        attention_causal_f16: attention::scalar::causal_f16,
        attention_scores_f16: attention::scalar::scores_f16,
        attention_values_f16: attention::scalar::values_f16,
        round_to_f16: attention::scalar::round_to_f16,
        sparse_split: sparse::scalar::split,
        low_rank_add: sparse::scalar::low_rank_add,
        project_out: ops::scalar::project_out,
        transpose: ops::scalar::transpose,
    };

    /// ARMv8.0 NEON kernels: every aarch64 CPU (the Raspberry Pi 4's Cortex-A72).
    #[cfg(target_arch = "aarch64")]
    pub const NEON: Kernels = Kernels {
        name: "neon",
        quantize_activation: activation::neon::quantize_activation,
        // Decode steps scale their Q4_K and Q6_K sums in integers (the x86-64 tables do not: their
        // host tools' perplexity keeps the 32-value blocks).
        superblock: Some(SuperblockKernels {
            quantize: activation::neon::quantize_activation_q8k,
            matmul_q4kx4: matmul::kquant::superblock::neon::matmul_q4kx4,
            matmul_q4kx8: matmul::kquant::superblock::x8::neon::matmul_q4kx8,
            matmul_q6kx4: matmul::kquant::superblock::neon::matmul_q6kx4,
        }),
        matmul_q8: matmul::neon::matmul_q8,
        matmul_q4: matmul::neon::matmul_q4,
        matmul_q4s: matmul::neon::matmul_q4s,
        matmul_q8x4: matmul::interleaved::matmul_q8x4,
        matmul_q4x4: matmul::interleaved::matmul_q4x4,
        matmul_q4sx4: matmul::interleaved::matmul_q4sx4,
        matmul_q4k: matmul::kquant::neon::matmul_q4k,
        matmul_q5k: matmul::kquant::neon::matmul_q5k,
        matmul_q6k: matmul::kquant::neon::matmul_q6k,
        matmul_q3k: matmul::kquant::neon::matmul_q3k,
        matmul_q2k: matmul::kquant::neon::matmul_q2k,
        matmul_q4kx4: matmul::kquant::interleaved::neon::matmul_q4kx4,
        matmul_q4kx8: matmul::kquant::interleaved::neon::matmul_q4kx8,
        matmul_q6kx4: matmul::kquant::interleaved::neon::matmul_q6kx4,
        matmul_q3kx4: matmul::kquant::interleaved35::neon::matmul_q3kx4,
        matmul_q5kx4: matmul::kquant::interleaved35::neon::matmul_q5kx4,
        matmul_q2kx4: matmul::kquant::interleaved35::neon::matmul_q2kx4,
        matmul_q5s: matmul::q5::neon::matmul_q5s,
        matmul_q5sx4: matmul::q5::neon::matmul_q5sx4,
        matmul_q5: matmul::q5::neon::matmul_q5,
        matmul_q5x4: matmul::q5::neon::matmul_q5x4,
        // Row-major Q4B is the scalar reference's everywhere: images store it four rows interleaved.
        matmul_q4b: matmul::scalar::matmul_q4b,
        matmul_q4bx4: matmul::interleaved::matmul_q4bx4,
        matmul_q8c: matmul::channels::neon::matmul_q8c,
        matmul_q4c: matmul::channels::neon::matmul_q4c,
        gemm_q8c: matmul::channels::neon::gemm_q8c,
        gemm_q4c: matmul::channels::neon::gemm_q4c,
        matmul_f16: matmul::neon::matmul_f16,
        matmul_f32: matmul::neon::matmul_f32,
        rmsnorm: ops::neon::rmsnorm,
        softmax: ops::neon::softmax,
        silu_mul: ops::neon::silu_mul,
        gelu_mul: ops::neon::gelu_mul,
        rope: ops::neon::rope,
        attention_scores: attention::neon::scores,
        attention_values: attention::neon::values,
        attention_scores_q8: attention::neon::scores_q8,
        attention_scores_q4: attention::neon::scores_q4,
        attention_values_q8: attention::neon::values_q8,
        attention_values_q4: attention::neon::values_q4,
        attention_causal: attention::neon::causal,
        attention_causal_f16: attention::neon::causal_f16,
        attention_scores_f16: attention::neon::scores_f16,
        attention_values_f16: attention::neon::values_f16,
        round_to_f16: attention::neon::round_to_f16,
        sparse_split: sparse::neon::split,
        low_rank_add: sparse::neon::low_rank_add,
        project_out: ops::neon::project_out,
        transpose: ops::neon::transpose,
    };

    /// NEON with the dot-product extension for the integer products (the
    /// Raspberry Pi 5's Cortex-A76). Its matrix kernels panic on a CPU
    /// without the extension: take it from [`Kernels::detect`] or
    /// [`Kernels::all_available`], which hand it out only where it runs.
    #[cfg(target_arch = "aarch64")]
    pub const NEON_DOTPROD: Kernels = Kernels {
        name: "neon-dotprod",
        superblock: Some(SuperblockKernels {
            quantize: activation::neon::quantize_activation_q8k,
            matmul_q4kx4: matmul::kquant::superblock::dotprod::matmul_q4kx4,
            matmul_q4kx8: matmul::kquant::superblock::x8::dotprod::matmul_q4kx8,
            matmul_q6kx4: matmul::kquant::superblock::dotprod::matmul_q6kx4,
        }),
        matmul_q8: matmul::dotprod::matmul_q8,
        matmul_q4: matmul::dotprod::matmul_q4,
        matmul_q4s: matmul::dotprod::matmul_q4s,
        matmul_q8x4: matmul::interleaved::dotprod::matmul_q8x4,
        matmul_q4x4: matmul::interleaved::dotprod::matmul_q4x4,
        matmul_q4sx4: matmul::interleaved::dotprod::matmul_q4sx4,
        matmul_q4k: matmul::kquant::dotprod::matmul_q4k,
        matmul_q5k: matmul::kquant::dotprod::matmul_q5k,
        matmul_q6k: matmul::kquant::dotprod::matmul_q6k,
        matmul_q3k: matmul::kquant::dotprod::matmul_q3k,
        matmul_q2k: matmul::kquant::dotprod::matmul_q2k,
        matmul_q4kx4: matmul::kquant::interleaved::dotprod::matmul_q4kx4,
        matmul_q4kx8: matmul::kquant::interleaved::dotprod::matmul_q4kx8,
        matmul_q6kx4: matmul::kquant::interleaved::dotprod::matmul_q6kx4,
        matmul_q3kx4: matmul::kquant::interleaved35::dotprod::matmul_q3kx4,
        matmul_q5kx4: matmul::kquant::interleaved35::dotprod::matmul_q5kx4,
        matmul_q2kx4: matmul::kquant::interleaved35::dotprod::matmul_q2kx4,
        matmul_q5s: matmul::q5::dotprod::matmul_q5s,
        matmul_q5sx4: matmul::q5::dotprod::matmul_q5sx4,
        matmul_q5: matmul::q5::dotprod::matmul_q5,
        matmul_q5x4: matmul::q5::dotprod::matmul_q5x4,
        matmul_q4bx4: matmul::interleaved::dotprod::matmul_q4bx4,
        gemm_q8c: matmul::channels::dotprod::gemm_q8c,
        gemm_q4c: matmul::channels::dotprod::gemm_q4c,
        ..Self::NEON
    };

    /// AVX2 integer matrix products and activation quantization for x86-64
    /// hosts (with FMA and F16C, which every AVX2 CPU has), bit for bit the
    /// reference's results, and float (f16, f32) matrix products within
    /// the float budget; the other kernels are the reference's,
    /// which the compiler vectorizes. Its matrix kernels panic on a CPU
    /// without the features: take it from [`Kernels::detect`] or
    /// [`Kernels::all_available`], which hand it out only where it runs.
    #[cfg(target_arch = "x86_64")]
    pub const AVX2: Kernels = Kernels {
        name: "avx2",
        quantize_activation: activation::avx2::quantize_activation,
        matmul_q8: matmul::avx2::matmul_q8,
        matmul_q4: matmul::avx2::matmul_q4,
        matmul_q4s: matmul::avx2::matmul_q4s,
        matmul_q8x4: matmul::avx2::matmul_q8x4,
        matmul_q4x4: matmul::avx2::matmul_q4x4,
        matmul_q4sx4: matmul::avx2::matmul_q4sx4,
        matmul_f16: matmul::avx2::matmul_f16,
        matmul_f32: matmul::avx2::matmul_f32,
        matmul_q4k: matmul::kquant::avx2::matmul_q4k,
        matmul_q5k: matmul::kquant::avx2::matmul_q5k,
        matmul_q6k: matmul::kquant::avx2::matmul_q6k,
        matmul_q3k: matmul::kquant::avx2::matmul_q3k,
        matmul_q2k: matmul::kquant::avx2::matmul_q2k,
        matmul_q4kx4: matmul::kquant::interleaved::avx2::matmul_q4kx4,
        matmul_q4kx8: matmul::kquant::interleaved::avx2::matmul_q4kx8,
        matmul_q6kx4: matmul::kquant::interleaved::avx2::matmul_q6kx4,
        matmul_q3kx4: matmul::kquant::interleaved35::avx2::matmul_q3kx4,
        matmul_q5kx4: matmul::kquant::interleaved35::avx2::matmul_q5kx4,
        matmul_q2kx4: matmul::kquant::interleaved35::avx2::matmul_q2kx4,
        matmul_q5s: matmul::q5::avx2::matmul_q5s,
        matmul_q5sx4: matmul::q5::avx2::matmul_q5sx4,
        matmul_q5: matmul::q5::avx2::matmul_q5,
        matmul_q5x4: matmul::q5::avx2::matmul_q5x4,
        gemm_q8c: matmul::channels::avx2::gemm_q8c,
        gemm_q4c: matmul::channels::avx2::gemm_q4c,
        ..Self::SCALAR
    };

    /// AVX-512 VNNI integer matrix products (`vpdpbusd`, 16 rows a vector)
    /// for x86-64 hosts that have AVX-512 F, BW, VL and VNNI, bit for bit the
    /// reference's results as AVX2's are; the rest is the AVX2 table. Its
    /// matrix kernels panic on a CPU without the features: take it from
    /// [`Kernels::detect`] or [`Kernels::all_available`].
    #[cfg(target_arch = "x86_64")]
    pub const AVX512_VNNI: Kernels = Kernels {
        name: "avx512-vnni",
        matmul_q8: matmul::avx512::matmul_q8,
        matmul_q4: matmul::avx512::matmul_q4,
        matmul_q4s: matmul::avx512::matmul_q4s,
        matmul_q8x4: matmul::avx512::matmul_q8x4,
        matmul_q4x4: matmul::avx512::matmul_q4x4,
        matmul_q4sx4: matmul::avx512::matmul_q4sx4,
        ..Self::AVX2
    };

    /// The best kernels for this CPU, decided once from its features.
    pub fn detect() -> &'static Kernels {
        #[cfg(target_arch = "aarch64")]
        {
            if matmul::dotprod::available() {
                return &Self::NEON_DOTPROD;
            }
            &Self::NEON
        }
        #[cfg(target_arch = "x86_64")]
        {
            if matmul::avx512::available() {
                return &Self::AVX512_VNNI;
            }
            if matmul::avx2::available() {
                return &Self::AVX2;
            }
            &Self::SCALAR
        }
        #[cfg(not(any(target_arch = "aarch64", target_arch = "x86_64")))]
        {
            &Self::SCALAR
        }
    }

    /// Every table that runs on this CPU, the reference first (for tests and
    /// benchmarks that compare them).
    pub fn all_available() -> Vec<&'static Kernels> {
        #[cfg(target_arch = "aarch64")]
        {
            let mut tables = vec![&Self::SCALAR, &Self::NEON];
            if matmul::dotprod::available() {
                tables.push(&Self::NEON_DOTPROD);
            }
            tables
        }
        #[cfg(target_arch = "x86_64")]
        {
            let mut tables = vec![&Self::SCALAR];
            if matmul::avx2::available() {
                tables.push(&Self::AVX2);
            }
            if matmul::avx512::available() {
                tables.push(&Self::AVX512_VNNI);
            }
            tables
        }
        #[cfg(not(any(target_arch = "aarch64", target_arch = "x86_64")))]
        {
            vec![&Self::SCALAR]
        }
    }
}
