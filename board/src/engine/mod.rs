//! The inference thread: it owns the model and one [`Session`] and runs one
//! generation at a time, taking jobs from a bounded FIFO queue. A job carries
//! its request, a [`TokenSink`] that writes straight to the client, and a
//! cancel flag checked before every token.
//!
//! Every request, whichever transport it came from, is a token sequence to
//! continue; the session keeps the KV cache of the last one, so a request that
//! extends the previous conversation (the console's next turn, a chat client
//! resending its history) only runs its new tokens.
//!
//! | module | what |
//! |---|---|
//! | `wire` | what the protocols share with the engine: the request, the sink, the usage, the outcome, the error |
//! | `loading` | the image opened, the model and its session loaded on the inference thread |
//! | `memory` | what the model takes in memory, against `memory_limit` |
//! | `bias` | the bias feedback: loading it, running it after each response, its status |
//! | `worker` | the inference thread's loop: one job at a time on the one session |
//!
//! This module holds the handle the connections use: [`Engine`], its queue and counters.
//!
//! [`Session`]: bramble_runtime::session::Session

mod bias;
mod loading;
mod memory;
mod wire;
mod worker;

pub use bias::BiasStatus;
pub use wire::{sampler_config, FinishReason, GenerationRequest, Outcome, Prompt, RequestError, TokenSink, Usage};

use crate::config::Config;
use loading::Loader;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use worker::{Job, Shared};

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
        let loader = Loader::open(config)?;
        let (name, context, queue_depth) = (loader.name.clone(), loader.context, config.limits.queue_depth);
        let (queue, jobs) = mpsc::sync_channel::<Job>(queue_depth);
        let shared = Shared::new();
        let (ready_sender, ready) = mpsc::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("inference".to_string())
            .spawn(move || loader.run(thread_shared, jobs, ready_sender))
            .map_err(|e| format!("cannot start the inference thread: {e}"))?;
        let summary = ready.recv().map_err(|_| "the inference thread died while loading".to_string())??;
        let info = Arc::new(ModelInfo { name, context, summary });
        let Shared { stats, stopping, cancel_all, bias_status } = shared;
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
