//! Tokenizers: SentencePiece BPE with byte fallback (Llama-2, llama2.c) and
//! GPT-2 byte-level BPE (SmolLM2, Llama-3), built from a [`Vocab`].
//!
//! Both follow llama.cpp's `llama-vocab.cpp` step for step, so a model gives
//! the same ids here as there (and as its Hugging Face tokenizer):
//!
//! 1. Special tokens are cut out of the text first, longest first
//!    (`tokenizer_st_partition`): user-defined tokens always, control and
//!    unknown tokens only when the caller asks to parse them.
//! 2. Each remaining text fragment is encoded by the vocabulary's algorithm:
//!    `sentencepiece` merges by score; `byte_level` splits the fragment
//!    into words (`pretokenize`) and merges each word by rank.
//!
//! Everything that can be computed from the vocabulary is computed in
//! [`Tokenizer::new`]: lookup tables, merge tables, and the bytes each token
//! decodes to, so the generation loop's [`Tokenizer::token_bytes`] is a slice
//! lookup.

mod byte_level;
mod fast_hash;
mod pretokenize;
mod sentencepiece;
pub mod synthetic;
mod unicode;

#[cfg(test)]
mod tests;

use std::ops::Range;

use byte_level::ByteLevelModel;
use fast_hash::FastMap;
use sentencepiece::SentencePieceModel;

use crate::chat::{self, ChatMessage, ChatTemplate};
use crate::vocab::{TokenType, TokenizerKind, Vocab};
use crate::{Error, Result};

/// Spellings of the tokens that end a turn in the chat formats llama.cpp
/// knows; any such token that is not ordinary text ends generation.
const END_OF_GENERATION_SPELLINGS: &[&str] = &[
    "</s>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<EOT>",
    "_<EOT>",
    "<end_of_utterance>",
    // Qwen2.5-Coder's fill-in-the-middle separators, which llama.cpp also
    // stops at: a completion that reaches one has ended its piece of code.
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
];

/// A token matched whole in the input before BPE.
#[derive(Debug, Clone)]
struct SpecialToken {
    text: String,
    id: u32,
    /// Control and unknown tokens are matched only when the caller parses special tokens.
    only_when_parsing: bool,
}

/// A piece of the input after special tokens are cut out.
#[derive(Debug, Clone)]
enum Fragment {
    /// Text to encode, as a byte range of the input.
    Text(Range<usize>),
    /// A special token found in the input.
    Token(u32),
}

/// The algorithm's tables.
#[derive(Debug, Clone)]
enum Model {
    SentencePiece(SentencePieceModel),
    ByteLevel(ByteLevelModel),
}

/// A working tokenizer built from a [`Vocab`].
#[derive(Clone)]
pub struct Tokenizer {
    vocab: Vocab,
    model: Model,
    /// What every token decodes to, back to back: token `i` is
    /// `decoded[decoded_ends[i - 1]..decoded_ends[i]]`.
    decoded: Vec<u8>,
    decoded_ends: Vec<usize>,
    /// Tokens matched whole in the input, longest first.
    special_tokens: Vec<SpecialToken>,
    /// Tokens that end generation.
    end_of_generation: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.vocab.kind)
            .field("pre_tokenizer", &self.vocab.pre_tokenizer)
            .field("tokens", &self.vocab.len())
            .field("merges", &self.vocab.merges.len())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer's tables, checking that the vocabulary is
    /// consistent: lengths agree, special ids and merges name real tokens,
    /// every merge makes a token, and every byte has a token to fall back on.
    pub fn new(vocab: &Vocab) -> Result<Self> {
        let count = vocab.len();
        if count == 0 {
            return Err(Error::corrupt("tokenizer: the vocabulary has no tokens"));
        }
        if count > u32::MAX as usize {
            return Err(Error::unsupported(format!("tokenizer: {count} tokens do not fit 32-bit ids")));
        }
        if vocab.types.len() != count {
            return Err(Error::corrupt(format!("tokenizer: {} token types for {count} tokens", vocab.types.len())));
        }
        let special_ids = [
            ("BOS", vocab.bos_id),
            ("EOS", vocab.eos_id),
            ("unknown", vocab.unk_id),
            ("padding", vocab.pad_id),
            ("end-of-turn", vocab.eot_id),
        ];
        for (name, id) in special_ids {
            if let Some(id) = id.filter(|&id| id as usize >= count) {
                return Err(Error::corrupt(format!(
                    "tokenizer: {name} token id {id} is past the vocabulary's {count} tokens"
                )));
            }
        }

        let mut ids: FastMap<&[u8], u32> = FastMap::default();
        ids.reserve(count);
        for (id, spelling) in vocab.tokens.iter().enumerate() {
            // A repeated spelling means its last id, as llama.cpp's table does.
            ids.insert(spelling, id as u32);
        }

        let (decoded, decoded_ends) = decode_all(vocab)?;
        let decoded_of = |id: u32| {
            let start = if id == 0 { 0 } else { decoded_ends[id as usize - 1] };
            decoded[start..decoded_ends[id as usize]].to_vec()
        };
        let model = match vocab.kind {
            TokenizerKind::SentencePiece => Model::SentencePiece(SentencePieceModel::new(vocab, &ids)?),
            TokenizerKind::ByteLevelBpe => Model::ByteLevel(ByteLevelModel::new(vocab, &ids, decoded_of)?),
        };

        let mut special_tokens: Vec<SpecialToken> = vocab
            .tokens
            .iter()
            .zip(&vocab.types)
            .enumerate()
            .filter(|(_, (_, kind))| matches!(kind, TokenType::Control | TokenType::UserDefined | TokenType::Unknown))
            .filter_map(|(id, (spelling, kind))| {
                // An empty spelling would match everywhere; one that is not
                // UTF-8 can never match text that is.
                let text = std::str::from_utf8(spelling).ok().filter(|text| !text.is_empty())?;
                Some(SpecialToken {
                    text: text.to_string(),
                    id: id as u32,
                    only_when_parsing: *kind != TokenType::UserDefined,
                })
            })
            .collect();
        // Longest first, so "<|im_start|>" wins over a "<|im" inside it.
        special_tokens.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));

        let mut end_of_generation: Vec<u32> = [vocab.eos_id, vocab.eot_id].into_iter().flatten().collect();
        for spelling in END_OF_GENERATION_SPELLINGS {
            if let Some(&id) = ids.get(spelling.as_bytes()) {
                if !matches!(vocab.types[id as usize], TokenType::Normal | TokenType::Byte) {
                    end_of_generation.push(id);
                }
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();

        Ok(Self { vocab: vocab.clone(), model, decoded, decoded_ends, special_tokens, end_of_generation })
    }

    /// The vocabulary.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// The ids of `text`. With `add_special`, BOS and EOS are put around them
    /// as the vocabulary asks (`add_bos`, `add_eos`). With `parse_special`,
    /// control tokens spelled out in the text (`<|im_start|>`, `<s>`) become
    /// their ids; without it they are encoded as plain text. User-defined
    /// tokens are always matched whole, as in llama.cpp and Hugging Face.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.vocab.add_bos {
            out.extend(self.vocab.bos_id);
        }
        let mut encoder = FragmentEncoder::new(self);
        for fragment in self.partition(text, parse_special) {
            encoder.encode(text, fragment, &mut out);
        }
        if add_special && self.vocab.add_eos {
            out.extend(self.vocab.eos_id);
        }
        out
    }

    /// The ids of a conversation rendered with `template`, as every front
    /// end feeds it to the model: only the template's own markup (its
    /// `<|im_start|>`, its `bos_token`) yields control tokens; what the
    /// messages say is encoded as plain text, so a user who types
    /// `<|im_end|>` cannot close their turn and forge another. BOS is added
    /// only if the template writes it.
    ///
    /// A conversation whose messages spell no control token gets exactly the
    /// ids of encoding the rendered text with special tokens parsed: where
    /// message text spells a control token (or, at its trimmed ends, part of
    /// one that the markup beside it could complete), it is swapped for a
    /// mark before rendering and put back after, so templates that trim or
    /// join message text still work. Errors: the template fails, or it cut into
    /// escaped message text (a template that slices message text).
    pub fn encode_chat(
        &self,
        template: &ChatTemplate,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let control: Vec<&str> = self
            .special_tokens
            .iter()
            .filter(|special| special.only_when_parsing)
            .map(|special| special.text.as_str())
            .collect();
        let rendered = template.render_escaped(messages, add_generation_prompt, &control)?;
        let text = rendered.text();
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        let mut encoder = FragmentEncoder::new(self);
        let mut unescaped = String::new();
        // Message text holds no control spelling now, so every control token
        // found here is the template's.
        for fragment in self.partition(text, true) {
            match fragment {
                Fragment::Text(range) if chat::is_escaped(&text[range.clone()]) => {
                    // Message text goes back as it was and is encoded as plain
                    // text, together with the markup around it in this fragment.
                    unescaped.clear();
                    rendered.unescape(&text[range], &mut unescaped)?;
                    for piece in self.partition(&unescaped, false) {
                        encoder.encode(&unescaped, piece, &mut out);
                    }
                }
                fragment => encoder.encode(text, fragment, &mut out),
            }
        }
        Ok(out)
    }

    /// Cuts the special tokens out of `text`, longest first, as llama.cpp's
    /// `tokenizer_st_partition` does.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut fragments = Vec::new();
        if text.is_empty() {
            return fragments;
        }
        fragments.push(Fragment::Text(0..text.len()));
        for special in &self.special_tokens {
            if special.only_when_parsing && !parse_special {
                continue;
            }
            if !text.contains(special.text.as_str()) {
                continue;
            }
            let mut split = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(range) = fragment else {
                    split.push(fragment);
                    continue;
                };
                let mut start = range.start;
                while let Some(found) = text[start..range.end].find(special.text.as_str()) {
                    if found > 0 {
                        split.push(Fragment::Text(start..start + found));
                    }
                    split.push(Fragment::Token(special.id));
                    start += found + special.text.len();
                }
                if start < range.end {
                    split.push(Fragment::Text(start..range.end));
                }
            }
            fragments = split;
        }
        fragments
    }

    /// The bytes token `id` stands for when decoded: SentencePiece's `▁` is a
    /// space and `<0xAB>` the byte 0xAB; byte-level tokens are mapped back
    /// through GPT-2's byte mapping; user-defined tokens are their spelling;
    /// control, unknown and unused tokens, and ids past the vocabulary, are
    /// empty (they are not text). Never allocates.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let id = id as usize;
        let Some(&end) = self.decoded_ends.get(id) else {
            return &[];
        };
        let start = if id == 0 { 0 } else { self.decoded_ends[id - 1] };
        &self.decoded[start..end]
    }

    /// The text of `ids`: their bytes back to back, invalid UTF-8 replaced by
    /// U+FFFD. For SentencePiece with a space prefix, the first piece's
    /// leading space is dropped, since the encoder added it.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut strip_space = self.vocab.kind == TokenizerKind::SentencePiece && self.vocab.add_space_prefix;
        for &id in ids {
            let mut piece = self.token_bytes(id);
            if strip_space && !piece.is_empty() {
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
                strip_space = false;
            }
            bytes.extend_from_slice(piece);
        }
        match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(error) => String::from_utf8_lossy(error.as_bytes()).into_owned(),
        }
    }

    /// The beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.vocab.bos_id
    }

    /// The end-of-sequence token.
    pub fn eos_id(&self) -> Option<u32> {
        self.vocab.eos_id
    }

    /// Whether generation stops at `id`: EOS, the end-of-turn token, or a
    /// non-text token spelled like one of the end-of-turn markers llama.cpp
    /// knows (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`, …).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    /// The token's spelling in the vocabulary (`▁Hello`, `ĠHello`, `<0x0A>`),
    /// for inspection and debugging; empty past the vocabulary.
    pub fn token_text(&self, id: u32) -> &[u8] {
        self.vocab.tokens.get(id as usize).map_or(&[], |spelling| spelling.as_slice())
    }
}

/// Encodes the fragments of one input in order, with what carries from one
/// to the next and the buffers reused between them.
struct FragmentEncoder<'t> {
    tokenizer: &'t Tokenizer,
    /// Whether the next text begins the input or follows a special token:
    /// there llama.cpp puts SentencePiece's space prefix.
    after_special: bool,
    chars: Vec<pretokenize::Char>,
    words: Vec<Range<usize>>,
    scratch: byte_level::Scratch,
}

impl<'t> FragmentEncoder<'t> {
    fn new(tokenizer: &'t Tokenizer) -> Self {
        Self {
            tokenizer,
            after_special: true,
            chars: Vec::new(),
            words: Vec::new(),
            scratch: byte_level::Scratch::default(),
        }
    }

    /// Appends the ids of `fragment`, a piece of `text`.
    fn encode(&mut self, text: &str, fragment: Fragment, out: &mut Vec<u32>) {
        let range = match fragment {
            Fragment::Token(id) => {
                out.push(id);
                self.after_special = true;
                return;
            }
            Fragment::Text(range) => range,
        };
        let fragment_text = &text[range];
        let vocab = &self.tokenizer.vocab;
        match &self.tokenizer.model {
            Model::SentencePiece(model) => {
                model.encode(fragment_text, vocab.add_space_prefix && self.after_special, out);
            }
            Model::ByteLevel(model) => {
                self.words.clear();
                pretokenize::split_words(vocab.pre_tokenizer, fragment_text, &mut self.chars, &mut self.words);
                for word in &self.words {
                    model.encode_word(fragment_text[word.clone()].as_bytes(), &mut self.scratch, out);
                }
            }
        }
        self.after_special = false;
    }
}

/// What every token decodes to, back to back, with each token's end offset.
fn decode_all(vocab: &Vocab) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut decoded = Vec::with_capacity(vocab.tokens.iter().map(Vec::len).sum());
    let mut ends = Vec::with_capacity(vocab.len());
    for (id, (spelling, kind)) in vocab.tokens.iter().zip(&vocab.types).enumerate() {
        match (vocab.kind, kind) {
            (_, TokenType::Control | TokenType::Unknown | TokenType::Unused) => {}
            (_, TokenType::UserDefined) => decoded.extend_from_slice(spelling),
            (TokenizerKind::SentencePiece, TokenType::Byte) => {
                let byte = sentencepiece::parse_byte_token(spelling).ok_or_else(|| {
                    Error::corrupt(format!(
                        "tokenizer: byte token {id} is spelled {:?}, not <0xAB>",
                        String::from_utf8_lossy(spelling)
                    ))
                })?;
                decoded.push(byte);
            }
            (TokenizerKind::SentencePiece, TokenType::Normal) => {
                let mut rest = spelling.as_slice();
                let space = sentencepiece::SPACE.as_bytes();
                while !rest.is_empty() {
                    if let Some(after) = rest.strip_prefix(space) {
                        decoded.push(b' ');
                        rest = after;
                    } else {
                        decoded.push(rest[0]);
                        rest = &rest[1..];
                    }
                }
            }
            (TokenizerKind::ByteLevelBpe, TokenType::Byte) => match sentencepiece::parse_byte_token(spelling) {
                Some(byte) => decoded.push(byte),
                None => byte_level::decode_spelling(spelling, &mut decoded),
            },
            (TokenizerKind::ByteLevelBpe, TokenType::Normal) => byte_level::decode_spelling(spelling, &mut decoded),
        }
        ends.push(decoded.len());
    }
    Ok((decoded, ends))
}
