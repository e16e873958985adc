//! Every input format through the whole tool chain, on tiny synthetic models:
//! GGUF (each weight type `bramble synth` writes, SentencePiece and byte-level
//! BPE vocabularies), Hugging Face directories and llama2.c checkpoints
//! (versions 0 and 1) → `bramble convert --quant f32|f16|q8|q4` →
//! `bramble inspect --json` → `bramble generate --json`. Sources are written
//! by `bramble synth`, or by the library writers for what it does not offer
//! (SentencePiece's `tokenizer.model`, llama2.c version 1).
//!
//! And consistency across formats: the same synthetic model written as GGUF,
//! as a Hugging Face directory (q/k rows permuted to Hugging Face's layout) and
//! as llama2.c checkpoints must become the same image, and so give the same
//! logits, greedy tokens and token ids.

use bramble_runtime::model::{Logits, Model};
use bramble_runtime::quant::{deinterleave_bytes, Encoding};
use bramble_runtime::sampler::SamplerConfig;
use bramble_runtime::session::Session;
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::vocab::TokenizerKind;
use bramble_runtime::ModelImage;
use bramble_tests::*;
use bramble_tools::source::gguf::{weight_type_for, write_gguf, GgmlType, GgufFile};
use bramble_tools::source::hf::{write_hf_dir, HfDtype, HfTokenizerForm, HfWriteOptions};
use bramble_tools::source::llama2c::write_llama2c;
use bramble_tools::synth::SyntheticModel;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The GGUF weight types `bramble synth --weights` writes.
const GGUF_WEIGHT_TYPES: [&str; 9] = ["f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k"];
/// The `--quant` targets of the converter exercised here.
const QUANTS: [&str; 4] = ["f32", "f16", "q8", "q4"];
/// Tokens `bramble generate --max-tokens` asks for.
const GENERATED: usize = 8;
/// Seed of every synthetic model here.
const SEED: u64 = 7;

/// The same f32 weights in three source formats become bit-identical f32
/// images run by the same kernels, so logits agree exactly; this only allows
/// for a different summation order should a future kernel pick one by layout.
const CROSS_FORMAT_LOGIT_TOLERANCE: f64 = 1e-5;

/// The keys `bramble generate --json` documents.
const GENERATE_KEYS: [&str; 6] =
    ["text", "tokens", "prompt_tokens", "generated_tokens", "prefill_tok_s", "decode_tok_s"];

fn tokenizer_name(kind: TokenizerKind) -> &'static str {
    match kind {
        TokenizerKind::SentencePiece => "spm",
        TokenizerKind::ByteLevelBpe => "bpe",
    }
}

/// The image encoding the converter must give a tensor stored as `source`
/// (a ggml/safetensors type name) under `--quant quant`: vectors stay f32; at 4
/// bits the embedding and output layer are kept at q8 (documented default of
/// `ConvertOptions::new`), and native 4-bit blocks are kept (Q4_1 → q4, Q4_0 → q4s).
/// Quantized matrices of whole groups of four rows are stored interleaved
/// (`q4x4` …), the default `--layout x4`.
fn expected_encoding(name: &str, shape: &[usize], source: &str, quant: &str) -> &'static str {
    let base = expected_row_major_encoding(name, shape.len(), source, quant);
    match base {
        "q8" | "q4" | "q4s" if shape[0].is_multiple_of(4) => {
            Encoding::from_name(base).unwrap().interleaved().unwrap().name()
        }
        other => other,
    }
}

fn expected_row_major_encoding(name: &str, dims: usize, source: &str, quant: &str) -> &'static str {
    if dims == 1 {
        return "f32";
    }
    match quant {
        "f32" => "f32",
        "f16" => "f16",
        "q8" => "q8",
        "q4" if name == "token_embd.weight" || name == "output.weight" => "q8",
        "q4" if source.eq_ignore_ascii_case("Q4_0") => "q4s",
        "q4" => "q4",
        other => panic!("no expectation for --quant {other}"),
    }
}

/// The image encoding whose bytes a source type already is, if any.
fn native_encoding(source: &str) -> Option<&'static str> {
    match source.to_ascii_uppercase().as_str() {
        "F32" => Some("f32"),
        "F16" => Some("f16"),
        "Q8_0" => Some("q8"),
        "Q4_1" => Some("q4"),
        "Q4_0" => Some("q4s"),
        "Q5_0" => Some("q5s"),
        "Q5_1" => Some("q5"),
        _ => None,
    }
}

/// Checks `bramble inspect --json` of an image converted from `model`.
fn check_inspect(image: &Path, model: &SyntheticModel, expected: &[(String, Vec<usize>, &'static str)]) {
    let args = [OsArg::from("inspect"), image.into(), "--json".into()];
    let info = bramble_json(&args);
    let c = &model.config;
    let config = &info["config"];
    let want = [
        ("dim", c.dim),
        ("n_layers", c.n_layers),
        ("n_heads", c.n_heads),
        ("n_kv_heads", c.n_kv_heads),
        ("head_dim", c.head_dim),
        ("ffn_dim", c.ffn_dim),
        ("vocab_size", c.vocab_size),
        ("context_length", c.context_length),
        ("rope_style", 0),
    ];
    for (key, value) in want {
        assert_eq!(config[key].as_u64(), Some(value as u64), "{}: config.{key} in {config}", image.display());
    }
    assert_eq!(config["rope_theta"].as_f64(), Some(c.rope_theta as f64), "{}: rope_theta", image.display());
    assert_eq!(config["norm_eps"].as_f64(), Some(c.norm_eps as f64), "{}: norm_eps", image.display());
    assert_eq!(config["tied_output"].as_bool(), Some(c.tied_output != 0), "{}: tied_output", image.display());
    let kind = match model.vocab.kind {
        TokenizerKind::SentencePiece => "SentencePiece",
        TokenizerKind::ByteLevelBpe => "ByteLevelBpe",
    };
    assert_eq!(info["tokenizer"]["kind"].as_str(), Some(kind), "{}: tokenizer {}", image.display(), info["tokenizer"]);
    assert_eq!(
        info["tokenizer"]["tokens"].as_u64(),
        Some(model.vocab.len() as u64),
        "{}: vocabulary size",
        image.display()
    );
    assert_eq!(info["layout_version"].as_u64(), Some(2), "{}: layout version", image.display());

    let tensors = info["tensors"].as_array().expect("tensors array");
    assert_eq!(tensors.len(), expected.len(), "{}: tensor count", image.display());
    for (name, shape, encoding) in expected {
        let tensor = tensors
            .iter()
            .find(|t| t["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("{}: tensor {name} missing from inspect", image.display()));
        assert_eq!(tensor["encoding"].as_str(), Some(*encoding), "{}: encoding of {name}", image.display());
        let got_shape: Vec<usize> =
            tensor["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(&got_shape, shape, "{}: shape of {name}", image.display());
    }
    // The per-encoding summary counts the same tensors.
    let mut counted = 0;
    for (encoding, summary) in info["encodings"].as_object().expect("encodings object") {
        let n = expected.iter().filter(|e| e.2 == encoding).count() as u64;
        assert_eq!(summary["tensors"].as_u64(), Some(n), "{}: encodings.{encoding}", image.display());
        counted += n;
    }
    assert_eq!(counted as usize, expected.len(), "{}: encodings summary misses tensors", image.display());
}

/// Runs `bramble generate --temperature 0 --max-tokens 8 --json` and checks the documented keys.
fn check_generate(image: &Path, prompt: &str) -> Value {
    let args = [
        OsArg::from("generate"),
        "--model".into(),
        image.into(),
        "--prompt".into(),
        prompt.into(),
        "--temperature".into(),
        "0".into(),
        "--max-tokens".into(),
        GENERATED.to_string().into(),
        "--json".into(),
    ];
    let result = bramble_json(&args);
    for key in GENERATE_KEYS {
        assert!(result.get(key).is_some(), "{}: generate --json lacks {key:?}: {result}", image.display());
    }
    assert!(result["text"].is_string(), "{}: text is not a string: {result}", image.display());
    let tokens = ids_of(&result["tokens"]);
    assert_eq!(result["generated_tokens"].as_u64(), Some(tokens.len() as u64), "{}: {result}", image.display());
    assert!(tokens.len() <= GENERATED, "{}: more than {GENERATED} tokens: {result}", image.display());
    if result["stop_reason"] == "length" {
        assert_eq!(tokens.len(), GENERATED, "{}: stopped for length early: {result}", image.display());
    }
    assert!(result["prompt_tokens"].as_u64().is_some_and(|n| n > 0), "{}: prompt_tokens: {result}", image.display());
    for key in ["prefill_tok_s", "decode_tok_s"] {
        assert!(
            result[key].as_f64().is_some_and(|v| v.is_finite() && v >= 0.0),
            "{}: {key}: {result}",
            image.display()
        );
    }
    result
}

/// Command-line arguments of mixed kinds.
type OsArg = std::ffi::OsString;

/// Converts `input` with the CLI to each of [`QUANTS`] and checks the report,
/// the image (inspect) and a generation. `source_type(name)` is how the source
/// stores each tensor. Returns each image with its `convert --json` report.
fn convert_inspect_generate(
    input: &Path,
    model: &SyntheticModel,
    source_type: &dyn Fn(&str) -> String,
    out_dir: &Path,
    label: &str,
) -> Vec<(String, PathBuf, Value)> {
    let mut images = Vec::new();
    for quant in QUANTS {
        let image = out_dir.join(format!("{label}-{quant}.bramble"));
        let args = [
            OsArg::from("convert"),
            "--input".into(),
            input.into(),
            "--output".into(),
            image.clone().into(),
            "--quant".into(),
            quant.into(),
            "--json".into(),
        ];
        let report = bramble_json(&args);
        let details = report["details"].as_array().unwrap_or_else(|| panic!("{label} {quant}: no details: {report}"));
        assert_eq!(details.len(), model.tensors.len(), "{label} {quant}: tensors in the report");
        let mut expected = Vec::new();
        let mut carried_count = 0;
        for (name, shape, _) in &model.tensors {
            let row = details
                .iter()
                .find(|d| d[0].as_str() == Some(name))
                .unwrap_or_else(|| panic!("{label} {quant}: {name} not in the report"));
            let source = source_type(name);
            assert!(
                row[1].as_str().is_some_and(|s| s.eq_ignore_ascii_case(&source)),
                "{label} {quant}: {name} reported as source {} (expected {source})",
                row[1]
            );
            let encoding = expected_encoding(name, shape, &source, quant);
            assert_eq!(row[2].as_str(), Some(encoding), "{label} {quant}: {name} from {source}");
            let carried = row[3].as_bool().expect("carried flag");
            if native_encoding(&source) != Some(Encoding::from_name(encoding).unwrap().row_major().name()) {
                assert!(!carried, "{label} {quant}: {name} ({source} → {encoding}) cannot be carried bit-exact");
            }
            carried_count += carried as u64;
            expected.push((name.clone(), shape.clone(), encoding));
        }
        assert_eq!(report["carried"].as_u64(), Some(carried_count), "{label} {quant}: carried count");
        assert_eq!(
            report["requantized"].as_u64(),
            Some(model.tensors.len() as u64 - carried_count),
            "{label} {quant}: requantized count"
        );
        check_inspect(&image, model, &expected);
        check_generate(&image, "Hello world");
        images.push((quant.to_string(), image, report));
    }
    images
}

/// `bramble synth --format gguf` for each weight type, then the whole chain.
fn gguf_chain(tokenizer: TokenizerKind) {
    let dir = tempfile::tempdir().unwrap();
    for weights in GGUF_WEIGHT_TYPES {
        let requested = GgmlType::from_name(weights).unwrap();
        // K-quants have super-blocks of 256: a width of 256 makes most rows whole super-blocks
        // (ffn_down's rows of 640 are not, and fall back as llama.cpp does).
        let dim = if weights.ends_with("_k") { 256 } else { 64 };
        // SmolLM2-like models share the output layer; Llama-2-like ones do not.
        let tied = tokenizer == TokenizerKind::ByteLevelBpe;
        let label = format!("gguf-{}-{weights}", tokenizer_name(tokenizer));
        let gguf = dir.path().join(format!("{label}.gguf"));
        let mut args = vec![
            OsArg::from("synth"),
            "--format".into(),
            "gguf".into(),
            "--output".into(),
            gguf.clone().into(),
            "--tokenizer".into(),
            tokenizer_name(tokenizer).into(),
            "--weights".into(),
            weights.into(),
            "--dim".into(),
            dim.to_string().into(),
            "--layers".into(),
            "2".into(),
            "--seed".into(),
            SEED.to_string().into(),
        ];
        if tied {
            args.push("--tied".into());
        }
        bramble_ok(&args);
        let model = synthetic(synth_cli_shape(dim, 2, tied, tokenizer), SEED);

        // The GGUF holds each tensor in the requested type, or llama.cpp's fallback for its row length.
        let file = GgufFile::open(&gguf).unwrap_or_else(|e| panic!("{}: {e:#}", gguf.display()));
        let source_type = |name: &str| -> String {
            let (shape, _) = model.tensor(name).expect("tensor of the model");
            let expected = if shape.len() == 1 { GgmlType::F32 } else { weight_type_for(requested, shape[1]) };
            let stored = file.tensor(name).unwrap_or_else(|| panic!("{label}: {name} missing from the GGUF")).ggml_type;
            assert_eq!(stored, expected, "{label}: {name} stored as {stored}");
            stored.name().to_string()
        };
        let images = convert_inspect_generate(&gguf, &model, &source_type, dir.path(), &label);

        // Carried tensors are the GGUF's bytes, byte for byte (once the
        // interleaved ones are put back in row order).
        for (quant, path, _) in &images {
            let image = ModelImage::open(path).unwrap();
            for info in image.tensors() {
                let source = source_type(&info.name);
                if native_encoding(&source) == Some(info.encoding.row_major().name()) {
                    let index = file.tensor_index(&info.name).unwrap();
                    let mut stored = image.tensor_bytes(info).to_vec();
                    if info.encoding != info.encoding.row_major() {
                        deinterleave_bytes(info.encoding, image.tensor_bytes(info), info.cols(), &mut stored);
                    }
                    assert!(
                        stored == file.tensor_bytes(index),
                        "{label} --quant {quant}: {} ({source} → {}) is not the GGUF's bytes",
                        info.name,
                        info.encoding.name()
                    );
                }
            }
        }
        // The brief's two headline cases, spelled out.
        if weights == "q4_1" || weights == "q4_0" {
            let (_, q4, _) = images.iter().find(|(q, _, _)| q == "q4").unwrap();
            let image = ModelImage::open(q4).unwrap();
            let want = if weights == "q4_1" { "q4" } else { "q4s" };
            for info in image.tensors().iter().filter(|t| t.name.starts_with("blk.") && t.shape.len() == 2) {
                assert_eq!(info.encoding.row_major().name(), want, "{label} --quant q4: {}", info.name);
            }
        }
    }
}

#[test]
fn gguf_sentencepiece_every_weight_type_converts_inspects_and_generates() {
    gguf_chain(TokenizerKind::SentencePiece);
}

#[test]
fn gguf_byte_level_every_weight_type_converts_inspects_and_generates() {
    gguf_chain(TokenizerKind::ByteLevelBpe);
}

/// How a source model is written: by `bramble synth` or, for what the command
/// does not offer, by the library writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    Cli,
    Library,
}

/// `bramble synth --format FORMAT --tokenizer T --weights W [--tied] --seed SEED`.
fn synth_cli(format: &str, output: &Path, tokenizer: TokenizerKind, weights: &str, tied: bool) {
    let mut args = vec![
        OsArg::from("synth"),
        "--format".into(),
        format.into(),
        "--output".into(),
        output.into(),
        "--tokenizer".into(),
        tokenizer_name(tokenizer).into(),
        "--weights".into(),
        weights.into(),
        "--seed".into(),
        SEED.to_string().into(),
    ];
    if tied {
        args.push("--tied".into());
    }
    let out = bramble_ok(&args);
    assert!(out.contains("wrote"), "synth says what it wrote: {out}");
}

/// A Hugging Face directory in each dtype and tokenizer file form
/// (`bramble synth --format hf` writes `tokenizer.json` and a chat template;
/// the library writer also writes SentencePiece's `tokenizer.model`).
#[test]
fn hugging_face_directories_convert_inspect_and_generate() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (TokenizerKind::SentencePiece, HfDtype::F32, HfTokenizerForm::TokenizerJson, false, Writer::Cli),
        (TokenizerKind::SentencePiece, HfDtype::F16, HfTokenizerForm::SentencePieceModel, false, Writer::Library),
        (TokenizerKind::ByteLevelBpe, HfDtype::BF16, HfTokenizerForm::TokenizerJson, true, Writer::Cli),
        (TokenizerKind::ByteLevelBpe, HfDtype::F32, HfTokenizerForm::TokenizerJson, true, Writer::Library),
    ];
    for (tokenizer, dtype, form, tied, writer) in cases {
        let label = format!("hf-{}-{}-{form:?}-{writer:?}", tokenizer_name(tokenizer), dtype.name());
        let model = synthetic(synth_cli_shape(64, 2, tied, tokenizer), SEED);
        let hf_dir = dir.path().join(&label);
        match writer {
            Writer::Cli => synth_cli("hf", &hf_dir, tokenizer, &dtype.name().to_ascii_lowercase(), tied),
            Writer::Library => {
                let options = HfWriteOptions { dtype, tokenizer: form, ..HfWriteOptions::default() };
                write_hf_dir(&model, &hf_dir, options).unwrap_or_else(|e| panic!("{label}: {e:#}"));
            }
        }
        let source_type = |_: &str| dtype.name().to_string();
        let images = convert_inspect_generate(&hf_dir, &model, &source_type, dir.path(), &label);
        for (quant, path, report) in &images {
            // q and k rows are permuted from Hugging Face's layout: never a byte copy.
            for row in report["details"].as_array().unwrap() {
                let name = row[0].as_str().unwrap();
                if name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight") {
                    assert_eq!(
                        row[3].as_bool(),
                        Some(false),
                        "{label} {quant}: {name} is permuted, so cannot be carried"
                    );
                }
            }
            // The chat template `synth` put in tokenizer_config.json reaches the image.
            if writer == Writer::Cli {
                let template = match tokenizer {
                    TokenizerKind::SentencePiece => bramble_runtime::chat::LLAMA2,
                    TokenizerKind::ByteLevelBpe => bramble_runtime::chat::CHATML,
                };
                let image = ModelImage::open(path).unwrap();
                assert_eq!(image.chat_template(), Some(template), "{label} {quant}: chat template");
            }
        }
    }
}

/// llama2.c checkpoints of both float32 versions, with `tokenizer.bin` beside
/// them (`bramble synth --format llama2c` writes version 0; version 1 comes from
/// the library writer).
#[test]
fn llama2c_checkpoints_convert_inspect_and_generate() {
    let dir = tempfile::tempdir().unwrap();
    for version in [0u32, 1] {
        for tied in [false, true] {
            let label = format!("llama2c-v{version}-{}", if tied { "tied" } else { "untied" });
            let model = synthetic(synth_cli_shape(64, 2, tied, TokenizerKind::SentencePiece), SEED);
            let sub = dir.path().join(&label);
            std::fs::create_dir_all(&sub).unwrap();
            let checkpoint = sub.join("model.bin");
            if version == 0 {
                synth_cli("llama2c", &checkpoint, TokenizerKind::SentencePiece, "f32", tied);
            } else {
                write_llama2c(&model, &checkpoint, &sub.join("tokenizer.bin"), version)
                    .unwrap_or_else(|e| panic!("{label}: {e:#}"));
            }
            assert!(sub.join("tokenizer.bin").is_file(), "{label}: no tokenizer.bin beside the checkpoint");
            let source_type = |_: &str| "F32".to_string();
            convert_inspect_generate(&checkpoint, &model, &source_type, dir.path(), &label);
        }
    }
}

/// Everything a model computes that the tests compare across formats.
struct Behaviour {
    label: String,
    /// Logits of every position of [`probe_tokens`].
    logits: Vec<f32>,
    /// 16 greedy tokens after the probe.
    greedy: Vec<u32>,
    /// Token ids of [`PROBE_TEXTS`].
    encodings: Vec<Vec<u32>>,
}

/// Texts every format's tokenizer must split the same way. They avoid words
/// starting with b, c, f or m: the synthetic SentencePiece vocabulary has the
/// pieces `▁b ▁c ▁f ▁m` but not `b c f m`, so no chain of merges reaches them.
/// llama.cpp's tokenizer (and ours, from GGUF) still makes them from the
/// characters, while a Hugging Face `tokenizer.json` cannot express them (the
/// converter marks them unused), so those words legitimately differ.
const PROBE_TEXTS: [&str; 5] = [
    "Hello world",
    "the hat and the dish, on the sand!",
    "  two leading spaces\nnew line\ttab",
    "digits 12345 and 3.14",
    "ünïcödé € 日本",
];

fn probe_tokens(model: &SyntheticModel) -> Vec<u32> {
    let vocab = model.vocab.len() as u32;
    let mut tokens = vec![model.vocab.bos_id.unwrap_or(0)];
    tokens.extend((0..15u32).map(|i| (i * 37 + 5) % vocab));
    tokens
}

/// Converts `source` to an f32 image (library) and runs it.
fn behaviour(
    label: &str,
    source: &dyn bramble_tools::source::ModelSource,
    model: &SyntheticModel,
    dir: &Path,
) -> (Behaviour, PathBuf) {
    let path = dir.join(format!("{label}.bramble"));
    let options = bramble_tools::convert::ConvertOptions::new(bramble_tools::convert::QuantTarget::F32);
    bramble_tools::convert::convert(source, &path, &options).unwrap_or_else(|e| panic!("{label}: {e:#}"));
    let image = ModelImage::open(&path).unwrap();
    let runnable = Model::new(&image).unwrap();
    let probe = probe_tokens(model);
    let mut state = runnable.new_state(64, probe.len());
    let logits = runnable.forward(&mut state, &probe, 0, Logits::All).unwrap().to_vec();
    let tokenizer = Tokenizer::new(image.vocab()).unwrap();
    let mut session = Session::new(&runnable, &tokenizer, 64, SamplerConfig::greedy());
    session.feed(&probe).unwrap();
    let greedy = (0..16).map(|_| session.step().unwrap()).collect();
    let encodings = PROBE_TEXTS.iter().map(|text| tokenizer.encode(text, true, false)).collect();
    (Behaviour { label: label.to_string(), logits, greedy, encodings }, path)
}

fn assert_same_behaviour(reference: &(Behaviour, PathBuf), other: &(Behaviour, PathBuf)) {
    let (a, a_path) = reference;
    let (b, b_path) = other;
    // The images themselves: every tensor byte for byte (this is where a wrong q/k permutation shows).
    let (ia, ib) = (ModelImage::open(a_path).unwrap(), ModelImage::open(b_path).unwrap());
    assert_eq!(ia.config().dim, ib.config().dim);
    for info in ia.tensors() {
        let other = ib.tensor(&info.name).unwrap_or_else(|| panic!("{}: no tensor {}", b.label, info.name));
        assert_eq!(other.shape, info.shape, "{} vs {}: shape of {}", b.label, a.label, info.name);
        assert!(
            ia.tensor_bytes(info) == ib.tensor_bytes(other),
            "{} vs {}: tensor {} differs",
            b.label,
            a.label,
            info.name
        );
    }
    assert_eq!(ia.tensors().len(), ib.tensors().len(), "{} vs {}: tensor count", b.label, a.label);
    let stats = error_stats(&b.logits, &a.logits);
    eprintln!(
        "{} vs {}: max |Δlogit| {:.3e} (|logit| up to {:.2})",
        b.label, a.label, stats.max_abs, stats.reference_max
    );
    assert!(
        stats.max_abs <= CROSS_FORMAT_LOGIT_TOLERANCE,
        "{} vs {}: logits differ by up to {:.3e} (tolerance {CROSS_FORMAT_LOGIT_TOLERANCE:e})",
        b.label,
        a.label,
        stats.max_abs
    );
    assert_eq!(b.greedy, a.greedy, "{} vs {}: greedy tokens", b.label, a.label);
    for (text, (ea, eb)) in PROBE_TEXTS.iter().zip(a.encodings.iter().zip(&b.encodings)) {
        assert_eq!(eb, ea, "{} vs {}: token ids of {text:?}", b.label, a.label);
    }
}

#[test]
fn same_sentencepiece_model_in_gguf_hf_and_llama2c_gives_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic(synth_cli_shape(64, 2, false, TokenizerKind::SentencePiece), SEED);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&model, &gguf, GgmlType::F32).unwrap();
    let hf = dir.path().join("hf");
    write_hf_dir(&model, &hf, HfWriteOptions::default()).unwrap();
    let mut runs = vec![
        behaviour("gguf-f32", bramble_tools::source::open(&gguf, None).unwrap().as_ref(), &model, dir.path()),
        behaviour("hf-f32", bramble_tools::source::open(&hf, None).unwrap().as_ref(), &model, dir.path()),
    ];
    for version in [0u32, 1] {
        let sub = dir.path().join(format!("llama2c-v{version}"));
        std::fs::create_dir_all(&sub).unwrap();
        let checkpoint = sub.join("model.bin");
        write_llama2c(&model, &checkpoint, &sub.join("tokenizer.bin"), version).unwrap();
        let source = bramble_tools::source::open(&checkpoint, None).unwrap();
        runs.push(behaviour(&format!("llama2c-v{version}"), source.as_ref(), &model, dir.path()));
    }
    // The probe must mean something: the logits are not flat and the model is not silent.
    let spread = error_stats(&vec![0.0; runs[0].0.logits.len()], &runs[0].0.logits).reference_max;
    assert!(spread > 0.1, "synthetic logits are all near zero ({spread}); the comparison would be vacuous");
    for run in &runs[1..] {
        assert_same_behaviour(&runs[0], run);
    }
}

#[test]
fn same_byte_level_model_in_gguf_and_hf_gives_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic(synth_cli_shape(64, 2, true, TokenizerKind::ByteLevelBpe), SEED);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&model, &gguf, GgmlType::F32).unwrap();
    let hf = dir.path().join("hf");
    write_hf_dir(&model, &hf, HfWriteOptions::default()).unwrap();
    let a = behaviour("gguf-bpe-f32", bramble_tools::source::open(&gguf, None).unwrap().as_ref(), &model, dir.path());
    let b = behaviour("hf-bpe-f32", bramble_tools::source::open(&hf, None).unwrap().as_ref(), &model, dir.path());
    assert_same_behaviour(&a, &b);
}
