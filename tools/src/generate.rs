//! The generation loop, perplexity and the benchmark, shared by the commands.

use anyhow::Result;
use bramble_runtime::model::{Logits, Model};
use bramble_runtime::session::{Finish, GenerationSink, Session};
use bramble_runtime::tokenizer::Tokenizer;
use std::ops::ControlFlow;
use std::time::Instant;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-generation token.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The context is full.
    Context,
}

/// What a generation produced, and how fast.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    /// The generated text (stop string excluded).
    pub text: String,
    /// The generated token ids (end-of-generation token excluded).
    pub tokens: Vec<u32>,
    /// Tokens of the prompt run through the model.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Prompt tokens per second.
    pub prefill_tok_s: f64,
    /// Generated tokens per second.
    pub decode_tok_s: f64,
    /// Why it ended.
    pub stop_reason: StopReason,
}

fn per_second(count: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// Collects a generation's tokens and text for [`Generation`] while passing
/// the text on as it forms.
struct Collect<'a> {
    text: String,
    tokens: Vec<u32>,
    on_text: &'a mut dyn FnMut(&str),
}

impl GenerationSink for Collect<'_> {
    fn token(&mut self, token: u32) {
        self.tokens.push(token);
    }
    fn text(&mut self, piece: &str) -> ControlFlow<()> {
        self.text.push_str(piece);
        (self.on_text)(piece);
        ControlFlow::Continue(())
    }
}

/// Feeds `prompt` after the session's history and generates up to
/// `max_tokens`, passing text to `on_text` as it forms (the runtime's
/// [`Session::generate`] loop, never cancelled).
pub fn generate(
    session: &mut Session<'_>,
    prompt: &[u32],
    max_tokens: usize,
    stops: &[String],
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    // Room for every token, so collecting them does not allocate in the loop.
    let mut collect =
        Collect { text: String::with_capacity(max_tokens * 8), tokens: Vec::with_capacity(max_tokens), on_text };
    let generated = session.generate(prompt, max_tokens, stops, &|| false, &mut collect)?;
    let stop_reason = match generated.finish {
        Finish::EndOfGeneration => StopReason::Eos,
        Finish::Stop => StopReason::Stop,
        Finish::Length => StopReason::Length,
        Finish::Context => StopReason::Context,
        // Neither can happen here (nothing cancels, `Collect` never stops), but say so rather than guess.
        Finish::Cancelled | Finish::SinkStopped => anyhow::bail!("the generation ended early ({:?})", generated.finish),
    };
    Ok(Generation {
        text: collect.text,
        generated_tokens: collect.tokens.len(),
        tokens: collect.tokens,
        prompt_tokens: prompt.len(),
        prefill_tok_s: per_second(prompt.len(), generated.prefill.as_secs_f64()),
        decode_tok_s: per_second(generated.decode_steps(), generated.decode.as_secs_f64()),
        stop_reason,
    })
}

/// One step of a followed continuation: where the given token stands among
/// the model's logits at that point.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FollowedStep {
    /// The token the continuation gives.
    pub token: u32,
    /// The model's greedy choice at this step (greedy decoding's: the lowest id of equal maxima).
    pub argmax: u32,
    /// How many tokens have a larger logit than `token` (0: it is the greedy choice).
    pub rank: usize,
    /// The greedy choice's logit minus `token`'s (0 when they are the same).
    pub margin: f32,
    /// The largest logit minus the second largest: how near a tie the greedy choice is.
    pub top_gap: f32,
}

/// A continuation scored token by token ([`follow`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Following {
    /// Each given token's step.
    pub steps: Vec<FollowedStep>,
    /// Steps whose token is the model's greedy choice.
    pub agree: usize,
    /// Tokens of the prompt run through the model.
    pub prompt_tokens: usize,
}

/// Feeds `prompt`, then `continuation` a token at a time as decoding would,
/// recording before each token where it stands among the model's logits:
/// teacher forcing, which compares a model's choices with another engine's
/// step by step without the first differing token changing every later one.
pub fn follow(session: &mut Session<'_>, prompt: &[u32], continuation: &[u32]) -> Result<Following> {
    let vocab = session.model().config.vocab_size as usize;
    if let Some(&bad) = continuation.iter().find(|&&t| t as usize >= vocab) {
        anyhow::bail!("--follow: token id {bad} is not below the vocabulary size {vocab}");
    }
    anyhow::ensure!(
        prompt.len() + continuation.len() <= session.remaining(),
        "the prompt ({}) and the followed tokens ({}) do not fit the context of {}",
        prompt.len(),
        continuation.len(),
        session.context()
    );
    session.feed(prompt)?;
    let mut steps = Vec::with_capacity(continuation.len());
    for (i, &token) in continuation.iter().enumerate() {
        let logits = session.logits().ok_or_else(|| anyhow::anyhow!("--follow: no logits after the prompt"))?;
        anyhow::ensure!(
            logits.iter().all(|l| l.is_finite()),
            "the logits before followed token {} are not finite",
            steps.len() + 1
        );
        // The greedy decoder's own choice, so that agreeing here means greedy decoding agrees.
        let argmax = bramble_runtime::sampler::greatest(logits) as usize;
        let best = logits[argmax];
        let second =
            logits.iter().enumerate().filter(|&(j, _)| j != argmax).fold(f32::NEG_INFINITY, |m, (_, &l)| m.max(l));
        let own = logits[token as usize];
        steps.push(FollowedStep {
            token,
            argmax: argmax as u32,
            rank: logits.iter().filter(|&&l| l > own).count(),
            margin: best - own,
            top_gap: best - second,
        });
        // The last token's own logits are never read: it need not run.
        if i + 1 < continuation.len() {
            session.feed(&[token])?;
        }
    }
    Ok(Following {
        agree: steps.iter().filter(|s| s.rank == 0 && s.argmax == s.token).count(),
        steps,
        prompt_tokens: prompt.len(),
    })
}

/// A perplexity measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood).
    pub perplexity: f64,
    /// Tokens in the text.
    pub tokens: usize,
    /// Windows evaluated.
    pub chunks: usize,
    /// Tokens scored.
    pub scored: usize,
    /// Tokens per second through the model.
    pub tok_s: f64,
}

/// Perplexity by llama.cpp's `llama-perplexity` method: the text's tokens in
/// windows of `ctx`, each starting with BOS when the model adds one, scoring
/// the second half of each window.
pub fn perplexity(
    model: &Model<'_>,
    tokens: &[u32],
    bos: Option<u32>,
    ctx: usize,
    max_chunks: Option<usize>,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<Perplexity> {
    anyhow::ensure!(ctx >= 4, "--ctx {ctx} is too small (at least 4)");
    let chunks = (tokens.len() / ctx).min(max_chunks.unwrap_or(usize::MAX));
    anyhow::ensure!(chunks > 0, "the text has {} tokens, fewer than one window of {ctx}", tokens.len());
    let vocab = model.config.vocab_size as usize;
    let mut state = model.try_new_state(ctx, batch)?;
    let first = ctx / 2;
    let mut nll = 0f64;
    let mut scored = 0usize;
    let mut window = vec![0u32; ctx];
    let started = Instant::now();
    for chunk in 0..chunks {
        window.copy_from_slice(&tokens[chunk * ctx..(chunk + 1) * ctx]);
        if let Some(bos) = bos {
            window[0] = bos;
        }
        let mut pos = 0;
        while pos < ctx {
            let n = batch.min(ctx - pos);
            // Logits are needed only where they predict a scored token.
            let wanted = if pos + n > first { Logits::All } else { Logits::Last };
            let logits = model.forward(&mut state, &window[pos..pos + n], pos, wanted)?;
            if wanted == Logits::All {
                for b in 0..n {
                    let j = pos + b;
                    if j < first || j + 1 >= ctx {
                        continue;
                    }
                    let row = &logits[b * vocab..(b + 1) * vocab];
                    nll -= bramble_runtime::logits::log_softmax_at(row, window[j + 1] as usize);
                    scored += 1;
                }
            }
            pos += n;
        }
        progress(chunk + 1, chunks, (nll / scored as f64).exp());
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Perplexity {
        perplexity: (nll / scored as f64).exp(),
        tokens: tokens.len(),
        chunks,
        scored,
        tok_s: per_second(chunks * ctx, seconds),
    })
}

/// Tokens of `text` for a perplexity run: BOS first only when the model adds it.
pub fn perplexity_tokens(tokenizer: &Tokenizer, text: &str) -> (Vec<u32>, Option<u32>) {
    let add_bos = tokenizer.vocab().add_bos;
    let tokens = tokenizer.encode(text, add_bos, false);
    (tokens, if add_bos { tokenizer.bos_id() } else { None })
}
