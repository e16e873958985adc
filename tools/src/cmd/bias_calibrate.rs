//! `bramble bias-calibrate`: per-layer bias directions and predefined
//! constraint weights, written into a copy of the image.

use anyhow::{Context, Result};
use bramble_runtime::bias::{DirectionKind, LoopSignal};
use bramble_runtime::kernels::pool::MAX_THREADS;
use bramble_tools::bias::{bias_calibrate, BiasCalibrateOptions, CentreChoice};
use clap::{Args, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;

/// `--direction`: the runtime's [`DirectionKind`] by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DirectionArg {
    Principal,
    MeanDifference,
}

impl From<DirectionArg> for DirectionKind {
    fn from(direction: DirectionArg) -> Self {
        match direction {
            DirectionArg::Principal => DirectionKind::PrincipalComponent,
            DirectionArg::MeanDifference => DirectionKind::MeanDifference,
        }
    }
}

/// `--loop-signal`: the runtime's [`LoopSignal`] by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoopSignalArg {
    Spread,
    MeanLean,
}

impl From<LoopSignalArg> for LoopSignal {
    fn from(signal: LoopSignalArg) -> Self {
        match signal {
            LoopSignalArg::Spread => LoopSignal::Spread,
            LoopSignalArg::MeanLean => LoopSignal::MeanLean,
        }
    }
}

/// `--centre`: the calibrator's [`CentreChoice`] by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CentreArg {
    Zero,
    Baseline,
    Midpoint,
}

impl From<CentreArg> for CentreChoice {
    fn from(centre: CentreArg) -> Self {
        match centre {
            CentreArg::Zero => CentreChoice::Zero,
            CentreArg::Baseline => CentreChoice::Baseline,
            CentreArg::Midpoint => CentreChoice::Midpoint,
        }
    }
}

/// `--sink`: what the directions do about the attention sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SinkArg {
    Orthogonal,
    Keep,
}

#[derive(Args)]
pub struct BiasCalibrateArgs {
    /// The image.
    #[arg(long)]
    model: PathBuf,
    /// Calibration pairs (JSONL, as `bias-data` writes them), e.g. WinoBias dev.
    #[arg(long)]
    pairs: PathBuf,
    /// Text the perplexity budget is measured on (e.g. a play).
    #[arg(long)]
    text: PathBuf,
    /// The image to write.
    #[arg(long)]
    output: PathBuf,
    /// Pairs the directions come from (0: all).
    #[arg(long, default_value_t = 0)]
    direction_pairs: usize,
    /// Pairs each candidate's bias score is measured on.
    #[arg(long, default_value_t = 100)]
    eval_pairs: usize,
    /// Tokens of the text used.
    #[arg(long, default_value_t = 1024)]
    text_tokens: usize,
    /// Allowed perplexity increase on the text.
    #[arg(long, default_value_t = 0.02)]
    budget: f64,
    /// Candidate weights (each on all layers and on the most separating quarter).
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.25,0.5")]
    weights: Vec<f32>,
    /// How the directions are found: `principal`, the top principal component
    /// of the hidden-state differences at the swapped words and the tokens
    /// just after them; `mean-difference`, the mean stereo − anti of the
    /// sentences' mean hidden states.
    #[arg(long, value_enum, default_value_t = DirectionArg::Principal)]
    direction: DirectionArg,
    /// Pairs whose two sentences give the spread the layers' separations are
    /// measured in, and with `--loop-signal mean-lean` the loop's baseline (0: the direction pairs).
    #[arg(long, default_value_t = 100)]
    baseline_pairs: usize,
    /// How the feedback loop reads a response: `spread`, the root mean square
    /// departure of each token's projection from neutral text (pieces of
    /// TXT); `mean-lean`, how far the response's mean projection leans from
    /// the pairs' own sentences (the calibrations before version 2 sections).
    #[arg(long, value_enum, default_value_t = LoopSignalArg::Spread)]
    loop_signal: LoopSignalArg,
    /// With `--loop-signal spread`: how many pieces of TXT (windows of 24
    /// tokens spread evenly over it) the baseline and the loop's target are measured on.
    #[arg(long, default_value_t = 200)]
    baseline_pieces: usize,
    /// Where the constraint moves each projection `h · d_l`: `zero`, 0
    /// (`h ← h − w (h·d) d`); `baseline`, its neutral mean (`h ← h − w (h·d −
    /// mean) d`), which leaves a token at the baseline alone; `midpoint`, the
    /// mean of the pairs' two sides at the first swapped token, so erasing
    /// leaves a token between the genders rather than at 0 (principal only).
    #[arg(long, value_enum, default_value_t = CentreArg::Zero)]
    centre: CentreArg,
    /// The attention sink (the first position's residual stream, a hundred
    /// times the others' size in SmolLM2's middle layers): `orthogonal`
    /// removes each direction's component along it, so the constraint
    /// leaves the sink alone; `keep` leaves the directions as found.
    #[arg(long, value_enum, default_value_t = SinkArg::Orthogonal)]
    sink: SinkArg,
    /// Threads (default: the number of cores).
    #[arg(long)]
    threads: Option<usize>,
    /// One JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BiasCalibrateArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.text).with_context(|| format!("{}: cannot read", args.text.display()))?;
    let options = BiasCalibrateOptions {
        threads: args.threads.unwrap_or_else(super::cores).clamp(1, MAX_THREADS),
        direction_pairs: args.direction_pairs,
        eval_pairs: args.eval_pairs,
        text_tokens: args.text_tokens,
        budget: args.budget,
        weights: args.weights.clone(),
        direction: args.direction.into(),
        baseline_pairs: args.baseline_pairs,
        loop_signal: args.loop_signal.into(),
        baseline_pieces: args.baseline_pieces,
        centre: args.centre.into(),
        keep_sink: args.sink == SinkArg::Keep,
        ..BiasCalibrateOptions::default()
    };
    let show = std::io::stderr().is_terminal() && !args.json;
    let mut progress = |what: &str| {
        if show {
            eprint!("\r{what}            ");
        }
    };
    let report = bias_calibrate(&args.model, &args.pairs, &text, &args.output, &options, &mut progress)
        .with_context(|| format!("calibrating {} into {}", args.model.display(), args.output.display()))?;
    if show {
        eprintln!();
    }
    if args.json {
        outln!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    for (i, c) in report.candidates.iter().enumerate() {
        outln!(
            "{} {:<4} w {:.2}: bias score {:.4} (SPR {:.4}), perplexity {:.3}{}",
            if i == report.chosen { "*" } else { " " },
            c.layers,
            c.weight,
            c.bias_score,
            c.stereotype_preference,
            c.perplexity,
            if c.within_budget { "" } else { "  (over budget)" }
        );
    }
    outln!(
        "feedback loop ({}): target signal {:.3}, hard limit {:.3} (from {} baseline responses)",
        report.loop_signal,
        report.loop_target,
        report.loop_hard_limit,
        report.baseline_responses
    );
    outln!(
        "wrote {}: {} directions from {} pairs ({} token differences), {:.0} s",
        args.output.display(),
        report.direction,
        report.direction_pairs,
        report.difference_rows,
        report.seconds
    );
    Ok(())
}
