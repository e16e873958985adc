//! Converters from the public bias datasets (WinoBias, CrowS-Pairs,
//! StereoSet) into pairs, for `bramble bias-data`.

use super::pairs::Pair;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

/// WinoBias's two kinds of sentence: resolved by world knowledge (`type1`) or by syntax (`type2`).
pub(super) const WINOBIAS_TYPES: [&str; 2] = ["type1", "type2"];

/// A public dataset `bramble bias-data` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataset {
    /// WinoBias: `pro_stereotyped_type{1,2}.txt.{dev,test}` and their `anti_` twins, line by line.
    WinoBias,
    /// CrowS-Pairs: `crows_pairs_anonymized.csv`.
    CrowsPairs,
    /// StereoSet: `dev.json`/`test.json`, the intrasentence task.
    StereoSet,
    /// Pronoun-fill items (not pairs) from WinoBias's data directory and
    /// templates over its occupations: `super::fill::pronoun_fill_items`.
    PronounFill,
}

impl Dataset {
    /// `winobias`, `crows-pairs`, `stereoset` or `pronoun-fill`.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "winobias" => Self::WinoBias,
            "crows-pairs" => Self::CrowsPairs,
            "stereoset" => Self::StereoSet,
            "pronoun-fill" => Self::PronounFill,
            other => bail!("--from {other:?}: expected winobias, crows-pairs, stereoset or pronoun-fill"),
        })
    }
}

/// Converts a dataset at `path` into pairs. `split` (`dev`, `test`) chooses
/// the WinoBias files when `path` is its data directory (both when `None`).
pub fn convert_dataset(dataset: Dataset, path: &Path, split: Option<&str>) -> Result<Vec<Pair>> {
    match dataset {
        Dataset::WinoBias => winobias(path, split),
        Dataset::CrowsPairs => {
            ensure!(split.is_none(), "--split applies to WinoBias only");
            crows_pairs(path)
        }
        Dataset::StereoSet => {
            ensure!(split.is_none(), "--split applies to WinoBias only (StereoSet's split is its file)");
            stereoset(path)
        }
        Dataset::PronounFill => bail!("pronoun-fill makes fill items, not pairs (bramble bias-data writes them)"),
    }
}

/// WinoBias from its data directory (every type of the chosen splits) or
/// from one `pro_stereotyped_…`/`anti_stereotyped_…` file (with its twin).
fn winobias(path: &Path, split: Option<&str>) -> Result<Vec<Pair>> {
    let mut files = Vec::new();
    if path.is_dir() {
        let splits: &[&str] = match split {
            None => &["dev", "test"],
            Some("dev") => &["dev"],
            Some("test") => &["test"],
            Some(other) => bail!("--split {other:?}: expected dev or test"),
        };
        for split in splits {
            for kind in WINOBIAS_TYPES {
                files.push(winobias_twin_files(path, kind, split).0);
            }
        }
    } else {
        ensure!(split.is_none(), "--split applies to a WinoBias directory, not to one file");
        files.push(path.to_path_buf());
    }
    let mut pairs = Vec::new();
    for file in files {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        // The twin file holds the same sentences with the pronoun swapped, line for line.
        let (pro, anti) = if let Some(rest) = name.strip_prefix("pro_stereotyped_") {
            (file.clone(), file.with_file_name(format!("anti_stereotyped_{rest}")))
        } else if let Some(rest) = name.strip_prefix("anti_stereotyped_") {
            (file.with_file_name(format!("pro_stereotyped_{rest}")), file.clone())
        } else {
            bail!(
                "{}: not a WinoBias file (expected pro_stereotyped_typeN.txt.SPLIT or anti_stereotyped_…, or the data directory)",
                file.display()
            );
        };
        let category = if name.contains("type1") {
            "gender-type1"
        } else if name.contains("type2") {
            "gender-type2"
        } else {
            "gender"
        };
        pairs.extend(winobias_files(&pro, &anti, category)?);
    }
    Ok(pairs)
}

/// One sentence of a WinoBias file: the line it stands on, its number `N`
/// in the file, and the sentence.
type WinoBiasLine = (usize, String, String);

/// Reads one WinoBias file: `N sentence with [bracketed] mentions`, one per
/// line, as `(line number, N, sentence without brackets)`.
fn winobias_lines(path: &Path) -> Result<Vec<WinoBiasLine>> {
    let mut lines = winobias_bracketed_lines(path)?;
    for (line_number, _, sentence) in &mut lines {
        // The brackets mark the coreferent mentions; they are not part of the text.
        let plain: String = sentence.chars().filter(|&c| c != '[' && c != ']').collect();
        *sentence = one_line(&plain);
        ensure!(!sentence.is_empty(), "{}:{line_number}: the sentence is empty", path.display());
    }
    Ok(lines)
}

/// The pro- and anti-stereotyped files of one WinoBias type (`type1`,
/// `type2`) and split (`dev`, `test`) in its data directory.
pub(super) fn winobias_twin_files(dir: &Path, kind: &str, split: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("pro_stereotyped_{kind}.txt.{split}")), dir.join(format!("anti_stereotyped_{kind}.txt.{split}")))
}

/// Reads one WinoBias file as [`winobias_lines`] does, the brackets that
/// mark the coreferent mentions kept.
pub(super) fn winobias_bracketed_lines(path: &Path) -> Result<Vec<WinoBiasLine>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut lines = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (number, sentence) = line
            .split_once(char::is_whitespace)
            .filter(|(number, _)| number.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}:{line_number}: expected a number, a space and a sentence, got {line:?}",
                    path.display()
                )
            })?;
        lines.push((line_number, number.to_string(), one_line(sentence)));
    }
    Ok(lines)
}

/// One line of a WinoBias file and its twin: the line's number and its
/// sentence in each file.
pub(super) struct WinoBiasTwin {
    /// The line in the pro-stereotyped file.
    pub line: usize,
    /// Its pro-stereotyped sentence.
    pub pro: String,
    /// The anti-stereotyped sentence of the same number.
    pub anti: String,
}

/// Reads the twin files `pro` and `anti` with `read_lines` ([`winobias_lines`]
/// or [`winobias_bracketed_lines`]) and pairs their sentences line for line;
/// an error names the files when they hold different numbers of sentences
/// or a line's sentence numbers differ.
pub(super) fn winobias_twins(
    pro: &Path,
    anti: &Path,
    read_lines: fn(&Path) -> Result<Vec<WinoBiasLine>>,
) -> Result<Vec<WinoBiasTwin>> {
    let pro_lines = read_lines(pro)?;
    let anti_lines = read_lines(anti)?;
    ensure!(
        pro_lines.len() == anti_lines.len(),
        "{} has {} sentences but {} has {}; they must pair line for line",
        pro.display(),
        pro_lines.len(),
        anti.display(),
        anti_lines.len()
    );
    let mut twins = Vec::with_capacity(pro_lines.len());
    for ((line, pro_number, pro_sentence), (_, anti_number, anti_sentence)) in pro_lines.into_iter().zip(anti_lines) {
        ensure!(
            pro_number == anti_number,
            "{}:{line}: sentence {pro_number} faces sentence {anti_number} of {}",
            pro.display(),
            anti.display()
        );
        twins.push(WinoBiasTwin { line, pro: pro_sentence, anti: anti_sentence });
    }
    Ok(twins)
}

fn winobias_files(pro: &Path, anti: &Path, category: &str) -> Result<Vec<Pair>> {
    let twins = winobias_twins(pro, anti, winobias_lines)?;
    Ok(twins
        .into_iter()
        .map(|twin| Pair { stereo: twin.pro, anti: twin.anti, category: category.to_string() })
        .collect())
}

/// CrowS-Pairs: `sent_more` is the sentence about the historically
/// disadvantaged group; `stereo_antistereo` says whether it demonstrates
/// (`stereo`) or violates (`antistereo`) the stereotype, so for `antistereo`
/// rows `sent_less` is the stereotyped one (as the dataset's own metric reads them).
fn crows_pairs(path: &Path) -> Result<Vec<Pair>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let records = read_csv(&text).map_err(|(line, message)| anyhow::anyhow!("{}:{line}: {message}", path.display()))?;
    let Some(((_, header), rows)) = records.split_first() else { bail!("{}: empty", path.display()) };
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| anyhow::anyhow!("{}:1: no column {name:?} in the header", path.display()))
    };
    let (more, less, direction, bias_type) =
        (column("sent_more")?, column("sent_less")?, column("stereo_antistereo")?, column("bias_type")?);
    let mut pairs = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        if row.len() == 1 && row[0].is_empty() {
            continue;
        }
        let field = |index: usize, name: &str| {
            row.get(index).filter(|v| !v.trim().is_empty()).map(one_line).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}:{line}: no {name:?} (the row has {} fields, the header {})",
                    path.display(),
                    row.len(),
                    header.len()
                )
            })
        };
        let (sent_more, sent_less) = (field(more, "sent_more")?, field(less, "sent_less")?);
        let category = field(bias_type, "bias_type")?;
        let (stereo, anti) = match field(direction, "stereo_antistereo")?.as_str() {
            "stereo" => (sent_more, sent_less),
            "antistereo" => (sent_less, sent_more),
            other => bail!("{}:{line}: stereo_antistereo is {other:?}, expected stereo or antistereo", path.display()),
        };
        pairs.push(Pair { stereo, anti, category });
    }
    ensure!(!pairs.is_empty(), "{}: no rows after the header", path.display());
    Ok(pairs)
}

/// `text` with each run of whitespace (a stray line break inside a
/// sentence, as in one CrowS-Pairs row) made one space, and none at the ends.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A CSV record and the line it starts on.
type CsvRecord = (usize, csv::StringRecord);

/// The records of RFC 4180 CSV `text` (quoted fields may hold commas,
/// newlines and doubled quotes), read by the `csv` crate, each with the line
/// it starts on; rows may have any number of fields. An error is `(line, message)`.
fn read_csv(text: &str) -> std::result::Result<Vec<CsvRecord>, (usize, String)> {
    check_quoting(text)?;
    // The line from the record's byte offset: the crate's own line count
    // misses the line breaks inside quoted fields. The offset is where the
    // reader stood, before the line ends and blank lines it then skips.
    let bytes = text.as_bytes();
    let line_of = |position: Option<&csv::Position>| {
        let Some(position) = position else { return 0 };
        let mut start = position.byte() as usize;
        while bytes.get(start).is_some_and(|b| matches!(b, b'\r' | b'\n')) {
            start += 1;
        }
        1 + bytes[..start].iter().filter(|&&b| b == b'\n').count()
    };
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(text.as_bytes());
    reader
        .records()
        .map(|record| {
            let record = record.map_err(|e| (line_of(e.position()), e.to_string()))?;
            Ok((line_of(record.position()), record))
        })
        .collect()
}

/// Checks the quoting the `csv` crate forgives (by design it never fails on
/// malformed input: a quote left open runs to the end of the file, text
/// after a closing quote joins the field), so a broken file is refused
/// with the line to look at: a quoted field must close, and only a comma or
/// the end of the line may follow its closing quote.
fn check_quoting(text: &str) -> std::result::Result<(), (usize, String)> {
    let mut line = 1;
    let mut at_field_start = true;
    let mut bytes = text.bytes().peekable();
    while let Some(byte) = bytes.next() {
        match byte {
            b'"' if at_field_start => {
                let opened_on = line;
                loop {
                    match bytes.next() {
                        None => return Err((opened_on, "a quoted field is never closed".to_string())),
                        // A doubled quote is a quote inside the field.
                        Some(b'"') if bytes.peek() == Some(&b'"') => {
                            bytes.next();
                        }
                        Some(b'"') => break,
                        Some(b'\n') => line += 1,
                        Some(_) => {}
                    }
                }
                if !matches!(bytes.peek(), None | Some(b',' | b'\n' | b'\r')) {
                    return Err((line, "text after a closing quote".to_string()));
                }
                at_field_start = false;
            }
            b',' => at_field_start = true,
            b'\n' => {
                line += 1;
                at_field_start = true;
            }
            _ => at_field_start = false,
        }
    }
    Ok(())
}

/// StereoSet's intrasentence task: each example fills a blank in a context
/// with a stereotype, an anti-stereotype and an unrelated word; the pair is
/// the first two (by `gold_label`), the category its `bias_type`.
fn stereoset(path: &Path) -> Result<Vec<Pair>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let root: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not JSON ({e})", path.display()))?;
    let examples = root
        .pointer("/data/intrasentence")
        .and_then(|v| v.as_array())
        .ok_or_else(|| anyhow::anyhow!("{}: no data.intrasentence array (not a StereoSet file?)", path.display()))?;
    let mut pairs = Vec::with_capacity(examples.len());
    for (index, example) in examples.iter().enumerate() {
        let id = example.get("id").and_then(|v| v.as_str()).unwrap_or("?");
        let at = || format!("{}: data.intrasentence[{index}] (id {id})", path.display());
        let category = example
            .get("bias_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow::anyhow!("{}: no \"bias_type\"", at()))?;
        let sentences = example
            .get("sentences")
            .and_then(|v| v.as_array())
            .ok_or_else(|| anyhow::anyhow!("{}: no \"sentences\" array", at()))?;
        let find = |label: &str| -> Result<String> {
            let mut found = sentences.iter().filter(|s| s.get("gold_label").and_then(|v| v.as_str()) == Some(label));
            let sentence = found.next().ok_or_else(|| anyhow::anyhow!("{}: no sentence labelled {label:?}", at()))?;
            ensure!(found.next().is_none(), "{}: two sentences labelled {label:?}", at());
            sentence
                .get("sentence")
                .and_then(|v| v.as_str())
                .map(one_line)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| anyhow::anyhow!("{}: the {label:?} sentence has no text", at()))
        };
        pairs.push(Pair {
            stereo: find("stereotype")?,
            anti: find("anti-stereotype")?,
            category: category.to_string(),
        });
    }
    ensure!(!pairs.is_empty(), "{}: data.intrasentence is empty", path.display());
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes WinoBias twin files with these contents into `dir`.
    fn twin_files(dir: &Path, pro: &str, anti: &str) -> (PathBuf, PathBuf) {
        let (pro_path, anti_path) = winobias_twin_files(dir, "type1", "dev");
        std::fs::write(&pro_path, pro).unwrap();
        std::fs::write(&anti_path, anti).unwrap();
        (pro_path, anti_path)
    }

    #[test]
    fn winobias_twins_pair_the_files_line_for_line() {
        let dir = tempfile::tempdir().unwrap();
        let (pro, anti) = twin_files(
            dir.path(),
            "1 [The nurse] said [she] would help.\n\n2 [The cook] sang.\n",
            "1 [The nurse] said [he] would help.\n\n2 [The cook]  sang.\n",
        );
        let plain = winobias_twins(&pro, &anti, winobias_lines).unwrap();
        let lines: Vec<_> = plain.iter().map(|t| (t.line, t.pro.as_str(), t.anti.as_str())).collect();
        assert_eq!(
            lines,
            [
                (1, "The nurse said she would help.", "The nurse said he would help."),
                (3, "The cook sang.", "The cook sang.")
            ]
        );
        let bracketed = winobias_twins(&pro, &anti, winobias_bracketed_lines).unwrap();
        assert_eq!(bracketed[0].pro, "[The nurse] said [she] would help.");
        assert_eq!(bracketed[1].anti, "[The cook] sang.");
    }

    #[test]
    fn winobias_twins_refuse_files_that_do_not_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (pro, anti) = twin_files(dir.path(), "1 A [she].\n2 B [she].\n", "1 A [he].\n");
        let error = winobias_twins(&pro, &anti, winobias_lines).err().unwrap().to_string();
        assert_eq!(
            error,
            format!("{} has 2 sentences but {} has 1; they must pair line for line", pro.display(), anti.display())
        );
        let (pro, anti) = twin_files(dir.path(), "1 A [she].\n2 B [she].\n", "1 A [he].\n3 B [he].\n");
        let error = winobias_twins(&pro, &anti, winobias_bracketed_lines).err().unwrap().to_string();
        assert_eq!(error, format!("{}:2: sentence 2 faces sentence 3 of {}", pro.display(), anti.display()));
    }

    #[test]
    fn csv_records_carry_the_line_they_start_on() {
        let text = "a,b\n\"x\ny\",\"say \"\"hi\"\", ok\"\r\n\nlast,\n";
        let records = read_csv(text).unwrap();
        let lines: Vec<usize> = records.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [1, 2, 5]);
        assert_eq!(records[1].1.iter().collect::<Vec<_>>(), ["x\ny", "say \"hi\", ok"]);
        assert_eq!(records[2].1.iter().collect::<Vec<_>>(), ["last", ""]);
    }

    #[test]
    fn broken_quoting_is_refused_at_its_line() {
        assert_eq!(read_csv("a,b\n1,\"open\n2,3\n").unwrap_err(), (2, "a quoted field is never closed".to_string()));
        assert_eq!(read_csv("a,b\n\"x\ny\"z,1\n").unwrap_err(), (3, "text after a closing quote".to_string()));
        // A quote inside an unquoted field is text, as RFC 4180 readers take it.
        assert_eq!(read_csv("a,b\"c\n").unwrap()[0].1.iter().collect::<Vec<_>>(), ["a", "b\"c"]);
    }
}
