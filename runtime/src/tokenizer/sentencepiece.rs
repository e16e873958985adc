//! SentencePiece BPE with byte fallback (Llama-2, llama2.c), as llama.cpp's
//! `llm_tokenizer_spm_session` does it: spaces become `▁`, every character
//! starts as a symbol, and the adjacent pair whose concatenation is the
//! best-scoring piece is merged until no pair is a piece. Symbols that are not
//! pieces fall back to one `<0xAB>` token per byte.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::fast_hash::FastMap;
use crate::vocab::{TokenType, Vocab};
use crate::{Error, Result};

/// How SentencePiece spells a space.
pub(crate) const SPACE: &str = "\u{2581}";

/// The byte a byte-fallback token spelled `<0xAB>` stands for.
pub(crate) fn parse_byte_token(spelling: &[u8]) -> Option<u8> {
    let hex = spelling.strip_prefix(b"<0x")?.strip_suffix(b">")?;
    let digit = |c: u8| (c as char).to_digit(16);
    match hex {
        [high, low] => Some((digit(*high)? * 16 + digit(*low)?) as u8),
        _ => None,
    }
}

/// The SentencePiece tables.
#[derive(Debug, Clone)]
pub(crate) struct SentencePieceModel {
    /// The pieces merges may form, by spelling: SentencePiece's normal,
    /// user-defined and unused pieces. Control, unknown and byte tokens are
    /// left out, as SentencePiece keeps them apart, so "<s>" typed as text
    /// never turns into BOS.
    pieces: FastMap<Box<[u8]>, u32>,
    /// Score of every token.
    scores: Vec<f32>,
    /// Which tokens are unused: formed by merges but then split back
    /// (SentencePiece's `IsUnused`).
    unused: Vec<bool>,
    /// Whether any token is unused (then merge history is recorded).
    any_unused: bool,
    /// The fallback token of each byte: `<0xAB>`, else the byte itself as a
    /// token, else the unknown token.
    byte_tokens: [u32; 256],
}

/// One symbol: a run of the escaped text.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    /// Length in bytes; 0 once merged into its left neighbour.
    length: usize,
    previous: usize,
    next: usize,
}

const NONE: usize = usize::MAX;

/// A candidate merge. The heap pops the highest score, then the leftmost.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    /// Combined length when queued; a different length now means it is stale.
    length: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl SentencePieceModel {
    /// Builds the tables. `ids` maps every spelling to its id.
    pub(crate) fn new(vocab: &Vocab, ids: &FastMap<&[u8], u32>) -> Result<Self> {
        if vocab.scores.len() != vocab.len() {
            return Err(Error::corrupt(format!("tokenizer: {} scores for {} tokens", vocab.scores.len(), vocab.len())));
        }
        let mut pieces = FastMap::default();
        for (id, (spelling, kind)) in vocab.tokens.iter().zip(&vocab.types).enumerate() {
            if matches!(kind, TokenType::Normal | TokenType::UserDefined | TokenType::Unused) {
                // A repeated spelling means its last id, as llama.cpp's table does.
                pieces.insert(spelling.clone().into_boxed_slice(), id as u32);
            }
        }
        let unused: Vec<bool> = vocab.types.iter().map(|kind| *kind == TokenType::Unused).collect();
        let any_unused = unused.contains(&true);

        let mut byte_tokens = [0u32; 256];
        for byte in 0..=255u8 {
            let hex = format!("<0x{byte:02X}>");
            let found = ids.get(hex.as_bytes()).or_else(|| ids.get(&[byte][..])).copied().or(vocab.unk_id);
            byte_tokens[byte as usize] = found.ok_or_else(|| {
                Error::unsupported(format!(
                    "tokenizer: SentencePiece vocabulary has no byte token {hex} and no unknown token to fall back on"
                ))
            })?;
        }
        Ok(Self { pieces, scores: vocab.scores.clone(), unused, any_unused, byte_tokens })
    }

    /// Appends the tokens of one text fragment, with a `▁` before it when `space_prefix`.
    pub(crate) fn encode(&self, text: &str, space_prefix: bool, out: &mut Vec<u32>) {
        // Escape spaces and cut the text into one symbol per character.
        let mut escaped = String::with_capacity(text.len() + 3 + text.len() / 2);
        let mut symbols = Vec::with_capacity(text.len() + 1);
        let prefix = if space_prefix { Some(' ') } else { None };
        for c in prefix.into_iter().chain(text.chars()) {
            let start = escaped.len();
            if c == ' ' {
                escaped.push_str(SPACE);
            } else {
                escaped.push(c);
            }
            let index = symbols.len();
            symbols.push(Symbol {
                start,
                length: escaped.len() - start,
                previous: index.wrapping_sub(1),
                next: index + 1,
            });
        }
        let Some(last) = symbols.last_mut() else {
            return;
        };
        last.next = NONE;
        let escaped = escaped.as_bytes();

        // Merge the best pair until none is left; queued pairs that have
        // changed since are skipped when they come up (lazy invalidation).
        let mut queue = BinaryHeap::with_capacity(symbols.len());
        for right in 1..symbols.len() {
            self.push_candidate(escaped, &symbols, &mut queue, right - 1, right);
        }
        // Which split made each merged symbol, (start, length) → left length;
        // only needed to split unused pieces back.
        let mut history: FastMap<(usize, usize), usize> = FastMap::default();
        while let Some(candidate) = queue.pop() {
            let (left, right) = (symbols[candidate.left], symbols[candidate.right]);
            if left.length == 0 || right.length == 0 || left.length + right.length != candidate.length {
                continue;
            }
            if self.any_unused {
                history.insert((left.start, candidate.length), left.length);
            }
            symbols[candidate.left].length = candidate.length;
            symbols[candidate.left].next = right.next;
            symbols[candidate.right].length = 0;
            if right.next != NONE {
                symbols[right.next].previous = candidate.left;
            }
            if left.previous != NONE {
                self.push_candidate(escaped, &symbols, &mut queue, left.previous, candidate.left);
            }
            if right.next != NONE {
                self.push_candidate(escaped, &symbols, &mut queue, candidate.left, right.next);
            }
        }

        // Emit each symbol: its piece, or its halves if the piece is unused,
        // or its bytes.
        let mut pending = Vec::new();
        for symbol in symbols.iter().filter(|symbol| symbol.length > 0) {
            pending.push((symbol.start, symbol.length));
            while let Some((start, length)) = pending.pop() {
                let text = &escaped[start..start + length];
                match self.pieces.get(text) {
                    Some(&id) if !self.unused[id as usize] => out.push(id),
                    _ => match history.get(&(start, length)) {
                        Some(&left_length) => {
                            pending.push((start + left_length, length - left_length));
                            pending.push((start, left_length));
                        }
                        None => out.extend(text.iter().map(|&byte| self.byte_tokens[byte as usize])),
                    },
                }
            }
        }
    }

    fn push_candidate(
        &self,
        escaped: &[u8],
        symbols: &[Symbol],
        queue: &mut BinaryHeap<Candidate>,
        left: usize,
        right: usize,
    ) {
        let length = symbols[left].length + symbols[right].length;
        let start = symbols[left].start;
        if let Some(&id) = self.pieces.get(&escaped[start..start + length]) {
            queue.push(Candidate { score: self.scores[id as usize], left, right, length });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_token_spellings() {
        assert_eq!(parse_byte_token(b"<0x0A>"), Some(0x0A));
        assert_eq!(parse_byte_token(b"<0xff>"), Some(0xFF));
        assert_eq!(parse_byte_token(b"<0x0>"), None);
        assert_eq!(parse_byte_token(b"<0x0AB>"), None);
        assert_eq!(parse_byte_token(b"<0x+A>"), None);
        assert_eq!(parse_byte_token(b"0x0A"), None);
    }
}
