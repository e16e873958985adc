//! `bramble`: convert models into images, inspect them, generate, chat,
//! measure perplexity and benchmark.

use anyhow::{bail, Context, Result};
use bramble_runtime::bias::Feedback;
use bramble_runtime::chat::{ChatMessage, ChatTemplate};
use bramble_runtime::kv::KvMode;
use bramble_runtime::model::{Model, SparseMode};
use bramble_runtime::sampler::SamplerConfig;
use bramble_runtime::session::Session;
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::ModelImage;
use bramble_tools::convert::{convert, ConvertOptions, QuantTarget};
use bramble_tools::generate::{generate, perplexity, perplexity_tokens};
use bramble_tools::stats::{self, CountingAllocator};
use clap::{Args, Parser, Subcommand};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `println!` that ends the program quietly when stdout is a closed pipe
/// (`bramble … | head -1`) instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(error) = writeln!(std::io::stdout(), $($arg)*) {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

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
    Convert(ConvertArgs),
    /// Calibrate R-Sparse (scores, thresholds, low-rank factors) and write an image with the plan.
    Calibrate(CalibrateArgs),
    /// Show an image's config, tokenizer, sections and tensors.
    Inspect {
        /// The image.
        image: PathBuf,
        /// List every tensor.
        #[arg(long)]
        tensors: bool,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Continue a prompt.
    Generate(GenerateArgs),
    /// Chat on the console with the model's template.
    Chat(ChatArgs),
    /// Perplexity of a text, by llama.cpp's method.
    Perplexity(PerplexityArgs),
    /// Prefill and decode speed, allocations and memory.
    Bench(BenchArgs),
    /// Write a tiny random Llama model in a source format (for tests).
    Synth(SynthArgs),
    /// Convert WinoBias, CrowS-Pairs or StereoSet into bias pairs (JSONL).
    BiasData(BiasDataArgs),
    /// Stereotype preference and bias score of a model on bias pairs.
    BiasEval(BiasEvalArgs),
    /// Per-layer bias directions and predefined constraint weights, into a copy of the image.
    BiasCalibrate(BiasCalibrateArgs),
    /// Install brambled, a model and its config into a mounted Raspberry Pi OS SD card.
    Flash(bramble_tools::flash::FlashArgs),
    /// Install or update brambled, a model and its config on a running Pi over ssh; wait for /health.
    Deploy(bramble_tools::deploy::DeployArgs),
    /// The memory budget of a model on a board (weights, KV cache, buffers, OS) and whether it fits.
    Plan(bramble_tools::plan::PlanArgs),
    /// Print the token ids of a text (and each token's text).
    Tokenize {
        /// The image.
        #[arg(long)]
        model: PathBuf,
        /// The text.
        #[arg(long)]
        text: String,
        /// Add BOS/EOS as the model does.
        #[arg(long)]
        add_special: bool,
        /// Turn control-token texts such as `<|im_start|>` into their ids.
        #[arg(long)]
        parse_special: bool,
        /// Render TEXT as a user message in the chat template first (TEXT is
        /// plain text there: only the template's markup makes control tokens).
        #[arg(long)]
        chat: bool,
    },
}

#[derive(Args)]
struct ConvertArgs {
    /// GGUF file, Hugging Face directory, or llama2.c `.bin`.
    #[arg(long)]
    input: PathBuf,
    /// The image to write.
    #[arg(long)]
    output: PathBuf,
    /// Weight encoding: q4, q4s, q8, f16 or f32.
    #[arg(long, default_value = "q4")]
    quant: String,
    /// Per-tensor override PATTERN=QUANT (`*` is a wildcard), e.g. `blk.*.ffn_down.weight=q8`. Repeatable.
    #[arg(long = "tensor-quant")]
    tensor_quant: Vec<String>,
    /// The llama2.c `tokenizer.bin` (default: beside the checkpoint).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Block order of quantized matrices: `x4` (four rows interleaved, what
    /// the NEON kernels read fastest) or `rows` (ggml's row-major order).
    #[arg(long, default_value = "x4", value_parser = ["x4", "rows"])]
    layout: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Spike-aware mixed precision (docs/mixed.md): `auto` measures each
    /// linear input's max/median |x| on --calib-text and keeps the
    /// projections reading spiky inputs at --mixed-precision; `off` (the
    /// default) gives every matrix --quant.
    #[arg(long, default_value = "off", value_parser = ["off", "auto"])]
    mixed: String,
    /// Calibration text (UTF-8) for --mixed auto.
    #[arg(long)]
    calib_text: Option<PathBuf>,
    /// Calibration tokens for --mixed auto (the first ones of the text).
    #[arg(long, default_value_t = 2048)]
    calib_tokens: usize,
    /// Encoding of the projections --mixed auto keeps: q8, f16 or f32.
    #[arg(long, default_value = "q8")]
    mixed_precision: String,
    /// --mixed auto keeps inputs whose spike score is at least this many times
    /// the median score of the same kind of input over the layers (default 4).
    #[arg(long, conflicts_with = "mixed_keep")]
    mixed_ratio: Option<f64>,
    /// --mixed auto keeps the N inputs with the highest spike scores instead.
    #[arg(long)]
    mixed_keep: Option<usize>,
    /// Threads for the --mixed auto calibration pass (default: the number of cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct CalibrateArgs {
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
    #[arg(long, default_value = "channels")]
    sparse_layout: String,
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

#[derive(Args, Clone)]
struct ModelArgs {
    /// The image.
    #[arg(long)]
    model: PathBuf,
    /// Threads for the matrix products (default: the number of cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Context length (default: the model's, at most 4096).
    #[arg(long)]
    ctx: Option<usize>,
    /// R-Sparse: `auto` runs the image's `rsparse` plan if it has one
    /// (`bramble calibrate` writes it), `off` runs dense.
    #[arg(long, default_value = "auto", value_parser = ["auto", "off"])]
    sparsity: String,
    /// KV cache: `f32` (full precision), `q8` or `q4` (KIVI-style
    /// quantization with an f32 window of recent tokens; docs/kv.md).
    #[arg(long, default_value = "f32", value_parser = ["f32", "q8", "q4"])]
    kv: String,
    /// Key-channel pruning (ThinK): after the prompt, drop this share of
    /// each KV head's key channels for the prompt's keys, chosen by query
    /// and key energy; in [0, 1), 0 is off; `--kv f32` only (docs/kv.md).
    #[arg(long, default_value_t = 0.0, value_name = "R")]
    kv_prune: f32,
    /// The layer-wise bias constraint (`bramble bias-calibrate` writes it):
    /// `static` applies the image's predefined weights, `adaptive` adjusts
    /// them after each response from its bias signal, `off` runs without;
    /// `auto` (the default) is `off` until a calibration records that it
    /// passed the bias gates (the first design erased "she", issue 26).
    #[arg(long, default_value = "auto", value_parser = feedback_parser())]
    feedback: Feedback,
    /// With `--feedback adaptive`: the loop's state (weights, recent
    /// signals), restored at start and saved atomically after each response.
    #[arg(long, visible_alias = "state")]
    bias_state: Option<PathBuf>,
    /// With `--feedback static`: these constraint weights instead of the
    /// image's predefined ones, one for every layer or one a layer
    /// (comma-separated, each in [0, 1]); to see what other weights would do.
    #[arg(long, value_delimiter = ',', value_name = "W")]
    bias_weights: Option<Vec<f32>>,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens below this fraction of the most likely one.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalty on recently seen tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Stop at this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            repeat_last_n: 64,
            seed: self.seed,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
}

#[derive(Args)]
struct PerplexityArgs {
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

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SynthArgs {
    /// gguf, hf or llama2c.
    #[arg(long)]
    format: String,
    /// File (gguf, llama2c checkpoint) or directory (hf) to write.
    #[arg(long)]
    output: PathBuf,
    /// spm (Llama-2-like) or bpe (SmolLM2-like).
    #[arg(long, default_value = "spm")]
    tokenizer: String,
    /// Weight type of the matrices (gguf: f32 f16 q8_0 q4_0 q4_1 q4_k q6_k; hf: f32 f16 bf16;
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
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write a model of this shape (tiny, llama2-7b) tensor by tensor, never
    /// holding more than a chunk of rows in memory (gguf and hf; ignores
    /// --dim, --tied and --tokenizer; --layers keeps every tensor's size and
    /// only changes how many blocks there are).
    #[arg(long)]
    shape: Option<String>,
}

#[derive(Args)]
struct BiasDataArgs {
    /// The dataset, followed by its path: `winobias DIR|FILE`, `crows-pairs CSV`, `stereoset JSON`.
    #[arg(long, value_parser = ["winobias", "crows-pairs", "stereoset"])]
    from: String,
    /// WinoBias: its data directory or one `pro_stereotyped_…` file; CrowS-Pairs:
    /// `crows_pairs_anonymized.csv`; StereoSet: `dev.json` or `test.json`.
    path: PathBuf,
    /// WinoBias directory: `dev` or `test` (default: both).
    #[arg(long)]
    split: Option<String>,
    /// Keep only this category (`gender`, `race-color`, …). Repeatable.
    #[arg(long)]
    category: Vec<String>,
    /// The pairs file to write (JSONL).
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args)]
struct BiasCalibrateArgs {
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
    #[arg(long, value_parser = ["principal", "mean-difference"], default_value = "principal")]
    direction: String,
    /// Pairs whose two sentences give the spread the layers' separations are
    /// measured in, and with `--loop-signal mean-lean` the loop's baseline (0: the direction pairs).
    #[arg(long, default_value_t = 100)]
    baseline_pairs: usize,
    /// How the feedback loop reads a response: `spread`, the root mean square
    /// departure of each token's projection from neutral text (pieces of
    /// TXT); `mean-lean`, how far the response's mean projection leans from
    /// the pairs' own sentences (the calibrations before version 2 sections).
    #[arg(long, value_parser = ["spread", "mean-lean"], default_value = "spread")]
    loop_signal: String,
    /// With `--loop-signal spread`: how many pieces of TXT (windows of 24
    /// tokens spread evenly over it) the baseline and the loop's target are measured on.
    #[arg(long, default_value_t = 200)]
    baseline_pieces: usize,
    /// Where the constraint moves each projection `h · d_l`: `zero`, 0
    /// (`h ← h − w (h·d) d`); `baseline`, its neutral mean (`h ← h − w (h·d −
    /// mean) d`), which leaves a token at the baseline alone; `midpoint`, the
    /// mean of the pairs' two sides at the first swapped token, so erasing
    /// leaves a token between the genders rather than at 0 (principal only).
    #[arg(long, value_parser = ["zero", "baseline", "midpoint"], default_value = "zero")]
    centre: String,
    /// The attention sink (the first position's residual stream, a hundred
    /// times the others' size in SmolLM2's middle layers): `orthogonal`
    /// removes each direction's component along it, so the constraint
    /// leaves the sink alone; `keep` leaves the directions as found.
    #[arg(long, value_parser = ["orthogonal", "keep"], default_value = "orthogonal")]
    sink: String,
    /// Threads (default: the number of cores).
    #[arg(long)]
    threads: Option<usize>,
    /// One JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BiasEvalArgs {
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

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Convert(args) => run_convert(args),
        Command::Calibrate(args) => run_calibrate(args),
        Command::Inspect { image, tensors, json } => run_inspect(&image, tensors, json),
        Command::Generate(args) => run_generate(args),
        Command::Chat(args) => run_chat(args),
        Command::Perplexity(args) => run_perplexity(args),
        Command::Bench(args) => run_bench(args),
        Command::Synth(args) => run_synth(args),
        Command::BiasData(args) => run_bias_data(args),
        Command::BiasEval(args) => run_bias_eval(args),
        Command::BiasCalibrate(args) => run_bias_calibrate(args),
        Command::Flash(args) => bramble_tools::flash::run(args),
        Command::Deploy(args) => bramble_tools::deploy::run(args),
        Command::Plan(args) => bramble_tools::plan::run(args),
        Command::Tokenize { model, text, add_special, parse_special, chat } => {
            run_tokenize(&model, &text, add_special, parse_special, chat)
        }
    };
    if let Err(error) = result {
        eprintln!("bramble: {error:#}");
        std::process::exit(1);
    }
}

fn run_convert(args: ConvertArgs) -> Result<()> {
    let started = Instant::now();
    let source = bramble_tools::source::open(&args.input, args.tokenizer.as_deref())?;
    let mut options = ConvertOptions::new(QuantTarget::parse(&args.quant)?);
    for spec in &args.tensor_quant {
        options.add_override(spec)?;
    }
    options.interleave = args.layout == "x4";
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
    }
    Ok(())
}

/// `--mixed auto`'s choice for `bramble convert`, or `None` for `--mixed off`.
fn mixed_plan(
    args: &ConvertArgs,
    source: &dyn bramble_tools::source::ModelSource,
    quant: QuantTarget,
    progress: bool,
) -> Result<Option<bramble_tools::mixed::MixedPlan>> {
    use bramble_tools::mixed::{plan, MixedMode, MixedOptions, Selection, DEFAULT_RATIO};
    if MixedMode::parse(&args.mixed)? == MixedMode::Off {
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
        precision: QuantTarget::parse(&args.mixed_precision).context("--mixed-precision")?,
        selection: match args.mixed_keep {
            Some(n) => Selection::Keep(n),
            None => Selection::Ratio(args.mixed_ratio.unwrap_or(DEFAULT_RATIO)),
        },
        tokens: args.calib_tokens,
        threads: args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        progress,
        ..MixedOptions::default()
    };
    let scratch = match args.output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let plan = plan(source, &text, quant, &scratch, &options)
        .with_context(|| format!("--mixed auto on {}", args.input.display()))?;
    Ok(Some(plan))
}

fn run_calibrate(args: CalibrateArgs) -> Result<()> {
    use bramble_tools::calibrate::{calibrate, relayout, CalibrateOptions, SearchOptions, SparseLayout};
    let started = Instant::now();
    let layout = SparseLayout::parse(&args.sparse_layout)?;
    let (Some(text_path), Some(sparsity)) = (&args.text, args.sparsity) else {
        let bytes = relayout(&args.model, &args.output, layout)
            .with_context(|| format!("rewriting {} into {}", args.model.display(), args.output.display()))?;
        outln!("wrote {} ({bytes} bytes, sparse layout {})", args.output.display(), args.sparse_layout);
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
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
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
        threads: args.threads.unwrap_or(cores),
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

/// The `rsparse` section's summary for `inspect`: modules, target, mean s, α and rank.
fn rsparse_summary(image: &ModelImage) -> Result<Option<serde_json::Value>> {
    let Some(bytes) = image.section(bramble_runtime::rsparse::SECTION) else { return Ok(None) };
    let plan = bramble_runtime::rsparse::Rsparse::from_section(bytes)?;
    let n = plan.modules.len().max(1) as f64;
    let mean = |f: &dyn Fn(&bramble_runtime::rsparse::SparseModule) -> f64| plan.modules.iter().map(f).sum::<f64>() / n;
    Ok(Some(serde_json::json!({
        "modules": plan.modules.len(),
        "target": plan.target,
        "mean_sparsity": mean(&|m| m.sparsity as f64),
        "mean_alpha": mean(&|m| m.alpha as f64),
        "mean_rank": mean(&|m| m.rank as f64),
    })))
}

fn run_inspect(path: &Path, list_tensors: bool, json: bool) -> Result<()> {
    let image = ModelImage::open(path)?;
    let c = image.config();
    let v = image.vocab();
    let source = image.section("source").map(|s| String::from_utf8_lossy(s).into_owned());
    let mut by_encoding = std::collections::BTreeMap::<&str, (usize, usize)>::new();
    for t in image.tensors() {
        let entry = by_encoding.entry(t.encoding.name()).or_default();
        entry.0 += 1;
        entry.1 += t.size;
    }
    if json {
        let value = serde_json::json!({
            "path": path,
            "file_bytes": image.bytes().len(),
            "layout_version": image.layout_version(),
            "config": {
                "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
                "head_dim": c.head_dim, "ffn_dim": c.ffn_dim, "vocab_size": c.vocab_size,
                "context_length": c.context_length, "rope_theta": c.rope_theta, "rope_style": c.rope_style,
                "norm_eps": c.norm_eps, "tied_output": c.tied_output != 0,
            },
            "tokenizer": {
                "kind": format!("{:?}", v.kind), "pre_tokenizer": format!("{:?}", v.pre_tokenizer),
                "tokens": v.len(), "merges": v.merges.len(), "bos": v.bos_id, "eos": v.eos_id, "eot": v.eot_id,
                "add_bos": v.add_bos, "add_space_prefix": v.add_space_prefix,
            },
            "chat_template": image.chat_template(),
            "sections": image.sections().iter().map(|s| serde_json::json!({"name": s.name, "offset": s.offset, "size": s.size})).collect::<Vec<_>>(),
            "encodings": by_encoding.iter().map(|(k, (n, b))| (k.to_string(), serde_json::json!({"tensors": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
            "tensors": image.tensors().iter().map(|t| serde_json::json!({"name": t.name, "encoding": t.encoding.name(), "shape": t.shape, "bytes": t.size})).collect::<Vec<_>>(),
            "source": source.as_deref().and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()),
            "rsparse": rsparse_summary(&image)?,
        });
        outln!("{value}");
        return Ok(());
    }
    outln!(
        "{} — {:.1} MiB, layout version {}",
        path.display(),
        image.bytes().len() as f64 / (1 << 20) as f64,
        image.layout_version()
    );
    outln!(
        "llama: dim {} layers {} heads {} (kv {}) head_dim {} ffn {} vocab {} context {} rope θ {} eps {:e}{}",
        c.dim,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.ffn_dim,
        c.vocab_size,
        c.context_length,
        c.rope_theta,
        c.norm_eps,
        if c.tied_output != 0 { ", tied output" } else { "" }
    );
    let name = |id: Option<u32>| {
        id.map_or("-".to_string(), |i| format!("{i} {:?}", String::from_utf8_lossy(&v.tokens[i as usize])))
    };
    outln!(
        "tokenizer: {:?} ({:?}), {} tokens, {} merges, BOS {}, EOS {}, EOT {}, add BOS {}",
        v.kind,
        v.pre_tokenizer,
        v.len(),
        v.merges.len(),
        name(v.bos_id),
        name(v.eos_id),
        name(v.eot_id),
        v.add_bos
    );
    outln!(
        "chat template: {}",
        image.chat_template().map_or("none (built-in fallback)".to_string(), |t| format!("{} bytes", t.len()))
    );
    for (encoding, (n, bytes)) in &by_encoding {
        outln!("  {encoding:>4}: {n:>4} tensors, {:.1} MiB", *bytes as f64 / (1 << 20) as f64);
    }
    for s in image.sections() {
        outln!("  section {:<14} {:>12} bytes at {}", s.name, s.size, s.offset);
    }
    if let Some(source) = source {
        outln!("source: {source}");
    }
    if let Some(plan) = rsparse_summary(&image)? {
        outln!(
            "rsparse: {} modules, target {}, mean sparsity {:.3}, mean α {:.3}, mean rank {:.1}",
            plan["modules"],
            plan["target"],
            plan["mean_sparsity"].as_f64().unwrap_or(f64::NAN),
            plan["mean_alpha"].as_f64().unwrap_or(f64::NAN),
            plan["mean_rank"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if list_tensors {
        for t in image.tensors() {
            outln!("  {:<32} {:>4} {:?}", t.name, t.encoding.name(), t.shape);
        }
    }
    Ok(())
}

/// An opened image with its model and tokenizer.
struct Loaded {
    image: ModelImage,
    tokenizer: Tokenizer,
}

fn load(args: &ModelArgs) -> Result<(Loaded, usize)> {
    let image = ModelImage::open(&args.model)?;
    let tokenizer = Tokenizer::new(image.vocab()).with_context(|| format!("{}: tokenizer", args.model.display()))?;
    let context = args.ctx.unwrap_or((image.config().context_length as usize).min(4096));
    anyhow::ensure!(context >= 2, "--ctx {context} is too small");
    Ok((Loaded { image, tokenizer }, context))
}

/// The model of a loaded image, with `--threads` workers and, unless
/// `--sparsity off`, the image's R-Sparse plan applied in `mode`.
fn model<'a>(loaded: &'a Loaded, args: &ModelArgs, mode: SparseMode) -> Result<Model<'a>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.threads.unwrap_or(cores);
    anyhow::ensure!(
        (1..=bramble_runtime::kernels::pool::MAX_THREADS).contains(&threads),
        "--threads {threads}: expected 1 to {}",
        bramble_runtime::kernels::pool::MAX_THREADS
    );
    let mut model = Model::with_options(&loaded.image, bramble_runtime::kernels::Kernels::detect(), threads)?;
    if args.sparsity == "auto" {
        model
            .use_image_sparsity(&loaded.image, mode)
            .with_context(|| format!("{}: rsparse section", args.model.display()))?;
    }
    model.set_kv_mode(args.kv.parse()?).with_context(|| format!("{}: --kv {}", args.model.display(), args.kv))?;
    // Pruning applies to decode steps after a prompt; these commands run every token as a prompt.
    anyhow::ensure!(
        args.kv_prune == 0.0 || mode != SparseMode::Always,
        "--kv-prune {}: this command runs every token as part of a prompt, where key-channel pruning never \
         applies (it prunes at the first decoded token; docs/kv.md measures it with a prefill/decode split)",
        args.kv_prune
    );
    model.set_kv_prune(args.kv_prune).with_context(|| format!("{}: --kv-prune", args.model.display()))?;
    // `auto` (the default) is off until a calibration passed the bias gates;
    // static and adaptive stay on request.
    if args.feedback.resolve().0 != Feedback::Off {
        let found =
            model.use_image_bias(&loaded.image).with_context(|| format!("{}: bias section", args.model.display()))?;
        anyhow::ensure!(
            found,
            "--feedback {}: {} has no bias section; write one with `bramble bias-calibrate`",
            args.feedback,
            args.model.display()
        );
    }
    if let Some(weights) = &args.bias_weights {
        anyhow::ensure!(args.feedback == Feedback::Static, "--bias-weights goes with --feedback static");
        let mut constraint = model.bias().expect("static feedback loaded the bias section").clone();
        let layers = constraint.layers;
        anyhow::ensure!(
            weights.len() == 1 || weights.len() == layers,
            "--bias-weights: {} values; give one for every layer or one for each of the {layers} layers",
            weights.len()
        );
        anyhow::ensure!(
            weights.iter().all(|w| (0.0..=1.0).contains(w)),
            "--bias-weights: {weights:?} has a value outside [0, 1]"
        );
        constraint.weights = if weights.len() == 1 { vec![weights[0]; layers] } else { weights.clone() };
        model.set_bias(Some(constraint))?;
    }
    Ok(model)
}

/// `--feedback`'s parser: the runtime's policy names, listed in `--help`.
fn feedback_parser() -> impl clap::builder::TypedValueParser<Value = Feedback> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Feedback::ALL.map(Feedback::name))
        .map(|name| name.parse::<Feedback>().expect("a listed policy"))
}

/// The feedback loop of `--feedback adaptive` (restored from `--bias-state`), if asked for.
fn feedback_loop(model: &Model, args: &ModelArgs) -> Result<Option<bramble_runtime::bias::FeedbackLoop>> {
    if args.feedback != Feedback::Adaptive {
        anyhow::ensure!(args.bias_state.is_none(), "--bias-state goes with --feedback adaptive");
        return Ok(None);
    }
    let constraint = model.bias().expect("adaptive feedback loaded the bias section");
    let mut feedback = bramble_runtime::bias::FeedbackLoop::new(constraint);
    if let Some(path) = &args.bias_state {
        if feedback.restore(path)? {
            eprintln!("bramble: bias state restored from {} ({} responses)", path.display(), feedback.responses);
        }
    }
    Ok(Some(feedback))
}

/// After a response under `--feedback adaptive`: its signal, the weights
/// adjusted, the state saved. Returns the signal.
fn after_response(
    feedback: &mut bramble_runtime::bias::FeedbackLoop,
    model: &Model,
    args: &ModelArgs,
    projections: &bramble_runtime::bias::ProjectionStats,
) -> Result<f32> {
    let signal = feedback.after_response(projections, model.bias().expect("a bias section"));
    if let Some(path) = &args.bias_state {
        feedback.save(path)?;
    }
    Ok(signal)
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let (loaded, context) = load(&args.model)?;
    let model = model(&loaded, &args.model, SparseMode::DecodeOnly)?;
    let tokenizer = &loaded.tokenizer;
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", &args.prompt));
        let template = ChatTemplate::new(loaded.image.chat_template(), loaded.image.vocab());
        tokenizer.encode_chat(&template, &messages, true)?
    } else {
        tokenizer.encode(&args.prompt, true, false)
    };
    anyhow::ensure!(!prompt.is_empty(), "the prompt is empty and the model adds no BOS token");
    anyhow::ensure!(prompt.len() < context, "the prompt is {} tokens, the context {}", prompt.len(), context);
    let mut session = Session::try_new(&model, tokenizer, context, args.sampling.config())?;
    let mut feedback = feedback_loop(&model, &args.model)?;
    if let Some(feedback) = &feedback {
        session.set_bias_weights(&feedback.weights)?;
    }
    let stdout = std::io::stdout();
    let json = args.json;
    let mut on_text = |piece: &str| {
        if !json {
            let mut out = stdout.lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    };
    let result = generate(&mut session, &prompt, args.max_tokens, &args.sampling.stop, &mut on_text)?;
    // The response's bias signal (its projections include the prompt's).
    let signal = match feedback.as_mut() {
        Some(feedback) => Some(after_response(feedback, &model, &args.model, session.projections())?),
        None => None,
    };
    if json {
        let mut value = serde_json::to_value(&result)?;
        if let Some(signal) = signal {
            value["bias_signal"] = serde_json::json!(signal);
        }
        outln!("{value}");
    } else {
        outln!();
        if let Some(signal) = signal {
            eprintln!("bramble: bias signal {signal:+.3}");
        }
    }
    Ok(())
}

fn run_chat(args: ChatArgs) -> Result<()> {
    let (loaded, context) = load(&args.model)?;
    let model = model(&loaded, &args.model, SparseMode::DecodeOnly)?;
    let tokenizer = &loaded.tokenizer;
    let template = ChatTemplate::new(loaded.image.chat_template(), loaded.image.vocab());
    let mut session = Session::try_new(&model, tokenizer, context, args.sampling.config())?;
    let mut messages: Vec<ChatMessage> = args.system.iter().map(|s| ChatMessage::new("system", s)).collect();
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "bramble chat — {} (context {context}). /reset clears, /quit or Ctrl-D leaves.",
            args.model.model.display()
        );
    }
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
        }
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let input = line.trim_end_matches(['\n', '\r']);
        match input.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                session.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", input));
        let tokens = tokenizer.encode_chat(&template, &messages, true)?;
        if tokens.len() + 1 >= context {
            eprintln!("(the conversation no longer fits the context of {context} tokens; /reset to start again)");
            messages.pop();
            continue;
        }
        // Keep the cached prefix the new rendering shares with the history.
        let shared = session.reuse_prefix(&tokens);
        let stdout = std::io::stdout();
        let mut on_text = |piece: &str| {
            let mut out = stdout.lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        };
        let reply = generate(&mut session, &tokens[shared..], args.max_tokens, &args.sampling.stop, &mut on_text)?;
        outln!();
        messages.push(ChatMessage::new("assistant", reply.text.trim()));
    }
    Ok(())
}

fn run_perplexity(args: PerplexityArgs) -> Result<()> {
    let (loaded, context) = load(&args.model)?;
    let mut model = model(&loaded, &args.model, SparseMode::Always)?;
    // Adaptive: the text is measured under the loop's current weights (restored
    // from --bias-state); a text is not a response, so they are not adjusted.
    if let Some(feedback) = feedback_loop(&model, &args.model)? {
        let constraint = model.bias().expect("adaptive feedback loaded the bias section");
        let current = bramble_runtime::bias::BiasConstraint { weights: feedback.weights.clone(), ..constraint.clone() };
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

fn run_bench(args: BenchArgs) -> Result<()> {
    let (loaded, context) = load(&args.model)?;
    let model = model(&loaded, &args.model, SparseMode::DecodeOnly)?;
    let tokenizer = &loaded.tokenizer;
    anyhow::ensure!(
        args.prompt_tokens >= 1 && args.gen_tokens >= 1,
        "--prompt-tokens and --gen-tokens must be at least 1"
    );
    anyhow::ensure!(
        args.prompt_tokens + args.gen_tokens <= context,
        "{} + {} tokens do not fit the context of {context}",
        args.prompt_tokens,
        args.gen_tokens
    );
    // A prompt of ordinary text tokens, repeated to length.
    let text = tokenizer.encode("The quick brown fox jumps over the lazy dog. ", false, false);
    anyhow::ensure!(!text.is_empty(), "the tokenizer produced no tokens for the benchmark text");
    let prompt: Vec<u32> = text.iter().copied().cycle().take(args.prompt_tokens).collect();
    let mut session = Session::try_new(&model, tokenizer, context, SamplerConfig::greedy())?;
    let kv_bytes = session.kv_bytes();
    // The whole state resident, as brambled holds it: peak_rss_bytes is then
    // the footprint at the full context, not at the positions this run fills.
    session.commit_memory();

    let started = Instant::now();
    session.feed(&prompt)?;
    let prefill_seconds = started.elapsed().as_secs_f64();
    session.take_measured_sparsity();
    session.take_sparse_bytes();
    let allocations_before = stats::allocations();
    let decode_started = Instant::now();
    session.step()?;
    // What a user waits for: the prompt, then the first token sampled.
    let first_token_seconds = prefill_seconds + decode_started.elapsed().as_secs_f64();
    for _ in 1..args.gen_tokens {
        session.step()?;
    }
    let decode_seconds = decode_started.elapsed().as_secs_f64();
    let allocations = stats::allocations() - allocations_before;
    let measured_sparsity = session.take_measured_sparsity();
    // Weight bytes a decoded token read: the dense figure, with the sparse
    // modules' dense bytes replaced by what their kernels read.
    let (sparse_read, sparse_dense) = session.take_sparse_bytes();
    let dense_bytes = model.weight_bytes_per_token() as f64;
    let read_bytes = dense_bytes + (sparse_read as f64 - sparse_dense as f64) / args.gen_tokens as f64;

    let value = serde_json::json!({
        "model": args.model.model,
        "kernels": model.kernels.name,
        "threads": model.pool.threads(),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "prefill_tok_s": args.prompt_tokens as f64 / prefill_seconds,
        "time_to_first_token_ms": first_token_seconds * 1e3,
        "decode_tok_s": args.gen_tokens as f64 / decode_seconds,
        "allocations_per_token": allocations as f64 / args.gen_tokens as f64,
        // Weights read per decoded token, measured (R-Sparse reads only the
        // active channels of channel-major modules, plus its low-rank
        // factors), and what the dense products read.
        "weight_bytes_per_token": read_bytes.round() as u64,
        "dense_weight_bytes_per_token": model.weight_bytes_per_token(),
        "weight_bytes_ratio": read_bytes / dense_bytes,
        // The share of linear-layer input channels the decode steps sent to
        // R-Sparse's low-rank part (null: dense).
        "measured_sparsity": measured_sparsity,
        // The KV cache as allocated for the context, and what an f16 cache would take.
        "kv": model.kv_mode().name(),
        "kv_bytes": kv_bytes,
        "kv_f16_bytes": (KvMode::f16_bytes_per_token(&model.config) * context as f64) as u64,
        "peak_rss_bytes": stats::peak_rss_bytes(),
        "guest_instructions": "aarch64 cost: scripts/insn-count.sh IMAGE [cortex-a72 cortex-a76] runs this bench under qemu with ../shared/tools/qemu-insn-count for 8 and 24 generated tokens; per token = Δcount / 16; scripts/insn-profile.sh IMAGE CPU splits it by function",
    });
    if args.json {
        outln!("{value}");
    } else {
        outln!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(())
}

fn run_bias_data(args: BiasDataArgs) -> Result<()> {
    use bramble_tools::bias::{convert_dataset, write_pairs, Dataset};
    let mut pairs = convert_dataset(Dataset::parse(&args.from)?, &args.path, args.split.as_deref())?;
    if !args.category.is_empty() {
        pairs.retain(|pair| args.category.contains(&pair.category));
        anyhow::ensure!(!pairs.is_empty(), "{}: no pairs of category {:?}", args.path.display(), args.category);
    }
    write_pairs(&pairs, &args.output)?;
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for pair in &pairs {
        *counts.entry(&pair.category).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(category, n)| format!("{category} {n}")).collect();
    outln!("wrote {} ({} pairs: {})", args.output.display(), pairs.len(), counts.join(", "));
    Ok(())
}

fn run_bias_calibrate(args: BiasCalibrateArgs) -> Result<()> {
    use bramble_tools::bias::{bias_calibrate, BiasCalibrateOptions};
    let text = std::fs::read_to_string(&args.text).with_context(|| format!("{}: cannot read", args.text.display()))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let options = BiasCalibrateOptions {
        threads: args.threads.unwrap_or(cores).clamp(1, bramble_runtime::kernels::pool::MAX_THREADS),
        direction_pairs: args.direction_pairs,
        eval_pairs: args.eval_pairs,
        text_tokens: args.text_tokens,
        budget: args.budget,
        weights: args.weights.clone(),
        direction: if args.direction == "principal" {
            bramble_runtime::bias::DirectionKind::PrincipalComponent
        } else {
            bramble_runtime::bias::DirectionKind::MeanDifference
        },
        baseline_pairs: args.baseline_pairs,
        loop_signal: if args.loop_signal == "spread" {
            bramble_runtime::bias::LoopSignal::Spread
        } else {
            bramble_runtime::bias::LoopSignal::MeanLean
        },
        baseline_pieces: args.baseline_pieces,
        centre: match args.centre.as_str() {
            "baseline" => bramble_tools::bias::CentreChoice::Baseline,
            "midpoint" => bramble_tools::bias::CentreChoice::Midpoint,
            _ => bramble_tools::bias::CentreChoice::Zero,
        },
        keep_sink: args.sink == "keep",
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

fn run_bias_eval(args: BiasEvalArgs) -> Result<()> {
    use bramble_tools::bias::{evaluate_with, model_start, read_pairs, single_token, Scorer};
    let pairs = read_pairs(&args.pairs)?;
    let (loaded, context) = load(&args.model)?;
    let start_token = match &args.start_token {
        Some(text) => Some(single_token(&loaded.tokenizer, text)?),
        None => model_start(&loaded.tokenizer),
    };
    let model = model(&loaded, &args.model, SparseMode::Always)?;
    let mut scorer = Scorer::new(&model, context, args.batch)?;
    let mut feedback = feedback_loop(&model, &args.model)?;
    if let Some(feedback) = &feedback {
        scorer.state_mut().set_bias_weights(&feedback.weights)?;
        scorer.state_mut().reset_projections();
    }
    // Under `--feedback adaptive` each pair is a response: its signal moves
    // the weights the next pairs are scored with.
    let mut after_pair = |state: &mut bramble_runtime::RunState| -> Result<()> {
        if let Some(feedback) = feedback.as_mut() {
            after_response(feedback, &model, &args.model, state.projections())?;
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
            passes.push(bramble_tools::bias::LoopPass {
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
    let category_lines = |by_category: &std::collections::BTreeMap<String, bramble_tools::bias::Summary>| {
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

fn run_synth(args: SynthArgs) -> Result<()> {
    use bramble_runtime::vocab::TokenizerKind;
    use bramble_tools::synth::{SyntheticModel, SyntheticShape};
    if let Some(shape) = &args.shape {
        return run_synth_large(&args, shape);
    }
    let tokenizer = match args.tokenizer.as_str() {
        "spm" => TokenizerKind::SentencePiece,
        "bpe" => TokenizerKind::ByteLevelBpe,
        other => bail!("--tokenizer {other:?}: expected spm or bpe"),
    };
    let shape = SyntheticShape {
        dim: args.dim,
        n_layers: args.layers.unwrap_or(2),
        ffn_dim: args.dim * 5 / 2 / 32 * 32,
        tied_output: args.tied,
        tokenizer,
        ..SyntheticShape::default()
    };
    let model = SyntheticModel::generate(shape, args.seed);
    match args.format.as_str() {
        "gguf" => {
            let kind = bramble_tools::source::gguf::GgmlType::from_name(&args.weights)
                .with_context(|| format!("--weights {:?} is not a GGUF type", args.weights))?;
            bramble_tools::source::gguf::write_gguf(&model, &args.output, kind)?;
        }
        "hf" => {
            use bramble_tools::source::hf::{write_hf_dir, HfDtype, HfWriteOptions};
            let dtype = match args.weights.as_str() {
                "f32" => HfDtype::F32,
                "f16" => HfDtype::F16,
                "bf16" => HfDtype::BF16,
                other => bail!("--weights {other:?}: a Hugging Face directory holds f32, f16 or bf16"),
            };
            let template = match tokenizer {
                TokenizerKind::SentencePiece => bramble_runtime::chat::LLAMA2,
                TokenizerKind::ByteLevelBpe => bramble_runtime::chat::CHATML,
            };
            let options =
                HfWriteOptions { dtype, chat_template: Some(template.to_string()), ..HfWriteOptions::default() };
            write_hf_dir(&model, &args.output, options)?;
        }
        "llama2c" => {
            anyhow::ensure!(args.weights == "f32", "--weights {:?}: llama2.c checkpoints hold f32", args.weights);
            let tokenizer_path = args.output.with_file_name("tokenizer.bin");
            bramble_tools::source::llama2c::write_llama2c(&model, &args.output, &tokenizer_path, 0)?;
        }
        other => bail!("--format {other:?}: expected gguf, hf or llama2c"),
    }
    outln!("wrote {}", args.output.display());
    Ok(())
}

/// `synth --shape`: a large model streamed to disk.
fn run_synth_large(args: &SynthArgs, shape: &str) -> Result<()> {
    use bramble_tools::synth_large::{write_large_gguf, write_large_hf, LargeShape, LargeWeights};
    let started = Instant::now();
    let shape = LargeShape::parse(shape)?;
    let weights = LargeWeights::parse(&args.weights).context("--weights")?;
    let report = match args.format.as_str() {
        "gguf" => write_large_gguf(shape, args.layers, &args.output, weights, args.seed)?,
        "hf" => write_large_hf(shape, args.layers, &args.output, weights, args.seed)?,
        other => bail!("--format {other:?} with --shape: expected gguf or hf"),
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

fn run_tokenize(path: &Path, text: &str, add_special: bool, parse_special: bool, chat: bool) -> Result<()> {
    let image = ModelImage::open(path)?;
    let tokenizer = Tokenizer::new(image.vocab())?;
    let ids = if chat {
        // The message is plain text inside the template's markup; BOS and
        // EOS as the model adds them, only if asked, as for plain text.
        let template = ChatTemplate::new(image.chat_template(), image.vocab());
        let vocab = tokenizer.vocab();
        let bos = vocab.bos_id.filter(|_| add_special && vocab.add_bos);
        let eos = vocab.eos_id.filter(|_| add_special && vocab.add_eos);
        let chat = tokenizer.encode_chat(&template, &[ChatMessage::new("user", text)], true)?;
        bos.into_iter().chain(chat).chain(eos).collect()
    } else {
        tokenizer.encode(text, add_special, parse_special)
    };
    let pieces: Vec<String> =
        ids.iter().map(|&id| String::from_utf8_lossy(tokenizer.token_text(id)).into_owned()).collect();
    outln!("{}", serde_json::json!({ "ids": ids, "pieces": pieces }));
    Ok(())
}
