//! The forward pass gives the same logits on 1 to 4 threads, for single
//! tokens and for batches (rows are split between threads, never summed across them).

mod common;

use bramble_runtime::kernels::Kernels;
use bramble_runtime::model::Logits;
use bramble_runtime::{Model, ModelImage};

#[test]
fn one_to_four_threads_agree_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bramble");
    common::write_tiny(&path, |_| {});
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
