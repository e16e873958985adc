//! llama2.c checkpoints (`model.bin`) and their `tokenizer.bin`, as written by
//! karpathy/llama2.c's `export.py` and read by its `run.c`.
//!
//! Two float32 layouts are read (both little-endian):
//!
//! - **Version 0** (legacy, what `run.c` reads): a header of 7 `i32`
//!   `(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)`,
//!   where a negative `vocab_size` means the classifier is not shared with
//!   the embedding; then `token_embedding_table[vocab][dim]`,
//!   `rms_att_weight[layers][dim]`, `wq[layers][q_dim][dim]`,
//!   `wk[layers][kv_dim][dim]`, `wv[layers][kv_dim][dim]`,
//!   `wo[layers][dim][q_dim]`, `rms_ffn_weight[layers][dim]`,
//!   `w1[layers][hidden][dim]`, `w2[layers][dim][hidden]`,
//!   `w3[layers][hidden][dim]`, `rms_final_weight[dim]`,
//!   `freq_cis_real[seq_len][head_dim/2]`, `freq_cis_imag[seq_len][head_dim/2]`,
//!   and `wcls[vocab][dim]` when unshared.
//! - **Version 1** (`export.py --version 1`): `u32` magic `0x616b3432`
//!   ("ak42"), `i32` version 1, the same 7 `i32`, a `u8` shared-classifier
//!   flag, zeros up to byte 256; then, in `version1_export`'s order (which is
//!   not version 0's): every layer's `rms_att_weight`, every layer's
//!   `rms_ffn_weight`, `rms_final_weight`, `token_embedding_table`, `wq`, `wk`,
//!   `wv`, `wo`, `w1`, `w2`, `w3` (each for every layer), `wcls` when unshared.
//!   There is no `freq_cis`. Version 2 (Q8_0) is refused.
//!
//! Matrices are `[out][in]` row-major (`run.c`'s `matmul` computes
//! `xout[i] = Σ_j w[i·n + j]·x[j]`), which is the image's convention; `w1` is
//! the SwiGLU gate, `w3` the up projection, `w2` the down projection. llama2.c
//! rotates adjacent pairs (`rope_style` 0) with θ = 10000, uses RMSNorm ε = 1e-5
//! and `head_dim = dim / n_heads`; the file stores none of these.
//!
//! `tokenizer.bin` is an `i32` max_token_length, then per token an `f32` score,
//! an `i32` length and that many bytes. `tokenizer.py` writes spaces for `▁`
//! and `"\n<s>\n"`, `"\n</s>\n"` for BOS and EOS; the reader undoes both.

use super::{ModelSource, SourceTensor};
use crate::synth::SyntheticModel;
use anyhow::{anyhow, bail, Context, Result};
use bramble_runtime::config::ARCH_LLAMA;
use bramble_runtime::vocab::{TokenType, TokenizerKind};
use bramble_runtime::{Encoding, ModelConfig, Vocab};
use bytemuck::Zeroable;
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `u32` magic at the start of version 1 and 2 checkpoints: "ak42".
pub const MAGIC: u32 = 0x616b_3432;

/// Bytes before the weights of a version 1 checkpoint.
const VERSIONED_HEADER_BYTES: u64 = 256;

/// Bytes of a version 0 header.
const LEGACY_HEADER_BYTES: u64 = 7 * 4;

/// Largest dimension accepted from a header, as [`ModelConfig::validate`] does.
const MAX_DIMENSION: i32 = 1 << 24;

/// Largest `tokenizer.bin` read into memory.
const MAX_TOKENIZER_BYTES: u64 = 1 << 30;

/// RoPE base frequency `run.c` uses.
const ROPE_THETA: f32 = 10000.0;

/// RMSNorm epsilon `run.c` uses.
const NORM_EPS: f32 = 1e-5;

/// The header's hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Params {
    dim: usize,
    hidden_dim: usize,
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: usize,
    vocab_size: usize,
    seq_len: usize,
    shared_classifier: bool,
}

impl Params {
    fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }
    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim()
    }
}

impl std::fmt::Display for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dim {}, hidden_dim {}, n_layers {}, n_heads {}, n_kv_heads {}, vocab_size {}, seq_len {}, {} classifier",
            self.dim,
            self.hidden_dim,
            self.n_layers,
            self.n_heads,
            self.n_kv_heads,
            self.vocab_size,
            self.seq_len,
            if self.shared_classifier { "shared" } else { "separate" }
        )
    }
}

/// What a stretch of the checkpoint holds.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    /// A model tensor, by GGUF name.
    Tensor(String),
    /// RoPE's cosines (version 0 only; unused).
    FreqCisReal,
    /// RoPE's sines (version 0 only; unused).
    FreqCisImag,
}

/// One array of the checkpoint: what, its shape, and its byte offset.
#[derive(Debug, Clone)]
struct Placement {
    part: Part,
    shape: Vec<usize>,
    offset: u64,
}

/// One kind of array, in file order: `(GGUF part name, or None for freq_cis;
/// for a part, whether there is one per layer, for freq_cis whether it is the
/// imaginary half; shape)`.
type ArrayKind = (Option<&'static str>, bool, Vec<usize>);

/// The kinds of array of a checkpoint of `params`, in file order.
fn array_kinds(params: &Params, version: u32) -> Result<Vec<ArrayKind>> {
    let Params { dim, hidden_dim, vocab_size, seq_len, .. } = *params;
    let (q_dim, kv_dim, half_head) = (dim, params.kv_dim(), params.head_dim() / 2);
    let per_layer = |part: &'static str, shape: Vec<usize>| (Some(part), true, shape);
    let single = |part: &'static str, shape: Vec<usize>| (Some(part), false, shape);
    let attn_norm = per_layer("attn_norm", vec![dim]);
    let wq = per_layer("attn_q", vec![q_dim, dim]);
    let wk = per_layer("attn_k", vec![kv_dim, dim]);
    let wv = per_layer("attn_v", vec![kv_dim, dim]);
    let wo = per_layer("attn_output", vec![dim, q_dim]);
    let ffn_norm = per_layer("ffn_norm", vec![dim]);
    let w1 = per_layer("ffn_gate", vec![hidden_dim, dim]);
    let w2 = per_layer("ffn_down", vec![dim, hidden_dim]);
    let w3 = per_layer("ffn_up", vec![hidden_dim, dim]);
    let embedding = single("token_embd", vec![vocab_size, dim]);
    let final_norm = single("output_norm", vec![dim]);
    let classifier = single("output", vec![vocab_size, dim]);
    let mut kinds = match version {
        0 => vec![
            embedding,
            attn_norm,
            wq,
            wk,
            wv,
            wo,
            ffn_norm,
            w1,
            w2,
            w3,
            final_norm,
            (None, false, vec![seq_len, half_head]),
            (None, true, vec![seq_len, half_head]),
        ],
        1 => vec![attn_norm, ffn_norm, final_norm, embedding, wq, wk, wv, wo, w1, w2, w3],
        other => bail!("llama2.c checkpoint version {other} has no float32 layout"),
    };
    if !params.shared_classifier {
        kinds.push(classifier);
    }
    Ok(kinds)
}

/// Bytes of one array of `shape`.
fn array_bytes(shape: &[usize]) -> Option<u64> {
    shape.iter().try_fold(4u64, |n, &d| n.checked_mul(d as u64))
}

fn header_bytes(version: u32) -> u64 {
    if version == 0 {
        LEGACY_HEADER_BYTES
    } else {
        VERSIONED_HEADER_BYTES
    }
}

/// The size of a checkpoint of `params`, computed without listing its arrays
/// (a corrupt header may claim millions of layers).
fn file_size(params: &Params, version: u32) -> Result<u64> {
    let overflow = || anyhow!("a llama2.c checkpoint of {params} would be larger than any file");
    let mut total = header_bytes(version);
    for (part, per_layer, shape) in array_kinds(params, version)? {
        let copies = if part.is_some() && per_layer { params.n_layers as u64 } else { 1 };
        let bytes = array_bytes(&shape).and_then(|b| b.checked_mul(copies)).ok_or_else(overflow)?;
        total = total.checked_add(bytes).ok_or_else(overflow)?;
    }
    Ok(total)
}

/// Where every array of a checkpoint of `params` lies. Call after
/// [`file_size`] has matched the file, which bounds the number of arrays.
fn layout(params: &Params, version: u32) -> Result<Vec<Placement>> {
    let mut offset = header_bytes(version);
    let mut placements = Vec::new();
    for (part, flag, shape) in array_kinds(params, version)? {
        let parts: Vec<Part> = match part {
            Some(name) if flag => {
                (0..params.n_layers).map(|l| Part::Tensor(format!("blk.{l}.{name}.weight"))).collect()
            }
            Some(name) => vec![Part::Tensor(format!("{name}.weight"))],
            None => vec![if flag { Part::FreqCisImag } else { Part::FreqCisReal }],
        };
        let bytes = array_bytes(&shape).ok_or_else(|| anyhow!("a llama2.c checkpoint of {params} overflows"))?;
        for part in parts {
            placements.push(Placement { part, shape: shape.clone(), offset });
            offset += bytes;
        }
    }
    Ok(placements)
}

/// The GGUF names of a model's tensors, in GGUF order.
fn gguf_order(n_layers: usize, shared_classifier: bool) -> Vec<String> {
    let mut names = vec!["token_embd.weight".to_string()];
    for layer in 0..n_layers {
        for part in
            ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
        {
            names.push(format!("blk.{layer}.{part}.weight"));
        }
    }
    names.push("output_norm.weight".to_string());
    if !shared_classifier {
        names.push("output.weight".to_string());
    }
    names
}

fn read_i32(bytes: &[u8], at: usize) -> i32 {
    i32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Parses the header: the parameters, the version and the shared-classifier flag.
fn read_header(path: &Path, bytes: &[u8]) -> Result<(Params, u32)> {
    let name = path.display();
    if (bytes.len() as u64) < LEGACY_HEADER_BYTES {
        bail!("{name}: {} bytes is too short for a llama2.c header ({LEGACY_HEADER_BYTES})", bytes.len());
    }
    let versioned = read_i32(bytes, 0) as u32 == MAGIC;
    let (version, fields_at) = if versioned {
        if (bytes.len() as u64) < VERSIONED_HEADER_BYTES {
            bail!(
                "{name}: {} bytes is too short for a versioned llama2.c header ({VERSIONED_HEADER_BYTES})",
                bytes.len()
            );
        }
        match read_i32(bytes, 4) {
            1 => (1u32, 8),
            2 => bail!(
                "{name}: llama2.c version 2 (Q8_0, runq.c) checkpoints are not supported; export with --version 0 or 1"
            ),
            other => bail!("{name}: unknown llama2.c checkpoint version {other}"),
        }
    } else {
        (0, 0)
    };
    let field = |index: usize| read_i32(bytes, fields_at + 4 * index);
    let names = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"];
    let mut values = [0usize; 7];
    let raw_vocab = field(5);
    for (index, key) in names.iter().enumerate() {
        let value = if index == 5 && version == 0 { raw_vocab.checked_abs().unwrap_or(-1) } else { field(index) };
        if value <= 0 || value > MAX_DIMENSION {
            bail!("{name}: header {key} = {} is out of range (1 ..= {MAX_DIMENSION})", field(index));
        }
        values[index] = value as usize;
    }
    let shared_classifier = if version == 0 {
        // The legacy format's flag is the sign of vocab_size.
        raw_vocab > 0
    } else {
        match bytes[fields_at + 28] {
            0 => false,
            1 => true,
            other => bail!("{name}: header shared_classifier flag is {other}, not 0 or 1"),
        }
    };
    let [dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len] = values;
    let params = Params { dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, shared_classifier };
    if dim % n_heads != 0 || (dim / n_heads) % 2 != 0 {
        bail!("{name}: dim {dim} is not n_heads {n_heads} heads of an even width");
    }
    if n_heads % n_kv_heads != 0 {
        bail!("{name}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}");
    }
    Ok((params, version))
}

/// A llama2.c checkpoint and its tokenizer, opened.
pub struct Llama2cSource {
    checkpoint: PathBuf,
    tokenizer: PathBuf,
    version: u32,
    map: Mmap,
    config: ModelConfig,
    vocab: Vocab,
    tensors: Vec<SourceTensor>,
    /// Byte offset of each tensor in `map`.
    offsets: Vec<usize>,
}

impl std::fmt::Debug for Llama2cSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama2cSource")
            .field("checkpoint", &self.checkpoint)
            .field("tokenizer", &self.tokenizer)
            .field("version", &self.version)
            .field("config", &self.config)
            .finish()
    }
}

impl Llama2cSource {
    /// Opens `checkpoint` with its `tokenizer.bin` (the same as [`open`]).
    pub fn open(checkpoint: &Path, tokenizer: &Path) -> Result<Llama2cSource> {
        open(checkpoint, tokenizer)
    }
}

/// Where llama2.c keeps the tokenizer of `checkpoint`: `tokenizer.bin` in the same directory.
pub fn default_tokenizer_path(checkpoint: &Path) -> PathBuf {
    checkpoint.parent().unwrap_or_else(|| Path::new(".")).join("tokenizer.bin")
}

/// Opens `checkpoint` with `tokenizer`, or with [`default_tokenizer_path`] when it is `None`.
pub fn open_checkpoint(checkpoint: &Path, tokenizer: Option<&Path>) -> Result<Llama2cSource> {
    match tokenizer {
        Some(tokenizer) => open(checkpoint, tokenizer),
        None => {
            let tokenizer = default_tokenizer_path(checkpoint);
            if !tokenizer.is_file() {
                bail!("{}: no tokenizer given and no {} beside it", checkpoint.display(), tokenizer.display());
            }
            open(checkpoint, &tokenizer)
        }
    }
}

/// Opens a llama2.c float32 checkpoint (version 0 or 1) and its `tokenizer.bin`.
pub fn open(checkpoint: &Path, tokenizer: &Path) -> Result<Llama2cSource> {
    let name = checkpoint.display();
    let file = std::fs::File::open(checkpoint).with_context(|| format!("{name}: cannot open"))?;
    // SAFETY: read-only private map; the converter's contract is that sources
    // are not modified while it runs.
    let map = unsafe { Mmap::map(&file) }.with_context(|| format!("{name}: cannot memory-map"))?;
    let (params, version) = read_header(checkpoint, &map)?;
    let expected = file_size(&params, version).map_err(|e| anyhow!("{name}: {e}"))?;
    if map.len() as u64 != expected {
        bail!("{name}: {} bytes, but a version {version} checkpoint of {params} is {expected} bytes", map.len());
    }
    let placements = layout(&params, version).map_err(|e| anyhow!("{name}: {e}"))?;
    let head_dim = params.head_dim();
    let mut config = ModelConfig::zeroed();
    config.arch = ARCH_LLAMA;
    config.dim = params.dim as u32;
    config.n_layers = params.n_layers as u32;
    config.n_heads = params.n_heads as u32;
    config.n_kv_heads = params.n_kv_heads as u32;
    config.head_dim = head_dim as u32;
    config.ffn_dim = params.hidden_dim as u32;
    config.vocab_size = params.vocab_size as u32;
    config.context_length = params.seq_len as u32;
    config.rope_theta = ROPE_THETA;
    config.rope_style = 0;
    config.rope_dim = head_dim as u32;
    config.norm_eps = NORM_EPS;
    config.tied_output = u32::from(params.shared_classifier);
    config.validate().map_err(|e| anyhow!("{name}: {e}"))?;

    let by_name: HashMap<String, &Placement> = placements
        .iter()
        .filter_map(|p| match &p.part {
            Part::Tensor(name) => Some((name.clone(), p)),
            _ => None,
        })
        .collect();
    let mut tensors = Vec::new();
    let mut offsets = Vec::new();
    for tensor_name in gguf_order(params.n_layers, params.shared_classifier) {
        let placement = by_name[&tensor_name];
        // The size check above bounds every offset by the mapped length.
        offsets.push(placement.offset as usize);
        tensors.push(SourceTensor {
            name: tensor_name,
            shape: placement.shape.clone(),
            source_type: "F32".to_string(),
            native: Some(Encoding::F32),
        });
    }
    let vocab = read_tokenizer(tokenizer, params.vocab_size)?;
    Ok(Llama2cSource {
        checkpoint: checkpoint.to_path_buf(),
        tokenizer: tokenizer.to_path_buf(),
        version,
        map,
        config,
        vocab,
        tensors,
        offsets,
    })
}

/// Whether `text` is a SentencePiece byte token `<0xAB>`.
fn is_byte_token(text: &[u8]) -> bool {
    text.len() == 6 && text.starts_with(b"<0x") && text[5] == b'>' && text[3..5].iter().all(u8::is_ascii_hexdigit)
}

/// Reads `tokenizer.bin` for a vocabulary of `vocab_size` tokens.
fn read_tokenizer(path: &Path, vocab_size: usize) -> Result<Vocab> {
    let name = path.display();
    let length = std::fs::metadata(path).with_context(|| format!("{name}: cannot read"))?.len();
    if length > MAX_TOKENIZER_BYTES {
        bail!("{name}: {length} bytes is larger than any tokenizer.bin");
    }
    let bytes = std::fs::read(path).with_context(|| format!("{name}: cannot read"))?;
    if vocab_size < 3 {
        bail!("{name}: a vocabulary of {vocab_size} tokens has no room for <unk>, <s>, </s>");
    }
    let mut position = 0usize;
    let mut take = |count: usize, what: &dyn Fn() -> String| -> Result<&[u8]> {
        let end = position.checked_add(count).filter(|&end| end <= bytes.len()).ok_or_else(|| {
            anyhow!("{name}: truncated at byte {position} reading {} ({} bytes long)", what(), bytes.len())
        })?;
        let slice = &bytes[position..end];
        position = end;
        Ok(slice)
    };
    let max_token_length = read_i32(take(4, &|| "max_token_length".to_string())?, 0);
    if max_token_length < 0 {
        bail!("{name}: max_token_length {max_token_length} is negative");
    }
    let mut raw = Vec::with_capacity(vocab_size);
    let mut scores = Vec::with_capacity(vocab_size);
    for id in 0..vocab_size {
        let score = f32::from_le_bytes(take(4, &|| format!("the score of token {id}"))?.try_into()?);
        if !score.is_finite() {
            bail!("{name}: token {id} has a score that is not a finite number ({score})");
        }
        let length = read_i32(take(4, &|| format!("the length of token {id}"))?, 0);
        let length = usize::try_from(length).map_err(|_| anyhow!("{name}: token {id} has length {length}"))?;
        raw.push(take(length, &|| format!("the {length} bytes of token {id}"))?.to_vec());
        scores.push(score);
    }
    if position != bytes.len() {
        bail!(
            "{name}: {} bytes left after the {vocab_size} tokens the checkpoint's vocab_size asks for",
            bytes.len() - position
        );
    }
    // Early tokenizer.py wrote byte tokens as the bytes themselves (UTF-8 of
    // chr(b)); when ids 3..259 are exactly that, they are byte tokens.
    let old_byte_tokens =
        vocab_size >= 259 && (0..=255u8).all(|b| raw[3 + b as usize] == char::from(b).to_string().as_bytes());
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for (id, text) in raw.into_iter().enumerate() {
        let (token, token_type) = match id {
            0 => (b"<unk>".to_vec(), TokenType::Unknown),
            1 => (b"<s>".to_vec(), TokenType::Control),
            2 => (b"</s>".to_vec(), TokenType::Control),
            3..=258 if old_byte_tokens => (format!("<0x{:02X}>", id - 3).into_bytes(), TokenType::Byte),
            _ => {
                // tokenizer.py turned SentencePiece's ▁ into spaces; turn them back.
                let mut token = Vec::with_capacity(text.len());
                for &byte in &text {
                    if byte == b' ' {
                        token.extend_from_slice("\u{2581}".as_bytes());
                    } else {
                        token.push(byte);
                    }
                }
                let token_type = if is_byte_token(&token) { TokenType::Byte } else { TokenType::Normal };
                (token, token_type)
            }
        };
        tokens.push(token);
        types.push(token_type);
    }
    Ok(Vocab::llama_sentencepiece(tokens, scores, types))
}

impl ModelSource for Llama2cSource {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn vocab(&self) -> &Vocab {
        &self.vocab
    }
    fn chat_template(&self) -> Option<&str> {
        None
    }
    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }
    fn read_rows(&self, index: usize, first_row: usize, out: &mut [f32]) -> Result<()> {
        let name = self.checkpoint.display();
        let tensor = self
            .tensors
            .get(index)
            .ok_or_else(|| anyhow!("{name}: no tensor {index} (there are {})", self.tensors.len()))?;
        let (rows, cols) = (tensor.rows(), tensor.cols());
        let count = out.len() / cols;
        if !out.len().is_multiple_of(cols) || first_row.checked_add(count).is_none_or(|end| end > rows) {
            bail!(
                "{name}: tensor {}: cannot read {} values from row {first_row} (rows of {cols}, {rows} rows)",
                tensor.name,
                out.len()
            );
        }
        let start = self.offsets[index] + first_row * cols * 4;
        let bytes = &self.map[start..start + out.len() * 4];
        for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Ok(())
    }
    fn native_bytes(&self, index: usize) -> Option<&[u8]> {
        let tensor = self.tensors.get(index)?;
        let start = self.offsets[index];
        Some(&self.map[start..start + tensor.shape.iter().product::<usize>() * 4])
    }
    fn release(&self, index: usize) {
        #[cfg(unix)]
        if let Some(tensor) = self.tensors.get(index) {
            let length = tensor.shape.iter().product::<usize>() * 4;
            // SAFETY: the map is a read-only private file mapping that is never
            // written, so dropped pages are simply read again from the file.
            let _ = unsafe {
                self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, self.offsets[index], length)
            };
        }
        #[cfg(not(unix))]
        let _ = index;
    }
    fn describe(&self) -> String {
        format!(
            "llama2.c checkpoint {} (version {}, float32), tokenizer {}",
            self.checkpoint.display(),
            self.version,
            self.tokenizer.display()
        )
    }
}

/// Writes `model` as a llama2.c float32 checkpoint of `version` 0 or 1 and its
/// `tokenizer.bin`. The model must be what llama2.c can hold: a SentencePiece
/// vocabulary with `<unk>`, `<s>`, `</s>` at ids 0, 1, 2, `head_dim = dim / n_heads`,
/// θ = 10000 and ε = 1e-5. Version 0's `freq_cis` arrays get RoPE's cosines and sines.
pub fn write_llama2c(model: &SyntheticModel, checkpoint: &Path, tokenizer: &Path, version: u32) -> Result<()> {
    let config = &model.config;
    let vocab = &model.vocab;
    let name = checkpoint.display();
    if version > 1 {
        bail!("writing {name}: version {version} is not a float32 llama2.c layout (0 or 1)");
    }
    if model.rope_scaling.is_some() {
        bail!("writing {name}: llama2.c checkpoints have no place for RoPE scaling");
    }
    if model.architecture.family != bramble_runtime::architecture::Family::Llama {
        bail!(
            "writing {name}: llama2.c checkpoints hold the Llama block only, not {}",
            model.architecture.family.name()
        );
    }
    if vocab.kind != TokenizerKind::SentencePiece {
        bail!("writing {name}: llama2.c holds SentencePiece vocabularies only, not byte-level BPE");
    }
    if (vocab.unk_id, vocab.bos_id, vocab.eos_id) != (Some(0), Some(1), Some(2)) {
        bail!("writing {name}: llama2.c's tokenizer.bin fixes <unk>, <s>, </s> at ids 0, 1, 2");
    }
    if config.n_heads * config.head_dim != config.dim || config.rope_dim != config.head_dim || config.rope_style != 0 {
        bail!("writing {name}: llama2.c needs head_dim = dim / n_heads with every dimension rotated as adjacent pairs");
    }
    if config.rope_theta != ROPE_THETA || config.norm_eps != NORM_EPS {
        bail!(
            "writing {name}: llama2.c fixes rope_theta at {ROPE_THETA} and norm_eps at {NORM_EPS} (model has {} and {})",
            config.rope_theta,
            config.norm_eps
        );
    }
    if vocab.len() != config.vocab_size as usize {
        bail!("writing {name}: {} tokens for vocab_size {}", vocab.len(), config.vocab_size);
    }
    let params = Params {
        dim: config.dim as usize,
        hidden_dim: config.ffn_dim as usize,
        n_layers: config.n_layers as usize,
        n_heads: config.n_heads as usize,
        n_kv_heads: config.n_kv_heads as usize,
        vocab_size: config.vocab_size as usize,
        seq_len: config.context_length as usize,
        shared_classifier: config.tied_output != 0,
    };
    let total = file_size(&params, version).map_err(|e| anyhow!("writing {name}: {e}"))?;
    let placements = layout(&params, version)?;
    let total = usize::try_from(total).map_err(|_| anyhow!("writing {name}: {total} bytes does not fit in memory"))?;
    let mut bytes = vec![0u8; total];
    let header = [
        params.dim,
        params.hidden_dim,
        params.n_layers,
        params.n_heads,
        params.n_kv_heads,
        params.vocab_size,
        params.seq_len,
    ]
    .map(|v| v as i32);
    let fields_at = if version == 0 { 0 } else { 8 };
    if version == 1 {
        bytes[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        bytes[4..8].copy_from_slice(&1i32.to_le_bytes());
        bytes[8 + 28] = u8::from(params.shared_classifier);
    }
    for (index, value) in header.into_iter().enumerate() {
        // Version 0 flags a separate classifier with a negative vocab_size.
        let value = if index == 5 && version == 0 && !params.shared_classifier { -value } else { value };
        bytes[fields_at + 4 * index..fields_at + 4 * index + 4].copy_from_slice(&value.to_le_bytes());
    }
    let head_dim = params.head_dim();
    for placement in &placements {
        let values: Vec<f32> = match &placement.part {
            Part::Tensor(tensor) => {
                let (shape, values) =
                    model.tensor(tensor).ok_or_else(|| anyhow!("writing {name}: the model has no tensor {tensor}"))?;
                if shape != placement.shape.as_slice() {
                    bail!(
                        "writing {name}: tensor {tensor} has shape {shape:?}, llama2.c expects {:?}",
                        placement.shape
                    );
                }
                values.to_vec()
            }
            Part::FreqCisReal | Part::FreqCisImag => {
                let mut values = Vec::with_capacity(params.seq_len * head_dim / 2);
                for position in 0..params.seq_len {
                    for pair in 0..head_dim / 2 {
                        let frequency = 1.0 / f64::from(ROPE_THETA).powf((2 * pair) as f64 / head_dim as f64);
                        let angle = position as f64 * frequency;
                        let value = if placement.part == Part::FreqCisReal { angle.cos() } else { angle.sin() };
                        values.push(value as f32);
                    }
                }
                values
            }
        };
        let start = placement.offset as usize;
        for (chunk, value) in bytes[start..start + values.len() * 4].chunks_exact_mut(4).zip(&values) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }
    std::fs::write(checkpoint, &bytes).with_context(|| format!("{name}: cannot write"))?;

    // tokenizer.bin, spelled as tokenizer.py spells it.
    let mut texts = Vec::with_capacity(vocab.len());
    for (id, token) in vocab.tokens.iter().enumerate() {
        let text = match id {
            1 => b"\n<s>\n".to_vec(),
            2 => b"\n</s>\n".to_vec(),
            _ => {
                if token.contains(&b' ') {
                    bail!(
                        "writing {}: token {id} holds a space, which tokenizer.bin cannot tell from ▁",
                        tokenizer.display()
                    );
                }
                String::from_utf8_lossy(token).replace('\u{2581}', " ").into_bytes()
            }
        };
        if std::str::from_utf8(token).is_err() {
            bail!("writing {}: token {id} is not valid UTF-8", tokenizer.display());
        }
        texts.push(text);
    }
    let max_token_length = texts.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::new();
    out.extend_from_slice(&(max_token_length as i32).to_le_bytes());
    for (text, score) in texts.iter().zip(&vocab.scores) {
        out.extend_from_slice(&score.to_le_bytes());
        out.extend_from_slice(&(text.len() as i32).to_le_bytes());
        out.extend_from_slice(text);
    }
    std::fs::write(tokenizer, out).with_context(|| format!("{}: cannot write", tokenizer.display()))
}
