//! `bramble convert --mixed auto`: spike-aware mixed precision ("Precision
//! Where It Matters", 2025).
//!
//! A few linear projections of a Llama model read inputs with activation
//! spikes: a handful of entries hundreds of times larger than the rest (in
//! Llama-2 typically `ffn_down` of the second and the last layers). A weight
//! column that meets such an entry has its quantization error multiplied by
//! it, so those projections are kept at a higher precision while the rest go
//! to 4 bits.
//!
//! 1. The source is converted to a temporary f16 image (the high-precision
//!    model; removed afterwards) and run over the calibration text in windows
//!    of `ctx` tokens.
//! 2. For every layer and each of the four linear inputs (q/k/v's, the output
//!    projection's, gate/up's, down's) the pass records the largest `|x|`
//!    exactly and estimates the median `|x|` from a uniform sample of the
//!    entries (a reservoir, [`crate::calibrate::Reservoir`]). The input's
//!    spike score is `max |x| / median |x|`.
//! 3. Rule: an input is chosen when its score is at least `ratio` times the
//!    median score of the same kind of input over all layers (default
//!    [`DEFAULT_RATIO`]), or, with `--mixed-keep N`, the `N` highest scores
//!    are. Kinds are compared with themselves because their tails differ by
//!    construction: `silu(gate) ⊙ up`, down's input, is heavy-tailed in every
//!    layer (SmolLM2: median score 237 against 30–67 for the other three), so
//!    one median over all inputs would take every `ffn_down`; the rule looks
//!    for the layers where an input is far spikier than its kind usually is.
//!    Every projection that
//!    reads a chosen input (q, k and v share one; gate and up share one) is
//!    written at the mixed precision (q8 unless told otherwise); the others
//!    take `--quant`. An explicit `--tensor-quant` still wins.
//!
//! The choice, the rule and every input's score are recorded in the image's
//! `source` section under `mixed` (`models/FORMAT.md`). `docs/mixed.md` has
//! the measurements on SmolLM2.

use crate::calibrate::{calibration_tokens, f16_calibration_image, observe_text, Reservoir};
use crate::convert::QuantTarget;
use crate::source::ModelSource;
use anyhow::{bail, ensure, Context, Result};
use bramble_runtime::model::{Model, Site};
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::ModelImage;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;

/// The default `ratio`: an input is chosen when its spike score is at least
/// this many times the median score of its kind (the same site in every layer).
pub const DEFAULT_RATIO: f64 = 4.0;

/// The four linear inputs of a layer, in the order scores are reported.
pub const SITES: [Site; 4] = [Site::AttentionInput, Site::AttentionOutput, Site::FfnInput, Site::FfnHidden];

/// A short name of a linear input, as recorded in the image.
pub fn site_name(site: Site) -> &'static str {
    match site {
        Site::AttentionInput => "attn_input",
        Site::AttentionOutput => "attn_output_input",
        Site::FfnInput => "ffn_input",
        Site::FfnHidden => "ffn_hidden",
        Site::Residual => "residual",
    }
}

fn site_index(site: Site) -> Option<usize> {
    SITES.iter().position(|&s| s == site)
}

/// `--mixed`: whether to choose per-projection precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixedMode {
    /// Every matrix takes `--quant` (and the overrides): today's behaviour.
    Off,
    /// Measure spikes on calibration text and keep the spiky projections at a higher precision.
    Auto,
}

impl MixedMode {
    /// Parses `off` or `auto`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "off" => Ok(Self::Off),
            "auto" => Ok(Self::Auto),
            other => bail!("unknown --mixed mode {other:?}: expected off or auto"),
        }
    }
}

/// How the spiky inputs are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selection {
    /// Every input whose score is at least this many times the median score of its kind.
    Ratio(f64),
    /// The this-many highest scores.
    Keep(usize),
}

/// The settings of `--mixed auto`.
#[derive(Debug, Clone)]
pub struct MixedOptions {
    /// The encoding chosen projections get (q8, f16 or f32).
    pub precision: QuantTarget,
    /// The rule.
    pub selection: Selection,
    /// Calibration tokens (the first ones of the text).
    pub tokens: usize,
    /// Window length: the model runs the text in windows of this many tokens.
    pub ctx: usize,
    /// Tokens per forward pass.
    pub batch: usize,
    /// Entries sampled per input to estimate its median `|x|`.
    pub samples: usize,
    /// Threads for the forward passes.
    pub threads: usize,
    /// Seed of the samples.
    pub seed: u64,
    /// Show progress on stderr.
    pub progress: bool,
}

impl Default for MixedOptions {
    fn default() -> Self {
        Self {
            precision: QuantTarget::Q8,
            selection: Selection::Ratio(DEFAULT_RATIO),
            tokens: 2048,
            ctx: 256,
            batch: 64,
            samples: 1 << 16,
            threads: 1,
            seed: 1,
            progress: false,
        }
    }
}

/// Bits a value takes in an encoding family (4-bit ones alike, a k-quant
/// counted by its levels' bits, but Q2_K by what it stores, 2.625: its
/// 4-bit scale and minimum per 16 values are a third of its bytes); `None`
/// for `keep`, whose bits are the source's, tensor by tensor.
fn bits(quant: QuantTarget) -> Option<f32> {
    match quant {
        QuantTarget::Q2K => Some(2.625),
        QuantTarget::Q3K => Some(3.0),
        QuantTarget::Q4 | QuantTarget::Q4S | QuantTarget::Q4B | QuantTarget::Q4K => Some(4.0),
        QuantTarget::Q5K | QuantTarget::Q5S => Some(5.0),
        // Q5_1: five bits and a minimum a block, 24 bytes for 32 values.
        QuantTarget::Q5 | QuantTarget::Q6K => Some(6.0),
        QuantTarget::Q8 => Some(8.0),
        QuantTarget::F16 => Some(16.0),
        QuantTarget::F32 => Some(32.0),
        QuantTarget::Keep => None,
    }
}

/// The lowercase name of a `--quant` choice.
pub fn quant_name(quant: QuantTarget) -> String {
    format!("{quant:?}").to_lowercase()
}

impl MixedOptions {
    /// Checks the options against the conversion's `--quant` before any work.
    pub fn check(&self, quant: QuantTarget) -> Result<()> {
        let (Some(kept), Some(rest)) = (bits(self.precision), bits(quant)) else {
            anyhow::bail!(
                "--mixed auto with --quant {} --mixed-precision {}: keep carries each tensor as the source has it, \
                 so there is no one precision to raise; give --quant an encoding",
                quant_name(quant),
                quant_name(self.precision)
            );
        };
        ensure!(
            kept > rest,
            "--mixed-precision {}: the kept projections must be more precise than --quant {}",
            quant_name(self.precision),
            quant_name(quant)
        );
        match self.selection {
            Selection::Ratio(ratio) => {
                ensure!(ratio.is_finite() && ratio > 1.0, "--mixed-ratio {ratio}: expected a number above 1")
            }
            Selection::Keep(n) => ensure!(n >= 1, "--mixed-keep 0: keep at least one input (or use --mixed off)"),
        }
        ensure!(self.tokens >= 2, "--calib-tokens {}: at least 2 calibration tokens are needed", self.tokens);
        ensure!(self.ctx >= 2, "calibration window of {} tokens: at least 2", self.ctx);
        ensure!(self.samples >= 1, "at least one sample per input is needed");
        Ok(())
    }
}

/// One linear input's spike measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InputScore {
    /// Layer.
    pub layer: usize,
    /// Which input ([`site_name`]).
    pub site: &'static str,
    /// Largest `|x|` seen.
    pub max: f32,
    /// Median `|x|` (estimated from the sample).
    pub median: f32,
    /// `max / median`.
    pub score: f64,
}

impl InputScore {
    /// The weight tensors that read this input.
    pub fn tensors(&self) -> Vec<String> {
        let site = SITES.into_iter().find(|&s| site_name(s) == self.site).expect("a linear input");
        site.modules().iter().map(|m| format!("blk.{}.{m}.weight", self.layer)).collect()
    }
}

/// The outcome of `--mixed auto`: what is kept at which precision, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MixedPlan {
    /// The encoding of the chosen projections.
    pub precision: String,
    /// The rule, in words (`score >= 4 x median score of its kind`, `top 2 scores`).
    pub rule: String,
    /// Calibration tokens run.
    pub tokens: usize,
    /// Per kind of input ([`site_name`]), the median score over the layers.
    pub medians: std::collections::BTreeMap<&'static str, f64>,
    /// The chosen inputs, highest score first.
    pub chosen: Vec<InputScore>,
    /// The weight tensors kept at `precision`.
    pub tensors: Vec<String>,
    /// Every input's score, by layer then site.
    #[serde(skip)]
    pub scores: Vec<InputScore>,
    /// The scores as recorded: per kind of input, one per layer (rounded to 0.1).
    #[serde(rename = "scores")]
    pub score_table: std::collections::BTreeMap<&'static str, Vec<f64>>,
    #[serde(skip)]
    precision_target: Option<QuantTarget>,
}

impl MixedPlan {
    /// The encoding family for tensor `name`, if the plan keeps it.
    pub fn target_for(&self, name: &str) -> Option<QuantTarget> {
        self.precision_target.filter(|_| self.tensors.iter().any(|t| t == name))
    }
}

fn bar(show: bool, length: u64) -> ProgressBar {
    let bar = if show { ProgressBar::new(length) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} spikes      [{bar:40}] {pos}/{len}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// Runs the model of `image` over `tokens` and scores every linear input.
pub fn measure(image: &ModelImage, tokens: &[u32], options: &MixedOptions) -> Result<Vec<InputScore>> {
    let threads = options.threads.clamp(1, bramble_runtime::kernels::pool::MAX_THREADS);
    let model = Model::with_options(image, bramble_runtime::kernels::Kernels::detect(), threads)?;
    let tokenizer = Tokenizer::new(image.vocab()).context("the calibration image's tokenizer")?;
    let layers = model.weights.layers.len();
    let mut max = vec![[0f32; 4]; layers];
    let mut reservoirs: Vec<[Reservoir; 4]> = (0..layers)
        .map(|l| std::array::from_fn(|s| Reservoir::new(options.samples, options.seed ^ (((l * 4 + s) as u64) << 20))))
        .collect();
    let mut non_finite: Option<(usize, Site)> = None;
    let progress = bar(options.progress, tokens.len() as u64);
    observe_text(&model, &tokenizer, tokens, (options.ctx, options.batch), &progress, &mut |layer, site, values| {
        let Some(s) = site_index(site) else { return };
        for &v in values {
            if !v.is_finite() {
                non_finite.get_or_insert((layer, site));
            } else if v.abs() > max[layer][s] {
                max[layer][s] = v.abs();
            }
        }
        // The sample's channel index is unused here; any width will do.
        reservoirs[layer][s].offer(values, values.len().max(1));
    })?;
    progress.finish_and_clear();
    if let Some((layer, site)) = non_finite {
        bail!("layer {layer}: the {} activations are not finite on the calibration text", site_name(site));
    }
    let mut scores = Vec::with_capacity(layers * 4);
    for (layer, sites) in reservoirs.iter_mut().enumerate() {
        for (s, reservoir) in sites.iter_mut().enumerate() {
            let mut magnitudes: Vec<f32> = reservoir.samples.iter().map(|&(v, _)| v.abs()).collect();
            let middle = magnitudes.len() / 2;
            let median = *magnitudes.select_nth_unstable_by(middle, f32::total_cmp).1;
            let max = max[layer][s];
            let score = if median > 0.0 {
                max as f64 / median as f64
            } else if max > 0.0 {
                f64::MAX
            } else {
                1.0
            };
            scores.push(InputScore { layer, site: site_name(SITES[s]), max, median, score });
        }
    }
    Ok(scores)
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// Per kind of input, the median score over the layers.
pub fn medians(scores: &[InputScore]) -> std::collections::BTreeMap<&'static str, f64> {
    SITES
        .iter()
        .map(|&site| {
            let kind: Vec<f64> = scores.iter().filter(|s| s.site == site_name(site)).map(|s| s.score).collect();
            (site_name(site), median(&kind))
        })
        .collect()
}

/// Applies the rule to the scores: the chosen inputs' indices, highest score first.
pub fn choose(scores: &[InputScore], selection: Selection) -> Result<Vec<usize>> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].score.total_cmp(&scores[a].score).then(a.cmp(&b)));
    match selection {
        Selection::Ratio(ratio) => {
            let medians = medians(scores);
            Ok(order.into_iter().filter(|&i| scores[i].score >= ratio * medians[scores[i].site]).collect())
        }
        Selection::Keep(n) => {
            ensure!(
                n <= scores.len(),
                "--mixed-keep {n}: this model has only {} linear inputs ({} layers x 4)",
                scores.len(),
                scores.len() / 4
            );
            order.truncate(n);
            Ok(order)
        }
    }
}

/// Measures `source`'s spikes on `text` and decides which projections keep
/// `options.precision`. `scratch` is a directory for the temporary f16 image
/// (the output's, so a large model does not fill `/tmp`).
pub fn plan(
    source: &dyn ModelSource,
    text: &str,
    quant: QuantTarget,
    scratch: &Path,
    options: &MixedOptions,
) -> Result<MixedPlan> {
    options.check(quant)?;
    let inputs = source.config().n_layers as usize * SITES.len();
    if let Selection::Keep(n) = options.selection {
        ensure!(
            n <= inputs,
            "--mixed-keep {n}: this model has only {inputs} linear inputs ({} layers x 4)",
            inputs / 4
        );
    }
    // The text is checked before any work: the source's own tokenizer is the image's.
    let tokenizer = Tokenizer::new(source.vocab()).context("the source's tokenizer")?;
    let tokens = calibration_tokens(&tokenizer, text, options.tokens).context("--calib-text")?;
    let (_dir, image) = f16_calibration_image(source, scratch, ".bramble-mixed-", options.progress)?;
    let scores = measure(&image, &tokens, options)?;
    drop(image);
    let chosen = choose(&scores, options.selection)?;
    let medians = medians(&scores);
    let chosen: Vec<InputScore> = chosen.into_iter().map(|i| scores[i].clone()).collect();
    let tensors = chosen.iter().flat_map(InputScore::tensors).collect();
    let rule = match options.selection {
        Selection::Ratio(ratio) => format!("score >= {ratio} x median score of its kind"),
        Selection::Keep(n) => format!("top {n} scores"),
    };
    Ok(MixedPlan {
        precision: quant_name(options.precision),
        rule,
        tokens: tokens.len(),
        medians,
        chosen,
        tensors,
        score_table: SITES
            .iter()
            .map(|&site| {
                let kind = scores.iter().filter(|s| s.site == site_name(site));
                (site_name(site), kind.map(|s| (s.score * 10.0).round() / 10.0).collect())
            })
            .collect(),
        scores,
        precision_target: Some(options.precision),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(layer: usize, site: Site, score: f64) -> InputScore {
        InputScore { layer, site: site_name(site), max: score as f32, median: 1.0, score }
    }

    #[test]
    fn ratio_rule_compares_each_input_with_its_kind() {
        // Five layers. Down's inputs score 100 in four layers and 1000 in
        // layer 3; the FFN inputs score 10, and 35 in layer 1; the attention
        // inputs 20 everywhere. By kind: down's median 100, FFN median 10.
        let scores: Vec<InputScore> = (0..5)
            .flat_map(|l| {
                [
                    score(l, Site::AttentionInput, 20.0),
                    score(l, Site::AttentionOutput, 20.0),
                    score(l, Site::FfnInput, if l == 1 { 35.0 } else { 10.0 }),
                    score(l, Site::FfnHidden, if l == 3 { 1000.0 } else { 100.0 }),
                ]
            })
            .collect();
        // 4x: only layer 3's down (1000 >= 400). 3x: also layer 1's FFN input
        // (35 >= 30), after it by score; 100 never counts, though 5x the
        // overall median (20), because it is ordinary for its kind.
        assert_eq!(choose(&scores, Selection::Ratio(4.0)).unwrap(), vec![15]);
        assert_eq!(choose(&scores, Selection::Ratio(3.0)).unwrap(), vec![15, 6]);
        assert_eq!(choose(&scores, Selection::Keep(2)).unwrap()[..1], [15]);
        assert_eq!(choose(&scores, Selection::Keep(2)).unwrap().len(), 2);
        assert!(choose(&scores, Selection::Keep(21)).is_err());
        assert_eq!(medians(&scores)["ffn_hidden"], 100.0);
    }

    #[test]
    fn inputs_name_the_projections_that_read_them() {
        assert_eq!(
            score(3, Site::AttentionInput, 1.0).tensors(),
            ["blk.3.attn_q.weight", "blk.3.attn_k.weight", "blk.3.attn_v.weight"]
        );
        assert_eq!(score(0, Site::FfnHidden, 1.0).tensors(), ["blk.0.ffn_down.weight"]);
    }

    #[test]
    fn precision_must_exceed_the_target() {
        let options = MixedOptions::default();
        assert!(options.check(QuantTarget::Q4S).is_ok());
        assert!(options.check(QuantTarget::Q8).is_err());
        // Q2_K (2.625 bits a value) below Q3_K: q3k may keep what q2k rounds.
        let q3k = MixedOptions { precision: QuantTarget::Q3K, ..MixedOptions::default() };
        assert!(q3k.check(QuantTarget::Q2K).is_ok() && q3k.check(QuantTarget::Q3K).is_err());
        let options = MixedOptions { selection: Selection::Ratio(1.0), ..MixedOptions::default() };
        assert!(options.check(QuantTarget::Q4).is_err());
    }
}
