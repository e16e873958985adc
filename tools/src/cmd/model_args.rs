//! The options that load a model (`generate`, `chat`, `perplexity`, `bench`,
//! `bias-eval`): the image, threads, context, R-Sparse, KV cache and bias
//! feedback; and the loading they describe.

use anyhow::{Context, Result};
use bramble_runtime::bias::{BiasConstraint, Feedback, FeedbackLoop, ProjectionStats};
use bramble_runtime::kernels::{pool::MAX_THREADS, Kernels};
use bramble_runtime::kv::KvMode;
use bramble_runtime::model::{Model, SparseMode};
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::ModelImage;
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// `--sparsity`: whether the image's R-Sparse plan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SparsityArg {
    Auto,
    Off,
}

/// `--kv`: the runtime's [`KvMode`] by its command-line name (the runtime
/// does not depend on clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvArg {
    F32,
    F16,
    Q8,
    Q4,
}

impl From<KvArg> for KvMode {
    fn from(kv: KvArg) -> Self {
        match kv {
            KvArg::F32 => KvMode::F32,
            KvArg::F16 => KvMode::F16,
            KvArg::Q8 => KvMode::Q8,
            KvArg::Q4 => KvMode::Q4,
        }
    }
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// The image.
    #[arg(long)]
    pub model: PathBuf,
    /// Threads for the matrix products (default: the number of cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Context length (default: the model's, at most 4096).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// R-Sparse: `auto` runs the image's `rsparse` plan if it has one
    /// (`bramble calibrate` writes it), `off` runs dense.
    #[arg(long, value_enum, default_value_t = SparsityArg::Auto)]
    pub sparsity: SparsityArg,
    /// KV cache: `f32` (full precision), `f16` (half precision, half the
    /// bytes, llama.cpp's default), `q8` or `q4` (KIVI-style quantization
    /// with an f32 window of recent tokens; docs/kv.md).
    #[arg(long, value_enum, default_value_t = KvArg::F32)]
    pub kv: KvArg,
    /// Key-channel pruning (ThinK): after the prompt, drop this share of
    /// each KV head's key channels for the prompt's keys, chosen by query
    /// and key energy; in [0, 1), 0 is off; `--kv f32` only (docs/kv.md).
    #[arg(long, default_value_t = 0.0, value_name = "R")]
    pub kv_prune: f32,
    /// The layer-wise bias constraint (`bramble bias-calibrate` writes it):
    /// `static` applies the image's predefined weights, `adaptive` adjusts
    /// them after each response from its bias signal, `off` runs without;
    /// `auto` (the default) is `adaptive` for an image whose calibration
    /// records that it passed every bias gate, `off` otherwise (the first
    /// design erased "she", docs/bias.md).
    #[arg(long, default_value = "auto", value_parser = feedback_parser())]
    pub feedback: Feedback,
    /// With `--feedback adaptive`: the loop's state (weights, recent
    /// signals), restored at start and saved atomically after each response.
    #[arg(long, visible_alias = "state")]
    pub bias_state: Option<PathBuf>,
    /// With `--feedback static`: these constraint weights instead of the
    /// image's predefined ones, one for every layer or one a layer
    /// (comma-separated, each in [0, 1]); to see what other weights would do.
    #[arg(long, value_delimiter = ',', value_name = "W")]
    pub bias_weights: Option<Vec<f32>>,
}

/// `--feedback`'s parser: the runtime's policy names, listed in `--help`.
fn feedback_parser() -> impl clap::builder::TypedValueParser<Value = Feedback> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Feedback::ALL.map(Feedback::name))
        .map(|name| name.parse::<Feedback>().expect("a listed policy"))
}

/// An opened image with its tokenizer.
pub struct Loaded {
    pub image: ModelImage,
    pub tokenizer: Tokenizer,
}

impl ModelArgs {
    /// Opens `--model` and its tokenizer; returns them with the context
    /// length (`--ctx`, else the model's, at most 4096).
    pub fn load(&self) -> Result<(Loaded, usize)> {
        let image = ModelImage::open(&self.model)?;
        let tokenizer =
            Tokenizer::new(image.vocab()).with_context(|| format!("{}: tokenizer", self.model.display()))?;
        let context = self.ctx.unwrap_or((image.config().context_length as usize).min(4096));
        anyhow::ensure!(context >= 2, "--ctx {context} is too small");
        Ok((Loaded { image, tokenizer }, context))
    }

    /// The model of a loaded image, with `--threads` workers and, unless
    /// `--sparsity off`, the image's R-Sparse plan applied in `mode`; the KV
    /// cache, key pruning and bias constraint as the options ask.
    pub fn build_model<'a>(&self, loaded: &'a Loaded, mode: SparseMode) -> Result<Model<'a>> {
        let threads = self.threads.unwrap_or_else(super::cores);
        anyhow::ensure!((1..=MAX_THREADS).contains(&threads), "--threads {threads}: expected 1 to {MAX_THREADS}");
        let mut model = Model::with_options(&loaded.image, Kernels::detect(), threads)?;
        if self.sparsity == SparsityArg::Auto {
            model
                .use_image_sparsity(&loaded.image, mode)
                .with_context(|| format!("{}: rsparse section", self.model.display()))?;
        }
        let kv = KvMode::from(self.kv);
        model.set_kv_mode(kv).with_context(|| format!("{}: --kv {kv}", self.model.display()))?;
        // Pruning applies to decode steps after a prompt; these commands run every token as a prompt.
        anyhow::ensure!(
            self.kv_prune == 0.0 || mode != SparseMode::Always,
            "--kv-prune {}: this command runs every token as part of a prompt, where key-channel pruning never \
             applies (it prunes at the first decoded token; docs/kv.md measures it with a prefill/decode split)",
            self.kv_prune
        );
        model.set_kv_prune(self.kv_prune).with_context(|| format!("{}: --kv-prune", self.model.display()))?;
        // `auto` (the default) is adaptive only for a calibration that passed
        // every bias gate; static and adaptive stay on request.
        if let Some(section) = self.bias_section(loaded)? {
            model.set_bias(Some(section)).with_context(|| format!("{}: bias section", self.model.display()))?;
        }
        if let Some(weights) = &self.bias_weights {
            anyhow::ensure!(self.feedback == Feedback::Static, "--bias-weights goes with --feedback static");
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
            // The loop's caps mean nothing under static feedback; they only must not sit below the weights.
            for (cap, weight) in constraint.max_weights.iter_mut().zip(&constraint.weights) {
                *cap = cap.max(*weight);
            }
            model.set_bias(Some(constraint))?;
        }
        Ok(model)
    }

    /// The image's bias section as `--feedback` resolves for it: `None` when
    /// the feedback is off (for `auto`, with a note on stderr saying why,
    /// unless the image has no section), an error when `static` or
    /// `adaptive` is asked of an image without one.
    fn bias_section(&self, loaded: &Loaded) -> Result<Option<BiasConstraint>> {
        if self.feedback == Feedback::Off {
            return Ok(None);
        }
        let image = self.model.display();
        let section = match loaded.image.section(bramble_runtime::bias::SECTION) {
            None => None,
            Some(bytes) => match BiasConstraint::from_section(bytes) {
                Ok(section) => Some(section),
                // `auto` asks for the section only if it is usable.
                Err(e) if self.feedback == Feedback::Auto => {
                    eprintln!("bramble: serving with the bias loop off: {image}: the bias section cannot be read: {e}");
                    return Ok(None);
                }
                Err(e) => return Err(e).with_context(|| format!("{image}: bias section")),
            },
        };
        match self.feedback.resolve(section.as_ref()) {
            (Feedback::Off, Some(reason)) => {
                if section.is_some() {
                    eprintln!("bramble: serving with the bias loop off: {reason}");
                }
                Ok(None)
            }
            (Feedback::Off, None) => Ok(None),
            (_, _) => {
                let feedback = self.feedback;
                anyhow::ensure!(
                    section.is_some(),
                    "--feedback {feedback}: {image} has no bias section; write one with `bramble bias-calibrate`"
                );
                Ok(section)
            }
        }
    }

    /// What `--feedback` came to for `model` (built by [`build_model`](Self::build_model)):
    /// `auto` is adaptive when it loaded the image's bias section, off otherwise.
    pub fn resolved_feedback(&self, model: &Model) -> Feedback {
        self.feedback.resolve(model.bias()).0
    }

    /// The feedback loop of `--feedback adaptive` (or `auto` resolved to it;
    /// restored from `--bias-state`), if asked for.
    pub fn feedback_loop(&self, model: &Model) -> Result<Option<FeedbackLoop>> {
        if self.resolved_feedback(model) != Feedback::Adaptive {
            anyhow::ensure!(self.bias_state.is_none(), "--bias-state goes with --feedback adaptive");
            return Ok(None);
        }
        let constraint = model.bias().expect("adaptive feedback loaded the bias section");
        let mut feedback = FeedbackLoop::new(constraint);
        if let Some(path) = &self.bias_state {
            if feedback.restore(path)? {
                eprintln!("bramble: bias state restored from {} ({} responses)", path.display(), feedback.responses);
            }
        }
        Ok(Some(feedback))
    }

    /// After a response under `--feedback adaptive`: its signal, the weights
    /// adjusted, the state saved to `--bias-state`. `answer` is the
    /// response's generated tokens (`&[]` when there are none, as for a
    /// scored pair; the pronoun-share loop counts their pronouns). Returns the signal.
    pub fn after_response(
        &self,
        feedback: &mut FeedbackLoop,
        model: &Model,
        projections: &ProjectionStats,
        answer: &[u32],
    ) -> Result<f32> {
        let signal = feedback.after_response(projections, model.bias().expect("a bias section"), answer);
        if let Some(path) = &self.bias_state {
            feedback.save(path)?;
        }
        Ok(signal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each `--kv` value is the runtime mode of that name, and every runtime mode has its value.
    #[test]
    fn kv_values_are_the_runtime_modes() {
        crate::cmd::assert_values_parse_alike::<KvArg, KvMode>(|name| name.parse().ok());
        for kv in KvArg::value_variants() {
            assert_eq!(Some(KvMode::from(*kv).name()), kv.to_possible_value().as_ref().map(|v| v.get_name()));
        }
        let listed: Vec<KvMode> = KvArg::value_variants().iter().map(|&kv| KvMode::from(kv)).collect();
        assert_eq!(listed, KvMode::ALL);
    }

    /// `--feedback` lists and parses every runtime policy.
    #[test]
    fn feedback_values_are_the_runtime_policies() {
        let command =
            clap::Command::new("test").arg(clap::Arg::new("feedback").long("feedback").value_parser(feedback_parser()));
        for policy in Feedback::ALL {
            let name = policy.name();
            let matches = command.clone().try_get_matches_from(["test", "--feedback", name]).expect(name);
            assert_eq!(matches.get_one::<Feedback>("feedback"), Some(&policy));
        }
        assert!(command.try_get_matches_from(["test", "--feedback", "sometimes"]).is_err());
    }
}
