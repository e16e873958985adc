//! Scoring sentences: the tokens a sentence is scored on and their
//! log-probabilities under a model, a shared prefix taken from the KV cache,
//! and the run over a file's entries (pairs, fill items) both measures make.

use anyhow::{ensure, Result};
use bramble_runtime::logits::log_softmax_at;
use bramble_runtime::model::{Logits, Model, RunState};
use bramble_runtime::tokenizer::Tokenizer;
use std::borrow::Cow;

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

/// How a run over a file's entries (pairs, or fill items) was scored: what
/// was left out, how each sentence's first token was treated, and how fast.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ScoringRun {
    /// Entries left out because one of their sentences does not fit the context.
    pub skipped_too_long: usize,
    /// Their lines in the input file.
    pub skipped_lines: Vec<usize>,
    /// Whether each sentence's first token is scored (a start token precedes
    /// it: the model's BOS, or `--start-token`); when not, it only
    /// conditions the rest.
    pub first_token_scored: bool,
    /// The token each sentence was scored after, as text (none: the first
    /// token only conditions).
    pub start_token: Option<String>,
    /// Entries whose first two sentences (a pair's two, an item's *she* and
    /// *he* fillings) begin with different tokens: with `first_token_scored`
    /// false those tokens' own likelihood is not compared.
    pub first_token_differs: usize,
    /// Tokens run through the model per second.
    pub tok_s: f64,
}

/// Scores each entry of `entries` (each with its line in the input file):
/// its `N` sentences (`sentences`, N ≥ 2) are tokenized after `start` and
/// handed to `score`, which runs them through the scorer and gives the
/// entry's score. An entry with a sentence longer than the scorer's context
/// is skipped and its line recorded. After each scored entry, `after_entry`
/// gets the scorer's state (the feedback loop reads its projections and sets
/// weights) and `progress(done, total)` is called. The scores come in the
/// entries' order, with how the run went.
#[allow(clippy::too_many_arguments)]
pub fn score_entries<'m, 'a, T, S, const N: usize>(
    scorer: &mut Scorer<'m, 'a>,
    tokenizer: &Tokenizer,
    start: Option<u32>,
    entries: &[(usize, T)],
    sentences: impl Fn(&T) -> Result<[Cow<'_, str>; N]>,
    mut score: impl FnMut(&mut Scorer<'m, 'a>, usize, &T, &[Vec<u32>; N]) -> Result<S>,
    progress: &mut dyn FnMut(usize, usize),
    after_entry: &mut dyn FnMut(&mut RunState) -> Result<()>,
) -> Result<(Vec<S>, ScoringRun)> {
    const { assert!(N >= 2, "an entry compares at least two sentences") };
    let started = std::time::Instant::now();
    let mut scores = Vec::with_capacity(entries.len());
    let mut skipped_lines = Vec::new();
    let mut first_token_differs = 0;
    let mut tokens_run = 0usize;
    let first_token_scored = start.is_some();
    // The text's first token: after the start token when there is one.
    let first = usize::from(first_token_scored);
    for (index, (line, entry)) in entries.iter().enumerate() {
        let tokens = sentences(entry)?.map(|text| sentence_tokens_after(start, tokenizer, &text));
        if tokens.iter().any(|sentence| sentence.len() > scorer.context()) {
            skipped_lines.push(*line);
            continue;
        }
        if tokens[0].get(first) != tokens[1].get(first) {
            first_token_differs += 1;
        }
        tokens_run += tokens.iter().map(Vec::len).sum::<usize>();
        scores.push(score(scorer, *line, entry, &tokens)?);
        after_entry(scorer.state_mut())?;
        progress(index + 1, entries.len());
    }
    let seconds = started.elapsed().as_secs_f64();
    let run = ScoringRun {
        skipped_too_long: skipped_lines.len(),
        skipped_lines,
        first_token_scored,
        start_token: start.map(|id| String::from_utf8_lossy(tokenizer.token_text(id)).into_owned()),
        first_token_differs,
        tok_s: if seconds > 0.0 { tokens_run as f64 / seconds } else { 0.0 },
    };
    Ok((scores, run))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::{convert, ConvertOptions, QuantTarget};
    use crate::synth::{SyntheticModel, SyntheticShape};
    use bramble_runtime::ModelImage;

    /// The longest sequence the test's scorer takes.
    const CONTEXT: usize = 64;

    /// What the test's `score` saw of one entry: its line and its sentences' tokens.
    type Seen = (usize, [Vec<u32>; 2]);

    /// A small synthetic model's image, in a directory that lives as long as the first value.
    fn synthetic_image() -> (tempfile::TempDir, ModelImage) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.bramble");
        let options = ConvertOptions::new(QuantTarget::parse("q8").unwrap());
        convert(&SyntheticModel::generate(SyntheticShape::default(), 3), &path, &options).unwrap();
        let image = ModelImage::open(&path).unwrap();
        (dir, image)
    }

    #[test]
    fn score_entries_skips_too_long_entries_and_reports_the_run() {
        let (_dir, image) = synthetic_image();
        let tokenizer = Tokenizer::new(image.vocab()).unwrap();
        let model = Model::new(&image).unwrap();
        let mut scorer = Scorer::new(&model, CONTEXT, 8).unwrap();
        let long = "word ".repeat(CONTEXT);
        // Lines 3 and 9 fit; line 5's second sentence does not. Only line 3's sentences begin differently.
        let entries = [
            (3, ["She left.".to_string(), "He left.".to_string()]),
            (5, ["Short.".to_string(), long]),
            (9, ["The cook sang.".to_string(), "The cook sat.".to_string()]),
        ];
        for start in [None, tokenizer.bos_id()] {
            let tokens = |text: &str| sentence_tokens_after(start, &tokenizer, text);
            assert!(tokens(&entries[1].1[1]).len() > CONTEXT, "the long sentence must not fit");
            let (mut seen, mut progress, mut after) = (Vec::<Seen>::new(), Vec::new(), 0);
            let (scores, run) = score_entries(
                &mut scorer,
                &tokenizer,
                start,
                &entries,
                |sentences| Ok(sentences.each_ref().map(|s| Cow::from(s.as_str()))),
                |scorer, line, _, tokens| {
                    seen.push((line, tokens.clone()));
                    scorer.total(&tokens[0])
                },
                &mut |done, total| progress.push((done, total)),
                &mut |_| {
                    after += 1;
                    Ok(())
                },
            )
            .unwrap();
            let expected: Vec<Seen> =
                [&entries[0], &entries[2]].iter().map(|(line, [a, b])| (*line, [tokens(a), tokens(b)])).collect();
            assert_eq!(seen, expected, "start {start:?}: each fitting entry's tokens, in order");
            assert_eq!(scores.len(), 2);
            assert!(scores.iter().all(|total| total.is_finite() && *total < 0.0), "{scores:?}");
            assert_eq!(progress, [(1, 3), (3, 3)], "progress after each scored entry");
            assert_eq!(after, 2, "after_entry once per scored entry");
            let start_text = start.map(|id| String::from_utf8_lossy(tokenizer.token_text(id)).into_owned());
            assert_eq!(run.skipped_too_long, 1);
            assert_eq!(run.skipped_lines, [5]);
            assert_eq!(run.first_token_scored, start.is_some());
            assert_eq!(run.start_token, start_text);
            assert_eq!(run.first_token_differs, 1, "start {start:?}");
            assert!(run.tok_s > 0.0);
        }
    }

    #[test]
    fn score_entries_passes_on_a_sentence_error_and_scores_nothing_when_nothing_fits() {
        let (_dir, image) = synthetic_image();
        let tokenizer = Tokenizer::new(image.vocab()).unwrap();
        let model = Model::new(&image).unwrap();
        let mut scorer = Scorer::new(&model, CONTEXT, 8).unwrap();
        let entries = [(1, "word ".repeat(CONTEXT)), (2, "bad".to_string())];
        let mut score = |entries: &[(usize, String)]| {
            score_entries(
                &mut scorer,
                &tokenizer,
                None,
                entries,
                |text| {
                    ensure!(text != "bad", "no sentences in {text:?}");
                    Ok([Cow::from(text.as_str()), Cow::from(text.as_str())])
                },
                |_, line, _, _| -> Result<()> { panic!("line {line} does not fit, so it is not scored") },
                &mut |_, _| {},
                &mut |_| Ok(()),
            )
        };
        assert_eq!(score(&entries).unwrap_err().to_string(), "no sentences in \"bad\"");
        let (scores, run) = score(&entries[..1]).unwrap();
        assert!(scores.is_empty());
        assert_eq!((run.skipped_too_long, run.skipped_lines), (1, vec![1]));
    }
}
