//! Scoring sentences: the tokens a sentence is scored on and their
//! log-probabilities under a model, a shared prefix taken from the KV cache.

use anyhow::{ensure, Result};
use bramble_runtime::logits::log_softmax_at;
use bramble_runtime::model::{Logits, Model, RunState};
use bramble_runtime::tokenizer::Tokenizer;

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
