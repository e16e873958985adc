//! Qwen2/Qwen2.5 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm) on tiny
//! synthetic models (`bramble synth --family qwen2|qwen3`: GQA, halves RoPE,
//! a byte-level vocabulary split as Qwen2's):
//!
//! - the GGUF form and the Hugging Face form become the same image: the same
//!   config, `architecture` section and tensor bytes, hence the same logits;
//! - its logits over 100 positions match the independent numpy reference,
//!   and the same image run without the family's difference (no biases, no
//!   q/k norms) does not;
//! - a reader that does not know the section refuses the image by its name,
//!   and one marked optional (which an older reader would skip) is refused;
//! - every KV cache mode, R-Sparse calibration, `plan` and the ChatML chat
//!   run on each.

use bramble_runtime::architecture::{Family, Features};
use bramble_runtime::image::layout::{fixed_name, SECTION_REQUIRED};
use bramble_runtime::image::OpenOptions;
use bramble_runtime::kv::{KvMode, RESIDUAL_WINDOW};
use bramble_runtime::model::{Logits, Model};
use bramble_runtime::vocab::PreTokenizer;
use bramble_runtime::{ErrorKind, ModelImage};
use bramble_tests::*;
use bramble_tools::convert::{convert, ConvertOptions, QuantTarget};
use bramble_tools::source::gguf::{write_gguf, GgmlType, GgufSource};
use bramble_tools::source::hf::{write_hf_dir, HfSource, HfWriteOptions};
use bramble_tools::synth::{SyntheticModel, SyntheticShape};
use std::path::{Path, PathBuf};

/// Seed of the synthetic models.
const SEED: u64 = 47;
/// Positions run: past the quantized caches' f32 window of 64, so their codes are read.
const POSITIONS: usize = 100;

/// Logit budgets against the reference, as shares of its largest |logit|:
/// the f16 budgets of `reference.rs` (max 0.06, RMS 0.011 on logits up to
/// ≈ 37). The f32 image differs from the reference only in summation order
/// and f32 RoPE tables, far below them.
const MAX_ABS_OF_RANGE: f64 = 0.06 / 37.0;
/// See [`MAX_ABS_OF_RANGE`].
const RMS_OF_RANGE: f64 = 0.011 / 37.0;

/// Budgets of the mean KL divergence KL(f32 ‖ other) of the next-token
/// distributions over the positions past the quantized caches' f32 window:
/// `kv.rs`'s for its synthetic Llama (about three times what was measured
/// there), which the Qwen blocks stay within (measured on x86-64: f16 1.0e-8
/// / 8.9e-9, q8 1.5e-6 / 1.3e-6, q4 3.8e-4 / 4.1e-4 for Qwen2 / Qwen3).
fn kv_kl_budget(mode: KvMode) -> f64 {
    match mode {
        KvMode::F16 => 3e-4,
        KvMode::Q8 => 4e-4,
        _ => 2.5e-3,
    }
}

/// The two Qwen families' synthetic models, as `bramble synth --family` makes them.
/// Width 128 over 4 heads: heads of 32, which every KV cache mode takes.
fn qwen_model(family: Family) -> SyntheticModel {
    synthetic(SyntheticShape { family, dim: 128, ffn_dim: 320, ..SyntheticShape::default() }, SEED)
}

/// Converts `source` to an image of `quant` at `path` and opens it.
fn convert_to(source: &dyn bramble_tools::source::ModelSource, path: &Path, quant: &str) -> ModelImage {
    convert(source, path, &ConvertOptions::new(QuantTarget::parse(quant).unwrap())).unwrap();
    ModelImage::open(path).unwrap()
}

/// Writes `model` as a GGUF and as a Hugging Face directory in `dir`; returns their paths.
fn write_both(model: &SyntheticModel, dir: &Path) -> (PathBuf, PathBuf) {
    let name = model.architecture.family.name();
    let gguf = dir.join(format!("{name}.gguf"));
    write_gguf(model, &gguf, GgmlType::F32).unwrap();
    let hf = dir.join(format!("{name}-hf"));
    write_hf_dir(model, &hf, HfWriteOptions::default()).unwrap();
    (gguf, hf)
}

/// BOS, then a walk over the vocabulary's ordinary range.
fn prompt(model: &SyntheticModel) -> Vec<u32> {
    let vocab = model.vocab.len() as u32;
    std::iter::once(1).chain((0..POSITIONS as u32 - 1).map(|i| 3 + (i * 37 + 11) % (vocab - 5))).collect()
}

/// The logits of every position of `tokens` on `image`, with `strip`
/// applied to the model first (to run it without a feature).
fn logits(image: &ModelImage, tokens: &[u32], kv: KvMode, strip: impl Fn(&mut Model)) -> Vec<f32> {
    let mut model = Model::new(image).unwrap();
    model.set_kv_mode(kv).unwrap();
    strip(&mut model);
    let mut state = model.new_state(128, tokens.len());
    model.forward(&mut state, tokens, 0, Logits::All).unwrap().to_vec()
}

/// The model without its family's difference: biases or q/k norms gone.
fn without_feature(model: &mut Model) {
    for layer in &mut model.weights.layers {
        layer.qkv_bias = None;
        layer.qk_norm = None;
    }
}

fn check_family(family: Family, feature: Features, tensor: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = qwen_model(family);
    let (gguf, hf) = write_both(&model, dir.path());
    let from_gguf = convert_to(&GgufSource::open(&gguf).unwrap(), &dir.path().join("gguf.bramble"), "f32");
    let from_hf = convert_to(&HfSource::open(&hf).unwrap(), &dir.path().join("hf.bramble"), "f32");

    // One model: the block, config, pre-tokenizer and every tensor's bytes.
    let architecture = from_gguf.architecture();
    assert_eq!((architecture.family, architecture.features), (family, feature), "{architecture:?}");
    assert_eq!(from_hf.architecture(), architecture);
    assert_eq!(from_gguf.config(), from_hf.config());
    assert_eq!(from_gguf.config().rope_style, 1, "Qwen rotates halves");
    assert_eq!(
        (from_gguf.vocab().pre_tokenizer, from_hf.vocab().pre_tokenizer),
        (PreTokenizer::Qwen2, PreTokenizer::Qwen2)
    );
    assert!(from_gguf.tensor(tensor).is_some(), "{tensor} missing");
    for t in from_gguf.tensors() {
        let other = from_hf.tensor(&t.name).unwrap_or_else(|| panic!("{} missing from the HF image", t.name));
        assert!(from_gguf.tensor_bytes(t) == from_hf.tensor_bytes(other), "{}: bytes differ", t.name);
    }
    let section = from_gguf.sections().iter().find(|s| s.name == "architecture").unwrap();
    assert!(section.required, "architecture must be written required");

    let tokens = prompt(&model);
    let ours = logits(&from_gguf, &tokens, KvMode::F32, |_| {});
    assert_eq!(ours, logits(&from_hf, &tokens, KvMode::F32, |_| {}), "the GGUF and HF images' logits differ");

    // Every KV mode runs the block, within its budget of the f32 cache, and
    // the quantized ones read codes (positions past their f32 window differ).
    let vocab = model.vocab.len();
    let window = RESIDUAL_WINDOW * vocab;
    for kv in [KvMode::F16, KvMode::Q8, KvMode::Q4] {
        let got = logits(&from_gguf, &tokens, kv, |_| {});
        let kl = mean_kl(&got[window..], &ours[window..], vocab);
        eprintln!("{} kv {}: mean KL {kl:.2e} past position {RESIDUAL_WINDOW}", family.name(), kv.name());
        assert!(kl <= kv_kl_budget(kv), "{} kv {}: mean KL {kl}", family.name(), kv.name());
        assert!(got[window..] != ours[window..], "{} kv {}: nothing changed", family.name(), kv.name());
    }

    let Some(reference) = Reference::get() else { return };
    let expected = reference.logits_all(&gguf, &tokens, dir.path());
    let stats = error_stats(&ours, &expected);
    eprintln!(
        "{} f32 image: max |Δlogit| {:.5}, RMS {:.6}, |logit| up to {:.2}",
        family.name(),
        stats.max_abs,
        stats.rms,
        stats.reference_max
    );
    assert!(stats.max_abs <= MAX_ABS_OF_RANGE * stats.reference_max, "{stats:?}");
    assert!(stats.rms <= RMS_OF_RANGE * stats.reference_max, "{stats:?}");
    // Without the family's difference the logits are far outside the budget: the test sees it.
    let stripped = error_stats(&logits(&from_gguf, &tokens, KvMode::F32, without_feature), &expected);
    eprintln!("{} without {feature:?}: max |Δlogit| {:.4}", family.name(), stripped.max_abs);
    assert!(stripped.max_abs > 20.0 * MAX_ABS_OF_RANGE * stats.reference_max, "{stripped:?}");
}

#[test]
fn qwen2_gguf_and_hf_give_one_image_whose_logits_match_the_reference() {
    check_family(Family::Qwen2, Features::QKV_BIAS, "blk.1.attn_k.bias");
}

#[test]
fn qwen3_gguf_and_hf_give_one_image_whose_logits_match_the_reference() {
    check_family(Family::Qwen3, Features::QK_NORM, "blk.1.attn_q_norm.weight");
}

#[test]
fn readers_refuse_a_block_they_cannot_run_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let image_path = dir.path().join("qwen2.bramble");
    convert_to(&qwen_model(Family::Qwen2), &image_path, "q8");
    let bytes = std::fs::read(&image_path).unwrap();
    let open = |bytes: &[u8]| ModelImage::from_bytes("patched.bramble", bytes, OpenOptions::default());
    assert_eq!(open(&bytes).unwrap().architecture().family, Family::Qwen2);

    // To a reader from before the section, `architecture` is what a section
    // named after nothing it knows is to this one: required, so refused by name.
    let renamed = with_section_entry(&bytes, "architecture", |entry, _| {
        assert_ne!(entry.flags & SECTION_REQUIRED, 0, "architecture is written required");
        entry.name = fixed_name("architecture_v2").unwrap();
    });
    let error = open(&renamed).err().unwrap();
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    assert!(
        error.to_string().contains("section architecture_v2 is required but unknown to this reader; upgrade Bramble"),
        "{error}"
    );
    // Written optional, an older reader would skip it and run the Llama block: refused.
    let optional = with_section_entry(&bytes, "architecture", |entry, _| entry.flags &= !SECTION_REQUIRED);
    let error = open(&optional).err().unwrap().to_string();
    assert!(error.contains("section architecture is not marked required"), "{error}");
    // A later family and a later feature are refused by number.
    let later = with_section_entry(&bytes, "architecture", |_, s| s[4..8].copy_from_slice(&7u32.to_le_bytes()));
    let error = open(&later).err().unwrap().to_string();
    assert!(error.contains("section architecture: family 7 is unknown to this reader"), "{error}");
    let feature = with_section_entry(&bytes, "architecture", |_, s| s[8..12].copy_from_slice(&0x21u32.to_le_bytes()));
    let error = open(&feature).err().unwrap().to_string();
    assert!(error.contains("feature bit 5 is unknown to this reader"), "{error}");
    // The section says q/k norms, which the tensors do not have: refused naming the tensor.
    let no_bias = with_section_entry(&bytes, "architecture", |_, s| s[8..12].copy_from_slice(&2u32.to_le_bytes()));
    let image = open(&no_bias).unwrap();
    let error = Model::new(&image).err().unwrap().to_string();
    assert!(error.contains("tensor blk.0.attn_q_norm.weight is missing"), "{error}");
}

#[test]
fn a_qwen_checkpoint_using_its_sliding_window_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("qwen2-hf");
    write_hf_dir(&qwen_model(Family::Qwen2), &hf, HfWriteOptions::default()).unwrap();
    let config_path = hf.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    // As Qwen2.5's own configs say it: a window that is not used.
    config["use_sliding_window"] = serde_json::json!(false);
    config["sliding_window"] = serde_json::json!(4096);
    std::fs::write(&config_path, config.to_string()).unwrap();
    assert!(HfSource::open(&hf).is_ok());
    config["use_sliding_window"] = serde_json::json!(true);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let error = format!("{:#}", HfSource::open(&hf).err().unwrap());
    assert!(
        error.contains("use_sliding_window is true; a qwen2 block with sliding windows is not supported"),
        "{error}"
    );
}

#[test]
fn kv_modes_rsparse_plan_and_chat_run_on_qwen_images() {
    for family in ["qwen2", "qwen3"] {
        check_family_cli(family);
    }
}
