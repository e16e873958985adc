//! Synthetic Llama models too large for memory (a Llama-2-7B shape is 13.5 GB
//! in f16), written straight to disk one chunk of rows at a time, as GGUF or as
//! a sharded Hugging Face directory. They exist to measure the converter on
//! real sizes: resident memory, time, page traffic.
//!
//! Values are pseudo-random ([`SplitMix64`]) and seeded per row, so a row is
//! the same whichever format, order or permutation writes it: a GGUF file and
//! a Hugging Face directory made from one seed read back as the same model.
//! Weights are uniform in ±0.02 (about a trained Llama's spread), norms in
//! 1 ± 0.2. The vocabulary is [`sentencepiece_vocab`] padded with unused
//! `[PAD<id>]` tokens, as [`crate::source::hf::HfSource`] pads a short tokenizer.

use crate::source::gguf::{llama_writer, GgmlType, Value, LLAMA2_TEMPLATE};
use crate::source::hf::{permuted_target_row, write_hf_dir, HfDtype, HfTokenizerForm, HfWriteOptions};
use crate::synth::{SyntheticModel, SyntheticShape};
use anyhow::{anyhow, bail, Context, Result};
use bramble_runtime::config::ARCH_LLAMA;
use bramble_runtime::rng::SplitMix64;
use bramble_runtime::tokenizer::synthetic::sentencepiece_vocab;
use bramble_runtime::vocab::TokenType;
use bramble_runtime::{ModelConfig, Vocab};
use bytemuck::Zeroable;
use half::{bf16, f16};
use serde_json::{json, Map};
use std::io::{BufWriter, Write};
use std::path::Path;

/// Values generated and encoded at once: bounds the generator's memory for any tensor size.
const CHUNK_VALUES: usize = 1 << 20;
/// Spread of the weights: uniform in `±WEIGHT_SCALE`.
const WEIGHT_SCALE: f32 = 0.02;
/// Spread of the norms: uniform in `1 ± NORM_SPREAD`.
const NORM_SPREAD: f32 = 0.2;

/// The shapes [`LargeShape::parse`] knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LargeShape {
    /// Seconds to write: width 128, 2 layers, grouped-query attention, 512 tokens.
    Tiny,
    /// Llama-2-7B: width 4096, 32 layers, 32 heads, FFN 11008, 32000 tokens, untied output.
    Llama2_7B,
    /// TinyLlama-1.1B: width 2048, 22 layers, 32 heads sharing 4 KV heads,
    /// FFN 5632, 32000 tokens, untied output. With fewer `--layers` it keeps
    /// every matrix's shape: a small file that runs the same kernels.
    TinyLlama,
}

impl LargeShape {
    /// Every shape, with its `--shape` name.
    pub const ALL: [(LargeShape, &'static str); 3] =
        [(LargeShape::Tiny, "tiny"), (LargeShape::Llama2_7B, "llama2-7b"), (LargeShape::TinyLlama, "tinyllama")];

    /// The shape called `name` (`tiny`, `llama2-7b`, `tinyllama`).
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(shape, _)| *shape).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
            anyhow!("unknown model shape {name:?}: expected one of {}", names.join(", "))
        })
    }

    /// The `--shape` name.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(shape, _)| *shape == self).map(|(_, n)| *n).expect("every shape is listed")
    }

    /// The hyperparameters.
    pub fn config(self) -> ModelConfig {
        // (dim, layers, heads, kv heads, ffn, vocab, context)
        let (dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size, context_length) = match self {
            LargeShape::Tiny => (128, 2, 4, 2, 352, 512, 256),
            LargeShape::Llama2_7B => (4096, 32, 32, 32, 11008, 32000, 4096),
            LargeShape::TinyLlama => (2048, 22, 32, 4, 5632, 32000, 2048),
        };
        let mut config = ModelConfig::zeroed();
        config.arch = ARCH_LLAMA;
        config.dim = dim;
        config.n_layers = n_layers;
        config.n_heads = n_heads;
        config.n_kv_heads = n_kv_heads;
        config.head_dim = dim / n_heads;
        config.ffn_dim = ffn_dim;
        config.vocab_size = vocab_size;
        config.context_length = context_length;
        config.rope_theta = 10000.0;
        config.rope_style = 0;
        config.rope_dim = dim / n_heads;
        config.norm_eps = 1e-5;
        config.tied_output = 0;
        config
    }

    /// The hyperparameters with `layers` blocks instead of the shape's own
    /// count when given (every tensor keeps its size; only their number changes).
    pub fn config_with_layers(self, layers: Option<usize>) -> Result<ModelConfig> {
        let mut config = self.config();
        if let Some(layers) = layers {
            if layers == 0 || layers > config.n_layers as usize {
                bail!("--layers {layers} with --shape {}: expected 1 to {}", self.name(), config.n_layers);
            }
            config.n_layers = layers as _;
        }
        Ok(config)
    }

    /// Safetensors files of the Hugging Face layout (Llama-2-7B's own f16
    /// release has two, TinyLlama's one).
    pub fn shards(self) -> usize {
        match self {
            LargeShape::Tiny => 2,
            LargeShape::Llama2_7B => 3,
            LargeShape::TinyLlama => 1,
        }
    }
}

/// How the weight matrices are stored. GGUF norms are always F32 (as llama.cpp
/// writes them); Hugging Face norms take the weights' type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LargeWeights {
    /// IEEE binary16, as Llama-2 is published.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE binary32.
    F32,
}

impl LargeWeights {
    /// The type called `name` (`f16`, `bf16`, `f32`).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "f16" => LargeWeights::F16,
            "bf16" => LargeWeights::BF16,
            "f32" => LargeWeights::F32,
            _ => bail!("weight type {name:?} cannot be streamed: expected f16, bf16 or f32"),
        })
    }

    fn ggml(self) -> GgmlType {
        match self {
            LargeWeights::F16 => GgmlType::F16,
            LargeWeights::BF16 => GgmlType::BF16,
            LargeWeights::F32 => GgmlType::F32,
        }
    }

    fn hf(self) -> HfDtype {
        match self {
            LargeWeights::F16 => HfDtype::F16,
            LargeWeights::BF16 => HfDtype::BF16,
            LargeWeights::F32 => HfDtype::F32,
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        self.hf().size()
    }

    /// `values` as stored in this type, appended to `out` (little-endian).
    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        use half::slice::HalfFloatSliceExt;
        match self {
            LargeWeights::F16 => {
                let mut halves = vec![f16::ZERO; values.len()];
                halves.convert_from_f32_slice(values);
                out.extend(halves.iter().flat_map(|v| v.to_le_bytes()));
            }
            LargeWeights::BF16 => {
                let mut halves = vec![bf16::ZERO; values.len()];
                halves.convert_from_f32_slice(values);
                out.extend(halves.iter().flat_map(|v| v.to_le_bytes()));
            }
            LargeWeights::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        }
    }

    /// `values` after a round trip through this type.
    pub fn round(self, values: &mut [f32]) {
        match self {
            LargeWeights::F16 => values.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
            LargeWeights::BF16 => values.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
            LargeWeights::F32 => {}
        }
    }
}

/// What a writer wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LargeReport {
    /// Tensors.
    pub tensors: usize,
    /// Bytes of tensor data (without headers and padding).
    pub tensor_bytes: u64,
    /// Files written, including headers and the tokenizer.
    pub files: usize,
}

/// The vocabulary of a model of `vocab_size` tokens: [`sentencepiece_vocab`],
/// then unused `[PAD<id>]` tokens up to the size.
pub fn padded_vocab(vocab_size: usize) -> Result<Vocab> {
    let mut vocab = sentencepiece_vocab();
    if vocab.len() > vocab_size {
        bail!("a vocabulary of {vocab_size} tokens is smaller than the {} base tokens", vocab.len());
    }
    for id in vocab.len()..vocab_size {
        vocab.tokens.push(format!("[PAD{id}]").into_bytes());
        vocab.scores.push(0.0);
        vocab.types.push(TokenType::Unused);
    }
    Ok(vocab)
}

/// The tensors of a Llama of `config`: GGUF name and shape (outermost first), in GGUF order.
pub fn tensor_list(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    crate::source::llama_tensors(config)
}

/// Row `row` of tensor number `tensor` (in [`tensor_list`] order, rows in the
/// adjacent-pairs RoPE layout) of the model made from `seed`, as f32, into
/// `out`; a file holds these values rounded to its type ([`LargeWeights::round`]).
/// Four values per 64 random bits.
pub fn fill_row(seed: u64, tensor: usize, row: usize, is_norm: bool, out: &mut [f32]) {
    let mut rng = SplitMix64(SplitMix64(seed ^ ((tensor as u64) << 40) ^ row as u64).next_u64());
    let (offset, scale) = if is_norm { (1.0, NORM_SPREAD) } else { (0.0, WEIGHT_SCALE) };
    let scale = scale / 32768.0;
    for four in out.chunks_mut(4) {
        let bits = rng.next_u64();
        for (lane, value) in four.iter_mut().enumerate() {
            let signed = (bits >> (16 * lane)) as u16 as i16;
            *value = offset + f32::from(signed) * scale;
        }
    }
}

/// Writes every row of tensor number `tensor` (`shape`) to `out`, a chunk of
/// rows at a time: values rounded through `weights`, stored as `stored`.
/// `source_row` maps a stored row to the row [`fill_row`] makes for it (the
/// identity, or a q/k permutation).
fn stream_tensor(
    out: &mut dyn Write,
    (seed, tensor): (u64, usize),
    shape: &[usize],
    (weights, stored): (LargeWeights, LargeWeights),
    source_row: &dyn Fn(usize) -> usize,
) -> Result<()> {
    let cols = *shape.last().expect("a tensor has a dimension");
    let rows: usize = shape[..shape.len() - 1].iter().product();
    let is_norm = shape.len() == 1;
    let rows_per_chunk = (CHUNK_VALUES / cols).max(1);
    let mut values = vec![0f32; rows_per_chunk.min(rows) * cols];
    let mut bytes = Vec::with_capacity(values.len() * stored.size());
    let mut first = 0;
    while first < rows {
        let n = rows_per_chunk.min(rows - first);
        let chunk = &mut values[..n * cols];
        for (offset, row_values) in chunk.chunks_exact_mut(cols).enumerate() {
            fill_row(seed, tensor, source_row(first + offset), is_norm, row_values);
        }
        if stored != weights {
            weights.round(chunk);
        }
        bytes.clear();
        stored.encode(chunk, &mut bytes);
        out.write_all(&bytes)?;
        first += n;
    }
    Ok(())
}

/// Writes a Llama of `shape` as a GGUF v3 file at `path`: 2-D weights in
/// `weights`, norms in F32 (holding values rounded through `weights`, so every
/// format holds the same numbers), the padded SentencePiece vocabulary and the
/// Llama-2 chat template. Holds one chunk of rows in memory at a time.
/// `layers` overrides the shape's number of blocks.
pub fn write_large_gguf(
    shape: LargeShape,
    layers: Option<usize>,
    path: &Path,
    weights: LargeWeights,
    seed: u64,
) -> Result<LargeReport> {
    let config = shape.config_with_layers(layers)?;
    let vocab = padded_vocab(config.vocab_size as usize)?;
    let at_fault = |e: anyhow::Error| anyhow!("{}: {e:#}", path.display());
    let mut writer = llama_writer(&config, &vocab).map_err(at_fault)?;
    writer
        .set("general.name", Value::String(format!("bramble synthetic {}", shape.name()).into_bytes()))
        .set("general.file_type", Value::U32(gguf_file_type(weights)));
    let tensors = tensor_list(&config);
    let mut tensor_bytes = 0u64;
    for (name, tensor_shape) in &tensors {
        let ggml_type = if tensor_shape.len() == 1 { GgmlType::F32 } else { weights.ggml() };
        writer.declare_tensor(name, tensor_shape, ggml_type).map_err(at_fault)?;
        tensor_bytes += ggml_type.bytes_for(tensor_shape.iter().product()) as u64;
    }
    let mut next = 0;
    writer.write_streaming(path, |name, out| {
        let index = next;
        next += 1;
        let (expected, tensor_shape) = &tensors[index];
        if name != expected {
            bail!("asked for tensor '{name}', expected '{expected}'");
        }
        let stored = if tensor_shape.len() == 1 { LargeWeights::F32 } else { weights };
        stream_tensor(out, (seed, index), tensor_shape, (weights, stored), &|row| row)
    })?;
    Ok(LargeReport { tensors: tensors.len(), tensor_bytes, files: 1 })
}

/// llama.cpp's `general.file_type` (`enum llama_ftype`) for all-`weights` files.
fn gguf_file_type(weights: LargeWeights) -> u32 {
    match weights {
        LargeWeights::F32 => 0,
        LargeWeights::F16 => 1,
        LargeWeights::BF16 => 32,
    }
}

/// Hugging Face's name for a GGUF tensor name.
fn hf_name(gguf_name: &str) -> String {
    const LAYER_PARTS: [(&str, &str); 9] = [
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ];
    match gguf_name {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.").and_then(|r| r.strip_suffix(".weight")).expect("a layer tensor");
    let (layer, part) = rest.split_once('.').expect("blk.N.part");
    let (_, hf) = LAYER_PARTS.iter().find(|(gguf, _)| *gguf == part).expect("a Llama layer tensor");
    format!("model.layers.{layer}.{hf}.weight")
}

/// Writes a Llama of `shape` into `dir` as a Hugging Face directory:
/// `config.json`, [`LargeShape::shards`] safetensors files of `weights` listed
/// by `model.safetensors.index.json` (q/k rows permuted to Hugging Face's
/// halves layout), `tokenizer.json` and `tokenizer_config.json` with the
/// Llama-2 chat template. Holds one chunk of rows in memory at a time.
/// `layers` overrides the shape's number of blocks.
pub fn write_large_hf(
    shape: LargeShape,
    layers: Option<usize>,
    dir: &Path,
    weights: LargeWeights,
    seed: u64,
) -> Result<LargeReport> {
    let config = shape.config_with_layers(layers)?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let tensors = tensor_list(&config);
    let sizes: Vec<u64> = tensors.iter().map(|(_, s)| (s.iter().product::<usize>() * weights.size()) as u64).collect();
    let total: u64 = sizes.iter().sum();

    // Shard k holds the tensors that start in the k-th equal share of the bytes.
    let shards = shape.shards();
    let mut shard_of = Vec::with_capacity(tensors.len());
    let mut start = 0u64;
    for size in &sizes {
        shard_of.push(((u128::from(start) * shards as u128 / u128::from(total)) as usize).min(shards - 1));
        start += size;
    }
    let file_name = |shard: usize| format!("model-{:05}-of-{:05}.safetensors", shard + 1, shards);
    let head_dim = config.head_dim as usize;
    let mut weight_map = Map::new();
    for shard in 0..shards {
        let members: Vec<usize> = (0..tensors.len()).filter(|&i| shard_of[i] == shard).collect();
        if members.is_empty() {
            bail!("writing {}: shard {} of {shards} would be empty", dir.display(), shard + 1);
        }
        // The header: each tensor's dtype, shape and byte range, data in this order.
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0u64;
        for &i in &members {
            let name = hf_name(&tensors[i].0);
            header.insert(
                name.clone(),
                json!({"dtype": weights.hf().name(), "shape": tensors[i].1, "data_offsets": [offset, offset + sizes[i]]}),
            );
            weight_map.insert(name, json!(file_name(shard)));
            offset += sizes[i];
        }
        let mut header = serde_json::to_vec(&header).context("serializing a safetensors header")?;
        // safetensors pads the header with spaces so the data starts 8-aligned.
        header.resize(header.len().div_ceil(8) * 8, b' ');

        let path = dir.join(file_name(shard));
        let file = std::fs::File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let write_error = |e: std::io::Error| anyhow!("{}: cannot write: {e}", path.display());
        out.write_all(&(header.len() as u64).to_le_bytes()).map_err(write_error)?;
        out.write_all(&header).map_err(write_error)?;
        for &i in &members {
            let (name, tensor_shape) = &tensors[i];
            let permuted = name.ends_with(".attn_q.weight") || name.ends_with(".attn_k.weight");
            // Hugging Face's row r holds our row permuted_target_row(r).
            let source_row = |row: usize| {
                if permuted {
                    permuted_target_row(row, head_dim)
                } else {
                    row
                }
            };
            stream_tensor(&mut out, (seed, i), tensor_shape, (weights, weights), &source_row)
                .with_context(|| format!("{}: tensor {}", path.display(), hf_name(name)))?;
        }
        out.flush().map_err(write_error)?;
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_json(&dir.join("model.safetensors.index.json"), &index)?;

    let vocab = sentencepiece_vocab();
    let config_json = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_attention_heads": config.n_heads,
        "num_hidden_layers": config.n_layers,
        "num_key_value_heads": config.n_kv_heads,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.context_length,
        "rope_theta": 10000.0,
        "rope_scaling": null,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": vocab.bos_id,
        "eos_token_id": vocab.eos_id,
        "torch_dtype": match weights {
            LargeWeights::F16 => "float16",
            LargeWeights::BF16 => "bfloat16",
            LargeWeights::F32 => "float32",
        },
    });
    write_json(&dir.join("config.json"), &config_json)?;
    write_tokenizer_files(dir, config.context_length as usize)?;
    Ok(LargeReport { tensors: tensors.len(), tensor_bytes: total, files: shards + 4 })
}

/// `tokenizer.json` and `tokenizer_config.json` of [`sentencepiece_vocab`]
/// (the model's `vocab_size` pads it), made by [`write_hf_dir`] for a tiny
/// model in a scratch directory and moved into `dir`.
fn write_tokenizer_files(dir: &Path, context_length: usize) -> Result<()> {
    let scratch =
        tempfile::tempdir_in(dir).with_context(|| format!("{}: cannot make a scratch directory", dir.display()))?;
    let shape = SyntheticShape { context_length, ..SyntheticShape::default() };
    let model = SyntheticModel::generate(shape, 0);
    let options = HfWriteOptions {
        tokenizer: HfTokenizerForm::TokenizerJson,
        chat_template: Some(LLAMA2_TEMPLATE.to_string()),
        ..HfWriteOptions::default()
    };
    write_hf_dir(&model, scratch.path(), options)?;
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let (from, to) = (scratch.path().join(file), dir.join(file));
        std::fs::rename(&from, &to).with_context(|| format!("{}: cannot move to {}", from.display(), to.display()))?;
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("serializing JSON")?;
    std::fs::write(path, text).with_context(|| format!("{}: cannot write", path.display()))
}
