//! The tokenizer's vocabulary as data: what the converter reads from a source
//! model and the image's `tokenizer` section stores. The [`crate::tokenizer`]
//! module builds a working tokenizer from it.

/// Which algorithm the vocabulary is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// SentencePiece BPE with byte fallback (Llama-2, llama2.c): pieces spell a
    /// space as `▁`, merges are chosen by score.
    SentencePiece,
    /// GPT-2 byte-level BPE (SmolLM2, Llama-3): tokens are spelled in GPT-2's
    /// byte-to-Unicode mapping, merges are chosen by rank.
    ByteLevelBpe,
}

impl TokenizerKind {
    /// The id stored in the image.
    pub fn id(self) -> u32 {
        match self {
            TokenizerKind::SentencePiece => 1,
            TokenizerKind::ByteLevelBpe => 2,
        }
    }
    /// The kind an image id stands for.
    pub fn from_id(id: u32) -> Option<Self> {
        match id {
            1 => Some(TokenizerKind::SentencePiece),
            2 => Some(TokenizerKind::ByteLevelBpe),
            _ => None,
        }
    }
}

/// How text is split into words before byte-level BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// No splitting (SentencePiece).
    None,
    /// GPT-2's regex: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// SmolLM / StarCoder: every digit alone (`\p{N}`), then GPT-2's regex.
    SmolLm,
    /// Llama-3's regex (case-insensitive contractions, numbers in runs of up to 3).
    Llama3,
    /// Qwen2's (also Qwen2.5's and Qwen3's): Llama-3's regex with every digit alone.
    Qwen2,
}

impl PreTokenizer {
    /// The id stored in the image.
    pub fn id(self) -> u32 {
        match self {
            PreTokenizer::None => 0,
            PreTokenizer::Gpt2 => 1,
            PreTokenizer::SmolLm => 2,
            PreTokenizer::Llama3 => 3,
            PreTokenizer::Qwen2 => 4,
        }
    }
    /// The pre-tokenizer an image id stands for.
    pub fn from_id(id: u32) -> Option<Self> {
        match id {
            0 => Some(PreTokenizer::None),
            1 => Some(PreTokenizer::Gpt2),
            2 => Some(PreTokenizer::SmolLm),
            3 => Some(PreTokenizer::Llama3),
            4 => Some(PreTokenizer::Qwen2),
            _ => None,
        }
    }
    /// The pre-tokenizer of a GGUF `tokenizer.ggml.pre` name, if known.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        match name {
            "default" | "gpt-2" | "gpt2" => Some(PreTokenizer::Gpt2),
            "smollm" | "starcoder" | "refact" | "codeshell" => Some(PreTokenizer::SmolLm),
            "llama3" | "llama-bpe" | "llama-v3" => Some(PreTokenizer::Llama3),
            "qwen2" | "deepseek-r1-qwen" => Some(PreTokenizer::Qwen2),
            _ => None,
        }
    }
}

/// A token's role, with GGUF's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// An ordinary piece of text.
    Normal,
    /// The unknown token.
    Unknown,
    /// A control token (BOS, EOS, `<|im_start|>`): never produced from plain text.
    Control,
    /// A user-defined token: matched whole in the input before BPE.
    UserDefined,
    /// Unused slot.
    Unused,
    /// A byte-fallback token `<0xAB>`.
    Byte,
}

impl TokenType {
    /// GGUF's number for the type.
    pub fn id(self) -> u32 {
        match self {
            TokenType::Normal => 1,
            TokenType::Unknown => 2,
            TokenType::Control => 3,
            TokenType::UserDefined => 4,
            TokenType::Unused => 5,
            TokenType::Byte => 6,
        }
    }
    /// The type of a GGUF number (unknown numbers read as `Normal`, as llama.cpp does).
    pub fn from_id(id: u32) -> Self {
        match id {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

/// A tokenizer vocabulary, owned.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    /// The algorithm.
    pub kind: TokenizerKind,
    /// Word splitting before byte-level BPE.
    pub pre_tokenizer: PreTokenizer,
    /// Token texts as the vocabulary spells them (`▁` for SentencePiece spaces,
    /// GPT-2's byte-to-Unicode mapping for byte-level BPE).
    pub tokens: Vec<Vec<u8>>,
    /// SentencePiece scores (zeros for byte-level BPE).
    pub scores: Vec<f32>,
    /// Token roles.
    pub types: Vec<TokenType>,
    /// BPE merges `(left, right)` by rank (byte-level BPE; empty for SentencePiece).
    pub merges: Vec<(u32, u32)>,
    /// Beginning-of-sequence token.
    pub bos_id: Option<u32>,
    /// End-of-sequence token.
    pub eos_id: Option<u32>,
    /// Unknown token.
    pub unk_id: Option<u32>,
    /// Padding token.
    pub pad_id: Option<u32>,
    /// End-of-turn token of the chat template (`<|im_end|>`), when it differs from EOS.
    pub eot_id: Option<u32>,
    /// Put BOS before the prompt.
    pub add_bos: bool,
    /// Put EOS after the prompt.
    pub add_eos: bool,
    /// Put a space before the text (SentencePiece's `add_dummy_prefix`).
    pub add_space_prefix: bool,
}

impl Vocab {
    /// A SentencePiece vocabulary with Llama-2's conventions: `<unk>` 0,
    /// `<s>` 1, `</s>` 2, BOS added, a space prefix, no merges.
    pub fn llama_sentencepiece(tokens: Vec<Vec<u8>>, scores: Vec<f32>, types: Vec<TokenType>) -> Self {
        Vocab {
            kind: TokenizerKind::SentencePiece,
            pre_tokenizer: PreTokenizer::None,
            tokens,
            scores,
            types,
            merges: Vec::new(),
            bos_id: Some(1),
            eos_id: Some(2),
            unk_id: Some(0),
            pad_id: None,
            eot_id: None,
            add_bos: true,
            add_eos: false,
            add_space_prefix: true,
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    /// Whether the vocabulary has no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// The id of a token spelled exactly `text`, by linear search (for set-up code, not hot paths).
    pub fn find(&self, text: &str) -> Option<u32> {
        self.tokens.iter().position(|t| t == text.as_bytes()).map(|i| i as u32)
    }
}
