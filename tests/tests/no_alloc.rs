//! A decode step allocates nothing: after a prompt is fed, `Session::step`
//! (sampling with temperature, top-k, top-p, min-p and a repetition penalty,
//! then the forward pass) and `TextStream::push` of the token's bytes make no
//! heap allocation, for every weight encoding and for the real model.
//!
//! This test binary installs a counting global allocator. It counts only
//! allocations made on a thread that has switched counting on, so the test
//! harness and tests running in parallel on other threads do not disturb it.
//! `Model::new` runs on the calling thread alone, so that is every allocation
//! of a step. Decoding on a thread pool is checked by `cli.rs`
//! (`bench --threads 2`), where the binary's allocator counts every thread.

use bramble_runtime::model::Model;
use bramble_runtime::sampler::SamplerConfig;
use bramble_runtime::session::{Session, TextStream};
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::vocab::TokenizerKind;
use bramble_runtime::ModelImage;
use bramble_tests::*;
use bramble_tools::convert::{convert, ConvertOptions, QuantTarget};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The system allocator, counting the allocations of threads that ask for it.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Whether this thread's allocations are counted (const-initialized: reading it never allocates).
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn counting() -> bool {
    COUNTING.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: every call is forwarded unchanged to the system allocator; the only
// addition is reading a thread-local flag and a relaxed counter increment.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counting() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if counting() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counting() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `f` with this thread's allocations counted; returns its result and the count.
///
/// The counter is global, but only this thread adds to it while the flag is
/// set; another test thread counting at the same time could add too, so the
/// count is read as a difference and every counting section here is short.
fn count_allocations<R>(f: impl FnOnce() -> R) -> (R, u64) {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    let result = f();
    COUNTING.with(|c| c.set(false));
    (result, ALLOCATIONS.load(Ordering::Relaxed) - before)
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
    let image = ModelImage::open(image).unwrap();
    let model = Model::new(&image).unwrap();
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
        for quant in ["q4", "q4s", "q8", "f16", "f32"] {
            let path = dir.path().join(format!("{tokenizer:?}-{quant}.bramble"));
            convert(&model, &path, &ConvertOptions::new(QuantTarget::parse(quant).unwrap())).unwrap();
            let (allocations, tokens, streamed) = decode_allocations(&path, "Hello world, the hat", 128);
            eprintln!("{tokenizer:?} {quant}: {allocations} allocations in {STEPS} steps; {streamed} bytes streamed; tokens {tokens:?}");
            assert_eq!(allocations, 0, "{tokenizer:?} {quant}: {STEPS} decode steps allocated {allocations} times");
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
