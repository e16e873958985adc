//! Prompt batches over the f32 KV cache attend in tiles, a KV head at a time
//! (`Kernels::attention_causal`); decode steps and layers whose keys are
//! pruned attend a token at a time. Either way a prompt gives the logits of
//! one token at a time.

mod common;

use bramble_runtime::kernels::attention::Causal;
use bramble_runtime::kernels::Kernels;
use bramble_runtime::model::Logits;
use bramble_runtime::{Model, ModelImage};
use std::cell::Cell;

/// A batched prompt against one token at a time on a NEON or AVX2 table: the
/// batched kernel adds the scores and weighted values in another order and
/// applies the scale to the query. Relative to the largest logit (measured
/// below 1e-6 when written).
const BATCHED_RELATIVE: f32 = 1e-5;

thread_local! {
    /// Tokens [`counting`] attended on this thread (the forward pass attends on the caller's thread).
    static BATCHED_TOKENS: Cell<usize> = const { Cell::new(0) };
}

/// The reference batched kernel, counting the tokens it attends.
fn counting(shape: &Causal, queries: &[f32], keys: &[f32], values: &[f32], scratch: &mut [f32], out: &mut [f32]) {
    BATCHED_TOKENS.with(|tokens| tokens.set(tokens.get() + shape.tokens));
    (Kernels::SCALAR.attention_causal)(shape, queries, keys, values, scratch, out)
}

/// The reference table with a batched attention that counts.
static COUNTING: Kernels = Kernels { name: "counting", attention_causal: counting, ..Kernels::SCALAR };

/// Every position's logits of `tokens`, fed `batch` at a time from position 0.
fn logits(image: &ModelImage, kernels: &'static Kernels, tokens: &[u32], batch: usize) -> Vec<f32> {
    let model = Model::with_options(image, kernels, 1).unwrap();
    let mut state = model.new_state(tokens.len(), batch);
    let mut all = Vec::new();
    for (i, chunk) in tokens.chunks(batch).enumerate() {
        all.extend_from_slice(model.forward(&mut state, chunk, i * batch, Logits::All).unwrap());
    }
    all
}

/// Sixteen tokens of the tiny model's vocabulary, its whole context.
const PROMPT: [u32; 16] = [1, 3, 4, 5, 3, 4, 4, 5, 1, 3, 5, 5, 4, 3, 1, 4];

#[test]
fn a_batched_prompt_gives_the_logits_of_one_token_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bramble");
    common::write_tiny(&path, |_| {});
    let image = ModelImage::open(&path).unwrap();
    for kernels in Kernels::all_available() {
        let single = logits(&image, kernels, &PROMPT, 1);
        assert!(single.iter().all(|v| v.is_finite()), "{}", kernels.name);
        let largest = single.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Batches of the whole prompt (two heads a KV head: 32 rows, two tiles and a tail of 8),
        // of 5 (positions from 0, 5, 10; the last token alone), of 3 and of 2.
        for batch in [16, 5, 3, 2] {
            let batched = logits(&image, kernels, &PROMPT, batch);
            if kernels.name == "scalar" {
                // The reference runs each query through the same kernels as a single token: identical.
                assert_eq!(batched, single, "scalar, batches of {batch}");
                continue;
            }
            let worst = batched.iter().zip(&single).map(|(b, s)| (b - s).abs()).fold(0f32, f32::max);
            eprintln!(
                "{}: batches of {batch}: worst difference {:.2e} of the largest logit",
                kernels.name,
                worst / largest
            );
            assert!(
                worst <= BATCHED_RELATIVE * largest,
                "{}: batches of {batch}: worst difference {worst} (largest logit {largest})",
                kernels.name
            );
        }
    }
}

#[test]
fn prompt_batches_attend_in_tiles_and_decode_steps_and_pruned_layers_a_token_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bramble");
    common::write_tiny(&path, |_| {});
    let image = ModelImage::open(&path).unwrap();
    let attended = || BATCHED_TOKENS.with(Cell::get);
    let mut model = Model::with_options(&image, &COUNTING, 1).unwrap();
    model.set_kv_prune(0.5).unwrap();
    let mut state = model.new_state(16, 8);
    // A prompt of 7 (one layer, one KV head): one batched call of 7 tokens.
    let before = attended();
    model.forward(&mut state, &PROMPT[..7], 0, Logits::Last).unwrap();
    assert_eq!(attended() - before, 7, "the prompt attends in a batch");
    // A decode step attends a token at a time.
    model.forward(&mut state, &PROMPT[7..8], 7, Logits::Last).unwrap();
    assert_eq!(attended() - before, 7, "a decode step is not batched");
    // Once the prompt's keys are pruned, a follow-up batch attends a token at a time.
    state.end_prefill();
    assert_eq!(state.kv().pruned_positions(0), 8);
    model.forward(&mut state, &PROMPT[8..12], 8, Logits::Last).unwrap();
    assert_eq!(attended() - before, 7, "a pruned layer is not batched");
    // The same batch on a fresh state without pruning is batched again.
    model.set_kv_prune(0.0).unwrap();
    let mut state = model.new_state(16, 8);
    model.forward(&mut state, &PROMPT[..8], 0, Logits::Last).unwrap();
    model.forward(&mut state, &PROMPT[8..12], 8, Logits::Last).unwrap();
    assert_eq!(attended() - before, 7 + 12);
}
