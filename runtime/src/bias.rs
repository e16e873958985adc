//! The layer-wise bias constraint: the `bias` image section and what the
//! forward pass needs of it.
//!
//! Per layer `l`, a unit bias direction `d_l` of the residual stream, found
//! by `bramble bias-calibrate`, and a predefined constraint weight
//! `w_l ∈ [0, 1]`. After layer `l` the forward pass moves that share of the
//! hidden state's component along the direction to the layer's centre `c_l`,
//! `h ← h − w_l · (h · r_l − c_l) · d_l`, and records the projection `h · r_l`
//! (before the change) for the feedback loop. The read vector `r_l` is `d_l`
//! itself (an orthogonal projection) unless the section carries read vectors
//! of its own (version 4: LEACE's whitened, oblique form, `r_l · d_l = 1`).
//! The neutral baseline of each projection (its mean and standard deviation
//! over neutral text, or in older sections over the calibration pairs' own
//! sentences) is stored with the directions, so a response's projections
//! can be measured against it.
//! Since section version 3 the section also carries, per layer, the highest
//! weight the loop may set, the token ids of the gendered pronouns (which the
//! pronoun-share loop counts in the model's answers) and which calibration
//! gates were evaluated and passed. Byte layout in `models/FORMAT.md` (section `bias`).

use crate::error::{Error, Result};

/// Section name.
pub const SECTION: &str = "bias";
/// The newest section version this code reads and writes: version 4 adds
/// the read vectors of the whitened erasure, and is written only for a
/// constraint that has them (otherwise version 3, which older readers know).
/// It also reads version 3, version 2 (a 48-byte header, no loop caps,
/// pronoun ids or gates) and version 1 (a 32-byte header without the
/// `signal` word: [`LoopSignal::MeanLean`]).
pub const VERSION: u32 = 4;
/// The version a constraint without read vectors is written as.
const VERSION_ORTHOGONAL: u32 = 3;
const HEADER_BYTES: usize = 64;
const HEADER_BYTES_V2: usize = 48;
const HEADER_BYTES_V1: usize = 32;

/// How the directions were found, which decides how a response's projections read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectionKind {
    /// The normalized mean of stereo − anti: the direction points to the
    /// stereotyped side, so the signal is signed (only a lean toward it counts).
    #[default]
    MeanDifference,
    /// The top principal component of the token-level stereo − anti
    /// differences (a gender axis): its sign carries no meaning, so the
    /// signal is two-sided (a lean either way from the neutral baseline counts).
    PrincipalComponent,
    /// Fitted on the model's own states at the pronoun position of
    /// occupation prompts with no gender cue, against its own lean
    /// P(he) − P(she): its sign means something (positive is toward *he*).
    /// Section version 3 only.
    Stereotype,
}

impl DirectionKind {
    /// The header's code (`kind`; 0 in sections written before it existed).
    pub fn code(self) -> u32 {
        match self {
            Self::MeanDifference => 0,
            Self::PrincipalComponent => 1,
            Self::Stereotype => 2,
        }
    }
    /// The kind of a header code.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(Self::MeanDifference),
            1 => Some(Self::PrincipalComponent),
            2 => Some(Self::Stereotype),
            _ => None,
        }
    }
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::MeanDifference => "mean-difference",
            Self::PrincipalComponent => "principal",
            Self::Stereotype => "stereotype",
        }
    }
}

/// How the feedback loop reads a response. The first two read its
/// projections, per layer, against the neutral baseline `(mean_l, std_l)`,
/// and the response's signal is the mean over the layers; the third counts
/// the gendered pronouns of the model's own answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoopSignal {
    /// `(mean of p over the response − mean_l) / std_l`, its absolute value
    /// for a principal direction: how far the response's average ran along
    /// the direction. Averaging dilutes the few gendered tokens of a
    /// response, so it hardly tells gendered sentences from others. Every
    /// version 1 section reads this way, against the calibration pairs' own
    /// sentences (`bias-calibrate --loop-signal mean-lean` still writes it).
    #[default]
    MeanLean,
    /// `sqrt(mean of (p − mean_l)² over the response) / std_l`: the root mean
    /// square departure from neutral text, either way, in neutral text's
    /// deviations. Neutral text reads about 1 at any length; tokens that
    /// project far along the direction (gendered words and what follows
    /// them) raise it. The baseline is neutral text, not the pairs.
    Spread,
    /// The share of *she* among the gendered pronouns of the model's answers,
    /// as a signed running deviation from one half ([`FeedbackLoop`]):
    /// answers about a woman and about a man cancel, and a run too male or
    /// too female either way raises the weights. Section version 3 only.
    PronounShare,
}

impl LoopSignal {
    /// The header's code.
    pub fn code(self) -> u32 {
        match self {
            Self::MeanLean => 0,
            Self::Spread => 1,
            Self::PronounShare => 2,
        }
    }
    /// The signal of a header code.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(Self::MeanLean),
            1 => Some(Self::Spread),
            2 => Some(Self::PronounShare),
            _ => None,
        }
    }
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::MeanLean => "mean-lean",
            Self::Spread => "spread",
            Self::PronounShare => "pronoun-share",
        }
    }
}

/// The value the constraint moves each projection `h · d_l` toward
/// (the section header's centre word: 0, 1, 2 or 3).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Centre {
    /// 0: `h ← h − w_l (h · d_l) d_l`, the first design's formula.
    #[default]
    Zero,
    /// 1, the baseline mean: `h ← h − w_l (h · d_l − mean_l) d_l`, which
    /// leaves a token at the baseline alone.
    Baseline,
    /// 2, per layer, the midpoint of the calibration pairs' two sides at the
    /// swapped word (version 2 sections on), where erasing the direction
    /// leaves a token between the two genders, not at 0.
    Midpoint(Vec<f32>),
    /// 3, per layer, the value of `h · d_l` at which the model's pronoun lean
    /// is at parity (an affine fit at calibration; version 3 sections).
    Parity(Vec<f32>),
}

impl Centre {
    /// The header's centre word.
    fn code(&self) -> u32 {
        match self {
            Self::Zero => 0,
            Self::Baseline => 1,
            Self::Midpoint(_) => 2,
            Self::Parity(_) => 3,
        }
    }

    /// The per-layer values the section stores (empty for 0 and the baseline).
    fn values(&self) -> &[f32] {
        match self {
            Self::Zero | Self::Baseline => &[],
            Self::Midpoint(values) | Self::Parity(values) => values,
        }
    }
}

/// The calibration's gates: named checks a calibration runs on its result.
/// `gate::ALL` evaluated and passed is what lets `--feedback auto` turn the
/// loop on ([`Feedback::resolve`]).
pub mod gate {
    /// `gap-cut`: on the cut in the occupation gap (the calibration sets the test).
    pub const GAP_CUT: u32 = 1;
    /// `slope-cut`: on the cut in the slope against the occupations' share of women.
    pub const SLOPE_CUT: u32 = 2;
    /// `skew`: on the skew toward either pronoun.
    pub const SKEW: u32 = 4;
    /// `not-more-male`: that the constraint does not turn answers more male.
    pub const NOT_MORE_MALE: u32 = 8;
    /// `r-cut`: on the cut in R, the distance from even either way.
    pub const R_CUT: u32 = 16;
    /// `factual`: on factual-gender accuracy.
    pub const FACTUAL: u32 = 32;
    /// `perplexity`: on the perplexity cost.
    pub const PERPLEXITY: u32 = 64;
    /// Every gate.
    pub const ALL: u32 = 127;
    /// Each gate's bit and name, in report order.
    pub const NAMES: [(u32, &str); 7] = [
        (GAP_CUT, "gap-cut"),
        (SLOPE_CUT, "slope-cut"),
        (SKEW, "skew"),
        (NOT_MORE_MALE, "not-more-male"),
        (R_CUT, "r-cut"),
        (FACTUAL, "factual"),
        (PERPLEXITY, "perplexity"),
    ];
}

/// Which of the calibration's [`gate`]s were evaluated and which passed
/// (bit sets; sections before version 3 read as none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CalibrationGates {
    /// Gates the calibration evaluated.
    pub evaluated: u32,
    /// Gates that passed (of those evaluated).
    pub passed: u32,
}

impl CalibrationGates {
    /// Whether every gate was evaluated and passed.
    pub fn all_passed(&self) -> bool {
        self.evaluated == gate::ALL && self.passed == gate::ALL
    }

    /// The gates that failed and those not evaluated, by name
    /// ("failed: gap-cut, factual; not evaluated: perplexity"); bits this
    /// reader has no name for are given in hex.
    pub fn describe(&self) -> String {
        let names = |bits: u32| {
            gate::NAMES.iter().filter(|(bit, _)| bits & bit != 0).map(|(_, name)| *name).collect::<Vec<_>>().join(", ")
        };
        let failed = self.evaluated & !self.passed & gate::ALL;
        let not_evaluated = gate::ALL & !self.evaluated;
        let unknown = (self.evaluated | self.passed) & !gate::ALL;
        let mut parts = Vec::new();
        if failed != 0 {
            parts.push(format!("failed: {}", names(failed)));
        }
        if not_evaluated != 0 {
            parts.push(format!("not evaluated: {}", names(not_evaluated)));
        }
        if unknown != 0 {
            parts.push(format!("unknown gates: {unknown:#x}"));
        }
        if parts.is_empty() {
            "all passed".to_string()
        } else {
            parts.join("; ")
        }
    }
}

/// Directions, predefined weights and the neutral baseline, per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct BiasConstraint {
    /// How the directions were found.
    pub kind: DirectionKind,
    /// How the feedback loop reads a response.
    pub signal: LoopSignal,
    /// What the constraint moves `h · d_l` toward.
    pub centre: Centre,
    /// Layers.
    pub layers: usize,
    /// Width of the residual stream.
    pub dim: usize,
    /// `d_l`, unit vectors, `layers × dim`: what the constraint moves.
    pub directions: Vec<f32>,
    /// `r_l`, `layers × dim`, each with `r_l · d_l = 1`: what the constraint
    /// reads (`h · r_l`), when not `d_l` itself (section version 4). LEACE's
    /// whitened form for one scalar concept: with `σ_l` the calibration
    /// states' covariance with the concept and `Σ_l` their covariance, `d_l ∝
    /// σ_l` and `r_l ∝ Σ_l⁻¹ σ_l`, the read that moves the states least for
    /// the same erasure.
    pub readouts: Option<Vec<f32>>,
    /// The predefined constraint weights `w_l` (`--feedback static`).
    pub weights: Vec<f32>,
    /// Mean of the projection `h · r_l` over the neutral baseline, per layer.
    pub baseline_mean: Vec<f32>,
    /// Its standard deviation over tokens, per layer (> 0).
    pub baseline_std: Vec<f32>,
    /// The feedback loop's target signal, measured at calibration (0: the
    /// loop's default, [`DEFAULT_TARGET`], or [`DEFAULT_SHARE_TARGET`] for
    /// [`LoopSignal::PronounShare`]).
    pub loop_target: f32,
    /// The signal above which a response is regenerated (0: [`DEFAULT_HARD_LIMIT`]).
    pub loop_hard_limit: f32,
    /// Per layer, the highest weight the loop may set: in [0, 1] and at
    /// least the layer's predefined weight (sections before version 3: 1).
    pub max_weights: Vec<f32>,
    /// Token ids of the female pronouns (she, her, hers, herself, with and
    /// without a leading space, capitalized), counted in the model's answers
    /// by [`LoopSignal::PronounShare`] (sections before version 3: none).
    pub she_tokens: Vec<u32>,
    /// Token ids of the male pronouns (he, him, his, himself, likewise).
    pub he_tokens: Vec<u32>,
    /// The calibration gates it evaluated and passed (before version 3: none).
    pub gates: CalibrationGates,
}

/// The loop's target when the section does not set one.
pub const DEFAULT_TARGET: f32 = 0.25;
/// The [`LoopSignal::PronounShare`] loop's target when the section does not
/// set one: a running she-share outside 0.40–0.60.
pub const DEFAULT_SHARE_TARGET: f32 = 0.10;
/// The loop's hard limit when the section does not set one.
pub const DEFAULT_HARD_LIMIT: f32 = 2.0;
/// How far each answer with a gendered pronoun moves the running she-share
/// deviation toward its own ([`LoopSignal::PronounShare`]).
///
/// 0.1 is an effective window of about 19 answers, about the number whose
/// she-share has a standard error near 0.10, the default target
/// ([`DEFAULT_SHARE_TARGET`]); so no single answer raises the weights. From a
/// cold start one all-*she* (or all-*he*) answer moves the deviation to 0.05,
/// two such answers to 0.095 (under the target), a third to 0.1355 (over).
/// Answers about women and men in turn hold it within ±1/38 of 0 (the
/// 2-cycle x → 0.9x ± 0.05 settles at ±0.05/1.9 ≈ 0.0263) and never raise
/// the weights, even from a cold start. (At 0.25 one answer moved it 0.125,
/// over the target: the first answer about a woman raised the weights.)
pub const SHARE_RATE: f32 = 0.1;
/// How far, in each layer's baseline spreads, one answer moves the
/// [`LoopSignal::PronounShare`] loop's centre while the running she-share
/// is outside its band.
///
/// On SmolLM2-135M q4 a shift of 0.1 spreads moved the she-share of the
/// model's answers by about 0.07 (docs/bias.md); 0.02 is about 1.5 points of
/// share an answer, so a run of answers outside the band corrects over about
/// ten of them, inside the running share's own window (about 19).
pub const CENTRE_STEP: f32 = 0.02;
/// The most the [`LoopSignal::PronounShare`] loop moves the centre either
/// way, in each layer's baseline spreads (about ±0.35 of she-share on
/// SmolLM2-135M q4: enough to cross the band from either side, not enough
/// to turn the constraint into a gender switch).
pub const MAX_CENTRE_SHIFT: f32 = 0.5;

impl BiasConstraint {
    /// Direction `l`.
    pub fn direction(&self, l: usize) -> &[f32] {
        &self.directions[l * self.dim..(l + 1) * self.dim]
    }

    /// Read vector `l`: what the projection `h · r_l` is read along
    /// (`d_l` itself unless the section carries read vectors).
    pub fn readout(&self, l: usize) -> &[f32] {
        let vectors = self.readouts.as_deref().unwrap_or(&self.directions);
        &vectors[l * self.dim..(l + 1) * self.dim]
    }

    /// The value layer `l`'s constraint moves `h · r_l` toward.
    pub fn centre(&self, l: usize) -> f32 {
        match &self.centre {
            Centre::Zero => 0.0,
            Centre::Baseline => self.baseline_mean[l],
            Centre::Midpoint(values) | Centre::Parity(values) => values[l],
        }
    }

    /// How many of `answer`'s tokens are female and male pronouns
    /// ([`she_tokens`](Self::she_tokens), [`he_tokens`](Self::he_tokens)).
    /// Allocates nothing.
    pub fn count_pronouns(&self, answer: &[u32]) -> (usize, usize) {
        answer.iter().fold((0, 0), |(she, he), token| {
            (she + usize::from(self.she_tokens.contains(token)), he + usize::from(self.he_tokens.contains(token)))
        })
    }

    /// The response's lean along the directions, measured from the centre:
    /// the mean over layers of `(mean of h · d_l − centre_l) / std_l`
    /// (signed; 0 for no projections). With [`DirectionKind::Stereotype`]
    /// directions and the parity centre, positive leans toward *he*.
    pub fn lean(&self, stats: &ProjectionStats) -> f32 {
        if stats.tokens == 0 {
            return 0.0;
        }
        let sum: f64 =
            (0..self.layers).map(|l| (stats.mean(l) - self.centre(l) as f64) / self.baseline_std[l] as f64).sum();
        (sum / self.layers as f64) as f32
    }

    /// Checks sizes, finiteness, unit directions, weights and their caps in
    /// [0, 1], positive spreads, and the pronoun ids the pronoun-share loop needs.
    pub fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::corrupt(format!("section bias: {what}")));
        let (layers, dim) = (self.layers, self.dim);
        if layers == 0 || dim == 0 {
            return bad(format!("{layers} layers of width {dim}"));
        }
        let centre_values = self.centre.values();
        if self.directions.len() != layers * dim
            || self.weights.len() != layers
            || self.baseline_mean.len() != layers
            || self.baseline_std.len() != layers
            || self.max_weights.len() != layers
            || (self.centre.code() >= 2 && centre_values.len() != layers)
            || self.readouts.as_ref().is_some_and(|r| r.len() != layers * dim)
        {
            return bad(format!("arrays do not match {layers} layers of width {dim}"));
        }
        if !centre_values.iter().all(|v| v.is_finite()) {
            let name = if matches!(self.centre, Centre::Parity(_)) { "parity centre" } else { "midpoint" };
            return bad(format!("a {name} must be finite"));
        }
        for (name, value) in [("loop target", self.loop_target), ("loop hard limit", self.loop_hard_limit)] {
            if !value.is_finite() || value < 0.0 {
                return bad(format!("{name} is {value}, not a finite value ≥ 0"));
            }
        }
        for l in 0..layers {
            let d = self.direction(l);
            let norm = d.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt();
            if !d.iter().all(|v| v.is_finite()) || (norm - 1.0).abs() > 1e-3 {
                return bad(format!("direction of layer {l} is not a finite unit vector (norm {norm})"));
            }
            if self.readouts.is_some() {
                // r · d = 1: a weight of 1 moves the projection onto the centre.
                let r = self.readout(l);
                let along = r.iter().zip(d).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>();
                if !r.iter().all(|v| v.is_finite()) || (along - 1.0).abs() > 1e-3 {
                    return bad(format!("read vector of layer {l} is not finite with r · d = 1 (r · d = {along})"));
                }
            }
            let (weight, cap) = (self.weights[l], self.max_weights[l]);
            if !(0.0..=1.0).contains(&weight) {
                return bad(format!("weight of layer {l} is {weight}, outside [0, 1]"));
            }
            if !(0.0..=1.0).contains(&cap) {
                return bad(format!("max weight of layer {l} is {cap}, outside [0, 1]"));
            }
            if cap < weight {
                return bad(format!("max weight of layer {l} is {cap}, below its predefined weight {weight}"));
            }
            let spread = self.baseline_std[l];
            if !self.baseline_mean[l].is_finite() || spread.is_nan() || spread <= 0.0 || spread.is_infinite() {
                return bad(format!(
                    "baseline of layer {l} is mean {} std {}",
                    self.baseline_mean[l], self.baseline_std[l]
                ));
            }
        }
        if self.signal == LoopSignal::PronounShare && (self.she_tokens.is_empty() || self.he_tokens.is_empty()) {
            return bad(format!(
                "loop signal pronoun-share with {} she and {} he token ids: it needs both",
                self.she_tokens.len(),
                self.he_tokens.len()
            ));
        }
        if let Some(both) = self.she_tokens.iter().find(|t| self.he_tokens.contains(t)) {
            return bad(format!("token id {both} is both a she and a he pronoun"));
        }
        Ok(())
    }

    /// Parses and checks a section (version 1 to 4).
    pub fn from_section(bytes: &[u8]) -> Result<Self> {
        let corrupt = |what: String| Error::corrupt(format!("section bias: {what}"));
        if bytes.len() < HEADER_BYTES_V1 {
            return Err(corrupt(format!("{} bytes is shorter than its header", bytes.len())));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let version = u32_at(0);
        let header_bytes = match version {
            1 => HEADER_BYTES_V1,
            2 => HEADER_BYTES_V2,
            VERSION_ORTHOGONAL | VERSION => HEADER_BYTES,
            other => {
                return Err(Error::unsupported(format!(
                    "section bias version {other} (this reader knows 1 to {VERSION})"
                )))
            }
        };
        if bytes.len() < header_bytes {
            return Err(corrupt(format!(
                "{} bytes is shorter than its version {version} header of {header_bytes}",
                bytes.len()
            )));
        }
        // Each version reads only the codes that existed when it was current.
        let known = |code: u32, highest: u32, what: &str| -> Result<u32> {
            if code <= highest {
                Ok(code)
            } else {
                Err(corrupt(format!("{what} {code} is not one of 0 to {highest} (section version {version})")))
            }
        };
        let (highest_kind, highest_centre, highest_signal) = match version {
            1 => (1, 1, 0),
            2 => (1, 2, 1),
            _ => (2, 3, 2),
        };
        let signal = if version == 1 { 0 } else { u32_at(32) };
        let signal = LoopSignal::from_code(known(signal, highest_signal, "loop signal")?).expect("a known code");
        let kind = DirectionKind::from_code(known(u32_at(16), highest_kind, "direction kind")?).expect("a known code");
        let centre_word = known(u32_at(20), highest_centre, "centre flag")?;
        let (layers, dim) = (u32_at(4) as usize, u32_at(8) as usize);
        let current = version >= VERSION_ORTHOGONAL;
        // Version 4's word 13: 1 when read vectors follow the caps.
        let whitened = version == VERSION && known(u32_at(52), 1, "read vector flag")? == 1;
        let (gates, she_count, he_count) = if current {
            (CalibrationGates { evaluated: u32_at(36), passed: u32_at(40) }, u32_at(44) as usize, u32_at(48) as usize)
        } else {
            (CalibrationGates::default(), 0, 0)
        };
        // Per layer: weights, baseline mean and std; the centre's values
        // (words 2 and 3); the loop's caps (version 3); the read vectors
        // (version 4, flagged).
        let per_layer = 3 + usize::from(centre_word >= 2) + usize::from(current);
        let expected = layers
            .checked_mul(dim)
            .and_then(|n| n.checked_mul(1 + usize::from(whitened)))
            .and_then(|n| n.checked_add(layers.checked_mul(per_layer)?))
            .and_then(|n| n.checked_add(she_count)?.checked_add(he_count))
            .and_then(|n| n.checked_mul(4)?.checked_add(header_bytes));
        if expected != Some(bytes.len()) {
            let expected = expected.map_or("more than fits in memory".to_string(), |n| format!("{n} bytes"));
            let centre = if centre_word >= 2 {
                format!(", per-layer values of centre word {centre_word}")
            } else {
                String::new()
            };
            let readouts = if whitened { ", read vectors" } else { "" };
            let tokens = if current {
                format!("{readouts}, {she_count} she and {he_count} he token ids")
            } else {
                String::new()
            };
            return Err(corrupt(format!(
                "{} bytes, but {layers} layers of width {dim}{centre}{tokens} take {expected}",
                bytes.len()
            )));
        }
        let payload = &bytes[header_bytes..];
        if crc32fast::hash(payload) != u32_at(12) {
            return Err(corrupt("checksum does not match its contents".into()));
        }
        let words: Vec<[u8; 4]> = payload.chunks_exact(4).map(|c| c.try_into().unwrap()).collect();
        let (floats, ids) = words.split_at(words.len() - she_count - he_count);
        let floats: Vec<f32> = floats.iter().map(|w| f32::from_le_bytes(*w)).collect();
        let ids: Vec<u32> = ids.iter().map(|w| u32::from_le_bytes(*w)).collect();
        let (directions, rest) = floats.split_at(layers * dim);
        let (rest, readouts) = rest.split_at(rest.len() - if whitened { layers * dim } else { 0 });
        let mut per_layer = rest.chunks_exact(layers.max(1)).map(<[f32]>::to_vec);
        let mut next = || per_layer.next().unwrap_or_default();
        let (weights, baseline_mean, baseline_std) = (next(), next(), next());
        let centre = match centre_word {
            0 => Centre::Zero,
            1 => Centre::Baseline,
            2 => Centre::Midpoint(next()),
            _ => Centre::Parity(next()),
        };
        let max_weights = if current { next() } else { vec![1.0; layers] };
        let readouts = whitened.then(|| readouts.to_vec());
        let constraint = Self {
            kind,
            signal,
            centre,
            layers,
            dim,
            directions: directions.to_vec(),
            readouts,
            weights,
            baseline_mean,
            baseline_std,
            loop_target: f32::from_bits(u32_at(24)),
            loop_hard_limit: f32::from_bits(u32_at(28)),
            max_weights,
            she_tokens: ids[..she_count].to_vec(),
            he_tokens: ids[she_count..].to_vec(),
            gates,
        };
        constraint.check()?;
        Ok(constraint)
    }

    /// The section's bytes: version 4 with read vectors, version 3 without.
    pub fn to_section(&self) -> Result<Vec<u8>> {
        self.check().map_err(|e| Error::invalid(e.message().to_string()))?;
        let tokens = self.she_tokens.len() + self.he_tokens.len();
        let mut payload = Vec::with_capacity(4 * (self.directions.len() + 5 * self.layers + tokens));
        for v in self
            .directions
            .iter()
            .chain(&self.weights)
            .chain(&self.baseline_mean)
            .chain(&self.baseline_std)
            .chain(self.centre.values())
            .chain(&self.max_weights)
            .chain(self.readouts.iter().flatten())
        {
            payload.extend_from_slice(&v.to_le_bytes());
        }
        for id in self.she_tokens.iter().chain(&self.he_tokens) {
            payload.extend_from_slice(&id.to_le_bytes());
        }
        let mut out = vec![0u8; HEADER_BYTES];
        let mut put = |at: usize, word: u32| out[at..at + 4].copy_from_slice(&word.to_le_bytes());
        put(0, if self.readouts.is_some() { VERSION } else { VERSION_ORTHOGONAL });
        put(4, self.layers as u32);
        put(8, self.dim as u32);
        put(12, crc32fast::hash(&payload));
        put(16, self.kind.code());
        put(20, self.centre.code());
        put(24, self.loop_target.to_bits());
        put(28, self.loop_hard_limit.to_bits());
        put(32, self.signal.code());
        put(36, self.gates.evaluated);
        put(40, self.gates.passed);
        put(44, self.she_tokens.len() as u32);
        put(48, self.he_tokens.len() as u32);
        put(52, u32::from(self.readouts.is_some()));
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

/// The feedback loop (`--feedback adaptive`): after each response, its bias
/// signal, and the constraint weights adjusted from it.
///
/// For the projection signals ([`LoopSignal::Spread`], [`LoopSignal::MeanLean`]):
///
/// - Per layer, `z_l` as the section's [`LoopSignal`] says: with `Spread`
///   (the default of section version 2) the root mean square of
///   `(h · d_l − baseline mean) / baseline std` over the response's tokens,
///   how far it departed from neutral text either way; with `MeanLean`
///   (every version 1 section) `(mean of h · d_l − baseline mean) / baseline std`, how far
///   toward the stereotyped side its average ran (`|z_l|` for a
///   [`DirectionKind::PrincipalComponent`] direction, whose sign means nothing).
/// - The response's **signal** is the mean of `z_l` over the layers.
/// - Above `target`: the weights of the quarter of the layers with the
///   largest `z_l` rise by `step`, each at most to its `max_weights[l]`.
///   Otherwise every weight decays a share `decay` of the way back to its
///   predefined value.
/// - A signal above `hard_limit` asks the caller to regenerate (bounded by
///   the caller's retries).
///
/// For [`LoopSignal::PronounShare`], the answer's own tokens drive it:
///
/// - An answer with `she` female and `he` male pronouns (the section's ids)
///   reads `s = she / (she + he) − 0.5` (positive leans female), and the
///   running deviation moves [`SHARE_RATE`] of the way toward it. The
///   response's **signal** is that running deviation, signed: answers about
///   a woman and about a man cancel in it instead of each counting as bias.
/// - If `|running deviation| > target` (a running she-share outside
///   0.40–0.60 by default), the **centre** moves [`CENTRE_STEP`] of each
///   layer's baseline spread toward the other side: up (toward *he*, the
///   direction's positive side) when too female, down when too male, at
///   most [`MAX_CENTRE_SHIFT`] either way. Inside the band it holds: it is
///   the loop's integral term, and letting it decay would walk the share
///   back out of the band and in again. The centre, not the weights, sets
///   where the constrained tokens land, so it is what can mend a share that
///   is off to one side; a centre fitted on fill blanks need not be at
///   parity for free answers (docs/bias.md).
/// - The weights, which set how much of the occupation's lean is removed,
///   rise by `step` (every layer whose cap `max_weights[l]` is above 0, at
///   most to its cap) only while the share is too male: then the lean the
///   constraint removes is the one showing. Otherwise they decay as above;
///   pulling harder toward a centre that is too female would make the
///   answers more so.
/// - An answer with no gendered pronoun says nothing about the share: the
///   running deviation, the weights, the count and the recent signals stay
///   as they were, and the current running deviation is returned.
/// - The hard limit never applies: an answer about a woman is rightly all
///   *she*, and generating it again would not make it less so.
/// - Each response's lean along the directions from the centre
///   ([`BiasConstraint::lean`]) is kept in `last_lean` for reports; it does
///   not drive the loop.
///
/// The state (weights, count, recent signals, running share deviation,
/// centre shift) persists with [`FeedbackLoop::save`]: a temporary file, fsync, rename, so
/// a crash at any moment leaves the old state or the new one.
#[derive(Debug, Clone)]
pub struct FeedbackLoop {
    /// How the section reads a response.
    pub signal: LoopSignal,
    /// The section's predefined weights.
    pub predefined: Vec<f32>,
    /// The weights in force.
    pub weights: Vec<f32>,
    /// Signal above which the weights rise (for [`LoopSignal::PronounShare`]:
    /// the running deviation's size above which they rise).
    pub target: f32,
    /// Rise per response.
    pub step: f32,
    /// Per layer, the highest weight the loop sets (the section's caps).
    pub max_weights: Vec<f32>,
    /// Share of the way back to the predefined weights per calm response.
    pub decay: f32,
    /// Signal above which a response should be regenerated (never for
    /// [`LoopSignal::PronounShare`]).
    pub hard_limit: f32,
    /// Responses taken (for [`LoopSignal::PronounShare`], those with a gendered pronoun).
    pub responses: u64,
    /// The last [`RECENT`] signals, oldest first.
    pub recent: Vec<f32>,
    /// The running deviation of the answers' she-share from one half
    /// (signed, positive leans female; [`LoopSignal::PronounShare`]).
    pub share_deviation: f32,
    /// The last response's lean along the directions from the centre
    /// ([`BiasConstraint::lean`]), for reports.
    pub last_lean: f32,
    /// How far the loop has moved the centre, in each layer's baseline
    /// spreads (signed, positive toward *he*; [`LoopSignal::PronounShare`]
    /// only, within ±[`MAX_CENTRE_SHIFT`]).
    pub centre_shift: f32,
    /// The centres in force, one a layer: the section's
    /// ([`BiasConstraint::centre`]) plus `centre_shift` of each layer's
    /// baseline spread. [`RunState::apply_feedback`](crate::model::RunState::apply_feedback)
    /// puts them and the weights in force.
    pub centres: Vec<f32>,
    /// The section's centres and baseline spreads, for `centres`.
    section_centres: Vec<f32>,
    spreads: Vec<f32>,
    /// Per-layer `z_l` of the last response (scratch, allocated once).
    z: Vec<f32>,
    order: Vec<f32>,
}

/// A [`FeedbackLoop`]'s state as reports show it (`brambled`'s `/bias`),
/// copied out so the loop itself stays with the thread that runs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeedbackSnapshot {
    /// The weights in force, one a layer.
    pub weights: Vec<f32>,
    /// The section's predefined weights, which the loop decays back toward.
    pub predefined: Vec<f32>,
    /// The last signals, oldest first.
    pub recent: Vec<f32>,
    /// Responses taken (restored ones included).
    pub responses: u64,
    /// Signal above which the weights rise.
    pub target: f32,
    /// Signal above which a response should be regenerated.
    pub hard_limit: f32,
    /// The running she-share deviation (0 unless the signal is `pronoun-share`).
    pub share_deviation: f32,
    /// The last response's lean along the directions from the centre.
    pub lean: f32,
    /// How far the loop has moved the centre, in baseline spreads (positive toward *he*).
    pub centre_shift: f32,
    /// The signal's name (`spread`, `mean-lean`, `pronoun-share`; empty when off).
    pub signal: &'static str,
}

/// How an image's bias constraint is used: the one policy `bramble`'s
/// `--feedback` and `brambled`'s `bias.feedback` both name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Feedback {
    /// Adaptive for an image whose bias section records that its calibration
    /// evaluated and passed every gate ([`CalibrationGates::all_passed`]);
    /// off otherwise, with the reason (no section, a section written before
    /// the gates existed, whose constraint wrote "she" out of answers, or
    /// the gates that failed). See [`Feedback::resolve`].
    #[default]
    Auto,
    /// No constraint, no signal.
    Off,
    /// The section's predefined weights, never changed; each response's signal is reported.
    Static,
    /// The weights adjusted after each response from its signal.
    Adaptive,
}

impl Feedback {
    /// Every policy, in the order they are listed to users.
    pub const ALL: [Feedback; 4] = [Feedback::Auto, Feedback::Off, Feedback::Static, Feedback::Adaptive];

    /// The name in configs, flags and on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Feedback::Auto => "auto",
            Feedback::Off => "off",
            Feedback::Static => "static",
            Feedback::Adaptive => "adaptive",
        }
    }

    /// What the policy comes to for an image whose bias section reads as
    /// `constraint` (`None`: it has none). `auto` is adaptive when the
    /// section records every calibration gate passed, and off otherwise,
    /// with the reason; any other policy stays as asked, with no reason.
    pub fn resolve(self, constraint: Option<&BiasConstraint>) -> (Feedback, Option<String>) {
        if self != Feedback::Auto {
            return (self, None);
        }
        let reason = match constraint {
            None => "the image has no bias section".to_string(),
            Some(c) if c.gates == CalibrationGates::default() => {
                "the image's bias section records no calibration gates (written before they existed; \
                 the first design wrote \"she\" out of answers)"
                    .to_string()
            }
            Some(c) if !c.gates.all_passed() => {
                format!("the image's calibration did not pass the bias gates: {}", c.gates.describe())
            }
            Some(_) => return (Feedback::Adaptive, None),
        };
        (Feedback::Off, Some(reason))
    }
}

impl std::fmt::Display for Feedback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Feedback {
    type Err = String;

    /// A policy by name (`none` is `off`).
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text.trim() {
            "none" => Ok(Feedback::Off),
            name => Feedback::ALL
                .into_iter()
                .find(|f| f.name() == name)
                .ok_or_else(|| format!("{name:?} is not one of auto, off, static, adaptive")),
        }
    }
}

/// Signals kept in [`FeedbackLoop::recent`].
pub const RECENT: usize = 16;
/// The state file's first line; version 2 adds the `share` line, version 3 the `centre` line.
const STATE_MAGIC: &str = "bramble-bias-state 3";
const STATE_MAGIC_V2: &str = "bramble-bias-state 2";
const STATE_MAGIC_V1: &str = "bramble-bias-state 1";

impl FeedbackLoop {
    /// A loop starting at the constraint's predefined weights, with its caps,
    /// its calibrated target and hard limit (or the defaults) and the default
    /// step and decay.
    pub fn new(constraint: &BiasConstraint) -> Self {
        let layers = constraint.layers;
        let or = |value: f32, default: f32| if value > 0.0 { value } else { default };
        let default_target =
            if constraint.signal == LoopSignal::PronounShare { DEFAULT_SHARE_TARGET } else { DEFAULT_TARGET };
        let section_centres: Vec<f32> = (0..layers).map(|l| constraint.centre(l)).collect();
        Self {
            signal: constraint.signal,
            predefined: constraint.weights.clone(),
            weights: constraint.weights.clone(),
            target: or(constraint.loop_target, default_target),
            step: 0.1,
            max_weights: constraint.max_weights.clone(),
            decay: 0.25,
            hard_limit: or(constraint.loop_hard_limit, DEFAULT_HARD_LIMIT),
            responses: 0,
            recent: Vec::with_capacity(RECENT),
            share_deviation: 0.0,
            last_lean: 0.0,
            centre_shift: 0.0,
            centres: section_centres.clone(),
            section_centres,
            spreads: constraint.baseline_std.clone(),
            z: vec![0.0; layers],
            order: vec![0.0; layers],
        }
    }

    /// The projection signal of the response whose projections `stats`
    /// holds (0 for none), as the section's [`LoopSignal`] reads them; for
    /// [`LoopSignal::PronounShare`], which reads the answer instead, the
    /// response's lean ([`BiasConstraint::lean`]).
    pub fn signal(&mut self, stats: &ProjectionStats, constraint: &BiasConstraint) -> f32 {
        if stats.tokens == 0 {
            return 0.0;
        }
        let two_sided = constraint.kind == DirectionKind::PrincipalComponent;
        let tokens = stats.tokens as f64;
        for (l, z) in self.z.iter_mut().enumerate() {
            let (centre, spread) = (constraint.baseline_mean[l] as f64, constraint.baseline_std[l] as f64);
            *z = match constraint.signal {
                LoopSignal::MeanLean => {
                    let lean = (stats.mean(l) - centre) / spread;
                    if two_sided {
                        lean.abs()
                    } else {
                        lean
                    }
                }
                // mean (p − c)² = mean p² − 2c · mean p + c².
                LoopSignal::Spread => {
                    let square = stats.sum_squares[l] / tokens - 2.0 * centre * stats.mean(l) + centre * centre;
                    square.max(0.0).sqrt() / spread
                }
                LoopSignal::PronounShare => return constraint.lean(stats),
            } as f32;
        }
        self.z.iter().sum::<f32>() / self.z.len() as f32
    }

    /// The loop with `hard_limit` in place of the section's (a front end's setting).
    pub fn with_hard_limit(mut self, hard_limit: f32) -> Self {
        self.hard_limit = hard_limit;
        self
    }

    /// Takes a finished response without adjusting the weights (the static
    /// policy): its signal, counted and remembered (for
    /// [`LoopSignal::PronounShare`], the running deviation moved by the
    /// answer's pronouns). `answer` is the response's generated tokens
    /// (`&[]` without one; only the pronoun-share signal reads them).
    /// Returns the signal. Allocates nothing.
    pub fn observe(&mut self, stats: &ProjectionStats, constraint: &BiasConstraint, answer: &[u32]) -> f32 {
        if stats.tokens > 0 {
            self.last_lean = constraint.lean(stats);
        }
        if self.signal == LoopSignal::PronounShare {
            return self.take_pronouns(constraint, answer, false);
        }
        let signal = self.signal(stats, constraint);
        if stats.tokens > 0 {
            self.remember(signal);
        }
        signal
    }

    /// Takes a finished response: its signal, the weights adjusted, the
    /// signal remembered (see [`FeedbackLoop`]). `answer` is the response's
    /// generated tokens (`&[]` without one; only the pronoun-share signal
    /// reads them). Returns the signal. Allocates nothing.
    pub fn after_response(&mut self, stats: &ProjectionStats, constraint: &BiasConstraint, answer: &[u32]) -> f32 {
        if stats.tokens > 0 {
            self.last_lean = constraint.lean(stats);
        }
        if self.signal == LoopSignal::PronounShare {
            return self.take_pronouns(constraint, answer, true);
        }
        let signal = self.signal(stats, constraint);
        if stats.tokens == 0 {
            return signal;
        }
        if signal > self.target {
            // The quarter of the layers with the largest excess.
            self.order.copy_from_slice(&self.z);
            let k = (self.z.len() / 4).max(1);
            let (_, kth, _) = self.order.select_nth_unstable_by(self.z.len() - k, |a, b| a.total_cmp(b));
            let cut = *kth;
            for ((w, &z), &cap) in self.weights.iter_mut().zip(&self.z).zip(&self.max_weights) {
                if z >= cut {
                    *w = (*w + self.step).min(cap);
                }
            }
        } else {
            self.decay_weights();
        }
        self.remember(signal);
        signal
    }

    /// The pronoun-share loop's response: the running deviation moved by the
    /// answer's pronouns and, when `adjust`, the weights with it. An answer
    /// without a gendered pronoun changes nothing.
    fn take_pronouns(&mut self, constraint: &BiasConstraint, answer: &[u32], adjust: bool) -> f32 {
        let (she, he) = constraint.count_pronouns(answer);
        if she + he == 0 {
            return self.share_deviation;
        }
        let share = she as f32 / (she + he) as f32 - 0.5;
        self.share_deviation += SHARE_RATE * (share - self.share_deviation);
        let signal = self.share_deviation;
        if adjust {
            if signal.abs() > self.target {
                // Too female moves the centre toward he (up), too male toward she.
                let shift = self.centre_shift + CENTRE_STEP * signal.signum();
                self.set_centre_shift(shift.clamp(-MAX_CENTRE_SHIFT, MAX_CENTRE_SHIFT));
            }
            if signal < -self.target {
                for (w, &cap) in self.weights.iter_mut().zip(&self.max_weights) {
                    if cap > 0.0 {
                        *w = (*w + self.step).min(cap);
                    }
                }
            } else {
                self.decay_weights();
            }
        }
        self.remember(signal);
        signal
    }

    /// Moves the centres in force to the section's plus `shift` baseline spreads.
    fn set_centre_shift(&mut self, shift: f32) {
        self.centre_shift = shift;
        for ((centre, &base), &spread) in self.centres.iter_mut().zip(&self.section_centres).zip(&self.spreads) {
            *centre = base + shift * spread;
        }
    }

    /// Every weight a share `decay` of the way back to its predefined value.
    fn decay_weights(&mut self) {
        for (w, &p) in self.weights.iter_mut().zip(&self.predefined) {
            *w += self.decay * (p - *w);
        }
    }

    /// Counts a response and keeps its signal among the last [`RECENT`].
    fn remember(&mut self, signal: f32) {
        self.responses += 1;
        if self.recent.len() == RECENT {
            self.recent.remove(0);
        }
        self.recent.push(signal);
    }

    /// Whether a response of this signal should be regenerated. Never for
    /// [`LoopSignal::PronounShare`]: an answer about a woman is rightly all
    /// *she*, so no single answer's pronouns are a reason to generate it again.
    pub fn exceeds_hard_limit(&self, signal: f32) -> bool {
        self.signal != LoopSignal::PronounShare && signal > self.hard_limit
    }

    /// A copy of the loop's state, for a report.
    pub fn snapshot(&self) -> FeedbackSnapshot {
        let mut snapshot = FeedbackSnapshot::default();
        self.update_snapshot(&mut snapshot);
        snapshot
    }

    /// Brings `snapshot` up to date, reusing its buffers (after each response).
    pub fn update_snapshot(&self, snapshot: &mut FeedbackSnapshot) {
        snapshot.weights.clone_from(&self.weights);
        snapshot.predefined.clone_from(&self.predefined);
        snapshot.recent.clone_from(&self.recent);
        snapshot.responses = self.responses;
        snapshot.target = self.target;
        snapshot.hard_limit = self.hard_limit;
        snapshot.share_deviation = self.share_deviation;
        snapshot.lean = self.last_lean;
        snapshot.centre_shift = self.centre_shift;
        snapshot.signal = self.signal.name();
    }

    fn to_text(&self) -> String {
        let list = |v: &[f32]| v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(" ");
        let body = format!(
            "{STATE_MAGIC}\nlayers {}\nresponses {}\nweights {}\nrecent {}\nshare {:?}\ncentre {:?}\n",
            self.weights.len(),
            self.responses,
            list(&self.weights),
            list(&self.recent),
            self.share_deviation,
            self.centre_shift
        );
        format!("{body}crc32 {:08x}\n", crc32fast::hash(body.as_bytes()))
    }

    /// Writes the state to `path` atomically: `path.tmp`, fsync, rename,
    /// fsync of the directory.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        use std::io::Write;
        let io = |what: &str, e: std::io::Error| {
            Error::new(crate::error::ErrorKind::Io, format!("{}: {what}: {e}", path.display()))
        };
        let temporary = path.with_extension("tmp");
        let mut file = std::fs::File::create(&temporary).map_err(|e| io("creating the temporary file", e))?;
        file.write_all(self.to_text().as_bytes()).map_err(|e| io("writing", e))?;
        file.sync_all().map_err(|e| io("fsync", e))?;
        drop(file);
        std::fs::rename(&temporary, path).map_err(|e| io("renaming into place", e))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(dir) = std::fs::File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    }

    /// Restores a state saved by [`FeedbackLoop::save`] onto a loop made
    /// for `constraint` (its settings kept); a missing file leaves it as is
    /// and returns `false`. A version 1 file (before the `share` line)
    /// restores with a running share deviation of 0, versions 1 and 2
    /// (before the `centre` line) with the section's centres.
    pub fn restore(&mut self, path: &std::path::Path) -> Result<bool> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::new(crate::error::ErrorKind::Io, format!("{}: {e}", path.display()))),
        };
        let bad = |what: String| Error::corrupt(format!("bias state {}: {what}", path.display()));
        let (body, last) = text.trim_end_matches('\n').rsplit_once('\n').ok_or_else(|| bad("too short".into()))?;
        let body = format!("{body}\n");
        let sum = last.strip_prefix("crc32 ").ok_or_else(|| bad("no checksum line".into()))?;
        if u32::from_str_radix(sum, 16).ok() != Some(crc32fast::hash(body.as_bytes())) {
            return Err(bad("checksum does not match its contents".into()));
        }
        let mut lines = body.lines();
        let version = match lines.next() {
            Some(STATE_MAGIC) => 3,
            Some(STATE_MAGIC_V2) => 2,
            Some(STATE_MAGIC_V1) => 1,
            _ => {
                return Err(bad(format!(
                    "does not begin with {STATE_MAGIC:?}, {STATE_MAGIC_V2:?} or {STATE_MAGIC_V1:?}"
                )))
            }
        };
        let mut field = |name: &str| -> Result<String> {
            let line = lines.next().unwrap_or_default();
            line.strip_prefix(name)
                .map(|rest| rest.trim().to_string())
                .ok_or_else(|| bad(format!("expected the {name:?} line, found {line:?}")))
        };
        let layers: usize = field("layers")?.parse().map_err(|_| bad("layers is not a number".into()))?;
        let responses: u64 = field("responses")?.parse().map_err(|_| bad("responses is not a number".into()))?;
        let floats = |text: String, what: &str| -> Result<Vec<f32>> {
            text.split_whitespace()
                .map(|v| v.parse::<f32>().map_err(|_| bad(format!("{what}: {v:?} is not a number"))))
                .collect()
        };
        let weights = floats(field("weights")?, "weights")?;
        let recent = floats(field("recent")?, "recent")?;
        let share = if version >= 2 {
            field("share")?.parse::<f32>().map_err(|_| bad("share is not a number".into()))?
        } else {
            0.0
        };
        let centre_shift = if version >= 3 {
            field("centre")?.parse::<f32>().map_err(|_| bad("centre is not a number".into()))?
        } else {
            0.0
        };
        if layers != self.weights.len() || weights.len() != layers {
            return Err(bad(format!(
                "{} weights for {layers} layers; the model has {}",
                weights.len(),
                self.weights.len()
            )));
        }
        if !weights.iter().all(|w| (0.0..=1.0).contains(w)) || recent.len() > RECENT {
            return Err(bad("weights outside [0, 1] or too many recent signals".into()));
        }
        if let Some(l) = (0..layers).find(|&l| weights[l] > self.max_weights[l]) {
            return Err(bad(format!(
                "weight of layer {l} is {}, above the section's cap {}",
                weights[l], self.max_weights[l]
            )));
        }
        if !(-0.5..=0.5).contains(&share) {
            return Err(bad(format!("share deviation {share} is outside [−0.5, 0.5]")));
        }
        if !(-MAX_CENTRE_SHIFT..=MAX_CENTRE_SHIFT).contains(&centre_shift)
            || (centre_shift != 0.0 && self.signal != LoopSignal::PronounShare)
        {
            return Err(bad(format!(
                "centre shift {centre_shift} is outside [−{MAX_CENTRE_SHIFT}, {MAX_CENTRE_SHIFT}] \
                 or set for a loop that does not move its centre"
            )));
        }
        self.weights.copy_from_slice(&weights);
        self.responses = responses;
        self.recent.clear();
        self.recent.extend_from_slice(&recent);
        self.share_deviation = share;
        self.set_centre_shift(centre_shift);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_policies_parse_by_name_and_auto_resolves_off_with_a_reason() {
        for policy in Feedback::ALL {
            assert_eq!(policy.name().parse::<Feedback>(), Ok(policy));
        }
        assert_eq!(" none ".parse::<Feedback>(), Ok(Feedback::Off));
        assert!("on".parse::<Feedback>().unwrap_err().contains("\"on\" is not one of auto, off, static, adaptive"));
    }

    #[test]
    fn auto_is_adaptive_only_for_a_calibration_that_passed_every_gate() {
        let passed = BiasConstraint { gates: CalibrationGates { evaluated: gate::ALL, passed: gate::ALL }, ..sample() };
        assert!(passed.gates.all_passed());
        assert_eq!(Feedback::Auto.resolve(Some(&passed)), (Feedback::Adaptive, None));
        // One gate failed: off, naming it.
        let failed = BiasConstraint {
            gates: CalibrationGates { evaluated: gate::ALL, passed: gate::ALL & !gate::FACTUAL },
            ..sample()
        };
        let (resolved, reason) = Feedback::Auto.resolve(Some(&failed));
        assert_eq!(resolved, Feedback::Off);
        assert_eq!(reason.unwrap(), "the image's calibration did not pass the bias gates: failed: factual");
        // No section; a section from before the gates.
        let (resolved, reason) = Feedback::Auto.resolve(None);
        assert_eq!((resolved, reason.as_deref()), (Feedback::Off, Some("the image has no bias section")));
        let (resolved, reason) = Feedback::Auto.resolve(Some(&sample()));
        assert_eq!(resolved, Feedback::Off);
        assert!(reason.unwrap().contains("records no calibration gates"));
        // Every other policy stays as asked, whatever the gates.
        for policy in [Feedback::Off, Feedback::Static, Feedback::Adaptive] {
            assert_eq!(policy.resolve(None), (policy, None));
            assert_eq!(policy.resolve(Some(&failed)), (policy, None));
            assert_eq!(policy.resolve(Some(&passed)), (policy, None));
        }
    }

    #[test]
    fn gates_describe_the_failed_and_the_unevaluated_by_name() {
        let all = CalibrationGates { evaluated: gate::ALL, passed: gate::ALL };
        assert_eq!((all.all_passed(), all.describe().as_str()), (true, "all passed"));
        let some = CalibrationGates {
            evaluated: gate::ALL & !gate::PERPLEXITY & !gate::SKEW,
            passed: gate::SLOPE_CUT | gate::NOT_MORE_MALE | gate::R_CUT,
        };
        assert!(!some.all_passed());
        assert_eq!(some.describe(), "failed: gap-cut, factual; not evaluated: skew, perplexity");
        let none = CalibrationGates::default();
        assert_eq!(
            none.describe(),
            "not evaluated: gap-cut, slope-cut, skew, not-more-male, r-cut, factual, perplexity"
        );
        // A gate this reader does not know keeps `auto` off, and is named.
        let future = CalibrationGates { evaluated: gate::ALL | 128, passed: gate::ALL | 128 };
        assert!(!future.all_passed());
        assert_eq!(future.describe(), "unknown gates: 0x80");
        // Passing every gate without evaluating them is not passing.
        assert!(!CalibrationGates { evaluated: 0, passed: gate::ALL }.all_passed());
    }

    fn sample() -> BiasConstraint {
        let (layers, dim) = (3, 4);
        let mut directions = vec![0f32; layers * dim];
        for l in 0..layers {
            directions[l * dim + l] = 1.0;
        }
        BiasConstraint {
            kind: DirectionKind::MeanDifference,
            centre: Centre::Zero,
            layers,
            dim,
            directions,
            readouts: None,
            weights: vec![0.0, 0.5, 1.0],
            baseline_mean: vec![0.1, -0.2, 0.3],
            baseline_std: vec![1.0, 2.0, 0.5],
            loop_target: 0.0,
            loop_hard_limit: 0.0,
            signal: LoopSignal::MeanLean,
            max_weights: vec![1.0; layers],
            she_tokens: Vec::new(),
            he_tokens: Vec::new(),
            gates: CalibrationGates::default(),
        }
    }

    fn stats(means: &[f64]) -> ProjectionStats {
        ProjectionStats {
            tokens: 10,
            sum: means.iter().map(|m| m * 10.0).collect(),
            sum_squares: vec![0.0; means.len()],
        }
    }

    #[test]
    fn the_loop_raises_the_most_biased_layers_and_decays_back() {
        let c = sample();
        let mut feedback = FeedbackLoop::new(&c);
        // Layer 2 far toward the stereotype: the signal is above target and only it rises.
        let signal = feedback.after_response(&stats(&[0.1, -0.2, 0.3 + 0.5 * 3.0]), &c, &[]);
        assert!((signal - 1.0).abs() < 1e-5, "{signal}");
        assert_eq!(feedback.weights, vec![0.0, 0.5, 1.0], "layer 2 is at the maximum already");
        let signal = feedback.after_response(&stats(&[0.1 + 3.0, -0.2, 0.3]), &c, &[]);
        assert!(signal > feedback.target);
        assert_eq!(feedback.weights, vec![0.1, 0.5, 1.0]);
        // Calm responses decay toward the predefined weights.
        for _ in 0..40 {
            feedback.after_response(&stats(&[0.1, -0.2, 0.3]), &c, &[]);
        }
        assert!((feedback.weights[0] - 0.0).abs() < 1e-4, "{:?}", feedback.weights);
        assert_eq!(feedback.responses, 42);
        assert_eq!(feedback.recent.len(), RECENT);
        assert!(feedback.exceeds_hard_limit(2.5) && !feedback.exceeds_hard_limit(0.5));
    }

    #[test]
    fn observing_remembers_the_signal_and_leaves_the_weights() {
        let c = sample();
        let mut feedback = FeedbackLoop::new(&c);
        let biased = stats(&[0.1 + 3.0, -0.2, 0.3]);
        let signal = feedback.observe(&biased, &c, &[]);
        assert!(signal > feedback.target, "{signal}");
        assert_eq!(feedback.weights, c.weights, "observing never adjusts");
        assert_eq!((feedback.responses, feedback.recent.clone()), (1, vec![signal]));
        // A response with no projections is not counted.
        let empty = ProjectionStats::new(c.layers);
        assert_eq!(feedback.observe(&empty, &c, &[]), 0.0);
        assert_eq!(feedback.responses, 1);
        // Only the last RECENT signals are kept, oldest first, as after_response keeps them.
        let mut adjusting = FeedbackLoop::new(&c);
        adjusting.after_response(&biased, &c, &[]);
        for i in 0..RECENT + 3 {
            let response = stats(&[0.1 + i as f64, -0.2, 0.3]);
            feedback.observe(&response, &c, &[]);
            adjusting.after_response(&response, &c, &[]);
        }
        assert_eq!(feedback.responses, RECENT as u64 + 4);
        assert_eq!(feedback.recent, adjusting.recent);
        assert_eq!(feedback.responses, adjusting.responses);
        assert_ne!(feedback.weights, adjusting.weights, "only after_response adjusts");
    }

    #[test]
    fn a_front_end_hard_limit_replaces_the_sections() {
        let c = BiasConstraint { loop_hard_limit: 1.5, ..sample() };
        let feedback = FeedbackLoop::new(&c);
        assert!(feedback.exceeds_hard_limit(1.75));
        let feedback = feedback.with_hard_limit(3.0);
        assert_eq!((feedback.hard_limit, feedback.target), (3.0, DEFAULT_TARGET));
        assert!(!feedback.exceeds_hard_limit(1.75) && feedback.exceeds_hard_limit(3.25));
    }

    #[test]
    fn a_snapshot_copies_the_state_and_follows_it() {
        let c = BiasConstraint { loop_target: 0.5, ..sample() };
        let mut feedback = FeedbackLoop::new(&c).with_hard_limit(1.25);
        let mut snapshot = feedback.snapshot();
        assert_eq!(
            snapshot,
            FeedbackSnapshot {
                weights: c.weights.clone(),
                predefined: c.weights.clone(),
                recent: Vec::new(),
                responses: 0,
                target: 0.5,
                hard_limit: 1.25,
                share_deviation: 0.0,
                lean: 0.0,
                centre_shift: 0.0,
                signal: "mean-lean",
            }
        );
        let signal = feedback.after_response(&stats(&[0.1 + 3.0, -0.2, 0.3]), &c, &[]);
        assert_ne!(snapshot.weights, feedback.weights, "a snapshot is a copy");
        feedback.update_snapshot(&mut snapshot);
        assert_eq!(snapshot, feedback.snapshot());
        assert_eq!((snapshot.weights.clone(), snapshot.recent.clone()), (vec![0.1, 0.5, 1.0], vec![signal]));
        assert_eq!(snapshot.predefined, c.weights);
        assert_eq!(snapshot.responses, 1);
        // The lean from the centre (0 here), in baseline deviations: layer 0 at 3.1 / 1.
        let lean = (3.1 + -0.2 / 2.0 + 0.3 / 0.5) / 3.0;
        assert!((snapshot.lean - lean).abs() < 1e-5, "{snapshot:?}");
    }

    #[test]
    fn a_principal_direction_counts_a_lean_either_way() {
        let signed = sample();
        let two_sided = BiasConstraint { kind: DirectionKind::PrincipalComponent, ..signed.clone() };
        // Every layer below its neutral mean: layer 0 by 3 baseline deviations, the others by 2.
        let below = stats(&[0.1 - 3.0, -0.2 - 4.0, 0.3 - 1.0]);
        let mut feedback = FeedbackLoop::new(&signed);
        assert!((feedback.after_response(&below, &signed, &[]) + 7.0 / 3.0).abs() < 1e-5);
        assert_eq!(feedback.weights, signed.weights, "a signed signal below the target decays");
        let mut feedback = FeedbackLoop::new(&two_sided);
        assert!((feedback.after_response(&below, &two_sided, &[]) - 7.0 / 3.0).abs() < 1e-5);
        assert_eq!(feedback.weights, vec![0.1, 0.5, 1.0], "the two-sided signal is above the target");
    }

    #[test]
    fn the_section_carries_the_loops_calibrated_target() {
        let c = sample();
        let defaults = FeedbackLoop::new(&c);
        assert_eq!((defaults.target, defaults.hard_limit), (DEFAULT_TARGET, DEFAULT_HARD_LIMIT));
        let tuned = BiasConstraint { loop_target: 0.6, loop_hard_limit: 1.5, ..c.clone() };
        let read = BiasConstraint::from_section(&tuned.to_section().unwrap()).unwrap();
        assert_eq!(read, tuned);
        let feedback = FeedbackLoop::new(&read);
        assert_eq!((feedback.target, feedback.hard_limit), (0.6, 1.5));
        // A response at 0.5 (layer 2 at 1.5 deviations) is above the default target, not above this one.
        let mut feedback = FeedbackLoop::new(&read);
        feedback.after_response(&stats(&[0.1, -0.2, 0.3 + 0.5 * 3.0]), &read, &[]);
        assert_eq!(feedback.weights, c.weights, "below the calibrated target the weights stay");
        for bad in [-1.0, f32::NAN, f32::INFINITY] {
            let error = BiasConstraint { loop_target: bad, ..c.clone() }.to_section().unwrap_err();
            assert!(error.message().contains("loop target"), "{error}");
        }
        let mut damaged = tuned.to_section().unwrap();
        damaged[28..32].copy_from_slice(&(-2.0f32).to_le_bytes());
        let error = BiasConstraint::from_section(&damaged).unwrap_err();
        assert!(error.message().contains("loop hard limit"), "{error}");
    }

    #[test]
    fn state_round_trips_and_refuses_damage() {
        let c = sample();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bias.state");
        let mut feedback = FeedbackLoop::new(&c);
        assert!(!feedback.restore(&path).unwrap(), "no file: nothing restored");
        feedback.after_response(&stats(&[3.0, 3.0, 3.0]), &c, &[]);
        feedback.save(&path).unwrap();
        let mut restored = FeedbackLoop::new(&c);
        assert!(restored.restore(&path).unwrap());
        assert_eq!(
            (&restored.weights, restored.responses, &restored.recent),
            (&feedback.weights, feedback.responses, &feedback.recent)
        );
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("weights 0", "weights 1", 1)).unwrap();
        let error = FeedbackLoop::new(&c).restore(&path).unwrap_err();
        assert!(error.message().contains("checksum"), "{error}");
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        assert!(FeedbackLoop::new(&c).restore(&path).is_err(), "a torn file is refused");
    }

    /// The bytes an older build wrote for `c` as section `version` 1 or 2:
    /// a 32- or 48-byte header, then directions, weights, baseline mean and
    /// std, and (version 2, centre word 2) the midpoints. Written out here
    /// rather than by the code under test, so it stays what those builds wrote.
    fn legacy_section(c: &BiasConstraint, version: u32) -> Vec<u8> {
        let mut payload = Vec::new();
        for v in c.directions.iter().chain(&c.weights).chain(&c.baseline_mean).chain(&c.baseline_std) {
            payload.extend_from_slice(&v.to_le_bytes());
        }
        if let Centre::Midpoint(midpoint) = &c.centre {
            midpoint.iter().for_each(|v| payload.extend_from_slice(&v.to_le_bytes()));
        }
        let centre = match c.centre {
            Centre::Zero => 0u32,
            Centre::Baseline => 1,
            _ => 2,
        };
        let mut words = vec![version, c.layers as u32, c.dim as u32, crc32fast::hash(&payload)];
        words.extend([c.kind.code(), centre, c.loop_target.to_bits(), c.loop_hard_limit.to_bits()]);
        if version == 2 {
            words.extend([c.signal.code(), 0, 0, 0]);
        }
        let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.extend_from_slice(&payload);
        out
    }

    /// `bytes` with the header's checksum made to match its payload again
    /// (to reach the checks after it).
    fn resealed(mut bytes: Vec<u8>) -> Vec<u8> {
        let sum = crc32fast::hash(&bytes[HEADER_BYTES..]);
        bytes[12..16].copy_from_slice(&sum.to_le_bytes());
        bytes
    }

    /// A version 3 constraint with every new field set.
    fn pronoun_sample() -> BiasConstraint {
        BiasConstraint {
            kind: DirectionKind::Stereotype,
            signal: LoopSignal::PronounShare,
            centre: Centre::Parity(vec![0.25, -0.5, 1.5]),
            max_weights: vec![0.4, 0.5, 1.0],
            weights: vec![0.0, 0.5, 0.75],
            she_tokens: vec![10, 11, 12],
            he_tokens: vec![20, 21],
            gates: CalibrationGates { evaluated: gate::ALL, passed: gate::ALL & !gate::SKEW },
            loop_target: 0.15,
            ..sample()
        }
    }

    #[test]
    fn section_round_trips_and_refuses_damage() {
        let c = sample();
        let bytes = c.to_section().unwrap();
        assert_eq!(u32::from_le_bytes(bytes[0..4].try_into().unwrap()), VERSION_ORTHOGONAL, "no read vectors: 3");
        assert_eq!(BiasConstraint::from_section(&bytes).unwrap(), c);
        let principal = BiasConstraint { kind: DirectionKind::PrincipalComponent, ..c.clone() };
        let principal_bytes = principal.to_section().unwrap();
        assert_eq!(BiasConstraint::from_section(&principal_bytes).unwrap(), principal);
        let mut unknown = principal_bytes.clone();
        unknown[16] = 7;
        let error = BiasConstraint::from_section(&unknown).unwrap_err();
        assert!(error.message().contains("direction kind 7"), "{error}");
        let centred = BiasConstraint { centre: Centre::Baseline, ..principal };
        let centred_bytes = centred.to_section().unwrap();
        assert_eq!(BiasConstraint::from_section(&centred_bytes).unwrap(), centred);
        assert_eq!((centred.centre(2), c.centre(2)), (0.3, 0.0));
        let mut unknown = centred_bytes.clone();
        unknown[20] = 4;
        let error = BiasConstraint::from_section(&unknown).unwrap_err();
        assert!(error.message().contains("centre flag 4"), "{error}");
        unknown[20] = 2;
        let error = BiasConstraint::from_section(&unknown).unwrap_err();
        assert!(error.message().contains("bytes"), "centre word 2 without its midpoints: {error}");
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
        let mut bad = c.clone();
        bad.directions[0] = 2.0;
        assert!(bad.to_section().unwrap_err().message().contains("unit vector"));
        // The loop signal; an unknown code is refused.
        let spread = BiasConstraint { signal: LoopSignal::Spread, ..c.clone() };
        let spread_bytes = spread.to_section().unwrap();
        assert_eq!(BiasConstraint::from_section(&spread_bytes).unwrap(), spread);
        let mut unknown = spread_bytes.clone();
        unknown[32] = 5;
        let error = BiasConstraint::from_section(&unknown).unwrap_err();
        assert!(error.message().contains("loop signal 5"), "{error}");
        // A midpoint (centre word 2) round-trips and moves the centre.
        let midpoint = BiasConstraint { centre: Centre::Midpoint(vec![0.5, -1.5, 2.5]), ..spread.clone() };
        let midpoint_bytes = midpoint.to_section().unwrap();
        assert_eq!(u32::from_le_bytes(midpoint_bytes[20..24].try_into().unwrap()), 2);
        assert_eq!(midpoint_bytes.len(), spread_bytes.len() + 3 * 4);
        assert_eq!(BiasConstraint::from_section(&midpoint_bytes).unwrap(), midpoint);
        assert_eq!((midpoint.centre(1), spread.centre(1)), (-1.5, 0.0));
        let mut short = midpoint.clone();
        short.centre = Centre::Midpoint(vec![0.5]);
        assert!(short.to_section().unwrap_err().message().contains("arrays do not match"));
        // (A midpoint and the baseline centre at once cannot be written: one `Centre`.)
        let not_finite = BiasConstraint { centre: Centre::Midpoint(vec![0.5, f32::NAN, 2.5]), ..midpoint.clone() };
        assert!(not_finite.to_section().unwrap_err().message().contains("midpoint"));
        let mut future = bytes;
        future[0..4].copy_from_slice(&5u32.to_le_bytes());
        let error = BiasConstraint::from_section(&future).unwrap_err();
        assert!(error.message().contains("version 5"), "{error}");
    }

    #[test]
    fn sections_of_versions_1_and_2_still_read_as_before() {
        let spread = BiasConstraint { signal: LoopSignal::Spread, ..sample() };
        // Version 2 reads with caps of 1, no pronoun ids, no gates.
        let read = BiasConstraint::from_section(&legacy_section(&spread, 2)).unwrap();
        assert_eq!(read, spread);
        assert_eq!(
            (read.max_weights.as_slice(), read.she_tokens.len(), read.he_tokens.len(), read.gates),
            (&[1.0, 1.0, 1.0][..], 0, 0, CalibrationGates { evaluated: 0, passed: 0 })
        );
        let midpoint = BiasConstraint { centre: Centre::Midpoint(vec![0.5, -1.5, 2.5]), ..spread.clone() };
        assert_eq!(BiasConstraint::from_section(&legacy_section(&midpoint, 2)).unwrap(), midpoint);
        // Version 1 (a 32-byte header, no signal word) reads as MeanLean.
        let v1 = legacy_section(&spread, 1);
        assert_eq!(v1.len(), HEADER_BYTES_V1 + 4 * (3 * 4 + 3 * 3));
        assert_eq!(BiasConstraint::from_section(&v1).unwrap(), sample());
        // Each version knows only the codes of its time.
        let error = BiasConstraint::from_section(&legacy_section(&midpoint, 1)).unwrap_err();
        assert!(error.message().contains("centre flag 2"), "{error}");
        let mut v2 = legacy_section(&spread, 2);
        v2[20] = 3;
        let error = BiasConstraint::from_section(&v2).unwrap_err();
        assert!(error.message().contains("centre flag 3") && error.message().contains("version 2"), "{error}");
        let mut v2 = legacy_section(&spread, 2);
        v2[32] = LoopSignal::PronounShare.code() as u8;
        let error = BiasConstraint::from_section(&v2).unwrap_err();
        assert!(error.message().contains("loop signal 2"), "{error}");
        let mut v2 = legacy_section(&spread, 2);
        v2[16] = DirectionKind::Stereotype.code() as u8;
        let error = BiasConstraint::from_section(&v2).unwrap_err();
        assert!(error.message().contains("direction kind 2"), "{error}");
        let error = BiasConstraint::from_section(&legacy_section(&spread, 2)[..40]).unwrap_err();
        assert!(error.message().contains("shorter than its version 2 header"), "{error}");
        // An old section written again is version 3, and reads back the same.
        let again = BiasConstraint::from_section(&read.to_section().unwrap()).unwrap();
        assert_eq!(again, spread);
    }

    #[test]
    fn a_version_3_section_round_trips_every_new_field() {
        let c = pronoun_sample();
        let bytes = c.to_section().unwrap();
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        assert_eq!((word(0), word(16), word(20), word(32)), (3, 2, 3, 2), "version, kind, centre, signal");
        assert_eq!((word(36), word(40), word(44), word(48)), (gate::ALL, gate::ALL & !gate::SKEW, 3, 2));
        assert!(bytes[52..64].iter().all(|b| *b == 0));
        // Directions, weights, mean, std, parity, caps (f32), then 3 + 2 ids (u32).
        assert_eq!(bytes.len(), HEADER_BYTES + 4 * (3 * 4 + 5 * 3 + 5));
        assert_eq!(bytes[bytes.len() - 8..], [20, 0, 0, 0, 21, 0, 0, 0], "the he ids last, in order");
        let read = BiasConstraint::from_section(&bytes).unwrap();
        assert_eq!(read, c);
        assert_eq!((read.centre(0), read.centre(2)), (0.25, 1.5));
        assert_eq!(read.count_pronouns(&[10, 5, 20, 21, 12, 12, 99]), (3, 2));
        // Unknown gate bits are kept as they are, not refused.
        let future = BiasConstraint { gates: CalibrationGates { evaluated: 0xff00, passed: 0x0f00 }, ..c.clone() };
        assert_eq!(BiasConstraint::from_section(&future.to_section().unwrap()).unwrap(), future);
    }

    #[test]
    fn damaged_version_3_sections_are_refused_by_name() {
        let c = pronoun_sample();
        let bytes = c.to_section().unwrap();
        let message = |bytes: &[u8]| BiasConstraint::from_section(bytes).unwrap_err().message().to_string();
        // Truncated anywhere: in the header, in the payload, in the ids.
        for cut in [0, 20, 40, 63, 64, 100, bytes.len() - 4, bytes.len() - 1] {
            let error = message(&bytes[..cut]);
            assert!(error.contains("bytes"), "cut at {cut}: {error}");
        }
        // Id counts that do not match the payload.
        let mut more = bytes.clone();
        more[44] = 4;
        let error = message(&more);
        assert!(error.contains("4 she and 2 he token ids"), "{error}");
        let mut huge = bytes.clone();
        huge[48..52].copy_from_slice(&u32::MAX.to_le_bytes());
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(message(&huge).contains("bytes"), "no overflow, no panic");
        // Centre word 3 without its values.
        let zero = BiasConstraint { centre: Centre::Zero, ..c.clone() }.to_section().unwrap();
        let mut parity = zero.clone();
        parity[20] = 3;
        let error = message(&parity);
        assert!(error.contains("values of centre word 3"), "{error}");
        // A cap below its layer's weight (layer 2: 0.75 under a cap of 0.5).
        let caps_at = HEADER_BYTES + 4 * (3 * 4 + 4 * 3);
        let mut capped = bytes.clone();
        capped[caps_at + 8..caps_at + 12].copy_from_slice(&0.5f32.to_le_bytes());
        let error = message(&resealed(capped));
        assert!(error.contains("max weight of layer 2 is 0.5, below its predefined weight 0.75"), "{error}");
        let mut capped = bytes.clone();
        capped[caps_at..caps_at + 4].copy_from_slice(&1.5f32.to_le_bytes());
        assert!(message(&resealed(capped)).contains("max weight of layer 0 is 1.5, outside [0, 1]"));
        // A parity value that is not finite.
        let mut parity = bytes.clone();
        let parity_at = HEADER_BYTES + 4 * (3 * 4 + 3 * 3);
        parity[parity_at..parity_at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(message(&resealed(parity)).contains("parity centre must be finite"));
        // Pronoun share without the ids it counts, and an id on both lists.
        let mut none = bytes.clone();
        none[44..52].fill(0);
        let ids = 5 * 4;
        let none = resealed(none[..none.len() - ids].to_vec());
        assert!(message(&none).contains("pronoun-share with 0 she and 0 he token ids"), "{}", message(&none));
        let both = BiasConstraint { he_tokens: vec![20, 11], ..c.clone() };
        assert!(both.to_section().unwrap_err().message().contains("token id 11 is both"));
        // A bad code in the new words.
        let mut unknown = bytes.clone();
        unknown[32] = 3;
        assert!(message(&unknown).contains("loop signal 3 is not one of 0 to 2"));
        let mut unknown = bytes;
        unknown[16] = 3;
        assert!(message(&unknown).contains("direction kind 3"));
    }

    /// [`pronoun_sample`] with read vectors: layer `l` reads `e_l + 0.5 e_{l+1}`
    /// (wrapping), whose product with `d_l = e_l` is 1.
    fn whitened_sample() -> BiasConstraint {
        let c = pronoun_sample();
        let mut readouts = c.directions.clone();
        for l in 0..c.layers {
            readouts[l * c.dim + (l + 1) % c.dim] = 0.5;
        }
        BiasConstraint { readouts: Some(readouts), ..c }
    }

    #[test]
    fn a_version_4_section_carries_read_vectors_and_refuses_bad_ones() {
        let c = whitened_sample();
        assert_eq!((c.readout(1), c.direction(1)), (&[0.0, 1.0, 0.5, 0.0][..], &[0.0, 1.0, 0.0, 0.0][..]));
        let bytes = c.to_section().unwrap();
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        assert_eq!((word(0), word(52)), (4, 1), "version 4, read vectors flagged");
        // Version 3's layout, then the read vectors before the ids.
        let orthogonal = pronoun_sample().to_section().unwrap();
        assert_eq!(bytes.len(), orthogonal.len() + 4 * 3 * 4);
        assert_eq!(bytes[bytes.len() - 8..], orthogonal[orthogonal.len() - 8..], "the ids still last");
        let read = BiasConstraint::from_section(&bytes).unwrap();
        assert_eq!(read, c);
        assert_eq!(pronoun_sample().readout(1), pronoun_sample().direction(1), "no read vectors: d itself");
        let message = |bytes: &[u8]| BiasConstraint::from_section(bytes).unwrap_err().message().to_string();
        // Without the flag (or without the vectors) the sizes disagree; an unknown flag is refused.
        let mut unflagged = bytes.clone();
        unflagged[52] = 0;
        assert!(message(&unflagged).contains("bytes"), "{}", message(&unflagged));
        let mut unknown = bytes.clone();
        unknown[52] = 2;
        assert!(message(&unknown).contains("read vector flag 2 is not one of 0 to 1"), "{}", message(&unknown));
        let cut = bytes.len() - 5 * 4 - 4;
        let short = resealed([&bytes[..cut], &bytes[cut + 4..]].concat());
        assert!(message(&short).contains("read vectors"), "{}", message(&short));
        // Version 3 knows no read vectors: its word 13 is not read.
        let mut old = orthogonal.clone();
        old[52] = 1;
        assert_eq!(BiasConstraint::from_section(&old).unwrap(), pronoun_sample());
        // r · d must be 1, and r finite; the sizes must match.
        let mut off = whitened_sample();
        off.readouts.as_mut().unwrap()[4 + 1] = 0.5;
        let error = off.to_section().unwrap_err();
        assert!(error.message().contains("read vector of layer 1") && error.message().contains("0.5"), "{error}");
        let r_at = bytes.len() - 5 * 4 - 3 * 4 * 4;
        let mut not_finite = bytes.clone();
        not_finite[r_at + 8..r_at + 12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(message(&resealed(not_finite)).contains("read vector of layer 0"));
        let mut short = whitened_sample();
        short.readouts.as_mut().unwrap().pop();
        assert!(short.to_section().unwrap_err().message().contains("arrays do not match"));
    }

    /// Answers of `she` female and `he` male pronoun tokens (ids of
    /// [`pronoun_sample`]) among other tokens.
    fn answer(she: usize, he: usize) -> Vec<u32> {
        let mut tokens = vec![5, 6, 7];
        tokens.extend((0..she).map(|i| [10, 11, 12][i % 3]));
        tokens.extend((0..he).map(|i| [20, 21][i % 2]));
        tokens.push(8);
        tokens
    }

    /// The pronoun-share loop's section: the default target (0.10).
    fn share_sample() -> BiasConstraint {
        BiasConstraint { loop_target: 0.0, ..pronoun_sample() }
    }

    #[test]
    fn all_he_answers_raise_every_capped_layer_to_its_cap_and_read_negative() {
        let c = BiasConstraint { max_weights: vec![0.0, 0.5, 1.0], weights: vec![0.0, 0.5, 0.75], ..share_sample() };
        let mut feedback = FeedbackLoop::new(&c);
        assert_eq!((feedback.target, feedback.signal), (DEFAULT_SHARE_TARGET, LoopSignal::PronounShare));
        let projections = stats(&[0.1, -0.2, 0.3]);
        let first = feedback.after_response(&projections, &c, &answer(0, 2));
        assert_eq!(first, -0.05, "a tenth of the way from 0 to −0.5");
        assert_eq!(feedback.weights, c.weights, "one answer is under the target");
        assert_eq!(feedback.after_response(&projections, &c, &answer(0, 1)), -0.095);
        assert_eq!(feedback.weights, c.weights, "two answers are under the target");
        assert_eq!(feedback.after_response(&projections, &c, &answer(0, 1)), -0.1355);
        assert_eq!(feedback.weights, vec![0.0, 0.5, 0.85], "layer 0 is capped at 0, layer 1 is at its cap");
        let mut last = -0.1355;
        for _ in 0..8 {
            let signal = feedback.after_response(&projections, &c, &answer(0, 1));
            assert!(signal < last && signal < 0.0, "{signal} after {last}");
            last = signal;
        }
        assert_eq!(feedback.weights, vec![0.0, 0.5, 1.0], "each at its cap, none beyond");
        // Answers 3 to 11 were over the target: nine steps of the centre toward she.
        assert!((feedback.centre_shift + 9.0 * CENTRE_STEP).abs() < 1e-5, "{}", feedback.centre_shift);
        for l in 0..3 {
            let expected = c.centre(l) + feedback.centre_shift * c.baseline_std[l];
            assert!((feedback.centres[l] - expected).abs() < 1e-6, "layer {l}: {:?}", feedback.centres);
        }
        assert_eq!(feedback.responses, 11);
        assert_eq!(feedback.recent.last(), Some(&feedback.share_deviation));
        assert!(!feedback.exceeds_hard_limit(-0.5) && !feedback.exceeds_hard_limit(100.0), "no hard limit");
        // Observing moves the share the same way and never the weights.
        let mut observing = FeedbackLoop::new(&c);
        for _ in 0..5 {
            observing.observe(&projections, &c, &answer(0, 2));
        }
        assert!(observing.share_deviation < -DEFAULT_SHARE_TARGET);
        assert_eq!((observing.weights.clone(), observing.responses), (c.weights.clone(), 5));
        assert_eq!((observing.centre_shift, &observing.centres), (0.0, &FeedbackLoop::new(&c).centres));
    }

    #[test]
    fn answers_about_women_and_men_in_turn_cancel_and_leave_the_weights() {
        let c = share_sample();
        let mut feedback = FeedbackLoop::new(&c);
        let projections = stats(&[0.1, -0.2, 0.3]);
        // From a cold start the first answer moves the deviation by 0.05,
        // under the target of 0.10; the turns then hold it within ±1/38 (the
        // 2-cycle of x → 0.9x ± 0.05 settles at ±0.05/1.9), so the weights
        // never rise and stay exactly the predefined ones.
        let mut over = Vec::new();
        for i in 0..100 {
            let turn = if i % 2 == 0 { answer(2, 0) } else { answer(0, 3) };
            let signal = feedback.after_response(&projections, &c, &turn);
            if signal.abs() > feedback.target {
                over.push(i);
            }
            if i == 0 {
                assert_eq!(signal, 0.05);
            }
            assert_eq!(feedback.weights, c.weights, "after answer {i}");
            assert_eq!(feedback.centre_shift, 0.0, "after answer {i}");
        }
        assert_eq!(over, Vec::<usize>::new(), "not even the cold start is over the target");
        assert!((feedback.share_deviation.abs() - 0.05 / 1.9).abs() < 1e-5, "{}", feedback.share_deviation);
    }

    #[test]
    fn a_male_run_raises_the_weights_and_a_balanced_run_decays_them_back() {
        let c = share_sample();
        let mut feedback = FeedbackLoop::new(&c);
        let projections = stats(&[0.1, -0.2, 0.3]);
        // Over the target from the third answer; layer 0 needs four steps to its cap of 0.4.
        for _ in 0..16 {
            feedback.after_response(&projections, &c, &answer(0, 1));
        }
        assert_eq!(feedback.weights, c.max_weights, "at the caps");
        assert!(feedback.share_deviation < -0.4, "−0.5 (1 − 0.9¹⁶) = −0.407: {}", feedback.share_deviation);
        for i in 0..60 {
            feedback.after_response(&projections, &c, &if i % 2 == 0 { answer(1, 0) } else { answer(0, 1) });
        }
        assert!(feedback.share_deviation.abs() < feedback.target, "{}", feedback.share_deviation);
        for (w, p) in feedback.weights.iter().zip(&c.weights) {
            assert!((w - p).abs() < 1e-3, "{:?}", feedback.weights);
        }
        // The centre moved toward she while the share was out of the band and
        // holds where it got to once it is back in (an integral term).
        let shift = feedback.centre_shift;
        assert!(shift <= -14.0 * CENTRE_STEP + 1e-5, "answers 3 to 16 at least: {shift}");
        for i in 0..20 {
            feedback.after_response(&projections, &c, &if i % 2 == 0 { answer(1, 0) } else { answer(0, 1) });
        }
        assert_eq!(feedback.centre_shift, shift, "inside the band the centre holds");
        // An answer with as many she as he pronouns reads 0 and pulls the
        // deviation a tenth of the way toward it (written as the loop rounds
        // it in f32: 0.9 · before can differ in the last bit).
        let before = feedback.share_deviation;
        assert_eq!(feedback.after_response(&projections, &c, &answer(2, 2)), before - 0.1 * before);
    }

    #[test]
    fn a_too_female_running_share_moves_the_centre_toward_he_and_leaves_the_weights() {
        let c = share_sample();
        let mut feedback = FeedbackLoop::new(&c);
        let projections = stats(&[0.1, -0.2, 0.3]);
        for _ in 0..8 {
            let signal = feedback.after_response(&projections, &c, &answer(3, 0));
            assert!(signal > 0.0);
        }
        // Over the target from the third answer (0.1355): six steps up.
        assert!((feedback.centre_shift - 6.0 * CENTRE_STEP).abs() < 1e-5, "{}", feedback.centre_shift);
        for l in 0..3 {
            let expected = c.centre(l) + feedback.centre_shift * c.baseline_std[l];
            assert!((feedback.centres[l] - expected).abs() < 1e-6, "layer {l}: {:?}", feedback.centres);
        }
        assert_eq!(feedback.weights, c.weights, "pulling harder toward a centre that is too female would not help");
        // Mostly female answers (3 she to 1 he: s = +0.25) go over the target
        // too, from the fifth (0.25 (1 − 0.9⁵) = 0.102): eight steps in twelve answers.
        let mut mostly = FeedbackLoop::new(&c);
        for _ in 0..12 {
            mostly.after_response(&projections, &c, &answer(3, 1));
        }
        assert!((mostly.share_deviation - 0.25 * (1.0 - 0.9f32.powi(12))).abs() < 1e-6);
        assert!((mostly.centre_shift - 8.0 * CENTRE_STEP).abs() < 1e-5, "{}", mostly.centre_shift);
        assert_eq!(mostly.weights, c.weights);
        // However long it runs, the centre moves at most MAX_CENTRE_SHIFT.
        for _ in 0..100 {
            feedback.after_response(&projections, &c, &answer(1, 0));
        }
        assert_eq!(feedback.centre_shift, MAX_CENTRE_SHIFT);
        assert_eq!(feedback.snapshot().centre_shift, MAX_CENTRE_SHIFT);
    }

    #[test]
    fn answers_without_a_gendered_pronoun_change_nothing() {
        let c = share_sample();
        let mut feedback = FeedbackLoop::new(&c);
        let projections = stats(&[0.1 + 2.0, -0.2, 0.3]);
        feedback.after_response(&projections, &c, &answer(0, 1));
        let before = (feedback.weights.clone(), feedback.share_deviation, feedback.responses, feedback.recent.clone());
        for none in [answer(0, 0), Vec::new()] {
            assert_eq!(feedback.after_response(&projections, &c, &none), before.1, "the running deviation");
            assert_eq!(feedback.observe(&projections, &c, &none), before.1);
        }
        assert_eq!(
            (feedback.weights.clone(), feedback.share_deviation, feedback.responses, feedback.recent.clone()),
            before
        );
        // The lean is still measured, for reports: from the parity centre, in baseline deviations.
        let lean = ((2.1 - 0.25) / 1.0 + (-0.2 + 0.5) / 2.0 + (0.3 - 1.5) / 0.5) / 3.0;
        assert!((feedback.last_lean - lean).abs() < 1e-5, "{}", feedback.last_lean);
        assert!((feedback.signal(&projections, &c) - lean).abs() < 1e-5);
        let snapshot = feedback.snapshot();
        assert_eq!(
            (snapshot.signal, snapshot.share_deviation, snapshot.lean),
            ("pronoun-share", before.1, feedback.last_lean)
        );
    }

    #[test]
    fn the_loop_caps_each_layer_for_the_projection_signals_too() {
        let c = BiasConstraint { max_weights: vec![0.05, 0.5, 1.0], ..sample() };
        let mut feedback = FeedbackLoop::new(&c);
        // Layer 0 far toward the stereotype: the only layer of the top quarter, capped at 0.05.
        feedback.after_response(&stats(&[0.1 + 3.0, -0.2, 0.3]), &c, &[]);
        assert_eq!(feedback.weights, vec![0.05, 0.5, 1.0]);
    }

    #[test]
    fn state_version_3_keeps_the_share_and_the_centre_and_older_versions_restore_without() {
        let c = share_sample();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bias.state");
        let mut feedback = FeedbackLoop::new(&c);
        for _ in 0..3 {
            feedback.after_response(&stats(&[0.1, -0.2, 0.3]), &c, &answer(0, 1));
        }
        feedback.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("bramble-bias-state 3\n") && text.contains("\nshare -0.1355\ncentre -0.02\ncrc32 "),
            "{text}"
        );
        let mut restored = FeedbackLoop::new(&c);
        assert!(restored.restore(&path).unwrap());
        assert_eq!(
            (&restored.weights, restored.responses, &restored.recent, restored.share_deviation),
            (&feedback.weights, feedback.responses, &feedback.recent, feedback.share_deviation)
        );
        assert_eq!((restored.centre_shift, &restored.centres), (feedback.centre_shift, &feedback.centres));
        // A version 2 file: the share, and the section's centres.
        let reseal = |body: &str| format!("{body}crc32 {:08x}\n", crc32fast::hash(body.as_bytes()));
        let body = "bramble-bias-state 2\nlayers 3\nresponses 7\nweights 0.1 0.5 0.75\nrecent\nshare -0.25\n";
        std::fs::write(&path, reseal(body)).unwrap();
        let mut two = FeedbackLoop::new(&c);
        assert!(two.restore(&path).unwrap());
        assert_eq!((two.share_deviation, two.centre_shift, &two.centres), (-0.25, 0.0, &FeedbackLoop::new(&c).centres));
        // A version 1 file, as older builds wrote it: no share line.
        let body = "bramble-bias-state 1\nlayers 3\nresponses 7\nweights 0.1 0.5 0.75\nrecent 0.5 -0.25\n";
        std::fs::write(&path, format!("{body}crc32 {:08x}\n", crc32fast::hash(body.as_bytes()))).unwrap();
        let mut old = FeedbackLoop::new(&c);
        old.share_deviation = 0.3;
        assert!(old.restore(&path).unwrap());
        assert_eq!(
            (old.weights.clone(), old.responses, old.recent.clone()),
            (vec![0.1, 0.5, 0.75], 7, vec![0.5, -0.25])
        );
        assert_eq!(old.share_deviation, 0.0);
        // A share or a centre shift out of range, a weight over its cap: refused, by name.
        let body = "bramble-bias-state 3\nlayers 3\nresponses 7\nweights 0.1 0.5 0.75\nrecent\nshare 0\ncentre 0.75\n";
        std::fs::write(&path, reseal(body)).unwrap();
        assert!(FeedbackLoop::new(&c).restore(&path).unwrap_err().message().contains("centre shift 0.75"));
        let body = "bramble-bias-state 3\nlayers 3\nresponses 7\nweights 0.1 0.5 0.75\nrecent\nshare 0\n";
        std::fs::write(&path, reseal(body)).unwrap();
        assert!(FeedbackLoop::new(&c).restore(&path).unwrap_err().message().contains("\"centre\" line"));
        let body = "bramble-bias-state 2\nlayers 3\nresponses 7\nweights 0.1 0.5 0.75\nrecent\nshare 0.75\n";
        std::fs::write(&path, reseal(body)).unwrap();
        assert!(FeedbackLoop::new(&c).restore(&path).unwrap_err().message().contains("share deviation 0.75"));
        let body = "bramble-bias-state 2\nlayers 3\nresponses 7\nweights 0.5 0.5 0.75\nrecent\nshare 0\n";
        std::fs::write(&path, reseal(body)).unwrap();
        let error = FeedbackLoop::new(&c).restore(&path).unwrap_err();
        assert!(error.message().contains("weight of layer 0 is 0.5, above the section's cap 0.4"), "{error}");
        let body = "bramble-bias-state 2\nlayers 3\nresponses 7\nweights 0.1 0.5 0.75\nrecent\n";
        std::fs::write(&path, reseal(body)).unwrap();
        assert!(FeedbackLoop::new(&c).restore(&path).unwrap_err().message().contains("\"share\" line"));
    }

    #[test]
    fn the_spread_signal_is_the_rms_departure_from_neutral_text() {
        let c = BiasConstraint { signal: LoopSignal::Spread, ..sample() };
        // Per layer, projections p_t; the signal is mean_l sqrt(mean_t (p − mean_l)²) / std_l.
        let record = |per_layer: &[&[f64]]| ProjectionStats {
            tokens: per_layer[0].len() as u64,
            sum: per_layer.iter().map(|p| p.iter().sum()).collect(),
            sum_squares: per_layer.iter().map(|p| p.iter().map(|v| v * v).sum()).collect(),
        };
        // Each layer's tokens one baseline deviation either side of its mean: 1 on every layer.
        let neutral = record(&[&[1.1, -0.9], &[-2.2, 1.8], &[0.8, -0.2]]);
        let mut feedback = FeedbackLoop::new(&c);
        assert!((feedback.signal(&neutral, &c) - 1.0).abs() < 1e-5);
        // The same departures, all on one side: still 1 (the mean lean would read 1 here and 0 above).
        let one_side = record(&[&[1.1, 1.1], &[1.8, 1.8], &[0.8, 0.8]]);
        assert!((feedback.signal(&one_side, &c) - 1.0).abs() < 1e-5);
        // One token 4 deviations out on layer 0 among three at the mean:
        // layer 0 reads sqrt(16 / 4) = 2, the others 0.
        let spike = record(&[&[4.1, 0.1, 0.1, 0.1], &[-0.2; 4], &[0.3; 4]]);
        assert!((feedback.signal(&spike, &c) - 2.0 / 3.0).abs() < 1e-5);
        let spike_down = record(&[&[-3.9, 0.1, 0.1, 0.1], &[-0.2; 4], &[0.3; 4]]);
        assert!((feedback.signal(&spike_down, &c) - 2.0 / 3.0).abs() < 1e-5, "either way counts");
        // Above the target (default 0.25) it raises the layer that departed.
        feedback.after_response(&spike, &c, &[]);
        assert_eq!(feedback.weights, vec![0.1, 0.5, 1.0]);
    }
}
