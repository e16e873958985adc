//! A decode step allocates nothing: after a prompt is fed, `Session::step`
//! (sampling with temperature, top-k, top-p, min-p and a repetition penalty,
//! then the forward pass) and `TextStream::push` of the token's bytes make no
//! heap allocation, for every weight encoding and for the real model, with
//! an f32 KV cache, an f16 one (whose steps round each key and value), and
//! quantized ones (whose steps quantize a group of
//! keys and values when the full-precision window fills), and with key-channel
//! pruning (whose first step prunes the prompt's keys in place), and on
//! every family's block (Qwen2, Qwen3, Gemma-3 with its sliding-window
//! rings). Nor does a prompt batch, in any KV mode (the f32 cache's attends
//! in tiles).
//!
//! This test binary installs the runtime's counting global allocator
//! (`bramble_runtime::allocations`, the one `bramble` and `brambled` install)
//! and reads the calling thread's count, so the test harness and tests
//! running in parallel on other threads do not disturb it. `Model::new` runs
//! on the calling thread alone, so that is every allocation of a step.
//! Decoding on a thread pool is checked by `cli.rs` (`bench --threads 2`),
//! where the binary's allocator counts every thread.

use bramble_runtime::allocations::{thread_allocations, CountingAllocator};
use bramble_runtime::architecture::Family;
use bramble_runtime::kv::{KvMode, KEY_GROUP, RESIDUAL_WINDOW};
use bramble_runtime::model::Model;
use bramble_runtime::sampler::SamplerConfig;
use bramble_runtime::session::{Finish, GenerationSink, Session, TextStream};
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::vocab::TokenizerKind;
use bramble_runtime::ModelImage;
use bramble_tests::*;
use bramble_tools::convert::{convert, ConvertOptions, QuantTarget};
use bramble_tools::synth::SyntheticShape;
use std::ops::ControlFlow;
use std::path::Path;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `f` and returns its result and the allocations this thread made in it.
fn count_allocations<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = thread_allocations();
    let result = f();
    (result, thread_allocations() - before)
}

/// Decode steps counted (the brief asks for at least 32).
const STEPS: usize = 40;

/// Not greedy: every stage of the sampler runs.
fn sampling() -> SamplerConfig {
    SamplerConfig {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        min_p: 0.05,
        repetition_penalty: 1.1,
        repeat_last_n: 64,
        seed: 1234,
    }
}

/// Feeds `prompt`, then counts the allocations of [`STEPS`] steps with text streaming.
/// Returns the allocations, the tokens and the streamed byte count.
fn decode_allocations(image: &Path, prompt: &str, context: usize) -> (u64, Vec<u32>, usize) {
    decode_allocations_with_kv(image, prompt, context, KvMode::F32)
}

/// As [`decode_allocations`] with the KV cache stored as `kv`.
fn decode_allocations_with_kv(image: &Path, prompt: &str, context: usize, kv: KvMode) -> (u64, Vec<u32>, usize) {
    decode_allocations_with(image, prompt, context, kv, 0.0)
}

/// As [`decode_allocations_with_kv`] with `--kv-prune ratio`.
fn decode_allocations_with(
    image: &Path,
    prompt: &str,
    context: usize,
    kv: KvMode,
    prune: f32,
) -> (u64, Vec<u32>, usize) {
    let image = ModelImage::open(image).unwrap();
    let mut model = Model::new(&image).unwrap();
    model.set_kv_mode(kv).unwrap();
    model.set_kv_prune(prune).unwrap();
    let tokenizer = Tokenizer::new(image.vocab()).unwrap();
    let mut session = Session::new(&model, &tokenizer, context, sampling());
    let prompt = tokenizer.encode(prompt, true, false);
    assert!(prompt.len() + STEPS <= context, "prompt of {} tokens leaves no room for {STEPS} steps", prompt.len());
    session.feed(&prompt).unwrap();
    // A stop string that will not appear, so the stream's hold-back logic runs on every push.
    let stops = vec!["<<never seen>>".to_string()];
    let mut stream = TextStream::new(&stops);
    let mut tokens = [0u32; STEPS];
    let mut streamed = 0usize;
    let (result, allocations) = count_allocations(|| {
        for token in tokens.iter_mut() {
            *token = session.step()?;
            stream.push(tokenizer.token_bytes(*token), &mut |piece: &str| streamed += piece.len());
        }
        Ok::<(), bramble_runtime::Error>(())
    });
    result.unwrap();
    let (used, full) = session.key_bytes_in_use();
    assert_eq!(used < full, prune > 0.0, "keys in use {used} of {full} bytes with --kv-prune {prune}");
    (allocations, tokens.to_vec(), streamed)
}

#[test]
fn the_counter_sees_allocations() {
    // Guards the other tests against a counter that never counts.
    let (vector, allocations) = count_allocations(|| std::hint::black_box(vec![1u8; 100]));
    assert_eq!(vector.len(), 100);
    assert!(allocations >= 1, "the counting allocator saw no allocation for a new Vec");
}

#[test]
fn synthetic_decode_steps_allocate_nothing_in_any_encoding() {
    let dir = tempfile::tempdir().unwrap();
    for tokenizer in [TokenizerKind::ByteLevelBpe, TokenizerKind::SentencePiece] {
        // Untied: a tied synthetic model keeps sampling one token, an untied one varies, so more of the stream runs.
        let model = synthetic(synth_cli_shape(64, 2, false, tokenizer), 3);
        for quant in ["q4", "q4s", "q5s", "q5", "q8", "f16", "f32"] {
            let path = dir.path().join(format!("{tokenizer:?}-{quant}.bramble"));
            convert(&model, &path, &ConvertOptions::new(QuantTarget::parse(quant).unwrap())).unwrap();
            let (allocations, tokens, streamed) = decode_allocations(&path, "Hello world, the hat", 128);
            eprintln!("{tokenizer:?} {quant}: {allocations} allocations in {STEPS} steps; {streamed} bytes streamed; tokens {tokens:?}");
            assert_eq!(allocations, 0, "{tokenizer:?} {quant}: {STEPS} decode steps allocated {allocations} times");
        }
    }
}

/// The k-quant encodings on a model whose every matrix is whole
/// super-blocks of 256 (width 256, FFN 512), stored four rows interleaved
/// where the rows allow (the default layout) and row-major elsewhere.
#[test]
fn k_quant_decode_steps_allocate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let shape =
        SyntheticShape { dim: 256, ffn_dim: 512, ..synth_cli_shape(256, 2, false, TokenizerKind::ByteLevelBpe) };
    let model = synthetic(shape, 3);
    for quant in ["q4k", "q5k", "q6k", "q3k", "q2k"] {
        let path = dir.path().join(format!("{quant}.bramble"));
        convert(&model, &path, &ConvertOptions::new(QuantTarget::parse(quant).unwrap())).unwrap();
        let image = ModelImage::open(&path).unwrap();
        let kquant = image.tensors().iter().filter(|t| t.encoding.row_major().name() == quant).count();
        assert!(kquant > 0, "{quant}: no matrix stored as {quant}");
        let (allocations, tokens, streamed) = decode_allocations(&path, "Hello world, the hat", 128);
        eprintln!("{quant}: {allocations} allocations in {STEPS} steps; {streamed} bytes streamed; tokens {tokens:?}");
        assert_eq!(allocations, 0, "{quant}: {STEPS} decode steps allocated {allocations} times");
    }
}

#[test]
fn every_family_decodes_without_allocating() {
    // Qwen2's biases, Qwen3's q/k norms, Gemma-3's GeGLU, post norms and
    // sliding-window rings (window 32 of a context of 128: the prompt and 40
    // steps wrap them), in q4 and with an f32 and a q8 cache.
    let dir = tempfile::tempdir().unwrap();
    for family in [Family::Qwen2, Family::Qwen3, Family::Gemma3] {
        let shape = SyntheticShape { family, dim: 128, ffn_dim: 320, n_layers: 3, ..SyntheticShape::default() };
        let path = dir.path().join(format!("{}.bramble", family.name()));
        convert(&synthetic(shape, 5), &path, &ConvertOptions::new(QuantTarget::parse("q4").unwrap())).unwrap();
        for kv in [KvMode::F32, KvMode::Q8] {
            let (allocations, tokens, _) = decode_allocations_with_kv(&path, "Hello world, the hat", 128, kv);
            eprintln!("{} kv {kv}: {allocations} allocations in {STEPS} steps; tokens {tokens:?}", family.name());
            assert_eq!(allocations, 0, "{} kv {kv}: {STEPS} decode steps allocated {allocations} times", family.name());
        }
    }
}

#[test]
fn real_model_q4_decode_steps_allocate_nothing() {
    let Some(image) = default_image("q4") else {
        return;
    };
    let (allocations, tokens, streamed) =
        decode_allocations(&image, "Once upon a time, in a small village by the sea,", 256);
    eprintln!("SmolLM2 q4: {allocations} allocations in {STEPS} steps; {streamed} bytes streamed; tokens {tokens:?}");
    assert!(streamed > 0, "the real model streamed no text in {STEPS} steps");
    assert_eq!(allocations, 0, "SmolLM2 q4: {STEPS} decode steps allocated {allocations} times");
}

#[test]
fn decode_steps_allocate_nothing_with_an_f16_kv_cache() {
    let dir = tempfile::tempdir().unwrap();
    // Heads of 32 (the NEON kernels' pieces of 16) and of 24 (their steps of four): both kinds of loop run.
    let mut images = Vec::new();
    for (name, shape) in [
        (
            "synthetic, heads of 32",
            SyntheticShape { dim: 128, n_layers: 2, n_heads: 4, n_kv_heads: 2, ..SyntheticShape::default() },
        ),
        (
            "synthetic, heads of 24",
            SyntheticShape { dim: 96, n_layers: 2, n_heads: 4, n_kv_heads: 2, ..SyntheticShape::default() },
        ),
    ] {
        let image = dir.path().join(format!("{}.bramble", images.len()));
        convert_synthetic(&synthetic(shape, 9), &image, "q8");
        images.push((name, image));
    }
    images.extend(default_image("q4").map(|image| ("SmolLM2 q4", image)));
    let prompt = "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.";
    for (name, image) in images {
        let (allocations, tokens, _) = decode_allocations_with_kv(&image, prompt, 128, KvMode::F16);
        eprintln!("{name} kv f16: {allocations} allocations in {STEPS} steps; tokens {tokens:?}");
        assert_eq!(allocations, 0, "{name} kv f16: {STEPS} decode steps allocated {allocations} times");
    }
}

#[test]
fn decode_steps_allocate_nothing_with_a_quantized_kv_cache() {
    // A prompt that ends a few positions before the window first fills, so the
    // counted steps quantize groups (at positions 64 and 96).
    let prompt = "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. \
                  Every morning he rowed out past the rocks, and every evening she waited on the shore with a \
                  lantern and a basket of bread, watching the gulls wheel over the harbour until his small blue \
                  boat came round the point again, heavy with mackerel, crabs and the odd lost boot";
    let dir = tempfile::tempdir().unwrap();
    let shape = SyntheticShape { dim: 128, n_layers: 2, n_heads: 4, n_kv_heads: 2, ..SyntheticShape::default() };
    let synthetic_image = dir.path().join("heads-of-32.bramble");
    convert_synthetic(&synthetic(shape, 9), &synthetic_image, "q8");
    let mut images = vec![("synthetic", synthetic_image)];
    images.extend(default_image("q4").map(|image| ("SmolLM2 q4", image)));
    // Positions p.. are decoded: p ≤ 64 and p + STEPS − 1 ≥ 96.
    let lengths = RESIDUAL_WINDOW + KEY_GROUP + 1 - STEPS..=RESIDUAL_WINDOW;
    for (name, image) in images {
        let tokenizer = Tokenizer::new(ModelImage::open(&image).unwrap().vocab()).unwrap();
        // The shortest prefix of the text, at a word boundary, whose tokens are that many.
        let ends = prompt.match_indices(' ').map(|(i, _)| i).chain([prompt.len()]);
        let prompt = ends
            .map(|end| &prompt[..end])
            .find(|prefix| lengths.contains(&tokenizer.encode(prefix, true, false).len()))
            .unwrap_or_else(|| panic!("{name}: no prefix of the prompt is {lengths:?} tokens"));
        for kv in [KvMode::Q8, KvMode::Q4] {
            let (allocations, tokens, _) = decode_allocations_with_kv(&image, prompt, 128, kv);
            eprintln!("{name} kv {kv}: {allocations} allocations in {STEPS} steps; tokens {tokens:?}");
            assert_eq!(allocations, 0, "{name} kv {kv}: {STEPS} decode steps allocated {allocations} times");
        }
    }
}

#[test]
fn decode_steps_allocate_nothing_with_key_channel_pruning() {
    let dir = tempfile::tempdir().unwrap();
    let shape = SyntheticShape { dim: 128, n_layers: 2, n_heads: 4, n_kv_heads: 2, ..SyntheticShape::default() };
    let synthetic_image = dir.path().join("heads-of-32.bramble");
    convert_synthetic(&synthetic(shape, 9), &synthetic_image, "q8");
    let mut images = vec![("synthetic", synthetic_image)];
    images.extend(default_image("q4").map(|image| ("SmolLM2 q4", image)));
    let prompt = "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.";
    for (name, image) in images {
        for prune in [0.3, 0.5] {
            // The first counted step prunes the prompt's keys; the rest attend over them.
            let (allocations, tokens, _) = decode_allocations_with(&image, prompt, 128, KvMode::F32, prune);
            eprintln!("{name} --kv-prune {prune}: {allocations} allocations in {STEPS} steps; tokens {tokens:?}");
            assert_eq!(allocations, 0, "{name} --kv-prune {prune}: {STEPS} decode steps allocated {allocations} times");
        }
    }
}

/// A sink that counts what it is given, without allocating (the daemon's sinks write to a socket the same way).
#[derive(Default)]
struct CountingSink {
    tokens: usize,
    bytes: usize,
    /// Allocate a new string for every piece: a sink that breaks the promise.
    allocate: bool,
}

impl GenerationSink for CountingSink {
    fn token(&mut self, _token: u32) {
        self.tokens += 1;
    }
    fn text(&mut self, piece: &str) -> ControlFlow<()> {
        self.bytes += if self.allocate { std::hint::black_box(piece.to_string()).len() } else { piece.len() };
        ControlFlow::Continue(())
    }
}

#[test]
fn the_shared_generation_loop_reports_its_decode_allocations_and_they_are_none() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic(synth_cli_shape(64, 2, false, TokenizerKind::ByteLevelBpe), 3);
    let path = dir.path().join("bpe-q4.bramble");
    convert(&model, &path, &ConvertOptions::new(QuantTarget::parse("q4").unwrap())).unwrap();
    let image = ModelImage::open(&path).unwrap();
    let model = Model::new(&image).unwrap();
    let tokenizer = Tokenizer::new(image.vocab()).unwrap();
    let mut session = Session::new(&model, &tokenizer, 128, sampling());
    let prompt = tokenizer.encode("Hello world, the hat", true, false);
    let stops = vec!["<<never seen>>".to_string()];

    let mut sink = CountingSink::default();
    let generated = session.generate(&prompt, STEPS, &stops, &|| false, &mut sink).unwrap();
    eprintln!("Session::generate: {generated:?}; sink saw {} tokens, {} bytes", sink.tokens, sink.bytes);
    assert_eq!(generated.tokens, sink.tokens, "every counted token reached the sink");
    assert!(generated.tokens > 0 && generated.finish != Finish::Cancelled, "{generated:?}");
    assert_eq!(generated.decode_allocations, 0, "the decode loop allocated: {generated:?}");

    // The count is live: a sink that allocates per piece is caught, from the same loop.
    session.reset();
    let mut allocating = CountingSink { allocate: true, ..CountingSink::default() };
    let generated = session.generate(&prompt, STEPS, &stops, &|| false, &mut allocating).unwrap();
    assert!(allocating.bytes > 0, "the allocating sink was given text: {generated:?}");
    assert!(generated.decode_allocations > 0, "an allocating sink went uncounted: {generated:?}");

    // Cancelled before the first token: nothing generated, and the cache holds the prompt only.
    session.reset();
    let generated = session.generate(&prompt, STEPS, &stops, &|| true, &mut CountingSink::default()).unwrap();
    assert_eq!((generated.finish, generated.tokens), (Finish::Cancelled, 0));
    assert_eq!(session.history().len(), 0, "cancelled before its first prompt batch");
}

/// Regression: a generation that ended inside a UTF-8 character (found by
/// `brambled`'s own count, on the aarch64 end-to-end run) made the stream's
/// final flush allocate a lossy copy of the held bytes.
#[test]
fn finishing_a_stream_on_an_incomplete_character_allocates_nothing() {
    let euro = "€".as_bytes();
    let mut stream = TextStream::new(&["<<never seen>>".to_string()]);
    let mut streamed = 0usize;
    let ((), allocations) = count_allocations(|| {
        stream.push(b"a", &mut |piece: &str| streamed += piece.len());
        stream.push(&euro[..2], &mut |piece: &str| streamed += piece.len());
        stream.finish(&mut |piece: &str| streamed += piece.len());
    });
    assert_eq!(streamed, 1, "the text before the incomplete character, and no U+FFFD for it");
    assert_eq!(allocations, 0, "finishing the stream allocated {allocations} times");
}

#[test]
fn prompt_batches_allocate_nothing_in_every_kv_mode() {
    use bramble_runtime::model::Logits;
    // Three query heads a KV head, heads of 32 (every KV mode runs): f32 batches attend in tiles.
    let shape = SyntheticShape { dim: 192, n_layers: 2, n_heads: 6, n_kv_heads: 2, ..SyntheticShape::default() };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("three-heads-a-kv-head.bramble");
    convert(&synthetic(shape, 5), &path, &ConvertOptions::new(QuantTarget::parse("q8").unwrap())).unwrap();
    let image = ModelImage::open(&path).unwrap();
    let tokens: Vec<u32> = (0..100u32).map(|i| (i * 37 + 11) % image.config().vocab_size).collect();
    for kv in KvMode::ALL {
        let mut model = Model::with_options(&image, bramble_runtime::kernels::Kernels::detect(), 1).unwrap();
        model.set_kv_mode(kv).unwrap();
        let mut state = model.new_state(128, 32);
        // Batches of 32, 32, 32 and 4, every position's logits.
        let (_, allocations) = count_allocations(|| {
            for (i, batch) in tokens.chunks(32).enumerate() {
                model.forward(&mut state, batch, i * 32, Logits::All).unwrap();
            }
        });
        assert_eq!(allocations, 0, "{kv}: four prompt batches allocated {allocations} times");
    }
}
