//! Every GGUF tensor type `bramble convert` reads, on the bytes llama.cpp
//! writes, against llama.cpp's own Python package (gguf-py):
//!
//! - random but valid blocks of every readable type, expanded by our reader
//!   and by `gguf.quants.dequantize`, agree bit for bit; the independent numpy
//!   reference (`reference.py selfcheck`) agrees on the same file;
//! - `bramble convert` of a file mixing the types says, per tensor family,
//!   what it did with each source type;
//! - `#[ignore]`d: the mixes `models/make-quant-mixes.sh` makes with
//!   `llama-quantize` (in `~/.cache/bramble/quants/`), every tensor against
//!   gguf-py, and each converted. Run with
//!   `cargo test -p bramble-tests --test gguf_types -- --ignored --nocapture`.

use bramble_runtime::model::{Logits, Model};
use bramble_runtime::quant::dequantize_rows;
use bramble_runtime::rng::SplitMix64;
use bramble_runtime::ModelImage;
use bramble_tests::*;
use bramble_tools::source::gguf::{dequantize, llama_writer, GgmlType, GgufFile, GgufSource, GgufWriter};
use bramble_tools::source::ModelSource;
use bramble_tools::synth::SyntheticShape;
use std::path::{Path, PathBuf};

/// Byte offsets of the f16 fields in one block of `ggml_type` (ggml-common.h),
/// which must be finite for a block to be valid; every other byte may be anything.
fn f16_fields(ggml_type: GgmlType) -> &'static [usize] {
    match ggml_type {
        GgmlType::F32 => &[],
        GgmlType::F16 | GgmlType::BF16 => &[0],
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::IQ4_NL | GgmlType::IQ4_XS => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        other => panic!("no block layout for {other}"),
    }
}

/// Random f16 (or bf16, 8 exponent bits) bits that are a finite number.
fn finite_half_bits(rng: &mut SplitMix64, brain: bool) -> [u8; 2] {
    let exponent_mask: u16 = if brain { 0x7F80 } else { 0x7C00 };
    let mut bits = rng.next_u64() as u16;
    if bits & exponent_mask == exponent_mask {
        bits &= !(exponent_mask & (exponent_mask >> 1)); // clear the exponent's top bit but one
    }
    bits.to_le_bytes()
}

/// Random bytes of `count` values of `ggml_type`, every f16 field finite.
fn random_blocks(ggml_type: GgmlType, count: usize, rng: &mut SplitMix64) -> Vec<u8> {
    let (_, block_bytes) = ggml_type.block_layout();
    let mut bytes: Vec<u8> = (0..ggml_type.bytes_for(count)).map(|_| rng.next_u64() as u8).collect();
    if ggml_type == GgmlType::F32 {
        for value in bytes.chunks_exact_mut(4) {
            value.copy_from_slice(&(rng.next_signed() * 100.0).to_le_bytes());
        }
    }
    for block in bytes.chunks_exact_mut(block_bytes) {
        for &at in f16_fields(ggml_type) {
            block[at..at + 2].copy_from_slice(&finite_half_bits(rng, ggml_type == GgmlType::BF16));
        }
    }
    bytes
}

/// Our expansion of tensor `index` of `file`.
fn ours(file: &GgufFile, index: usize) -> Vec<f32> {
    let info = &file.tensors()[index];
    let mut values = vec![0f32; info.element_count()];
    dequantize(info.ggml_type, file.tensor_bytes(index), &mut values)
        .unwrap_or_else(|e| panic!("{}: {}: {e:#}", file.path().display(), info.name));
    values
}

/// Asserts every tensor of `file` expands to the bits gguf-py gives (in
/// `reference_dir`); returns the types seen.
fn assert_bit_exact(file: &GgufFile, reference_dir: &Path) -> Vec<GgmlType> {
    let mut types = Vec::new();
    for (index, info) in file.tensors().iter().enumerate() {
        let label = format!("{}: {} ({})", file.path().display(), info.name, info.ggml_type);
        let reference = read_f32_file(&reference_dir.join(format!("{}.f32", info.name)));
        let values = ours(file, index);
        assert_eq!(values.len(), reference.len(), "{label}: value count");
        if let Some(i) = values.iter().zip(&reference).position(|(a, b)| a.to_bits() != b.to_bits()) {
            panic!("{label}: value {i} is {} here, {} in gguf-py", values[i], reference[i]);
        }
        if !types.contains(&info.ggml_type) {
            types.push(info.ggml_type);
        }
    }
    types
}

#[test]
fn random_blocks_of_every_readable_type_match_gguf_py_bit_for_bit() {
    let Some(reference) = Reference::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SplitMix64(0x5EED_7E57);
    let mut writer = GgufWriter::new();
    // 8 rows of 1,024: 32 super-blocks of 256, 256 blocks of 32 per type.
    for ggml_type in GgmlType::READABLE {
        let shape = [8, 1024];
        let bytes = random_blocks(ggml_type, shape.iter().product(), &mut rng);
        writer.add_tensor(&format!("random.{ggml_type}"), &shape, ggml_type, bytes).unwrap();
    }
    let path = dir.path().join("random.gguf");
    writer.write(&path).unwrap();
    let reference_dir = dir.path().join("gguf-py");
    gguf_py_dequantize(&path, &reference_dir);
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(assert_bit_exact(&file, &reference_dir), GgmlType::READABLE);

    // The independent numpy dequantizer agrees with gguf-py on the same file
    // (one tensor per type, compared bit for bit).
    let out = reference.run(&[std::ffi::OsStr::new("selfcheck"), "--gguf".as_ref(), path.as_os_str()]);
    assert!(out.contains(r#""selfcheck": "ok""#), "{out}");
}

/// Q8's error as a share of a block's largest magnitude: half a step of
/// 1/127, plus the f16 scale's rounding (2⁻¹¹ of the scale, times up to 127
/// steps): 1/254 + 1/2048 ≈ 0.0044.
const Q8_ERROR_OF_MAX: f32 = 0.0045;

/// The Llama tensor families of the mixed file, and the type each is written in.
fn mixed_type(name: &str, layer: Option<usize>) -> GgmlType {
    match (name, layer) {
        ("token_embd", _) => GgmlType::Q8_0,
        ("output", _) => GgmlType::Q6_K,
        ("attn_q", _) => GgmlType::Q5_0,
        ("attn_k", _) => GgmlType::Q5_1,
        // One family of two types, as llama.cpp's mixes do for attn_v and ffn_down.
        ("attn_v", Some(0)) => GgmlType::Q8_0,
        ("attn_v", _) => GgmlType::Q3_K,
        ("attn_output", _) => GgmlType::IQ4_NL,
        ("ffn_gate", _) => GgmlType::Q5_K,
        ("ffn_up", _) => GgmlType::IQ4_XS,
        ("ffn_down", Some(0)) => GgmlType::Q2_K,
        ("ffn_down", _) => GgmlType::Q4_1,
        _ => GgmlType::F32, // the norms
    }
}

#[test]
fn convert_reports_what_it_did_per_family() {
    let dir = tempfile::tempdir().unwrap();
    // Rows of 256 and 512: whole k-quant super-blocks.
    let shape = SyntheticShape { dim: 256, n_heads: 4, n_kv_heads: 2, ffn_dim: 512, n_layers: 3, ..Default::default() };
    let model = synthetic(shape, 5);
    let mut writer = llama_writer(&model.config, &model.vocab).unwrap();
    for (name, shape, values) in &model.tensors {
        let stem = name.strip_suffix(".weight").unwrap();
        let (layer, family) = match stem.strip_prefix("blk.").and_then(|rest| rest.split_once('.')) {
            Some((layer, family)) => (Some(layer.parse::<usize>().unwrap()), family),
            None => (None, stem),
        };
        writer.add_values(name, shape, mixed_type(family, layer), values).unwrap();
    }
    let gguf = dir.path().join("mixed.gguf");
    writer.write(&gguf).unwrap();
    let image = dir.path().join("mixed.bramble");
    let args = |extra: &[&str]| {
        let mut args: Vec<String> = ["convert", "--input", gguf.to_str().unwrap(), "--output", image.to_str().unwrap()]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };

    let text = bramble_ok(&args(&[]));
    let lines: Vec<String> =
        text.lines().skip(1).map(|line| line.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
    assert_eq!(
        lines,
        [
            "token_embd 1 × Q8_0 → carried bit-exact as q8",
            "attn_norm 3 × F32 → carried bit-exact as f32",
            "attn_q 3 × Q5_0 → dequantized, re-quantized to q4",
            "attn_k 3 × Q5_1 → dequantized, re-quantized to q4",
            "attn_v 1 × Q8_0 → dequantized, re-quantized to q4",
            "attn_v 2 × Q3_K → dequantized, re-quantized to q4",
            "attn_output 3 × IQ4_NL → dequantized, re-quantized to q4",
            "ffn_norm 3 × F32 → carried bit-exact as f32",
            "ffn_gate 3 × Q5_K → dequantized, re-quantized to q4",
            "ffn_up 3 × IQ4_XS → dequantized, re-quantized to q4",
            "ffn_down 1 × Q2_K → dequantized, re-quantized to q4",
            "ffn_down 2 × Q4_1 → carried bit-exact as q4",
            "output_norm 1 × F32 → carried bit-exact as f32",
            "output 1 × Q6_K → dequantized, re-quantized to q8",
        ],
        "{text}"
    );

    let report = bramble_json(&args(&["--quant", "q8", "--json"]));
    let families = report["families"].as_array().unwrap_or_else(|| panic!("no families: {report}"));
    let attn_v: Vec<_> = families.iter().filter(|f| f["family"] == "attn_v").collect();
    assert_eq!(attn_v.len(), 2, "{report}");
    assert_eq!(
        (&attn_v[0]["tensors"], &attn_v[0]["source_type"], &attn_v[0]["encoding"], &attn_v[0]["carried"]),
        (&1.into(), &"Q8_0".into(), &"q8".into(), &true.into()),
        "{report}"
    );
    let total: u64 = families.iter().map(|f| f["tensors"].as_u64().unwrap()).sum();
    assert_eq!(total, model.tensors.len() as u64, "{report}");

    // The (q8) image runs, and its weights are the source's within 8-bit rounding.
    let image = ModelImage::open(&image).unwrap();
    let runner = Model::new(&image).unwrap();
    let mut state = runner.new_state(4, 4);
    let logits = runner.forward(&mut state, &[1, 2, 3], 0, Logits::Last).unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
    let source = GgufSource::open(&gguf).unwrap();
    for (index, tensor) in source.tensors().iter().enumerate().filter(|(_, t)| t.shape.len() == 2) {
        let mut want = vec![0f32; tensor.rows() * tensor.cols()];
        source.read_rows(index, 0, &mut want).unwrap();
        let info = image.tensor(&tensor.name).unwrap_or_else(|| panic!("{}: not in the image", tensor.name));
        let mut got = vec![0f32; want.len()];
        dequantize_rows(info.encoding, image.tensor_bytes(info), info.cols(), &mut got);
        let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in want.iter().zip(&got).enumerate() {
            assert!(
                (a - b).abs() <= largest * Q8_ERROR_OF_MAX,
                "{} ({}) [{i}]: {a} vs {b}",
                tensor.name,
                tensor.source_type
            );
        }
    }
}

/// The files `models/make-quant-mixes.sh` writes, if any.
fn quant_mixes() -> Vec<PathBuf> {
    let dir = cache_dir().join("quants");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "gguf"));
    files.sort();
    files
}

#[test]
#[ignore = "needs models/make-quant-mixes.sh's files and a few minutes"]
fn llama_quantize_mixes_match_gguf_py_and_convert() {
    let files = quant_mixes();
    assert!(
        !files.is_empty(),
        "no GGUF files in {}: run models/make-quant-mixes.sh",
        cache_dir().join("quants").display()
    );
    let Some(reference) = Reference::get() else { return };
    for path in files {
        // gguf-py's values of a whole model are ~0.5 GB of f32: one file at a time.
        let scratch = tempfile::tempdir().unwrap();
        gguf_py_dequantize(&path, scratch.path());
        let file = GgufFile::open(&path).unwrap();
        let types = assert_bit_exact(&file, scratch.path());
        drop(scratch);
        let names: Vec<&str> = types.iter().map(|t| t.name()).collect();
        eprintln!("{}: {} tensors bit-exact ({})", path.display(), file.tensors().len(), names.join(", "));

        let out = reference.run(&[std::ffi::OsStr::new("selfcheck"), "--gguf".as_ref(), path.as_os_str()]);
        assert!(out.contains(r#""selfcheck": "ok""#), "{}: {out}", path.display());

        let image = tempfile::NamedTempFile::new().unwrap();
        let text =
            bramble_ok(&["convert", "--input", path.to_str().unwrap(), "--output", image.path().to_str().unwrap()]);
        eprintln!("{text}");
    }
}
