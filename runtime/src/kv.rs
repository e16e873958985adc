//! The KV cache: full precision, or quantized KIVI-style ("KIVI: A
//! Tuning-Free Asymmetric 2bit Quantization for KV Cache", Liu et al. 2024).
//!
//! [`KvMode::F32`] keeps every key and value as f32 (`(layer, context,
//! kv_dim)`), as llama2.c does. [`KvMode::Q8`] and [`KvMode::Q4`] store
//! asymmetric min/max codes (`x ≈ min + scale·code`, scale and minimum in
//! f16):
//!
//! - keys per channel over a group of [`KEY_GROUP`] tokens (keys have
//!   outlier channels; grouping along tokens keeps one channel's range to
//!   itself), values per token over the head's channels;
//! - the most recent tokens stay f32 in a residual window of
//!   [`RESIDUAL_WINDOW`] positions; when a token arrives at a full window its
//!   oldest [`KEY_GROUP`] tokens are quantized together, keys and values, so
//!   a token always sees at least the last `RESIDUAL_WINDOW − KEY_GROUP`
//!   tokens (and itself) in full precision.
//!
//! Attention reads the codes directly ([`crate::kernels::attention`]'s
//! `*_q8`/`*_q4` kernels) and the window through the f32 kernels. Every
//! buffer is allocated in [`KvCache::new`]; appending and attending allocate
//! nothing.
//!
//! Rewinding (writing a position below what was written, as a session does
//! when it reuses a prefix) is allowed: the quantized tokens of the group the
//! position falls in are dequantized back into the window.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::attention::CHANNEL_RUN;
pub use crate::kernels::attention::KEY_GROUP;
use crate::kernels::Kernels;
use half::f16;
use std::fmt;
use std::str::FromStr;

/// Positions the full-precision window of a quantized cache holds.
pub const RESIDUAL_WINDOW: usize = 2 * KEY_GROUP;
const _: () = assert!(RESIDUAL_WINDOW >= KEY_GROUP && RESIDUAL_WINDOW.is_multiple_of(KEY_GROUP));

/// How the KV cache stores keys and values, chosen when the state is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvMode {
    /// f32, every position.
    #[default]
    F32,
    /// 8-bit asymmetric codes, with an f32 window of recent tokens.
    Q8,
    /// 4-bit asymmetric codes, with an f32 window of recent tokens.
    Q4,
}

impl KvMode {
    /// The name on the command line: `f32`, `q8`, `q4`.
    pub fn name(self) -> &'static str {
        match self {
            KvMode::F32 => "f32",
            KvMode::Q8 => "q8",
            KvMode::Q4 => "q4",
        }
    }

    /// Bits of a code (`None` for f32).
    pub fn bits(self) -> Option<u32> {
        match self {
            KvMode::F32 => None,
            KvMode::Q8 => Some(8),
            KvMode::Q4 => Some(4),
        }
    }

    /// An error unless this mode runs a model of this shape (the quantized
    /// kernels take heads of whole runs of 32 channels).
    pub fn check(self, config: &ModelConfig) -> Result<()> {
        let head_dim = config.head_dim as usize;
        if self != KvMode::F32 && (head_dim == 0 || !head_dim.is_multiple_of(CHANNEL_RUN)) {
            return Err(Error::unsupported(format!(
                "--kv {} needs a head_dim that is a multiple of {CHANNEL_RUN}; this model's is {head_dim} (use --kv f32)",
                self.name()
            )));
        }
        Ok(())
    }

    /// Bytes one more position costs in steady state (all layers, keys and
    /// values, codes with their share of scales and minimums; the window
    /// and the attention scratch are fixed costs, see [`KvCache::bytes_for`]).
    pub fn bytes_per_token(self, config: &ModelConfig) -> f64 {
        let (layers, kv_heads, head_dim) = (config.n_layers as f64, config.n_kv_heads as f64, config.head_dim as f64);
        let per_head = match self.bits() {
            None => 2.0 * 4.0 * head_dim,
            Some(bits) => {
                let codes = head_dim * bits as f64 / 8.0;
                // Keys: an f16 scale and minimum per channel per group of tokens.
                let keys = codes + head_dim * 4.0 / KEY_GROUP as f64;
                // Values: an f16 scale and minimum per token per head.
                let values = codes + 4.0;
                keys + values
            }
        };
        layers * kv_heads * per_head
    }

    /// What an f16 cache (llama.cpp's default) costs a position, the yardstick of the ratios reported.
    pub fn f16_bytes_per_token(config: &ModelConfig) -> f64 {
        config.n_layers as f64 * 2.0 * 2.0 * config.kv_dim() as f64
    }
}

impl FromStr for KvMode {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(KvMode::F32),
            "q8" => Ok(KvMode::Q8),
            "q4" => Ok(KvMode::Q4),
            _ => Err(Error::invalid(format!("KV cache mode {text:?} is not one of f32, q8, q4"))),
        }
    }
}

impl fmt::Display for KvMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Keys and values of every layer for `context` positions. Shapes in comments.
pub struct KvCache {
    mode: KvMode,
    context: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Positions of the f32 part: `context` in f32 mode, the window otherwise.
    window: usize,
    keys: Vec<f32>,          // f32 keys (layer, window, kv_dim), position p at slot p − quantized
    values: Vec<f32>,        // f32 values (layer, window, kv_dim)
    key_codes: Vec<u8>,      // (layer, kv_head, group, head_dim, KEY_GROUP·bits/8)
    key_scales: Vec<f16>,    // (layer, kv_head, group, head_dim)
    key_mins: Vec<f16>,      // (layer, kv_head, group, head_dim)
    value_codes: Vec<u8>,    // (layer, kv_head, context, head_dim·bits/8)
    value_scales: Vec<f16>,  // (layer, kv_head, context)
    value_mins: Vec<f16>,    // (layer, kv_head, context)
    quantized: Vec<usize>,   // positions held as codes, a multiple of KEY_GROUP (layer)
    written: Vec<usize>,     // positions written (layer)
    window_scores: Vec<f32>, // the window's scores, then weights (heads_per_kv, window)
    window_out: Vec<f32>,    // the window's share of the output (heads_per_kv, head_dim)
}

/// The sizes of a cache's buffers, in elements, shared by [`KvCache::new`] and [`KvCache::bytes_for`].
struct Sizes {
    window: usize,
    floats: usize,
    key_codes: usize,
    key_scales: usize,
    value_codes: usize,
    value_scales: usize,
    window_scores: usize,
    window_out: usize,
}

impl Sizes {
    fn new(mode: KvMode, config: &ModelConfig, context: usize) -> Self {
        let (layers, kv_heads, head_dim) =
            (config.n_layers as usize, config.n_kv_heads as usize, config.head_dim as usize);
        let kv_dim = kv_heads * head_dim;
        let heads_per_kv = (config.n_heads / config.n_kv_heads.max(1)) as usize;
        match mode.bits() {
            None => Sizes {
                window: context,
                floats: layers * context * kv_dim,
                key_codes: 0,
                key_scales: 0,
                value_codes: 0,
                value_scales: 0,
                window_scores: 0,
                window_out: 0,
            },
            Some(bits) => {
                let window = RESIDUAL_WINDOW.min(context);
                let groups = context.div_ceil(KEY_GROUP);
                let bits = bits as usize;
                Sizes {
                    window,
                    floats: layers * window * kv_dim,
                    key_codes: layers * kv_heads * groups * head_dim * KEY_GROUP * bits / 8,
                    key_scales: layers * kv_heads * groups * head_dim,
                    value_codes: layers * context * kv_dim * bits / 8,
                    value_scales: layers * kv_heads * context,
                    window_scores: heads_per_kv * window,
                    window_out: heads_per_kv * head_dim,
                }
            }
        }
    }

    fn bytes(&self) -> usize {
        4 * (2 * self.floats + self.window_scores + self.window_out)
            + self.key_codes
            + 2 * 2 * self.key_scales
            + self.value_codes
            + 2 * 2 * self.value_scales
    }
}

impl KvCache {
    /// Allocates a cache of `mode` for `context` positions of a model of
    /// this shape (check the shape first with [`KvMode::check`]).
    pub fn new(mode: KvMode, config: &ModelConfig, context: usize) -> Self {
        let sizes = Sizes::new(mode, config, context);
        let layers = config.n_layers as usize;
        Self {
            mode,
            context,
            kv_heads: config.n_kv_heads as usize,
            head_dim: config.head_dim as usize,
            window: sizes.window,
            keys: vec![0.0; sizes.floats],
            values: vec![0.0; sizes.floats],
            key_codes: vec![0; sizes.key_codes],
            key_scales: vec![f16::ZERO; sizes.key_scales],
            key_mins: vec![f16::ZERO; sizes.key_scales],
            value_codes: vec![0; sizes.value_codes],
            value_scales: vec![f16::ZERO; sizes.value_scales],
            value_mins: vec![f16::ZERO; sizes.value_scales],
            quantized: vec![0; layers],
            written: vec![0; layers],
            window_scores: vec![0.0; sizes.window_scores],
            window_out: vec![0.0; sizes.window_out],
        }
    }

    /// Bytes [`KvCache::new`] allocates for these arguments.
    pub fn bytes_for(mode: KvMode, config: &ModelConfig, context: usize) -> usize {
        Sizes::new(mode, config, context).bytes()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.keys.len() + self.values.len() + self.window_scores.len() + self.window_out.len())
            + self.key_codes.len()
            + 2 * (self.key_scales.len() + self.key_mins.len())
            + self.value_codes.len()
            + 2 * (self.value_scales.len() + self.value_mins.len())
    }

    /// The mode.
    pub fn mode(&self) -> KvMode {
        self.mode
    }

    /// Positions of layer `layer` held as codes.
    pub fn quantized_positions(&self, layer: usize) -> usize {
        self.quantized[layer]
    }

    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Bytes of one channel of one key group, or of one token's value head.
    fn code_bytes(&self, count: usize) -> usize {
        count * self.mode.bits().unwrap_or(0) as usize / 8
    }

    /// Stores position `pos`'s key and value (`kv_dim` each, the key after
    /// RoPE) for layer `layer`. Positions are written in order; writing
    /// below the last one rewinds to it.
    pub fn append(&mut self, layer: usize, pos: usize, key: &[f32], value: &[f32]) {
        let kv_dim = self.kv_dim();
        assert!(pos < self.context && key.len() == kv_dim && value.len() == kv_dim, "KV append out of shape");
        if pos < self.quantized[layer] {
            self.rewind(layer, pos);
        }
        // A full window sends its oldest group to the codes.
        while pos - self.quantized[layer] >= self.window {
            self.quantize_oldest_group(layer);
        }
        let slot = (layer * self.window + pos - self.quantized[layer]) * kv_dim;
        self.keys[slot..slot + kv_dim].copy_from_slice(key);
        self.values[slot..slot + kv_dim].copy_from_slice(value);
        self.written[layer] = pos + 1;
    }

    /// Quantizes the window's first [`KEY_GROUP`] positions of `layer` and
    /// moves the rest of the window down.
    fn quantize_oldest_group(&mut self, layer: usize) {
        let (kv_dim, head_dim, window) = (self.kv_dim(), self.head_dim, self.window);
        let levels = ((1u32 << self.mode.bits().expect("the f32 cache never fills")) - 1) as f32;
        let first = self.quantized[layer];
        let group = first / KEY_GROUP;
        let groups = self.context.div_ceil(KEY_GROUP);
        let base = layer * window * kv_dim;
        let (key_bytes, value_bytes) = (self.code_bytes(KEY_GROUP), self.code_bytes(head_dim));
        let mut channel = [0f32; KEY_GROUP];
        for kv in 0..self.kv_heads {
            // Keys: each channel over the group's tokens.
            for c in 0..head_dim {
                for (t, v) in channel.iter_mut().enumerate() {
                    *v = self.keys[base + t * kv_dim + kv * head_dim + c];
                }
                let at = ((layer * self.kv_heads + kv) * groups + group) * head_dim + c;
                let codes = &mut self.key_codes[at * key_bytes..(at + 1) * key_bytes];
                (self.key_scales[at], self.key_mins[at]) = quantize(&channel, levels, codes);
            }
            // Values: each token over the head's channels.
            for t in 0..KEY_GROUP {
                let head = &self.values[base + t * kv_dim + kv * head_dim..][..head_dim];
                let at = (layer * self.kv_heads + kv) * self.context + first + t;
                let codes = &mut self.value_codes[at * value_bytes..(at + 1) * value_bytes];
                (self.value_scales[at], self.value_mins[at]) = quantize(head, levels, codes);
            }
        }
        let layer_window = base..base + window * kv_dim;
        self.keys[layer_window.clone()].copy_within(KEY_GROUP * kv_dim.., 0);
        self.values[layer_window].copy_within(KEY_GROUP * kv_dim.., 0);
        self.quantized[layer] += KEY_GROUP;
    }

    /// Makes `pos` writable again: the quantized tokens of its group before
    /// it go back into the window, dequantized.
    fn rewind(&mut self, layer: usize, pos: usize) {
        let (kv_dim, head_dim) = (self.kv_dim(), self.head_dim);
        let first = pos / KEY_GROUP * KEY_GROUP;
        let group = first / KEY_GROUP;
        let groups = self.context.div_ceil(KEY_GROUP);
        let bits = self.mode.bits().expect("only a quantized cache rewinds into codes");
        let base = layer * self.window * kv_dim;
        let (key_bytes, value_bytes) = (self.code_bytes(KEY_GROUP), self.code_bytes(head_dim));
        for kv in 0..self.kv_heads {
            for c in 0..head_dim {
                let at = ((layer * self.kv_heads + kv) * groups + group) * head_dim + c;
                let codes = &self.key_codes[at * key_bytes..(at + 1) * key_bytes];
                let (scale, min) = (self.key_scales[at].to_f32(), self.key_mins[at].to_f32());
                for t in 0..pos - first {
                    let code = crate::kernels::attention::scalar::code(codes, bits, t);
                    self.keys[base + t * kv_dim + kv * head_dim + c] = min + scale * code;
                }
            }
            for t in 0..pos - first {
                let at = (layer * self.kv_heads + kv) * self.context + first + t;
                let codes = &self.value_codes[at * value_bytes..(at + 1) * value_bytes];
                let (scale, min) = (self.value_scales[at].to_f32(), self.value_mins[at].to_f32());
                for c in 0..head_dim {
                    let code = crate::kernels::attention::scalar::code(codes, bits, c);
                    self.values[base + t * kv_dim + kv * head_dim + c] = min + scale * code;
                }
            }
        }
        self.quantized[layer] = first;
    }

    /// Attention of a group of query heads (`queries`, `heads × head_dim`)
    /// that share KV head `kv_head` over layer `layer`'s positions written
    /// so far: scores, softmax, weighted values into `out` (`heads ×
    /// head_dim`). `scores` is scratch of at least `heads × positions`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &mut self,
        kernels: &Kernels,
        layer: usize,
        kv_head: usize,
        queries: &[f32],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let (kv_dim, head_dim) = (self.kv_dim(), self.head_dim);
        let heads = queries.len() / head_dim;
        let seen = self.written[layer];
        let coded = self.quantized[layer];
        let recent = seen - coded;
        let scores = &mut scores[..heads * seen];
        let window_start = layer * self.window * kv_dim + kv_head * head_dim;
        let window_end = window_start + (recent.max(1) - 1) * kv_dim + head_dim;
        let (keys, values) = (&self.keys[window_start..window_end], &self.values[window_start..window_end]);
        let Some(bits) = self.mode.bits() else {
            // Full precision: the whole cache is the window.
            (kernels.attention_scores)(queries, head_dim, keys, kv_dim, seen, scale, scores);
            for row in scores.chunks_exact_mut(seen) {
                (kernels.softmax)(row);
            }
            (kernels.attention_values)(scores, seen, values, kv_dim, head_dim, out);
            return;
        };
        let (score_codes, value_codes) = match bits {
            8 => (kernels.attention_scores_q8, kernels.attention_values_q8),
            _ => (kernels.attention_scores_q4, kernels.attention_values_q4),
        };
        let head = layer * self.kv_heads + kv_head;
        let groups = self.context.div_ceil(KEY_GROUP);
        let key_at = head * groups * head_dim;
        let key_bytes = self.code_bytes(KEY_GROUP);
        let value_at = head * self.context;
        let value_bytes = self.code_bytes(head_dim);
        let window_scores = &mut self.window_scores[..heads * recent];
        // Scores: the quantized groups straight into each row, the window after them.
        score_codes(
            queries,
            head_dim,
            &self.key_codes[key_at * key_bytes..(key_at + coded / KEY_GROUP * head_dim) * key_bytes],
            &self.key_scales[key_at..],
            &self.key_mins[key_at..],
            coded / KEY_GROUP,
            scale,
            scores,
            seen,
        );
        (kernels.attention_scores)(queries, head_dim, keys, kv_dim, recent, scale, window_scores);
        for (row, window_row) in scores.chunks_exact_mut(seen).zip(window_scores.chunks_exact(recent)) {
            row[coded..].copy_from_slice(window_row);
            (kernels.softmax)(row);
        }
        // Values: the quantized tokens into `out`, the window's share added.
        value_codes(
            scores,
            seen,
            coded,
            &self.value_codes[value_at * value_bytes..(value_at + coded) * value_bytes],
            &self.value_scales[value_at..value_at + coded],
            &self.value_mins[value_at..value_at + coded],
            head_dim,
            out,
        );
        for (row, window_row) in scores.chunks_exact(seen).zip(window_scores.chunks_exact_mut(recent)) {
            window_row.copy_from_slice(&row[coded..]);
        }
        let window_out = &mut self.window_out[..heads * head_dim];
        (kernels.attention_values)(window_scores, recent, values, kv_dim, head_dim, window_out);
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
    use bytemuck::Zeroable;

    /// Deterministic values in [-1, 1].
    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503);
                ((h.wrapping_mul(2_246_822_519) >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn config() -> ModelConfig {
        let mut c = ModelConfig::zeroed();
        (c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.dim) = (2, 4, 2, 32, 128);
        c
    }

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

    #[test]
    fn mode_names_parse_and_bad_ones_are_named() {
        for mode in [KvMode::F32, KvMode::Q8, KvMode::Q4] {
            assert_eq!(mode.name().parse::<KvMode>().unwrap(), mode);
        }
        let error = "f16".parse::<KvMode>().unwrap_err().to_string();
        assert!(error.contains("\"f16\"") && error.contains("f32, q8, q4"), "{error}");
        let mut odd = config();
        odd.head_dim = 48;
        let error = KvMode::Q4.check(&odd).unwrap_err().to_string();
        assert!(error.contains("head_dim") && error.contains("48"), "{error}");
        assert!(KvMode::F32.check(&odd).is_ok());
    }

    #[test]
    fn bytes_match_the_allocation_and_q4_is_under_a_third_of_f16_a_token() {
        let c = config();
        for mode in [KvMode::F32, KvMode::Q8, KvMode::Q4] {
            for context in [1, 31, 64, 100, 256] {
                assert_eq!(KvCache::new(mode, &c, context).bytes(), KvCache::bytes_for(mode, &c, context));
            }
        }
        let f16 = KvMode::f16_bytes_per_token(&c);
        assert_eq!(KvMode::F32.bytes_per_token(&c), 2.0 * f16);
        // q4: 0.5 + 4/32 bytes a key channel, 0.5 + 4/32 a value channel at head_dim 32.
        assert_eq!(KvMode::Q4.bytes_per_token(&c) / f16, (0.625 + 0.625) / 4.0);
        // Long contexts approach the per-token rate (the window is a fixed cost).
        let long = KvCache::bytes_for(KvMode::Q4, &c, 32768) as f64 / (32768.0 * f16);
        assert!((long - KvMode::Q4.bytes_per_token(&c) / f16).abs() < 0.01, "{long}");
    }

    /// Appends `positions` tokens of synthetic keys and values and returns the
    /// attention output of every position's query, all layers.
    fn run(mode: KvMode, positions: usize, rewind_to: Option<usize>) -> (Vec<f32>, KvCache) {
        let c = config();
        let kernels = Kernels::detect();
        let (kv_dim, head_dim, heads_per_kv) = (c.kv_dim(), 32, 2);
        let mut cache = KvCache::new(mode, &c, 128);
        let mut scores = vec![0f32; heads_per_kv * 128];
        let mut outputs = Vec::new();
        let mut order: Vec<usize> = (0..positions).collect();
        if let Some(start) = rewind_to {
            order.extend(start..positions);
        }
        for pos in order {
            for layer in 0..2 {
                let key = data(kv_dim, (pos * 7 + layer) as u32);
                let value = data(kv_dim, (pos * 7 + layer + 3) as u32);
                cache.append(layer, pos, &key, &value);
                for kv in 0..2 {
                    let queries = data(heads_per_kv * head_dim, (pos * 5 + kv) as u32 + 99);
                    let mut out = vec![0f32; heads_per_kv * head_dim];
                    cache.attend(kernels, layer, kv, &queries, 0.5, &mut scores, &mut out);
                    outputs.extend(out);
                }
            }
        }
        (outputs, cache)
    }

    #[test]
    fn quantized_attention_stays_close_to_f32_and_the_window_moves_a_group_at_a_time() {
        let (exact, cache) = run(KvMode::F32, 100, None);
        assert_eq!(cache.quantized_positions(0), 0);
        for (mode, bound) in [(KvMode::Q8, 0.01), (KvMode::Q4, 0.15)] {
            let (got, cache) = run(mode, 100, None);
            // Positions 0..64 fill the window; 64 and 96 each send a group to the codes.
            assert_eq!((cache.quantized_positions(0), cache.quantized_positions(1)), (64, 64));
            let first_difference = got.iter().zip(&exact).position(|(g, e)| g != e);
            // Until the window first fills nothing is quantized: identical outputs.
            assert_eq!(first_difference.map(|i| i / (2 * 2 * 64) >= 64), Some(true), "{mode}");
            let worst = got.iter().zip(&exact).map(|(g, e)| (g - e).abs()).fold(0f32, f32::max);
            assert!(worst <= bound, "{mode}: worst difference {worst} above {bound}");
            assert!(worst > 0.0, "{mode}: quantization changed nothing");
        }
    }

    #[test]
    fn rewinding_into_a_quantized_group_dequantizes_it_back_into_the_window() {
        let (exact, _) = run(KvMode::F32, 100, Some(40));
        let (got, cache) = run(KvMode::Q8, 100, Some(40));
        // Rewound to 40 (group 32..64 dequantized), then 40..100 written again: 64 quantized once more.
        assert_eq!(cache.quantized_positions(0), 64);
        let worst = got.iter().zip(&exact).map(|(g, e)| (g - e).abs()).fold(0f32, f32::max);
        assert!(worst <= 0.01, "worst difference {worst}");
    }
}
