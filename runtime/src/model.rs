//! The Llama forward pass.
//!
//! Three parts, as in llama2.c: [`ModelConfig`] (hyperparameters), [`Weights`]
//! (typed views into the mapped image) and [`RunState`] (every scratch buffer
//! and the KV cache, allocated once). [`Model::forward`] runs a batch of
//! tokens at consecutive positions and allocates nothing.

use crate::architecture::{local_rope_theta, Architecture, Features, LayerAttention};
use crate::buffers::filled;
use crate::config::{ModelConfig, RopeStyle};
use crate::error::{Error, Result};
use crate::image::{ModelImage, TensorView};
use crate::kernels::attention::Causal;
use crate::kernels::matmul::channels::ChannelMatrix;
use crate::kernels::pool::{split_range, ThreadPool, MAX_THREADS};
use crate::kernels::Kernels;
use crate::kv::{KvCache, KvMode};
use std::ops::Range;
use std::sync::Mutex;

/// Rows a kernel step handles together (the dotprod kernels take 8); thread splits fall on multiples of it.
const ROWS_PER_STEP: usize = 8;
const _: () = assert!(ROWS_PER_STEP.is_multiple_of(INTERLEAVE) && ROWS_PER_STEP.is_multiple_of(quant::MAX_ROWS));
use crate::bias::{BiasConstraint, ProjectionStats};
use crate::kquant::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, QK_K};
use crate::quant::{self, BlockQ8Act, BlockQ8K, Encoding, Interleaved, GROUP, INTERLEAVE};
use crate::rsparse::{Rsparse, SparseModule};
use half::f16;

/// A weight matrix `[rows, cols]` borrowed from the image.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    /// Outputs.
    pub rows: usize,
    /// Inputs.
    pub cols: usize,
    /// The stored values.
    pub data: TensorView<'a>,
}

impl Matrix<'_> {
    /// Bytes read by one pass over the matrix.
    pub fn bytes(&self) -> usize {
        self.encoding().tensor_bytes(self.rows, self.cols)
    }
    /// The stored encoding.
    pub fn encoding(&self) -> Encoding {
        match self.data {
            TensorView::F32(_) => Encoding::F32,
            TensorView::F16(_) => Encoding::F16,
            TensorView::Q8(_) => Encoding::Q8,
            TensorView::Q4(_) => Encoding::Q4,
            TensorView::Q4S(_) => Encoding::Q4S,
            TensorView::Q8X4(_) => Encoding::Q8X4,
            TensorView::Q4X4(_) => Encoding::Q4X4,
            TensorView::Q4SX4(_) => Encoding::Q4SX4,
            TensorView::Q8C(_) => Encoding::Q8C,
            TensorView::Q4C(_) => Encoding::Q4C,
            TensorView::Q4K(_) => Encoding::Q4K,
            TensorView::Q5K(_) => Encoding::Q5K,
            TensorView::Q6K(_) => Encoding::Q6K,
            TensorView::Q3K(_) => Encoding::Q3K,
            TensorView::Q4KX4(_) => Encoding::Q4KX4,
            TensorView::Q4KX8(_) => Encoding::Q4KX8,
            TensorView::Q6KX4(_) => Encoding::Q6KX4,
            TensorView::Q3KX4(_) => Encoding::Q3KX4,
            TensorView::Q5KX4(_) => Encoding::Q5KX4,
            TensorView::Q5S(_) => Encoding::Q5S,
            TensorView::Q5SX4(_) => Encoding::Q5SX4,
            TensorView::Q5(_) => Encoding::Q5,
            TensorView::Q5X4(_) => Encoding::Q5X4,
            TensorView::Q2K(_) => Encoding::Q2K,
            TensorView::Q2KX4(_) => Encoding::Q2KX4,
            TensorView::Q4B(..) => Encoding::Q4B,
            TensorView::Q4BX4(..) => Encoding::Q4BX4,
        }
    }

    /// Writes row `row`, dequantized, into `out` (`cols` values).
    pub fn row_to_f32(&self, row: usize, out: &mut [f32]) {
        let (start, end) = (row * self.cols, (row + 1) * self.cols);
        let (block_start, block_end) = (start / GROUP, end / GROUP);
        // A k-quant row is cols / 256 super-blocks.
        let super_blocks = start / QK_K..end / QK_K;
        match self.data {
            TensorView::F32(values) => out.copy_from_slice(&values[start..end]),
            TensorView::F16(values) => {
                for (o, v) in out.iter_mut().zip(&values[start..end]) {
                    *o = v.to_f32();
                }
            }
            TensorView::Q8(blocks) => quant::dequantize_q8(&blocks[block_start..block_end], out),
            TensorView::Q4(blocks) => quant::dequantize_q4(&blocks[block_start..block_end], out),
            TensorView::Q4S(blocks) => quant::dequantize_q4s(&blocks[block_start..block_end], out),
            TensorView::Q8X4(blocks) => {
                for_interleaved_row(blocks, self.cols / GROUP, row, out, |b, o| quant::dequantize_q8(&[b], o))
            }
            TensorView::Q4X4(blocks) => {
                for_interleaved_row(blocks, self.cols / GROUP, row, out, |b, o| quant::dequantize_q4(&[b], o))
            }
            TensorView::Q4SX4(blocks) => {
                for_interleaved_row(blocks, self.cols / GROUP, row, out, |b, o| quant::dequantize_q4s(&[b], o))
            }
            TensorView::Q8C(bytes) | TensorView::Q4C(bytes) => channel_major_row(self, bytes, row, out),
            TensorView::Q4K(blocks) => quant::dequantize_k(&blocks[super_blocks], out, BlockQ4K::dequantize),
            TensorView::Q5K(blocks) => quant::dequantize_k(&blocks[super_blocks], out, BlockQ5K::dequantize),
            TensorView::Q6K(blocks) => quant::dequantize_k(&blocks[super_blocks], out, BlockQ6K::dequantize),
            TensorView::Q3K(blocks) => quant::dequantize_k(&blocks[super_blocks], out, BlockQ3K::dequantize),
            TensorView::Q4KX4(blocks) => {
                for_interleaved_row(blocks, self.cols / QK_K, row, out, |b, o| BlockQ4K::dequantize(&b, o))
            }
            TensorView::Q4KX8(blocks) => {
                for_interleaved_row(blocks, self.cols / QK_K, row, out, |b, o| BlockQ4K::dequantize(&b, o))
            }
            TensorView::Q6KX4(blocks) => {
                for_interleaved_row(blocks, self.cols / QK_K, row, out, |b, o| BlockQ6K::dequantize(&b, o))
            }
            TensorView::Q3KX4(blocks) => {
                for_interleaved_row(blocks, self.cols / QK_K, row, out, |b, o| BlockQ3K::dequantize(&b, o))
            }
            TensorView::Q5KX4(blocks) => {
                for_interleaved_row(blocks, self.cols / QK_K, row, out, |b, o| BlockQ5K::dequantize(&b, o))
            }
            TensorView::Q5S(blocks) => quant::dequantize_q5s(&blocks[block_start..block_end], out),
            TensorView::Q5SX4(blocks) => {
                for_interleaved_row(blocks, self.cols / GROUP, row, out, |b, o| quant::dequantize_q5s(&[b], o))
            }
            TensorView::Q5(blocks) => quant::dequantize_q5(&blocks[block_start..block_end], out),
            TensorView::Q5X4(blocks) => {
                for_interleaved_row(blocks, self.cols / GROUP, row, out, |b, o| quant::dequantize_q5(&[b], o))
            }
            TensorView::Q2K(blocks) => quant::dequantize_k(&blocks[super_blocks], out, BlockQ2K::dequantize),
            TensorView::Q2KX4(blocks) => {
                for_interleaved_row(blocks, self.cols / QK_K, row, out, |b, o| BlockQ2K::dequantize(&b, o))
            }
            TensorView::Q4B(scales, blocks) => {
                quant::dequantize_q4b_row(scales[row], &blocks[block_start..block_end], out)
            }
            TensorView::Q4BX4(scales, blocks) => for_interleaved_row(blocks, self.cols / GROUP, row, out, |b, o| {
                quant::dequantize_q4b_row(scales[row], &[b], o)
            }),
        }
    }

    /// `out[b·rows + r] = W[r] · x[b]` for a batch of activations given both as
    /// f32 (`x`, for float weights) and as int8 blocks (`xq`, for quantized
    /// weights; `xk`, if not empty, one token's 256-value blocks for the
    /// kernels' [`crate::kernels::SuperblockKernels`], and then `xq` may be
    /// empty: [`Model::quantize_input`]), the rows split across
    /// the pool's threads. Kernels write rows outermost; for a batch that
    /// goes through `scratch` and is transposed.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        kernels: &Kernels,
        pool: &ThreadPool,
        x: &[f32],
        xq: &[BlockQ8Act],
        xk: &[BlockQ8K],
        out: &mut [f32],
        scratch: &mut [f32],
    ) {
        let batch = x.len() / self.cols;
        if self.encoding().is_channel_major() {
            if batch == 1 {
                return self.matmul_channels(kernels, pool, xq, None, &mut out[..self.rows]);
            }
            return self.gemm_channels(kernels, pool, xq, batch, out, scratch);
        }
        let by_row: &mut [f32] = if batch == 1 { &mut out[..self.rows] } else { &mut scratch[..self.rows * batch] };
        let threads = pool.threads();
        // Each thread's rows and its piece of the output, handed over through a
        // mutex per thread (uncontended: thread i locks only slot i).
        let mut rest = by_row;
        type Slot<'o> = Mutex<Option<(Range<usize>, &'o mut [f32])>>;
        let parts: [Slot; MAX_THREADS] = std::array::from_fn(|i| {
            if i >= threads {
                return Mutex::new(None);
            }
            let rows = split_range(self.rows, threads, ROWS_PER_STEP, i);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(rows.len() * batch);
            rest = tail;
            Mutex::new(Some((rows, mine)))
        });
        // Blocks a row: cols / 32, or cols / 256 super-blocks for a k-quant.
        let (cols, blocks) = (self.cols, self.cols / self.encoding().block_values());
        // Interleaved blocks: groups of `stacked` rows (4, or 8 for Q4KX8).
        let stacked = self.encoding().rows_interleaved();
        let groups = |rows: &Range<usize>| rows.start / stacked * blocks..rows.end / stacked * blocks;
        pool.run(&|i| {
            let mut slot = parts[i].lock().unwrap_or_else(|e| e.into_inner());
            let Some((rows, out)) = slot.as_mut() else { return };
            if rows.start == rows.end {
                return;
            }
            let (values, blocked) = (rows.start * cols..rows.end * cols, rows.start * blocks..rows.end * blocks);
            match self.data {
                TensorView::F32(w) => (kernels.matmul_f32)(&w[values], cols, x, out),
                TensorView::F16(w) => (kernels.matmul_f16)(&w[values], cols, x, out),
                TensorView::Q8(w) => (kernels.matmul_q8)(&w[blocked], cols, xq, out),
                TensorView::Q4(w) => (kernels.matmul_q4)(&w[blocked], cols, xq, out),
                TensorView::Q4S(w) => (kernels.matmul_q4s)(&w[blocked], cols, xq, out),
                // Splits fall on multiples of ROWS_PER_STEP, so on whole groups.
                TensorView::Q8X4(w) => (kernels.matmul_q8x4)(&w[groups(rows)], cols, xq, out),
                TensorView::Q4X4(w) => (kernels.matmul_q4x4)(&w[groups(rows)], cols, xq, out),
                TensorView::Q4SX4(w) => (kernels.matmul_q4sx4)(&w[groups(rows)], cols, xq, out),
                TensorView::Q4K(w) => (kernels.matmul_q4k)(&w[blocked], cols, xq, out),
                TensorView::Q5K(w) => (kernels.matmul_q5k)(&w[blocked], cols, xq, out),
                TensorView::Q6K(w) => (kernels.matmul_q6k)(&w[blocked], cols, xq, out),
                TensorView::Q3K(w) => (kernels.matmul_q3k)(&w[blocked], cols, xq, out),
                TensorView::Q4KX4(w) => match kernels.superblock.filter(|_| !xk.is_empty()) {
                    Some(k) => (k.matmul_q4kx4)(&w[groups(rows)], cols, xk, out),
                    None => (kernels.matmul_q4kx4)(&w[groups(rows)], cols, xq, out),
                },
                TensorView::Q4KX8(w) => match kernels.superblock.filter(|_| !xk.is_empty()) {
                    Some(k) => (k.matmul_q4kx8)(&w[groups(rows)], cols, xk, out),
                    None => (kernels.matmul_q4kx8)(&w[groups(rows)], cols, xq, out),
                },
                TensorView::Q6KX4(w) => match kernels.superblock.filter(|_| !xk.is_empty()) {
                    Some(k) => (k.matmul_q6kx4)(&w[groups(rows)], cols, xk, out),
                    None => (kernels.matmul_q6kx4)(&w[groups(rows)], cols, xq, out),
                },
                TensorView::Q3KX4(w) => (kernels.matmul_q3kx4)(&w[groups(rows)], cols, xq, out),
                TensorView::Q5KX4(w) => (kernels.matmul_q5kx4)(&w[groups(rows)], cols, xq, out),
                TensorView::Q5S(w) => (kernels.matmul_q5s)(&w[blocked], cols, xq, out),
                TensorView::Q5SX4(w) => (kernels.matmul_q5sx4)(&w[groups(rows)], cols, xq, out),
                TensorView::Q5(w) => (kernels.matmul_q5)(&w[blocked], cols, xq, out),
                TensorView::Q5X4(w) => (kernels.matmul_q5x4)(&w[groups(rows)], cols, xq, out),
                TensorView::Q2K(w) => (kernels.matmul_q2k)(&w[blocked], cols, xq, out),
                TensorView::Q2KX4(w) => (kernels.matmul_q2kx4)(&w[groups(rows)], cols, xq, out),
                TensorView::Q4B(_, w) => (kernels.matmul_q4b)(&w[blocked], cols, xq, out),
                TensorView::Q4BX4(_, w) => (kernels.matmul_q4bx4)(&w[groups(rows)], cols, xq, out),
                TensorView::Q8C(_) | TensorView::Q4C(_) => unreachable!("channel-major products return above"),
            }
            // Q4B's kernels sum in units of each row's scale.
            if let TensorView::Q4B(scales, _) | TensorView::Q4BX4(scales, _) = self.data {
                let scales = &scales[rows.clone()];
                if batch == 1 {
                    // A decode step: one output a row, one vectorized pass.
                    out.iter_mut().zip(scales).for_each(|(value, scale)| *value *= scale);
                } else {
                    for (row, &scale) in out.chunks_exact_mut(batch).zip(scales) {
                        row.iter_mut().for_each(|value| *value *= scale);
                    }
                }
            }
        });
        if batch > 1 {
            (kernels.transpose)(&scratch[..self.rows * batch], self.rows, &mut out[..self.rows * batch]);
        }
    }
}

impl Matrix<'_> {
    /// `out = W · x` for one activation `x` of a channel-major matrix, over
    /// the input channels `mask` marks (bit `j` of `mask[b]`: channel
    /// `32b + j`; `None`: all), whose others must be zero in `x`. The rows
    /// are split across the pool's threads in whole tiles.
    pub fn matmul_channels(
        &self,
        kernels: &Kernels,
        pool: &ThreadPool,
        x: &[BlockQ8Act],
        mask: Option<&[u32]>,
        out: &mut [f32],
    ) {
        let (kernel, weights) = match self.data {
            TensorView::Q8C(w) => (kernels.matmul_q8c, w),
            TensorView::Q4C(w) => (kernels.matmul_q4c, w),
            _ => panic!("matmul_channels on a {} matrix", self.encoding().name()),
        };
        let threads = pool.threads();
        let mut rest = &mut out[..self.rows];
        type Slot<'o> = Mutex<Option<(Range<usize>, &'o mut [f32])>>;
        let parts: [Slot; MAX_THREADS] = std::array::from_fn(|i| {
            if i >= threads {
                return Mutex::new(None);
            }
            let rows = split_range(self.rows, threads, quant::CHANNEL_TILE, i);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(rows.len());
            rest = tail;
            Mutex::new(Some((rows, mine)))
        });
        pool.run(&|i| {
            let mut slot = parts[i].lock().unwrap_or_else(|e| e.into_inner());
            let Some((rows, out)) = slot.as_mut() else { return };
            if rows.start < rows.end {
                kernel(&ChannelMatrix { weights, total_rows: self.rows, cols: self.cols }, rows.clone(), x, mask, out);
            }
        });
    }

    /// `out[b·rows + r] = W[r] · x[b]` for a batch of `batch` activations of
    /// a channel-major matrix, every channel, through the GEMM kernels: the
    /// rows split across the pool's threads in whole tiles, each thread's
    /// results token by token for its rows (one thread writes `out` itself;
    /// more, their pieces of `scratch`, then copied into place).
    fn gemm_channels(
        &self,
        kernels: &Kernels,
        pool: &ThreadPool,
        xq: &[BlockQ8Act],
        batch: usize,
        out: &mut [f32],
        scratch: &mut [f32],
    ) {
        let (kernel, weights) = match self.data {
            TensorView::Q8C(w) => (kernels.gemm_q8c, w),
            TensorView::Q4C(w) => (kernels.gemm_q4c, w),
            _ => panic!("gemm_channels on a {} matrix", self.encoding().name()),
        };
        let xq = &xq[..batch * self.cols / GROUP];
        let threads = pool.threads();
        if threads == 1 {
            let matrix = ChannelMatrix { weights, total_rows: self.rows, cols: self.cols };
            return kernel(&matrix, 0..self.rows, xq, &mut out[..batch * self.rows]);
        }
        let by_thread = &mut scratch[..batch * self.rows];
        let mut rest = &mut *by_thread;
        type Slot<'o> = Mutex<Option<(Range<usize>, &'o mut [f32])>>;
        let parts: [Slot; MAX_THREADS] = std::array::from_fn(|i| {
            if i >= threads {
                return Mutex::new(None);
            }
            let rows = split_range(self.rows, threads, quant::CHANNEL_TILE, i);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(rows.len() * batch);
            rest = tail;
            Mutex::new(Some((rows, mine)))
        });
        pool.run(&|i| {
            let mut slot = parts[i].lock().unwrap_or_else(|e| e.into_inner());
            let Some((rows, out)) = slot.as_mut() else { return };
            if rows.start < rows.end {
                kernel(&ChannelMatrix { weights, total_rows: self.rows, cols: self.cols }, rows.clone(), xq, out);
            }
        });
        // Thread i's piece is its rows' results token by token.
        let mut pieces = &by_thread[..];
        for i in 0..threads {
            let rows = split_range(self.rows, threads, quant::CHANNEL_TILE, i);
            let (piece, tail) = pieces.split_at(rows.len() * batch);
            pieces = tail;
            for (token, results) in piece.chunks_exact(rows.len().max(1)).enumerate() {
                out[token * self.rows + rows.start..][..rows.len()].copy_from_slice(results);
            }
        }
    }

    /// Bytes a channel-major product over `mask` reads: the scales (and
    /// minimums) of every column block with an active channel, and the
    /// active channels' columns.
    pub fn channel_bytes(&self, mask: &[u32]) -> usize {
        let encoding = self.encoding();
        let at = quant::ChannelBlock::new(encoding, self.rows, 0);
        let scales = at.columns;
        mask[..self.cols / GROUP]
            .iter()
            .filter(|&&bits| bits != 0)
            .map(|bits| scales + bits.count_ones() as usize * at.column_bytes)
            .sum()
    }
}

/// Row `row` of a channel-major matrix, dequantized.
fn channel_major_row(m: &Matrix, bytes: &[u8], row: usize, out: &mut [f32]) {
    let encoding = m.encoding();
    let f16_at = |at: usize| half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
    for (b, values) in out[..m.cols].chunks_exact_mut(GROUP).enumerate() {
        let at = quant::ChannelBlock::new(encoding, m.rows, b);
        let d = f16_at(at.scales + 2 * row);
        for (j, v) in values.iter_mut().enumerate() {
            let column = at.columns + j * at.column_bytes;
            *v = match encoding {
                Encoding::Q8C => d * bytes[column + row] as i8 as f32,
                _ => {
                    let byte = bytes[column + row / quant::CHANNEL_TILE * 16 + row % 16];
                    let stored = if row % quant::CHANNEL_TILE >= 16 { byte as i8 >> 4 } else { (byte << 4) as i8 >> 4 };
                    d * (stored as i32 + 8) as f32 + f16_at(at.mins + 2 * row)
                }
            };
        }
    }
}

/// Calls `expand(block, out_piece)` for each of row `row`'s `per_row`
/// blocks, taken out of the interleaved groups, with the matching values of
/// `out` (32 a block, 256 a k-quant super-block).
fn for_interleaved_row<X: Interleaved>(
    blocks: &[X],
    per_row: usize,
    row: usize,
    out: &mut [f32],
    expand: impl Fn(X::Row, &mut [f32]),
) {
    let group = &blocks[row / X::ROWS * per_row..(row / X::ROWS + 1) * per_row];
    for (block, values) in group.iter().zip(out.chunks_exact_mut(out.len() / per_row)) {
        expand(block.row(row % X::ROWS), values);
    }
}

/// One transformer block's weights.
#[derive(Debug, Clone)]
pub struct LayerWeights<'a> {
    /// RMSNorm before attention `(dim)`.
    pub attn_norm: &'a [f32],
    /// Query projection `(n_heads·head_dim, dim)`.
    pub wq: Matrix<'a>,
    /// Key projection `(kv_dim, dim)`.
    pub wk: Matrix<'a>,
    /// Value projection `(kv_dim, dim)`.
    pub wv: Matrix<'a>,
    /// Attention output projection `(dim, n_heads·head_dim)`.
    pub wo: Matrix<'a>,
    /// RMSNorm before the FFN `(dim)`.
    pub ffn_norm: &'a [f32],
    /// SwiGLU gate `(ffn_dim, dim)`.
    pub w_gate: Matrix<'a>,
    /// SwiGLU up `(ffn_dim, dim)`.
    pub w_up: Matrix<'a>,
    /// SwiGLU down `(dim, ffn_dim)`.
    pub w_down: Matrix<'a>,
    /// Biases of q, k and v `(q_dim)`, `(kv_dim)`, `(kv_dim)`
    /// ([`Features::QKV_BIAS`]).
    pub qkv_bias: Option<[&'a [f32]; 3]>,
    /// RMSNorm weights of each query and each key head `(head_dim)`
    /// ([`Features::QK_NORM`]).
    pub qk_norm: Option<[&'a [f32]; 2]>,
    /// RMSNorm weights of the attention's and the FFN's outputs `(dim)`
    /// ([`Features::POST_NORMS`]).
    pub post_norms: Option<[&'a [f32]; 2]>,
}

/// All weights, borrowed from the image.
#[derive(Debug, Clone)]
pub struct Weights<'a> {
    /// Token embeddings `(vocab, dim)`.
    pub token_embd: Matrix<'a>,
    /// The blocks.
    pub layers: Vec<LayerWeights<'a>>,
    /// Final RMSNorm `(dim)`.
    pub output_norm: &'a [f32],
    /// Output layer `(vocab, dim)`; the embedding itself when tied.
    pub output: Matrix<'a>,
}

/// A model ready to run: config, weights and the kernels chosen for this CPU.
pub struct Model<'a> {
    /// Hyperparameters.
    pub config: ModelConfig,
    /// Weights.
    pub weights: Weights<'a>,
    /// Kernels.
    pub kernels: &'static Kernels,
    /// RoPE's per-pair frequency factors (`rope_scaling` section; `None`:
    /// plain RoPE), applied to the tables of every state made.
    pub rope_factors: Option<&'a [f32]>,
    /// The block's differences from Llama's (`architecture` section).
    pub architecture: Architecture,
    /// Worker threads for the matrix products.
    pub pool: ThreadPool,
    /// The R-Sparse plan in use, if any ([`Model::set_sparsity`]).
    sparse: Option<SparsePlan>,
    /// The bias constraint in use, if any ([`Model::set_bias`]).
    bias: Option<BiasConstraint>,
    /// How the states' KV caches store keys and values ([`Model::set_kv_mode`]).
    kv_mode: KvMode,
    /// The share of key channels the states' caches drop after the prompt ([`Model::set_kv_prune`]).
    kv_prune: f32,
}

/// When the R-Sparse path runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseMode {
    /// Single-token decode steps only; prompts (batches) run dense (the paper's choice).
    DecodeOnly,
    /// Every forward pass (perplexity of the sparse model).
    Always,
}

/// An [`Rsparse`] plan checked against the weights, with each layer's
/// modules found once (q, k, v, output, gate, up, down).
struct SparsePlan {
    plan: Rsparse,
    mode: SparseMode,
    layers: Vec<[Option<usize>; 7]>,
    /// Each module's `U` transposed (`rank × rows`), so that `U · low` is
    /// `rank` scaled additions of contiguous columns.
    u_columns: Vec<Vec<f16>>,
}

/// The seven projections of a layer, in [`SparsePlan::layers`] order.
const PROJECTIONS: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

/// Scratch of the sparse path, allocated with the [`RunState`] (empty for dense models).
#[derive(Default)]
struct SparseScratch {
    exact: Vec<f32>,          // x ⊙ m (batch, widest)
    exact_q: Vec<BlockQ8Act>, // its int8 blocks
    rest: Vec<f32>,           // x ⊙ (1 − m) (batch, widest)
    low: Vec<f32>,            // SVᵀ · rest, then transposed (rank, batch) / (batch, rank)
    low_t: Vec<f32>,          // (batch, rank)
    mask: Vec<u32>,           // m, a bit a channel (batch, widest / 32)
    masked: u64,              // channels sent to the low-rank path since the last reset
    channels: u64,            // channels seen by sparse modules since the last reset
    bytes_read: u64,          // weight bytes the sparse modules read since the last reset
    dense_bytes: u64,         // what the same modules read dense
}

/// How a [`RunState`] is allocated beyond its context and batch: the
/// choices a [`Model`] makes for its states ([`Model::state_options`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StateOptions<'a> {
    /// How the KV cache stores keys and values.
    pub kv: KvMode,
    /// The share of key channels the KV cache drops after the prompt (0:
    /// off; otherwise pruning's scratch is allocated, [`KvCache::enable_pruning`]).
    pub kv_prune: f32,
    /// Whether the R-Sparse path's scratch is allocated (a model with an R-Sparse plan).
    pub sparse: bool,
    /// How each layer attends (the architecture's layers; empty: every
    /// layer global): a sliding-window layer's KV cache holds its window
    /// (and [`crate::kv::REWIND_SLOTS`] more, at f32 and f16) only, and
    /// local layers with a RoPE base of their own get their own table of
    /// angles.
    pub layers: &'a [LayerAttention],
}

impl<'a> StateOptions<'a> {
    /// The options of a state for a model of `architecture`: its windows and
    /// local RoPE base, a KV cache of `kv` unpruned, and the R-Sparse scratch
    /// when `sparse` (what `bramble plan` and `flash` count for an image).
    pub fn for_architecture(architecture: &'a Architecture, kv: KvMode, sparse: bool) -> Self {
        StateOptions { kv, kv_prune: 0.0, sparse, layers: &architecture.layers }
    }
}

/// Every scratch buffer of the forward pass and the KV cache, for up to
/// `batch` tokens at a time and `context` positions. Shapes in comments.
pub struct RunState {
    /// Largest batch [`Model::forward`] takes.
    pub batch: usize,
    /// Positions the KV cache holds.
    pub context: usize,
    x: Vec<f32>,              // residual stream (batch, dim)
    xb: Vec<f32>,             // normed input / projection output (batch, max(dim, q_dim))
    xb2: Vec<f32>, // attention output, projections before q/k norms, outputs before post norms (batch, max(dim, q_dim))
    xq: Vec<BlockQ8Act>, // int8 activations (batch, max(dim, q_dim, ffn_dim) / 32)
    xk: Vec<BlockQ8K>, // one token's int8 activations in 256-value blocks (max(dim, q_dim, ffn_dim) / 256)
    q: Vec<f32>,   // queries (batch, q_dim)
    hb: Vec<f32>,  // FFN gate (batch, ffn_dim)
    hb2: Vec<f32>, // FFN up (batch, ffn_dim)
    att: Vec<f32>, // attention scores of the heads sharing a KV head (heads_per_kv, context), kv::attention_scores_len
    att_tile: Vec<f32>, // a batch's attention tile: scores, queries (TILE_ROWS, context + head_dim); 0 for batch 1
    att_window: Vec<f32>, // a batch over a ring: keys, then values (window − 1 + batch, kv_dim); 0 without rings
    logits: Vec<f32>, // (batch, vocab)
    scratch: Vec<f32>, // a batch's products, rows outermost (max(ffn_dim, vocab, …), batch)
    k: Vec<f32>,   // new keys, RoPE applied before they enter the cache (batch, kv_dim)
    v: Vec<f32>,   // new values (batch, kv_dim)
    kv: KvCache,   // keys and values of every layer (layer, context, kv_dim), maybe quantized
    rope_cos: Vec<f32>, // (context, rope_dim / 2)
    rope_sin: Vec<f32>, // (context, rope_dim / 2)
    rope_local_cos: Vec<f32>, // sliding-window layers' own table (context, rope_dim / 2), or empty
    rope_local_sin: Vec<f32>, // (context, rope_dim / 2), or empty
    sparse: SparseScratch,
    /// The bias constraint's weights `w_l` in force for this state (layers).
    bias_weights: Vec<f32>,
    /// The values the constraint moves `h · d_l` toward in this state
    /// (layers): the section's centres, moved by the feedback loop's
    /// centre shift ([`crate::bias::FeedbackLoop::centres`]).
    bias_centres: Vec<f32>,
    /// The projections `h · d_l` recorded since the last reset.
    projections: ProjectionStats,
    /// What the state holds, from [`RunState::bytes_for`] when it was allocated.
    bytes: usize,
}

/// A buffer's name, for errors, and its length in elements.
#[derive(Debug, Clone, Copy)]
struct BufferSize {
    what: &'static str,
    len: usize,
}

impl BufferSize {
    /// The product of `factors`; an error naming the buffer if it overflows.
    fn of(what: &'static str, factors: &[usize]) -> Result<Self> {
        Ok(Self { what, len: crate::buffers::checked_size(what, factors)? })
    }

    /// The buffer, `len` copies of `value` ([`filled`]).
    fn filled<T: Clone>(self, value: T) -> Result<Vec<T>> {
        filled(self.what, self.len, value)
    }

    /// Bytes of the buffer with elements of type `T`.
    fn bytes<T>(self) -> u128 {
        self.len as u128 * std::mem::size_of::<T>() as u128
    }
}

/// The length of every buffer of a [`RunState`] outside its KV cache: what
/// [`RunState::try_with_options`] allocates and [`RunState::bytes_for`]
/// counts, computed once so that the two cannot disagree.
struct StateSizes {
    x: BufferSize,
    xb: BufferSize,
    xb2: BufferSize,
    xq: BufferSize,
    xk: BufferSize,
    q: BufferSize,
    hb: BufferSize, // and hb2
    att: BufferSize,
    att_tile: BufferSize,
    att_window: BufferSize,
    logits: BufferSize,
    scratch: BufferSize,
    k: BufferSize,          // and v
    rope: BufferSize,       // rope_cos and rope_sin each
    rope_local: BufferSize, // rope_local_cos and rope_local_sin each (0 without local tables)
    bias_weights: BufferSize,
    /// The projection statistics' two sums (f64 each, one a layer).
    projections: BufferSize,
    /// The R-Sparse path's `exact`, `rest`, `low` and `low_t` each (0 without it).
    sparse_values: BufferSize,
    /// The R-Sparse path's `exact_q` and `mask` each (0 without it).
    sparse_blocks: BufferSize,
}

impl StateSizes {
    /// The sizes, with every product checked: an error naming the buffer if one overflows.
    fn new(config: &ModelConfig, context: usize, batch: usize, options: StateOptions) -> Result<Self> {
        let (sparse, local_rope) = (options.sparse, local_rope_theta(options.layers).is_some());
        let (dim, q_dim, kv_dim, ffn) = (config.dim as usize, config.q_dim(), config.kv_dim(), config.ffn_dim as usize);
        let (layers, vocab) = (config.n_layers as usize, config.vocab_size as usize);
        let widest = dim.max(q_dim).max(ffn);
        let pairs = config.rope_dim as usize / 2;
        let heads_per_kv = (config.n_heads / config.n_kv_heads.max(1)) as usize;
        let size = BufferSize::of;
        let sparse_batch = if sparse { batch } else { 0 };
        let sparse_scratch = "R-Sparse scratch (batch × widest)";
        Ok(Self {
            x: size("residual stream (batch × dim)", &[batch, dim])?,
            xb: size("activations (batch × max(dim, q_dim))", &[batch, dim.max(q_dim)])?,
            xb2: size("attention output (batch × max(dim, q_dim))", &[batch, dim.max(q_dim)])?,
            xq: size("int8 activations (batch × widest / 32)", &[batch, widest / GROUP])?,
            xk: size("a token's int8 activations in super-blocks (widest / 256)", &[widest / QK_K])?,
            q: size("queries (batch × q_dim)", &[batch, q_dim])?,
            hb: size("FFN gate (batch × ffn_dim)", &[batch, ffn])?,
            att: {
                let what = "attention scores (n_heads / n_kv_heads × context; a wrapped ring's two pieces)";
                let overflow = format!("{what}: the size for {context} positions overflows");
                let len = crate::kv::attention_scores_len(
                    options.kv,
                    options.layers,
                    context,
                    heads_per_kv,
                    config.head_dim as usize,
                )
                .ok_or_else(|| Error::new(crate::error::ErrorKind::OutOfMemory, overflow))?;
                BufferSize { what, len }
            },
            // Only batches of more than one token attend in tiles.
            att_tile: match batch {
                0 | 1 => size("batched attention scratch", &[0])?,
                _ => {
                    let what = "batched attention scratch (TILE_ROWS × (context + head_dim))";
                    let overflow = format!("{what}: the size for {context} positions overflows");
                    let len = Causal::scratch_len(context, config.head_dim as usize)
                        .ok_or_else(|| Error::new(crate::error::ErrorKind::OutOfMemory, overflow))?;
                    BufferSize { what, len }
                }
            },
            att_window: {
                let what = "batched attention staging over a ring (2 × (window − 1 + batch) × kv_dim)";
                let overflow = format!("{what}: the size for batches of {batch} overflows");
                let len = crate::kv::batch_staging_len(options.kv, options.layers, context, batch, kv_dim)
                    .ok_or_else(|| Error::new(crate::error::ErrorKind::OutOfMemory, overflow))?;
                BufferSize { what, len }
            },
            logits: size("logits (batch × vocab_size)", &[batch, vocab])?,
            // Only batches of more than one token go through the scratch.
            scratch: size(
                "batch products (batch × max(widest, vocab_size))",
                &[if batch > 1 { batch } else { 0 }, widest.max(vocab)],
            )?,
            k: size("new keys (batch × kv_dim)", &[batch, kv_dim])?,
            rope: size("RoPE table (context × rope_dim / 2)", &[context, pairs])?,
            rope_local: size(
                "local layers' RoPE table (context × rope_dim / 2)",
                &[context, pairs * local_rope as usize],
            )?,
            bias_weights: size("bias weights (n_layers)", &[layers])?,
            projections: size("bias projections (n_layers)", &[layers])?,
            sparse_values: size(sparse_scratch, &[sparse_batch, widest])?,
            sparse_blocks: size(sparse_scratch, &[sparse_batch, widest / GROUP])?,
        })
    }

    /// Bytes of every buffer, in 128 bits (no sum of `usize` sizes overflows it).
    fn bytes(&self) -> u128 {
        self.x.bytes::<f32>()
            + self.xb.bytes::<f32>()
            + self.xb2.bytes::<f32>()
            + self.xq.bytes::<BlockQ8Act>()
            + self.xk.bytes::<BlockQ8K>()
            + self.q.bytes::<f32>()
            + 2 * self.hb.bytes::<f32>()
            + self.att.bytes::<f32>()
            + self.att_tile.bytes::<f32>()
            + self.att_window.bytes::<f32>()
            + self.logits.bytes::<f32>()
            + self.scratch.bytes::<f32>()
            + 2 * self.k.bytes::<f32>()
            + 2 * self.rope.bytes::<f32>()
            + 2 * self.rope_local.bytes::<f32>()
            + 2 * self.bias_weights.bytes::<f32>()
            + 2 * self.projections.bytes::<f64>()
            + 4 * self.sparse_values.bytes::<f32>()
            + self.sparse_blocks.bytes::<BlockQ8Act>()
            + self.sparse_blocks.bytes::<u32>()
    }
}

impl RunState {
    /// Allocates for `context` positions and batches of up to `batch` tokens,
    /// with an f32 KV cache. Panics when a buffer cannot be allocated; see
    /// [`RunState::try_with_kv`].
    pub fn new(config: &ModelConfig, context: usize, batch: usize) -> Self {
        Self::with_kv(config, context, batch, KvMode::F32)
    }

    /// As [`RunState::new`] with a KV cache of `kv` (checked against the
    /// model with [`KvMode::check`]). Panics when a buffer cannot be
    /// allocated, for callers whose sizes are known to fit (tests, estimates);
    /// [`RunState::try_with_kv`] returns the error instead.
    pub fn with_kv(config: &ModelConfig, context: usize, batch: usize, kv: KvMode) -> Self {
        Self::try_with_kv(config, context, batch, kv).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`RunState::with_kv`], with every size computed with checked
    /// arithmetic and every buffer allocated fallibly: a size that overflows
    /// or that the allocator cannot provide is an
    /// [`ErrorKind::OutOfMemory`](crate::error::ErrorKind::OutOfMemory) error
    /// naming the buffer.
    pub fn try_with_kv(config: &ModelConfig, context: usize, batch: usize, kv: KvMode) -> Result<Self> {
        Self::try_with_options(config, context, batch, StateOptions { kv, ..StateOptions::default() })
    }

    /// As [`RunState::try_with_kv`], with the KV cache's pruning scratch and
    /// the R-Sparse path's scratch as `options` say.
    pub fn try_with_options(config: &ModelConfig, context: usize, batch: usize, options: StateOptions) -> Result<Self> {
        Self::try_with_rope(config, None, context, batch, options)
    }

    /// As [`RunState::try_with_options`], with RoPE's frequencies divided by
    /// `rope_factors` (one a pair; [`crate::rope`]) in the tables of angles,
    /// as a model with a `rope_scaling` section needs ([`Model::try_new_state`]).
    pub fn try_with_rope(
        config: &ModelConfig,
        rope_factors: Option<&[f32]>,
        context: usize,
        batch: usize,
        options: StateOptions,
    ) -> Result<Self> {
        if let Some(factors) = rope_factors {
            crate::rope::check_factors(factors, config.rope_dim)?;
        }
        // The KV cache first: it is the largest, and nothing has been written yet if it cannot be had.
        let mut kv = KvCache::new(options.kv, config, context, options.layers)?;
        kv.enable_pruning(options.kv_prune)?;
        let bytes = Self::bytes_for(config, context, batch, options)?;
        let sizes = StateSizes::new(config, context, batch, options)?;
        let no_activation = BlockQ8Act { d: 0.0, s: 0.0, qs: [0; GROUP] };
        let mut rope_cos = sizes.rope.filled(0f32)?;
        let mut rope_sin = sizes.rope.filled(0f32)?;
        // θ_i = pos · base^(−2i / rope_dim) / factor_i, once, here: nothing changes per token.
        crate::rope::fill_tables(config, rope_factors, &mut rope_cos, &mut rope_sin);
        // Local layers turn by their own base, unscaled (Gemma-3's local rotary embedding).
        let mut rope_local_cos = sizes.rope_local.filled(0f32)?;
        let mut rope_local_sin = sizes.rope_local.filled(0f32)?;
        if let Some(theta) = local_rope_theta(options.layers) {
            let local = ModelConfig { rope_theta: theta, ..*config };
            crate::rope::fill_tables(&local, None, &mut rope_local_cos, &mut rope_local_sin);
        }
        Ok(Self {
            batch,
            context,
            x: sizes.x.filled(0.0)?,
            xb: sizes.xb.filled(0.0)?,
            xb2: sizes.xb2.filled(0.0)?,
            xq: sizes.xq.filled(no_activation)?,
            xk: sizes.xk.filled(BlockQ8K { d: 0.0, sums: [0; QK_K / GROUP], qs: [0; QK_K] })?,
            q: sizes.q.filled(0.0)?,
            hb: sizes.hb.filled(0.0)?,
            hb2: sizes.hb.filled(0.0)?,
            att: sizes.att.filled(0.0)?,
            att_tile: sizes.att_tile.filled(0.0)?,
            att_window: sizes.att_window.filled(0.0)?,
            logits: sizes.logits.filled(0.0)?,
            scratch: sizes.scratch.filled(0.0)?,
            k: sizes.k.filled(0.0)?,
            v: sizes.k.filled(0.0)?,
            kv,
            rope_cos,
            rope_sin,
            rope_local_cos,
            rope_local_sin,
            sparse: SparseScratch {
                exact: sizes.sparse_values.filled(0.0)?,
                exact_q: sizes.sparse_blocks.filled(no_activation)?,
                rest: sizes.sparse_values.filled(0.0)?,
                low: sizes.sparse_values.filled(0.0)?,
                low_t: sizes.sparse_values.filled(0.0)?,
                mask: sizes.sparse_blocks.filled(0)?,
                ..SparseScratch::default()
            },
            bias_weights: sizes.bias_weights.filled(0.0)?,
            bias_centres: sizes.bias_weights.filled(0.0)?,
            projections: ProjectionStats::new(sizes.projections.len),
            bytes,
        })
    }

    /// Bytes a [`RunState`] of these arguments holds, its KV cache
    /// included: every buffer [`RunState::try_with_options`] allocates,
    /// computed without allocating; an
    /// [`ErrorKind::OutOfMemory`](crate::error::ErrorKind::OutOfMemory)
    /// error naming the buffer whose size overflows. The one count of a
    /// model's memory: `bramble plan` and `bramble flash` add it to the
    /// image, `brambled` checks it against its memory limit
    /// ([`Model::state_bytes`] for a model's own options).
    pub fn bytes_for(config: &ModelConfig, context: usize, batch: usize, options: StateOptions) -> Result<usize> {
        let kv = KvCache::bytes_for(options.kv, config, context, options.layers)? as u128
            + KvCache::bookkeeping_bytes(options.kv, config) as u128
            + KvCache::pruning_bytes_for(config, context, options.kv_prune) as u128;
        let bytes = kv + StateSizes::new(config, context, batch, options)?.bytes();
        usize::try_from(bytes)
            .map_err(|_| Error::new(crate::error::ErrorKind::OutOfMemory, format!("run state: {bytes} bytes overflow")))
    }

    /// The share of input channels the R-Sparse path sent to the low-rank
    /// path since the last call, and resets the count (`None` if none ran).
    pub fn take_measured_sparsity(&mut self) -> Option<f64> {
        let s = &mut self.sparse;
        let share = (s.channels > 0).then(|| s.masked as f64 / s.channels as f64);
        (s.masked, s.channels) = (0, 0);
        share
    }

    /// The bias constraint's weights in force (one a layer; zero without a constraint).
    pub fn bias_weights(&self) -> &[f32] {
        &self.bias_weights
    }
    /// Sets the bias constraint's weights (one a layer, each in [0, 1]).
    pub fn set_bias_weights(&mut self, weights: &[f32]) -> Result<()> {
        if weights.len() != self.bias_weights.len() || !weights.iter().all(|w| (0.0..=1.0).contains(w)) {
            return Err(Error::invalid(format!(
                "bias weights: {} values for {} layers, each must be in [0, 1]",
                weights.len(),
                self.bias_weights.len()
            )));
        }
        self.bias_weights.copy_from_slice(weights);
        Ok(())
    }
    /// The values the bias constraint moves `h · d_l` toward (one a layer).
    pub fn bias_centres(&self) -> &[f32] {
        &self.bias_centres
    }
    /// Sets the values the bias constraint moves `h · d_l` toward (one a
    /// layer, finite).
    pub fn set_bias_centres(&mut self, centres: &[f32]) -> Result<()> {
        if centres.len() != self.bias_centres.len() || !centres.iter().all(|c| c.is_finite()) {
            return Err(Error::invalid(format!(
                "bias centres: {} values for {} layers, each must be finite",
                centres.len(),
                self.bias_centres.len()
            )));
        }
        self.bias_centres.copy_from_slice(centres);
        Ok(())
    }
    /// Puts the feedback loop's weights and centres in force. Allocates nothing.
    pub fn apply_feedback(&mut self, feedback: &crate::bias::FeedbackLoop) -> Result<()> {
        self.set_bias_weights(&feedback.weights)?;
        self.set_bias_centres(&feedback.centres)
    }
    /// The projections `h · d_l` recorded since the last [`RunState::reset_projections`].
    pub fn projections(&self) -> &ProjectionStats {
        &self.projections
    }
    /// Starts a new record of projections (keeps the buffers).
    pub fn reset_projections(&mut self) {
        self.projections.reset();
    }

    /// Weight bytes the R-Sparse modules read since the last call, and what
    /// the same products read dense; resets both.
    pub fn take_sparse_bytes(&mut self) -> (u64, u64) {
        let s = &mut self.sparse;
        let taken = (s.bytes_read, s.dense_bytes);
        (s.bytes_read, s.dense_bytes) = (0, 0);
        taken
    }

    /// The logits of the last [`Model::forward`] (the first `vocab` values are the last token's
    /// with [`Logits::Last`]).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Bytes held by the state (the KV cache dominates): [`RunState::bytes_for`] of its arguments.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes of every buffer the state holds, counted from the buffers
    /// themselves, to hold [`RunState::bytes_for`] to the allocation.
    #[cfg(test)]
    fn allocated_bytes(&self) -> usize {
        use std::mem::size_of_val;
        let s = &self.sparse;
        let floats = [
            &self.x,
            &self.xb,
            &self.xb2,
            &self.q,
            &self.hb,
            &self.hb2,
            &self.att,
            &self.att_tile,
            &self.att_window,
            &self.logits,
            &self.scratch,
            &self.k,
            &self.v,
            &self.rope_cos,
            &self.rope_sin,
            &self.rope_local_cos,
            &self.rope_local_sin,
            &self.bias_weights,
            &self.bias_centres,
            &s.exact,
            &s.rest,
            &s.low,
            &s.low_t,
        ];
        floats.iter().map(|buffer| size_of_val(&buffer[..])).sum::<usize>()
            + size_of_val(&self.xq[..])
            + size_of_val(&self.xk[..])
            + size_of_val(&s.exact_q[..])
            + size_of_val(&s.mask[..])
            + size_of_val(&self.projections.sum[..])
            + size_of_val(&self.projections.sum_squares[..])
            + self.kv.allocated_bytes()
    }

    /// Writes every page of every buffer and of the KV cache, so the whole
    /// state is resident from now on rather than as positions fill
    /// ([`crate::kv::commit_pages`]). `brambled` does this at start, after
    /// its memory check; `bench` before it measures.
    pub fn commit_memory(&mut self) {
        use crate::kv::commit_pages;
        for buffer in [
            &mut self.x,
            &mut self.xb,
            &mut self.xb2,
            &mut self.q,
            &mut self.hb,
            &mut self.hb2,
            &mut self.att,
            &mut self.att_tile,
            &mut self.att_window,
            &mut self.logits,
            &mut self.scratch,
            &mut self.k,
            &mut self.v,
            &mut self.sparse.exact,
            &mut self.sparse.rest,
            &mut self.sparse.low,
            &mut self.sparse.low_t,
        ] {
            commit_pages(buffer);
        }
        commit_pages(&mut self.xq);
        commit_pages(&mut self.sparse.exact_q);
        commit_pages(&mut self.sparse.mask);
        self.kv.commit_memory();
    }

    /// Bytes held by the KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// Ends the prefill: with key-channel pruning on ([`Model::set_kv_prune`]),
    /// the keys written so far are pruned, once per conversation
    /// ([`KvCache::prune`]). [`crate::session::Session::step`] calls it before
    /// each step (a no-op after the first); callers of [`Model::forward`]
    /// call it between the prompt and the first decoded token. Allocates nothing.
    pub fn end_prefill(&mut self) {
        self.kv.prune();
    }

    /// The KV cache.
    pub fn kv(&self) -> &KvCache {
        &self.kv
    }
}

/// Where a linear module's input is, for [`Model::forward_observed`]: the
/// four distinct inputs of a layer's seven projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// The attention RMSNorm's output: input of q, k and v.
    AttentionInput,
    /// The attention's output: input of the output projection.
    AttentionOutput,
    /// The FFN RMSNorm's output: input of gate and up.
    FfnInput,
    /// `silu(gate) ⊙ up`: input of down.
    FfnHidden,
    /// The residual stream after the layer (and its bias constraint): no
    /// module's input here, the next layer's RMSNorm reads it.
    Residual,
}

impl Site {
    /// The projections that read this input, by their tensor names' part.
    pub fn modules(self) -> &'static [&'static str] {
        match self {
            Site::AttentionInput => &["attn_q", "attn_k", "attn_v"],
            Site::AttentionOutput => &["attn_output"],
            Site::FfnInput => &["ffn_gate", "ffn_up"],
            Site::FfnHidden => &["ffn_down"],
            Site::Residual => &[],
        }
    }
}

/// Sees every linear module's input during [`Model::forward_observed`]:
/// `(layer, site, values)`, `values` being the batch's vectors one after another.
pub type Observer<'o> = &'o mut dyn FnMut(usize, Site, &[f32]);

/// Which logits [`Model::forward`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only for the last token of the batch (generation).
    Last,
    /// For every token of the batch (perplexity).
    All,
}

impl<'a> Model<'a> {
    /// Builds typed views of every weight of `image`, checking names and
    /// shapes, with the best kernels for this CPU, on one thread.
    pub fn new(image: &'a ModelImage) -> Result<Self> {
        Self::with_options(image, Kernels::detect(), 1)
    }

    /// As [`Model::new`] with the given kernels and number of threads (the
    /// caller's included).
    pub fn with_options(image: &'a ModelImage, kernels: &'static Kernels, threads: usize) -> Result<Self> {
        let config = *image.config();
        let (dim, q_dim, kv_dim, ffn) = (config.dim as usize, config.q_dim(), config.kv_dim(), config.ffn_dim as usize);
        let vocab = config.vocab_size as usize;
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Matrix<'a>> {
            let info = image.tensor(name).ok_or_else(|| Error::corrupt(format!("tensor {name} is missing")))?;
            if info.shape != [rows, cols] {
                return Err(Error::corrupt(format!(
                    "tensor {name} has shape {:?}, expected [{rows}, {cols}]",
                    info.shape
                )));
            }
            Ok(Matrix { rows, cols, data: image.tensor_view(info) })
        };
        let sized_vector = |name: &str, len: usize| -> Result<&'a [f32]> {
            let info = image.tensor(name).ok_or_else(|| Error::corrupt(format!("tensor {name} is missing")))?;
            match image.tensor_view(info) {
                TensorView::F32(values) if info.shape == [len] => Ok(values),
                _ => Err(Error::corrupt(format!(
                    "tensor {name} is {:?} {}, expected [{len}] f32",
                    info.shape,
                    info.encoding.name()
                ))),
            }
        };
        let vector = |name: &str| sized_vector(name, dim);
        let architecture = image.architecture().clone();
        // A config claiming more layers than the image holds is refused
        // before anything is sized by it.
        let per_layer = architecture.layer_parts(&config).len();
        let layers_held = image.tensors().len() / per_layer;
        if config.n_layers as usize > layers_held {
            return Err(Error::corrupt(format!(
                "config n_layers = {} but the image holds {} tensors, enough for at most {layers_held} layers of {per_layer}",
                config.n_layers,
                image.tensors().len()
            )));
        }
        let head_dim = config.head_dim as usize;
        let mut layers = Vec::with_capacity(config.n_layers as usize);
        for l in 0..config.n_layers {
            let name = |part: &str| format!("blk.{l}.{part}.weight");
            let bias = |part: &str, len: usize| sized_vector(&format!("blk.{l}.{part}.bias"), len);
            layers.push(LayerWeights {
                qkv_bias: match architecture.has(Features::QKV_BIAS) {
                    true => Some([bias("attn_q", q_dim)?, bias("attn_k", kv_dim)?, bias("attn_v", kv_dim)?]),
                    false => None,
                },
                qk_norm: match architecture.has(Features::QK_NORM) {
                    true => Some([
                        sized_vector(&name("attn_q_norm"), head_dim)?,
                        sized_vector(&name("attn_k_norm"), head_dim)?,
                    ]),
                    false => None,
                },
                post_norms: match architecture.has(Features::POST_NORMS) {
                    true => Some([vector(&name("post_attention_norm"))?, vector(&name("post_ffw_norm"))?]),
                    false => None,
                },
                attn_norm: vector(&name("attn_norm"))?,
                wq: matrix(&name("attn_q"), q_dim, dim)?,
                wk: matrix(&name("attn_k"), kv_dim, dim)?,
                wv: matrix(&name("attn_v"), kv_dim, dim)?,
                wo: matrix(&name("attn_output"), dim, q_dim)?,
                ffn_norm: vector(&name("ffn_norm"))?,
                w_gate: matrix(&name("ffn_gate"), ffn, dim)?,
                w_up: matrix(&name("ffn_up"), ffn, dim)?,
                w_down: matrix(&name("ffn_down"), dim, ffn)?,
            });
        }
        let token_embd = matrix("token_embd.weight", vocab, dim)?;
        let output = if config.tied_output != 0 { token_embd } else { matrix("output.weight", vocab, dim)? };
        for m in [&token_embd, &output] {
            if !m.cols.is_multiple_of(m.encoding().block_values()) {
                return Err(Error::corrupt("embedding width is not whole blocks"));
            }
        }
        if dim % GROUP != 0 || q_dim % GROUP != 0 || ffn % GROUP != 0 {
            return Err(Error::unsupported(format!(
                "dim {dim}, q_dim {q_dim} and ffn_dim {ffn} must be multiples of {GROUP}"
            )));
        }
        let weights = Weights { token_embd, layers, output_norm: vector("output_norm.weight")?, output };
        Ok(Self {
            config,
            weights,
            kernels,
            rope_factors: image.rope_scaling().map(|scaling| scaling.factors.as_slice()),
            architecture,
            pool: ThreadPool::new(threads),
            sparse: None,
            bias: None,
            kv_mode: KvMode::F32,
            kv_prune: 0.0,
        })
    }

    /// Uses an R-Sparse plan (`None`: dense). Every module must name one of
    /// the seven projections with its shape. States made before this call
    /// lack the sparse path's scratch: make new ones.
    pub fn set_sparsity(&mut self, plan: Option<Rsparse>, mode: SparseMode) -> Result<()> {
        let Some(plan) = plan else {
            self.sparse = None;
            return Ok(());
        };
        let mut layers = vec![[None; 7]; self.weights.layers.len()];
        for (index, module) in plan.modules.iter().enumerate() {
            let unknown =
                || Error::invalid(format!("rsparse module {} is not a projection of this model", module.name));
            let rest = module.name.strip_prefix("blk.").ok_or_else(unknown)?;
            let (layer, part) = rest.split_once('.').ok_or_else(unknown)?;
            let part = part.strip_suffix(".weight").ok_or_else(unknown)?;
            let layer: usize = layer.parse().map_err(|_| unknown())?;
            let p = PROJECTIONS.iter().position(|&name| name == part).ok_or_else(unknown)?;
            let weights = self.weights.layers.get(layer).ok_or_else(unknown)?;
            let m =
                [&weights.wq, &weights.wk, &weights.wv, &weights.wo, &weights.w_gate, &weights.w_up, &weights.w_down]
                    [p];
            if module.rank > module.rows {
                return Err(Error::invalid(format!(
                    "rsparse module {} has rank {} above its {} rows",
                    module.name, module.rank, module.rows
                )));
            }
            if (m.rows, m.cols) != (module.rows, module.cols) {
                return Err(Error::invalid(format!(
                    "rsparse module {} is {} × {}, the weight is {} × {}",
                    module.name, module.rows, module.cols, m.rows, m.cols
                )));
            }
            layers[layer][p] = Some(index);
        }
        let u_columns = plan
            .modules
            .iter()
            .map(|m| (0..m.rank * m.rows).map(|i| m.u[(i % m.rows) * m.rank + i / m.rows]).collect())
            .collect();
        self.sparse = Some(SparsePlan { plan, mode, layers, u_columns });
        Ok(())
    }

    /// Uses a bias constraint (`None`: none). Its directions must match the
    /// model's layers and width. States made afterwards start with its
    /// predefined weights and its centres.
    pub fn set_bias(&mut self, constraint: Option<BiasConstraint>) -> Result<()> {
        if let Some(c) = &constraint {
            c.check()?;
            if (c.layers, c.dim) != (self.weights.layers.len(), self.config.dim as usize) {
                return Err(Error::invalid(format!(
                    "bias constraint for {} layers of width {}, the model has {} of width {}",
                    c.layers,
                    c.dim,
                    self.weights.layers.len(),
                    self.config.dim
                )));
            }
        }
        self.bias = constraint;
        Ok(())
    }

    /// Uses the image's own `bias` section, if it has one; returns whether it did.
    pub fn use_image_bias(&mut self, image: &ModelImage) -> Result<bool> {
        let Some(bytes) = image.section(crate::bias::SECTION) else { return Ok(false) };
        self.set_bias(Some(BiasConstraint::from_section(bytes)?))?;
        Ok(true)
    }

    /// The bias constraint in use.
    pub fn bias(&self) -> Option<&BiasConstraint> {
        self.bias.as_ref()
    }

    /// Uses the image's own `rsparse` section, if it has one; returns
    /// whether it did.
    pub fn use_image_sparsity(&mut self, image: &ModelImage, mode: SparseMode) -> Result<bool> {
        let Some(bytes) = image.section(crate::rsparse::SECTION) else { return Ok(false) };
        self.set_sparsity(Some(Rsparse::from_section(bytes)?), mode)?;
        Ok(true)
    }

    /// The R-Sparse plan in use.
    pub fn sparsity(&self) -> Option<(&Rsparse, SparseMode)> {
        self.sparse.as_ref().map(|p| (&p.plan, p.mode))
    }

    /// Makes the states made from now on store their KV caches as `mode`;
    /// an error if this model's shape does not allow it.
    pub fn set_kv_mode(&mut self, mode: KvMode) -> Result<()> {
        mode.check(&self.config)?;
        crate::kv::check_prune(self.kv_prune, mode)?;
        self.kv_mode = mode;
        Ok(())
    }

    /// Makes the states made from now on prune a share `ratio` of each key
    /// head's channels once their prompt has run (ThinK; `docs/kv.md`): 0
    /// is off; an error outside [0, 1) or with a quantized cache.
    pub fn set_kv_prune(&mut self, ratio: f32) -> Result<()> {
        crate::kv::check_prune(ratio, self.kv_mode)?;
        self.kv_prune = ratio;
        Ok(())
    }

    /// The share of key channels new states drop after their prompt.
    pub fn kv_prune(&self) -> f32 {
        self.kv_prune
    }

    /// How new states store their KV caches.
    pub fn kv_mode(&self) -> KvMode {
        self.kv_mode
    }

    /// A [`RunState`] for this model. Panics when a buffer cannot be
    /// allocated, for callers whose sizes are known to fit (tests);
    /// [`Model::try_new_state`] returns the error instead.
    pub fn new_state(&self, context: usize, batch: usize) -> RunState {
        self.try_new_state(context, batch).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A [`RunState`] for this model, or an
    /// [`ErrorKind::OutOfMemory`](crate::error::ErrorKind::OutOfMemory) error
    /// naming the buffer whose size overflows or cannot be allocated.
    pub fn try_new_state(&self, context: usize, batch: usize) -> Result<RunState> {
        let mut state = RunState::try_with_rope(&self.config, self.rope_factors, context, batch, self.state_options())?;
        if let Some(c) = &self.bias {
            state.bias_weights.copy_from_slice(&c.weights);
            for (l, centre) in state.bias_centres.iter_mut().enumerate() {
                *centre = c.centre(l);
            }
        }
        Ok(state)
    }

    /// How this model's states are allocated: its KV mode, its key-channel
    /// pruning, the R-Sparse scratch when it has a plan, and its layers'
    /// windows and local RoPE base.
    pub fn state_options(&self) -> StateOptions<'_> {
        let options = StateOptions::for_architecture(&self.architecture, self.kv_mode, self.sparse.is_some());
        StateOptions { kv_prune: self.kv_prune, ..options }
    }

    /// Bytes [`Model::try_new_state`] would allocate for these arguments
    /// ([`RunState::bytes_for`] with [`Model::state_options`]), computed
    /// without allocating: what a memory limit is checked against.
    pub fn state_bytes(&self, context: usize, batch: usize) -> Result<usize> {
        RunState::bytes_for(&self.config, context, batch, self.state_options())
    }

    /// Bytes of weights one decoded token reads (every matrix once, one embedding row).
    pub fn weight_bytes_per_token(&self) -> usize {
        let w = &self.weights;
        let layers: usize = w
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down].iter().map(|m| m.bytes()).sum::<usize>()
                    + 8 * l.attn_norm.len()
            })
            .sum();
        layers + w.output.bytes() + w.token_embd.bytes() / w.token_embd.rows + 4 * w.output_norm.len()
    }

    /// `out = W · x` for projection `p` of layer `l` (x a batch, as f32 and
    /// int8), through the R-Sparse path when the plan has this module and
    /// its mode covers this batch: `W (x ⊙ m) + U (SVᵀ (x ⊙ (1 − m)))`.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        l: usize,
        p: usize,
        w: &Matrix,
        x: &[f32],
        (xq, xk): (&[BlockQ8Act], &[BlockQ8K]),
        out: &mut [f32],
        scratch: &mut [f32],
        sparse: &mut SparseScratch,
    ) {
        let n = x.len() / w.cols;
        let module = self.sparse.as_ref().and_then(|plan| {
            let covers = plan.mode == SparseMode::Always || n == 1;
            plan.layers[l][p].filter(|_| covers).map(|i| (&plan.plan.modules[i], &plan.u_columns[i][..]))
        });
        match module {
            None => w.matmul(self.kernels, &self.pool, x, xq, xk, out, scratch),
            Some((module, u_columns)) => self.sparse_linear(module, u_columns, w, x, out, scratch, sparse),
        }
    }

    /// The int8 activations of `x` for `matrices`, the matrices that read
    /// it: one token's 256-value blocks into `xk` when the kernels have
    /// [`crate::kernels::SuperblockKernels`] and one of `matrices` is
    /// interleaved Q4_K or Q6_K (empty otherwise: a batch, or no such
    /// matrix), and the 32-value blocks into `xq` unless every one of
    /// `matrices` takes the 256-value ones (then empty: nothing reads them).
    fn quantize_input<'s>(
        &self,
        x: &[f32],
        matrices: &[&Matrix],
        xq: &'s mut [BlockQ8Act],
        xk: &'s mut [BlockQ8K],
    ) -> (&'s [BlockQ8Act], &'s [BlockQ8K]) {
        let superblock = |m: &&Matrix| {
            m.cols == x.len() && matches!(m.encoding(), Encoding::Q4KX4 | Encoding::Q4KX8 | Encoding::Q6KX4)
        };
        let xk: &[BlockQ8K] = match self.kernels.superblock {
            Some(kernels) if x.len().is_multiple_of(QK_K) && matrices.iter().any(superblock) => {
                let xk = &mut xk[..x.len() / QK_K];
                (kernels.quantize)(x, xk);
                xk
            }
            _ => &[],
        };
        if !xk.is_empty() && matrices.iter().all(superblock) {
            return (&[], xk);
        }
        let xq = &mut xq[..x.len() / GROUP];
        (self.kernels.quantize_activation)(x, xq);
        (xq, xk)
    }

    /// The R-Sparse product of [`Model::linear`]. The exact part reads only
    /// the active channels' columns of a channel-major matrix (any other
    /// encoding runs its dense kernels on `x ⊙ m`: the same result, every
    /// weight read); the low-rank part is two f16 products.
    #[allow(clippy::too_many_arguments)]
    fn sparse_linear(
        &self,
        module: &SparseModule,
        u_columns: &[f16],
        w: &Matrix,
        x: &[f32],
        out: &mut [f32],
        scratch: &mut [f32],
        s: &mut SparseScratch,
    ) {
        let k = self.kernels;
        let (rows, cols, rank) = (w.rows, w.cols, module.rank);
        let n = x.len() / cols;
        let blocks = cols / GROUP;
        // The split: m_i = |x_i · c_i| > τ, as values and as mask bits.
        let (exact, rest) = (&mut s.exact[..n * cols], &mut s.rest[..n * cols]);
        let mask = &mut s.mask[..n * blocks];
        let mut masked = 0;
        let token_values = x.chunks_exact(cols).zip(exact.chunks_exact_mut(cols).zip(rest.chunks_exact_mut(cols)));
        for ((token, (e, r)), bits) in token_values.zip(mask.chunks_exact_mut(blocks)) {
            masked += (k.sparse_split)(token, &module.scores, module.threshold, e, r, bits) as u64;
        }
        s.masked += masked;
        s.channels += (n * cols) as u64;
        let low_rank_bytes = 2 * rank * (rows + cols);
        s.dense_bytes += (n * w.bytes()) as u64;
        // Exact channels through the weights.
        let exact_q = &mut s.exact_q[..n * blocks];
        (k.quantize_activation)(exact, exact_q);
        if w.encoding().is_channel_major() {
            for ((token, bits), out) in
                exact_q.chunks_exact(blocks).zip(mask.chunks_exact(blocks)).zip(out.chunks_exact_mut(rows))
            {
                w.matmul_channels(k, &self.pool, token, Some(bits), out);
                s.bytes_read += (w.channel_bytes(bits) + low_rank_bytes) as u64;
            }
        } else {
            w.matmul(k, &self.pool, exact, exact_q, &[], out, scratch);
            s.bytes_read += (n * (w.bytes() + low_rank_bytes)) as u64;
        }
        if rank == 0 {
            return;
        }
        // The rest through U · (SVᵀ · rest): SVᵀ · rest (rank values a token;
        // the kernel writes them rank-outermost), then out += Σ_k low_k · U[:, k].
        let low = &mut s.low[..rank * n];
        (k.matmul_f16)(&module.sv, cols, rest, low);
        let low_t = &mut s.low_t[..n * rank];
        for (r, values) in low.chunks_exact(n).enumerate() {
            for (b, &v) in values.iter().enumerate() {
                low_t[b * rank + r] = v;
            }
        }
        for (token_low, out) in low_t.chunks_exact(rank).zip(out.chunks_exact_mut(rows)) {
            (k.low_rank_add)(u_columns, token_low, out);
        }
    }

    /// `out = RMSNorm(x)` of each head (`head_dim` values) of a batch of
    /// projections `x`, with the head-wide `weight`: Qwen3's and Gemma's q/k norms.
    fn rms_norm_heads(&self, out: &mut [f32], x: &[f32], weight: &[f32]) {
        let head_dim = weight.len();
        for (o, v) in out.chunks_exact_mut(head_dim).zip(x.chunks_exact(head_dim)) {
            (self.kernels.rmsnorm)(o, v, weight, self.config.norm_eps);
        }
    }

    /// The residual: `x += out` for the batch's rows, or with a post norm
    /// (Gemma's on the attention's and the FFN's outputs) `x += RMSNorm(out)
    /// ⊙ norm`, normalized through `spare` (at least as long as `x`).
    fn add_to_stream(&self, x: &mut [f32], out: &[f32], spare: &mut [f32], norm: Option<&[f32]>) {
        let out = match norm {
            None => out,
            Some(weight) => {
                let spare = &mut spare[..x.len()];
                for (normed, row) in spare.chunks_exact_mut(weight.len()).zip(out.chunks_exact(weight.len())) {
                    (self.kernels.rmsnorm)(normed, row, weight, self.config.norm_eps);
                }
                spare
            }
        };
        for (x, o) in x.iter_mut().zip(out) {
            *x += o;
        }
    }

    /// Runs `tokens` at positions `pos ..`, filling the KV cache, and returns
    /// the logits of the last token (`vocab`) or of all of them
    /// (`tokens.len() × vocab`). Allocates nothing.
    pub fn forward<'s>(
        &self,
        state: &'s mut RunState,
        tokens: &[u32],
        pos: usize,
        logits: Logits,
    ) -> Result<&'s [f32]> {
        self.forward_observed(state, tokens, pos, logits, None)
    }

    /// As [`Model::forward`], showing each linear module's input to
    /// `observer` (calibration reads activations this way).
    pub fn forward_observed<'s>(
        &self,
        state: &'s mut RunState,
        tokens: &[u32],
        pos: usize,
        logits: Logits,
        mut observer: Option<Observer>,
    ) -> Result<&'s [f32]> {
        let mut observe = |layer: usize, site: Site, values: &[f32]| {
            if let Some(see) = observer.as_mut() {
                see(layer, site, values);
            }
        };
        let p = &self.config;
        let k = self.kernels;
        let pool = &self.pool;
        let n = tokens.len();
        let (dim, q_dim, kv_dim, ffn) = (p.dim as usize, p.q_dim(), p.kv_dim(), p.ffn_dim as usize);
        let head_dim = p.head_dim as usize;
        let heads_per_kv = (p.n_heads / p.n_kv_heads) as usize;
        let vocab = p.vocab_size as usize;
        let pairs = p.rope_dim as usize / 2;
        let halves = p.rope_style() == RopeStyle::Halves;
        if n == 0 || n > state.batch {
            return Err(Error::invalid(format!("batch of {n} tokens; this state takes 1 to {}", state.batch)));
        }
        if pos + n > state.context {
            return Err(Error::invalid(format!(
                "positions {pos}..{} run past the context of {} tokens",
                pos + n,
                state.context
            )));
        }
        if !state.kv.can_rewind_to(pos) {
            return Err(Error::invalid(format!(
                "position {pos} is behind what the sliding-window layers' caches still hold; run the tokens again from 0"
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::invalid(format!("token id {bad} is not below the vocabulary size {vocab}")));
        }
        if self.sparse.is_some() && state.sparse.exact.len() < state.batch * dim.max(q_dim).max(ffn) {
            return Err(Error::invalid("this state was made before the model's R-Sparse plan was set; make a new one"));
        }
        let s = state;

        // Token embeddings into the residual stream (scaled by √dim in Gemma).
        let arch = &self.architecture;
        for (b, &token) in tokens.iter().enumerate() {
            self.weights.token_embd.row_to_f32(token as usize, &mut s.x[b * dim..(b + 1) * dim]);
        }
        if arch.embedding_scale != 1.0 {
            s.x[..n * dim].iter_mut().for_each(|x| *x *= arch.embedding_scale);
        }

        for (l, layer) in self.weights.layers.iter().enumerate() {
            // Attention RMSNorm, then int8 activations for the integer kernels.
            for b in 0..n {
                (k.rmsnorm)(
                    &mut s.xb[b * dim..(b + 1) * dim],
                    &s.x[b * dim..(b + 1) * dim],
                    layer.attn_norm,
                    p.norm_eps,
                );
            }
            observe(l, Site::AttentionInput, &s.xb[..n * dim]);
            let xq = self.quantize_input(&s.xb[..n * dim], &[&layer.wq, &layer.wk, &layer.wv], &mut s.xq, &mut s.xk);

            // q, k, v projections, each plus its bias (Qwen2); with q/k norms (Qwen3,
            // Gemma), q and k go through xb2 (free until attention writes it) and
            // each head is normalized into place.
            let xb = &s.xb[..n * dim];
            let sp = &mut s.sparse;
            let bias = |i: usize| layer.qkv_bias.map(|b| b[i]);
            for (i, w, out, width) in [(0, &layer.wq, &mut s.q, q_dim), (1, &layer.wk, &mut s.k, kv_dim)] {
                match layer.qk_norm {
                    None => {
                        self.linear(l, i, w, xb, xq, &mut out[..n * width], &mut s.scratch, sp);
                        add_bias(&mut out[..n * width], bias(i));
                    }
                    Some(norms) => {
                        self.linear(l, i, w, xb, xq, &mut s.xb2[..n * width], &mut s.scratch, sp);
                        add_bias(&mut s.xb2[..n * width], bias(i));
                        self.rms_norm_heads(&mut out[..n * width], &s.xb2[..n * width], norms[i]);
                    }
                }
            }
            self.linear(l, 2, &layer.wv, xb, xq, &mut s.v[..n * kv_dim], &mut s.scratch, sp);
            add_bias(&mut s.v[..n * kv_dim], bias(2));

            // RoPE on every query and key head (a local layer's own base in Gemma).
            let (rope_cos, rope_sin) = match arch.layers[l].is_local() && !s.rope_local_cos.is_empty() {
                true => (&s.rope_local_cos, &s.rope_local_sin),
                false => (&s.rope_cos, &s.rope_sin),
            };
            for b in 0..n {
                let angles = (pos + b) * pairs..(pos + b + 1) * pairs;
                let (cos, sin) = (&rope_cos[angles.clone()], &rope_sin[angles]);
                for head in s.q[b * q_dim..(b + 1) * q_dim].chunks_exact_mut(head_dim) {
                    (k.rope)(&mut head[..2 * pairs], cos, sin, halves);
                }
                for head in s.k[b * kv_dim..(b + 1) * kv_dim].chunks_exact_mut(head_dim) {
                    (k.rope)(&mut head[..2 * pairs], cos, sin, halves);
                }
            }

            // Causal grouped-query attention: token b sees positions 0 ..= pos + b; the
            // query heads that share a key/value head go through the cache together.
            let scale = arch.attention_scale;
            let group = heads_per_kv * head_dim;
            if n > 1 && s.kv.attends_in_batches(l) {
                // A prompt batch over the f32 or f16 cache: every key and value enters the
                // cache (and, over a ring past its first window, the staging, with what the
                // batch's first token sees before it), then each KV head's queries of the
                // whole batch attend in tiles.
                for b in 0..n {
                    s.kv.observe_queries(l, pos + b, &s.q[b * q_dim..(b + 1) * q_dim]);
                }
                s.kv.append_batch(k, l, pos, &s.k[..n * kv_dim], &s.v[..n * kv_dim], &mut s.att_window);
                for kv in 0..p.n_kv_heads as usize {
                    let heads = kv * group..(n - 1) * q_dim + (kv + 1) * group;
                    let (queries, out) = (&s.q[heads.clone()], &mut s.xb2[heads]);
                    s.kv.attend_batch(k, l, kv, pos, n, queries, q_dim, scale, &s.att_window, &mut s.att_tile, out);
                }
            } else {
                // A token at a time (decode, quantized caches, pruned layers): its key and
                // value enter the cache, then it attends.
                for b in 0..n {
                    let new = b * kv_dim..(b + 1) * kv_dim;
                    s.kv.observe_queries(l, pos + b, &s.q[b * q_dim..(b + 1) * q_dim]);
                    s.kv.append(k, l, pos + b, &s.k[new.clone()], &s.v[new]);
                    for kv in 0..p.n_kv_heads as usize {
                        let heads = b * q_dim + kv * group..b * q_dim + (kv + 1) * group;
                        s.kv.attend(k, l, kv, &s.q[heads.clone()], scale, &mut s.att, &mut s.xb2[heads]);
                    }
                }
            }

            // Output projection and residual.
            observe(l, Site::AttentionOutput, &s.xb2[..n * q_dim]);
            let xq = self.quantize_input(&s.xb2[..n * q_dim], &[&layer.wo], &mut s.xq, &mut s.xk);
            self.linear(l, 3, &layer.wo, &s.xb2[..n * q_dim], xq, &mut s.xb[..n * dim], &mut s.scratch, &mut s.sparse);
            // (Gemma normalizes the attention's output before it joins the stream.)
            let post_norm = layer.post_norms.map(|[attention, _]| attention);
            self.add_to_stream(&mut s.x[..n * dim], &s.xb[..n * dim], &mut s.xb2, post_norm);

            // FFN RMSNorm.
            for b in 0..n {
                (k.rmsnorm)(
                    &mut s.xb[b * dim..(b + 1) * dim],
                    &s.x[b * dim..(b + 1) * dim],
                    layer.ffn_norm,
                    p.norm_eps,
                );
            }
            observe(l, Site::FfnInput, &s.xb[..n * dim]);
            let xq = self.quantize_input(&s.xb[..n * dim], &[&layer.w_gate, &layer.w_up], &mut s.xq, &mut s.xk);

            // SwiGLU: down(silu(gate(x)) ⊙ up(x)); GeGLU with gelu in Gemma.
            let xb = &s.xb[..n * dim];
            self.linear(l, 4, &layer.w_gate, xb, xq, &mut s.hb[..n * ffn], &mut s.scratch, &mut s.sparse);
            self.linear(l, 5, &layer.w_up, xb, xq, &mut s.hb2[..n * ffn], &mut s.scratch, &mut s.sparse);
            let gate = if arch.has(Features::GELU_TANH) { k.gelu_mul } else { k.silu_mul };
            gate(&mut s.hb[..n * ffn], &s.hb2[..n * ffn]);
            observe(l, Site::FfnHidden, &s.hb[..n * ffn]);
            let xq = self.quantize_input(&s.hb[..n * ffn], &[&layer.w_down], &mut s.xq, &mut s.xk);
            self.linear(l, 6, &layer.w_down, &s.hb[..n * ffn], xq, &mut s.xb[..n * dim], &mut s.scratch, &mut s.sparse);

            // Residual (the FFN's output normalized first in Gemma).
            let post_norm = layer.post_norms.map(|[_, ffn]| ffn);
            self.add_to_stream(&mut s.x[..n * dim], &s.xb[..n * dim], &mut s.xb2, post_norm);

            // Bias constraint: record h · r_l, then h ← h − w_l (h · r_l − centre_l) d_l
            // (r_l: d_l, or the whitened read vector; centre_l: the section's centre,
            // `BiasConstraint::centre`: 0, the baseline mean, a midpoint or the parity value,
            // as the feedback loop may have moved it).
            if let Some(c) = &self.bias {
                let (r, d, w, centre) = (c.readout(l), c.direction(l), s.bias_weights[l], s.bias_centres[l]);
                for h in s.x[..n * dim].chunks_exact_mut(dim) {
                    let p = (k.project_out)(h, r, d, w, centre) as f64;
                    s.projections.sum[l] += p;
                    s.projections.sum_squares[l] += p * p;
                }
            }
            observe(l, Site::Residual, &s.x[..n * dim]);
        }
        if self.bias.is_some() {
            s.projections.tokens += n as u64;
        }

        // Final RMSNorm and the output layer, for the tokens whose logits are wanted.
        let first = match logits {
            Logits::Last => n - 1,
            Logits::All => 0,
        };
        let wanted = n - first;
        for b in first..n {
            let row = b - first;
            (k.rmsnorm)(
                &mut s.xb[row * dim..(row + 1) * dim],
                &s.x[b * dim..(b + 1) * dim],
                self.weights.output_norm,
                p.norm_eps,
            );
        }
        let (xq, xk) = self.quantize_input(&s.xb[..wanted * dim], &[&self.weights.output], &mut s.xq, &mut s.xk);
        self.weights.output.matmul(k, pool, &s.xb[..wanted * dim], xq, xk, &mut s.logits, &mut s.scratch);
        Ok(&s.logits[..wanted * vocab])
    }
}

/// Adds `bias` (one row's width) to every row of a batch `values`; nothing without one.
fn add_bias(values: &mut [f32], bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        for row in values.chunks_exact_mut(bias.len()) {
            row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use bytemuck::Zeroable;

    /// A small grouped-query model whose heads suit every KV mode (head_dim 32).
    fn config() -> ModelConfig {
        let mut c = ModelConfig::zeroed();
        (c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.dim) = (3, 4, 2, 32, 128);
        (c.ffn_dim, c.vocab_size, c.context_length, c.rope_dim, c.rope_theta) = (352, 500, 256, 32, 10000.0);
        c
    }

    #[test]
    fn bytes_for_is_what_every_kind_of_state_allocates() {
        let c = config();
        for sparse in [false, true] {
            for (kv, kv_prune) in
                [(KvMode::F32, 0.0), (KvMode::F32, 0.25), (KvMode::F16, 0.0), (KvMode::Q8, 0.0), (KvMode::Q4, 0.0)]
            {
                for (context, batch) in [(64, 1), (100, 7), (256, 32)] {
                    let options = StateOptions { kv, kv_prune, sparse, layers: &[] };
                    let state = RunState::try_with_options(&c, context, batch, options).unwrap();
                    let expected = RunState::bytes_for(&c, context, batch, options).unwrap();
                    assert_eq!(state.allocated_bytes(), expected, "{options:?}, context {context}, batch {batch}");
                    assert_eq!(state.bytes(), expected, "{options:?}, context {context}, batch {batch}");
                }
            }
        }
        // The R-Sparse scratch is counted: 4 f32 buffers, int8 blocks and mask words, batch × widest (352).
        let dense = RunState::bytes_for(&c, 64, 4, StateOptions::default()).unwrap();
        let sparse = RunState::bytes_for(&c, 64, 4, StateOptions { sparse: true, ..StateOptions::default() }).unwrap();
        let blocks = 4 * 352 / GROUP;
        assert_eq!(sparse - dense, 4 * 4 * 4 * 352 + blocks * std::mem::size_of::<BlockQ8Act>() + blocks * 4);
    }

    #[test]
    fn bytes_for_an_overflowing_state_is_an_error_naming_the_buffer() {
        let mut huge = config();
        huge.vocab_size = 1 << 24;
        let error = RunState::bytes_for(&huge, 64, usize::MAX / 2, StateOptions::default()).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::OutOfMemory, "{error}");
        assert!(error.message().contains("overflow"), "{error}");
        let error = RunState::bytes_for(&huge, usize::MAX / 2, 1, StateOptions::default()).unwrap_err();
        assert!(error.message().contains("KV cache") && error.message().contains("overflow"), "{error}");
    }
}

#[cfg(test)]
mod window_tests;

#[cfg(test)]
mod superblock_tests;

#[cfg(test)]
mod kquant_tests {
    use super::*;
    use crate::kernels::matmul::kquant::scalar;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// A k-quant matrix's rows come out of `row_to_f32` as its own blocks
    /// expand, and its product split over threads (20 rows: a split inside
    /// the rows, on multiples of 8) and over a batch is the reference's,
    /// row for row: every row is one call of the same dot product.
    #[test]
    fn kquant_matrices_expand_and_multiply_by_super_blocks() {
        let (rows, cols) = (20, 3 * QK_K);
        let w = data(rows * cols, 5);
        let q4k: Vec<BlockQ4K> = w.chunks_exact(QK_K).map(BlockQ4K::quantize).collect();
        let q5k: Vec<BlockQ5K> = w.chunks_exact(QK_K).map(BlockQ5K::quantize).collect();
        let q6k: Vec<BlockQ6K> = w.chunks_exact(QK_K).map(BlockQ6K::quantize).collect();
        let q3k: Vec<BlockQ3K> = w.chunks_exact(QK_K).map(BlockQ3K::quantize).collect();
        let q2k: Vec<BlockQ2K> = w.chunks_exact(QK_K).map(BlockQ2K::quantize).collect();
        let views = [
            TensorView::Q4K(&q4k),
            TensorView::Q5K(&q5k),
            TensorView::Q6K(&q6k),
            TensorView::Q3K(&q3k),
            TensorView::Q2K(&q2k),
        ];
        for view in views {
            let m = Matrix { rows, cols, data: view };
            let encoding = m.encoding();
            assert_eq!(m.bytes(), rows * cols / QK_K * encoding.bytes_for(QK_K), "{encoding:?}");
            let bytes: &[u8] = match view {
                TensorView::Q4K(b) => bytemuck::cast_slice(b),
                TensorView::Q5K(b) => bytemuck::cast_slice(b),
                TensorView::Q6K(b) => bytemuck::cast_slice(b),
                TensorView::Q3K(b) => bytemuck::cast_slice(b),
                TensorView::Q2K(b) => bytemuck::cast_slice(b),
                _ => unreachable!(),
            };
            let mut all = vec![0f32; rows * cols];
            quant::dequantize_rows(encoding, bytes, cols, &mut all);
            let mut row = vec![0f32; cols];
            for r in [0, 7, 19] {
                m.row_to_f32(r, &mut row);
                assert_eq!(row, all[r * cols..(r + 1) * cols], "{encoding:?} row {r}");
            }
            for batch in [1, 3] {
                let x = data(batch * cols, 9 + batch as u32);
                let mut xq = vec![BlockQ8Act { d: 0.0, s: 0.0, qs: [0; GROUP] }; batch * cols / GROUP];
                (Kernels::SCALAR.quantize_activation)(&x, &mut xq);
                let mut expected = vec![0f32; rows * batch];
                match view {
                    TensorView::Q4K(b) => scalar::matmul_q4k(b, cols, &xq, &mut expected),
                    TensorView::Q5K(b) => scalar::matmul_q5k(b, cols, &xq, &mut expected),
                    TensorView::Q6K(b) => scalar::matmul_q6k(b, cols, &xq, &mut expected),
                    TensorView::Q3K(b) => scalar::matmul_q3k(b, cols, &xq, &mut expected),
                    TensorView::Q2K(b) => scalar::matmul_q2k(b, cols, &xq, &mut expected),
                    _ => unreachable!(),
                }
                for threads in [1, 2] {
                    let pool = ThreadPool::new(threads);
                    let (mut out, mut scratch) = (vec![0f32; rows * batch], vec![0f32; rows * batch]);
                    m.matmul(&Kernels::SCALAR, &pool, &x, &xq, &[], &mut out, &mut scratch);
                    for r in 0..rows {
                        for b in 0..batch {
                            assert_eq!(
                                out[b * rows + r],
                                expected[r * batch + b],
                                "{encoding:?} threads {threads} batch {batch} [{r}, {b}]"
                            );
                        }
                    }
                }
            }
        }
    }
}
