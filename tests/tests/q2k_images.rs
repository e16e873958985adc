//! ggml's Q2_K as an image encoding (q2k, and q2kx4 four rows interleaved):
//!
//! - a synthetic Llama GGUF whose matrices are all Q2_K, converted with
//!   `--quant keep`, carries every one: the image's blocks (put back in row
//!   order where they are interleaved) are the GGUF's bytes, and expand to
//!   the values gguf-py (llama.cpp's own Python reader) gives, bit for bit;
//!   the report says so; the rows image runs to the independent numpy
//!   reference's logits, the x4 image to the rows image's within the
//!   kernels' reordering budget, and both decode without allocating;
//! - `--quant q2k` (and `--tensor-quant PATTERN=q2k`) of an f32 GGUF
//!   quantizes every matrix of whole super-blocks with the rounding of
//!   `bramble_tools::rounding::q2k_block` (ggml's reference Q2_K search),
//!   and says which rows are not whole super-blocks and got q4 instead.

use bramble_runtime::allocations::CountingAllocator;
use bramble_runtime::model::{Logits, Model};
use bramble_runtime::{Encoding, ModelImage};
use bramble_tests::*;
use bramble_tools::convert::{convert, ConvertOptions, ConvertReport, QuantTarget};
use bramble_tools::rounding::q2k_block;
use bramble_tools::source::gguf::{GgmlType, GgufFile, GgufSource};
use bramble_tools::synth::SyntheticShape;
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Writes a synthetic Llama GGUF into `dir` with every matrix in
/// `matrices` (the norms F32): width 256, FFN `ffn_dim`.
fn gguf_of(dir: &Path, matrices: GgmlType, ffn_dim: usize) -> PathBuf {
    let shape = SyntheticShape { dim: 256, n_heads: 4, n_kv_heads: 2, ffn_dim, n_layers: 2, ..Default::default() };
    let path = dir.join(format!("{}-{ffn_dim}.gguf", matrices.name()));
    write_gguf_as(&synthetic(shape, 23), &path, |_, shape| if shape.len() == 2 { matrices } else { GgmlType::F32 });
    path
}

fn convert_with(gguf: &Path, image: &Path, options: ConvertOptions) -> ConvertReport {
    let source = GgufSource::open(gguf).unwrap();
    convert(&source, image, &options).unwrap()
}

/// Logit error budgets of the Q2_K image against the numpy reference, as
/// shares of the reference's largest |logit|: the same bits on both sides,
/// so what separates them is the int8 activations and the f32 summation
/// order, as for the other k-quants (`kquant_images.rs`, whose budgets
/// these are).
const MAX_ABS_OF_RANGE: f64 = 3.5 / 37.0;
/// See [`MAX_ABS_OF_RANGE`].
const RMS_OF_RANGE: f64 = 0.55 / 37.0;

/// Logits of the x4 image against the rows image, as a share of the
/// largest |logit|: both multiply the same blocks with the same int8
/// activations, only the kernels' order of float additions differs
/// (`kquant_images.rs`'s budget, a thousandth of the reference's).
const X4_AGAINST_ROWS_OF_RANGE: f32 = 1e-4;

#[test]
fn q2_k_gguf_converted_keep_carries_its_blocks_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = gguf_of(dir.path(), GgmlType::Q2_K, 512);
    let (rows_path, x4_path) = (dir.path().join("rows.bramble"), dir.path().join("x4.bramble"));
    let keep = |interleave| ConvertOptions { interleave, ..ConvertOptions::new(QuantTarget::Keep) };
    let rows_report = convert_with(&gguf, &rows_path, keep(false));
    let report = convert_with(&gguf, &x4_path, keep(true));
    for r in [&rows_report, &report] {
        assert_eq!(r.requantized, 0, "keep converted something: {:?}", r.families);
        let q2_k: Vec<_> = r.families.iter().filter(|f| f.source_type == "Q2_K").collect();
        assert!(!q2_k.is_empty(), "no Q2_K family in {:?}", r.families);
        for family in q2_k {
            assert_eq!(family.action(), "carried bit-exact as q2k", "{family}");
        }
    }

    let (rows_image, image) = (ModelImage::open(&rows_path).unwrap(), ModelImage::open(&x4_path).unwrap());
    assert_kept_tensors(&gguf, &image, &rows_image, GgmlType::Q2_K, Encoding::Q2K, &dir.path().join("gguf-py"));

    // The rows image against the numpy reference, which expands the same
    // blocks with its own code.
    let tokens: Vec<u32> = vec![1, 17, 42, 99, 7, 250, 3, 64, 128, 5, 11, 200];
    let logits = |image: &ModelImage| -> Vec<f32> {
        let model = Model::new(image).unwrap();
        let mut state = model.new_state(64, tokens.len());
        model.forward(&mut state, &tokens, 0, Logits::All).unwrap().to_vec()
    };
    let rows_logits = logits(&rows_image);
    if let Some(reference) = Reference::get() {
        let expected = reference.logits_all(&gguf, &tokens, dir.path());
        let stats = error_stats(&rows_logits, &expected);
        eprintln!(
            "q2k image: max |Δlogit| {:.4}, RMS {:.5}, |logit| up to {:.2}",
            stats.max_abs, stats.rms, stats.reference_max
        );
        assert!(stats.max_abs <= MAX_ABS_OF_RANGE * stats.reference_max, "max |Δlogit| {:.4}", stats.max_abs);
        assert!(stats.rms <= RMS_OF_RANGE * stats.reference_max, "RMS Δlogit {:.5}", stats.rms);
    }

    // The x4 image gives the rows image's logits.
    let x4_logits = logits(&image);
    let range = rows_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = x4_logits.iter().zip(&rows_logits).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("q2kx4 against q2k: max |Δlogit| {worst:e}, |logit| up to {range:.2}");
    assert!(range > 0.0 && x4_logits.iter().all(|v| v.is_finite()));
    assert!(worst <= X4_AGAINST_ROWS_OF_RANGE * range, "max |Δlogit| {worst}");

    assert_decodes_without_allocating(&rows_image, &tokens, 16, "q2k");
    assert_decodes_without_allocating(&image, &tokens, 16, "q2kx4");
}

/// The row-major blocks `q2k_block` gives for `values`, rows of `cols`.
fn searched(values: &[f32]) -> Vec<u8> {
    values.chunks_exact(256).flat_map(|block| bytemuck::bytes_of(&q2k_block(block, None)).to_vec()).collect()
}

#[test]
fn quant_q2k_rounds_with_the_reference_search_and_falls_back_where_it_must() {
    let dir = tempfile::tempdir().unwrap();
    // FFN 640: `ffn_down`'s rows (640 values) are not whole super-blocks.
    let gguf = gguf_of(dir.path(), GgmlType::F32, 640);
    let image_path = dir.path().join("q2k.bramble");
    let report =
        convert_with(&gguf, &image_path, ConvertOptions { interleave: false, ..ConvertOptions::new(QuantTarget::Q2K) });
    let file = GgufFile::open(&gguf).unwrap();
    let image = ModelImage::open(&image_path).unwrap();
    let mut counted = [0usize; 2];
    for (index, info) in file.tensors().iter().enumerate().filter(|(_, t)| t.dims.len() == 2) {
        let stored = image.tensor(&info.name).unwrap();
        let values: Vec<f32> =
            file.tensor_bytes(index).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        if info.name == "token_embd.weight" || info.name == "output.weight" {
            // A 2-bit target keeps the embedding and the output layer at q8.
            assert_eq!(stored.encoding, Encoding::Q8, "{}", info.name);
        } else if stored.cols().is_multiple_of(256) {
            assert_eq!(stored.encoding, Encoding::Q2K, "{}", info.name);
            assert!(image.tensor_bytes(stored) == searched(&values), "{}: not the reference search", info.name);
            counted[0] += 1;
        } else {
            assert_eq!(stored.encoding, Encoding::Q4, "{}: rows of {}", info.name, stored.cols());
            counted[1] += 1;
        }
    }
    assert_eq!(counted, [2 * 6, 2], "q2k matrices and fallbacks");
    let fallback = report.families.iter().find(|f| f.family == "ffn_down").unwrap();
    let note = fallback.note.as_deref().unwrap_or_default();
    assert!(fallback.encoding == "q4" && note.contains("q2k asked") && note.contains("640"), "{fallback}");
    for family in report.families.iter().filter(|f| f.encoding == "q2k") {
        assert_eq!(family.action(), "quantized to q2k", "{family}");
    }

    // The same search through `--tensor-quant`, interleaved.
    let mut options = ConvertOptions::new(QuantTarget::Q8);
    options.add_override("blk.*.ffn_up.weight=q2k").unwrap();
    let path = dir.path().join("override.bramble");
    convert_with(&gguf, &path, options);
    let image = ModelImage::open(&path).unwrap();
    for (index, info) in file.tensors().iter().enumerate().filter(|(_, t)| t.dims.len() == 2) {
        let stored = image.tensor(&info.name).unwrap();
        if info.name.ends_with("ffn_up.weight") {
            assert_eq!(stored.encoding, Encoding::Q2KX4, "{}", info.name);
            let values: Vec<f32> =
                file.tensor_bytes(index).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            assert!(row_major_bytes(&image, &info.name) == searched(&values), "{}", info.name);
        } else {
            assert_eq!(stored.encoding.row_major(), Encoding::Q8, "{}", info.name);
        }
    }
}
