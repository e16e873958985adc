//! `bramble plan`: whether a model fits a board, term by term.
//!
//! The arithmetic is [`crate::profiles::memory_plan_with_kv`] (the same that
//! `bramble flash` refuses with): the mapped image, the KV cache for the
//! context in the chosen mode, the run buffers and the board's OS headroom
//! against its memory. Prints the budget and a verdict; a model that does
//! not fit is an error (exit status 1) whose message carries the numbers.

use crate::profiles::{self, ModelFootprint};
use anyhow::{Context, Result};
use bramble_runtime::kv::KvMode;
use bramble_runtime::ModelImage;
use std::path::PathBuf;

const MIB: f64 = (1u64 << 20) as f64;

/// `bramble plan`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// The model image.
    #[arg(long)]
    pub model: PathBuf,
    /// The board: pi4-4gb, pi4-8gb, pi5-8gb, pi-zero-2w (or any `--profile` name of `bramble flash`).
    #[arg(long)]
    pub board: String,
    /// KV-cache positions (at most the model's context).
    #[arg(long)]
    pub ctx: usize,
    /// KV cache: f32, f16, q8 or q4.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "q8", "q4"])]
    pub kv: String,
    /// Print one JSON object instead of the lines.
    #[arg(long)]
    pub json: bool,
}

/// Runs `bramble plan`: prints the budget, errors when it does not fit.
pub fn run(args: PlanArgs) -> Result<()> {
    anyhow::ensure!(args.ctx >= 1, "--ctx 0: the context must hold at least one position");
    let board = profiles::profile(&args.board, None).map_err(anyhow::Error::msg)?;
    let kv: KvMode = args.kv.parse()?;
    let image =
        ModelImage::open(&args.model).with_context(|| format!("{}: not a valid model image", args.model.display()))?;
    let config = *image.config();
    kv.check(&config).with_context(|| format!("{}: --kv {kv}", args.model.display()))?;
    let image_bytes = std::fs::metadata(&args.model).with_context(|| args.model.display().to_string())?.len();
    let footprint = ModelFootprint::of(&image, image_bytes);
    let plan = profiles::memory_plan_with_kv(&footprint, args.ctx, &board, kv);
    // An f16 cache of the same layers (a sliding-window layer's is its window).
    let f16_kv_bytes = profiles::kv_cache_bytes(&config, &footprint.architecture.layers, plan.context, KvMode::F16);
    let verdict = if plan.fits() { "fits" } else { "does not fit" };
    if args.json {
        let value = serde_json::json!({
            "model": args.model,
            "board": plan.board,
            "memory_bytes": plan.memory_bytes,
            "context": plan.context,
            "kv": kv.name(),
            "weight_bytes": plan.weight_bytes,
            "kv_cache_bytes": plan.kv_cache_bytes,
            "kv_f16_bytes": f16_kv_bytes,
            "buffer_bytes": plan.buffer_bytes,
            "os_headroom_bytes": plan.os_headroom_bytes,
            "total_bytes": plan.total_bytes(),
            "fits": plan.fits(),
            "verdict": verdict,
        });
        println!("{value}");
    } else {
        let mib = |bytes: u64| bytes as f64 / MIB;
        println!("board      {} ({}), {:.0} MiB", plan.board, board.description, mib(plan.memory_bytes));
        println!("weights    {:>10.1} MiB  mapped image {}", mib(plan.weight_bytes), args.model.display());
        println!(
            "kv cache   {:>10.1} MiB  ctx {}, {} (an f16 cache: {:.1} MiB)",
            mib(plan.kv_cache_bytes),
            plan.context,
            kv,
            mib(f16_kv_bytes)
        );
        println!("buffers    {:>10.1} MiB  activations, logits, RoPE tables, batch scratch", mib(plan.buffer_bytes));
        println!("os         {:>10.1} MiB  headroom for the OS and the GPU", mib(plan.os_headroom_bytes));
        println!("total      {:>10.1} MiB  of {:.1} MiB", mib(plan.total_bytes()), mib(plan.memory_bytes));
        println!("verdict: {verdict}");
    }
    anyhow::ensure!(
        plan.fits(),
        "{} does not fit the {}: {plan}. Give a smaller --ctx, a smaller KV cache (--kv f16; --kv q8 or q4), a smaller model, or a board with more memory",
        args.model.display(),
        board.description
    );
    Ok(())
}
