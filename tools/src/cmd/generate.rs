//! `bramble generate`: continue a prompt.

use super::model_args::ModelArgs;
use super::sampling_args::SamplingArgs;
use anyhow::Result;
use bramble_runtime::chat::{ChatMessage, ChatTemplate};
use bramble_runtime::model::SparseMode;
use bramble_runtime::session::Session;
use bramble_tools::generate::{follow, generate};
use clap::Args;
use std::io::Write;

#[derive(Args)]
pub struct GenerateArgs {
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
    /// Score these token ids (comma-separated) as the continuation instead of
    /// sampling one: before each, the model's greedy choice, the token's rank
    /// and its logit's distance from the top (teacher forcing, to compare
    /// another engine's greedy output step by step).
    #[arg(long, value_name = "IDS", value_delimiter = ',', conflicts_with = "max_tokens")]
    follow: Option<Vec<u32>>,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let (loaded, context) = args.model.load()?;
    let model = args.model.build_model(&loaded, SparseMode::DecodeOnly)?;
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
    let mut feedback = args.model.feedback_loop(&model)?;
    if let Some(feedback) = &feedback {
        session.apply_feedback(feedback)?;
    }
    if let Some(continuation) = &args.follow {
        let following = follow(&mut session, &prompt, continuation)?;
        if args.json {
            outln!("{}", serde_json::to_string(&following)?);
        } else {
            for (i, step) in following.steps.iter().enumerate() {
                let piece = |t: u32| format!("{:?}", tokenizer.decode(&[t]));
                outln!(
                    "{:>4} {:>7} {:<16} rank {:>3}  greedy {:>7} {:<16} margin {:.4}  top gap {:.4}",
                    i + 1,
                    step.token,
                    piece(step.token),
                    step.rank,
                    step.argmax,
                    piece(step.argmax),
                    step.margin,
                    step.top_gap
                );
            }
            outln!("{} of {} followed tokens are the model's greedy choice", following.agree, following.steps.len());
        }
        return Ok(());
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
        Some(feedback) => Some(args.model.after_response(feedback, &model, session.projections(), &result.tokens)?),
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
