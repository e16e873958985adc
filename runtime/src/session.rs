//! A generation session: the KV cache, the sampler and the token history of
//! one conversation, and the text stream that turns sampled tokens into UTF-8
//! with stop strings held back. Used by `bramble generate`/`chat` and by
//! `brambled`, both through [`Session::generate`]. After [`Session::feed`],
//! each [`Session::step`] allocates nothing, and neither does the decode loop
//! of [`Session::generate`].

use crate::error::{Error, ErrorKind, Result};
use crate::model::{Logits, Model, RunState};
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::Tokenizer;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// Largest prompt batch run through the forward pass at once.
pub const DEFAULT_BATCH: usize = 32;

/// One conversation with a model.
pub struct Session<'m> {
    model: &'m Model<'m>,
    tokenizer: &'m Tokenizer,
    state: RunState,
    sampler: Sampler,
    /// Tokens in the KV cache, in order.
    history: Vec<u32>,
    /// Whether `state` holds the logits that follow `history`.
    has_logits: bool,
}

impl<'m> Session<'m> {
    /// A session with a KV cache of `context` positions. Panics when its
    /// state cannot be allocated, for callers whose sizes are known to fit
    /// (tests); [`Session::try_new`] returns the error instead.
    pub fn new(model: &'m Model<'m>, tokenizer: &'m Tokenizer, context: usize, sampler: SamplerConfig) -> Self {
        Self::try_new(model, tokenizer, context, sampler).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A session with a KV cache of `context` positions, or an
    /// [`ErrorKind::OutOfMemory`](crate::error::ErrorKind::OutOfMemory) error
    /// naming the buffer that cannot be allocated ([`Model::try_new_state`]).
    pub fn try_new(
        model: &'m Model<'m>,
        tokenizer: &'m Tokenizer,
        context: usize,
        sampler: SamplerConfig,
    ) -> Result<Self> {
        let vocab = model.config.vocab_size as usize;
        let state = model.try_new_state(context, DEFAULT_BATCH)?;
        Ok(Self {
            model,
            tokenizer,
            state,
            sampler: Sampler::new(vocab, sampler),
            // The state holds `context` positions, so their history fits too.
            history: Vec::with_capacity(context),
            has_logits: false,
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &'m Tokenizer {
        self.tokenizer
    }
    /// The share of input channels the R-Sparse path sent to its low-rank
    /// part since the last call (`None` if no sparse module ran).
    pub fn take_measured_sparsity(&mut self) -> Option<f64> {
        self.state.take_measured_sparsity()
    }
    /// The bias projections recorded since the last [`Session::reset_projections`].
    pub fn projections(&self) -> &crate::bias::ProjectionStats {
        self.state.projections()
    }
    /// Starts a new record of bias projections.
    pub fn reset_projections(&mut self) {
        self.state.reset_projections()
    }
    /// Sets the bias constraint's weights for this session (one a layer, in [0, 1]).
    pub fn set_bias_weights(&mut self, weights: &[f32]) -> Result<()> {
        self.state.set_bias_weights(weights)
    }
    /// Puts the feedback loop's weights and centres in force for this session.
    pub fn apply_feedback(&mut self, feedback: &crate::bias::FeedbackLoop) -> Result<()> {
        self.state.apply_feedback(feedback)
    }
    /// Weight bytes the R-Sparse modules read since the last call, and what
    /// they would have read dense ([`RunState::take_sparse_bytes`]).
    pub fn take_sparse_bytes(&mut self) -> (u64, u64) {
        self.state.take_sparse_bytes()
    }

    /// The model.
    pub fn model(&self) -> &'m Model<'m> {
        self.model
    }
    /// The tokens in the cache.
    pub fn history(&self) -> &[u32] {
        &self.history
    }
    /// Positions the cache holds.
    pub fn context(&self) -> usize {
        self.state.context
    }
    /// Positions still free.
    pub fn remaining(&self) -> usize {
        self.state.context - self.history.len()
    }
    /// The sampler's settings, to change between turns.
    pub fn sampler_config(&mut self) -> &mut SamplerConfig {
        &mut self.sampler.config
    }

    /// Bytes held by the state's KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.state.kv_bytes()
    }
    /// Bytes the cached keys take, and what they would take unpruned
    /// ([`crate::kv::KvCache::key_bytes_in_use`]).
    pub fn key_bytes_in_use(&self) -> (usize, usize) {
        self.state.kv().key_bytes_in_use()
    }

    /// Makes the state's memory resident now ([`crate::model::RunState::commit_memory`]).
    pub fn commit_memory(&mut self) {
        self.state.commit_memory();
    }

    /// Bytes held by the whole state: the KV cache and the run buffers.
    pub fn state_bytes(&self) -> usize {
        self.state.bytes()
    }

    /// Empties the cache and restarts the sampler.
    pub fn reset(&mut self) {
        self.history.clear();
        self.has_logits = false;
        self.sampler.reset();
    }

    /// Forgets everything after the first `keep` tokens (a shared prefix is kept in the cache).
    pub fn truncate(&mut self, keep: usize) {
        if keep < self.history.len() {
            self.history.truncate(keep);
            self.has_logits = false;
        }
    }

    /// An error unless `tokens` fit in the free positions.
    fn check_fits(&self, tokens: &[u32]) -> Result<()> {
        if tokens.len() > self.remaining() {
            return Err(Error::invalid(format!(
                "{} tokens do not fit: {} of the context of {} are free",
                tokens.len(),
                self.remaining(),
                self.state.context
            )));
        }
        Ok(())
    }

    /// Runs `tokens` through the model after the history (prefill), in batches.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        self.check_fits(tokens)?;
        for chunk in tokens.chunks(self.state.batch) {
            self.model.forward(&mut self.state, chunk, self.history.len(), Logits::Last)?;
            self.history.extend_from_slice(chunk);
            for &t in chunk {
                self.sampler.accept(t);
            }
            self.has_logits = true;
        }
        Ok(())
    }

    /// The logits that follow the history (after [`feed`](Self::feed) or [`step`](Self::step)).
    pub fn logits(&self) -> Option<&[f32]> {
        self.has_logits.then(|| &self.state.logits()[..self.model.config.vocab_size as usize])
    }

    /// Samples the next token and runs it through the model. Returns the token;
    /// the cache then holds it. Allocates nothing.
    pub fn step(&mut self) -> Result<u32> {
        if !self.has_logits {
            return Err(Error::invalid("nothing to continue: feed a prompt first"));
        }
        if self.remaining() == 0 {
            return Err(Error::invalid(format!("the context of {} tokens is full", self.state.context)));
        }
        let vocab = self.model.config.vocab_size as usize;
        let logits = &self.state.logits()[..vocab];
        if !all_finite(logits) {
            // NaN is never sampled and infinity always is: either way the text would be noise.
            let (position, token) = (self.history.len().saturating_sub(1), self.history.last().copied().unwrap_or(0));
            return Err(Error::new(
                ErrorKind::NonFinite,
                format!(
                    "the logits at position {position} (after token {token}) are not finite: the model's weights \
                     or activations hold NaN or infinity"
                ),
            ));
        }
        let token = self.sampler.sample(logits);
        self.sampler.accept(token);
        // The prompt is over: key-channel pruning, if on, prunes it (once).
        self.state.end_prefill();
        self.model.forward(&mut self.state, &[token], self.history.len(), Logits::Last)?;
        self.history.push(token);
        Ok(token)
    }

    /// Samples the next token without running it (the cache does not hold it).
    /// For the last token of a generation that stops at a length limit.
    pub fn sample_only(&mut self) -> Option<u32> {
        let vocab = self.model.config.vocab_size as usize;
        self.has_logits.then(|| self.sampler.sample(&self.state.logits()[..vocab]))
    }
}

/// Whether every value is finite. A fold with `&` rather than `all`: without
/// an early exit the loop vectorizes, and a model that works never exits early.
fn all_finite(values: &[f32]) -> bool {
    values.iter().fold(true, |finite, value| finite & value.is_finite())
}

/// Why [`Session::generate`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model produced an end-of-generation token (run, not counted).
    EndOfGeneration,
    /// A stop string appeared (it and what followed were not passed on).
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The context is full.
    Context,
    /// The cancel check said so (before a prompt batch or a token).
    Cancelled,
    /// The sink asked to stop (its client went away).
    SinkStopped,
}

/// Where [`Session::generate`] puts what it generates. Called inside the
/// decode loop, so an implementation must not allocate if the loop is to stay
/// allocation-free.
pub trait GenerationSink {
    /// A generated token, before its text reaches [`text`](Self::text);
    /// end-of-generation tokens are not passed.
    fn token(&mut self, _token: u32) {}
    /// A piece of generated text (whole UTF-8 characters, stop strings held
    /// back). [`ControlFlow::Break`] ends the generation ([`Finish::SinkStopped`]).
    fn text(&mut self, piece: &str) -> ControlFlow<()>;
}

/// What [`Session::generate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generated {
    /// Why it ended.
    pub finish: Finish,
    /// Tokens generated (an end-of-generation token not counted).
    pub tokens: usize,
    /// Prompt tokens run through the model.
    pub prompt_tokens: usize,
    /// Time running the prompt.
    pub prefill: Duration,
    /// Time in the decode loop.
    pub decode: Duration,
    /// Heap allocations this thread made in the decode loop (the sink's
    /// included), as counted by [`CountingAllocator`](crate::allocations::CountingAllocator);
    /// always 0 unless it is the global allocator (see [`counting`](crate::allocations::counting)).
    pub decode_allocations: u64,
}

impl Generated {
    /// Forward passes the decode loop ran: every generated token, and an end-of-generation token.
    pub fn decode_steps(&self) -> usize {
        self.tokens + usize::from(self.finish == Finish::EndOfGeneration)
    }
}

impl Session<'_> {
    /// Keeps the cached prefix `tokens` shares with the history and forgets
    /// the rest, but never all of `tokens` (at least its last token must run
    /// again, to have logits to sample from), and nothing when a sliding
    /// window's cache no longer holds what the next token sees
    /// ([`crate::kv::KvCache::can_rewind_to`]). Returns how many tokens are
    /// cached: feed `tokens[cached..]` next.
    pub fn reuse_prefix(&mut self, tokens: &[u32]) -> usize {
        let shared = self.history.iter().zip(tokens).take_while(|(a, b)| a == b).count();
        let mut shared = shared.min(tokens.len().saturating_sub(1));
        if !self.state.kv().can_rewind_to(shared) {
            shared = 0;
        }
        self.truncate(shared);
        shared
    }

    /// The generation loop shared by `bramble` and `brambled`: runs `prompt`
    /// after the history in batches, then samples up to `max_tokens` tokens,
    /// streaming them and their text (through a [`TextStream`] ending at the
    /// first of `stops`) to `sink`. `cancelled` is asked before every prompt
    /// batch and every token.
    ///
    /// Everything is allocated before the decode loop; the loop itself
    /// allocates nothing (if `sink` does not). A cancelled or stopped sink's
    /// held-back text is dropped; otherwise it is flushed at the end.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        stops: &[String],
        cancelled: &dyn Fn() -> bool,
        sink: &mut dyn GenerationSink,
    ) -> Result<Generated> {
        if prompt.is_empty() && !self.has_logits {
            return Err(Error::invalid("nothing to continue: the prompt is empty"));
        }
        // Checked whole, before any of it runs, so a prompt that does not fit leaves the cache as it was.
        self.check_fits(prompt)?;
        let mut generated = Generated {
            finish: Finish::Length,
            tokens: 0,
            prompt_tokens: prompt.len(),
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
            decode_allocations: 0,
        };
        let prefill_started = Instant::now();
        for chunk in prompt.chunks(self.state.batch) {
            if cancelled() {
                // A half-run prompt leaves the cache consistent with its history.
                generated.finish = Finish::Cancelled;
                generated.prefill = prefill_started.elapsed();
                return Ok(generated);
            }
            self.feed(chunk)?;
        }
        generated.prefill = prefill_started.elapsed();

        let tokenizer = self.tokenizer;
        let mut stream = TextStream::new(stops);
        let mut out = SinkState { sink, stopped: false };
        let decode_started = Instant::now();
        let allocations_before = crate::allocations::thread_allocations();
        // The decode loop: nothing in it allocates.
        while generated.tokens < max_tokens {
            if cancelled() {
                generated.finish = Finish::Cancelled;
                break;
            }
            if self.remaining() == 0 {
                generated.finish = Finish::Context;
                break;
            }
            let token = self.step()?;
            if tokenizer.is_end_of_generation(token) {
                generated.finish = Finish::EndOfGeneration;
                break;
            }
            generated.tokens += 1;
            out.sink.token(token);
            let stopped = stream.push(tokenizer.token_bytes(token), &mut |piece| out.text(piece));
            if out.stopped {
                generated.finish = Finish::SinkStopped;
                break;
            }
            if stopped {
                generated.finish = Finish::Stop;
                break;
            }
        }
        if !matches!(generated.finish, Finish::Cancelled | Finish::SinkStopped) {
            stream.finish(&mut |piece| out.text(piece));
            if out.stopped {
                generated.finish = Finish::SinkStopped;
            }
        }
        generated.decode = decode_started.elapsed();
        generated.decode_allocations = crate::allocations::thread_allocations() - allocations_before;
        Ok(generated)
    }
}

/// A sink and whether it has asked to stop (after which it is told nothing more).
struct SinkState<'s> {
    sink: &'s mut dyn GenerationSink,
    stopped: bool,
}

impl SinkState<'_> {
    fn text(&mut self, piece: &str) {
        if !self.stopped && self.sink.text(piece).is_break() {
            self.stopped = true;
        }
    }
}

/// Turns token bytes into UTF-8 text pieces, holding back an incomplete
/// character and any tail that could be the start of a stop string.
pub struct TextStream {
    pending: Vec<u8>,
    stops: Vec<String>,
    stopped: bool,
}

impl TextStream {
    /// A stream that ends at the first of `stops` (which is not emitted).
    pub fn new(stops: &[String]) -> Self {
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Self { pending: Vec::with_capacity(256 + 2 * longest), stops: stops.to_vec(), stopped: false }
    }

    /// Whether a stop string has been seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a token's bytes and passes complete text to `emit`. Returns true
    /// once a stop string has appeared (text before it is emitted, the rest dropped).
    pub fn push(&mut self, bytes: &[u8], emit: &mut dyn FnMut(&str)) -> bool {
        if self.stopped {
            return true;
        }
        self.pending.extend_from_slice(bytes);
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(_) => return self.emit_valid(self.pending.len(), true, emit),
                // Invalid bytes (not merely an incomplete character at the end):
                // the text before them goes out whole, then U+FFFD for them.
                Err(e) if e.error_len().is_some() => {
                    let (good, bad) = (e.valid_up_to(), e.error_len().unwrap_or(1));
                    if self.emit_valid(good, false, emit) {
                        return true;
                    }
                    self.pending.drain(..bad);
                    emit("\u{FFFD}");
                }
                Err(e) => return self.emit_valid(e.valid_up_to(), true, emit),
            }
        }
    }

    /// Emits the first `valid` bytes of `pending` (whole UTF-8) and drains them,
    /// except, with `hold`, a tail that could begin a stop string. Returns true
    /// if a stop string was found (the text before it is emitted).
    fn emit_valid(&mut self, valid: usize, hold: bool, emit: &mut dyn FnMut(&str)) -> bool {
        let text = std::str::from_utf8(&self.pending[..valid]).expect("caller passes a UTF-8 prefix");
        if let Some(at) = self.stops.iter().filter_map(|s| text.find(s.as_str())).min() {
            if at > 0 {
                emit(&text[..at]);
            }
            self.stopped = true;
            self.pending.clear();
            return true;
        }
        let mut held = 0;
        if hold {
            for stop in &self.stops {
                // The longest tail of `text` that is a proper prefix of `stop`.
                for len in (1..stop.len().min(text.len() + 1)).rev() {
                    let start = text.len() - len;
                    if text.is_char_boundary(start) && stop.as_bytes().starts_with(&text.as_bytes()[start..]) {
                        held = held.max(len);
                        break;
                    }
                }
            }
        }
        let ready = valid - held;
        if ready > 0 {
            emit(&text[..ready]);
            self.pending.drain(..ready);
        }
        false
    }

    /// Emits whatever is held back (at the end of a generation). A character
    /// left incomplete at the end (the reply was cut by `max_tokens` or the
    /// context between two of its byte tokens) is dropped: the model never
    /// produced that character, so no U+FFFD stands in for it. Invalid bytes
    /// earlier in the reply are the model's own and [`push`](Self::push) has
    /// already emitted them as U+FFFD, so only such a cut tail is left here.
    /// Emits one slice of what is held: this runs inside the decode loop's
    /// allocation budget, which is none.
    pub fn finish(&mut self, emit: &mut dyn FnMut(&str)) {
        if !self.stopped {
            let complete = match std::str::from_utf8(&self.pending) {
                Ok(text) => text.len(),
                Err(error) => error.valid_up_to(),
            };
            if let Ok(text) = std::str::from_utf8(&self.pending[..complete]) {
                if !text.is_empty() {
                    emit(text);
                }
            }
        }
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut stream = TextStream::new(&stops);
        let mut out = String::new();
        let mut stopped = false;
        for piece in pieces {
            if stream.push(piece, &mut |t| out.push_str(t)) {
                stopped = true;
                break;
            }
        }
        if !stopped {
            stream.finish(&mut |t| out.push_str(t));
        }
        (out, stopped)
    }

    #[test]
    fn only_finite_logits_pass() {
        for length in [0usize, 1, 7, 8, 9, 64, 100] {
            let mut values: Vec<f32> = (0..length).map(|i| 3e38 - i as f32 * 1e36).collect();
            assert!(all_finite(&values), "{length} finite values near f32::MAX");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in [0, length / 2, length.saturating_sub(1)] {
                    if length == 0 {
                        continue;
                    }
                    let kept = values[at];
                    values[at] = bad;
                    assert!(!all_finite(&values), "{bad} at {at} of {length}");
                    values[at] = kept;
                }
            }
        }
    }

    #[test]
    fn split_characters_are_joined() {
        let euro = "€".as_bytes();
        assert_eq!(run(&[], &[b"a", &euro[..1], &euro[1..], b"b"]), ("a€b".to_string(), false));
    }

    #[test]
    fn stop_string_across_tokens_is_not_emitted() {
        assert_eq!(run(&["\nUser:"], &[b"Hi", b"\nUs", b"er:", b" more"]), ("Hi".to_string(), true));
    }

    #[test]
    fn near_miss_of_a_stop_string_is_emitted() {
        assert_eq!(run(&["\nUser:"], &[b"Hi", b"\nUs", b"ed"]), ("Hi\nUsed".to_string(), false));
    }

    #[test]
    fn an_incomplete_character_at_the_end_is_dropped() {
        let euro = "€".as_bytes();
        assert_eq!(run(&[], &[b"a", &euro[..2]]), ("a".to_string(), false));
        // Text held back for a stop string still goes out before the cut character.
        assert_eq!(run(&["zz"], &[b"z", &euro[..1]]), ("z".to_string(), false));
        assert_eq!(run(&[], &[&euro[..1]]), (String::new(), false));
    }

    #[test]
    fn invalid_bytes_before_a_cut_character_stay_replacement_characters() {
        let euro = "€".as_bytes();
        assert_eq!(run(&[], &[b"a", &[0xFF], &euro[..2]]), ("a\u{FFFD}".to_string(), false));
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        assert_eq!(run(&[], &[b"a", &[0xFF], b"b"]), ("a\u{FFFD}b".to_string(), false));
    }
}
