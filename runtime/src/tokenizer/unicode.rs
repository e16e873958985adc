//! Character classes as the pre-tokenizer regexes see them: `\p{L}`, `\p{N}`
//! and `\s`.
//!
//! `\p{L}` and `\p{N}` are Unicode general categories (L* and N*), taken from
//! `unicode-general-category`; `char::is_alphabetic` would be wrong here, as it
//! also counts letter numbers and the vowel signs of Indic scripts. `\s` is the
//! White_Space property, which is what both Oniguruma (behind Hugging Face
//! `tokenizers`) and llama.cpp's tables use, and what `char::is_whitespace` gives.

use unicode_general_category::{get_general_category, GeneralCategory};

/// The class of one character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CharClass {
    /// `\p{L}`.
    Letter,
    /// `\p{N}`.
    Number,
    /// `\s`.
    Whitespace,
    /// Anything else: punctuation, symbols, marks, controls, unassigned.
    Other,
}

/// The class of `c`.
pub(crate) fn classify(c: char) -> CharClass {
    // ASCII is most text; answer it without the table.
    if c.is_ascii() {
        return match c {
            'a'..='z' | 'A'..='Z' => CharClass::Letter,
            '0'..='9' => CharClass::Number,
            ' ' | '\t' | '\n' | '\u{0B}' | '\u{0C}' | '\r' => CharClass::Whitespace,
            _ => CharClass::Other,
        };
    }
    match get_general_category(c) {
        GeneralCategory::UppercaseLetter
        | GeneralCategory::LowercaseLetter
        | GeneralCategory::TitlecaseLetter
        | GeneralCategory::ModifierLetter
        | GeneralCategory::OtherLetter => CharClass::Letter,
        GeneralCategory::DecimalNumber | GeneralCategory::LetterNumber | GeneralCategory::OtherNumber => {
            CharClass::Number
        }
        _ if c.is_whitespace() => CharClass::Whitespace,
        _ => CharClass::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_across_scripts() {
        for c in ['a', 'Z', 'é', 'ß', 'Ж', 'λ', 'ع', 'क', '中', 'カ', '한', 'ǅ', 'ʰ'] {
            assert_eq!(classify(c), CharClass::Letter, "{c:?}");
        }
    }

    #[test]
    fn marks_are_not_letters() {
        // Devanagari vowel sign AA and a combining acute: Alphabetic / marks, not \p{L}.
        assert!('\u{093E}'.is_alphabetic());
        assert_eq!(classify('\u{093E}'), CharClass::Other);
        assert_eq!(classify('\u{0301}'), CharClass::Other);
    }

    #[test]
    fn numbers_include_other_scripts_and_fractions() {
        for c in ['0', '٣', '५', '½', 'Ⅻ', '²', '〇'] {
            assert_eq!(classify(c), CharClass::Number, "{c:?}");
        }
    }

    #[test]
    fn whitespace_is_the_white_space_property() {
        for c in [' ', '\t', '\n', '\r', '\u{0B}', '\u{0C}', '\u{85}', '\u{A0}', '\u{2028}', '\u{3000}'] {
            assert_eq!(classify(c), CharClass::Whitespace, "{c:?}");
        }
        // Information separators are \s in Python but not in Oniguruma or llama.cpp.
        assert_eq!(classify('\u{1C}'), CharClass::Other);
        assert_eq!(classify('\u{200D}'), CharClass::Other);
    }

    #[test]
    fn ascii_fast_path_agrees_with_the_table() {
        for byte in 0..128u8 {
            let c = byte as char;
            let table = match get_general_category(c) {
                GeneralCategory::UppercaseLetter | GeneralCategory::LowercaseLetter => CharClass::Letter,
                GeneralCategory::DecimalNumber => CharClass::Number,
                _ if c.is_whitespace() => CharClass::Whitespace,
                _ => CharClass::Other,
            };
            assert_eq!(classify(c), table, "{c:?}");
        }
    }
}
