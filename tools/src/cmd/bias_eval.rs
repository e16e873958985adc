//! `bramble bias-eval`: a model's stereotype preference and bias score on bias pairs.

use super::model_args::ModelArgs;
use anyhow::Result;
use bramble_runtime::bias::Feedback;
use bramble_runtime::model::SparseMode;
use bramble_runtime::RunState;
use bramble_tools::bias::{evaluate_with, model_start, read_pairs, single_token, LoopPass, Scorer, Summary};
use clap::Args;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Args)]
pub struct BiasEvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The pairs (JSONL: `{"stereo": …, "anti": …, "category": …}`).
    #[arg(long)]
    pairs: PathBuf,
    /// Tokens per forward pass.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// With --json: every pair's two log-probabilities too.
    #[arg(long)]
    per_pair: bool,
    /// With `--feedback adaptive`: read the pairs this many times, the loop
    /// carrying its weights from one pass to the next; the report is the
    /// last pass's, with every pass's score and weights under `passes`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    passes: u32,
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
    let pairs = read_pairs(&args.pairs)?;
    let (loaded, context) = args.model.load()?;
    let start_token = match &args.start_token {
        Some(text) => Some(single_token(&loaded.tokenizer, text)?),
        None => model_start(&loaded.tokenizer),
    };
    let model = args.model.build_model(&loaded, SparseMode::Always)?;
    let mut scorer = Scorer::new(&model, context, args.batch)?;
    let mut feedback = args.model.feedback_loop(&model)?;
    if let Some(feedback) = &feedback {
        scorer.state_mut().set_bias_weights(&feedback.weights)?;
        scorer.state_mut().reset_projections();
    }
    // Under `--feedback adaptive` each pair is a response: its signal moves
    // the weights the next pairs are scored with.
    let mut after_pair = |state: &mut RunState| -> Result<()> {
        if let Some(feedback) = feedback.as_mut() {
            args.model.after_response(feedback, &model, state.projections())?;
            state.set_bias_weights(&feedback.weights)?;
            state.reset_projections();
        }
        Ok(())
    };
    anyhow::ensure!(
        args.passes == 1 || args.model.feedback == Feedback::Adaptive,
        "--passes goes with --feedback adaptive"
    );
    let show = std::io::stderr().is_terminal();
    let mut passes = Vec::new();
    let mut report = loop {
        let pass = passes.len() + 1;
        let mut progress = |done: usize, total: usize| {
            if show && (done.is_multiple_of(16) || done == total) {
                eprint!("\r[pass {pass}/{}: {done}/{total}]   ", args.passes);
            }
        };
        let start = scorer.state_mut().bias_weights().to_vec();
        let report =
            evaluate_with(&mut scorer, &loaded.tokenizer, start_token, &pairs, &mut progress, &mut after_pair)?;
        if args.passes > 1 {
            let end = scorer.state_mut().bias_weights();
            let weight_change = start.iter().zip(end).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            passes.push(LoopPass {
                stereotype_preference: report.stereotype_preference,
                bias_score: report.bias_score,
                mean_margin: report.mean_margin,
                weight_change,
                weights: end.to_vec(),
            });
        }
        if pass >= args.passes as usize {
            break report;
        }
    };
    if show {
        eprintln!();
    }
    if args.passes > 1 {
        report.passes = passes;
    }
    if report.skipped_too_long > 0 {
        eprintln!(
            "bramble: skipped {} pairs with a sentence longer than the context of {context} tokens (lines {:?} of {})",
            report.skipped_too_long,
            report.skipped_lines,
            args.pairs.display()
        );
    }
    if !(args.json && args.per_pair) {
        report.per_pair = None;
    }
    if args.json {
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
    if !report.first_token_scored {
        outln!(
            "(the model adds no BOS and no --start-token was given: each sentence's first token only conditions the rest; {} pairs begin differently)",
            report.first_token_differs
        );
    }
    Ok(())
}
