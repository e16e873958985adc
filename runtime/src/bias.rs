//! The layer-wise bias constraint: the `bias` image section and what the
//! forward pass needs of it.
//!
//! Per layer `l`, a unit bias direction `d_l` of the residual stream, found
//! by `bramble bias-calibrate` from pairs of stereotyped and
//! anti-stereotyped sentences, and a predefined constraint weight
//! `w_l ∈ [0, 1]`. After layer `l` the forward pass removes that share of
//! the hidden state's component along the direction,
//! `h ← h − w_l · (h · d_l) · d_l`, and records the projection `h · d_l`
//! (before the removal) for the feedback loop. The neutral baseline of each
//! projection (its mean and standard deviation over ordinary text) is stored
//! with the directions, so a response's bias signal can be measured against
//! it. Byte layout in `models/FORMAT.md` (section `bias`).

use crate::error::{Error, Result};

/// Section name.
pub const SECTION: &str = "bias";
/// Section version this code reads and writes.
pub const VERSION: u32 = 1;
const HEADER_BYTES: usize = 32;

/// Directions, predefined weights and the neutral baseline, per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct BiasConstraint {
    /// Layers.
    pub layers: usize,
    /// Width of the residual stream.
    pub dim: usize,
    /// `d_l`, unit vectors, `layers × dim`.
    pub directions: Vec<f32>,
    /// The predefined constraint weights `w_l` (`--feedback static`).
    pub weights: Vec<f32>,
    /// Mean of `h · d_l` over neutral text, per layer.
    pub baseline_mean: Vec<f32>,
    /// Its standard deviation over tokens, per layer (> 0).
    pub baseline_std: Vec<f32>,
}

impl BiasConstraint {
    /// Direction `l`.
    pub fn direction(&self, l: usize) -> &[f32] {
        &self.directions[l * self.dim..(l + 1) * self.dim]
    }

    /// Checks sizes, finiteness, unit directions, weights in [0, 1] and positive spreads.
    pub fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::corrupt(format!("section bias: {what}")));
        let (layers, dim) = (self.layers, self.dim);
        if layers == 0 || dim == 0 {
            return bad(format!("{layers} layers of width {dim}"));
        }
        if self.directions.len() != layers * dim
            || self.weights.len() != layers
            || self.baseline_mean.len() != layers
            || self.baseline_std.len() != layers
        {
            return bad(format!("arrays do not match {layers} layers of width {dim}"));
        }
        for l in 0..layers {
            let d = self.direction(l);
            let norm = d.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt();
            if !d.iter().all(|v| v.is_finite()) || (norm - 1.0).abs() > 1e-3 {
                return bad(format!("direction of layer {l} is not a finite unit vector (norm {norm})"));
            }
            if !(0.0..=1.0).contains(&self.weights[l]) {
                return bad(format!("weight of layer {l} is {}, outside [0, 1]", self.weights[l]));
            }
            if !self.baseline_mean[l].is_finite() || !(self.baseline_std[l] > 0.0 && self.baseline_std[l].is_finite()) {
                return bad(format!(
                    "baseline of layer {l} is mean {} std {}",
                    self.baseline_mean[l], self.baseline_std[l]
                ));
            }
        }
        Ok(())
    }

    /// Parses and checks a section.
    pub fn from_section(bytes: &[u8]) -> Result<Self> {
        let corrupt = |what: String| Error::corrupt(format!("section bias: {what}"));
        if bytes.len() < HEADER_BYTES {
            return Err(corrupt(format!("{} bytes is shorter than its header", bytes.len())));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        if u32_at(0) != VERSION {
            return Err(Error::unsupported(format!(
                "section bias version {} (this reader knows {VERSION})",
                u32_at(0)
            )));
        }
        let (layers, dim) = (u32_at(4) as usize, u32_at(8) as usize);
        let values = layers
            .checked_mul(dim)
            .and_then(|n| n.checked_add(3 * layers))
            .ok_or_else(|| corrupt(format!("{layers} × {dim} overflows")))?;
        let expected = values.checked_mul(4).and_then(|n| n.checked_add(HEADER_BYTES));
        if expected != Some(bytes.len()) {
            return Err(corrupt(format!(
                "{} bytes, but {layers} layers of width {dim} take {expected:?}",
                bytes.len()
            )));
        }
        let payload = &bytes[HEADER_BYTES..];
        if crc32fast::hash(payload) != u32_at(12) {
            return Err(corrupt("checksum does not match its contents".into()));
        }
        let floats: Vec<f32> = payload.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let (directions, rest) = floats.split_at(layers * dim);
        let constraint = Self {
            layers,
            dim,
            directions: directions.to_vec(),
            weights: rest[..layers].to_vec(),
            baseline_mean: rest[layers..2 * layers].to_vec(),
            baseline_std: rest[2 * layers..].to_vec(),
        };
        constraint.check()?;
        Ok(constraint)
    }

    /// The section's bytes.
    pub fn to_section(&self) -> Result<Vec<u8>> {
        self.check().map_err(|e| Error::invalid(e.message().to_string()))?;
        let mut payload = Vec::with_capacity(4 * (self.directions.len() + 3 * self.layers));
        for v in self.directions.iter().chain(&self.weights).chain(&self.baseline_mean).chain(&self.baseline_std) {
            payload.extend_from_slice(&v.to_le_bytes());
        }
        let mut out = vec![0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&VERSION.to_le_bytes());
        out[4..8].copy_from_slice(&(self.layers as u32).to_le_bytes());
        out[8..12].copy_from_slice(&(self.dim as u32).to_le_bytes());
        out[12..16].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }
}

/// Per-layer statistics of the projections `h · d_l` the forward pass
/// recorded since the last reset: count, sum and sum of squares.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProjectionStats {
    /// Tokens recorded (the same for every layer).
    pub tokens: u64,
    /// `Σ h · d_l`, per layer.
    pub sum: Vec<f64>,
    /// `Σ (h · d_l)²`, per layer.
    pub sum_squares: Vec<f64>,
}

impl ProjectionStats {
    /// Zeroed statistics for `layers` layers (allocated once, with a state).
    pub fn new(layers: usize) -> Self {
        Self { tokens: 0, sum: vec![0.0; layers], sum_squares: vec![0.0; layers] }
    }
    /// Zeroes the statistics, keeping the buffers.
    pub fn reset(&mut self) {
        self.tokens = 0;
        self.sum.fill(0.0);
        self.sum_squares.fill(0.0);
    }
    /// The mean projection of layer `l` (0 without tokens).
    pub fn mean(&self, l: usize) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.sum[l] / self.tokens as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BiasConstraint {
        let (layers, dim) = (3, 4);
        let mut directions = vec![0f32; layers * dim];
        for l in 0..layers {
            directions[l * dim + l] = 1.0;
        }
        BiasConstraint {
            layers,
            dim,
            directions,
            weights: vec![0.0, 0.5, 1.0],
            baseline_mean: vec![0.1, -0.2, 0.3],
            baseline_std: vec![1.0, 2.0, 0.5],
        }
    }

    #[test]
    fn section_round_trips_and_refuses_damage() {
        let c = sample();
        let bytes = c.to_section().unwrap();
        assert_eq!(BiasConstraint::from_section(&bytes).unwrap(), c);
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let error = BiasConstraint::from_section(&flipped).unwrap_err();
        assert!(error.message().contains("checksum"), "{error}");
        let error = BiasConstraint::from_section(&bytes[..bytes.len() - 4]).unwrap_err();
        assert!(error.message().contains("bytes"), "{error}");
        let mut bad = c.clone();
        bad.weights[1] = 1.5;
        assert!(bad.to_section().unwrap_err().message().contains("outside [0, 1]"));
        let mut bad = c;
        bad.directions[0] = 2.0;
        assert!(bad.to_section().unwrap_err().message().contains("unit vector"));
    }
}
