//! GPT-2 byte-level BPE (SmolLM2, Llama-3): each byte of a word is spelled as
//! one character of GPT-2's byte-to-Unicode mapping, and adjacent tokens are
//! merged by rank, lowest first, as llama.cpp's `llm_tokenizer_bpe_session`
//! and Hugging Face's `BPE` model do.

use std::collections::BinaryHeap;

use super::fast_hash::FastMap;
use crate::vocab::{PreTokenizer, TokenType, Vocab};
use crate::{Error, Result};

/// Whether GPT-2's mapping keeps `byte` as the character of the same number.
const fn is_printable(byte: u8) -> bool {
    (byte >= b'!' && byte <= b'~') || (byte >= 0xA1 && byte <= 0xAC) || byte >= 0xAE
}

/// GPT-2's byte-to-Unicode mapping: printable Latin-1 bytes stand for
/// themselves, the other 68 are given U+0100 and up, in byte order.
const BYTE_TO_CHAR: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut shifted = 0;
    let mut byte = 0;
    while byte < 256 {
        table[byte] = if is_printable(byte as u8) {
            byte as u8 as char
        } else {
            shifted += 1;
            match char::from_u32(255 + shifted) {
                Some(c) => c,
                None => '\0',
            }
        };
        byte += 1;
    }
    table
};

/// Number of bytes GPT-2's mapping moves to U+0100 and up.
const SHIFTED_COUNT: usize = 68;

/// The inverse of [`BYTE_TO_CHAR`] for U+0100 and up.
const SHIFTED_TO_BYTE: [u8; SHIFTED_COUNT] = {
    let mut table = [0u8; SHIFTED_COUNT];
    let mut next = 0;
    let mut byte = 0;
    while byte < 256 {
        if !is_printable(byte as u8) {
            table[next] = byte as u8;
            next += 1;
        }
        byte += 1;
    }
    table
};

/// The character GPT-2's mapping spells `byte` with.
pub(crate) fn byte_to_char(byte: u8) -> char {
    BYTE_TO_CHAR[byte as usize]
}

/// The byte a character of GPT-2's mapping stands for, if it is one.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let code = c as u32;
    if code < 256 && is_printable(code as u8) {
        return Some(code as u8);
    }
    SHIFTED_TO_BYTE.get(code.checked_sub(256)? as usize).copied()
}

/// The bytes a byte-level token's spelling stands for. Characters outside
/// GPT-2's mapping are kept as their own UTF-8 (llama.cpp prints an error
/// marker instead; the text itself is more useful).
pub(crate) fn decode_spelling(spelling: &[u8], out: &mut Vec<u8>) {
    for chunk in spelling.utf8_chunks() {
        for c in chunk.valid().chars() {
            match char_to_byte(c) {
                Some(byte) => out.push(byte),
                None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        out.extend_from_slice(chunk.invalid());
    }
}

/// A merge rule's key: the left and right token ids.
fn pair_key(left: u32, right: u32) -> u64 {
    (left as u64) << 32 | right as u64
}

/// What a merge makes.
#[derive(Debug, Clone, Copy)]
struct Merge {
    rank: u32,
    merged: u32,
}

/// The byte-level BPE tables.
#[derive(Debug, Clone)]
pub(crate) struct ByteLevelModel {
    /// The token of each byte's GPT-2 character, or the unknown token (or
    /// [`NO_TOKEN`] when the unknown token is a control token).
    byte_tokens: [u32; 256],
    /// `(left, right)` → rank and merged token.
    merges: FastMap<u64, Merge>,
    /// Words that are tokens whole, by the bytes they stand for; only for
    /// Llama-3, whose tokenizer skips the merges for them (`ignore_merges`).
    whole_words: Option<FastMap<Box<[u8]>, u32>>,
}

/// One symbol of a word during BPE.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    token: u32,
    /// Index of the next live symbol, or `usize::MAX`.
    next: usize,
    /// Index of the previous live symbol, or `usize::MAX`.
    previous: usize,
    live: bool,
}

/// A candidate merge of the symbols at `left` and `right`. The heap pops the
/// lowest rank, then the leftmost, as llama.cpp's and Hugging Face's queues do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate {
    rank: u32,
    left: usize,
    right: usize,
    left_token: u32,
    right_token: u32,
    merged: u32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.rank, other.left).cmp(&(self.rank, self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Buffers reused from word to word.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Candidate>,
}

const NONE: usize = usize::MAX;

/// In `byte_tokens`: the byte has no token of its own and is dropped.
const NO_TOKEN: u32 = u32::MAX;

impl ByteLevelModel {
    /// Builds the tables. `ids` maps every spelling to its id.
    pub(crate) fn new(vocab: &Vocab, ids: &FastMap<&[u8], u32>, decoded: impl Fn(u32) -> Vec<u8>) -> Result<Self> {
        let mut byte_tokens = [0u32; 256];
        for byte in 0..=255u8 {
            let spelling = byte_to_char(byte).to_string();
            byte_tokens[byte as usize] = match (ids.get(spelling.as_bytes()), vocab.unk_id) {
                (Some(&id), _) => id,
                // SmolLM2's unknown token is `<|endoftext|>`, a control token:
                // plain text must never produce one, so such a byte is dropped.
                (None, Some(id)) if vocab.types.get(id as usize) == Some(&TokenType::Control) => NO_TOKEN,
                (None, Some(id)) => id,
                (None, None) => {
                    return Err(Error::unsupported(format!(
                        "tokenizer: byte-level vocabulary has no token for byte 0x{byte:02X} ({spelling:?}) and no unknown token"
                    )))
                }
            };
        }

        let mut merges = FastMap::default();
        merges.reserve(vocab.merges.len());
        let mut spelling = Vec::new();
        for (rank, &(left, right)) in vocab.merges.iter().enumerate() {
            let text = |id: u32| vocab.tokens.get(id as usize);
            let (Some(left_text), Some(right_text)) = (text(left), text(right)) else {
                return Err(Error::corrupt(format!(
                    "tokenizer: merge {rank} ({left}, {right}) names a token past the vocabulary's {} tokens",
                    vocab.len()
                )));
            };
            spelling.clear();
            spelling.extend_from_slice(left_text);
            spelling.extend_from_slice(right_text);
            let Some(&merged) = ids.get(spelling.as_slice()) else {
                return Err(Error::corrupt(format!(
                    "tokenizer: merge {rank} makes {:?}, which is not in the vocabulary",
                    String::from_utf8_lossy(&spelling)
                )));
            };
            // A repeated pair keeps its first (lowest) rank, as llama.cpp's table does.
            merges.entry(pair_key(left, right)).or_insert(Merge { rank: rank as u32, merged });
        }

        let whole_words = (vocab.pre_tokenizer == PreTokenizer::Llama3).then(|| {
            let mut words = FastMap::default();
            for (id, kind) in vocab.types.iter().enumerate() {
                if *kind == TokenType::Normal {
                    words.insert(decoded(id as u32).into_boxed_slice(), id as u32);
                }
            }
            words
        });

        Ok(Self { byte_tokens, merges, whole_words })
    }

    /// Appends the tokens of one pre-tokenized word.
    pub(crate) fn encode_word(&self, word: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        if let Some(&id) = self.whole_words.as_ref().and_then(|words| words.get(word)) {
            out.push(id);
            return;
        }
        if let [byte] = word {
            if self.byte_tokens[*byte as usize] != NO_TOKEN {
                out.push(self.byte_tokens[*byte as usize]);
            }
            return;
        }
        let Scratch { symbols, queue } = scratch;
        symbols.clear();
        queue.clear();
        let kept = word.iter().filter(|&&byte| self.byte_tokens[byte as usize] != NO_TOKEN).count();
        for &byte in word {
            let token = self.byte_tokens[byte as usize];
            if token == NO_TOKEN {
                continue;
            }
            let index = symbols.len();
            symbols.push(Symbol {
                token,
                previous: if index == 0 { NONE } else { index - 1 },
                next: if index + 1 == kept { NONE } else { index + 1 },
                live: true,
            });
        }
        for left in 1..symbols.len() {
            self.push_candidate(symbols, queue, left - 1, left);
        }
        while let Some(candidate) = queue.pop() {
            let (left, right) = (symbols[candidate.left], symbols[candidate.right]);
            // A candidate goes stale when either side has merged since it was queued.
            if !left.live
                || !right.live
                || left.next != candidate.right
                || left.token != candidate.left_token
                || right.token != candidate.right_token
            {
                continue;
            }
            symbols[candidate.left].token = candidate.merged;
            symbols[candidate.left].next = right.next;
            symbols[candidate.right].live = false;
            if right.next != NONE {
                symbols[right.next].previous = candidate.left;
            }
            if left.previous != NONE {
                self.push_candidate(symbols, queue, left.previous, candidate.left);
            }
            if right.next != NONE {
                self.push_candidate(symbols, queue, candidate.left, right.next);
            }
        }
        out.extend(symbols.iter().filter(|symbol| symbol.live).map(|symbol| symbol.token));
    }

    fn push_candidate(&self, symbols: &[Symbol], queue: &mut BinaryHeap<Candidate>, left: usize, right: usize) {
        let (left_token, right_token) = (symbols[left].token, symbols[right].token);
        if let Some(merge) = self.merges.get(&pair_key(left_token, right_token)) {
            queue.push(Candidate { rank: merge.rank, left, right, left_token, right_token, merged: merge.merged });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_matches_gpt2() {
        assert_eq!(byte_to_char(b'A'), 'A');
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(0), 'Ā');
        assert_eq!(byte_to_char(0xAD), '\u{0143}');
        assert_eq!(byte_to_char(0x7F), 'ġ');
    }

    #[test]
    fn mapping_is_a_bijection() {
        let mut seen = std::collections::HashSet::new();
        for byte in 0..=255u8 {
            let c = byte_to_char(byte);
            assert!(seen.insert(c), "{c:?} twice");
            assert_eq!(char_to_byte(c), Some(byte));
        }
        assert_eq!(char_to_byte('\u{0144}'), None);
        assert_eq!(char_to_byte('中'), None);
        assert_eq!(char_to_byte(' '), None);
    }

    #[test]
    fn decode_spelling_maps_back_and_keeps_foreign_characters() {
        let mut out = Vec::new();
        decode_spelling("ĠhelloĊ".as_bytes(), &mut out);
        assert_eq!(out, b" hello\n");
        out.clear();
        decode_spelling("Ġ中".as_bytes(), &mut out);
        assert_eq!(out, " 中".as_bytes());
    }
}
