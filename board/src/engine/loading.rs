//! Loading the model: the image opened and its tokenizer built on the thread
//! that starts the engine; the model, its KV mode, its bias feedback and the
//! session made on the inference thread, which owns them, checked against
//! `memory_limit` before the state's memory is first touched, then made resident.

use super::bias::{load_bias, BiasFeedback};
use super::memory::memory_needed;
use super::worker::{Job, Shared, Worker};
use crate::config::{BiasConfig, Config, Feedback};
use bramble_runtime::bias::FeedbackLoop;
use bramble_runtime::chat::ChatTemplate;
use bramble_runtime::kernels::Kernels;
use bramble_runtime::kv::KvMode;
use bramble_runtime::model::Model;
use bramble_runtime::sampler::SamplerConfig;
use bramble_runtime::session::Session;
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::ModelImage;
use std::sync::mpsc::{Receiver, Sender};

/// The opened image and the settings to load it with, handed to the inference thread.
pub(super) struct Loader {
    /// The image's file name without `.bramble`.
    pub(super) name: String,
    /// KV-cache positions: the configured context, at most the model's.
    pub(super) context: usize,
    image: &'static ModelImage,
    /// The image file's size, mapped, for the memory check.
    image_bytes: u64,
    tokenizer: &'static Tokenizer,
    threads: usize,
    kv: KvMode,
    bias: BiasConfig,
    /// The resolved `memory_limit` and what set it, or `None` when off.
    memory_limit: Option<(u64, String)>,
}

/// What the inference thread tells the starting thread: the model's one-line
/// summary once it is ready, or why it could not be loaded.
pub(super) type Ready = Sender<Result<String, String>>;

impl Loader {
    /// Resolves `config.memory_limit`, opens `config.model` and builds its tokenizer.
    pub(super) fn open(config: &Config) -> Result<Self, String> {
        let path = &config.model;
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
        Ok(Self {
            name,
            context,
            image,
            image_bytes,
            tokenizer,
            threads: config.threads,
            kv: config.kv,
            bias: config.bias.clone(),
            memory_limit,
        })
    }

    /// The inference thread's body: loads the model and its session, tells
    /// `ready` the model's summary (or why it failed, and returns), then runs
    /// the jobs.
    pub(super) fn run(self, shared: Shared, jobs: Receiver<Job>, ready: Ready) {
        let (model, feedback) = match self.model() {
            Ok(loaded) => loaded,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        match self.worker(&model, feedback, shared) {
            Ok((mut worker, summary)) => {
                let _ = ready.send(Ok(summary));
                worker.run(jobs);
            }
            Err(e) => {
                let _ = ready.send(Err(e));
            }
        }
    }

    /// The model on its threads with its KV mode, and its bias feedback (`None` when off).
    fn model(&self) -> Result<(Model<'static>, Option<(Feedback, FeedbackLoop)>), String> {
        let (image, kv) = (self.image, self.kv);
        let mut model = Model::with_options(image, Kernels::detect(), self.threads)
            .map_err(|e| format!("{}: {e}", image.path().display()))?;
        model.set_kv_mode(kv).map_err(|e| format!("kv = \"{kv}\": {e}"))?;
        let feedback = load_bias(&mut model, image, &self.bias)?;
        Ok((model, feedback))
    }

    /// The session on `model`, within `memory_limit` and resident, the
    /// worker that runs on it, and the model's summary.
    fn worker<'m>(
        &self,
        model: &'m Model<'static>,
        feedback: Option<(Feedback, FeedbackLoop)>,
        shared: Shared,
    ) -> Result<(Worker<'m>, String), String> {
        let (image, context, kv, threads) = (self.image, self.context, self.kv, self.threads);
        let mut session = Session::try_new(model, self.tokenizer, context, SamplerConfig::default())
            .map_err(|e| format!("{}: context {context}: {e}", image.path().display()))?;
        // The state's pages are not written yet: refuse before they are.
        let needed = memory_needed(self.image_bytes, &session);
        needed.check(self.memory_limit.as_ref(), context, kv)?;
        // Then make them resident, so a cache that fits now cannot fail for memory mid-reply.
        session.commit_memory();
        let c = &model.config;
        let summary = format!(
            "{} dim {} layers {} vocab {}, {:.1} MiB of weights, kernels {}, {threads} threads, context {context}, kv {kv}, {:.1} MiB of state",
            model.architecture.family.name(),
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
            let (bias, status) = BiasFeedback::new(mode, feedback, &self.bias);
            *shared.bias_status.lock().unwrap_or_else(|e| e.into_inner()) = status;
            bias
        });
        Ok((Worker::new(session, self.tokenizer, template, bias, shared), summary))
    }
}
