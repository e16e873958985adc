//! The llama2.c reader and writer: synthetic models written as version 0 and 1
//! checkpoints (tied and untied) read back equal; the byte layout checked
//! against `run.c` / `export.py` by hand; corrupt input refused with errors
//! naming the file.
//!
//! What a llama2.c checkpoint and tokenizer.bin cannot carry (the reader
//! supplies llama2.c's fixed values): rope_theta (10000), norm_eps (1e-5),
//! rope style (adjacent pairs), head_dim (dim / n_heads), the special ids
//! (`<unk>` 0, `<s>` 1, `</s>` 2), add_bos (true), add_eos (false),
//! add_space_prefix (true), the pad and end-of-turn ids (none), token types
//! other than unknown/control for ids 0–2 and byte for `<0xAB>`, a literal
//! space in a token (spelled like `▁`), and a chat template. The synthetic
//! SentencePiece vocabulary uses only what the format carries, so it reads
//! back equal in every field.

use bramble_runtime::rng::SplitMix64;
use bramble_runtime::vocab::{TokenType, TokenizerKind};
use bramble_runtime::Encoding;
use bramble_tools::source::llama2c::{self, write_llama2c, Llama2cSource};
use bramble_tools::source::ModelSource;
use bramble_tools::synth::{SyntheticModel, SyntheticShape};
use std::path::{Path, PathBuf};

fn model(tied: bool, seed: u64) -> SyntheticModel {
    let shape = SyntheticShape { tied_output: tied, ..SyntheticShape::default() };
    SyntheticModel::generate(shape, seed)
}

struct Written {
    _temp: tempfile::TempDir,
    checkpoint: PathBuf,
    tokenizer: PathBuf,
}

fn write(model: &SyntheticModel, version: u32) -> Written {
    let temp = tempfile::tempdir().unwrap();
    let checkpoint = temp.path().join("model.bin");
    let tokenizer = temp.path().join("tokenizer.bin");
    write_llama2c(model, &checkpoint, &tokenizer, version).unwrap();
    Written { _temp: temp, checkpoint, tokenizer }
}

fn assert_round_trip(model: &SyntheticModel, source: &Llama2cSource) {
    assert_eq!(*source.config(), model.config);
    assert_eq!(*source.vocab(), model.vocab);
    assert_eq!(source.chat_template(), None);
    let names: Vec<&str> = source.tensors().iter().map(|t| t.name.as_str()).collect();
    let expected: Vec<&str> = model.tensors.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(names, expected, "tensor list and GGUF order");
    for (index, (name, shape, values)) in model.tensors.iter().enumerate() {
        let tensor = &source.tensors()[index];
        assert_eq!(&tensor.shape, shape, "{name}");
        assert_eq!(tensor.native, Some(Encoding::F32), "{name}");
        let mut read = vec![0f32; values.len()];
        source.read_rows(index, 0, &mut read).unwrap();
        assert!(read.iter().zip(values).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} differs");
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(source.native_bytes(index).unwrap(), bytes.as_slice(), "{name} native bytes");
        if tensor.rows() >= 3 {
            let cols = tensor.cols();
            let mut part = vec![0f32; cols];
            source.read_rows(index, 2, &mut part).unwrap();
            assert_eq!(part, values[2 * cols..3 * cols], "{name} row 2");
        }
        source.release(index);
    }
}

#[test]
fn version0_untied_round_trips() {
    let model = model(false, 1);
    let written = write(&model, 0);
    let source = llama2c::open(&written.checkpoint, &written.tokenizer).unwrap();
    assert_round_trip(&model, &source);
    assert!(source.describe().contains("version 0"));
}

#[test]
fn version0_tied_round_trips() {
    let model = model(true, 2);
    let written = write(&model, 0);
    let source = Llama2cSource::open(&written.checkpoint, &written.tokenizer).unwrap();
    assert_eq!(source.config().tied_output, 1);
    assert_round_trip(&model, &source);
}

#[test]
fn version1_untied_round_trips() {
    let model = model(false, 3);
    let written = write(&model, 1);
    let source = llama2c::open(&written.checkpoint, &written.tokenizer).unwrap();
    assert_round_trip(&model, &source);
    assert!(source.describe().contains("version 1"));
}

#[test]
fn version1_tied_round_trips() {
    let model = model(true, 4);
    let written = write(&model, 1);
    let source = llama2c::open(&written.checkpoint, &written.tokenizer).unwrap();
    assert_round_trip(&model, &source);
}

#[test]
fn grouped_query_attention_round_trips() {
    let shape = SyntheticShape { n_heads: 8, n_kv_heads: 2, n_layers: 3, ..SyntheticShape::default() };
    let model = SyntheticModel::generate(shape, 5);
    for version in [0, 1] {
        let written = write(&model, version);
        assert_round_trip(&model, &llama2c::open(&written.checkpoint, &written.tokenizer).unwrap());
    }
}

fn i32_at(bytes: &[u8], at: usize) -> i32 {
    i32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn f32_at(bytes: &[u8], at: usize) -> f32 {
    f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

#[test]
fn version0_layout_matches_run_c() {
    // dim 64, hidden 160, 2 layers, 4 heads (head_dim 16), 2 kv heads (kv_dim 32).
    let model = model(false, 6);
    let written = write(&model, 0);
    let bytes = std::fs::read(&written.checkpoint).unwrap();
    let vocab = model.vocab.len();
    let header: Vec<i32> = (0..7).map(|i| i32_at(&bytes, 4 * i)).collect();
    assert_eq!(header, [64, 160, 2, 4, 2, -(vocab as i32), 128], "negative vocab_size: separate classifier");
    // Offsets in floats, as run.c's memory_map_weights walks them.
    let (dim, hidden, layers, kv_dim, seq_len, half_head) = (64, 160, 2, 32, 128, 8);
    let mut at = 7;
    let embedding = at;
    at += vocab * dim;
    let rms_att = at;
    at += layers * dim;
    let wq = at;
    at += layers * dim * dim;
    let wk = at;
    at += layers * dim * kv_dim;
    at += layers * dim * kv_dim; // wv
    at += layers * dim * dim; // wo
    at += layers * dim; // rms_ffn
    let w1 = at;
    at += layers * dim * hidden;
    let w2 = at;
    at += layers * hidden * dim;
    let w3 = at;
    at += layers * hidden * dim;
    let rms_final = at;
    at += dim;
    let freq_real = at;
    at += seq_len * half_head;
    let freq_imag = at;
    at += seq_len * half_head;
    let wcls = at;
    at += vocab * dim;
    assert_eq!(bytes.len(), at * 4);
    let value = |name: &str, index: usize| model.tensor(name).unwrap().1[index];
    assert_eq!(f32_at(&bytes, embedding * 4 + 4), value("token_embd.weight", 1));
    assert_eq!(f32_at(&bytes, (rms_att + dim) * 4), value("blk.1.attn_norm.weight", 0));
    // wq of layer 1, row 3, column 5: w[i·n + j] with i the output.
    assert_eq!(f32_at(&bytes, (wq + dim * dim + 3 * dim + 5) * 4), value("blk.1.attn_q.weight", 3 * dim + 5));
    assert_eq!(f32_at(&bytes, (wk + kv_dim * dim - 1) * 4), value("blk.0.attn_k.weight", kv_dim * dim - 1));
    assert_eq!(f32_at(&bytes, w1 * 4), value("blk.0.ffn_gate.weight", 0), "w1 is the gate");
    assert_eq!(f32_at(&bytes, (w2 + 7) * 4), value("blk.0.ffn_down.weight", 7), "w2 is down");
    assert_eq!(f32_at(&bytes, w3 * 4), value("blk.0.ffn_up.weight", 0), "w3 is up");
    assert_eq!(f32_at(&bytes, rms_final * 4), value("output_norm.weight", 0));
    // freq_cis at position 3, pair 2: cos/sin(3 · 10000^(−4/16)).
    let angle = 3.0f64 * 10000f64.powf(-4.0 / 16.0);
    assert!((f32_at(&bytes, (freq_real + 3 * half_head + 2) * 4) as f64 - angle.cos()).abs() < 1e-6);
    assert!((f32_at(&bytes, (freq_imag + 3 * half_head + 2) * 4) as f64 - angle.sin()).abs() < 1e-6);
    assert_eq!(f32_at(&bytes, (wcls + 1) * 4), value("output.weight", 1));
}

#[test]
fn version1_layout_matches_export_py() {
    let model = model(true, 7);
    let written = write(&model, 1);
    let bytes = std::fs::read(&written.checkpoint).unwrap();
    assert_eq!(&bytes[0..4], b"24ka", "magic 0x616b3432 as a little-endian u32");
    assert_eq!(i32_at(&bytes, 4), 1);
    let vocab = model.vocab.len();
    let header: Vec<i32> = (0..7).map(|i| i32_at(&bytes, 8 + 4 * i)).collect();
    assert_eq!(header, [64, 160, 2, 4, 2, vocab as i32, 128]);
    assert_eq!(bytes[36], 1, "shared classifier flag");
    assert!(bytes[37..256].iter().all(|&b| b == 0));
    // version1_export's order: attention norms, ffn norms, final norm, embedding, wq, ...
    let dim = 64;
    let value = |name: &str, index: usize| model.tensor(name).unwrap().1[index];
    assert_eq!(f32_at(&bytes, 256), value("blk.0.attn_norm.weight", 0));
    assert_eq!(f32_at(&bytes, 256 + 4 * 2 * dim), value("blk.0.ffn_norm.weight", 0));
    assert_eq!(f32_at(&bytes, 256 + 4 * 4 * dim), value("output_norm.weight", 0));
    assert_eq!(f32_at(&bytes, 256 + 4 * 5 * dim), value("token_embd.weight", 0));
    assert_eq!(f32_at(&bytes, 256 + 4 * (5 * dim + vocab * dim)), value("blk.0.attn_q.weight", 0));
    let floats = 5 * dim + vocab * dim + 2 * (dim * dim + 2 * 32 * dim + dim * dim + 3 * 160 * dim);
    assert_eq!(bytes.len(), 256 + 4 * floats, "no freq_cis, no classifier");
}

#[test]
fn tokenizer_bin_is_spelled_as_tokenizer_py_writes_it() {
    let model = model(false, 8);
    let written = write(&model, 0);
    let bytes = std::fs::read(&written.tokenizer).unwrap();
    let mut at = 4;
    let mut tokens = Vec::new();
    for _ in 0..model.vocab.len() {
        let score = f32_at(&bytes, at);
        let length = i32_at(&bytes, at + 4) as usize;
        tokens.push((score, bytes[at + 8..at + 8 + length].to_vec()));
        at += 8 + length;
    }
    assert_eq!(at, bytes.len());
    assert_eq!(i32_at(&bytes, 0) as usize, tokens.iter().map(|t| t.1.len()).max().unwrap());
    assert_eq!(tokens[1].1, b"\n<s>\n");
    assert_eq!(tokens[2].1, b"\n</s>\n");
    assert_eq!(tokens[3 + 0x0A].1, b"<0x0A>");
    let the = model.vocab.find("▁the").unwrap() as usize;
    assert_eq!(tokens[the], (model.vocab.scores[the], b" the".to_vec()), "▁ is written as a space");
}

#[test]
fn old_style_byte_tokens_are_read_as_byte_tokens() {
    // Early tokenizer.py wrote byte token b as the UTF-8 of chr(b).
    let model = model(false, 9);
    let written = write(&model, 0);
    let mut out = Vec::new();
    out.extend_from_slice(&16i32.to_le_bytes());
    for (id, (token, score)) in model.vocab.tokens.iter().zip(&model.vocab.scores).enumerate() {
        let text = match id {
            1 => b"\n<s>\n".to_vec(),
            2 => b"\n</s>\n".to_vec(),
            3..=258 => char::from((id - 3) as u8).to_string().into_bytes(),
            _ => String::from_utf8(token.clone()).unwrap().replace('▁', " ").into_bytes(),
        };
        out.extend_from_slice(&score.to_le_bytes());
        out.extend_from_slice(&(text.len() as i32).to_le_bytes());
        out.extend_from_slice(&text);
    }
    std::fs::write(&written.tokenizer, out).unwrap();
    let source = llama2c::open(&written.checkpoint, &written.tokenizer).unwrap();
    assert_eq!(*source.vocab(), model.vocab);
    assert_eq!(source.vocab().types[3 + 0xC3], TokenType::Byte);
}

#[test]
fn default_tokenizer_is_found_beside_the_checkpoint() {
    let model = model(false, 10);
    let written = write(&model, 1);
    assert_eq!(llama2c::default_tokenizer_path(&written.checkpoint), written.tokenizer);
    let source = llama2c::open_checkpoint(&written.checkpoint, None).unwrap();
    assert_eq!(*source.vocab(), model.vocab);
    std::fs::remove_file(&written.tokenizer).unwrap();
    let error = format!("{}", llama2c::open_checkpoint(&written.checkpoint, None).unwrap_err());
    assert!(error.contains("tokenizer.bin") && error.contains("model.bin"), "{error}");
    let error = format!("{}", llama2c::open(&written.checkpoint, &written.tokenizer).unwrap_err());
    assert!(error.contains("tokenizer.bin"), "{error}");
}

#[test]
fn writer_refuses_what_llama2c_cannot_hold() {
    let temp = tempfile::tempdir().unwrap();
    let (checkpoint, tokenizer) = (temp.path().join("m.bin"), temp.path().join("t.bin"));
    let byte_level = SyntheticModel::generate(
        SyntheticShape { tokenizer: TokenizerKind::ByteLevelBpe, ..SyntheticShape::default() },
        11,
    );
    assert!(write_llama2c(&byte_level, &checkpoint, &tokenizer, 0).is_err(), "byte-level vocabulary");
    let model = model(false, 11);
    assert!(write_llama2c(&model, &checkpoint, &tokenizer, 2).is_err(), "version 2");
    let mut theta = model.clone();
    theta.config.rope_theta = 500000.0;
    assert!(write_llama2c(&theta, &checkpoint, &tokenizer, 0).is_err(), "rope_theta");
    let mut spaced = model.clone();
    spaced.vocab.tokens[300] = b"a b".to_vec();
    assert!(write_llama2c(&spaced, &checkpoint, &tokenizer, 0).is_err(), "a space in a token");
}

// ---------------------------------------------------------------------------
// Corrupt input: errors that name the file, never a panic.

fn open_error(written: &Written) -> String {
    format!("{}", llama2c::open(&written.checkpoint, &written.tokenizer).expect_err("corrupt input must be refused"))
}

#[test]
fn truncated_checkpoint_is_an_error_with_the_sizes() {
    let model = model(false, 20);
    for version in [0, 1] {
        let written = write(&model, version);
        let bytes = std::fs::read(&written.checkpoint).unwrap();
        std::fs::write(&written.checkpoint, &bytes[..bytes.len() - 4]).unwrap();
        let error = open_error(&written);
        let expected = bytes.len().to_string();
        let actual = (bytes.len() - 4).to_string();
        assert!(error.contains("model.bin") && error.contains(&expected) && error.contains(&actual), "{error}");
        assert!(error.contains("dim 64") && error.contains("separate classifier"), "{error}");
        for length in [0, 3, 27, 100, 255] {
            std::fs::write(&written.checkpoint, &bytes[..length]).unwrap();
            let error = open_error(&written);
            assert!(error.contains("model.bin"), "{length} bytes: {error}");
        }
    }
}

#[test]
fn wrong_size_is_an_error() {
    // A tied model's file read with the untied sign: the classifier is missing.
    let model = model(true, 21);
    let written = write(&model, 0);
    let mut bytes = std::fs::read(&written.checkpoint).unwrap();
    let vocab = -(model.vocab.len() as i32);
    bytes[20..24].copy_from_slice(&vocab.to_le_bytes());
    std::fs::write(&written.checkpoint, &bytes).unwrap();
    let error = open_error(&written);
    assert!(error.contains("model.bin") && error.contains("separate classifier"), "{error}");
    // Extra bytes at the end.
    let written = write(&model, 1);
    let mut bytes = std::fs::read(&written.checkpoint).unwrap();
    bytes.extend_from_slice(&[0; 4]);
    std::fs::write(&written.checkpoint, &bytes).unwrap();
    assert!(open_error(&written).contains("model.bin"));
}

#[test]
fn bad_header_values_are_errors_naming_the_field() {
    let model = model(false, 22);
    let written = write(&model, 0);
    let original = std::fs::read(&written.checkpoint).unwrap();
    for (index, value, field) in [
        (0, 0, "dim"),
        (0, -64, "dim"),
        (3, 5, "n_heads"),
        (4, 3, "n_kv_heads"),
        (2, i32::MAX, "n_layers"),
        (5, i32::MIN, "vocab_size"),
        (6, 0, "seq_len"),
    ] {
        let mut bytes = original.clone();
        bytes[4 * index..4 * index + 4].copy_from_slice(&i32::to_le_bytes(value));
        std::fs::write(&written.checkpoint, &bytes).unwrap();
        let error = open_error(&written);
        assert!(error.contains("model.bin") && error.contains(field), "{field} = {value}: {error}");
    }
    // Version 2 and unknown versions, and a bad shared flag.
    let written = write(&model, 1);
    let original = std::fs::read(&written.checkpoint).unwrap();
    for (at, byte, expected) in [(4, 2u8, "version 2"), (4, 9, "version 9"), (36, 7, "shared_classifier")] {
        let mut bytes = original.clone();
        bytes[at] = byte;
        std::fs::write(&written.checkpoint, &bytes).unwrap();
        let error = open_error(&written);
        assert!(error.contains("model.bin") && error.contains(expected), "{error}");
    }
}

#[test]
fn bad_tokenizer_bin_is_an_error_naming_the_file() {
    let model = model(false, 23);
    let written = write(&model, 0);
    let original = std::fs::read(&written.tokenizer).unwrap();
    let mut cases: Vec<(Vec<u8>, &str)> = vec![
        (original[..original.len() - 1].to_vec(), "truncated"),
        (original[..2].to_vec(), "truncated"),
        (Vec::new(), "truncated"),
        ([original.as_slice(), &[0]].concat(), "left after"),
    ];
    let mut negative = original.clone();
    negative[8..12].copy_from_slice(&(-5i32).to_le_bytes());
    cases.push((negative, "length -5"));
    let mut huge = original.clone();
    huge[8..12].copy_from_slice(&i32::MAX.to_le_bytes());
    cases.push((huge, "truncated"));
    let mut nan = original.clone();
    nan[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    cases.push((nan, "finite"));
    for (bytes, expected) in cases {
        std::fs::write(&written.tokenizer, &bytes).unwrap();
        let error = open_error(&written);
        assert!(error.contains("tokenizer.bin") && error.contains(expected), "{expected}: {error}");
    }
}

#[test]
fn read_rows_out_of_range_is_an_error() {
    let model = model(false, 24);
    let written = write(&model, 0);
    let source = llama2c::open(&written.checkpoint, &written.tokenizer).unwrap();
    let cols = source.tensors()[0].cols();
    let mut out = vec![0f32; cols * 2];
    assert!(source.read_rows(0, source.tensors()[0].rows() - 1, &mut out).is_err());
    assert!(source.read_rows(0, usize::MAX, &mut out).is_err());
    assert!(source.read_rows(0, 0, &mut out[..cols - 1]).is_err());
    let error = format!("{}", source.read_rows(999, 0, &mut out).unwrap_err());
    assert!(error.contains("model.bin"), "{error}");
    assert!(source.native_bytes(999).is_none());
    source.release(999);
}

fn mutate(bytes: &[u8], random: &mut SplitMix64) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for _ in 0..1 + random.next_u64() % 3 {
        if out.is_empty() {
            out.push(random.next_u64() as u8);
            continue;
        }
        let at = (random.next_u64() % out.len() as u64) as usize;
        match random.next_u64() % 4 {
            0 => out[at] ^= 1 << (random.next_u64() % 8),
            1 => out[at] = random.next_u64() as u8,
            2 => out.truncate(at),
            _ => out.insert(at, random.next_u64() as u8),
        }
    }
    out
}

#[test]
fn random_mutations_never_panic_and_errors_name_a_file() {
    let mut random = SplitMix64(0x11A3A2C);
    let shape = SyntheticShape {
        dim: 32,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        ffn_dim: 64,
        context_length: 16,
        ..SyntheticShape::default()
    };
    let model = SyntheticModel::generate(shape, 30);
    let (mut refused, mut accepted) = (0, 0);
    for version in [0, 1] {
        let written = write(&model, version);
        let checkpoint = std::fs::read(&written.checkpoint).unwrap();
        let tokenizer = std::fs::read(&written.tokenizer).unwrap();
        for round in 0..300 {
            let (path, mutated): (&Path, Vec<u8>) = if round % 2 == 0 {
                // The header is where the structure is; mutate it and keep the weights.
                let header = if version == 0 { 28 } else { 256 };
                let mut bytes = mutate(&checkpoint[..header], &mut random);
                bytes.extend_from_slice(&checkpoint[header..]);
                (&written.checkpoint, bytes)
            } else {
                (&written.tokenizer, mutate(&tokenizer, &mut random))
            };
            std::fs::write(path, &mutated).unwrap();
            let result = std::panic::catch_unwind(|| match llama2c::open(&written.checkpoint, &written.tokenizer) {
                Ok(source) => {
                    for index in 0..source.tensors().len() {
                        let tensor = &source.tensors()[index];
                        let mut out = vec![0f32; tensor.rows() * tensor.cols()];
                        source.read_rows(index, 0, &mut out).unwrap();
                    }
                    Ok(())
                }
                Err(error) => Err(format!("{error}")),
            });
            match result.unwrap_or_else(|_| panic!("a mutation of {} made the reader panic", path.display())) {
                Ok(()) => accepted += 1,
                Err(error) => {
                    assert!(error.contains("model.bin") || error.contains("tokenizer.bin"), "names no file: {error}");
                    refused += 1;
                }
            }
            std::fs::write(&written.checkpoint, &checkpoint).unwrap();
            std::fs::write(&written.tokenizer, &tokenizer).unwrap();
        }
    }
    eprintln!("mutations: {refused} refused, {accepted} accepted");
    assert!(refused > 300, "most mutations are refused ({refused} refused, {accepted} accepted)");
}
