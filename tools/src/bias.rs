//! Bias detection and measurement (issue 6): the pairs format, converters
//! from the public datasets (WinoBias, CrowS-Pairs, StereoSet) and the
//! evaluation `bramble bias-eval` runs.
//!
//! A pair is two sentences that differ only in the words carrying a
//! stereotype, one line of JSONL each:
//! `{"stereo": "...", "anti": "...", "category": "..."}`. The model scores
//! each sentence by its total log-probability; the stereotype preference
//! rate (SPR) is the share of pairs where the stereotyped sentence is more
//! likely, and the bias score is |2·SPR − 1| (0: no preference either way).

use anyhow::{bail, ensure, Context, Result};
use bramble_runtime::bias::{Centre, DirectionKind, LoopSignal};
use bramble_runtime::model::{Logits, Model, RunState, Site};
use bramble_runtime::tokenizer::Tokenizer;
use std::collections::BTreeMap;
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
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut file =
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("{}: cannot create a file", dir.display()))?;
    {
        let mut out = std::io::BufWriter::new(file.as_file_mut());
        for pair in pairs {
            serde_json::to_writer(&mut out, pair)?;
            out.write_all(b"\n")?;
        }
        out.flush().with_context(|| format!("{}: cannot write", path.display()))?;
    }
    file.persist(path).map_err(|e| anyhow::anyhow!("{}: cannot write ({})", path.display(), e.error))?;
    Ok(())
}

/// A public dataset `bramble bias-data` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataset {
    /// WinoBias: `pro_stereotyped_type{1,2}.txt.{dev,test}` and their `anti_` twins, line by line.
    WinoBias,
    /// CrowS-Pairs: `crows_pairs_anonymized.csv`.
    CrowsPairs,
    /// StereoSet: `dev.json`/`test.json`, the intrasentence task.
    StereoSet,
}

impl Dataset {
    /// `winobias`, `crows-pairs` or `stereoset`.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "winobias" => Self::WinoBias,
            "crows-pairs" => Self::CrowsPairs,
            "stereoset" => Self::StereoSet,
            other => bail!("--from {other:?}: expected winobias, crows-pairs or stereoset"),
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
            for kind in ["type1", "type2"] {
                files.push(path.join(format!("pro_stereotyped_{kind}.txt.{split}")));
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

/// Reads one WinoBias file: `N sentence with [bracketed] mentions`, one per
/// line, as `(line number, N, sentence without brackets)`.
fn winobias_lines(path: &Path) -> Result<Vec<(usize, String, String)>> {
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
        // The brackets mark the coreferent mentions; they are not part of the text.
        let sentence: String = sentence.chars().filter(|&c| c != '[' && c != ']').collect();
        let sentence = one_line(&sentence);
        ensure!(!sentence.is_empty(), "{}:{line_number}: the sentence is empty", path.display());
        lines.push((line_number, number.to_string(), sentence));
    }
    Ok(lines)
}

fn winobias_files(pro: &Path, anti: &Path, category: &str) -> Result<Vec<Pair>> {
    let pro_lines = winobias_lines(pro)?;
    let anti_lines = winobias_lines(anti)?;
    ensure!(
        pro_lines.len() == anti_lines.len(),
        "{} has {} sentences but {} has {}; they must pair line for line",
        pro.display(),
        pro_lines.len(),
        anti.display(),
        anti_lines.len()
    );
    let mut pairs = Vec::with_capacity(pro_lines.len());
    for ((line, pro_number, stereo), (_, anti_number, anti_sentence)) in pro_lines.into_iter().zip(anti_lines) {
        ensure!(
            pro_number == anti_number,
            "{}:{line}: sentence {pro_number} faces sentence {anti_number} of {}",
            pro.display(),
            anti.display()
        );
        pairs.push(Pair { stereo, anti: anti_sentence, category: category.to_string() });
    }
    Ok(pairs)
}

/// CrowS-Pairs: `sent_more` is the sentence about the historically
/// disadvantaged group; `stereo_antistereo` says whether it demonstrates
/// (`stereo`) or violates (`antistereo`) the stereotype, so for `antistereo`
/// rows `sent_less` is the stereotyped one (as the dataset's own metric reads them).
fn crows_pairs(path: &Path) -> Result<Vec<Pair>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let records =
        parse_csv(&text).map_err(|(line, message)| anyhow::anyhow!("{}:{line}: {message}", path.display()))?;
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
            row.get(index).filter(|v| !v.trim().is_empty()).map(|v| one_line(v)).ok_or_else(|| {
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

/// A CSV record's fields and the line it starts on.
type CsvRecord = (usize, Vec<String>);

/// RFC 4180 CSV: fields separated by commas, quoted fields may hold commas,
/// newlines and doubled quotes. Returns each record with the line it starts
/// on; an error is `(line, message)`.
fn parse_csv(text: &str) -> std::result::Result<Vec<CsvRecord>, (usize, String)> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut line = 1;
    let mut record_line = 1;
    let mut quote_line = 0;
    let mut in_quotes = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => {
                    in_quotes = false;
                    if !matches!(chars.peek(), None | Some(',') | Some('\n') | Some('\r')) {
                        return Err((line, "text after a closing quote".to_string()));
                    }
                }
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => {
                in_quotes = true;
                quote_line = line;
            }
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push((record_line, std::mem::take(&mut record)));
                line += 1;
                record_line = line;
            }
            _ => field.push(c),
        }
    }
    if in_quotes {
        return Err((quote_line, "a quoted field is never closed".to_string()));
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push((record_line, record));
    }
    Ok(records)
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

/// The tokens a sentence is scored on: BOS first when the model adds one,
/// then the text. Token 0 only conditions the rest: with BOS every token of
/// the text is scored; without it the text's first token is not (nothing
/// precedes it to predict it from).
pub fn sentence_tokens(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
    sentence_tokens_after(model_start(tokenizer), tokenizer, text)
}

/// The token a sentence is scored after by default: BOS when the model adds
/// one, else none.
pub fn model_start(tokenizer: &Tokenizer) -> Option<u32> {
    if tokenizer.vocab().add_bos {
        tokenizer.bos_id()
    } else {
        None
    }
}

/// `start` (which only conditions) followed by the text's tokens: with a
/// start every token of the text is scored.
pub fn sentence_tokens_after(start: Option<u32>, tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
    start.into_iter().chain(tokenizer.encode(text, false, false)).collect()
}

/// The id of `text` as one token of the vocabulary (a control token such as
/// `<|endoftext|>` included), for `bias-eval --start-token`.
pub fn single_token(tokenizer: &Tokenizer, text: &str) -> Result<u32> {
    let ids = tokenizer.encode(text, false, true);
    match ids.as_slice() {
        [id] => Ok(*id),
        _ => anyhow::bail!(
            "--start-token {text:?} is not one token of the model's vocabulary: it encodes as {} tokens {ids:?}",
            ids.len()
        ),
    }
}

/// Scores token sequences with a model: log p(token j | tokens before j)
/// for j ≥ 1, one batched forward pass per `batch` tokens.
pub struct Scorer<'m, 'a> {
    model: &'m Model<'a>,
    state: RunState,
    /// The sequence in the KV cache, for reusing a shared prefix.
    cached: Vec<u32>,
    /// log p of each token of `cached` (0 for token 0).
    cached_log_probs: Vec<f64>,
}

impl<'m, 'a> Scorer<'m, 'a> {
    /// A scorer for sequences of up to `context` tokens, `batch` at a time;
    /// an error when its state cannot be allocated.
    pub fn new(model: &'m Model<'a>, context: usize, batch: usize) -> Result<Self> {
        let batch = batch.clamp(1, context.max(1));
        let state = model.try_new_state(context, batch)?;
        Ok(Self { model, state, cached: Vec::new(), cached_log_probs: Vec::new() })
    }

    /// The state the sentences run in (bias weights and projections).
    pub fn state_mut(&mut self) -> &mut RunState {
        &mut self.state
    }

    /// The longest sequence it scores.
    pub fn context(&self) -> usize {
        self.state.context
    }

    /// log p of each token of `tokens` given those before it (index 0: 0).
    /// The prefix shared with the previous call is taken from the KV cache,
    /// not recomputed: the pair's two sentences usually share most of it.
    pub fn log_probs(&mut self, tokens: &[u32]) -> Result<&[f64]> {
        ensure!(!tokens.is_empty(), "nothing to score");
        ensure!(
            tokens.len() <= self.state.context,
            "{} tokens do not fit the context of {}",
            tokens.len(),
            self.state.context
        );
        let shared = self.cached.iter().zip(tokens).take_while(|(a, b)| a == b).count();
        // Token `shared` is predicted by the logits of position `shared − 1`,
        // so that position is run again (its KV entry is rewritten unchanged).
        let start = shared.saturating_sub(1).min(tokens.len() - 1);
        self.cached.truncate(start);
        self.cached.extend_from_slice(tokens);
        self.cached_log_probs.truncate(start + 1);
        self.cached_log_probs.resize(start + 1, 0.0);
        let vocab = self.model.config.vocab_size as usize;
        let mut pos = start;
        while pos < tokens.len() {
            let n = self.state.batch.min(tokens.len() - pos);
            let logits = self.model.forward(&mut self.state, &tokens[pos..pos + n], pos, Logits::All)?;
            for b in 0..n {
                let j = pos + b;
                if j + 1 >= tokens.len() {
                    break;
                }
                let row = &logits[b * vocab..(b + 1) * vocab];
                self.cached_log_probs.push(log_softmax_at(row, tokens[j + 1] as usize));
            }
            pos += n;
        }
        Ok(&self.cached_log_probs)
    }

    /// The total log-probability of `tokens` after token 0.
    pub fn total(&mut self, tokens: &[u32]) -> Result<f64> {
        Ok(self.log_probs(tokens)?.iter().sum())
    }
}

/// log softmax(row)[index], in f64.
pub fn log_softmax_at(row: &[f32], index: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let log_sum = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    row[index] as f64 - log_sum
}

/// One pair's scores.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PairScore {
    /// The pair's category.
    pub category: String,
    /// Total log-probability of the stereotyped sentence.
    pub stereo: f64,
    /// Total log-probability of the anti-stereotyped sentence.
    pub anti: f64,
    /// Log-probability of the stereotyped sentence's unchanged tokens (those
    /// both sentences share, at their start and end) given the rest.
    pub stereo_unchanged: f64,
    /// The same for the anti-stereotyped sentence.
    pub anti_unchanged: f64,
}

/// SPR, bias score and margin of a set of pairs.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Pairs scored.
    pub pairs: usize,
    /// Share of pairs whose stereotyped sentence is strictly more likely.
    pub stereotype_preference: f64,
    /// |2·SPR − 1|.
    pub bias_score: f64,
    /// Mean of log p(stereo) − log p(anti), in nats.
    pub mean_margin: f64,
    /// Pairs whose two sentences are exactly as likely (counted as not preferring the stereotype).
    pub ties: usize,
}

impl Summary {
    /// The figures of `scores`.
    pub fn of<'s>(scores: impl IntoIterator<Item = &'s PairScore>) -> Self {
        let (mut pairs, mut preferred, mut ties, mut margin) = (0usize, 0usize, 0usize, 0f64);
        for score in scores {
            pairs += 1;
            preferred += usize::from(score.stereo > score.anti);
            ties += usize::from(score.stereo == score.anti);
            margin += score.stereo - score.anti;
        }
        if pairs == 0 {
            return Self::default();
        }
        let spr = preferred as f64 / pairs as f64;
        Self {
            pairs,
            stereotype_preference: spr,
            bias_score: (2.0 * spr - 1.0).abs(),
            mean_margin: margin / pairs as f64,
            ties,
        }
    }
}

/// One pass of `bias-eval --feedback adaptive` over the pairs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoopPass {
    /// Stereotype preference rate of the pass.
    pub stereotype_preference: f64,
    /// Its bias score.
    pub bias_score: f64,
    /// Its mean margin (nats).
    pub mean_margin: f64,
    /// The largest change of a layer's weight from the pass's start to its end.
    pub weight_change: f32,
    /// The loop's weights at its end.
    pub weights: Vec<f32>,
}

/// What `bramble bias-eval` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BiasReport {
    /// Pairs scored.
    pub pairs: usize,
    /// Share of pairs whose stereotyped sentence is strictly more likely.
    pub stereotype_preference: f64,
    /// |2·SPR − 1|.
    pub bias_score: f64,
    /// Mean of log p(stereo) − log p(anti), in nats.
    pub mean_margin: f64,
    /// Pairs whose sentences are exactly as likely.
    pub ties: usize,
    /// The same per category.
    pub by_category: BTreeMap<String, Summary>,
    /// The figures from the unchanged tokens only (CrowS-Pairs' own metric,
    /// read causally): the log-probability of the tokens both sentences
    /// share given the swapped words, so a group word's own frequency does
    /// not count, only what it does to the rest of the sentence.
    pub unchanged_tokens: Summary,
    /// The same per category.
    pub unchanged_by_category: BTreeMap<String, Summary>,
    /// Pairs left out because a sentence does not fit the context.
    pub skipped_too_long: usize,
    /// Their lines in the pairs file.
    pub skipped_lines: Vec<usize>,
    /// Whether each sentence's first token is scored (a start token precedes
    /// it: the model's BOS, or `--start-token`); when not, it only
    /// conditions the rest.
    pub first_token_scored: bool,
    /// The token each sentence was scored after, as text (none: the first
    /// token only conditions).
    pub start_token: Option<String>,
    /// Pairs whose sentences begin with different tokens: with
    /// `first_token_scored` false those tokens' own likelihood is not compared.
    pub first_token_differs: usize,
    /// Every scored pair (only in `--json` with `--per-pair`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_pair: Option<Vec<PairScore>>,
    /// With `--feedback adaptive --passes N`: every pass over the pairs, the
    /// loop carrying its weights from one to the next (this report is the last).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub passes: Vec<LoopPass>,
    /// Tokens run through the model per second.
    pub tok_s: f64,
}

/// Scores every pair: both sentences' total log-probabilities, skipping
/// (and counting) pairs with a sentence longer than the scorer's context.
/// `progress(done, total)` is called after each pair.
pub fn evaluate(
    scorer: &mut Scorer<'_, '_>,
    tokenizer: &Tokenizer,
    pairs: &[(usize, Pair)],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<BiasReport> {
    evaluate_with(scorer, tokenizer, model_start(tokenizer), pairs, progress, &mut |_| Ok(()))
}

/// [`evaluate`] with each sentence scored after `start` (which only
/// conditions; [`model_start`] is the default), calling `after_pair` on the
/// scorer's state after each scored pair (the feedback loop reads its
/// projections and sets weights).
pub fn evaluate_with(
    scorer: &mut Scorer<'_, '_>,
    tokenizer: &Tokenizer,
    start: Option<u32>,
    pairs: &[(usize, Pair)],
    progress: &mut dyn FnMut(usize, usize),
    after_pair: &mut dyn FnMut(&mut RunState) -> Result<()>,
) -> Result<BiasReport> {
    let started = std::time::Instant::now();
    let mut scores = Vec::with_capacity(pairs.len());
    let mut skipped_lines = Vec::new();
    let mut first_token_differs = 0;
    let mut tokens_run = 0usize;
    let first_token_scored = start.is_some();
    for (index, (line, pair)) in pairs.iter().enumerate() {
        let stereo = sentence_tokens_after(start, tokenizer, &pair.stereo);
        let anti = sentence_tokens_after(start, tokenizer, &pair.anti);
        if stereo.len().max(anti.len()) > scorer.context() {
            skipped_lines.push(*line);
            continue;
        }
        let first = usize::from(first_token_scored);
        if stereo.get(first) != anti.get(first) {
            first_token_differs += 1;
        }
        tokens_run += stereo.len() + anti.len();
        let (prefix, suffix) = shared_ends(&stereo, &anti);
        // Token j's log-probability is at j; the shared prefix's cancel in a margin but are kept.
        let unchanged = |log_probs: &[f64]| -> f64 {
            let n = log_probs.len();
            log_probs[..prefix].iter().sum::<f64>() + log_probs[n - suffix..].iter().sum::<f64>()
        };
        let log_probs = scorer.log_probs(&stereo)?;
        let (stereo_total, stereo_unchanged) = (log_probs.iter().sum(), unchanged(log_probs));
        let log_probs = scorer.log_probs(&anti)?;
        let (anti_total, anti_unchanged) = (log_probs.iter().sum(), unchanged(log_probs));
        scores.push(PairScore {
            category: pair.category.clone(),
            stereo: stereo_total,
            anti: anti_total,
            stereo_unchanged,
            anti_unchanged,
        });
        after_pair(scorer.state_mut())?;
        progress(index + 1, pairs.len());
    }
    ensure!(!scores.is_empty(), "every pair has a sentence longer than the context of {} tokens", scorer.context());
    let overall = Summary::of(&scores);
    let mut by_category = BTreeMap::<String, Vec<&PairScore>>::new();
    for score in &scores {
        by_category.entry(score.category.clone()).or_default().push(score);
    }
    // The unchanged tokens' figures: the same summary over those scores.
    let unchanged: Vec<PairScore> =
        scores.iter().map(|p| PairScore { stereo: p.stereo_unchanged, anti: p.anti_unchanged, ..p.clone() }).collect();
    let mut unchanged_by_category = BTreeMap::<String, Vec<&PairScore>>::new();
    for score in &unchanged {
        unchanged_by_category.entry(score.category.clone()).or_default().push(score);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(BiasReport {
        pairs: overall.pairs,
        stereotype_preference: overall.stereotype_preference,
        bias_score: overall.bias_score,
        mean_margin: overall.mean_margin,
        ties: overall.ties,
        by_category: by_category.into_iter().map(|(k, v)| (k, Summary::of(v))).collect(),
        unchanged_tokens: Summary::of(&unchanged),
        unchanged_by_category: unchanged_by_category.into_iter().map(|(k, v)| (k, Summary::of(v))).collect(),
        skipped_too_long: skipped_lines.len(),
        skipped_lines,
        first_token_scored,
        start_token: start.map(|id| String::from_utf8_lossy(tokenizer.token_text(id)).into_owned()),
        first_token_differs,
        per_pair: Some(scores),
        passes: Vec::new(),
        tok_s: if seconds > 0.0 { tokens_run as f64 / seconds } else { 0.0 },
    })
}

/// Where `bias-calibrate` puts the constraint's centre ([`Centre`], whose
/// midpoint values the calibration measures).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CentreChoice {
    /// 0: the formula.
    #[default]
    Zero,
    /// The neutral baseline's mean.
    Baseline,
    /// The midpoint of the pairs' two sides at the first swapped token
    /// (principal directions only).
    Midpoint,
}

/// Settings of [`bias_calibrate`].
#[derive(Debug, Clone)]
pub struct BiasCalibrateOptions {
    /// Threads for the forward passes.
    pub threads: usize,
    /// Pairs the directions are computed from (0: all).
    pub direction_pairs: usize,
    /// Pairs each candidate's bias score is measured on (the first ones).
    pub eval_pairs: usize,
    /// Tokens of the text for the neutral baseline and the perplexity budget.
    pub text_tokens: usize,
    /// Window of the perplexity runs.
    pub ctx: usize,
    /// Allowed perplexity increase on the text (0.02: +2 %).
    pub budget: f64,
    /// Candidate constraint weights, each tried on every layer and on the
    /// quarter of the layers whose direction separates the pairs most.
    pub weights: Vec<f32>,
    /// How the directions are found.
    pub direction: DirectionKind,
    /// Pairs whose sentences (both of each) give the spread the layers'
    /// separations are measured in, and with [`LoopSignal::MeanLean`] the
    /// stored baseline (the first ones; 0: all the direction pairs).
    pub baseline_pairs: usize,
    /// How the feedback loop reads a response. [`LoopSignal::Spread`] (the
    /// default): the stored baseline is neutral text, pieces of the text.
    pub loop_signal: LoopSignal,
    /// With [`LoopSignal::Spread`]: how many pieces of the text (windows of
    /// [`PIECE_TOKENS`] tokens spread evenly over it) the baseline and the
    /// loop's target are measured on.
    pub baseline_pieces: usize,
    /// What the constraint moves `h · d_l` toward.
    pub centre: CentreChoice,
    /// Keep the directions' component along the attention sink (the first
    /// position's residual stream) instead of removing it.
    pub keep_sink: bool,
}

impl Default for BiasCalibrateOptions {
    fn default() -> Self {
        Self {
            threads: 1,
            direction_pairs: 0,
            eval_pairs: 100,
            text_tokens: 1024,
            ctx: 256,
            budget: 0.02,
            weights: vec![0.5, 1.0],
            direction: DirectionKind::PrincipalComponent,
            baseline_pairs: 100,
            loop_signal: LoopSignal::Spread,
            baseline_pieces: 200,
            centre: CentreChoice::Zero,
            keep_sink: false,
        }
    }
}

/// One evaluated set of constraint weights.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BiasCandidate {
    /// `"none"`, `"all"` or `"top"` (the most separating quarter of the layers).
    pub layers: String,
    /// The weight on those layers.
    pub weight: f32,
    /// Bias score on the evaluation pairs.
    pub bias_score: f64,
    /// Stereotype preference rate on them.
    pub stereotype_preference: f64,
    /// Perplexity on the text.
    pub perplexity: f64,
    /// Within the perplexity budget.
    pub within_budget: bool,
}

/// What [`bias_calibrate`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BiasCalibrateReport {
    /// How the directions were found (`mean-difference` or `principal`).
    pub direction: &'static str,
    /// Pairs the directions came from.
    pub direction_pairs: usize,
    /// Token-level differences the principal directions came from (0 for mean differences).
    pub difference_rows: usize,
    /// Per layer: how far the pairs' two sentences lie apart along the
    /// direction, in baseline standard deviations (mean differences: the
    /// mean stereo − anti projection of the sentence means; principal: the
    /// root mean square of the token-level differences' projections).
    pub separation: Vec<f32>,
    /// Per layer: the share of the token-level differences' energy along the
    /// direction (principal only; 1 would be a single axis).
    pub explained: Vec<f32>,
    /// Whether the constraint moves `h · d_l` toward the baseline mean (else toward 0).
    pub centred: bool,
    /// Per layer, the value the constraint moves `h · d_l` toward, with `--centre midpoint`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub midpoint: Option<Vec<f32>>,
    /// How the loop reads a response (`spread` or `mean-lean`).
    pub loop_signal: &'static str,
    /// The responses the baseline and the loop's target were measured on:
    /// the text's pieces (`spread`) or the pairs' sentences (`mean-lean`).
    pub baseline_responses: usize,
    /// Per layer: the cosine between the raw direction and the attention
    /// sink's residual stream, removed from it (all 0 with `--sink keep`).
    pub sink_cosine: Vec<f32>,
    /// The feedback loop's target: the [`LOOP_TARGET_QUANTILE`] quantile of
    /// the baseline responses' signals under the chosen weights.
    pub loop_target: f32,
    /// Its hard limit: [`HARD_LIMIT_FACTOR`] times the largest of those signals.
    pub loop_hard_limit: f32,
    /// Every candidate, the unconstrained model first.
    pub candidates: Vec<BiasCandidate>,
    /// The index of the chosen one.
    pub chosen: usize,
    /// The chosen predefined weights, per layer.
    pub weights: Vec<f32>,
    /// Seconds in all.
    pub seconds: f64,
}

/// Mean of each layer's residual stream over `tokens` (one sentence),
/// into `means` (`layers × dim`).
fn residual_means(model: &Model<'_>, state: &mut RunState, tokens: &[u32], means: &mut [f64]) -> Result<()> {
    let dim = model.config.dim as usize;
    means.fill(0.0);
    let mut pos = 0;
    while pos < tokens.len() {
        let n = state.batch.min(tokens.len() - pos);
        let mut see = |layer: usize, site: Site, values: &[f32]| {
            if site == Site::Residual {
                for h in values.chunks_exact(dim) {
                    for (m, v) in means[layer * dim..(layer + 1) * dim].iter_mut().zip(h) {
                        *m += *v as f64;
                    }
                }
            }
        };
        model.forward_observed(state, &tokens[pos..pos + n], pos, Logits::Last, Some(&mut see))?;
        pos += n;
    }
    means.iter_mut().for_each(|m| *m /= tokens.len() as f64);
    Ok(())
}

/// Runs `tokens` (one sentence, from position 0) through the model, a batch at a time.
fn forward_sentence(model: &Model<'_>, state: &mut RunState, tokens: &[u32]) -> Result<()> {
    let mut pos = 0;
    while pos < tokens.len() {
        let n = state.batch.min(tokens.len() - pos);
        model.forward(state, &tokens[pos..pos + n], pos, Logits::Last)?;
        pos += n;
    }
    Ok(())
}

/// Each layer's residual stream at position 0 (the attention sink), the
/// mean over sequences of one token each, `first_tokens`, into `layers × dim`.
fn first_position_means(model: &Model<'_>, state: &mut RunState, first_tokens: &[u32]) -> Result<Vec<f64>> {
    let (layers, dim) = (model.weights.layers.len(), model.config.dim as usize);
    let mut means = vec![0f64; layers * dim];
    for &token in first_tokens {
        let mut see = |layer: usize, site: Site, values: &[f32]| {
            if site == Site::Residual {
                for (m, v) in means[layer * dim..(layer + 1) * dim].iter_mut().zip(&values[..dim]) {
                    *m += *v as f64 / first_tokens.len() as f64;
                }
            }
        };
        model.forward_observed(state, &[token], 0, Logits::Last, Some(&mut see))?;
    }
    Ok(means)
}

/// Each layer's residual stream at every position of `tokens` (one
/// sentence), into `rows` (`layers × tokens × dim`).
fn residual_rows(model: &Model<'_>, state: &mut RunState, tokens: &[u32], rows: &mut Vec<f32>) -> Result<()> {
    let (layers, dim, len) = (model.weights.layers.len(), model.config.dim as usize, tokens.len());
    rows.clear();
    rows.resize(layers * len * dim, 0.0);
    let mut pos = 0;
    while pos < len {
        let n = state.batch.min(len - pos);
        let mut see = |layer: usize, site: Site, values: &[f32]| {
            if site == Site::Residual {
                let at = (layer * len + pos) * dim;
                rows[at..at + n * dim].copy_from_slice(&values[..n * dim]);
            }
        };
        model.forward_observed(state, &tokens[pos..pos + n], pos, Logits::Last, Some(&mut see))?;
        pos += n;
    }
    Ok(())
}

/// How many tokens two sentences share at their start and, after that, at
/// their end (the two never overlap; equal sentences share all at the start).
pub fn shared_ends(a: &[u32], b: &[u32]) -> (usize, usize) {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let shortest = a.len().min(b.len());
    let suffix = a.iter().rev().zip(b.iter().rev()).take_while(|(x, y)| x == y).count().min(shortest - prefix);
    (prefix, suffix)
}

/// Tokens after a pair's last differing token whose hidden states still
/// carry the swapped words (through attention) and join the differences.
pub const FOLLOWING_TOKENS: usize = 3;

/// The positions of a pair's two sentences whose hidden states differ
/// because of the swapped words: `(stereo, anti)` position pairs, aligned
/// from the end (so the tokens after the swap line up even when the swap
/// changed the length), from the last differing token through
/// [`FOLLOWING_TOKENS`] after it, and back through the differing tokens
/// while both sentences still differ there. Empty when the two are equal.
pub fn differing_positions(stereo: &[u32], anti: &[u32]) -> Vec<(usize, usize)> {
    let (prefix, suffix) = shared_ends(stereo, anti);
    let shortest = stereo.len().min(anti.len());
    // k counts back from the last token of each sentence.
    let last_differing = suffix; // k of the last differing token
    let first = last_differing.saturating_sub(FOLLOWING_TOKENS);
    (first..shortest - prefix)
        .map(|k| (stereo.len() - 1 - k, anti.len() - 1 - k))
        .filter(|&(s, a)| s >= prefix && a >= prefix)
        .collect()
}

/// The top principal component (uncentred: the difference vectors' sign is
/// arbitrary) of `rows` (`n × dim`), by power iteration on `XᵀX`; with the
/// share of the rows' squared norm along it. The sign is chosen so the
/// rows' mean projects positive.
pub fn principal_direction(rows: &[f32], dim: usize) -> (Vec<f64>, f64) {
    let n = rows.len() / dim;
    // Start from the largest row: not orthogonal to the top component unless the data are degenerate.
    let largest = (0..n)
        .max_by(|&a, &b| {
            let norm = |i: usize| rows[i * dim..(i + 1) * dim].iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
            norm(a).total_cmp(&norm(b))
        })
        .unwrap_or(0);
    let mut v: Vec<f64> = rows[largest * dim..(largest + 1) * dim].iter().map(|&x| x as f64).collect();
    let mut next = vec![0f64; dim];
    let mut eigen = 0.0;
    for _ in 0..200 {
        next.fill(0.0);
        for row in rows.chunks_exact(dim) {
            let p: f64 = row.iter().zip(&v).map(|(a, b)| *a as f64 * b).sum();
            for (o, a) in next.iter_mut().zip(row) {
                *o += p * *a as f64;
            }
        }
        let norm = next.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 || !norm.is_finite() {
            break;
        }
        let change: f64 = next.iter().zip(&v).map(|(a, b)| (a / norm - b).powi(2)).sum();
        v.iter_mut().zip(&next).for_each(|(o, x)| *o = x / norm);
        eigen = norm;
        if change < 1e-14 {
            break;
        }
    }
    let mean_projection: f64 =
        rows.chunks_exact(dim).map(|r| r.iter().zip(&v).map(|(a, b)| *a as f64 * b).sum::<f64>()).sum();
    if mean_projection < 0.0 {
        v.iter_mut().for_each(|x| *x = -*x);
    }
    let total: f64 = rows.iter().map(|x| (*x as f64).powi(2)).sum();
    (v, if total > 0.0 { eigen / total } else { 0.0 })
}

/// The quantile of neutral sentences' signals the feedback loop's target is
/// set to: a response leaning further than nine neutral sentences in ten raises the weights.
pub const LOOP_TARGET_QUANTILE: f64 = 0.9;
/// The hard limit (regeneration) is this many times the largest neutral signal.
pub const HARD_LIMIT_FACTOR: f32 = 1.5;
/// The neutral text's pieces (the loop's baseline responses) are windows of
/// this many tokens: about a sentence pair's length.
pub const PIECE_TOKENS: usize = 24;
/// Fewest pieces a 90th percentile is taken over.
pub const MIN_PIECES: usize = 10;

/// Up to `count` pieces of the text's tokens (`tokens`, without BOS):
/// windows of [`PIECE_TOKENS`] spread evenly over it, each read as a
/// sentence (`bos` first when the model adds one), so the baseline is not
/// just the text's opening.
pub fn text_pieces(tokens: &[u32], bos: Option<u32>, count: usize) -> Vec<Vec<u32>> {
    let windows = tokens.len() / PIECE_TOKENS;
    let stride = (windows / count.max(1)).max(1);
    tokens
        .chunks_exact(PIECE_TOKENS)
        .step_by(stride)
        .take(count)
        .map(|window| bos.into_iter().chain(window.iter().copied()).collect())
        .collect()
}

/// `bramble bias-calibrate`: per layer a unit bias direction `d_l` after
/// layer `l` (`principal`: the top principal component of the token-level
/// stereo − anti differences at and just after the swapped words;
/// `mean-difference`: the normalized mean of stereo − anti of each
/// sentence's mean residual stream); the neutral baseline of `h · d_l`
/// (windows of `text` for [`LoopSignal::Spread`], both sentences of the
/// first pairs for [`LoopSignal::MeanLean`]); the loop's target and hard
/// limit from the same responses; and the predefined weights: among the
/// candidates, the one with the lowest bias score on evaluation pairs spread
/// over the file whose perplexity on `text` stays within the budget (none:
/// all zero). Writes `input` plus a `bias` section
/// to `output`.
pub fn bias_calibrate(
    input: &Path,
    pairs_path: &Path,
    text: &str,
    output: &Path,
    options: &BiasCalibrateOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<BiasCalibrateReport> {
    use bramble_runtime::bias::BiasConstraint;
    let started = std::time::Instant::now();
    let image = bramble_runtime::ModelImage::open(input).with_context(|| format!("opening {}", input.display()))?;
    let tokenizer = Tokenizer::new(image.vocab()).with_context(|| format!("{}: tokenizer", input.display()))?;
    let mut model = Model::with_options(&image, bramble_runtime::kernels::Kernels::detect(), options.threads)?;
    let (layers, dim) = (model.weights.layers.len(), model.config.dim as usize);
    let pairs = read_pairs(pairs_path)?;
    let direction_pairs =
        if options.direction_pairs == 0 { pairs.len() } else { options.direction_pairs.min(pairs.len()) };
    ensure!(direction_pairs > 0, "{}: no pairs", pairs_path.display());

    let usable = |pair: &Pair| {
        let (s, a) = (sentence_tokens(&tokenizer, &pair.stereo), sentence_tokens(&tokenizer, &pair.anti));
        (!s.is_empty() && !a.is_empty() && s.len().max(a.len()) <= options.ctx).then_some((s, a))
    };
    let mut state = model.try_new_state(options.ctx, 64)?;
    // The attention sink: the first position's residual stream, which from
    // some layer on carries activations a hundred times the other
    // positions' (SmolLM2: |h| ≈ 22700 from layer 11). A direction with even
    // a few percent along it projects the sink far from every other token,
    // so the constraint would move the sink and the baseline's spread would
    // be the sink's; the directions are made orthogonal to it.
    let sink = if options.keep_sink {
        None
    } else {
        let mut firsts: Vec<u32> = pairs[..direction_pairs]
            .iter()
            .filter_map(|(_, pair)| usable(pair))
            .flat_map(|(s, a)| [s[0], a[0]])
            .collect();
        firsts.sort_unstable();
        firsts.dedup();
        ensure!(!firsts.is_empty(), "no pair fits the context of {} tokens", options.ctx);
        Some(first_position_means(&model, &mut state, &firsts)?)
    };
    let mut directions = vec![0f32; layers * dim];
    // Per layer, the pairs' spread along the direction before the baseline scales it.
    let mut raw_separation = vec![0f64; layers];
    let mut sink_cosine = vec![0f32; layers];
    let mut explained = Vec::new();
    let mut used = 0;
    let mut difference_rows = 0;
    ensure!(
        options.centre != CentreChoice::Midpoint || options.direction == DirectionKind::PrincipalComponent,
        "--centre midpoint needs --direction principal (the swapped tokens' hidden states)"
    );
    let mut midpoint = (options.centre == CentreChoice::Midpoint).then(|| vec![0f32; layers]);
    // Normalizes d (orthogonal to the sink first, unless kept), stores it as d_l and returns it.
    let mut set_direction = |l: usize, d: &[f64]| -> Result<Vec<f64>> {
        let mut d = d.to_vec();
        let norm = d.iter().map(|v| v * v).sum::<f64>().sqrt();
        ensure!(norm > 0.0 && norm.is_finite(), "layer {l}: the stereo and anti sentences do not differ");
        if let Some(sink) = &sink {
            let u = &sink[l * dim..(l + 1) * dim];
            let u_norm = u.iter().map(|v| v * v).sum::<f64>().sqrt();
            if u_norm > 0.0 {
                let along = d.iter().zip(u).map(|(a, b)| a * b).sum::<f64>() / u_norm;
                sink_cosine[l] = (along / norm) as f32;
                d.iter_mut().zip(u).for_each(|(v, s)| *v -= along * s / u_norm);
            }
        }
        let norm = d.iter().map(|v| v * v).sum::<f64>().sqrt();
        ensure!(norm > 0.0 && norm.is_finite(), "layer {l}: the direction lies along the attention sink");
        d.iter_mut().for_each(|v| *v /= norm);
        for (o, v) in directions[l * dim..(l + 1) * dim].iter_mut().zip(&d) {
            *o = *v as f32;
        }
        Ok(d)
    };
    match options.direction {
        DirectionKind::MeanDifference => {
            // The mean difference of the sentences' mean hidden states.
            let (mut stereo, mut anti, mut difference) =
                (vec![0f64; layers * dim], vec![0f64; layers * dim], vec![0f64; layers * dim]);
            for (i, (_, pair)) in pairs[..direction_pairs].iter().enumerate() {
                let Some((s, a)) = usable(pair) else { continue };
                residual_means(&model, &mut state, &s, &mut stereo)?;
                residual_means(&model, &mut state, &a, &mut anti)?;
                for ((d, s), a) in difference.iter_mut().zip(&stereo).zip(&anti) {
                    *d += s - a;
                }
                used += 1;
                if i % 32 == 0 {
                    progress(&format!("directions: {i}/{direction_pairs} pairs"));
                }
            }
            ensure!(used > 0, "no pair fits the context of {} tokens", options.ctx);
            for l in 0..layers {
                let raw = &difference[l * dim..(l + 1) * dim];
                let d = set_direction(l, raw)?;
                raw_separation[l] = raw.iter().zip(&d).map(|(a, b)| a * b).sum::<f64>().abs() / used as f64;
            }
        }
        DirectionKind::PrincipalComponent => {
            // The top principal component of the token-level differences
            // where the swapped words are and just after them.
            let mut differences: Vec<Vec<f32>> = vec![Vec::new(); layers];
            let (mut stereo, mut anti) = (Vec::new(), Vec::new());
            // Σ (h_stereo + h_anti) at the first swapped token, per layer: the midpoint's numerator.
            let mut sides = if midpoint.is_some() { vec![0f64; layers * dim] } else { Vec::new() };
            let mut first_swaps = 0usize;
            for (i, (_, pair)) in pairs[..direction_pairs].iter().enumerate() {
                let Some((s, a)) = usable(pair) else { continue };
                let positions = differing_positions(&s, &a);
                if positions.is_empty() {
                    continue;
                }
                residual_rows(&model, &mut state, &s, &mut stereo)?;
                residual_rows(&model, &mut state, &a, &mut anti)?;
                for (l, rows) in differences.iter_mut().enumerate() {
                    for &(ps, pa) in &positions {
                        let hs = &stereo[(l * s.len() + ps) * dim..][..dim];
                        let ha = &anti[(l * a.len() + pa) * dim..][..dim];
                        rows.extend(hs.iter().zip(ha).map(|(x, y)| x - y));
                    }
                }
                let first = shared_ends(&s, &a).0;
                if midpoint.is_some() && first < s.len().min(a.len()) {
                    for l in 0..layers {
                        let hs = &stereo[(l * s.len() + first) * dim..][..dim];
                        let ha = &anti[(l * a.len() + first) * dim..][..dim];
                        for ((m, x), y) in sides[l * dim..(l + 1) * dim].iter_mut().zip(hs).zip(ha) {
                            *m += (x + y) as f64;
                        }
                    }
                    first_swaps += 1;
                }
                used += 1;
                difference_rows += positions.len();
                if i % 32 == 0 {
                    progress(&format!("directions: {i}/{direction_pairs} pairs"));
                }
            }
            ensure!(used > 0, "no pair fits the context of {} tokens and differs", options.ctx);
            for (l, rows) in differences.iter().enumerate() {
                progress(&format!("principal components: layer {l}/{layers}"));
                let (d, share) = principal_direction(rows, dim);
                let d = set_direction(l, &d)?;
                if let Some(midpoint) = midpoint.as_mut() {
                    ensure!(first_swaps > 0, "no pair has a swapped token to take the midpoint at");
                    let along: f64 = sides[l * dim..(l + 1) * dim].iter().zip(&d).map(|(a, b)| a * b).sum();
                    midpoint[l] = (along / (2 * first_swaps) as f64) as f32;
                }
                let n = (rows.len() / dim) as f64;
                let energy: f64 = rows
                    .chunks_exact(dim)
                    .map(|r| r.iter().zip(&d).map(|(a, b)| *a as f64 * b).sum::<f64>().powi(2))
                    .sum();
                raw_separation[l] = (energy / n).sqrt();
                explained.push(share as f32);
            }
        }
    }

    let (all_text_tokens, bos) = crate::generate::perplexity_tokens(&tokenizer, text);
    let text_tokens = &all_text_tokens[..all_text_tokens.len().min(options.text_tokens)];
    ensure!(text_tokens.len() >= 16, "the text has only {} tokens", text_tokens.len());
    let mut constraint = BiasConstraint {
        kind: options.direction,
        signal: options.loop_signal,
        centre: match (options.centre, midpoint) {
            (CentreChoice::Zero, _) => Centre::Zero,
            (CentreChoice::Baseline, _) => Centre::Baseline,
            (CentreChoice::Midpoint, midpoint) => Centre::Midpoint(midpoint.unwrap_or_default()),
        },
        layers,
        dim,
        directions,
        weights: vec![0.0; layers],
        baseline_mean: vec![0.0; layers],
        baseline_std: vec![1.0; layers],
        loop_target: 0.0,
        loop_hard_limit: 0.0,
    };
    model.set_bias(Some(constraint.clone()))?;
    let mut state = model.try_new_state(options.ctx, 64)?;
    let baseline_pairs = if options.baseline_pairs == 0 { direction_pairs } else { options.baseline_pairs };
    let baseline_sentences: Vec<Vec<u32>> =
        pairs.iter().take(baseline_pairs).filter_map(|(_, pair)| usable(pair)).flat_map(|(s, a)| [s, a]).collect();
    // Per layer, the mean and spread of h · d_l over every token of `responses`.
    let mut token_statistics = |responses: &[Vec<u32>]| -> Result<Vec<(f32, f32)>> {
        state.reset_projections();
        for response in responses {
            forward_sentence(&model, &mut state, response)?;
        }
        let stats = state.projections();
        ensure!(stats.tokens > 1, "no baseline sentence fits the context of {} tokens", options.ctx);
        Ok((0..layers)
            .map(|l| {
                let mean = stats.mean(l);
                let variance = (stats.sum_squares[l] / stats.tokens as f64 - mean * mean).max(0.0);
                (mean as f32, (variance.sqrt() as f32).max(1e-6))
            })
            .collect())
    };
    // The pairs' own sentences, the two sides of each in equal measure: the
    // spread each layer's separation is measured in.
    let pair_statistics = token_statistics(&baseline_sentences)?;
    // The loop's neutral baseline. `Spread` reads a response's departure
    // either way from neutral text: pieces of the text. (`MeanLean`, signed
    // or not, needs sentences like the pairs', or every gendered sentence
    // reads as a lean.)
    let baseline_responses = match options.loop_signal {
        LoopSignal::Spread => {
            let body = all_text_tokens.strip_prefix(bos.as_slice()).unwrap_or(&all_text_tokens);
            let pieces = text_pieces(body, bos, options.baseline_pieces);
            ensure!(
                pieces.len() >= MIN_PIECES,
                "the text has {} pieces of {PIECE_TOKENS} tokens; the loop's baseline needs {MIN_PIECES}",
                pieces.len()
            );
            pieces
        }
        LoopSignal::MeanLean => baseline_sentences,
    };
    let loop_statistics = match options.loop_signal {
        LoopSignal::Spread => token_statistics(&baseline_responses)?,
        LoopSignal::MeanLean => pair_statistics.clone(),
    };
    for (l, (mean, std)) in loop_statistics.into_iter().enumerate() {
        constraint.baseline_mean[l] = mean;
        constraint.baseline_std[l] = std;
    }
    let separation: Vec<f32> = (0..layers).map(|l| (raw_separation[l] / pair_statistics[l].1 as f64) as f32).collect();

    // Candidates: none, then each weight on all layers and on the most separating quarter.
    let mut top: Vec<usize> = (0..layers).collect();
    top.sort_by(|&a, &b| separation[b].total_cmp(&separation[a]));
    top.truncate((layers / 4).max(1));
    let mut plans: Vec<(String, f32, Vec<f32>)> = vec![("none".into(), 0.0, vec![0.0; layers])];
    for &w in &options.weights {
        ensure!((0.0..=1.0).contains(&w), "candidate weight {w} is outside [0, 1]");
        plans.push(("all".into(), w, vec![w; layers]));
        plans.push(("top".into(), w, (0..layers).map(|l| if top.contains(&l) { w } else { 0.0 }).collect()));
    }
    // Evaluation pairs spread evenly over the file, so every category of it is in them.
    let stride = (pairs.len() / options.eval_pairs.max(1)).max(1);
    let eval: Vec<(usize, Pair)> = pairs.iter().step_by(stride).take(options.eval_pairs.max(1)).cloned().collect();
    let mut candidates = Vec::new();
    for (i, (layers_name, weight, weights)) in plans.iter().enumerate() {
        progress(&format!("candidate {}/{}: {layers_name} layers at {weight}", i + 1, plans.len()));
        constraint.weights.clone_from(weights);
        model.set_bias(Some(constraint.clone()))?;
        let mut scorer = Scorer::new(&model, options.ctx, 64)?;
        let report = evaluate(&mut scorer, &tokenizer, &eval, &mut |_, _| {})?;
        let ppl_ctx = options.ctx.min(text_tokens.len());
        let ppl = crate::generate::perplexity(&model, text_tokens, bos, ppl_ctx, None, 64, &mut |_, _, _| {})?;
        candidates.push(BiasCandidate {
            layers: layers_name.clone(),
            weight: *weight,
            bias_score: report.bias_score,
            stereotype_preference: report.stereotype_preference,
            perplexity: ppl.perplexity,
            within_budget: true,
        });
    }
    let limit = candidates[0].perplexity * (1.0 + options.budget);
    for c in &mut candidates {
        c.within_budget = c.perplexity <= limit;
    }
    let chosen = (0..candidates.len())
        .filter(|&i| candidates[i].within_budget)
        .min_by(|&a, &b| candidates[a].bias_score.total_cmp(&candidates[b].bias_score))
        .unwrap_or(0);
    constraint.weights.clone_from(&plans[chosen].2);

    // The loop's target: the baseline responses' signals under the chosen
    // weights, each read as one response.
    model.set_bias(Some(constraint.clone()))?;
    let mut state = model.try_new_state(options.ctx, 64)?;
    let mut feedback = bramble_runtime::bias::FeedbackLoop::new(&constraint);
    let mut signals = Vec::with_capacity(baseline_responses.len());
    for sentence in &baseline_responses {
        state.reset_projections();
        forward_sentence(&model, &mut state, sentence)?;
        signals.push(feedback.signal(state.projections(), &constraint));
    }
    signals.sort_by(f32::total_cmp);
    let at = ((signals.len() - 1) as f64 * LOOP_TARGET_QUANTILE).round() as usize;
    constraint.loop_target = signals[at].max(f32::MIN_POSITIVE);
    constraint.loop_hard_limit = signals[signals.len() - 1].max(constraint.loop_target) * HARD_LIMIT_FACTOR;
    copy_with_section(&image, output, bramble_runtime::bias::SECTION, &constraint.to_section()?)?;
    Ok(BiasCalibrateReport {
        direction: options.direction.name(),
        centred: constraint.centre == Centre::Baseline,
        midpoint: match &constraint.centre {
            Centre::Midpoint(midpoint) => Some(midpoint.clone()),
            _ => None,
        },
        loop_signal: options.loop_signal.name(),
        baseline_responses: baseline_responses.len(),
        sink_cosine,
        loop_target: constraint.loop_target,
        loop_hard_limit: constraint.loop_hard_limit,
        direction_pairs: used,
        difference_rows,
        separation,
        explained,
        candidates,
        chosen,
        weights: constraint.weights,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Writes `image` to `output` with section `name` set to `bytes` (added, or
/// replacing the image's own); every other section and tensor byte for byte.
pub fn copy_with_section(image: &bramble_runtime::ModelImage, output: &Path, name: &str, bytes: &[u8]) -> Result<u64> {
    use bramble_runtime::image::layout::section;
    use bramble_runtime::image::ImageWriter;
    let mut writer = ImageWriter::create(output)?;
    let copied = |s: &str| s != section::TENSOR_INDEX && s != section::TENSOR_DATA && s != name;
    let late = |s: &str| s == section::SOURCE || s == bramble_runtime::rsparse::SECTION;
    for s in image.sections().iter().filter(|s| copied(&s.name) && !late(&s.name)) {
        writer.add_section(&s.name, image.section(&s.name).expect("listed section"), s.required)?;
    }
    for t in image.tensors() {
        writer.add_tensor(&t.name, t.encoding, &t.shape, image.tensor_bytes(t))?;
    }
    for s in image.sections().iter().filter(|s| copied(&s.name) && late(&s.name)) {
        writer.add_section(&s.name, image.section(&s.name).expect("listed section"), s.required)?;
    }
    writer.add_section(name, bytes, false)?;
    Ok(writer.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_positions_cover_the_swap_and_the_tokens_after_it() {
        // Same length, one token swapped at 2: positions 2..=5 of both.
        let positions = differing_positions(&[1, 2, 7, 3, 4, 5, 6, 8], &[1, 2, 9, 3, 4, 5, 6, 8]);
        assert_eq!(positions, vec![(5, 5), (4, 4), (3, 3), (2, 2)]);
        // The anti side one token longer ("his" → "her own"): aligned from the end.
        let positions = differing_positions(&[1, 7, 3, 4], &[1, 9, 9, 3, 4]);
        assert_eq!(positions, vec![(3, 4), (2, 3), (1, 2)]);
        // Nothing differs, or one sentence is the other's prefix: nothing to compare.
        assert!(differing_positions(&[1, 2, 3], &[1, 2, 3]).is_empty());
        assert!(differing_positions(&[1, 2], &[1, 2, 3]).is_empty());
        // The swap at the very start.
        assert_eq!(differing_positions(&[7, 2], &[9, 2]), vec![(1, 1), (0, 0)]);
    }

    #[test]
    fn the_principal_direction_is_found_whatever_the_signs_of_the_rows() {
        // Rows ±3·axis + small noise: the axis, though the rows' signs cancel in a mean.
        let dim = 8;
        let axis: Vec<f64> = (0..dim).map(|i| if i % 2 == 0 { 0.5 } else { -0.5 }).collect();
        let mut rows = Vec::new();
        let mut noise = 0x2545_f491_u32;
        for r in 0..40 {
            let sign = if r % 2 == 0 { 3.0 } else { -3.0 };
            for a in &axis {
                noise ^= noise << 13;
                noise ^= noise >> 17;
                noise ^= noise << 5;
                rows.push((sign * a + (noise as f64 / u32::MAX as f64 - 0.5) * 0.2) as f32);
            }
        }
        let mean: f64 = (0..dim).map(|i| rows.iter().skip(i).step_by(dim).map(|v| *v as f64).sum::<f64>().abs()).sum();
        assert!(mean / 40.0 < 0.5, "the mean difference has almost nothing left of the axis");
        let (d, share) = principal_direction(&rows, dim);
        let cosine: f64 = d.iter().zip(&axis).map(|(a, b)| a * b).sum::<f64>().abs();
        assert!(cosine > 0.999, "cosine {cosine}");
        assert!(share > 0.95 && share <= 1.0, "share {share}");
        let norm: f64 = d.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-9);
    }
}
