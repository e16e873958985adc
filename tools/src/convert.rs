//! `bramble convert`: any [`ModelSource`] into a packed image.
//!
//! Tensors stream through one chunk of rows at a time. A tensor whose source
//! blocks already are the target encoding (GGUF Q4_1 → Q4, Q8_0 → Q8,
//! Q4_0 → Q4S, Q5_0 → Q5S, Q5_1 → Q5, Q4_K/Q5_K/Q6_K/Q3_K/Q2_K → Q4K/Q5K/Q6K/Q3K/Q2K, F16 → F16) is copied
//! bit-exact; anything else is dequantized to f32 and quantized again.
//! `--quant keep` gives every tensor its source encoding where the image has
//! it and the nearest one where it does not ([`keep_encoding`]). Quantized matrices of whole groups of four rows
//! are then stored interleaved (layout 2, `models/FORMAT.md`: Q8, Q4, Q4S, Q5S, Q5,
//! and the k-quants Q4K, Q6K, Q3K, Q5K and Q2K; [`Encoding::interleaved`]), a lossless
//! rearrangement of the same blocks, unless `--layout rows` asks for ggml's
//! row-major order. The image is written under a temporary name and
//! renamed into place only when complete, so a failed conversion leaves no file.

use crate::source::{ModelSource, SourceTensor};
use anyhow::{bail, Context, Result};
use bramble_runtime::image::layout::section;
use bramble_runtime::image::{encode_vocab, ImageWriter};
use bramble_runtime::kquant::QK_K;
use bramble_runtime::quant::{
    interleave_bytes, q4b_from_q4, quantize_q8_lossless, BlockQ4, BlockQ8, Encoding, GROUP, MAX_ROWS,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;

/// The `--quant` choice: an encoding family for the weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantTarget {
    /// 4-bit: source blocks already in Q4 or Q4S are kept; others become asymmetric Q4.
    Q4,
    /// 4-bit symmetric (Q4S) only.
    Q4S,
    /// Q4_1's levels with a byte scale and offset a block under an f32 scale a row (Q4B).
    Q4B,
    /// 5-bit symmetric (Q5S, ggml's Q5_0).
    Q5S,
    /// 5-bit with a minimum (Q5, ggml's Q5_1).
    Q5,
    /// int8.
    Q8,
    /// binary16.
    F16,
    /// binary32 (no quantization).
    F32,
    /// ggml's Q4_K super-blocks (rows of a multiple of 256 values; others get Q4).
    Q4K,
    /// ggml's Q5_K super-blocks (others get Q8).
    Q5K,
    /// ggml's Q6_K super-blocks (others get Q8).
    Q6K,
    /// ggml's Q3_K super-blocks (others get Q4).
    Q3K,
    /// ggml's Q2_K super-blocks (others get Q4).
    Q2K,
    /// Each tensor in its source encoding where the image has it, else the
    /// nearest one ([`keep_encoding`]).
    Keep,
}

impl QuantTarget {
    /// Parses `q4`, `q4s`, `q4b`, `q5s`, `q5`, `q8`, `f16`, `f32`, `q4k`, `q5k`, `q6k`, `q3k`, `q2k`, `keep`.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "q4" => QuantTarget::Q4,
            "q4s" => QuantTarget::Q4S,
            "q4b" => QuantTarget::Q4B,
            "q5s" => QuantTarget::Q5S,
            "q5" => QuantTarget::Q5,
            "q8" => QuantTarget::Q8,
            "f16" => QuantTarget::F16,
            "f32" => QuantTarget::F32,
            "q4k" => QuantTarget::Q4K,
            "q5k" => QuantTarget::Q5K,
            "q6k" => QuantTarget::Q6K,
            "q3k" => QuantTarget::Q3K,
            "q2k" => QuantTarget::Q2K,
            "keep" => QuantTarget::Keep,
            other => {
                bail!(
                    "unknown quantization {other:?}: expected q4, q4s, q4b, q5s, q5, q8, f16, f32, q4k, q5k, q6k, q3k, q2k or keep"
                )
            }
        })
    }

    /// The encoding a matrix of `tensor` gets, and the k-quant it was
    /// meant to get when its rows are not whole super-blocks of 256.
    fn encoding_for(self, tensor: &SourceTensor) -> (Encoding, Option<Encoding>) {
        let wanted = match (self, tensor.native) {
            (QuantTarget::Q4, Some(native @ (Encoding::Q4 | Encoding::Q4S))) => native,
            (QuantTarget::Q4, _) => Encoding::Q4,
            (QuantTarget::Q4S, _) => Encoding::Q4S,
            (QuantTarget::Q4B, _) => Encoding::Q4B,
            (QuantTarget::Q5S, _) => Encoding::Q5S,
            (QuantTarget::Q5, _) => Encoding::Q5,
            (QuantTarget::Q8, _) => Encoding::Q8,
            (QuantTarget::F16, _) => Encoding::F16,
            (QuantTarget::F32, _) => Encoding::F32,
            (QuantTarget::Q4K, _) => Encoding::Q4K,
            (QuantTarget::Q5K, _) => Encoding::Q5K,
            (QuantTarget::Q6K, _) => Encoding::Q6K,
            (QuantTarget::Q3K, _) => Encoding::Q3K,
            (QuantTarget::Q2K, _) => Encoding::Q2K,
            (QuantTarget::Keep, Some(native)) => native,
            (QuantTarget::Keep, None) => keep_encoding(&tensor.source_type),
        };
        match wanted {
            // The k-quants need rows of whole super-blocks: the 4-, 3- and
            // 2-bit ones fall back to Q4, the 5- and 6-bit ones to Q8.
            Encoding::Q4K | Encoding::Q3K | Encoding::Q2K if !tensor.cols().is_multiple_of(QK_K) => {
                (Encoding::Q4, Some(wanted))
            }
            Encoding::Q5K | Encoding::Q6K if !tensor.cols().is_multiple_of(QK_K) => (Encoding::Q8, Some(wanted)),
            _ => (wanted, None),
        }
    }
}

/// `--quant keep`'s encoding for a matrix whose source type the image has
/// no encoding for (Q5_0, Q5_1 and Q2_K have one each: Q5S, Q5 and Q2K,
/// carried): IQ4_NL and IQ4_XS go to Q8 (their values are a block scale times
/// small integers: IQ4_NL's are exactly Q8 values, see [`quantize_q8_lossless`]),
/// BF16 to F16 (the same 16 bits a value, exact for every value inside
/// f16's normal range); anything else to F32.
pub fn keep_encoding(source_type: &str) -> Encoding {
    match source_type.to_ascii_uppercase().as_str() {
        "IQ4_NL" | "IQ4_XS" => Encoding::Q8,
        "BF16" => Encoding::F16,
        _ => Encoding::F32,
    }
}

/// What to convert to.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Encoding family of the weight matrices.
    pub quant: QuantTarget,
    /// `(pattern, target)` overrides, first match wins; `*` matches any run of characters.
    pub overrides: Vec<(String, QuantTarget)>,
    /// Store quantized matrices four rows interleaved (the NEON kernels'
    /// layout); `false` keeps ggml's row-major blocks.
    pub interleave: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// `--mixed auto`'s choice: projections kept at a higher precision
    /// (after `overrides`, before `quant`), recorded in the `source` section.
    pub mixed: Option<crate::mixed::MixedPlan>,
    /// `--imatrix`'s importance vectors: the rounding searches weigh each
    /// column by them (`crate::importance`), recorded in the `source` section.
    pub importance: Option<crate::importance::ImportanceMatrix>,
}

impl ConvertOptions {
    /// `quant` for the matrices, with the embedding and output layer kept at
    /// q8 when the matrices go to 4 bits or fewer (as llama.cpp's Q4 presets
    /// do: they are the most sensitive and a small share of the bytes), but
    /// at q5s for q4b, the mix made for fewer bytes a token: on SmolLM2 the
    /// 5-bit output layer, rounded with an importance matrix, is the
    /// smallest within 2 % of the Q4_1 model's perplexity (docs/quants.md,
    /// "Q4B"; without one, [`ConvertOptions::q4b_head_without_importance`]).
    /// `keep` keeps them as the source has them too.
    pub fn new(quant: QuantTarget) -> Self {
        let mut overrides = Vec::new();
        let head = match quant {
            QuantTarget::Q4 | QuantTarget::Q4S | QuantTarget::Q4K | QuantTarget::Q3K | QuantTarget::Q2K => {
                Some(QuantTarget::Q8)
            }
            QuantTarget::Q4B => Some(QuantTarget::Q5S),
            _ => None,
        };
        if let Some(head) = head {
            overrides.push(("token_embd.weight".to_string(), head));
            overrides.push(("output.weight".to_string(), head));
        }
        Self { quant, overrides, interleave: true, progress: false, mixed: None, importance: None }
    }

    /// q4b's default embedding and output layer without an importance
    /// matrix: q5 (Q5_1) instead of q5s. On SmolLM2 q5s rounded without one
    /// costs +2.45 % perplexity on the whole of *The Tempest*, q5 +1.33 %
    /// (docs/quants.md, "Q4B"). Overrides the caller gave are untouched.
    pub fn q4b_head_without_importance(&mut self) {
        if self.quant == QuantTarget::Q4B && self.importance.is_none() {
            // The defaults are the last two: `add_override` puts the caller's before them.
            for (pattern, target) in self.overrides.iter_mut().rev().take(2) {
                if matches!(pattern.as_str(), "token_embd.weight" | "output.weight") && *target == QuantTarget::Q5S {
                    *target = QuantTarget::Q5;
                }
            }
        }
    }

    /// Parses an override `PATTERN=QUANT` and puts it before the others.
    pub fn add_override(&mut self, spec: &str) -> Result<()> {
        let (pattern, quant) =
            spec.split_once('=').with_context(|| format!("tensor override {spec:?} is not PATTERN=QUANT"))?;
        self.overrides.insert(0, (pattern.to_string(), QuantTarget::parse(quant)?));
        Ok(())
    }

    fn target_for(&self, name: &str) -> QuantTarget {
        let mixed = || self.mixed.as_ref().and_then(|plan| plan.target_for(name));
        self.overrides
            .iter()
            .find(|(pattern, _)| wildcard_match(pattern, name))
            .map(|o| o.1)
            .or_else(mixed)
            .unwrap_or(self.quant)
    }
}

/// `*` matches any run of characters (including none); everything else matches itself.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else { return false };
            (0..=tail.len()).filter(|&i| tail.is_char_boundary(i)).any(|i| wildcard_match(rest, &tail[i..]))
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvertReport {
    /// Tensors written.
    pub tensors: usize,
    /// Tensors copied bit-exact from the source.
    pub carried: usize,
    /// Tensors dequantized and quantized again.
    pub requantized: usize,
    /// Size of the image.
    pub image_bytes: u64,
    /// Per tensor: name, source type, image encoding, carried.
    pub details: Vec<(String, String, String, bool)>,
    /// Per tensor family and source type, what was done, in file order.
    pub families: Vec<FamilyReport>,
    /// Matrices quantized with an importance vector (`--imatrix`).
    pub importance_tensors: usize,
}

/// What a conversion did to the tensors of one family (`ffn_down`, every
/// layer's) that had one source type and went to one encoding.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FamilyReport {
    /// The tensor name without `blk.N.` and `.weight`: `ffn_down`, `token_embd`.
    pub family: String,
    /// How many tensors.
    pub tensors: usize,
    /// Their type in the source: `Q5_0`, `F32`.
    pub source_type: String,
    /// Their encoding in the image, without the block order: `q4`, `f32`.
    pub encoding: String,
    /// Copied bit-exact, or expanded to f32 and encoded again.
    pub carried: bool,
    /// What else the reader should know: a k-quant that fell back (rows
    /// not whole super-blocks), or whether `--quant keep`'s conversion kept
    /// every value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl FamilyReport {
    /// The family of tensor `name`: without a `blk.N.` prefix and a `.weight` suffix.
    pub fn family_of(name: &str) -> &str {
        let name = name.strip_suffix(".weight").unwrap_or(name);
        match name.strip_prefix("blk.").and_then(|rest| rest.split_once('.')) {
            Some((layer, part)) if !layer.is_empty() && layer.bytes().all(|b| b.is_ascii_digit()) => part,
            _ => name,
        }
    }

    /// `details` grouped by family, source type, encoding and carried: families
    /// in order of first appearance, each family's groups together.
    fn group(details: &[(String, String, String, bool)], notes: &[Option<String>]) -> Vec<FamilyReport> {
        let mut families: Vec<FamilyReport> = Vec::new();
        for ((name, source_type, stored, carried), note) in details.iter().zip(notes) {
            // The family's encoding, not its block order (q4x4 is q4 interleaved).
            let encoding = Encoding::from_name(stored).map_or(stored.as_str(), |e| e.row_major().name());
            let family = Self::family_of(name);
            let same = |f: &&mut FamilyReport| {
                f.family == family
                    && &f.source_type == source_type
                    && f.encoding == encoding
                    && f.carried == *carried
                    && &f.note == note
            };
            match families.iter_mut().find(same) {
                Some(group) => group.tensors += 1,
                None => {
                    // Beside the family's other groups, so a family reads as one block.
                    let at = families.iter().rposition(|f| f.family == family).map_or(families.len(), |i| i + 1);
                    let group = FamilyReport {
                        family: family.to_string(),
                        tensors: 1,
                        source_type: source_type.clone(),
                        encoding: encoding.to_string(),
                        carried: *carried,
                        note: note.clone(),
                    };
                    families.insert(at, group);
                }
            }
        }
        families
    }

    /// What was done, in words: `carried bit-exact as q8`, `dequantized, re-quantized to q4`.
    pub fn action(&self) -> String {
        let encoding = &self.encoding;
        if self.carried {
            return format!("carried bit-exact as {encoding}");
        }
        let from_float = ["F32", "F16", "BF16", "F64"].iter().any(|t| t.eq_ignore_ascii_case(&self.source_type));
        let to_blocks = Encoding::from_name(encoding).is_some_and(Encoding::is_blocked);
        match (from_float, to_blocks) {
            (true, true) => format!("quantized to {encoding}"),
            (true, false) => format!("converted to {encoding}"),
            (false, true) => format!("dequantized, re-quantized to {encoding}"),
            (false, false) => format!("dequantized to {encoding}"),
        }
    }
}

impl std::fmt::Display for FamilyReport {
    /// `ffn_down: 30 × Q5_0 → dequantized, re-quantized to q4`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} × {} → {}", self.family, self.tensors, self.source_type, self.action_with_note())
    }
}

impl FamilyReport {
    /// [`FamilyReport::action`] with the note, if any, after it.
    pub fn action_with_note(&self) -> String {
        match &self.note {
            Some(note) => format!("{} ({note})", self.action()),
            None => self.action(),
        }
    }
}

/// Largest chunk of f32 rows converted at once (bounds memory for any tensor size).
const CHUNK_BYTES: usize = 16 << 20;

/// Reads `values.len() / cols` rows of tensor `index` from `row` on as f32,
/// refusing a value that is not finite by its row.
fn read_finite_rows(
    source: &dyn ModelSource,
    index: usize,
    tensor: &SourceTensor,
    row: usize,
    values: &mut [f32],
) -> Result<()> {
    let cols = tensor.cols();
    source
        .read_rows(index, row, values)
        .with_context(|| format!("reading tensor {} rows {row}..{}", tensor.name, row + values.len() / cols))?;
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        bail!(
            "{}: tensor {}: value {} at row {} is not finite",
            source.describe(),
            tensor.name,
            values[bad],
            row + bad / cols
        );
    }
    Ok(())
}

/// A matrix as Q4B's bytes (row scales, then blocks): its Q4_1 blocks, the
/// source's own where it stores Q4_1 (the levels kept, only the scales
/// rounded), else rounded as `q4` rounds them (weighed by `importance`),
/// then [`q4b_from_q4`].
fn q4b_tensor(
    source: &dyn ModelSource,
    index: usize,
    tensor: &SourceTensor,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>> {
    let (rows, cols) = (tensor.rows(), tensor.cols());
    let blocks: Vec<BlockQ4> = match tensor.native {
        Some(Encoding::Q4) => bytemuck::pod_collect_to_vec(
            source
                .native_bytes(index)
                .with_context(|| format!("{}: tensor {}: native bytes missing", source.describe(), tensor.name))?,
        ),
        _ => {
            let mut values = vec![0f32; rows * cols];
            read_finite_rows(source, index, tensor, 0, &mut values)?;
            let mut blocks = vec![<BlockQ4 as bytemuck::Zeroable>::zeroed(); values.len() / GROUP];
            crate::importance::quantize_rows(
                Encoding::Q4,
                &values,
                cols,
                importance,
                bytemuck::cast_slice_mut(&mut blocks),
            );
            blocks
        }
    };
    if let Some(bad) = blocks.iter().position(|b| !(b.d.is_finite() && b.m.is_finite())) {
        bail!(
            "{}: tensor {}: Q4_1 block {bad} (row {}) has scale {} and minimum {}: not finite",
            source.describe(),
            tensor.name,
            bad * GROUP / cols,
            blocks[bad].d,
            blocks[bad].m
        );
    }
    let mut bytes = vec![0u8; Encoding::Q4B.tensor_bytes(rows, cols)];
    q4b_from_q4(&blocks, cols, &mut bytes);
    Ok(bytes)
}

/// Converts `source` into an image at `output`.
pub fn convert(source: &dyn ModelSource, output: &Path, options: &ConvertOptions) -> Result<ConvertReport> {
    let config = source.config();
    config.validate().map_err(|e| anyhow::anyhow!("{}: {e}", source.describe()))?;
    let mut writer = ImageWriter::create(output)?;
    writer.add_section(section::CONFIG, bytemuck::bytes_of(config), true)?;
    if let Some(scaling) = source.rope_scaling() {
        scaling.check(config).map_err(|e| anyhow::anyhow!("{}: {e}", source.describe()))?;
        // Required: a reader that does not know it refuses the file rather than run plain RoPE.
        writer.add_section(section::ROPE_SCALING, &scaling.to_section(), true)?;
    }
    if let Some(architecture) = source.architecture().filter(|a| a.needs_section(config)) {
        architecture.check(config).map_err(|e| anyhow::anyhow!("{}: {e}", source.describe()))?;
        // Required: a reader that does not know it refuses the file rather than run the Llama block.
        writer.add_section(section::ARCHITECTURE, &architecture.to_section(), true)?;
    }
    writer.add_section(section::TOKENIZER, &encode_vocab(source.vocab())?, true)?;
    if let Some(template) = source.chat_template() {
        writer.add_section(section::CHAT_TEMPLATE, template.as_bytes(), false)?;
    }

    let tensors = source.tensors();
    let total_values: u64 = tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum();
    let bar = if options.progress { ProgressBar::new(total_values) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} converting [{bar:40}] {percent:>3}% {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );

    let mut report = ConvertReport {
        tensors: 0,
        carried: 0,
        requantized: 0,
        image_bytes: 0,
        details: Vec::new(),
        families: Vec::new(),
        importance_tensors: 0,
    };
    let mut values: Vec<f32> = Vec::new();
    let mut bytes: Vec<u8> = Vec::new();
    let mut notes: Vec<Option<String>> = Vec::new();
    let mut weighed = 0;
    for (index, tensor) in tensors.iter().enumerate() {
        bar.set_message(tensor.name.clone());
        let (rows, cols) = (tensor.rows(), tensor.cols());
        // Vectors (norms) stay f32: they are tiny and the forward pass reads them as f32.
        let target = options.target_for(&tensor.name);
        let (encoding, fell_back) =
            if tensor.shape.len() == 1 { (Encoding::F32, None) } else { target.encoding_for(tensor) };
        let block_values = encoding.block_values();
        if !cols.is_multiple_of(block_values) {
            bail!(
                "{}: tensor {}: rows of {cols} values cannot be stored as {} (blocks of {block_values})",
                source.describe(),
                tensor.name,
                encoding.name()
            );
        }
        // Chunks of whole groups of rows, so each can be interleaved on its own.
        let stored = match encoding.interleaved_for(rows) {
            Some(interleaved) if options.interleave && tensor.shape.len() == 2 => interleaved,
            _ => encoding,
        };
        let mut mixed: Vec<u8> = Vec::new();
        let mut write = |writer: &mut ImageWriter, row_major: &[u8]| -> Result<()> {
            if stored == encoding {
                return Ok(writer.write_tensor_data(row_major)?);
            }
            mixed.resize(row_major.len(), 0);
            interleave_bytes(stored, row_major, cols, &mut mixed);
            Ok(writer.write_tensor_data(&mixed)?)
        };
        writer.begin_tensor(&tensor.name, stored, &tensor.shape)?;
        let carried = tensor.native == Some(encoding);
        // `keep` says whether what it converted kept every value.
        let check_exact = target == QuantTarget::Keep && !carried && matches!(encoding, Encoding::Q8 | Encoding::F16);
        let mut exact = true;
        let q4b_from_source_q4 = encoding == Encoding::Q4B && tensor.native == Some(Encoding::Q4);
        let importance = match options.importance.as_ref().and_then(|m| m.for_tensor(&tensor.name)) {
            Some(vector) if vector.len() != cols => bail!(
                "{}: tensor {}: the importance matrix has {} values for its {cols} columns",
                source.describe(),
                tensor.name,
                vector.len()
            ),
            // Q4B from Q4_1 keeps the source's levels: nothing to weigh.
            Some(vector) if !carried && crate::importance::weighs(encoding) && !q4b_from_source_q4 => {
                weighed += 1;
                Some(vector)
            }
            _ => None,
        };
        if encoding == Encoding::Q4B {
            // Q4B's row scales lead the tensor: the whole tensor at once.
            let bytes = q4b_tensor(source, index, tensor, importance)?;
            write(&mut writer, &bytes)?;
        } else if carried {
            let raw = source
                .native_bytes(index)
                .with_context(|| format!("{}: tensor {}: native bytes missing", source.describe(), tensor.name))?;
            let group_bytes = encoding.bytes_for(cols) * stored.rows_interleaved();
            for chunk in raw.chunks((CHUNK_BYTES / group_bytes).max(1) * group_bytes) {
                write(&mut writer, chunk)?;
            }
        } else {
            // Whole groups of four and of eight rows.
            let rows_per_chunk = (CHUNK_BYTES / 4 / cols / MAX_ROWS).max(1) * MAX_ROWS;
            let mut row = 0;
            while row < rows {
                let n = rows_per_chunk.min(rows - row);
                values.resize(n * cols, 0.0);
                read_finite_rows(source, index, tensor, row, &mut values)?;
                bytes.resize(encoding.bytes_for(values.len()), 0);
                match encoding {
                    Encoding::Q8 if check_exact => {
                        let mut blocks = vec![BlockQ8 { d: half::f16::ZERO, qs: [0; GROUP] }; values.len() / GROUP];
                        exact &= quantize_q8_lossless(&values, &mut blocks) == 0;
                        bytes.copy_from_slice(bytemuck::cast_slice(&blocks));
                    }
                    _ => {
                        crate::importance::quantize_rows(encoding, &values, cols, importance, &mut bytes);
                        if check_exact {
                            exact &= values.iter().all(|&v| half::f16::from_f32(v).to_f32() == v);
                        }
                    }
                }
                write(&mut writer, &bytes)?;
                row += n;
            }
        }
        writer.end_tensor()?;
        source.release(index);
        bar.inc((rows * cols) as u64);
        report.tensors += 1;
        if carried {
            report.carried += 1;
        } else {
            report.requantized += 1;
        }
        report.details.push((tensor.name.clone(), tensor.source_type.clone(), stored.name().to_string(), carried));
        notes.push(match (fell_back, check_exact, exact) {
            (Some(wanted), _, _) => {
                Some(format!("{} asked, but rows of {cols} values are not whole super-blocks of {QK_K}", wanted.name()))
            }
            (None, _, _) if q4b_from_source_q4 => {
                Some("Q4_1's levels, scales and minimums rounded to bytes".to_string())
            }
            (None, true, true) => Some("every value kept exactly".to_string()),
            (None, true, false) => Some(format!("not every value fits {}: rounded", encoding.name())),
            (None, false, _) => None,
        });
    }
    bar.finish_and_clear();
    report.families = FamilyReport::group(&report.details, &notes);

    let mut description = serde_json::json!({
        "source": source.describe(),
        "quant": format!("{:?}", options.quant).to_lowercase(),
        "layout": if options.interleave { "x4" } else { "rows" },
        "overrides": options.overrides.iter().map(|(p, q)| format!("{p}={q:?}").to_lowercase()).collect::<Vec<_>>(),
        "carried": report.carried,
        "requantized": report.requantized,
        "converter": concat!("bramble ", env!("CARGO_PKG_VERSION")),
    });
    if let Some(plan) = &options.mixed {
        description["mixed"] = serde_json::to_value(plan)?;
    }
    if let Some(matrix) = &options.importance {
        description["importance"] = matrix.record(weighed);
    }
    report.importance_tensors = weighed;
    writer.add_section(section::SOURCE, description.to_string().as_bytes(), false)?;
    report.image_bytes = writer.finish()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4b_head_is_q5s_with_an_importance_matrix_else_q5() {
        let mut options = ConvertOptions::new(QuantTarget::Q4B);
        assert_eq!(options.target_for("output.weight"), QuantTarget::Q5S);
        options.add_override("token_embd.weight=q8").unwrap();
        options.q4b_head_without_importance();
        assert_eq!(options.target_for("output.weight"), QuantTarget::Q5);
        // The caller's override wins, and the body stays q4b.
        assert_eq!(options.target_for("token_embd.weight"), QuantTarget::Q8);
        assert_eq!(options.target_for("blk.0.ffn_up.weight"), QuantTarget::Q4B);
        // A caller asking for q5s by the default's own pattern keeps it.
        let mut asked = ConvertOptions::new(QuantTarget::Q4B);
        asked.add_override("output.weight=q5s").unwrap();
        asked.q4b_head_without_importance();
        assert_eq!(asked.target_for("output.weight"), QuantTarget::Q5S);
        assert_eq!(asked.target_for("token_embd.weight"), QuantTarget::Q5);
        // Other mixes keep their q8 head.
        let mut q4 = ConvertOptions::new(QuantTarget::Q4);
        q4.q4b_head_without_importance();
        assert_eq!(q4.target_for("output.weight"), QuantTarget::Q8);
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("blk.*.ffn_down.weight", "blk.12.ffn_down.weight"));
        assert!(!wildcard_match("blk.*.ffn_down.weight", "blk.12.ffn_up.weight"));
        assert!(wildcard_match("*", "anything"));
        assert!(wildcard_match("token_embd.weight", "token_embd.weight"));
        assert!(!wildcard_match("token_embd", "token_embd.weight"));
    }

    #[test]
    fn families_are_names_without_layer_and_suffix() {
        assert_eq!(FamilyReport::family_of("blk.12.ffn_down.weight"), "ffn_down");
        assert_eq!(FamilyReport::family_of("token_embd.weight"), "token_embd");
        assert_eq!(FamilyReport::family_of("output_norm.weight"), "output_norm");
        assert_eq!(FamilyReport::family_of("blk.x.attn_q.weight"), "blk.x.attn_q");
        assert_eq!(FamilyReport::family_of("model.layers.0.mlp.weight"), "model.layers.0.mlp");
    }

    #[test]
    fn families_group_by_type_and_encoding_in_order() {
        let row = |name: &str, source: &str, stored: &str, carried: bool| {
            (name.to_string(), source.to_string(), stored.to_string(), carried)
        };
        let details = [
            row("token_embd.weight", "Q8_0", "q8", true),
            row("blk.0.attn_v.weight", "Q5_0", "q4x4", false),
            row("blk.0.ffn_down.weight", "Q6_K", "q4x4", false),
            row("blk.0.attn_norm.weight", "F32", "f32", true),
            row("blk.1.attn_v.weight", "Q8_0", "q4x4", false),
            row("blk.1.ffn_down.weight", "Q6_K", "q4", false),
            row("blk.1.attn_norm.weight", "F32", "f32", true),
            row("blk.2.attn_v.weight", "Q5_0", "q4x4", false),
        ];
        let notes = vec![None; details.len()];
        let lines: Vec<String> = FamilyReport::group(&details, &notes).iter().map(|f| f.to_string()).collect();
        assert_eq!(
            lines,
            [
                "token_embd: 1 × Q8_0 → carried bit-exact as q8",
                "attn_v: 2 × Q5_0 → dequantized, re-quantized to q4",
                "attn_v: 1 × Q8_0 → dequantized, re-quantized to q4",
                "ffn_down: 2 × Q6_K → dequantized, re-quantized to q4",
                "attn_norm: 2 × F32 → carried bit-exact as f32",
            ]
        );
    }

    #[test]
    fn actions_say_what_was_expanded() {
        let family = |source: &str, encoding: &str| FamilyReport {
            family: "attn_q".to_string(),
            tensors: 1,
            source_type: source.to_string(),
            encoding: encoding.to_string(),
            carried: false,
            note: None,
        };
        assert_eq!(family("BF16", "q8").action(), "quantized to q8");
        assert_eq!(family("F32", "f16").action(), "converted to f16");
        assert_eq!(family("Q4_K", "f32").action(), "dequantized to f32");
        assert_eq!(family("IQ4_XS", "q4s").action(), "dequantized, re-quantized to q4s");
    }

    fn tensor(source_type: &str, native: Option<Encoding>, cols: usize) -> SourceTensor {
        SourceTensor {
            name: "blk.0.ffn_up.weight".into(),
            shape: vec![64, cols],
            source_type: source_type.into(),
            native,
        }
    }

    #[test]
    fn q4_keeps_native_4_bit_blocks() {
        let encoding = |target: QuantTarget, native| target.encoding_for(&tensor("Q4_0", native, 256)).0;
        assert_eq!(encoding(QuantTarget::Q4, Some(Encoding::Q4S)), Encoding::Q4S);
        assert_eq!(encoding(QuantTarget::Q4, Some(Encoding::Q8)), Encoding::Q4);
        assert_eq!(encoding(QuantTarget::Q4S, Some(Encoding::Q4)), Encoding::Q4S);
        assert_eq!(encoding(QuantTarget::Q4, Some(Encoding::Q4K)), Encoding::Q4);
    }

    #[test]
    fn kquant_targets_fall_back_on_rows_that_are_not_whole_super_blocks() {
        let at = |target: QuantTarget, cols| target.encoding_for(&tensor("F32", Some(Encoding::F32), cols));
        assert_eq!(at(QuantTarget::Q4K, 512), (Encoding::Q4K, None));
        assert_eq!(at(QuantTarget::Q4K, 576), (Encoding::Q4, Some(Encoding::Q4K)));
        assert_eq!(at(QuantTarget::Q3K, 576), (Encoding::Q4, Some(Encoding::Q3K)));
        assert_eq!(at(QuantTarget::Q2K, 576), (Encoding::Q4, Some(Encoding::Q2K)));
        assert_eq!(at(QuantTarget::Q2K, 768), (Encoding::Q2K, None));
        assert_eq!(at(QuantTarget::Q5K, 576), (Encoding::Q8, Some(Encoding::Q5K)));
        assert_eq!(at(QuantTarget::Q6K, 96), (Encoding::Q8, Some(Encoding::Q6K)));
        assert_eq!(at(QuantTarget::Q6K, 1536), (Encoding::Q6K, None));
    }

    #[test]
    fn keep_carries_what_the_image_has_and_converts_the_rest_once() {
        let keep = |source: &str, native| QuantTarget::Keep.encoding_for(&tensor(source, native, 512)).0;
        for native in [Encoding::F32, Encoding::F16, Encoding::Q8, Encoding::Q4, Encoding::Q4S, Encoding::Q4K] {
            assert_eq!(keep("whatever", Some(native)), native);
        }
        assert_eq!(keep("Q6_K", Some(Encoding::Q6K)), Encoding::Q6K);
        assert_eq!(keep("Q2_K", Some(Encoding::Q2K)), Encoding::Q2K);
        assert_eq!(QuantTarget::parse("q2k").unwrap(), QuantTarget::Q2K);
        assert_eq!(keep("Q5_0", Some(Encoding::Q5S)), Encoding::Q5S);
        // A 4-bit target does not keep 5-bit blocks; q5s asks for them.
        let at = |target: QuantTarget| target.encoding_for(&tensor("Q5_0", Some(Encoding::Q5S), 576)).0;
        assert_eq!(
            (at(QuantTarget::Q4), at(QuantTarget::Q5S), at(QuantTarget::Q8)),
            (Encoding::Q4, Encoding::Q5S, Encoding::Q8)
        );
        assert_eq!(QuantTarget::parse("q5s").unwrap(), QuantTarget::Q5S);
        // Q5_1 likewise is carried as q5; q5 asks for it, and q5s is not q5.
        assert_eq!(keep("Q5_1", Some(Encoding::Q5)), Encoding::Q5);
        let at = |target: QuantTarget| target.encoding_for(&tensor("Q5_1", Some(Encoding::Q5), 576)).0;
        assert_eq!(
            (at(QuantTarget::Q4), at(QuantTarget::Q5), at(QuantTarget::Q5S)),
            (Encoding::Q4, Encoding::Q5, Encoding::Q5S)
        );
        assert_eq!(QuantTarget::parse("q5").unwrap(), QuantTarget::Q5);
        assert_eq!(keep("IQ4_NL", None), Encoding::Q8);
        assert_eq!(keep("IQ4_XS", None), Encoding::Q8);
        assert_eq!(keep("BF16", None), Encoding::F16);
        // Keep never quantizes the embedding behind the source's back.
        assert!(ConvertOptions::new(QuantTarget::Keep).overrides.is_empty());
    }
}
