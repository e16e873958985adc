//! Gemma-3 on a tiny synthetic model (`bramble synth --family gemma3`: three
//! layers, two local with a window of 32 positions turning RoPE by 10000 and
//! a global one by 1000000, GeGLU, √dim embedding scale, q/k norms and norms
//! after attention and the FFN, Gemma's SentencePiece vocabulary):
//!
//! - the GGUF form (norms stored as `1 + w`, the window and pattern in
//!   `gemma3.*` keys) and the Hugging Face form (`w` stored, `layer_types`,
//!   `rope_local_base_freq`) become the same image;
//! - its logits over 100 positions (the local layers' rings wrap twice)
//!   match the independent numpy reference, which masks the window, and
//!   each of Gemma's differences, taken away alone (the window too), moves
//!   them far outside the budget;
//! - Gemma's turn template is built in and `<end_of_turn>` ends generation;
//! - what the runtime cannot run (soft-capping) is refused by name.

use bramble_runtime::architecture::{Family, Features};
use bramble_runtime::chat::{ChatMessage, ChatTemplate, GEMMA};
use bramble_runtime::model::{Logits, Model};
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::ModelImage;
use bramble_tests::*;
use bramble_tools::convert::{convert, ConvertOptions, QuantTarget};
use bramble_tools::source::gguf::{write_gguf, GgmlType, GgufSource};
use bramble_tools::source::hf::{write_hf_dir, HfSource, HfWriteOptions};
use bramble_tools::synth::{SyntheticModel, SyntheticShape};
use std::path::Path;

/// Seed of the synthetic model.
const SEED: u64 = 53;
/// Positions run: three times the local layers' window (the context's
/// quarter, 32), so the local layers' rings wrap twice.
const POSITIONS: usize = 100;

/// Logit budgets against the reference, as in `qwen.rs` and `llama3.rs`:
/// `reference.rs`'s f16 budgets as shares of the largest |logit|.
const MAX_ABS_OF_RANGE: f64 = 0.06 / 37.0;
/// See [`MAX_ABS_OF_RANGE`].
const RMS_OF_RANGE: f64 = 0.011 / 37.0;

/// The synthetic Gemma-3 model: three layers, local, local, global.
fn gemma_model() -> SyntheticModel {
    let shape = SyntheticShape { family: Family::Gemma3, dim: 128, ffn_dim: 320, n_layers: 3, ..Default::default() };
    synthetic(shape, SEED)
}

/// Converts `source` to an f32 image at `path` and opens it.
fn convert_f32(source: &dyn bramble_tools::source::ModelSource, path: &Path) -> ModelImage {
    convert(source, path, &ConvertOptions::new(QuantTarget::parse("f32").unwrap())).unwrap();
    ModelImage::open(path).unwrap()
}

/// BOS, then a walk over the vocabulary's ordinary range.
fn prompt(model: &SyntheticModel) -> Vec<u32> {
    let vocab = model.vocab.len() as u32;
    std::iter::once(1).chain((0..POSITIONS as u32 - 1).map(|i| 3 + (i * 37 + 11) % (vocab - 5))).collect()
}

/// Logits of every position with `change` applied to the model first.
fn logits(image: &ModelImage, tokens: &[u32], change: impl Fn(&mut Model)) -> Vec<f32> {
    let mut model = Model::new(image).unwrap();
    change(&mut model);
    let mut state = model.new_state(tokens.len(), tokens.len());
    model.forward(&mut state, tokens, 0, Logits::All).unwrap().to_vec()
}

#[test]
fn gguf_and_hf_give_one_image_whose_logits_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let model = gemma_model();
    let gguf = dir.path().join("gemma3.gguf");
    write_gguf(&model, &gguf, GgmlType::F32).unwrap();
    let hf = dir.path().join("gemma3-hf");
    write_hf_dir(&model, &hf, HfWriteOptions::default()).unwrap();
    let from_gguf = convert_f32(&GgufSource::open(&gguf).unwrap(), &dir.path().join("gguf.bramble"));
    let from_hf = convert_f32(&HfSource::open(&hf).unwrap(), &dir.path().join("hf.bramble"));

    let architecture = from_gguf.architecture();
    assert_eq!(architecture, &model.architecture, "the GGUF's block");
    assert_eq!(from_hf.architecture(), architecture, "the Hugging Face directory's block");
    assert_eq!(architecture.features, Features(Features::QK_NORM.0 | Features::GELU_TANH.0 | Features::POST_NORMS.0));
    let windows: Vec<u32> = architecture.layers.iter().map(|l| l.window).collect();
    assert_eq!(windows, [32, 32, 0]);
    assert_eq!(architecture.local_rope_theta(), Some(10000.0));
    assert_eq!(from_gguf.config(), from_hf.config());
    assert_eq!((from_gguf.config().rope_theta, from_gguf.config().rope_style), (1_000_000.0, 1));
    // Norms: 1 + w in both images (the GGUF stores it, the HF reader adds the 1).
    for t in from_gguf.tensors() {
        let other = from_hf.tensor(&t.name).unwrap_or_else(|| panic!("{} missing from the HF image", t.name));
        assert!(from_gguf.tensor_bytes(t) == from_hf.tensor_bytes(other), "{}: bytes differ", t.name);
    }
    assert!(!from_gguf.vocab().add_space_prefix, "Gemma's tokenizer puts no space before the text");

    let tokens = prompt(&model);
    let ours = logits(&from_gguf, &tokens, |_| {});
    assert_eq!(ours, logits(&from_hf, &tokens, |_| {}), "the GGUF and HF images' logits differ");
    // A batch and single tokens agree (the local RoPE tables and norms are per token).
    let mut single = Vec::new();
    {
        let m = Model::new(&from_gguf).unwrap();
        let mut state = m.new_state(tokens.len(), 1);
        for (pos, &token) in tokens.iter().enumerate() {
            single.extend_from_slice(m.forward(&mut state, &[token], pos, Logits::All).unwrap());
        }
    }
    let batch_vs_single = error_stats(&single, &ours);
    assert!(batch_vs_single.max_abs <= 1e-4 * batch_vs_single.reference_max, "{batch_vs_single:?}");

    let Some(reference) = Reference::get() else { return };
    let expected = reference.logits_all(&gguf, &tokens, dir.path());
    let stats = error_stats(&ours, &expected);
    eprintln!(
        "gemma3 f32 image: max |Δlogit| {:.5}, RMS {:.6}, |logit| up to {:.2}",
        stats.max_abs, stats.rms, stats.reference_max
    );
    assert!(stats.max_abs <= MAX_ABS_OF_RANGE * stats.reference_max, "{stats:?}");
    assert!(stats.rms <= RMS_OF_RANGE * stats.reference_max, "{stats:?}");

    // Each difference from the Llama block, taken away alone, is far outside the budget.
    type Change = Box<dyn Fn(&mut Model)>;
    let changes: [(&str, Change); 6] = [
        ("SiLU gate", Box::new(|m| m.architecture.features.0 &= !Features::GELU_TANH.0)),
        ("no embedding scale", Box::new(|m| m.architecture.embedding_scale = 1.0)),
        ("no post norms", Box::new(|m| m.weights.layers.iter_mut().for_each(|l| l.post_norms = None))),
        ("no q/k norms", Box::new(|m| m.weights.layers.iter_mut().for_each(|l| l.qk_norm = None))),
        (
            // Still local (their own RoPE base), but seeing everything.
            "windows wider than the context",
            Box::new(|m| m.architecture.layers.iter_mut().filter(|l| l.is_local()).for_each(|l| l.window = 1 << 20)),
        ),
        (
            "global RoPE base everywhere",
            Box::new(|m| m.architecture.layers.iter_mut().for_each(|l| l.rope_theta = 1_000_000.0)),
        ),
    ];
    for (what, change) in changes {
        let changed = error_stats(&logits(&from_gguf, &tokens, change), &expected);
        eprintln!("gemma3, {what}: max |Δlogit| {:.4}", changed.max_abs);
        assert!(changed.max_abs > 20.0 * MAX_ABS_OF_RANGE * stats.reference_max, "{what}: {changed:?}");
    }
}

#[test]
fn gemma_turns_are_built_in_and_end_of_turn_ends_generation() {
    let dir = tempfile::tempdir().unwrap();
    let image = convert_f32(&gemma_model(), &dir.path().join("chat.bramble"));
    let template = ChatTemplate::new(image.chat_template(), image.vocab());
    assert_eq!(template.source(), GEMMA);
    let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hello world")];
    assert_eq!(
        template.render(&messages, true).unwrap(),
        "<bos><start_of_turn>user\nBe brief.\n\nHello world<end_of_turn>\n<start_of_turn>model\n"
    );
    let tokenizer = Tokenizer::new(image.vocab()).unwrap();
    let ids = tokenizer.encode_chat(&template, &messages, true).unwrap();
    let (start, end) = (image.vocab().find("<start_of_turn>").unwrap(), image.vocab().find("<end_of_turn>").unwrap());
    assert_eq!(ids[0], 1, "BOS first: {ids:?}");
    assert_eq!(ids.iter().filter(|&&id| id == start).count(), 2, "{ids:?}");
    assert_eq!(ids.iter().filter(|&&id| id == end).count(), 1, "{ids:?}");
    assert!(tokenizer.is_end_of_generation(end), "<end_of_turn> must end generation");
    assert!(!tokenizer.is_end_of_generation(start));
}

#[test]
fn a_multimodal_checkpoint_converts_as_its_language_model() {
    // Eight query heads over four KV heads: Gemma3TextConfig's defaults, which
    // the multimodal layout leaves out of text_config as the 4B's config does.
    let shape = SyntheticShape {
        family: Family::Gemma3,
        dim: 128,
        ffn_dim: 320,
        n_layers: 3,
        n_heads: 8,
        n_kv_heads: 4,
        ..Default::default()
    };
    let model = synthetic(shape, SEED);
    let dir = tempfile::tempdir().unwrap();
    let (text, multimodal) = (dir.path().join("text"), dir.path().join("multimodal"));
    write_hf_dir(&model, &text, HfWriteOptions::default()).unwrap();
    write_hf_dir(&model, &multimodal, HfWriteOptions { gemma3_multimodal: true, ..Default::default() }).unwrap();
    let config = std::fs::read_to_string(multimodal.join("config.json")).unwrap();
    assert!(config.contains("Gemma3ForConditionalGeneration") && !config.contains("num_attention_heads"), "{config}");
    let from_text = convert_f32(&HfSource::open(&text).unwrap(), &dir.path().join("text.bramble"));
    let from_multimodal = convert_f32(&HfSource::open(&multimodal).unwrap(), &dir.path().join("multimodal.bramble"));
    assert_eq!(from_multimodal.config(), from_text.config());
    assert_eq!((from_multimodal.config().n_heads, from_multimodal.config().n_kv_heads), (8, 4));
    assert_eq!(from_multimodal.architecture(), from_text.architecture());
    assert_eq!(from_multimodal.tensors().len(), from_text.tensors().len(), "the vision tower is left out");
    for t in from_text.tensors() {
        let other = from_multimodal.tensor(&t.name).unwrap_or_else(|| panic!("{} missing", t.name));
        assert!(from_text.tensor_bytes(t) == from_multimodal.tensor_bytes(other), "{}: bytes differ", t.name);
    }
}

#[test]
fn soft_capping_and_unknown_layer_types_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("gemma3-hf");
    write_hf_dir(&gemma_model(), &hf, HfWriteOptions::default()).unwrap();
    let config_path = hf.join("config.json");
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let open_with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut config = original.clone();
        edit(&mut config);
        std::fs::write(&config_path, config.to_string()).unwrap();
        HfSource::open(&hf).err().map(|e| format!("{e:#}")).unwrap_or_default()
    };
    let error = open_with(&|c| c["final_logit_softcapping"] = serde_json::json!(30.0));
    assert!(error.contains("final_logit_softcapping is 30.0; soft-capping is not supported"), "{error}");
    let error = open_with(&|c| c["layer_types"][1] = serde_json::json!("chunked_attention"));
    assert!(error.contains("layer type \"chunked_attention\" is not sliding_attention or full_attention"), "{error}");
    let error = open_with(&|c| c["hidden_activation"] = serde_json::json!("silu"));
    assert!(
        error.contains("hidden_activation \"silu\" is not supported (a gemma3 block runs gelu_pytorch_tanh)"),
        "{error}"
    );
}

#[test]
fn kv_modes_rsparse_plan_and_chat_run_on_a_gemma_image() {
    // Context 128, window 32: the local layers' caches are rings of 32 positions in every mode.
    check_family_cli("gemma3");
}
