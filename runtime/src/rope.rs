//! RoPE frequency scaling: the per-pair factors by which Llama-3.x (and
//! linear scaling) divide RoPE's frequencies, the image's `rope_scaling`
//! section that carries them (layout in `models/FORMAT.md`), and the
//! tables of angles built from them at load.
//!
//! Plain RoPE turns pair `i` of a head at position `pos` by
//! `θ_i = pos · base^(−2i/rope_dim)`. A scaled model turns it by
//! `θ_i = pos · base^(−2i/rope_dim) / factor_i`; nothing else in the forward
//! pass changes, and the factors are applied once, when the tables are made.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use bytemuck::{Pod, Zeroable};

/// The section's name.
pub const SECTION: &str = "rope_scaling";
/// The section version this code reads and writes.
pub const VERSION: u32 = 1;

/// Where the factors came from. Both kinds mean the same to the forward pass
/// (each pair's frequency divided by its factor); a later kind that needs
/// more than factors (YaRN's attention scaling) gets a new number, which
/// this reader refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalingKind {
    /// Llama-3.x (`rope_type: "llama3"`): high frequencies kept, low ones
    /// divided by `factor`, a smooth ramp between.
    Llama3,
    /// Linear (position interpolation): every frequency divided by `factor`.
    Linear,
}

impl ScalingKind {
    /// The number stored in the section.
    pub fn id(self) -> u32 {
        match self {
            ScalingKind::Llama3 => 1,
            ScalingKind::Linear => 2,
        }
    }
    /// The kind numbered `id`, if this reader knows it.
    pub fn from_id(id: u32) -> Option<Self> {
        match id {
            1 => Some(ScalingKind::Llama3),
            2 => Some(ScalingKind::Linear),
            _ => None,
        }
    }
    /// The name Hugging Face's `rope_type` gives it.
    pub fn name(self) -> &'static str {
        match self {
            ScalingKind::Llama3 => "llama3",
            ScalingKind::Linear => "linear",
        }
    }
}

/// The fixed part of the `rope_scaling` section; `n_factors` f32 follow it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct RopeScalingHeader {
    /// [`VERSION`].
    pub version: u32,
    /// [`ScalingKind::id`].
    pub kind: u32,
    /// `rope_dim / 2`: one factor a rotated pair.
    pub n_factors: u32,
    /// Zero.
    pub reserved: [u32; 5],
}
const _: () = assert!(std::mem::size_of::<RopeScalingHeader>() == 32);

/// The per-pair frequency factors of a model, as the image carries them.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeScaling {
    /// Where they came from.
    pub kind: ScalingKind,
    /// Pair `i`'s frequency is divided by `factors[i]` (`rope_dim / 2` of them, finite, > 0).
    pub factors: Vec<f32>,
}

impl RopeScaling {
    /// Checks the factors against a model of `config`: one a pair, each finite and positive.
    pub fn check(&self, config: &ModelConfig) -> Result<()> {
        check_factors(&self.factors, config.rope_dim)
    }

    /// Linear scaling by `factor` for a model of `rope_dim` rotated dimensions.
    pub fn linear(factor: f32, rope_dim: u32) -> Result<Self> {
        if !(factor.is_finite() && factor > 0.0) {
            return Err(Error::invalid(format!("linear RoPE scaling: factor {factor} is not a positive number")));
        }
        Ok(Self { kind: ScalingKind::Linear, factors: vec![factor; rope_dim as usize / 2] })
    }

    /// Reads a `rope_scaling` section for a model of `config`, refusing an
    /// unknown version or kind by its number and factors that do not fit.
    pub fn from_section(bytes: &[u8], config: &ModelConfig) -> Result<Self> {
        let fail = |what: String| Error::corrupt(format!("section {SECTION}: {what}"));
        let header_size = std::mem::size_of::<RopeScalingHeader>();
        if bytes.len() < header_size {
            return Err(fail(format!("{} bytes is too short for its {header_size}-byte header", bytes.len())));
        }
        let header: RopeScalingHeader = bytemuck::pod_read_unaligned(&bytes[..header_size]);
        if header.version != VERSION {
            return Err(Error::unsupported(format!(
                "section {SECTION}: version {} is unknown to this reader (it knows {VERSION}); upgrade Bramble",
                header.version
            )));
        }
        let kind = ScalingKind::from_id(header.kind).ok_or_else(|| {
            Error::unsupported(format!(
                "section {SECTION}: scaling kind {} is unknown to this reader (it knows 1 llama3, 2 linear); \
                 upgrade Bramble",
                header.kind
            ))
        })?;
        let expected = header_size + 4 * header.n_factors as usize;
        if bytes.len() != expected {
            return Err(fail(format!("{} bytes, but {} factors take {expected}", bytes.len(), header.n_factors)));
        }
        let factors: Vec<f32> =
            bytes[header_size..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        check_factors(&factors, config.rope_dim).map_err(|e| fail(e.message().to_string()))?;
        Ok(Self { kind, factors })
    }

    /// The section's bytes.
    pub fn to_section(&self) -> Vec<u8> {
        let header = RopeScalingHeader {
            version: VERSION,
            kind: self.kind.id(),
            n_factors: self.factors.len() as u32,
            reserved: [0; 5],
        };
        let mut bytes = bytemuck::bytes_of(&header).to_vec();
        for factor in &self.factors {
            bytes.extend_from_slice(&factor.to_le_bytes());
        }
        bytes
    }
}

/// Checks RoPE factors for a model of `rope_dim` rotated dimensions:
/// `rope_dim / 2` of them, each finite and positive.
pub fn check_factors(factors: &[f32], rope_dim: u32) -> Result<()> {
    let pairs = rope_dim as usize / 2;
    if factors.len() != pairs {
        return Err(Error::invalid(format!(
            "{} RoPE factors for rope_dim {rope_dim}, expected {pairs} (one a pair)",
            factors.len()
        )));
    }
    if let Some((i, factor)) = factors.iter().enumerate().find(|(_, f)| !(f.is_finite() && **f > 0.0)) {
        return Err(Error::invalid(format!("RoPE factor {i} is {factor}, not a positive number")));
    }
    Ok(())
}

/// Llama-3.x's `rope_scaling` parameters (`rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Params {
    /// What the lowest frequencies are divided by (8 in Llama-3.1).
    pub factor: f32,
    /// Wavelengths above `original_context_length / low_freq_factor` are divided by `factor`.
    pub low_freq_factor: f32,
    /// Wavelengths below `original_context_length / high_freq_factor` are kept.
    pub high_freq_factor: f32,
    /// The context the model was first trained for (8192 in Llama-3.1).
    pub original_context_length: u32,
}

impl Llama3Params {
    /// Checks that the parameters define factors: all positive and finite,
    /// `high_freq_factor > low_freq_factor` (the ramp between them divides by
    /// their difference).
    pub fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::invalid(format!("llama3 RoPE scaling: {what}")));
        for (name, value) in [
            ("factor", self.factor),
            ("low_freq_factor", self.low_freq_factor),
            ("high_freq_factor", self.high_freq_factor),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return bad(format!("{name} {value} is not a positive number"));
            }
        }
        if self.high_freq_factor <= self.low_freq_factor {
            return bad(format!(
                "high_freq_factor {} is not above low_freq_factor {}",
                self.high_freq_factor, self.low_freq_factor
            ));
        }
        if self.original_context_length == 0 {
            return bad("original_max_position_embeddings is 0".into());
        }
        Ok(())
    }

    /// The per-pair factors for RoPE base `rope_theta` over `rope_dim`
    /// dimensions, as llama.cpp's converter computes `rope_freqs.weight`
    /// (`LlamaModel.generate_extra_tensors`; here in f64, rounded once).
    pub fn scaling(&self, rope_theta: f32, rope_dim: u32) -> Result<RopeScaling> {
        self.check()?;
        let (factor, low, high) = (self.factor as f64, self.low_freq_factor as f64, self.high_freq_factor as f64);
        let old_context = self.original_context_length as f64;
        let (low_freq_wavelength, high_freq_wavelength) = (old_context / low, old_context / high);
        let factors = (0..rope_dim as usize / 2)
            .map(|i| {
                let frequency = (rope_theta as f64).powf(-((2 * i) as f64) / rope_dim as f64);
                let wavelength = 2.0 * std::f64::consts::PI / frequency;
                let value = if wavelength < high_freq_wavelength {
                    1.0
                } else if wavelength > low_freq_wavelength {
                    factor
                } else {
                    let smooth = (old_context / wavelength - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                value as f32
            })
            .collect();
        Ok(RopeScaling { kind: ScalingKind::Llama3, factors })
    }
}

/// Fills the RoPE tables of `config` for positions `0 .. cos.len() / pairs`:
/// `cos[pos · pairs + i] = cos(θ)`, `sin[…] = sin(θ)` with
/// `θ = pos · base^(−2i/rope_dim) / factors[i]` (factor 1 without
/// `factors`), computed in f64 so long contexts keep their precision.
pub fn fill_tables(config: &ModelConfig, factors: Option<&[f32]>, cos: &mut [f32], sin: &mut [f32]) {
    let pairs = config.rope_dim as usize / 2;
    assert!(
        cos.len() == sin.len() && factors.is_none_or(|f| f.len() == pairs),
        "RoPE tables: {} cosines, {} sines, {:?} factors for {pairs} pairs",
        cos.len(),
        sin.len(),
        factors.map(<[f32]>::len)
    );
    if pairs == 0 {
        return;
    }
    for i in 0..pairs {
        let base = (config.rope_theta as f64).powf(-((2 * i) as f64) / config.rope_dim as f64);
        let frequency = base / factors.map_or(1.0, |f| f[i] as f64);
        for (pos, (c, s)) in
            cos.iter_mut().skip(i).step_by(pairs).zip(sin.iter_mut().skip(i).step_by(pairs)).enumerate()
        {
            let angle = pos as f64 * frequency;
            *c = angle.cos() as f32;
            *s = angle.sin() as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ARCH_LLAMA;
    use crate::error::ErrorKind;

    /// Llama-3.1-8B's RoPE: base 500000, 128 dimensions, and its `rope_scaling`.
    const LLAMA31: Llama3Params =
        Llama3Params { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_context_length: 8192 };

    fn config(rope_dim: u32, rope_theta: f32) -> ModelConfig {
        let mut c = ModelConfig::zeroed();
        c.arch = ARCH_LLAMA;
        (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) = (64, 1, 4, 2, rope_dim, 160);
        (c.vocab_size, c.context_length, c.rope_theta, c.rope_dim, c.norm_eps) = (300, 128, rope_theta, rope_dim, 1e-5);
        c
    }

    /// Llama-3.1-8B's factors against values computed apart from this code
    /// (numpy, float64, from the formula in llama.cpp's converter): pairs 0–28
    /// kept, 29–34 on the ramp, 35–63 divided by 8.
    #[test]
    fn llama31_factors_match_the_converters_formula() {
        let factors = LLAMA31.scaling(500000.0, 128).unwrap().factors;
        assert_eq!(factors.len(), 64);
        let expected = [
            (0, 1.0),
            (28, 1.0),
            (29, 1.207_483_9),
            (31, 2.026_313_3),
            (33, 3.684_252_5),
            (34, 5.257_326_6),
            (35, 8.0),
            (63, 8.0),
        ];
        for (i, value) in expected {
            assert!((factors[i] - value).abs() <= 1e-5 * value, "pair {i}: {} against {value}", factors[i]);
        }
        // Non-decreasing from the highest frequency to the lowest.
        assert!(factors.windows(2).all(|w| w[0] <= w[1]), "{factors:?}");
    }

    #[test]
    fn bad_parameters_are_named() {
        for (params, part) in [
            (Llama3Params { factor: 0.0, ..LLAMA31 }, "factor 0"),
            (Llama3Params { low_freq_factor: f32::NAN, ..LLAMA31 }, "low_freq_factor NaN"),
            (Llama3Params { high_freq_factor: 1.0, ..LLAMA31 }, "high_freq_factor 1 is not above"),
            (Llama3Params { original_context_length: 0, ..LLAMA31 }, "original_max_position_embeddings"),
        ] {
            let error = params.scaling(500000.0, 128).unwrap_err().to_string();
            assert!(error.contains(part), "{part}: {error}");
        }
        assert!(RopeScaling::linear(-2.0, 16).unwrap_err().to_string().contains("factor -2"));
    }

    #[test]
    fn the_section_round_trips_and_refuses_what_it_does_not_know() {
        let c = config(16, 10000.0);
        let scaling = LLAMA31.scaling(c.rope_theta, c.rope_dim).unwrap();
        let bytes = scaling.to_section();
        assert_eq!(bytes.len(), 32 + 4 * 8);
        assert_eq!(RopeScaling::from_section(&bytes, &c).unwrap(), scaling);

        let patched = |offset: usize, value: u32| {
            let mut b = bytes.clone();
            b[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
            RopeScaling::from_section(&b, &c).unwrap_err()
        };
        let error = patched(4, 3);
        assert_eq!(error.kind(), ErrorKind::Unsupported);
        assert!(error.to_string().contains("scaling kind 3 is unknown"), "{error}");
        let error = patched(0, 2);
        assert!(error.to_string().contains("rope_scaling: version 2 is unknown"), "{error}");
        // A factor count that disagrees with the bytes, or with the model.
        assert!(patched(8, 9).to_string().contains("9 factors take 68"));
        let other = config(32, 10000.0);
        let error = RopeScaling::from_section(&bytes, &other).unwrap_err().to_string();
        assert!(error.contains("8 RoPE factors for rope_dim 32, expected 16"), "{error}");
        // A factor that is not a positive number.
        for bad in [0.0f32, -1.0, f32::INFINITY, f32::NAN] {
            let mut b = bytes.clone();
            b[32 + 4 * 5..32 + 4 * 6].copy_from_slice(&bad.to_le_bytes());
            let error = RopeScaling::from_section(&b, &c).unwrap_err().to_string();
            assert!(error.contains("RoPE factor 5 is"), "{bad}: {error}");
        }
        assert!(RopeScaling::from_section(&bytes[..20], &c).unwrap_err().to_string().contains("too short"));
    }

    /// Far past the original context, every entry of the table is the direct
    /// formula's angle with the factor applied, and the scaled pairs turn
    /// slower than plain RoPE would turn them.
    #[test]
    fn tables_far_past_the_original_context_hold_the_scaled_angles() {
        let c = config(16, 10000.0);
        let params =
            Llama3Params { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_context_length: 64 };
        let factors = params.scaling(c.rope_theta, c.rope_dim).unwrap().factors;
        // Pair 0 kept, pairs 1 and 2 on the ramp, the rest divided by 8.
        assert_eq!(factors[0], 1.0);
        assert!(factors[1] > 1.0 && factors[2] > factors[1] && factors[2] < 8.0, "{factors:?}");
        assert!(factors[3..].iter().all(|&f| f == 8.0), "{factors:?}");

        let (positions, pairs) = (5000, 8);
        let (mut cos, mut sin) = (vec![0f32; positions * pairs], vec![0f32; positions * pairs]);
        fill_tables(&c, Some(&factors), &mut cos, &mut sin);
        let (mut plain_cos, mut plain_sin) = (cos.clone(), sin.clone());
        fill_tables(&c, None, &mut plain_cos, &mut plain_sin);
        for pos in [0, 63, 64, 1000, 4097, 4999] {
            for (i, &factor) in factors.iter().enumerate() {
                let direct = pos as f64 * 10000f64.powf(-(2.0 * i as f64) / 16.0) / factor as f64;
                let at = pos * pairs + i;
                assert!((cos[at] as f64 - direct.cos()).abs() < 1e-6, "cos at {pos}, pair {i}");
                assert!((sin[at] as f64 - direct.sin()).abs() < 1e-6, "sin at {pos}, pair {i}");
                let plain = pos as f64 * 10000f64.powf(-(2.0 * i as f64) / 16.0);
                assert!((plain_cos[at] as f64 - plain.cos()).abs() < 1e-6, "plain cos at {pos}, pair {i}");
                if pos > 0 && factor != 1.0 {
                    assert!(
                        (cos[at] - plain_cos[at]).abs() > 1e-3 || (sin[at] - plain_sin[at]).abs() > 1e-3,
                        "pair {i} at {pos} is not scaled"
                    );
                }
            }
        }
    }
}
