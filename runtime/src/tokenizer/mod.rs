//! Tokenizers: SentencePiece BPE with byte fallback, and GPT-2 byte-level BPE.
//! (Placeholder: being written.)

use crate::vocab::Vocab;

/// A working tokenizer built from a [`Vocab`].
pub struct Tokenizer {
    vocab: Vocab,
}

impl Tokenizer {
    /// Builds the tokenizer's tables.
    pub fn new(vocab: &Vocab) -> crate::Result<Self> {
        Ok(Self { vocab: vocab.clone() })
    }
    /// The vocabulary.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }
}
