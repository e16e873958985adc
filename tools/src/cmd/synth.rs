//! `bramble synth`: a small random Llama model in a source format (for tests),
//! or with `--shape` a large one streamed to disk.

use anyhow::{bail, Context, Result};
use bramble_runtime::architecture::Family;
use bramble_runtime::vocab::TokenizerKind;
use bramble_tools::synth::{SyntheticModel, SyntheticShape};
use bramble_tools::synth_large::{write_large_gguf, write_large_hf, LargeShape, LargeWeights};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Instant;

/// `--format`: the source format written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Gguf,
    Hf,
    Llama2c,
}

/// `--tokenizer`: the vocabulary's [`TokenizerKind`] by its short name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenizerArg {
    Spm,
    Bpe,
}

impl From<TokenizerArg> for TokenizerKind {
    fn from(tokenizer: TokenizerArg) -> Self {
        match tokenizer {
            TokenizerArg::Spm => TokenizerKind::SentencePiece,
            TokenizerArg::Bpe => TokenizerKind::ByteLevelBpe,
        }
    }
}

/// `--family`'s parser: the families `synth` writes, by their GGUF names.
fn family_parser() -> impl clap::builder::TypedValueParser<Value = Family> {
    use clap::builder::TypedValueParser;
    let names = SYNTH_FAMILIES.map(Family::name);
    clap::builder::PossibleValuesParser::new(names).map(|name| Family::from_name(&name).expect("a listed family"))
}

/// The families `synth` writes.
const SYNTH_FAMILIES: [Family; 4] = [Family::Llama, Family::Qwen2, Family::Qwen3, Family::Gemma3];

/// `--shape`'s parser: the names of [`LargeShape::ALL`], listed in `--help`.
fn shape_parser() -> impl clap::builder::TypedValueParser<Value = LargeShape> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(LargeShape::ALL.map(|(_, name)| name))
        .map(|name| LargeShape::parse(&name).expect("a listed shape"))
}

#[derive(Args)]
pub struct SynthArgs {
    /// gguf, hf or llama2c.
    #[arg(long, value_enum)]
    format: FormatArg,
    /// File (gguf, llama2c checkpoint) or directory (hf) to write.
    #[arg(long)]
    output: PathBuf,
    /// spm (Llama-2-like) or bpe (SmolLM2-like).
    #[arg(long, value_enum, default_value_t = TokenizerArg::Spm)]
    tokenizer: TokenizerArg,
    /// Weight type of the matrices (gguf: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_k q6_k; hf: f32 f16 bf16;
    /// with --shape: f16 (the default there), bf16 or f32).
    #[arg(long, default_value = "f32", default_value_if("shape", clap::builder::ArgPredicate::IsPresent, "f16"))]
    weights: String,
    /// Model width.
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Blocks (2 by default; with --shape, the shape's own count unless given).
    #[arg(long)]
    layers: Option<usize>,
    /// Share the output layer with the embedding.
    #[arg(long)]
    tied: bool,
    /// A Llama-3.x model: RoPE scaled as Llama-3.1's (`rope_freqs.weight` in
    /// GGUF, `rope_scaling` in config.json) and Llama-3's vocabulary and chat
    /// tokens (ignores --tokenizer).
    #[arg(long)]
    llama3: bool,
    /// The block: llama, qwen2 (q/k/v biases), qwen3 (per-head q/k norms) or
    /// gemma3 (GeGLU, √dim embedding, q/k and post norms, every third layer
    /// global and the others local with a window of a quarter of the context);
    /// the Qwen families take a byte-level vocabulary split as Qwen2's, Gemma
    /// Gemma's SentencePiece one (both ignore --tokenizer).
    #[arg(long, value_parser = family_parser(), default_value = "llama")]
    family: Family,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write a model of this shape (tiny, llama2-7b, tinyllama) tensor by tensor, never
    /// holding more than a chunk of rows in memory (gguf and hf; ignores
    /// --dim, --tied and --tokenizer; --layers keeps every tensor's size and
    /// only changes how many blocks there are).
    #[arg(long, value_parser = shape_parser())]
    shape: Option<LargeShape>,
}

pub fn run(args: SynthArgs) -> Result<()> {
    if let Some(shape) = args.shape {
        return run_large(&args, shape);
    }
    let tokenizer = match args.family {
        Family::Llama => TokenizerKind::from(args.tokenizer),
        Family::Gemma3 => TokenizerKind::SentencePiece,
        _ => TokenizerKind::ByteLevelBpe,
    };
    if args.llama3 && args.family != Family::Llama {
        bail!("--llama3 is a Llama model; it does not go with --family {}", args.family.name());
    }
    let shape = SyntheticShape {
        dim: args.dim,
        n_layers: args.layers.unwrap_or(2),
        ffn_dim: args.dim * 5 / 2 / 32 * 32,
        tied_output: args.tied,
        tokenizer,
        llama3: args.llama3,
        family: args.family,
        ..SyntheticShape::default()
    };
    let model = SyntheticModel::generate(shape, args.seed);
    match args.format {
        FormatArg::Gguf => {
            let kind = bramble_tools::source::gguf::GgmlType::from_name(&args.weights)
                .with_context(|| format!("--weights {:?} is not a GGUF type", args.weights))?;
            bramble_tools::source::gguf::write_gguf(&model, &args.output, kind)?;
        }
        FormatArg::Hf => {
            use bramble_tools::source::hf::{write_hf_dir, HfDtype, HfWriteOptions};
            let dtype = match args.weights.as_str() {
                "f32" => HfDtype::F32,
                "f16" => HfDtype::F16,
                "bf16" => HfDtype::BF16,
                other => bail!("--weights {other:?}: a Hugging Face directory holds f32, f16 or bf16"),
            };
            let template = bramble_runtime::chat::builtin_for(&model.vocab);
            let options =
                HfWriteOptions { dtype, chat_template: Some(template.to_string()), ..HfWriteOptions::default() };
            write_hf_dir(&model, &args.output, options)?;
        }
        FormatArg::Llama2c => {
            anyhow::ensure!(args.weights == "f32", "--weights {:?}: llama2.c checkpoints hold f32", args.weights);
            let tokenizer_path = args.output.with_file_name("tokenizer.bin");
            bramble_tools::source::llama2c::write_llama2c(&model, &args.output, &tokenizer_path, 0)?;
        }
    }
    outln!("wrote {}", args.output.display());
    Ok(())
}

/// `synth --shape`: a large model streamed to disk.
fn run_large(args: &SynthArgs, shape: LargeShape) -> Result<()> {
    let started = Instant::now();
    let weights = LargeWeights::parse(&args.weights).context("--weights")?;
    let report = match args.format {
        FormatArg::Gguf => write_large_gguf(shape, args.layers, &args.output, weights, args.seed)?,
        FormatArg::Hf => write_large_hf(shape, args.layers, &args.output, weights, args.seed)?,
        FormatArg::Llama2c => bail!("--format \"llama2c\" with --shape: expected gguf or hf"),
    };
    outln!(
        "wrote {} ({} with {} blocks, {}, {} tensors, {:.2} GB of tensor data) in {:.1} s",
        args.output.display(),
        shape.name(),
        shape.config_with_layers(args.layers)?.n_layers,
        args.weights,
        report.tensors,
        report.tensor_bytes as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--shape` takes every large shape by its name.
    #[test]
    fn shape_values_are_the_large_shapes() {
        let command =
            clap::Command::new("test").arg(clap::Arg::new("shape").long("shape").value_parser(shape_parser()));
        for (shape, name) in LargeShape::ALL {
            let matches = command.clone().try_get_matches_from(["test", "--shape", name]).expect(name);
            assert_eq!(matches.get_one::<LargeShape>("shape"), Some(&shape));
        }
        assert!(command.try_get_matches_from(["test", "--shape", "llama2-70b"]).is_err());
    }
}
