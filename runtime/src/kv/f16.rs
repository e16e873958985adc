//! The f16 storage of the KV cache ([`KvMode::F16`](super::KvMode::F16)),
//! llama.cpp's default: every key and value as IEEE half, every position,
//! in the f32 cache's layout (`(layer, context, kv_dim)`), half its bytes.
//!
//! There is no f32 window of recent positions, as the quantized modes keep:
//! an f16 keeps 11 significant bits, so a stored value is within 2⁻¹¹ of
//! itself (relative; keys and values of a trained model are far inside f16's
//! range, ±65504). A score `q·k` then moves by at most `2⁻¹¹·Σ|q_c·k_c|`, a
//! few thousandths for SmolLM2's heads of 64 (the quantized codes' step is
//! 1/255 or 1/15 of a channel's whole range, which is why those keep the
//! recent tokens exact), and an output by at most `2⁻¹¹·Σ_t w_t·|v_t|`.
//! `tests/tests/kv.rs` bounds what that does to the logits.
//!
//! Writing a position rounds its f32 key and value once
//! ([`Kernels::round_to_f16`]); attention widens them back as it reads
//! (the `*_f16` kernels of [`crate::kernels::attention`]).

use super::{Attention, LayerSlots, Shape, Sizes};
use crate::buffers::filled;
use crate::error::Result;
use crate::kernels::attention::Causal;
use crate::kernels::Kernels;
use half::f16;
use half::slice::HalfFloatSliceExt;
use std::ops::Range;

/// Keys and values of every position in f16. Shapes in comments.
pub(super) struct Half {
    keys: Vec<f16>,   // (layer, slots, kv_dim)
    values: Vec<f16>, // (layer, slots, kv_dim)
}

impl Half {
    /// Allocates the buffers of `sizes`.
    pub(super) fn new(sizes: &Sizes) -> Result<Self> {
        Ok(Self {
            keys: filled("KV cache keys", sizes.halves, f16::ZERO)?,
            values: filled("KV cache values", sizes.halves, f16::ZERO)?,
        })
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        2 * (self.keys.len() + self.values.len())
    }

    /// Bytes of every buffer, counted from the buffers themselves.
    #[cfg(test)]
    pub(super) fn allocated_bytes(&self) -> usize {
        std::mem::size_of_val(&self.keys[..]) + std::mem::size_of_val(&self.values[..])
    }

    /// Writes every page of both buffers ([`super::commit_pages`]).
    pub(super) fn commit_memory(&mut self) {
        super::commit_pages(&mut self.keys);
        super::commit_pages(&mut self.values);
    }

    /// Stores position `pos`'s key and value of a layer kept as `layer`
    /// says, rounded to f16, in its slot.
    pub(super) fn append(
        &mut self,
        kernels: &Kernels,
        shape: &Shape,
        layer: LayerSlots,
        pos: usize,
        key: &[f32],
        value: &[f32],
    ) {
        let kv_dim = shape.kv_dim();
        let at = (layer.first_slot + layer.slot(pos)) * kv_dim;
        (kernels.round_to_f16)(key, &mut self.keys[at..at + kv_dim]);
        (kernels.round_to_f16)(value, &mut self.values[at..at + kv_dim]);
    }

    /// [`super::KvCache::attend`] over every position the token sees: the
    /// f16 kernels' scores, softmax, weighted values.
    pub(super) fn attend(&self, shape: &Shape, call: &Attention, scores: &mut [f32], out: &mut [f32]) {
        let kernels = call.kernels;
        let read = (kernels.attention_scores_f16, kernels.attention_values_f16);
        call.read(shape, (&self.keys, &self.values), read, scores, out);
    }

    /// The key and value of slot `slot` (counted over every layer), widened to f32.
    pub(super) fn read_slot(&self, kv_dim: usize, slot: usize, key: &mut [f32], value: &mut [f32]) {
        self.keys[slot * kv_dim..(slot + 1) * kv_dim].convert_to_f32_slice(key);
        self.values[slot * kv_dim..(slot + 1) * kv_dim].convert_to_f32_slice(value);
    }

    /// [`super::KvCache::attend_batch`]'s causal tiles over `span` of the
    /// keys and values (one KV head's positions from 0, `shape.stride` apart).
    pub(super) fn attend_batch(
        &self,
        kernels: &Kernels,
        shape: &Causal,
        span: Range<usize>,
        queries: &[f32],
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        (kernels.attention_causal_f16)(shape, queries, &self.keys[span.clone()], &self.values[span], scratch, out);
    }
}
