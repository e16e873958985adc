//! Sliding-window layers through the whole forward pass: a tiny model whose
//! first and last layers slide over a window (with a RoPE base of their own,
//! as Gemma-3's local layers) and whose middle layer is global, in an image
//! written here, its logits held to the masked maths, to its own full history
//! masked in every KV mode, and batch to token.

use super::*;
use crate::architecture::{Family, LayerAttention};
use crate::config::ARCH_LLAMA;
use crate::image::layout::section;
use crate::image::{encode_vocab, ImageWriter};
use crate::vocab::{TokenType, Vocab};
use bytemuck::Zeroable;
use std::collections::HashMap;
use std::path::Path;

/// Base of the local layers' RoPE (the config's, for the global layer, is 10000).
const LOCAL_THETA: f32 = 1000.0;

fn config() -> ModelConfig {
    let mut c = ModelConfig::zeroed();
    c.arch = ARCH_LLAMA;
    (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) = (64, 3, 2, 1, 32, 96);
    (c.vocab_size, c.context_length, c.rope_theta, c.rope_dim, c.norm_eps) = (40, 512, 10000.0, 32, 1e-5);
    c.tied_output = 1;
    c
}

/// Layers 0 and 2 slide over `window` positions, layer 1 is global.
fn architecture(config: &ModelConfig, window: u32) -> Architecture {
    let mut a = Architecture::plain(Family::Llama, config);
    for l in [0, 2] {
        a.layers[l] = LayerAttention { window, rope_theta: LOCAL_THETA };
    }
    a
}

/// Writes the model with f32 weights (so the forward pass is f32 throughout)
/// and returns them by name for the reference.
fn write_image(path: &Path, window: u32) -> HashMap<String, Vec<f32>> {
    let mut weights = HashMap::new();
    write_test_image(path, &config(), &architecture(&config(), window), 7, |w, name, shape, values| {
        w.add_tensor(name, crate::quant::Encoding::F32, shape, bytemuck::cast_slice(&values)).unwrap();
        weights.insert(name.to_string(), values);
    });
    weights
}

/// Writes a test model of `c` and `architecture`: a vocabulary of `t3`,
/// `t4`, … after `<unk>`, `<s>`, `</s>`, and every tensor's values from a
/// generator seeded with `seed` (norms near 1, matrices of ±1.5/√cols, so
/// the scores and logits are of order 1), stored by `store(writer, name,
/// shape, values)`.
pub(super) fn write_test_image(
    path: &Path,
    c: &ModelConfig,
    architecture: &Architecture,
    mut seed: u32,
    mut store: impl FnMut(&mut ImageWriter, &str, &[usize], Vec<f32>),
) {
    let mut w = ImageWriter::create(path).unwrap();
    w.add_section(section::CONFIG, bytemuck::bytes_of(c), true).unwrap();
    let mut tokens: Vec<Vec<u8>> = ["<unk>", "<s>", "</s>"].iter().map(|t| t.as_bytes().to_vec()).collect();
    tokens.extend((3..c.vocab_size).map(|i| format!("t{i}").into_bytes()));
    let mut types = vec![TokenType::Unknown, TokenType::Control, TokenType::Control];
    types.resize(tokens.len(), TokenType::Normal);
    let vocab = Vocab::llama_sentencepiece(tokens, vec![0.0; c.vocab_size as usize], types);
    w.add_section(section::TOKENIZER, &encode_vocab(&vocab).unwrap(), true).unwrap();
    w.add_section(section::ARCHITECTURE, &architecture.to_section(), true).unwrap();
    for (name, shape) in architecture.tensors(c) {
        let n: usize = shape.iter().product();
        let (centre, spread) = match shape.len() {
            1 => (1.0, 0.2),
            _ => (0.0, 3.0 / (shape[1] as f32).sqrt()),
        };
        let values: Vec<f32> = (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                centre + spread * ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
            })
            .collect();
        store(&mut w, &name, &shape, values);
    }
    w.finish().unwrap();
}

/// `W · x` for a row-major `[rows, x.len()]` matrix, in f64.
fn product(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len()).map(|row| row.iter().zip(x).map(|(&w, x)| w as f64 * x).sum()).collect()
}

fn rms_norm(x: &[f64], weight: &[f32], eps: f64) -> Vec<f64> {
    let scale = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(weight).map(|(v, &w)| v * scale * w as f64).collect()
}

/// Rotates each head's adjacent pairs `(2i, 2i + 1)` by `pos · theta^(−2i / rope_dim)`.
fn rope(vector: &mut [f64], head_dim: usize, pos: usize, theta: f64) {
    for head in vector.chunks_exact_mut(head_dim) {
        for i in 0..head_dim / 2 {
            let angle = pos as f64 * theta.powf(-((2 * i) as f64) / head_dim as f64);
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * angle.cos() - b * angle.sin();
            head[2 * i + 1] = a * angle.sin() + b * angle.cos();
        }
    }
}

/// Every position's logits from the maths, in f64: the Llama block, each
/// layer's queries seeing the keys of positions `p − window + 1 ..= p` only
/// (the whole history where the window is 0), the history kept whole.
fn reference_logits(weights: &HashMap<String, Vec<f32>>, architecture: &Architecture, tokens: &[u32]) -> Vec<Vec<f64>> {
    let c = config();
    let (dim, head_dim, eps) = (c.dim as usize, c.head_dim as usize, c.norm_eps as f64);
    let w = |name: String| &weights[&name];
    let mut keys = vec![Vec::new(); c.n_layers as usize]; // (layer, position, kv_dim)
    let mut values = vec![Vec::new(); c.n_layers as usize];
    let mut all = Vec::new();
    for (pos, &token) in tokens.iter().enumerate() {
        let embedding = w("token_embd.weight".into());
        let mut x: Vec<f64> = embedding[token as usize * dim..][..dim].iter().map(|&v| v as f64).collect();
        for (l, layer) in architecture.layers.iter().enumerate() {
            let xn = rms_norm(&x, w(format!("blk.{l}.attn_norm.weight")), eps);
            let mut q = product(w(format!("blk.{l}.attn_q.weight")), &xn);
            let mut k = product(w(format!("blk.{l}.attn_k.weight")), &xn);
            let v = product(w(format!("blk.{l}.attn_v.weight")), &xn);
            rope(&mut q, head_dim, pos, layer.rope_theta as f64);
            rope(&mut k, head_dim, pos, layer.rope_theta as f64);
            keys[l].push(k);
            values[l].push(v);
            let first = if layer.window == 0 { 0 } else { (pos + 1).saturating_sub(layer.window as usize) };
            // One KV head: both query heads read it.
            let mut attended = Vec::new();
            for head in q.chunks_exact(head_dim) {
                let scores: Vec<f64> = (first..=pos)
                    .map(|t| head.iter().zip(&keys[l][t]).map(|(a, b)| a * b).sum::<f64>() / (head_dim as f64).sqrt())
                    .collect();
                let max = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                let mut sum = vec![0f64; head_dim];
                for (value, p) in values[l][first..=pos].iter().zip(&weights) {
                    sum.iter_mut().zip(value).for_each(|(s, v)| *s += p / total * v);
                }
                attended.extend(sum);
            }
            let out = product(w(format!("blk.{l}.attn_output.weight")), &attended);
            x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);
            let xn = rms_norm(&x, w(format!("blk.{l}.ffn_norm.weight")), eps);
            let gate = product(w(format!("blk.{l}.ffn_gate.weight")), &xn);
            let up = product(w(format!("blk.{l}.ffn_up.weight")), &xn);
            let hidden: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let down = product(w(format!("blk.{l}.ffn_down.weight")), &hidden);
            x.iter_mut().zip(&down).for_each(|(x, d)| *x += d);
        }
        let xn = rms_norm(&x, w("output_norm.weight".into()), eps);
        all.push(product(w("token_embd.weight".into()), &xn));
    }
    all
}

/// Tokens of a prompt of `n` positions.
fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 3 + (i * 17 + i / 3) % 37).collect()
}

/// Every position's logits, a token at a time.
fn logits_token_by_token(model: &Model, state: &mut RunState, tokens: &[u32]) -> Vec<Vec<f32>> {
    logits_token_by_token_from(model, state, tokens, 0)
}

/// The logits of positions `start..`, a token at a time (a rewind to `start` when more are written).
fn logits_token_by_token_from(model: &Model, state: &mut RunState, tokens: &[u32], start: usize) -> Vec<Vec<f32>> {
    let positions = tokens.iter().enumerate().skip(start);
    positions.map(|(pos, &t)| model.forward(state, &[t], pos, Logits::Last).unwrap().to_vec()).collect()
}

/// The windows of `architecture` widened to `context`: every position is seen (the layers stay
/// local for RoPE), the cache of a window no shorter than the context.
fn widened(architecture: &Architecture, context: usize) -> Vec<LayerAttention> {
    let mut layers = architecture.layers.clone();
    for layer in layers.iter_mut().filter(|l| l.is_local()) {
        layer.window = context as u32;
    }
    layers
}

/// The forward pass (f32 weights, f32 KV cache) against the f64 maths: sums
/// of 64 to 96 products in f32 through three layers, logits up to 3.4.
/// Measured 1.5e-6 when written.
const LOGIT_TOLERANCE: f32 = 2e-5;
/// The f32 cache's ring against its own full history masked, or a batch
/// against a token at a time: the same values summed in another order (the
/// NEON tables' causal tiles also take 2ˣ for eˣ). Measured 1.4e-6 (ring) and
/// 0 (batches, host tables) when written.
const ORDER_TOLERANCE: f32 = 1e-5;

/// A ring of the f16, q8 or q4 cache against its own full history masked. The
/// first windowed layer stores the same values either way, but its output
/// differs in the last bits (the order of the sums), and so do the next
/// layers' keys and values, which this cache then rounds: one can round the
/// other way, moving by one step of the mode (f16: 2⁻¹¹ of itself; q8: 1/255
/// of its group's range; q4: 1/15). A bound of about that share of the logits
/// (up to 3.4); measured 1.5e-5 (f16), 2.1e-6 (q8), 1.6e-6 (q4) when written.
/// The f16 cache's prompt batches against a token at a time, for the same
/// reason (its causal tiles): measured 1.1e-5 on the NEON tables.
/// The caches themselves are held to the order tolerance on identical inputs
/// (`kv::tests::a_ring_attends_exactly_as_the_full_history_masked_to_the_window`).
fn rounded_order_tolerance(mode: KvMode) -> f32 {
    match mode {
        KvMode::F32 => ORDER_TOLERANCE,
        KvMode::F16 => 2e-3,
        KvMode::Q8 => 1e-2,
        KvMode::Q4 => 0.2,
    }
}

fn worst(got: &[f32], expected: &[f32]) -> f32 {
    got.iter().zip(expected).map(|(g, e)| (g - e).abs()).fold(0f32, f32::max)
}

/// (window, context): a window of 5 in 40 positions (no quantized group is
/// ever seen), one of 70 in 160 (q8/q4: groups in a ring of two), and one
/// of 5 in 300, whose f32 and f16 rings (5 + REWIND_SLOTS slots) turn at
/// 261 and are then read in two pieces.
const CASES: [(u32, usize); 3] = [(5, 40), (70, 160), (5, 300)];

#[test]
fn windowed_layers_give_the_masked_maths_at_every_position() {
    let dir = tempfile::tempdir().unwrap();
    for (window, context) in CASES {
        let path = dir.path().join(format!("window-{window}-{context}.bramble"));
        let weights = write_image(&path, window);
        let image = ModelImage::open(&path).unwrap();
        let model = Model::new(&image).unwrap();
        assert!(model.architecture.has_local_layers());
        // A context longer than the window is no longer refused.
        let mut state = model.try_new_state(context, 1).unwrap();
        let prompt = tokens(context);
        let got = logits_token_by_token(&model, &mut state, &prompt);
        let expected = reference_logits(&weights, &model.architecture, &prompt);
        for (pos, (got, expected)) in got.iter().zip(&expected).enumerate() {
            let expected: Vec<f32> = expected.iter().map(|&v| v as f32).collect();
            let difference = worst(got, &expected);
            assert!(difference <= LOGIT_TOLERANCE, "window {window}, position {pos}: worst difference {difference}");
        }
        // The window matters: the maths of a global model differs past it.
        let global = reference_logits(&weights, &Architecture::plain(Family::Llama, &config()), &prompt);
        assert!((global[context - 1][0] - expected[context - 1][0]).abs() > 1e-3, "window {window} changed nothing");
    }
}

#[test]
fn every_kv_mode_rings_as_its_own_full_history_masked_and_batches_as_tokens() {
    let dir = tempfile::tempdir().unwrap();
    for (window, context) in CASES {
        let path = dir.path().join(format!("window-{window}-{context}.bramble"));
        write_image(&path, window);
        let image = ModelImage::open(&path).unwrap();
        for mode in KvMode::ALL {
            let mut model = Model::new(&image).unwrap();
            model.set_kv_mode(mode).unwrap();
            let name = format!("{mode}, window {window}, context {context}");
            let prompt = tokens(context);
            let mut ring = model.try_new_state(context, 8).unwrap();
            let got = logits_token_by_token(&model, &mut ring, &prompt);
            // The same mode keeping every position of the windowed layers, masking instead.
            let mut masked = model.try_new_state(context, 1).unwrap();
            masked.kv =
                KvCache::keeping_every_position(mode, &model.config, context, &model.architecture.layers).unwrap();
            let expected = logits_token_by_token(&model, &mut masked, &prompt);
            // And with windows no shorter than the context: what the ring must be until it slides.
            let layers = widened(&model.architecture, context);
            let options = StateOptions { layers: &layers, ..model.state_options() };
            let mut wide = RunState::try_with_rope(&model.config, None, context, 1, options).unwrap();
            let unwindowed = logits_token_by_token(&model, &mut wide, &prompt);
            for pos in 0..context {
                let difference = worst(&got[pos], &expected[pos]);
                let tolerance = rounded_order_tolerance(mode);
                assert!(difference <= tolerance, "{name}, position {pos}: worst difference {difference}");
                if pos < window as usize {
                    assert_eq!(got[pos], unwindowed[pos], "{name}, position {pos}");
                }
            }
            assert!(got[context - 1] != unwindowed[context - 1], "{name}: the window changed nothing");
            // Prompt batches (7 tokens a forward, every position's logits) give the same: to the
            // order tolerance where they run a token at a time or over the f32 cache; the f16
            // cache's tiles sum in another order too, and the next layer's keys and values, which
            // it rounds, may then round the other way (as its ring against its masked history).
            let batch_tolerance = match mode {
                KvMode::F16 => rounded_order_tolerance(mode),
                _ => ORDER_TOLERANCE,
            };
            let vocab = model.config.vocab_size as usize;
            let mut batched = model.try_new_state(context, 8).unwrap();
            for (i, chunk) in prompt.chunks(7).enumerate() {
                let logits = model.forward(&mut batched, chunk, 7 * i, Logits::All).unwrap();
                for (b, row) in logits.chunks_exact(vocab).enumerate() {
                    let difference = worst(row, &got[7 * i + b]);
                    assert!(difference <= batch_tolerance, "{name}, batched position {}: {difference}", 7 * i + b);
                }
            }
        }
    }
}

#[test]
fn a_rewind_past_what_the_ring_holds_is_refused_and_one_within_it_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("window-5.bramble");
    write_image(&path, 5);
    let image = ModelImage::open(&path).unwrap();
    let model = Model::new(&image).unwrap();
    // The rings hold 5 + REWIND_SLOTS = 261 positions: 290 written leave 29..290, and a token at
    // p sees p − 4 ..= p, so 33 is the deepest exact rewrite.
    let (context, written) = (300, 290);
    let deepest = written - crate::kv::REWIND_SLOTS - 1;
    let prompt = tokens(written);
    let mut state = model.try_new_state(context, 1).unwrap();
    let straight = logits_token_by_token(&model, &mut state, &prompt);
    // Rewriting from `deepest` is exact; one deeper is an error.
    let again = logits_token_by_token_from(&model, &mut state, &prompt, deepest);
    assert_eq!(again[..], straight[deepest..]);
    let error = model.forward(&mut state, &prompt[deepest - 1..deepest], deepest - 1, Logits::Last).unwrap_err();
    assert!(error.message().contains(&format!("position {}", deepest - 1)), "{error}");
    assert!(error.message().contains("from 0"), "{error}");
    // From 0, everything runs again.
    let rerun = logits_token_by_token(&model, &mut state, &prompt);
    assert_eq!(rerun, straight);
    // A session keeps a prefix only where the rings can go on from it.
    let tokenizer = crate::tokenizer::Tokenizer::new(image.vocab()).unwrap();
    let sampler = crate::sampler::SamplerConfig::default();
    let mut session = crate::session::Session::new(&model, &tokenizer, context, sampler);
    session.feed(&prompt).unwrap();
    let mut longer = prompt.clone();
    longer.extend([5, 6]);
    assert_eq!(session.reuse_prefix(&longer), written, "the whole history is a prefix: nothing to rewind");
    // A reply of 200 tokens regenerated: the rings still hold what its first token sees.
    let mut regenerated = prompt[..written - 200].to_vec();
    regenerated.extend([5, 6]);
    assert_eq!(session.reuse_prefix(&regenerated), written - 200, "the rings hold 86..90 still");
    session.feed(&regenerated[written - 200..]).unwrap();
    let expected = logits_token_by_token(&model, &mut state, &regenerated);
    let difference = worst(session.logits().unwrap(), &expected[written - 199]);
    assert!(difference <= ORDER_TOLERANCE, "worst difference {difference} after the rewind");
    // An edit deeper than that runs the conversation again from 0.
    session.reset();
    session.feed(&prompt).unwrap();
    let mut edited = prompt[..25].to_vec();
    edited.extend([5, 6]);
    assert_eq!(session.reuse_prefix(&edited), 0, "25 of 290 shared, but the rings no longer hold 21..25");
    session.feed(&edited).unwrap();
    // Fed in batches (the global layer's tiles): the logits of one token at a time, up to the sums' order.
    let difference = worst(session.logits().unwrap(), &logits_token_by_token(&model, &mut state, &edited)[26]);
    assert!(difference <= ORDER_TOLERANCE, "worst difference {difference}");
}
