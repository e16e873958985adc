//! The inference thread's work: it takes jobs from the queue one at a time
//! and runs each on the one session: the prompt's tokens (chat turns dropped
//! to fit if asked), the cached prefix reused, the runtime's generation loop
//! writing to the job's sink, the bias feedback after the response (and the
//! response generated again when its signal is over the hard limit), and the
//! outcome sent back to the submitter.

use super::bias::{BiasFeedback, BiasStatus};
use super::wire::{FinishReason, GenerationRequest, Outcome, Prompt, RequestError, TokenSink, Usage};
use super::Stats;
use bramble_runtime::allocations;
use bramble_runtime::chat::{ChatMessage, ChatTemplate};
use bramble_runtime::session::{Finish, GenerationSink, Session};
use bramble_runtime::tokenizer::Tokenizer;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A queued request: what to generate, where to write it, its cancel flag,
/// and where to send its outcome.
pub(super) struct Job {
    pub(super) request: GenerationRequest,
    pub(super) sink: Box<dyn TokenSink>,
    pub(super) cancel: Arc<AtomicBool>,
    pub(super) done: mpsc::Sender<Outcome>,
    pub(super) submitted: Instant,
}

/// What the inference thread shares with the engine's handles.
#[derive(Clone)]
pub(super) struct Shared {
    /// Counters.
    pub(super) stats: Arc<Stats>,
    /// Set on SIGTERM: the thread ends once the queue is empty.
    pub(super) stopping: Arc<AtomicBool>,
    /// Set when draining ends: running and queued jobs are cancelled.
    pub(super) cancel_all: Arc<AtomicBool>,
    /// The bias feedback as reported, updated after each response.
    pub(super) bias_status: Arc<Mutex<BiasStatus>>,
}

impl Shared {
    /// Zero counters, nothing stopping, the bias status off until the model loads.
    pub(super) fn new() -> Self {
        Self {
            stats: Arc::default(),
            stopping: Arc::default(),
            cancel_all: Arc::default(),
            bias_status: Arc::new(Mutex::new(BiasStatus::off())),
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

/// The inference thread once the model is loaded: the session and all a
/// generation needs.
pub(super) struct Worker<'m> {
    session: Session<'m>,
    bias: Option<BiasFeedback>,
    tokenizer: &'m Tokenizer,
    template: ChatTemplate,
    shared: Shared,
    /// Whether the process counts allocations (`brambled` does; a library user may not).
    counting_allocations: bool,
}

impl<'m> Worker<'m> {
    /// A worker generating on `session`, rendering chats with `template`.
    pub(super) fn new(
        session: Session<'m>,
        tokenizer: &'m Tokenizer,
        template: ChatTemplate,
        bias: Option<BiasFeedback>,
        shared: Shared,
    ) -> Self {
        Self { session, bias, tokenizer, template, shared, counting_allocations: allocations::counting() }
    }

    /// Runs jobs until the queue is closed, or until a tick passes with none
    /// once the daemon is stopping.
    pub(super) fn run(&mut self, jobs: Receiver<Job>) {
        loop {
            let job = match jobs.recv_timeout(Duration::from_millis(100)) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) if self.shared.stopping.load(Ordering::SeqCst) => return,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            self.shared.stats.running.store(true, Ordering::SeqCst);
            self.shared.stats.queued.fetch_sub(1, Ordering::SeqCst);
            let Job { request, mut sink, cancel, done, submitted } = job;
            let outcome = self.generate(&request, sink.as_mut(), &cancel, submitted);
            match &outcome {
                Outcome::Finished { reason, usage, .. } => {
                    self.shared.stats.served.fetch_add(1, Ordering::Relaxed);
                    self.shared.stats.generated_tokens.fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
                    if *reason == FinishReason::Cancelled {
                        self.shared.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Outcome::Failed(_) => {
                    self.shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Disconnected => {
                    self.shared.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
            // The sink (and its handle on the client) goes before the waiter is told.
            drop(sink);
            self.shared.stats.running.store(false, Ordering::SeqCst);
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

    /// Runs one job: the prompt checked against the context, the cached
    /// prefix reused, the reply generated into `sink` (again, from the whole
    /// prompt, while the bias signal is over the hard limit and the sink can
    /// forget what it got), and the sink told how it ended.
    fn generate(
        &mut self,
        request: &GenerationRequest,
        sink: &mut dyn TokenSink,
        cancel: &AtomicBool,
        submitted: Instant,
    ) -> Outcome {
        let mut usage = Usage { queued: submitted.elapsed(), ..Usage::default() };
        let cancel_all = Arc::clone(&self.shared.cancel_all);
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
                if let Err(e) = self.session.apply_feedback(&bias.feedback) {
                    return fail(sink, RequestError::new(500, "server_error", format!("bias constraint: {e}")));
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
                self.shared.stats.decode_allocations.fetch_add(generated.decode_allocations, Ordering::Relaxed);
                self.shared.stats.last_decode_allocations.store(generated.decode_allocations, Ordering::Relaxed);
                self.shared.stats.decode_loops.fetch_add(1, Ordering::Relaxed);
            }
            let reason = match generated.finish {
                Finish::EndOfGeneration => FinishReason::EndOfTurn,
                Finish::Stop => FinishReason::Stop,
                Finish::Length => FinishReason::Length,
                Finish::Context => FinishReason::Context,
                Finish::Cancelled => FinishReason::Cancelled,
                Finish::SinkStopped => return Outcome::Disconnected,
            };
            // The answer: the tokens this run generated, the last of the
            // history but an end-of-generation token (a slice, no allocation).
            let answer_end = self.session.history().len() - usize::from(generated.finish == Finish::EndOfGeneration);
            usage.bias_signal = self.after_response(answer_end.saturating_sub(generated.tokens)..answer_end);
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

    /// After a response whose generated tokens are `answer` of the session's
    /// history: its bias signal, the loop run (see
    /// [`BiasFeedback::after_response`]). `None` when the feedback is off.
    fn after_response(&mut self, answer: std::ops::Range<usize>) -> Option<f32> {
        let bias = self.bias.as_mut()?;
        let constraint = self.session.model().bias()?;
        let answer = &self.session.history()[answer];
        Some(bias.after_response(self.session.projections(), constraint, answer, &self.shared.bias_status))
    }

    fn finish(&self, sink: &mut dyn TokenSink, reason: FinishReason, usage: Usage, trimmed_messages: usize) -> Outcome {
        match sink.finish(reason, &usage) {
            Ok(()) => Outcome::Finished { reason, usage, trimmed_messages },
            Err(_) => Outcome::Disconnected,
        }
    }
}
