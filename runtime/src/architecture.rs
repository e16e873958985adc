//! Block variants: the small, named differences from the Llama block that
//! Qwen2/Qwen2.5, Qwen3 and Gemma-3 make, and the image's `architecture`
//! section that records them (layout in `models/FORMAT.md`).
//!
//! A Llama image has no such section and runs the Llama block. Any other
//! family's image carries it, written *required*, so a reader from before it
//! refuses the file by the section's name instead of running the wrong maths.
//! The forward pass asks the [`Architecture`] one question per step (is there
//! a bias? a q/k norm? which activation?); it is never a second copy of the
//! forward pass.
//!
//! What the section does not need to say:
//! - Gemma's RMSNorm multiplies by `(1 + w)`; converters store `1 + w`
//!   (llama.cpp's GGUF converter already does), so the runtime's RMSNorm is
//!   unchanged.
//! - RoPE's pairing (Qwen and Gemma rotate halves) is the config's `rope_style`.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use bytemuck::{Pod, Zeroable};

/// The section's name.
pub const SECTION: &str = "architecture";
/// The section version this code reads and writes.
pub const VERSION: u32 = 1;

/// The model family an image's block comes from: its name for messages and
/// the chat template it defaults to. The maths is in the [`Features`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama-2 / Llama-3.x (and SmolLM2, TinyLlama, …): no section.
    Llama,
    /// Qwen2 / Qwen2.5: biases on q, k and v.
    Qwen2,
    /// Qwen3: an RMSNorm over each query and key head before RoPE.
    Qwen3,
    /// Gemma-3: GELU-tanh gate, √dim embedding scale, norms after attention
    /// and the FFN, q/k norms, a configured query scale, sliding-window layers.
    Gemma3,
}

impl Family {
    /// Every family, in id order.
    pub const ALL: [Family; 4] = [Family::Llama, Family::Qwen2, Family::Qwen3, Family::Gemma3];

    /// The number stored in the section.
    pub fn id(self) -> u32 {
        match self {
            Family::Llama => 1,
            Family::Qwen2 => 2,
            Family::Qwen3 => 3,
            Family::Gemma3 => 4,
        }
    }
    /// The family numbered `id`, if this reader knows it.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.id() == id)
    }
    /// The name GGUF's `general.architecture` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3",
        }
    }
    /// The family GGUF calls `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }
    /// The block differences this family makes.
    pub fn features(self) -> Features {
        match self {
            Family::Llama => Features::NONE,
            Family::Qwen2 => Features::QKV_BIAS,
            Family::Qwen3 => Features::QK_NORM,
            Family::Gemma3 => Features(Features::QK_NORM.0 | Features::GELU_TANH.0 | Features::POST_NORMS.0),
        }
    }
}

/// The block differences, as bits: each names the tensors it adds and the
/// step of the forward pass it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features(pub u32);

impl Features {
    /// The Llama block.
    pub const NONE: Features = Features(0);
    /// `blk.N.attn_{q,k,v}.bias`: added to the q, k and v projections.
    pub const QKV_BIAS: Features = Features(1);
    /// `blk.N.attn_{q,k}_norm.weight` (`head_dim`): an RMSNorm of each
    /// query and key head, before RoPE.
    pub const QK_NORM: Features = Features(2);
    /// The FFN gate is GELU (tanh approximation) instead of SiLU: GeGLU.
    pub const GELU_TANH: Features = Features(4);
    /// `blk.N.post_attention_norm.weight`, `blk.N.post_ffw_norm.weight`
    /// (`dim`): an RMSNorm of the attention's and the FFN's output before
    /// each joins the residual stream.
    pub const POST_NORMS: Features = Features(8);
    /// Every bit this reader knows, with its name.
    const NAMED: [(Features, &'static str); 4] = [
        (Features::QKV_BIAS, "qkv_bias"),
        (Features::QK_NORM, "qk_norm"),
        (Features::GELU_TANH, "gelu_tanh"),
        (Features::POST_NORMS, "post_norms"),
    ];

    /// Whether every bit of `other` is set.
    pub fn has(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
    /// The names of the bits set, for `inspect` and messages.
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMED.iter().filter(|(f, _)| self.has(*f)).map(|&(_, name)| name).collect()
    }
    fn unknown_bits(self) -> u32 {
        self.0 & !Self::NAMED.iter().fold(0, |all, (f, _)| all | f.0)
    }
}

/// How one layer attends: its window and its RoPE base. 8 bytes, one a
/// layer after the section's header.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct LayerAttention {
    /// 0: every earlier position (a global layer). Otherwise the positions a
    /// token sees: itself and the `window − 1` before it (a local,
    /// sliding-window layer).
    pub window: u32,
    /// RoPE base of this layer. The `rope_scaling` section's factors apply
    /// to global layers only (local layers run plain RoPE, as Gemma-3's
    /// local rotary embedding does).
    pub rope_theta: f32,
}

impl LayerAttention {
    /// Whether the layer sees only a window of positions.
    pub fn is_local(&self) -> bool {
        self.window != 0
    }
}

/// [`Architecture::local_rope_theta`] of a block whose layers are `layers`
/// (none when empty: every layer global).
pub fn local_rope_theta(layers: &[LayerAttention]) -> Option<f32> {
    let local = layers.iter().find(|l| l.is_local())?;
    let global = layers.iter().find(|l| !l.is_local()).map(|l| l.rope_theta);
    (global != Some(local.rope_theta)).then_some(local.rope_theta)
}

/// The fixed part of the `architecture` section; `n_layers` [`LayerAttention`] follow it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct ArchitectureHeader {
    /// [`VERSION`].
    pub version: u32,
    /// [`Family::id`].
    pub family: u32,
    /// [`Features`] bits.
    pub features: u32,
    /// The config's `n_layers`.
    pub n_layers: u32,
    /// Multiplies each token's embedding as it enters the residual stream
    /// (Gemma: √dim; 1 otherwise).
    pub embedding_scale: f32,
    /// Multiplies attention scores (`1/√head_dim` for Llama; Gemma-3:
    /// `query_pre_attn_scalar^(−½)`).
    pub attention_scale: f32,
    /// Zero.
    pub reserved: [u32; 10],
}
const _: () = assert!(std::mem::size_of::<ArchitectureHeader>() == 64);

/// A model's block: its family, features and per-layer attention.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    /// Where it comes from.
    pub family: Family,
    /// The block's differences from Llama's.
    pub features: Features,
    /// Multiplies each token's embedding.
    pub embedding_scale: f32,
    /// Multiplies attention scores.
    pub attention_scale: f32,
    /// One a layer.
    pub layers: Vec<LayerAttention>,
}

impl Architecture {
    /// The Llama block of `config`: what an image without the section runs.
    pub fn llama(config: &ModelConfig) -> Self {
        Self::plain(Family::Llama, config)
    }

    /// `family`'s block for `config` with Llama's defaults for the numbers:
    /// no embedding scale, `1/√head_dim`, every layer global at the config's
    /// RoPE base. Converters then set what the family changes.
    pub fn plain(family: Family, config: &ModelConfig) -> Self {
        Self {
            family,
            features: family.features(),
            embedding_scale: 1.0,
            attention_scale: 1.0 / (config.head_dim as f32).sqrt(),
            layers: vec![LayerAttention { window: 0, rope_theta: config.rope_theta }; config.n_layers as usize],
        }
    }

    /// Gemma-3's block for `config`: the embedding scaled by √dim (in f32,
    /// as llama.cpp does), scores by `attention_scale`, and the layers
    /// `local` marks attending through `window` positions at RoPE base
    /// `local_theta` (the others global).
    pub fn gemma3(config: &ModelConfig, attention_scale: f32, window: u32, local_theta: f32, local: &[bool]) -> Self {
        let mut architecture = Self::plain(Family::Gemma3, config);
        architecture.embedding_scale = (config.dim as f32).sqrt();
        architecture.attention_scale = attention_scale;
        for (layer, &is_local) in architecture.layers.iter_mut().zip(local) {
            if is_local && window > 0 {
                *layer = LayerAttention { window, rope_theta: local_theta };
            }
        }
        architecture
    }

    /// Which of `n_layers` layers are local in Gemma's pattern of `period`:
    /// each period's last layer is global, the others local (every layer
    /// local for a period of 0, as llama.cpp reads it).
    pub fn gemma3_pattern(n_layers: u32, period: usize) -> Vec<bool> {
        (0..n_layers as usize).map(|l| period == 0 || l % period < period - 1).collect()
    }

    /// Whether the image needs the section: anything but the plain Llama block.
    pub fn needs_section(&self, config: &ModelConfig) -> bool {
        *self != Self::llama(config)
    }

    /// Whether the block has `feature`.
    pub fn has(&self, feature: Features) -> bool {
        self.features.has(feature)
    }

    /// The RoPE base of the local layers when it differs from the global
    /// one (they then get tables of their own); `None` otherwise. Local
    /// layers share one base ([`Architecture::check`]).
    pub fn local_rope_theta(&self) -> Option<f32> {
        local_rope_theta(&self.layers)
    }

    /// Whether any layer attends through a window.
    pub fn has_local_layers(&self) -> bool {
        self.layers.iter().any(LayerAttention::is_local)
    }

    /// Every tensor of layer `layer`, `(name, shape)` in GGUF order, shapes
    /// outermost first.
    pub fn layer_tensors(&self, config: &ModelConfig, layer: u32) -> Vec<(String, Vec<usize>)> {
        let name = |part: &str| format!("blk.{layer}.{part}");
        self.layer_parts(config).into_iter().map(|(part, shape)| (name(part), shape)).collect()
    }

    /// The per-layer tensor names after `blk.N.` with their shapes, in GGUF order.
    pub fn layer_parts(&self, config: &ModelConfig) -> Vec<(&'static str, Vec<usize>)> {
        let dim = config.dim as usize;
        let (q_dim, kv_dim, ffn) = (config.q_dim(), config.kv_dim(), config.ffn_dim as usize);
        let head_dim = config.head_dim as usize;
        let mut parts = vec![("attn_norm.weight", vec![dim]), ("attn_q.weight", vec![q_dim, dim])];
        if self.has(Features::QKV_BIAS) {
            parts.push(("attn_q.bias", vec![q_dim]));
        }
        parts.push(("attn_k.weight", vec![kv_dim, dim]));
        if self.has(Features::QKV_BIAS) {
            parts.push(("attn_k.bias", vec![kv_dim]));
        }
        parts.push(("attn_v.weight", vec![kv_dim, dim]));
        if self.has(Features::QKV_BIAS) {
            parts.push(("attn_v.bias", vec![kv_dim]));
        }
        if self.has(Features::QK_NORM) {
            parts.push(("attn_q_norm.weight", vec![head_dim]));
            parts.push(("attn_k_norm.weight", vec![head_dim]));
        }
        parts.push(("attn_output.weight", vec![dim, q_dim]));
        if self.has(Features::POST_NORMS) {
            parts.push(("post_attention_norm.weight", vec![dim]));
        }
        parts.push(("ffn_norm.weight", vec![dim]));
        parts.push(("ffn_gate.weight", vec![ffn, dim]));
        parts.push(("ffn_up.weight", vec![ffn, dim]));
        parts.push(("ffn_down.weight", vec![dim, ffn]));
        if self.has(Features::POST_NORMS) {
            parts.push(("post_ffw_norm.weight", vec![dim]));
        }
        parts
    }

    /// Every tensor of a model of `config` with this block, `(name, shape)`
    /// in GGUF order.
    pub fn tensors(&self, config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let dim = config.dim as usize;
        let vocab = config.vocab_size as usize;
        let mut list = vec![("token_embd.weight".to_string(), vec![vocab, dim])];
        for layer in 0..config.n_layers {
            list.extend(self.layer_tensors(config, layer));
        }
        list.push(("output_norm.weight".to_string(), vec![dim]));
        if config.tied_output == 0 {
            list.push(("output.weight".to_string(), vec![vocab, dim]));
        }
        list
    }

    /// The shape a model of `config` with this block has for tensor `name`
    /// (`None`: it has no such tensor). Only the canonical spelling of a
    /// layer number counts: `blk.01` is not layer 1.
    pub fn tensor_shape(&self, config: &ModelConfig, name: &str) -> Option<Vec<usize>> {
        let (dim, vocab) = (config.dim as usize, config.vocab_size as usize);
        match name {
            "token_embd.weight" => return Some(vec![vocab, dim]),
            "output_norm.weight" => return Some(vec![dim]),
            "output.weight" => return (config.tied_output == 0).then(|| vec![vocab, dim]),
            _ => {}
        }
        let (layer, part) = name.strip_prefix("blk.")?.split_once('.')?;
        let number: u32 = layer.parse().ok()?;
        if number >= config.n_layers || number.to_string() != layer {
            return None;
        }
        self.layer_parts(config).into_iter().find(|(p, _)| *p == part).map(|(_, shape)| shape)
    }

    /// Checks the block against `config`: one layer entry a layer, finite
    /// positive scales and RoPE bases, and windows only below the context.
    pub fn check(&self, config: &ModelConfig) -> Result<()> {
        let bad = |what: String| Err(Error::corrupt(format!("section {SECTION}: {what}")));
        if self.layers.len() != config.n_layers as usize {
            return bad(format!("{} layer entries for a model of {} layers", self.layers.len(), config.n_layers));
        }
        for (name, value) in [("embedding_scale", self.embedding_scale), ("attention_scale", self.attention_scale)] {
            if !(value.is_finite() && value > 0.0) {
                return bad(format!("{name} {value} is not a positive number"));
            }
        }
        for (l, layer) in self.layers.iter().enumerate() {
            if !(layer.rope_theta.is_finite() && layer.rope_theta > 0.0) {
                return bad(format!("layer {l}: rope_theta {} is not a positive number", layer.rope_theta));
            }
            if layer.window > crate::config::MAX_FIELD {
                return bad(format!("layer {l}: window {} is out of range", layer.window));
            }
        }
        if let Some(global) = self.layers.iter().find(|l| !l.is_local()) {
            if global.rope_theta != config.rope_theta {
                return bad(format!(
                    "global layers turn RoPE by {}, but the config's base is {}",
                    global.rope_theta, config.rope_theta
                ));
            }
        }
        // One table of angles for the global layers and one for the local ones.
        let theta_of = |local: bool| self.layers.iter().filter(move |l| l.is_local() == local).map(|l| l.rope_theta);
        for (local, kind) in [(false, "global"), (true, "local")] {
            if let Some(first) = theta_of(local).next() {
                if let Some(other) = theta_of(local).find(|&t| t != first) {
                    return Err(Error::unsupported(format!(
                        "section {SECTION}: {kind} layers turn RoPE by two bases ({first} and {other}); \
                         this reader supports one for each kind of layer"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Reads an `architecture` section for a model of `config`, refusing an
    /// unknown version, family or feature bit by its number.
    pub fn from_section(bytes: &[u8], config: &ModelConfig) -> Result<Self> {
        let fail = |what: String| Error::corrupt(format!("section {SECTION}: {what}"));
        let header_size = std::mem::size_of::<ArchitectureHeader>();
        if bytes.len() < header_size {
            return Err(fail(format!("{} bytes is too short for its {header_size}-byte header", bytes.len())));
        }
        let header: ArchitectureHeader = bytemuck::pod_read_unaligned(&bytes[..header_size]);
        let upgrade = |what: String| Error::unsupported(format!("section {SECTION}: {what}; upgrade Bramble"));
        if header.version != VERSION {
            return Err(upgrade(format!("version {} is unknown to this reader (it knows {VERSION})", header.version)));
        }
        let family = Family::from_id(header.family).ok_or_else(|| {
            let known: Vec<String> = Family::ALL.iter().map(|f| format!("{} {}", f.id(), f.name())).collect();
            upgrade(format!("family {} is unknown to this reader (it knows {})", header.family, known.join(", ")))
        })?;
        let features = Features(header.features);
        let unknown = features.unknown_bits();
        if unknown != 0 {
            let bits: Vec<String> = (0..32).filter(|b| unknown & (1 << b) != 0).map(|b| b.to_string()).collect();
            return Err(upgrade(format!("feature bit {} is unknown to this reader", bits.join(", "))));
        }
        if header.n_layers != config.n_layers {
            return Err(fail(format!("{} layers, but the config has {}", header.n_layers, config.n_layers)));
        }
        let entry = std::mem::size_of::<LayerAttention>();
        let expected = header_size + entry * header.n_layers as usize;
        if bytes.len() != expected {
            return Err(fail(format!("{} bytes, but {} layers take {expected}", bytes.len(), header.n_layers)));
        }
        let layers =
            bytes[header_size..].chunks_exact(entry).map(bytemuck::pod_read_unaligned::<LayerAttention>).collect();
        let architecture = Self {
            family,
            features,
            embedding_scale: header.embedding_scale,
            attention_scale: header.attention_scale,
            layers,
        };
        architecture.check(config)?;
        Ok(architecture)
    }

    /// The section's bytes.
    pub fn to_section(&self) -> Vec<u8> {
        let header = ArchitectureHeader {
            version: VERSION,
            family: self.family.id(),
            features: self.features.0,
            n_layers: self.layers.len() as u32,
            embedding_scale: self.embedding_scale,
            attention_scale: self.attention_scale,
            reserved: [0; 10],
        };
        let mut bytes = bytemuck::bytes_of(&header).to_vec();
        for layer in &self.layers {
            bytes.extend_from_slice(bytemuck::bytes_of(layer));
        }
        bytes
    }

    /// One line for `inspect`: the family, its features, the scales that
    /// differ from Llama's, and the windows.
    pub fn describe(&self, config: &ModelConfig) -> String {
        let mut parts = vec![self.family.name().to_string()];
        let features = self.features.names();
        if !features.is_empty() {
            parts.push(features.join("+"));
        }
        if self.embedding_scale != 1.0 {
            parts.push(format!("embedding × {}", self.embedding_scale));
        }
        if self.attention_scale != Self::plain(self.family, config).attention_scale {
            parts.push(format!("attention scale {}", self.attention_scale));
        }
        let local: Vec<&LayerAttention> = self.layers.iter().filter(|l| l.is_local()).collect();
        if let Some(first) = local.first() {
            parts.push(format!(
                "{} of {} layers local (window {}, RoPE base {})",
                local.len(),
                self.layers.len(),
                first.window,
                first.rope_theta
            ));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ARCH_LLAMA;
    use crate::error::ErrorKind;

    fn config() -> ModelConfig {
        let mut c = ModelConfig::zeroed();
        c.arch = ARCH_LLAMA;
        (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) = (64, 3, 4, 2, 16, 160);
        (c.vocab_size, c.context_length, c.rope_theta, c.rope_dim, c.norm_eps) = (300, 128, 1e6, 16, 1e-6);
        c
    }

    fn gemma(config: &ModelConfig) -> Architecture {
        let mut a = Architecture::plain(Family::Gemma3, config);
        a.embedding_scale = (config.dim as f32).sqrt();
        a.attention_scale = 0.125;
        a.layers[0] = LayerAttention { window: 8, rope_theta: 10000.0 };
        a
    }

    #[test]
    fn the_section_round_trips_and_llama_needs_none() {
        let c = config();
        assert!(!Architecture::llama(&c).needs_section(&c));
        for family in [Family::Qwen2, Family::Qwen3] {
            let a = Architecture::plain(family, &c);
            assert!(a.needs_section(&c));
            assert_eq!(Architecture::from_section(&a.to_section(), &c).unwrap(), a);
        }
        let g = gemma(&c);
        assert_eq!(Architecture::from_section(&g.to_section(), &c).unwrap(), g);
        assert!(g.has_local_layers());
        assert_eq!(
            g.describe(&c),
            "gemma3, qk_norm+gelu_tanh+post_norms, embedding × 8, attention scale 0.125, \
             1 of 3 layers local (window 8, RoPE base 10000)"
        );
    }

    #[test]
    fn unknown_versions_families_and_features_are_refused_by_number() {
        let c = config();
        let bytes = Architecture::plain(Family::Qwen3, &c).to_section();
        let patched = |offset: usize, value: u32| {
            let mut b = bytes.clone();
            b[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
            Architecture::from_section(&b, &c).unwrap_err()
        };
        let e = patched(0, 2);
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.message().contains("version 2 is unknown"), "{e}");
        let e = patched(4, 9);
        assert!(e.message().contains("family 9 is unknown") && e.message().contains("4 gemma3"), "{e}");
        let e = patched(8, 2 | 64);
        assert!(e.message().contains("feature bit 6 is unknown"), "{e}");
        let e = patched(12, 4);
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.message().contains("4 layers, but the config has 3"), "{e}");
        let e = Architecture::from_section(&bytes[..bytes.len() - 1], &c).unwrap_err();
        assert!(e.message().contains("but 3 layers take"), "{e}");
        let e = patched(64 + 4, f32::NAN.to_bits());
        assert!(e.message().contains("layer 0: rope_theta NaN"), "{e}");
        let e = patched(20, 0);
        assert!(e.message().contains("attention_scale 0 is not a positive number"), "{e}");
    }

    #[test]
    fn each_family_names_its_tensors_in_gguf_order() {
        let c = config();
        let parts = |family: Family| -> Vec<&str> {
            Architecture::plain(family, &c).layer_parts(&c).into_iter().map(|(p, _)| p).collect()
        };
        assert_eq!(parts(Family::Llama).len(), 9);
        assert_eq!(
            parts(Family::Qwen2)[1..7],
            ["attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias", "attn_v.weight", "attn_v.bias"]
        );
        assert!(parts(Family::Qwen3).contains(&"attn_k_norm.weight"));
        assert_eq!(parts(Family::Gemma3).len(), 13);
        let q3 = Architecture::plain(Family::Qwen3, &c);
        assert_eq!(q3.tensor_shape(&c, "blk.2.attn_q_norm.weight"), Some(vec![16]));
        assert_eq!(q3.tensor_shape(&c, "blk.02.attn_q_norm.weight"), None);
        assert_eq!(q3.tensor_shape(&c, "blk.3.attn_q_norm.weight"), None);
        assert_eq!(q3.tensor_shape(&c, "blk.0.attn_q.bias"), None);
        assert_eq!(q3.tensors(&c).len(), 1 + 3 * 11 + 2);
    }
}
