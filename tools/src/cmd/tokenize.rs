//! `bramble tokenize`: the token ids of a text, and each token's text.

use anyhow::Result;
use bramble_runtime::chat::{ChatMessage, ChatTemplate};
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::ModelImage;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct TokenizeArgs {
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
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let TokenizeArgs { text, add_special, parse_special, .. } = args;
    let image = ModelImage::open(&args.model)?;
    let tokenizer = Tokenizer::new(image.vocab())?;
    let ids = if args.chat {
        // The message is plain text inside the template's markup; BOS and
        // EOS as the model adds them, only if asked, as for plain text.
        let template = ChatTemplate::new(image.chat_template(), image.vocab());
        let vocab = tokenizer.vocab();
        let bos = vocab.bos_id.filter(|_| add_special && vocab.add_bos);
        let eos = vocab.eos_id.filter(|_| add_special && vocab.add_eos);
        let chat = tokenizer.encode_chat(&template, &[ChatMessage::new("user", &text)], true)?;
        bos.into_iter().chain(chat).chain(eos).collect()
    } else {
        tokenizer.encode(&text, add_special, parse_special)
    };
    let pieces: Vec<String> =
        ids.iter().map(|&id| String::from_utf8_lossy(tokenizer.token_text(id)).into_owned()).collect();
    outln!("{}", serde_json::json!({ "ids": ids, "pieces": pieces }));
    Ok(())
}
