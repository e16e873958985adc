//! What the protocols and the inference thread share: the request (what to
//! continue, how far, how to sample), the sink a generation writes to, and how
//! it ended (the reason, the usage, or the error for the client).

use crate::config::SamplingDefaults;
use bramble_runtime::chat::ChatMessage;
use bramble_runtime::sampler::SamplerConfig;
use std::time::Duration;

/// What to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Plain text, after BOS when the model adds one.
    Text(String),
    /// A conversation, rendered with the model's chat template and ending
    /// where the assistant's reply begins.
    Chat {
        /// The turns, oldest first.
        messages: Vec<ChatMessage>,
        /// Drop the oldest turns (never the system message, never the last)
        /// until the conversation leaves room to reply, instead of refusing it.
        trim_to_fit: bool,
    },
}

/// One generation request, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// What to continue.
    pub prompt: Prompt,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplerConfig,
    /// Restart the sampler's random sequence from `sampling.seed` (the request gave a seed).
    pub reseed: bool,
    /// Strings that end the generation (not included in the text).
    pub stop: Vec<String>,
}

impl GenerationRequest {
    /// A request with the configured sampling defaults.
    pub fn new(prompt: Prompt, defaults: &SamplingDefaults) -> Self {
        Self {
            prompt,
            max_tokens: defaults.max_tokens,
            sampling: sampler_config(defaults),
            reseed: false,
            stop: Vec::new(),
        }
    }
}

/// The runtime's sampler settings for the configured defaults.
pub fn sampler_config(defaults: &SamplingDefaults) -> SamplerConfig {
    SamplerConfig {
        temperature: defaults.temperature,
        top_k: defaults.top_k,
        top_p: defaults.top_p,
        min_p: defaults.min_p,
        repetition_penalty: defaults.repeat_penalty,
        seed: defaults.seed,
        ..SamplerConfig::default()
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its turn (end-of-generation token).
    EndOfTurn,
    /// A stop string appeared.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The context is full.
    Context,
    /// The client cancelled (Ctrl-C, disconnect) or the daemon is shutting down.
    Cancelled,
}

impl FinishReason {
    /// The name used on the wire (`stop`, `length`, ...), as OpenAI and ollama name them.
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::EndOfTurn | FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::Context => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Token counts and timings of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Tokens of the prompt (those reused from the cache included).
    pub prompt_tokens: usize,
    /// Of those, tokens that were already in the cache and were not run again.
    pub cached_tokens: usize,
    /// Tokens generated (an end-of-turn token not counted).
    pub completion_tokens: usize,
    /// Time waiting in the queue.
    pub queued: Duration,
    /// Time running the prompt.
    pub prefill: Duration,
    /// Time generating.
    pub decode: Duration,
    /// Heap allocations the inference thread made in the decode loop (the
    /// sink's writes included; the promise is none), or `None` when the process
    /// does not count allocations (only `brambled` installs the counting allocator).
    pub decode_allocations: Option<u64>,
    /// The response's bias signal (the mean z-score of its projections on
    /// the bias directions), or `None` when the feedback is off.
    pub bias_signal: Option<f32>,
    /// Times the response was generated again because its signal was above
    /// `bias.hard_limit` (only responses that were not streamed).
    pub bias_regenerations: usize,
}

impl Usage {
    /// Generated tokens per second.
    pub fn decode_tokens_per_second(&self) -> f64 {
        let seconds = self.decode.as_secs_f64();
        if seconds > 0.0 {
            self.completion_tokens as f64 / seconds
        } else {
            0.0
        }
    }
}

/// Why a request was not run: an error for the client, with an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// HTTP status (400 bad request, 503 busy, ...).
    pub status: u16,
    /// OpenAI's error `type` (`invalid_request_error`, `server_busy`, ...).
    pub kind: &'static str,
    /// The field at fault, if one is.
    pub param: Option<String>,
    /// What was wrong, for a person.
    pub message: String,
}

impl RequestError {
    /// A 400 about `param`.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        // The message names the field too: NDJSON clients and people read only the message.
        let message = message.into();
        let message = match param {
            Some(param) => format!("{param}: {message}"),
            None => message,
        };
        Self { status: 400, kind: "invalid_request_error", param: param.map(str::to_string), message }
    }
    /// An error of any status.
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, param: None, message: message.into() }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Where a generation's output goes. Called on the inference thread; an
/// error (the client went away) cancels the generation.
pub trait TokenSink: Send {
    /// The prompt fits and generation begins.
    fn start(&mut self, prompt_tokens: usize) -> std::io::Result<()>;
    /// A piece of generated text (whole UTF-8 characters). Must not allocate.
    fn text(&mut self, piece: &str) -> std::io::Result<()>;
    /// The generation ended.
    fn finish(&mut self, reason: FinishReason, usage: &Usage) -> std::io::Result<()>;
    /// The request could not be run (before [`start`](Self::start), or after it on a model error).
    fn fail(&mut self, error: &RequestError) -> std::io::Result<()>;
    /// Forgets the text received since [`start`](Self::start), so the
    /// response can be generated again; `false` when it cannot be (the text
    /// was already sent, as when streaming).
    fn discard(&mut self) -> bool {
        false
    }
    /// Whether the client is still there; asked before a queued job starts,
    /// so a client that left while waiting costs no prefill.
    fn client_present(&self) -> bool {
        true
    }
}

/// How a job ended, sent back to the thread that submitted it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Generated (possibly cancelled part way).
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Counts and timings.
        usage: Usage,
        /// Chat messages dropped from the front to fit the context.
        trimmed_messages: usize,
    },
    /// Refused or failed; the sink has been told.
    Failed(RequestError),
    /// The sink could not be written: the client is gone.
    Disconnected,
}
