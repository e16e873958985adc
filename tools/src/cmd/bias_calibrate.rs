//! `bramble bias-calibrate`: per-layer bias directions and predefined
//! constraint weights, written into a copy of the image.

use anyhow::{bail, Context, Result};
use bramble_runtime::bias::{DirectionKind, LoopSignal};
use bramble_runtime::kernels::pool::MAX_THREADS;
use bramble_tools::bias::{
    bias_calibrate, calibrate_parity, BiasCalibrateOptions, CentreChoice, ParityItems, ParityOptions, SitePosition,
};
use clap::{Args, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;

/// `--direction`: the runtime's [`DirectionKind`] by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DirectionArg {
    Stereotype,
    Principal,
    MeanDifference,
}

impl From<DirectionArg> for DirectionKind {
    fn from(direction: DirectionArg) -> Self {
        match direction {
            DirectionArg::Stereotype => DirectionKind::Stereotype,
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

/// `--stated`: what the stereotype directions do about the stated-gender direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatedArg {
    Orthogonal,
    Keep,
}

/// `--fit-against`: the stereotype direction's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FitArg {
    Occupation,
    Item,
}

/// `--position`: the runtime-independent [`SitePosition`] by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PositionArg {
    Pronoun,
    Occupation,
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
    /// With `--direction stereotype` and no `--fill`, the pairs that differ
    /// only in a gendered pronoun are made into cue-free fill items (which
    /// carry no occupation lists, so the gates cannot be measured and `auto`
    /// leaves the loop off).
    #[arg(long)]
    pairs: PathBuf,
    /// With `--direction stereotype`: fill items (`bias-data --from
    /// pronoun-fill`, the dev split) the directions are fitted on and the
    /// gates measured on, in place of the pairs.
    #[arg(long, value_name = "ITEMS")]
    fill: Option<PathBuf>,
    /// With `--direction stereotype`: `orthogonal` removes from each
    /// direction its component along the stated-gender direction of the
    /// factual items (female minus male), so a sentence that says who the
    /// referent is keeps its pronoun (the default; at the occupation and, when
    /// the states are read there, at the pronoun); `keep` leaves it.
    #[arg(long, value_enum)]
    stated: Option<StatedArg>,
    /// With `--direction stereotype`: what the direction is fitted against,
    /// `occupation` (the default), each occupation's mean lean (what the occupation
    /// explains of the lean, not the template or the blank's form), or
    /// `item`, each site's own lean.
    #[arg(long, value_enum)]
    fit_against: Option<FitArg>,
    /// With `--direction stereotype`: where the states are read, `pronoun`,
    /// the token before the blank (whose logits choose the pronoun), or
    /// `occupation` (the default), the occupation's last token, where the
    /// model keeps what it associates with the occupation (on SmolLM2-135M
    /// q4 a direction read there narrows the gap four times as much).
    #[arg(long, value_enum)]
    position: Option<PositionArg>,
    /// With `--direction stereotype`: LEACE's whitened form. Each layer's
    /// projection is read along `r ∝ Σ⁻¹ σ` (σ the states' covariance with
    /// the lean, Σ their covariance, shrunk by ALPHA toward a multiple of the
    /// identity) and the state moved along `d ∝ σ`, which changes the states
    /// least for the same erasure; without it, read along `d` (an orthogonal
    /// projection). The image carries the read vectors (bias section version 4).
    /// Not the default: on SmolLM2-135M q4 (α 0.5) it passed six of seven
    /// gates on the calibration items but lost 9.7 points of factual
    /// accuracy on held-out ones (docs/bias.md, "The whitened read").
    #[arg(long, value_name = "ALPHA")]
    whiten: Option<f64>,
    /// Text the perplexity budget is measured on (e.g. a play).
    #[arg(long)]
    text: PathBuf,
    /// The image to write.
    #[arg(long)]
    output: PathBuf,
    /// First design: pairs the directions come from (0, the default: all).
    #[arg(long)]
    direction_pairs: Option<usize>,
    /// First design: pairs each candidate's bias score is measured on (default 100).
    #[arg(long)]
    eval_pairs: Option<usize>,
    /// Tokens of the text used.
    #[arg(long, default_value_t = 1024)]
    text_tokens: usize,
    /// First design: allowed perplexity increase on the text (default 0.02; the
    /// stereotype calibration's perplexity gate is +2 %, fixed).
    #[arg(long)]
    budget: Option<f64>,
    /// Candidate weights: with `stereotype`, each on the quarter, the half
    /// and all of the layers whose projections follow the lean most (default
    /// 0.5,0.75,1); otherwise each on all layers and on the most separating
    /// quarter (default 0.1,0.25,0.5).
    #[arg(long, value_delimiter = ',')]
    weights: Option<Vec<f32>>,
    /// How the directions are found: `stereotype` (the default), fitted on
    /// the model's own states where it picks a pronoun for an occupation with
    /// no gender cue, against its lean P(he) vs P(she) there, with a centre
    /// per layer where that lean is even and gates measured on the fill
    /// items; `principal` (the first design), the top principal component
    /// of the hidden-state differences at the swapped words and the tokens
    /// just after them; `mean-difference`, the mean stereo − anti of the
    /// sentences' mean hidden states.
    #[arg(long, value_enum, default_value_t = DirectionArg::Stereotype)]
    direction: DirectionArg,
    /// First design: pairs whose two sentences give the spread the layers' separations are
    /// measured in, and with `--loop-signal mean-lean` the loop's baseline (default 100; 0: the direction pairs).
    #[arg(long)]
    baseline_pairs: Option<usize>,
    /// First design: how the feedback loop reads a response: `spread` (the default), the root mean square
    /// departure of each token's projection from neutral text (pieces of
    /// TXT); `mean-lean`, how far the response's mean projection leans from
    /// the pairs' own sentences (the calibrations before version 2 sections).
    #[arg(long, value_enum)]
    loop_signal: Option<LoopSignalArg>,
    /// With `--loop-signal spread`: how many pieces of TXT (windows of 24
    /// tokens spread evenly over it) the baseline and the loop's target are measured on.
    #[arg(long, default_value_t = 200)]
    baseline_pieces: usize,
    /// First design: where the constraint moves each projection `h · d_l`: `zero` (the default), 0
    /// (`h ← h − w (h·d) d`); `baseline`, its neutral mean (`h ← h − w (h·d −
    /// mean) d`), which leaves a token at the baseline alone; `midpoint`, the
    /// mean of the pairs' two sides at the first swapped token, so erasing
    /// leaves a token between the genders rather than at 0 (principal only).
    #[arg(long, value_enum)]
    centre: Option<CentreArg>,
    /// First design: the attention sink (the first position's residual stream, a hundred
    /// times the others' size in SmolLM2's middle layers): `orthogonal`
    /// removes each direction's component along it, so the constraint
    /// leaves the sink alone (the default; stereotype directions always are);
    /// `keep` leaves the directions as found.
    #[arg(long, value_enum)]
    sink: Option<SinkArg>,
    /// Threads (default: the number of cores).
    #[arg(long)]
    threads: Option<usize>,
    /// One JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BiasCalibrateArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.text).with_context(|| format!("{}: cannot read", args.text.display()))?;
    let threads = args.threads.unwrap_or_else(super::cores).clamp(1, MAX_THREADS);
    // Each design's own settings, refused with the other's rather than ignored.
    let first_design = [
        ("--direction-pairs", args.direction_pairs.is_some()),
        ("--eval-pairs", args.eval_pairs.is_some()),
        ("--budget", args.budget.is_some()),
        ("--baseline-pairs", args.baseline_pairs.is_some()),
        ("--loop-signal", args.loop_signal.is_some()),
        ("--centre", args.centre.is_some()),
        ("--sink", args.sink.is_some()),
    ];
    let second_design = [
        ("--fill", args.fill.is_some()),
        ("--stated", args.stated.is_some()),
        ("--fit-against", args.fit_against.is_some()),
        ("--position", args.position.is_some()),
        ("--whiten", args.whiten.is_some()),
    ];
    let (others, design): (&[(&str, bool)], &str) = if args.direction == DirectionArg::Stereotype {
        (&first_design, "--direction principal or mean-difference")
    } else {
        (&second_design, "--direction stereotype")
    };
    if let Some((flag, _)) = others.iter().find(|(_, given)| *given) {
        bail!("{flag} is for {design}");
    }
    if args.direction == DirectionArg::Stereotype {
        return run_stereotype(&args, &text, threads);
    }
    let options = BiasCalibrateOptions {
        threads,
        direction_pairs: args.direction_pairs.unwrap_or(0),
        eval_pairs: args.eval_pairs.unwrap_or(100),
        text_tokens: args.text_tokens,
        budget: args.budget.unwrap_or(0.02),
        weights: args.weights.clone().unwrap_or_else(|| vec![0.1, 0.25, 0.5]),
        direction: args.direction.into(),
        baseline_pairs: args.baseline_pairs.unwrap_or(100),
        loop_signal: args.loop_signal.unwrap_or(LoopSignalArg::Spread).into(),
        baseline_pieces: args.baseline_pieces,
        centre: args.centre.unwrap_or(CentreArg::Zero).into(),
        keep_sink: args.sink == Some(SinkArg::Keep),
        ..BiasCalibrateOptions::default()
    };
    let report = with_progress(&args, |progress| {
        bias_calibrate(&args.model, &args.pairs, &text, &args.output, &options, progress)
    })?;
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

/// `--direction stereotype`: the second design's calibration.
fn run_stereotype(args: &BiasCalibrateArgs, text: &str, threads: usize) -> Result<()> {
    let defaults = ParityOptions::default();
    let options = ParityOptions {
        threads,
        text_tokens: args.text_tokens,
        weights: args.weights.clone().unwrap_or(defaults.weights),
        orthogonal_to_stated: args.stated != Some(StatedArg::Keep),
        occupation_means: args.fit_against != Some(FitArg::Item),
        position: match args.position {
            Some(PositionArg::Pronoun) => SitePosition::Pronoun,
            _ => SitePosition::Occupation,
        },
        baseline_pieces: args.baseline_pieces,
        whiten: args.whiten,
        ..defaults
    };
    let items = match &args.fill {
        Some(path) => ParityItems::Fill(path),
        None => ParityItems::Pairs(&args.pairs),
    };
    let report =
        with_progress(args, |progress| calibrate_parity(&args.model, items, text, &args.output, &options, progress))?;
    if args.json {
        outln!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let figure = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:+.3}"));
    for (i, c) in report.candidates.iter().enumerate() {
        outln!(
            "{} layers {:>4.0} % w {:.2} shift {:+.2}: gap {} skew {} R {} factual {} (first token), perplexity {:.3}{}",
            if i == report.chosen { "*" } else { " " },
            100.0 * c.layer_share,
            c.weight,
            c.shift,
            figure(c.figures.occupation_gap),
            figure(c.figures.skew),
            figure(c.figures.rms_deviation),
            figure(c.figures.factual_accuracy),
            c.perplexity,
            if c.admissible { "" } else { "  (not admissible)" }
        );
    }
    match (&report.gates, &report.gates_not_measured) {
        (Some(gates), _) => {
            for gate in &gates.gates {
                let value = gate.value.map_or("-".to_string(), |e| {
                    if e.low == e.high {
                        format!("{:+.3}", e.value)
                    } else {
                        format!("{:+.3} [{:+.3}, {:+.3}]", e.value, e.low, e.high)
                    }
                });
                let verdict = match (gate.evaluated, gate.passed) {
                    (false, _) => "not measured",
                    (true, true) => "passed",
                    (true, false) => "FAILED",
                };
                outln!("gate {:<14} {value:<28} requires {:<40} {verdict}", gate.name, gate.requires);
            }
        }
        (None, Some(why)) => outln!("gates not measured: {why}"),
        (None, None) => {}
    }
    outln!(
        "wrote {}: stereotype directions ({}) from {} cue-free and {} factual sites ({} items left out), {:.0} s",
        args.output.display(),
        report.readout,
        report.cue_free_sites,
        report.factual_sites,
        report.left_out,
        report.seconds
    );
    Ok(())
}

/// Runs a calibration with its progress on stderr: one line rewritten in a
/// terminal, a line a step otherwise (a log), nothing with `--json`; the
/// error names the images.
fn with_progress<R>(args: &BiasCalibrateArgs, calibrate: impl FnOnce(&mut dyn FnMut(&str)) -> Result<R>) -> Result<R> {
    let terminal = std::io::stderr().is_terminal();
    let mut progress = |what: &str| match (args.json, terminal) {
        (true, _) => {}
        (false, true) => eprint!("\r{what}            "),
        (false, false) => eprintln!("{what}"),
    };
    let result = calibrate(&mut progress)
        .with_context(|| format!("calibrating {} into {}", args.model.display(), args.output.display()));
    if terminal && !args.json {
        eprintln!();
    }
    result
}
