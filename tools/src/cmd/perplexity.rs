//! `bramble perplexity`: the perplexity of a text, by llama.cpp's method.

use super::model_args::ModelArgs;
use anyhow::{Context, Result};
use bramble_runtime::model::SparseMode;
use bramble_tools::generate::{perplexity, perplexity_tokens};
use clap::Args;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text.
    #[arg(long)]
    file: PathBuf,
    /// Only the first K windows.
    #[arg(long)]
    max_chunks: Option<usize>,
    /// Tokens per forward pass.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Print a JSON object before the last line.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PerplexityArgs) -> Result<()> {
    let (loaded, context) = args.model.load()?;
    let mut model = args.model.build_model(&loaded, SparseMode::Always)?;
    // Adaptive: the text is measured under the loop's current weights and
    // centres (restored from --bias-state); a text is not a response, so
    // they are not adjusted.
    if let Some(feedback) = args.model.feedback_loop(&model)? {
        let constraint = model.bias().expect("adaptive feedback loaded the bias section");
        let mut current =
            bramble_runtime::bias::BiasConstraint { weights: feedback.weights.clone(), ..constraint.clone() };
        if feedback.centre_shift != 0.0 {
            current.centre = bramble_runtime::bias::Centre::Parity(feedback.centres.clone());
        }
        model.set_bias(Some(current))?;
    }
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("{}: cannot read", args.file.display()))?;
    // As llama.cpp reads `-f`: one trailing newline is not part of the text.
    let (tokens, bos) = perplexity_tokens(&loaded.tokenizer, text.strip_suffix('\n').unwrap_or(&text));
    let ctx = args.model.ctx.unwrap_or(context.min(512));
    let batch = args.batch.clamp(1, ctx);
    let show = std::io::stderr().is_terminal();
    let mut progress = |done: usize, total: usize, running: f64| {
        if show {
            eprint!("\r[{done}/{total}] perplexity so far {running:.4}   ");
        }
    };
    let result = perplexity(&model, &tokens, bos, ctx, args.max_chunks, batch, &mut progress)?;
    if show {
        eprintln!();
    }
    if args.json {
        outln!("{}", serde_json::to_string(&result)?);
    }
    outln!("perplexity: {:.4}", result.perplexity);
    Ok(())
}
