//! The pronoun-fill measure (`bramble bias-eval --fill`): a sentence about
//! an occupation with its referent's pronoun left blank is filled with
//! *she*, *he* and *they* (in the blank's form: her/him/them, her/his/their,
//! …), each filling scored by its total log-probability as pairs are, and
//! p_f = P(she) / (P(she) + P(he)) read from the first two.
//!
//! Unlike a pair's preference, p_f shows both ways a model can be unfair
//! to an occupation's women: the stereotype (p_f follows the occupation's
//! list: the occupation gap) and erasure (p_f low everywhere: the skew),
//! and R, the root mean square of p_f − 0.5, counts both. Items that state
//! the referent's gender (a kinship word, a name, a title) check that the
//! model still follows the facts: the factual-gender accuracy.
//!
//! `items` reads and writes the items file and fills its blanks, `figures`
//! turns the scores into the figures, `generation` makes the item set from
//! WinoBias and templates; this module scores the items.

mod figures;
mod generation;
mod items;

pub(in crate::bias) use figures::{draw, item_interval, percentile_interval};
pub use figures::{
    female_probability, least_squares_slope, occupation_gap, rms_deviation, share_slope, skew, they_probability,
    Estimate, FillFigures, GroupFill, IntervalMethod, ItemScore, OccupationFill, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED,
    INTERVAL_LEVEL, MIN_SLOPE_OCCUPATIONS,
};
pub use generation::{pronoun_fill_items, read_occupation_shares, PronounFillSet};
pub use items::{
    blanks, fill_blanks, parse_fill_items, read_fill_items, write_fill_items, FillItem, Gender, PronounForm,
    PronounOption, GENDERED_PRONOUNS,
};

use super::scoring::{score_entries, Scorer, ScoringRun};
use anyhow::{ensure, Result};
use bramble_runtime::model::RunState;
use bramble_runtime::tokenizer::Tokenizer;
use std::borrow::Cow;

/// What `bramble bias-eval --fill` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FillReport {
    /// The figures.
    #[serde(flatten)]
    pub figures: FillFigures,
    /// Items left out for a filling longer than the context, first tokens
    /// (with `first_token_scored` false, an item whose *she* and *he*
    /// fillings begin differently does not compare the pronoun itself) and speed.
    #[serde(flatten)]
    pub scoring: ScoringRun,
    /// Every item's scores (only in `--json` with `--per-item`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_item: Option<Vec<ItemScore>>,
    /// With `--feedback adaptive --passes N`: every pass over the items (this report is the last).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub passes: Vec<FillPass>,
    /// With `--gates`: this run against the same items with the constraint off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gates: Option<super::gates::GateReport>,
}

/// One pass of `bias-eval --fill --feedback adaptive` over the items.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FillPass {
    /// The pass's occupation gap.
    pub occupation_gap: Option<f64>,
    /// Its skew.
    pub skew: Option<f64>,
    /// Its R.
    pub rms_deviation: Option<f64>,
    /// Its factual-gender accuracy.
    pub factual_accuracy: Option<f64>,
    /// The largest change of a layer's weight from the pass's start to its end.
    pub weight_change: f32,
    /// The loop's weights at its end.
    pub weights: Vec<f32>,
}

impl FillPass {
    /// The pass whose report is `report`, its weights moved by `weight_change` to `weights`.
    pub fn of(report: &FillReport, weight_change: f32, weights: Vec<f32>) -> Self {
        let figures = &report.figures;
        Self {
            occupation_gap: figures.occupation_gap.map(|e| e.value),
            skew: figures.skew.map(|e| e.value),
            rms_deviation: figures.rms_deviation.map(|e| e.value),
            factual_accuracy: figures.factual_accuracy.map(|e| e.value),
            weight_change,
            weights,
        }
    }
}

/// Scores every item: each filling's total log-probability after `start`
/// (which only conditions, as for pairs), skipping (and counting) items
/// with a filling longer than the scorer's context. `progress(done, total)`
/// is called after each item, `after_item` on the scorer's state after each
/// scored one (the feedback loop reads its projections and sets weights)
/// with the model's own answer: the first token of the likelier of the
/// *she* and *he* fillings where they part (its choice of pronoun).
pub fn evaluate_fill(
    scorer: &mut Scorer<'_, '_>,
    tokenizer: &Tokenizer,
    start: Option<u32>,
    items: &[(usize, FillItem)],
    progress: &mut dyn FnMut(usize, usize),
    after_item: &mut dyn FnMut(&mut RunState, &[u32]) -> Result<()>,
) -> Result<FillReport> {
    let answer = std::cell::Cell::new(None::<u32>);
    let (scores, scoring) = score_entries(
        scorer,
        tokenizer,
        start,
        items,
        |item| {
            let [she, he, they] = PronounOption::ALL.map(|option| fill_blanks(&item.text, option));
            Ok([she?, he?, they?].map(Cow::from))
        },
        |scorer, line, item, [she, he, they]| {
            let score = ItemScore::new(line, item, scorer.total(she)?, scorer.total(he)?, scorer.total(they)?);
            let parted = she.iter().zip(he.iter()).take_while(|(a, b)| a == b).count();
            answer.set(if score.she >= score.he { she.get(parted) } else { he.get(parted) }.copied());
            Ok(score)
        },
        progress,
        &mut |state| after_item(state, answer.take().as_slice()),
    )?;
    ensure!(!scores.is_empty(), "every item has a filling longer than the context of {} tokens", scorer.context());
    Ok(FillReport {
        figures: FillFigures::of(&scores),
        scoring,
        per_item: Some(scores),
        passes: Vec::new(),
        gates: None,
    })
}
