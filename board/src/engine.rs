//! The inference thread: it owns the model and one [`Session`] and runs one
//! generation at a time, taking jobs from a bounded FIFO queue. A job carries
//! its request, a [`TokenSink`] that writes straight to the client, and a
//! cancel flag checked before every token.
//!
//! Every request, whichever transport it came from, is a token sequence to
//! continue; the session keeps the KV cache of the last one, so a request that
//! extends the previous conversation (the console's next turn, a chat client
//! resending its history) only runs its new tokens.

use crate::config::{gib, BiasConfig, Config, Feedback, SamplingDefaults};
use bramble_runtime::allocations;
use bramble_runtime::bias::FeedbackLoop;
use bramble_runtime::chat::{ChatMessage, ChatTemplate};
use bramble_runtime::kernels::Kernels;
use bramble_runtime::kv::KvMode;
use bramble_runtime::model::Model;
use bramble_runtime::sampler::SamplerConfig;
use bramble_runtime::session::{Finish, GenerationSink, Session};
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::ModelImage;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

struct Job {
    request: GenerationRequest,
    sink: Box<dyn TokenSink>,
    cancel: Arc<AtomicBool>,
    done: mpsc::Sender<Outcome>,
    submitted: Instant,
}

/// What the model is, for `/v1/models`, `/health` and the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The image's file name without `.bramble`.
    pub name: String,
    /// KV-cache positions.
    pub context: usize,
    /// A one-line description (dimensions, kernels, threads).
    pub summary: String,
}

/// Counters shared by the engine and everyone who reports on it.
#[derive(Debug, Default)]
pub struct Stats {
    /// Jobs waiting in the queue.
    pub queued: AtomicUsize,
    /// Whether a job is running.
    pub running: AtomicBool,
    /// Generations finished (cancelled ones included).
    pub served: AtomicU64,
    /// Requests refused busy.
    pub refused: AtomicU64,
    /// Requests that failed (bad prompt, model error).
    pub failed: AtomicU64,
    /// Generations cancelled.
    pub cancelled: AtomicU64,
    /// Tokens generated, all requests.
    pub generated_tokens: AtomicU64,
    /// Heap allocations in the decode loops of all generations (see [`Usage::decode_allocations`]).
    pub decode_allocations: AtomicU64,
    /// Those of the last generation.
    pub last_decode_allocations: AtomicU64,
    /// Generations whose decode-loop allocations were counted.
    pub decode_loops: AtomicU64,
}

/// The bias feedback as `/bias` reports it; the inference thread updates it after each response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BiasStatus {
    /// `off`, `static` or `adaptive` (`auto` resolved).
    pub mode: &'static str,
    /// The weights in force, one a layer (empty when off).
    pub weights: Vec<f32>,
    /// The image's predefined weights, which the loop decays back toward.
    pub predefined: Vec<f32>,
    /// The last signals, oldest first.
    pub recent: Vec<f32>,
    /// Responses seen (restored ones included).
    pub responses: u64,
    /// The loop's target signal: above it the weights rise.
    pub target: f32,
    /// Signal above which a response is regenerated (when regeneration is on).
    pub hard_limit: f32,
    /// How the loop reads a response (`spread` or `mean-lean`, the section's).
    pub signal: &'static str,
    /// Where the state persists, if it does.
    pub state: Option<std::path::PathBuf>,
}

impl BiasStatus {
    /// `/bias`'s JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "feedback": self.mode,
            "weights": self.weights,
            "predefined_weights": self.predefined,
            "recent_signals": self.recent,
            "responses": self.responses,
            "target": self.target,
            "hard_limit": self.hard_limit,
            "signal": self.signal,
            "state": self.state.as_ref().map(|p| p.display().to_string()),
        })
    }

    /// The console's few lines.
    pub fn text(&self) -> String {
        let list = |v: &[f32], signed: bool| {
            v.iter().map(|x| if signed { format!("{x:+.2}") } else { format!("{x:.2}") }).collect::<Vec<_>>().join(" ")
        };
        let mut text = format!("bias feedback: {}", self.mode);
        if self.mode == "off" {
            text.push_str(
                " (the image has no bias section, or feedback is off)
",
            );
            return text;
        }
        text.push_str(&format!(
            ", {} responses, {} signal, target {:.3}, hard limit {:.3}",
            self.responses, self.signal, self.target, self.hard_limit
        ));
        if let Some(state) = &self.state {
            text.push_str(&format!(", state {}", state.display()));
        }
        text.push_str(&format!(
            "
weights ({} layers): {}
predefined weights:  {}
",
            self.weights.len(),
            list(&self.weights, false),
            list(&self.predefined, false)
        ));
        if self.recent.is_empty() {
            text.push_str(
                "recent signals: none yet
",
            );
        } else {
            text.push_str(&format!(
                "recent signals (oldest first): {}
",
                list(&self.recent, true)
            ));
        }
        text
    }
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The queue is full.
    Busy,
    /// The daemon is shutting down.
    ShuttingDown,
}

impl Refusal {
    /// The error to send the client.
    pub fn error(self, queue_depth: usize) -> RequestError {
        match self {
            Refusal::Busy => RequestError::new(
                503,
                "server_busy",
                format!("busy: one generation is running and {queue_depth} are queued; try again later"),
            ),
            Refusal::ShuttingDown => RequestError::new(503, "server_shutting_down", "the daemon is shutting down"),
        }
    }
}

/// A handle to the inference thread; cheap to clone, one per connection.
#[derive(Clone)]
pub struct Engine {
    queue: SyncSender<Job>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// The model.
    pub info: Arc<ModelInfo>,
    /// Set on SIGTERM: new jobs are refused.
    pub stopping: Arc<AtomicBool>,
    /// Set when draining ends: running and queued jobs are cancelled.
    pub cancel_all: Arc<AtomicBool>,
    /// Queue depth, for messages.
    pub queue_depth: usize,
    /// The bias feedback.
    pub bias: Arc<Mutex<BiasStatus>>,
}

impl Engine {
    /// Opens `config.model` and starts the inference thread with a model on
    /// `threads` threads, a KV cache of `context` positions stored as `kv`,
    /// a queue of `limits.queue_depth` and the bias feedback of `bias`.
    /// Returns when the model is ready, or with an error when it failed to
    /// load or its weights and state would exceed `memory_limit` (checked
    /// before the state's memory is first touched).
    pub fn start(config: &Config) -> Result<(Engine, std::thread::JoinHandle<()>), String> {
        let (path, threads, queue_depth, bias, kv) =
            (&config.model, config.threads, config.limits.queue_depth, &config.bias, config.kv);
        let memory_limit = config.memory_limit.resolve(std::fs::read_to_string("/proc/meminfo").ok().as_deref())?;
        let image = ModelImage::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let image_bytes = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.len();
        let context = config.context.min(image.config().context_length as usize).max(2);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".bramble").to_string())
            .unwrap_or_else(|| "model".to_string());
        // The image lives as long as the process; leaking it gives the model and
        // session on the inference thread a `'static` borrow.
        let image: &'static ModelImage = Box::leak(Box::new(image));
        let tokenizer = Tokenizer::new(image.vocab()).map_err(|e| format!("{}: tokenizer: {e}", path.display()))?;
        let tokenizer: &'static Tokenizer = Box::leak(Box::new(tokenizer));
        let (queue, jobs) = mpsc::sync_channel::<Job>(queue_depth);
        let stats = Arc::new(Stats::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let cancel_all = Arc::new(AtomicBool::new(false));
        let (ready_sender, ready) = mpsc::channel::<Result<String, String>>();
        let thread_stats = Arc::clone(&stats);
        let thread_stopping = Arc::clone(&stopping);
        let thread_cancel_all = Arc::clone(&cancel_all);
        let bias_status = Arc::new(Mutex::new(BiasStatus { mode: "off", ..BiasStatus::default() }));
        let thread_bias_status = Arc::clone(&bias_status);
        let bias = bias.clone();
        let thread = std::thread::Builder::new()
            .name("inference".to_string())
            .spawn(move || {
                let mut model = match Model::with_options(image, Kernels::detect(), threads) {
                    Ok(model) => model,
                    Err(e) => {
                        let _ = ready_sender.send(Err(format!("{}: {e}", image.path().display())));
                        return;
                    }
                };
                if let Err(e) = model.set_kv_mode(kv) {
                    let _ = ready_sender.send(Err(format!("kv = \"{kv}\": {e}")));
                    return;
                }
                let feedback = match load_bias(&mut model, image, &bias) {
                    Ok(feedback) => feedback,
                    Err(e) => {
                        let _ = ready_sender.send(Err(e));
                        return;
                    }
                };
                let mut session = match Session::try_new(&model, tokenizer, context, SamplerConfig::default()) {
                    Ok(session) => session,
                    Err(e) => {
                        let _ = ready_sender.send(Err(format!("{}: context {context}: {e}", image.path().display())));
                        return;
                    }
                };
                // The state's pages are not written yet: refuse before they are.
                let needed = MemoryNeed { image_bytes, state_bytes: session.state_bytes() as u64, kv_bytes: session.kv_bytes() as u64 };
                if let Some((limit, why)) = &memory_limit {
                    if needed.total() > *limit {
                        let _ = ready_sender.send(Err(needed.refusal(*limit, why, context, kv)));
                        return;
                    }
                }
                // Then make them resident, so a cache that fits now cannot fail for memory mid-reply.
                session.commit_memory();
                let c = &model.config;
                let summary = format!(
                    "llama dim {} layers {} vocab {}, {:.1} MiB of weights, kernels {}, {threads} threads, context {context}, kv {kv}, {:.1} MiB of state",
                    c.dim,
                    c.n_layers,
                    c.vocab_size,
                    image.weight_bytes() as f64 / (1 << 20) as f64,
                    model.kernels.name,
                    needed.state_bytes as f64 / (1 << 20) as f64,
                );
                let template = ChatTemplate::new(image.chat_template(), image.vocab());
                // The status is in place before the daemon says it is ready, so
                // a `/bias` right after start never sees the placeholder.
                let bias = feedback.map(|(mode, feedback)| {
                    let status = BiasStatus {
                        mode: mode.name(),
                        weights: feedback.weights.clone(),
                        predefined: feedback.predefined.clone(),
                        recent: feedback.recent.clone(),
                        responses: feedback.responses,
                        target: feedback.target,
                        hard_limit: feedback.hard_limit,
                        signal: model.bias().map_or("", |c| c.signal.name()),
                        state: bias.state.clone().filter(|_| mode == Feedback::Adaptive),
                    };
                    *thread_bias_status.lock().unwrap_or_else(|e| e.into_inner()) = status;
                    BiasFeedback {
                        mode,
                        feedback,
                        regenerate: bias.regenerate,
                        state: bias.state.clone().filter(|_| mode == Feedback::Adaptive),
                    }
                });
                let _ = ready_sender.send(Ok(summary));
                let mut worker = Worker {
                    session,
                    bias,
                    bias_status: thread_bias_status,
                    tokenizer,
                    template,
                    stats: thread_stats,
                    cancel_all: thread_cancel_all,
                    counting_allocations: allocations::counting(),
                };
                worker.run(jobs, &thread_stopping);
            })
            .map_err(|e| format!("cannot start the inference thread: {e}"))?;
        let summary = ready.recv().map_err(|_| "the inference thread died while loading".to_string())??;
        let info = Arc::new(ModelInfo { name, context, summary });
        Ok((Engine { queue, stats, info, stopping, cancel_all, queue_depth, bias: bias_status }, thread))
    }

    /// Queues a job. On success, the returned receiver gets its [`Outcome`].
    pub fn submit(
        &self,
        request: GenerationRequest,
        sink: Box<dyn TokenSink>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Receiver<Outcome>, Refusal> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(Refusal::ShuttingDown);
        }
        let (done, outcome) = mpsc::channel();
        let job = Job { request, sink, cancel, done, submitted: Instant::now() };
        // Counted before sending so the inference thread's decrement never comes first.
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        match self.queue.try_send(job) {
            Ok(()) => Ok(outcome),
            Err(TrySendError::Full(_)) => {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                Err(Refusal::Busy)
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                Err(Refusal::ShuttingDown)
            }
        }
    }

    /// Heap allocations in the decode loops, as `/health` reports them:
    /// `{"total": N, "last": N}` over the generations so far (the promise is 0
    /// and 0; `last` is null before the first), or null when this process does
    /// not count allocations.
    pub fn decode_allocations(&self) -> serde_json::Value {
        if !bramble_runtime::allocations::counting() {
            return serde_json::Value::Null;
        }
        let loops = self.stats.decode_loops.load(Ordering::Relaxed);
        let last = (loops > 0).then(|| self.stats.last_decode_allocations.load(Ordering::Relaxed));
        serde_json::json!({
            "total": self.stats.decode_allocations.load(Ordering::Relaxed),
            "last": last,
        })
    }

    /// Whether nothing is running or queued.
    pub fn idle(&self) -> bool {
        self.stats.queued.load(Ordering::SeqCst) == 0 && !self.stats.running.load(Ordering::SeqCst)
    }
}

/// Applies the bias configuration to `model`: the image's bias section
/// loaded unless the feedback is off, and the loop (restored from the state
/// file for `adaptive`). Returns the resolved mode and its loop, or `None` when off.
/// What the model takes in memory, for the `memory_limit` check.
#[derive(Debug, Clone, Copy)]
struct MemoryNeed {
    /// The image file, mapped (its pages are resident once read).
    image_bytes: u64,
    /// The session's state: KV cache and run buffers.
    state_bytes: u64,
    /// The KV cache alone (part of `state_bytes`).
    kv_bytes: u64,
}

impl MemoryNeed {
    fn total(&self) -> u64 {
        self.image_bytes + self.state_bytes
    }

    /// The refusal, with the arithmetic and what to change.
    fn refusal(&self, limit: u64, why: &str, context: usize, kv: KvMode) -> String {
        format!(
            "the model does not fit: {:.2} GiB weights + {:.2} GiB KV cache (context {context}, kv {kv}) + {:.2} GiB \
             buffers = {:.2} GiB > {:.2} GiB ({why}); set a smaller context, {}a smaller model, or memory_limit",
            gib(self.image_bytes),
            gib(self.kv_bytes),
            gib(self.state_bytes - self.kv_bytes),
            gib(self.total()),
            gib(limit),
            if kv == KvMode::Q4 { "" } else { "kv = \"q4\", " },
        )
    }
}

fn load_bias(
    model: &mut Model<'_>,
    image: &ModelImage,
    bias: &BiasConfig,
) -> Result<Option<(Feedback, FeedbackLoop)>, String> {
    let path = image.path().display();
    let mode = match bias.feedback.resolve() {
        (_, Some(reason)) => {
            log::info!(
                "bias feedback off: {reason}; {path} is served without it (--feedback static|adaptive turns it on)"
            );
            if let Some(state) = &bias.state {
                log::warn!("bias.state {}: unused, the feedback is off", state.display());
            }
            return Ok(None);
        }
        (Feedback::Off, None) => return Ok(None),
        (mode, None) => mode,
    };
    let found = model.use_image_bias(image).map_err(|e| format!("{path}: bias section: {e}"))?;
    if !found {
        return Err(format!(
            "bias.feedback {mode}: {path} has no bias section; write one with `bramble bias-calibrate`, or use auto or off"
        ));
    }
    let constraint = model.bias().ok_or_else(|| format!("{path}: the bias section did not load"))?;
    let mut feedback = FeedbackLoop::new(constraint);
    if let Some(limit) = bias.hard_limit {
        feedback.hard_limit = limit;
    }
    if mode == Feedback::Adaptive {
        if let Some(state) = &bias.state {
            match feedback.restore(state) {
                Ok(true) => {
                    log::info!("bias state restored from {} ({} responses)", state.display(), feedback.responses)
                }
                Ok(false) => log::info!("bias state {}: none yet, starting from the image's weights", state.display()),
                Err(e) => return Err(format!("bias.state: {e}")),
            }
        }
    }
    log::info!("bias feedback {} over {} layers", mode.name(), feedback.weights.len());
    Ok(Some((mode, feedback)))
}

/// Waits for `outcome`, calling `check` every tick; when `check` says the
/// client is gone (or asked to cancel), sets `cancel` and keeps waiting for the
/// job to notice.
pub fn wait(outcome: &Receiver<Outcome>, cancel: &AtomicBool, mut check: impl FnMut() -> bool) -> Outcome {
    loop {
        match outcome.recv_timeout(Duration::from_millis(50)) {
            Ok(outcome) => return outcome,
            Err(RecvTimeoutError::Disconnected) => return Outcome::Disconnected,
            Err(RecvTimeoutError::Timeout) => {
                if !cancel.load(Ordering::SeqCst) && check() {
                    cancel.store(true, Ordering::SeqCst);
                }
            }
        }
    }
}

/// A [`TokenSink`] as the runtime's sink: a failed write (the client is gone) stops the generation.
struct SinkWriter<'s> {
    sink: &'s mut dyn TokenSink,
}

impl GenerationSink for SinkWriter<'_> {
    fn text(&mut self, piece: &str) -> ControlFlow<()> {
        match self.sink.text(piece) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    // A client that stopped reading: cancelled, so the others are served.
                    log::warn!("cancelling a generation: {e}");
                }
                ControlFlow::Break(())
            }
        }
    }
}

/// The inference thread's bias feedback.
struct BiasFeedback {
    /// `Static` or `Adaptive`.
    mode: Feedback,
    feedback: FeedbackLoop,
    /// Regenerations allowed per request.
    regenerate: usize,
    /// The state file (adaptive only).
    state: Option<std::path::PathBuf>,
}

struct Worker<'m> {
    session: Session<'m>,
    bias: Option<BiasFeedback>,
    bias_status: Arc<Mutex<BiasStatus>>,
    tokenizer: &'m Tokenizer,
    template: ChatTemplate,
    stats: Arc<Stats>,
    cancel_all: Arc<AtomicBool>,
    /// Whether the process counts allocations (`brambled` does; a library user may not).
    counting_allocations: bool,
}

impl Worker<'_> {
    fn run(&mut self, jobs: Receiver<Job>, stopping: &AtomicBool) {
        loop {
            let job = match jobs.recv_timeout(Duration::from_millis(100)) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) if stopping.load(Ordering::SeqCst) => return,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            self.stats.running.store(true, Ordering::SeqCst);
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            let Job { request, mut sink, cancel, done, submitted } = job;
            let outcome = self.generate(&request, sink.as_mut(), &cancel, submitted);
            match &outcome {
                Outcome::Finished { reason, usage, .. } => {
                    self.stats.served.fetch_add(1, Ordering::Relaxed);
                    self.stats.generated_tokens.fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
                    if *reason == FinishReason::Cancelled {
                        self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Outcome::Failed(_) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Disconnected => {
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
            // The sink (and its handle on the client) goes before the waiter is told.
            drop(sink);
            self.stats.running.store(false, Ordering::SeqCst);
            let _ = done.send(outcome);
        }
    }

    /// The prompt's tokens, with chat turns dropped from the front if asked
    /// to fit; returns the tokens and how many messages were dropped.
    fn prompt_tokens(&self, request: &GenerationRequest) -> Result<(Vec<u32>, usize), RequestError> {
        let context = self.session.context();
        match &request.prompt {
            Prompt::Text(text) => Ok((self.tokenizer.encode(text, true, false), 0)),
            Prompt::Chat { messages, trim_to_fit } => {
                // Room to reply: the request's max_tokens, but never more than half the context.
                let reserve = request.max_tokens.min(context / 2).max(1);
                let mut first = usize::from(messages.first().is_some_and(|m| m.role == "system"));
                let system = &messages[..first];
                loop {
                    let kept: Vec<ChatMessage> = system.iter().chain(&messages[first..]).cloned().collect();
                    let tokens = self
                        .tokenizer
                        .encode_chat(&self.template, &kept, true)
                        .map_err(|e| RequestError::invalid(Some("messages"), e.to_string()))?;
                    let dropped = first - system.len();
                    if !*trim_to_fit || tokens.len() + reserve <= context || first + 1 >= messages.len() {
                        return Ok((tokens, dropped));
                    }
                    first += 1;
                }
            }
        }
    }

    fn generate(
        &mut self,
        request: &GenerationRequest,
        sink: &mut dyn TokenSink,
        cancel: &AtomicBool,
        submitted: Instant,
    ) -> Outcome {
        let mut usage = Usage { queued: submitted.elapsed(), ..Usage::default() };
        let cancel_all = Arc::clone(&self.cancel_all);
        let cancelled = || cancel.load(Ordering::SeqCst) || cancel_all.load(Ordering::SeqCst);
        if !sink.client_present() {
            return Outcome::Disconnected;
        }
        if cancelled() {
            return match sink.finish(FinishReason::Cancelled, &usage) {
                Ok(()) => Outcome::Finished { reason: FinishReason::Cancelled, usage, trimmed_messages: 0 },
                Err(_) => Outcome::Disconnected,
            };
        }
        let fail = |sink: &mut dyn TokenSink, error: RequestError| match sink.fail(&error) {
            Ok(()) => Outcome::Failed(error),
            Err(_) => Outcome::Disconnected,
        };
        let (tokens, trimmed_messages) = match self.prompt_tokens(request) {
            Ok(prompt) => prompt,
            Err(error) => return fail(sink, error),
        };
        let context = self.session.context();
        if tokens.is_empty() {
            return fail(
                sink,
                RequestError::invalid(Some("prompt"), "the prompt is empty and the model adds no BOS token"),
            );
        }
        if tokens.len() >= context {
            return fail(
                sink,
                RequestError::invalid(
                    Some("prompt"),
                    format!(
                        "the prompt is {} tokens; the context holds {context}, and one position must be left to reply",
                        tokens.len()
                    ),
                ),
            );
        }
        usage.prompt_tokens = tokens.len();

        *self.session.sampler_config() = request.sampling;
        if request.reseed {
            // Only a reset restarts the sampler's random sequence; it empties the cache too.
            self.session.reset();
        }
        // The cached prefix this prompt shares with the last one is not run again.
        let cached = self.session.reuse_prefix(&tokens);
        usage.cached_tokens = cached;
        if sink.start(tokens.len()).is_err() {
            return Outcome::Disconnected;
        }
        let mut first = cached;
        loop {
            // This response's projections only (the prompt's new tokens and the reply), under the loop's weights.
            if let Some(bias) = &self.bias {
                self.session.reset_projections();
                if let Err(e) = self.session.set_bias_weights(&bias.feedback.weights) {
                    return fail(sink, RequestError::new(500, "server_error", format!("bias weights: {e}")));
                }
            }

            // The runtime's generation loop; its decode loop allocates nothing,
            // and neither may the sink (the text stream's buffer and the sink's
            // were sized before it).
            let mut writer = SinkWriter { sink };
            let generated =
                self.session.generate(&tokens[first..], request.max_tokens, &request.stop, &cancelled, &mut writer);
            let sink = writer.sink;
            let generated = match generated {
                Ok(generated) => generated,
                Err(e) => {
                    self.session.reset();
                    return fail(sink, RequestError::new(500, "server_error", format!("the model failed: {e}")));
                }
            };
            usage.prefill += generated.prefill;
            usage.decode += generated.decode;
            usage.completion_tokens = generated.tokens;
            if self.counting_allocations {
                usage.decode_allocations = Some(generated.decode_allocations);
                self.stats.decode_allocations.fetch_add(generated.decode_allocations, Ordering::Relaxed);
                self.stats.last_decode_allocations.store(generated.decode_allocations, Ordering::Relaxed);
                self.stats.decode_loops.fetch_add(1, Ordering::Relaxed);
            }
            let reason = match generated.finish {
                Finish::EndOfGeneration => FinishReason::EndOfTurn,
                Finish::Stop => FinishReason::Stop,
                Finish::Length => FinishReason::Length,
                Finish::Context => FinishReason::Context,
                Finish::Cancelled => FinishReason::Cancelled,
                Finish::SinkStopped => return Outcome::Disconnected,
            };
            usage.bias_signal = self.after_response();
            // Over the hard limit: the same prompt again, under the weights the
            // loop has just raised, unless the text is already with the client.
            let over = match (&self.bias, usage.bias_signal) {
                (Some(bias), Some(signal)) => {
                    bias.feedback.exceeds_hard_limit(signal) && usage.bias_regenerations < bias.regenerate
                }
                _ => false,
            };
            if over && reason != FinishReason::Cancelled && sink.discard() {
                usage.bias_regenerations += 1;
                log::info!(
                    "bias signal {:+.3} over the hard limit: regenerating ({} of at most {})",
                    usage.bias_signal.unwrap_or_default(),
                    usage.bias_regenerations,
                    self.bias.as_ref().map_or(0, |b| b.regenerate)
                );
                // The whole prompt again, so its positions too are under the new weights.
                self.session.truncate(0);
                first = 0;
                continue;
            }
            return self.finish(sink, reason, usage, trimmed_messages);
        }
    }

    /// After a response: its bias signal; under `adaptive` the weights
    /// adjusted and the state saved. `None` when the feedback is off.
    fn after_response(&mut self) -> Option<f32> {
        let bias = self.bias.as_mut()?;
        let projections = self.session.projections();
        let constraint = self.session.model().bias()?;
        let feedback = &mut bias.feedback;
        let signal = match bias.mode {
            Feedback::Adaptive => {
                let signal = feedback.after_response(projections, constraint);
                if let Some(state) = &bias.state {
                    if let Err(e) = feedback.save(state) {
                        log::error!("bias.state: cannot save: {e}");
                    }
                }
                signal
            }
            _ => {
                // Static: the signal is reported and remembered; the weights stay.
                let signal = feedback.signal(projections, constraint);
                if projections.tokens > 0 {
                    feedback.responses += 1;
                    if feedback.recent.len() == bramble_runtime::bias::RECENT {
                        feedback.recent.remove(0);
                    }
                    feedback.recent.push(signal);
                }
                signal
            }
        };
        if feedback.exceeds_hard_limit(signal) {
            log::warn!("bias signal {signal:+.3} is over the hard limit {:+.3}", feedback.hard_limit);
        }
        let mut status = self.bias_status.lock().unwrap_or_else(|e| e.into_inner());
        status.weights.clone_from(&feedback.weights);
        status.recent.clone_from(&feedback.recent);
        status.responses = feedback.responses;
        drop(status);
        Some(signal)
    }

    fn finish(&self, sink: &mut dyn TokenSink, reason: FinishReason, usage: Usage, trimmed_messages: usize) -> Outcome {
        match sink.finish(reason, &usage) {
            Ok(()) => Outcome::Finished { reason, usage, trimmed_messages },
            Err(_) => Outcome::Disconnected,
        }
    }
}
