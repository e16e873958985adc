//! Splitting text into words before byte-level BPE, by hand-written matchers
//! that give the same words as the pre-tokenizer regexes (the approach of
//! llama.cpp's `unicode.cpp`; no regex engine with lookaround in the runtime).
//!
//! Each matcher walks the characters once. Where a regex tries its
//! alternatives in order at a position, the matcher tests the same conditions
//! in the same order, so the leftmost-first semantics carry over. The end of
//! the text, or of the piece being split, counts as "not `\S`" for the
//! lookahead in `\s+(?!\S)`.

use std::ops::Range;

use super::unicode::{classify, CharClass};
use crate::vocab::PreTokenizer;

/// One character of the text with its byte offset and class.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Char {
    offset: usize,
    value: char,
    class: CharClass,
}

/// Splits `text` into words by `pre_tokenizer`, appending their byte ranges
/// to `words`. `chars` is scratch space, kept by the caller to save allocations.
pub(crate) fn split_words(
    pre_tokenizer: PreTokenizer,
    text: &str,
    chars: &mut Vec<Char>,
    words: &mut Vec<Range<usize>>,
) {
    if text.is_empty() {
        return;
    }
    chars.clear();
    chars.extend(text.char_indices().map(|(offset, value)| Char { offset, value, class: classify(value) }));
    // Word ends as character indices into `chars`.
    let mut ends = Vec::with_capacity(chars.len() / 3 + 1);
    match pre_tokenizer {
        PreTokenizer::None => ends.push(chars.len()),
        PreTokenizer::Gpt2 => split_gpt2(chars, 0, &mut ends),
        PreTokenizer::SmolLm => split_smollm(chars, &mut ends),
        PreTokenizer::Llama3 => split_llama3(chars, 0, 3, &mut ends),
        PreTokenizer::Qwen2 => split_llama3(chars, 0, 1, &mut ends),
    }
    let byte_offset = |index: usize| chars.get(index).map_or(text.len(), |c| c.offset);
    let mut start = 0;
    for end in ends {
        words.push(byte_offset(start)..byte_offset(end));
        start = end;
    }
}

/// The length of a contraction (`'s 't 're 've 'm 'll 'd`) at `position`, or 0.
fn contraction_length(chars: &[Char], position: usize, ignore_case: bool) -> usize {
    if chars[position].value != '\'' {
        return 0;
    }
    let letter =
        |index: usize| chars.get(index).map(|c| if ignore_case { c.value.to_ascii_lowercase() } else { c.value });
    match (letter(position + 1), letter(position + 2)) {
        (Some('s' | 't' | 'm' | 'd'), _) => 2,
        (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => 3,
        _ => 0,
    }
}

/// The end of the run of characters of `class` starting at `start`.
fn run_end(chars: &[Char], start: usize, class: CharClass) -> usize {
    let mut end = start;
    while end < chars.len() && chars[end].class == class {
        end += 1;
    }
    end
}

/// Where `\s+(?!\S)|\s+` ends when matched at `position` (a whitespace character):
/// a run that is followed by a non-space character gives that character's
/// neighbour to the next word (so " world" keeps its space), unless the run is
/// one character long.
fn whitespace_end(chars: &[Char], position: usize) -> usize {
    let end = run_end(chars, position, CharClass::Whitespace).max(position + 1);
    if end - position > 1 && end < chars.len() {
        end - 1
    } else {
        end
    }
}

/// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// over `chars` (a whole piece; its end is the end of the text), pushing word
/// ends offset by `base`.
fn split_gpt2(chars: &[Char], base: usize, ends: &mut Vec<usize>) {
    let mut position = 0;
    while position < chars.len() {
        let contraction = contraction_length(chars, position, false);
        if contraction > 0 {
            position += contraction;
            ends.push(base + position);
            continue;
        }
        // ` ?X+`: an optional space, then a run of letters, numbers or other symbols.
        let (run_start, run_class) = if chars[position].value == ' ' {
            (position + 1, chars.get(position + 1).map(|c| c.class))
        } else {
            (position, Some(chars[position].class))
        };
        position = match run_class {
            Some(class @ (CharClass::Letter | CharClass::Number | CharClass::Other)) => {
                run_end(chars, run_start, class)
            }
            // Only whitespace can start here: a lone space at the end, or a whitespace run.
            _ => whitespace_end(chars, position),
        };
        ends.push(base + position);
    }
}

/// SmolLM / StarCoder: every `\p{N}` character is a word of its own, and the
/// text between them is split by GPT-2's regex (Hugging Face's
/// `Sequence[Digits(individual_digits=true), ByteLevel(use_regex=true)]`).
fn split_smollm(chars: &[Char], ends: &mut Vec<usize>) {
    let mut start = 0;
    for index in 0..chars.len() {
        if chars[index].class == CharClass::Number {
            if start < index {
                split_gpt2(&chars[start..index], start, ends);
            }
            ends.push(index + 1);
            start = index + 1;
        }
    }
    if start < chars.len() {
        split_gpt2(&chars[start..], start, ends);
    }
}

/// Llama-3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
/// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`, with numbers in runs
/// of up to `max_digits` (3; Qwen2's regex is the same with `\p{N}`: 1).
fn split_llama3(chars: &[Char], base: usize, max_digits: usize, ends: &mut Vec<usize>) {
    let is_newline = |c: char| c == '\r' || c == '\n';
    let mut position = 0;
    while position < chars.len() {
        let Char { value, class, .. } = chars[position];
        let contraction = contraction_length(chars, position, true);
        if contraction > 0 {
            position += contraction;
        } else if !is_newline(value)
            && class != CharClass::Number
            && (class == CharClass::Letter || chars.get(position + 1).is_some_and(|c| c.class == CharClass::Letter))
        {
            // `[^\r\n\p{L}\p{N}]?\p{L}+`: one leading non-letter (a space, a tab,
            // punctuation), then the letters.
            position = run_end(chars, position + 1, CharClass::Letter);
        } else if class == CharClass::Number {
            // `\p{N}{1,3}`: the next run of at most three; the loop takes the rest.
            position = run_end(chars, position, CharClass::Number).min(position + max_digits);
        } else {
            let (run_start, run_class) = if value == ' ' {
                (position + 1, chars.get(position + 1).map(|c| c.class))
            } else {
                (position, Some(class))
            };
            if run_class == Some(CharClass::Other) {
                // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
                position = run_end(chars, run_start, CharClass::Other);
                while position < chars.len() && is_newline(chars[position].value) {
                    position += 1;
                }
            } else {
                // A whitespace run: `\s*[\r\n]+` takes it up to its last line
                // break; without one, `\s+(?!\S)|\s+`.
                let run = run_end(chars, position, CharClass::Whitespace);
                match (position..run).rev().find(|&index| is_newline(chars[index].value)) {
                    Some(last_newline) => position = last_newline + 1,
                    None => position = whitespace_end(chars, position),
                }
            }
        }
        ends.push(base + position);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre_tokenizer: PreTokenizer, text: &str) -> Vec<&str> {
        let mut ranges = Vec::new();
        split_words(pre_tokenizer, text, &mut Vec::new(), &mut ranges);
        ranges.into_iter().map(|range| &text[range]).collect()
    }

    #[test]
    fn gpt2_words_keep_their_leading_space() {
        assert_eq!(words(PreTokenizer::Gpt2, "Hello world"), ["Hello", " world"]);
        assert_eq!(words(PreTokenizer::Gpt2, "Hello, world!"), ["Hello", ",", " world", "!"]);
    }

    #[test]
    fn gpt2_contractions_are_lower_case_only() {
        assert_eq!(words(PreTokenizer::Gpt2, "I've it's"), ["I", "'ve", " it", "'s"]);
        assert_eq!(words(PreTokenizer::Gpt2, "I'VE"), ["I", "'", "VE"]);
        assert_eq!(words(PreTokenizer::Gpt2, "x'"), ["x", "'"]);
    }

    #[test]
    fn gpt2_whitespace_run_gives_its_last_space_to_the_next_word() {
        assert_eq!(words(PreTokenizer::Gpt2, "a   b"), ["a", "  ", " b"]);
        assert_eq!(words(PreTokenizer::Gpt2, "a\tb"), ["a", "\t", "b"]);
        assert_eq!(words(PreTokenizer::Gpt2, "a \n\nb"), ["a", " \n", "\n", "b"]);
        // At the end of the text the whole run is one word.
        assert_eq!(words(PreTokenizer::Gpt2, "a   "), ["a", "   "]);
        assert_eq!(words(PreTokenizer::Gpt2, " "), [" "]);
        assert_eq!(words(PreTokenizer::Gpt2, "  x"), [" ", " x"]);
    }

    #[test]
    fn gpt2_numbers_and_symbols() {
        assert_eq!(words(PreTokenizer::Gpt2, "in 2024, x+=1;"), ["in", " 2024", ",", " x", "+=", "1", ";"]);
        assert_eq!(words(PreTokenizer::Gpt2, "½ Ⅻ"), ["½", " Ⅻ"]);
    }

    #[test]
    fn gpt2_letters_across_scripts_and_marks() {
        assert_eq!(words(PreTokenizer::Gpt2, "Привет мир"), ["Привет", " мир"]);
        // A Devanagari vowel sign is a mark, not a letter, so it breaks the word.
        assert_eq!(words(PreTokenizer::Gpt2, "नमस्ते"), ["नमस", "्", "त", "े"]);
    }

    #[test]
    fn smollm_splits_every_digit() {
        assert_eq!(words(PreTokenizer::SmolLm, "in 2024!"), ["in", " ", "2", "0", "2", "4", "!"]);
        assert_eq!(words(PreTokenizer::SmolLm, "a1b"), ["a", "1", "b"]);
        // The space before a digit ends its piece, so it stands alone.
        assert_eq!(words(PreTokenizer::SmolLm, "x  7"), ["x", "  ", "7"]);
    }

    #[test]
    fn llama3_numbers_in_threes_and_case_insensitive_contractions() {
        assert_eq!(words(PreTokenizer::Llama3, "1234567"), ["123", "456", "7"]);
        assert_eq!(words(PreTokenizer::Llama3, "I'VE"), ["I", "'VE"]);
        assert_eq!(words(PreTokenizer::Llama3, "(hello) world"), ["(hello", ")", " world"]);
    }

    #[test]
    fn qwen2_is_llama3_with_single_digits() {
        assert_eq!(words(PreTokenizer::Qwen2, "x 2024's"), ["x", " ", "2", "0", "2", "4", "'s"]);
        assert_eq!(words(PreTokenizer::Qwen2, "I'VE (hi)\n\n"), ["I", "'VE", " (", "hi", ")\n\n"]);
    }

    #[test]
    fn llama3_newlines() {
        assert_eq!(words(PreTokenizer::Llama3, "a\n\n  b"), ["a", "\n\n", " ", " b"]);
        assert_eq!(words(PreTokenizer::Llama3, "x;\n\ny"), ["x", ";\n\n", "y"]);
        assert_eq!(words(PreTokenizer::Llama3, "\tword"), ["\tword"]);
        assert_eq!(words(PreTokenizer::Llama3, "a  \n"), ["a", "  \n"]);
    }

    #[test]
    fn words_cover_the_text() {
        let text = "  Hello,\tworld!! 12345 ünïcödé 中文 🙂🙂 it's\r\n\n  end  ";
        for pre_tokenizer in
            [PreTokenizer::None, PreTokenizer::Gpt2, PreTokenizer::SmolLm, PreTokenizer::Llama3, PreTokenizer::Qwen2]
        {
            let pieces = words(pre_tokenizer, text);
            assert!(pieces.iter().all(|piece| !piece.is_empty()), "{pre_tokenizer:?}");
            assert_eq!(pieces.concat(), text, "{pre_tokenizer:?}");
        }
    }
}
