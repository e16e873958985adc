//! GGUF, llama.cpp's model format: the reader ([`GgufFile`], [`GgufSource`],
//! [`read_vocab`]) and a writer for synthetic test models ([`write_gguf`]).
//!
//! The layout is ggml's `docs/gguf.md`. GGUF lists dimensions innermost first;
//! everything public here except [`TensorInfo::dims`] uses our convention,
//! outermost first (`ne = [576, 49152]` is shape `[49152, 576]`).

mod file;
mod quants;
mod vocab;
mod writer;

pub use file::{Array, GgufFile, TensorInfo, Value, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
pub use quants::{dequantize, quantize, QK_K};
pub use vocab::{read_vocab, vocab_from_gguf};
pub use writer::{
    family_writer, llama_writer, weight_type_for, write_gguf, GgufWriter, CHATML_TEMPLATE, LLAMA2_TEMPLATE,
};

use super::{ModelSource, SourceTensor};
use anyhow::{anyhow, bail, Result};
use bramble_runtime::architecture::{Architecture, Family};
use bramble_runtime::config::ARCH_LLAMA;
use bramble_runtime::rope::{RopeScaling, ScalingKind};
use bramble_runtime::{Encoding, ModelConfig, Vocab};
use bytemuck::Zeroable;
use std::path::Path;

/// ggml tensor types, with ggml's numeric ids.
///
/// All types ggml defines are listed so any GGUF file can be opened and
/// described; only some can be read as numbers ([`GgmlType::is_readable`]).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// 4-bit, blocks of 32, f16 scale, zero point 8.
    Q4_0,
    /// 4-bit, blocks of 32, f16 scale and minimum.
    Q4_1,
    /// 5-bit, blocks of 32, f16 scale.
    Q5_0,
    /// 5-bit, blocks of 32, f16 scale and minimum.
    Q5_1,
    /// 8-bit, blocks of 32, f16 scale.
    Q8_0,
    /// 8-bit, blocks of 32, f16 scale and sum.
    Q8_1,
    /// 2-bit k-quant, super-blocks of 256.
    Q2_K,
    /// 3-bit k-quant, super-blocks of 256.
    Q3_K,
    /// 4-bit k-quant, super-blocks of 256 with 6-bit sub-block scales and minimums.
    Q4_K,
    /// 5-bit k-quant, super-blocks of 256.
    Q5_K,
    /// 6-bit k-quant, super-blocks of 256 with 8-bit sub-block scales.
    Q6_K,
    /// 8-bit k-quant (activations), super-blocks of 256.
    Q8_K,
    /// i-quant.
    IQ2_XXS,
    /// i-quant.
    IQ2_XS,
    /// i-quant.
    IQ3_XXS,
    /// i-quant.
    IQ1_S,
    /// i-quant, non-linear 4-bit, blocks of 32.
    IQ4_NL,
    /// i-quant.
    IQ3_S,
    /// i-quant.
    IQ2_S,
    /// i-quant.
    IQ4_XS,
    /// int8.
    I8,
    /// int16.
    I16,
    /// int32.
    I32,
    /// int64.
    I64,
    /// IEEE binary64.
    F64,
    /// i-quant.
    IQ1_M,
    /// bfloat16.
    BF16,
    /// Ternary.
    TQ1_0,
    /// Ternary.
    TQ2_0,
    /// Microscaling FP4.
    MXFP4,
}

impl GgmlType {
    /// Every type, in id order.
    pub const ALL: [GgmlType; 32] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ3_XXS,
        GgmlType::IQ1_S,
        GgmlType::IQ4_NL,
        GgmlType::IQ3_S,
        GgmlType::IQ2_S,
        GgmlType::IQ4_XS,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::IQ1_M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
    ];

    /// The types [`write_gguf`] can write weights in.
    pub const WRITABLE: [GgmlType; 10] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];

    /// ggml's numeric id (`enum ggml_type`).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q8_K => 15,
            GgmlType::IQ2_XXS => 16,
            GgmlType::IQ2_XS => 17,
            GgmlType::IQ3_XXS => 18,
            GgmlType::IQ1_S => 19,
            GgmlType::IQ4_NL => 20,
            GgmlType::IQ3_S => 21,
            GgmlType::IQ2_S => 22,
            GgmlType::IQ4_XS => 23,
            GgmlType::I8 => 24,
            GgmlType::I16 => 25,
            GgmlType::I32 => 26,
            GgmlType::I64 => 27,
            GgmlType::F64 => 28,
            GgmlType::IQ1_M => 29,
            GgmlType::BF16 => 30,
            GgmlType::TQ1_0 => 34,
            GgmlType::TQ2_0 => 35,
            GgmlType::MXFP4 => 39,
        }
    }

    /// The type with ggml id `id`.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's name, upper case: `"Q4_K"`, `"BF16"`.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::Q8_K => "Q8_K",
            GgmlType::IQ2_XXS => "IQ2_XXS",
            GgmlType::IQ2_XS => "IQ2_XS",
            GgmlType::IQ3_XXS => "IQ3_XXS",
            GgmlType::IQ1_S => "IQ1_S",
            GgmlType::IQ4_NL => "IQ4_NL",
            GgmlType::IQ3_S => "IQ3_S",
            GgmlType::IQ2_S => "IQ2_S",
            GgmlType::IQ4_XS => "IQ4_XS",
            GgmlType::I8 => "I8",
            GgmlType::I16 => "I16",
            GgmlType::I32 => "I32",
            GgmlType::I64 => "I64",
            GgmlType::F64 => "F64",
            GgmlType::IQ1_M => "IQ1_M",
            GgmlType::BF16 => "BF16",
            GgmlType::TQ1_0 => "TQ1_0",
            GgmlType::TQ2_0 => "TQ2_0",
            GgmlType::MXFP4 => "MXFP4",
        }
    }

    /// The type a name stands for, in any case: `"q4_k"`, `"Q8_0"`, `"bf16"`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// `(values per block, bytes per block)`, as ggml's `ggml_type_traits`.
    pub fn block_layout(self) -> (usize, usize) {
        const QK_K: usize = 256;
        match self {
            GgmlType::F32 | GgmlType::I32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 | GgmlType::I16 => (1, 2),
            GgmlType::I8 => (1, 1),
            GgmlType::I64 | GgmlType::F64 => (1, 8),
            GgmlType::Q4_0 => (32, 2 + 16),
            GgmlType::Q4_1 => (32, 2 + 2 + 16),
            GgmlType::Q5_0 => (32, 2 + 4 + 16),
            GgmlType::Q5_1 => (32, 2 + 2 + 4 + 16),
            GgmlType::Q8_0 => (32, 2 + 32),
            GgmlType::Q8_1 => (32, 4 + 4 + 32),
            GgmlType::Q2_K => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            GgmlType::Q3_K => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            GgmlType::Q4_K => (QK_K, 2 + 2 + QK_K / 2 + 12),
            GgmlType::Q5_K => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            GgmlType::Q6_K => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            GgmlType::Q8_K => (QK_K, 4 + QK_K + QK_K / 8),
            GgmlType::IQ2_XXS => (QK_K, 2 + QK_K / 4),
            GgmlType::IQ2_XS => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            GgmlType::IQ3_XXS => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            GgmlType::IQ1_S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            GgmlType::IQ4_NL => (32, 2 + 16),
            GgmlType::IQ3_S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            GgmlType::IQ2_S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            GgmlType::IQ4_XS => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            GgmlType::IQ1_M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            GgmlType::TQ1_0 => (QK_K, 2 + 4 * 13),
            GgmlType::TQ2_0 => (QK_K, 2 + 64),
            GgmlType::MXFP4 => (32, 1 + 16),
        }
    }

    /// Bytes taken by `values` values (a multiple of the block size).
    pub fn bytes_for(self, values: usize) -> usize {
        let (block_values, block_bytes) = self.block_layout();
        values / block_values * block_bytes
    }

    /// The types [`GgufSource`] can read as numbers: ours byte for byte (F32,
    /// F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, Q3_K), and the others llama.cpp's common mixes use,
    /// expanded to f32 as ggml does. Not readable: the codebook i-quants
    /// (IQ1_*, IQ2_*, IQ3_*), the ternary TQ*, MXFP4, Q8_1, Q8_K and the integer types.
    pub const READABLE: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
    ];

    /// Whether [`GgufSource`] can read tensors of this type as numbers ([`GgmlType::READABLE`]).
    pub fn is_readable(self) -> bool {
        Self::READABLE.contains(&self)
    }

    /// Our image encoding with byte-identical blocks, when there is one.
    pub fn native_encoding(self) -> Option<Encoding> {
        match self {
            GgmlType::F32 => Some(Encoding::F32),
            GgmlType::F16 => Some(Encoding::F16),
            GgmlType::Q8_0 => Some(Encoding::Q8),
            GgmlType::Q4_1 => Some(Encoding::Q4),
            GgmlType::Q4_0 => Some(Encoding::Q4S),
            GgmlType::Q5_0 => Some(Encoding::Q5S),
            GgmlType::Q5_1 => Some(Encoding::Q5),
            GgmlType::Q4_K => Some(Encoding::Q4K),
            GgmlType::Q5_K => Some(Encoding::Q5K),
            GgmlType::Q6_K => Some(Encoding::Q6K),
            GgmlType::Q3_K => Some(Encoding::Q3K),
            GgmlType::Q2_K => Some(Encoding::Q2K),
            _ => None,
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A GGUF Llama model as a [`ModelSource`]: config from `llama.*`, vocabulary
/// from `tokenizer.ggml.*`, tensors read from the memory map.
#[derive(Debug)]
pub struct GgufSource {
    file: GgufFile,
    config: ModelConfig,
    rope_scaling: Option<RopeScaling>,
    architecture: Architecture,
    vocab: Vocab,
    chat_template: Option<String>,
    tensors: Vec<SourceTensor>,
    /// For each of `tensors`, its index in `file.tensors()`.
    file_indices: Vec<usize>,
}

impl GgufSource {
    /// Opens a GGUF Llama model and checks that it has every tensor a Llama of
    /// its config needs, in the right shape and a type we can read.
    pub fn open(path: &Path) -> Result<GgufSource> {
        let file = GgufFile::open(path)?;
        let vocab = vocab_from_gguf(&file)?;
        let (config, architecture) = config_from_gguf(&file, vocab.len())?;
        let chat_template = file.string("tokenizer.chat_template")?.map(str::to_string);
        let (tensors, file_indices) = check_tensors(&file, &config, &architecture)?;
        let rope_scaling = rope_scaling_from_gguf(&file, &config)?;
        Ok(GgufSource { file, config, rope_scaling, architecture, vocab, chat_template, tensors, file_indices })
    }

    /// The parsed file, for its metadata.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The file's tensor info for our tensor `index`, or an error naming the index.
    fn info(&self, index: usize) -> Result<(usize, &TensorInfo)> {
        let file_index = *self.file_indices.get(index).ok_or_else(|| {
            anyhow!("{}: no tensor {index} (the model has {})", self.file.path().display(), self.tensors.len())
        })?;
        Ok((file_index, &self.file.tensors()[file_index]))
    }
}

/// The families this reader converts, by `general.architecture`.
const READABLE_FAMILIES: [Family; 4] = [Family::Llama, Family::Qwen2, Family::Qwen3, Family::Gemma3];

/// The model config and block of a GGUF file whose vocabulary has
/// `n_tokens` tokens: its `general.architecture` names the family, whose
/// name prefixes the hyperparameters' keys (`llama.block_count`,
/// `qwen2.block_count`, …).
fn config_from_gguf(file: &GgufFile, n_tokens: usize) -> Result<(ModelConfig, Architecture)> {
    let path = file.path().display();
    let name = file
        .string("general.architecture")?
        .ok_or_else(|| anyhow!("{path}: metadata key 'general.architecture' is missing"))?;
    let family = Family::from_name(name).filter(|f| READABLE_FAMILIES.contains(f)).ok_or_else(|| {
        let known: Vec<&str> = READABLE_FAMILIES.iter().map(|f| f.name()).collect();
        anyhow!("{path}: general.architecture is '{name}'; supported: {}", known.join(", "))
    })?;
    let key = |k: &str| format!("{name}.{k}");
    let required = |k: &str| -> Result<u32> {
        let k = key(k);
        file.u32(&k)?.ok_or_else(|| anyhow!("{path}: metadata key '{k}' is missing"))
    };
    if let Some(experts) = file.u32(&key("expert_count"))? {
        if experts > 0 {
            bail!("{path}: {} is {experts}; mixture-of-experts models are not supported", key("expert_count"));
        }
    }
    if let Some(scaling) = file.string(&key("rope.scaling.type"))? {
        if !["none", "linear"].contains(&scaling) {
            bail!(
                "{path}: {} is '{scaling}'; only linear RoPE scaling (and Llama-3's \
                 rope_freqs.weight) is supported",
                key("rope.scaling.type")
            );
        }
    }

    let mut config = ModelConfig::zeroed();
    config.arch = ARCH_LLAMA;
    config.dim = required("embedding_length")?;
    config.n_layers = required("block_count")?;
    config.n_heads = required("attention.head_count")?;
    config.n_kv_heads = file.u32(&key("attention.head_count_kv"))?.unwrap_or(config.n_heads);
    config.head_dim = match file.u32(&key("attention.key_length"))? {
        Some(length) => length,
        None if config.n_heads != 0 && config.dim % config.n_heads == 0 => config.dim / config.n_heads,
        None => bail!(
            "{path}: embedding length {} is not a multiple of head count {} and {} is missing",
            config.dim,
            config.n_heads,
            key("attention.key_length")
        ),
    };
    if let Some(value_length) = file.u32(&key("attention.value_length"))? {
        if value_length != config.head_dim {
            bail!(
                "{path}: {} {value_length} differs from the key length {}; not supported",
                key("attention.value_length"),
                config.head_dim
            );
        }
    }
    config.ffn_dim = required("feed_forward_length")?;
    config.vocab_size = u32::try_from(n_tokens).map_err(|_| anyhow!("{path}: {n_tokens} tokens are too many"))?;
    config.context_length = required("context_length")?;
    config.rope_theta = file.f32(&key("rope.freq_base"))?.unwrap_or(10000.0);
    // llama.cpp's converter permutes Llama's q/k rows into adjacent pairs;
    // the other families keep Hugging Face's halves (llama.cpp's NEOX RoPE).
    config.rope_style = (family != Family::Llama) as u32;
    config.rope_dim = file.u32(&key("rope.dimension_count"))?.unwrap_or(config.head_dim);
    config.norm_eps = file.f32(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5);
    config.tied_output = file.tensor("output.weight").is_none() as u32;
    config.validate().map_err(|e| anyhow!("{path}: {e}"))?;
    let architecture = match family {
        Family::Gemma3 => gemma3_block(file, &config)?,
        _ => Architecture::plain(family, &config),
    };
    Ok((config, architecture))
}

/// Gemma-3's numbers, as llama.cpp reads them: the embedding scaled by
/// √dim, queries by `1/√head_dim` (`1/√(dim / n_heads)` for the 62-layer
/// 27B, after gemma_pytorch), and with `gemma3.attention.sliding_window`
/// set, sliding-window layers by `gemma3.attention.sliding_window_pattern`
/// (a period, 6 unless given, whose last layer is global; or one flag a
/// layer) turning RoPE by `gemma3.rope.freq_base_swa` (10000 unless given).
fn gemma3_block(file: &GgufFile, config: &ModelConfig) -> Result<Architecture> {
    let path = file.path().display();
    if let Some(cap) = file.f32("gemma3.final_logit_softcapping")?.filter(|&cap| cap != 0.0) {
        bail!("{path}: gemma3.final_logit_softcapping is {cap}; logit soft-capping is not supported");
    }
    let query_width = if config.n_layers == 62 { config.dim / config.n_heads } else { config.head_dim };
    let window = file.u32("gemma3.attention.sliding_window")?.unwrap_or(0);
    let layers = config.n_layers as usize;
    let pattern_key = "gemma3.attention.sliding_window_pattern";
    let local: Vec<bool> = match file.get(pattern_key) {
        Some(Value::Array(Array::Bool(flags))) if flags.len() == layers => flags.clone(),
        Some(Value::Array(array)) => {
            bail!(
                "{path}: {pattern_key} holds {} {} values; expected {layers} BOOL",
                array.len(),
                array.element_type_name()
            )
        }
        _ => Architecture::gemma3_pattern(config.n_layers, file.u32(pattern_key)?.unwrap_or(6) as usize),
    };
    let local_theta = file.f32("gemma3.rope.freq_base_swa")?.unwrap_or(10000.0);
    Ok(Architecture::gemma3(config, 1.0 / (query_width as f32).sqrt(), window, local_theta, &local))
}

/// Llama-3.x's per-pair RoPE frequency factors, as llama.cpp's converter writes them.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// RoPE's frequency factors of a GGUF Llama of `config`: Llama-3.x's
/// `rope_freqs.weight` (F32, `rope_dim / 2` finite positive values, which
/// divide each pair's frequency), or linear scaling's
/// `llama.rope.scaling.factor`; `None` for plain RoPE.
fn rope_scaling_from_gguf(file: &GgufFile, config: &ModelConfig) -> Result<Option<RopeScaling>> {
    let path = file.path().display();
    let prefix = file.string("general.architecture")?.unwrap_or("llama");
    let linear = match file.string(&format!("{prefix}.rope.scaling.type"))? {
        Some("linear") => {
            let factor = file
                .f32(&format!("{prefix}.rope.scaling.factor"))?
                .ok_or_else(|| anyhow!("{path}: linear RoPE scaling without {prefix}.rope.scaling.factor"))?;
            Some(RopeScaling::linear(factor, config.rope_dim).map_err(|e| anyhow!("{path}: {e}"))?)
        }
        _ => None,
    };
    let Some(index) = file.tensors().iter().position(|t| t.name == ROPE_FREQS) else {
        return Ok(linear);
    };
    if linear.is_some() {
        bail!("{path}: both linear RoPE scaling and {ROPE_FREQS}; not supported");
    }
    let info = &file.tensors()[index];
    let pairs = config.rope_dim as usize / 2;
    if info.ggml_type != GgmlType::F32 {
        bail!("{path}: tensor '{ROPE_FREQS}' is {}, expected F32", info.ggml_type);
    }
    if info.shape() != [pairs] {
        bail!(
            "{path}: tensor '{ROPE_FREQS}' has shape {:?}, expected [{pairs}] (rope_dim {} / 2)",
            info.shape(),
            config.rope_dim
        );
    }
    let factors: Vec<f32> =
        file.tensor_bytes(index).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let scaling = RopeScaling { kind: ScalingKind::Llama3, factors };
    scaling.check(config).map_err(|e| anyhow!("{path}: tensor '{ROPE_FREQS}': {e}"))?;
    Ok(Some(scaling))
}

/// Checks the file's tensors against what `config` needs; returns them as
/// source tensors, in file order, with their indices in the file.
fn check_tensors(
    file: &GgufFile,
    config: &ModelConfig,
    architecture: &Architecture,
) -> Result<(Vec<SourceTensor>, Vec<usize>)> {
    let path = file.path().display();
    if let Some(embedding) = file.tensor("token_embd.weight") {
        let rows = embedding.shape()[0];
        if embedding.dims.len() == 2 && rows != config.vocab_size as usize {
            bail!("{path}: token_embd.weight has {rows} rows but the vocabulary has {} tokens", config.vocab_size);
        }
    }
    let mut tensors = Vec::with_capacity(file.tensors().len());
    let mut file_indices = Vec::with_capacity(file.tensors().len());
    for (file_index, info) in file.tensors().iter().enumerate() {
        let name = &info.name;
        if name == ROPE_FREQS {
            // Not a weight: RoPE's factors, read by rope_scaling_from_gguf.
            continue;
        }
        // An unknown tensor (biases, experts) changes the maths: refuse
        // rather than convert a model that would compute something else.
        let Some(shape) = architecture.tensor_shape(config, name) else {
            bail!(
                "{path}: unexpected tensor '{name}': a {} block has no such tensor (this variant is not supported)",
                architecture.family.name()
            );
        };
        if !info.ggml_type.is_readable() {
            let supported: Vec<&str> = GgmlType::READABLE.iter().map(|t| t.name()).collect();
            bail!(
                "unsupported tensor type {} in tensor '{name}' of {path} (supported: {})",
                info.ggml_type,
                supported.join(", ")
            );
        }
        if info.shape() != shape {
            bail!("{path}: tensor '{name}' has shape {:?}, expected {shape:?}", info.shape());
        }
        tensors.push(SourceTensor {
            name: name.clone(),
            shape,
            source_type: info.ggml_type.name().to_string(),
            native: info.ggml_type.native_encoding(),
        });
        file_indices.push(file_index);
    }
    // One layer at a time, so a corrupt block count costs time only until the first missing tensor.
    let layers = (0..config.n_layers).flat_map(|layer| architecture.layer_tensors(config, layer));
    let ends = ["token_embd.weight", "output_norm.weight", "output.weight"];
    let ends = ends.iter().filter_map(|name| architecture.tensor_shape(config, name).map(|s| (name.to_string(), s)));
    if let Some((name, _)) = ends.chain(layers).find(|(name, _)| file.tensor(name).is_none()) {
        bail!("{path}: tensor '{name}' is missing");
    }
    Ok((tensors, file_indices))
}

impl ModelSource for GgufSource {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn vocab(&self) -> &Vocab {
        &self.vocab
    }
    fn architecture(&self) -> Option<&Architecture> {
        Some(&self.architecture)
    }
    fn rope_scaling(&self) -> Option<&RopeScaling> {
        self.rope_scaling.as_ref()
    }
    fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }
    fn read_rows(&self, index: usize, first_row: usize, out: &mut [f32]) -> Result<()> {
        let (file_index, info) = self.info(index)?;
        let path = self.file.path().display();
        let name = &info.name;
        let (cols, n_rows) = (info.row_length(), info.row_count());
        if !out.len().is_multiple_of(cols) {
            bail!("{path}: tensor '{name}': {} values asked for, not a whole number of rows of {cols}", out.len());
        }
        let rows = out.len() / cols;
        if first_row.checked_add(rows).is_none_or(|end| end > n_rows) {
            bail!(
                "{path}: tensor '{name}': rows {first_row}..{} asked for, it has {n_rows}",
                first_row.saturating_add(rows)
            );
        }
        let row_bytes = info.ggml_type.bytes_for(cols);
        let bytes = &self.file.tensor_bytes(file_index)[first_row * row_bytes..(first_row + rows) * row_bytes];
        dequantize(info.ggml_type, bytes, out).map_err(|e| anyhow!("{path}: tensor '{name}': {e}"))
    }
    fn native_bytes(&self, index: usize) -> Option<&[u8]> {
        let (file_index, _) = self.info(index).ok()?;
        self.tensors[index].native.map(|_| self.file.tensor_bytes(file_index))
    }
    fn release(&self, index: usize) {
        if let Ok((file_index, _)) = self.info(index) {
            self.file.release_tensor(file_index);
        }
    }
    fn describe(&self) -> String {
        let file_name = self.file.path().file_name().unwrap_or(self.file.path().as_os_str()).to_string_lossy();
        match self.file.string("general.name") {
            Ok(Some(name)) => format!("GGUF v{} {file_name} ({name})", self.file.version()),
            _ => format!("GGUF v{} {file_name}", self.file.version()),
        }
    }
}
