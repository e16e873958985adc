//! Key-channel pruning of the f32 KV cache ("ThinK: Thinner Key Cache by
//! Query-Driven Pruning", Xu et al. 2024; [`super::KvCache::enable_pruning`]).
//!
//! While the prompt runs, [`Pruning`] keeps each layer's squared queries of
//! the last [`PRUNE_QUERIES`] positions; [`Pruning::prune`] (called at the
//! first decode step) scores every key channel of every KV head by (mean
//! q_c² over those queries, summed over the heads sharing the KV head) ×
//! (mean k_c² over the prompt's keys), keeps the best ⌈(1 − R)·head_dim⌉ and
//! stores the prompt's keys compacted to them, in place. Scores against
//! those keys use the kept channels of the query only; keys written after it
//! keep every channel. Pruning and attending allocate nothing.

use super::{Attention, KvMode, LayerSlots, Shape};
use crate::buffers::filled_product;
use crate::error::{Error, Result};
use crate::kernels::attention::CachedVectors;

/// Positions whose queries score the key channels when the cache is pruned
/// (the last ones of the prompt: ThinK's observation window).
pub const PRUNE_QUERIES: usize = 32;

/// Key channels a head keeps when a share `ratio` of them is dropped: ⌈(1 − ratio)·head_dim⌉, at least one.
pub fn kept_channels(head_dim: usize, ratio: f32) -> usize {
    let kept = ((1.0 - ratio as f64) * head_dim as f64 - 1e-9).ceil() as usize;
    kept.clamp(1.min(head_dim), head_dim)
}

/// An error unless `ratio` is a share of key channels to drop that runs with `mode`.
/// Pruning compacts f32 keys in place and scores them with the f32 kernels: the
/// quantized caches (keys grouped over tokens) and the f16 cache (which would
/// need thin f16 keys and their kernels) refuse any ratio above 0.
pub fn check_prune(ratio: f32, mode: KvMode) -> Result<()> {
    if !(0.0..1.0).contains(&ratio) {
        return Err(Error::invalid(format!(
            "key-channel pruning of {ratio}: the share of key channels to drop must be at least 0 and below 1"
        )));
    }
    if ratio > 0.0 && mode != KvMode::F32 {
        return Err(Error::unsupported(format!(
            "key-channel pruning of {ratio} with the {} KV cache: pruning runs on the f32 cache only",
            mode.name()
        )));
    }
    Ok(())
}

/// Key-channel pruning's state and scratch, allocated by [`Pruning::new`].
///
/// A pruned layer stores its first `pruned` positions' keys thin and
/// position-major, the rest as before after them: position `t < pruned` at
/// `t·kv_heads·kept + kv_head·kept` (its kept channels, in channel order),
/// position `t ≥ pruned` at `pruned·kv_heads·kept + (t − pruned)·kv_dim`,
/// both from the layer's start.
pub(super) struct Pruning {
    pub(super) ratio: f32,
    pub(super) kept: usize,
    channels: Vec<usize>,     // the kept channels, ascending (layer, kv_head, kept)
    queries: Vec<f32>,        // Σ over a KV head's query heads of q_c², a ring (layer, PRUNE_QUERIES, kv_dim)
    pruned: Vec<usize>,       // positions stored thin (layer); 0: not pruned
    gathered: Vec<f32>,       // a group's queries at the kept channels (heads_per_kv, kept)
    split_scores: Vec<f32>,   // scores of the thin part, then of the full part (heads_per_kv, context)
    channel_scores: Vec<f32>, // one head's channel scores (head_dim)
    order: Vec<usize>,        // channels by score (head_dim)
}

impl Pruning {
    /// Pruning of a share `ratio` (above 0, checked with [`check_prune`]) of
    /// each head's key channels, for a cache of this shape.
    pub(super) fn new(shape: &Shape, ratio: f32) -> Result<Self> {
        let (layers, kv_heads, head_dim) = (shape.layers, shape.kv_heads, shape.head_dim);
        let kept = kept_channels(head_dim, ratio);
        let mut channels = filled_product("pruned key channels", &[layers, kv_heads, kept], 0)?;
        for (i, channel) in channels.iter_mut().enumerate() {
            *channel = i % kept;
        }
        Ok(Self {
            ratio,
            kept,
            channels,
            queries: filled_product("pruning queries", &[layers, PRUNE_QUERIES, shape.kv_dim()], 0.0)?,
            pruned: vec![0; layers],
            gathered: filled_product("pruning query channels", &[shape.heads_per_kv, kept], 0.0)?,
            split_scores: filled_product("pruning scores", &[shape.heads_per_kv, shape.context], 0.0)?,
            channel_scores: vec![0.0; head_dim],
            order: vec![0; head_dim],
        })
    }

    /// Bytes [`Pruning::new`] allocates for these arguments (0 for a ratio of 0).
    pub(super) fn bytes_for(shape: &Shape, ratio: f32) -> usize {
        if ratio == 0.0 {
            return 0;
        }
        let (layers, kv_heads, head_dim) = (shape.layers, shape.kv_heads, shape.head_dim);
        let kept = kept_channels(head_dim, ratio);
        4 * (layers * PRUNE_QUERIES * kv_heads * head_dim + shape.heads_per_kv * (kept + shape.context) + head_dim)
            + std::mem::size_of::<usize>() * (layers * kv_heads * kept + layers + head_dim)
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        4 * (self.queries.len() + self.gathered.len() + self.split_scores.len() + self.channel_scores.len())
            + std::mem::size_of::<usize>() * (self.channels.len() + self.pruned.len() + self.order.len())
    }

    /// Bytes of every buffer, counted from the buffers themselves.
    #[cfg(test)]
    pub(super) fn allocated_bytes(&self) -> usize {
        use std::mem::size_of_val;
        size_of_val(&self.channels[..])
            + size_of_val(&self.queries[..])
            + size_of_val(&self.pruned[..])
            + size_of_val(&self.gathered[..])
            + size_of_val(&self.split_scores[..])
            + size_of_val(&self.channel_scores[..])
            + size_of_val(&self.order[..])
    }

    /// Writes every page of the larger buffers ([`super::commit_pages`]).
    pub(super) fn commit_memory(&mut self) {
        super::commit_pages(&mut self.queries);
        super::commit_pages(&mut self.channels);
        super::commit_pages(&mut self.gathered);
        super::commit_pages(&mut self.split_scores);
    }

    /// Positions of layer `layer` whose keys are stored thin.
    pub(super) fn pruned_positions(&self, layer: usize) -> usize {
        self.pruned[layer]
    }

    /// The channels KV head `kv_head` of layer `layer` keeps for its thin positions.
    pub(super) fn channels(&self, shape: &Shape, layer: usize, kv_head: usize) -> &[usize] {
        &self.channels[(layer * shape.kv_heads + kv_head) * self.kept..][..self.kept]
    }

    /// Where position `pos`'s key goes, from the layer's start: after the
    /// thin keys, full width. Writing below the pruned positions rewinds
    /// them to `pos` (the keys before it stay thin, where they are).
    pub(super) fn key_offset(&mut self, shape: &Shape, layer: usize, pos: usize) -> usize {
        self.pruned[layer] = self.pruned[layer].min(pos);
        let pruned = self.pruned[layer];
        pruned * shape.kv_heads * self.kept + (pos - pruned) * shape.kv_dim()
    }

    /// Records the queries of position `pos` of layer `layer` (`n_heads ×
    /// head_dim`, after RoPE) for the channel scores, while the layer is not
    /// yet pruned.
    pub(super) fn observe(&mut self, shape: &Shape, layer: usize, pos: usize, queries: &[f32]) {
        let (kv_dim, head_dim, heads_per_kv) = (shape.kv_dim(), shape.head_dim, shape.heads_per_kv);
        if self.pruned[layer] > 0 {
            return;
        }
        let slot = &mut self.queries[(layer * PRUNE_QUERIES + pos % PRUNE_QUERIES) * kv_dim..][..kv_dim];
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

    /// Ends the prefill: each layer not pruned yet, with positions written
    /// (`written`, a layer), has its key channels scored and its written keys
    /// (in `keys`, each layer's positions where `layers` says) stored with
    /// the kept channels only. Windowed layers are left whole. Once per
    /// conversation: a layer is pruned again only after a rewind to position
    /// 0. Allocates nothing.
    pub(super) fn prune(&mut self, shape: &Shape, layers: &[LayerSlots], keys: &mut [f32], written: &[usize]) {
        let (kv_dim, head_dim, kv_heads) = (shape.kv_dim(), shape.head_dim, shape.kv_heads);
        let kept = self.kept;
        for (layer, (&written, at)) in written.iter().zip(layers).enumerate() {
            if written == 0 || self.pruned[layer] > 0 || at.window != 0 {
                continue;
            }
            let base = at.first_slot * kv_dim;
            let observed = written.min(PRUNE_QUERIES);
            for kv in 0..kv_heads {
                // Channel scores: mean q_c² over the observed queries × mean k_c² over the keys.
                for (c, score) in self.channel_scores.iter_mut().enumerate() {
                    let mut queries = 0f64;
                    for t in written - observed..written {
                        queries += self.queries
                            [(layer * PRUNE_QUERIES + t % PRUNE_QUERIES) * kv_dim + kv * head_dim + c]
                            as f64;
                    }
                    let mut squares = 0f64;
                    for t in 0..written {
                        let k = keys[base + t * kv_dim + kv * head_dim + c] as f64;
                        squares += k * k;
                    }
                    *score = (queries / observed as f64 * squares / written as f64) as f32;
                }
                // The best `kept`, ties to the lower channel; then in channel order.
                for (c, o) in self.order.iter_mut().enumerate() {
                    *o = c;
                }
                let scores = &self.channel_scores;
                self.order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                let channels = &mut self.channels[(layer * kv_heads + kv) * kept..][..kept];
                channels.copy_from_slice(&self.order[..kept]);
                channels.sort_unstable();
            }
            // Compact in place, position-major: position t, head kv, kept channel i goes to
            // t·kv_heads·kept + kv·kept + i ≤ t·kv_dim + kv·head_dim + channel, where it was:
            // every write lands at or below its read and above every earlier write.
            for t in 0..written {
                for kv in 0..kv_heads {
                    let channels = &self.channels[(layer * kv_heads + kv) * kept..][..kept];
                    for (i, &c) in channels.iter().enumerate() {
                        keys[base + (t * kv_heads + kv) * kept + i] = keys[base + t * kv_dim + kv * head_dim + c];
                    }
                }
            }
            self.pruned[layer] = written;
        }
    }

    /// Attention over a pruned layer of the f32 cache (`keys` and `values`,
    /// `(layer, slots, kv_dim)`): the queries' kept channels against the
    /// thin keys, every channel against the keys after them, one softmax
    /// over both, then the values.
    pub(super) fn attend(
        &mut self,
        shape: &Shape,
        (keys, values): (&[f32], &[f32]),
        call: &Attention,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let (kv_dim, head_dim, kv_heads) = (shape.kv_dim(), shape.head_dim, shape.kv_heads);
        let Attention { kernels, layer, at, kv_head, queries, scale, seen } = *call;
        let (kept, pruned) = (self.kept, self.pruned[layer]);
        let heads = queries.len() / head_dim;
        let recent = seen - pruned;
        let scores = &mut scores[..heads * seen];
        let base = at.first_slot * kv_dim;
        // Gather each query's kept channels.
        let channels = &self.channels[(layer * kv_heads + kv_head) * kept..][..kept];
        let gathered = &mut self.gathered[..heads * kept];
        for (query, thin) in queries.chunks_exact(head_dim).zip(gathered.chunks_exact_mut(kept)) {
            for (g, &c) in thin.iter_mut().zip(channels) {
                *g = query[c];
            }
        }
        // Scores of the thin keys (stride kv_heads·kept), then of the full ones after them.
        let thin_stride = kv_heads * kept;
        let thin_start = base + kv_head * kept;
        let thin_keys = &keys[thin_start..thin_start + (pruned - 1) * thin_stride + kept];
        let split = &mut self.split_scores[..heads * pruned];
        let thin_keys = CachedVectors { data: thin_keys, stride: thin_stride, positions: pruned };
        (kernels.attention_scores)(gathered, kept, &thin_keys, scale, split);
        for (row, part) in scores.chunks_exact_mut(seen).zip(split.chunks_exact(pruned)) {
            row[..pruned].copy_from_slice(part);
        }
        let full_start = base + pruned * thin_stride + kv_head * head_dim;
        let full_keys = &keys[full_start..full_start + (recent - 1) * kv_dim + head_dim];
        let split = &mut self.split_scores[..heads * recent];
        let full_keys = CachedVectors { data: full_keys, stride: kv_dim, positions: recent };
        (kernels.attention_scores)(queries, head_dim, &full_keys, scale, split);
        for (row, part) in scores.chunks_exact_mut(seen).zip(split.chunks_exact(recent)) {
            row[pruned..].copy_from_slice(part);
            (kernels.softmax)(row);
        }
        // Values keep every channel, at their positions.
        let value_start = base + kv_head * head_dim;
        let values = &values[value_start..value_start + (seen - 1) * kv_dim + head_dim];
        let values = CachedVectors { data: values, stride: kv_dim, positions: seen };
        (kernels.attention_values)(scores, &values, head_dim, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Kernels;
    use crate::kv::tests::{config, data};
    use crate::kv::KvCache;

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
        let mut cache = KvCache::new(KvMode::F32, &c, 128, &[]).unwrap();
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
                cache.append(kernels, layer, pos, &key, &value);
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
        let mut cache = KvCache::new(KvMode::F32, &c, 64, &[]).unwrap();
        cache.enable_pruning(0.5).unwrap();
        let (key, query) = (data(64, 1), data(128, 2));
        let kernels = Kernels::detect();
        for pos in 0..10 {
            for layer in 0..2 {
                cache.observe_queries(layer, pos, &query);
                cache.append(kernels, layer, pos, &key, &key);
            }
        }
        cache.prune();
        assert_eq!(cache.pruned_positions(1), 10);
        let (used, full) = cache.key_bytes_in_use();
        assert_eq!((used, full), (2 * 10 * 2 * 16 * 4, 2 * 10 * 64 * 4));
        cache.prune();
        assert_eq!(cache.pruned_positions(1), 10, "pruned once");
        for layer in 0..2 {
            cache.append(kernels, layer, 0, &key, &key);
        }
        assert_eq!(cache.pruned_positions(1), 0);
        for pos in 1..5 {
            for layer in 0..2 {
                cache.append(kernels, layer, pos, &key, &key);
            }
        }
        cache.prune();
        assert_eq!(cache.pruned_positions(0), 5);
    }

    #[test]
    fn prune_ratios_outside_zero_to_one_and_quantized_and_f16_caches_are_refused() {
        for bad in [-0.1, 1.0, 1.5, f32::NAN] {
            let error = check_prune(bad, KvMode::F32).unwrap_err().to_string();
            assert!(error.contains("pruning") && error.contains("below 1"), "{error}");
        }
        for (mode, name) in [(KvMode::Q4, "q4 KV cache"), (KvMode::F16, "f16 KV cache")] {
            let error = check_prune(0.5, mode).unwrap_err().to_string();
            assert!(error.contains(name) && error.contains("f32 cache only"), "{error}");
            // Refused where the state is made too, not only by the front ends' check.
            let mut cache = KvCache::new(mode, &config(), 64, &[]).unwrap();
            let error = cache.enable_pruning(0.5).unwrap_err().to_string();
            assert!(error.contains(name), "{error}");
            assert!(cache.enable_pruning(0.0).is_ok() && cache.prune_ratio() == 0.0);
        }
        assert!(check_prune(0.0, KvMode::Q8).is_ok());
        assert_eq!((kept_channels(64, 0.5), kept_channels(64, 0.3), kept_channels(64, 0.0)), (32, 45, 64));
        assert_eq!(kept_channels(64, 0.999), 1);
        let c = config();
        let mut cache = KvCache::new(KvMode::F32, &c, 100, &[]).unwrap();
        let before = cache.bytes();
        cache.enable_pruning(0.25).unwrap();
        assert_eq!(cache.bytes() - before, KvCache::pruning_bytes_for(&c, 100, 0.25));
    }
}
