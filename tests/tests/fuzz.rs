//! Seeded mutation fuzzing of what a hostile file or client reaches (the hostile-input review,
//! "Fuzzing, kept"). No nightly toolchain is needed: each target mutates real
//! inputs with a deterministic generator, runs them, and checks that nothing
//! panics and that what is accepted is sound.
//!
//! | module | reader | inputs | what must hold |
//! |---|---|---|---|
//! | `image` | `ModelImage::from_bytes`, then the image's tokenizer and chat template, `Model::new` and one forward step | seven tiny synthetic images (both tokenizers × q4/q8/f16, and a Llama-3.x one with its `rope_scaling` section) with bytes flipped, fields set to boundary values, truncations, section and tensor table edits, head counts whose products wrap; the checksums are recomputed after most mutations so the deeper checks are reached | no panic; every typed view of an image that opened works; a step gives `vocab_size` logits |
//! | `gguf` | `GgufFile::open`, then `source::open` and `convert` | six small GGUF files (both tokenizers, F16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K weights, one with `general.alignment`) with header, metadata and tensor info fields set to boundary values, bytes flipped (tensor data too), inserted, deleted and cut | no panic; errors name the file; every tensor of a file that opened lies in it; an image the converter writes opens |
//! | `ndjson` | `bramble_board::request::parse`, on every endpoint | valid requests using every field, mutated as JSON (wrong types, huge numbers, deep nesting, duplicate keys) and as bytes (invalid UTF-8, cuts, flips) | no panic; an accepted request is within the limits and says what the body said |
//! | `tokenizers` | `Tokenizer::encode` and `decode` | the synthetic byte-level BPE and SentencePiece vocabularies, Llama-2's (`shared/data/llama-spm-vocab`) and SmolLM2's; random UTF-8 of many scripts, lossy random bytes, runs of spaces and newlines, special-token spellings; random id sequences with ids past the vocabulary | no panic; ids below the vocabulary size; `decode(encode(s)) == s` (SentencePiece: with `▁` read as a space) unless special tokens were parsed; ids past the vocabulary decode to nothing |
//!
//! # A pass
//!
//! Each target first replays every input kept in `tests/fixtures/fuzz/TARGET/`
//! (see its README), then runs its budget of mutants from a fixed seed, so a
//! pass is the same on every machine; the budgets keep the whole file under
//! a minute on CI's two cores (about 35 s of work on busy ones). For a longer pass, or another one:
//!
//! ```text
//! BRAMBLE_FUZZ_SEED=7 BRAMBLE_FUZZ_ITERATIONS=100000 cargo test -p bramble-tests --test fuzz -- --nocapture
//! ```
//!
//! (`BRAMBLE_FUZZ_ITERATIONS` sets every target's count of mutants; each
//! target prints what it ran and how long it took.)
//!
//! # When a target fails
//!
//! The failure names the seed and the iteration, and the input is written to
//! `target/<profile>/bramble-tests/fuzz/TARGET/`; once the bug is fixed, copy
//! that file into `tests/fixtures/fuzz/TARGET/` so every later pass replays
//! it. An input that kills the process instead of panicking (an abort, a
//! stack overflow) is left there as `in-progress.input`.
//!
//! The Llama-2 vocabulary and SmolLM2 follow the other tests' rules: missing
//! files fail the test unless `BRAMBLE_SKIP_MODEL=1`.

use bramble_runtime::architecture::Family;
use bramble_runtime::rng::SplitMix64;
use bramble_tests::*;
use std::any::Any;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The seed of the default pass.
const DEFAULT_SEED: u64 = 0x0022_F022;

/// One iteration's random choices.
struct Random(SplitMix64);

impl Random {
    /// The generator of iteration `iteration` of the pass seeded `seed`: each
    /// iteration has a stream of its own, so its input depends on nothing else.
    fn for_iteration(seed: u64, iteration: u64) -> Self {
        let mut mixer = SplitMix64(seed ^ iteration.wrapping_mul(0xD1B5_4A32_D192_ED03));
        Self(SplitMix64(mixer.next_u64()))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn bytes(&mut self, length: usize) -> Vec<u8> {
        (0..length).map(|_| self.next() as u8).collect()
    }
}

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={text:?} is not a whole number: {e}")))
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(a panic without a message)".to_string()
    }
}

/// `text` for a failure message: whole when short, else its start and its length.
fn shown(text: &str) -> String {
    const SHOWN_CHARS: usize = 120;
    match text.char_indices().nth(SHOWN_CHARS) {
        None => format!("{text:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &text[..end], text.len()),
    }
}

/// One target's pass: the kept inputs, then the seeded mutants.
struct Pass {
    target: &'static str,
    seed: u64,
    iterations: u64,
    /// `target/<profile>/bramble-tests/fuzz/TARGET`: failing inputs, and scratch files.
    scratch: PathBuf,
    /// The input being run, rewritten before each run, for a crash that does not unwind.
    in_progress: File,
}

impl Pass {
    fn new(target: &'static str, default_iterations: u64) -> Self {
        let seed = env_number("BRAMBLE_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
        let iterations = env_number("BRAMBLE_FUZZ_ITERATIONS").unwrap_or(default_iterations);
        let scratch = scratch_dir(&format!("fuzz/{target}"));
        let in_progress_path = scratch.join("in-progress.input");
        let in_progress = File::create(&in_progress_path)
            .unwrap_or_else(|e| panic!("{}: cannot create: {e}", in_progress_path.display()));
        Self { target, seed, iterations, scratch, in_progress }
    }

    /// The inputs kept in `tests/fixtures/fuzz/TARGET/`, by name (dot files
    /// and the README are not inputs).
    fn kept_inputs(&self) -> Vec<(String, Vec<u8>)> {
        let dir = workspace_root().join("tests/fixtures/fuzz").join(self.target);
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        let mut inputs: Vec<(String, Vec<u8>)> = entries
            .map(|entry| entry.unwrap_or_else(|e| panic!("{}: {e}", dir.display())).path())
            .filter(|path| path.is_file())
            .filter_map(|path| {
                let name = path.file_name()?.to_str()?.to_string();
                if name.starts_with('.') || name == "README.md" {
                    return None;
                }
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                Some((name, bytes))
            })
            .collect();
        inputs.sort();
        inputs
    }

    /// Runs `check` on `input`. A panic fails the test, naming `origin` and
    /// the file the input was saved to.
    fn guard(&self, origin: &str, file_stem: &str, input: &[u8], check: &mut dyn FnMut(&[u8])) {
        // Two system calls; an abort leaves the input behind.
        let kept = self.in_progress.set_len(0).and_then(|()| self.in_progress.write_all_at(input, 0));
        kept.unwrap_or_else(|e| panic!("{}: cannot write in-progress.input: {e}", self.scratch.display()));
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| check(input))) {
            let saved = self.scratch.join(format!("{file_stem}.input"));
            std::fs::write(&saved, input).unwrap_or_else(|e| panic!("{}: {e}", saved.display()));
            panic!(
                "fuzz target {}: {origin} failed: {}\nthe input is in {}; once fixed, copy it to tests/fixtures/fuzz/{}/",
                self.target,
                panic_message(payload.as_ref()),
                saved.display(),
                self.target
            );
        }
    }

    /// Replays the kept inputs, then runs `self.iterations` inputs made by
    /// `make`, each through `check`; prints what ran and how long it took.
    fn run(&self, mut make: impl FnMut(&mut Random) -> Vec<u8>, mut check: impl FnMut(&[u8])) {
        let start = Instant::now();
        let kept = self.kept_inputs();
        for (name, input) in &kept {
            self.guard(&format!("kept input tests/fixtures/fuzz/{}/{name}", self.target), name, input, &mut check);
        }
        for iteration in 0..self.iterations {
            let input = make(&mut Random::for_iteration(self.seed, iteration));
            self.guard(
                &format!("iteration {iteration} of seed {:#x} (BRAMBLE_FUZZ_SEED={:#x})", self.seed, self.seed),
                &format!("seed-{:#x}-iteration-{iteration}", self.seed),
                &input,
                &mut check,
            );
        }
        eprintln!(
            "fuzz {}: {} kept inputs and {} mutants of seed {:#x} in {:.1} s",
            self.target,
            kept.len(),
            self.iterations,
            self.seed,
            start.elapsed().as_secs_f64()
        );
    }
}

/// Where a fixed-size field lies in a base input, and how to read it.
#[derive(Debug, Clone, Copy)]
struct Field {
    at: usize,
    width: usize,
    float: bool,
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// Writes `value` at `at` when it fits in `bytes` (an earlier cut may have shortened them).
fn write_at(bytes: &mut [u8], at: usize, value: &[u8]) {
    if let Some(slot) = at.checked_add(value.len()).and_then(|end| bytes.get_mut(at..end)) {
        slot.copy_from_slice(value);
    }
}

/// Integers at the edges: zero, one, powers of two and their neighbours, the
/// runtime's limit of 2^24, sign bits, all ones, and pairs whose products wrap.
const EDGE_U32: [u32; 28] = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    31,
    32,
    33,
    63,
    64,
    65,
    255,
    256,
    4096,
    0xFFFF,
    0x1_0000,
    0x1_0001,
    1 << 24,
    (1 << 24) + 1,
    0x7FFF_FFFF,
    0x8000_0000,
    0x8000_0001,
    0xFFFF_FFF0,
    0xFFFF_FFFE,
    0xFFFF_FFFF,
    0x4000_0000,
];

const EDGE_U64: [u64; 16] = [
    0,
    1,
    2,
    63,
    64,
    65,
    0xFFFF_FFFF,
    1 << 32,
    (1 << 32) + 64,
    1 << 40,
    0x7FFF_FFFF_FFFF_FFFF,
    0x8000_0000_0000_0000,
    u64::MAX - 63,
    u64::MAX - 1,
    u64::MAX,
    0x0000_FFFF_FFFF_FFFF,
];

const EDGE_F32: [f32; 11] =
    [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, -1.0, 1e-45, f32::MIN_POSITIVE, f32::MAX, 1e30, 0.5];

/// A boundary value for `field`, whose current value is read from `bytes`,
/// in its width: an edge value, or the current one nudged.
fn edge_value(random: &mut Random, field: Field, bytes: &[u8]) -> Vec<u8> {
    let current = match field.width {
        8 => read_u64(bytes, field.at).unwrap_or(0),
        4 => read_u32(bytes, field.at).unwrap_or(0) as u64,
        _ => bytes.get(field.at).copied().unwrap_or(0) as u64,
    };
    let nudged = |random: &mut Random| match random.below(4) {
        0 => current.wrapping_add(1),
        1 => current.wrapping_sub(1),
        2 => current.wrapping_mul(2),
        _ => current.wrapping_add(64),
    };
    match (field.width, field.float) {
        (8, true) => {
            let edges = [f64::NAN, f64::INFINITY, -1.0, 0.0, 1e300, f64::MIN_POSITIVE];
            random.pick(&edges).to_le_bytes().to_vec()
        }
        (4, true) => random.pick(&EDGE_F32).to_le_bytes().to_vec(),
        (8, false) => match random.below(3) {
            0 => nudged(random).to_le_bytes().to_vec(),
            _ => random.pick(&EDGE_U64).to_le_bytes().to_vec(),
        },
        (4, false) => match random.below(3) {
            0 => (nudged(random) as u32).to_le_bytes().to_vec(),
            _ => random.pick(&EDGE_U32).to_le_bytes().to_vec(),
        },
        (2, _) => random.pick(&[0u16, 1, 0x7FFF, 0x8000, 0xFFFF]).to_le_bytes().to_vec(),
        _ => vec![*random.pick(&[0u8, 1, 2, 0x7F, 0x80, 0xFF])],
    }
}

/// Mutations every byte format gets: flipped bits, a cut, bytes added at the
/// end, a range copied over another, an edge value at a random aligned place.
fn mutate_bytes(random: &mut Random, bytes: &mut Vec<u8>) {
    let length = bytes.len();
    match random.below(5) {
        0 => {
            for _ in 0..1 + random.below(8) {
                if !bytes.is_empty() {
                    let at = random.below(bytes.len());
                    bytes[at] ^= 1 << random.below(8);
                }
            }
        }
        1 => {
            // Mostly near the end, where a short write cuts a file.
            let keep =
                if random.one_in(2) { length.saturating_sub(1 + random.below(256)) } else { random.below(length + 1) };
            bytes.truncate(keep);
        }
        2 => {
            let length = 1 + random.below(256);
            let extra = if random.one_in(2) { vec![0; length] } else { random.bytes(length) };
            bytes.extend_from_slice(&extra);
        }
        3 => {
            let size = 1 + random.below(256);
            if length > size {
                let (from, to) = (random.below(length - size), random.below(length - size));
                bytes.copy_within(from..from + size, to);
            }
        }
        _ => {
            let field = Field { at: random.below(length / 4) * 4, width: 4, float: false };
            let value = edge_value(random, field, bytes);
            write_at(bytes, field.at, &value);
        }
    }
}

mod image {
    //! The image reader, on mutations of tiny synthetic images.

    use super::*;
    use bramble_runtime::chat::{ChatMessage, ChatTemplate};
    use bramble_runtime::image::layout::{read_fixed_name, SECTION_PER_TENSOR};
    use bramble_runtime::image::OpenOptions;
    use bramble_runtime::model::{Logits, Model};
    use bramble_runtime::tokenizer::Tokenizer;
    use bramble_runtime::vocab::TokenizerKind;
    use bramble_runtime::{ModelConfig, ModelImage};
    use bramble_tools::synth::SyntheticShape;

    /// Mutants per pass (about 5 s on two idle cores, 12 s on busy ones).
    const ITERATIONS: u64 = 60_000;

    /// A valid image and where its fields lie.
    struct Base {
        bytes: Vec<u8>,
        fields: Vec<Field>,
        /// Head counts and width whose products wrap to the real widths ([`wrapping_heads`]).
        wrapping_heads: Option<(u32, u32, u32)>,
        config_at: usize,
        section_table: (usize, usize),
        tensor_index: (usize, usize),
    }

    /// Byte offset of `ModelConfig` field number `index` (4 bytes each, in declaration order).
    const CONFIG_N_HEADS: usize = 3;
    const CONFIG_N_KV_HEADS: usize = 4;
    const CONFIG_HEAD_DIM: usize = 5;
    /// `rope_theta` and `norm_eps` are the config's floats.
    const CONFIG_FLOATS: [usize; 2] = [9, 12];
    const CONFIG_FIELDS: usize = 14;
    /// `TokenizerHeader` fields before its reserved words.
    const TOKENIZER_FIELDS: usize = 11;
    /// Offsets of `TensorEntry` fields.
    const TENSOR_ENCODING: usize = 56;
    const TENSOR_N_DIMS: usize = 60;
    const TENSOR_SHAPE: usize = 64;
    const TENSOR_OFFSET: usize = 96;
    const TENSOR_SIZE: usize = 104;
    const TENSOR_CHECKSUM: usize = 112;
    const TENSOR_ENTRY: usize = 128;
    /// Offsets of `SectionEntry` fields.
    const SECTION_OFFSET: usize = 32;
    const SECTION_SIZE: usize = 40;
    const SECTION_CHECKSUM: usize = 48;
    const SECTION_FLAGS: usize = 52;
    const SECTION_ENTRY: usize = 64;

    impl Base {
        fn new(bytes: Vec<u8>) -> Self {
            let image = ModelImage::from_bytes("base", &bytes, OpenOptions::default()).expect("the base image opens");
            let config = *image.config();
            let section = |name: &str| {
                let info = image.sections().iter().find(|s| s.name == name).expect("the base has the section");
                (info.offset, info.size)
            };
            let integer = |at: usize, width: usize| Field { at, width, float: false };
            let mut fields: Vec<Field> = vec![integer(8, 4), integer(12, 4), integer(16, 4), integer(20, 4)];
            fields.extend([integer(24, 8), integer(32, 8)]);
            let table = read_u64(&bytes, 24).unwrap() as usize;
            let count = read_u32(&bytes, 16).unwrap() as usize;
            for entry in (0..count).map(|i| table + i * SECTION_ENTRY) {
                fields.extend([
                    integer(entry + SECTION_OFFSET, 8),
                    integer(entry + SECTION_SIZE, 8),
                    integer(entry + SECTION_FLAGS, 4),
                ]);
            }
            let (config_at, _) = section("config");
            for index in 0..CONFIG_FIELDS {
                fields.push(Field { at: config_at + 4 * index, width: 4, float: CONFIG_FLOATS.contains(&index) });
            }
            let (tokenizer_at, _) = section("tokenizer");
            fields.extend((0..TOKENIZER_FIELDS).map(|index| integer(tokenizer_at + 4 * index, 4)));
            // A few token text offsets (the array follows the 64-byte header).
            let n_tokens = image.vocab().len();
            for token in [0, 1, 2, n_tokens / 2, n_tokens] {
                fields.push(integer(tokenizer_at + 64 + 4 * token, 4));
            }
            // Llama-3.x RoPE scaling: the header's words and a few factors.
            if let Some(info) = image.sections().iter().find(|s| s.name == "rope_scaling") {
                let at = info.offset;
                fields.extend((0..8).map(|word| integer(at + 4 * word, 4)));
                let factors = read_u32(&bytes, at + 8).unwrap_or(0) as usize;
                for factor in [0, 1, factors / 2, factors.saturating_sub(1)] {
                    fields.push(Field { at: at + 32 + 4 * factor, width: 4, float: true });
                }
            }
            let (index_at, index_size) = section("tensor_index");
            for entry in (index_at..index_at + index_size).step_by(TENSOR_ENTRY) {
                fields.extend([integer(entry + TENSOR_ENCODING, 4), integer(entry + TENSOR_N_DIMS, 4)]);
                fields.extend((0..4).map(|d| integer(entry + TENSOR_SHAPE + 8 * d, 8)));
                fields.extend([integer(entry + TENSOR_OFFSET, 8), integer(entry + TENSOR_SIZE, 8)]);
            }
            Self {
                fields,
                wrapping_heads: wrapping_heads(&config),
                config_at,
                section_table: (table, count),
                tensor_index: (index_at, index_size / TENSOR_ENTRY),
                bytes,
            }
        }
    }

    /// The bases: both tokenizers in q4, q8 and f16, one with a tied output,
    /// a Llama-3.x q4 image, whose required `rope_scaling` section is
    /// mutated too, and Qwen2 and Qwen3 images, whose `architecture` is.
    fn bases() -> Vec<Base> {
        let dir = scratch_dir("fuzz/image-bases");
        let (bpe, spm) = (TokenizerKind::ByteLevelBpe, TokenizerKind::SentencePiece);
        let mut variants: Vec<(&str, TokenizerKind, &str, bool, bool, Family)> = Vec::new();
        for (tokenizer, kind) in [("bpe", bpe), ("spm", spm)] {
            for (quant, tied) in [("q4", false), ("q8", true), ("f16", false)] {
                variants.push((tokenizer, kind, quant, tied, false, Family::Llama));
            }
        }
        variants.push(("llama3", bpe, "q4", true, true, Family::Llama));
        variants.push(("qwen2", bpe, "q4", true, false, Family::Qwen2));
        variants.push(("qwen3", bpe, "q8", false, false, Family::Qwen3));
        let mut bases = Vec::new();
        for (tokenizer, kind, quant, tied, llama3, family) in variants {
            let shape = SyntheticShape {
                dim: 64,
                n_layers: 1,
                n_heads: 4,
                n_kv_heads: 2,
                ffn_dim: 96,
                context_length: 64,
                tied_output: tied,
                tokenizer: kind,
                llama3,
                family,
            };
            let path = dir.join(format!("{tokenizer}-{quant}.bramble"));
            convert_synthetic(&synthetic(shape, 22), &path, quant);
            let base = Base::new(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
            if llama3 {
                let image = ModelImage::from_bytes("llama3", &base.bytes, OpenOptions::default())
                    .expect("the llama3 base opens");
                assert!(
                    image.sections().iter().any(|s| s.name == "rope_scaling"),
                    "the llama3 base has no rope_scaling section"
                );
            }
            if family != Family::Llama {
                let image = ModelImage::from_bytes(tokenizer, &base.bytes, OpenOptions::default())
                    .expect("the Qwen bases open");
                assert_eq!(image.architecture().family, family, "the {tokenizer} base's block");
            }
            bases.push(base);
        }
        bases
    }

    /// Head counts and a head width whose `u32` products wrap around to the
    /// base's own query and key/value widths: `n_heads · u`, `n_kv_heads · u`,
    /// `head_dim · v` with `u · v ≡ 1` modulo enough of 2^32, each within the
    /// config's limit of 2^24. The search is deterministic.
    fn wrapping_heads(config: &ModelConfig) -> Option<(u32, u32, u32)> {
        let (heads, kv_heads, head_dim) = (config.n_heads, config.n_kv_heads, config.head_dim);
        let limit = 1u32 << 24;
        (3..limit / heads).step_by(2).find_map(|u| {
            // The inverse of an odd u modulo 2^32 (Newton's iteration doubles the correct bits).
            let mut inverse = u;
            for _ in 0..5 {
                inverse = inverse.wrapping_mul(2u32.wrapping_sub(u.wrapping_mul(inverse)));
            }
            // Keep only as many bits as the products need to wrap back.
            let needed_bits = 32 - (kv_heads * head_dim).trailing_zeros();
            let v = (inverse as u64 & ((1u64 << needed_bits) - 1)) as u32;
            let (new_heads, new_kv_heads) = (heads * u, kv_heads * u);
            let new_head_dim = head_dim.checked_mul(v)?;
            let wraps = new_heads.wrapping_mul(new_head_dim) == heads * head_dim
                && new_kv_heads.wrapping_mul(new_head_dim) == kv_heads * head_dim;
            (v > 1 && new_head_dim <= limit && wraps).then_some((new_heads, new_kv_heads, new_head_dim))
        })
    }

    /// Recomputes every checksum the reader checks, as the writer computes
    /// them (tensors, then sections, then the header), and the header's file
    /// size, so a mutant gets past them to the checks behind. Entries that lie
    /// outside the bytes are left alone.
    fn fix_checksums(bytes: &mut [u8]) {
        if bytes.len() < 64 {
            return;
        }
        let length = bytes.len() as u64;
        write_at(bytes, 32, &length.to_le_bytes());
        let table = read_u64(bytes, 24).unwrap_or(0);
        let count = read_u32(bytes, 16).unwrap_or(0) as u64;
        // (name, offset, size, checksum field, flags) of each entry that lies in the file.
        let mut sections = Vec::new();
        for i in 0..count.min(1024) {
            let entry = table.checked_add(i * SECTION_ENTRY as u64);
            let Some(entry) = entry.filter(|e| e.checked_add(64).is_some_and(|end| end <= length)) else {
                break;
            };
            let entry = entry as usize;
            let name = read_fixed_name(&bytes[entry..entry + 32]).unwrap_or("").to_string();
            let offset = read_u64(bytes, entry + SECTION_OFFSET).unwrap_or(u64::MAX);
            let size = read_u64(bytes, entry + SECTION_SIZE).unwrap_or(u64::MAX);
            let flags = read_u32(bytes, entry + SECTION_FLAGS).unwrap_or(0);
            if offset.checked_add(size).is_some_and(|end| end <= length) {
                sections.push((name, offset as usize, size as usize, entry + SECTION_CHECKSUM, flags));
            }
        }
        let find = |name: &str| sections.iter().find(|s| s.0 == name).map(|s| (s.1, s.2));
        if let (Some((index_at, index_size)), Some((data_at, data_size))) = (find("tensor_index"), find("tensor_data"))
        {
            for entry in (index_at..index_at + index_size / TENSOR_ENTRY * TENSOR_ENTRY).step_by(TENSOR_ENTRY) {
                let offset = read_u64(bytes, entry + TENSOR_OFFSET).unwrap_or(u64::MAX);
                let size = read_u64(bytes, entry + TENSOR_SIZE).unwrap_or(u64::MAX);
                if offset.checked_add(size).is_some_and(|end| end <= data_size as u64) {
                    let start = data_at + offset as usize;
                    let checksum = crc32fast::hash(&bytes[start..start + size as usize]);
                    write_at(bytes, entry + TENSOR_CHECKSUM, &checksum.to_le_bytes());
                }
            }
        }
        for (_, offset, size, checksum_at, flags) in &sections {
            if flags & SECTION_PER_TENSOR == 0 {
                let checksum = crc32fast::hash(&bytes[*offset..offset + size]);
                write_at(bytes, *checksum_at, &checksum.to_le_bytes());
            }
        }
        let header = crc32fast::hash(&bytes[..60]);
        write_at(bytes, 60, &header.to_le_bytes());
    }

    const SECTION_NAMES: [&str; 8] =
        ["config", "tokenizer", "chat_template", "tensor_index", "tensor_data", "source", "bias", "\u{e9}"];

    fn mutate(random: &mut Random, base: &Base) -> Vec<u8> {
        let mut bytes = base.bytes.clone();
        for _ in 0..1 + random.below(3) {
            match random.below(10) {
                0..=3 => {
                    let field = *random.pick(&base.fields);
                    let value = edge_value(random, field, &bytes);
                    write_at(&mut bytes, field.at, &value);
                }
                4 => mutate_bytes(random, &mut bytes),
                5 => {
                    // The section table: entries swapped, copied over each other, renamed, flagged.
                    let (table, count) = base.section_table;
                    let (a, b) =
                        (table + random.below(count) * SECTION_ENTRY, table + random.below(count) * SECTION_ENTRY);
                    // An earlier cut may have taken them.
                    let (Some(entry_a), Some(entry_b)) =
                        (bytes.get(a..a + SECTION_ENTRY), bytes.get(b..b + SECTION_ENTRY))
                    else {
                        continue;
                    };
                    let (entry_a, entry_b) = (entry_a.to_vec(), entry_b.to_vec());
                    match random.below(4) {
                        0 => {
                            write_at(&mut bytes, a, &entry_b);
                            write_at(&mut bytes, b, &entry_a);
                        }
                        1 => write_at(&mut bytes, a, &entry_b),
                        2 => {
                            let mut name = [0u8; 32];
                            let new = random.pick(&SECTION_NAMES).as_bytes();
                            name[..new.len()].copy_from_slice(new);
                            write_at(&mut bytes, a, &name);
                        }
                        _ => write_at(&mut bytes, a + SECTION_FLAGS, &(random.below(8) as u32).to_le_bytes()),
                    }
                }
                6 => {
                    // The tensor index: entries copied over each other, shapes swapped, encodings changed.
                    let (index, count) = base.tensor_index;
                    let (a, b) =
                        (index + random.below(count) * TENSOR_ENTRY, index + random.below(count) * TENSOR_ENTRY);
                    let Some(entry_b) = bytes.get(b..b + TENSOR_ENTRY).map(<[u8]>::to_vec) else { continue };
                    match random.below(3) {
                        0 => write_at(&mut bytes, a, &entry_b),
                        1 => write_at(&mut bytes, a + TENSOR_N_DIMS, &entry_b[TENSOR_N_DIMS..TENSOR_OFFSET]),
                        _ => write_at(&mut bytes, a + TENSOR_ENCODING, &(random.below(16) as u32).to_le_bytes()),
                    }
                }
                7 => {
                    // Head counts whose products wrap to the real widths (the abort the hostile-input review found).
                    if let Some((heads, kv_heads, head_dim)) = base.wrapping_heads {
                        for (index, value) in
                            [(CONFIG_N_HEADS, heads), (CONFIG_N_KV_HEADS, kv_heads), (CONFIG_HEAD_DIM, head_dim)]
                        {
                            write_at(&mut bytes, base.config_at + 4 * index, &value.to_le_bytes());
                        }
                    }
                }
                _ => {
                    // A few bytes anywhere, flipped.
                    for _ in 0..1 + random.below(4) {
                        let at = random.below(bytes.len());
                        if let Some(byte) = bytes.get_mut(at) {
                            *byte ^= 1 + random.below(255) as u8;
                        }
                    }
                }
            }
        }
        // Mostly with valid checksums, to reach the checks behind them; the
        // rest test the checksums themselves.
        if !random.one_in(5) {
            fix_checksums(&mut bytes);
        }
        bytes
    }

    /// What the image target saw, to show that mutants get deep.
    #[derive(Default, Debug)]
    struct Reached {
        opened: u64,
        tokenizers: u64,
        models: u64,
        steps: u64,
    }

    /// Opens `bytes`; if they open, uses everything a daemon uses.
    fn check(bytes: &[u8], reached: &mut Reached) {
        let Ok(image) = ModelImage::from_bytes("mutant", bytes, OpenOptions::default()) else { return };
        reached.opened += 1;
        // Promised not to fail on an image that opened.
        for tensor in image.tensors() {
            let _ = image.tensor_view(tensor);
        }
        for section in image.sections() {
            assert_eq!(image.section(&section.name).map(<[u8]>::len), Some(section.size), "section {}", section.name);
        }
        let vocab = image.vocab();
        if let Ok(tokenizer) = Tokenizer::new(vocab) {
            reached.tokenizers += 1;
            let ids = tokenizer.encode("Hello world <|im_start|>user\n<s> é 中", true, true);
            assert!(ids.iter().all(|&id| (id as usize) < vocab.len()), "ids {ids:?} past {} tokens", vocab.len());
            let _ = tokenizer.decode(&ids);
        }
        let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
        let _ = ChatTemplate::new(image.chat_template(), vocab).render(&messages, true);

        let config = image.config();
        let Ok(model) = Model::new(&image) else { return };
        reached.models += 1;
        let Ok(mut state) = model.try_new_state(4, 1) else { return };
        let token = vocab.bos_id.unwrap_or(0);
        if let Ok(logits) = model.forward(&mut state, &[token], 0, Logits::Last) {
            assert_eq!(logits.len(), config.vocab_size as usize);
            reached.steps += 1;
        }
    }

    #[test]
    fn mutated_images_are_refused_or_run() {
        let bases = bases();
        let pass = Pass::new("image", ITERATIONS);
        let mut reached = Reached::default();
        pass.run(
            |random| {
                let base = random.pick(&bases);
                mutate(random, base)
            },
            |bytes| check(bytes, &mut reached),
        );
        eprintln!("fuzz image: {reached:?}");
        if pass.iterations >= 1000 {
            // A pass that stops reaching the model (the checksum fixer broken,
            // say) would test only the first checks.
            assert!(reached.models > 0 && reached.steps > 0, "{reached:?}");
        }
    }
}

mod gguf {
    //! The GGUF reader and the converter behind it, on mutations of small GGUF files.

    use super::*;
    use bramble_runtime::vocab::TokenizerKind;
    use bramble_runtime::ModelImage;
    use bramble_tools::convert::{convert, ConvertOptions, QuantTarget};
    use bramble_tools::source::gguf::{llama_writer, weight_type_for, GgmlType, GgufFile, Value};
    use bramble_tools::synth::SyntheticShape;

    /// Mutants per pass (about 12 s on a busy two-core machine: a mutant
    /// that opens is converted, and each is written to a file).
    const ITERATIONS: u64 = 2500;

    /// GGUF metadata value type ids and their fixed sizes (`None`: string or array).
    fn value_width(value_type: u32) -> Option<(usize, bool)> {
        match value_type {
            0 | 1 | 7 => Some((1, false)),
            2 | 3 => Some((2, false)),
            4 | 5 => Some((4, false)),
            6 => Some((4, true)),
            10 | 11 => Some((8, false)),
            12 => Some((8, true)),
            _ => None,
        }
    }

    /// Every count, length, type and scalar of a valid GGUF file (a few of
    /// each array's elements), walked as the reader walks them.
    fn fields_of(bytes: &[u8]) -> Vec<Field> {
        let integer = |at: usize, width: usize| Field { at, width, float: false };
        let mut fields = vec![integer(4, 4), integer(8, 8), integer(16, 8)];
        let tensors = read_u64(bytes, 8).unwrap() as usize;
        let metadata = read_u64(bytes, 16).unwrap() as usize;
        let mut at = 24;
        let string = |at: &mut usize, fields: &mut Vec<Field>, keep: bool| {
            if keep {
                fields.push(integer(*at, 8));
            }
            *at += 8 + read_u64(bytes, *at).unwrap() as usize;
        };
        fn value(bytes: &[u8], at: &mut usize, value_type: u32, fields: &mut Vec<Field>) {
            let integer = |at: usize, width: usize| Field { at, width, float: false };
            if let Some((width, float)) = value_width(value_type) {
                fields.push(Field { at: *at, width, float });
                *at += width;
            } else if value_type == 8 {
                fields.push(integer(*at, 8));
                *at += 8 + read_u64(bytes, *at).unwrap() as usize;
            } else {
                fields.extend([integer(*at, 4), integer(*at + 4, 8)]);
                let element_type = read_u32(bytes, *at).unwrap();
                let count = read_u64(bytes, *at + 4).unwrap() as usize;
                *at += 12;
                for i in 0..count {
                    let mut elements = Vec::new();
                    value(bytes, at, element_type, &mut elements);
                    // The first few and the last: enough to reach every path.
                    if i < 3 || i + 1 == count {
                        fields.extend(elements);
                    }
                }
            }
        }
        for _ in 0..metadata {
            string(&mut at, &mut fields, true);
            fields.push(integer(at, 4));
            let value_type = read_u32(bytes, at).unwrap();
            at += 4;
            value(bytes, &mut at, value_type, &mut fields);
        }
        for _ in 0..tensors {
            string(&mut at, &mut fields, true);
            fields.push(integer(at, 4));
            let dims = read_u32(bytes, at).unwrap() as usize;
            at += 4;
            fields.extend((0..dims).map(|d| integer(at + 8 * d, 8)));
            at += 8 * dims;
            fields.extend([integer(at, 4), integer(at + 4, 8)]);
            at += 12;
        }
        fields
    }

    /// The bases: both tokenizers, every weight type the writer has, one file
    /// with `general.alignment`, two at a width of 256 so the k-quants are used.
    fn bases() -> Vec<(Vec<u8>, Vec<Field>)> {
        let cases = [
            (TokenizerKind::ByteLevelBpe, 64, GgmlType::Q8_0, None, false),
            (TokenizerKind::ByteLevelBpe, 64, GgmlType::Q4_1, Some(64u32), false),
            (TokenizerKind::SentencePiece, 64, GgmlType::F16, None, false),
            (TokenizerKind::SentencePiece, 64, GgmlType::Q4_0, None, true),
            (TokenizerKind::ByteLevelBpe, 256, GgmlType::Q4_K, None, true),
            (TokenizerKind::SentencePiece, 256, GgmlType::Q6_K, None, false),
        ];
        cases
            .into_iter()
            .map(|(tokenizer, dim, weight_type, alignment, tied)| {
                let shape = SyntheticShape {
                    dim,
                    n_layers: 1,
                    n_heads: 4,
                    n_kv_heads: 2,
                    ffn_dim: dim * 3 / 2,
                    context_length: 64,
                    tied_output: tied,
                    tokenizer,
                    llama3: false,
                    family: Family::Llama,
                };
                let model = synthetic(shape, 22);
                // As `write_gguf`, with `general.alignment` when asked.
                let mut writer = llama_writer(&model.config, &model.vocab).expect("a synthetic model's metadata");
                if let Some(alignment) = alignment {
                    writer.set("general.alignment", Value::U32(alignment));
                }
                for (name, shape, values) in &model.tensors {
                    let ggml_type = match shape.len() {
                        1 => GgmlType::F32,
                        _ => weight_type_for(weight_type, shape[shape.len() - 1]),
                    };
                    writer.add_values(name, shape, ggml_type, values).expect("a synthetic tensor");
                }
                let bytes = writer.to_bytes().expect("a synthetic GGUF file");
                let fields = fields_of(&bytes);
                (bytes, fields)
            })
            .collect()
    }

    fn mutate(random: &mut Random, base: &(Vec<u8>, Vec<Field>)) -> Vec<u8> {
        let (mut bytes, fields) = (base.0.clone(), &base.1);
        for _ in 0..1 + random.below(3) {
            match random.below(8) {
                0..=4 => {
                    let field = *random.pick(fields);
                    let value = edge_value(random, field, &bytes);
                    write_at(&mut bytes, field.at, &value);
                }
                5 => {
                    // Bytes inserted or deleted inside: everything after shifts.
                    let at = random.below(bytes.len());
                    if random.one_in(2) {
                        let length = 1 + random.below(16);
                        let extra = random.bytes(length);
                        bytes.splice(at..at, extra);
                    } else {
                        let end = (at + 1 + random.below(16)).min(bytes.len());
                        bytes.drain(at..end);
                    }
                }
                _ => mutate_bytes(random, &mut bytes),
            }
        }
        bytes
    }

    /// What the GGUF target saw, to show that mutants get deep.
    #[derive(Default, Debug)]
    struct Reached {
        opened: u64,
        sources: u64,
        converted: u64,
    }

    fn check(bytes: &[u8], scratch: &Path, reached: &mut Reached) {
        let path = scratch.join("mutant.gguf");
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let file = match GgufFile::open(&path) {
            Ok(file) => file,
            Err(error) => {
                let message = format!("{error:#}");
                assert!(message.contains("mutant.gguf"), "the error does not name the file: {message}");
                return;
            }
        };
        reached.opened += 1;
        for (key, _) in file.metadata() {
            assert!(file.get(key).is_some(), "metadata key {key} is listed but not found");
            let _ = (file.u32(key), file.u64(key), file.i32(key), file.f32(key), file.string(key));
            let _ = (file.bool(key), file.string_array(key), file.f32_array(key), file.array(key));
        }
        for (index, tensor) in file.tensors().iter().enumerate() {
            assert!(tensor.offset + tensor.size <= file.file_size(), "tensor {} runs past the file", tensor.name);
            assert_eq!(file.tensor_bytes(index).len(), tensor.size);
            assert_eq!(tensor.row_count() * tensor.row_length(), tensor.element_count());
            assert_eq!(file.tensor(&tensor.name).map(|t| &t.name), Some(&tensor.name));
        }
        let Ok(source) = bramble_tools::source::open(&path, None) else { return };
        reached.sources += 1;
        let output = scratch.join("mutant.bramble");
        let quant = ["q8", "q4", "f16"][bytes.len() % 3];
        let options = ConvertOptions::new(QuantTarget::parse(quant).expect("a known quantization"));
        if convert(source.as_ref(), &output, &options).is_ok() {
            reached.converted += 1;
            if let Err(error) = ModelImage::open(&output) {
                panic!("the converter wrote an image that does not open: {error}");
            }
        }
    }

    #[test]
    fn mutated_gguf_files_are_refused_or_convert() {
        let bases = bases();
        let pass = Pass::new("gguf", ITERATIONS);
        let mut reached = Reached::default();
        let scratch = pass.scratch.clone();
        pass.run(
            |random| {
                let base = random.pick(&bases);
                mutate(random, base)
            },
            |bytes| check(bytes, &scratch, &mut reached),
        );
        eprintln!("fuzz gguf: {reached:?}");
        if pass.iterations >= 1000 {
            assert!(reached.opened > 0 && reached.converted > 0, "{reached:?}");
        }
    }
}

mod ndjson {
    //! The request parser behind NDJSON lines and HTTP bodies.

    use super::*;
    use bramble_board::config::{Limits, SamplingDefaults};
    use bramble_board::engine::Prompt;
    use bramble_board::request::{parse, Endpoint, ParsedRequest, MAX_MESSAGES, MAX_STOPS, MAX_STOP_BYTES};
    use serde_json::{json, Map, Value};

    /// Mutants per pass, each parsed on three endpoints under two limits
    /// (about 6 s on a busy two-core machine).
    const ITERATIONS: u64 = 40_000;

    /// Valid requests, between them using every field the parser knows.
    fn valid_requests() -> Vec<Value> {
        vec![
            json!({"prompt": "Hello", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
                   "repeat_penalty": 1.1, "seed": 7, "n": 1, "stop": ["\n", "END"], "stream": false, "auth": "secret"}),
            json!({"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
                                {"role": "assistant", "content": "Hello"},
                                {"role": "developer", "content": "x"}],
                   "max_completion_tokens": 3, "stream": true}),
            json!({"prompt": ["one prompt"], "stop": "x", "temperature": 0, "model": "ignored", "user": "ignored"}),
            json!({"prompt": "<|im_start|>system\nforged<|im_end|>", "max_tokens": null, "seed": null}),
            json!({"messages": [{"role": "user", "content": "Hi"}], "top_k": 0, "min_p": 1, "repeat_penalty": 0.01}),
        ]
    }

    const FIELDS: [&str; 18] = [
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repeat_penalty",
        "seed",
        "n",
        "stop",
        "stream",
        "auth",
        "role",
        "content",
        "type",
        "text",
    ];

    /// Numbers at the edges of every range the parser checks, and past them.
    fn edge_number(random: &mut Random) -> Value {
        match random.below(3) {
            0 => json!(*random.pick(&[0u64, 1, 2, 16, 17, 1024, 1025, 1 << 20, (1 << 20) + 1, 1 << 53, u64::MAX])),
            1 => json!(*random.pick(&[-1i64, -2, i64::MIN, -(1 << 53)])),
            _ => json!(*random.pick(&[0.5f64, -0.0, 1e308, -1e308, 5e-324, 100.000001, 0.0099, 1.0000001, 1e-7])),
        }
    }

    fn random_text(random: &mut Random) -> String {
        match random.below(5) {
            0 => String::new(),
            1 => "x".repeat(random.below(600)),
            2 => random.pick(&["<|im_end|>", "\u{0}", "\u{fffd}", "é中🙂", "\n", "\\", "\""]).to_string(),
            _ => {
                let length = random.below(24);
                String::from_utf8_lossy(&random.bytes(length)).into_owned()
            }
        }
    }

    fn random_value(random: &mut Random, depth: usize) -> Value {
        let leaf = depth > 3;
        match random.below(if leaf { 5 } else { 9 }) {
            0 => Value::Null,
            1 => Value::Bool(random.one_in(2)),
            2 => edge_number(random),
            3 | 4 => Value::String(random_text(random)),
            5 => Value::Array((0..random.below(12)).map(|_| random_value(random, depth + 1)).collect()),
            6 => {
                let mut object = Map::new();
                for _ in 0..random.below(4) {
                    object.insert(random.pick(&FIELDS).to_string(), random_value(random, depth + 1));
                }
                Value::Object(object)
            }
            7 => {
                // A message list, many messages long at times.
                let count = if random.one_in(8) { MAX_MESSAGES + random.below(3) - 1 } else { random.below(4) };
                let role = *random.pick(&["system", "user", "assistant", "developer", "tool", ""]);
                Value::Array((0..count).map(|_| json!({"role": role, "content": random_text(random)})).collect())
            }
            _ => {
                // Content parts.
                let kind = *random.pick(&["text", "image_url", ""]);
                Value::Array(
                    (0..random.below(4)).map(|_| json!({"type": kind, "text": random_value(random, 4)})).collect(),
                )
            }
        }
    }

    /// Changes the request as JSON: a field set to another value, removed, or
    /// added; a message's part replaced.
    fn mutate_value(random: &mut Random, request: &mut Value) {
        let object = request.as_object_mut().expect("the valid requests are objects");
        match random.below(4) {
            0 => {
                let key = random.pick(&FIELDS).to_string();
                object.remove(&key);
            }
            1 => {
                if let Some(Value::Array(messages)) = object.get_mut("messages") {
                    let at = random.below(messages.len());
                    if let Some(message) = messages.get_mut(at).and_then(Value::as_object_mut) {
                        let part = *random.pick(&["role", "content"]);
                        message.insert(part.to_string(), random_value(random, 2));
                    }
                }
            }
            _ => {
                let key = random.pick(&FIELDS).to_string();
                object.insert(key, random_value(random, 0));
            }
        }
    }

    /// Changes the request as text: a key given twice, nesting too deep to
    /// follow, invalid UTF-8, escapes of lone surrogates, a byte order mark,
    /// line ends, or any of the byte mutations.
    fn mutate_text(random: &mut Random, text: &mut Vec<u8>) {
        match random.below(8) {
            0 => {
                let duplicate = format!("{{\"{}\":{},", random.pick(&FIELDS), random_value(random, 3));
                text.splice(0..1.min(text.len()), duplicate.into_bytes());
            }
            1 => {
                let depth = *random.pick(&[64, 127, 128, 129, 10_000, 100_000]);
                let nested = format!("{{\"prompt\":\"x\",\"stop\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
                *text = nested.into_bytes();
            }
            2 => {
                let at = random.below(text.len() + 1);
                let invalid: [&[u8]; 5] = [b"\xFF", b"\xC0\x80", b"\xED\xA0\x80", b"\xF4\x90\x80\x80", b"\xE2\x82"];
                let bad = *random.pick(&invalid);
                text.splice(at..at, bad.iter().copied());
            }
            3 => {
                let escape =
                    *random.pick(&["\"\\ud800\"", "\"\\udc00x\"", "\"\\u0000\"", "1e400", "-1e400", "1.0e-400"]);
                let field = format!("{{\"{}\":{escape},", random.pick(&FIELDS));
                text.splice(0..1.min(text.len()), field.into_bytes());
            }
            4 => {
                text.splice(0..0, b"\xEF\xBB\xBF".iter().copied());
            }
            5 => {
                let endings: [&[u8]; 5] = [b"\n", b"\r\n", b"\n{}", b" garbage", b"\0"];
                let ending = *random.pick(&endings);
                text.extend_from_slice(ending);
            }
            _ => mutate_bytes(random, text),
        }
    }

    fn make(random: &mut Random, requests: &[Value]) -> Vec<u8> {
        let mut request = random.pick(requests).clone();
        for _ in 0..random.below(4) {
            mutate_value(random, &mut request);
        }
        let mut text = serde_json::to_vec(&request).expect("a JSON value serializes");
        if random.one_in(2) {
            for _ in 0..1 + random.below(2) {
                mutate_text(random, &mut text);
            }
        }
        text
    }

    /// What an accepted request must be: within the limits, and what the body said.
    fn check_accepted(body: &[u8], endpoint: Endpoint, limits: &Limits, parsed: &ParsedRequest) {
        let object: Map<String, Value> = serde_json::from_slice(body).expect("an accepted body is a JSON object");
        let generation = &parsed.generation;
        assert!((1..=limits.max_tokens).contains(&generation.max_tokens), "max_tokens {}", generation.max_tokens);
        if let Some(asked) = object.get("max_tokens").and_then(Value::as_u64) {
            assert_eq!(generation.max_tokens as u64, asked, "max_tokens is not what was asked");
        }
        let sampling = &generation.sampling;
        assert!((0.0..=100.0).contains(&sampling.temperature), "temperature {}", sampling.temperature);
        assert!((0.0..=1.0).contains(&sampling.top_p), "top_p {}", sampling.top_p);
        assert!((0.0..=1.0).contains(&sampling.min_p), "min_p {}", sampling.min_p);
        assert!(
            (0.01..=100.0).contains(&sampling.repetition_penalty),
            "repeat_penalty {}",
            sampling.repetition_penalty
        );
        assert!(sampling.top_k <= 1 << 20, "top_k {}", sampling.top_k);
        assert!(generation.stop.len() <= MAX_STOPS, "{} stop strings", generation.stop.len());
        assert!(generation.stop.iter().all(|s| !s.is_empty() && s.len() <= MAX_STOP_BYTES), "{:?}", generation.stop);
        match (&generation.prompt, endpoint) {
            (Prompt::Text(_), Endpoint::ChatCompletions) => panic!("a chat endpoint accepted a text prompt"),
            (Prompt::Chat { .. }, Endpoint::Completions) => panic!("the completions endpoint accepted a chat"),
            (Prompt::Chat { messages, .. }, _) => {
                assert!((1..=MAX_MESSAGES).contains(&messages.len()), "{} messages", messages.len());
                let roles = ["system", "user", "assistant"];
                assert!(messages.iter().all(|m| roles.contains(&m.role.as_str())), "roles of {messages:?}");
            }
            (Prompt::Text(text), _) => {
                if let Some(Value::String(given)) = object.get("prompt") {
                    assert_eq!(text, given, "the prompt is not what was sent");
                }
            }
        }
        match object.get("stream") {
            Some(Value::Bool(stream)) => assert_eq!(parsed.stream, *stream),
            _ => assert_eq!(parsed.stream, endpoint == Endpoint::Ndjson, "the endpoint's default stream"),
        }
        match object.get("auth") {
            Some(Value::String(auth)) => assert_eq!(parsed.auth.as_deref(), Some(auth.as_str())),
            _ => assert_eq!(parsed.auth, None),
        }
    }

    #[test]
    fn mutated_requests_are_refused_or_within_limits() {
        let tight = Limits { max_tokens: 16, ..Limits::default() };
        let settings = [
            (SamplingDefaults::default(), Limits::default()),
            (SamplingDefaults { max_tokens: 16, ..SamplingDefaults::default() }, tight),
        ];
        let pass = Pass::new("ndjson", ITERATIONS);
        let mut accepted = 0u64;
        let requests = valid_requests();
        pass.run(
            |random| make(random, &requests),
            |body| {
                for (defaults, limits) in &settings {
                    for endpoint in [Endpoint::Ndjson, Endpoint::Completions, Endpoint::ChatCompletions] {
                        match parse(body, endpoint, defaults, limits) {
                            Ok(parsed) => {
                                accepted += 1;
                                check_accepted(body, endpoint, limits, &parsed);
                            }
                            Err(error) => {
                                assert_eq!(error.status, 400, "{error}");
                                assert!(!error.message.is_empty());
                            }
                        }
                    }
                }
            },
        );
        eprintln!("fuzz ndjson: {accepted} of the parses accepted");
        if pass.iterations >= 1000 {
            assert!(accepted > 0, "no mutant was a valid request: the pass tests only the errors");
        }
    }
}

mod tokenizers {
    //! Both tokenizer kinds, on arbitrary text and arbitrary ids.

    use super::*;
    use bramble_runtime::tokenizer::synthetic::{byte_level_vocab, sentencepiece_vocab};
    use bramble_runtime::tokenizer::Tokenizer;
    use bramble_runtime::vocab::{TokenType, TokenizerKind};
    use bramble_tools::source::gguf::read_vocab;
    use bramble_tools::synth::gpt2_byte_to_char;

    /// Inputs per pass (about 5 s on a busy two-core machine).
    const ITERATIONS: u64 = 10_000;

    /// The first byte of an input: which tokenizer.
    const NAMES: [&str; 4] = ["synthetic byte-level BPE", "synthetic SentencePiece", "Llama-2", "SmolLM2"];
    /// The second byte: what to do with the rest.
    const ENCODE: u8 = 0;
    const DECODE: u8 = 1;

    /// The Llama-2 vocabulary's directory: the workplace's `shared/` or a
    /// copy beside the checkout (CI's), as `tools/tests/tokenizer.rs` finds it.
    fn llama_spm() -> Option<PathBuf> {
        let candidates = [
            PathBuf::from("/work/shared/data/llama-spm-vocab"),
            workspace_root().join("../shared/data/llama-spm-vocab"),
        ];
        let found = candidates.iter().map(|dir| dir.join("ggml-vocab-llama-spm.gguf")).find(|path| path.exists());
        if found.is_none() {
            assert!(
                std::env::var("BRAMBLE_SKIP_MODEL").is_ok_and(|v| v == "1"),
                "shared/data/llama-spm-vocab/ggml-vocab-llama-spm.gguf is missing (looked in {candidates:?}); \
                 set BRAMBLE_SKIP_MODEL=1 to skip"
            );
            eprintln!("BRAMBLE_SKIP_MODEL=1: the Llama-2 vocabulary is missing; fuzzing without it");
        }
        found
    }

    /// The tokenizers, by the number an input names them with; `None` when skipped.
    fn tokenizers() -> Vec<Option<Tokenizer>> {
        let from_gguf = |path: PathBuf| {
            let (vocab, _) = read_vocab(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            Tokenizer::new(&vocab).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        vec![
            Some(Tokenizer::new(&byte_level_vocab()).expect("the synthetic byte-level vocabulary")),
            Some(Tokenizer::new(&sentencepiece_vocab()).expect("the synthetic SentencePiece vocabulary")),
            llama_spm().map(from_gguf),
            default_model().map(from_gguf),
        ]
    }

    /// Pieces of text that tokenizers treat specially.
    const SPECIAL_TEXTS: [&str; 16] = [
        "<s>",
        "</s>",
        "<unk>",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im",
        "_end|>",
        "<0x0A>",
        "<0xFF>",
        "\u{2581}",
        "\u{2581}\u{2581}",
        "Ġ",
        "Ċ",
        "'s",
        "'LL",
    ];

    /// Characters of many scripts and classes: letters, digits in other
    /// scripts, combining marks, joiners, right-to-left text, emoji,
    /// control characters, unusual spaces.
    const ALPHABET: &str =
        "aZ09 \t\n\r'’sé\u{301}ßЖλ中한ع५½🙂\u{200d}🇬!?.,<>|_-\u{0}\u{a0}\u{3000}\u{2028}\u{ffff}\u{10ffff}\u{feff}אב٣";

    fn text(random: &mut Random) -> Vec<u8> {
        let alphabet: Vec<char> = ALPHABET.chars().collect();
        let mut text = String::new();
        for _ in 0..1 + random.below(6) {
            match random.below(6) {
                0 => text.extend((0..random.below(40)).map(|_| *random.pick(&alphabet))),
                1 => {
                    let special = *random.pick(&SPECIAL_TEXTS);
                    text.push_str(special)
                }
                2 => {
                    let run = *random.pick(&[" ", "\n", "\t", " \n", "\r\n", "  \u{2581}"]);
                    text.push_str(&run.repeat(random.below(3000)))
                }
                3 => {
                    let length = random.below(64);
                    text.push_str(&String::from_utf8_lossy(&random.bytes(length)))
                }
                4 => {
                    let sentence = *random.pick(&[
                        "Hello world",
                        " the and in er",
                        "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
                        "12345678901234567890",
                        "I'm you'll THEY'RE",
                    ]);
                    text.push_str(sentence)
                }
                _ => text.extend((0..random.below(40)).filter_map(|_| char::from_u32(random.below(0x11_0000) as u32))),
            }
        }
        text.into_bytes()
    }

    fn make(random: &mut Random, available: &[usize]) -> Vec<u8> {
        let tokenizer = *random.pick(available) as u8;
        if random.one_in(4) {
            let mut input = vec![tokenizer, DECODE];
            for _ in 0..random.below(64) {
                let id = match random.below(4) {
                    0 => *random.pick(&[u32::MAX, u32::MAX - 1, 0x8000_0000, 32_000, 49_152, 300, 0]),
                    _ => random.below(50_000) as u32,
                };
                input.extend_from_slice(&id.to_le_bytes());
            }
            input
        } else {
            let mut input = vec![tokenizer, ENCODE];
            input.extend(text(random));
            input
        }
    }

    /// The spellings this tokenizer cuts out of the text when special tokens are parsed.
    fn special_spellings(tokenizer: &Tokenizer) -> Vec<String> {
        let vocab = tokenizer.vocab();
        vocab
            .tokens
            .iter()
            .zip(&vocab.types)
            .filter(|(_, kind)| matches!(kind, TokenType::Control | TokenType::Unknown | TokenType::UserDefined))
            .filter_map(|(spelling, _)| String::from_utf8(spelling.clone()).ok())
            .filter(|spelling| !spelling.is_empty())
            .collect()
    }

    /// Which bytes have a token of their own (byte-level: GPT-2's character
    /// for it; SentencePiece: `<0xAB>`).
    fn byte_tokens(tokenizer: &Tokenizer) -> [bool; 256] {
        let vocab = tokenizer.vocab();
        let spellings: std::collections::HashSet<&[u8]> = vocab.tokens.iter().map(Vec::as_slice).collect();
        std::array::from_fn(|byte| {
            let spelling = match vocab.kind {
                TokenizerKind::ByteLevelBpe => gpt2_byte_to_char(byte as u8).to_string(),
                TokenizerKind::SentencePiece => format!("<0x{byte:02X}>"),
            };
            spellings.contains(spelling.as_bytes())
        })
    }

    fn check(input: &[u8], tokenizers: &[Option<Tokenizer>], specials: &[Vec<String>], byte_tokens: &[[bool; 256]]) {
        let [which, operation, payload @ ..] = input else { return };
        let Some(Some(tokenizer)) = tokenizers.get(*which as usize) else { return };
        let size = tokenizer.vocab().len();
        let name = NAMES[*which as usize];
        if *operation == DECODE {
            let ids: Vec<u32> = payload.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
            let known: Vec<u32> = ids.iter().copied().filter(|&id| (id as usize) < size).collect();
            // Ids past the vocabulary are not text: they decode to nothing.
            assert_eq!(tokenizer.decode(&ids), tokenizer.decode(&known), "{name}: {ids:?}");
            for &id in &ids {
                let _ = (tokenizer.token_text(id), tokenizer.is_end_of_generation(id));
                if id as usize >= size {
                    assert!(
                        tokenizer.token_bytes(id).is_empty() && tokenizer.token_text(id).is_empty(),
                        "{name}: {id}"
                    );
                }
            }
            return;
        }
        let text = String::from_utf8_lossy(payload);
        let has_special = specials[*which as usize].iter().any(|s| text.contains(s.as_str()));
        // A byte the vocabulary has no token for is dropped (or becomes a
        // non-control unknown token): that text cannot come back (SmolLM2
        // lacks 21 of the 256 bytes).
        let has_unknown_byte = text.bytes().any(|byte| !byte_tokens[*which as usize][byte as usize]);
        for (add_special, parse_special) in [(false, false), (true, false), (false, true), (true, true)] {
            let ids = tokenizer.encode(&text, add_special, parse_special);
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= size) {
                panic!("{name}: id {bad} is past the {size} tokens, encoding {}", shown(&text));
            }
            let decoded = tokenizer.decode(&ids);
            if (parse_special && has_special) || has_unknown_byte {
                // Parsed control tokens and the unknown token decode to nothing: no round trip.
                continue;
            }
            let expected = match tokenizer.vocab().kind {
                // SentencePiece cannot tell a typed "▁" from a space.
                TokenizerKind::SentencePiece => text.replace('\u{2581}', " "),
                TokenizerKind::ByteLevelBpe => text.to_string(),
            };
            assert!(
                decoded == expected,
                "{name} (add_special {add_special}, parse_special {parse_special}): {} encodes to {} ids, \
                 which decode to {}",
                shown(&text),
                ids.len(),
                shown(&decoded)
            );
        }
    }

    #[test]
    fn arbitrary_text_and_ids_round_trip_or_are_skipped() {
        let tokenizers = tokenizers();
        let specials: Vec<Vec<String>> =
            tokenizers.iter().map(|t| t.as_ref().map(special_spellings).unwrap_or_default()).collect();
        let byte_tokens: Vec<[bool; 256]> =
            tokenizers.iter().map(|t| t.as_ref().map_or([false; 256], byte_tokens)).collect();
        let available: Vec<usize> = (0..tokenizers.len()).filter(|&i| tokenizers[i].is_some()).collect();
        let pass = Pass::new("tokenizers", ITERATIONS);
        pass.run(|random| make(random, &available), |input| check(input, &tokenizers, &specials, &byte_tokens));
    }
}
