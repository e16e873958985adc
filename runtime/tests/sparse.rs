//! The R-Sparse forward path: with a low-rank part that reproduces the
//! weights exactly (U = I, SVᵀ = W), any split of the channels between the
//! exact and the low-rank path must give the dense model's logits, up to the
//! low-rank path's f16 weights and f32 activations; τ = 0 is the dense path.

mod common;

use bramble_runtime::kernels::Kernels;
use bramble_runtime::model::{Logits, Model, SparseMode};
use bramble_runtime::rsparse::{Rsparse, SparseModule};
use bramble_runtime::ModelImage;
use half::f16;

/// The low-rank path's error against the int8 dense path, relative to the largest logit.
const LOW_RANK_RELATIVE: f32 = 0.03;

const PARTS: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

/// A plan for every projection with `SVᵀ = W` (dequantized) and `U = I`.
fn identity_plan(model: &Model, threshold: f32) -> Rsparse {
    let mut modules = Vec::new();
    for (l, layer) in model.weights.layers.iter().enumerate() {
        let matrices = [&layer.wq, &layer.wk, &layer.wv, &layer.wo, &layer.w_gate, &layer.w_up, &layer.w_down];
        for (part, m) in PARTS.iter().zip(matrices) {
            let mut sv = vec![f16::ZERO; m.rows * m.cols];
            let mut row = vec![0f32; m.cols];
            for r in 0..m.rows {
                m.row_to_f32(r, &mut row);
                for (o, &v) in sv[r * m.cols..(r + 1) * m.cols].iter_mut().zip(&row) {
                    *o = f16::from_f32(v);
                }
            }
            let u = (0..m.rows * m.rows).map(|i| if i / m.rows == i % m.rows { f16::ONE } else { f16::ZERO }).collect();
            modules.push(SparseModule {
                name: format!("blk.{l}.{part}.weight"),
                rows: m.rows,
                cols: m.cols,
                sparsity: 0.5,
                alpha: 0.95,
                threshold,
                scores: vec![1.0; m.cols],
                rank: m.rows,
                sv,
                u,
            });
        }
    }
    Rsparse { target: 0.5, modules }
}

fn run(model: &Model) -> (Vec<f32>, Option<f64>) {
    let mut state = model.new_state(16, 4);
    let mut all = model.forward(&mut state, &[1, 3, 4, 5], 0, Logits::All).unwrap().to_vec();
    for (pos, token) in [3u32, 4, 5].into_iter().enumerate() {
        all.extend_from_slice(model.forward(&mut state, &[token], 4 + pos, Logits::Last).unwrap());
    }
    (all, state.take_measured_sparsity())
}

#[test]
fn any_split_with_an_exact_low_rank_part_gives_the_dense_logits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bramble");
    common::write_tiny_with_layout(&path, true, |_| {});
    let image = ModelImage::open(&path).unwrap();
    for kernels in Kernels::all_available() {
        let mut model = Model::with_options(&image, kernels, 2).unwrap();
        let (dense, none) = run(&model);
        assert_eq!(none, None, "a dense model measures no sparsity");
        let scale = dense.iter().fold(0f32, |m, v| m.max(v.abs()));
        // τ = 0: every nonzero channel is exact, so it is the dense product itself.
        model.set_sparsity(Some(identity_plan(&model, 0.0)), SparseMode::Always).unwrap();
        let (same, share) = run(&model);
        assert_eq!(same, dense, "{}: τ = 0", kernels.name);
        assert!(share.unwrap() < 0.01, "{}: τ = 0 masks {share:?}", kernels.name);
        for (threshold, low, high) in [(0.3, 0.2, 0.9), (f32::INFINITY, 1.0, 1.0)] {
            for mode in [SparseMode::Always, SparseMode::DecodeOnly] {
                model.set_sparsity(Some(identity_plan(&model, threshold)), mode).unwrap();
                let (got, share) = run(&model);
                let share = share.unwrap();
                assert!((low..=high).contains(&share), "{} τ {threshold}: masked share {share}", kernels.name);
                for (i, (g, d)) in got.iter().zip(&dense).enumerate() {
                    assert!(
                        (g - d).abs() <= LOW_RANK_RELATIVE * scale,
                        "{} τ {threshold} {mode:?} [{i}]: {g} vs {d}",
                        kernels.name
                    );
                }
                if mode == SparseMode::DecodeOnly {
                    // The prompt ran dense: its logits are the dense ones exactly.
                    assert_eq!(got[..4 * 6], dense[..4 * 6], "{} {mode:?}: prompt", kernels.name);
                }
            }
        }
    }
}

#[test]
fn plans_that_do_not_fit_the_model_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bramble");
    common::write_tiny(&path, |_| {});
    let image = ModelImage::open(&path).unwrap();
    let mut model = Model::new(&image).unwrap();
    let mut plan = identity_plan(&model, 0.5);
    plan.modules[0].name = "blk.7.attn_q.weight".into();
    let error = model.set_sparsity(Some(plan), SparseMode::Always).err().unwrap();
    assert!(error.message().contains("blk.7.attn_q.weight"), "{error}");
    // A state made before the plan has no scratch for it: an error, not a panic.
    let mut old_state = model.new_state(16, 4);
    model.set_sparsity(Some(identity_plan(&model, 0.5)), SparseMode::Always).unwrap();
    let error = model.forward(&mut old_state, &[1, 3], 0, Logits::Last).err().unwrap();
    assert!(error.message().contains("make a new one"), "{error}");
    assert!(model.forward(&mut model.new_state(16, 4), &[1, 3], 0, Logits::Last).is_ok());
    let mut plan = identity_plan(&model, 0.5);
    let m = &mut plan.modules[2];
    (m.rank, m.sv, m.u) = (m.rows + 1, vec![f16::ZERO; (m.rows + 1) * m.cols], vec![f16::ZERO; m.rows * (m.rows + 1)]);
    let error = model.set_sparsity(Some(plan), SparseMode::Always).err().unwrap();
    assert!(error.message().contains("blk.0.attn_v.weight") && error.message().contains("rank"), "{error}");
    let mut plan = identity_plan(&model, 0.5);
    plan.modules[1].rows += 1;
    let error = model.set_sparsity(Some(plan), SparseMode::Always).err().unwrap();
    assert!(error.message().contains("blk.0.attn_k.weight"), "{error}");
}

/// Channel-major against row-major storage of the same weights, relative to
/// the largest logit: the NEON channel kernels sum the blocks' float terms
/// in another order (the scalar ones give the same bits).
const CHANNEL_MAJOR_RELATIVE: f32 = 1e-4;

#[test]
fn channel_major_weights_give_the_row_major_logits_and_read_fewer_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (rows_path, columns_path) = (dir.path().join("rows.bramble"), dir.path().join("columns.bramble"));
    common::write_tiny_with_layout(&rows_path, true, |_| {});
    common::write_tiny_stored(&columns_path, common::Store::Channels, |_| {});
    let (by_rows, by_columns) = (ModelImage::open(&rows_path).unwrap(), ModelImage::open(&columns_path).unwrap());
    let q = by_columns.tensor("blk.0.attn_q.weight").unwrap().encoding;
    let up = by_columns.tensor("blk.0.ffn_up.weight").unwrap().encoding;
    assert_eq!((q.name(), up.name()), ("q4c", "q8c"), "the fixture stores channel-major projections");
    for kernels in Kernels::all_available() {
        for threads in [1, 3] {
            let what = format!("{} × {threads}", kernels.name);
            let mut rows_model = Model::with_options(&by_rows, kernels, threads).unwrap();
            let mut columns_model = Model::with_options(&by_columns, kernels, threads).unwrap();
            let compare = |got: &[f32], expected: &[f32], case: &str| {
                let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (i, (g, e)) in got.iter().zip(expected).enumerate() {
                    if kernels.name == "scalar" {
                        assert_eq!(g.to_bits(), e.to_bits(), "{what} {case} [{i}]: {g} vs {e}");
                    } else {
                        assert!((g - e).abs() <= CHANNEL_MAJOR_RELATIVE * scale, "{what} {case} [{i}]: {g} vs {e}");
                    }
                }
            };
            // Dense: prompts and decode steps on every channel.
            compare(&run(&columns_model).0, &run(&rows_model).0, "dense");
            for threshold in [0.3, 1.5] {
                rows_model.set_sparsity(Some(identity_plan(&rows_model, threshold)), SparseMode::Always).unwrap();
                columns_model.set_sparsity(Some(identity_plan(&rows_model, threshold)), SparseMode::Always).unwrap();
                let measure = |model: &Model| {
                    let mut state = model.new_state(16, 4);
                    let logits = model.forward(&mut state, &[1, 3, 4, 5], 0, Logits::All).unwrap().to_vec();
                    (logits, state.take_measured_sparsity(), state.take_sparse_bytes())
                };
                let (expected, share, (rows_read, rows_dense)) = measure(&rows_model);
                let (got, same_share, (columns_read, columns_dense)) = measure(&columns_model);
                compare(&got, &expected, &format!("τ {threshold}"));
                assert_eq!(share, same_share, "{what}: the same channels are masked");
                assert_eq!(rows_dense, columns_dense, "{what}: the same dense bytes");
                assert!(columns_read < rows_read, "{what} τ {threshold}: {columns_read} ≥ {rows_read} bytes");
            }
        }
    }
}

/// A calibrated image's prompt, as `generate` and `brambled` run it: with a
/// plan on decode steps only, a batch of tokens goes through the
/// channel-major GEMM, a single token through the one-token channel
/// kernels. Both must give the same logits for the same tokens, within
/// [`CHANNEL_MAJOR_RELATIVE`]: prompts of 2 to 16 tokens (the GEMM's tiles
/// of 8, 4, 2 and 1 tokens and every mix of them) in one batch against
/// the same tokens one at a time, on one thread and on three, without a
/// plan and with one at τ = 0 (its decode steps are then the dense
/// product, `any_split_with_an_exact_low_rank_part_gives_the_dense_logits`).
#[test]
fn channel_major_prompts_give_the_token_by_token_logits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("columns.bramble");
    common::write_tiny_stored(&path, common::Store::Channels, |_| {});
    let image = ModelImage::open(&path).unwrap();
    let tokens: Vec<u32> = (0..16u32).map(|i| (i * 7 + 1) % 6).collect();
    for kernels in Kernels::all_available() {
        for threads in [1, 3] {
            let mut model = Model::with_options(&image, kernels, threads).unwrap();
            for plan in [false, true] {
                let plan = plan.then(|| identity_plan(&model, 0.0));
                model.set_sparsity(plan, SparseMode::DecodeOnly).unwrap();
                for n in 2..=tokens.len() {
                    let prompt = &tokens[..n];
                    let mut state = model.new_state(16, 16);
                    let batched = model.forward(&mut state, prompt, 0, Logits::All).unwrap().to_vec();
                    let mut state = model.new_state(16, 16);
                    let mut one_by_one = Vec::new();
                    for (pos, &token) in prompt.iter().enumerate() {
                        one_by_one.extend_from_slice(model.forward(&mut state, &[token], pos, Logits::Last).unwrap());
                    }
                    let scale = one_by_one.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for (i, (b, o)) in batched.iter().zip(&one_by_one).enumerate() {
                        assert!(
                            (b - o).abs() <= CHANNEL_MAJOR_RELATIVE * scale,
                            "{} × {threads}, plan {}, {n} tokens [{i}]: batched {b} vs one by one {o}",
                            kernels.name,
                            model.sparsity().is_some()
                        );
                    }
                }
            }
        }
    }
}
