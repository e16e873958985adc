//! SplitMix64, the one small seeded generator of the workspace: the
//! sampler's draws, the synthetic models' weights, calibration's searches
//! and the tests' random inputs all come from it. No dependency, and the same
//! numbers on every machine, so a seed names a run.

/// SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number
/// generators", 2014): a 64-bit counter stepped by the golden gamma and
/// mixed. The field is the state; `SplitMix64(seed)` starts a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The counter's step: 2⁶⁴ / φ, odd.
    pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GOLDEN_GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) from the top 24 bits: every value is an exact f32.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [−1, 1) from the top 24 bits.
    pub fn next_signed(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Uniform in (0, 1) from the top 53 bits: never 0, so its logarithm is finite.
    pub fn next_open_f64(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    #[test]
    fn the_sequence_is_the_reference_one() {
        // The reference implementation's first outputs for seed 0 (as in
        // Vigna's splitmix64.c and Java's SplittableRandom).
        let mut rng = SplitMix64(0);
        assert_eq!(
            [rng.next_u64(), rng.next_u64(), rng.next_u64()],
            [0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F]
        );
    }

    #[test]
    fn the_floats_stay_in_their_ranges() {
        let mut rng = SplitMix64(0x5EED);
        for _ in 0..10_000 {
            assert!((0.0..1.0).contains(&rng.next_f32()));
            assert!((-1.0..1.0).contains(&rng.next_signed()));
            let open = rng.next_open_f64();
            assert!(open > 0.0 && open < 1.0);
        }
    }
}
