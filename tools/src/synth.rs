//! Tiny synthetic Llama models with seeded random weights, for fast tests of
//! every input format. A [`SyntheticModel`] is the format-neutral description;
//! the writers in each source module lay it out as GGUF, a Hugging Face
//! directory or a llama2.c checkpoint. A Llama-3.x-shaped one
//! ([`SyntheticShape::llama3`]) scales RoPE as Llama-3.1 does and has
//! Llama-3's control tokens.

use bramble_runtime::architecture::{Architecture, Family};
use bramble_runtime::config::ARCH_LLAMA;
use bramble_runtime::rng::SplitMix64;
use bramble_runtime::rope::{Llama3Params, RopeScaling};
use bramble_runtime::tokenizer::synthetic::{byte_level_vocab, gemma_vocab, llama3_vocab, sentencepiece_vocab};
use bramble_runtime::vocab::TokenizerKind;
use bramble_runtime::{ModelConfig, Vocab};
use bytemuck::Zeroable;

/// A synthetic model: config, vocabulary and f32 tensors under GGUF names,
/// shapes outermost first (`[out, in]`), rows in the adjacent-pairs RoPE layout.
#[derive(Debug, Clone)]
pub struct SyntheticModel {
    /// Hyperparameters.
    pub config: ModelConfig,
    /// Vocabulary.
    pub vocab: Vocab,
    /// `(name, shape, values)`, in GGUF order.
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// Llama-3.x's `rope_scaling` parameters, when the model scales RoPE.
    pub llama3_rope: Option<Llama3Params>,
    /// The factors they make, as the image carries them.
    pub rope_scaling: Option<RopeScaling>,
    /// The block (the Llama block, or a Qwen one).
    pub architecture: Architecture,
    /// The tensors as a [`crate::source::ModelSource`] lists them, made on first use.
    pub source_tensors: std::sync::OnceLock<Vec<crate::source::SourceTensor>>,
}

/// Shape of a synthetic model.
#[derive(Debug, Clone, Copy)]
pub struct SyntheticShape {
    /// Model width (multiple of 32).
    pub dim: usize,
    /// Blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// SwiGLU width (multiple of 32).
    pub ffn_dim: usize,
    /// Context length.
    pub context_length: usize,
    /// Share the output layer with the embedding.
    pub tied_output: bool,
    /// SentencePiece (Llama-2-like) or byte-level BPE (SmolLM2-like) vocabulary.
    pub tokenizer: TokenizerKind,
    /// Llama-3.x: RoPE base 500000 scaled as `rope_type: "llama3"` (factor
    /// 8, low/high frequency factors 1 and 4, an original context of half
    /// `context_length`, so that later positions run scaled), and the
    /// Llama-3 vocabulary ([`llama3_vocab`]) whatever `tokenizer` says.
    pub llama3: bool,
    /// The block's family: Llama, or Qwen2 (q/k/v biases) or Qwen3 (q/k
    /// norms), which take a byte-level vocabulary split by Qwen2's
    /// pre-tokenizer whatever `tokenizer` says, and halves RoPE; or Gemma-3
    /// ([`SyntheticModel::generate`] says how), with Gemma's SentencePiece
    /// vocabulary.
    pub family: Family,
}

impl Default for SyntheticShape {
    fn default() -> Self {
        Self {
            dim: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            ffn_dim: 160,
            context_length: 128,
            tied_output: false,
            tokenizer: TokenizerKind::SentencePiece,
            llama3: false,
            family: Family::Llama,
        }
    }
}

/// GPT-2's byte-to-Unicode mapping: printable Latin-1 bytes stand for
/// themselves, the rest are shifted to U+0100 and up.
pub fn gpt2_byte_to_char(byte: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(byte) {
        return byte as char;
    }
    let shifted = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + shifted).expect("valid code point")
}

impl SyntheticModel {
    /// A model of `shape` with weights drawn from `seed`. Weights are scaled
    /// like a trained model's (about 1/√in) so activations stay in range.
    pub fn generate(shape: SyntheticShape, seed: u64) -> Self {
        let qwen = matches!(shape.family, Family::Qwen2 | Family::Qwen3);
        let mut vocab = match (shape.llama3, shape.tokenizer) {
            (true, _) => llama3_vocab(),
            _ if shape.family == Family::Gemma3 => gemma_vocab(),
            (false, TokenizerKind::ByteLevelBpe) => byte_level_vocab(),
            (false, TokenizerKind::SentencePiece) if qwen => byte_level_vocab(),
            (false, TokenizerKind::SentencePiece) => sentencepiece_vocab(),
        };
        if qwen {
            // Qwen's vocabularies are byte-level, split by Qwen2's regex.
            vocab.pre_tokenizer = bramble_runtime::vocab::PreTokenizer::Qwen2;
        }
        let head_dim = shape.dim / shape.n_heads;
        let mut config = ModelConfig::zeroed();
        config.arch = ARCH_LLAMA;
        config.dim = shape.dim as u32;
        config.n_layers = shape.n_layers as u32;
        config.n_heads = shape.n_heads as u32;
        config.n_kv_heads = shape.n_kv_heads as u32;
        config.head_dim = head_dim as u32;
        config.ffn_dim = shape.ffn_dim as u32;
        config.vocab_size = vocab.len() as u32;
        config.context_length = shape.context_length as u32;
        config.rope_theta = 10000.0;
        // Qwen keeps Hugging Face's halves RoPE layout, as llama.cpp's converter does.
        config.rope_style = (shape.family != Family::Llama) as u32;
        config.rope_dim = head_dim as u32;
        config.norm_eps = 1e-5;
        config.tied_output = shape.tied_output as u32;
        let llama3_rope = shape.llama3.then(|| Llama3Params {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context_length: (shape.context_length as u32 / 2).max(1),
        });
        if shape.llama3 {
            config.rope_theta = 500000.0;
        }
        let rope_scaling = llama3_rope.map(|params| {
            params.scaling(config.rope_theta, config.rope_dim).expect("the synthetic llama3 parameters are valid")
        });

        let mut rng = SplitMix64(seed);
        let mut tensors = Vec::new();
        let matrix = |name: String, out: usize, inp: usize, rng: &mut SplitMix64| {
            let scale = 1.0 / (inp as f32).sqrt() * 1.7;
            let values = (0..out * inp).map(|_| rng.next_signed() * scale).collect();
            (name, vec![out, inp], values)
        };
        let norm = |name: String, n: usize, rng: &mut SplitMix64| {
            let values = (0..n).map(|_| 1.0 + 0.2 * rng.next_signed()).collect();
            (name, vec![n], values)
        };
        let dim = shape.dim;
        let n_vocab = vocab.len();
        let embedding = {
            let values = (0..n_vocab * dim).map(|_| rng.next_signed()).collect();
            ("token_embd.weight".to_string(), vec![n_vocab, dim], values)
        };
        tensors.push(embedding);
        if shape.family == Family::Gemma3 {
            config.rope_theta = 1_000_000.0;
        }
        let architecture = match shape.family {
            Family::Gemma3 => gemma3_block(&config),
            family => Architecture::plain(family, &config),
        };
        for layer in 0..config.n_layers {
            for (name, tensor_shape) in architecture.layer_tensors(&config, layer) {
                tensors.push(match tensor_shape[..] {
                    // Biases: small, of either sign.
                    [n] if name.ends_with(".bias") => {
                        (name, vec![n], (0..n).map(|_| 0.3 * rng.next_signed()).collect())
                    }
                    [n] => norm(name, n, &mut rng),
                    [rows, cols] => matrix(name, rows, cols, &mut rng),
                    _ => unreachable!("a block's tensors are vectors and matrices"),
                });
            }
        }
        tensors.push(norm("output_norm.weight".to_string(), dim, &mut rng));
        if !shape.tied_output {
            tensors.push(matrix("output.weight".to_string(), n_vocab, dim, &mut rng));
        }
        Self { config, vocab, tensors, llama3_rope, rope_scaling, architecture, source_tensors: Default::default() }
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<(&[usize], &[f32])> {
        self.tensors.iter().find(|t| t.0 == name).map(|t| (t.1.as_slice(), t.2.as_slice()))
    }
}

/// Gemma-3's block for a synthetic `config`: the embedding scaled by √dim,
/// queries by `1/√head_dim`, and every third layer global, the others
/// local with a window of a quarter of the context (so that a test runs
/// well past it) turning RoPE by Gemma's local base, 10000, beside the
/// global 1000000.
pub fn gemma3_block(config: &ModelConfig) -> Architecture {
    let local = Architecture::gemma3_pattern(config.n_layers, GEMMA3_PATTERN);
    let window = (config.context_length / 4).max(1);
    Architecture::gemma3(config, 1.0 / (config.head_dim as f32).sqrt(), window, 10000.0, &local)
}

/// Synthetic Gemma-3 models' period of layers: two local, then a global one.
pub const GEMMA3_PATTERN: usize = 3;

impl crate::source::ModelSource for SyntheticModel {
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
        None
    }
    fn tensors(&self) -> &[crate::source::SourceTensor] {
        self.source_tensors.get_or_init(|| {
            self.tensors
                .iter()
                .map(|(name, shape, _)| crate::source::SourceTensor {
                    name: name.clone(),
                    shape: shape.clone(),
                    source_type: "F32".to_string(),
                    native: None,
                })
                .collect()
        })
    }
    fn read_rows(&self, index: usize, first_row: usize, out: &mut [f32]) -> anyhow::Result<()> {
        let (name, shape, values) = &self.tensors[index];
        let cols = *shape.last().unwrap();
        let start = first_row * cols;
        let source = values
            .get(start..start + out.len())
            .ok_or_else(|| anyhow::anyhow!("synthetic tensor {name}: rows out of range"))?;
        out.copy_from_slice(source);
        Ok(())
    }
    fn native_bytes(&self, _index: usize) -> Option<&[u8]> {
        None
    }
    fn describe(&self) -> String {
        format!("synthetic model (dim {}, {} layers)", self.config.dim, self.config.n_layers)
    }
}
