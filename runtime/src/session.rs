//! A generation session: the KV cache, the sampler and the token history of
//! one conversation, and the text stream that turns sampled tokens into UTF-8
//! with stop strings held back. Used by `bramble generate`/`chat` and by
//! `brambled`. After [`Session::feed`], each [`Session::step`] allocates nothing.

use crate::error::{Error, Result};
use crate::model::{Logits, Model, RunState};
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::Tokenizer;

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
    /// A session with a KV cache of `context` positions.
    pub fn new(model: &'m Model<'m>, tokenizer: &'m Tokenizer, context: usize, sampler: SamplerConfig) -> Self {
        let vocab = model.config.vocab_size as usize;
        Self {
            model,
            tokenizer,
            state: model.new_state(context, DEFAULT_BATCH),
            sampler: Sampler::new(vocab, sampler),
            history: Vec::with_capacity(context),
            has_logits: false,
        }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &'m Tokenizer {
        self.tokenizer
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

    /// Runs `tokens` through the model after the history (prefill), in batches.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        if tokens.len() > self.remaining() {
            return Err(Error::invalid(format!(
                "{} tokens do not fit: {} of the context of {} are free",
                tokens.len(),
                self.remaining(),
                self.state.context
            )));
        }
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
        let token = self.sampler.sample(&self.state.logits()[..vocab]);
        self.sampler.accept(token);
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

    /// Emits whatever is held back (at the end of a generation).
    pub fn finish(&mut self, emit: &mut dyn FnMut(&str)) {
        if !self.stopped && !self.pending.is_empty() {
            let text = String::from_utf8_lossy(&self.pending).into_owned();
            emit(&text);
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
    fn invalid_bytes_become_replacement_characters() {
        assert_eq!(run(&[], &[b"a", &[0xFF], b"b"]), ("a\u{FFFD}b".to_string(), false));
    }
}
