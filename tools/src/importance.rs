//! `bramble convert --imatrix`: importance vectors measured on calibration
//! text, and the quantizer that uses them.
//!
//! A weight `W[r][j]` meets input channel `j` in every product it takes part
//! in, so its rounding error costs, on average over the inputs, in proportion
//! to `E[x_j²]`: the mean over tokens of the square of channel `j`. That mean,
//! one value per input channel of each matrix, is what `llama-imatrix`
//! measures and what the rounding searches of [`crate::rounding`] weigh each
//! value by (`importance[j]·√(σ² + w²)`).
//!
//! 1. The source is converted to a temporary f16 image (removed afterwards)
//!    and run over the calibration text in windows of `ctx` tokens, as
//!    `convert --mixed auto` does ([`observe_text`]).
//! 2. For every layer, each of the four linear inputs is summed squared per
//!    channel: q, k and v share the attention RMSNorm's output, gate and up
//!    share the FFN RMSNorm's output, `attn_output` reads the attention's
//!    output and `ffn_down` the FFN hidden `silu(gate) ⊙ up`. The output
//!    layer reads the final RMSNorm of the last layer's residual stream,
//!    which is computed here from that stream with the model's own RMSNorm
//!    kernel (the forward pass norms only the tokens whose logits it makes).
//!    With a tied output the vector belongs to `token_embd.weight`, which is
//!    then the output layer; an untied embedding is a table look-up and has
//!    none.
//! 3. Each sum over the tokens seen is divided by their count.
//!
//! [`quantize_rows`] is `convert`'s quantizer: the K-quants always go
//! through the weighted searches (with the tensor's importance vector when
//! there is one, else llama.cpp's default weights), Q4 only when an
//! importance vector is given (without one it stays ggml's reference
//! rounding, as `llama-quantize` leaves Q4_1), everything else through
//! [`quantize_into`].

use crate::calibrate::{calibration_tokens, f16_calibration_image, observe_text};
use crate::rounding;
use crate::source::ModelSource;
use anyhow::{bail, ensure, Context, Result};
use bramble_runtime::kquant::QK_K;
use bramble_runtime::model::{Model, Site};
use bramble_runtime::quant::{quantize_into, Encoding, GROUP};
use bramble_runtime::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::path::Path;

/// The four linear inputs of a layer, in the order the sums are kept.
const SITES: [Site; 4] = [Site::AttentionInput, Site::AttentionOutput, Site::FfnInput, Site::FfnHidden];

/// The settings of the measurement.
#[derive(Debug, Clone)]
pub struct ImportanceOptions {
    /// Calibration tokens (the first ones of the text).
    pub tokens: usize,
    /// Window length: the model runs the text in windows of this many tokens
    /// (`llama-imatrix`'s default is 512).
    pub ctx: usize,
    /// Tokens per forward pass.
    pub batch: usize,
    /// Threads for the forward passes.
    pub threads: usize,
    /// Show progress on stderr.
    pub progress: bool,
}

impl Default for ImportanceOptions {
    fn default() -> Self {
        Self { tokens: 8192, ctx: 512, batch: 64, threads: 1, progress: false }
    }
}

/// Per weight matrix, the mean square of each input channel over the
/// calibration tokens.
#[derive(Debug, Clone)]
pub struct ImportanceMatrix {
    /// The calibration text's name (its file name), for the image's record.
    pub text: String,
    /// Calibration tokens run.
    pub tokens: usize,
    /// Window length used.
    pub ctx: usize,
    /// Tensor name → one mean square per input channel (the matrix's columns).
    pub vectors: BTreeMap<String, Vec<f32>>,
}

impl ImportanceMatrix {
    /// The importance vector of tensor `name`, if the matrix has one.
    pub fn for_tensor(&self, name: &str) -> Option<&[f32]> {
        self.vectors.get(name).map(Vec::as_slice)
    }

    /// What the image's `source` section records: `{text, tokens, ctx, tensors}`.
    pub fn record(&self, used: usize) -> serde_json::Value {
        serde_json::json!({
            "text": self.text,
            "tokens": self.tokens,
            "ctx": self.ctx,
            "vectors": self.vectors.len(),
            "tensors": used,
        })
    }
}

/// Per-channel sums of squares of every linear input, and how many vectors
/// went into each.
#[derive(Debug, Clone)]
pub struct SquareSums {
    /// `[layer][site]`: per channel `Σ x²`, sites in the order of [`Site::AttentionInput`],
    /// [`Site::AttentionOutput`], [`Site::FfnInput`], [`Site::FfnHidden`].
    pub layers: Vec<[Vec<f64>; 4]>,
    /// `[layer][site]`: vectors (tokens) summed.
    pub counts: Vec<[u64; 4]>,
    /// The output layer's input (the final RMSNorm's output), per channel `Σ x²`.
    pub output: Vec<f64>,
    /// Vectors summed into `output`.
    pub output_count: u64,
}

impl SquareSums {
    fn add(sums: &mut [f64], count: &mut u64, values: &[f32]) {
        for vector in values.chunks_exact(sums.len()) {
            for (s, &v) in sums.iter_mut().zip(vector) {
                *s += v as f64 * v as f64;
            }
            *count += 1;
        }
    }

    /// The mean squares as tensor name → vector, for a model of `layers`
    /// layers whose output layer is `output_tensor`.
    pub fn means(&self, output_tensor: &str) -> BTreeMap<String, Vec<f32>> {
        let mean =
            |sums: &[f64], count: u64| -> Vec<f32> { sums.iter().map(|&s| (s / count.max(1) as f64) as f32).collect() };
        let mut vectors = BTreeMap::new();
        for (layer, (sites, counts)) in self.layers.iter().zip(&self.counts).enumerate() {
            for (s, site) in SITES.iter().enumerate() {
                let vector = mean(&sites[s], counts[s]);
                for module in site.modules() {
                    vectors.insert(format!("blk.{layer}.{module}.weight"), vector.clone());
                }
            }
        }
        vectors.insert(output_tensor.to_string(), mean(&self.output, self.output_count));
        vectors
    }
}

/// The tensor the output layer is: `output.weight`, or `token_embd.weight`
/// when the model ties it to the embedding.
pub fn output_tensor(config: &bramble_runtime::ModelConfig) -> &'static str {
    if config.tied_output != 0 {
        "token_embd.weight"
    } else {
        "output.weight"
    }
}

/// Runs `model` over `tokens` and sums the squares of every linear input
/// per channel ([`observe_text`] in windows of `ctx`, `batch` a pass).
pub fn measure(
    model: &Model<'_>,
    tokenizer: &Tokenizer,
    tokens: &[u32],
    (ctx, batch): (usize, usize),
    progress: &ProgressBar,
) -> Result<SquareSums> {
    let c = &model.config;
    let widths = [c.dim as usize, c.q_dim(), c.dim as usize, c.ffn_dim as usize];
    let layers = model.weights.layers.len();
    let mut sums = SquareSums {
        layers: (0..layers).map(|_| widths.map(|w| vec![0f64; w])).collect(),
        counts: vec![[0; 4]; layers],
        output: vec![0f64; c.dim as usize],
        output_count: 0,
    };
    let (dim, eps, last) = (c.dim as usize, c.norm_eps, layers.checked_sub(1));
    let mut normed = vec![0f32; dim];
    let mut non_finite: Option<(usize, Site)> = None;
    observe_text(model, tokenizer, tokens, (ctx, batch), progress, &mut |layer, site, values| {
        if values.iter().any(|v| !v.is_finite()) {
            non_finite.get_or_insert((layer, site));
            return;
        }
        if let Some(s) = SITES.iter().position(|&known| known == site) {
            SquareSums::add(&mut sums.layers[layer][s], &mut sums.counts[layer][s], values);
        } else if site == Site::Residual && Some(layer) == last {
            // The last layer's residual stream is what the final RMSNorm reads.
            for x in values.chunks_exact(dim) {
                (model.kernels.rmsnorm)(&mut normed, x, model.weights.output_norm, eps);
                SquareSums::add(&mut sums.output, &mut sums.output_count, &normed);
            }
        }
    })?;
    if let Some((layer, site)) = non_finite {
        bail!(
            "layer {layer}: the {} activations are not finite on the calibration text",
            crate::mixed::site_name(site)
        );
    }
    Ok(sums)
}

/// Reads the calibration text at `path`: an error that says so when the
/// file cannot be read or holds no text.
pub fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the calibration text", path.display()))?;
    ensure!(!text.trim().is_empty(), "{}: the calibration text is empty", path.display());
    Ok(text)
}

fn bar(show: bool, length: u64) -> ProgressBar {
    let bar = if show { ProgressBar::new(length) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} importance  [{bar:40}] {pos}/{len}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// Measures `source`'s importance matrix on `text` (called `text_name` in
/// the record). `scratch` is a directory for the temporary f16 image (the
/// output's, so a large model does not fill `/tmp`).
pub fn importance_matrix(
    source: &dyn ModelSource,
    text: &str,
    text_name: &str,
    scratch: &Path,
    options: &ImportanceOptions,
) -> Result<ImportanceMatrix> {
    ensure!(options.tokens >= 2, "{} calibration tokens: at least 2 are needed", options.tokens);
    ensure!(options.ctx >= 2, "calibration window of {} tokens: at least 2", options.ctx);
    // The text is checked before any work: the source's own tokenizer is the image's.
    let tokenizer = Tokenizer::new(source.vocab()).context("the source's tokenizer")?;
    let tokens = calibration_tokens(&tokenizer, text, options.tokens)?;
    // Windows no longer than the model was trained on, nor than the text.
    let trained = source.config().context_length as usize;
    let ctx = options.ctx.min(if trained > 0 { trained } else { options.ctx }).min(tokens.len());
    let (_dir, image) = f16_calibration_image(source, scratch, ".bramble-imatrix-", options.progress)?;
    let threads = options.threads.clamp(1, bramble_runtime::kernels::pool::MAX_THREADS);
    let model = Model::with_options(&image, bramble_runtime::kernels::Kernels::detect(), threads)?;
    let image_tokenizer = Tokenizer::new(image.vocab()).context("the calibration image's tokenizer")?;
    let progress = bar(options.progress, tokens.len() as u64);
    let sums = measure(&model, &image_tokenizer, &tokens, (ctx, options.batch), &progress)?;
    progress.finish_and_clear();
    Ok(ImportanceMatrix {
        text: text_name.to_string(),
        tokens: tokens.len(),
        ctx,
        vectors: sums.means(output_tensor(source.config())),
    })
}

/// Whether [`quantize_rows`] weighs `encoding`'s rounding by an importance
/// vector: the K-quants, Q4, Q5S and Q5 (Q8, f16 and f32 round each value to nearest).
pub fn weighs(encoding: Encoding) -> bool {
    encoding.is_kquant() || matches!(encoding, Encoding::Q4 | Encoding::Q4B | Encoding::Q5S | Encoding::Q5)
}

/// Quantizes whole rows of `cols` values (`values.len()` a multiple of
/// `cols`) into `out` as row-major `encoding`: the K-quants by the weighted
/// searches of [`crate::rounding`], Q4 by its search when `importance` is
/// given, everything else by [`quantize_into`]. `importance` has one value
/// per column. Rows are shared among the machine's cores.
pub fn quantize_rows(encoding: Encoding, values: &[f32], cols: usize, importance: Option<&[f32]>, out: &mut [u8]) {
    let searched = encoding.is_kquant() || (weighs(encoding) && importance.is_some());
    if !searched {
        quantize_into(encoding, values, out);
        return;
    }
    if let Some(importance) = importance {
        assert_eq!(importance.len(), cols, "one importance value per column");
    }
    let rows = values.len() / cols;
    let row_bytes = encoding.bytes_for(cols);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows).max(1);
    let rows_per_thread = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (part, bytes) in values.chunks(rows_per_thread * cols).zip(out.chunks_mut(rows_per_thread * row_bytes)) {
            scope.spawn(move || {
                for (row, row_out) in part.chunks_exact(cols).zip(bytes.chunks_exact_mut(row_bytes)) {
                    quantize_row(encoding, row, importance, row_out);
                }
            });
        }
    });
}

/// One row by its search (see [`quantize_rows`]).
fn quantize_row(encoding: Encoding, row: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
    fn put<B: bytemuck::Pod>(out: &mut [u8], index: usize, block: B) {
        let size = std::mem::size_of::<B>();
        out[index * size..(index + 1) * size].copy_from_slice(bytemuck::bytes_of(&block));
    }
    let slice = |start: usize, len: usize| importance.map(|imp| &imp[start..start + len]);
    match encoding {
        Encoding::Q4 | Encoding::Q5 => {
            // Q4_1 and Q5_1 weigh by the whole row's mean square, as llama.cpp does.
            let row_mean_square = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            for (b, group) in row.chunks_exact(GROUP).enumerate() {
                let importance = slice(b * GROUP, GROUP);
                match encoding {
                    Encoding::Q4 => put(out, b, rounding::q4_block(group, row_mean_square, importance)),
                    _ => put(out, b, rounding::q5_block(group, row_mean_square, importance)),
                }
            }
        }
        Encoding::Q5S => {
            // Q5_0 with an importance vector weighs by the row's mean square, as llama.cpp does.
            let row_mean_square = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            for (b, group) in row.chunks_exact(GROUP).enumerate() {
                put(out, b, rounding::q5s_block(group, row_mean_square, slice(b * GROUP, GROUP)));
            }
        }
        Encoding::Q4K | Encoding::Q5K | Encoding::Q6K | Encoding::Q3K | Encoding::Q2K => {
            for (b, block) in row.chunks_exact(QK_K).enumerate() {
                let importance = slice(b * QK_K, QK_K);
                match encoding {
                    Encoding::Q4K => put(out, b, rounding::q4k_block(block, importance)),
                    Encoding::Q5K => put(out, b, rounding::q5k_block(block, importance)),
                    Encoding::Q6K => put(out, b, rounding::q6k_block(block, importance)),
                    Encoding::Q3K => put(out, b, rounding::q3k_block(block, importance)),
                    _ => put(out, b, rounding::q2k_block(block, importance)),
                }
            }
        }
        other => quantize_into(other, row, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::{convert, ConvertOptions, QuantTarget};
    use crate::synth::{SyntheticModel, SyntheticShape};
    use bramble_runtime::kquant::{BlockQ4K, QK_K};
    use bramble_runtime::model::Logits;
    use bramble_runtime::quant::{dequantize_from, BlockQ4};
    use bramble_runtime::ModelImage;

    /// Relative agreement of two means of squares summed in different orders
    /// (f64 here, one vector at a time) over activations the model computed
    /// in batches of different sizes: the batched and the token-at-a-time
    /// attention paths round differently in the last bits of f32.
    const MEAN_SQUARE_TOLERANCE: f64 = 1e-4;

    fn text() -> String {
        "The quality of mercy is not strained; it droppeth as the gentle rain from heaven. ".repeat(4)
    }

    fn f16_image(model: &SyntheticModel, dir: &Path) -> ModelImage {
        let path = dir.join("f16.bramble");
        convert(model, &path, &ConvertOptions::new(QuantTarget::F16)).unwrap();
        ModelImage::open(&path).unwrap()
    }

    /// The measured mean squares are those of an independent pass: the same
    /// windows run a token at a time through `forward_observed`, each input
    /// squared and averaged here, the output layer's input normed by a
    /// plain RMSNorm written out below.
    #[test]
    fn measured_means_are_the_mean_squares_of_each_input() {
        for tied in [false, true] {
            let shape = SyntheticShape { tied_output: tied, ..SyntheticShape::default() };
            let source = SyntheticModel::generate(shape, 11);
            let dir = tempfile::tempdir().unwrap();
            let image = f16_image(&source, dir.path());
            let model = Model::new(&image).unwrap();
            let tokenizer = Tokenizer::new(image.vocab()).unwrap();
            let tokens = calibration_tokens(&tokenizer, &text(), 70).unwrap();
            let ctx = 24;
            let sums = measure(&model, &tokenizer, &tokens, (ctx, 5), &ProgressBar::hidden()).unwrap();
            let measured = sums.means(output_tensor(image.config()));

            // Independent pass: windows of `ctx`, BOS first, one token a pass.
            let c = image.config();
            let (dim, eps) = (c.dim as usize, c.norm_eps);
            let norm = image.tensor("output_norm.weight").unwrap();
            let norm_weights: Vec<f32> =
                image.tensor_bytes(norm).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            let mut squares: BTreeMap<String, (Vec<f64>, u64)> = BTreeMap::new();
            let mut add = |name: String, x: &[f32]| {
                let entry = squares.entry(name).or_insert_with(|| (vec![0.0; x.len()], 0));
                for (s, &v) in entry.0.iter_mut().zip(x) {
                    *s += (v as f64).powi(2);
                }
                entry.1 += 1;
            };
            let mut state = model.try_new_state(ctx, 1).unwrap();
            let layers = c.n_layers as usize;
            for chunk in tokens.chunks(ctx) {
                let mut window = chunk.to_vec();
                if let (true, Some(bos)) = (tokenizer.vocab().add_bos, tokenizer.bos_id()) {
                    window[0] = bos;
                }
                for (pos, &token) in window.iter().enumerate() {
                    let mut see = |layer: usize, site: Site, x: &[f32]| {
                        for module in site.modules() {
                            add(format!("blk.{layer}.{module}.weight"), x);
                        }
                        if site == Site::Residual && layer + 1 == layers {
                            let rms = (x.iter().map(|v| v * v).sum::<f32>() / dim as f32 + eps).sqrt();
                            let normed: Vec<f32> = x.iter().zip(&norm_weights).map(|(v, w)| v / rms * w).collect();
                            add(output_tensor(c).to_string(), &normed);
                        }
                    };
                    model.forward_observed(&mut state, &[token], pos, Logits::Last, Some(&mut see)).unwrap();
                }
            }

            assert_eq!(measured.keys().collect::<Vec<_>>(), squares.keys().collect::<Vec<_>>());
            assert!(measured.contains_key(if tied { "token_embd.weight" } else { "output.weight" }));
            for (name, (sums, count)) in &squares {
                assert_eq!(*count as usize, tokens.len(), "{name}");
                let vector = &measured[name];
                assert_eq!(vector.len(), sums.len(), "{name}");
                for (j, (&got, &sum)) in vector.iter().zip(sums).enumerate() {
                    let want = sum / *count as f64;
                    assert!(
                        (got as f64 - want).abs() <= MEAN_SQUARE_TOLERANCE * want.max(1e-6),
                        "{name} channel {j}: measured {got}, independent {want}"
                    );
                }
            }
        }
    }

    /// A model whose every matrix has rows of whole super-blocks.
    fn wide_model() -> SyntheticModel {
        let shape = SyntheticShape { dim: 256, ffn_dim: 512, n_heads: 4, n_kv_heads: 2, ..SyntheticShape::default() };
        SyntheticModel::generate(shape, 5)
    }

    /// An importance vector per matrix, strongly uneven over the columns
    /// (every fifth column a hundred times the rest), as real ones are.
    fn uneven_importance(model: &SyntheticModel) -> ImportanceMatrix {
        let vectors = model
            .tensors
            .iter()
            .filter(|(name, shape, _)| shape.len() == 2 && name != "token_embd.weight")
            .map(|(name, shape, _)| {
                let cols = shape[1];
                (name.clone(), (0..cols).map(|j| if j % 5 == 0 { 100.0 } else { 1.0 + (j % 3) as f32 }).collect())
            })
            .collect();
        ImportanceMatrix { text: "synthetic".into(), tokens: 0, ctx: 0, vectors }
    }

    /// The stored row-major bytes of `name`.
    fn stored<'i>(image: &'i ModelImage, name: &str) -> &'i [u8] {
        image.tensor_bytes(image.tensor(name).unwrap())
    }

    /// `convert` writes exactly the blocks the searches of `rounding` give,
    /// with and without an importance matrix, for each K-quant (Q2_K's
    /// reference rounding without one) and for Q4;
    /// Q4 without one keeps the reference rounding.
    #[test]
    fn convert_quantizes_with_the_searches() {
        let model = wide_model();
        let importance = uneven_importance(&model);
        let dir = tempfile::tempdir().unwrap();
        for with_importance in [false, true] {
            let mut options = ConvertOptions::new(QuantTarget::Q4K);
            options.interleave = false;
            for spec in [
                "output.weight=q4k",
                "*.attn_q.weight=q4",
                "*.attn_k.weight=q5k",
                "*.attn_v.weight=q6k",
                "*.attn_output.weight=q3k",
                "*.ffn_up.weight=q2k",
            ] {
                options.add_override(spec).unwrap();
            }
            options.importance = with_importance.then(|| importance.clone());
            let path = dir.path().join(format!("searched-{with_importance}.bramble"));
            let report = convert(&model, &path, &options).unwrap();
            // Seven matrices a layer and the output layer took the importance.
            assert_eq!(report.importance_tensors, if with_importance { 2 * 7 + 1 } else { 0 });
            let image = ModelImage::open(&path).unwrap();
            let record: serde_json::Value = serde_json::from_slice(image.section("source").unwrap()).unwrap();
            assert_eq!(record.get("importance").is_some(), with_importance);

            for (name, block_values) in [
                ("blk.1.attn_q.weight", GROUP),
                ("blk.1.attn_k.weight", QK_K),
                ("blk.1.attn_v.weight", QK_K),
                ("blk.1.attn_output.weight", QK_K),
                ("blk.1.ffn_up.weight", QK_K),
                ("blk.1.ffn_down.weight", QK_K),
                ("output.weight", QK_K),
            ] {
                let (shape, values) = model.tensor(name).unwrap();
                let cols = shape[1];
                let imp = with_importance.then(|| importance.for_tensor(name).unwrap());
                let mut expected = Vec::new();
                for row in values.chunks_exact(cols) {
                    let row_mean_square = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
                    for (b, block) in row.chunks_exact(block_values).enumerate() {
                        let part = imp.map(|i| &i[b * block_values..(b + 1) * block_values]);
                        let bytes = match name {
                            n if n.ends_with("attn_q.weight") => match part {
                                Some(_) => {
                                    bytemuck::bytes_of(&rounding::q4_block(block, row_mean_square, part)).to_vec()
                                }
                                None => {
                                    let mut reference =
                                        [BlockQ4 { d: half::f16::ZERO, m: half::f16::ZERO, qs: [0; 16] }];
                                    bramble_runtime::quant::quantize_q4(block, &mut reference);
                                    bytemuck::bytes_of(&reference[0]).to_vec()
                                }
                            },
                            n if n.ends_with("attn_k.weight") => {
                                bytemuck::bytes_of(&rounding::q5k_block(block, part)).to_vec()
                            }
                            n if n.ends_with("attn_v.weight") => {
                                bytemuck::bytes_of(&rounding::q6k_block(block, part)).to_vec()
                            }
                            n if n.ends_with("attn_output.weight") => {
                                bytemuck::bytes_of(&rounding::q3k_block(block, part)).to_vec()
                            }
                            n if n.ends_with("ffn_up.weight") => {
                                bytemuck::bytes_of(&rounding::q2k_block(block, part)).to_vec()
                            }
                            _ => bytemuck::bytes_of(&rounding::q4k_block(block, part)).to_vec(),
                        };
                        expected.extend_from_slice(&bytes);
                    }
                }
                assert!(stored(&image, name) == expected.as_slice(), "{name} (importance: {with_importance})");
            }
        }
    }

    /// `Σ_j importance_j · Σ_rows (w − ŵ)²` of a q4k matrix: lower when the
    /// conversion is given the importance, and lower searched than min/max.
    #[test]
    fn importance_lowers_the_weighted_error() {
        let model = wide_model();
        let importance = uneven_importance(&model);
        let name = "blk.0.ffn_down.weight";
        let (shape, values) = model.tensor(name).unwrap();
        let (rows, cols) = (shape[0], shape[1]);
        let imp = importance.for_tensor(name).unwrap();
        let error = |bytes: &[u8]| -> f64 {
            let mut restored = vec![0f32; rows * cols];
            dequantize_from(Encoding::Q4K, bytes, &mut restored);
            let pairs = values.iter().zip(&restored).enumerate();
            pairs.map(|(i, (a, b))| imp[i % cols] as f64 * ((a - b) as f64).powi(2)).sum()
        };
        let mut min_max = vec![0u8; Encoding::Q4K.bytes_for(values.len())];
        for (block, out) in values.chunks_exact(QK_K).zip(min_max.chunks_exact_mut(std::mem::size_of::<BlockQ4K>())) {
            out.copy_from_slice(bytemuck::bytes_of(&BlockQ4K::quantize(block)));
        }
        let (mut plain, mut weighed) = (min_max.clone(), min_max.clone());
        quantize_rows(Encoding::Q4K, values, cols, None, &mut plain);
        quantize_rows(Encoding::Q4K, values, cols, Some(imp), &mut weighed);
        let (e_min_max, e_plain, e_weighed) = (error(&min_max), error(&plain), error(&weighed));
        assert!(e_plain < e_min_max, "searched {e_plain} vs min/max {e_min_max}");
        assert!(e_weighed < 0.9 * e_plain, "with importance {e_weighed} vs without {e_plain}");
    }

    /// The measured matrix names every projection and the output layer, one
    /// value per column, and the conversion records it.
    #[test]
    fn importance_matrix_covers_every_projection() {
        let model = wide_model();
        let dir = tempfile::tempdir().unwrap();
        // Windows of the default 512 are cut to the model's 128 positions.
        let options = ImportanceOptions { tokens: 200, ..ImportanceOptions::default() };
        let matrix = importance_matrix(&model, &text(), "mercy.txt", dir.path(), &options).unwrap();
        assert_eq!((matrix.tokens, matrix.ctx), (200, 128));
        let matrices: Vec<_> = model.tensors.iter().filter(|t| t.1.len() == 2 && t.0 != "token_embd.weight").collect();
        assert_eq!(matrix.vectors.len(), matrices.len());
        for (name, shape, _) in matrices {
            let vector = matrix.for_tensor(name).unwrap();
            assert_eq!(vector.len(), shape[1], "{name}");
            assert!(vector.iter().all(|v| v.is_finite() && *v >= 0.0) && vector.iter().any(|&v| v > 0.0), "{name}");
        }
        // Only the temporary directory's own files were made, and it is gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_missing_or_empty_text_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such.txt");
        let message = format!("{:#}", read_text(&missing).unwrap_err());
        assert!(message.contains("no-such.txt: cannot read the calibration text"), "{message}");
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "  \n").unwrap();
        let message = format!("{:#}", read_text(&empty).unwrap_err());
        assert!(message.contains("empty.txt: the calibration text is empty"), "{message}");
    }

    /// A matrix whose importance vector does not fit its columns is refused by name.
    #[test]
    fn a_vector_of_the_wrong_length_is_refused() {
        let model = wide_model();
        let mut importance = uneven_importance(&model);
        importance.vectors.insert("blk.0.ffn_up.weight".into(), vec![1.0; 7]);
        let mut options = ConvertOptions::new(QuantTarget::Q4K);
        options.importance = Some(importance);
        let dir = tempfile::tempdir().unwrap();
        let message = format!("{:#}", convert(&model, &dir.path().join("x.bramble"), &options).unwrap_err());
        assert!(
            message.contains("blk.0.ffn_up.weight: the importance matrix has 7 values for its 256 columns"),
            "{message}"
        );
    }
}
