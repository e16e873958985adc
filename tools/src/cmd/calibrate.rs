//! `bramble calibrate`: R-Sparse's plan (scores, thresholds, low-rank
//! factors), calibrated on a text and written into a copy of the image.

use anyhow::{Context, Result};
use bramble_tools::calibrate::{calibrate, relayout, CalibrateOptions, SearchOptions, SparseLayout};
use bramble_tools::stats;
use clap::{Args, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

/// `--sparse-layout`: the calibrator's [`SparseLayout`] by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SparseLayoutArg {
    Channels,
    Rows,
}

impl SparseLayoutArg {
    /// The name on the command line.
    fn name(self) -> &'static str {
        match self {
            SparseLayoutArg::Channels => "channels",
            SparseLayoutArg::Rows => "rows",
        }
    }
}

impl From<SparseLayoutArg> for SparseLayout {
    fn from(layout: SparseLayoutArg) -> Self {
        match layout {
            SparseLayoutArg::Channels => SparseLayout::Channels,
            SparseLayoutArg::Rows => SparseLayout::Rows,
        }
    }
}

#[derive(Args)]
pub struct CalibrateArgs {
    /// The image to calibrate (q4, q8, f16 or f32 weights).
    #[arg(long)]
    model: PathBuf,
    /// Calibration text (UTF-8), tokenized with the image's tokenizer.
    #[arg(long, required_unless_present = "reuse_plan")]
    text: Option<PathBuf>,
    /// Model-level sparsity in [0, 1): each module costs (1 − s) of dense.
    #[arg(long, allow_negative_numbers = true, required_unless_present = "reuse_plan")]
    sparsity: Option<f32>,
    /// How the sparse modules' weights are stored: `channels` (each input
    /// channel's values contiguous, so inactive channels are never read) or
    /// `rows` (the dense layout; the sparse path then reads every weight).
    #[arg(long, value_enum, default_value_t = SparseLayoutArg::Channels)]
    sparse_layout: SparseLayoutArg,
    /// Keep the model image's own R-Sparse plan (no calibration): rewrite it
    /// with `--sparse-layout`.
    #[arg(long, conflicts_with_all = ["text", "sparsity", "search"])]
    reuse_plan: bool,
    /// Share of the kept budget spent on exact channels (1: pure input sparsity, no low-rank path).
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    alpha: f32,
    /// Search per-layer (s, α) by an evolutionary search on calibration perplexity.
    #[arg(long)]
    search: bool,
    /// Candidates per generation of the search.
    #[arg(long, default_value_t = 32)]
    population: usize,
    /// Generations of the search.
    #[arg(long, default_value_t = 5)]
    generations: usize,
    /// Calibration tokens each search candidate's perplexity is measured on.
    #[arg(long, default_value_t = 1024)]
    search_tokens: usize,
    /// Calibration tokens (the first of the text).
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Window length the text is run in.
    #[arg(long, default_value_t = 256)]
    ctx: usize,
    /// Entries sampled per layer input to estimate the thresholds.
    #[arg(long, default_value_t = 1 << 17)]
    samples: usize,
    /// Power iterations of the randomized SVD.
    #[arg(long, default_value_t = 2)]
    power_iterations: usize,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Threads (default: the number of cores).
    #[arg(long)]
    threads: Option<usize>,
    /// The image to write.
    #[arg(long)]
    output: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    let started = Instant::now();
    let layout = SparseLayout::from(args.sparse_layout);
    let (Some(text_path), Some(sparsity)) = (&args.text, args.sparsity) else {
        let bytes = relayout(&args.model, &args.output, layout)
            .with_context(|| format!("rewriting {} into {}", args.model.display(), args.output.display()))?;
        outln!("wrote {} ({bytes} bytes, sparse layout {})", args.output.display(), args.sparse_layout.name());
        return Ok(());
    };
    let text = std::fs::read(text_path).with_context(|| format!("{}: cannot read", text_path.display()))?;
    let text = String::from_utf8(text).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (byte {}); calibration needs text",
            text_path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let options = CalibrateOptions {
        sparsity,
        layout,
        alpha: args.alpha,
        tokens: args.tokens,
        ctx: args.ctx,
        samples: args.samples,
        power_iterations: args.power_iterations,
        search: args.search.then_some(SearchOptions {
            population: args.population,
            generations: args.generations,
            tokens: args.search_tokens,
        }),
        threads: args.threads.unwrap_or_else(super::cores),
        seed: args.seed,
        progress: std::io::stderr().is_terminal() && !args.json,
        ..CalibrateOptions::default()
    };
    let report = calibrate(&args.model, &text, &args.output, &options)
        .with_context(|| format!("calibrating {} into {}", args.model.display(), args.output.display()))?;
    let peak = stats::peak_rss_bytes();
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["peak_rss_bytes"] = serde_json::json!(peak);
        value["seconds"] = serde_json::json!(seconds);
        outln!("{value}");
    } else {
        let mean_rank = report.modules.iter().map(|m| m.rank as f64).sum::<f64>() / report.modules.len().max(1) as f64;
        if let Some(search) = &report.search {
            outln!(
                "search: {} candidates, perplexity {:.3} (uniform {:.3})",
                search.evaluations,
                search.best_perplexity,
                search.uniform_perplexity
            );
        }
        outln!(
            "wrote {} ({:.1} MiB): {} modules at sparsity {:.3} (target {}), mean rank {:.1}, {} calibration tokens; \
             SVD {:.1} s, activations {:.1} s, search {:.1} s, {:.1} s in all, peak RSS {}",
            args.output.display(),
            report.image_bytes as f64 / (1 << 20) as f64,
            report.modules.len(),
            report.achieved,
            report.target,
            mean_rank,
            report.tokens,
            report.svd_seconds,
            report.activation_seconds,
            report.search_seconds,
            seconds,
            peak.map_or("unknown".to_string(), |b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64)),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each `--sparse-layout` value is the layout of that name.
    #[test]
    fn sparse_layout_values_are_the_layouts() {
        crate::cmd::assert_values_parse_alike::<SparseLayoutArg, SparseLayout>(|name| SparseLayout::parse(name).ok());
        for layout in SparseLayoutArg::value_variants() {
            assert_eq!(Some(layout.name()), layout.to_possible_value().as_ref().map(|v| v.get_name()));
        }
    }
}
