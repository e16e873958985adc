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
//!
//! Key-channel pruning ("ThinK: Thinner Key Cache by Query-Driven Pruning",
//! Xu et al. 2024; f32 cache only, [`KvCache::enable_pruning`]): while the
//! prompt runs, the cache keeps each layer's squared queries of the last
//! [`PRUNE_QUERIES`] positions; [`KvCache::prune`] (called at the first
//! decode step) scores every key channel of every KV head by (mean q_c² over
//! those queries, summed over the heads sharing the KV head) × (mean k_c²
//! over the prompt's keys), keeps the best ⌈(1 − R)·head_dim⌉ and stores the
//! prompt's keys compacted to them, in place. Scores against those keys use
//! the kept channels of the query only; keys written after it keep every
//! channel. Pruning and attending allocate nothing.

use crate::buffers::{filled, filled_product};
use crate::config::ModelConfig;
use crate::error::{Error, ErrorKind, Result};
pub use crate::kernels::attention::KEY_GROUP;
use crate::kernels::attention::{Causal, CHANNEL_RUN};
use crate::kernels::Kernels;
use half::f16;
use std::fmt;
use std::str::FromStr;

/// Positions the full-precision window of a quantized cache holds.
pub const RESIDUAL_WINDOW: usize = 2 * KEY_GROUP;
const _: () = assert!(RESIDUAL_WINDOW >= KEY_GROUP && RESIDUAL_WINDOW.is_multiple_of(KEY_GROUP));

/// Positions whose queries score the key channels when the cache is pruned
/// (the last ones of the prompt: ThinK's observation window).
pub const PRUNE_QUERIES: usize = 32;

/// Key channels a head keeps when a share `ratio` of them is dropped: ⌈(1 − ratio)·head_dim⌉, at least one.
pub fn kept_channels(head_dim: usize, ratio: f32) -> usize {
    let kept = ((1.0 - ratio as f64) * head_dim as f64 - 1e-9).ceil() as usize;
    kept.clamp(1.min(head_dim), head_dim)
}

/// An error unless `ratio` is a share of key channels to drop that runs with `mode`.
pub fn check_prune(ratio: f32, mode: KvMode) -> Result<()> {
    if !(0.0..1.0).contains(&ratio) {
        return Err(Error::invalid(format!(
            "--kv-prune {ratio}: the share of key channels to drop must be at least 0 and below 1"
        )));
    }
    if ratio > 0.0 && mode != KvMode::F32 {
        return Err(Error::unsupported(format!(
            "--kv-prune {ratio} with --kv {}: key-channel pruning runs on the f32 cache only (use --kv f32)",
            mode.name()
        )));
    }
    Ok(())
}

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
    heads_per_kv: usize,
    pruning: Option<Pruning>,
}

/// Key-channel pruning's state and scratch, allocated by [`KvCache::enable_pruning`].
///
/// A pruned layer stores its first `pruned` positions' keys thin and
/// position-major, the rest as before after them: position `t < pruned` at
/// `t·kv_heads·kept + kv_head·kept` (its kept channels, in channel order),
/// position `t ≥ pruned` at `pruned·kv_heads·kept + (t − pruned)·kv_dim`,
/// both from the layer's start.
struct Pruning {
    ratio: f32,
    kept: usize,
    channels: Vec<usize>,     // the kept channels, ascending (layer, kv_head, kept)
    queries: Vec<f32>,        // Σ over a KV head's query heads of q_c², a ring (layer, PRUNE_QUERIES, kv_dim)
    pruned: Vec<usize>,       // positions stored thin (layer); 0: not pruned
    gathered: Vec<f32>,       // a group's queries at the kept channels (heads_per_kv, kept)
    split_scores: Vec<f32>,   // scores of the thin part, then of the full part (heads_per_kv, context)
    channel_scores: Vec<f32>, // one head's channel scores (head_dim)
    order: Vec<usize>,        // channels by score (head_dim)
}

impl Pruning {
    fn bytes(&self) -> usize {
        4 * (self.queries.len() + self.gathered.len() + self.split_scores.len() + self.channel_scores.len())
            + std::mem::size_of::<usize>() * (self.channels.len() + self.pruned.len() + self.order.len())
    }
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
    /// The sizes, with every product checked: an error naming the buffer if one overflows.
    fn new(mode: KvMode, config: &ModelConfig, context: usize) -> Result<Self> {
        let (layers, kv_heads, head_dim) =
            (config.n_layers as usize, config.n_kv_heads as usize, config.head_dim as usize);
        let kv_dim = config.kv_dim();
        let heads_per_kv = (config.n_heads / config.n_kv_heads.max(1)) as usize;
        let size = crate::buffers::checked_size;
        Ok(match mode.bits() {
            None => Sizes {
                window: context,
                floats: size("KV cache (n_layers × context × kv_dim)", &[layers, context, kv_dim])?,
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
                let key_scales = "KV cache key scales (n_layers × n_kv_heads × groups × head_dim)";
                Sizes {
                    window,
                    floats: size("KV cache window (n_layers × window × kv_dim)", &[layers, window, kv_dim])?,
                    key_codes: size(
                        "KV cache key codes (n_layers × n_kv_heads × context × head_dim)",
                        &[layers, kv_heads, groups, head_dim, KEY_GROUP * bits],
                    )? / 8,
                    key_scales: size(key_scales, &[layers, kv_heads, groups, head_dim])?,
                    value_codes: size(
                        "KV cache value codes (n_layers × context × kv_dim)",
                        &[layers, context, kv_dim, bits],
                    )? / 8,
                    value_scales: size(
                        "KV cache value scales (n_layers × n_kv_heads × context)",
                        &[layers, kv_heads, context],
                    )?,
                    window_scores: size("KV cache window scores", &[heads_per_kv, window])?,
                    window_out: size("KV cache window output", &[heads_per_kv, head_dim])?,
                }
            }
        })
    }

    /// Bytes of all the buffers; an error if the sum overflows.
    fn bytes(&self) -> Result<usize> {
        let bytes = 4 * (2 * self.floats as u128 + self.window_scores as u128 + self.window_out as u128)
            + self.key_codes as u128
            + 2 * 2 * self.key_scales as u128
            + self.value_codes as u128
            + 2 * 2 * self.value_scales as u128;
        usize::try_from(bytes)
            .map_err(|_| Error::new(ErrorKind::OutOfMemory, format!("KV cache: {bytes} bytes overflow")))
    }
}

impl KvCache {
    /// Allocates a cache of `mode` for `context` positions of a model of
    /// this shape (check the shape first with [`KvMode::check`]); an
    /// [`ErrorKind::OutOfMemory`] error naming the buffer whose size
    /// overflows or cannot be allocated.
    pub fn new(mode: KvMode, config: &ModelConfig, context: usize) -> Result<Self> {
        let sizes = Sizes::new(mode, config, context)?;
        sizes.bytes()?;
        let layers = config.n_layers as usize;
        Ok(Self {
            mode,
            context,
            kv_heads: config.n_kv_heads as usize,
            head_dim: config.head_dim as usize,
            window: sizes.window,
            keys: filled("KV cache keys", sizes.floats, 0.0)?,
            values: filled("KV cache values", sizes.floats, 0.0)?,
            key_codes: filled("KV cache key codes", sizes.key_codes, 0)?,
            key_scales: filled("KV cache key scales", sizes.key_scales, f16::ZERO)?,
            key_mins: filled("KV cache key minimums", sizes.key_scales, f16::ZERO)?,
            value_codes: filled("KV cache value codes", sizes.value_codes, 0)?,
            value_scales: filled("KV cache value scales", sizes.value_scales, f16::ZERO)?,
            value_mins: filled("KV cache value minimums", sizes.value_scales, f16::ZERO)?,
            quantized: filled("KV cache positions", layers, 0)?,
            written: filled("KV cache positions", layers, 0)?,
            window_scores: filled("KV cache window scores", sizes.window_scores, 0.0)?,
            window_out: filled("KV cache window output", sizes.window_out, 0.0)?,
            heads_per_kv: (config.n_heads / config.n_kv_heads.max(1)) as usize,
            pruning: None,
        })
    }

    /// Turns on key-channel pruning with a share `ratio` of each head's key
    /// channels to drop (checked with [`check_prune`]; 0 turns it off), and
    /// allocates what it needs. Call before the prompt runs: the channel
    /// scores read the queries [`KvCache::observe_queries`] saw.
    pub fn enable_pruning(&mut self, ratio: f32) -> Result<()> {
        check_prune(ratio, self.mode)?;
        if ratio == 0.0 {
            self.pruning = None;
            return Ok(());
        }
        let (layers, kv_dim, head_dim) = (self.written.len(), self.kv_dim(), self.head_dim);
        let kept = kept_channels(head_dim, ratio);
        let mut channels = filled_product("pruned key channels", &[layers, self.kv_heads, kept], 0)?;
        for (i, channel) in channels.iter_mut().enumerate() {
            *channel = i % kept;
        }
        self.pruning = Some(Pruning {
            ratio,
            kept,
            channels,
            queries: filled_product("pruning queries", &[layers, PRUNE_QUERIES, kv_dim], 0.0)?,
            pruned: vec![0; layers],
            gathered: filled_product("pruning query channels", &[self.heads_per_kv, kept], 0.0)?,
            split_scores: filled_product("pruning scores", &[self.heads_per_kv, self.context], 0.0)?,
            channel_scores: vec![0.0; head_dim],
            order: vec![0; head_dim],
        });
        Ok(())
    }

    /// The share of key channels pruning drops (0: off).
    pub fn prune_ratio(&self) -> f32 {
        self.pruning.as_ref().map_or(0.0, |p| p.ratio)
    }

    /// Key channels a head keeps for its pruned positions (`head_dim` without pruning).
    pub fn kept_channels(&self) -> usize {
        self.pruning.as_ref().map_or(self.head_dim, |p| p.kept)
    }

    /// Positions of layer `layer` whose keys are stored pruned.
    pub fn pruned_positions(&self, layer: usize) -> usize {
        self.pruning.as_ref().map_or(0, |p| p.pruned[layer])
    }

    /// The channels KV head `kv_head` of layer `layer` keeps for its pruned positions
    /// (meaningful once [`KvCache::pruned_positions`] is above 0).
    pub fn pruned_channels(&self, layer: usize, kv_head: usize) -> &[usize] {
        match &self.pruning {
            Some(p) => &p.channels[(layer * self.kv_heads + kv_head) * p.kept..][..p.kept],
            None => &[],
        }
    }

    /// Bytes the written keys of the f32 cache take (all layers), and what
    /// they would take with every channel kept (both 0 for a quantized cache).
    pub fn key_bytes_in_use(&self) -> (usize, usize) {
        if self.mode != KvMode::F32 {
            return (0, 0);
        }
        let (kv_dim, thin) = (self.kv_dim(), self.kv_heads * self.kept_channels());
        let mut used = 0;
        for (layer, &written) in self.written.iter().enumerate() {
            let pruned = self.pruned_positions(layer);
            used += 4 * (pruned * thin + (written - pruned) * kv_dim);
        }
        (used, 4 * kv_dim * self.written.iter().sum::<usize>())
    }

    /// Records the queries of position `pos` of layer `layer` (`n_heads ×
    /// head_dim`, after RoPE) for the channel scores, while the layer is not
    /// yet pruned; nothing without pruning.
    pub fn observe_queries(&mut self, layer: usize, pos: usize, queries: &[f32]) {
        let (kv_dim, head_dim, heads_per_kv) = (self.kv_dim(), self.head_dim, self.heads_per_kv);
        let Some(p) = self.pruning.as_mut() else { return };
        if p.pruned[layer] > 0 {
            return;
        }
        let slot = &mut p.queries[(layer * PRUNE_QUERIES + pos % PRUNE_QUERIES) * kv_dim..][..kv_dim];
        for (kv, sums) in slot.chunks_exact_mut(head_dim).enumerate() {
            sums.fill(0.0);
            for query in
                queries[kv * heads_per_kv * head_dim..(kv + 1) * heads_per_kv * head_dim].chunks_exact(head_dim)
            {
                for (sum, q) in sums.iter_mut().zip(query) {
                    *sum += q * q;
                }
            }
        }
    }

    /// Ends the prefill: each layer not pruned yet, with positions written,
    /// has its key channels scored and its written keys stored with the
    /// kept channels only. Once per conversation: a layer is pruned again
    /// only after a rewind to position 0. Allocates nothing; nothing without pruning.
    pub fn prune(&mut self) {
        let (kv_dim, head_dim, kv_heads, context) = (self.kv_dim(), self.head_dim, self.kv_heads, self.context);
        let Some(p) = self.pruning.as_mut() else { return };
        let kept = p.kept;
        for (layer, &written) in self.written.iter().enumerate() {
            if written == 0 || p.pruned[layer] > 0 {
                continue;
            }
            let base = layer * context * kv_dim;
            let observed = written.min(PRUNE_QUERIES);
            for kv in 0..kv_heads {
                // Channel scores: mean q_c² over the observed queries × mean k_c² over the keys.
                for (c, score) in p.channel_scores.iter_mut().enumerate() {
                    let mut queries = 0f64;
                    for t in written - observed..written {
                        queries +=
                            p.queries[(layer * PRUNE_QUERIES + t % PRUNE_QUERIES) * kv_dim + kv * head_dim + c] as f64;
                    }
                    let mut keys = 0f64;
                    for t in 0..written {
                        let k = self.keys[base + t * kv_dim + kv * head_dim + c] as f64;
                        keys += k * k;
                    }
                    *score = (queries / observed as f64 * keys / written as f64) as f32;
                }
                // The best `kept`, ties to the lower channel; then in channel order.
                for (c, o) in p.order.iter_mut().enumerate() {
                    *o = c;
                }
                let scores = &p.channel_scores;
                p.order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                let channels = &mut p.channels[(layer * kv_heads + kv) * kept..][..kept];
                channels.copy_from_slice(&p.order[..kept]);
                channels.sort_unstable();
            }
            // Compact in place, position-major: position t, head kv, kept channel i goes to
            // t·kv_heads·kept + kv·kept + i ≤ t·kv_dim + kv·head_dim + channel, where it was:
            // every write lands at or below its read and above every earlier write.
            for t in 0..written {
                for kv in 0..kv_heads {
                    let channels = &p.channels[(layer * kv_heads + kv) * kept..][..kept];
                    for (i, &c) in channels.iter().enumerate() {
                        self.keys[base + (t * kv_heads + kv) * kept + i] =
                            self.keys[base + t * kv_dim + kv * head_dim + c];
                    }
                }
            }
            p.pruned[layer] = written;
        }
    }

    /// Bytes [`KvCache::new`] allocates for these arguments, computed
    /// without allocating; an error when a size overflows.
    pub fn bytes_for(mode: KvMode, config: &ModelConfig, context: usize) -> Result<usize> {
        Sizes::new(mode, config, context)?.bytes()
    }

    /// Bytes of the per-layer position counters a cache of this model keeps
    /// beside its storage, which [`KvCache::bytes`] and [`KvCache::bytes_for`]
    /// leave out (their figure is the keys and values); the run state counts them.
    pub fn bookkeeping_bytes(config: &ModelConfig) -> usize {
        2 * config.n_layers as usize * std::mem::size_of::<usize>()
    }

    /// Bytes of every buffer the cache holds, counted from the buffers
    /// themselves (the position counters included), to hold the computed
    /// sizes to the allocation.
    #[cfg(test)]
    pub(crate) fn allocated_bytes(&self) -> usize {
        use std::mem::size_of_val;
        let pruning = self.pruning.as_ref().map_or(0, |p| {
            size_of_val(&p.channels[..])
                + size_of_val(&p.queries[..])
                + size_of_val(&p.pruned[..])
                + size_of_val(&p.gathered[..])
                + size_of_val(&p.split_scores[..])
                + size_of_val(&p.channel_scores[..])
                + size_of_val(&p.order[..])
        });
        size_of_val(&self.keys[..])
            + size_of_val(&self.values[..])
            + size_of_val(&self.key_codes[..])
            + size_of_val(&self.key_scales[..])
            + size_of_val(&self.key_mins[..])
            + size_of_val(&self.value_codes[..])
            + size_of_val(&self.value_scales[..])
            + size_of_val(&self.value_mins[..])
            + size_of_val(&self.quantized[..])
            + size_of_val(&self.written[..])
            + size_of_val(&self.window_scores[..])
            + size_of_val(&self.window_out[..])
            + pruning
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.keys.len() + self.values.len() + self.window_scores.len() + self.window_out.len())
            + self.key_codes.len()
            + 2 * (self.key_scales.len() + self.key_mins.len())
            + self.value_codes.len()
            + 2 * (self.value_scales.len() + self.value_mins.len())
            + self.pruning.as_ref().map_or(0, Pruning::bytes)
    }

    /// Writes every page of the cache's buffers, so the memory is the
    /// process's from now on (see [`commit_pages`]).
    pub fn commit_memory(&mut self) {
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
        if let Some(p) = self.pruning.as_mut() {
            commit_pages(&mut p.queries);
            commit_pages(&mut p.channels);
            commit_pages(&mut p.gathered);
            commit_pages(&mut p.split_scores);
        }
    }

    /// Bytes [`KvCache::enable_pruning`] adds for these arguments (0 for a ratio of 0).
    pub fn pruning_bytes_for(config: &ModelConfig, context: usize, ratio: f32) -> usize {
        if ratio == 0.0 {
            return 0;
        }
        let (layers, kv_heads, head_dim) =
            (config.n_layers as usize, config.n_kv_heads as usize, config.head_dim as usize);
        let heads_per_kv = (config.n_heads / config.n_kv_heads.max(1)) as usize;
        let kept = kept_channels(head_dim, ratio);
        4 * (layers * PRUNE_QUERIES * kv_heads * head_dim + heads_per_kv * (kept + context) + head_dim)
            + std::mem::size_of::<usize>() * (layers * kv_heads * kept + layers + head_dim)
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
        let key_slot = self.key_slot(layer, pos);
        self.keys[key_slot..key_slot + kv_dim].copy_from_slice(key);
        self.values[slot..slot + kv_dim].copy_from_slice(value);
        self.written[layer] = pos + 1;
    }

    /// Where position `pos`'s key goes in `keys` (layer `layer`): as its
    /// value, unless the layer is pruned, whose thin keys come first. Writing
    /// below the pruned positions rewinds them to `pos` (the keys before it
    /// stay thin, where they are).
    fn key_slot(&mut self, layer: usize, pos: usize) -> usize {
        let kv_dim = self.kv_dim();
        let thin = self.kv_heads * self.kept_channels();
        let pruned = match self.pruning.as_mut() {
            Some(p) => {
                p.pruned[layer] = p.pruned[layer].min(pos);
                p.pruned[layer]
            }
            None => 0,
        };
        layer * self.window * kv_dim + pruned * thin + (pos - self.quantized[layer] - pruned) * kv_dim
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
        let pruned = self.pruned_positions(layer);
        let Some(bits) = self.mode.bits() else {
            // Full precision: the whole cache is the window.
            if pruned > 0 {
                self.attend_pruned(kernels, layer, kv_head, queries, scale, scores, out);
                return;
            }
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

    /// Whether [`KvCache::attend_batch`] runs layer `layer`: the f32 cache
    /// while the layer is not pruned. A quantized cache moves its
    /// full-precision window as tokens arrive (a token's view of the cache
    /// exists only between its append and the next), and a pruned layer's
    /// keys are split in two with the scores of both joined per query: those
    /// run a token at a time, appending then [`KvCache::attend`].
    pub fn attends_in_batches(&self, layer: usize) -> bool {
        self.mode == KvMode::F32 && self.pruned_positions(layer) == 0
    }

    /// Causal attention of `tokens` consecutive positions from `first`, all
    /// appended already, for the query heads that share KV head `kv_head`
    /// over layer `layer` ([`KvCache::attends_in_batches`] must hold): token
    /// `i`'s heads (`heads_per_kv × head_dim` values at `queries[i·query_stride ..]`)
    /// see positions `0 ..= first + i`; their outputs go to the same places
    /// of `out`. `scratch` holds [`Causal::scratch_len`] values for
    /// `first + tokens` positions. Each cached key and value is read once for
    /// a whole tile of queries ([`crate::kernels::attention`]).
    #[allow(clippy::too_many_arguments)]
    pub fn attend_batch(
        &self,
        kernels: &Kernels,
        layer: usize,
        kv_head: usize,
        first: usize,
        tokens: usize,
        queries: &[f32],
        query_stride: usize,
        scale: f32,
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        assert!(
            self.attends_in_batches(layer) && tokens > 0 && first + tokens <= self.written[layer],
            "batched attention of positions {first}..{} over {} written ones of a {} cache{}",
            first + tokens,
            self.written[layer],
            self.mode,
            if self.pruned_positions(layer) > 0 { ", pruned" } else { "" }
        );
        let (kv_dim, head_dim) = (self.kv_dim(), self.head_dim);
        let shape = Causal { tokens, heads: self.heads_per_kv, head_dim, first, query_stride, stride: kv_dim, scale };
        // The whole cache is the window in f32 mode: position t of this head at t·kv_dim.
        let start = layer * self.window * kv_dim + kv_head * head_dim;
        let end = start + (first + tokens - 1) * kv_dim + head_dim;
        (kernels.attention_causal)(&shape, queries, &self.keys[start..end], &self.values[start..end], scratch, out);
    }

    /// [`KvCache::attend`] over a pruned layer of the f32 cache: the
    /// queries' kept channels against the thin keys, every channel against
    /// the keys after them, one softmax over both, then the values.
    #[allow(clippy::too_many_arguments)]
    fn attend_pruned(
        &mut self,
        kernels: &Kernels,
        layer: usize,
        kv_head: usize,
        queries: &[f32],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let (kv_dim, head_dim, kv_heads) = (self.kv_dim(), self.head_dim, self.kv_heads);
        let p = self.pruning.as_mut().expect("a pruned layer has pruning state");
        let (kept, pruned) = (p.kept, p.pruned[layer]);
        let heads = queries.len() / head_dim;
        let seen = self.written[layer];
        let recent = seen - pruned;
        let scores = &mut scores[..heads * seen];
        let base = layer * self.context * kv_dim;
        // Gather each query's kept channels.
        let channels = &p.channels[(layer * kv_heads + kv_head) * kept..][..kept];
        let gathered = &mut p.gathered[..heads * kept];
        for (query, thin) in queries.chunks_exact(head_dim).zip(gathered.chunks_exact_mut(kept)) {
            for (g, &c) in thin.iter_mut().zip(channels) {
                *g = query[c];
            }
        }
        // Scores of the thin keys (stride kv_heads·kept), then of the full ones after them.
        let thin_stride = kv_heads * kept;
        let thin_start = base + kv_head * kept;
        let thin_keys = &self.keys[thin_start..thin_start + (pruned - 1) * thin_stride + kept];
        let split = &mut p.split_scores[..heads * pruned];
        (kernels.attention_scores)(gathered, kept, thin_keys, thin_stride, pruned, scale, split);
        for (row, part) in scores.chunks_exact_mut(seen).zip(split.chunks_exact(pruned)) {
            row[..pruned].copy_from_slice(part);
        }
        let full_start = base + pruned * thin_stride + kv_head * head_dim;
        let full_keys = &self.keys[full_start..full_start + (recent - 1) * kv_dim + head_dim];
        let split = &mut p.split_scores[..heads * recent];
        (kernels.attention_scores)(queries, head_dim, full_keys, kv_dim, recent, scale, split);
        for (row, part) in scores.chunks_exact_mut(seen).zip(split.chunks_exact(recent)) {
            row[pruned..].copy_from_slice(part);
            (kernels.softmax)(row);
        }
        // Values keep every channel, at their positions.
        let value_start = base + kv_head * head_dim;
        let values = &self.values[value_start..value_start + (seen - 1) * kv_dim + head_dim];
        (kernels.attention_values)(scores, seen, values, kv_dim, head_dim, out);
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

/// Writes one element of every 4 KiB page of `buffer` with its own value.
/// Zeroed allocations are mapped lazily: their pages cost nothing until first
/// written, so a cache allocated for a long context only takes its memory as
/// the conversation grows, and the kernel may refuse it then, mid-reply.
/// Writing each page once at load makes the footprint real at start (and
/// measurable as resident memory). `black_box` keeps the compiler from
/// dropping stores it could prove change nothing.
pub fn commit_pages<T: Copy>(buffer: &mut [T]) {
    let step = (4096 / std::mem::size_of::<T>().max(1)).max(1);
    for i in (0..buffer.len()).step_by(step) {
        buffer[i] = std::hint::black_box(buffer[i]);
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
    fn sizes_that_overflow_or_cannot_be_had_are_errors_naming_the_buffer() {
        // Every field within range, their product not: 2²⁴ layers × 2⁴⁰ positions × 32 values.
        let mut huge = config();
        huge.n_layers = 1 << 24;
        for mode in [KvMode::F32, KvMode::Q8, KvMode::Q4] {
            for error in [
                KvCache::bytes_for(mode, &huge, 1 << 40).unwrap_err(),
                KvCache::new(mode, &huge, 1 << 40).err().unwrap(),
            ] {
                assert_eq!(error.kind(), ErrorKind::OutOfMemory, "{mode}: {error}");
                assert!(error.message().contains("KV cache") && error.message().contains("overflow"), "{error}");
            }
        }
        // A size that fits in 64 bits but no allocator can provide (2⁶⁰ bytes).
        let error = KvCache::new(KvMode::F32, &config(), 1 << 52).err().unwrap();
        assert_eq!(error.kind(), ErrorKind::OutOfMemory);
        assert!(
            error.message().contains("KV cache keys") && error.message().contains("cannot be allocated"),
            "{error}"
        );
        // The run state reports it rather than aborting.
        let error = crate::model::RunState::try_with_kv(&config(), 1 << 52, 1, KvMode::F32).err().unwrap();
        assert_eq!(error.kind(), ErrorKind::OutOfMemory, "{error}");
    }

    #[test]
    fn bytes_match_the_allocation_and_q4_is_under_a_third_of_f16_a_token() {
        let c = config();
        for mode in [KvMode::F32, KvMode::Q8, KvMode::Q4] {
            for context in [1, 31, 64, 100, 256] {
                assert_eq!(
                    KvCache::new(mode, &c, context).unwrap().bytes(),
                    KvCache::bytes_for(mode, &c, context).unwrap()
                );
            }
        }
        let f16 = KvMode::f16_bytes_per_token(&c);
        assert_eq!(KvMode::F32.bytes_per_token(&c), 2.0 * f16);
        // q4: 0.5 + 4/32 bytes a key channel, 0.5 + 4/32 a value channel at head_dim 32.
        assert_eq!(KvMode::Q4.bytes_per_token(&c) / f16, (0.625 + 0.625) / 4.0);
        // Long contexts approach the per-token rate (the window is a fixed cost).
        let long = KvCache::bytes_for(KvMode::Q4, &c, 32768).unwrap() as f64 / (32768.0 * f16);
        assert!((long - KvMode::Q4.bytes_per_token(&c) / f16).abs() < 0.01, "{long}");
    }

    /// Appends `positions` tokens of synthetic keys and values and returns the
    /// attention output of every position's query, all layers.
    fn run(mode: KvMode, positions: usize, rewind_to: Option<usize>) -> (Vec<f32>, KvCache) {
        let c = config();
        let kernels = Kernels::detect();
        let (kv_dim, head_dim, heads_per_kv) = (c.kv_dim(), 32, 2);
        let mut cache = KvCache::new(mode, &c, 128).unwrap();
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

    /// A pruned run of the cache: `positions` tokens of synthetic keys,
    /// values and queries (`zero` channels of every key below `prompt` set
    /// to 0), pruned after `prompt`; with `rewind_to`, positions from there
    /// to the end written again. Returns every output (position, layer,
    /// kv head), the cache, and the data: keys and queries (position, layer).
    #[allow(clippy::type_complexity)]
    fn run_pruned(
        kernels: &Kernels,
        ratio: f32,
        prompt: usize,
        positions: usize,
        zero: &dyn Fn(usize) -> bool,
        rewind_to: Option<usize>,
    ) -> (Vec<f32>, KvCache, Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let c = config();
        let (kv_dim, head_dim, q_dim) = (c.kv_dim(), 32, 4 * 32);
        let mut cache = KvCache::new(KvMode::F32, &c, 128).unwrap();
        cache.enable_pruning(ratio).unwrap();
        let mut scores = vec![0f32; 2 * 128];
        let (mut outputs, mut keys, mut queries) = (Vec::new(), Vec::new(), Vec::new());
        let mut order: Vec<usize> = (0..positions).collect();
        if let Some(start) = rewind_to {
            order.extend(start..positions);
        }
        for (step, pos) in order.into_iter().enumerate() {
            if step == prompt {
                cache.prune();
            }
            for layer in 0..2 {
                let mut key = data(kv_dim, (pos * 7 + layer) as u32);
                if pos < prompt {
                    for (i, k) in key.iter_mut().enumerate() {
                        if zero(i % head_dim) {
                            *k = 0.0;
                        }
                    }
                }
                let value = data(kv_dim, (pos * 7 + layer + 3) as u32);
                let query = data(q_dim, (pos * 5 + layer) as u32 + 99);
                cache.observe_queries(layer, pos, &query);
                cache.append(layer, pos, &key, &value);
                for kv in 0..2 {
                    let mut out = vec![0f32; 2 * head_dim];
                    let group = &query[kv * 2 * head_dim..(kv + 1) * 2 * head_dim];
                    cache.attend(kernels, layer, kv, group, 0.5, &mut scores, &mut out);
                    outputs.extend(out);
                }
                keys.push(key);
                queries.push(query);
            }
        }
        (outputs, cache, keys, queries)
    }

    /// Channels where every prompt key of a planted run is zero: the odd ones.
    fn odd(c: usize) -> bool {
        c % 2 == 1
    }

    #[test]
    fn pruning_drops_planted_zero_channels_and_changes_nothing_else() {
        let never = |_: usize| false;
        for kernels in Kernels::all_available() {
            let (exact, ..) = run_pruned(kernels, 0.0, 40, 90, &odd, None);
            let (got, cache, ..) = run_pruned(kernels, 0.5, 40, 90, &odd, None);
            assert_eq!((cache.pruned_positions(0), cache.pruned_positions(1), cache.kept_channels()), (40, 40, 16));
            for (layer, kv) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let even: Vec<usize> = (0..32).step_by(2).collect();
                assert_eq!(cache.pruned_channels(layer, kv), &even[..], "{}: layer {layer} head {kv}", kernels.name);
            }
            // Before pruning: bit-identical. After: the dropped channels held zeros only.
            let before = 40 * 2 * 2 * 64;
            assert_eq!(got[..before], exact[..before], "{}", kernels.name);
            let worst = got.iter().zip(&exact).map(|(g, e)| (g - e).abs()).fold(0f32, f32::max);
            assert!(worst <= PLANTED_TOLERANCE, "{}: worst difference {worst}", kernels.name);
            // Keys without zero channels: pruning changes the outputs after the prompt, not before.
            let (exact, ..) = run_pruned(kernels, 0.0, 40, 90, &never, None);
            let (got, ..) = run_pruned(kernels, 0.5, 40, 90, &never, None);
            assert_eq!(got[..before], exact[..before], "{}", kernels.name);
            assert!(got[before..] != exact[before..], "{}: pruning changed nothing", kernels.name);
        }
    }

    /// Planted zero channels dropped: only the order of the sums differs.
    const PLANTED_TOLERANCE: f32 = 1e-5;
    /// Pruned attention against an f64 reference of the same rule.
    const PRUNED_REFERENCE_TOLERANCE: f32 = 1e-5;
    /// Pruned attention of the NEON tables against the scalar one on the same data.
    const PRUNED_PARITY_TOLERANCE: f32 = 1e-5;

    /// What a pruned cache must give: the thin positions' scores over the
    /// kept channels, every other one over all, in f64.
    fn reference_output(
        cache: &KvCache,
        keys: &[Vec<f32>],
        queries: &[Vec<f32>],
        order: &[usize],
        step: usize,
        pruned_before: usize,
    ) -> Vec<f32> {
        let (head_dim, kv_dim) = (32, 64);
        let pos = order[step];
        let mut out = Vec::new();
        for layer in 0..2 {
            // The latest write of each position up to `step`.
            let key_of = |t: usize| {
                let last = (0..=step).rev().find(|&s| order[s] == t).unwrap();
                &keys[last * 2 + layer]
            };
            let query = &queries[step * 2 + layer];
            for kv in 0..2 {
                let kept = cache.pruned_channels(layer, kv);
                for h in 0..2 {
                    let q = &query[(kv * 2 + h) * head_dim..][..head_dim];
                    let scores: Vec<f64> = (0..=pos)
                        .map(|t| {
                            let k = &key_of(t)[kv * head_dim..][..head_dim];
                            let channels: Vec<usize> =
                                if t < pruned_before { kept.to_vec() } else { (0..head_dim).collect() };
                            0.5 * channels.iter().map(|&c| q[c] as f64 * k[c] as f64).sum::<f64>()
                        })
                        .collect();
                    let max = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for c in 0..head_dim {
                        let sum: f64 = (0..=pos)
                            .map(|t| {
                                let last = (0..=step).rev().find(|&s| order[s] == t).unwrap();
                                let value = data(kv_dim, (order[last] * 7 + layer + 3) as u32);
                                weights[t] / total * value[kv * head_dim + c] as f64
                            })
                            .sum();
                        out.push(sum as f32);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn pruned_attention_matches_a_reference_on_every_table_and_after_a_rewind() {
        let never = |_: usize| false;
        let scalar = run_pruned(&Kernels::SCALAR, 0.3, 40, 90, &never, Some(20));
        let cache = &scalar.1;
        assert_eq!(cache.kept_channels(), 23, "⌈0.7 · 32⌉");
        // Rewound to 20 inside the pruned 40: 0..20 stay thin, 20.. are written again in full.
        assert_eq!(cache.pruned_positions(0), 20);
        let mut order: Vec<usize> = (0..90).collect();
        order.extend(20..90);
        for step in (0..order.len()).step_by(7) {
            let pruned_before = match step {
                s if s < 40 => 0,
                s if s < 90 => 40,
                _ => 20,
            };
            let expected = reference_output(cache, &scalar.2, &scalar.3, &order, step, pruned_before);
            let got = &scalar.0[step * 2 * 2 * 64..(step + 1) * 2 * 2 * 64];
            let worst = got.iter().zip(&expected).map(|(g, e)| (g - e).abs()).fold(0f32, f32::max);
            assert!(worst <= PRUNED_REFERENCE_TOLERANCE, "step {step}: worst difference {worst}");
        }
        for kernels in Kernels::all_available() {
            let (got, cache, ..) = run_pruned(kernels, 0.3, 40, 90, &never, Some(20));
            assert_eq!(cache.pruned_channels(1, 1), scalar.1.pruned_channels(1, 1), "{}", kernels.name);
            let worst = got.iter().zip(&scalar.0).map(|(g, e)| (g - e).abs()).fold(0f32, f32::max);
            assert!(worst <= PRUNED_PARITY_TOLERANCE, "{}: worst difference {worst} from scalar", kernels.name);
        }
    }

    #[test]
    fn a_rewind_to_the_start_unprunes_and_the_next_prompt_prunes_again() {
        let c = config();
        let mut cache = KvCache::new(KvMode::F32, &c, 64).unwrap();
        cache.enable_pruning(0.5).unwrap();
        let (key, query) = (data(64, 1), data(128, 2));
        for pos in 0..10 {
            for layer in 0..2 {
                cache.observe_queries(layer, pos, &query);
                cache.append(layer, pos, &key, &key);
            }
        }
        cache.prune();
        assert_eq!(cache.pruned_positions(1), 10);
        let (used, full) = cache.key_bytes_in_use();
        assert_eq!((used, full), (2 * 10 * 2 * 16 * 4, 2 * 10 * 64 * 4));
        cache.prune();
        assert_eq!(cache.pruned_positions(1), 10, "pruned once");
        for layer in 0..2 {
            cache.append(layer, 0, &key, &key);
        }
        assert_eq!(cache.pruned_positions(1), 0);
        for pos in 1..5 {
            for layer in 0..2 {
                cache.append(layer, pos, &key, &key);
            }
        }
        cache.prune();
        assert_eq!(cache.pruned_positions(0), 5);
    }

    #[test]
    fn prune_ratios_outside_zero_to_one_and_quantized_caches_are_refused() {
        for bad in [-0.1, 1.0, 1.5, f32::NAN] {
            let error = check_prune(bad, KvMode::F32).unwrap_err().to_string();
            assert!(error.contains("--kv-prune") && error.contains("below 1"), "{error}");
        }
        let error = check_prune(0.5, KvMode::Q4).unwrap_err().to_string();
        assert!(error.contains("--kv q4") && error.contains("f32"), "{error}");
        assert!(check_prune(0.0, KvMode::Q8).is_ok());
        assert_eq!((kept_channels(64, 0.5), kept_channels(64, 0.3), kept_channels(64, 0.0)), (32, 45, 64));
        assert_eq!(kept_channels(64, 0.999), 1);
        let c = config();
        let mut cache = KvCache::new(KvMode::F32, &c, 100).unwrap();
        let before = cache.bytes();
        cache.enable_pruning(0.25).unwrap();
        assert_eq!(cache.bytes() - before, KvCache::pruning_bytes_for(&c, 100, 0.25));
    }
}
