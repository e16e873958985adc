//! ggml's Q5_0 as an image encoding (q5s, and q5sx4 four rows interleaved):
//!
//! - a synthetic Llama GGUF whose matrices are Q5_0, converted with
//!   `--quant keep`, carries every Q5_0 tensor: the image's blocks (put
//!   back in row order where they are interleaved) are the GGUF's bytes, and
//!   expand to the values gguf-py (llama.cpp's own Python reader) gives, bit
//!   for bit; the report says so; the x4 and rows images give the same
//!   logits bit for bit (every q5s kernel is the reference's, bit for bit)
//!   and decode without allocating;
//! - `--quant q5s` of an f32 GGUF quantizes every matrix with ggml's
//!   reference rounding (the same bytes llama.cpp's `quantize_row_q5_0_ref`
//!   writes).

use bramble_runtime::allocations::{thread_allocations, CountingAllocator};
use bramble_runtime::model::{Logits, Model};
use bramble_runtime::quant::{dequantize_rows, quantize_into};
use bramble_runtime::{Encoding, ModelImage};
use bramble_tests::*;
use bramble_tools::convert::{convert, ConvertOptions, ConvertReport, QuantTarget};
use bramble_tools::source::gguf::{llama_writer, GgmlType, GgufFile, GgufSource};
use bramble_tools::synth::SyntheticShape;
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Writes a synthetic Llama GGUF into `dir` with every matrix in `matrices`
/// (the norms F32). Width 96 (three blocks of 32 a row, no whole
/// super-block), so that only Q5_0 among ggml's 5-bit types fits.
fn gguf_of(dir: &Path, matrices: GgmlType) -> PathBuf {
    let shape = SyntheticShape { dim: 96, n_heads: 3, n_kv_heads: 1, ffn_dim: 160, n_layers: 2, ..Default::default() };
    let model = synthetic(shape, 5);
    let mut writer = llama_writer(&model.config, &model.vocab).unwrap();
    for (name, shape, values) in &model.tensors {
        let ggml_type = if shape.len() == 2 { matrices } else { GgmlType::F32 };
        writer.add_values(name, shape, ggml_type, values).unwrap();
    }
    let path = dir.join(format!("{}.gguf", matrices.name()));
    writer.write(&path).unwrap();
    path
}

fn convert_with(gguf: &Path, image: &Path, quant: QuantTarget, interleave: bool) -> ConvertReport {
    let source = GgufSource::open(gguf).unwrap();
    convert(&source, image, &ConvertOptions { interleave, ..ConvertOptions::new(quant) }).unwrap()
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn q5_0_gguf_converted_keep_carries_its_blocks_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = gguf_of(dir.path(), GgmlType::Q5_0);
    let (rows_path, x4_path) = (dir.path().join("rows.bramble"), dir.path().join("x4.bramble"));
    let rows_report = convert_with(&gguf, &rows_path, QuantTarget::Keep, false);
    let report = convert_with(&gguf, &x4_path, QuantTarget::Keep, true);
    for r in [&rows_report, &report] {
        assert_eq!(r.requantized, 0, "keep converted something: {:?}", r.families);
        for family in r.families.iter().filter(|f| f.source_type == "Q5_0") {
            assert_eq!(family.action(), "carried bit-exact as q5s", "{family}");
        }
    }

    let file = GgufFile::open(&gguf).unwrap();
    let (rows_image, image) = (ModelImage::open(&rows_path).unwrap(), ModelImage::open(&x4_path).unwrap());
    let reference_dir = dir.path().join("gguf-py");
    // gguf-py's expansion, unless the Python reference is skipped.
    let with_python = Reference::get().is_some();
    if with_python {
        gguf_py_dequantize(&gguf, &reference_dir);
    }
    let mut seen = Vec::new();
    for (index, info) in file.tensors().iter().enumerate().filter(|(_, t)| t.ggml_type == GgmlType::Q5_0) {
        let stored = image.tensor(&info.name).unwrap();
        let rows = stored.rows();
        // The default layout interleaves matrices of whole groups of four rows.
        let expected = if rows % 4 == 0 { Encoding::Q5SX4 } else { Encoding::Q5S };
        assert_eq!(stored.encoding, expected, "{} ({rows} rows)", info.name);
        assert_eq!(rows_image.tensor(&info.name).unwrap().encoding, Encoding::Q5S, "{}", info.name);
        assert!(row_major_bytes(&image, &info.name) == file.tensor_bytes(index), "{}: bytes differ", info.name);
        assert!(row_major_bytes(&rows_image, &info.name) == file.tensor_bytes(index), "{}: bytes differ", info.name);
        if with_python {
            let mut ours = vec![0f32; rows * stored.cols()];
            dequantize_rows(stored.encoding, image.tensor_bytes(stored), stored.cols(), &mut ours);
            let theirs = read_f32_file(&reference_dir.join(format!("{}.f32", info.name)));
            assert!(bits(&ours) == bits(&theirs), "{}: values differ from gguf-py's", info.name);
        }
        if !seen.contains(&expected) {
            seen.push(expected);
        }
    }
    assert_eq!(seen.len(), 2, "both row orders: {seen:?}");

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
    let model = Model::new(&image).unwrap();
    let mut state = model.new_state(32, tokens.len());
    model.forward(&mut state, &tokens, 0, Logits::Last).unwrap();
    let mut token = argmax(state.logits()) as u32;
    let before = thread_allocations();
    for pos in tokens.len()..tokens.len() + 8 {
        token = argmax(model.forward(&mut state, &[token], pos, Logits::Last).unwrap()) as u32;
    }
    assert_eq!(thread_allocations() - before, 0, "decode steps of the q5s image allocated");
}

#[test]
fn quant_q5s_rounds_as_ggml_does() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = gguf_of(dir.path(), GgmlType::F32);
    let image_path = dir.path().join("q5s.bramble");
    let report = convert_with(&gguf, &image_path, QuantTarget::Q5S, false);
    let file = GgufFile::open(&gguf).unwrap();
    let image = ModelImage::open(&image_path).unwrap();
    let mut matrices = 0;
    for (index, info) in file.tensors().iter().enumerate().filter(|(_, t)| t.dims.len() == 2) {
        let stored = image.tensor(&info.name).unwrap();
        assert_eq!(stored.encoding, Encoding::Q5S, "{}", info.name);
        let values: Vec<f32> =
            file.tensor_bytes(index).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let mut expected = vec![0u16; Encoding::Q5S.bytes_for(values.len()) / 2];
        let expected: &mut [u8] = bytemuck::cast_slice_mut(&mut expected);
        quantize_into(Encoding::Q5S, &values, expected);
        assert!(image.tensor_bytes(stored) == expected, "{}: not ggml's rounding", info.name);
        matrices += 1;
    }
    assert!(matrices > 0);
    assert!(report.families.iter().filter(|f| f.encoding == "q5s").all(|f| f.action() == "quantized to q5s"));
}
