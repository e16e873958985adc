//! ggml's k-quants as image encodings (q4k, q5k, q6k, q3k, and q4kx4,
//! q6kx4, q3kx4, q5kx4 four rows interleaved):
//!
//! - a synthetic Llama GGUF whose matrices are Q4_K, Q5_K, Q6_K and Q3_K,
//!   converted with `--quant keep --layout rows`, holds every k-quant
//!   tensor's bytes unchanged, runs to the independent numpy reference's
//!   logits, and decodes without allocating;
//! - converted with the default `--layout x4`, its Q4_K, Q6_K, Q3_K and
//!   Q5_K tensors are interleaved, deinterleave to the GGUF's bytes (Q3_K's
//!   levels repacked into planes and back), and give the rows
//!   image's logits within the kernels' reordering budget, again decoding
//!   without allocating;
//! - an image whose q4k tensor has the wrong byte length, or rows that are
//!   not whole super-blocks, is refused with an error naming the tensor;
//! - the real Q4_K_M mix of the default model (`models/make-quant-mixes.sh`,
//!   skipped when absent) keeps its Q4_K and Q6_K `ffn_down` tensors
//!   bit-exact, and its Q5_0 tensors as q5s, bit-exact too; the real Q5_K_M
//!   mix keeps every tensor, its Q5_1 ones as q5.

use bramble_runtime::allocations::CountingAllocator;
use bramble_runtime::image::layout::{Header, SectionEntry, TensorEntry};
use bramble_runtime::image::OpenOptions;
use bramble_runtime::model::{Logits, Model};
use bramble_runtime::{Encoding, ModelImage};
use bramble_tests::*;
use bramble_tools::convert::{convert, ConvertOptions, ConvertReport, QuantTarget};
use bramble_tools::source::gguf::{GgmlType, GgufFile, GgufSource};
use bramble_tools::synth::SyntheticShape;
use std::path::Path;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The type each tensor family of the synthetic file is written in: all four
/// k-quants among the projections, the embedding and the output layer.
fn kquant_type(family: &str) -> GgmlType {
    match family {
        "token_embd" | "attn_q" | "ffn_gate" => GgmlType::Q4_K,
        "attn_k" | "ffn_up" => GgmlType::Q5_K,
        "attn_v" | "ffn_down" | "output" => GgmlType::Q6_K,
        "attn_output" => GgmlType::Q3_K,
        _ => GgmlType::F32, // the norms
    }
}

/// The family of a GGUF tensor name: `blk.3.attn_q.weight` → `attn_q`.
fn family(name: &str) -> &str {
    let stem = name.strip_suffix(".weight").unwrap_or(name);
    stem.strip_prefix("blk.").and_then(|rest| rest.split_once('.')).map_or(stem, |(_, family)| family)
}

/// Writes the synthetic k-quant GGUF into `dir`: widths 256 and 512, whole
/// super-blocks of 256 in every row.
fn kquant_gguf(dir: &Path) -> std::path::PathBuf {
    let shape = SyntheticShape { dim: 256, n_heads: 4, n_kv_heads: 2, ffn_dim: 512, n_layers: 2, ..Default::default() };
    let path = dir.join("kquants.gguf");
    write_gguf_as(&synthetic(shape, 11), &path, |name, _| kquant_type(family(name)));
    path
}

/// `--quant keep`, four rows interleaved (`--layout x4`, the default) or
/// not (`--layout rows`).
fn convert_keep(gguf: &Path, image: &Path, interleave: bool) -> ConvertReport {
    let source = GgufSource::open(gguf).unwrap();
    convert(&source, image, &ConvertOptions { interleave, ..ConvertOptions::new(QuantTarget::Keep) }).unwrap()
}

/// Logit error budgets of the synthetic k-quant image against the reference,
/// as shares of the reference's largest |logit|. The weights are the same
/// bits on both sides, so what separates them is the int8 activations (per
/// block of 32, as llama.cpp does) and f32 summation order: the error the
/// q4 image of the real model shows against the same reference
/// (`reference.rs`: max 3.5 and RMS 0.55 on logits up to ≈ 37, so 9.5 % and
/// 1.5 % of the range), here on a 2-layer model.
const MAX_ABS_OF_RANGE: f64 = 3.5 / 37.0;
/// See [`MAX_ABS_OF_RANGE`].
const RMS_OF_RANGE: f64 = 0.55 / 37.0;

#[test]
fn kquant_gguf_converted_keep_is_bit_exact_matches_the_reference_and_decodes_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = kquant_gguf(dir.path());
    let image_path = dir.path().join("kquants.bramble");
    let report = convert_keep(&gguf, &image_path, false);
    assert_eq!(report.requantized, 0, "keep converted something: {:?}", report.families);

    // Every tensor carried: the k-quants' bytes are the GGUF's, row-major.
    let file = GgufFile::open(&gguf).unwrap();
    let image = ModelImage::open(&image_path).unwrap();
    let mut seen = Vec::new();
    for (index, info) in file.tensors().iter().enumerate() {
        let stored = image.tensor(&info.name).unwrap_or_else(|| panic!("{}: not in the image", info.name));
        let expected = match info.ggml_type {
            GgmlType::Q4_K => Encoding::Q4K,
            GgmlType::Q5_K => Encoding::Q5K,
            GgmlType::Q6_K => Encoding::Q6K,
            GgmlType::Q3_K => Encoding::Q3K,
            _ => Encoding::F32,
        };
        assert_eq!(stored.encoding, expected, "{}", info.name);
        assert!(image.tensor_bytes(stored) == file.tensor_bytes(index), "{}: bytes differ from the GGUF's", info.name);
        if !seen.contains(&expected) {
            seen.push(expected);
        }
    }
    assert_eq!(seen.len(), 5, "every k-quant and f32: {seen:?}");
    for family in &report.families {
        assert!(family.carried && family.action().starts_with("carried bit-exact"), "{family}");
    }

    // The forward pass against the numpy reference, which expands the same
    // blocks with its own code.
    let model = Model::new(&image).unwrap();
    let tokens: Vec<u32> = vec![1, 17, 42, 99, 7, 250, 3, 64, 128, 5, 11, 200];
    let mut state = model.new_state(64, tokens.len());
    let ours = model.forward(&mut state, &tokens, 0, Logits::All).unwrap().to_vec();
    if let Some(reference) = Reference::get() {
        let expected = reference.logits_all(&gguf, &tokens, dir.path());
        let stats = error_stats(&ours, &expected);
        eprintln!(
            "k-quant image: max |Δlogit| {:.4}, RMS {:.5}, |logit| up to {:.2}",
            stats.max_abs, stats.rms, stats.reference_max
        );
        assert!(
            stats.max_abs <= MAX_ABS_OF_RANGE * stats.reference_max,
            "max |Δlogit| {:.4} exceeds {:.4}",
            stats.max_abs,
            MAX_ABS_OF_RANGE * stats.reference_max
        );
        assert!(
            stats.rms <= RMS_OF_RANGE * stats.reference_max,
            "RMS Δlogit {:.5} exceeds {:.5}",
            stats.rms,
            RMS_OF_RANGE * stats.reference_max
        );
        let vocab = image.config().vocab_size as usize;
        for position in 0..tokens.len() {
            let row = position * vocab..(position + 1) * vocab;
            if top2_gap(&expected[row.clone()]) as f64 > 2.0 * stats.max_abs {
                assert_eq!(argmax(&ours[row.clone()]), argmax(&expected[row]), "position {position}");
            }
        }
    }

    // Decode steps, one token at a time after the prompt, allocate nothing.
    assert_decodes_without_allocating(&image, &tokens, 16, "k-quant");
}

/// Logits of the x4 image against the rows image, as a share of the
/// largest |logit|. Both multiply the same blocks with the same int8
/// activations; only the kernels' order of float additions differs (each
/// product within about 10⁻⁶ of Σ|terms| of the reference, the kernel tests'
/// budget), and two layers of attention, norms and SwiGLU amplify that a
/// little: 10⁻⁴ of the range leaves a wide margin over that and is still a
/// thousandth of the reference budget above, which a wrongly interleaved or
/// decoded block would exceed by far.
const X4_AGAINST_ROWS_OF_RANGE: f32 = 1e-4;

#[test]
fn kquant_gguf_converted_x4_interleaves_every_k_quant_and_gives_the_rows_logits() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = kquant_gguf(dir.path());
    let (rows_path, x4_path) = (dir.path().join("rows.bramble"), dir.path().join("x4.bramble"));
    convert_keep(&gguf, &rows_path, false);
    let report = convert_keep(&gguf, &x4_path, true);
    assert_eq!(report.requantized, 0, "keep converted something: {:?}", report.families);

    // Matrices of whole groups of four rows interleaved, whatever their
    // k-quant, Q4_K's of whole groups of eight eight rows at a time (not
    // the embedding: the synthetic vocabulary is not a multiple of 4);
    // every tensor's bytes, in row order, the GGUF's.
    // `attn_k` (Q5_K) and `attn_output` (Q3_K) have 128 and 256 rows.
    let file = GgufFile::open(&gguf).unwrap();
    let image = ModelImage::open(&x4_path).unwrap();
    let mut interleaved = Vec::new();
    for (index, info) in file.tensors().iter().enumerate() {
        let stored = image.tensor(&info.name).unwrap();
        let groups_of_four = stored.shape.len() == 2 && stored.rows().is_multiple_of(4);
        let groups_of_eight = stored.shape.len() == 2 && stored.rows().is_multiple_of(8);
        let expected = match info.ggml_type {
            GgmlType::Q4_K if groups_of_eight => Encoding::Q4KX8,
            GgmlType::Q4_K if groups_of_four => Encoding::Q4KX4,
            GgmlType::Q4_K => Encoding::Q4K,
            GgmlType::Q5_K if groups_of_four => Encoding::Q5KX4,
            GgmlType::Q5_K => Encoding::Q5K,
            GgmlType::Q6_K if groups_of_four => Encoding::Q6KX4,
            GgmlType::Q6_K => Encoding::Q6K,
            GgmlType::Q3_K if groups_of_four => Encoding::Q3KX4,
            GgmlType::Q3_K => Encoding::Q3K,
            _ => Encoding::F32,
        };
        assert_eq!(stored.encoding, expected, "{}", info.name);
        if expected.rows_interleaved() > 1 {
            assert_ne!(image.tensor_bytes(stored), file.tensor_bytes(index), "{}: not interleaved", info.name);
            interleaved.push(expected);
        }
        assert!(row_major_bytes(&image, &info.name) == file.tensor_bytes(index), "{}: bytes differ", info.name);
    }
    for encoding in [Encoding::Q4KX8, Encoding::Q6KX4, Encoding::Q3KX4, Encoding::Q5KX4] {
        assert!(interleaved.contains(&encoding), "no {encoding:?} among {interleaved:?}");
    }

    // The same logits as the rows image, token embedding rows and the
    // output layer included.
    let tokens: Vec<u32> = vec![1, 17, 42, 99, 7, 250, 3, 64, 128, 5, 11, 200];
    let rows_image = ModelImage::open(&rows_path).unwrap();
    let logits = |image: &ModelImage| -> Vec<f32> {
        let model = Model::new(image).unwrap();
        let mut state = model.new_state(64, tokens.len());
        model.forward(&mut state, &tokens, 0, Logits::All).unwrap().to_vec()
    };
    let (expected, ours) = (logits(&rows_image), logits(&image));
    let range = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = ours.iter().zip(&expected).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("x4 against rows: max |Δlogit| {worst:e}, |logit| up to {range:.2}");
    assert!(
        worst <= X4_AGAINST_ROWS_OF_RANGE * range,
        "max |Δlogit| {worst} exceeds {}",
        X4_AGAINST_ROWS_OF_RANGE * range
    );

    // Decode steps allocate nothing.
    assert_decodes_without_allocating(&image, &tokens, 16, "x4 k-quant");
}

/// The image's bytes with tensor `name`'s index entry changed by `damage`,
/// the index's checksum made right again, so only the entry itself is wrong.
fn damaged(image: &ModelImage, name: &str, damage: impl Fn(&mut TensorEntry)) -> Vec<u8> {
    let mut bytes = image.bytes().to_vec();
    let index = image.sections().iter().find(|s| s.name == "tensor_index").unwrap().clone();
    let entry_size = size_of::<TensorEntry>();
    let at = (0..index.size / entry_size)
        .map(|i| index.offset + i * entry_size)
        .find(|&at| {
            let entry: TensorEntry = bytemuck::pod_read_unaligned(&bytes[at..at + entry_size]);
            bramble_runtime::image::layout::read_fixed_name(&entry.name) == Some(name)
        })
        .unwrap_or_else(|| panic!("{name}: no index entry"));
    let mut entry: TensorEntry = bytemuck::pod_read_unaligned(&bytes[at..at + entry_size]);
    damage(&mut entry);
    bytes[at..at + entry_size].copy_from_slice(bytemuck::bytes_of(&entry));
    let checksum = crc32fast::hash(&bytes[index.offset..index.offset + index.size]);
    let header: Header = bytemuck::pod_read_unaligned(&bytes[..64]);
    let table = header.section_table_offset as usize;
    for slot in (0..header.section_count as usize).map(|i| table + 64 * i) {
        let mut section: SectionEntry = bytemuck::pod_read_unaligned(&bytes[slot..slot + 64]);
        if section.offset as usize == index.offset {
            section.checksum = checksum;
            bytes[slot..slot + 64].copy_from_slice(bytemuck::bytes_of(&section));
        }
    }
    bytes
}

#[test]
fn damaged_kquant_tensors_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = kquant_gguf(dir.path());
    let image_path = dir.path().join("kquants.bramble");
    convert_keep(&gguf, &image_path, false);
    let image = ModelImage::open(&image_path).unwrap();
    let name = "blk.1.attn_q.weight";
    let info = image.tensor(name).unwrap();
    assert_eq!((info.encoding, info.cols()), (Encoding::Q4K, 256));
    let open = |bytes: &[u8]| ModelImage::from_bytes("damaged", bytes, OpenOptions::default()).err();

    // One super-block short.
    let short = damaged(&image, name, |entry| entry.size -= 144);
    let error = open(&short).expect("a q4k tensor one block short opened");
    eprintln!("one block short: {error}");
    assert!(error.to_string().contains(name) && error.to_string().contains("bytes"), "{error}");

    // The same values as rows of 128: not whole super-blocks of 256.
    let narrow = damaged(&image, name, |entry| {
        entry.shape[0] *= 2;
        entry.shape[1] /= 2;
    });
    let error = open(&narrow).expect("q4k rows of 128 opened");
    eprintln!("rows of 128: {error}");
    let message = error.to_string();
    assert!(message.contains(name) && message.contains("128") && message.contains("256"), "{error}");

    // Undamaged, the same bytes open.
    assert!(open(image.bytes()).is_none());
}

#[test]
fn real_q4_k_m_mix_keeps_its_k_quant_blocks() {
    if std::env::var("BRAMBLE_SKIP_MODEL").is_ok_and(|v| v == "1") {
        eprintln!("BRAMBLE_SKIP_MODEL=1: skipping the real Q4_K_M mix");
        return;
    }
    let gguf = cache_dir().join("quants/SmolLM2-135M-Instruct.Q4_K_M.gguf");
    if !gguf.is_file() {
        eprintln!("{} is absent (models/make-quant-mixes.sh makes it): skipped", gguf.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image_path = dir.path().join("q4km-keep.bramble");
    let report = convert_keep(&gguf, &image_path, true);
    let file = GgufFile::open(&gguf).unwrap();
    let image = ModelImage::open(&image_path).unwrap();
    let mut kept = [0usize; 2];
    for (index, info) in file.tensors().iter().enumerate().filter(|(_, t)| family(&t.name) == "ffn_down") {
        let stored = image.tensor(&info.name).unwrap();
        let slot = match info.ggml_type {
            GgmlType::Q4_K => 0,
            GgmlType::Q6_K => 1,
            other => panic!("{}: {other}, expected Q4_K or Q6_K in a Q4_K_M mix", info.name),
        };
        // Rows of 576: whole groups of eight (Q4_K) and of four, interleaved (the default layout).
        assert_eq!(stored.encoding, [Encoding::Q4KX8, Encoding::Q6KX4][slot], "{}", info.name);
        assert!(row_major_bytes(&image, &info.name) == file.tensor_bytes(index), "{}: bytes differ", info.name);
        kept[slot] += 1;
    }
    assert!(kept[0] > 0 && kept[1] > 0, "Q4_K and Q6_K ffn_down tensors kept: {kept:?}");
    // Q5_0 (llama.cpp's choice for rows of 576, not whole super-blocks)
    // is carried bit-exact as q5s (ggml's Q5_0 blocks), interleaved.
    let q5_0: Vec<_> = report.families.iter().filter(|f| f.source_type == "Q5_0").collect();
    assert!(!q5_0.is_empty(), "no Q5_0 family in {:?}", report.families);
    for family in q5_0 {
        assert_eq!((family.encoding.as_str(), family.carried), ("q5s", true), "{family}");
    }
    for (index, info) in file.tensors().iter().enumerate().filter(|(_, t)| t.ggml_type == GgmlType::Q5_0) {
        let stored = image.tensor(&info.name).unwrap();
        assert_eq!(stored.encoding.row_major(), Encoding::Q5S, "{}", info.name);
        assert!(row_major_bytes(&image, &info.name) == file.tensor_bytes(index), "{}: bytes differ", info.name);
    }
    // It runs: a few tokens' logits are finite.
    let model = Model::new(&image).unwrap();
    let mut state = model.new_state(8, 4);
    let logits = model.forward(&mut state, &[1, 2, 3, 4], 0, Logits::Last).unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
}

/// The real Q5_K_M mix (`models/make-quant-mixes.sh`, skipped when absent):
/// every tensor is carried bit-exact, its Q5_1 tensors (llama.cpp's choice
/// for the rows of 576 there, where Q4_K_M has Q5_0) as q5, interleaved.
#[test]
fn real_q5_k_m_mix_keeps_every_tensor() {
    if std::env::var("BRAMBLE_SKIP_MODEL").is_ok_and(|v| v == "1") {
        eprintln!("BRAMBLE_SKIP_MODEL=1: skipping the real Q5_K_M mix");
        return;
    }
    let gguf = cache_dir().join("quants/SmolLM2-135M-Instruct.Q5_K_M.gguf");
    if !gguf.is_file() {
        eprintln!("{} is absent (models/make-quant-mixes.sh makes it): skipped", gguf.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image_path = dir.path().join("q5km-keep.bramble");
    let report = convert_keep(&gguf, &image_path, true);
    assert_eq!(report.requantized, 0, "{:?}", report.families);
    let q5_1: Vec<_> = report.families.iter().filter(|f| f.source_type == "Q5_1").collect();
    assert!(!q5_1.is_empty(), "no Q5_1 family in {:?}", report.families);
    for family in q5_1 {
        assert_eq!((family.encoding.as_str(), family.carried), ("q5", true), "{family}");
    }
    let file = GgufFile::open(&gguf).unwrap();
    let image = ModelImage::open(&image_path).unwrap();
    for (index, info) in file.tensors().iter().enumerate().filter(|(_, t)| t.ggml_type == GgmlType::Q5_1) {
        let stored = image.tensor(&info.name).unwrap();
        // Rows of 192 or more, whole groups of four: interleaved.
        assert_eq!(stored.encoding, Encoding::Q5X4, "{}", info.name);
        assert!(row_major_bytes(&image, &info.name) == file.tensor_bytes(index), "{}: bytes differ", info.name);
    }
    let model = Model::new(&image).unwrap();
    let mut state = model.new_state(8, 4);
    let logits = model.forward(&mut state, &[1, 2, 3, 4], 0, Logits::Last).unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
}
