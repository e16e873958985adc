//! Spike-aware mixed precision (`bramble convert --mixed auto`, `docs/mixed.md`)
//! on tiny synthetic models with a planted activation spike:
//!
//! - a spike planted in one layer's down input (one gate/up row scaled) makes
//!   `--mixed auto` keep exactly that `ffn_down` at q8 (or f16) while every
//!   other matrix is q4s, and the image's `source` section records it;
//! - a spike planted in one layer's attention input (one RMSNorm weight
//!   scaled) keeps that layer's q, k and v;
//! - the same model without a spike keeps nothing under the default rule;
//! - the command prints the choice and leaves no temporary files; bad options
//!   and bad calibration text are refused before anything is written.

use bramble_runtime::image::layout::section;
use bramble_runtime::{Encoding, ModelImage};
use bramble_tools::convert::{convert, ConvertOptions, QuantTarget};
use bramble_tools::mixed::{plan, MixedOptions, Selection};
use bramble_tools::synth::{SyntheticModel, SyntheticShape};
use std::path::Path;
use std::process::Command;

/// Four layers, so each kind of input has a median over layers that one
/// planted spike does not move.
fn model() -> SyntheticModel {
    SyntheticModel::generate(SyntheticShape { n_layers: 4, ..SyntheticShape::default() }, 7)
}

/// Multiplies the values of tensor `name` at `indices` by `factor`.
fn scale(model: &mut SyntheticModel, name: &str, indices: std::ops::Range<usize>, factor: f32) {
    let tensor = model.tensors.iter_mut().find(|t| t.0 == name).unwrap_or_else(|| panic!("no tensor {name}"));
    for v in &mut tensor.2[indices] {
        *v *= factor;
    }
}

/// A spike in layer 2's down input: channel 7 of `silu(gate) ⊙ up` made
/// about 150 times its neighbours by scaling row 7 of gate and of up.
fn down_spike(model: &mut SyntheticModel) {
    let dim = model.config.dim as usize;
    for part in ["ffn_gate", "ffn_up"] {
        scale(model, &format!("blk.2.{part}.weight"), 7 * dim..8 * dim, 12.0);
    }
}

fn text() -> String {
    "The quick brown fox jumps over the lazy dog. Hello world, and the rest of it! ".repeat(12)
}

fn options() -> MixedOptions {
    MixedOptions { tokens: 512, ctx: 64, batch: 16, ..MixedOptions::default() }
}

fn source_json(image: &ModelImage) -> serde_json::Value {
    serde_json::from_slice(image.section(section::SOURCE).expect("a source section")).unwrap()
}

/// The encoding of every `blk.*` matrix of the image, by name.
fn matrix_encodings(image: &ModelImage) -> Vec<(String, Encoding)> {
    image
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with("blk.") && t.shape.len() == 2)
        .map(|t| (t.name.clone(), t.encoding))
        .collect()
}

#[test]
fn planted_down_spike_is_kept_at_q8_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = model();
    down_spike(&mut model);
    let plan = plan(&model, &text(), QuantTarget::Q4S, dir.path(), &options()).unwrap();
    assert_eq!(plan.tensors, ["blk.2.ffn_down.weight"], "{:#?}", plan.chosen);
    assert_eq!(plan.chosen.len(), 1);
    assert_eq!((plan.chosen[0].layer, plan.chosen[0].site), (2, "ffn_hidden"));
    let ordinary = plan.medians["ffn_hidden"];
    assert!(plan.chosen[0].score > 4.0 * ordinary, "{} vs median {ordinary}", plan.chosen[0].score);
    assert_eq!(plan.scores.len(), 16);
    // The temporary f16 image is gone.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    let output = dir.path().join("mixed.bramble");
    let mut convert_options = ConvertOptions::new(QuantTarget::Q4S);
    convert_options.mixed = Some(plan);
    convert(&model, &output, &convert_options).unwrap();
    let image = ModelImage::open(&output).unwrap();
    let encodings = matrix_encodings(&image);
    assert_eq!(encodings.len(), 28);
    for (name, encoding) in &encodings {
        let expected = if name == "blk.2.ffn_down.weight" { Encoding::Q8X4 } else { Encoding::Q4SX4 };
        assert_eq!(*encoding, expected, "{name}");
    }
    let source = source_json(&image);
    let mixed = &source["mixed"];
    assert_eq!(mixed["precision"], "q8", "{source}");
    assert_eq!(mixed["tensors"], serde_json::json!(["blk.2.ffn_down.weight"]));
    assert_eq!(mixed["chosen"][0]["layer"], 2);
    assert_eq!(mixed["chosen"][0]["site"], "ffn_hidden");
    assert_eq!(mixed["scores"]["ffn_hidden"].as_array().unwrap().len(), 4);
    assert_eq!(mixed["scores"].as_object().unwrap().len(), 4);
    assert!(mixed["rule"].as_str().unwrap().contains("4 x median"), "{mixed}");
}

#[test]
fn planted_attention_input_spike_keeps_q_k_v_at_f16() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = model();
    // Channel 5 of layer 1's attention RMSNorm 60 times larger: a spike in q, k and v's input.
    scale(&mut model, "blk.1.attn_norm.weight", 5..6, 60.0);
    let options = MixedOptions { precision: QuantTarget::F16, ..options() };
    let plan = plan(&model, &text(), QuantTarget::Q4, dir.path(), &options).unwrap();
    assert_eq!(plan.tensors, ["blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_v.weight"]);
    let output = dir.path().join("mixed.bramble");
    let mut convert_options = ConvertOptions::new(QuantTarget::Q4);
    convert_options.mixed = Some(plan);
    convert(&model, &output, &convert_options).unwrap();
    let image = ModelImage::open(&output).unwrap();
    for (name, encoding) in matrix_encodings(&image) {
        let kept = name.starts_with("blk.1.attn_") && !name.contains("output");
        assert_eq!(encoding, if kept { Encoding::F16 } else { Encoding::Q4X4 }, "{name}");
    }
    assert_eq!(source_json(&image)["mixed"]["precision"], "f16");
}

#[test]
fn without_a_spike_the_rule_keeps_nothing_and_keep_n_takes_the_top() {
    let dir = tempfile::tempdir().unwrap();
    let model = model();
    let plan_default = plan(&model, &text(), QuantTarget::Q4S, dir.path(), &options()).unwrap();
    assert!(plan_default.tensors.is_empty(), "{:#?}", plan_default.chosen);

    let mut spiky = model.clone();
    down_spike(&mut spiky);
    let options = MixedOptions { selection: Selection::Keep(2), ..options() };
    let plan = plan(&spiky, &text(), QuantTarget::Q4S, dir.path(), &options).unwrap();
    assert_eq!(plan.chosen.len(), 2);
    assert_eq!(plan.tensors[0], "blk.2.ffn_down.weight");
    assert!(plan.chosen[0].score >= plan.chosen[1].score);
}

/// Writes the down-spike model as an f32 GGUF and a calibration text into `dir`.
fn spiky_gguf(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut model = model();
    down_spike(&mut model);
    let gguf = dir.join("spiky.gguf");
    bramble_tools::source::gguf::write_gguf(&model, &gguf, bramble_tools::source::gguf::GgmlType::F32).unwrap();
    let calibration = dir.join("calib.txt");
    std::fs::write(&calibration, text()).unwrap();
    (gguf, calibration)
}

fn bramble(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bramble")).args(args).current_dir(dir).output().unwrap()
}

#[test]
fn cli_mixed_auto_prints_the_choice_and_leaves_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    spiky_gguf(dir.path());
    let args = [
        "convert",
        "--input",
        "spiky.gguf",
        "--output",
        "out/mixed.bramble",
        "--quant",
        "q4s",
        "--mixed",
        "auto",
        "--calib-text",
        "calib.txt",
        "--calib-tokens",
        "512",
        "--threads",
        "1",
    ];
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let run = bramble(&args, dir.path());
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("1 kept at q8"), "{stdout}");
    assert!(stdout.contains("layer  2 ffn_hidden") && stdout.contains("blk.2.ffn_down.weight"), "{stdout}");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("out")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["mixed.bramble"]);
    let image = ModelImage::open(&dir.path().join("out/mixed.bramble")).unwrap();
    assert_eq!(image.tensor("blk.2.ffn_down.weight").unwrap().encoding, Encoding::Q8X4);
    assert_eq!(image.tensor("blk.3.ffn_down.weight").unwrap().encoding, Encoding::Q4SX4);

    // --json carries the plan; --mixed off (the default) records none.
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let run = bramble(&json_args, dir.path());
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["mixed"]["tensors"], serde_json::json!(["blk.2.ffn_down.weight"]));
    let run = bramble(&["convert", "--input", "spiky.gguf", "--output", "plain.bramble", "--quant", "q4s"], dir.path());
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let image = ModelImage::open(&dir.path().join("plain.bramble")).unwrap();
    assert!(source_json(&image).get("mixed").is_none());
    assert_eq!(image.tensor("blk.2.ffn_down.weight").unwrap().encoding, Encoding::Q4SX4);
}

#[test]
fn cli_refuses_bad_mixed_options() {
    let dir = tempfile::tempdir().unwrap();
    spiky_gguf(dir.path());
    std::fs::write(dir.path().join("empty.txt"), "").unwrap();
    let base = ["convert", "--input", "spiky.gguf", "--output", "x.bramble", "--threads", "1"];
    let cases: [(&[&str], &str); 8] = [
        (&["--mixed", "auto"], "--mixed auto needs --calib-text"),
        (&["--mixed", "auto", "--calib-text", "empty.txt"], "gives 0 tokens"),
        (&["--mixed", "auto", "--calib-text", "missing.txt"], "--calib-text missing.txt"),
        (&["--mixed", "auto", "--calib-text", "calib.txt", "--quant", "q8"], "more precise than --quant q8"),
        (&["--mixed", "auto", "--calib-text", "calib.txt", "--mixed-precision", "q4s"], "--mixed-precision q4s"),
        (&["--mixed", "auto", "--calib-text", "calib.txt", "--mixed-keep", "0"], "--mixed-keep 0"),
        (&["--mixed", "auto", "--calib-text", "calib.txt", "--mixed-keep", "17"], "only 16 linear inputs"),
        (&["--calib-text", "calib.txt"], "--calib-text only applies with --mixed auto"),
    ];
    for (extra, message) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let run = bramble(&args, dir.path());
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        let mut left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, ["calib.txt", "empty.txt", "spiky.gguf"], "{args:?} left files behind");
    }
    let run = bramble(&["convert", "--input", "spiky.gguf", "--output", "x.bramble", "--mixed", "some"], dir.path());
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("possible values: off, auto"));
}
