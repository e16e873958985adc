//! `bramble convert`: a GGUF file, Hugging Face directory or llama2.c
//! checkpoint into an image, optionally with spike-aware mixed precision.

use anyhow::{Context, Result};
use bramble_tools::convert::{convert, ConvertOptions, FamilyReport, QuantTarget};
use bramble_tools::importance::{self, ImportanceMatrix, ImportanceOptions};
use bramble_tools::mixed::{MixedMode, MixedPlan};
use bramble_tools::source::ModelSource;
use bramble_tools::stats;
use clap::{Args, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

/// `--quant` and `--mixed-precision`: the converter's [`QuantTarget`] by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantArg {
    Q4,
    #[value(name = "q4s")]
    Q4S,
    /// Q4_1's levels with byte scales under a row scale (4.5 bits a value).
    #[value(name = "q4b")]
    Q4B,
    #[value(name = "q5s")]
    Q5S,
    Q5,
    Q8,
    F16,
    F32,
    #[value(name = "q4k")]
    Q4K,
    #[value(name = "q5k")]
    Q5K,
    #[value(name = "q6k")]
    Q6K,
    #[value(name = "q3k")]
    Q3K,
    #[value(name = "q2k")]
    Q2K,
    /// Every tensor as the source stores it where the image has that encoding.
    Keep,
}

impl From<QuantArg> for QuantTarget {
    fn from(quant: QuantArg) -> Self {
        match quant {
            QuantArg::Q4 => QuantTarget::Q4,
            QuantArg::Q4S => QuantTarget::Q4S,
            QuantArg::Q4B => QuantTarget::Q4B,
            QuantArg::Q5S => QuantTarget::Q5S,
            QuantArg::Q5 => QuantTarget::Q5,
            QuantArg::Q8 => QuantTarget::Q8,
            QuantArg::F16 => QuantTarget::F16,
            QuantArg::F32 => QuantTarget::F32,
            QuantArg::Q4K => QuantTarget::Q4K,
            QuantArg::Q5K => QuantTarget::Q5K,
            QuantArg::Q6K => QuantTarget::Q6K,
            QuantArg::Q3K => QuantTarget::Q3K,
            QuantArg::Q2K => QuantTarget::Q2K,
            QuantArg::Keep => QuantTarget::Keep,
        }
    }
}

/// `--layout`: the block order of quantized matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    X4,
    Rows,
}

/// `--mixed`: the converter's [`MixedMode`] by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MixedArg {
    Off,
    Auto,
}

impl From<MixedArg> for MixedMode {
    fn from(mixed: MixedArg) -> Self {
        match mixed {
            MixedArg::Off => MixedMode::Off,
            MixedArg::Auto => MixedMode::Auto,
        }
    }
}

#[derive(Args)]
pub struct ConvertArgs {
    /// GGUF file, Hugging Face directory, or llama2.c `.bin`.
    #[arg(long)]
    input: PathBuf,
    /// The image to write.
    #[arg(long)]
    output: PathBuf,
    /// Weight encoding: q4, q4s, q4b (Q4_1's levels with byte scales, 4.5 bits), q5s (ggml's Q5_0), q5 (ggml's Q5_1), q8, f16, f32, ggml's k-quants q4k, q5k, q6k,
    /// q3k, q2k (rows not whole 256-value super-blocks get q4 or q8), or keep
    /// (each tensor as the source stores it, bit-exact, where the image has
    /// that encoding; IQ4 → q8, BF16 → f16).
    #[arg(long, value_enum, default_value_t = QuantArg::Q4)]
    quant: QuantArg,
    /// Per-tensor override PATTERN=QUANT (`*` is a wildcard), e.g. `blk.*.ffn_down.weight=q8`. Repeatable.
    #[arg(long = "tensor-quant")]
    tensor_quant: Vec<String>,
    /// The llama2.c `tokenizer.bin` (default: beside the checkpoint).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Block order of quantized matrices: `x4` (four rows interleaved, what
    /// the NEON kernels read fastest) or `rows` (ggml's row-major order).
    #[arg(long, value_enum, default_value_t = LayoutArg::X4)]
    layout: LayoutArg,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Spike-aware mixed precision (docs/mixed.md): `auto` measures each
    /// linear input's max/median |x| on --calib-text and keeps the
    /// projections reading spiky inputs at --mixed-precision; `off` (the
    /// default) gives every matrix --quant.
    #[arg(long, value_enum, default_value_t = MixedArg::Off)]
    mixed: MixedArg,
    /// Calibration text (UTF-8) for --mixed auto.
    #[arg(long)]
    calib_text: Option<PathBuf>,
    /// Calibration tokens for --mixed auto (the first ones of the text).
    #[arg(long, default_value_t = 2048)]
    calib_tokens: usize,
    /// Encoding of the projections --mixed auto keeps: q8, f16 or f32.
    #[arg(long, value_enum, default_value_t = QuantArg::Q8)]
    mixed_precision: QuantArg,
    /// --mixed auto keeps inputs whose spike score is at least this many times
    /// the median score of the same kind of input over the layers (default 4).
    #[arg(long, conflicts_with = "mixed_keep")]
    mixed_ratio: Option<f64>,
    /// --mixed auto keeps the N inputs with the highest spike scores instead.
    #[arg(long)]
    mixed_keep: Option<usize>,
    /// Threads for the --mixed auto and --imatrix calibration passes (default: the number of cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Importance matrix (docs/quants.md): measure each weight matrix's
    /// input channels' mean squares on this calibration text (UTF-8) and
    /// weigh the rounding searches of q4, q4b, q5s, q5, q4k, q5k, q6k, q3k and q2k by them.
    #[arg(long)]
    imatrix: Option<PathBuf>,
    /// Calibration tokens for --imatrix (the first ones of the text).
    #[arg(long, default_value_t = 8192)]
    imatrix_tokens: usize,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let started = Instant::now();
    let source = bramble_tools::source::open(&args.input, args.tokenizer.as_deref())?;
    let mut options = ConvertOptions::new(args.quant.into());
    for spec in &args.tensor_quant {
        options.add_override(spec)?;
    }
    options.interleave = args.layout == LayoutArg::X4;
    options.progress = std::io::stderr().is_terminal() && !args.json;
    options.mixed = mixed_plan(&args, source.as_ref(), options.quant, options.progress)?;
    if let (Some(plan), false) = (&options.mixed, args.json) {
        outln!(
            "mixed auto ({}, {} calibration tokens): {} kept at {}",
            plan.rule,
            plan.tokens,
            plan.tensors.len(),
            plan.precision
        );
        for input in &plan.chosen {
            outln!(
                "  layer {:>2} {:<17} max/median {:>8.1} (max {:.2}, median {:.4}): {}",
                input.layer,
                input.site,
                input.score,
                input.max,
                input.median,
                input.tensors().join(", ")
            );
        }
    }
    options.importance = importance_matrix(&args, source.as_ref(), options.progress)?;
    options.q4b_head_without_importance();
    if let (Some(matrix), false) = (&options.importance, args.json) {
        outln!(
            "importance matrix: {} tokens of {} (windows of {}), {} matrices",
            matrix.tokens,
            matrix.text,
            matrix.ctx,
            matrix.vectors.len()
        );
    }
    let report = convert(source.as_ref(), &args.output, &options)
        .with_context(|| format!("converting {} into {}", args.input.display(), args.output.display()))?;
    let peak = stats::peak_rss_bytes();
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["peak_rss_bytes"] = serde_json::json!(peak);
        value["seconds"] = serde_json::json!(started.elapsed().as_secs_f64());
        if let Some(plan) = &options.mixed {
            value["mixed"] = serde_json::to_value(plan)?;
        }
        if let Some(matrix) = &options.importance {
            value["importance"] = matrix.record(report.importance_tensors);
        }
        outln!("{value}");
    } else {
        outln!(
            "wrote {} ({:.1} MiB): {} tensors, {} carried bit-exact, {} re-quantized; {:.1} s, peak RSS {}",
            args.output.display(),
            report.image_bytes as f64 / (1 << 20) as f64,
            report.tensors,
            report.carried,
            report.requantized,
            started.elapsed().as_secs_f64(),
            peak.map_or("unknown".to_string(), |b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64)),
        );
        print_families(&report.families);
    }
    Ok(())
}

/// One line per tensor family and source type, columns aligned:
/// `  ffn_down     30 × Q5_0   → dequantized, re-quantized to q4`.
fn print_families(families: &[FamilyReport]) {
    let name_width = families.iter().map(|f| f.family.len()).max().unwrap_or(0);
    let type_width = families.iter().map(|f| f.source_type.len()).max().unwrap_or(0);
    for family in families {
        outln!(
            "  {:<name_width$} {:>3} × {:<type_width$} → {}",
            family.family,
            family.tensors,
            family.source_type,
            family.action_with_note()
        );
    }
}

/// The directory of the output, for temporary calibration images.
fn scratch_dir(output: &std::path::Path) -> PathBuf {
    match output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `--imatrix`'s importance vectors, or `None` without it.
fn importance_matrix(args: &ConvertArgs, source: &dyn ModelSource, progress: bool) -> Result<Option<ImportanceMatrix>> {
    let Some(path) = &args.imatrix else { return Ok(None) };
    let text = importance::read_text(path).context("--imatrix")?;
    let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    let options = ImportanceOptions {
        tokens: args.imatrix_tokens,
        threads: args.threads.unwrap_or_else(super::cores),
        progress,
        ..ImportanceOptions::default()
    };
    let matrix = importance::importance_matrix(source, &text, &name, &scratch_dir(&args.output), &options)
        .with_context(|| format!("--imatrix {} on {}", path.display(), args.input.display()))?;
    Ok(Some(matrix))
}

/// `--mixed auto`'s choice, or `None` for `--mixed off`.
fn mixed_plan(
    args: &ConvertArgs,
    source: &dyn ModelSource,
    quant: QuantTarget,
    progress: bool,
) -> Result<Option<MixedPlan>> {
    use bramble_tools::mixed::{plan, MixedOptions, Selection, DEFAULT_RATIO};
    if MixedMode::from(args.mixed) == MixedMode::Off {
        let given = [
            ("--calib-text", args.calib_text.is_some()),
            ("--mixed-ratio", args.mixed_ratio.is_some()),
            ("--mixed-keep", args.mixed_keep.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|g| g.1) {
            anyhow::bail!("{flag} only applies with --mixed auto");
        }
        return Ok(None);
    }
    let Some(path) = &args.calib_text else {
        anyhow::bail!("--mixed auto needs --calib-text FILE (text to measure the activation spikes on)");
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("--calib-text {}", path.display()))?;
    let options = MixedOptions {
        precision: args.mixed_precision.into(),
        selection: match args.mixed_keep {
            Some(n) => Selection::Keep(n),
            None => Selection::Ratio(args.mixed_ratio.unwrap_or(DEFAULT_RATIO)),
        },
        tokens: args.calib_tokens,
        threads: args.threads.unwrap_or_else(super::cores),
        progress,
        ..MixedOptions::default()
    };
    let plan = plan(source, &text, quant, &scratch_dir(&args.output), &options)
        .with_context(|| format!("--mixed auto on {}", args.input.display()))?;
    Ok(Some(plan))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each `--quant` value is the converter's target of that name.
    #[test]
    fn quant_values_are_the_converter_targets() {
        crate::cmd::assert_values_parse_alike::<QuantArg, QuantTarget>(|name| QuantTarget::parse(name).ok());
    }

    /// `--imatrix` with a text that is missing or empty fails before any
    /// work, naming the flag and the file, and leaves no image.
    #[test]
    fn imatrix_text_missing_or_empty_is_refused() {
        use bramble_tools::source::gguf::{write_gguf, GgmlType};
        use bramble_tools::synth::{SyntheticModel, SyntheticShape};
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: ConvertArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("model.gguf");
        write_gguf(&SyntheticModel::generate(SyntheticShape::default(), 1), &gguf, GgmlType::F32).unwrap();
        let (missing, empty, output) =
            (dir.path().join("missing.txt"), dir.path().join("empty.txt"), dir.path().join("out.bramble"));
        std::fs::write(&empty, "").unwrap();
        for (text, expected) in
            [(&missing, "cannot read the calibration text"), (&empty, "the calibration text is empty")]
        {
            let argv = ["convert", "--input", gguf.to_str().unwrap(), "--output", output.to_str().unwrap()];
            let cli = Cli::try_parse_from(argv.into_iter().chain(["--imatrix", text.to_str().unwrap()])).unwrap();
            let message = format!("{:#}", run(cli.args).unwrap_err());
            assert!(message.starts_with("--imatrix: ") && message.contains(expected), "{message}");
            assert!(message.contains(text.file_name().unwrap().to_str().unwrap()), "{message}");
            assert!(!output.exists());
        }
    }

    /// Each `--mixed` value is the mode of that name.
    #[test]
    fn mixed_values_are_the_modes() {
        crate::cmd::assert_values_parse_alike::<MixedArg, MixedMode>(|name| MixedMode::parse(name).ok());
    }
}
