//! `bramble bias-calibrate` with stereotype directions (the default): the
//! second design. Fits the directions on the model's own pronoun choices
//! ([`super::stereotype`]), a centre per layer at which those choices are
//! even, searches the layers and weights on the first-token figures, and
//! judges the chosen constraint against the unconstrained model with the
//! whole-sentence fill measure ([`super::gates`]); the image records which
//! gates passed, and `auto` turns the loop on only when all did.

use super::calibration::{copy_with_section, text_pieces, MIN_PIECES};
use super::fill::{evaluate_fill, read_fill_items, FillItem, FillReport, Gender};
use super::gates::{judge, GateReport, FACTUAL_DROP, MAX_SKEW, PERPLEXITY_RISE};
use super::pairs::read_pairs;
use super::residuals::{first_position_means, projection_statistics, residual_rows};
use super::scoring::Scorer;
use super::stereotype::{
    fit_stereotype, group_means, pronoun_sites, pronoun_tokens, read_sites, FitInput, PronounSite, QuickFigures,
    SitePosition,
};
use anyhow::{ensure, Context, Result};
use bramble_runtime::bias::{
    BiasConstraint, CalibrationGates, Centre, DirectionKind, LoopSignal, DEFAULT_SHARE_TARGET,
};
use bramble_runtime::model::{Model, RunState};
use bramble_runtime::tokenizer::Tokenizer;
use std::path::Path;

/// Settings of [`calibrate_parity`].
#[derive(Debug, Clone)]
pub struct ParityOptions {
    /// Threads for the forward passes.
    pub threads: usize,
    /// Context of every run.
    pub ctx: usize,
    /// Tokens of the text the perplexity is measured on.
    pub text_tokens: usize,
    /// Candidate weights, each on the layer sets of [`LAYER_SHARES`].
    pub weights: Vec<f32>,
    /// Make each direction orthogonal to the stated-gender direction of the factual items.
    pub orthogonal_to_stated: bool,
    /// Where the states the directions are fitted on are read.
    pub position: SitePosition,
    /// Fit the directions against each occupation's mean lean (the part of
    /// the lean the occupation explains) instead of each site's own.
    pub occupation_means: bool,
    /// Pieces of the text the loop's lean is scaled by.
    pub baseline_pieces: usize,
    /// Read each projection along LEACE's whitened vector, the covariance
    /// shrunk by this share (`None`: along the direction itself).
    pub whiten: Option<f64>,
}

impl Default for ParityOptions {
    fn default() -> Self {
        Self {
            threads: 1,
            ctx: 256,
            text_tokens: 1024,
            weights: vec![0.5, 0.75, 1.0],
            orthogonal_to_stated: true,
            occupation_means: true,
            position: SitePosition::Occupation,
            baseline_pieces: 200,
            whiten: None,
        }
    }
}

/// The layer sets tried: the share of the layers whose projections
/// correlate most with the lean (a quarter, a half, all).
pub const LAYER_SHARES: [f64; 3] = [0.25, 0.5, 1.0];
/// The centre search stops when the first-token skew is within this of 0.
const SKEW_TOLERANCE: f64 = 0.005;
/// At most this many centre shifts are tried per candidate.
const CENTRE_STEPS: usize = 6;
/// Newton steps of the centre on whole sentences after the search.
const WHOLE_SENTENCE_STEPS: usize = 2;
/// They stop when the whole-sentence skew is within this of 0.
const WHOLE_SKEW_TOLERANCE: f64 = 0.01;
/// The first guess of the first-token skew's change per spread of shift
/// (SmolLM2-135M: about −0.3; later candidates use the slope measured).
const INITIAL_SKEW_SLOPE: f64 = -0.3;
/// The centre's shift is kept within this many of a layer's spreads.
const MAX_SHIFT: f64 = 4.0;

/// One candidate: layers and weight, its centre's shift and its first-token figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParityCandidate {
    /// Share of the layers (by correlation) the weight is on; 0 for none.
    pub layer_share: f64,
    /// The weight.
    pub weight: f32,
    /// The centre: each layer's parity point plus this many of its spreads,
    /// found so that the first-token skew is 0.
    pub shift: f64,
    /// The first-token figures under it.
    pub figures: QuickFigures,
    /// Perplexity on the text.
    pub perplexity: f64,
    /// Whether the first-token figures and the perplexity meet the gates
    /// the search can judge (skew, not more male, factual, perplexity).
    pub admissible: bool,
}

/// What [`calibrate_parity`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParityReport {
    /// `stereotype`.
    pub direction: &'static str,
    /// How the projections are read: `orthogonal` (along `d_l`) or
    /// `whitened, shrinkage α` (LEACE's read vectors).
    pub readout: String,
    /// Where the items came from.
    pub items: String,
    /// Pronoun sites read (cue-free, factual), and items left out.
    pub cue_free_sites: usize,
    /// Factual sites.
    pub factual_sites: usize,
    /// Items whose fillings do not part at one token, or do not fit.
    pub left_out: usize,
    /// Per layer: the correlation of the projections with the lean.
    pub correlation: Vec<f32>,
    /// Per layer: the raw direction's cosine with the stated-gender direction.
    pub factual_cosine: Vec<f32>,
    /// Per layer: the direction's cosine with the attention sink (removed).
    pub sink_cosine: Vec<f32>,
    /// Per layer: the centre.
    pub centre: Vec<f32>,
    /// The centre's steps on whole sentences: (shift, cue-free skew,
    /// perplexity) each; the written centre is the step of smallest |skew|
    /// within the perplexity budget.
    pub centre_steps: Vec<(f64, f64, f64)>,
    /// Perplexity on the text under the written constraint.
    pub perplexity: f64,
    /// Every candidate, the unconstrained model first.
    pub candidates: Vec<ParityCandidate>,
    /// The index of the chosen one.
    pub chosen: usize,
    /// The chosen weights, per layer.
    pub weights: Vec<f32>,
    /// The loop's bound per layer.
    pub max_weights: Vec<f32>,
    /// The gates, whole sentences scored (none without factual or listed items).
    pub gates: Option<GateReport>,
    /// Why the gates were not measured, when they were not.
    pub gates_not_measured: Option<String>,
    /// Token ids the loop counts as *she* and as *he*.
    pub pronoun_tokens: (usize, usize),
    /// Seconds in all.
    pub seconds: f64,
}

/// Where the calibration's items come from.
pub enum ParityItems<'a> {
    /// A fill items file (`bias-data --from pronoun-fill`), e.g. the dev split.
    Fill(&'a Path),
    /// Pairs whose two sentences differ only in a gendered pronoun, made into
    /// cue-free items (no occupation list: the gates are not measured).
    Pairs(&'a Path),
}

/// The calibration: see the module's text. Writes `input` plus a `bias`
/// section to `output`.
pub fn calibrate_parity(
    input: &Path,
    items: ParityItems<'_>,
    text: &str,
    output: &Path,
    options: &ParityOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ParityReport> {
    let started = std::time::Instant::now();
    let image = bramble_runtime::ModelImage::open(input).with_context(|| format!("opening {}", input.display()))?;
    let tokenizer = Tokenizer::new(image.vocab()).with_context(|| format!("{}: tokenizer", input.display()))?;
    let mut model = Model::with_options(&image, bramble_runtime::kernels::Kernels::detect(), options.threads)?;
    let (layers, dim) = (model.weights.layers.len(), model.config.dim as usize);
    let (items, source) = match items {
        ParityItems::Fill(path) => (read_fill_items(path)?, path.display().to_string()),
        ParityItems::Pairs(path) => (items_of_pairs(path)?, format!("{} (pairs made cue-free items)", path.display())),
    };
    let (sites, left_out) = pronoun_sites(&tokenizer, None, &items, options.ctx)?;
    let cue_free = sites.iter().filter(|s| s.gender.is_none()).count();
    ensure!(cue_free >= 2, "{source}: {cue_free} cue-free items part at a pronoun token; the fit needs 2");

    // The attention sink, removed from each direction (see `calibration`).
    let mut state = model.try_new_state(options.ctx, 64)?;
    let mut firsts: Vec<u32> = sites.iter().map(|s| s.prefix[0]).collect();
    firsts.sort_unstable();
    firsts.dedup();
    let sink = first_position_means(&model, &mut state, &firsts)?;
    let mut states = Vec::new();
    let leans = read_sites(&model, &mut state, &sites, Some((&mut states, options.position)), &mut |done, total| {
        if done % 64 == 0 {
            progress(&format!("reading the pronoun sites: {done}/{total}"));
        }
    })?;
    let row = layers * dim;
    let gather = |keep: &dyn Fn(&PronounSite) -> bool| -> Vec<f32> {
        sites
            .iter()
            .zip(states.chunks_exact(row))
            .filter(|(s, _)| keep(s))
            .flat_map(|(_, r)| r.iter().copied())
            .collect()
    };
    let cue_free_states = gather(&|s| s.gender.is_none());
    let cue_free_leans: Vec<f64> =
        sites.iter().zip(&leans).filter(|(s, _)| s.gender.is_none()).map(|(_, &l)| l).collect();
    let targets = if options.occupation_means {
        // A site without an occupation (pairs made items) is a group of its own.
        let mut names: Vec<&str> = Vec::new();
        let groups: Vec<usize> = sites
            .iter()
            .filter(|s| s.gender.is_none())
            .map(|s| match names.iter().position(|n| *n == s.occupation).filter(|_| !s.occupation.is_empty()) {
                Some(g) => g,
                None => {
                    names.push(&s.occupation);
                    names.len() - 1
                }
            })
            .collect();
        group_means(&cue_free_leans, &groups)
    } else {
        cue_free_leans.clone()
    };
    let stated_female = gather(&|s| s.gender == Some(Gender::Female));
    let stated_male = gather(&|s| s.gender == Some(Gender::Male));
    drop(states);
    // The factual sites read at the pronoun too, when the fit reads the
    // occupation: what states the gender there is kept as well.
    let factual_sites: Vec<PronounSite> = sites.iter().filter(|s| s.gender.is_some()).cloned().collect();
    let mut at_pronoun = Vec::new();
    if options.position != SitePosition::Pronoun && !factual_sites.is_empty() {
        read_sites(&model, &mut state, &factual_sites, Some((&mut at_pronoun, SitePosition::Pronoun)), &mut |_, _| {})?;
    }
    let pronoun_side = |gender: Gender| -> Vec<f32> {
        factual_sites
            .iter()
            .zip(at_pronoun.chunks_exact(row))
            .filter(|(s, _)| s.gender == Some(gender))
            .flat_map(|(_, r)| r.iter().copied())
            .collect()
    };
    let (pronoun_female, pronoun_male) = (pronoun_side(Gender::Female), pronoun_side(Gender::Male));
    let stated = [(&stated_female[..], &stated_male[..]), (&pronoun_female[..], &pronoun_male[..])];
    let (all_text_tokens, bos) = crate::generate::perplexity_tokens(&tokenizer, text);
    let text_tokens = &all_text_tokens[..all_text_tokens.len().min(options.text_tokens)];
    ensure!(text_tokens.len() >= 16, "the text has only {} tokens", text_tokens.len());
    // The whitened form moves least the states it is told of: every token
    // of the factual items' prefixes (their gender cues among them) and of
    // the text, beside the cue-free sites'.
    let mut background = Vec::new();
    if options.whiten.is_some() {
        for site in &factual_sites {
            token_states(&model, &mut state, &site.prefix, &mut background)?;
        }
        for window in text_tokens.chunks(options.ctx.max(2)) {
            token_states(&model, &mut state, window, &mut background)?;
        }
    }
    let fit = fit_stereotype(&FitInput {
        layers,
        dim,
        cue_free: &cue_free_states,
        leans: &cue_free_leans,
        targets: &targets,
        stated: &stated,
        orthogonal_to_stated: options.orthogonal_to_stated,
        sink: Some(&sink),
        whiten: options.whiten,
        background: &background,
    })?;
    drop((cue_free_states, stated_female, stated_male, pronoun_female, pronoun_male, at_pronoun, background));
    let ppl_ctx = options.ctx.min(text_tokens.len());
    let (she_tokens, he_tokens) = pronoun_tokens(&tokenizer);
    ensure!(
        !she_tokens.is_empty() && !he_tokens.is_empty(),
        "the vocabulary spells {} of she/her/hers/herself and {} of he/him/his/himself as one token; \
         the pronoun-share loop counts single-token pronouns and needs both",
        she_tokens.len(),
        he_tokens.len()
    );
    let mut constraint = BiasConstraint {
        kind: DirectionKind::Stereotype,
        signal: LoopSignal::PronounShare,
        centre: Centre::Parity(fit.parity.clone()),
        layers,
        dim,
        directions: fit.directions.clone(),
        readouts: fit.readouts.clone(),
        weights: vec![0.0; layers],
        baseline_mean: vec![0.0; layers],
        baseline_std: vec![1.0; layers],
        loop_target: DEFAULT_SHARE_TARGET,
        loop_hard_limit: 0.0,
        max_weights: vec![0.0; layers],
        she_tokens,
        he_tokens,
        gates: CalibrationGates::default(),
    };

    // Each candidate's first-token figures, at a centre shifted until the skew is 0.
    let mut order: Vec<usize> = (0..layers).collect();
    order.sort_by(|&a, &b| fit.correlation[b].abs().total_cmp(&fit.correlation[a].abs()));
    let centre_at = |shift: f64| -> Vec<f32> {
        (0..layers).map(|l| (f64::from(fit.parity[l]) + shift * f64::from(fit.spread[l])) as f32).collect()
    };
    let try_constraint = |model: &mut Model<'_>,
                          weights: &[f32],
                          shift: f64,
                          progress: &mut dyn FnMut(&str)|
     -> Result<(QuickFigures, f64)> {
        let mut c = constraint.clone();
        c.weights = weights.to_vec();
        c.max_weights = weights.to_vec();
        c.centre = Centre::Parity(centre_at(shift));
        model.set_bias(Some(c))?;
        let mut state = model.try_new_state(options.ctx, 64)?;
        let leans = read_sites(model, &mut state, &sites, None, &mut |_, _| {})?;
        let ppl = crate::generate::perplexity(model, text_tokens, bos, ppl_ctx, None, 64, &mut |_, _, _| {})?;
        let figures = QuickFigures::of(&sites, &leans);
        progress(&format!(
            "  shift {shift:+.3}: first-token gap {:?} skew {:?} factual {:?}, perplexity {:.3}",
            figures.occupation_gap, figures.skew, figures.factual_accuracy, ppl.perplexity
        ));
        Ok((figures, ppl.perplexity))
    };
    let off_figures = QuickFigures::of(&sites, &leans);
    let (_, off_ppl) = try_constraint(&mut model, &vec![0.0; layers], 0.0, progress)?;
    let mut candidates = vec![ParityCandidate {
        layer_share: 0.0,
        weight: 0.0,
        shift: 0.0,
        figures: off_figures,
        perplexity: off_ppl,
        admissible: true,
    }];
    let mut plans = vec![vec![0.0; layers]];
    // The skew's change per unit of shift (toward *he* lowers it); a first guess.
    let mut slope = INITIAL_SKEW_SLOPE;
    for &share in &LAYER_SHARES {
        let count = ((layers as f64 * share).round() as usize).clamp(1, layers);
        for &w in &options.weights {
            ensure!((0.0..=1.0).contains(&w) && w > 0.0, "candidate weight {w} is outside (0, 1]");
            let mut weights = vec![0.0; layers];
            order[..count].iter().for_each(|&l| weights[l] = w);
            progress(&format!("candidate: {count} layers at {w}"));
            // Newton steps on the skew from the parity points (shift 0), with
            // the slope of the skew on the shift measured as it goes (at first
            // the previous candidate's, or a guess): usually one or two steps.
            let skew_of = |f: &QuickFigures| f.skew.unwrap_or(0.0);
            let (mut shift, mut found) = (0.0, try_constraint(&mut model, &weights, 0.0, progress)?);
            for _ in 1..CENTRE_STEPS {
                if skew_of(&found.0).abs() <= SKEW_TOLERANCE || slope.abs() < 1e-9 {
                    break;
                }
                let next = (shift - skew_of(&found.0) / slope).clamp(-MAX_SHIFT, MAX_SHIFT);
                let tried = try_constraint(&mut model, &weights, next, progress)?;
                if next != shift {
                    let measured = (skew_of(&tried.0) - skew_of(&found.0)) / (next - shift);
                    if measured.abs() > 1e-9 {
                        slope = measured;
                    }
                }
                if skew_of(&tried.0).abs() < skew_of(&found.0).abs() {
                    (shift, found) = (next, tried);
                } else {
                    break;
                }
            }
            let (figures, perplexity) = found;
            let admissible = admissible(&off_figures, off_ppl, &figures, perplexity);
            candidates.push(ParityCandidate { layer_share: share, weight: w, shift, figures, perplexity, admissible });
            plans.push(weights);
        }
    }
    // The admissible candidate that narrows the gap most (without
    // occupation lists: R). When none is admissible, the one within the
    // perplexity budget that narrows it most is still written, so its gates
    // can be measured and shown failing (`auto` then leaves it off).
    let objective = |c: &ParityCandidate| {
        c.figures.occupation_gap.map(f64::abs).or(c.figures.rms_deviation).unwrap_or(f64::INFINITY)
    };
    let best = |keep: &dyn Fn(&ParityCandidate) -> bool| {
        (1..candidates.len())
            .filter(|&i| keep(&candidates[i]))
            .min_by(|&a, &b| objective(&candidates[a]).total_cmp(&objective(&candidates[b])))
    };
    let chosen = best(&|c| c.admissible && objective(c) < objective(&candidates[0]))
        .or_else(|| {
            best(&|c| c.perplexity <= off_ppl * (1.0 + PERPLEXITY_RISE) && objective(c) < objective(&candidates[0]))
        })
        .unwrap_or(0);
    constraint.weights.clone_from(&plans[chosen]);
    constraint.centre = Centre::Parity(centre_at(candidates[chosen].shift));
    let listed = items.iter().any(|(_, i)| i.listed.is_some() && i.gender.is_none());
    let factual = items.iter().any(|(_, i)| i.gender.is_some());

    // The centre again, on whole sentences: the first token's skew is not
    // the sentence's (on SmolLM2 the sentence leans further to *he*), so the
    // shift takes Newton steps (the first-token slope to start) until the
    // cue-free items' whole-sentence skew is near 0.
    let mut centre_steps = Vec::new();
    let mut final_perplexity = candidates[chosen].perplexity;
    if chosen > 0 && listed {
        let cue_free_items: Vec<(usize, FillItem)> =
            items.iter().filter(|(_, item)| item.gender.is_none()).cloned().collect();
        // The cue-free items' whole-sentence skew and the text's perplexity at a shift.
        let at_shift = |model: &mut Model<'_>, shift: f64, progress: &mut dyn FnMut(&str)| -> Result<(f64, f64)> {
            let mut c = constraint.clone();
            c.centre = Centre::Parity(centre_at(shift));
            c.max_weights = c.weights.clone();
            model.set_bias(Some(c))?;
            let mut scorer = Scorer::new(model, options.ctx, 64)?;
            let report =
                evaluate_fill(&mut scorer, &tokenizer, None, &cue_free_items, &mut |_, _| {}, &mut |_, _| Ok(()))?;
            let skew = report.figures.skew.map_or(0.0, |e| e.value);
            let ppl = crate::generate::perplexity(model, text_tokens, bos, ppl_ctx, None, 64, &mut |_, _, _| {})?;
            progress(&format!(
                "  whole sentences, shift {shift:+.3}: skew {skew:+.4}, perplexity {:.3}",
                ppl.perplexity
            ));
            Ok((skew, ppl.perplexity))
        };
        // A step is kept only within the perplexity budget: the skew is not
        // bought with the perplexity gate.
        let budget = off_ppl * (1.0 + PERPLEXITY_RISE);
        let start = candidates[chosen].shift;
        let (mut shift, (mut skew, mut ppl)) = (start, at_shift(&mut model, start, progress)?);
        centre_steps.push((shift, skew, ppl));
        let (mut last_shift, mut last_skew) = (shift, skew);
        for _ in 0..WHOLE_SENTENCE_STEPS {
            if last_skew.abs() <= WHOLE_SKEW_TOLERANCE || slope.abs() < 1e-9 {
                break;
            }
            let next = (last_shift - last_skew / slope).clamp(-MAX_SHIFT, MAX_SHIFT);
            let (next_skew, next_ppl) = at_shift(&mut model, next, progress)?;
            centre_steps.push((next, next_skew, next_ppl));
            if next != last_shift && (next_skew - last_skew).abs() > 1e-9 {
                slope = (next_skew - last_skew) / (next - last_shift);
            }
            (last_shift, last_skew) = (next, next_skew);
            if next_skew.abs() < skew.abs() && next_ppl <= budget {
                (shift, skew, ppl) = (next, next_skew, next_ppl);
            }
        }
        constraint.centre = Centre::Parity(centre_at(shift));
        final_perplexity = ppl;
    }
    // The loop's bound: the highest weight on the chosen layers that was admissible too.
    let bound = (1..candidates.len())
        .filter(|&i| {
            candidates[chosen].admissible
                && candidates[i].admissible
                && candidates[i].layer_share == candidates[chosen].layer_share
        })
        .map(|i| candidates[i].weight)
        .fold(candidates[chosen].weight, f32::max);
    constraint.max_weights = plans[chosen].iter().map(|&w| if w > 0.0 { bound } else { 0.0 }).collect();

    // The lean's scale: neutral text's projections under no weight.
    let body = all_text_tokens.strip_prefix(bos.as_slice()).unwrap_or(&all_text_tokens);
    let pieces = text_pieces(body, bos, options.baseline_pieces);
    ensure!(pieces.len() >= MIN_PIECES, "the text has {} pieces; the loop's baseline needs {MIN_PIECES}", pieces.len());
    let mut neutral = constraint.clone();
    neutral.weights = vec![0.0; layers];
    neutral.max_weights = vec![0.0; layers];
    model.set_bias(Some(neutral))?;
    let mut state = model.try_new_state(options.ctx, 64)?;
    for (l, (mean, std)) in projection_statistics(&model, &mut state, &pieces)?.into_iter().enumerate() {
        constraint.baseline_mean[l] = mean;
        constraint.baseline_std[l] = std;
    }

    // The gates: whole sentences, unconstrained against chosen, on every item.
    let (gates, gates_not_measured) = if chosen == 0 {
        (None, Some("no candidate narrowed the gap within the perplexity budget".to_string()))
    } else if !listed || !factual {
        (None, Some("the items have no occupation lists or no factual items (pairs, not fill items)".to_string()))
    } else {
        let mut scores = Vec::new();
        for (name, weights) in [("unconstrained", vec![0.0; layers]), ("chosen", constraint.weights.clone())] {
            let mut c = constraint.clone();
            c.weights = weights;
            model.set_bias(Some(c))?;
            let mut scorer = Scorer::new(&model, options.ctx, 64)?;
            let report: FillReport = evaluate_fill(
                &mut scorer,
                &tokenizer,
                None,
                &items,
                &mut |done, total| {
                    if done % 64 == 0 {
                        progress(&format!("gates, {name}: {done}/{total} items"));
                    }
                },
                &mut |_, _| Ok(()),
            )?;
            scores.push(report.per_item.unwrap_or_default());
        }
        let report = judge(&scores[0], &scores[1], (off_ppl, final_perplexity))?;
        constraint.gates = CalibrationGates { evaluated: report.evaluated, passed: report.passed };
        (Some(report), None)
    };
    model.set_bias(None)?;
    copy_with_section(&image, output, bramble_runtime::bias::SECTION, &constraint.to_section()?)?;
    Ok(ParityReport {
        direction: DirectionKind::Stereotype.name(),
        readout: options.whiten.map_or("orthogonal".to_string(), |a| format!("whitened, shrinkage {a}")),
        items: source,
        cue_free_sites: cue_free,
        factual_sites: sites.len() - cue_free,
        left_out: left_out.len(),
        correlation: fit.correlation,
        factual_cosine: fit.factual_cosine,
        sink_cosine: fit.sink_cosine,
        centre: match &constraint.centre {
            Centre::Parity(c) => c.clone(),
            _ => Vec::new(),
        },
        centre_steps,
        perplexity: final_perplexity,
        chosen,
        weights: constraint.weights.clone(),
        max_weights: constraint.max_weights.clone(),
        candidates,
        gates,
        gates_not_measured,
        pronoun_tokens: (constraint.she_tokens.len(), constraint.he_tokens.len()),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Each layer's residual stream at every token of `tokens` (one sequence,
/// from position 0) but the first (the attention sink), appended to `rows`
/// a token at a time (`layers × dim` each).
fn token_states(model: &Model<'_>, state: &mut RunState, tokens: &[u32], rows: &mut Vec<f32>) -> Result<()> {
    let (layers, dim, len) = (model.weights.layers.len(), model.config.dim as usize, tokens.len());
    let mut window = Vec::new();
    residual_rows(model, state, tokens, &mut window)?;
    for t in 1..len {
        for l in 0..layers {
            rows.extend_from_slice(&window[(l * len + t) * dim..(l * len + t + 1) * dim]);
        }
    }
    Ok(())
}

/// Whether first-token figures and a perplexity meet the gates the search
/// judges: |skew| small, no more male than off, factual accuracy kept, perplexity within budget.
fn admissible(off: &QuickFigures, off_ppl: f64, on: &QuickFigures, ppl: f64) -> bool {
    let skew = on.skew.unwrap_or(0.0);
    let factual = match (off.factual_accuracy, on.factual_accuracy) {
        (Some(a), Some(b)) => b >= a - FACTUAL_DROP,
        _ => true,
    };
    skew.abs() <= MAX_SKEW
        && skew >= off.skew.unwrap_or(0.0) - 1e-9
        && factual
        && ppl <= off_ppl * (1.0 + PERPLEXITY_RISE)
}

/// Cue-free fill items from pairs whose two sentences differ only in one
/// gendered pronoun's forms: the differing words blanked.
fn items_of_pairs(path: &Path) -> Result<Vec<(usize, FillItem)>> {
    let pairs = read_pairs(path)?;
    let items: Vec<(usize, FillItem)> = pairs
        .iter()
        .filter_map(|(line, pair)| {
            let text = super::stereotype::blank_pronoun_twins(&pair.stereo, &pair.anti)?;
            Some((
                *line,
                FillItem {
                    text,
                    occupation: String::new(),
                    listed: None,
                    gender: None,
                    source: "pairs".into(),
                    female_share: None,
                },
            ))
        })
        .collect();
    ensure!(!items.is_empty(), "{}: no pair differs only in a gendered pronoun", path.display());
    Ok(items)
}
