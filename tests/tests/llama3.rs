//! Llama-3.x on a tiny synthetic model (`bramble synth --llama3`: RoPE base
//! 500000 scaled as `rope_type: "llama3"` from an original context of 64
//! positions, Llama-3's vocabulary and chat tokens):
//!
//! - the GGUF form (`rope_freqs.weight`) and the Hugging Face form
//!   (`rope_scaling` in config.json) become the same image: the same
//!   `rope_scaling` section, config and tensor bytes, hence the same logits;
//! - its logits over 100 positions, most of them past the original context,
//!   match the independent numpy reference (which divides each frequency by
//!   `rope_freqs.weight`), and the same image run with plain RoPE does not;
//! - a reader that does not know the section refuses the image by its name,
//!   and damaged sections (unknown kind, wrong flag, bad factor) are refused;
//! - the built-in Llama-3 chat rendering and `<|eot_id|>` ending generation.

use bramble_runtime::chat::{ChatMessage, ChatTemplate, LLAMA3};
use bramble_runtime::image::layout::SECTION_REQUIRED;
use bramble_runtime::image::OpenOptions;
use bramble_runtime::model::{Logits, Model};
use bramble_runtime::rope::ScalingKind;
use bramble_runtime::sampler::SamplerConfig;
use bramble_runtime::session::{Finish, GenerationSink, Session};
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::{ErrorKind, ModelImage};
use bramble_tests::*;
use bramble_tools::convert::{convert, ConvertOptions, QuantTarget};
use bramble_tools::source::gguf::{write_gguf, GgmlType, GgufSource};
use bramble_tools::source::hf::{write_hf_dir, HfSource, HfWriteOptions};
use bramble_tools::synth::{SyntheticModel, SyntheticShape};
use std::path::{Path, PathBuf};

/// Seed of the synthetic model.
const SEED: u64 = 31;
/// Positions run: the original context is 64, so the last 36 are past it.
const POSITIONS: usize = 100;

/// Logit budgets against the reference, as shares of its largest |logit|:
/// the f16 budgets of `reference.rs` (max 0.06, RMS 0.011 on logits up to
/// ≈ 37). The f32 image differs from the reference only in summation order
/// and f32 RoPE tables, far below them.
const MAX_ABS_OF_RANGE: f64 = 0.06 / 37.0;
/// See [`MAX_ABS_OF_RANGE`].
const RMS_OF_RANGE: f64 = 0.011 / 37.0;

/// The synthetic Llama-3 model, as `bramble synth --llama3` makes it.
fn llama3_model() -> SyntheticModel {
    synthetic(SyntheticShape { llama3: true, ..SyntheticShape::default() }, SEED)
}

/// Converts `source` to an f32 image at `path` and opens it.
fn convert_f32(source: &dyn bramble_tools::source::ModelSource, path: &Path) -> ModelImage {
    convert(source, path, &ConvertOptions::new(QuantTarget::parse("f32").unwrap())).unwrap();
    ModelImage::open(path).unwrap()
}

/// Writes `model` as a GGUF and as a Hugging Face directory in `dir`; returns their paths.
fn write_both(model: &SyntheticModel, dir: &Path) -> (PathBuf, PathBuf) {
    let gguf = dir.join("llama3.gguf");
    write_gguf(model, &gguf, GgmlType::F32).unwrap();
    let hf = dir.join("llama3-hf");
    write_hf_dir(model, &hf, HfWriteOptions { chat_template: Some(LLAMA3.to_string()), ..Default::default() }).unwrap();
    (gguf, hf)
}

/// Tokens `1 ..` of the synthetic vocabulary's ordinary range, after BOS.
fn prompt(model: &SyntheticModel) -> Vec<u32> {
    let vocab = model.vocab.len() as u32;
    std::iter::once(0).chain((0..POSITIONS as u32 - 1).map(|i| 3 + (i * 37 + 11) % (vocab - 5))).collect()
}

#[test]
fn gguf_and_hf_forms_give_one_image_whose_logits_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let model = llama3_model();
    let (gguf, hf) = write_both(&model, dir.path());
    let from_gguf = convert_f32(&GgufSource::open(&gguf).unwrap(), &dir.path().join("gguf.bramble"));
    let from_hf = convert_f32(&HfSource::open(&hf).unwrap(), &dir.path().join("hf.bramble"));

    // The same maths: config, factors (three regions: kept, ramp, divided
    // by 8), and every tensor's bytes.
    let scaling = from_gguf.rope_scaling().expect("the GGUF image carries rope_scaling");
    assert_eq!(scaling.kind, ScalingKind::Llama3);
    assert_eq!(Some(scaling), model.rope_scaling.as_ref(), "GGUF factors");
    assert_eq!(from_hf.rope_scaling(), Some(scaling), "HF factors");
    let factors = &scaling.factors;
    assert_eq!(factors.len(), 8);
    assert!(factors[0] == 1.0 && factors[1] > 1.0 && factors[1] < 8.0 && factors[7] == 8.0, "{factors:?}");
    assert_eq!(from_gguf.config(), from_hf.config());
    assert_eq!(from_gguf.config().rope_theta, 500000.0);
    for tensor in from_gguf.tensors() {
        let other = from_hf.tensor(&tensor.name).unwrap_or_else(|| panic!("{} missing from the HF image", tensor.name));
        assert!(from_gguf.tensor_bytes(tensor) == from_hf.tensor_bytes(other), "{}: bytes differ", tensor.name);
    }
    let section = from_gguf.sections().iter().find(|s| s.name == "rope_scaling").unwrap();
    assert!(section.required, "rope_scaling must be written required");

    let tokens = prompt(&model);
    let run = |image: &ModelImage, plain: bool| {
        let mut model = Model::new(image).unwrap();
        if plain {
            model.rope_factors = None;
        }
        let mut state = model.new_state(128, tokens.len());
        model.forward(&mut state, &tokens, 0, Logits::All).unwrap().to_vec()
    };
    let ours = run(&from_gguf, false);
    assert_eq!(ours, run(&from_hf, false), "the GGUF and HF images' logits differ");

    let Some(reference) = Reference::get() else { return };
    let expected = reference.logits_all(&gguf, &tokens, dir.path());
    let stats = error_stats(&ours, &expected);
    eprintln!(
        "llama3 f32 image: max |Δlogit| {:.5}, RMS {:.6}, |logit| up to {:.2}",
        stats.max_abs, stats.rms, stats.reference_max
    );
    assert!(stats.max_abs <= MAX_ABS_OF_RANGE * stats.reference_max, "{stats:?}");
    assert!(stats.rms <= RMS_OF_RANGE * stats.reference_max, "{stats:?}");

    // Plain RoPE is far outside the budget: the test sees the scaling. Past
    // the original context most of all, but before it too (the low
    // frequencies turn eight times slower from the second position on).
    let vocab = model.vocab.len();
    let plain = run(&from_gguf, true);
    for range in [1..64, 64..POSITIONS] {
        let rows = range.start * vocab..range.end * vocab;
        let plain_stats = error_stats(&plain[rows.clone()], &expected[rows]);
        eprintln!("plain RoPE, positions {range:?}: max |Δlogit| {:.4}", plain_stats.max_abs);
        assert!(plain_stats.max_abs > 20.0 * MAX_ABS_OF_RANGE * stats.reference_max, "{range:?}: {plain_stats:?}");
    }
}

#[test]
fn synth_convert_and_inspect_show_the_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("cli.gguf");
    let image = dir.path().join("cli.bramble");
    let path = |p: &Path| p.to_str().unwrap().to_string();
    bramble_ok(&["synth", "--format", "gguf", "--llama3", "--output", &path(&gguf)]);
    bramble_ok(&["convert", "--input", &path(&gguf), "--output", &path(&image), "--quant", "q8"]);
    let info = bramble_json(&["inspect", &path(&image), "--json"]);
    let scaling = &info["config"]["rope_scaling"];
    assert_eq!(scaling["kind"], "llama3", "{info}");
    assert_eq!(scaling["factors"].as_array().map(Vec::len), Some(8), "{scaling}");
    assert_eq!(info["chat_template"].as_str(), Some(LLAMA3));
    let text = bramble_ok(&["inspect", &path(&image)]);
    assert!(text.contains("rope scaling: llama3, 8 pair frequencies divided by 1 to 8"), "{text}");
}

#[test]
fn readers_refuse_what_they_cannot_run_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let image_path = dir.path().join("llama3.bramble");
    convert_f32(&llama3_model(), &image_path);
    let bytes = std::fs::read(&image_path).unwrap();
    let open = |bytes: &[u8]| ModelImage::from_bytes("patched.bramble", bytes, OpenOptions::default());
    assert!(open(&bytes).unwrap().rope_scaling().is_some());

    // A reader from before the section knows config, tokenizer,
    // chat_template, tensor_index, tensor_data and source: to it,
    // rope_scaling is what a section named after none of them is to this
    // one. The section is required, so it refuses the file by the name.
    let renamed = with_section_entry(&bytes, "rope_scaling", |entry, _| {
        assert_ne!(entry.flags & SECTION_REQUIRED, 0, "rope_scaling is written required");
        entry.name = bramble_runtime::image::layout::fixed_name("rope_scaling_v2").unwrap();
    });
    let error = open(&renamed).err().unwrap();
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    assert!(
        error.to_string().contains("section rope_scaling_v2 is required but unknown to this reader; upgrade Bramble"),
        "{error}"
    );

    // Written optional, an older reader would skip it and run plain RoPE: refused.
    let optional = with_section_entry(&bytes, "rope_scaling", |entry, _| entry.flags &= !SECTION_REQUIRED);
    let error = open(&optional).err().unwrap().to_string();
    assert!(error.contains("section rope_scaling is not marked required"), "{error}");

    // A later kind (the second word) is refused by its number.
    let later =
        with_section_entry(&bytes, "rope_scaling", |_, section| section[4..8].copy_from_slice(&3u32.to_le_bytes()));
    let error = open(&later).err().unwrap();
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    assert!(error.to_string().contains("rope_scaling: scaling kind 3 is unknown to this reader"), "{error}");

    // A factor that is not a positive number.
    let negative = with_section_entry(&bytes, "rope_scaling", |_, section| {
        section[36..40].copy_from_slice(&(-2f32).to_le_bytes())
    });
    let error = open(&negative).err().unwrap().to_string();
    assert!(error.contains("section rope_scaling: RoPE factor 1 is -2, not a positive number"), "{error}");
}

/// Collects the generated tokens.
struct Tokens(Vec<u32>);

impl GenerationSink for Tokens {
    fn token(&mut self, token: u32) {
        self.0.push(token);
    }
    fn text(&mut self, _piece: &str) -> std::ops::ControlFlow<()> {
        std::ops::ControlFlow::Continue(())
    }
}

#[test]
fn chat_renders_llama3_turns_and_generation_stops_at_eot() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = llama3_model();
    let image_path = dir.path().join("chat.bramble");
    let image = convert_f32(&model, &image_path);
    // No template of its own: the vocabulary's header token picks Llama-3's.
    assert_eq!(image.chat_template(), None);
    let template = ChatTemplate::new(image.chat_template(), image.vocab());
    assert_eq!(template.source(), LLAMA3);
    let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hello world")];
    assert_eq!(
        template.render(&messages, true).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHello world<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let tokenizer = Tokenizer::new(image.vocab()).unwrap();
    let ids = tokenizer.encode_chat(&template, &messages, true).unwrap();
    let (bos, eot) = (image.vocab().find("<|begin_of_text|>").unwrap(), image.vocab().find("<|eot_id|>").unwrap());
    let (start, end) =
        (image.vocab().find("<|start_header_id|>").unwrap(), image.vocab().find("<|end_header_id|>").unwrap());
    assert_eq!(ids[0], bos, "{ids:?}");
    assert_eq!(ids.iter().filter(|&&id| id == eot).count(), 2, "{ids:?}");
    assert_eq!(ids.iter().filter(|&&id| id == start).count(), 3, "{ids:?}");
    assert_eq!(ids.iter().filter(|&&id| id == end).count(), 3, "{ids:?}");
    assert!(tokenizer.is_end_of_generation(eot), "<|eot_id|> must end generation");
    assert!(!tokenizer.is_end_of_generation(start) && !tokenizer.is_end_of_generation(end));

    // Greedy generation: what the model says first ...
    let generate = |image: &ModelImage| {
        let model = Model::new(image).unwrap();
        let mut session = Session::new(&model, &tokenizer, 128, SamplerConfig::greedy());
        let mut sink = Tokens(Vec::new());
        let generated = session.generate(&ids, 8, &[], &|| false, &mut sink).unwrap();
        (generated.finish, sink.0)
    };
    let (finish, tokens) = generate(&image);
    assert_eq!((finish, tokens.len()), (Finish::Length, 8), "{tokens:?}");
    // ... becomes <|eot_id|> once the output layer's rows of the two are
    // swapped, and generation ends there, having emitted nothing.
    let first = tokens[0] as usize;
    let (_, shape, values) = model.tensors.iter_mut().find(|t| t.0 == "output.weight").unwrap();
    let dim = shape[1];
    for column in 0..dim {
        values.swap(first * dim + column, eot as usize * dim + column);
    }
    let swapped = convert_f32(&model, &dir.path().join("swapped.bramble"));
    let (finish, tokens) = generate(&swapped);
    assert_eq!((finish, tokens), (Finish::EndOfGeneration, vec![]));
}
