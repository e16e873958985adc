//! The bias constraint in the forward pass: after each layer the hidden
//! state loses `w_l` of its component along `d_l`, and `h · d_l` is recorded.

mod common;

use bramble_runtime::bias::{BiasConstraint, Centre};
use bramble_runtime::kernels::Kernels;
use bramble_runtime::model::{Logits, Model, RunState, Site};
use bramble_runtime::ModelImage;

fn constraint(dim: usize, weight: f32) -> BiasConstraint {
    // A unit direction with every component nonzero.
    let raw: Vec<f32> = (0..dim).map(|i| 1.0 + (i % 3) as f32).collect();
    let norm = raw.iter().map(|v| v * v).sum::<f32>().sqrt();
    BiasConstraint {
        kind: Default::default(),
        centre: Centre::Zero,
        layers: 1,
        dim,
        directions: raw.iter().map(|v| v / norm).collect(),
        readouts: None,
        weights: vec![weight],
        baseline_mean: vec![0.0],
        baseline_std: vec![1.0],
        loop_target: 0.0,
        loop_hard_limit: 0.0,
        signal: Default::default(),
        max_weights: vec![1.0],
        she_tokens: Vec::new(),
        he_tokens: Vec::new(),
        gates: Default::default(),
    }
}

/// Runs `tokens` from position 0: the logits and the residual stream after
/// the fixture's one layer (the constraint applied).
fn run(model: &Model<'_>, state: &mut RunState, tokens: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let mut residual = Vec::new();
    let mut see = |_: usize, site: Site, values: &[f32]| {
        if site == Site::Residual {
            residual = values.to_vec();
        }
    };
    let logits = model.forward_observed(state, tokens, 0, Logits::All, Some(&mut see)).unwrap().to_vec();
    (logits, residual)
}

/// Each token's `h · v` in a residual stream of `v.len()`-wide states.
fn projections(residual: &[f32], v: &[f32]) -> Vec<f32> {
    residual.chunks_exact(v.len()).map(|h| h.iter().zip(v).map(|(a, b)| a * b).sum()).collect()
}

#[test]
fn the_constraint_removes_its_share_and_records_projections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bramble");
    common::write_tiny(&path, |_| {});
    let image = ModelImage::open(&path).unwrap();
    let tokens = [1u32, 3, 4, 5];
    for kernels in Kernels::all_available() {
        let mut model = Model::with_options(&image, kernels, 1).unwrap();
        let dim = model.config.dim as usize;
        let mut state = model.new_state(16, 4);
        let plain = model.forward(&mut state, &tokens, 0, Logits::All).unwrap().to_vec();
        assert_eq!(state.projections().tokens, 0, "no constraint, nothing recorded");

        // w = 0: the same logits, bit for bit, and the projections recorded.
        model.set_bias(Some(constraint(dim, 0.0))).unwrap();
        let mut state = model.new_state(16, 4);
        let (same, residual) = run(&model, &mut state, &tokens);
        assert_eq!(same, plain, "{}: w = 0 changes nothing", kernels.name);
        let d = constraint(dim, 0.0).directions;
        let expected: f64 = projections(&residual, &d).iter().map(|&p| p as f64).sum();
        let stats = state.projections();
        assert_eq!(stats.tokens, 4);
        assert!(
            (stats.sum[0] - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
            "{}: {} vs {expected}",
            kernels.name,
            stats.sum[0]
        );
        assert!(expected.abs() > 1e-3, "the fixture's states have a component along d");

        // w = 1 (the state's predefined weight): nothing is left along d.
        model.set_bias(Some(constraint(dim, 1.0))).unwrap();
        let mut state = model.new_state(16, 4);
        assert_eq!(state.bias_weights(), &[1.0]);
        let (changed, residual) = run(&model, &mut state, &tokens);
        let left = projections(&residual, &d);
        assert!(left.iter().all(|p| p.abs() < 1e-4), "{}: {left:?}", kernels.name);
        assert_ne!(changed, plain, "{}: removing a direction changes the logits", kernels.name);
        // Centred at the baseline mean: w = 1 leaves every token's projection at that mean.
        let centred = BiasConstraint { centre: Centre::Baseline, baseline_mean: vec![0.5], ..constraint(dim, 1.0) };
        model.set_bias(Some(centred)).unwrap();
        let mut centred_state = model.new_state(16, 4);
        let left = projections(&run(&model, &mut centred_state, &tokens).1, &d);
        assert!(left.iter().all(|p| (p - 0.5).abs() < 1e-4), "{}: {left:?}", kernels.name);
        // The centres are the state's too (the feedback loop moves them): a
        // state told −0.25 lands every projection there, the section's 0.5 notwithstanding.
        assert_eq!(centred_state.bias_centres(), &[0.5]);
        centred_state.set_bias_centres(&[-0.25]).unwrap();
        centred_state.reset_projections();
        let moved = projections(&run(&model, &mut centred_state, &tokens).1, &d);
        assert!(moved.len() == 4 && moved.iter().all(|p| (p + 0.25).abs() < 1e-4), "{}: {moved:?}", kernels.name);
        assert!(centred_state.set_bias_centres(&[f32::NAN]).unwrap_err().message().contains("finite"));
        assert!(centred_state.set_bias_centres(&[0.0, 0.0]).is_err());
        model.set_bias(Some(constraint(dim, 1.0))).unwrap();
        // The weights are the state's: setting them back to 0 gives the plain logits.
        state.set_bias_weights(&[0.0]).unwrap();
        state.reset_projections();
        let back = model.forward(&mut state, &tokens, 0, Logits::All).unwrap().to_vec();
        assert_eq!(back, plain);
        assert!(state.set_bias_weights(&[1.5]).unwrap_err().message().contains("[0, 1]"));
        assert!(state.set_bias_weights(&[0.5, 0.5]).is_err());
    }
}

/// The whitened (oblique) form: the projection is read along `r` (`r · d =
/// 1`), recorded as `h · r`, and `w = 1` leaves it at the centre, moving `h`
/// along `d` only.
#[test]
fn a_whitened_constraint_reads_along_its_read_vector() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bramble");
    common::write_tiny(&path, |_| {});
    let image = ModelImage::open(&path).unwrap();
    let tokens = [1u32, 3, 4, 5];
    for kernels in Kernels::all_available() {
        let mut model = Model::with_options(&image, kernels, 1).unwrap();
        let dim = model.config.dim as usize;
        let plain = constraint(dim, 1.0);
        let d = plain.directions.clone();
        // r = d + a unit vector orthogonal to d.
        let mut e: Vec<f32> = (0..dim).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let along: f32 = e.iter().zip(&d).map(|(a, b)| a * b).sum();
        e.iter_mut().zip(&d).for_each(|(v, d)| *v -= along * d);
        let e_norm = e.iter().map(|v| v * v).sum::<f32>().sqrt();
        let r: Vec<f32> = d.iter().zip(&e).map(|(d, e)| d + e / e_norm).collect();
        let whitened =
            BiasConstraint { centre: Centre::Baseline, baseline_mean: vec![0.5], readouts: Some(r.clone()), ..plain };
        // Unconstrained states (w = 0): what the projections record.
        model.set_bias(Some(BiasConstraint { weights: vec![0.0], ..whitened.clone() })).unwrap();
        let mut state = model.new_state(16, 4);
        let before = run(&model, &mut state, &tokens).1;
        let expected: f32 = projections(&before, &r).iter().sum();
        let along_d: f32 = projections(&before, &d).iter().sum();
        let recorded = state.projections().sum[0] as f32;
        assert!(
            (recorded - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
            "{}: {recorded} vs {expected}",
            kernels.name
        );
        assert!((expected - along_d).abs() > 1e-2, "the fixture tells r from d");
        // w = 1: every token's h · r at the centre; h moved along d only.
        model.set_bias(Some(whitened)).unwrap();
        let mut state = model.new_state(16, 4);
        let after = run(&model, &mut state, &tokens).1;
        let left = projections(&after, &r);
        assert!(left.iter().all(|p| (p - 0.5).abs() < 1e-4), "{}: {left:?}", kernels.name);
        let moved: Vec<f32> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let off_d = projections(&moved, &e);
        assert!(off_d.iter().all(|p| (p / e_norm).abs() < 1e-4), "{}: moved {off_d:?} off d", kernels.name);
    }
}

#[test]
fn a_constraint_of_the_wrong_shape_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bramble");
    common::write_tiny(&path, |_| {});
    let image = ModelImage::open(&path).unwrap();
    let mut model = Model::new(&image).unwrap();
    let error = model.set_bias(Some(constraint(16, 0.5))).unwrap_err();
    assert!(error.message().contains("width 16"), "{error}");
    let mut two = constraint(32, 0.5);
    two.layers = 2;
    assert!(model.set_bias(Some(two)).is_err());
}

/// The writer half of `a_crash_during_saves_leaves_a_whole_state`: saves
/// alternating states as fast as it can until it is killed.
#[test]
fn saving_child() {
    let Ok(path) = std::env::var("BRAMBLE_BIAS_STATE_CHILD") else { return };
    let c = constraint(32, 0.0);
    let mut feedback = bramble_runtime::bias::FeedbackLoop::new(&c);
    for i in 0u64.. {
        feedback.weights[0] = if i % 2 == 0 { 0.25 } else { 0.75 };
        feedback.responses = i;
        feedback.save(std::path::Path::new(&path)).unwrap();
    }
}

/// Kills a process at random moments while it saves the feedback state:
/// every time, the file on disk restores as one of the states it wrote.
/// (Host only: under qemu-user the test binary cannot re-execute itself;
/// the property is the file system's, not the CPU's.)
#[test]
#[cfg_attr(target_arch = "aarch64", ignore = "re-executes its own binary: run on the host")]
fn a_crash_during_saves_leaves_a_whole_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bias.state");
    let c = constraint(32, 0.0);
    for round in 0..8u64 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "saving_child", "--nocapture", "--test-threads", "1"])
            .env("BRAMBLE_BIAS_STATE_CHILD", &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait for a first save, then kill it at a moment that varies.
        let started = std::time::Instant::now();
        while !path.exists() {
            assert!(started.elapsed().as_secs() < 30, "the saving child wrote nothing in 30 s");
            assert!(child.try_wait().unwrap().is_none(), "the saving child exited before saving");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::thread::sleep(std::time::Duration::from_millis(5 + 7 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        let mut feedback = bramble_runtime::bias::FeedbackLoop::new(&c);
        assert!(feedback.restore(&path).unwrap(), "round {round}: the state is there");
        let expected = if feedback.responses.is_multiple_of(2) { 0.25 } else { 0.75 };
        assert_eq!(feedback.weights[0], expected, "round {round}: a whole state");
    }
}
