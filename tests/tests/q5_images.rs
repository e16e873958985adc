//! ggml's 5-bit blocks as image encodings: Q5_0 as q5s (and q5sx4 four rows
//! interleaved), Q5_1 as q5 (and q5x4). For each:
//!
//! - a synthetic Llama GGUF whose matrices are of that type, converted with
//!   `--quant keep`, carries every such tensor: the image's blocks (put
//!   back in row order where they are interleaved) are the GGUF's bytes, and
//!   expand to the values gguf-py (llama.cpp's own Python reader) gives, bit
//!   for bit; the report says so; the x4 and rows images give the same
//!   logits bit for bit (every 5-bit kernel is the reference's, bit for bit)
//!   and decode without allocating;
//! - `--quant q5s` / `--quant q5` of an f32 GGUF quantizes every matrix with
//!   ggml's reference rounding (the same bytes llama.cpp's
//!   `quantize_row_q5_0_ref` / `quantize_row_q5_1_ref` writes).

use bramble_runtime::allocations::CountingAllocator;
use bramble_runtime::model::{Logits, Model};
use bramble_runtime::quant::quantize_into;
use bramble_runtime::{Encoding, ModelImage};
use bramble_tests::*;
use bramble_tools::convert::{convert, ConvertOptions, ConvertReport, QuantTarget};
use bramble_tools::source::gguf::{GgmlType, GgufFile, GgufSource};
use bramble_tools::synth::SyntheticShape;
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Writes a synthetic Llama GGUF into `dir` with every matrix in `matrices`
/// (the norms F32). Width 96 (three blocks of 32 a row, no whole
/// super-block), so that of ggml's 5-bit types only Q5_0 and Q5_1 fit, as
/// on SmolLM2's 576-wide rows.
fn gguf_of(dir: &Path, matrices: GgmlType) -> PathBuf {
    let shape = SyntheticShape { dim: 96, n_heads: 3, n_kv_heads: 1, ffn_dim: 160, n_layers: 2, ..Default::default() };
    let path = dir.join(format!("{}.gguf", matrices.name()));
    write_gguf_as(&synthetic(shape, 5), &path, |_, shape| if shape.len() == 2 { matrices } else { GgmlType::F32 });
    path
}

fn convert_with(gguf: &Path, image: &Path, quant: QuantTarget, interleave: bool) -> ConvertReport {
    let source = GgufSource::open(gguf).unwrap();
    convert(&source, image, &ConvertOptions { interleave, ..ConvertOptions::new(quant) }).unwrap()
}

#[test]
fn q5_0_gguf_converted_keep_carries_its_blocks_and_runs() {
    kept_gguf_carries_its_blocks_and_runs(GgmlType::Q5_0, Encoding::Q5S);
}

#[test]
fn q5_1_gguf_converted_keep_carries_its_blocks_and_runs() {
    kept_gguf_carries_its_blocks_and_runs(GgmlType::Q5_1, Encoding::Q5);
}

/// A GGUF of `ggml_type` matrices, kept: carried as `encoding` (and its
/// interleaved form), the GGUF's bytes, gguf-py's values, one set of logits.
fn kept_gguf_carries_its_blocks_and_runs(ggml_type: GgmlType, encoding: Encoding) {
    let dir = tempfile::tempdir().unwrap();
    let gguf = gguf_of(dir.path(), ggml_type);
    let (rows_path, x4_path) = (dir.path().join("rows.bramble"), dir.path().join("x4.bramble"));
    let rows_report = convert_with(&gguf, &rows_path, QuantTarget::Keep, false);
    let report = convert_with(&gguf, &x4_path, QuantTarget::Keep, true);
    for r in [&rows_report, &report] {
        assert_eq!(r.requantized, 0, "keep converted something: {:?}", r.families);
        let families: Vec<_> = r.families.iter().filter(|f| f.source_type == ggml_type.name()).collect();
        assert!(!families.is_empty(), "no {ggml_type} family in {:?}", r.families);
        for family in families {
            assert_eq!(family.action(), format!("carried bit-exact as {}", encoding.name()), "{family}");
            assert_eq!(family.note, None, "{family}");
        }
    }

    let (rows_image, image) = (ModelImage::open(&rows_path).unwrap(), ModelImage::open(&x4_path).unwrap());
    assert_kept_tensors(&gguf, &image, &rows_image, ggml_type, encoding, &dir.path().join("gguf-py"));

    // Same blocks, kernels that are the reference's bit for bit: the same logits.
    let tokens: Vec<u32> = vec![1, 17, 42, 99, 7, 250, 3, 64, 128];
    let logits = |image: &ModelImage| {
        let model = Model::with_options(image, bramble_runtime::kernels::Kernels::detect(), 1).unwrap();
        let mut state = model.new_state(32, tokens.len());
        model.forward(&mut state, &tokens, 0, Logits::All).unwrap().to_vec()
    };
    let (x4_logits, rows_logits) = (logits(&image), logits(&rows_image));
    assert!(x4_logits.iter().all(|v| v.is_finite()));
    assert!(bits(&x4_logits) == bits(&rows_logits), "x4 and rows logits differ");

    // Decode steps after the prompt allocate nothing.
    assert_decodes_without_allocating(&image, &tokens, 8, encoding.interleaved().unwrap().name());
}

#[test]
fn quant_q5s_rounds_as_ggml_does() {
    quant_rounds_as_ggml_does(QuantTarget::Q5S, Encoding::Q5S);
}

#[test]
fn quant_q5_rounds_as_ggml_does() {
    quant_rounds_as_ggml_does(QuantTarget::Q5, Encoding::Q5);
}

/// `--quant target` of an f32 GGUF: every matrix is `encoding`, ggml's
/// reference rounding byte for byte.
fn quant_rounds_as_ggml_does(target: QuantTarget, encoding: Encoding) {
    let dir = tempfile::tempdir().unwrap();
    let gguf = gguf_of(dir.path(), GgmlType::F32);
    let image_path = dir.path().join(format!("{}.bramble", encoding.name()));
    let report = convert_with(&gguf, &image_path, target, false);
    let file = GgufFile::open(&gguf).unwrap();
    let image = ModelImage::open(&image_path).unwrap();
    let mut matrices = 0;
    for (index, info) in file.tensors().iter().enumerate().filter(|(_, t)| t.dims.len() == 2) {
        let stored = image.tensor(&info.name).unwrap();
        assert_eq!(stored.encoding, encoding, "{}", info.name);
        let values: Vec<f32> =
            file.tensor_bytes(index).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let mut expected = vec![0u16; encoding.bytes_for(values.len()) / 2];
        let expected: &mut [u8] = bytemuck::cast_slice_mut(&mut expected);
        quantize_into(encoding, &values, expected);
        assert!(image.tensor_bytes(stored) == expected, "{}: not ggml's rounding", info.name);
        matrices += 1;
    }
    assert!(matrices > 0);
    let families: Vec<_> = report.families.iter().filter(|f| f.encoding == encoding.name()).collect();
    assert!(!families.is_empty() && families.iter().all(|f| f.action() == format!("quantized to {}", encoding.name())));
}
