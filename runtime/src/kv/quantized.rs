//! The quantized storage of the KV cache ([`KvMode::Q8`](super::KvMode::Q8),
//! [`KvMode::Q4`](super::KvMode::Q4)), KIVI-style: asymmetric min/max codes
//! (`x ≈ min + scale·code`, scale and minimum in f16), keys per channel over
//! a group of [`KEY_GROUP`] tokens, values per token over the head's
//! channels, and the most recent tokens in an f32 window of
//! [`RESIDUAL_WINDOW`] positions (see the [`super`] module for why).
//!
//! A sliding-window layer shorter than the context keeps its key groups in a
//! ring of groups (group `g` in slot `g % groups`, its tokens' value codes
//! beside it in the same order) just long enough for what its window sees
//! beside the f32 window ([`super::ring_groups`]). Codes are grouped
//! whatever the window, so a token's view starts inside a group: attention
//! reads the ring's groups and gives the positions before the window a score
//! of −∞ (a weight of exactly 0), and reads the f32 window from the window's
//! first position.

#[cfg(doc)]
use super::RESIDUAL_WINDOW;
use super::{Attention, LayerSlots, Shape, Sizes, KEY_GROUP};
use crate::buffers::filled;
use crate::error::Result;
use crate::kernels::attention::{CachedVectors, QuantizedKeys, QuantizedValues};
use half::f16;

/// Codes of every position below the window, and the window in f32. Shapes in comments.
pub(super) struct Quantized {
    /// Bits of a code: 8 or 4.
    bits: u32,
    /// Positions of the f32 window.
    window: usize,
    keys: Vec<f32>,         // the window's keys (layer, window, kv_dim), position p at slot p − quantized
    values: Vec<f32>,       // the window's values (layer, window, kv_dim)
    key_codes: Vec<u8>,     // (layer, kv_head, groups, head_dim, KEY_GROUP·bits/8); a layer's groups in LayerSlots
    key_scales: Vec<f16>,   // (layer, kv_head, groups, head_dim)
    key_mins: Vec<f16>,     // (layer, kv_head, groups, head_dim)
    value_codes: Vec<u8>,   // (layer, kv_head, coded_slots, head_dim·bits/8)
    value_scales: Vec<f16>, // (layer, kv_head, coded_slots)
    value_mins: Vec<f16>,   // (layer, kv_head, coded_slots)
    /// Positions held as codes, a multiple of KEY_GROUP (layer).
    pub(super) quantized: Vec<usize>,
    window_scores: Vec<f32>, // the window's scores, then weights (heads_per_kv, window)
    window_out: Vec<f32>,    // the window's share of the output (heads_per_kv, head_dim)
}

impl Quantized {
    /// Allocates storage of `bits`-bit codes with the buffers of `sizes`.
    pub(super) fn new(bits: u32, shape: &Shape, sizes: &Sizes) -> Result<Self> {
        Ok(Self {
            bits,
            window: sizes.window,
            keys: filled("KV cache keys", sizes.floats, 0.0)?,
            values: filled("KV cache values", sizes.floats, 0.0)?,
            key_codes: filled("KV cache key codes", sizes.key_codes, 0)?,
            key_scales: filled("KV cache key scales", sizes.key_scales, f16::ZERO)?,
            key_mins: filled("KV cache key minimums", sizes.key_scales, f16::ZERO)?,
            value_codes: filled("KV cache value codes", sizes.value_codes, 0)?,
            value_scales: filled("KV cache value scales", sizes.value_scales, f16::ZERO)?,
            value_mins: filled("KV cache value minimums", sizes.value_scales, f16::ZERO)?,
            quantized: filled("KV cache positions", shape.layers, 0)?,
            window_scores: filled("KV cache window scores", sizes.window_scores, 0.0)?,
            window_out: filled("KV cache window output", sizes.window_out, 0.0)?,
        })
    }

    /// Bytes held (the position counters left out, as in [`super::KvCache::bytes`]).
    pub(super) fn bytes(&self) -> usize {
        4 * (self.keys.len() + self.values.len() + self.window_scores.len() + self.window_out.len())
            + self.key_codes.len()
            + 2 * (self.key_scales.len() + self.key_mins.len())
            + self.value_codes.len()
            + 2 * (self.value_scales.len() + self.value_mins.len())
    }

    /// Bytes of every buffer, counted from the buffers themselves.
    #[cfg(test)]
    pub(super) fn allocated_bytes(&self) -> usize {
        use std::mem::size_of_val;
        size_of_val(&self.keys[..])
            + size_of_val(&self.values[..])
            + size_of_val(&self.key_codes[..])
            + size_of_val(&self.key_scales[..])
            + size_of_val(&self.key_mins[..])
            + size_of_val(&self.value_codes[..])
            + size_of_val(&self.value_scales[..])
            + size_of_val(&self.value_mins[..])
            + size_of_val(&self.quantized[..])
            + size_of_val(&self.window_scores[..])
            + size_of_val(&self.window_out[..])
    }

    /// Writes every page of every buffer ([`super::commit_pages`]).
    pub(super) fn commit_memory(&mut self) {
        use super::commit_pages;
        commit_pages(&mut self.keys);
        commit_pages(&mut self.values);
        commit_pages(&mut self.key_codes);
        commit_pages(&mut self.key_scales);
        commit_pages(&mut self.key_mins);
        commit_pages(&mut self.value_codes);
        commit_pages(&mut self.value_scales);
        commit_pages(&mut self.value_mins);
        commit_pages(&mut self.window_scores);
        commit_pages(&mut self.window_out);
    }

    /// Bytes of one channel of one key group, or of one token's value head.
    fn code_bytes(&self, count: usize) -> usize {
        count * self.bits as usize / 8
    }

    /// Where KV head `kv_head`'s channel `c` of key group `group` of a layer
    /// kept as `at` says is, counted in channels of a group (its scale's
    /// index; its codes start `code_bytes(KEY_GROUP)` times further).
    fn key_at(shape: &Shape, at: LayerSlots, kv_head: usize, group: usize, c: usize) -> usize {
        ((at.first_group * shape.kv_heads + kv_head * at.groups + group % at.groups) * shape.head_dim) + c
    }

    /// Where KV head `kv_head`'s value of position `pos` of a layer kept as
    /// `at` says is, counted in tokens' heads (its scale's index).
    fn value_at(shape: &Shape, at: LayerSlots, kv_head: usize, pos: usize) -> usize {
        at.first_coded_slot * shape.kv_heads + kv_head * at.coded_slots + pos % at.coded_slots
    }

    /// Stores position `pos`'s key and value in the window of layer `layer`
    /// (kept as `at` says); below the codes, rewinds first, and at a full
    /// window sends its oldest group to the codes.
    pub(super) fn append(
        &mut self,
        shape: &Shape,
        layer: usize,
        at: LayerSlots,
        pos: usize,
        key: &[f32],
        value: &[f32],
    ) {
        let kv_dim = shape.kv_dim();
        if pos < self.quantized[layer] {
            self.rewind(shape, layer, at, pos);
        }
        // A full window sends its oldest group to the codes.
        while pos - self.quantized[layer] >= self.window {
            self.quantize_oldest_group(shape, layer, at);
        }
        let slot = (layer * self.window + pos - self.quantized[layer]) * kv_dim;
        self.keys[slot..slot + kv_dim].copy_from_slice(key);
        self.values[slot..slot + kv_dim].copy_from_slice(value);
    }

    /// Quantizes the window's first [`KEY_GROUP`] positions of `layer` into
    /// their group's slot (a ring with no groups keeps none: its window
    /// sees only the f32 window) and moves the rest of the window down.
    fn quantize_oldest_group(&mut self, shape: &Shape, layer: usize, at: LayerSlots) {
        let (kv_dim, head_dim, kv_heads, window) = (shape.kv_dim(), shape.head_dim, shape.kv_heads, self.window);
        let levels = ((1u32 << self.bits) - 1) as f32;
        let first = self.quantized[layer];
        let group = first / KEY_GROUP;
        let base = layer * window * kv_dim;
        let (key_bytes, value_bytes) = (self.code_bytes(KEY_GROUP), self.code_bytes(head_dim));
        let mut channel = [0f32; KEY_GROUP];
        for kv in (0..kv_heads).filter(|_| at.groups > 0) {
            // Keys: each channel over the group's tokens.
            for c in 0..head_dim {
                for (t, v) in channel.iter_mut().enumerate() {
                    *v = self.keys[base + t * kv_dim + kv * head_dim + c];
                }
                let key_at = Self::key_at(shape, at, kv, group, c);
                let codes = &mut self.key_codes[key_at * key_bytes..(key_at + 1) * key_bytes];
                (self.key_scales[key_at], self.key_mins[key_at]) = quantize(&channel, levels, codes);
            }
            // Values: each token over the head's channels.
            for t in 0..KEY_GROUP {
                let head = &self.values[base + t * kv_dim + kv * head_dim..][..head_dim];
                let value_at = Self::value_at(shape, at, kv, first + t);
                let codes = &mut self.value_codes[value_at * value_bytes..(value_at + 1) * value_bytes];
                (self.value_scales[value_at], self.value_mins[value_at]) = quantize(head, levels, codes);
            }
        }
        let layer_window = base..base + window * kv_dim;
        self.keys[layer_window.clone()].copy_within(KEY_GROUP * kv_dim.., 0);
        self.values[layer_window].copy_within(KEY_GROUP * kv_dim.., 0);
        self.quantized[layer] += KEY_GROUP;
    }

    /// Makes `pos` writable again: the quantized tokens of its group before
    /// it go back into the window, dequantized (from the ring, which
    /// [`super::KvCache::can_rewind_to`] says still holds the group when the
    /// token at `pos` sees them).
    fn rewind(&mut self, shape: &Shape, layer: usize, at: LayerSlots, pos: usize) {
        let (kv_dim, head_dim, kv_heads) = (shape.kv_dim(), shape.head_dim, shape.kv_heads);
        let first = pos / KEY_GROUP * KEY_GROUP;
        let group = first / KEY_GROUP;
        let bits = self.bits;
        let base = layer * self.window * kv_dim;
        let (key_bytes, value_bytes) = (self.code_bytes(KEY_GROUP), self.code_bytes(head_dim));
        for kv in (0..kv_heads).filter(|_| at.groups > 0) {
            for c in 0..head_dim {
                let key_at = Self::key_at(shape, at, kv, group, c);
                let codes = &self.key_codes[key_at * key_bytes..(key_at + 1) * key_bytes];
                let (scale, min) = (self.key_scales[key_at].to_f32(), self.key_mins[key_at].to_f32());
                for t in 0..pos - first {
                    let code = crate::kernels::attention::scalar::code(codes, bits, t);
                    self.keys[base + t * kv_dim + kv * head_dim + c] = min + scale * code;
                }
            }
            for t in 0..pos - first {
                let value_at = Self::value_at(shape, at, kv, first + t);
                let codes = &self.value_codes[value_at * value_bytes..(value_at + 1) * value_bytes];
                let (scale, min) = (self.value_scales[value_at].to_f32(), self.value_mins[value_at].to_f32());
                for c in 0..head_dim {
                    let code = crate::kernels::attention::scalar::code(codes, bits, c);
                    self.values[base + t * kv_dim + kv * head_dim + c] = min + scale * code;
                }
            }
        }
        self.quantized[layer] = first;
    }

    /// [`super::KvCache::attend`] over the codes and the window: scores of
    /// the quantized groups straight into each row (−∞ for the positions
    /// before a sliding window) and of the window's seen positions after
    /// them, one softmax, then the quantized tokens' values into `out` with
    /// the window's share added.
    pub(super) fn attend(&mut self, shape: &Shape, call: &Attention, scores: &mut [f32], out: &mut [f32]) {
        let (kv_dim, head_dim) = (shape.kv_dim(), shape.head_dim);
        let Attention { kernels, layer, at, kv_head, queries, scale, seen: written } = *call;
        let heads = queries.len() / head_dim;
        let coded = self.quantized[layer];
        let first_seen = at.first_seen(written);
        // The f32 window from the first position seen; the codes' groups unless the view starts above them.
        let window_from = coded.max(first_seen);
        let recent = written - window_from;
        let groups = if first_seen < coded { (coded / KEY_GROUP).min(at.groups) } else { 0 };
        let coded_seen = groups * KEY_GROUP;
        let seen = coded_seen + recent;
        let scores = &mut scores[..heads * seen];
        let window_start = (layer * self.window + window_from - coded) * kv_dim + kv_head * head_dim;
        let window_end = window_start + (recent.max(1) - 1) * kv_dim + head_dim;
        let (keys, values) = (&self.keys[window_start..window_end], &self.values[window_start..window_end]);
        let (score_codes, value_codes) = match self.bits {
            8 => (kernels.attention_scores_q8, kernels.attention_values_q8),
            _ => (kernels.attention_scores_q4, kernels.attention_values_q4),
        };
        // The head's groups and value codes from its first slot on (a layer without groups reads none).
        let (key_at, value_at) = match at.groups {
            0 => (0, 0),
            _ => (Self::key_at(shape, at, kv_head, 0, 0), Self::value_at(shape, at, kv_head, 0)),
        };
        let key_bytes = self.code_bytes(KEY_GROUP);
        let value_bytes = self.code_bytes(head_dim);
        let window_scores = &mut self.window_scores[..heads * recent];
        // Scores: the quantized groups straight into each row, the window after them.
        let coded_keys = QuantizedKeys {
            codes: &self.key_codes[key_at * key_bytes..(key_at + groups * head_dim) * key_bytes],
            scales: &self.key_scales[key_at..],
            mins: &self.key_mins[key_at..],
            groups,
        };
        score_codes(queries, head_dim, &coded_keys, scale, scores, seen);
        let window_keys = CachedVectors { data: keys, stride: kv_dim, positions: recent };
        (kernels.attention_scores)(queries, head_dim, &window_keys, scale, window_scores);
        // Slot j of the codes holds position 32·g + j % 32 of the newest group g below the codes' end
        // with g ≡ j / 32 (mod groups): the older groups of a ring, before the window, are masked.
        let newest_group = coded / KEY_GROUP;
        for (row, window_row) in scores.chunks_exact_mut(seen).zip(window_scores.chunks_exact(recent)) {
            row[coded_seen..].copy_from_slice(window_row);
            if first_seen > 0 {
                for (slot, group_scores) in row[..coded_seen].chunks_exact_mut(KEY_GROUP).enumerate() {
                    let group = newest_group - 1 - (newest_group - 1 - slot) % at.groups;
                    for (i, score) in group_scores.iter_mut().enumerate() {
                        if group * KEY_GROUP + i < first_seen {
                            *score = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            (kernels.softmax)(row);
        }
        // Values: the quantized tokens into `out`, the window's share added.
        let coded_values = QuantizedValues {
            codes: &self.value_codes[value_at * value_bytes..(value_at + coded_seen) * value_bytes],
            scales: &self.value_scales[value_at..value_at + coded_seen],
            mins: &self.value_mins[value_at..value_at + coded_seen],
            positions: coded_seen,
        };
        value_codes(scores, seen, &coded_values, head_dim, out);
        for (row, window_row) in scores.chunks_exact(seen).zip(window_scores.chunks_exact_mut(recent)) {
            window_row.copy_from_slice(&row[coded_seen..]);
        }
        let window_out = &mut self.window_out[..heads * head_dim];
        let window_values = CachedVectors { data: values, stride: kv_dim, positions: recent };
        (kernels.attention_values)(window_scores, &window_values, head_dim, window_out);
        for (o, w) in out.iter_mut().zip(window_out.iter()) {
            *o += w;
        }
    }
}

/// Asymmetric min/max quantization of `values` to codes `0..=levels`
/// (`codes` in the kernels' layout: bytes at 8 bits; at 4 bits, in each
/// run of 32, byte `j` holds code `j` low and `j + 16` high). Returns the
/// f16 scale and minimum: the minimum rounded down and the scale up, so
/// that every value lies inside `min + scale·[0, levels]` and no code is
/// clipped; the codes are rounded against the stored pair.
pub fn quantize(values: &[f32], levels: f32, codes: &mut [u8]) -> (f16, f16) {
    let (low, high) = values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let mut min = f16::from_f32(low);
    if min.to_f32() > low {
        min = next_toward_negative_infinity(min);
    }
    let step = (high - min.to_f32()) / levels;
    let mut scale = f16::from_f32(step);
    if scale.to_f32() < step {
        scale = f16::from_bits(scale.to_bits() + 1);
    }
    let (min_f, scale_f) = (min.to_f32(), scale.to_f32());
    let inverse = if scale_f > 0.0 && scale_f.is_finite() { 1.0 / scale_f } else { 0.0 };
    let code = |v: f32| ((v - min_f) * inverse).round().clamp(0.0, levels) as u8;
    if levels > 15.0 {
        for (c, &v) in codes.iter_mut().zip(values) {
            *c = code(v);
        }
    } else {
        for (run, bytes) in values.chunks(32).zip(codes.chunks_mut(16)) {
            for (j, byte) in bytes.iter_mut().enumerate() {
                let high = run.get(j + 16).map_or(0, |&v| code(v));
                *byte = code(run[j]) | (high << 4);
            }
        }
    }
    (scale, min)
}

/// The f16 just below `value` (a finite one).
fn next_toward_negative_infinity(value: f16) -> f16 {
    let bits = value.to_bits();
    match bits {
        0x0000 => f16::from_bits(0x8001),
        _ if bits & 0x8000 != 0 => f16::from_bits(bits + 1),
        _ => f16::from_bits(bits - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::tests::data;

    #[test]
    fn quantize_reconstructs_within_half_a_step() {
        for (levels, bits) in [(255.0, 8), (15.0, 4)] {
            let values: Vec<f32> = data(64, 3).iter().map(|v| 3.0 * v + 0.5).collect();
            let mut codes = vec![0u8; 64 * bits / 8];
            let (scale, min) = quantize(&values, levels, &mut codes);
            let step = scale.to_f32();
            for (i, v) in values.iter().enumerate() {
                let back = min.to_f32() + step * crate::kernels::attention::scalar::code(&codes, bits as u32, i);
                // Half a step, plus the f16 rounding of the minimum and of the scale over `levels` steps.
                let bound = 0.5 * step + (min.to_f32().abs() + levels * step) * 1e-3;
                assert!((back - v).abs() <= bound, "q{bits} value {i}: {v} came back as {back}");
            }
        }
        // A constant run: scale zero, every value exact.
        let mut codes = [0u8; 16];
        let (scale, min) = quantize(&[0.25; 32], 15.0, &mut codes);
        assert_eq!((scale.to_f32(), min.to_f32()), (0.0, 0.25));
    }
}
