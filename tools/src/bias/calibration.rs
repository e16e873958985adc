//! `bramble bias-calibrate`: per-layer bias directions, the neutral
//! baseline, the feedback loop's target, the predefined weights chosen
//! within a perplexity budget, and the image written with its `bias` section.

use super::directions::{differing_positions, principal_direction};
use super::evaluation::{evaluate, shared_ends};
use super::pairs::{read_pairs, Pair};
use super::residuals::{first_position_means, forward_sentence, projection_statistics, residual_means, residual_rows};
use super::scoring::{sentence_tokens, Scorer};
use anyhow::{ensure, Context, Result};
use bramble_runtime::bias::{CalibrationGates, Centre, DirectionKind, LoopSignal};
use bramble_runtime::image::ImageWriter;
use bramble_runtime::model::Model;
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::ModelImage;
use std::path::Path;

/// Where `bias-calibrate` puts the constraint's centre ([`Centre`], whose
/// midpoint values the calibration measures).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CentreChoice {
    /// 0: the first design's formula.
    #[default]
    Zero,
    /// The neutral baseline's mean.
    Baseline,
    /// The midpoint of the pairs' two sides at the first swapped token
    /// (principal directions only).
    Midpoint,
}

/// Settings of [`bias_calibrate`].
#[derive(Debug, Clone)]
pub struct BiasCalibrateOptions {
    /// Threads for the forward passes.
    pub threads: usize,
    /// Pairs the directions are computed from (0: all).
    pub direction_pairs: usize,
    /// Pairs each candidate's bias score is measured on (the first ones).
    pub eval_pairs: usize,
    /// Tokens of the text for the neutral baseline and the perplexity budget.
    pub text_tokens: usize,
    /// Window of the perplexity runs.
    pub ctx: usize,
    /// Allowed perplexity increase on the text (0.02: +2 %).
    pub budget: f64,
    /// Candidate constraint weights, each tried on every layer and on the
    /// quarter of the layers whose direction separates the pairs most.
    pub weights: Vec<f32>,
    /// How the directions are found.
    pub direction: DirectionKind,
    /// Pairs whose sentences (both of each) give the spread the layers'
    /// separations are measured in, and with [`LoopSignal::MeanLean`] the
    /// stored baseline (the first ones; 0: all the direction pairs).
    pub baseline_pairs: usize,
    /// How the feedback loop reads a response. [`LoopSignal::Spread`] (the
    /// default): the stored baseline is neutral text, pieces of the text.
    pub loop_signal: LoopSignal,
    /// With [`LoopSignal::Spread`]: how many pieces of the text (windows of
    /// [`PIECE_TOKENS`] tokens spread evenly over it) the baseline and the
    /// loop's target are measured on.
    pub baseline_pieces: usize,
    /// What the constraint moves `h · d_l` toward.
    pub centre: CentreChoice,
    /// Keep the directions' component along the attention sink (the first
    /// position's residual stream) instead of removing it.
    pub keep_sink: bool,
}

impl Default for BiasCalibrateOptions {
    fn default() -> Self {
        Self {
            threads: 1,
            direction_pairs: 0,
            eval_pairs: 100,
            text_tokens: 1024,
            ctx: 256,
            budget: 0.02,
            weights: vec![0.5, 1.0],
            direction: DirectionKind::PrincipalComponent,
            baseline_pairs: 100,
            loop_signal: LoopSignal::Spread,
            baseline_pieces: 200,
            centre: CentreChoice::Zero,
            keep_sink: false,
        }
    }
}

/// One evaluated set of constraint weights.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BiasCandidate {
    /// `"none"`, `"all"` or `"top"` (the most separating quarter of the layers).
    pub layers: String,
    /// The weight on those layers.
    pub weight: f32,
    /// Bias score on the evaluation pairs.
    pub bias_score: f64,
    /// Stereotype preference rate on them.
    pub stereotype_preference: f64,
    /// Perplexity on the text.
    pub perplexity: f64,
    /// Within the perplexity budget.
    pub within_budget: bool,
}

/// What [`bias_calibrate`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BiasCalibrateReport {
    /// How the directions were found (`mean-difference` or `principal`).
    pub direction: &'static str,
    /// Pairs the directions came from.
    pub direction_pairs: usize,
    /// Token-level differences the principal directions came from (0 for mean differences).
    pub difference_rows: usize,
    /// Per layer: how far the pairs' two sentences lie apart along the
    /// direction, in baseline standard deviations (mean differences: the
    /// mean stereo − anti projection of the sentence means; principal: the
    /// root mean square of the token-level differences' projections).
    pub separation: Vec<f32>,
    /// Per layer: the share of the token-level differences' energy along the
    /// direction (principal only; 1 would be a single axis).
    pub explained: Vec<f32>,
    /// Whether the constraint moves `h · d_l` toward the baseline mean (else toward 0).
    pub centred: bool,
    /// Per layer, the value the constraint moves `h · d_l` toward, with `--centre midpoint`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub midpoint: Option<Vec<f32>>,
    /// How the loop reads a response (`spread` or `mean-lean`).
    pub loop_signal: &'static str,
    /// The responses the baseline and the loop's target were measured on:
    /// the text's pieces (`spread`) or the pairs' sentences (`mean-lean`).
    pub baseline_responses: usize,
    /// Per layer: the cosine between the raw direction and the attention
    /// sink's residual stream, removed from it (all 0 with `--sink keep`).
    pub sink_cosine: Vec<f32>,
    /// The feedback loop's target: the [`LOOP_TARGET_QUANTILE`] quantile of
    /// the baseline responses' signals under the chosen weights.
    pub loop_target: f32,
    /// Its hard limit: [`HARD_LIMIT_FACTOR`] times the largest of those signals.
    pub loop_hard_limit: f32,
    /// Every candidate, the unconstrained model first.
    pub candidates: Vec<BiasCandidate>,
    /// The index of the chosen one.
    pub chosen: usize,
    /// The chosen predefined weights, per layer.
    pub weights: Vec<f32>,
    /// Seconds in all.
    pub seconds: f64,
}

/// The quantile of neutral sentences' signals the feedback loop's target is
/// set to: a response leaning further than nine neutral sentences in ten raises the weights.
pub const LOOP_TARGET_QUANTILE: f64 = 0.9;
/// The hard limit (regeneration) is this many times the largest neutral signal.
pub const HARD_LIMIT_FACTOR: f32 = 1.5;
/// The neutral text's pieces (the loop's baseline responses) are windows of
/// this many tokens: about a sentence pair's length.
pub const PIECE_TOKENS: usize = 24;
/// Fewest pieces a 90th percentile is taken over.
pub const MIN_PIECES: usize = 10;

/// Up to `count` pieces of the text's tokens (`tokens`, without BOS):
/// windows of [`PIECE_TOKENS`] spread evenly over it, each read as a
/// sentence (`bos` first when the model adds one), so the baseline is not
/// just the text's opening.
pub fn text_pieces(tokens: &[u32], bos: Option<u32>, count: usize) -> Vec<Vec<u32>> {
    let windows = tokens.len() / PIECE_TOKENS;
    let stride = (windows / count.max(1)).max(1);
    tokens
        .chunks_exact(PIECE_TOKENS)
        .step_by(stride)
        .take(count)
        .map(|window| bos.into_iter().chain(window.iter().copied()).collect())
        .collect()
}

/// `bramble bias-calibrate`: per layer a unit bias direction `d_l` after
/// layer `l` (`principal`: the top principal component of the token-level
/// stereo − anti differences at and just after the swapped words;
/// `mean-difference`: the normalized mean of stereo − anti of each
/// sentence's mean residual stream); the neutral baseline of `h · d_l`
/// (windows of `text` for [`LoopSignal::Spread`], both sentences of the
/// first pairs for [`LoopSignal::MeanLean`]); the loop's target and hard
/// limit from the same responses; and the predefined weights: among the
/// candidates, the one with the lowest bias score on evaluation pairs spread
/// over the file whose perplexity on `text` stays within the budget (none:
/// all zero). Writes `input` plus a `bias` section
/// to `output`.
pub fn bias_calibrate(
    input: &Path,
    pairs_path: &Path,
    text: &str,
    output: &Path,
    options: &BiasCalibrateOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<BiasCalibrateReport> {
    use bramble_runtime::bias::BiasConstraint;
    ensure!(
        options.direction != DirectionKind::Stereotype && options.loop_signal != LoopSignal::PronounShare,
        "stereotype directions and the pronoun-share loop are the second design's: `calibrate_parity` fits them"
    );
    let started = std::time::Instant::now();
    let image = bramble_runtime::ModelImage::open(input).with_context(|| format!("opening {}", input.display()))?;
    let tokenizer = Tokenizer::new(image.vocab()).with_context(|| format!("{}: tokenizer", input.display()))?;
    let mut model = Model::with_options(&image, bramble_runtime::kernels::Kernels::detect(), options.threads)?;
    let (layers, dim) = (model.weights.layers.len(), model.config.dim as usize);
    let pairs = read_pairs(pairs_path)?;
    let direction_pairs =
        if options.direction_pairs == 0 { pairs.len() } else { options.direction_pairs.min(pairs.len()) };
    ensure!(direction_pairs > 0, "{}: no pairs", pairs_path.display());

    let usable = |pair: &Pair| {
        let (s, a) = (sentence_tokens(&tokenizer, &pair.stereo), sentence_tokens(&tokenizer, &pair.anti));
        (!s.is_empty() && !a.is_empty() && s.len().max(a.len()) <= options.ctx).then_some((s, a))
    };
    let mut state = model.try_new_state(options.ctx, 64)?;
    // The attention sink: the first position's residual stream, which from
    // some layer on carries activations a hundred times the other
    // positions' (SmolLM2: |h| ≈ 22700 from layer 11). A direction with even
    // a few percent along it projects the sink far from every other token,
    // so the constraint would move the sink and the baseline's spread would
    // be the sink's; the directions are made orthogonal to it.
    let sink = if options.keep_sink {
        None
    } else {
        let mut firsts: Vec<u32> = pairs[..direction_pairs]
            .iter()
            .filter_map(|(_, pair)| usable(pair))
            .flat_map(|(s, a)| [s[0], a[0]])
            .collect();
        firsts.sort_unstable();
        firsts.dedup();
        ensure!(!firsts.is_empty(), "no pair fits the context of {} tokens", options.ctx);
        Some(first_position_means(&model, &mut state, &firsts)?)
    };
    let mut directions = vec![0f32; layers * dim];
    // Per layer, the pairs' spread along the direction before the baseline scales it.
    let mut raw_separation = vec![0f64; layers];
    let mut sink_cosine = vec![0f32; layers];
    let mut explained = Vec::new();
    let mut used = 0;
    let mut difference_rows = 0;
    ensure!(
        options.centre != CentreChoice::Midpoint || options.direction == DirectionKind::PrincipalComponent,
        "--centre midpoint needs --direction principal (the swapped tokens' hidden states)"
    );
    let mut midpoint = (options.centre == CentreChoice::Midpoint).then(|| vec![0f32; layers]);
    // Normalizes d (orthogonal to the sink first, unless kept), stores it as d_l and returns it.
    let mut set_direction = |l: usize, d: &[f64]| -> Result<Vec<f64>> {
        let mut d = d.to_vec();
        let norm = d.iter().map(|v| v * v).sum::<f64>().sqrt();
        ensure!(norm > 0.0 && norm.is_finite(), "layer {l}: the stereo and anti sentences do not differ");
        if let Some(sink) = &sink {
            let u = &sink[l * dim..(l + 1) * dim];
            let u_norm = u.iter().map(|v| v * v).sum::<f64>().sqrt();
            if u_norm > 0.0 {
                let along = d.iter().zip(u).map(|(a, b)| a * b).sum::<f64>() / u_norm;
                sink_cosine[l] = (along / norm) as f32;
                d.iter_mut().zip(u).for_each(|(v, s)| *v -= along * s / u_norm);
            }
        }
        let norm = d.iter().map(|v| v * v).sum::<f64>().sqrt();
        ensure!(norm > 0.0 && norm.is_finite(), "layer {l}: the direction lies along the attention sink");
        d.iter_mut().for_each(|v| *v /= norm);
        for (o, v) in directions[l * dim..(l + 1) * dim].iter_mut().zip(&d) {
            *o = *v as f32;
        }
        Ok(d)
    };
    match options.direction {
        DirectionKind::MeanDifference | DirectionKind::Stereotype => {
            // The mean difference of the sentences' mean hidden states.
            let (mut stereo, mut anti, mut difference) =
                (vec![0f64; layers * dim], vec![0f64; layers * dim], vec![0f64; layers * dim]);
            for (i, (_, pair)) in pairs[..direction_pairs].iter().enumerate() {
                let Some((s, a)) = usable(pair) else { continue };
                residual_means(&model, &mut state, &s, &mut stereo)?;
                residual_means(&model, &mut state, &a, &mut anti)?;
                for ((d, s), a) in difference.iter_mut().zip(&stereo).zip(&anti) {
                    *d += s - a;
                }
                used += 1;
                if i % 32 == 0 {
                    progress(&format!("directions: {i}/{direction_pairs} pairs"));
                }
            }
            ensure!(used > 0, "no pair fits the context of {} tokens", options.ctx);
            for l in 0..layers {
                let raw = &difference[l * dim..(l + 1) * dim];
                let d = set_direction(l, raw)?;
                raw_separation[l] = raw.iter().zip(&d).map(|(a, b)| a * b).sum::<f64>().abs() / used as f64;
            }
        }
        DirectionKind::PrincipalComponent => {
            // The top principal component of the token-level differences
            // where the swapped words are and just after them.
            let mut differences: Vec<Vec<f32>> = vec![Vec::new(); layers];
            let (mut stereo, mut anti) = (Vec::new(), Vec::new());
            // Σ (h_stereo + h_anti) at the first swapped token, per layer: the midpoint's numerator.
            let mut sides = if midpoint.is_some() { vec![0f64; layers * dim] } else { Vec::new() };
            let mut first_swaps = 0usize;
            for (i, (_, pair)) in pairs[..direction_pairs].iter().enumerate() {
                let Some((s, a)) = usable(pair) else { continue };
                let positions = differing_positions(&s, &a);
                if positions.is_empty() {
                    continue;
                }
                residual_rows(&model, &mut state, &s, &mut stereo)?;
                residual_rows(&model, &mut state, &a, &mut anti)?;
                for (l, rows) in differences.iter_mut().enumerate() {
                    for &(ps, pa) in &positions {
                        let hs = &stereo[(l * s.len() + ps) * dim..][..dim];
                        let ha = &anti[(l * a.len() + pa) * dim..][..dim];
                        rows.extend(hs.iter().zip(ha).map(|(x, y)| x - y));
                    }
                }
                let first = shared_ends(&s, &a).0;
                if midpoint.is_some() && first < s.len().min(a.len()) {
                    for l in 0..layers {
                        let hs = &stereo[(l * s.len() + first) * dim..][..dim];
                        let ha = &anti[(l * a.len() + first) * dim..][..dim];
                        for ((m, x), y) in sides[l * dim..(l + 1) * dim].iter_mut().zip(hs).zip(ha) {
                            *m += (x + y) as f64;
                        }
                    }
                    first_swaps += 1;
                }
                used += 1;
                difference_rows += positions.len();
                if i % 32 == 0 {
                    progress(&format!("directions: {i}/{direction_pairs} pairs"));
                }
            }
            ensure!(used > 0, "no pair fits the context of {} tokens and differs", options.ctx);
            for (l, rows) in differences.iter().enumerate() {
                progress(&format!("principal components: layer {l}/{layers}"));
                let (d, share) = principal_direction(rows, dim);
                let d = set_direction(l, &d)?;
                if let Some(midpoint) = midpoint.as_mut() {
                    ensure!(first_swaps > 0, "no pair has a swapped token to take the midpoint at");
                    let along: f64 = sides[l * dim..(l + 1) * dim].iter().zip(&d).map(|(a, b)| a * b).sum();
                    midpoint[l] = (along / (2 * first_swaps) as f64) as f32;
                }
                let n = (rows.len() / dim) as f64;
                let energy: f64 = rows
                    .chunks_exact(dim)
                    .map(|r| r.iter().zip(&d).map(|(a, b)| *a as f64 * b).sum::<f64>().powi(2))
                    .sum();
                raw_separation[l] = (energy / n).sqrt();
                explained.push(share as f32);
            }
        }
    }

    let (all_text_tokens, bos) = crate::generate::perplexity_tokens(&tokenizer, text);
    let text_tokens = &all_text_tokens[..all_text_tokens.len().min(options.text_tokens)];
    ensure!(text_tokens.len() >= 16, "the text has only {} tokens", text_tokens.len());
    let mut constraint = BiasConstraint {
        kind: options.direction,
        signal: options.loop_signal,
        centre: match (options.centre, midpoint) {
            (CentreChoice::Zero, _) => Centre::Zero,
            (CentreChoice::Baseline, _) => Centre::Baseline,
            (CentreChoice::Midpoint, midpoint) => Centre::Midpoint(midpoint.unwrap_or_default()),
        },
        layers,
        dim,
        directions,
        readouts: None,
        weights: vec![0.0; layers],
        baseline_mean: vec![0.0; layers],
        baseline_std: vec![1.0; layers],
        loop_target: 0.0,
        loop_hard_limit: 0.0,
        // The first design's loop may raise any layer to 1; it counts no pronouns and records no gates.
        max_weights: vec![1.0; layers],
        she_tokens: Vec::new(),
        he_tokens: Vec::new(),
        gates: CalibrationGates::default(),
    };
    model.set_bias(Some(constraint.clone()))?;
    let mut state = model.try_new_state(options.ctx, 64)?;
    let baseline_pairs = if options.baseline_pairs == 0 { direction_pairs } else { options.baseline_pairs };
    let baseline_sentences: Vec<Vec<u32>> =
        pairs.iter().take(baseline_pairs).filter_map(|(_, pair)| usable(pair)).flat_map(|(s, a)| [s, a]).collect();
    // Per layer, the mean and spread of h · d_l over every token of `responses`.
    let mut token_statistics = |responses: &[Vec<u32>]| projection_statistics(&model, &mut state, responses);
    // The pairs' own sentences, the two sides of each in equal measure: the
    // spread each layer's separation is measured in.
    let pair_statistics = token_statistics(&baseline_sentences)?;
    // The loop's neutral baseline. `Spread` reads a response's departure
    // either way from neutral text: pieces of the text. (`MeanLean`, signed
    // or not, needs sentences like the pairs', or every gendered sentence
    // reads as a lean.)
    let baseline_responses = match options.loop_signal {
        LoopSignal::Spread | LoopSignal::PronounShare => {
            let body = all_text_tokens.strip_prefix(bos.as_slice()).unwrap_or(&all_text_tokens);
            let pieces = text_pieces(body, bos, options.baseline_pieces);
            ensure!(
                pieces.len() >= MIN_PIECES,
                "the text has {} pieces of {PIECE_TOKENS} tokens; the loop's baseline needs {MIN_PIECES}",
                pieces.len()
            );
            pieces
        }
        LoopSignal::MeanLean => baseline_sentences,
    };
    let loop_statistics = match options.loop_signal {
        LoopSignal::Spread | LoopSignal::PronounShare => token_statistics(&baseline_responses)?,
        LoopSignal::MeanLean => pair_statistics.clone(),
    };
    for (l, (mean, std)) in loop_statistics.into_iter().enumerate() {
        constraint.baseline_mean[l] = mean;
        constraint.baseline_std[l] = std;
    }
    let separation: Vec<f32> = (0..layers).map(|l| (raw_separation[l] / pair_statistics[l].1 as f64) as f32).collect();

    // Candidates: none, then each weight on all layers and on the most separating quarter.
    let mut top: Vec<usize> = (0..layers).collect();
    top.sort_by(|&a, &b| separation[b].total_cmp(&separation[a]));
    top.truncate((layers / 4).max(1));
    let mut plans: Vec<(String, f32, Vec<f32>)> = vec![("none".into(), 0.0, vec![0.0; layers])];
    for &w in &options.weights {
        ensure!((0.0..=1.0).contains(&w), "candidate weight {w} is outside [0, 1]");
        plans.push(("all".into(), w, vec![w; layers]));
        plans.push(("top".into(), w, (0..layers).map(|l| if top.contains(&l) { w } else { 0.0 }).collect()));
    }
    // Evaluation pairs spread evenly over the file, so every category of it is in them.
    let stride = (pairs.len() / options.eval_pairs.max(1)).max(1);
    let eval: Vec<(usize, Pair)> = pairs.iter().step_by(stride).take(options.eval_pairs.max(1)).cloned().collect();
    let mut candidates = Vec::new();
    for (i, (layers_name, weight, weights)) in plans.iter().enumerate() {
        progress(&format!("candidate {}/{}: {layers_name} layers at {weight}", i + 1, plans.len()));
        constraint.weights.clone_from(weights);
        model.set_bias(Some(constraint.clone()))?;
        let mut scorer = Scorer::new(&model, options.ctx, 64)?;
        let report = evaluate(&mut scorer, &tokenizer, &eval, &mut |_, _| {})?;
        let ppl_ctx = options.ctx.min(text_tokens.len());
        let ppl = crate::generate::perplexity(&model, text_tokens, bos, ppl_ctx, None, 64, &mut |_, _, _| {})?;
        candidates.push(BiasCandidate {
            layers: layers_name.clone(),
            weight: *weight,
            bias_score: report.bias_score,
            stereotype_preference: report.stereotype_preference,
            perplexity: ppl.perplexity,
            within_budget: true,
        });
    }
    let limit = candidates[0].perplexity * (1.0 + options.budget);
    for c in &mut candidates {
        c.within_budget = c.perplexity <= limit;
    }
    let chosen = (0..candidates.len())
        .filter(|&i| candidates[i].within_budget)
        .min_by(|&a, &b| candidates[a].bias_score.total_cmp(&candidates[b].bias_score))
        .unwrap_or(0);
    constraint.weights.clone_from(&plans[chosen].2);

    // The loop's target: the baseline responses' signals under the chosen
    // weights, each read as one response.
    model.set_bias(Some(constraint.clone()))?;
    let mut state = model.try_new_state(options.ctx, 64)?;
    let mut feedback = bramble_runtime::bias::FeedbackLoop::new(&constraint);
    let mut signals = Vec::with_capacity(baseline_responses.len());
    for sentence in &baseline_responses {
        state.reset_projections();
        forward_sentence(&model, &mut state, sentence)?;
        signals.push(feedback.signal(state.projections(), &constraint));
    }
    signals.sort_by(f32::total_cmp);
    let at = ((signals.len() - 1) as f64 * LOOP_TARGET_QUANTILE).round() as usize;
    constraint.loop_target = signals[at].max(f32::MIN_POSITIVE);
    constraint.loop_hard_limit = signals[signals.len() - 1].max(constraint.loop_target) * HARD_LIMIT_FACTOR;
    copy_with_section(&image, output, bramble_runtime::bias::SECTION, &constraint.to_section()?)?;
    Ok(BiasCalibrateReport {
        direction: options.direction.name(),
        centred: constraint.centre == Centre::Baseline,
        midpoint: match &constraint.centre {
            Centre::Midpoint(midpoint) => Some(midpoint.clone()),
            _ => None,
        },
        loop_signal: options.loop_signal.name(),
        baseline_responses: baseline_responses.len(),
        sink_cosine,
        loop_target: constraint.loop_target,
        loop_hard_limit: constraint.loop_hard_limit,
        direction_pairs: used,
        difference_rows,
        separation,
        explained,
        candidates,
        chosen,
        weights: constraint.weights,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Writes `image` to `output` with section `name` set to `bytes` (added, or
/// replacing the image's own); every other section and tensor byte for
/// byte, in the order [`ImageWriter::rewrite`] keeps.
pub fn copy_with_section(image: &ModelImage, output: &Path, name: &str, bytes: &[u8]) -> Result<u64> {
    Ok(ImageWriter::rewrite(image, output, &[(name, bytes)], |_, _| None)?)
}
