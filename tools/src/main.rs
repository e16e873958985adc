//! `bramble`: convert models into images, inspect them, generate, chat,
//! measure perplexity and benchmark.
//!
//! Each subcommand is a module of [`cmd`] with its options and `run`; this
//! file names them and prints their errors.

mod cmd;

use bramble_tools::stats::CountingAllocator;
use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[derive(Parser)]
#[command(name = "bramble", version, about = "Run Llama-architecture models on Raspberry Pi-class boards")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a GGUF file, Hugging Face directory or llama2.c checkpoint into an image.
    Convert(cmd::convert::ConvertArgs),
    /// Calibrate R-Sparse (scores, thresholds, low-rank factors) and write an image with the plan.
    Calibrate(cmd::calibrate::CalibrateArgs),
    /// Show an image's config, tokenizer, sections and tensors.
    Inspect(cmd::inspect::InspectArgs),
    /// Continue a prompt.
    Generate(cmd::generate::GenerateArgs),
    /// Chat on the console with the model's template.
    Chat(cmd::chat::ChatArgs),
    /// Perplexity of a text, by llama.cpp's method.
    Perplexity(cmd::perplexity::PerplexityArgs),
    /// Prefill and decode speed, allocations and memory.
    Bench(cmd::bench::BenchArgs),
    /// Write a tiny random Llama model in a source format (for tests).
    Synth(cmd::synth::SynthArgs),
    /// Convert WinoBias, CrowS-Pairs or StereoSet into bias pairs (JSONL).
    BiasData(cmd::bias_data::BiasDataArgs),
    /// Stereotype preference and bias score of a model on bias pairs.
    BiasEval(cmd::bias_eval::BiasEvalArgs),
    /// Per-layer bias directions and predefined constraint weights, into a copy of the image.
    BiasCalibrate(cmd::bias_calibrate::BiasCalibrateArgs),
    /// Install brambled, a model and its config into a mounted Raspberry Pi OS SD card.
    Flash(bramble_tools::flash::FlashArgs),
    /// Install or update brambled, a model and its config on a running Pi over ssh; wait for /health.
    Deploy(bramble_tools::deploy::DeployArgs),
    /// Deploy to several boards and configure HAProxy or nginx in front of them (or only configure it).
    Fleet(bramble_tools::fleet::FleetArgs),
    /// The memory budget of a model on a board (weights, KV cache, buffers, OS) and whether it fits.
    Plan(bramble_tools::plan::PlanArgs),
    /// Print the token ids of a text (and each token's text).
    Tokenize(cmd::tokenize::TokenizeArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Convert(args) => cmd::convert::run(args),
        Command::Calibrate(args) => cmd::calibrate::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Chat(args) => cmd::chat::run(args),
        Command::Perplexity(args) => cmd::perplexity::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Synth(args) => cmd::synth::run(args),
        Command::BiasData(args) => cmd::bias_data::run(args),
        Command::BiasEval(args) => cmd::bias_eval::run(args),
        Command::BiasCalibrate(args) => cmd::bias_calibrate::run(args),
        Command::Flash(args) => bramble_tools::flash::run(args),
        Command::Deploy(args) => bramble_tools::deploy::run(args),
        Command::Fleet(args) => bramble_tools::fleet::run(args),
        Command::Plan(args) => bramble_tools::plan::run(args),
        Command::Tokenize(args) => cmd::tokenize::run(args),
    };
    if let Err(error) = result {
        eprintln!("bramble: {error:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own checks of the definitions (conflicting names, defaults
    /// outside the possible values, …), which otherwise fail only at run time.
    #[test]
    fn command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
