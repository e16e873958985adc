//! Writes GGUF v3 files: a general [`GgufWriter`] (in memory, or streaming
//! tensor by tensor for files larger than memory) and [`write_gguf`], which
//! lays out a [`SyntheticModel`] the way llama.cpp's converter would.

use super::quants::quantize;
use super::{Array, GgmlType, Value, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use crate::synth::SyntheticModel;
use anyhow::{anyhow, bail, Context, Result};
use bramble_runtime::architecture::Family;
use bramble_runtime::rope::ScalingKind;
use bramble_runtime::vocab::{PreTokenizer, TokenizerKind};
use bramble_runtime::{ModelConfig, Vocab};
use std::io::Write;
use std::path::Path;

/// ChatML, the chat template written for byte-level BPE vocabularies.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Llama-2's `[INST]` chat template (Hugging Face's), written for SentencePiece vocabularies.
pub const LLAMA2_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}\
{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}\
{% set system_message = false %}{% endif %}{% for message in loop_messages %}\
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
{% if loop.index0 == 0 and system_message != false %}\
{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}\
{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}\
{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}\
{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/// A tensor waiting to be written.
#[derive(Debug, Clone)]
struct PendingTensor {
    name: String,
    /// GGUF order, innermost first.
    dims: Vec<u64>,
    ggml_type: GgmlType,
    /// The stored bytes; `None` for a tensor declared with
    /// [`GgufWriter::declare_tensor`], whose bytes [`GgufWriter::write_streaming`] asks for.
    data: Option<Vec<u8>>,
    /// Stored size in bytes.
    size: usize,
}

/// Builds a GGUF v3 file: metadata and tensors in the order added.
///
/// Small files are built in memory ([`GgufWriter::add_tensor`], then
/// [`GgufWriter::write`]). Files too large for memory declare their tensors
/// ([`GgufWriter::declare_tensor`]) and [`GgufWriter::write_streaming`] asks
/// for each tensor's bytes as it reaches it.
#[derive(Debug, Clone, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) metadata key `key`. A `general.alignment` key sets the
    /// data alignment the file is written with.
    pub fn set(&mut self, key: &str, value: Value) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }

    /// Adds a tensor of `shape` (outermost first) whose stored bytes are `data`.
    pub fn add_tensor(&mut self, name: &str, shape: &[usize], ggml_type: GgmlType, data: Vec<u8>) -> Result<&mut Self> {
        let size = self.check_tensor(name, shape, ggml_type)?;
        if data.len() != size {
            let count: usize = shape.iter().product();
            bail!("tensor '{name}': {} bytes given, {count} values of {ggml_type} take {size}", data.len());
        }
        self.push_tensor(name, shape, ggml_type, Some(data), size);
        Ok(self)
    }

    /// Adds a tensor of `shape` (outermost first) whose bytes are not given
    /// yet: [`GgufWriter::write_streaming`] asks for them. Such a file cannot be
    /// made with [`GgufWriter::to_bytes`] or [`GgufWriter::write`].
    pub fn declare_tensor(&mut self, name: &str, shape: &[usize], ggml_type: GgmlType) -> Result<&mut Self> {
        let size = self.check_tensor(name, shape, ggml_type)?;
        self.push_tensor(name, shape, ggml_type, None, size);
        Ok(self)
    }

    /// Checks a new tensor's shape and name; returns its stored size in bytes.
    fn check_tensor(&self, name: &str, shape: &[usize], ggml_type: GgmlType) -> Result<usize> {
        if shape.is_empty() || shape.len() > MAX_DIMS || shape.contains(&0) {
            bail!("tensor '{name}': shape {shape:?} needs 1 to {MAX_DIMS} non-zero dimensions");
        }
        let (block_values, _) = ggml_type.block_layout();
        let row_length = shape[shape.len() - 1];
        if !row_length.is_multiple_of(block_values) {
            bail!("tensor '{name}': row length {row_length} is not a multiple of the {ggml_type} block size {block_values}");
        }
        if self.tensors.iter().any(|t| t.name == name) {
            bail!("tensor '{name}' added twice");
        }
        let count: usize = shape.iter().product();
        Ok(ggml_type.bytes_for(count))
    }

    fn push_tensor(&mut self, name: &str, shape: &[usize], ggml_type: GgmlType, data: Option<Vec<u8>>, size: usize) {
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ggml_type,
            data,
            size,
        });
    }

    /// Quantizes `values` to `ggml_type` and adds them as a tensor of `shape`.
    pub fn add_values(
        &mut self,
        name: &str,
        shape: &[usize],
        ggml_type: GgmlType,
        values: &[f32],
    ) -> Result<&mut Self> {
        let data = quantize(ggml_type, values).with_context(|| format!("tensor '{name}'"))?;
        self.add_tensor(name, shape, ggml_type, data)
    }

    fn alignment(&self) -> Result<u64> {
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => Ok(DEFAULT_ALIGNMENT),
            Some((_, value)) => match value.as_integer() {
                Some(a) if a > 0 && a <= 1 << 30 && a & (a - 1) == 0 => Ok(a as u64),
                _ => bail!("general.alignment {value:?} is not a power of two"),
            },
        }
    }

    /// Header, metadata and tensor infos: everything before the data section
    /// (which starts at the next multiple of the alignment).
    fn head(&self, alignment: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut out, key.as_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0u64;
        for tensor in &self.tensors {
            put_string(&mut out, tensor.name.as_bytes());
            out.extend_from_slice(&(tensor.dims.len() as u32).to_le_bytes());
            for dim in &tensor.dims {
                out.extend_from_slice(&dim.to_le_bytes());
            }
            out.extend_from_slice(&tensor.ggml_type.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + tensor.size as u64).div_ceil(alignment) * alignment;
        }
        out
    }

    /// The whole file as bytes (every tensor's bytes must have been given).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let alignment = self.alignment()?;
        let mut out = self.head(alignment);
        for tensor in &self.tensors {
            let Some(data) = &tensor.data else {
                bail!("tensor '{}' was declared without data; write the file with write_streaming", tensor.name);
            };
            pad_to(&mut out, alignment);
            out.extend_from_slice(data);
        }
        // ggml pads the last tensor too, so the data section is a whole number of alignments.
        if !self.tensors.is_empty() {
            pad_to(&mut out, alignment);
        }
        Ok(out)
    }

    /// Writes the file to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes().with_context(|| format!("{}", path.display()))?;
        let mut file = std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
        file.write_all(&bytes).with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(())
    }

    /// Writes the file to `path` without holding tensor data in memory: for
    /// each tensor declared with [`GgufWriter::declare_tensor`], in order,
    /// `fill(name, out)` writes its bytes to `out` (in pieces of any size, but
    /// exactly the tensor's stored size in all). Tensors added with data are
    /// written as given.
    pub fn write_streaming(&self, path: &Path, mut fill: impl FnMut(&str, &mut dyn Write) -> Result<()>) -> Result<()> {
        let at_fault = |error: anyhow::Error| anyhow!("{}: {error:#}", path.display());
        let alignment = self.alignment().map_err(at_fault)?;
        let file = std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut out = CountingWriter { inner: std::io::BufWriter::with_capacity(1 << 20, file), written: 0 };
        let write_error = |e: std::io::Error| anyhow!("{}: cannot write: {e}", path.display());
        out.write_all(&self.head(alignment)).map_err(write_error)?;
        for tensor in &self.tensors {
            pad_writer(&mut out, alignment).map_err(write_error)?;
            let start = out.written;
            match &tensor.data {
                Some(data) => out.write_all(data).map_err(write_error)?,
                None => fill(&tensor.name, &mut out)
                    .with_context(|| format!("{}: tensor '{}'", path.display(), tensor.name))?,
            }
            let written = out.written - start;
            if written != tensor.size as u64 {
                bail!(
                    "{}: tensor '{}': {written} bytes written, its {} values of {} take {}",
                    path.display(),
                    tensor.name,
                    tensor.dims.iter().product::<u64>(),
                    tensor.ggml_type,
                    tensor.size
                );
            }
        }
        if !self.tensors.is_empty() {
            pad_writer(&mut out, alignment).map_err(write_error)?;
        }
        out.inner.flush().map_err(write_error)?;
        Ok(())
    }
}

/// A writer that counts the bytes through it.
struct CountingWriter<W: Write> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(bytes)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes zeros up to the next multiple of `alignment`.
fn pad_writer<W: Write>(out: &mut CountingWriter<W>, alignment: u64) -> std::io::Result<()> {
    let padding = out.written.div_ceil(alignment) * alignment - out.written;
    out.write_all(&vec![0; padding as usize])
}

fn pad_to(out: &mut Vec<u8>, alignment: u64) {
    let length = (out.len() as u64).div_ceil(alignment) * alignment;
    out.resize(length as usize, 0);
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_type(out: &mut Vec<u8>, id: u32) {
    out.extend_from_slice(&id.to_le_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    put_type(out, value.type_id());
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.push(*v as u8),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(*v as u8),
        Value::String(v) => put_string(out, v),
        Value::Array(v) => put_array(out, v),
    }
}

/// Writes an array's element type, length and elements.
fn put_array(out: &mut Vec<u8>, array: &Array) {
    fn fixed<T: Copy, const N: usize>(out: &mut Vec<u8>, values: &[T], encode: impl Fn(T) -> [u8; N]) {
        for &v in values {
            out.extend_from_slice(&encode(v));
        }
    }
    put_type(out, array.element_type_id());
    out.extend_from_slice(&(array.len() as u64).to_le_bytes());
    match array {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => fixed(out, v, i8::to_le_bytes),
        Array::U16(v) => fixed(out, v, u16::to_le_bytes),
        Array::I16(v) => fixed(out, v, i16::to_le_bytes),
        Array::U32(v) => fixed(out, v, u32::to_le_bytes),
        Array::I32(v) => fixed(out, v, i32::to_le_bytes),
        Array::U64(v) => fixed(out, v, u64::to_le_bytes),
        Array::I64(v) => fixed(out, v, i64::to_le_bytes),
        Array::F32(v) => fixed(out, v, f32::to_le_bytes),
        Array::F64(v) => fixed(out, v, f64::to_le_bytes),
        Array::Bool(v) => fixed(out, v, |x| [x as u8]),
        Array::String(strings) => strings.iter().for_each(|s| put_string(out, s)),
        Array::Array(arrays) => arrays.iter().for_each(|a| put_array(out, a)),
    }
}

/// The type a weight of rows `row_length` long is written in when `requested`
/// is asked for. Like llama.cpp's quantizer, rows that are not a whole number of
/// blocks fall back to a type with smaller blocks: Q4_K to Q4_1, Q6_K to Q8_0,
/// and anything to F16 when even 32 does not divide the row.
pub fn weight_type_for(requested: GgmlType, row_length: usize) -> GgmlType {
    let fits = |t: GgmlType| row_length.is_multiple_of(t.block_layout().0);
    let fallback = match requested {
        GgmlType::Q4_K => GgmlType::Q4_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    [requested, fallback].into_iter().find(|&t| fits(t)).unwrap_or(GgmlType::F16)
}

/// `tokenizer.ggml.pre` name of a pre-tokenizer.
fn pre_tokenizer_name(pre: PreTokenizer) -> &'static str {
    match pre {
        PreTokenizer::None => "default",
        PreTokenizer::Gpt2 => "gpt-2",
        PreTokenizer::SmolLm => "smollm",
        PreTokenizer::Llama3 => "llama-bpe",
        PreTokenizer::Qwen2 => "qwen2",
    }
}

/// Writes `model` as a GGUF v3 file at `path`: `llama.*` hyperparameters, the
/// full tokenizer, a chat template (ChatML for byte-level vocabularies, Llama-3
/// for Llama-3's, Llama-2 `[INST]` for SentencePiece) and the tensors, norms
/// in F32 and 2-D weights in `weight_type` (see [`weight_type_for`] for rows it
/// cannot hold); a Llama-3.x model's RoPE factors as `rope_freqs.weight`.
pub fn write_gguf(model: &SyntheticModel, path: &Path, weight_type: GgmlType) -> Result<()> {
    if !GgmlType::WRITABLE.contains(&weight_type) {
        bail!("{}: cannot write weights as {weight_type}", path.display());
    }
    let family = model.architecture.family;
    let mut writer =
        family_writer(family, &model.config, &model.vocab).map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
    match &model.rope_scaling {
        // Llama-3.x: the factors as llama.cpp's converter writes them.
        Some(scaling) if scaling.kind == ScalingKind::Llama3 => {
            let pairs = [scaling.factors.len()];
            writer.add_values("rope_freqs.weight", &pairs, GgmlType::F32, &scaling.factors)?;
        }
        Some(scaling) => {
            let key = |k: &str| format!("{}.{k}", family.name());
            writer
                .set(&key("rope.scaling.type"), Value::String(b"linear".to_vec()))
                .set(&key("rope.scaling.factor"), Value::F32(scaling.factors[0]));
        }
        None => {}
    }
    if family == Family::Gemma3 {
        // As llama.cpp reads them: the window, the period of layers (the
        // last of each global) and the local layers' RoPE base.
        let architecture = &model.architecture;
        if let Some(local) = architecture.layers.iter().find(|l| l.is_local()) {
            let period = architecture.layers.iter().position(|l| !l.is_local()).map_or(0, |global| global + 1);
            writer
                .set("gemma3.attention.sliding_window", Value::U32(local.window))
                .set("gemma3.attention.sliding_window_pattern", Value::U32(period as u32))
                .set("gemma3.rope.freq_base_swa", Value::F32(local.rope_theta));
        }
    }
    for (name, shape, values) in &model.tensors {
        let ggml_type = match shape.len() {
            1 => GgmlType::F32,
            _ => weight_type_for(weight_type, shape[shape.len() - 1]),
        };
        writer.add_values(name, shape, ggml_type, values).with_context(|| format!("{}", path.display()))?;
    }
    writer.write(path)
}

/// A writer holding the metadata of a Llama of `config` with tokenizer `vocab`
/// (as [`write_gguf`] writes it), and no tensors yet.
pub fn llama_writer(config: &ModelConfig, vocab: &Vocab) -> Result<GgufWriter> {
    family_writer(Family::Llama, config, vocab)
}

/// As [`llama_writer`] for a model of `family`: its hyperparameters under
/// its own name (`qwen2.block_count`, …), as llama.cpp's converter writes them.
pub fn family_writer(family: Family, config: &ModelConfig, vocab: &Vocab) -> Result<GgufWriter> {
    // llama.cpp permutes Llama's q/k rows into adjacent pairs and keeps the others' halves.
    let rope_style = (family != Family::Llama) as u32;
    if config.rope_style != rope_style {
        bail!("GGUF {} models use rope_style {rope_style}, not {}", family.name(), config.rope_style);
    }
    let name = family.name();
    let key = |k: &str| format!("{name}.{k}");
    let mut writer = GgufWriter::new();
    writer
        .set("general.architecture", Value::String(name.as_bytes().to_vec()))
        .set("general.name", Value::String(b"bramble synthetic".to_vec()))
        .set(&key("context_length"), Value::U32(config.context_length))
        .set(&key("embedding_length"), Value::U32(config.dim))
        .set(&key("block_count"), Value::U32(config.n_layers))
        .set(&key("feed_forward_length"), Value::U32(config.ffn_dim))
        .set(&key("attention.head_count"), Value::U32(config.n_heads))
        .set(&key("attention.head_count_kv"), Value::U32(config.n_kv_heads))
        .set(&key("attention.key_length"), Value::U32(config.head_dim))
        .set(&key("attention.value_length"), Value::U32(config.head_dim))
        .set(&key("rope.freq_base"), Value::F32(config.rope_theta))
        .set(&key("rope.dimension_count"), Value::U32(config.rope_dim))
        .set(&key("attention.layer_norm_rms_epsilon"), Value::F32(config.norm_eps))
        .set(&key("vocab_size"), Value::U32(vocab.len() as u32));

    let (model_name, template) = match vocab.kind {
        TokenizerKind::SentencePiece if vocab.find("<start_of_turn>").is_some() => {
            ("llama", bramble_runtime::chat::GEMMA)
        }
        TokenizerKind::SentencePiece => ("llama", LLAMA2_TEMPLATE),
        TokenizerKind::ByteLevelBpe if vocab.find("<|start_header_id|>").is_some() => {
            ("gpt2", bramble_runtime::chat::LLAMA3)
        }
        TokenizerKind::ByteLevelBpe => ("gpt2", CHATML_TEMPLATE),
    };
    writer.set("tokenizer.ggml.model", Value::String(model_name.as_bytes().to_vec()));
    if vocab.kind == TokenizerKind::ByteLevelBpe {
        writer.set("tokenizer.ggml.pre", Value::String(pre_tokenizer_name(vocab.pre_tokenizer).as_bytes().to_vec()));
    }
    writer
        .set("tokenizer.ggml.tokens", Value::Array(Array::String(vocab.tokens.clone())))
        .set("tokenizer.ggml.scores", Value::Array(Array::F32(vocab.scores.clone())))
        .set(
            "tokenizer.ggml.token_type",
            Value::Array(Array::I32(vocab.types.iter().map(|t| t.id() as i32).collect())),
        );
    if !vocab.merges.is_empty() {
        let text = |id: u32| {
            vocab.tokens.get(id as usize).ok_or_else(|| anyhow!("a merge names token {id}, which does not exist"))
        };
        let merges = vocab
            .merges
            .iter()
            .map(|&(left, right)| Ok([text(left)?.as_slice(), b" ", text(right)?.as_slice()].concat()))
            .collect::<Result<Vec<_>>>()?;
        writer.set("tokenizer.ggml.merges", Value::Array(Array::String(merges)));
    }
    for (key, id) in [
        ("bos_token_id", vocab.bos_id),
        ("eos_token_id", vocab.eos_id),
        ("unknown_token_id", vocab.unk_id),
        ("padding_token_id", vocab.pad_id),
        ("eot_token_id", vocab.eot_id),
    ] {
        if let Some(id) = id {
            writer.set(&format!("tokenizer.ggml.{key}"), Value::U32(id));
        }
    }
    writer
        .set("tokenizer.ggml.add_bos_token", Value::Bool(vocab.add_bos))
        .set("tokenizer.ggml.add_eos_token", Value::Bool(vocab.add_eos))
        .set("tokenizer.ggml.add_space_prefix", Value::Bool(vocab.add_space_prefix))
        .set("tokenizer.chat_template", Value::String(template.as_bytes().to_vec()));

    Ok(writer)
}
