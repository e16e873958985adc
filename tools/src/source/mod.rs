//! Source models the converter reads: GGUF, Hugging Face directories, llama2.c
//! checkpoints. Each reader presents the same [`ModelSource`]: the config, the
//! vocabulary, the chat template and the tensors under GGUF names, read row by
//! row so conversion streams with bounded memory.

use anyhow::Result;
use bramble_runtime::architecture::Architecture;
use bramble_runtime::rope::RopeScaling;
use bramble_runtime::{Encoding, ModelConfig, Vocab};

/// One tensor of a source model.
#[derive(Debug, Clone)]
pub struct SourceTensor {
    /// GGUF name: `token_embd.weight`, `blk.3.attn_q.weight`, `output_norm.weight`, …
    pub name: String,
    /// Outermost first: a linear layer's weight is `[out, in]`, a norm `[dim]`.
    pub shape: Vec<usize>,
    /// How the source stores it, for messages (`"Q4_K"`, `"F16"`, `"BF16"`, …).
    pub source_type: String,
    /// The image encoding whose bytes the source already holds, byte for byte
    /// and in the same row order, when there is one (GGUF Q8_0 → Q8, Q4_1 → Q4,
    /// Q4_0 → Q4S, F16 → F16, F32 → F32). Such tensors are carried over bit-exact.
    pub native: Option<Encoding>,
}

impl SourceTensor {
    /// Number of rows: the product of all but the innermost dimension (1 for a vector).
    pub fn rows(&self) -> usize {
        self.shape[..self.shape.len() - 1].iter().product()
    }
    /// Length of a row: the innermost dimension.
    pub fn cols(&self) -> usize {
        *self.shape.last().expect("a tensor has at least one dimension")
    }
}

/// A model to convert.
pub trait ModelSource {
    /// The hyperparameters, in the image's form.
    fn config(&self) -> &ModelConfig;
    /// The tokenizer vocabulary.
    fn vocab(&self) -> &Vocab;
    /// The block, when it is not the plain Llama block of [`ModelSource::config`]
    /// (`None`: Llama's).
    fn architecture(&self) -> Option<&Architecture> {
        None
    }
    /// RoPE's per-pair frequency factors, when the model scales them
    /// (Llama-3.x's `rope_freqs.weight` or `rope_scaling`).
    fn rope_scaling(&self) -> Option<&RopeScaling> {
        None
    }
    /// The Jinja chat template, when the source has one.
    fn chat_template(&self) -> Option<&str>;
    /// The tensors, under GGUF names.
    fn tensors(&self) -> &[SourceTensor];
    /// Writes rows `first_row .. first_row + out.len() / cols` of tensor `index`
    /// into `out` as f32, dequantizing (and, for Hugging Face q/k weights,
    /// permuting rows) as needed. Errors name the file and the tensor.
    fn read_rows(&self, index: usize, first_row: usize, out: &mut [f32]) -> Result<()>;
    /// The stored bytes of tensor `index` when [`SourceTensor::native`] is set.
    fn native_bytes(&self, index: usize) -> Option<&[u8]>;
    /// Tells the source that tensor `index` is done, so it can drop the pages it
    /// mapped for it (keeps the converter's resident memory bounded).
    fn release(&self, _index: usize) {}
    /// One line saying what this source is (format, file), for the image's `source` section.
    fn describe(&self) -> String;
}

pub mod gguf;
pub mod hf;
pub mod llama2c;

/// Opens a source model, telling the format from the path: a directory is a
/// Hugging Face checkpoint, a file starting with `GGUF` is GGUF, any other file
/// a llama2.c checkpoint (with `tokenizer`, or `tokenizer.bin` beside it).
pub fn open(path: &std::path::Path, tokenizer: Option<&std::path::Path>) -> Result<Box<dyn ModelSource>> {
    use anyhow::Context;
    use std::io::Read;
    if path.is_dir() {
        return Ok(Box::new(hf::HfSource::open(path)?));
    }
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let read = file.read(&mut magic).with_context(|| format!("{}: cannot read", path.display()))?;
    if read == 4 && &magic == b"GGUF" {
        return Ok(Box::new(gguf::GgufSource::open(path)?));
    }
    let tokenizer = match tokenizer {
        Some(t) => t.to_path_buf(),
        None => path.with_file_name("tokenizer.bin"),
    };
    anyhow::ensure!(
        tokenizer.exists(),
        "{}: not GGUF and not a directory, so read as a llama2.c checkpoint, but its tokenizer {} does not exist (pass --tokenizer)",
        path.display(),
        tokenizer.display()
    );
    Ok(Box::new(llama2c::Llama2cSource::open(path, &tokenizer)?))
}

/// The GGUF names and shapes (outermost first) of a Llama model of `config`, in GGUF order.
pub fn llama_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    Architecture::llama(config).tensors(config)
}
