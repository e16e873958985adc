//! `bramble calibrate`: R-Sparse (Zhang et al., ICLR 2025) plans for an image.
//!
//! For each of the seven projections of every layer (`W`, `rows × cols`):
//!
//! 1. dequantize `W`, take the column norms `c_i = ‖W[:, i]‖₂` and a rank-`r`
//!    factorization `W ≈ U (S Vᵀ)` (randomized SVD with oversampling and power
//!    iterations, `faer` for the QR and the small dense SVD);
//! 2. run the image's own (quantized) model over the calibration text and keep
//!    a fixed-size uniform sample of each module input's entries `(x_i, i)`
//!    (reservoir sampling, Algorithm L): one sample per input site serves every
//!    module that reads it (q, k and v share one), and memory stays bounded for
//!    any model or text length;
//! 3. `τ` = the quantile of `|x_i · c_i|` over the sample below which a share
//!    `1 − kept / cols` of the entries fall;
//! 4. with `--search`, an evolutionary search over per-layer `(s, α)` whose
//!    fitness is the sparse model's perplexity on the calibration text, under
//!    the model-level budget (the weighted mean sparsity equals the target).
//!
//! The output image is the input's sections and tensors, byte for byte, plus
//! the `rsparse` section (`models/FORMAT.md`), written under a temporary name
//! and renamed into place when complete.

use crate::convert::{convert, ConvertOptions, QuantTarget};
use crate::generate::perplexity;
use crate::source::ModelSource;
use anyhow::{bail, Context, Result};
use bramble_runtime::image::{ImageWriter, TensorInfo};
use bramble_runtime::model::{Logits, Matrix, Model, Site, SparseMode};
use bramble_runtime::quant::{self, Encoding};
use bramble_runtime::rng::SplitMix64;
use bramble_runtime::rsparse::{self, Rsparse, SparseModule};
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::ModelImage;
use faer::{Mat, MatRef};
use half::f16;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// The seven projections of a layer, as the `Model`'s sparse path names them.
pub const PROJECTIONS: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

/// The input site each projection reads.
fn site_of(projection: usize) -> Site {
    [Site::AttentionInput, Site::AttentionOutput, Site::FfnInput, Site::FfnHidden]
        .into_iter()
        .find(|site| site.modules().contains(&PROJECTIONS[projection]))
        .expect("every projection reads one of the four sites")
}

/// The site's index among the four module inputs (`None` for the residual stream).
fn site_index(site: Site) -> Option<usize> {
    match site {
        Site::AttentionInput => Some(0),
        Site::AttentionOutput => Some(1),
        Site::FfnInput => Some(2),
        Site::FfnHidden => Some(3),
        Site::Residual => None,
    }
}

/// The evolutionary search's settings.
#[derive(Debug, Clone)]
pub struct SearchOptions {
    /// Candidates per generation (32 in the paper).
    pub population: usize,
    /// Generations (5 in the paper).
    pub generations: usize,
    /// Calibration tokens each candidate's perplexity is measured on.
    pub tokens: usize,
}

/// What to calibrate for.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// Model-level sparsity `s`, in `[0, 1)`.
    pub sparsity: f32,
    /// Share `α` of the kept budget spent on exact channels (1: pure input sparsity).
    pub alpha: f32,
    /// Calibration tokens (the first ones of the text).
    pub tokens: usize,
    /// Window length: the model runs the text in windows of this many tokens.
    pub ctx: usize,
    /// Tokens per forward pass.
    pub batch: usize,
    /// Entries kept per input site to estimate the thresholds.
    pub samples: usize,
    /// Extra random directions of the randomized SVD.
    pub oversample: usize,
    /// Power iterations of the randomized SVD.
    pub power_iterations: usize,
    /// Per-layer `(s, α)` search, if wanted.
    pub search: Option<SearchOptions>,
    /// Threads for the forward passes and the SVD.
    pub threads: usize,
    /// Random seed (SVD directions, reservoirs, search).
    pub seed: u64,
    /// Show progress bars on stderr.
    pub progress: bool,
    /// How the output stores the sparse modules' weights.
    pub layout: SparseLayout,
}

/// How a calibrated image stores the weights of the modules its plan covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SparseLayout {
    /// Channel-major (`q8c`/`q4c`, `models/FORMAT.md`): each input channel's
    /// values contiguous, so the sparse kernels read only the active
    /// channels. Q8 and Q4 matrices whose rows are whole tiles of 32; other
    /// encodings stay as they are. Dense products (prompts, `--sparsity off`)
    /// run on the same tensors, a token at a time.
    #[default]
    Channels,
    /// As the input stores them, channel-major tensors put back in row
    /// order (interleaved by four, the converter's default): the sparse path
    /// then runs the dense kernels on `x ⊙ m` and reads every weight.
    Rows,
}

impl SparseLayout {
    /// `channels` or `rows`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "channels" => Ok(Self::Channels),
            "rows" => Ok(Self::Rows),
            other => anyhow::bail!("unknown sparse layout {other:?}: expected channels or rows"),
        }
    }
}

impl Default for CalibrateOptions {
    fn default() -> Self {
        Self {
            sparsity: 0.5,
            alpha: 0.95,
            tokens: 4096,
            ctx: 256,
            batch: 64,
            samples: 1 << 17,
            oversample: 10,
            power_iterations: 2,
            search: None,
            threads: 1,
            seed: 1,
            layout: SparseLayout::Channels,
            progress: false,
        }
    }
}

/// One module's plan, as reported.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModuleReport {
    /// Weight tensor.
    pub name: String,
    /// `s`.
    pub sparsity: f32,
    /// `α`.
    pub alpha: f32,
    /// Channels computed exactly.
    pub kept: usize,
    /// `r`.
    pub rank: usize,
    /// `τ`.
    pub threshold: f32,
}

/// The search's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SearchReport {
    /// Candidates evaluated.
    pub evaluations: usize,
    /// Perplexity of the uniform plan on the search tokens.
    pub uniform_perplexity: f64,
    /// Perplexity of the best plan found.
    pub best_perplexity: f64,
    /// Per layer `(s, α)` of the best plan.
    pub layers: Vec<(f32, f32)>,
}

/// What a calibration did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CalibrateReport {
    /// The requested model-level sparsity.
    pub target: f32,
    /// The plan's model-level sparsity: module sparsities weighted by weight count.
    pub achieved: f64,
    /// Calibration tokens run through the model.
    pub tokens: usize,
    /// Per module.
    pub modules: Vec<ModuleReport>,
    /// The search, if one ran.
    pub search: Option<SearchReport>,
    /// Seconds spent on column norms and SVDs.
    pub svd_seconds: f64,
    /// Seconds spent running the model for activations.
    pub activation_seconds: f64,
    /// Seconds spent searching.
    pub search_seconds: f64,
    /// Size of the written image.
    pub image_bytes: u64,
}

/// The calibration's draws (reproducible SVD directions, reservoirs and
/// searches): the workspace's [`SplitMix64`] with the distributions the
/// search needs.
#[derive(Debug, Clone)]
pub struct Rng(SplitMix64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64(seed ^ SplitMix64::GOLDEN_GAMMA))
    }
    /// Uniform 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in (0, 1): never 0, so its logarithm is finite.
    pub fn uniform(&mut self) -> f64 {
        self.0.next_open_f64()
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        (-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
}

/// `c_i = ‖W[:, i]‖₂` of a row-major `rows × cols` matrix.
pub fn column_norms(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut sums = vec![0f64; cols];
    for row in w.chunks_exact(cols).take(rows) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v as f64 * v as f64;
        }
    }
    sums.into_iter().map(|s| s.sqrt() as f32).collect()
}

/// A rank-`r` factorization `W ≈ U · SV`.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `U_r`, `rows × rank`, row-major.
    pub u: Vec<f32>,
    /// `S_r V_rᵀ`, `rank × cols`, row-major.
    pub sv: Vec<f32>,
    /// The leading singular values found (at least `rank` of them).
    pub singular_values: Vec<f32>,
}

fn row_major(m: MatRef<'_, f32>) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)]);
        }
    }
    out
}

/// The best rank-`rank` approximation of the row-major `rows × cols` matrix
/// `w`. When `rank + oversample` is a sizeable part of the smaller side, a
/// full thin SVD is cheaper and exact; otherwise a randomized SVD (Halko,
/// Martinsson, Tropp 2011): a Gaussian sketch `W Ω` of `rank + oversample`
/// columns, `power_iterations` rounds of `W Wᵀ` (re-orthonormalized each
/// time, so small singular values are not lost to rounding), then the exact
/// SVD of the small `Qᵀ W`.
pub fn low_rank(
    w: &[f32],
    rows: usize,
    cols: usize,
    rank: usize,
    oversample: usize,
    power_iterations: usize,
    seed: u64,
) -> Result<LowRank> {
    anyhow::ensure!(w.len() == rows * cols, "{} values for a {rows} × {cols} matrix", w.len());
    if rank == 0 {
        return Ok(LowRank { u: Vec::new(), sv: Vec::new(), singular_values: Vec::new() });
    }
    let rank = rank.min(rows.min(cols));
    let a = MatRef::from_row_major_slice(w, rows, cols);
    let sketch = rank + oversample;
    // U and S·Vᵀ of an SVD, truncated to `rank`.
    let truncate = |u: MatRef<'_, f32>, s: &[f32], v: MatRef<'_, f32>| -> LowRank {
        let u_r = row_major(u.subcols(0, rank));
        let mut sv = Vec::with_capacity(rank * cols);
        for (i, &sigma) in s.iter().enumerate().take(rank) {
            sv.extend((0..cols).map(|j| sigma * v[(j, i)]));
        }
        LowRank { u: u_r, sv, singular_values: s.to_vec() }
    };
    if 2 * sketch >= rows.min(cols) {
        let svd = a.thin_svd().map_err(|e| anyhow::anyhow!("SVD of a {rows} × {cols} matrix: {e:?}"))?;
        let s: Vec<f32> = svd.S().column_vector().iter().copied().collect();
        return Ok(truncate(svd.U(), &s, svd.V()));
    }
    let mut rng = Rng::new(seed);
    let omega = Mat::<f32>::from_fn(cols, sketch, |_, _| rng.normal() as f32);
    let mut q = (a * &omega).qr().compute_thin_Q();
    for _ in 0..power_iterations {
        let z = (a.transpose() * &q).qr().compute_thin_Q();
        q = (a * &z).qr().compute_thin_Q();
    }
    let b = q.transpose() * a; // sketch × cols
    let svd = b.thin_svd().map_err(|e| anyhow::anyhow!("SVD of the {sketch} × {cols} sketch: {e:?}"))?;
    let u = &q * svd.U();
    let s: Vec<f32> = svd.S().column_vector().iter().copied().collect();
    Ok(truncate(u.as_ref(), &s, svd.V()))
}

/// A uniform sample of fixed size from a stream of `(value, channel)`
/// entries, by Vitter's / Li's Algorithm L: once full, it draws random numbers
/// only for the entries it takes (O(k log(n/k)) of n), so sampling a 7B
/// model's activations costs little beyond running it.
#[derive(Debug, Clone)]
pub struct Reservoir {
    capacity: usize,
    /// The sample: `(x_i, i)`.
    pub samples: Vec<(f32, u32)>,
    seen: u64,
    next: u64,
    w: f64,
    rng: Rng,
}

impl Reservoir {
    /// Holds up to `capacity` entries.
    pub fn new(capacity: usize, seed: u64) -> Self {
        Self { capacity: capacity.max(1), samples: Vec::new(), seen: 0, next: 0, w: 1.0, rng: Rng::new(seed) }
    }

    /// Entries offered so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    fn skip(&mut self) {
        self.w *= (self.rng.uniform().ln() / self.capacity as f64).exp();
        let gap = (self.rng.uniform().ln() / (1.0 - self.w).ln()).floor();
        self.next += if gap.is_finite() { gap as u64 } else { u64::MAX / 4 } + 1;
    }

    /// Offers a batch of vectors of `cols` values each.
    pub fn offer(&mut self, values: &[f32], cols: usize) {
        let start = self.seen;
        let end = start + values.len() as u64;
        let mut at = start;
        while at < end && self.samples.len() < self.capacity {
            let j = (at - start) as usize;
            self.samples.push((values[j], (j % cols) as u32));
            at += 1;
            if self.samples.len() == self.capacity {
                self.next = at;
                self.skip();
            }
        }
        while self.samples.len() == self.capacity && self.next < end {
            let j = (self.next - start) as usize;
            let slot = self.rng.below(self.capacity);
            self.samples[slot] = (values[j], (j % cols) as u32);
            self.skip();
        }
        self.seen = end;
    }
}

/// `τ` for `kept` exact channels of `cols`: the smallest sampled `|x_i · c_i|`
/// at or below which a share `1 − kept / cols` of the sample falls (0 when
/// nothing is to be masked).
pub fn threshold(samples: &[(f32, u32)], scores: &[f32], kept: usize, cols: usize) -> f32 {
    let masked = 1.0 - kept.min(cols) as f64 / cols as f64;
    if samples.is_empty() || masked <= 0.0 {
        return 0.0;
    }
    let mut products: Vec<f32> = samples.iter().map(|&(x, i)| (x * scores[i as usize]).abs()).collect();
    let index = ((masked * products.len() as f64).ceil() as usize).clamp(1, products.len()) - 1;
    let (_, tau, _) = products.select_nth_unstable_by(index, f32::total_cmp);
    *tau
}

/// The share of `(token, channel)` entries of `values` (vectors of
/// `scores.len()`) that `τ` masks: `|x_i · c_i| ≤ τ`.
pub fn masked_share(values: &[f32], scores: &[f32], tau: f32) -> f64 {
    let masked = values
        .chunks_exact(scores.len())
        .flat_map(|x| x.iter().zip(scores))
        .filter(|(x, c)| (*x * *c).abs() <= tau)
        .count();
    masked as f64 / values.len() as f64
}

/// One module's calibration data: scores and factors up to the largest rank any plan may use.
struct Prepared {
    name: String,
    layer: usize,
    projection: usize,
    rows: usize,
    cols: usize,
    scores: Vec<f32>,
    u: Vec<f32>,  // rows × max_rank
    sv: Vec<f32>, // max_rank × cols
    max_rank: usize,
}

/// Per-layer choices of the search: sparsity in steps of `STEP` around the target, and α.
const STEP: f32 = 0.05;
/// Layers move at most this many steps from the target.
const MAX_STEPS: i32 = 6;
const ALPHAS: [f32; 5] = [0.8, 0.85, 0.9, 0.95, 1.0];
/// The highest per-layer sparsity a search may give.
const MAX_LAYER_SPARSITY: f32 = 0.95;

/// A candidate: per layer, a step offset from the target and an index into `ALPHAS`.
#[derive(Debug, Clone, PartialEq)]
struct Genome {
    steps: Vec<i32>,
    alphas: Vec<usize>,
}

fn layer_sparsity(target: f32, steps: i32) -> f32 {
    target + steps as f32 * STEP
}

/// The step offsets a layer may take: `target + k·STEP` inside `[0, MAX_LAYER_SPARSITY]`.
fn step_range(target: f32) -> (i32, i32) {
    let low = (-MAX_STEPS..=0).find(|&k| layer_sparsity(target, k) >= -1e-6).unwrap_or(0);
    let high = (0..=MAX_STEPS).rev().find(|&k| layer_sparsity(target, k) <= MAX_LAYER_SPARSITY + 1e-6).unwrap_or(0);
    (low, high)
}

fn module_sparsity(s: f32) -> f32 {
    s.clamp(0.0, 0.999)
}

/// Per layer `(s, α)` of a candidate.
fn genome_choices(genome: &Genome, target: f32) -> Vec<(f32, f32)> {
    genome
        .steps
        .iter()
        .zip(&genome.alphas)
        .map(|(&k, &a)| (module_sparsity(layer_sparsity(target, k)), ALPHAS[a]))
        .collect()
}

fn weight_mean_sparsity(modules: &[ModuleReport], sizes: &HashMap<String, usize>) -> f64 {
    let total: f64 = modules.iter().map(|m| sizes[&m.name] as f64).sum();
    modules.iter().map(|m| m.sparsity as f64 * sizes[&m.name] as f64).sum::<f64>() / total
}

fn bar(show: bool, length: u64, label: &str) -> ProgressBar {
    let bar = if show { ProgressBar::new(length) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template(&format!("{{spinner}} {label:<11} [{{bar:40}}] {{pos}}/{{len}} {{msg}}"))
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// Checks the options before any work.
pub fn check_options(options: &CalibrateOptions) -> Result<()> {
    if !(0.0..1.0).contains(&options.sparsity) {
        bail!("--sparsity {}: expected a value in [0, 1)", options.sparsity);
    }
    if !(options.alpha > 0.0 && options.alpha <= 1.0) {
        bail!("--alpha {}: expected a value in (0, 1]", options.alpha);
    }
    anyhow::ensure!(options.tokens >= 2, "--tokens {}: at least 2 calibration tokens are needed", options.tokens);
    anyhow::ensure!(options.ctx >= 4, "--ctx {}: at least 4", options.ctx);
    anyhow::ensure!(options.samples >= 1, "--samples must be at least 1");
    if let Some(search) = &options.search {
        anyhow::ensure!(search.population >= 2, "--population {}: at least 2", search.population);
        anyhow::ensure!(search.generations >= 1, "--generations {}: at least 1", search.generations);
        anyhow::ensure!(search.tokens >= 8, "--search-tokens {}: at least 8", search.tokens);
    }
    Ok(())
}

/// Runs `tokens` through `model` in windows of `ctx` positions (each begun
/// as a text is, with BOS when the model adds one), `batch` tokens a forward
/// pass, showing every linear module's input to `see` and advancing
/// `progress` by the tokens run. R-Sparse calibration and `convert --mixed`
/// read activations this way.
pub fn observe_text(
    model: &Model<'_>,
    tokenizer: &Tokenizer,
    tokens: &[u32],
    (ctx, batch): (usize, usize),
    progress: &ProgressBar,
    see: &mut dyn FnMut(usize, Site, &[f32]),
) -> Result<()> {
    let ctx = ctx.min(tokens.len()).max(1);
    let mut state = model.try_new_state(ctx, batch.clamp(1, ctx))?;
    let bos = if tokenizer.vocab().add_bos { tokenizer.bos_id() } else { None };
    let mut window = Vec::with_capacity(ctx);
    for chunk in tokens.chunks(ctx) {
        window.clear();
        window.extend_from_slice(chunk);
        if let Some(bos) = bos {
            window[0] = bos;
        }
        let mut pos = 0;
        while pos < window.len() {
            let n = state.batch.min(window.len() - pos);
            model.forward_observed(&mut state, &window[pos..pos + n], pos, Logits::Last, Some(&mut *see))?;
            pos += n;
            progress.inc(n as u64);
        }
    }
    Ok(())
}

/// A temporary f16 copy of `source` to calibrate on (the high-precision
/// model), written under `scratch` in a directory named `prefix…` that is
/// removed when the returned guard drops (after the image: bind them in
/// this order).
pub fn f16_calibration_image(
    source: &dyn ModelSource,
    scratch: &Path,
    prefix: &str,
    progress: bool,
) -> Result<(tempfile::TempDir, ModelImage)> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(scratch)
        .with_context(|| format!("{}: cannot make a temporary directory", scratch.display()))?;
    let calibration = dir.path().join("calibration-f16.bramble");
    let mut f16 = ConvertOptions::new(QuantTarget::F16);
    f16.progress = progress;
    convert(source, &calibration, &f16).context("writing the f16 calibration image")?;
    let image = ModelImage::open(&calibration).with_context(|| format!("opening {}", calibration.display()))?;
    Ok((dir, image))
}

/// The calibration tokens of `text` for `tokenizer`: BOS first when the model adds one.
pub fn calibration_tokens(tokenizer: &Tokenizer, text: &str, limit: usize) -> Result<Vec<u32>> {
    let vocab = tokenizer.vocab();
    let mut tokens = tokenizer.encode(text, vocab.add_bos, false);
    let content = tokens.len() - usize::from(vocab.add_bos && tokenizer.bos_id().is_some());
    if content < 2 {
        bail!("the calibration text gives {content} tokens; at least 2 are needed");
    }
    if let Some(unk) = vocab.unk_id {
        let unknown = tokens.iter().filter(|&&t| t == unk).count();
        if unknown * 2 > content {
            bail!(
                "{unknown} of the calibration text's {content} tokens are unknown to this image's tokenizer: \
                 the text does not suit the model (a different alphabet or encoding?)"
            );
        }
    }
    tokens.truncate(limit);
    Ok(tokens)
}

/// Calibrates the image at `input` on `text` and writes `output`.
pub fn calibrate(input: &Path, text: &str, output: &Path, options: &CalibrateOptions) -> Result<CalibrateReport> {
    check_options(options)?;
    let image = ModelImage::open(input).with_context(|| format!("opening {}", input.display()))?;
    let tokenizer = Tokenizer::new(image.vocab()).with_context(|| format!("{}: tokenizer", input.display()))?;
    let tokens = calibration_tokens(&tokenizer, text, options.tokens)?;
    let threads = options.threads.clamp(1, bramble_runtime::kernels::pool::MAX_THREADS);
    faer::set_global_parallelism(if threads == 1 { faer::Par::Seq } else { faer::Par::rayon(threads) });
    let mut model = Model::with_options(&image, bramble_runtime::kernels::Kernels::detect(), threads)?;
    let layers = model.weights.layers.len();
    let target = options.sparsity;

    // The largest rank each module may need: the uniform plan's, or over every
    // choice the search may make.
    let (low_steps, _) = step_range(target);
    let max_rank = |rows: usize, cols: usize| -> usize {
        let (_, uniform) = SparseModule::budget(rows, cols, target, options.alpha);
        if options.search.is_none() {
            return uniform;
        }
        let s = module_sparsity(layer_sparsity(target, low_steps));
        ALPHAS.iter().map(|&a| SparseModule::budget(rows, cols, s, a).1).max().unwrap_or(0).max(uniform)
    };

    // 1. Scores and low-rank factors.
    let started = Instant::now();
    let progress = bar(options.progress, (layers * PROJECTIONS.len()) as u64, "SVD");
    let mut prepared = Vec::with_capacity(layers * PROJECTIONS.len());
    let mut w = Vec::new();
    for (l, layer) in model.weights.layers.iter().enumerate() {
        let matrices: [&Matrix; 7] =
            [&layer.wq, &layer.wk, &layer.wv, &layer.wo, &layer.w_gate, &layer.w_up, &layer.w_down];
        for (p, m) in matrices.into_iter().enumerate() {
            let name = format!("blk.{l}.{}.weight", PROJECTIONS[p]);
            progress.set_message(name.clone());
            w.resize(m.rows * m.cols, 0.0);
            for (r, row) in w.chunks_exact_mut(m.cols).enumerate() {
                m.row_to_f32(r, row);
            }
            if let Some(bad) = w.iter().position(|v| !v.is_finite()) {
                bail!("{}: tensor {name}: value at row {} is not finite", input.display(), bad / m.cols);
            }
            let scores = column_norms(&w, m.rows, m.cols);
            let rank = max_rank(m.rows, m.cols);
            let seed = options.seed.wrapping_add((l * 7 + p) as u64);
            let factors = low_rank(&w, m.rows, m.cols, rank, options.oversample, options.power_iterations, seed)
                .with_context(|| format!("tensor {name}"))?;
            prepared.push(Prepared {
                name,
                layer: l,
                projection: p,
                rows: m.rows,
                cols: m.cols,
                scores,
                max_rank: factors.sv.len() / m.cols.max(1),
                u: factors.u,
                sv: factors.sv,
            });
            progress.inc(1);
        }
    }
    drop(w);
    progress.finish_and_clear();
    let svd_seconds = started.elapsed().as_secs_f64();

    // 2. Activations: a reservoir per (layer, site) of the dense model's inputs.
    let started = Instant::now();
    let mut reservoirs: Vec<[Reservoir; 4]> = (0..layers)
        .map(|l| std::array::from_fn(|s| Reservoir::new(options.samples, options.seed ^ ((l * 4 + s) as u64) << 20)))
        .collect();
    let progress = bar(options.progress, tokens.len() as u64, "activations");
    let p = &model.config;
    let widths = [p.dim as usize, p.q_dim(), p.dim as usize, p.ffn_dim as usize];
    observe_text(&model, &tokenizer, &tokens, (options.ctx, options.batch), &progress, &mut |layer, site, values| {
        if let Some(s) = site_index(site) {
            reservoirs[layer][s].offer(values, widths[s]);
        }
    })?;
    progress.finish_and_clear();
    let activation_seconds = started.elapsed().as_secs_f64();

    // 3. Thresholds (cached by module and kept channels: the search asks for the same ones often).
    let mut thresholds: HashMap<(usize, usize, bool), f32> = HashMap::new();
    // A plan from per-layer (s, α).
    let mut plan_for = |choices: &[(f32, f32)]| -> (Rsparse, Vec<ModuleReport>) {
        let mut modules = Vec::with_capacity(prepared.len());
        let mut reports = Vec::with_capacity(prepared.len());
        for (index, m) in prepared.iter().enumerate() {
            let (s, alpha) = choices[m.layer];
            let (kept, rank) = SparseModule::budget(m.rows, m.cols, s, alpha);
            let rank = rank.min(m.max_rank);
            let pure = alpha >= 1.0;
            let scores = if pure { vec![1.0; m.cols] } else { m.scores.clone() };
            let samples = &reservoirs[m.layer][site_index(site_of(m.projection)).expect("a module input")].samples;
            let tau =
                *thresholds.entry((index, kept, pure)).or_insert_with(|| threshold(samples, &scores, kept, m.cols));
            let sv: Vec<f16> = m.sv[..rank * m.cols].iter().map(|&v| f16::from_f32(v)).collect();
            let u: Vec<f16> = (0..m.rows)
                .flat_map(|r| &m.u[r * m.max_rank..r * m.max_rank + rank])
                .map(|&v| f16::from_f32(v))
                .collect();
            reports.push(ModuleReport { name: m.name.clone(), sparsity: s, alpha, kept, rank, threshold: tau });
            modules.push(SparseModule {
                name: m.name.clone(),
                rows: m.rows,
                cols: m.cols,
                sparsity: s,
                alpha,
                threshold: tau,
                scores,
                rank,
                sv,
                u,
            });
        }
        (Rsparse { target, modules }, reports)
    };
    let sizes: HashMap<String, usize> = prepared.iter().map(|m| (m.name.clone(), m.rows * m.cols)).collect();

    let alpha_index = ALPHAS.iter().position(|&a| (a - options.alpha).abs() < 1e-6);
    let mut search_report = None;
    let started = Instant::now();
    let genome = match (&options.search, alpha_index) {
        (None, _) => None,
        (Some(_), None) => bail!("--search chooses α among {ALPHAS:?}; --alpha {} is not one of them", options.alpha),
        (Some(search), Some(alpha_index)) => {
            let uniform = Genome { steps: vec![0; layers], alphas: vec![alpha_index; layers] };
            let fitness_tokens = &tokens[..search.tokens.min(tokens.len())];
            let bos = if tokenizer.vocab().add_bos { tokenizer.bos_id() } else { None };
            let ctx = options.ctx.min(fitness_tokens.len());
            let mut evaluate = |genome: &Genome| -> Result<f64> {
                let (plan, _) = plan_for(&genome_choices(genome, target));
                model.set_sparsity(Some(plan), SparseMode::Always)?;
                let result =
                    perplexity(&model, fitness_tokens, bos, ctx, None, options.batch.clamp(1, ctx), &mut |_, _, _| {})?;
                Ok(result.perplexity)
            };
            let (best, best_perplexity, uniform_perplexity, evaluations) =
                evolve(&uniform, target, search, options.seed, options.progress, &mut evaluate)?;
            model.set_sparsity(None, SparseMode::Always)?;
            search_report = Some(SearchReport {
                evaluations,
                uniform_perplexity,
                best_perplexity,
                layers: genome_choices(&best, target),
            });
            Some(best)
        }
    };
    let search_seconds = started.elapsed().as_secs_f64();
    let choices = match genome {
        Some(genome) => genome_choices(&genome, target),
        None => vec![(target, options.alpha); layers],
    };
    let (plan, modules) = plan_for(&choices);
    let achieved = weight_mean_sparsity(&modules, &sizes);
    drop(model);
    let image_bytes = write_image(&image, &plan, output, options.layout)?;
    Ok(CalibrateReport {
        target,
        achieved,
        tokens: tokens.len(),
        modules,
        search: search_report,
        svd_seconds,
        activation_seconds,
        search_seconds,
        image_bytes,
    })
}

/// Moves one step of sparsity from one layer to another (the mean stays put), if both stay in range.
fn shift(genome: &mut Genome, range: (i32, i32), rng: &mut Rng) -> bool {
    let layers = genome.steps.len();
    if layers < 2 {
        return false;
    }
    let (from, to) = (rng.below(layers), rng.below(layers));
    if from == to || genome.steps[from] - 1 < range.0 || genome.steps[to] + 1 > range.1 {
        return false;
    }
    genome.steps[from] -= 1;
    genome.steps[to] += 1;
    true
}

/// Restores `Σ steps = 0` (the budget) after a crossover by single steps on random layers.
fn repair(genome: &mut Genome, range: (i32, i32), rng: &mut Rng) {
    let layers = genome.steps.len();
    let mut guard = 0;
    loop {
        let sum: i32 = genome.steps.iter().sum();
        if sum == 0 || guard > 100_000 {
            break;
        }
        let l = rng.below(layers);
        if sum > 0 && genome.steps[l] > range.0 {
            genome.steps[l] -= 1;
        } else if sum < 0 && genome.steps[l] < range.1 {
            genome.steps[l] += 1;
        }
        guard += 1;
    }
    if genome.steps.iter().sum::<i32>() != 0 {
        genome.steps.iter_mut().for_each(|s| *s = 0);
    }
}

fn mutate(genome: &mut Genome, range: (i32, i32), rng: &mut Rng) {
    let layers = genome.steps.len();
    for _ in 0..1 + rng.below(3) {
        shift(genome, range, rng);
    }
    if rng.uniform() < 0.5 {
        let l = rng.below(layers);
        let a = genome.alphas[l] as i32 + if rng.uniform() < 0.5 { -1 } else { 1 };
        genome.alphas[l] = a.clamp(0, ALPHAS.len() as i32 - 1) as usize;
    }
}

/// Returns `(best, its perplexity, the uniform plan's perplexity, evaluations)`.
/// Every candidate keeps `Σ steps = 0`, so every layer's modules averaged by
/// weight count give exactly the target (layers have equal weight counts).
fn evolve(
    uniform: &Genome,
    target: f32,
    search: &SearchOptions,
    seed: u64,
    show: bool,
    evaluate: &mut dyn FnMut(&Genome) -> Result<f64>,
) -> Result<(Genome, f64, f64, usize)> {
    let range = step_range(target);
    let mut rng = Rng::new(seed ^ 0x5ea7c4);
    let elite = (search.population / 4).max(1);
    let total = search.population + (search.generations - 1) * (search.population - elite);
    let progress = bar(show, total as u64, "search");
    let mut evaluations = 0;
    let mut scored: Vec<(f64, Genome)> = Vec::new();
    let mut score = |genome: Genome, scored: &mut Vec<(f64, Genome)>| -> Result<f64> {
        let ppl = evaluate(&genome)?;
        evaluations += 1;
        progress.inc(1);
        // A plan that breaks the model (NaN perplexity) ranks last.
        let ppl = if ppl.is_finite() { ppl } else { f64::INFINITY };
        scored.push((ppl, genome));
        Ok(ppl)
    };
    let uniform_perplexity = score(uniform.clone(), &mut scored)?;
    while scored.len() < search.population {
        let mut genome = uniform.clone();
        mutate(&mut genome, range, &mut rng);
        mutate(&mut genome, range, &mut rng);
        score(genome, &mut scored)?;
    }
    for _ in 1..search.generations {
        scored.sort_by(|a, b| a.0.total_cmp(&b.0));
        scored.truncate(elite);
        progress.set_message(format!("best {:.3}", scored[0].0));
        let parents: Vec<Genome> = scored.iter().map(|(_, g)| g.clone()).collect();
        for _ in 0..search.population - elite {
            let (a, b) = (&parents[rng.below(parents.len())], &parents[rng.below(parents.len())]);
            let mut child = a.clone();
            for l in 0..child.steps.len() {
                if rng.uniform() < 0.5 {
                    child.steps[l] = b.steps[l];
                    child.alphas[l] = b.alphas[l];
                }
            }
            repair(&mut child, range, &mut rng);
            mutate(&mut child, range, &mut rng);
            score(child, &mut scored)?;
        }
    }
    progress.finish_and_clear();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (best_perplexity, best) = scored.swap_remove(0);
    Ok((best, best_perplexity, uniform_perplexity, evaluations))
}

/// Writes `image` with `plan` as its `rsparse` section and the weights of
/// the modules it covers in `layout`; every other section and tensor is
/// copied byte for byte, in the order [`ImageWriter::rewrite`] keeps.
pub fn write_image(image: &ModelImage, plan: &Rsparse, output: &Path, layout: SparseLayout) -> Result<u64> {
    let section = plan.to_section()?;
    let relayout = |t: &TensorInfo, bytes: &[u8]| {
        let covered = plan.modules.iter().any(|m| m.name == t.name);
        relaid(t, bytes, covered, layout)
    };
    Ok(ImageWriter::rewrite(image, output, &[(rsparse::SECTION, &section)], relayout)?)
}

/// A tensor's new encoding and bytes under `layout`, or `None` to keep it:
/// covered Q8/Q4 matrices go channel-major (rows in whole tiles); with
/// [`SparseLayout::Rows`], channel-major ones go back to interleaved rows.
fn relaid(t: &TensorInfo, bytes: &[u8], covered: bool, layout: SparseLayout) -> Option<(Encoding, Vec<u8>)> {
    let (rows, cols) = (t.rows(), t.cols());
    let row_major = |bytes: &[u8]| -> Vec<u8> {
        let mut out = vec![0u8; bytes.len()];
        if t.encoding.is_channel_major() {
            quant::from_channel_major(t.encoding, bytes, cols, &mut out);
        } else if t.encoding.rows_interleaved() > 1 {
            quant::deinterleave_bytes(t.encoding, bytes, cols, &mut out);
        } else {
            out.copy_from_slice(bytes);
        }
        out
    };
    match layout {
        SparseLayout::Channels => {
            let target = t.encoding.channel_major()?;
            if !covered || target == t.encoding || t.shape.len() != 2 || !rows.is_multiple_of(quant::CHANNEL_TILE) {
                return None;
            }
            let mut out = vec![0u8; bytes.len()];
            quant::to_channel_major(target, &row_major(bytes), cols, &mut out);
            Some((target, out))
        }
        SparseLayout::Rows => {
            if !t.encoding.is_channel_major() {
                return None;
            }
            let base = t.encoding.row_major();
            let interleaved = base.interleaved().expect("Q8 and Q4 interleave");
            let mut out = vec![0u8; bytes.len()];
            quant::interleave_bytes(interleaved, &row_major(bytes), cols, &mut out);
            Some((interleaved, out))
        }
    }
}

/// Rewrites the calibrated image `input` as `output` with its own plan and
/// the sparse modules' weights in `layout` (no calibration).
pub fn relayout(input: &Path, output: &Path, layout: SparseLayout) -> Result<u64> {
    let image = ModelImage::open(input).with_context(|| format!("opening {}", input.display()))?;
    let section = image
        .section(rsparse::SECTION)
        .ok_or_else(|| anyhow::anyhow!("{} has no rsparse section: calibrate it first", input.display()))?;
    let plan = Rsparse::from_section(section)?;
    write_image(&image, &plan, output, layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repair_and_mutation_keep_the_budget() {
        let mut rng = Rng::new(3);
        let range = step_range(0.5);
        assert_eq!(range, (-6, 6));
        assert_eq!(step_range(0.1), (-2, 6));
        for _ in 0..200 {
            let mut g = Genome { steps: (0..12).map(|_| rng.below(13) as i32 - 6).collect(), alphas: vec![3; 12] };
            repair(&mut g, range, &mut rng);
            assert_eq!(g.steps.iter().sum::<i32>(), 0);
            mutate(&mut g, range, &mut rng);
            assert_eq!(g.steps.iter().sum::<i32>(), 0);
            assert!(g.steps.iter().all(|&s| (range.0..=range.1).contains(&s)));
        }
    }

    #[test]
    fn reservoir_is_uniform_and_bounded() {
        let mut r = Reservoir::new(1000, 9);
        let values: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
        for chunk in values.chunks(640) {
            r.offer(chunk, 64);
        }
        assert_eq!(r.samples.len(), 1000);
        assert_eq!(r.seen(), 100_000);
        // A uniform sample of 0..100000 has mean ≈ 50000 (σ of the mean ≈ 913).
        let mean = r.samples.iter().map(|s| s.0 as f64).sum::<f64>() / 1000.0;
        assert!((mean - 50_000.0).abs() < 4_000.0, "mean {mean}");
        assert!(r.samples.iter().all(|&(v, c)| v as u32 % 64 == c));
    }
}
