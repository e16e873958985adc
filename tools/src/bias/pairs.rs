//! The pairs file: JSONL, one pair of sentences a line, read with line
//! numbers for error messages and written atomically.

use anyhow::{ensure, Context, Result};
use std::io::Write;
use std::path::Path;

/// Two sentences that differ only in the words that carry a stereotype.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pair {
    /// The sentence that agrees with the stereotype.
    pub stereo: String,
    /// The sentence that contradicts it.
    pub anti: String,
    /// The kind of bias (`gender`, `race-color`, …).
    pub category: String,
}

/// Reads a pairs file (JSONL; blank lines are skipped), each pair with its line number.
pub fn read_pairs(path: &Path) -> Result<Vec<(usize, Pair)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    parse_pairs(&text, &path.display().to_string())
}

/// Parses pairs from JSONL `text`, each with its line number; errors name
/// `name` and the line.
pub fn parse_pairs(text: &str, name: &str) -> Result<Vec<(usize, Pair)>> {
    let mut pairs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let pair: Pair = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!(
                "{name}:{line_number}: not a pair ({e}); expected {{\"stereo\": \"...\", \"anti\": \"...\", \"category\": \"...\"}}"
            )
        })?;
        for (field, value) in [("stereo", &pair.stereo), ("anti", &pair.anti), ("category", &pair.category)] {
            ensure!(!value.trim().is_empty(), "{name}:{line_number}: \"{field}\" is empty");
        }
        pairs.push((line_number, pair));
    }
    ensure!(!pairs.is_empty(), "{name}: no pairs");
    Ok(pairs)
}

/// Writes pairs as JSONL to a temporary file beside `path`, renamed at the
/// end, so a failed write leaves nothing half-written behind.
pub fn write_pairs(pairs: &[Pair], path: &Path) -> Result<()> {
    write_jsonl(pairs, path)
}

/// Writes `records` as JSONL, one a line, atomically (as [`write_pairs`]).
pub(super) fn write_jsonl<T: serde::Serialize>(records: &[T], path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut file =
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("{}: cannot create a file", dir.display()))?;
    {
        let mut out = std::io::BufWriter::new(file.as_file_mut());
        for record in records {
            serde_json::to_writer(&mut out, record)?;
            out.write_all(b"\n")?;
        }
        out.flush().with_context(|| format!("{}: cannot write", path.display()))?;
    }
    file.persist(path).map_err(|e| anyhow::anyhow!("{}: cannot write ({})", path.display(), e.error))?;
    Ok(())
}
