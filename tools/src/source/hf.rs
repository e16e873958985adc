//! Hugging Face Llama directories: `config.json`, safetensors weights (one
//! `model.safetensors`, or shards listed by `model.safetensors.index.json`),
//! and the tokenizer (`tokenizer.json` or `tokenizer.model`, with
//! `tokenizer_config.json`).
//!
//! Tensors are renamed to GGUF's names and the q/k projections are permuted
//! from Hugging Face's halves RoPE layout to the adjacent-pairs layout the
//! image uses (see [`permuted_source_row`]), as llama.cpp's converter does.
//! Shards are memory-mapped; rows are converted as they are read.
//!
//! [`write_hf_dir`] lays a [`SyntheticModel`] out as such a directory, for tests.

pub mod sentencepiece_model;
mod tokenizer;

use super::{ModelSource, SourceTensor};
use crate::synth::SyntheticModel;
use anyhow::{anyhow, bail, Context, Result};
use bramble_runtime::architecture::{Architecture, Family};
use bramble_runtime::config::ARCH_LLAMA;
use bramble_runtime::rope::{Llama3Params, RopeScaling};
use bramble_runtime::{Encoding, ModelConfig, Vocab};
use bytemuck::Zeroable;
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use tokenizer::{ModelFacts, TemplateForm};

/// The model classes read, with the family each is: `architectures[0]` or `model_type`.
/// `(class, model_type, family)`. Gemma-3's multimodal checkpoints (4B and
/// up) convert as their language model: `text_config` and the
/// `language_model` weights; the vision tower is left out.
const HF_FAMILIES: [(&str, &str, Family); 5] = [
    ("LlamaForCausalLM", "llama", Family::Llama),
    ("Qwen2ForCausalLM", "qwen2", Family::Qwen2),
    ("Qwen3ForCausalLM", "qwen3", Family::Qwen3),
    ("Gemma3ForCausalLM", "gemma3_text", Family::Gemma3),
    ("Gemma3ForConditionalGeneration", "gemma3", Family::Gemma3),
];

/// `Gemma3TextConfig`'s defaults for the keys Gemma-3's checkpoints may
/// leave out (the 4B's `text_config` gives only its width, depth, FFN,
/// window and RoPE scaling).
const GEMMA3_TEXT_DEFAULTS: [(&str, f64); 10] = [
    ("num_attention_heads", 8.0),
    ("num_key_value_heads", 4.0),
    ("head_dim", 256.0),
    ("vocab_size", 262_208.0),
    ("max_position_embeddings", 131_072.0),
    ("rms_norm_eps", 1e-6),
    ("rope_theta", 1_000_000.0),
    ("rope_local_base_freq", 10_000.0),
    ("query_pre_attn_scalar", 256.0),
    ("sliding_window", 4096.0),
];

/// Gemma-3's language-model config: `text_config` for a multimodal
/// checkpoint (with the special token ids of the outer config where it has
/// none), the config itself otherwise, with `Gemma3TextConfig`'s defaults
/// under both (output tied to the embedding unless said otherwise).
fn gemma3_text_config(json: &Value) -> Value {
    let mut text = json.get("text_config").filter(|t| t.is_object()).unwrap_or(json).clone();
    let object = text.as_object_mut().expect("an object");
    for (key, value) in GEMMA3_TEXT_DEFAULTS {
        let value = if value.fract() == 0.0 { json!(value as u64) } else { json!(value) };
        object.entry(key).or_insert(value);
    }
    object.entry("tie_word_embeddings").or_insert(json.get("tie_word_embeddings").cloned().unwrap_or(json!(true)));
    for key in ["bos_token_id", "eos_token_id"] {
        if let Some(id) = json.get(key).filter(|_| !object.contains_key(key)) {
            object.insert(key.into(), id.clone());
        }
    }
    text
}

/// The name a multimodal Gemma-3 checkpoint's language-model tensor has in
/// a text-only one (`language_model.model.X` and, in newer checkpoints,
/// `model.language_model.X` are `model.X`); `None` for the vision tower and
/// its projector, which the converter leaves out.
fn language_model_name(hf_name: &str) -> Option<std::borrow::Cow<'_, str>> {
    const VISION: [&str; 4] =
        ["vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."];
    if VISION.iter().any(|prefix| hf_name.starts_with(prefix)) {
        return None;
    }
    for (prefix, plain) in [
        ("language_model.model.", "model."),
        ("model.language_model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ] {
        if let Some(rest) = hf_name.strip_prefix(prefix) {
            return Some(format!("{plain}{rest}").into());
        }
    }
    Some(hf_name.into())
}

/// Largest dimension accepted from `config.json`, as [`ModelConfig::validate`] does.
const MAX_DIMENSION: u64 = 1 << 24;

/// Per-layer tensors of the Llama block: Hugging Face's name inside
/// `model.layers.N.` and GGUF's inside `blk.N.`.
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// Qwen2's biases of q, k and v.
const QKV_BIAS_TENSORS: [(&str, &str); 3] = [
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
];

/// Qwen3's and Gemma-3's per-head norms of q and k.
const QK_NORM_TENSORS: [(&str, &str); 2] =
    [("self_attn.q_norm.weight", "attn_q_norm.weight"), ("self_attn.k_norm.weight", "attn_k_norm.weight")];

/// Gemma-3's four norms: its `post_attention_layernorm` normalizes the
/// attention's output, where Llama's is the FFN's input norm.
const GEMMA_NORM_TENSORS: [(&str, &str); 4] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "post_attention_norm.weight"),
    ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
    ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
];

/// The per-layer name pairs `(Hugging Face, GGUF)` of `family`.
fn layer_tensor_names(family: Family) -> Vec<(&'static str, &'static str)> {
    let mut names: Vec<(&str, &str)> = LAYER_TENSORS.to_vec();
    match family {
        Family::Llama => {}
        Family::Qwen2 => names.extend(QKV_BIAS_TENSORS),
        Family::Qwen3 => names.extend(QK_NORM_TENSORS),
        Family::Gemma3 => {
            names.retain(|(hf, _)| !hf.ends_with("layernorm.weight"));
            names.extend(QK_NORM_TENSORS);
            names.extend(GEMMA_NORM_TENSORS);
        }
    }
    names
}

/// The Hugging Face row that row `row` of a permuted q/k weight comes from.
///
/// Hugging Face stores each head's rows in the halves order RoPE pairs as
/// `(i, i + head_dim/2)`; the image pairs adjacent rows `(2i, 2i + 1)`. Our row
/// `h·head_dim + 2j + k` is Hugging Face's row `h·head_dim + k·head_dim/2 + j`
/// (llama.cpp's `permute`: `reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2)`).
pub fn permuted_source_row(row: usize, head_dim: usize) -> usize {
    let (head, within) = (row / head_dim, row % head_dim);
    head * head_dim + (within % 2) * (head_dim / 2) + within / 2
}

/// The row of a permuted q/k weight that Hugging Face's row `row` becomes: the
/// inverse of [`permuted_source_row`].
pub fn permuted_target_row(row: usize, head_dim: usize) -> usize {
    let (head, within) = (row / head_dim, row % head_dim);
    let half = head_dim / 2;
    head * head_dim + 2 * (within % half) + within / half
}

/// How a tensor's values are stored in its safetensors file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfDtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16: the top half of a binary32.
    BF16,
}

impl HfDtype {
    fn from_safetensors(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(HfDtype::F32),
            Dtype::F16 => Some(HfDtype::F16),
            Dtype::BF16 => Some(HfDtype::BF16),
            _ => None,
        }
    }
    fn safetensors(self) -> Dtype {
        match self {
            HfDtype::F32 => Dtype::F32,
            HfDtype::F16 => Dtype::F16,
            HfDtype::BF16 => Dtype::BF16,
        }
    }
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            HfDtype::F32 => 4,
            HfDtype::F16 | HfDtype::BF16 => 2,
        }
    }
    /// The name safetensors and `config.json`'s `torch_dtype` use.
    pub fn name(self) -> &'static str {
        match self {
            HfDtype::F32 => "F32",
            HfDtype::F16 => "F16",
            HfDtype::BF16 => "BF16",
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            HfDtype::F32 => "float32",
            HfDtype::F16 => "float16",
            HfDtype::BF16 => "bfloat16",
        }
    }
    fn decode(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            HfDtype::F32 => {
                for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                }
            }
            HfDtype::F16 => {
                for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *value = f16::from_le_bytes([chunk[0], chunk[1]]).to_f32();
                }
            }
            HfDtype::BF16 => {
                for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *value = bf16::from_le_bytes([chunk[0], chunk[1]]).to_f32();
                }
            }
        }
    }
    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            HfDtype::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            HfDtype::F16 => values.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            HfDtype::BF16 => values.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        }
    }
}

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// Where a tensor's bytes are and how to read them.
#[derive(Debug, Clone)]
struct TensorLocation {
    shard: usize,
    /// Byte range in the shard's map.
    start: usize,
    end: usize,
    dtype: HfDtype,
    /// Hugging Face's name, for messages.
    hf_name: String,
    /// `Some(head_dim)` for q/k weights, whose rows are permuted.
    permuted_head_dim: Option<usize>,
    /// Gemma's RMSNorm weights: the model multiplies by `1 + w`, the image stores `1 + w`.
    plus_one: bool,
}

/// A Hugging Face Llama directory, opened.
pub struct HfSource {
    dir: PathBuf,
    config: ModelConfig,
    architecture: Architecture,
    rope_scaling: Option<RopeScaling>,
    vocab: Vocab,
    chat_template: Option<String>,
    tensors: Vec<SourceTensor>,
    locations: Vec<TensorLocation>,
    shards: Vec<Shard>,
}

impl std::fmt::Debug for HfSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfSource")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .field("shards", &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>())
            .finish()
    }
}

/// `config.json`, read.
struct HfConfig {
    config: ModelConfig,
    architecture: Architecture,
    rope_scaling: Option<RopeScaling>,
    tie_word_embeddings: bool,
    tokenizer_facts: ModelFacts,
}

fn dimension(path: &Path, json: &Value, key: &str, default: Option<u64>) -> Result<u32> {
    let value = match json.get(key) {
        None | Some(Value::Null) => default.ok_or_else(|| anyhow!("{}: `{key}` is missing", path.display()))?,
        Some(value) => value
            .as_u64()
            .ok_or_else(|| anyhow!("{}: `{key}` = {value} is not a non-negative integer", path.display()))?,
    };
    if value == 0 || value > MAX_DIMENSION {
        bail!("{}: `{key}` = {value} is out of range (1 ..= {MAX_DIMENSION})", path.display());
    }
    Ok(value as u32)
}

fn number(path: &Path, json: &Value, key: &str, default: f64) -> Result<f32> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(default as f32),
        Some(value) => {
            let number =
                value.as_f64().ok_or_else(|| anyhow!("{}: `{key}` = {value} is not a number", path.display()))?;
            Ok(number as f32)
        }
    }
}

fn flag(path: &Path, json: &Value, key: &str, default: bool) -> Result<bool> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(flag)) => Ok(*flag),
        Some(value) => bail!("{}: `{key}` = {value} is not true or false", path.display()),
    }
}

/// A special-token id of `config.json`: an integer, a list (the first counts) or null.
fn special_id(path: &Path, json: &Value, key: &str) -> Result<Option<u32>> {
    let value = match json.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(list)) => match list.first() {
            None => return Ok(None),
            Some(first) => first,
        },
        Some(value) => value,
    };
    value
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .map(Some)
        .ok_or_else(|| anyhow!("{}: `{key}` = {value} is not a token id", path.display()))
}

/// RoPE's frequency factors from `rope_scaling` (or transformers 5's
/// `rope_parameters`) for a model of `config`: `None` for plain RoPE
/// (`default`), factors for `llama3` (llama.cpp's formula, all four
/// parameters required, as transformers requires them) and `linear`; any
/// other type is refused by its name.
fn rope_scaling(path: &Path, scaling: &Value, config: &ModelConfig) -> Result<Option<RopeScaling>> {
    let name = path.display();
    let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(Value::as_str);
    let parameter = |key: &str| -> Result<f64> {
        scaling
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("{name}: rope_scaling type `{}` needs a number `{key}`", kind.unwrap_or("?")))
    };
    let scaling = match kind {
        Some("default") => return Ok(None),
        Some("linear") => RopeScaling::linear(parameter("factor")? as f32, config.rope_dim),
        Some("llama3") => {
            let original = parameter("original_max_position_embeddings")?;
            if !(original >= 1.0 && original <= MAX_DIMENSION as f64 && original.fract() == 0.0) {
                bail!("{name}: rope_scaling `original_max_position_embeddings` = {original} is not a context length");
            }
            let params = Llama3Params {
                factor: parameter("factor")? as f32,
                low_freq_factor: parameter("low_freq_factor")? as f32,
                high_freq_factor: parameter("high_freq_factor")? as f32,
                original_context_length: original as u32,
            };
            params.scaling(config.rope_theta, config.rope_dim)
        }
        Some(other) => bail!("{name}: rope_scaling type `{other}` is not supported (only default, linear and llama3)"),
        None => bail!("{name}: rope_scaling {scaling} has no `rope_type`"),
    };
    scaling.map(Some).map_err(|e| anyhow!("{name}: rope_scaling: {e}"))
}

fn read_config(path: &Path) -> Result<HfConfig> {
    let json = tokenizer::read_json(path)?;
    if !json.is_object() {
        bail!("{}: not a JSON object", path.display());
    }
    let architectures: Vec<&str> = json
        .get("architectures")
        .and_then(Value::as_array)
        .map_or(Vec::new(), |list| list.iter().filter_map(Value::as_str).collect());
    let model_type = json.get("model_type").and_then(Value::as_str);
    let family = HF_FAMILIES
        .iter()
        .find(|(class, type_name, _)| architectures.contains(class) || model_type == Some(type_name))
        .map(|&(_, _, family)| family)
        .ok_or_else(|| {
            let known: Vec<String> = HF_FAMILIES.iter().map(|(class, name, _)| format!("{class} / {name}")).collect();
            anyhow!(
                "{}: not a supported model (architectures {architectures:?}, model_type {model_type:?}); \
                 expected one of {}",
                path.display(),
                known.join(", ")
            )
        })?;
    let json = if family == Family::Gemma3 { gemma3_text_config(&json) } else { json.clone() };
    let activation_key = if family == Family::Gemma3 { "hidden_activation" } else { "hidden_act" };
    let expected_activation = if family == Family::Gemma3 { "gelu_pytorch_tanh" } else { "silu" };
    if let Some(activation) = json.get(activation_key).filter(|v| !v.is_null()) {
        if activation.as_str() != Some(expected_activation) {
            bail!(
                "{}: {activation_key} {activation} is not supported (a {} block runs {expected_activation})",
                path.display(),
                family.name()
            );
        }
    }
    // Qwen's configs carry a sliding window they do not use unless told to.
    if matches!(family, Family::Qwen2 | Family::Qwen3) && flag(path, &json, "use_sliding_window", false)? {
        bail!(
            "{}: use_sliding_window is true; a {} block with sliding windows is not supported",
            path.display(),
            family.name()
        );
    }
    // Qwen2 always has q/k/v biases and says nothing; the others must have none.
    let biases_allowed: &[&str] = if family == Family::Qwen2 { &["attention_bias"] } else { &[] };
    for key in ["attention_bias", "mlp_bias"] {
        if !biases_allowed.contains(&key) && flag(path, &json, key, false)? {
            bail!("{}: `{key}` is true; a {} block has no such biases", path.display(), family.name());
        }
    }
    let dim = dimension(path, &json, "hidden_size", None)?;
    let n_heads = dimension(path, &json, "num_attention_heads", None)?;
    let n_kv_heads = dimension(path, &json, "num_key_value_heads", Some(u64::from(n_heads)))?;
    if json.get("head_dim").is_none_or(Value::is_null) && dim % n_heads != 0 {
        bail!("{}: hidden_size {dim} is not a multiple of num_attention_heads {n_heads}", path.display());
    }
    let head_dim = dimension(path, &json, "head_dim", Some(u64::from(dim / n_heads)))?;
    let mut config = ModelConfig::zeroed();
    config.arch = ARCH_LLAMA;
    config.dim = dim;
    config.n_layers = dimension(path, &json, "num_hidden_layers", None)?;
    config.n_heads = n_heads;
    config.n_kv_heads = n_kv_heads;
    config.head_dim = head_dim;
    config.ffn_dim = dimension(path, &json, "intermediate_size", None)?;
    config.vocab_size = dimension(path, &json, "vocab_size", None)?;
    config.context_length = dimension(path, &json, "max_position_embeddings", None)?;
    // transformers 5 keeps RoPE's parameters, θ included, in `rope_parameters`.
    let rope_parameters = json.get("rope_parameters").filter(|p| p.is_object());
    config.rope_theta = match (json.get("rope_theta").filter(|t| !t.is_null()), rope_parameters) {
        (None, Some(parameters)) => number(path, parameters, "rope_theta", 10000.0)?,
        _ => number(path, &json, "rope_theta", 10000.0)?,
    };
    // Llama's q/k rows are permuted to adjacent pairs; the others keep halves.
    config.rope_style = (family != Family::Llama) as u32;
    config.rope_dim = head_dim;
    // transformers' LlamaConfig default.
    config.norm_eps = number(path, &json, "rms_norm_eps", 1e-6)?;
    config.validate().map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let architecture = match family {
        Family::Gemma3 => gemma3_block(path, &json, &config)?,
        _ => Architecture::plain(family, &config),
    };
    let rope_scaling = match json.get("rope_scaling").filter(|s| !s.is_null()).or(rope_parameters) {
        Some(scaling) => rope_scaling(path, scaling, &config)?,
        None => None,
    };
    Ok(HfConfig {
        config,
        architecture,
        rope_scaling,
        tie_word_embeddings: flag(path, &json, "tie_word_embeddings", false)?,
        tokenizer_facts: ModelFacts {
            bos_id: special_id(path, &json, "bos_token_id")?,
            eos_id: special_id(path, &json, "eos_token_id")?,
            vocab_size: config.vocab_size,
        },
    })
}

/// Gemma-3's numbers from `config.json`: the embedding scaled by √dim (in
/// f32, as llama.cpp does), queries by `query_pre_attn_scalar^(−½)`, and
/// the sliding-window layers (`layer_types`, or every layer but each
/// `sliding_window_pattern`-th) turning RoPE by `rope_local_base_freq`.
/// Soft-capping of logits or attention scores is refused.
fn gemma3_block(path: &Path, json: &Value, config: &ModelConfig) -> Result<Architecture> {
    for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if let Some(cap) = json.get(key).filter(|v| !v.is_null()) {
            bail!("{}: {key} is {cap}; soft-capping is not supported", path.display());
        }
    }
    let scalar = number(path, json, "query_pre_attn_scalar", config.head_dim as f64)?;
    if !(scalar.is_finite() && scalar > 0.0) {
        bail!("{}: query_pre_attn_scalar {scalar} is not a positive number", path.display());
    }
    let window = match json.get("sliding_window").filter(|v| !v.is_null()) {
        Some(_) => dimension(path, json, "sliding_window", None)?,
        None => 0,
    };
    let layers = config.n_layers as usize;
    let local: Vec<bool> = match json.get("layer_types").filter(|v| !v.is_null()) {
        Some(types) => {
            let types = types
                .as_array()
                .filter(|t| t.len() == layers)
                .ok_or_else(|| anyhow!("{}: layer_types is not a list of {layers} layer types", path.display()))?;
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(anyhow!("{}: layer type {t} is not sliding_attention or full_attention", path.display())),
                })
                .collect::<Result<_>>()?
        }
        None => {
            let period = dimension(path, json, "sliding_window_pattern", Some(6))? as usize;
            Architecture::gemma3_pattern(config.n_layers, period)
        }
    };
    let local_theta = number(path, json, "rope_local_base_freq", 10000.0)?;
    Ok(Architecture::gemma3(config, 1.0 / scalar.sqrt(), window, local_theta, &local))
}

/// GGUF's name for a Hugging Face tensor name of a `family` model, or `None`
/// when the family has no such weight.
fn gguf_name(family: Family, hf_name: &str) -> Option<String> {
    let plain = match family {
        Family::Gemma3 => language_model_name(hf_name)?,
        _ => hf_name.into(),
    };
    let hf_name: &str = &plain;
    match hf_name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: u32 = layer.parse().ok()?;
    let (_, gguf) = layer_tensor_names(family).into_iter().find(|(hf, _)| *hf == part)?;
    Some(format!("blk.{layer}.{gguf}"))
}

/// Hugging Face's name for a GGUF tensor name of a `family` model.
fn hf_name(family: Family, gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: u32 = layer.parse().ok()?;
    let (hf, _) = layer_tensor_names(family).into_iter().find(|(_, gguf)| *gguf == part)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// A shard file name from the index: a plain relative path inside the directory.
fn shard_path(dir: &Path, index_path: &Path, file: &str) -> Result<PathBuf> {
    let relative = Path::new(file);
    if file.is_empty() || !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        bail!("{}: shard name {file:?} is not a file name inside the directory", index_path.display());
    }
    Ok(dir.join(relative))
}

/// A tensor found in a shard, before it is matched to the model's list.
struct FoundTensor {
    location: TensorLocation,
    shape: Vec<usize>,
}

fn map_shard(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: the map is read-only and private; the converter's contract is that
    // the source files are not modified while it runs (as for every mmap reader).
    unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot memory-map", path.display()))
}

/// Reads one shard's header and records where each of its tensors is.
fn index_shard(
    family: Family,
    shard_index: usize,
    shard: &Shard,
    found: &mut HashMap<String, FoundTensor>,
) -> Result<()> {
    let name = shard.path.display();
    let (header_length, metadata) = safetensors::SafeTensors::read_metadata(&shard.map)
        .map_err(|e| anyhow!("{name}: not a valid safetensors file: {e}"))?;
    let data_start = 8 + header_length;
    for (tensor_name, info) in metadata.tensors() {
        if tensor_name.ends_with(".rotary_emb.inv_freq") {
            // Old checkpoints store RoPE's frequencies; they are recomputed from rope_theta.
            continue;
        }
        if family == Family::Gemma3 && language_model_name(&tensor_name).is_none() {
            // A multimodal Gemma-3's vision tower: the image is its language model.
            continue;
        }
        let Some(gguf) = gguf_name(family, &tensor_name) else {
            bail!(
                "{name}: tensor {tensor_name} is not part of a {} model (a bias, or another architecture?)",
                family.name()
            );
        };
        let dtype = HfDtype::from_safetensors(info.dtype).ok_or_else(|| {
            anyhow!("{name}: tensor {tensor_name} has dtype {:?}; only F32, F16 and BF16 are supported", info.dtype)
        })?;
        let (start, end) = info.data_offsets;
        // read_metadata checked the offsets against the file and the shape.
        let location = TensorLocation {
            shard: shard_index,
            start: data_start + start,
            end: data_start + end,
            dtype,
            hf_name: tensor_name.clone(),
            permuted_head_dim: None,
            plus_one: false,
        };
        let tensor = FoundTensor { location, shape: info.shape.clone() };
        if let Some(previous) = found.insert(gguf, tensor) {
            bail!("{name}: tensor {tensor_name} is also in shard {}", previous.location.shard + 1);
        }
    }
    Ok(())
}

/// Opens the Hugging Face Llama directory `dir`.
pub fn open(dir: &Path) -> Result<HfSource> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        bail!("{}: no config.json; not a Hugging Face model directory", dir.display());
    }
    let HfConfig { mut config, architecture, rope_scaling, tie_word_embeddings, tokenizer_facts } =
        read_config(&config_path)?;
    let family = architecture.family;

    // The shards: one file, or those the index lists.
    let single = dir.join("model.safetensors");
    let index_path = dir.join("model.safetensors.index.json");
    let mut index_map: Option<BTreeMap<String, String>> = None;
    let shard_paths: Vec<PathBuf> = if index_path.is_file() {
        let index = tokenizer::read_json(&index_path)?;
        let weight_map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("{}: no `weight_map` object", index_path.display()))?;
        let mut files = BTreeSet::new();
        let mut map = BTreeMap::new();
        for (tensor, file) in weight_map {
            let file = file
                .as_str()
                .ok_or_else(|| anyhow!("{}: weight_map[{tensor:?}] is not a file name", index_path.display()))?;
            files.insert(file.to_string());
            map.insert(tensor.clone(), file.to_string());
        }
        index_map = Some(map);
        let mut paths = Vec::with_capacity(files.len());
        for file in &files {
            let path = shard_path(dir, &index_path, file)?;
            if !path.is_file() {
                bail!("{}: shard {} is missing", index_path.display(), path.display());
            }
            paths.push(path);
        }
        paths
    } else if single.is_file() {
        vec![single]
    } else if dir.join("pytorch_model.bin").is_file() {
        bail!("{}: has PyTorch pickle weights only; convert them to safetensors first", dir.display());
    } else {
        bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
    };

    let mut shards = Vec::with_capacity(shard_paths.len());
    let mut found = HashMap::new();
    for (shard_index, path) in shard_paths.into_iter().enumerate() {
        let shard = Shard { map: map_shard(&path)?, path };
        index_shard(family, shard_index, &shard, &mut found)?;
        shards.push(shard);
    }
    if let Some(map) = &index_map {
        // The index and the shards must agree on where each tensor is.
        for (tensor, file) in map {
            let Some(gguf) = gguf_name(family, tensor) else {
                continue;
            };
            let Some(found) = found.get(&gguf) else {
                bail!("{}: {tensor} is listed in {file} but not there", index_path.display());
            };
            let holder = &shards[found.location.shard].path;
            if holder.file_name().and_then(|n| n.to_str()) != Path::new(file).file_name().and_then(|n| n.to_str()) {
                bail!("{}: {tensor} is listed in {file} but found in {}", index_path.display(), holder.display());
            }
        }
    }

    let has_output = found.contains_key("output.weight");
    config.tied_output = u32::from(tie_word_embeddings || !has_output);
    if config.tied_output == 1 {
        found.remove("output.weight");
    }
    let files = || shards.iter().map(|s| s.path.display().to_string()).collect::<Vec<_>>().join(", ");
    // Checked before the tensor list is made, which a corrupt layer count could make huge.
    let layers_in_files = found
        .keys()
        .filter_map(|name| name.strip_prefix("blk.")?.split_once('.')?.0.parse::<u32>().ok())
        .max()
        .map_or(0, |last| last + 1);
    if config.n_layers > layers_in_files {
        bail!(
            "{}: config.json has num_hidden_layers {}, but model.layers.{layers_in_files}.* is missing (looked in {})",
            dir.display(),
            config.n_layers,
            files()
        );
    }
    let mut tensors = Vec::new();
    let mut locations = Vec::new();
    for (name, shape) in architecture.tensors(&config) {
        let Some(FoundTensor { mut location, shape: found_shape }) = found.remove(&name) else {
            let hf = hf_name(family, &name).unwrap_or(name);
            bail!("{}: tensor {hf} is missing (looked in {})", dir.display(), files());
        };
        if found_shape != shape {
            bail!(
                "{}: tensor {} has shape {found_shape:?}; config.json implies {shape:?}",
                shards[location.shard].path.display(),
                location.hf_name
            );
        }
        // Llama's q/k rows go to adjacent pairs as llama.cpp's converter puts
        // them; the other families keep Hugging Face's halves (rope_style 1).
        let permuted =
            family == Family::Llama && (name.ends_with(".attn_q.weight") || name.ends_with(".attn_k.weight"));
        if permuted {
            location.permuted_head_dim = Some(config.head_dim as usize);
        }
        location.plus_one = family == Family::Gemma3 && name.ends_with("norm.weight");
        let native = match (location.dtype, permuted || location.plus_one) {
            (_, true) => None,
            (HfDtype::F32, false) => Some(Encoding::F32),
            (HfDtype::F16, false) => Some(Encoding::F16),
            (HfDtype::BF16, false) => None,
        };
        tensors.push(SourceTensor { name, shape, source_type: location.dtype.name().to_string(), native });
        locations.push(location);
    }
    if let Some((name, extra)) = found.iter().next() {
        bail!(
            "{}: tensor {} ({name}) does not belong to a model of {} layers",
            shards[extra.location.shard].path.display(),
            extra.location.hf_name,
            config.n_layers
        );
    }

    let (mut vocab, chat_template) = tokenizer::read_tokenizer(dir, tokenizer_facts)?;
    let tokens = vocab.len() as u32;
    if tokens > config.vocab_size {
        bail!(
            "{}: the tokenizer has {tokens} tokens, config.json's vocab_size is {}",
            dir.display(),
            config.vocab_size
        );
    }
    // Embedding rows past the tokenizer (padding to a round size) get unused placeholder tokens, as llama.cpp does.
    for id in tokens..config.vocab_size {
        vocab.tokens.push(format!("[PAD{id}]").into_bytes());
        vocab.scores.push(0.0);
        vocab.types.push(bramble_runtime::vocab::TokenType::Unused);
    }
    Ok(HfSource {
        dir: dir.to_path_buf(),
        config,
        architecture,
        rope_scaling,
        vocab,
        chat_template,
        tensors,
        locations,
        shards,
    })
}

impl HfSource {
    /// Opens the Hugging Face Llama directory `dir` (the same as [`open`]).
    pub fn open(dir: &Path) -> Result<HfSource> {
        open(dir)
    }

    fn tensor_and_location(&self, index: usize) -> Result<(&SourceTensor, &TensorLocation)> {
        match (self.tensors.get(index), self.locations.get(index)) {
            (Some(tensor), Some(location)) => Ok((tensor, location)),
            _ => bail!("{}: no tensor {index} (there are {})", self.dir.display(), self.tensors.len()),
        }
    }
}

impl ModelSource for HfSource {
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
        let (tensor, location) = self.tensor_and_location(index)?;
        let shard = &self.shards[location.shard];
        let (rows, cols) = (tensor.rows(), tensor.cols());
        let count = out.len() / cols;
        if !out.len().is_multiple_of(cols) || first_row.checked_add(count).is_none_or(|end| end > rows) {
            bail!(
                "{}: tensor {}: cannot read {} values from row {first_row} (rows of {cols}, {rows} rows)",
                shard.path.display(),
                location.hf_name,
                out.len()
            );
        }
        let data = &shard.map[location.start..location.end];
        let row_bytes = cols * location.dtype.size();
        for (offset, row_out) in out.chunks_exact_mut(cols).enumerate() {
            let row = first_row + offset;
            let source = location.permuted_head_dim.map_or(row, |head_dim| permuted_source_row(row, head_dim));
            location.dtype.decode(&data[source * row_bytes..(source + 1) * row_bytes], row_out);
            if location.plus_one {
                row_out.iter_mut().for_each(|w| *w += 1.0);
            }
        }
        Ok(())
    }
    fn native_bytes(&self, index: usize) -> Option<&[u8]> {
        let (tensor, location) = self.tensor_and_location(index).ok()?;
        tensor.native?;
        Some(&self.shards[location.shard].map[location.start..location.end])
    }
    fn release(&self, index: usize) {
        #[cfg(unix)]
        if let Ok((_, location)) = self.tensor_and_location(index) {
            let map = &self.shards[location.shard].map;
            // SAFETY: the map is a read-only private file mapping that is never
            // written, so dropping its pages only means they are read again from
            // the file if touched; no borrowed slice sees different bytes.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    location.start,
                    location.end - location.start,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = index;
    }
    fn describe(&self) -> String {
        let dtypes: BTreeSet<&str> = self.locations.iter().map(|l| l.dtype.name()).collect();
        format!(
            "Hugging Face directory {} ({} safetensors file{}, {}, {} tokenizer)",
            self.dir.display(),
            self.shards.len(),
            if self.shards.len() == 1 { "" } else { "s" },
            dtypes.into_iter().collect::<Vec<_>>().join("/"),
            match self.vocab.kind {
                bramble_runtime::vocab::TokenizerKind::SentencePiece => "SentencePiece",
                bramble_runtime::vocab::TokenizerKind::ByteLevelBpe => "byte-level BPE",
            }
        )
    }
}

/// Which tokenizer file [`write_hf_dir`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfTokenizerForm {
    /// `tokenizer.json`, the `tokenizers` library's format.
    TokenizerJson,
    /// SentencePiece's `tokenizer.model` protobuf (SentencePiece vocabularies only).
    SentencePieceModel,
}

/// How [`write_hf_dir`] lays a model out.
#[derive(Debug, Clone)]
pub struct HfWriteOptions {
    /// Storage type of every tensor.
    pub dtype: HfDtype,
    /// 1: `model.safetensors`; more: that many `model-0000i-of-0000n.safetensors`
    /// files and `model.safetensors.index.json`.
    pub shards: usize,
    /// Tokenizer file.
    pub tokenizer: HfTokenizerForm,
    /// Chat template for `tokenizer_config.json`.
    pub chat_template: Option<String>,
    /// Write the template as a list of named templates (`[{"name": "default", ...}]`) instead of a string.
    pub chat_template_as_list: bool,
    /// A Gemma-3 model laid out as the multimodal checkpoints (4B and up) are:
    /// `Gemma3ForConditionalGeneration`, the config under `text_config` with
    /// the keys `Gemma3TextConfig` defaults left out, the weights under
    /// `language_model.model.`, and a token vision tower beside them.
    pub gemma3_multimodal: bool,
}

impl Default for HfWriteOptions {
    fn default() -> Self {
        Self {
            dtype: HfDtype::F32,
            shards: 1,
            tokenizer: HfTokenizerForm::TokenizerJson,
            chat_template: None,
            chat_template_as_list: false,
            gemma3_multimodal: false,
        }
    }
}

/// A float as JSON, spelled as its shortest decimal so `1e-5f32` is written
/// `1e-5` rather than `9.999999747378752e-6`.
fn json_f32(value: f32) -> Value {
    let shortest: f64 = value.to_string().parse().unwrap_or(f64::from(value));
    json!(shortest)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("serializing JSON")?;
    std::fs::write(path, text).with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes `model` into `dir` as a Hugging Face Llama directory: `config.json`,
/// safetensors weights (q/k rows permuted to Hugging Face's layout), the
/// tokenizer and `tokenizer_config.json`.
pub fn write_hf_dir(model: &SyntheticModel, dir: &Path, options: HfWriteOptions) -> Result<()> {
    let config = &model.config;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    if options.shards == 0 {
        bail!("writing {}: shards must be at least 1", dir.display());
    }
    let head_dim = config.head_dim as usize;
    let family = model.architecture.family;

    // The tensors, renamed, permuted and encoded.
    let mut encoded: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(model.tensors.len());
    for (name, shape, values) in &model.tensors {
        let hf = hf_name(family, name)
            .ok_or_else(|| anyhow!("writing {}: tensor {name} has no Hugging Face name", dir.display()))?;
        let expected: usize = shape.iter().product();
        if values.len() != expected {
            bail!("writing {}: tensor {name} has {} values for shape {shape:?}", dir.display(), values.len());
        }
        let mut bytes = Vec::with_capacity(expected * options.dtype.size());
        if family == Family::Llama && (name.ends_with(".attn_q.weight") || name.ends_with(".attn_k.weight")) {
            let (rows, cols) = (shape[0], shape[1]);
            if head_dim == 0 || !head_dim.is_multiple_of(2) || !rows.is_multiple_of(head_dim) {
                bail!("writing {}: tensor {name} has {rows} rows, not whole heads of {head_dim}", dir.display());
            }
            // Hugging Face's row r holds our row permuted_target_row(r).
            for hf_row in 0..rows {
                let ours = permuted_target_row(hf_row, head_dim);
                options.dtype.encode(&values[ours * cols..(ours + 1) * cols], &mut bytes);
            }
        } else if family == Family::Gemma3 && name.ends_with("norm.weight") {
            // Gemma's checkpoints store w of its (1 + w) norms.
            let stored: Vec<f32> = values.iter().map(|w| w - 1.0).collect();
            options.dtype.encode(&stored, &mut bytes);
        } else {
            options.dtype.encode(values, &mut bytes);
        }
        let hf = match options.gemma3_multimodal {
            true => hf.replacen("model.", "language_model.model.", 1),
            false => hf,
        };
        encoded.push((hf, shape.clone(), bytes));
    }
    if options.gemma3_multimodal {
        if family != Family::Gemma3 {
            bail!("writing {}: only a Gemma-3 model has a multimodal layout", dir.display());
        }
        // What a converter must leave out: a vision tower's first tensor and the projector.
        let mut bytes = Vec::new();
        options.dtype.encode(&[0.5; 8], &mut bytes);
        for name in [
            "vision_tower.vision_model.embeddings.patch_embedding.weight",
            "multi_modal_projector.mm_input_projection_weight",
        ] {
            encoded.push((name.to_string(), vec![2, 4], bytes.clone()));
        }
    }
    if options.shards > encoded.len() {
        bail!("writing {}: {} shards for {} tensors", dir.display(), options.shards, encoded.len());
    }

    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let per_shard = encoded.len().div_ceil(options.shards);
    let mut weight_map = Map::new();
    let mut total_size = 0usize;
    let groups: Vec<_> = encoded.chunks(per_shard).collect();
    if groups.len() != options.shards {
        bail!("writing {}: {} tensors do not split into {} shards", dir.display(), encoded.len(), options.shards);
    }
    for (shard, group) in groups.iter().enumerate() {
        let file = if options.shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", shard + 1, options.shards)
        };
        let mut views = Vec::with_capacity(group.len());
        for (name, shape, bytes) in group.iter() {
            let view = TensorView::new(options.dtype.safetensors(), shape.clone(), bytes)
                .map_err(|e| anyhow!("writing {}: tensor {name}: {e}", dir.display()))?;
            views.push((name.clone(), view));
            weight_map.insert(name.clone(), json!(file));
            total_size += bytes.len();
        }
        let path = dir.join(&file);
        safetensors::serialize_to_file(views, &metadata, &path)
            .map_err(|e| anyhow!("{}: cannot write: {e}", path.display()))?;
    }
    if options.shards > 1 {
        let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }

    let vocab = &model.vocab;
    let tied = config.tied_output != 0;
    let (class, model_type) = HF_FAMILIES
        .iter()
        .find(|(_, _, f)| *f == family)
        .map(|&(class, model_type, _)| (class, model_type))
        .ok_or_else(|| anyhow!("writing {}: no Hugging Face class for a {} model", dir.display(), family.name()))?;
    let mut config_json = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_attention_heads": config.n_heads,
        "num_hidden_layers": config.n_layers,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.context_length,
        "rope_theta": json_f32(config.rope_theta),
        "rope_scaling": match (&model.llama3_rope, &model.rope_scaling) {
            (Some(p), _) => json!({
                "rope_type": "llama3",
                "factor": json_f32(p.factor),
                "low_freq_factor": json_f32(p.low_freq_factor),
                "high_freq_factor": json_f32(p.high_freq_factor),
                "original_max_position_embeddings": p.original_context_length,
            }),
            (None, Some(linear)) => json!({"rope_type": "linear", "factor": json_f32(linear.factors[0])}),
            (None, None) => Value::Null,
        },
        "rms_norm_eps": json_f32(config.norm_eps),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": family == Family::Qwen2,
        "mlp_bias": false,
        "bos_token_id": vocab.bos_id,
        "eos_token_id": vocab.eos_id,
        "torch_dtype": options.dtype.torch_name(),
    });
    if family == Family::Gemma3 {
        let a = &model.architecture;
        let extra = config_json.as_object_mut().expect("an object");
        extra.remove("hidden_act");
        extra.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
        extra.insert("query_pre_attn_scalar".into(), json_f32((1.0 / (a.attention_scale * a.attention_scale)).round()));
        extra.insert("final_logit_softcapping".into(), Value::Null);
        extra.insert("attn_logit_softcapping".into(), Value::Null);
        if let Some(local) = a.layers.iter().find(|l| l.is_local()) {
            extra.insert("sliding_window".into(), json!(local.window));
            extra.insert("rope_local_base_freq".into(), json_f32(local.rope_theta));
            let types: Vec<&str> =
                a.layers.iter().map(|l| if l.is_local() { "sliding_attention" } else { "full_attention" }).collect();
            extra.insert("layer_types".into(), json!(types));
        }
    }
    if options.gemma3_multimodal {
        let mut text = config_json.take();
        let text_object = text.as_object_mut().expect("an object");
        // Left to Gemma3TextConfig's defaults, as the 4B's config leaves them.
        for key in ["num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps"] {
            if GEMMA3_TEXT_DEFAULTS.iter().any(|&(k, v)| k == key && text_object[key].as_f64() == Some(v)) {
                text_object.remove(key);
            }
        }
        text_object.insert("model_type".into(), json!("gemma3_text"));
        text_object.remove("architectures");
        config_json = json!({
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "text_config": text,
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 4},
            "bos_token_id": vocab.bos_id,
            "eos_token_id": vocab.eos_id,
        });
    }
    write_json(&dir.join("config.json"), &config_json)?;

    let context = |what: &str| format!("writing {} in {}", what, dir.display());
    match options.tokenizer {
        HfTokenizerForm::TokenizerJson => {
            let json = tokenizer::tokenizer_json(vocab).with_context(|| context("tokenizer.json"))?;
            write_json(&dir.join("tokenizer.json"), &json)?;
        }
        HfTokenizerForm::SentencePieceModel => {
            let bytes = tokenizer::sentencepiece_model_bytes(vocab).with_context(|| context("tokenizer.model"))?;
            let path = dir.join("tokenizer.model");
            std::fs::write(&path, bytes).with_context(|| format!("{}: cannot write", path.display()))?;
        }
    }
    let form = if options.chat_template_as_list { TemplateForm::List } else { TemplateForm::String };
    let tokenizer_config =
        tokenizer::tokenizer_config_json(vocab, options.chat_template.as_deref(), form, config.context_length)
            .with_context(|| context("tokenizer_config.json"))?;
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config)?;
    Ok(())
}
