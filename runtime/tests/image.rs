//! The image reader against valid, corrupt, truncated and future images.

mod common;

use bramble_runtime::image::layout::{self, section};
use bramble_runtime::image::{ImageWriter, OpenOptions, TensorView};
use bramble_runtime::quant::Encoding;
use bramble_runtime::{ErrorKind, Model, ModelImage};
use common::{tiny_config, tiny_vocab, write_tiny};

fn open_bytes(bytes: &[u8]) -> bramble_runtime::Result<ModelImage> {
    ModelImage::from_bytes("test.bramble", bytes, OpenOptions::default())
}

#[test]
fn valid_image_opens_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bramble");
    write_tiny(&path, |_| {});
    let image = ModelImage::open(&path).unwrap();
    assert_eq!(*image.config(), tiny_config());
    assert_eq!(*image.vocab(), tiny_vocab());
    assert_eq!(image.tensors().len(), 11);
    for t in image.tensors() {
        assert_eq!(t.offset % 64, 0, "{} is not 64-byte aligned", t.name);
    }
    assert!(
        matches!(image.tensor_view(image.tensor("blk.0.attn_k.weight").unwrap()), TensorView::Q4S(b) if b.len() == 16)
    );
    let model = Model::new(&image).unwrap();
    let mut state = model.new_state(8, 4);
    let logits = model.forward(&mut state, &[1, 3, 4], 0, bramble_runtime::model::Logits::All).unwrap();
    assert_eq!(logits.len(), 3 * 6);
    assert!(logits.iter().all(|v| v.is_finite()));
    // No temporary file is left beside the image.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("tiny.bramble")]);
}

#[test]
fn forward_rejects_bad_tokens_and_positions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bramble");
    write_tiny(&path, |_| {});
    let image = ModelImage::open(&path).unwrap();
    let model = Model::new(&image).unwrap();
    let mut state = model.new_state(4, 2);
    let last = bramble_runtime::model::Logits::Last;
    assert_eq!(model.forward(&mut state, &[6], 0, last).unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(model.forward(&mut state, &[1], 4, last).unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(model.forward(&mut state, &[1, 2, 3], 0, last).unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(model.forward(&mut state, &[], 0, last).unwrap_err().kind(), ErrorKind::InvalidInput);
}

#[test]
fn every_truncation_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = write_tiny(&dir.path().join("tiny.bramble"), |_| {});
    for len in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
        let error = open_bytes(&bytes[..len]).err().unwrap_or_else(|| panic!("truncated to {len} bytes opened"));
        assert_eq!(error.kind(), ErrorKind::Corrupt, "{len}: {error}");
    }
}

#[test]
fn every_flipped_byte_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = write_tiny(&dir.path().join("tiny.bramble"), |_| {});
    let mut caught = 0;
    for at in (0..bytes.len()).step_by(3) {
        let mut corrupt = bytes.clone();
        corrupt[at] ^= 0x5A;
        // Padding between sections is not covered by any checksum, and may change harmlessly.
        if let Err(error) = open_bytes(&corrupt) {
            assert!(
                matches!(error.kind(), ErrorKind::Corrupt | ErrorKind::Version | ErrorKind::Unsupported),
                "{error}"
            );
            caught += 1;
        }
    }
    let checked = (0..bytes.len()).step_by(3).count();
    assert!(caught * 10 >= checked * 9, "only {caught} of {checked} corruptions were caught");
}

#[test]
fn corrupt_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bramble");
    let mut bytes = write_tiny(&path, |_| {});
    let image = ModelImage::open(&path).unwrap();
    let q = image.tensor("blk.0.attn_q.weight").unwrap().offset;
    bytes[q + 5] ^= 1;
    let error = open_bytes(&bytes).err().unwrap();
    assert!(error.message().contains("blk.0.attn_q.weight") && error.message().contains("checksum"), "{error}");
    // Skipping tensor checksums opens it (the bytes are still valid blocks).
    assert!(ModelImage::from_bytes("x", &bytes, OpenOptions { verify_tensor_checksums: false }).is_ok());
}

#[test]
fn wrong_versions_are_refused_by_kind() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = write_tiny(&dir.path().join("tiny.bramble"), |_| {});
    for (offset, what) in [(8, "format version"), (12, "layout version")] {
        let mut future = bytes.clone();
        future[offset] = 9;
        let checksum = crc32fast::hash(&future[..60]);
        future[60..64].copy_from_slice(&checksum.to_le_bytes());
        let error = open_bytes(&future).err().unwrap();
        assert_eq!(error.kind(), ErrorKind::Version, "{error}");
        assert!(error.message().contains(what), "{error}");
    }
    let mut not_image = bytes.clone();
    not_image[..4].copy_from_slice(b"GGUF");
    assert!(open_bytes(&not_image).err().unwrap().message().contains("magic"));
}

/// Sets the header's layout version and its checksum.
fn with_layout_version(bytes: &[u8], version: u32) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[12..16].copy_from_slice(&version.to_le_bytes());
    let checksum = crc32fast::hash(&out[..60]);
    out[60..64].copy_from_slice(&checksum.to_le_bytes());
    out
}

#[test]
fn layout_one_files_are_read_but_not_with_interleaved_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let row_major = write_tiny(&dir.path().join("rows.bramble"), |_| {});
    let image = open_bytes(&with_layout_version(&row_major, 1)).unwrap();
    assert_eq!(image.layout_version(), 1);
    let mixed = common::write_tiny_with_layout(&dir.path().join("x4.bramble"), true, |_| {});
    assert_eq!(open_bytes(&mixed).unwrap().layout_version(), 2);
    let error = open_bytes(&with_layout_version(&mixed, 1)).err().unwrap();
    assert_eq!(error.kind(), ErrorKind::Corrupt, "{error}");
    assert!(error.message().contains("q4x4") && error.message().contains("layout-1"), "{error}");
}

#[test]
fn interleaved_tensors_need_whole_groups_of_four_rows() {
    use bramble_runtime::quant::Encoding;
    let dir = tempfile::tempdir().unwrap();
    // Six rows cannot be groups of four: the tensor's bytes are the right size
    // for six rows' blocks, but the encoding is refused.
    let bytes = write_tiny(&dir.path().join("t.bramble"), |w| {
        let enc = Encoding::Q8X4;
        w.add_tensor("extra.weight", enc, &[6, 32], &vec![0u8; enc.bytes_for(6 * 32)]).unwrap()
    });
    let error = open_bytes(&bytes).err().unwrap();
    assert_eq!(error.kind(), ErrorKind::Corrupt, "{error}");
    assert!(error.message().contains("extra.weight") && error.message().contains("groups of 4"), "{error}");
}

#[test]
fn the_first_q6kx4_layout_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let enc = Encoding::Q6KX4;
    let bytes = write_tiny(&dir.path().join("t.bramble"), |w| {
        w.add_tensor("extra.weight", enc, &[4, 256], &vec![0u8; enc.bytes_for(4 * 256)]).unwrap()
    });
    assert!(open_bytes(&bytes).is_ok());
    // The same tensor under the id the first Q6KX4 layout had.
    let name = bytes.windows(12).position(|w| w == b"extra.weight").unwrap();
    let mut old = bytes.clone();
    assert_eq!(old[name + 56..name + 60], 16u32.to_le_bytes());
    old[name + 56..name + 60].copy_from_slice(&15u32.to_le_bytes());
    reseal(&mut old);
    let error = open_bytes(&old).err().unwrap();
    assert_eq!(error.kind(), ErrorKind::Corrupt, "{error}");
    assert!(error.message().contains("extra.weight") && error.message().contains("convert the model again"), "{error}");
}

#[test]
fn unknown_sections_skipped_unless_required() {
    let dir = tempfile::tempdir().unwrap();
    let optional = write_tiny(&dir.path().join("a.bramble"), |w| w.add_section("rsparse_v9", b"later", false).unwrap());
    let image = open_bytes(&optional).unwrap();
    assert_eq!(image.section("rsparse_v9"), Some(&b"later"[..]));

    let required = write_tiny(&dir.path().join("b.bramble"), |w| w.add_section("future_thing", b"x", true).unwrap());
    let error = open_bytes(&required).err().unwrap();
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    assert!(error.message().contains("future_thing"), "{error}");
}

#[test]
fn writer_refuses_bad_tensors_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.bramble");
    {
        let mut w = ImageWriter::create(&path).unwrap();
        assert!(w.begin_tensor("x", Encoding::Q4, &[2, 33]).is_err(), "33 columns are not whole blocks");
        w.begin_tensor("y", Encoding::F32, &[4]).unwrap();
        assert!(w.write_tensor_data(&[0u8; 20]).is_err(), "more bytes than the tensor holds");
        assert!(w.end_tensor().is_err(), "a tensor with the wrong byte count cannot end");
        // Dropped unfinished.
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "an unfinished image left a file behind");
    assert!(layout::fixed_name::<56>(&"n".repeat(56)).is_none());
}

/// Rewrites every checksum of an image so that a mutation reaches the
/// structural checks behind them (a flipped byte alone stops at the checksum).
fn reseal(bytes: &mut [u8]) {
    let header: layout::Header = bytemuck::pod_read_unaligned(&bytes[..64]);
    let table = header.section_table_offset as usize;
    for i in 0..header.section_count as usize {
        let at = table + i * 64;
        if at + 64 > bytes.len() {
            break;
        }
        let entry: layout::SectionEntry = bytemuck::pod_read_unaligned(&bytes[at..at + 64]);
        let (offset, size) = (entry.offset as usize, entry.size as usize);
        if entry.flags & layout::SECTION_PER_TENSOR == 0
            && offset.checked_add(size).is_some_and(|end| end <= bytes.len())
        {
            let crc = crc32fast::hash(&bytes[offset..offset + size]);
            bytes[at + 48..at + 52].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let crc = crc32fast::hash(&bytes[..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn structural_mutations_behind_valid_checksums_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = write_tiny(&dir.path().join("tiny.bramble"), |_| {});
    let image = open_bytes(&bytes).unwrap();
    // The metadata: header, section table, config, tokenizer and tensor index.
    let mut regions: Vec<std::ops::Range<usize>> = Vec::new();
    regions.push(0..64);
    for name in [section::CONFIG, section::TOKENIZER, section::TENSOR_INDEX] {
        let s = image.sections().iter().find(|s| s.name == name).unwrap();
        regions.push(s.offset..s.offset + s.size);
    }
    let table = bytemuck::pod_read_unaligned::<layout::Header>(&bytes[..64]).section_table_offset as usize;
    regions.push(table..bytes.len());
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut opened, mut refused) = (0, 0);
    for round in 0..20_000 {
        let mut mutant = bytes.clone();
        let region = &regions[round % regions.len()];
        for _ in 0..1 + next() % 3 {
            let at = region.start + (next() as usize) % region.len();
            mutant[at] = match next() % 4 {
                0 => 0xFF,
                1 => 0,
                2 => mutant[at].wrapping_add(1),
                _ => next() as u8,
            };
        }
        reseal(&mut mutant);
        match open_bytes(&mutant) {
            Ok(image) => {
                opened += 1;
                // Whatever opens must be usable without panicking.
                if let Ok(tokenizer) = bramble_runtime::tokenizer::Tokenizer::new(image.vocab()) {
                    let ids = tokenizer.encode("ab a b", true, true);
                    let _ = tokenizer.decode(&ids);
                }
                if let Ok(model) = Model::new(&image) {
                    let mut state = model.new_state(4, 2);
                    let _ = model.forward(&mut state, &[1, 3], 0, bramble_runtime::model::Logits::All);
                }
            }
            Err(_) => refused += 1,
        }
    }
    assert!(refused > 1000, "only {refused} of the mutants were refused ({opened} opened)");
}

#[test]
fn channel_major_tensors_need_whole_tiles_of_rows() {
    use bramble_runtime::quant::Encoding;
    let dir = tempfile::tempdir().unwrap();
    // 48 rows are not whole tiles of 32.
    let bytes = write_tiny(&dir.path().join("t.bramble"), |w| {
        let enc = Encoding::Q4C;
        w.add_tensor("extra.weight", enc, &[48, 32], &vec![0u8; enc.bytes_for(48 * 32)]).unwrap()
    });
    let error = open_bytes(&bytes).err().unwrap();
    assert_eq!(error.kind(), ErrorKind::Corrupt, "{error}");
    assert!(error.message().contains("extra.weight") && error.message().contains("groups of 32"), "{error}");
}
