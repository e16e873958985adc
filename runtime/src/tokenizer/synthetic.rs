//! Small synthetic vocabularies of both kinds, Llama-2-like SentencePiece
//! and SmolLM2-like byte-level BPE (and a Llama-3-like variant of the
//! latter): the tokenizer's own tests, the tools' synthetic models and the
//! end-to-end tests all build on these, so a token id means the same in each.

use super::byte_level::byte_to_char;
use crate::vocab::{PreTokenizer, TokenType, TokenizerKind, Vocab};

/// A small SentencePiece vocabulary: `<unk> <s> </s>`, the 256 byte tokens
/// (`<0x00>` is id 3), then a few dozen common pieces with descending scores,
/// among them the steps by which pairwise merges reach "▁Hello" and "▁world".
pub fn sentencepiece_vocab() -> Vocab {
    let mut tokens: Vec<Vec<u8>> = vec![b"<unk>".to_vec(), b"<s>".to_vec(), b"</s>".to_vec()];
    let mut types = vec![TokenType::Unknown, TokenType::Control, TokenType::Control];
    let mut scores = vec![0.0, 0.0, 0.0];
    for byte in 0..=255u8 {
        tokens.push(format!("<0x{byte:02X}>").into_bytes());
        types.push(TokenType::Byte);
        scores.push(0.0);
    }
    let pieces = [
        "▁", "e", "t", "a", "o", "n", "i", "s", "h", "r", "l", "d", "▁t", "he", "▁a", "in", "▁the", "er", "an", "▁s",
        "on", "▁w", "re", "at", "en", "▁o", "nd", "▁h", "▁b", "es", "▁f", "▁c", "▁m", "or", "is", "▁and", "ll",
        "▁Hello", "▁world", "H", "W", "w", ",", ".", "!",
        // The steps by which pair merges reach ▁Hello and ▁world (without them BPE never forms those two).
        "▁H", "▁He", "▁Hell", "▁wor", "ld",
    ];
    for (index, piece) in pieces.iter().enumerate() {
        tokens.push(piece.as_bytes().to_vec());
        types.push(TokenType::Normal);
        scores.push(-(index as f32));
    }
    Vocab::llama_sentencepiece(tokens, scores, types)
}

/// A small byte-level BPE vocabulary: the ChatML control tokens
/// `<|endoftext|> <|im_start|> <|im_end|>`, the 256 byte characters (GPT-2's
/// mapping), then the tokens a few merges make, up to "Hello" and "Ġworld".
pub fn byte_level_vocab() -> Vocab {
    let mut tokens: Vec<Vec<u8>> = vec![b"<|endoftext|>".to_vec(), b"<|im_start|>".to_vec(), b"<|im_end|>".to_vec()];
    let mut types = vec![TokenType::Control; 3];
    for byte in 0..=255u8 {
        tokens.push(byte_to_char(byte).to_string().into_bytes());
        types.push(TokenType::Normal);
    }
    let mut merges = Vec::new();
    for (left, right) in [
        ("Ġ", "t"),
        ("h", "e"),
        ("i", "n"),
        ("Ġt", "he"),
        ("e", "r"),
        ("o", "n"),
        ("Ġ", "a"),
        ("r", "e"),
        ("Ġ", "w"),
        ("o", "r"),
        ("l", "l"),
        ("H", "e"),
        ("He", "ll"),
        ("Ġw", "or"),
        ("Hell", "o"),
        ("Ġwor", "l"),
        ("Ġworl", "d"),
    ] {
        let id = |tokens: &[Vec<u8>], text: &str| {
            tokens.iter().position(|t| t == text.as_bytes()).expect("the merge's parts come first") as u32
        };
        let (left_id, right_id) = (id(&tokens, left), id(&tokens, right));
        let merged = format!("{left}{right}");
        if !tokens.iter().any(|t| t == merged.as_bytes()) {
            tokens.push(merged.into_bytes());
            types.push(TokenType::Normal);
        }
        merges.push((left_id, right_id));
    }
    let count = tokens.len();
    Vocab {
        kind: TokenizerKind::ByteLevelBpe,
        pre_tokenizer: PreTokenizer::SmolLm,
        scores: vec![0.0; count],
        types,
        merges,
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        pad_id: Some(2),
        eot_id: Some(2),
        add_bos: false,
        add_eos: false,
        add_space_prefix: false,
        tokens,
    }
}

/// The SentencePiece vocabulary of [`sentencepiece_vocab`] as Gemma's: its
/// control tokens spelled `<unk> <bos> <eos>` (ids 0–2), Gemma's turn
/// tokens `<start_of_turn> <end_of_turn>` last, no space put before the
/// text (Gemma's tokenizer does not), BOS added, `<end_of_turn>` ending a turn.
pub fn gemma_vocab() -> Vocab {
    let mut vocab = sentencepiece_vocab();
    vocab.tokens[1] = b"<bos>".to_vec();
    vocab.tokens[2] = b"<eos>".to_vec();
    for text in ["<start_of_turn>", "<end_of_turn>"] {
        vocab.tokens.push(text.as_bytes().to_vec());
        vocab.types.push(TokenType::Control);
        vocab.scores.push(0.0);
    }
    vocab.eot_id = Some(vocab.tokens.len() as u32 - 1);
    vocab.add_space_prefix = false;
    vocab
}

/// The byte-level vocabulary of [`byte_level_vocab`] as Llama-3.x's: the
/// same bytes and merges, Llama-3's word splitting, and its control tokens
/// `<|begin_of_text|> <|end_of_text|> <|eot_id|>` in place of the ChatML
/// ones (ids 0–2), `<|start_header_id|> <|end_header_id|>` last. BOS is
/// added, as Llama-3 does; `<|eot_id|>` ends a turn.
pub fn llama3_vocab() -> Vocab {
    let mut vocab = byte_level_vocab();
    for (id, text) in ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"].into_iter().enumerate() {
        vocab.tokens[id] = text.as_bytes().to_vec();
    }
    for text in ["<|start_header_id|>", "<|end_header_id|>"] {
        vocab.tokens.push(text.as_bytes().to_vec());
        vocab.types.push(TokenType::Control);
        vocab.scores.push(0.0);
    }
    vocab.pre_tokenizer = PreTokenizer::Llama3;
    (vocab.bos_id, vocab.eos_id, vocab.eot_id, vocab.unk_id, vocab.pad_id) = (Some(0), Some(1), Some(2), None, None);
    vocab.add_bos = true;
    vocab
}
