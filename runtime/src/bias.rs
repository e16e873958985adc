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
//! projection (its mean and standard deviation over neutral text, or in
//! older sections over the calibration pairs' own sentences) is stored with
//! the directions, so a response's bias signal can be measured against it. Byte layout in `models/FORMAT.md` (section `bias`).

use crate::error::{Error, Result};

/// Section name.
pub const SECTION: &str = "bias";
/// Section version this code writes (it also reads version 1, whose
/// 32-byte header has no `signal` word: [`LoopSignal::MeanLean`]).
pub const VERSION: u32 = 2;
const HEADER_BYTES: usize = 48;
const HEADER_BYTES_V1: usize = 32;

/// How the directions were found, which decides how a response's signal reads them.
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
}

impl DirectionKind {
    /// The header's code (`reserved[0]`; 0 in sections written before it existed).
    pub fn code(self) -> u32 {
        match self {
            Self::MeanDifference => 0,
            Self::PrincipalComponent => 1,
        }
    }
    /// The kind of a header code.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(Self::MeanDifference),
            1 => Some(Self::PrincipalComponent),
            _ => None,
        }
    }
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::MeanDifference => "mean-difference",
            Self::PrincipalComponent => "principal",
        }
    }
}

/// How the feedback loop reads a response's projections, per layer, against
/// the neutral baseline `(mean_l, std_l)`; the response's signal is the mean
/// over the layers.
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
}

impl LoopSignal {
    /// The header's code.
    pub fn code(self) -> u32 {
        match self {
            Self::MeanLean => 0,
            Self::Spread => 1,
        }
    }
    /// The signal of a header code.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(Self::MeanLean),
            1 => Some(Self::Spread),
            _ => None,
        }
    }
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::MeanLean => "mean-lean",
            Self::Spread => "spread",
        }
    }
}

/// The value the constraint moves each projection `h · d_l` toward
/// (the section header's centre word: 0, 1 or 2).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Centre {
    /// 0: `h ← h − w_l (h · d_l) d_l`, the first design's formula.
    #[default]
    Zero,
    /// The baseline mean: `h ← h − w_l (h · d_l − mean_l) d_l`, which
    /// leaves a token at the baseline alone.
    Baseline,
    /// Per layer, the midpoint of the calibration pairs' two sides at the
    /// swapped word (version 2 sections), where erasing the direction
    /// leaves a token between the two genders, not at 0.
    Midpoint(Vec<f32>),
}

impl Centre {
    /// The header's centre word.
    fn code(&self) -> u32 {
        match self {
            Self::Zero => 0,
            Self::Baseline => 1,
            Self::Midpoint(_) => 2,
        }
    }
}

/// Directions, predefined weights and the neutral baseline, per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct BiasConstraint {
    /// How the directions were found.
    pub kind: DirectionKind,
    /// How the feedback loop reads a response against the baseline.
    pub signal: LoopSignal,
    /// What the constraint moves `h · d_l` toward.
    pub centre: Centre,
    /// Layers.
    pub layers: usize,
    /// Width of the residual stream.
    pub dim: usize,
    /// `d_l`, unit vectors, `layers × dim`.
    pub directions: Vec<f32>,
    /// The predefined constraint weights `w_l` (`--feedback static`).
    pub weights: Vec<f32>,
    /// Mean of `h · d_l` over the neutral baseline, per layer.
    pub baseline_mean: Vec<f32>,
    /// Its standard deviation over tokens, per layer (> 0).
    pub baseline_std: Vec<f32>,
    /// The feedback loop's target signal, measured at calibration (0: the
    /// loop's default, [`DEFAULT_TARGET`]).
    pub loop_target: f32,
    /// The signal above which a response is regenerated (0: [`DEFAULT_HARD_LIMIT`]).
    pub loop_hard_limit: f32,
}

/// The loop's target when the section does not set one.
pub const DEFAULT_TARGET: f32 = 0.25;
/// The loop's hard limit when the section does not set one.
pub const DEFAULT_HARD_LIMIT: f32 = 2.0;

impl BiasConstraint {
    /// Direction `l`.
    pub fn direction(&self, l: usize) -> &[f32] {
        &self.directions[l * self.dim..(l + 1) * self.dim]
    }

    /// The value layer `l`'s constraint moves `h · d_l` toward.
    pub fn centre(&self, l: usize) -> f32 {
        match &self.centre {
            Centre::Zero => 0.0,
            Centre::Baseline => self.baseline_mean[l],
            Centre::Midpoint(midpoint) => midpoint[l],
        }
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
            || matches!(&self.centre, Centre::Midpoint(m) if m.len() != layers)
        {
            return bad(format!("arrays do not match {layers} layers of width {dim}"));
        }
        if matches!(&self.centre, Centre::Midpoint(m) if !m.iter().all(|v| v.is_finite())) {
            return bad("a midpoint must be finite".into());
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
            if !(0.0..=1.0).contains(&self.weights[l]) {
                return bad(format!("weight of layer {l} is {}, outside [0, 1]", self.weights[l]));
            }
            let spread = self.baseline_std[l];
            if !self.baseline_mean[l].is_finite() || spread.is_nan() || spread <= 0.0 || spread.is_infinite() {
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
        if bytes.len() < HEADER_BYTES_V1 {
            return Err(corrupt(format!("{} bytes is shorter than its header", bytes.len())));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let header_bytes = match u32_at(0) {
            1 => HEADER_BYTES_V1,
            VERSION => HEADER_BYTES,
            other => {
                return Err(Error::unsupported(format!(
                    "section bias version {other} (this reader knows 1 and {VERSION})"
                )))
            }
        };
        if bytes.len() < header_bytes {
            return Err(corrupt(format!("{} bytes is shorter than its header", bytes.len())));
        }
        let signal = if header_bytes == HEADER_BYTES_V1 {
            LoopSignal::MeanLean
        } else {
            LoopSignal::from_code(u32_at(32))
                .ok_or_else(|| corrupt(format!("loop signal {} is neither 0 nor 1", u32_at(32))))?
        };
        let (layers, dim) = (u32_at(4) as usize, u32_at(8) as usize);
        let kind = DirectionKind::from_code(u32_at(16))
            .ok_or_else(|| corrupt(format!("direction kind {} is neither 0 nor 1", u32_at(16))))?;
        let has_midpoint = match u32_at(20) {
            0 | 1 => false,
            2 if header_bytes == HEADER_BYTES => true,
            other => return Err(corrupt(format!("centre flag {other} is neither 0, 1 nor 2 (version 2)"))),
        };
        let per_layer = if has_midpoint { 4 } else { 3 };
        let values = layers
            .checked_mul(dim)
            .and_then(|n| n.checked_add(per_layer * layers))
            .ok_or_else(|| corrupt(format!("{layers} × {dim} overflows")))?;
        let expected = values.checked_mul(4).and_then(|n| n.checked_add(header_bytes));
        if expected != Some(bytes.len()) {
            return Err(corrupt(format!(
                "{} bytes, but {layers} layers of width {dim} take {expected:?}",
                bytes.len()
            )));
        }
        let payload = &bytes[header_bytes..];
        if crc32fast::hash(payload) != u32_at(12) {
            return Err(corrupt("checksum does not match its contents".into()));
        }
        let floats: Vec<f32> = payload.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let (directions, rest) = floats.split_at(layers * dim);
        let constraint = Self {
            kind,
            signal,
            centre: match u32_at(20) {
                0 => Centre::Zero,
                1 => Centre::Baseline,
                _ => Centre::Midpoint(rest[3 * layers..].to_vec()),
            },
            layers,
            dim,
            directions: directions.to_vec(),
            weights: rest[..layers].to_vec(),
            baseline_mean: rest[layers..2 * layers].to_vec(),
            baseline_std: rest[2 * layers..3 * layers].to_vec(),
            loop_target: f32::from_bits(u32_at(24)),
            loop_hard_limit: f32::from_bits(u32_at(28)),
        };
        constraint.check()?;
        Ok(constraint)
    }

    /// The section's bytes.
    pub fn to_section(&self) -> Result<Vec<u8>> {
        self.check().map_err(|e| Error::invalid(e.message().to_string()))?;
        let mut payload = Vec::with_capacity(4 * (self.directions.len() + 4 * self.layers));
        let midpoint: &[f32] = match &self.centre {
            Centre::Midpoint(midpoint) => midpoint,
            _ => &[],
        };
        for v in self
            .directions
            .iter()
            .chain(&self.weights)
            .chain(&self.baseline_mean)
            .chain(&self.baseline_std)
            .chain(midpoint)
        {
            payload.extend_from_slice(&v.to_le_bytes());
        }
        let mut out = vec![0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&VERSION.to_le_bytes());
        out[4..8].copy_from_slice(&(self.layers as u32).to_le_bytes());
        out[8..12].copy_from_slice(&(self.dim as u32).to_le_bytes());
        out[12..16].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out[16..20].copy_from_slice(&self.kind.code().to_le_bytes());
        out[20..24].copy_from_slice(&self.centre.code().to_le_bytes());
        out[24..28].copy_from_slice(&self.loop_target.to_le_bytes());
        out[28..32].copy_from_slice(&self.loop_hard_limit.to_le_bytes());
        out[32..36].copy_from_slice(&self.signal.code().to_le_bytes());
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
/// signal from the projections recorded while it was generated, and the
/// constraint weights adjusted from it.
///
/// - Per layer, `z_l` as the section's [`LoopSignal`] says: with `Spread`
///   (the default since section version 2) the root mean square of
///   `(h · d_l − baseline mean) / baseline std` over the response's tokens,
///   how far it departed from neutral text either way; with `MeanLean`
///   (every version 1 section) `(mean of h · d_l − baseline mean) / baseline std`, how far
///   toward the stereotyped side its average ran (`|z_l|` for a
///   [`DirectionKind::PrincipalComponent`] direction, whose sign means nothing).
/// - The response's **signal** is the mean of `z_l` over the layers.
/// - Above `target`: the weights of the quarter of the layers with the
///   largest `z_l` rise by `step`, at most to `max_weight`. Otherwise every
///   weight decays a share `decay` of the way back to its predefined value.
/// - A signal above `hard_limit` asks the caller to regenerate (bounded by
///   the caller's retries).
///
/// The state (weights, count, recent signals) persists with
/// [`FeedbackLoop::save`]: a temporary file, fsync, rename, so a crash at
/// any moment leaves the old state or the new one.
#[derive(Debug, Clone)]
pub struct FeedbackLoop {
    /// The section's predefined weights.
    pub predefined: Vec<f32>,
    /// The weights in force.
    pub weights: Vec<f32>,
    /// Signal above which the weights rise.
    pub target: f32,
    /// Rise per response.
    pub step: f32,
    /// Highest weight the loop sets.
    pub max_weight: f32,
    /// Share of the way back to the predefined weights per calm response.
    pub decay: f32,
    /// Signal above which a response should be regenerated.
    pub hard_limit: f32,
    /// Responses seen.
    pub responses: u64,
    /// The last [`RECENT`] signals, oldest first.
    pub recent: Vec<f32>,
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
    /// Responses seen (restored ones included).
    pub responses: u64,
    /// Signal above which the weights rise.
    pub target: f32,
    /// Signal above which a response should be regenerated.
    pub hard_limit: f32,
}

/// How an image's bias constraint is used: the one policy `bramble`'s
/// `--feedback` and `brambled`'s `bias.feedback` both name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Feedback {
    /// Off until a calibration records that it passed the bias gates (erasing
    /// toward h·d = 0 wrote "she" out of answers); none does yet.
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

    /// What `auto` comes to for an image: off, with the reason, while no
    /// calibration records passed gates; any other policy stays as asked.
    pub fn resolve(self) -> (Feedback, Option<&'static str>) {
        match self {
            Feedback::Auto => (
                Feedback::Off,
                Some(
                    "`auto` turns it on only for an image whose calibration passed the bias gates, \
                     and none records that yet (the first design wrote \"she\" out of answers)",
                ),
            ),
            other => (other, None),
        }
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
const STATE_MAGIC: &str = "bramble-bias-state 1";

impl FeedbackLoop {
    /// A loop starting at the constraint's predefined weights, with its
    /// calibrated target and hard limit (or the defaults) and the default step and decay.
    pub fn new(constraint: &BiasConstraint) -> Self {
        let layers = constraint.layers;
        let or = |value: f32, default: f32| if value > 0.0 { value } else { default };
        Self {
            predefined: constraint.weights.clone(),
            weights: constraint.weights.clone(),
            target: or(constraint.loop_target, DEFAULT_TARGET),
            step: 0.1,
            max_weight: 1.0,
            decay: 0.25,
            hard_limit: or(constraint.loop_hard_limit, DEFAULT_HARD_LIMIT),
            responses: 0,
            recent: Vec::with_capacity(RECENT),
            z: vec![0.0; layers],
            order: vec![0.0; layers],
        }
    }

    /// The signal of the response whose projections `stats` holds (0 for none).
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
    /// policy): its signal, counted and remembered. Returns the signal.
    /// Allocates nothing.
    pub fn observe(&mut self, stats: &ProjectionStats, constraint: &BiasConstraint) -> f32 {
        let signal = self.signal(stats, constraint);
        if stats.tokens > 0 {
            self.remember(signal);
        }
        signal
    }

    /// Takes a finished response: its signal, the weights adjusted, the
    /// signal remembered. Returns the signal. Allocates nothing.
    pub fn after_response(&mut self, stats: &ProjectionStats, constraint: &BiasConstraint) -> f32 {
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
            for (w, &z) in self.weights.iter_mut().zip(&self.z) {
                if z >= cut {
                    *w = (*w + self.step).min(self.max_weight);
                }
            }
        } else {
            for (w, &p) in self.weights.iter_mut().zip(&self.predefined) {
                *w += self.decay * (p - *w);
            }
        }
        self.remember(signal);
        signal
    }

    /// Counts a response and keeps its signal among the last [`RECENT`].
    fn remember(&mut self, signal: f32) {
        self.responses += 1;
        if self.recent.len() == RECENT {
            self.recent.remove(0);
        }
        self.recent.push(signal);
    }

    /// Whether a response of this signal should be regenerated.
    pub fn exceeds_hard_limit(&self, signal: f32) -> bool {
        signal > self.hard_limit
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
    }

    fn to_text(&self) -> String {
        let list = |v: &[f32]| v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(" ");
        let body = format!(
            "{STATE_MAGIC}\nlayers {}\nresponses {}\nweights {}\nrecent {}\n",
            self.weights.len(),
            self.responses,
            list(&self.weights),
            list(&self.recent)
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
    /// and returns `false`.
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
        if lines.next() != Some(STATE_MAGIC) {
            return Err(bad(format!("does not begin with {STATE_MAGIC:?}")));
        }
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
        self.weights.copy_from_slice(&weights);
        self.responses = responses;
        self.recent.clear();
        self.recent.extend_from_slice(&recent);
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
        let (resolved, reason) = Feedback::Auto.resolve();
        assert_eq!(resolved, Feedback::Off);
        assert!(reason.unwrap().contains("bias gates"));
        assert_eq!(Feedback::Adaptive.resolve(), (Feedback::Adaptive, None));
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
            weights: vec![0.0, 0.5, 1.0],
            baseline_mean: vec![0.1, -0.2, 0.3],
            baseline_std: vec![1.0, 2.0, 0.5],
            loop_target: 0.0,
            loop_hard_limit: 0.0,
            signal: LoopSignal::MeanLean,
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
        let signal = feedback.after_response(&stats(&[0.1, -0.2, 0.3 + 0.5 * 3.0]), &c);
        assert!((signal - 1.0).abs() < 1e-5, "{signal}");
        assert_eq!(feedback.weights, vec![0.0, 0.5, 1.0], "layer 2 is at the maximum already");
        let signal = feedback.after_response(&stats(&[0.1 + 3.0, -0.2, 0.3]), &c);
        assert!(signal > feedback.target);
        assert_eq!(feedback.weights, vec![0.1, 0.5, 1.0]);
        // Calm responses decay toward the predefined weights.
        for _ in 0..40 {
            feedback.after_response(&stats(&[0.1, -0.2, 0.3]), &c);
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
        let signal = feedback.observe(&biased, &c);
        assert!(signal > feedback.target, "{signal}");
        assert_eq!(feedback.weights, c.weights, "observing never adjusts");
        assert_eq!((feedback.responses, feedback.recent.clone()), (1, vec![signal]));
        // A response with no projections is not counted.
        let empty = ProjectionStats::new(c.layers);
        assert_eq!(feedback.observe(&empty, &c), 0.0);
        assert_eq!(feedback.responses, 1);
        // Only the last RECENT signals are kept, oldest first, as after_response keeps them.
        let mut adjusting = FeedbackLoop::new(&c);
        adjusting.after_response(&biased, &c);
        for i in 0..RECENT + 3 {
            let response = stats(&[0.1 + i as f64, -0.2, 0.3]);
            feedback.observe(&response, &c);
            adjusting.after_response(&response, &c);
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
            }
        );
        let signal = feedback.after_response(&stats(&[0.1 + 3.0, -0.2, 0.3]), &c);
        assert_ne!(snapshot.weights, feedback.weights, "a snapshot is a copy");
        feedback.update_snapshot(&mut snapshot);
        assert_eq!(snapshot, feedback.snapshot());
        assert_eq!((snapshot.weights.clone(), snapshot.recent.clone()), (vec![0.1, 0.5, 1.0], vec![signal]));
        assert_eq!(snapshot.predefined, c.weights);
        assert_eq!(snapshot.responses, 1);
    }

    #[test]
    fn a_principal_direction_counts_a_lean_either_way() {
        let signed = sample();
        let two_sided = BiasConstraint { kind: DirectionKind::PrincipalComponent, ..signed.clone() };
        // Every layer below its neutral mean: layer 0 by 3 baseline deviations, the others by 2.
        let below = stats(&[0.1 - 3.0, -0.2 - 4.0, 0.3 - 1.0]);
        let mut feedback = FeedbackLoop::new(&signed);
        assert!((feedback.after_response(&below, &signed) + 7.0 / 3.0).abs() < 1e-5);
        assert_eq!(feedback.weights, signed.weights, "a signed signal below the target decays");
        let mut feedback = FeedbackLoop::new(&two_sided);
        assert!((feedback.after_response(&below, &two_sided) - 7.0 / 3.0).abs() < 1e-5);
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
        feedback.after_response(&stats(&[0.1, -0.2, 0.3 + 0.5 * 3.0]), &read);
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
        feedback.after_response(&stats(&[3.0, 3.0, 3.0]), &c);
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

    #[test]
    fn section_round_trips_and_refuses_damage() {
        let c = sample();
        let bytes = c.to_section().unwrap();
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
        unknown[20] = 3;
        let error = BiasConstraint::from_section(&unknown).unwrap_err();
        assert!(error.message().contains("centre flag 3"), "{error}");
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
        // The loop signal: version 2 carries it; an unknown code is refused.
        let spread = BiasConstraint { signal: LoopSignal::Spread, ..c.clone() };
        let spread_bytes = spread.to_section().unwrap();
        assert_eq!(BiasConstraint::from_section(&spread_bytes).unwrap(), spread);
        let mut unknown = spread_bytes.clone();
        unknown[32] = 5;
        let error = BiasConstraint::from_section(&unknown).unwrap_err();
        assert!(error.message().contains("loop signal 5"), "{error}");
        // A version 1 section (32-byte header, no signal word) reads as MeanLean.
        let mut v1 = [&spread_bytes[..HEADER_BYTES_V1], &spread_bytes[HEADER_BYTES..]].concat();
        v1[0..4].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(BiasConstraint::from_section(&v1).unwrap(), c);
        // A midpoint (centre word 2) round-trips, moves the centre, and a version 1 header cannot carry it.
        let midpoint = BiasConstraint { centre: Centre::Midpoint(vec![0.5, -1.5, 2.5]), ..spread.clone() };
        let midpoint_bytes = midpoint.to_section().unwrap();
        assert_eq!(u32::from_le_bytes(midpoint_bytes[20..24].try_into().unwrap()), 2);
        assert_eq!(midpoint_bytes.len(), spread_bytes.len() + 3 * 4);
        assert_eq!(BiasConstraint::from_section(&midpoint_bytes).unwrap(), midpoint);
        assert_eq!((midpoint.centre(1), spread.centre(1)), (-1.5, 0.0));
        let mut v1_midpoint = [&midpoint_bytes[..HEADER_BYTES_V1], &midpoint_bytes[HEADER_BYTES..]].concat();
        v1_midpoint[0..4].copy_from_slice(&1u32.to_le_bytes());
        let error = BiasConstraint::from_section(&v1_midpoint).unwrap_err();
        assert!(error.message().contains("centre flag 2"), "{error}");
        let mut short = midpoint.clone();
        short.centre = Centre::Midpoint(vec![0.5]);
        assert!(short.to_section().unwrap_err().message().contains("arrays do not match"));
        // (A midpoint and the baseline centre at once cannot be written: one `Centre`.)
        let not_finite = BiasConstraint { centre: Centre::Midpoint(vec![0.5, f32::NAN, 2.5]), ..midpoint.clone() };
        assert!(not_finite.to_section().unwrap_err().message().contains("midpoint"));
        let mut future = bytes;
        future[0..4].copy_from_slice(&3u32.to_le_bytes());
        let error = BiasConstraint::from_section(&future).unwrap_err();
        assert!(error.message().contains("version 3"), "{error}");
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
        feedback.after_response(&spike, &c);
        assert_eq!(feedback.weights, vec![0.1, 0.5, 1.0]);
    }
}
