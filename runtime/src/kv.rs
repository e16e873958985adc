//! The KV cache: full precision, half precision, or quantized KIVI-style
//! ("KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", Liu et
//! al. 2024).
//!
//! [`KvMode::F32`] keeps every key and value as f32 (`(layer, context,
//! kv_dim)`), as llama2.c does; [`KvMode::F16`] the same as IEEE half, as
//! llama.cpp does by default, at half the bytes (module `f16`, which says
//! why it needs no full-precision window). [`KvMode::Q8`] and [`KvMode::Q4`] store
//! asymmetric min/max codes (`x ≈ min + scale·code`, scale and minimum in
//! f16; module `quantized`):
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
//! `*_q8`/`*_q4` kernels) and the window through the f32 kernels, the f16
//! cache through the `*_f16` kernels. Every
//! buffer is allocated in [`KvCache::new`]; appending and attending allocate
//! nothing.
//!
//! Rewinding (writing a position below what was written, as a session does
//! when it reuses a prefix) is allowed: the quantized tokens of the group the
//! position falls in are dequantized back into the window.
//!
//! The f32 cache can prune key channels after the prompt (ThinK,
//! [`KvCache::enable_pruning`]; module `think`).
//!
//! A sliding-window layer (Gemma-3's local layers: a token sees itself and the
//! `window − 1` positions before it) whose window is shorter than the context
//! keeps only its window, in a ring ([`LayerSlots`]): position `p` in slot
//! `p % slots` of the f32 and f16 storage, where the ring holds
//! [`REWIND_SLOTS`] positions beyond the window, and in a quantized one its
//! key groups in a ring of groups just long enough for the window beside
//! the f32 window of recent positions (module `quantized`). Softmax and the
//! sum of weighted values do not depend on the order of the positions, so
//! the kernels read the ring as it lies: the window's slots, in one piece or,
//! where they wrap past the ring's end, two. A ring forgets: rewinding is
//! exact only while the positions the rewound token sees are still held
//! ([`KvCache::can_rewind_to`]); the f32 and f16 rings' extra slots keep a
//! rewind of up to `REWIND_SLOTS + 1` positions exact (a client that
//! regenerates a reply or edits its last message), where a ring of the
//! window alone allows one.

mod f16;
mod quantized;
mod think;

use crate::architecture::LayerAttention;
use crate::buffers::filled;
use crate::config::ModelConfig;
use crate::error::{Error, ErrorKind, Result};
pub use crate::kernels::attention::KEY_GROUP;
use crate::kernels::attention::{CachedVectors, Causal, CHANNEL_RUN};
use crate::kernels::Kernels;
use f16::Half;
pub use quantized::quantize;
use quantized::Quantized;
use std::fmt;
use std::str::FromStr;
use think::Pruning;
pub use think::{check_prune, kept_channels, PRUNE_QUERIES};

/// Positions the full-precision window of a quantized cache holds.
pub const RESIDUAL_WINDOW: usize = 2 * KEY_GROUP;
const _: () = assert!(RESIDUAL_WINDOW >= KEY_GROUP && RESIDUAL_WINDOW.is_multiple_of(KEY_GROUP));

/// Positions an f32 or f16 ring holds beyond its window (never more than
/// the context): a session that rewinds by up to `REWIND_SLOTS + 1`
/// positions, as one does when a client regenerates a reply of up to
/// brambled's default 256 tokens or edits its last message, finds what
/// the rewound token sees still there, where a ring of the window alone
/// would run the whole conversation again. Gemma-3-270M: 15 local layers
/// × 256 positions × 2 KiB of keys and values, 7.5 MiB at f32.
pub const REWIND_SLOTS: usize = 256;

/// How the KV cache stores keys and values, chosen when the state is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvMode {
    /// f32, every position.
    #[default]
    F32,
    /// IEEE half, every position (no window: module `f16` says why).
    F16,
    /// 8-bit asymmetric codes, with an f32 window of recent tokens.
    Q8,
    /// 4-bit asymmetric codes, with an f32 window of recent tokens.
    Q4,
}

impl KvMode {
    /// Every mode, in the order the command lines list them.
    pub const ALL: [KvMode; 4] = [KvMode::F32, KvMode::F16, KvMode::Q8, KvMode::Q4];

    /// The name on the command line: `f32`, `f16`, `q8`, `q4`.
    pub fn name(self) -> &'static str {
        match self {
            KvMode::F32 => "f32",
            KvMode::F16 => "f16",
            KvMode::Q8 => "q8",
            KvMode::Q4 => "q4",
        }
    }

    /// Bits of a code (`None` for the float modes, f32 and f16).
    pub fn bits(self) -> Option<u32> {
        match self {
            KvMode::F32 | KvMode::F16 => None,
            KvMode::Q8 => Some(8),
            KvMode::Q4 => Some(4),
        }
    }

    /// An error unless this mode runs a model of this shape (the quantized
    /// kernels take heads of whole runs of 32 channels).
    pub fn check(self, config: &ModelConfig) -> Result<()> {
        let head_dim = config.head_dim as usize;
        if self.bits().is_some() && (head_dim == 0 || !head_dim.is_multiple_of(CHANNEL_RUN)) {
            return Err(Error::unsupported(format!(
                "a {} KV cache needs a head_dim that is a multiple of {CHANNEL_RUN}; this model's is {head_dim} \
                 (an f32 or f16 cache takes any)",
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
            None if self == KvMode::F16 => 2.0 * 2.0 * head_dim,
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
            "f16" => Ok(KvMode::F16),
            "q8" => Ok(KvMode::Q8),
            "q4" => Ok(KvMode::Q4),
            _ => Err(Error::invalid(format!("KV cache mode {text:?} is not one of f32, f16, q8, q4"))),
        }
    }
}

impl fmt::Display for KvMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Keys and values of every layer for `context` positions (a sliding-window
/// layer's last `window` of them), stored as its [`KvMode`] says.
pub struct KvCache {
    mode: KvMode,
    shape: Shape,
    layers: Vec<LayerSlots>, // where each layer's positions are kept (layer)
    written: Vec<usize>,     // positions written (layer)
    kept_from: Vec<usize>,   // the oldest position a ring still holds (layer; 0 for the others)
    storage: Storage,
}

/// The model's and the context's sizes a cache's storage is laid out by.
#[derive(Debug, Clone, Copy)]
struct Shape {
    layers: usize,
    context: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Query heads sharing a KV head.
    heads_per_kv: usize,
}

impl Shape {
    fn new(config: &ModelConfig, context: usize) -> Self {
        Self {
            layers: config.n_layers as usize,
            context,
            kv_heads: config.n_kv_heads as usize,
            head_dim: config.head_dim as usize,
            heads_per_kv: (config.n_heads / config.n_kv_heads.max(1)) as usize,
        }
    }

    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Where one layer's positions are kept and which of them a token sees.
/// Every buffer of a cache is the layers' parts one after another, each
/// layer's as long as its own count says (`first_*`: the counts of the
/// layers before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct LayerSlots {
    /// Positions a token sees: itself and the `window − 1` before it; 0:
    /// every earlier one (a global layer, or a window no shorter than the context).
    window: usize,
    /// Whether the layer keeps only what its window needs, in rings (a
    /// cache made for tests keeps every position of a windowed layer and masks).
    ring: bool,
    /// Positions the f32 and f16 storage holds: the context, or a ring's
    /// window and [`REWIND_SLOTS`] more, at most the context (position `p`
    /// in slot `p % slots`).
    slots: usize,
    first_slot: usize,
    /// Groups of key codes a quantized storage holds: the context's, or a
    /// ring's ([`ring_groups`]; group `g` in slot `g % groups`).
    groups: usize,
    first_group: usize,
    /// Positions of value codes a quantized storage holds (`groups · KEY_GROUP` in a ring).
    coded_slots: usize,
    first_coded_slot: usize,
}

/// Groups of codes a quantized ring holds for a window of `window`
/// positions: enough for every group a token sees beside the f32 window.
/// After an append the f32 window holds at least `RESIDUAL_WINDOW −
/// KEY_GROUP + 1` positions (the token's own included) once anything is
/// quantized; the coded positions a token at `p` sees run from `p − window + 1`
/// to at most `p − (RESIDUAL_WINDOW − KEY_GROUP) − 1`, which cover at most
/// `⌈(window − 1) / KEY_GROUP⌉ − 1` groups ([`RESIDUAL_WINDOW`] is two groups).
/// The group quantized next then overwrites only a group no token sees again.
fn ring_groups(window: usize) -> usize {
    (window.saturating_sub(1)).div_ceil(KEY_GROUP).saturating_sub(RESIDUAL_WINDOW / KEY_GROUP - 1)
}

/// Values of the staging a state passes to [`KvCache::append_batch`] and
/// [`KvCache::attend_batch`] for batches of up to `batch` tokens: keys and
/// values of the positions a batch over a ring sees (the window's `window −
/// 1` before the batch, and the batch), `kv_dim` a position, for the widest
/// ring of `layers` in a `mode` cache of `context` positions. 0 when no
/// batch goes through a ring: batches of one, no ring (every window at least
/// the context), or a quantized cache (which attends a token at a time);
/// `None` if the size overflows.
pub fn batch_staging_len(
    mode: KvMode,
    layers: &[LayerAttention],
    context: usize,
    batch: usize,
    kv_dim: usize,
) -> Option<usize> {
    match (widest_ring(layers, context), mode, batch) {
        (Some(window), KvMode::F32 | KvMode::F16, 2..) => {
            (window - 1).checked_add(batch)?.checked_mul(kv_dim)?.checked_mul(2)
        }
        _ => Some(0),
    }
}

impl LayerSlots {
    /// The counts of a layer of `window` (its architecture's: 0 global) in a
    /// cache of `context` positions, its `first_*` left 0; `ring: false`
    /// keeps every position of a windowed layer (tests).
    fn sized(window: u32, context: usize, ring: bool) -> Self {
        let window = match window as usize {
            w if w < context => w,
            _ => 0,
        };
        let ring = ring && window > 0;
        let groups = if ring { ring_groups(window) } else { context.div_ceil(KEY_GROUP) };
        LayerSlots {
            window,
            ring,
            slots: if ring { (window + REWIND_SLOTS).min(context) } else { context },
            groups,
            coded_slots: if ring { groups * KEY_GROUP } else { context },
            ..LayerSlots::default()
        }
    }

    /// The first position a token sees once `written` positions are (its own the last).
    fn first_seen(&self, written: usize) -> usize {
        match self.window {
            0 => 0,
            window => written.saturating_sub(window),
        }
    }

    /// The slot of the f32 and f16 storage position `pos` lives in.
    fn slot(&self, pos: usize) -> usize {
        if self.ring {
            pos % self.slots
        } else {
            pos
        }
    }

    /// The slots a token reads once `written` positions are, as up to two
    /// ranges of slots (the second empty unless needed): the window's
    /// positions, which in a ring run to its last slot and on from slot 0
    /// when they wrap.
    fn seen_slots(&self, written: usize) -> [std::ops::Range<usize>; 2] {
        let first = self.first_seen(written);
        if !self.ring {
            return [first..written, 0..0];
        }
        let start = first % self.slots;
        let end = start + (written - first);
        match end <= self.slots {
            true => [start..end, 0..0],
            false => [start..self.slots, 0..end - self.slots],
        }
    }
}

/// One call of [`KvCache::attend`]: the query heads (`queries`, `heads ×
/// head_dim`) that share KV head `kv_head` over the `seen` positions written
/// of layer `layer` (kept as `at` says).
#[derive(Clone, Copy)]
struct Attention<'a> {
    kernels: &'a Kernels,
    layer: usize,
    at: LayerSlots,
    kv_head: usize,
    queries: &'a [f32],
    scale: f32,
    seen: usize,
}

impl Attention<'_> {
    /// The stretches of a layer-major buffer of keys or values (`kv_dim` a
    /// slot) that hold this call's KV head at every slot the token sees,
    /// each from its first slot's head to its last's, with the number of
    /// slots in each: one piece, or two where a ring's window wraps (the
    /// second's count 0 otherwise).
    fn seen_spans(&self, shape: &Shape) -> [(std::ops::Range<usize>, usize); 2] {
        let (kv_dim, head_dim) = (shape.kv_dim(), shape.head_dim);
        self.at.seen_slots(self.seen).map(|slots| {
            let positions = slots.len();
            let start = (self.at.first_slot + slots.start) * kv_dim + self.kv_head * head_dim;
            (start..start + (positions.max(1) - 1) * kv_dim + head_dim, positions)
        })
    }

    /// The attention of the f32 or f16 storage (`keys`, `values` of `T`,
    /// read by `score` and `weigh`, that storage's kernels) over the
    /// positions the token sees: scores, softmax, weighted values into `out`.
    /// Where a ring's window wraps it is read in two pieces: each head's two
    /// rows of scores are joined for one softmax and split again for the
    /// values, whose two sums are added. `scores` is scratch of
    /// [`attention_scores_len`].
    fn read<T>(
        &self,
        shape: &Shape,
        (keys, values): (&[T], &[T]),
        (score, weigh): (ScoresKernel<T>, ValuesKernel<T>),
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let (kv_dim, head_dim) = (shape.kv_dim(), shape.head_dim);
        let (softmax, queries, scale) = (self.kernels.softmax, self.queries, self.scale);
        let pieces = self.seen_spans(shape);
        let heads = queries.len() / head_dim;
        let piece = |i: usize, data| cached_piece(&pieces[i], data, kv_dim);
        let counts = [pieces[0].1, pieces[1].1];
        let positions = counts[0] + counts[1];
        let (split, rows) = scores.split_at_mut(heads * positions);
        let (first, second) = split.split_at_mut(heads * counts[0]);
        score(queries, head_dim, &piece(0, keys), scale, first);
        if counts[1] == 0 {
            for row in first.chunks_exact_mut(positions) {
                softmax(row);
            }
            weigh(first, &piece(0, values), head_dim, out);
            return;
        }
        score(queries, head_dim, &piece(1, keys), scale, second);
        let rows = &mut rows[..heads * positions.max(head_dim)];
        for (h, row) in rows.chunks_exact_mut(positions).take(heads).enumerate() {
            row[..counts[0]].copy_from_slice(&first[h * counts[0]..][..counts[0]]);
            row[counts[0]..].copy_from_slice(&second[h * counts[1]..][..counts[1]]);
            softmax(row);
            first[h * counts[0]..][..counts[0]].copy_from_slice(&row[..counts[0]]);
            second[h * counts[1]..][..counts[1]].copy_from_slice(&row[counts[0]..]);
        }
        weigh(first, &piece(0, values), head_dim, out);
        let rest = &mut rows[..heads * head_dim];
        weigh(second, &piece(1, values), head_dim, rest);
        for (o, r) in out.iter_mut().zip(rest.iter()) {
            *o += r;
        }
    }
}

/// A scores kernel of [`Kernels`] over cached keys of `T` (f32 or f16).
type ScoresKernel<T> = fn(&[f32], usize, &CachedVectors<T>, f32, &mut [f32]);
/// A weighted-values kernel of [`Kernels`] over cached values of `T`.
type ValuesKernel<T> = fn(&[f32], &CachedVectors<T>, usize, &mut [f32]);

/// The cached vectors of one piece of [`Attention::seen_spans`] in `data`, `stride` apart.
fn cached_piece<'a, T>(piece: &(std::ops::Range<usize>, usize), data: &'a [T], stride: usize) -> CachedVectors<'a, T> {
    CachedVectors { data: &data[piece.0.clone()], stride, positions: piece.1 }
}

/// Values of the scores scratch [`KvCache::attend`] needs for `heads_per_kv`
/// query heads of `head_dim` over a `mode` cache of `context` positions
/// whose layers attend as `layers` says: a score a head and position, and
/// where an f32 or f16 ring's window wraps, room to join and split its two
/// pieces (`heads_per_kv × (window + max(window, head_dim))`). `None` if the
/// size overflows.
pub fn attention_scores_len(
    mode: KvMode,
    layers: &[LayerAttention],
    context: usize,
    heads_per_kv: usize,
    head_dim: usize,
) -> Option<usize> {
    let pieces = match (widest_ring(layers, context), mode) {
        (Some(window), KvMode::F32 | KvMode::F16) => window.checked_add(window.max(head_dim))?,
        _ => 0,
    };
    heads_per_kv.checked_mul(context.max(pieces))
}

/// The widest window of `layers` that a cache of `context` positions keeps
/// in a ring: [`LayerSlots::sized`]'s rule, the one `KvCache::new` follows.
fn widest_ring(layers: &[LayerAttention], context: usize) -> Option<usize> {
    let rings = layers.iter().map(|l| LayerSlots::sized(l.window, context, true)).filter(|slots| slots.ring);
    rings.map(|slots| slots.window).max()
}

/// Each mode's buffers.
enum Storage {
    /// [`KvMode::F32`]: every position in full precision.
    Full(Full),
    /// [`KvMode::F16`]: every position in half precision.
    Half(Half),
    /// [`KvMode::Q8`] and [`KvMode::Q4`] (the same buffers, codes of 8 or 4 bits):
    /// codes, with an f32 window of the recent positions.
    Quantized(Quantized),
}

/// The f32 storage. Shapes in comments.
struct Full {
    keys: Vec<f32>,   // (layer, slots, kv_dim); a pruned layer's first positions thin ([`Pruning`])
    values: Vec<f32>, // (layer, slots, kv_dim)
    pruning: Option<Pruning>,
}

impl Full {
    /// The key and value of slot `slot` (counted over every layer), as f32.
    fn read_slot(&self, kv_dim: usize, slot: usize, key: &mut [f32], value: &mut [f32]) {
        key.copy_from_slice(&self.keys[slot * kv_dim..(slot + 1) * kv_dim]);
        value.copy_from_slice(&self.values[slot * kv_dim..(slot + 1) * kv_dim]);
    }

    /// Stores position `pos`'s key and value of layer `layer` (kept as `at`
    /// says): the value in its slot, the key there too unless the layer is
    /// pruned, whose thin keys come first.
    fn append(&mut self, shape: &Shape, layer: usize, at: LayerSlots, pos: usize, key: &[f32], value: &[f32]) {
        let kv_dim = shape.kv_dim();
        let base = at.first_slot * kv_dim;
        let slot = at.slot(pos);
        let key_at = base
            + match self.pruning.as_mut().filter(|_| at.window == 0) {
                Some(p) => p.key_offset(shape, layer, pos),
                None => slot * kv_dim,
            };
        self.keys[key_at..key_at + kv_dim].copy_from_slice(key);
        let value_at = base + slot * kv_dim;
        self.values[value_at..value_at + kv_dim].copy_from_slice(value);
    }

    /// [`KvCache::attend`] over the positions the token sees in full
    /// precision (split in two when the layer is pruned).
    fn attend(&mut self, shape: &Shape, call: &Attention, scores: &mut [f32], out: &mut [f32]) {
        if let Some(p) = self.pruning.as_mut().filter(|p| p.pruned_positions(call.layer) > 0) {
            p.attend(shape, (&self.keys, &self.values), call, scores, out);
            return;
        }
        let kernels = call.kernels;
        let read = (kernels.attention_scores, kernels.attention_values);
        call.read(shape, (&self.keys, &self.values), read, scores, out);
    }
}

/// The sizes of a cache's buffers, in elements, shared by [`KvCache::new`] and [`KvCache::bytes_for`].
struct Sizes {
    window: usize,
    floats: usize,
    halves: usize,
    key_codes: usize,
    key_scales: usize,
    value_codes: usize,
    value_scales: usize,
    window_scores: usize,
    window_out: usize,
}

/// The layers' [`LayerSlots`] for a cache of `context` positions, from the
/// windows of `layers` (one a layer of `config`, or none: every layer
/// global), each with the counts of the layers before it, handed to `each`
/// in order; returns the totals (each buffer's whole count in the `first_*`
/// fields). Allocates nothing; an error naming the count that overflows.
fn for_each_layer(
    config: &ModelConfig,
    context: usize,
    layers: &[LayerAttention],
    ring: bool,
    mut each: impl FnMut(LayerSlots),
) -> Result<LayerSlots> {
    let count = config.n_layers as usize;
    if !layers.is_empty() && layers.len() != count {
        return Err(Error::invalid(format!("KV cache: {} layer windows for a model of {count} layers", layers.len())));
    }
    let overflow = |what: &str| {
        Error::new(ErrorKind::OutOfMemory, format!("KV cache {what} (n_layers × context): the count overflows"))
    };
    let add = |total: usize, more: usize, times: usize, what: &str| {
        more.checked_mul(times).and_then(|more| total.checked_add(more)).ok_or_else(|| overflow(what))
    };
    if layers.is_empty() {
        // Every layer global: the totals checked at once, before a loop over however many layers.
        let sized = LayerSlots::sized(0, context, ring);
        add(0, sized.slots, count, "positions")?;
        add(0, sized.groups, count, "key groups")?;
        add(0, sized.coded_slots, count, "coded positions")?;
    }
    let mut total = LayerSlots::default();
    for l in 0..count {
        let sized = LayerSlots::sized(layers.get(l).map_or(0, |layer| layer.window), context, ring);
        each(LayerSlots {
            first_slot: total.first_slot,
            first_group: total.first_group,
            first_coded_slot: total.first_coded_slot,
            ..sized
        });
        total.first_slot = add(total.first_slot, sized.slots, 1, "positions")?;
        total.first_group = add(total.first_group, sized.groups, 1, "key groups")?;
        total.first_coded_slot = add(total.first_coded_slot, sized.coded_slots, 1, "coded positions")?;
    }
    Ok(total)
}

impl Sizes {
    /// The sizes, with every product checked: an error naming the buffer if one overflows.
    fn new(mode: KvMode, config: &ModelConfig, context: usize, layers: &[LayerAttention], ring: bool) -> Result<Self> {
        let (n_layers, kv_heads, head_dim) =
            (config.n_layers as usize, config.n_kv_heads as usize, config.head_dim as usize);
        let kv_dim = config.kv_dim();
        let heads_per_kv = (config.n_heads / config.n_kv_heads.max(1)) as usize;
        let size = crate::buffers::checked_size;
        let total = for_each_layer(config, context, layers, ring, |_| {})?;
        Ok(match mode.bits() {
            None => {
                // Every position each layer holds, as f32 or as f16.
                let every_position = size("KV cache (n_layers × context × kv_dim)", &[total.first_slot, kv_dim])?;
                let (floats, halves) = match mode {
                    KvMode::F16 => (0, every_position),
                    _ => (every_position, 0),
                };
                Sizes {
                    window: context,
                    floats,
                    halves,
                    key_codes: 0,
                    key_scales: 0,
                    value_codes: 0,
                    value_scales: 0,
                    window_scores: 0,
                    window_out: 0,
                }
            }
            Some(bits) => {
                let window = RESIDUAL_WINDOW.min(context);
                let groups = total.first_group;
                let coded = total.first_coded_slot;
                let bits = bits as usize;
                let key_scales = "KV cache key scales (n_layers × n_kv_heads × groups × head_dim)";
                Sizes {
                    window,
                    floats: size("KV cache window (n_layers × window × kv_dim)", &[n_layers, window, kv_dim])?,
                    halves: 0,
                    key_codes: size(
                        "KV cache key codes (n_layers × n_kv_heads × context × head_dim)",
                        &[kv_heads, groups, head_dim, KEY_GROUP * bits],
                    )? / 8,
                    key_scales: size(key_scales, &[kv_heads, groups, head_dim])?,
                    value_codes: size("KV cache value codes (n_layers × context × kv_dim)", &[coded, kv_dim, bits])?
                        / 8,
                    value_scales: size("KV cache value scales (n_layers × n_kv_heads × context)", &[kv_heads, coded])?,
                    window_scores: size("KV cache window scores", &[heads_per_kv, window])?,
                    window_out: size("KV cache window output", &[heads_per_kv, head_dim])?,
                }
            }
        })
    }

    /// Bytes of all the buffers; an error if the sum overflows.
    fn bytes(&self) -> Result<usize> {
        let bytes = 4 * (2 * self.floats as u128 + self.window_scores as u128 + self.window_out as u128)
            + 2 * 2 * self.halves as u128
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
    /// this shape (check the shape first with [`KvMode::check`]), whose
    /// layers attend as `layers` says (one a layer; empty: every layer
    /// global): a sliding-window layer whose window is shorter than the
    /// context keeps only what its window needs. An [`ErrorKind::OutOfMemory`]
    /// error naming the buffer whose size overflows or cannot be allocated.
    pub fn new(mode: KvMode, config: &ModelConfig, context: usize, layers: &[LayerAttention]) -> Result<Self> {
        Self::with_rings(mode, config, context, layers, true)
    }

    /// As [`KvCache::new`], keeping every position of a windowed layer and
    /// masking those outside its window instead of keeping a ring: what the
    /// tests hold the rings to.
    #[cfg(test)]
    pub(crate) fn keeping_every_position(
        mode: KvMode,
        config: &ModelConfig,
        context: usize,
        layers: &[LayerAttention],
    ) -> Result<Self> {
        Self::with_rings(mode, config, context, layers, false)
    }

    /// As [`KvCache::new`]; `ring: false` keeps every position of a windowed
    /// layer and masks those outside the window instead (tests compare the rings with it).
    fn with_rings(
        mode: KvMode,
        config: &ModelConfig,
        context: usize,
        layers: &[LayerAttention],
        ring: bool,
    ) -> Result<Self> {
        let sizes = Sizes::new(mode, config, context, layers, ring)?;
        sizes.bytes()?;
        let shape = Shape::new(config, context);
        let mut plan = filled("KV cache layers", shape.layers, LayerSlots::default())?;
        let mut next = plan.iter_mut();
        for_each_layer(config, context, layers, ring, |at| {
            if let Some(slot) = next.next() {
                *slot = at;
            }
        })?;
        let storage = match mode.bits() {
            None if mode == KvMode::F16 => Storage::Half(Half::new(&sizes)?),
            None => Storage::Full(Full {
                keys: filled("KV cache keys", sizes.floats, 0.0)?,
                values: filled("KV cache values", sizes.floats, 0.0)?,
                pruning: None,
            }),
            Some(bits) => Storage::Quantized(Quantized::new(bits, &shape, &sizes)?),
        };
        Ok(Self {
            mode,
            shape,
            layers: plan,
            written: filled("KV cache positions", shape.layers, 0)?,
            kept_from: filled("KV cache positions", shape.layers, 0)?,
            storage,
        })
    }

    /// Turns on key-channel pruning with a share `ratio` of each head's key
    /// channels to drop (checked with [`check_prune`]; 0 turns it off), and
    /// allocates what it needs. Call before the prompt runs: the channel
    /// scores read the queries [`KvCache::observe_queries`] saw.
    pub fn enable_pruning(&mut self, ratio: f32) -> Result<()> {
        check_prune(ratio, self.mode)?;
        // A quantized cache passes the check only with a ratio of 0: nothing to turn off.
        if let Storage::Full(full) = &mut self.storage {
            full.pruning = match ratio {
                0.0 => None,
                _ => Some(Pruning::new(&self.shape, ratio)?),
            };
        }
        Ok(())
    }

    /// The pruning state, when the f32 cache prunes.
    fn pruning(&self) -> Option<&Pruning> {
        match &self.storage {
            Storage::Full(full) => full.pruning.as_ref(),
            Storage::Half(_) | Storage::Quantized(_) => None,
        }
    }

    /// The share of key channels pruning drops (0: off).
    pub fn prune_ratio(&self) -> f32 {
        self.pruning().map_or(0.0, |p| p.ratio)
    }

    /// Key channels a head keeps for its pruned positions (`head_dim` without pruning).
    pub fn kept_channels(&self) -> usize {
        self.pruning().map_or(self.shape.head_dim, |p| p.kept)
    }

    /// Positions of layer `layer` whose keys are stored pruned.
    pub fn pruned_positions(&self, layer: usize) -> usize {
        self.pruning().map_or(0, |p| p.pruned_positions(layer))
    }

    /// The channels KV head `kv_head` of layer `layer` keeps for its pruned positions
    /// (meaningful once [`KvCache::pruned_positions`] is above 0).
    pub fn pruned_channels(&self, layer: usize, kv_head: usize) -> &[usize] {
        self.pruning().map_or(&[], |p| p.channels(&self.shape, layer, kv_head))
    }

    /// Bytes the held keys of the f32 or f16 cache take (all layers; a ring
    /// holds its slots),
    /// and what they would take with every channel kept (both 0 for a
    /// quantized cache).
    pub fn key_bytes_in_use(&self) -> (usize, usize) {
        let element = match self.mode {
            KvMode::F32 => 4,
            KvMode::F16 => 2,
            KvMode::Q8 | KvMode::Q4 => return (0, 0),
        };
        let (kv_dim, thin) = (self.shape.kv_dim(), self.shape.kv_heads * self.kept_channels());
        let (mut used, mut full) = (0, 0);
        for (layer, (&written, at)) in self.written.iter().zip(&self.layers).enumerate() {
            // A ring holds its last `slots` positions.
            let held = written.min(at.slots);
            let pruned = self.pruned_positions(layer);
            used += element * (pruned * thin + (held - pruned) * kv_dim);
            full += element * held * kv_dim;
        }
        (used, full)
    }

    /// Records the queries of position `pos` of layer `layer` (`n_heads ×
    /// head_dim`, after RoPE) for the channel scores, while the layer is not
    /// yet pruned; nothing without pruning, or for a windowed layer (which
    /// pruning leaves alone: its keys leave the window soon anyway).
    pub fn observe_queries(&mut self, layer: usize, pos: usize, queries: &[f32]) {
        if let Storage::Full(Full { pruning: Some(p), .. }) = &mut self.storage {
            if self.layers[layer].window == 0 {
                p.observe(&self.shape, layer, pos, queries);
            }
        }
    }

    /// Ends the prefill: each layer not pruned yet, with positions written,
    /// has its key channels scored and its written keys stored with the
    /// kept channels only; windowed layers are left whole. Once per
    /// conversation: a layer is pruned again only after a rewind to position
    /// 0. Allocates nothing; nothing without pruning.
    pub fn prune(&mut self) {
        if let Storage::Full(Full { keys, pruning: Some(p), .. }) = &mut self.storage {
            p.prune(&self.shape, &self.layers, keys, &self.written);
        }
    }

    /// Bytes [`KvCache::new`] allocates for these arguments (its keys and
    /// values: each layer's positions, a sliding-window layer's window),
    /// computed without allocating; an error when a size overflows.
    pub fn bytes_for(mode: KvMode, config: &ModelConfig, context: usize, layers: &[LayerAttention]) -> Result<usize> {
        Sizes::new(mode, config, context, layers, true)?.bytes()
    }

    /// Bytes of the per-layer position counters and layouts a cache of
    /// `mode` keeps beside its storage, which [`KvCache::bytes`] and
    /// [`KvCache::bytes_for`] leave out (their figure is the keys and
    /// values); the run state counts them.
    pub fn bookkeeping_bytes(mode: KvMode, config: &ModelConfig) -> usize {
        // Positions written and the oldest a ring holds, and for a quantized cache the positions held as codes.
        let counters = if mode.bits().is_none() { 2 } else { 3 };
        config.n_layers as usize * (counters * std::mem::size_of::<usize>() + std::mem::size_of::<LayerSlots>())
    }

    /// Bytes of every buffer the cache holds, counted from the buffers
    /// themselves (the position counters included), to hold the computed
    /// sizes to the allocation.
    #[cfg(test)]
    pub(crate) fn allocated_bytes(&self) -> usize {
        std::mem::size_of_val(&self.written[..])
            + std::mem::size_of_val(&self.kept_from[..])
            + std::mem::size_of_val(&self.layers[..])
            + match &self.storage {
                Storage::Full(full) => {
                    std::mem::size_of_val(&full.keys[..])
                        + std::mem::size_of_val(&full.values[..])
                        + full.pruning.as_ref().map_or(0, Pruning::allocated_bytes)
                }
                Storage::Half(half) => half.allocated_bytes(),
                Storage::Quantized(q) => q.allocated_bytes(),
            }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::Full(full) => {
                4 * (full.keys.len() + full.values.len()) + full.pruning.as_ref().map_or(0, Pruning::bytes)
            }
            Storage::Half(half) => half.bytes(),
            Storage::Quantized(q) => q.bytes(),
        }
    }

    /// Writes every page of the cache's buffers, so the memory is the
    /// process's from now on (see [`commit_pages`]).
    pub fn commit_memory(&mut self) {
        match &mut self.storage {
            Storage::Full(full) => {
                commit_pages(&mut full.keys);
                commit_pages(&mut full.values);
                if let Some(p) = full.pruning.as_mut() {
                    p.commit_memory();
                }
            }
            Storage::Half(half) => half.commit_memory(),
            Storage::Quantized(q) => q.commit_memory(),
        }
    }

    /// Bytes [`KvCache::enable_pruning`] adds for these arguments (0 for a ratio of 0).
    pub fn pruning_bytes_for(config: &ModelConfig, context: usize, ratio: f32) -> usize {
        Pruning::bytes_for(&Shape::new(config, context), ratio)
    }

    /// The mode.
    pub fn mode(&self) -> KvMode {
        self.mode
    }

    /// Positions of layer `layer` held as codes.
    pub fn quantized_positions(&self, layer: usize) -> usize {
        match &self.storage {
            Storage::Full(_) | Storage::Half(_) => 0,
            Storage::Quantized(q) => q.quantized[layer],
        }
    }

    /// Stores position `pos`'s key and value (`kv_dim` each, the key after
    /// RoPE) for layer `layer`, rounded with `kernels` where the mode rounds
    /// (f16). Positions are written in order; writing below the last one
    /// rewinds to it, which is exact where [`KvCache::can_rewind_to`] says so.
    pub fn append(&mut self, kernels: &Kernels, layer: usize, pos: usize, key: &[f32], value: &[f32]) {
        let kv_dim = self.shape.kv_dim();
        assert!(pos < self.shape.context && key.len() == kv_dim && value.len() == kv_dim, "KV append out of shape");
        let at = self.layers[layer];
        if pos < self.written[layer] {
            // A rewind keeps what a ring held below `pos`; one to 0 starts it afresh.
            self.kept_from[layer] = self.kept_from[layer].min(pos);
        }
        match &mut self.storage {
            Storage::Full(full) => full.append(&self.shape, layer, at, pos, key, value),
            Storage::Half(half) => half.append(kernels, &self.shape, at, pos, key, value),
            Storage::Quantized(q) => q.append(&self.shape, layer, at, pos, key, value),
        }
        // What a ring has overwritten by now: the positions one lap behind
        // (f32, f16), or the groups one lap of the ring of groups behind.
        let lost = match &self.storage {
            Storage::Quantized(q) => (q.quantized[layer] / KEY_GROUP).saturating_sub(at.groups) * KEY_GROUP,
            Storage::Full(_) | Storage::Half(_) => (pos + 1).saturating_sub(at.slots),
        };
        self.kept_from[layer] = self.kept_from[layer].max(lost);
        self.written[layer] = pos + 1;
    }

    /// Whether writing position `pos` next leaves every layer exact: always
    /// when nothing at or above it is written; a rewind below that, only
    /// while each sliding-window layer's ring still holds every position the
    /// token at `pos` sees (an f32 or f16 ring holds its window and
    /// [`REWIND_SLOTS`] more: after it has turned, a rewind by up to
    /// `REWIND_SLOTS + 1` positions is exact, one to 0 always is). A caller
    /// that cannot rewind runs the tokens again from 0.
    pub fn can_rewind_to(&self, pos: usize) -> bool {
        let layers = self.layers.iter().zip(&self.written).zip(&self.kept_from);
        layers
            .into_iter()
            .all(|((at, &written), &kept_from)| pos >= written || at.first_seen(pos + 1) >= kept_from.min(pos))
    }

    /// Attention of a group of query heads (`queries`, `heads × head_dim`)
    /// that share KV head `kv_head` over layer `layer`'s positions written
    /// so far (a sliding-window layer's last `window` of them): scores,
    /// softmax, weighted values into `out` (`heads × head_dim`). `scores` is
    /// scratch of [`attention_scores_len`] values.
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
        let at = self.layers[layer];
        let call = Attention { kernels, layer, at, kv_head, queries, scale, seen: self.written[layer] };
        match &mut self.storage {
            Storage::Full(full) => full.attend(&self.shape, &call, scores, out),
            Storage::Half(half) => half.attend(&self.shape, &call, scores, out),
            Storage::Quantized(q) => q.attend(&self.shape, &call, scores, out),
        }
    }

    /// Whether layer `layer` attends a prompt batch in tiles
    /// ([`KvCache::append_batch`], then [`KvCache::attend_batch`]): the f32
    /// and f16 caches while the layer is not pruned.
    /// A quantized cache moves its full-precision window as tokens arrive (a
    /// token's view of the cache exists only between its append and the
    /// next), and a pruned layer's keys are split in two with the scores of
    /// both joined per query: those run a token at a time, appending then
    /// [`KvCache::attend`]. A sliding-window layer's batch sees each token's
    /// window only (the causal tiles mask below it too); in a ring past its
    /// first window it goes through the staging ([`KvCache::append_batch`]),
    /// as the batch's own keys overwrite slots its earlier tokens still see.
    pub fn attends_in_batches(&self, layer: usize) -> bool {
        matches!(self.mode, KvMode::F32 | KvMode::F16) && self.pruned_positions(layer) == 0
    }

    /// Whether a batch of `tokens` from `first` of layer `layer` is attended
    /// from the staging: a ring that the batch takes past its last slot
    /// (until then a ring holds position `p` in slot `p`, and the batch reads
    /// it in place).
    fn stages(&self, layer: usize, first: usize, tokens: usize) -> bool {
        let at = self.layers[layer];
        at.ring && first + tokens > at.slots
    }

    /// Appends a batch: keys and values of `keys.len() / kv_dim` positions
    /// from `first`, as [`KvCache::append`] a position at a time. A batch
    /// that a ring attends from the staging ([`KvCache::attend_batch`]) also
    /// goes there, as f32, after the positions before it that its first
    /// token sees (copied before the batch overwrites their slots): `staging`
    /// holds [`batch_staging_len`] values.
    pub fn append_batch(
        &mut self,
        kernels: &Kernels,
        layer: usize,
        first: usize,
        keys: &[f32],
        values: &[f32],
        staging: &mut [f32],
    ) {
        let kv_dim = self.shape.kv_dim();
        let tokens = keys.len() / kv_dim;
        if !self.stages(layer, first, tokens) {
            for (b, (key, value)) in keys.chunks_exact(kv_dim).zip(values.chunks_exact(kv_dim)).enumerate() {
                self.append(kernels, layer, first + b, key, value);
            }
            return;
        }
        let at = self.layers[layer];
        let lowest = at.first_seen(first + 1);
        let rows = first - lowest + tokens;
        assert!(
            2 * rows * kv_dim <= staging.len(),
            "a batch of {tokens} over a window of {} needs {} staged values, not {}",
            at.window,
            2 * rows * kv_dim,
            staging.len()
        );
        let (staged_keys, staged_values) = staging[..2 * rows * kv_dim].split_at_mut(rows * kv_dim);
        let mut stage = |cache: &Self, row: usize, pos: usize| {
            let (key, value) =
                (&mut staged_keys[row * kv_dim..][..kv_dim], &mut staged_values[row * kv_dim..][..kv_dim]);
            let slot = at.first_slot + at.slot(pos);
            match &cache.storage {
                Storage::Full(full) => full.read_slot(kv_dim, slot, key, value),
                Storage::Half(half) => half.read_slot(kv_dim, slot, key, value),
                Storage::Quantized(_) => unreachable!("a quantized cache does not stage"),
            }
        };
        for pos in lowest..first {
            stage(self, pos - lowest, pos);
        }
        for (b, (key, value)) in keys.chunks_exact(kv_dim).zip(values.chunks_exact(kv_dim)).enumerate() {
            self.append(kernels, layer, first + b, key, value);
            // As stored (the f16 cache's rounding included), before a later token of the batch takes its slot.
            stage(self, first - lowest + b, first + b);
        }
    }

    /// Causal attention of `tokens` consecutive positions from `first`, all
    /// appended already ([`KvCache::append_batch`]), for the query heads that
    /// share KV head `kv_head` over layer `layer` ([`KvCache::attends_in_batches`]
    /// must hold): token `i`'s heads (`heads_per_kv × head_dim` values at
    /// `queries[i·query_stride ..]`) see positions `0 ..= first + i` (a
    /// sliding-window layer's last `window` of them); their outputs go to the
    /// same places of `out`. `staging` is what `append_batch` filled;
    /// `scratch` holds [`Causal::scratch_len`] values for `first + tokens`
    /// positions. Each cached key and value is read once for a whole tile of
    /// queries ([`crate::kernels::attention`]).
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
        staging: &[f32],
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        let (written, at) = (self.written[layer], self.layers[layer]);
        let batched = self.attends_in_batches(layer) && tokens > 0 && first + tokens <= written;
        assert!(
            batched,
            "batched attention of positions {first}..{} over {written} written ones of a {} cache{}",
            first + tokens,
            self.mode,
            match (self.pruned_positions(layer) > 0, at.window) {
                (true, _) => ", pruned".to_string(),
                (false, 0) => String::new(),
                (false, window) => format!(", window {window}"),
            }
        );
        let (kv_dim, head_dim) = (self.shape.kv_dim(), self.shape.head_dim);
        let heads = self.shape.heads_per_kv;
        let window = at.window;
        if self.stages(layer, first, tokens) {
            // The staging: the positions the first token sees before the batch, then the batch.
            let kept = first - at.first_seen(first + 1);
            let rows = kept + tokens;
            let shape = Causal { tokens, heads, head_dim, first: kept, query_stride, stride: kv_dim, scale, window };
            let (keys, values) = staging[..2 * rows * kv_dim].split_at(rows * kv_dim);
            let head = kv_head * head_dim;
            (kernels.attention_causal)(&shape, queries, &keys[head..], &values[head..], scratch, out);
            return;
        }
        let shape = Causal { tokens, heads, head_dim, first, query_stride, stride: kv_dim, scale, window };
        // Position t of this head at t·kv_dim from the layer's start (a ring's too: t < slots).
        let start = at.first_slot * kv_dim + kv_head * head_dim;
        let span = start..start + (first + tokens - 1) * kv_dim + head_dim;
        match &self.storage {
            Storage::Full(full) => {
                (kernels.attention_causal)(&shape, queries, &full.keys[span.clone()], &full.values[span], scratch, out)
            }
            Storage::Half(half) => half.attend_batch(kernels, &shape, span, queries, scratch, out),
            Storage::Quantized(_) => unreachable!("a quantized cache attends a token at a time"),
        }
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
    pub(super) fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503);
                ((h.wrapping_mul(2_246_822_519) >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    pub(super) fn config() -> ModelConfig {
        let mut c = ModelConfig::zeroed();
        (c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.dim) = (2, 4, 2, 32, 128);
        c
    }

    #[test]
    fn mode_names_parse_and_bad_ones_are_named() {
        for mode in KvMode::ALL {
            assert_eq!(mode.name().parse::<KvMode>().unwrap(), mode);
            assert_eq!(mode.to_string().to_uppercase().parse::<KvMode>().unwrap(), mode);
        }
        let error = "q2".parse::<KvMode>().unwrap_err().to_string();
        assert!(error.contains("\"q2\"") && error.contains("f32, f16, q8, q4"), "{error}");
        let mut odd = config();
        odd.head_dim = 48;
        let error = KvMode::Q4.check(&odd).unwrap_err().to_string();
        assert!(error.contains("head_dim") && error.contains("48"), "{error}");
        assert!(KvMode::F32.check(&odd).is_ok() && KvMode::F16.check(&odd).is_ok());
    }

    #[test]
    fn sizes_that_overflow_or_cannot_be_had_are_errors_naming_the_buffer() {
        // Every field within range, their product not: 2²⁴ layers × 2⁴⁰ positions × 32 values.
        let mut huge = config();
        huge.n_layers = 1 << 24;
        for mode in KvMode::ALL {
            for error in [
                KvCache::bytes_for(mode, &huge, 1 << 40, &[]).unwrap_err(),
                KvCache::new(mode, &huge, 1 << 40, &[]).err().unwrap(),
            ] {
                assert_eq!(error.kind(), ErrorKind::OutOfMemory, "{mode}: {error}");
                assert!(error.message().contains("KV cache") && error.message().contains("overflow"), "{error}");
            }
        }
        // A size that fits in 64 bits but no allocator can provide (2⁶⁰ bytes).
        let error = KvCache::new(KvMode::F32, &config(), 1 << 52, &[]).err().unwrap();
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
        for mode in KvMode::ALL {
            for context in [1, 31, 64, 100, 256] {
                let cache = KvCache::new(mode, &c, context, &[]).unwrap();
                assert_eq!(cache.bytes(), KvCache::bytes_for(mode, &c, context, &[]).unwrap());
                assert_eq!(
                    cache.allocated_bytes(),
                    cache.bytes() + KvCache::bookkeeping_bytes(mode, &c),
                    "{mode} at {context}"
                );
            }
        }
        let f16 = KvMode::f16_bytes_per_token(&c);
        assert_eq!(KvMode::F32.bytes_per_token(&c), 2.0 * f16);
        // The f16 cache is the yardstick: half of f32 a position, and no fixed cost on top.
        assert_eq!(KvMode::F16.bytes_per_token(&c), f16);
        assert_eq!(KvCache::bytes_for(KvMode::F16, &c, 256, &[]).unwrap() as f64, 256.0 * f16);
        assert_eq!(
            2 * KvCache::bytes_for(KvMode::F16, &c, 256, &[]).unwrap(),
            KvCache::bytes_for(KvMode::F32, &c, 256, &[]).unwrap()
        );
        // q4: 0.5 + 4/32 bytes a key channel, 0.5 + 4/32 a value channel at head_dim 32.
        assert_eq!(KvMode::Q4.bytes_per_token(&c) / f16, (0.625 + 0.625) / 4.0);
        // Long contexts approach the per-token rate (the window is a fixed cost).
        let long = KvCache::bytes_for(KvMode::Q4, &c, 32768, &[]).unwrap() as f64 / (32768.0 * f16);
        assert!((long - KvMode::Q4.bytes_per_token(&c) / f16).abs() < 0.01, "{long}");
    }

    /// Appends `positions` tokens of synthetic keys and values and returns the
    /// attention output of every position's query, all layers.
    fn run(mode: KvMode, positions: usize, rewind_to: Option<usize>) -> (Vec<f32>, KvCache) {
        let mut cache = KvCache::new(mode, &config(), 128, &[]).unwrap();
        let mut order: Vec<usize> = (0..positions).collect();
        if let Some(start) = rewind_to {
            order.extend(start..positions);
        }
        let outputs = run_cache(&mut cache, Kernels::detect(), &order);
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

    /// The f16 cache's attention against the f32 cache's on the same data: the outputs move by the rounding of the
    /// stored keys and values only (2⁻¹¹ relative; values in [-1, 1], scores of 32 channels at scale 0.5). Measured
    /// 5.4e-4 when written (q8's bound in the test above is 0.01).
    const F16_ATTENTION_BOUND: f32 = 2e-3;

    #[test]
    fn f16_attention_stays_close_to_f32_from_the_first_position() {
        let (exact, _) = run(KvMode::F32, 100, None);
        let (got, cache) = run(KvMode::F16, 100, None);
        assert_eq!(cache.quantized_positions(0), 0);
        let worst = got.iter().zip(&exact).map(|(g, e)| (g - e).abs()).fold(0f32, f32::max);
        eprintln!("f16 against f32: worst difference {worst:e}");
        assert!(worst <= F16_ATTENTION_BOUND, "worst difference {worst} above {F16_ATTENTION_BOUND}");
        assert!(worst > 0.0, "rounding to f16 changed nothing");
        // A rewind overwrites in place: the same outputs as writing once.
        let (rewound, _) = run(KvMode::F16, 100, Some(40));
        assert_eq!(rewound[..got.len()], got[..]);
        assert_eq!(rewound[got.len()..], got[got.len() - rewound[got.len()..].len()..]);
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

    /// Layers of the windowed tests: layer 0 global, layer 1 sliding over `window` positions.
    fn windowed(window: u32) -> [LayerAttention; 2] {
        [LayerAttention { window: 0, rope_theta: 1e4 }, LayerAttention { window, rope_theta: 1e4 }]
    }

    /// Appends `order`'s positions of synthetic keys and values (as [`run`]) to `cache`
    /// and returns every position's attention output, all layers and KV heads.
    fn run_cache(cache: &mut KvCache, kernels: &Kernels, order: &[usize]) -> Vec<f32> {
        let c = config();
        let (kv_dim, head_dim, heads_per_kv) = (c.kv_dim(), 32, 2);
        // Exactly the scratch a state gives, from the cache's own windows.
        let windows: Vec<LayerAttention> =
            cache.layers.iter().map(|l| LayerAttention { window: l.window as u32, rope_theta: 1e4 }).collect();
        let len = attention_scores_len(cache.mode, &windows, cache.shape.context, heads_per_kv, head_dim);
        let mut scores = vec![0f32; len.unwrap()];
        let mut outputs = Vec::new();
        for &pos in order {
            for layer in 0..2 {
                let key = data(kv_dim, (pos * 7 + layer) as u32);
                let value = data(kv_dim, (pos * 7 + layer + 3) as u32);
                cache.append(kernels, layer, pos, &key, &value);
                for kv in 0..2 {
                    let queries = data(heads_per_kv * head_dim, (pos * 5 + kv) as u32 + 99);
                    let mut out = vec![0f32; heads_per_kv * head_dim];
                    cache.attend(kernels, layer, kv, &queries, 0.5, &mut scores, &mut out);
                    outputs.extend(out);
                }
            }
        }
        outputs
    }

    /// What the windowed layer (1) must give at position `pos` from the maths, in f64: each query
    /// head against the keys of positions `pos − window + 1 ..= pos` only (`window` 0: all), the
    /// keys and values as `stored` keeps them (f32 unchanged; f16 rounded).
    fn masked_reference(pos: usize, window: usize, stored: &dyn Fn(f32) -> f64) -> Vec<f32> {
        let (kv_dim, head_dim) = (64, 32);
        let first = if window == 0 { 0 } else { (pos + 1).saturating_sub(window) };
        let mut out = Vec::new();
        for kv in 0..2 {
            let queries = data(2 * head_dim, (pos * 5 + kv) as u32 + 99);
            for q in queries.chunks_exact(head_dim) {
                let scores: Vec<f64> = (first..=pos)
                    .map(|t| {
                        let key = data(kv_dim, (t * 7 + 1) as u32);
                        let k = &key[kv * head_dim..][..head_dim];
                        0.5 * q.iter().zip(k).map(|(&q, &k)| q as f64 * stored(k)).sum::<f64>()
                    })
                    .collect();
                let max = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for c in 0..head_dim {
                    let sum: f64 = (first..=pos)
                        .zip(&weights)
                        .map(|(t, w)| w / total * stored(data(kv_dim, (t * 7 + 4) as u32)[kv * head_dim + c]))
                        .sum();
                    out.push(sum as f32);
                }
            }
        }
        out
    }

    /// The worst difference of the windowed layer's outputs of position `pos` in `got` (as
    /// [`run_cache`] returns them) from the maths ([`masked_reference`]), the keys and values
    /// stored as an f32 or f16 cache of `mode` keeps them.
    fn from_the_maths(got: &[f32], pos: usize, window: usize, mode: KvMode) -> f32 {
        let per_position = 2 * 2 * 2 * 32;
        let stored: fn(f32) -> f64 = match mode {
            KvMode::F16 => |v| half::f16::from_f32(v).to_f64(),
            _ => |v| v as f64,
        };
        let expected = masked_reference(pos, window, &stored);
        // Layer 1's outputs of position `pos`: after layer 0's two KV heads.
        let at = pos * per_position + per_position / 2;
        got[at..at + per_position / 2].iter().zip(&expected).map(|(g, e)| (g - e).abs()).fold(0f32, f32::max)
    }

    /// A ring against the full history masked, same mode: the same scores and values, read in
    /// another order, so only the f32 sums' order differs (values in [-1, 1], weights summing
    /// to 1, up to 200 positions: a few ulps of 1). Measured 6.0e-7 when written.
    const RING_ORDER_TOLERANCE: f32 = 2e-6;
    /// The f32 and f16 caches' windowed attention against the f64 reference of the masked maths
    /// (the f16 one with the stored values rounded as the reference rounds them): f32 sums of up
    /// to 32 products and 200 weights. Measured 8.9e-8 when written.
    const WINDOW_REFERENCE_TOLERANCE: f32 = 1e-6;

    /// A batch's tiles against a token at a time on the same cache contents: the NEON tiles sum
    /// in another order and take 2ˣ for eˣ (values in [-1, 1]). Measured 7.2e-7 (NEON) and 4.2e-7
    /// (reference, whose per-token run reads a ring in slot order) when written.
    const BATCH_ORDER_TOLERANCE: f32 = 1e-5;

    /// Prompt batches (f32 and f16 caches) give each token's attention as a token at a time:
    /// a global layer, and a ring of 5 or 40 within its first window, across its end, past it,
    /// up to the ring's last slot (in place), across it and past it, and with batches longer
    /// than the window (which go through the staging); quantized caches never batch.
    #[test]
    fn ring_batches_attend_as_a_token_at_a_time() {
        let c = config();
        let (context, kv_dim, head_dim, heads_per_kv) = (600, c.kv_dim(), 32, 2);
        let q_dim = 2 * heads_per_kv * head_dim;
        // Rings of 5 + REWIND_SLOTS = 261 and 296 slots.
        let batches = [
            (0, 4),
            (4, 30),
            (34, 8),
            (42, 1),
            (43, 60),
            (103, 7),
            (110, 151),
            (261, 35),
            (296, 1),
            (297, 150),
            (447, 153),
        ];
        assert_eq!(5 + REWIND_SLOTS, 261, "the batches cross each ring's last slot");
        let order: Vec<usize> = (0..context).collect();
        for kernels in Kernels::all_available() {
            for mode in [KvMode::F32, KvMode::F16] {
                for window in [5, 40] {
                    let layers = windowed(window);
                    let name = format!("{} {mode} window {window}", kernels.name);
                    let single = run_cache(&mut KvCache::new(mode, &c, context, &layers).unwrap(), kernels, &order);
                    let mut cache = KvCache::new(mode, &c, context, &layers).unwrap();
                    assert!(cache.attends_in_batches(0) && cache.attends_in_batches(1), "{name}");
                    let most = batches.iter().map(|b| b.1).max().unwrap();
                    let mut staging = vec![f32::NAN; batch_staging_len(mode, &layers, context, most, kv_dim).unwrap()];
                    let mut scratch = vec![0f32; Causal::scratch_len(context, head_dim).unwrap()];
                    let mut batched = vec![0f32; single.len()];
                    for (first, tokens) in batches {
                        for layer in 0..2 {
                            let positions = first..first + tokens;
                            let keys: Vec<f32> =
                                positions.clone().flat_map(|p| data(kv_dim, (p * 7 + layer) as u32)).collect();
                            let values: Vec<f32> =
                                positions.clone().flat_map(|p| data(kv_dim, (p * 7 + layer + 3) as u32)).collect();
                            cache.append_batch(kernels, layer, first, &keys, &values, &mut staging);
                            for kv in 0..2 {
                                let mut queries = vec![0f32; tokens * q_dim];
                                for (b, pos) in positions.clone().enumerate() {
                                    let group = &mut queries[b * q_dim + kv * heads_per_kv * head_dim..]
                                        [..heads_per_kv * head_dim];
                                    group.copy_from_slice(&data(heads_per_kv * head_dim, (pos * 5 + kv) as u32 + 99));
                                }
                                let mut out = vec![0f32; tokens * q_dim];
                                let heads = kv * heads_per_kv * head_dim
                                    ..(tokens - 1) * q_dim + (kv + 1) * heads_per_kv * head_dim;
                                let (queries, o) = (&queries[heads.clone()], &mut out[heads]);
                                cache.attend_batch(
                                    kernels,
                                    layer,
                                    kv,
                                    first,
                                    tokens,
                                    queries,
                                    q_dim,
                                    0.5,
                                    &staging,
                                    &mut scratch,
                                    o,
                                );
                                // run_cache's order: position, layer, KV head.
                                for (b, pos) in positions.clone().enumerate() {
                                    let at = ((pos * 2 + layer) * 2 + kv) * heads_per_kv * head_dim;
                                    let group =
                                        &out[b * q_dim + kv * heads_per_kv * head_dim..][..heads_per_kv * head_dim];
                                    batched[at..at + heads_per_kv * head_dim].copy_from_slice(group);
                                }
                            }
                        }
                    }
                    let worst = batched.iter().zip(&single).map(|(b, s)| (b - s).abs()).fold(0f32, f32::max);
                    eprintln!("{name}: worst difference {worst:.2e}");
                    assert!(worst <= BATCH_ORDER_TOLERANCE, "{name}: worst difference {worst} from a token at a time");
                }
            }
        }
        for mode in [KvMode::Q8, KvMode::Q4] {
            let cache = KvCache::new(mode, &c, 200, &windowed(40)).unwrap();
            assert!(!cache.attends_in_batches(0) && !cache.attends_in_batches(1), "{mode}");
        }
    }

    #[test]
    fn a_ring_attends_exactly_as_the_full_history_masked_to_the_window() {
        let c = config();
        let context = 200;
        let order: Vec<usize> = (0..context).collect();
        let per_position = 2 * 2 * 2 * 32;
        let windows = [5, 40, 100, 199];
        for kernels in Kernels::all_available() {
            let mut f32_rings = Vec::new();
            for mode in KvMode::ALL {
                let plain = run_cache(&mut KvCache::new(mode, &c, context, &[]).unwrap(), kernels, &order);
                // 5: no group of codes is ever seen (the f32 window covers it); 40: one group in the
                // ring; 100: three; 199: a window shorter than the context by one. The f32 and f16
                // rings (window + REWIND_SLOTS slots, at most the context) never turn here:
                // f32_and_f16_rings_that_turn_read_their_window_in_two_pieces turns them.
                for window in windows {
                    let layers = windowed(window);
                    let mut ring = KvCache::new(mode, &c, context, &layers).unwrap();
                    let got = run_cache(&mut ring, kernels, &order);
                    let mut full = KvCache::keeping_every_position(mode, &c, context, &layers).unwrap();
                    let masked = run_cache(&mut full, kernels, &order);
                    let name = format!("{} {mode} window {window}", kernels.name);
                    // Until the window first slides, the ring is the plain cache, bit for bit.
                    let inside = window as usize * per_position;
                    assert_eq!(got[..inside], plain[..inside], "{name}");
                    let worst = got.iter().zip(&masked).map(|(g, e)| (g - e).abs()).fold(0f32, f32::max);
                    assert!(worst <= RING_ORDER_TOLERANCE, "{name}: worst difference {worst} from the masked history");
                    // And the window matters: the global run differs once it slides.
                    assert!(got[inside..] != plain[inside..], "{name}: the window changed nothing");
                    // A quantized ring stays as close to the f32 ring as the codes allow (the bounds of
                    // quantized_attention_stays_close_to_f32_and_the_window_moves_a_group_at_a_time): a
                    // mask that let the positions before the window in would be far outside them.
                    if mode == KvMode::F32 {
                        f32_rings.push(got.clone());
                    } else if let Some(bound) = [(KvMode::Q8, 0.01), (KvMode::Q4, 0.15)].iter().find(|m| m.0 == mode) {
                        let exact = &f32_rings[windows.iter().position(|&w| w == window).unwrap()];
                        let worst = got.iter().zip(exact).map(|(g, e)| (g - e).abs()).fold(0f32, f32::max);
                        assert!(worst <= bound.1, "{name}: worst difference {worst} from the f32 ring");
                    }
                    // The float modes against the maths too (the quantized ones have the masked history).
                    if mode.bits().is_none() {
                        for pos in (0..context).step_by(3) {
                            let worst = from_the_maths(&got, pos, window as usize, mode);
                            assert!(
                                worst <= WINDOW_REFERENCE_TOLERANCE,
                                "{name} position {pos}: worst difference {worst}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The f32 and f16 rings once they turn (window + REWIND_SLOTS slots in a context of 600):
    /// the window's slots wrap past the ring's end and are read in two pieces. Against the same
    /// mode keeping the whole history and masking, and against the f64 maths. A window of 320
    /// also needs more scratch than the context's scores (attention_scores_len, which
    /// run_cache gives exactly).
    #[test]
    fn f32_and_f16_rings_that_turn_read_their_window_in_two_pieces() {
        let c = config();
        let context = 600;
        let order: Vec<usize> = (0..context).collect();
        for kernels in Kernels::all_available() {
            for mode in [KvMode::F32, KvMode::F16] {
                for window in [5, 320] {
                    let layers = windowed(window);
                    let slots = window as usize + REWIND_SLOTS;
                    let scratch = attention_scores_len(mode, &layers, context, 2, 32).unwrap();
                    assert!(slots < context && (window != 320 || scratch > 2 * context), "window {window}");
                    let got = run_cache(&mut KvCache::new(mode, &c, context, &layers).unwrap(), kernels, &order);
                    let mut full = KvCache::keeping_every_position(mode, &c, context, &layers).unwrap();
                    let masked = run_cache(&mut full, kernels, &order);
                    let name = format!("{} {mode} window {window}", kernels.name);
                    let worst = got.iter().zip(&masked).map(|(g, e)| (g - e).abs()).fold(0f32, f32::max);
                    assert!(worst <= RING_ORDER_TOLERANCE, "{name}: worst difference {worst} from the masked history");
                    // Positions before the turn, at it, and where the window wraps by a little and a lot.
                    for pos in [slots - 1, slots, slots + 1, slots + 20, context - 1] {
                        let worst = from_the_maths(&got, pos, window as usize, mode);
                        assert!(worst <= WINDOW_REFERENCE_TOLERANCE, "{name} position {pos}: worst difference {worst}");
                    }
                }
            }
        }
    }

    #[test]
    fn rewinds_are_exact_while_the_ring_holds_what_the_token_sees_and_refused_after() {
        let c = config();
        let kernels = Kernels::detect();
        let layers = windowed(100);
        for mode in KvMode::ALL {
            // The f32 and f16 rings hold 100 + REWIND_SLOTS = 356 slots: a context of 600 turns them.
            let (context, written) = match mode {
                KvMode::F32 | KvMode::F16 => (600, 590),
                KvMode::Q8 | KvMode::Q4 => (200, 190),
            };
            let mut ring = KvCache::new(mode, &c, context, &layers).unwrap();
            let mut full = KvCache::keeping_every_position(mode, &c, context, &layers).unwrap();
            // Before the ring turns every rewind is exact.
            let straight: Vec<usize> = (0..90).collect();
            run_cache(&mut ring, kernels, &straight);
            assert!((0..90).all(|pos| ring.can_rewind_to(pos)), "{mode}");
            run_cache(&mut ring, kernels, &(90..written).collect::<Vec<_>>());
            run_cache(&mut full, kernels, &(0..written).collect::<Vec<_>>());
            let deepest = match mode {
                // The slots hold 234..590: position p sees p − 99 ..= p, so 333 is the deepest
                // rewrite, REWIND_SLOTS + 1 below what is written.
                KvMode::F32 | KvMode::F16 => written - REWIND_SLOTS - 1,
                // Codes below 128 (pos 189 − 128 = 61 in the f32 window), three groups of the ring: 32..128
                // held, and position p sees p − 99 ..= p.
                KvMode::Q8 | KvMode::Q4 => 32 + 99,
            };
            assert!(ring.can_rewind_to(deepest) && !ring.can_rewind_to(deepest - 1), "{mode}");
            assert!(ring.can_rewind_to(0) && ring.can_rewind_to(written) && full.can_rewind_to(1), "{mode}");
            // A rewind the ring allows gives what the full history gives.
            let again: Vec<usize> = (deepest..context).collect();
            let got = run_cache(&mut ring, kernels, &again);
            let expected = run_cache(&mut full, kernels, &again);
            let worst = got.iter().zip(&expected).map(|(g, e)| (g - e).abs()).fold(0f32, f32::max);
            assert!(worst <= RING_ORDER_TOLERANCE, "{mode}: worst difference {worst} after a rewind to {deepest}");
            // A rewind to 0 starts the ring afresh: every rewind is exact again until it turns.
            run_cache(&mut ring, kernels, &[0, 1, 2]);
            assert!(ring.can_rewind_to(1), "{mode}");
        }
    }

    #[test]
    fn a_windowed_cache_holds_what_its_ring_needs_to_the_byte() {
        let c = config();
        let (context, window) = (608, 100);
        let layers = windowed(window);
        for mode in KvMode::ALL {
            let cache = KvCache::new(mode, &c, context, &layers).unwrap();
            assert_eq!(cache.bytes(), KvCache::bytes_for(mode, &c, context, &layers).unwrap(), "{mode}");
            assert_eq!(cache.allocated_bytes(), cache.bytes() + KvCache::bookkeeping_bytes(mode, &c), "{mode}");
            let global = KvCache::bytes_for(mode, &c, context, &[]).unwrap();
            let local = KvCache::bytes_for(mode, &c, context, &layers).unwrap();
            // One layer of 2 KV heads × 32 channels keeps 100 + REWIND_SLOTS positions of 608 (f32,
            // f16); the quantized caches keep three groups of codes (ring_groups(100)) of 19, and the
            // same f32 window.
            let (kv_dim, kv_heads) = (64, 2);
            let saved = match mode {
                KvMode::F32 => 2 * (608 - 100 - REWIND_SLOTS) * kv_dim * 4,
                KvMode::F16 => 2 * (608 - 100 - REWIND_SLOTS) * kv_dim * 2,
                KvMode::Q8 | KvMode::Q4 => {
                    let bits = mode.bits().unwrap() as usize;
                    let groups = 608 / KEY_GROUP - 3;
                    let keys = groups * kv_dim * (KEY_GROUP * bits / 8 + 2 + 2);
                    let values = groups * KEY_GROUP * (kv_dim * bits / 8 + kv_heads * (2 + 2));
                    keys + values
                }
            };
            assert_eq!(global - local, saved, "{mode}");
            // A window no shorter than the context keeps every position, and so does an f32 or f16
            // ring whose extra slots reach the context.
            assert_eq!(
                KvCache::bytes_for(mode, &c, 100, &layers).unwrap(),
                KvCache::bytes_for(mode, &c, 100, &[]).unwrap()
            );
            if mode.bits().is_none() {
                assert_eq!(
                    KvCache::bytes_for(mode, &c, 300, &layers).unwrap(),
                    KvCache::bytes_for(mode, &c, 300, &[]).unwrap()
                );
            }
        }
        assert_eq!(ring_groups(100), 3);
        assert_eq!((ring_groups(5), ring_groups(33), ring_groups(34), ring_groups(512)), (0, 0, 1, 15));
        let error = KvCache::bytes_for(KvMode::F32, &c, 64, &layers[..1]).unwrap_err().to_string();
        assert!(error.contains("1 layer windows") && error.contains("2 layers"), "{error}");
    }
}
