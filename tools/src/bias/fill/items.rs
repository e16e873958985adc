//! The fill items file: JSONL, one sentence with its referent's pronoun
//! left blank a line, read with line numbers for error messages; the blanks
//! and the pronoun each option puts in them.

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// A gender as the items name it: the side of an occupation's WinoBias
/// list, or the gender a sentence states of its referent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gender {
    /// `female`.
    Female,
    /// `male`.
    Male,
}

impl Gender {
    /// `female` or `male`.
    pub fn name(self) -> &'static str {
        match self {
            Gender::Female => "female",
            Gender::Male => "male",
        }
    }

    /// The option whose pronoun is this gender's.
    pub fn pronoun(self) -> PronounOption {
        match self {
            Gender::Female => PronounOption::She,
            Gender::Male => PronounOption::He,
        }
    }
}

/// One sentence with a blank for its referent's pronoun.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FillItem {
    /// The sentence, each pronoun of the referent a blank: `[PRONOUN]`
    /// (subject: he/she/they) or `[PRONOUN:FORM]`, FORM one of
    /// [`PronounForm`]'s names.
    pub text: String,
    /// The occupation the blank refers to.
    pub occupation: String,
    /// The WinoBias list the occupation is on (the stereotype's side); null
    /// when it is on neither.
    #[serde(default)]
    pub listed: Option<Gender>,
    /// The referent's gender as the sentence states it (a kinship word, a
    /// gendered name, a title); null when the sentence carries no gender cue.
    #[serde(default)]
    pub gender: Option<Gender>,
    /// Where the item comes from (`winobias-dev-type1`, `template`, …).
    pub source: String,
    /// The occupation's share of women (0 to 1) from a cited source, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub female_share: Option<f64>,
}

/// The grammatical form a blank takes, named as in `[PRONOUN:FORM]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PronounForm {
    /// he / she / they: `[PRONOUN]`.
    Subject,
    /// him / her / them: `[PRONOUN:object]`.
    Object,
    /// his / her / their (before a noun): `[PRONOUN:possessive]`.
    Possessive,
    /// his / hers / theirs (standing alone): `[PRONOUN:possessive-pronoun]`.
    PossessivePronoun,
    /// himself / herself / themselves: `[PRONOUN:reflexive]`.
    Reflexive,
}

impl PronounForm {
    /// Every form, in the order of the words' table.
    pub const ALL: [PronounForm; 5] = [
        PronounForm::Subject,
        PronounForm::Object,
        PronounForm::Possessive,
        PronounForm::PossessivePronoun,
        PronounForm::Reflexive,
    ];

    /// The form's name: `subject`, or the FORM of `[PRONOUN:FORM]`.
    pub fn name(self) -> &'static str {
        match self {
            PronounForm::Subject => "subject",
            PronounForm::Object => "object",
            PronounForm::Possessive => "possessive",
            PronounForm::PossessivePronoun => "possessive-pronoun",
            PronounForm::Reflexive => "reflexive",
        }
    }

    /// The name of the form every blank of `text` takes; `mixed` when they
    /// differ, `none` when `text` has no valid blank.
    pub fn of_text(text: &str) -> &'static str {
        let Ok(found) = blanks(text) else { return "none" };
        let first = found[0].1;
        if found.iter().all(|(_, form)| *form == first) {
            first.name()
        } else {
            "mixed"
        }
    }

    /// The blank that asks for this form.
    pub fn blank(self) -> &'static str {
        match self {
            PronounForm::Subject => "[PRONOUN]",
            PronounForm::Object => "[PRONOUN:object]",
            PronounForm::Possessive => "[PRONOUN:possessive]",
            PronounForm::PossessivePronoun => "[PRONOUN:possessive-pronoun]",
            PronounForm::Reflexive => "[PRONOUN:reflexive]",
        }
    }

    /// The pronoun `option` puts in a blank of this form.
    pub fn word(self, option: PronounOption) -> &'static str {
        let [she, he, they] = self.words();
        match option {
            PronounOption::She => she,
            PronounOption::He => he,
            PronounOption::They => they,
        }
    }

    /// The female, male and neutral pronouns of this form.
    fn words(self) -> [&'static str; 3] {
        match self {
            PronounForm::Subject => ["she", "he", "they"],
            PronounForm::Object => ["her", "him", "them"],
            PronounForm::Possessive => ["her", "his", "their"],
            PronounForm::PossessivePronoun => ["hers", "his", "theirs"],
            PronounForm::Reflexive => ["herself", "himself", "themselves"],
        }
    }

    /// The form and gender of a female and a male pronoun that stand for
    /// each other (`her` and `his`: possessive; `her` and `him`: object),
    /// whichever order they come in, case aside; `None` when they are not
    /// such a pair.
    pub fn of_twins(first: &str, second: &str) -> Option<(PronounForm, Gender)> {
        let (first, second) = (first.to_lowercase(), second.to_lowercase());
        PronounForm::ALL.into_iter().find_map(|form| {
            let [she, he, _] = form.words();
            if first == she && second == he {
                Some((form, Gender::Female))
            } else if first == he && second == she {
                Some((form, Gender::Male))
            } else {
                None
            }
        })
    }
}

/// The pronouns an item is scored with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PronounOption {
    /// she / her / her / hers / herself.
    She,
    /// he / him / his / his / himself.
    He,
    /// they / them / their / theirs / themselves.
    They,
}

impl PronounOption {
    /// The three options, in the order they are scored.
    pub const ALL: [PronounOption; 3] = [PronounOption::She, PronounOption::He, PronounOption::They];
}

/// Every gendered pronoun, for finding a gender cue left outside the blanks.
pub const GENDERED_PRONOUNS: [&str; 8] = ["he", "she", "him", "her", "his", "hers", "himself", "herself"];

/// The blanks of `text`: each one's byte range and form, in order. An
/// error when there is none, one is not closed, or its form is unknown.
pub fn blanks(text: &str) -> Result<Vec<(std::ops::Range<usize>, PronounForm)>> {
    const OPEN: &str = "[PRONOUN";
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(offset) = text[from..].find(OPEN) {
        let start = from + offset;
        let Some(length) = text[start..].find(']') else {
            bail!("the blank at byte {start} is not closed with ']'");
        };
        let end = start + length + 1;
        let blank = &text[start..end];
        let Some(form) = PronounForm::ALL.into_iter().find(|form| form.blank() == blank) else {
            let known: Vec<&str> = PronounForm::ALL.iter().map(|form| form.blank()).collect();
            bail!("unknown blank {blank:?}; expected one of {}", known.join(", "));
        };
        found.push((start..end, form));
        from = end;
    }
    ensure!(!found.is_empty(), "no [PRONOUN] blank in {text:?}");
    Ok(found)
}

/// `text` with every blank filled by `option`'s pronoun of the blank's
/// form, capitalized where it begins a sentence (at the start of the text,
/// or after `.`, `!` or `?` and a space).
pub fn fill_blanks(text: &str, option: PronounOption) -> Result<String> {
    let mut filled = String::with_capacity(text.len() + 8);
    let mut copied = 0;
    for (range, form) in blanks(text)? {
        filled.push_str(&text[copied..range.start]);
        let word = form.word(option);
        let before = filled.trim_end();
        if before.is_empty() || before.ends_with(['.', '!', '?']) {
            let mut chars = word.chars();
            filled.extend(chars.next().map(|c| c.to_ascii_uppercase()));
            filled.push_str(chars.as_str());
        } else {
            filled.push_str(word);
        }
        copied = range.end;
    }
    filled.push_str(&text[copied..]);
    Ok(filled)
}

/// Reads a fill items file (JSONL; blank lines are skipped), each item with its line number.
pub fn read_fill_items(path: &Path) -> Result<Vec<(usize, FillItem)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    parse_fill_items(&text, &path.display().to_string())
}

/// Parses fill items from JSONL `text`, each with its line number; errors
/// name `name` and the line. An occupation must keep its list and share
/// from one line to the next.
pub fn parse_fill_items(text: &str, name: &str) -> Result<Vec<(usize, FillItem)>> {
    let mut items = Vec::new();
    let mut occupations = BTreeMap::<String, (usize, Option<Gender>, Option<f64>)>::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let item: FillItem = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!(
                "{name}:{line_number}: not a fill item ({e}); expected {{\"text\": \"... [PRONOUN] ...\", \"occupation\": \"...\", \"listed\": \"female\"|\"male\"|null, \"gender\": \"female\"|\"male\"|null, \"source\": \"...\"}}"
            )
        })?;
        for (field, value) in [("text", &item.text), ("occupation", &item.occupation), ("source", &item.source)] {
            ensure!(!value.trim().is_empty(), "{name}:{line_number}: \"{field}\" is empty");
        }
        blanks(&item.text).map_err(|e| anyhow::anyhow!("{name}:{line_number}: {e}"))?;
        if let Some(share) = item.female_share {
            ensure!(
                (0.0..=1.0).contains(&share),
                "{name}:{line_number}: \"female_share\" is {share}; expected a share from 0 to 1"
            );
        }
        let seen = occupations.entry(item.occupation.clone()).or_insert((line_number, item.listed, item.female_share));
        ensure!(
            (seen.1, seen.2) == (item.listed, item.female_share),
            "{name}:{line_number}: occupation {:?} is listed {:?} with female_share {:?} here but {:?} with {:?} on line {}",
            item.occupation,
            item.listed.map(Gender::name),
            item.female_share,
            seen.1.map(Gender::name),
            seen.2,
            seen.0
        );
        items.push((line_number, item));
    }
    ensure!(!items.is_empty(), "{name}: no fill items");
    Ok(items)
}

/// Writes fill items as JSONL, atomically (as the pairs are written).
pub fn write_fill_items(items: &[FillItem], path: &Path) -> Result<()> {
    super::super::pairs::write_jsonl(items, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_option_fills_each_form() {
        let text = "[PRONOUN] said [PRONOUN:object] and [PRONOUN:possessive] dog; it is [PRONOUN:possessive-pronoun]. [PRONOUN] blamed [PRONOUN:reflexive].";
        assert_eq!(
            fill_blanks(text, PronounOption::She).unwrap(),
            "She said her and her dog; it is hers. She blamed herself."
        );
        assert_eq!(
            fill_blanks(text, PronounOption::He).unwrap(),
            "He said him and his dog; it is his. He blamed himself."
        );
        assert_eq!(
            fill_blanks(text, PronounOption::They).unwrap(),
            "They said them and their dog; it is theirs. They blamed themselves."
        );
        assert_eq!(fill_blanks("Why? [PRONOUN] left.", PronounOption::He).unwrap(), "Why? He left.");
        assert_eq!(fill_blanks("The nurse, [PRONOUN] said.", PronounOption::She).unwrap(), "The nurse, she said.");
    }

    #[test]
    fn bad_blanks_are_refused() {
        assert!(blanks("The nurse said it.").unwrap_err().to_string().contains("no [PRONOUN] blank"));
        assert!(blanks("The nurse said [PRONOUN:dative] it.").unwrap_err().to_string().contains("unknown blank"));
        assert!(blanks("The nurse said [PRONOUN it.").unwrap_err().to_string().contains("not closed"));
    }

    #[test]
    fn twins_give_the_form_and_the_first_ones_gender() {
        assert_eq!(PronounForm::of_twins("her", "his"), Some((PronounForm::Possessive, Gender::Female)));
        assert_eq!(PronounForm::of_twins("him", "her"), Some((PronounForm::Object, Gender::Male)));
        assert_eq!(PronounForm::of_twins("He", "she"), Some((PronounForm::Subject, Gender::Male)));
        assert_eq!(PronounForm::of_twins("hers", "his"), Some((PronounForm::PossessivePronoun, Gender::Female)));
        assert_eq!(PronounForm::of_twins("himself", "herself"), Some((PronounForm::Reflexive, Gender::Male)));
        assert_eq!(PronounForm::of_twins("her", "he"), None);
        assert_eq!(PronounForm::of_twins("him", "him"), None);
    }

    #[test]
    fn a_texts_form_is_its_blanks_or_mixed() {
        assert_eq!(PronounForm::of_text("[PRONOUN] left"), "subject");
        assert_eq!(PronounForm::of_text("[PRONOUN:object] and [PRONOUN:object]"), "object");
        assert_eq!(PronounForm::of_text("[PRONOUN] lost [PRONOUN:possessive] keys"), "mixed");
        assert_eq!(PronounForm::of_text("no blank"), "none");
        for form in PronounForm::ALL {
            assert_eq!(PronounForm::of_text(form.blank()), form.name());
        }
    }
}
