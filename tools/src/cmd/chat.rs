//! `bramble chat`: a conversation on the console, in the model's chat template.

use super::model_args::ModelArgs;
use super::sampling_args::SamplingArgs;
use anyhow::Result;
use bramble_runtime::chat::{ChatMessage, ChatTemplate};
use bramble_runtime::model::SparseMode;
use bramble_runtime::session::Session;
use bramble_tools::generate::generate;
use clap::Args;
use std::io::{BufRead, IsTerminal, Write};

#[derive(Args)]
pub struct ChatArgs {
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

pub fn run(args: ChatArgs) -> Result<()> {
    let (loaded, context) = args.model.load()?;
    let model = args.model.build_model(&loaded, SparseMode::DecodeOnly)?;
    let tokenizer = &loaded.tokenizer;
    let template = ChatTemplate::new(loaded.image.chat_template(), loaded.image.vocab());
    let mut session = Session::try_new(&model, tokenizer, context, args.sampling.config())?;
    // Under `--feedback adaptive` each reply is a response to the loop.
    let mut feedback = args.model.feedback_loop(&model)?;
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
        if let Some(feedback) = &feedback {
            // This reply's projections only, under the loop's weights (the
            // cached prefix keeps the positions it was run with).
            session.reset_projections();
            session.apply_feedback(feedback)?;
        }
        let reply = generate(&mut session, &tokens[shared..], args.max_tokens, &args.sampling.stop, &mut on_text)?;
        outln!();
        if let Some(feedback) = feedback.as_mut() {
            let signal = args.model.after_response(feedback, &model, session.projections(), &reply.tokens)?;
            if interactive {
                eprintln!("(bias signal {signal:+.3})");
            }
        }
        messages.push(ChatMessage::new("assistant", reply.text.trim()));
    }
    Ok(())
}
