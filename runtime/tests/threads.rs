//! The forward pass gives the same logits on 1 to 4 threads, for single
//! tokens and for batches (rows are split between threads, never summed across them).

mod common;

use bramble_runtime::kernels::Kernels;
use bramble_runtime::model::Logits;
use bramble_runtime::{Model, ModelImage};

/// Logits of 4 prompt tokens and 5 decoded ones.
fn logits(image: &ModelImage, kernels: &'static Kernels, threads: usize) -> Vec<f32> {
    let model = Model::with_options(image, kernels, threads).unwrap();
    let mut state = model.new_state(16, 4);
    let mut all = model.forward(&mut state, &[1, 3, 4, 5], 0, Logits::All).unwrap().to_vec();
    for (pos, token) in [3u32, 4, 5, 3, 4].into_iter().enumerate() {
        all.extend_from_slice(model.forward(&mut state, &[token], 4 + pos, Logits::Last).unwrap());
    }
    all
}

/// Interleaved kernels against row-major ones on the same blocks: the
/// reference does the same arithmetic in the same order (exact); the NEON
/// tables add a block's products in another order. Relative to the largest logit.
const LAYOUT_RELATIVE: f32 = 1e-4;

#[test]
fn interleaved_and_row_major_images_give_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let (rows_path, mixed_path) = (dir.path().join("rows.bramble"), dir.path().join("x4.bramble"));
    common::write_tiny_with_layout(&rows_path, false, |_| {});
    common::write_tiny_with_layout(&mixed_path, true, |_| {});
    let (rows, mixed) = (ModelImage::open(&rows_path).unwrap(), ModelImage::open(&mixed_path).unwrap());
    let interleaved: Vec<_> = mixed.tensors().iter().filter(|t| t.encoding.rows_interleaved() > 1).collect();
    assert_eq!(interleaved.len(), 5, "q, k, output, gate and up are interleaved: {interleaved:?}");
    let reference = logits(&rows, &Kernels::SCALAR, 1);
    assert_eq!(logits(&mixed, &Kernels::SCALAR, 1), reference, "scalar kernels");
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    for kernels in Kernels::all_available() {
        for threads in [1, 3] {
            for (a, b) in logits(&mixed, kernels, threads).iter().zip(&logits(&rows, kernels, threads)) {
                assert!((a - b).abs() <= LAYOUT_RELATIVE * scale, "{} {threads} threads: {a} vs {b}", kernels.name);
            }
        }
    }
}

#[test]
fn one_to_four_threads_agree_exactly() {
    for interleave in [false, true] {
        one_to_four_threads_agree_exactly_with(interleave);
    }
}

fn one_to_four_threads_agree_exactly_with(interleave: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bramble");
    common::write_tiny_with_layout(&path, interleave, |_| {});
    let image = ModelImage::open(&path).unwrap();
    let run = |threads: usize| {
        let model = Model::with_options(&image, Kernels::detect(), threads).unwrap();
        assert_eq!(model.pool.threads(), threads);
        let mut state = model.new_state(16, 4);
        let mut all = model.forward(&mut state, &[1, 3, 4, 5], 0, Logits::All).unwrap().to_vec();
        for (pos, token) in [3u32, 4, 5, 3, 4].into_iter().enumerate() {
            all.extend_from_slice(model.forward(&mut state, &[token], 4 + pos, Logits::Last).unwrap());
        }
        all
    };
    let single = run(1);
    assert!(single.iter().all(|v| v.is_finite()));
    for threads in 2..=4 {
        assert_eq!(run(threads), single, "{threads} threads differ from one");
    }
}

#[test]
fn the_observer_sees_every_module_input_and_changes_nothing() {
    use bramble_runtime::model::Site;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bramble");
    common::write_tiny(&path, |_| {});
    let image = ModelImage::open(&path).unwrap();
    let model = Model::with_options(&image, Kernels::detect(), 1).unwrap();
    let c = model.config;
    let mut state = model.new_state(16, 4);
    let plain = model.forward(&mut state, &[1, 3, 4], 0, Logits::All).unwrap().to_vec();
    let mut seen = Vec::new();
    let mut observer = |layer: usize, site: Site, values: &[f32]| seen.push((layer, site, values.to_vec()));
    let observed =
        model.forward_observed(&mut state, &[1, 3, 4], 0, Logits::All, Some(&mut observer)).unwrap().to_vec();
    assert_eq!(observed, plain);
    let widths = [
        (Site::AttentionInput, c.dim as usize),
        (Site::AttentionOutput, c.q_dim()),
        (Site::FfnInput, c.dim as usize),
        (Site::FfnHidden, c.ffn_dim as usize),
        (Site::Residual, c.dim as usize),
    ];
    assert_eq!(seen.len(), 5 * c.n_layers as usize);
    for (i, (layer, site, values)) in seen.iter().enumerate() {
        assert_eq!((*layer, *site), (i / 5, widths[i % 5].0));
        assert_eq!(values.len(), 3 * widths[i % 5].1, "{site:?}: a batch of three tokens");
        assert!(values.iter().all(|v| v.is_finite()) && values.iter().any(|&v| v != 0.0), "{site:?}");
    }
}
