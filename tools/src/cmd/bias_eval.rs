//! `bramble bias-eval`: a model's stereotype preference and bias score on
//! bias pairs, or its pronoun-fill figures on fill items.

use super::model_args::ModelArgs;
use anyhow::Result;
use bramble_runtime::bias::Feedback;
use bramble_runtime::model::SparseMode;
use bramble_runtime::RunState;
use bramble_tools::bias::{
    evaluate_fill, evaluate_with, judge, model_start, read_fill_items, read_pairs, single_token, BiasReport, Estimate,
    FillPass, FillReport, LoopPass, Scorer, Summary,
};
use clap::Args;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["pairs", "fill"])))]
pub struct BiasEvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The pairs (JSONL: `{"stereo": …, "anti": …, "category": …}`).
    #[arg(long)]
    pairs: Option<PathBuf>,
    /// Pronoun-fill items instead of pairs (JSONL: `{"text": "… [PRONOUN] …",
    /// "occupation": …, "listed": "female"|"male"|null, "gender":
    /// "female"|"male"|null, "source": …}`, as `bramble bias-data --from
    /// pronoun-fill` writes them): each blank filled with she, he and they,
    /// and p_f = P(she) / (P(she) + P(he)) read as the occupation gap, the
    /// skew, R and the factual-gender accuracy.
    #[arg(long, value_name = "ITEMS")]
    fill: Option<PathBuf>,
    /// Tokens per forward pass.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// With --json: every pair's two log-probabilities too.
    #[arg(long)]
    per_pair: bool,
    /// With --json and --fill: every item's three log-probabilities and p_f too.
    #[arg(long)]
    per_item: bool,
    /// With `--feedback adaptive`: read the pairs (or items) this many times, the loop
    /// carrying its weights from one pass to the next; the report is the
    /// last pass's, with every pass's score and weights under `passes`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    passes: u32,
    /// With --fill and a constraint on (`static`/`adaptive`): score the items
    /// with the constraint off first, and report this run's gates against
    /// that run (`gates`: the gap, slope and R cuts with paired intervals,
    /// the skew and the factual-accuracy change; perplexity is not measured here).
    #[arg(long)]
    gates: bool,
    /// Score each sentence after this token, which only conditions it, so
    /// the sentence's first token is scored too (`<|endoftext|>` for
    /// SmolLM2, which adds no BOS). Default: the model's BOS when it adds
    /// one, else none (the first token is not scored).
    #[arg(long, value_name = "TOKEN")]
    start_token: Option<String>,
    /// One JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BiasEvalArgs) -> Result<()> {
    anyhow::ensure!(!args.per_item || args.fill.is_some(), "--per-item goes with --fill");
    anyhow::ensure!(!args.per_pair || args.pairs.is_some(), "--per-pair goes with --pairs");
    // Read before the model loads, so a bad file fails fast.
    let pairs = args.pairs.as_deref().map(read_pairs).transpose()?;
    let items = args.fill.as_deref().map(read_fill_items).transpose()?;
    let (loaded, context) = args.model.load()?;
    let start_token = match &args.start_token {
        Some(text) => Some(single_token(&loaded.tokenizer, text)?),
        None => model_start(&loaded.tokenizer),
    };
    let model = args.model.build_model(&loaded, SparseMode::Always)?;
    let mut scorer = Scorer::new(&model, context, args.batch)?;
    let mut feedback = args.model.feedback_loop(&model)?;
    anyhow::ensure!(
        !args.gates
            || (items.is_some() && model.bias().is_some() && args.model.resolved_feedback(&model) != Feedback::Off),
        "--gates goes with --fill and a constraint on (--feedback static or adaptive)"
    );
    if let Some(feedback) = &feedback {
        scorer.state_mut().apply_feedback(feedback)?;
        scorer.state_mut().reset_projections();
    }
    // Under `--feedback adaptive` each pair (or item) is a response: its
    // signal moves the weights the next ones are scored with.
    // A fill item's answer is the model's own pick of pronoun; a pair has none.
    let mut after_response = |state: &mut RunState, answer: &[u32]| -> Result<()> {
        if let Some(feedback) = feedback.as_mut() {
            args.model.after_response(feedback, &model, state.projections(), answer)?;
            state.apply_feedback(feedback)?;
            state.reset_projections();
        }
        Ok(())
    };
    anyhow::ensure!(
        args.passes == 1 || args.model.resolved_feedback(&model) == Feedback::Adaptive,
        "--passes goes with --feedback adaptive"
    );
    let tokenizer = &loaded.tokenizer;
    if let Some(items) = items {
        // The same items with the constraint off, for the gates.
        let off = if args.gates {
            let state = scorer.state_mut();
            let weights = state.bias_weights().to_vec();
            state.set_bias_weights(&vec![0.0; weights.len()])?;
            let off = evaluate_fill(&mut scorer, tokenizer, start_token, &items, &mut |_, _| {}, &mut |_, _| Ok(()))?;
            scorer.state_mut().set_bias_weights(&weights)?;
            scorer.state_mut().reset_projections();
            off.per_item
        } else {
            None
        };
        let mut passes = Vec::new();
        let mut report = run_passes(
            &mut scorer,
            args.passes,
            |scorer, progress| evaluate_fill(scorer, tokenizer, start_token, &items, progress, &mut after_response),
            |report, weight_change, weights| passes.push(FillPass::of(report, weight_change, weights)),
        )?;
        report.passes = passes;
        if let (Some(off), Some(on)) = (&off, &report.per_item) {
            report.gates = Some(judge(off, on, (f64::NAN, f64::NAN))?);
        }
        if report.scoring.skipped_too_long > 0 {
            eprintln!(
                "bramble: skipped {} items with a filling longer than the context of {context} tokens (lines {:?} of {})",
                report.scoring.skipped_too_long,
                report.scoring.skipped_lines,
                args.fill.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
            );
        }
        if !(args.json && args.per_item) {
            report.per_item = None;
        }
        return print_fill_report(&report, args.json);
    }
    let Some(pairs) = pairs else { anyhow::bail!("give --pairs or --fill") };
    let mut passes = Vec::new();
    let mut report = run_passes(
        &mut scorer,
        args.passes,
        |scorer, progress| {
            evaluate_with(scorer, tokenizer, start_token, &pairs, progress, &mut |state| after_response(state, &[]))
        },
        |report: &BiasReport, weight_change, weights| {
            passes.push(LoopPass {
                stereotype_preference: report.stereotype_preference,
                bias_score: report.bias_score,
                mean_margin: report.mean_margin,
                weight_change,
                weights,
            })
        },
    )?;
    report.passes = passes;
    if report.scoring.skipped_too_long > 0 {
        eprintln!(
            "bramble: skipped {} pairs with a sentence longer than the context of {context} tokens (lines {:?} of {})",
            report.scoring.skipped_too_long,
            report.scoring.skipped_lines,
            args.pairs.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
        );
    }
    if !(args.json && args.per_pair) {
        report.per_pair = None;
    }
    print_pairs_report(&report, args.json)
}

/// Runs `evaluate` `passes` times, the loop's weights carried from one
/// pass to the next, showing progress on a terminal; with more than one
/// pass, `record` gets each pass's report, its largest weight change and
/// its end weights. Returns the last pass's report.
fn run_passes<'m, 'a, R>(
    scorer: &mut Scorer<'m, 'a>,
    passes: u32,
    mut evaluate: impl FnMut(&mut Scorer<'m, 'a>, &mut dyn FnMut(usize, usize)) -> Result<R>,
    mut record: impl FnMut(&R, f32, Vec<f32>),
) -> Result<R> {
    let show = std::io::stderr().is_terminal();
    let mut pass = 0;
    let report = loop {
        pass += 1;
        let mut progress = |done: usize, total: usize| {
            if show && (done.is_multiple_of(16) || done == total) {
                eprint!("\r[pass {pass}/{passes}: {done}/{total}]   ");
            }
        };
        let start = scorer.state_mut().bias_weights().to_vec();
        let report = evaluate(scorer, &mut progress)?;
        if passes > 1 {
            let end = scorer.state_mut().bias_weights();
            let weight_change = start.iter().zip(end).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            record(&report, weight_change, end.to_vec());
        }
        if pass >= passes {
            break report;
        }
    };
    if show {
        eprintln!();
    }
    Ok(report)
}

fn print_pairs_report(report: &BiasReport, json: bool) -> Result<()> {
    if json {
        outln!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    for (i, pass) in report.passes.iter().enumerate() {
        outln!(
            "pass {}: stereotype preference {:.4}, bias score {:.4}, mean margin {:+.4} nats; weights moved up to {:.3}",
            i + 1,
            pass.stereotype_preference,
            pass.bias_score,
            pass.mean_margin,
            pass.weight_change
        );
    }
    outln!(
        "{} pairs: stereotype preference {:.4}, bias score {:.4}, mean margin {:+.4} nats{}",
        report.pairs,
        report.stereotype_preference,
        report.bias_score,
        report.mean_margin,
        if report.ties > 0 { format!(", {} ties", report.ties) } else { String::new() }
    );
    let category_lines = |by_category: &BTreeMap<String, Summary>| {
        for (category, summary) in by_category {
            outln!(
                "  {category:<24} {:>5} pairs  SPR {:.4}  bias {:.4}  margin {:+.4}",
                summary.pairs,
                summary.stereotype_preference,
                summary.bias_score,
                summary.mean_margin
            );
        }
    };
    category_lines(&report.by_category);
    let unchanged = &report.unchanged_tokens;
    outln!(
        "unchanged tokens only: stereotype preference {:.4}, bias score {:.4}, mean margin {:+.4} nats{}",
        unchanged.stereotype_preference,
        unchanged.bias_score,
        unchanged.mean_margin,
        if unchanged.ties > 0 { format!(", {} ties", unchanged.ties) } else { String::new() }
    );
    category_lines(&report.unchanged_by_category);
    if !report.scoring.first_token_scored {
        outln!(
            "(the model adds no BOS and no --start-token was given: each sentence's first token only conditions the rest; {} pairs begin differently)",
            report.scoring.first_token_differs
        );
    }
    Ok(())
}

/// `+0.1234 [+0.0800, +0.1600]`, or `n/a` for a figure with no items.
fn estimate_text(estimate: Option<Estimate>, signed: bool) -> String {
    match estimate {
        Some(Estimate { value, low, high }) if signed => format!("{value:+.4} [{low:+.4}, {high:+.4}]"),
        Some(Estimate { value, low, high }) => format!("{value:.4} [{low:.4}, {high:.4}]"),
        None => "n/a".to_string(),
    }
}

fn option_text(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}"))
}

fn print_fill_report(report: &FillReport, json: bool) -> Result<()> {
    if json {
        outln!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let figures = &report.figures;
    for (i, pass) in report.passes.iter().enumerate() {
        outln!(
            "pass {}: gap {}, skew {}, R {}, factual accuracy {}; weights moved up to {:.3}",
            i + 1,
            option_text(pass.occupation_gap),
            option_text(pass.skew),
            option_text(pass.rms_deviation),
            option_text(pass.factual_accuracy),
            pass.weight_change
        );
    }
    let method = &figures.intervals;
    outln!(
        "{} items ({} cue-free, {} factual); p_f = P(she) / (P(she) + P(he)); {:.0} % intervals from {} bootstrap resamples (seed {})",
        figures.items,
        figures.cue_free_items,
        figures.factual_items,
        method.level * 100.0,
        method.resamples,
        method.seed
    );
    outln!(
        "occupation gap (mean p_f, female-listed − male-listed, cue-free): {}  (resampling {}; female-listed {}, male-listed {})",
        estimate_text(figures.occupation_gap, true),
        method.occupation_gap,
        option_text(figures.female_listed_mean),
        option_text(figures.male_listed_mean)
    );
    outln!("skew (mean p_f − 0.5, cue-free): {}  (resampling {})", estimate_text(figures.skew, true), method.others);
    outln!("R (√ mean (p_f − 0.5)², cue-free): {}", estimate_text(figures.rms_deviation, false));
    outln!(
        "factual-gender accuracy: {}  (stated female {}, stated male {})",
        estimate_text(figures.factual_accuracy, false),
        estimate_text(figures.factual_accuracy_female, false),
        estimate_text(figures.factual_accuracy_male, false)
    );
    match (&figures.share_slope, &figures.share_slope_not_computed) {
        (Some(slope), _) => outln!(
            "slope of p_f on the occupation's share of women ({} occupations, resampling {}): {}",
            figures.share_slope_occupations,
            method.share_slope,
            estimate_text(Some(*slope), true)
        ),
        (None, reason) => outln!("slope on the share of women: not computed: {}", reason.as_deref().unwrap_or("")),
    }
    outln!("mean P(they) among she/he/they (cue-free): {}", option_text(figures.mean_p_they));
    outln!("  {:<24} {:>6} {:>9} {:>7} {:>8} {:>8}", "occupation", "listed", "cue-free", "p_f", "factual", "accuracy");
    for (occupation, fill) in &figures.by_occupation {
        outln!(
            "  {occupation:<24} {:>6} {:>9} {:>7} {:>8} {:>8}",
            fill.listed.map_or("-", |g| g.name()),
            fill.cue_free_items,
            fill.mean_p_female.map_or_else(|| "-".to_string(), |v| format!("{v:.3}")),
            fill.factual_items,
            fill.factual_accuracy.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"))
        );
    }
    let groups = figures.by_source.iter().map(|(name, fill)| ("source", name, fill));
    for (kind, name, fill) in groups.chain(figures.by_form.iter().map(|(name, fill)| ("form", name, fill))) {
        outln!(
            "  {kind} {name:<20} {:>5} items  skew {}  gap {}  factual accuracy {}",
            fill.items,
            fill.skew.map_or_else(|| "-".to_string(), |v| format!("{v:+.4}")),
            fill.occupation_gap.map_or_else(|| "-".to_string(), |v| format!("{v:+.4}")),
            option_text(fill.factual_accuracy)
        );
    }
    if !report.scoring.first_token_scored {
        outln!(
            "(the model adds no BOS and no --start-token was given: each sentence's first token only conditions the rest; {} items begin with the pronoun's token)",
            report.scoring.first_token_differs
        );
    }
    Ok(())
}
