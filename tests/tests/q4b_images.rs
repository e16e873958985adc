//! Q4B as an image encoding (`--quant q4b`, `--tensor-quant PATTERN=q4b`):
//! Q4_1's levels with a byte scale and a byte offset a block under an f32
//! scale a row, 4.5 bits a value against Q4_1's 5.
//!
//! - A Q4_1 GGUF converted with every matrix to Q4B keeps its levels: every matrix
//!   holds `q4b_from_q4` of the GGUF's own Q4_1 blocks (row scales in front,
//!   blocks interleaved for x4), the report says so, and nothing is weighed
//!   by an importance matrix; the image runs close to the Q4_1 image it came
//!   from, x4 and rows images agree, and decoding allocates nothing.
//! - From an f32 GGUF, `--quant q4b` rounds each matrix as `q4` does
//!   (ggml's Q4_1 reference rounding) and then into Q4B: `quantize_into`'s
//!   bytes; the embedding and output layer get q5s, the mix's default.

use bramble_runtime::allocations::CountingAllocator;
use bramble_runtime::model::{Logits, Model};
use bramble_runtime::quant::{deinterleave_bytes, q4b_from_q4, quantize_into, BlockQ4};
use bramble_runtime::{Encoding, ModelImage};
use bramble_tests::*;
use bramble_tools::convert::{convert, ConvertOptions, ConvertReport, QuantTarget};
use bramble_tools::source::gguf::{GgmlType, GgufFile, GgufSource};
use bramble_tools::synth::SyntheticShape;
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Largest logit difference allowed between the Q4B image and the Q4_1
/// image it was rounded from, as a fraction of the largest |logit|. Each
/// weight moves by at most 11.75 row scales (`q4b_from_q4`), about 5 % of
/// the row's largest Q4_1 step and mostly much less; on these small random
/// models that moves the logits by 1–2 % of their range.
const Q4B_AGAINST_Q4_LOGITS: f32 = 0.05;

/// Largest difference between the x4 image's logits (NEON or AVX2 kernels)
/// and the rows image's (the scalar reference), as a fraction of the
/// largest |logit|: the kernels' float steps in another order, through a
/// forward pass that rounds each layer's input to int8 again.
const X4_AGAINST_ROWS_LOGITS: f32 = 1e-4;

/// A synthetic Llama GGUF with every matrix `matrices` (the norms F32),
/// rows of 96 values (three blocks of 32, as SmolLM2's 576 are eighteen).
fn gguf_of(dir: &Path, matrices: GgmlType) -> PathBuf {
    let shape = SyntheticShape { dim: 96, n_heads: 3, n_kv_heads: 1, ffn_dim: 160, n_layers: 2, ..Default::default() };
    let path = dir.join(format!("{}.gguf", matrices.name()));
    write_gguf_as(&synthetic(shape, 7), &path, |_, shape| if shape.len() == 2 { matrices } else { GgmlType::F32 });
    path
}

/// The embedding and the output layer (tensor or family name).
fn is_head(name: &str) -> bool {
    name.starts_with("token_embd") || name.starts_with("output.") || name == "output"
}

fn convert_with(gguf: &Path, image: &Path, quant: QuantTarget, interleave: bool) -> ConvertReport {
    let source = GgufSource::open(gguf).unwrap();
    convert(&source, image, &ConvertOptions { interleave, ..ConvertOptions::new(quant) }).unwrap()
}

/// Every matrix to Q4B, the embedding and output layer too (`--tensor-quant '*=q4b'`).
fn convert_all_q4b(gguf: &Path, image: &Path, interleave: bool) -> ConvertReport {
    let source = GgufSource::open(gguf).unwrap();
    let mut options = ConvertOptions { interleave, ..ConvertOptions::new(QuantTarget::Q4B) };
    options.add_override("*=q4b").unwrap();
    convert(&source, image, &options).unwrap()
}

/// A tensor's bytes in row order (x4 blocks put back), row scales first.
fn row_major_bytes(image: &ModelImage, name: &str) -> Vec<u8> {
    let info = image.tensor(name).unwrap();
    let bytes = image.tensor_bytes(info);
    if info.encoding == info.encoding.row_major() {
        return bytes.to_vec();
    }
    let mut rows = vec![0u8; bytes.len()];
    deinterleave_bytes(info.encoding, bytes, info.cols(), &mut rows);
    rows
}

fn logits(image: &ModelImage, tokens: &[u32]) -> Vec<f32> {
    let model = Model::with_options(image, bramble_runtime::kernels::Kernels::detect(), 1).unwrap();
    let mut state = model.new_state(32, tokens.len());
    model.forward(&mut state, tokens, 0, Logits::All).unwrap().to_vec()
}

fn largest_difference(a: &[f32], b: &[f32]) -> (f32, f32) {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    (a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())), scale)
}

#[test]
fn q4_1_gguf_to_q4b_keeps_its_levels_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = gguf_of(dir.path(), GgmlType::Q4_1);
    let paths = ["q4.bramble", "rows.bramble", "x4.bramble"].map(|name| dir.path().join(name));
    convert_with(&gguf, &paths[0], QuantTarget::Keep, true);
    let rows_report = convert_all_q4b(&gguf, &paths[1], false);
    let report = convert_all_q4b(&gguf, &paths[2], true);
    for r in [&rows_report, &report] {
        let families: Vec<_> = r.families.iter().filter(|f| f.source_type == "Q4_1").collect();
        assert!(!families.is_empty(), "no Q4_1 family in {:?}", r.families);
        for family in families {
            assert!(family.encoding.starts_with("q4b"), "{family}");
            assert_eq!(family.note.as_deref(), Some("Q4_1's levels, scales and minimums rounded to bytes"), "{family}");
        }
    }
    let [q4_image, rows_image, image] = paths.map(|p| ModelImage::open(&p).unwrap());

    // Every matrix: q4b_from_q4 of the GGUF's own blocks, in both layouts.
    let file = GgufFile::open(&gguf).unwrap();
    let (mut matrices, mut interleaved) = (0, 0);
    for (index, info) in file.tensors().iter().enumerate().filter(|(_, t)| t.dims.len() == 2) {
        let cols = info.dims[0];
        let blocks: Vec<BlockQ4> = bytemuck::pod_collect_to_vec(file.tensor_bytes(index));
        let mut expected = vec![0u8; Encoding::Q4B.tensor_bytes(blocks.len() * 32 / cols, cols)];
        q4b_from_q4(&blocks, cols, &mut expected);
        assert_eq!(rows_image.tensor(&info.name).unwrap().encoding, Encoding::Q4B, "{}", info.name);
        assert!(row_major_bytes(&rows_image, &info.name) == expected, "{}: rows image", info.name);
        assert!(row_major_bytes(&image, &info.name) == expected, "{}: x4 image", info.name);
        interleaved += (image.tensor(&info.name).unwrap().encoding == Encoding::Q4BX4) as usize;
        matrices += 1;
    }
    assert!(matrices > 0 && interleaved > 0, "{matrices} matrices, {interleaved} interleaved");
    // 4.5 bits a value and an f32 a row, against Q4_1's 5 bits.
    let body =
        |image: &ModelImage| -> usize { image.tensors().iter().filter(|t| t.shape.len() == 2).map(|t| t.size).sum() };
    let (q4b_body, q4_body) = (body(&image), body(&q4_image));
    let rows: usize = image.tensors().iter().filter(|t| t.shape.len() == 2).map(|t| t.rows()).sum();
    assert_eq!(q4b_body, q4_body / 20 * 18 + 4 * rows, "q4b body {q4b_body} bytes, Q4_1's {q4_body}");
    assert!(q4b_body < q4_body);

    let tokens: Vec<u32> = vec![1, 17, 42, 99, 7, 250, 3, 64, 128];
    let (q4, rows, x4) = (logits(&q4_image, &tokens), logits(&rows_image, &tokens), logits(&image, &tokens));
    assert!(x4.iter().all(|v| v.is_finite()));
    let (moved, scale) = largest_difference(&rows, &q4);
    assert!(moved <= Q4B_AGAINST_Q4_LOGITS * scale, "q4b moved the logits by {moved} (largest |logit| {scale})");
    assert!(moved > 0.0, "q4b gave the Q4_1 image's logits exactly: were the scales rounded at all?");
    let (apart, scale) = largest_difference(&x4, &rows);
    assert!(apart <= X4_AGAINST_ROWS_LOGITS * scale, "x4 and rows logits {apart} apart (largest |logit| {scale})");

    assert_decodes_without_allocating(&image, &tokens, 8, "q4bx4");
}

#[test]
fn quant_q4b_rounds_f32_as_q4_then_into_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = gguf_of(dir.path(), GgmlType::F32);
    let image_path = dir.path().join("q4b.bramble");
    let report = convert_with(&gguf, &image_path, QuantTarget::Q4B, false);
    let file = GgufFile::open(&gguf).unwrap();
    let image = ModelImage::open(&image_path).unwrap();
    let mut matrices = 0;
    for (index, info) in file.tensors().iter().enumerate().filter(|(_, t)| t.dims.len() == 2) {
        let stored = image.tensor(&info.name).unwrap();
        if is_head(&info.name) {
            assert_eq!(stored.encoding, Encoding::Q5S, "{}", info.name);
            continue;
        }
        assert_eq!(stored.encoding, Encoding::Q4B, "{}", info.name);
        let values: Vec<f32> =
            file.tensor_bytes(index).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let mut expected = vec![0u8; Encoding::Q4B.tensor_bytes(stored.rows(), stored.cols())];
        quantize_into(Encoding::Q4B, &values, &mut expected);
        assert!(image.tensor_bytes(stored) == expected, "{}: not q4's rounding then Q4B's", info.name);
        matrices += 1;
    }
    assert!(matrices > 0);
    let families: Vec<_> = report.families.iter().filter(|f| f.encoding == "q4b").collect();
    assert!(!families.is_empty() && families.iter().all(|f| f.action() == "quantized to q4b" && f.note.is_none()));
}

#[test]
fn a_q4_1_block_with_a_non_finite_scale_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = gguf_of(dir.path(), GgmlType::Q4_1);
    // Block 4 of blk.1.ffn_up.weight gets a NaN scale (f16 0x7E00).
    let offset = {
        let file = GgufFile::open(&gguf).unwrap();
        file.tensors().iter().find(|t| t.name == "blk.1.ffn_up.weight").unwrap().offset + 4 * 20
    };
    let mut bytes = std::fs::read(&gguf).unwrap();
    bytes[offset..offset + 2].copy_from_slice(&[0x00, 0x7E]);
    std::fs::write(&gguf, &bytes).unwrap();
    let source = GgufSource::open(&gguf).unwrap();
    let output = dir.path().join("bad.bramble");
    let error = convert(&source, &output, &ConvertOptions::new(QuantTarget::Q4B)).unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("blk.1.ffn_up.weight") && message.contains("block 4") && message.contains("not finite"),
        "{message}"
    );
    assert!(!output.exists(), "a failed conversion leaves no image");
}
