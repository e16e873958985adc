//! A model with sliding-window layers decodes without allocating, in every
//! KV mode, well past its window: the rings turn (f32 and f16 slots, q8 and
//! q4 groups of codes) and the quantized caches send groups to the codes
//! inside the counted steps.
//!
//! This binary installs the runtime's counting global allocator and reads
//! the calling thread's count, as `tests/tests/no_alloc.rs` does.

use bramble_runtime::allocations::{thread_allocations, CountingAllocator};
use bramble_runtime::architecture::{Architecture, Family, LayerAttention};
use bramble_runtime::config::ARCH_LLAMA;
use bramble_runtime::image::layout::section;
use bramble_runtime::image::{encode_vocab, ImageWriter};
use bramble_runtime::kv::{KvMode, KEY_GROUP};
use bramble_runtime::model::{Logits, Model};
use bramble_runtime::quant::{quantize_into, Encoding};
use bramble_runtime::vocab::{TokenType, Vocab};
use bramble_runtime::{ModelConfig, ModelImage};
use bytemuck::Zeroable;
use std::path::Path;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The sliding window of layers 0 and 2 (layer 1 is global).
const WINDOW: u32 = 40;

/// A three-layer model, heads of 32 (every KV mode runs it), q8 matrices,
/// layers 0 and 2 sliding over [`WINDOW`] positions with a RoPE base of their own.
fn write_image(path: &Path) {
    let mut c = ModelConfig::zeroed();
    c.arch = ARCH_LLAMA;
    (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) = (64, 3, 2, 1, 32, 96);
    (c.vocab_size, c.context_length, c.rope_theta, c.rope_dim, c.norm_eps) = (40, 256, 10000.0, 32, 1e-5);
    c.tied_output = 1;
    let mut architecture = Architecture::plain(Family::Llama, &c);
    for l in [0, 2] {
        architecture.layers[l] = LayerAttention { window: WINDOW, rope_theta: 1000.0 };
    }
    let mut w = ImageWriter::create(path).unwrap();
    w.add_section(section::CONFIG, bytemuck::bytes_of(&c), true).unwrap();
    let mut tokens: Vec<Vec<u8>> = ["<unk>", "<s>", "</s>"].iter().map(|t| t.as_bytes().to_vec()).collect();
    tokens.extend((3..c.vocab_size).map(|i| format!("t{i}").into_bytes()));
    let mut types = vec![TokenType::Unknown, TokenType::Control, TokenType::Control];
    types.resize(tokens.len(), TokenType::Normal);
    let vocab = Vocab::llama_sentencepiece(tokens, vec![0.0; c.vocab_size as usize], types);
    w.add_section(section::TOKENIZER, &encode_vocab(&vocab).unwrap(), true).unwrap();
    w.add_section(section::ARCHITECTURE, &architecture.to_section(), true).unwrap();
    let mut seed = 11u32;
    for (name, shape) in architecture.tensors(&c) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                let noise = (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                if shape.len() == 1 {
                    1.0 + 0.2 * noise
                } else {
                    3.0 * noise / (shape[1] as f32).sqrt()
                }
            })
            .collect();
        let encoding = if shape.len() == 1 { Encoding::F32 } else { Encoding::Q8 };
        let mut bytes = vec![0u8; encoding.bytes_for(n)];
        quantize_into(encoding, &values, &mut bytes);
        w.add_tensor(&name, encoding, &shape, &bytes).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn decode_steps_past_the_window_allocate_nothing_in_every_kv_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("windowed.bramble");
    write_image(&path);
    let image = ModelImage::open(&path).unwrap();
    assert!(image.architecture().has_local_layers());
    let (context, prompt, steps) = (256, 100, 90);
    let tokens: Vec<u32> = (0..(prompt + steps) as u32).map(|i| 3 + (i * 17 + i / 3) % 37).collect();
    for kv in KvMode::ALL {
        let mut model = Model::new(&image).unwrap();
        model.set_kv_mode(kv).unwrap();
        let mut state = model.try_new_state(context, 8).unwrap();
        for (i, batch) in tokens[..prompt].chunks(8).enumerate() {
            model.forward(&mut state, batch, 8 * i, Logits::Last).unwrap();
        }
        state.end_prefill();
        let before = thread_allocations();
        for pos in prompt..prompt + steps {
            std::hint::black_box(model.forward(&mut state, &tokens[pos..pos + 1], pos, Logits::Last).unwrap());
        }
        let allocations = thread_allocations() - before;
        // The counted steps (positions 100..190) turn the rings twice and quantize the groups at 128 and 160.
        assert!(prompt > WINDOW as usize && steps > 2 * WINDOW as usize);
        if kv.bits().is_some() {
            assert!(state.kv().quantized_positions(0) >= 4 * KEY_GROUP, "{kv}: no group quantized in the steps");
        }
        assert_eq!(allocations, 0, "{kv}: {steps} decode steps of a windowed model allocated {allocations} times");
    }
    // The counter counts (a guard against a test that cannot fail).
    let before = thread_allocations();
    std::hint::black_box(vec![0u8; 64]);
    assert!(thread_allocations() > before, "the counting allocator saw no allocation");
}
