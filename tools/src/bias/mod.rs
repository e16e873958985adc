//! Bias detection and measurement: the pairs format, converters from the
//! public datasets (WinoBias, CrowS-Pairs, StereoSet), the evaluation
//! `bramble bias-eval` runs and the calibration `bramble bias-calibrate` runs.
//!
//! A pair is two sentences that differ only in the words carrying a
//! stereotype, one line of JSONL each:
//! `{"stereo": "...", "anti": "...", "category": "..."}`. The model scores
//! each sentence by its total log-probability; the stereotype preference
//! rate (SPR) is the share of pairs where the stereotyped sentence is more
//! likely, and the bias score is |2·SPR − 1| (0: no preference either way).
//!
//! One module per step: `pairs` reads and writes the pairs
//! file, `datasets` converts the public datasets into it, `scoring` gives a
//! sentence's log-probabilities, `evaluation` turns pairs' scores into the
//! report, and `calibration` (with `residuals` and `directions`) finds the
//! constraint and writes it into an image. `fill` is the other measure: a
//! sentence with its pronoun left blank, filled with she, he and they.

mod calibration;
mod datasets;
mod directions;
mod evaluation;
mod fill;
mod gates;
mod pairs;
mod parity;
mod residuals;
mod scoring;
mod stereotype;

pub use calibration::{
    bias_calibrate, copy_with_section, text_pieces, BiasCalibrateOptions, BiasCalibrateReport, BiasCandidate,
    CentreChoice, HARD_LIMIT_FACTOR, LOOP_TARGET_QUANTILE, MIN_PIECES, PIECE_TOKENS,
};
pub use datasets::{convert_dataset, Dataset};
pub use directions::{differing_positions, principal_direction, FOLLOWING_TOKENS};
pub use evaluation::{evaluate, evaluate_with, shared_ends, BiasReport, LoopPass, PairScore, Summary};
pub use fill::{
    blanks, evaluate_fill, female_probability, fill_blanks, least_squares_slope, occupation_gap, parse_fill_items,
    pronoun_fill_items, read_fill_items, read_occupation_shares, rms_deviation, share_slope, skew, they_probability,
    write_fill_items, Estimate, FillFigures, FillItem, FillPass, FillReport, Gender, GroupFill, IntervalMethod,
    ItemScore, OccupationFill, PronounFillSet, PronounForm, PronounOption, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED,
    GENDERED_PRONOUNS, INTERVAL_LEVEL, MIN_SLOPE_OCCUPATIONS,
};
pub use gates::{
    judge, Gate, GateReport, FACTUAL_DROP, MAX_SKEW, PERPLEXITY_RISE, R_CUT, STEREOTYPE_CUT, STEREOTYPE_CUT_LOW,
};
pub use pairs::{parse_pairs, read_pairs, write_pairs, Pair};
pub use parity::{calibrate_parity, ParityCandidate, ParityItems, ParityOptions, ParityReport, LAYER_SHARES};
pub use scoring::{model_start, sentence_tokens, sentence_tokens_after, single_token, Scorer};
pub use stereotype::{
    blank_pronoun_twins, fit_stereotype, group_means, lean_female_probability, pronoun_sites, pronoun_tokens,
    read_sites, FitInput, PronounSite, QuickFigures, SitePosition, StereotypeFit,
};
