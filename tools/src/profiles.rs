//! Raspberry Pi board profiles and the memory budget a model must fit.
//!
//! A profile records what `bramble flash` and `bramble deploy` need to know
//! about a board: its cores (the daemon's `threads`), its memory, the CPU
//! feature the runtime's kernels are expected to find there, the serial
//! device the console uses and the `config.txt` lines that put the PL011 UART
//! on GPIO 14/15. [`MemoryPlan`] is the arithmetic that decides whether a
//! model fits: weights (the image, memory-mapped) + KV cache + run buffers +
//! OS headroom ≤ the board's memory. It is a pure function of the model's
//! shape and the KV cache's mode (f32, or quantized: `bramble_runtime::kv`),
//! which `bramble plan` prints.
//!
//! The runtime chooses its kernels at load by CPU feature detection (see
//! `bramble_runtime::kernels`), so a profile does not select kernels; it
//! states which ones the board will run (`expected_kernels`), for the plan and
//! the docs (`docs/flash.md`).

use bramble_runtime::architecture::{Architecture, LayerAttention};
use bramble_runtime::kv::{KvCache, KvMode};
use bramble_runtime::model::StateOptions;
use bramble_runtime::session::DEFAULT_BATCH;
use bramble_runtime::{ModelConfig, ModelImage, RunState};
use std::fmt;

const GIB: f64 = (1u64 << 30) as f64;
const MIB: u64 = 1 << 20;

/// One Raspberry Pi board, with one memory size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoardProfile {
    /// The name as given on the command line (`pi4`, `pi4-8gb`, `pi-zero-2w`).
    pub name: String,
    /// The board family (`pi4`, `pi5`, `pi-zero-2w`).
    pub family: &'static str,
    /// What the board is, for messages.
    pub description: &'static str,
    /// The CPU core (`cortex-a72`), also the `QEMU_CPU` that emulates it.
    pub cpu: &'static str,
    /// CPU cores: the daemon's `threads`.
    pub cores: usize,
    /// Installed memory, bytes.
    pub memory_bytes: u64,
    /// Memory sizes the board is sold with, bytes (the `--memory` choices).
    pub memory_variants: &'static [u64],
    /// Memory the OS, the GPU carve-out and the page cache's working set keep, bytes.
    pub os_headroom_bytes: u64,
    /// The kernels the runtime's feature detection picks on this CPU.
    pub expected_kernels: &'static str,
    /// The CPU feature those kernels need beyond ARMv8.0 NEON, if any.
    pub required_feature: Option<&'static str>,
    /// The serial device of the console (`uart.device` in `brambled.toml`).
    pub uart_device: &'static str,
    /// The kernel's name of the UART behind `uart_device` (its getty is masked).
    pub uart_kernel_name: &'static str,
    /// `config.txt` lines (under `[all]`) that put the PL011 UART on GPIO 14/15.
    pub config_txt_lines: &'static [&'static str],
    /// Services masked so they do not take the UART (Bluetooth's modem setup).
    pub masked_services: &'static [&'static str],
}

/// The families, their default (smallest) memory and the rest of the profile.
struct Family {
    name: &'static str,
    description: &'static str,
    cpu: &'static str,
    cores: usize,
    memory_variants: &'static [u64],
    os_headroom_bytes: u64,
    expected_kernels: &'static str,
    required_feature: Option<&'static str>,
    uart_device: &'static str,
    uart_kernel_name: &'static str,
    config_txt_lines: &'static [&'static str],
    masked_services: &'static [&'static str],
}

const GB: u64 = 1 << 30;

const FAMILIES: [Family; 3] = [
    Family {
        name: "pi4",
        description: "Raspberry Pi 4 Model B (BCM2711, 4 × Cortex-A72, ARMv8.0)",
        cpu: "cortex-a72",
        cores: 4,
        memory_variants: &[GB, 2 * GB, 4 * GB, 8 * GB],
        os_headroom_bytes: 256 * MIB,
        expected_kernels: "neon (ARMv8.0: no dotprod)",
        required_feature: None,
        // With disable-bt the PL011 (ttyAMA0) is the primary UART on GPIO 14/15 and serial0 points to it.
        uart_device: "/dev/serial0",
        uart_kernel_name: "ttyAMA0",
        config_txt_lines: &["enable_uart=1", "dtoverlay=disable-bt"],
        masked_services: &["hciuart.service"],
    },
    Family {
        name: "pi5",
        description: "Raspberry Pi 5 (BCM2712, 4 × Cortex-A76, ARMv8.2 with dotprod)",
        cpu: "cortex-a76",
        cores: 4,
        memory_variants: &[2 * GB, 4 * GB, 8 * GB, 16 * GB],
        os_headroom_bytes: 256 * MIB,
        expected_kernels: "neon+dotprod",
        required_feature: Some("dotprod"),
        // The Pi 5's Bluetooth has its own UART; GPIO 14/15 is UART0 (ttyAMA0), enabled by
        // `dtparam=uart0=on`. serial0 is the 3-pin debug connector (ttyAMA10), so name ttyAMA0.
        uart_device: "/dev/ttyAMA0",
        uart_kernel_name: "ttyAMA0",
        config_txt_lines: &["dtparam=uart0=on"],
        masked_services: &[],
    },
    Family {
        name: "pi-zero-2w",
        description: "Raspberry Pi Zero 2 W (RP3A0, 4 × Cortex-A53, ARMv8.0, 512 MB)",
        cpu: "cortex-a53",
        cores: 4,
        memory_variants: &[512 * MIB],
        // 64 MiB GPU carve-out plus a Lite OS's ~100 MiB.
        os_headroom_bytes: 160 * MIB,
        expected_kernels: "neon (ARMv8.0: no dotprod)",
        required_feature: None,
        uart_device: "/dev/serial0",
        uart_kernel_name: "ttyAMA0",
        config_txt_lines: &["enable_uart=1", "dtoverlay=disable-bt"],
        masked_services: &["hciuart.service"],
    },
];

/// The profile names `--profile` takes, for messages.
pub fn profile_names() -> String {
    let mut names = Vec::new();
    for family in &FAMILIES {
        names.push(family.name.to_string());
        if family.memory_variants.len() > 1 {
            for &memory in family.memory_variants {
                names.push(format!("{}-{}", family.name, memory_name(memory)));
            }
        }
    }
    names.join(", ")
}

/// `1gb`, `512mb`.
fn memory_name(bytes: u64) -> String {
    if bytes >= GB {
        format!("{}gb", bytes / GB)
    } else {
        format!("{}mb", bytes / MIB)
    }
}

/// Parses a memory size: `4G`, `4GB`, `4gib`, `512M`, `512MB`.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let digits_end = lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len());
    let (number, unit) = lower.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| format!("memory {text:?} is not a size such as 4G or 512M"))?;
    let scale = match unit {
        "g" | "gb" | "gib" => GB,
        "m" | "mb" | "mib" => MIB,
        _ => return Err(format!("memory {text:?} is not a size such as 4G or 512M")),
    };
    Ok(number * scale)
}

/// The profile `name` (`pi4`, `pi4-8gb`, `pi5`, `pi-zero-2w`), with the
/// memory `memory` (`--memory 8G`) if given. A family name alone means its
/// smallest memory, so a model that fits it fits every board of the family.
pub fn profile(name: &str, memory: Option<&str>) -> Result<BoardProfile, String> {
    let lower = name.trim().to_ascii_lowercase();
    let (family, named_memory) = FAMILIES
        .iter()
        .find_map(|family| {
            if lower == family.name {
                return Some((family, None));
            }
            let size = lower.strip_prefix(family.name)?.strip_prefix('-')?;
            Some((family, Some(size.to_string())))
        })
        .ok_or_else(|| format!("unknown board profile {name:?}; the profiles are {}", profile_names()))?;
    let memory_bytes = match (named_memory.as_deref(), memory) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "profile {name:?} already names a memory size; give --memory only with {}",
                family.name
            ))
        }
        (Some(size), None) | (None, Some(size)) => parse_memory(size).map_err(|e| format!("profile {name:?}: {e}"))?,
        (None, None) => family.memory_variants[0],
    };
    if !family.memory_variants.contains(&memory_bytes) {
        let sizes: Vec<String> = family.memory_variants.iter().map(|&m| memory_name(m)).collect();
        return Err(format!(
            "{} is sold with {} of memory, not {}",
            family.description,
            sizes.join(", "),
            memory_name(memory_bytes)
        ));
    }
    Ok(BoardProfile {
        name: lower,
        family: family.name,
        description: family.description,
        cpu: family.cpu,
        cores: family.cores,
        memory_bytes,
        memory_variants: family.memory_variants,
        os_headroom_bytes: family.os_headroom_bytes,
        expected_kernels: family.expected_kernels,
        required_feature: family.required_feature,
        uart_device: family.uart_device,
        uart_kernel_name: family.uart_kernel_name,
        config_txt_lines: family.config_txt_lines,
        masked_services: family.masked_services,
    })
}

/// What the memory budget needs of a model: its hyperparameters, its block and the size of its image.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFootprint {
    /// The image's hyperparameters.
    pub config: ModelConfig,
    /// The image's block: its sliding-window layers keep shorter KV caches,
    /// and a local RoPE base of their own adds tables.
    pub architecture: Architecture,
    /// The image file's size, bytes: all of it is mapped and read.
    pub image_bytes: u64,
    /// Whether the image carries an R-Sparse plan (its run buffers are larger).
    pub sparse: bool,
}

impl ModelFootprint {
    /// The footprint of `image`, whose file holds `image_bytes`: an image
    /// with an R-Sparse section runs with that plan, and so with its scratch.
    pub fn of(image: &ModelImage, image_bytes: u64) -> Self {
        Self {
            config: *image.config(),
            architecture: image.architecture().clone(),
            image_bytes,
            sparse: image.section(bramble_runtime::rsparse::SECTION).is_some(),
        }
    }
}

/// The memory a model takes on a board, term by term.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// The profile's name.
    pub board: String,
    /// KV-cache positions actually allocated (the configured context, at most the model's).
    pub context: usize,
    /// The mapped image.
    pub weight_bytes: u64,
    /// How the KV cache is stored.
    pub kv: KvMode,
    /// Keys and values: `layers × 2 × context × kv_dim × 4` at f32 (× 2 at f16); codes,
    /// scales and the f32 window when quantized; a sliding-window layer's
    /// window rather than the context (`KvCache::bytes_for`).
    pub kv_cache_bytes: u64,
    /// The rest of the run state (activations, logits, RoPE tables, batch scratch).
    pub buffer_bytes: u64,
    /// The profile's headroom for the OS.
    pub os_headroom_bytes: u64,
    /// The board's memory.
    pub memory_bytes: u64,
}

impl MemoryPlan {
    /// Every term added up.
    pub fn total_bytes(&self) -> u64 {
        // Saturating: an overflowing KV cache counts as u64::MAX, and must not wrap to a size that fits.
        self.weight_bytes
            .saturating_add(self.kv_cache_bytes)
            .saturating_add(self.buffer_bytes)
            .saturating_add(self.os_headroom_bytes)
    }

    /// Whether the model fits the board.
    pub fn fits(&self) -> bool {
        self.total_bytes() <= self.memory_bytes
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = |bytes: u64| bytes as f64 / GIB;
        write!(
            f,
            "model needs {:.2} GiB weights + {:.2} GiB KV cache (ctx {}{}) + {:.2} GiB buffers + {:.2} GiB OS headroom = {:.2} GiB {} {:.2} GiB on {}",
            gib(self.weight_bytes),
            gib(self.kv_cache_bytes),
            self.context,
            if self.kv == KvMode::F32 { String::new() } else { format!(", kv {}", self.kv) },
            gib(self.buffer_bytes),
            gib(self.os_headroom_bytes),
            gib(self.total_bytes()),
            if self.fits() { "<=" } else { ">" },
            gib(self.memory_bytes),
            self.board
        )
    }
}

/// Bytes of the KV cache for `context` positions stored as `kv`, of a model
/// whose layers attend as `layers` say (as the runtime's `KvCache::new`
/// allocates them); `u64::MAX`, which fits no board, when the size overflows.
pub fn kv_cache_bytes(config: &ModelConfig, layers: &[LayerAttention], context: usize, kv: KvMode) -> u64 {
    KvCache::bytes_for(kv, config, context, layers).map_or(u64::MAX, |bytes| bytes as u64)
}

/// Bytes of the run state other than the KV cache, for `context` positions
/// and prompt batches of `batch` tokens of a model with this block: what
/// `RunState::bytes_for` counts (the buffers `RunState::new` allocates, the
/// R-Sparse scratch when `sparse`, local RoPE tables) less the KV cache's
/// share; `u64::MAX`, which fits no board, when the size overflows.
pub fn buffer_bytes(
    config: &ModelConfig,
    architecture: &Architecture,
    context: usize,
    batch: usize,
    kv: KvMode,
    sparse: bool,
) -> u64 {
    let options = StateOptions::for_architecture(architecture, kv, sparse);
    match RunState::bytes_for(config, context, batch, options) {
        Ok(state) => (state as u64).saturating_sub(kv_cache_bytes(config, &architecture.layers, context, kv)),
        Err(_) => u64::MAX,
    }
}

/// The memory plan of `model` on `board` with a KV cache of `context`
/// positions (at most the model's own context, as the daemon allocates it),
/// prompt batches as the daemon's sessions run them; an f32 KV cache.
pub fn memory_plan(model: &ModelFootprint, context: usize, board: &BoardProfile) -> MemoryPlan {
    memory_plan_with_kv(model, context, board, KvMode::F32)
}

/// As [`memory_plan`] with the KV cache stored as `kv`.
pub fn memory_plan_with_kv(model: &ModelFootprint, context: usize, board: &BoardProfile, kv: KvMode) -> MemoryPlan {
    let context = context.min(model.config.context_length as usize).max(2);
    MemoryPlan {
        board: board.name.clone(),
        context,
        weight_bytes: model.image_bytes,
        kv,
        kv_cache_bytes: kv_cache_bytes(&model.config, &model.architecture.layers, context, kv),
        buffer_bytes: buffer_bytes(&model.config, &model.architecture, context, DEFAULT_BATCH, kv, model.sparse),
        os_headroom_bytes: board.os_headroom_bytes,
        memory_bytes: board.memory_bytes,
    }
}

/// The architecture an ELF file was built for, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfArchitecture {
    /// `e_ident[EI_CLASS]`: 1 for 32-bit, 2 for 64-bit.
    pub class: u8,
    /// `e_ident[EI_DATA]`: 1 for little-endian, 2 for big-endian.
    pub data: u8,
    /// `e_machine`.
    pub machine: u16,
}

/// `e_machine` of AArch64.
pub const EM_AARCH64: u16 = 183;

impl ElfArchitecture {
    /// Reads the header of an ELF file (its first 20 bytes suffice).
    pub fn read(header: &[u8]) -> Result<Self, String> {
        if header.len() < 20 || header[..4] != [0x7f, b'E', b'L', b'F'] {
            return Err("not an ELF executable (no \\x7fELF magic)".to_string());
        }
        let (class, data) = (header[4], header[5]);
        let bytes = [header[18], header[19]];
        let machine = if data == 2 { u16::from_be_bytes(bytes) } else { u16::from_le_bytes(bytes) };
        Ok(Self { class, data, machine })
    }

    /// The architecture's name.
    pub fn name(&self) -> String {
        let bits = if self.class == 2 { "64-bit" } else { "32-bit" };
        let machine = match self.machine {
            3 => "x86",
            40 => "ARM",
            62 => "x86-64",
            183 => "aarch64",
            243 => "RISC-V",
            other => return format!("{bits} machine {other}"),
        };
        format!("{bits} {machine}")
    }

    /// Whether a 64-bit Raspberry Pi OS runs it: 64-bit little-endian AArch64.
    pub fn is_aarch64(&self) -> bool {
        self.class == 2 && self.data == 1 && self.machine == EM_AARCH64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bramble_runtime::kv::REWIND_SLOTS;

    fn llama_config(
        layers: u32,
        dim: u32,
        heads: u32,
        kv_heads: u32,
        ffn: u32,
        vocab: u32,
        context: u32,
    ) -> ModelConfig {
        let mut config: ModelConfig = bytemuck::Zeroable::zeroed();
        config.arch = 1;
        config.dim = dim;
        config.n_layers = layers;
        config.n_heads = heads;
        config.n_kv_heads = kv_heads;
        config.head_dim = dim / heads;
        config.ffn_dim = ffn;
        config.vocab_size = vocab;
        config.context_length = context;
        config.rope_theta = 10000.0;
        config.rope_dim = dim / heads;
        config.norm_eps = 1e-5;
        config
    }

    #[test]
    fn the_budget_matches_what_the_runtime_allocates() {
        // A small grouped-query model: the arithmetic must equal RunState's own count.
        let config = llama_config(3, 128, 8, 2, 352, 500, 256);
        let mut wide_heads = config;
        (wide_heads.n_heads, wide_heads.head_dim) = (4, 32);
        let plain = Architecture::llama(&wide_heads);
        // Gemma-3's pattern on three layers: two sliding-window layers with a RoPE base of their own.
        let mut windowed = Architecture::plain(bramble_runtime::architecture::Family::Gemma3, &wide_heads);
        for layer in &mut windowed.layers[..2] {
            *layer = LayerAttention { window: 40, rope_theta: 1e6 };
        }
        for (context, batch) in [(64, 32), (256, 1), (100, 7), (400, 4)] {
            let state = RunState::new(&config, context, batch);
            let llama = Architecture::llama(&config);
            let ours = kv_cache_bytes(&config, &[], context, KvMode::F32)
                + buffer_bytes(&config, &llama, context, batch, KvMode::F32, false);
            assert_eq!(ours, state.bytes() as u64, "context {context}, batch {batch}");
            for kv in KvMode::ALL {
                let state = RunState::with_kv(&wide_heads, context, batch, kv);
                let ours = kv_cache_bytes(&wide_heads, &plain.layers, context, kv)
                    + buffer_bytes(&wide_heads, &plain, context, batch, kv, false);
                assert_eq!(ours, state.bytes() as u64, "{kv}, context {context}, batch {batch}");
                for (architecture, sparse) in [(&plain, true), (&windowed, false), (&windowed, true)] {
                    // With an R-Sparse plan the state holds its scratch too; with windows, shorter caches
                    // and local RoPE tables.
                    let options = StateOptions::for_architecture(architecture, kv, sparse);
                    let state = RunState::try_with_options(&wide_heads, context, batch, options).unwrap();
                    let ours = kv_cache_bytes(&wide_heads, &architecture.layers, context, kv)
                        + buffer_bytes(&wide_heads, architecture, context, batch, kv, sparse);
                    assert_eq!(ours, state.bytes() as u64, "sparse {sparse}, {kv}, context {context}, batch {batch}");
                }
                // Two of three layers keep their rings, the window of 40 and REWIND_SLOTS more (at most
                // the context), instead of the context (f32 and f16: exactly).
                let global = kv_cache_bytes(&wide_heads, &plain.layers, context, kv);
                let local = kv_cache_bytes(&wide_heads, &windowed.layers, context, kv);
                let per_position = match kv {
                    KvMode::F32 => 2 * 64 * 4,
                    KvMode::F16 => 2 * 64 * 2,
                    KvMode::Q8 | KvMode::Q4 => 0,
                };
                if per_position > 0 {
                    let ring = context.min(40 + REWIND_SLOTS) as u64;
                    assert_eq!(global - local, 2 * (context as u64 - ring) * per_position, "{kv}, context {context}");
                } else {
                    assert!(local < global, "{kv}, context {context}: {local} of {global}");
                }
            }
        }
    }

    #[test]
    fn a_llama2_7b_does_not_fit_a_zero_2w_and_the_message_shows_the_arithmetic() {
        let config = llama_config(32, 4096, 32, 32, 11008, 32000, 4096);
        let model = ModelFootprint {
            config,
            architecture: Architecture::llama(&config),
            image_bytes: 3_876_000_000,
            sparse: false,
        };
        let zero = profile("pi-zero-2w", None).unwrap();
        let plan = memory_plan(&model, 4096, &zero);
        assert!(!plan.fits());
        // 32 layers × 2 × 4096 positions × 4096 wide × 4 bytes = 4 GiB.
        assert_eq!(plan.kv_cache_bytes, 4 * GB);
        let message = plan.to_string();
        // The example of docs/flash.md.
        assert_eq!(
            message,
            "model needs 3.61 GiB weights + 4.00 GiB KV cache (ctx 4096) + 0.02 GiB buffers + 0.16 GiB OS headroom \
             = 7.78 GiB > 0.50 GiB on pi-zero-2w"
        );
        // With a 512-position context (0.50 GiB of KV cache) it fits an 8 GB Pi 4.
        let plan = memory_plan(&model, 512, &profile("pi4-8gb", None).unwrap());
        assert!(plan.fits(), "{plan}");
        assert!(plan.to_string().contains("<= 8.00 GiB on pi4-8gb"), "{plan}");
    }

    #[test]
    fn context_is_capped_at_the_models() {
        let config = llama_config(2, 64, 4, 4, 128, 100, 128);
        let model =
            ModelFootprint { config, architecture: Architecture::llama(&config), image_bytes: 1 << 20, sparse: false };
        let plan = memory_plan(&model, 4096, &profile("pi4", None).unwrap());
        assert_eq!(plan.context, 128);
        assert_eq!(plan.kv_cache_bytes, 2 * 2 * 128 * 64 * 4);
        assert!(plan.fits());
    }

    #[test]
    fn profiles_by_name_and_memory() {
        let pi4 = profile("pi4", None).unwrap();
        assert_eq!((pi4.cores, pi4.memory_bytes, pi4.cpu), (4, GB, "cortex-a72"));
        assert_eq!(profile("pi4-8gb", None).unwrap().memory_bytes, 8 * GB);
        assert_eq!(profile("pi4", Some("4G")).unwrap().memory_bytes, 4 * GB);
        assert_eq!(profile("PI5", Some("8gb")).unwrap().required_feature, Some("dotprod"));
        assert_eq!(profile("pi-zero-2w", None).unwrap().memory_bytes, 512 * MIB);
        assert_eq!(profile("pi-zero-2w", Some("512M")).unwrap().memory_bytes, 512 * MIB);
        let error = profile("pi4", Some("3G")).unwrap_err();
        assert!(error.contains("1gb, 2gb, 4gb, 8gb") && error.contains("not 3gb"), "{error}");
        let error = profile("pi3", None).unwrap_err();
        assert!(error.contains("pi3") && error.contains("pi-zero-2w"), "{error}");
        assert!(profile("pi4-8gb", Some("4G")).unwrap_err().contains("already names"));
        assert!(parse_memory("lots").is_err());
    }

    #[test]
    fn elf_headers() {
        let mut header = [0u8; 64];
        header[..4].copy_from_slice(b"\x7fELF");
        header[4] = 2;
        header[5] = 1;
        header[18..20].copy_from_slice(&183u16.to_le_bytes());
        let arch = ElfArchitecture::read(&header).unwrap();
        assert!(arch.is_aarch64());
        assert_eq!(arch.name(), "64-bit aarch64");
        header[18..20].copy_from_slice(&62u16.to_le_bytes());
        let arch = ElfArchitecture::read(&header).unwrap();
        assert!(!arch.is_aarch64());
        assert_eq!(arch.name(), "64-bit x86-64");
        header[4] = 1;
        header[18..20].copy_from_slice(&40u16.to_le_bytes());
        assert_eq!(ElfArchitecture::read(&header).unwrap().name(), "32-bit ARM");
        assert!(ElfArchitecture::read(b"#!/bin/sh\n").unwrap_err().contains("not an ELF"));
    }
}
