//! Choosing the next token from logits: greedy, or temperature with top-k,
//! top-p and min-p, after a repetition penalty, from a seeded generator.
//! Every buffer is allocated in [`Sampler::new`]; sampling allocates nothing.

use crate::rng::SplitMix64;

/// Sampling settings. The defaults are llama.cpp's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// 0 (or less) is greedy: always the most likely token.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0: none).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recent tokens by this (1: off).
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }
}

/// A token sampler with its own preallocated buffers and random state.
pub struct Sampler {
    /// Settings.
    pub config: SamplerConfig,
    rng: SplitMix64,
    candidates: Vec<(f32, u32)>,
    recent: Vec<u32>,
    recent_next: usize,
    recent_len: usize,
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab_size` tokens.
    pub fn new(vocab_size: usize, config: SamplerConfig) -> Self {
        Self {
            config,
            rng: SplitMix64(config.seed),
            candidates: Vec::with_capacity(vocab_size),
            recent: vec![0; config.repeat_last_n.max(1)],
            recent_next: 0,
            recent_len: 0,
        }
    }

    /// Forgets recent tokens and restarts the random sequence from the seed.
    pub fn reset(&mut self) {
        self.rng = SplitMix64(self.config.seed);
        self.recent_len = 0;
        self.recent_next = 0;
    }

    /// Records a token (prompt or generated) for the repetition penalty.
    pub fn accept(&mut self, token: u32) {
        let n = self.recent.len();
        self.recent[self.recent_next] = token;
        self.recent_next = (self.recent_next + 1) % n;
        self.recent_len = (self.recent_len + 1).min(n);
    }

    /// Picks the next token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let c = self.config;
        let penalized = c.repetition_penalty != 1.0 && c.repetition_penalty > 0.0;
        if c.temperature <= 0.0 && !penalized {
            return greatest(logits);
        }
        self.candidates.clear();
        self.candidates.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));

        // Repetition penalty on recently seen tokens (each once, as llama.cpp).
        if penalized {
            for i in 0..self.recent_len {
                let token = self.recent[i] as usize;
                let seen_before = self.recent[..i].contains(&self.recent[i]);
                if token < self.candidates.len() && !seen_before {
                    let logit = &mut self.candidates[token].0;
                    *logit = if *logit > 0.0 { *logit / c.repetition_penalty } else { *logit * c.repetition_penalty };
                }
            }
        }

        // Greedy: the highest logit, lowest id on ties.
        let best = |candidates: &[(f32, u32)]| {
            candidates.iter().fold((f32::NEG_INFINITY, 0u32), |b, &(l, i)| if l > b.0 { (l, i) } else { b }).1
        };
        if c.temperature <= 0.0 {
            return best(&self.candidates);
        }

        // Top-k: move the k best to the front, then sort just those.
        let descending = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let k = if c.top_k == 0 { self.candidates.len() } else { c.top_k.min(self.candidates.len()) };
        if k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, descending);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(descending);

        // Softmax at the temperature.
        let max = self.candidates[0].0;
        let mut sum = 0f32;
        for candidate in self.candidates.iter_mut() {
            candidate.0 = ((candidate.0 - max) / c.temperature).exp();
            sum += candidate.0;
        }
        for candidate in self.candidates.iter_mut() {
            candidate.0 /= sum;
        }

        // Min-p, then top-p, always keeping the most likely token.
        let floor = c.min_p * self.candidates[0].0;
        let mut keep = self.candidates.iter().take_while(|cand| cand.0 >= floor).count().max(1);
        if c.top_p < 1.0 {
            let mut cumulative = 0f32;
            for (i, candidate) in self.candidates[..keep].iter().enumerate() {
                cumulative += candidate.0;
                if cumulative >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        self.candidates.truncate(keep);

        // Draw.
        let total: f32 = self.candidates.iter().map(|cand| cand.0).sum();
        let mut target = self.rng.next_f32() * total;
        for &(p, id) in &self.candidates {
            target -= p;
            if target < 0.0 {
                return id;
            }
        }
        self.candidates[keep - 1].1
    }
}

/// The index of the highest value, the lowest index on ties; NaN is never
/// chosen and 0 comes back when nothing beats −∞ (as a fold with `>` from
/// (−∞, 0) would). Greedy decoding runs it over the whole vocabulary every
/// token: lane-wise maxima over blocks of 64 (which vectorize), then a scan
/// of the one block that holds the winner.
pub fn greatest(values: &[f32]) -> u32 {
    const BLOCK: usize = 64;
    const LANES: usize = 8;
    let (mut best, mut best_block) = (f32::NEG_INFINITY, None);
    for (b, block) in values.chunks(BLOCK).enumerate() {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let chunks = block.chunks_exact(LANES);
        let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        for chunk in chunks {
            for (m, &v) in lanes.iter_mut().zip(chunk) {
                *m = m.max(v);
            }
        }
        let block_max = lanes.iter().fold(tail, |m, &v| m.max(v));
        if block_max > best {
            (best, best_block) = (block_max, Some(b));
        }
    }
    let Some(b) = best_block else { return 0 };
    let start = b * BLOCK;
    let within = values[start..].iter().position(|&v| v == best).expect("the block holds its maximum");
    (start + within) as u32
}

#[cfg(test)]
mod tests {
    #[test]
    fn greatest_is_the_first_highest_and_skips_nan() {
        let fold = |v: &[f32]| {
            v.iter().enumerate().fold((f32::NEG_INFINITY, 0u32), |b, (i, &l)| if l > b.0 { (l, i as u32) } else { b }).1
        };
        let mut seed = 7u32;
        for len in [0, 1, 5, 63, 64, 65, 200, 4097] {
            for case in 0..6 {
                let v: Vec<f32> = (0..len)
                    .map(|i| {
                        seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                        match (case, i % 7) {
                            (1, _) => 3.0,                   // all tied
                            (2, 0) => f32::NAN,              // NaNs among values
                            (3, _) => f32::NEG_INFINITY,     // nothing beats −∞
                            (4, _) => f32::NAN,              // all NaN
                            _ => ((seed >> 16) % 50) as f32, // many ties
                        }
                    })
                    .collect();
                assert_eq!(super::greatest(&v), fold(&v), "length {len} case {case}");
            }
        }
    }

    use super::*;

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut sampler = Sampler::new(4, SamplerConfig::greedy());
        assert_eq!(sampler.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn repetition_penalty_can_change_the_greedy_choice() {
        let mut sampler = Sampler::new(3, SamplerConfig { repetition_penalty: 2.0, ..SamplerConfig::greedy() });
        sampler.accept(0);
        assert_eq!(sampler.sample(&[3.0, 2.0, 0.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 7919) % 101) as f32 / 10.0).collect();
        let config = SamplerConfig { temperature: 1.0, seed: 42, ..SamplerConfig::default() };
        let draw = |config| {
            let mut s = Sampler::new(100, config);
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(config), draw(config));
        assert_ne!(draw(config), draw(SamplerConfig { seed: 43, ..config }), "different seeds should differ somewhere");
        let top1 = draw(SamplerConfig { top_k: 1, ..config });
        let argmax = Sampler::new(100, SamplerConfig::greedy()).sample(&logits);
        assert!(top1.iter().all(|&t| t == argmax));
    }

    /// Tokens a seed draws, recorded before the generator moved to
    /// [`crate::rng`]: a seed must go on drawing the same sequence.
    #[test]
    fn a_seed_draws_the_tokens_it_always_has() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 7919) % 101) as f32 / 10.0).collect();
        let config =
            SamplerConfig { temperature: 1.5, top_k: 0, top_p: 1.0, min_p: 0.0, seed: 42, ..Default::default() };
        let mut sampler = Sampler::new(100, config);
        let drawn: Vec<u32> = (0..24).map(|_| sampler.sample(&logits)).collect();
        sampler.reset();
        let again: Vec<u32> = (0..24).map(|_| sampler.sample(&logits)).collect();
        assert_eq!(again, drawn, "reset restarts the sequence from the seed");
        let expected = [66, 96, 59, 22, 32, 51, 27, 61, 22, 76, 27, 49, 49, 49, 39, 27, 64, 49, 64, 71, 90, 64, 44, 76];
        assert_eq!(drawn, expected);
    }

    #[test]
    fn samples_follow_the_distribution() {
        // Two tokens with probabilities 0.25 and 0.75 at temperature 1.
        let logits = [0.0, 3f32.ln()];
        let config =
            SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: 7, ..Default::default() };
        let mut sampler = Sampler::new(2, config);
        let ones = (0..10_000).filter(|_| sampler.sample(&logits) == 1).count();
        assert!((7_200..7_800).contains(&ones), "{ones} of 10000 draws were token 1");
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        let logits = [5.0, 4.9, -10.0, -10.0];
        for config in [
            SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.5, seed: 1, ..Default::default() },
            SamplerConfig { temperature: 1.0, top_k: 0, top_p: 0.9, min_p: 0.0, seed: 1, ..Default::default() },
        ] {
            let mut sampler = Sampler::new(4, config);
            assert!((0..2000).all(|_| sampler.sample(&logits) < 2));
        }
    }
}
