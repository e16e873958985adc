//! The streaming generator of large synthetic models (`bramble_tools::synth_large`),
//! on its `tiny` shape; the Llama-2-7B shape's memory check is
//! `tests/convert-7b-rss.sh`.
//!
//! - GGUF and Hugging Face output open with the readers, with the shape's
//!   config, the padded vocabulary and exactly the values the generator makes;
//! - both convert, into images with the same tensors;
//! - the streaming GGUF writer writes what the in-memory one writes, and
//!   refuses a tensor of the wrong size;
//! - `bramble synth --shape` and `bramble convert --json` on the result.

use bramble_runtime::vocab::TokenType;
use bramble_runtime::ModelImage;
use bramble_tools::convert::{convert, ConvertOptions, QuantTarget};
use bramble_tools::source::gguf::{GgmlType, GgufSource, GgufWriter, Value};
use bramble_tools::source::hf::HfSource;
use bramble_tools::source::ModelSource;
use bramble_tools::synth_large::{
    fill_row, padded_vocab, tensor_list, write_large_gguf, write_large_hf, LargeShape, LargeWeights,
};
use std::path::Path;
use std::process::Command;

const SEED: u64 = 7;

/// Every value of tensor `index`, as the source reads it.
fn read_all(source: &dyn ModelSource, index: usize) -> Vec<f32> {
    let tensor = &source.tensors()[index];
    let mut values = vec![0.0; tensor.rows() * tensor.cols()];
    source.read_rows(index, 0, &mut values).expect("rows read");
    values
}

/// Every value of tensor `index` as the generator makes it, rounded through `weights`.
fn generated(index: usize, shape: &[usize], weights: LargeWeights) -> Vec<f32> {
    let cols = *shape.last().unwrap();
    let rows: usize = shape[..shape.len() - 1].iter().product();
    let mut values = vec![0.0; rows * cols];
    for (row, out) in values.chunks_exact_mut(cols).enumerate() {
        fill_row(SEED, index, row, shape.len() == 1, out);
    }
    weights.round(&mut values);
    values
}

/// The source has the shape's config, the padded vocabulary and the generated values.
fn assert_source(source: &dyn ModelSource, shape: LargeShape, weights: LargeWeights) {
    let config = shape.config();
    assert_eq!(*source.config(), config, "{}", source.describe());
    let vocab = source.vocab();
    let want = padded_vocab(config.vocab_size as usize).unwrap();
    assert_eq!(vocab.tokens, want.tokens);
    assert_eq!((vocab.bos_id, vocab.eos_id, vocab.unk_id), (want.bos_id, want.eos_id, want.unk_id));
    let base = bramble_runtime::tokenizer::synthetic::sentencepiece_vocab().len();
    assert!(vocab.types[base..].iter().all(|t| *t == TokenType::Unused));
    if source.describe().starts_with("GGUF") {
        // tokenizer.json holds no types; the Hugging Face reader infers them (see its tests).
        assert_eq!(vocab.types, want.types);
    }
    assert!(source.chat_template().is_some_and(|t| t.contains("[INST]")));
    let list = tensor_list(&config);
    assert_eq!(source.tensors().len(), list.len());
    for (index, (name, tensor_shape)) in list.iter().enumerate() {
        let tensor = &source.tensors()[index];
        assert_eq!((&tensor.name, &tensor.shape), (name, tensor_shape));
        let values = read_all(source, index);
        assert!(values.iter().any(|&v| v != 0.0), "{name} is all zeros");
        assert!(values.iter().all(|v| v.abs() <= 1.25), "{name} is out of range");
        assert!(
            values == generated(index, tensor_shape, weights),
            "{}: {name} differs from the generator",
            source.describe()
        );
    }
}

/// The images' configs and tensors (names, encodings, bytes) are the same.
fn assert_same_images(a: &Path, b: &Path) {
    let (a, b) = (ModelImage::open(a).unwrap(), ModelImage::open(b).unwrap());
    assert_eq!(a.config(), b.config());
    assert_eq!(a.tensors().len(), b.tensors().len());
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        assert_eq!((&x.name, x.encoding, &x.shape), (&y.name, y.encoding, &y.shape));
        assert!(a.tensor_bytes(x) == b.tensor_bytes(y), "tensor {} differs", x.name);
    }
}

#[test]
fn tiny_gguf_and_hf_hold_the_generated_model_and_convert() {
    let dir = tempfile::tempdir().unwrap();
    let shape = LargeShape::Tiny;
    let weights = LargeWeights::F16;

    let gguf_path = dir.path().join("tiny.gguf");
    let report = write_large_gguf(shape, None, &gguf_path, weights, SEED).unwrap();
    assert_eq!(report.tensors, tensor_list(&shape.config()).len());
    let gguf = GgufSource::open(&gguf_path).unwrap();
    assert_source(&gguf, shape, weights);
    let types: Vec<&str> = gguf.tensors().iter().map(|t| t.source_type.as_str()).collect();
    assert!(types.iter().all(|t| *t == "F16" || *t == "F32"), "{types:?}");

    let hf_dir = dir.path().join("tiny-hf");
    write_large_hf(shape, None, &hf_dir, weights, SEED).unwrap();
    for file in ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(hf_dir.join(file).is_file(), "{file} is missing");
    }
    let shards = std::fs::read_dir(&hf_dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".safetensors"))
        .count();
    assert_eq!(shards, shape.shards());
    let hf = HfSource::open(&hf_dir).unwrap();
    assert_source(&hf, shape, weights);

    // Both convert, to the same image: the same values, q/k permutation undone.
    let options = ConvertOptions::new(QuantTarget::Q4);
    let (from_gguf, from_hf) = (dir.path().join("gguf.bramble"), dir.path().join("hf.bramble"));
    let report = convert(&gguf, &from_gguf, &options).unwrap();
    assert_eq!(report.tensors, gguf.tensors().len());
    convert(&hf, &from_hf, &options).unwrap();
    assert_eq!(*ModelImage::open(&from_gguf).unwrap().config(), shape.config());
    assert_same_images(&from_gguf, &from_hf);
}

#[test]
fn bf16_and_f32_weights_stream_too() {
    let dir = tempfile::tempdir().unwrap();
    for weights in [LargeWeights::BF16, LargeWeights::F32] {
        let path = dir.path().join(format!("{weights:?}.gguf"));
        write_large_gguf(LargeShape::Tiny, None, &path, weights, SEED).unwrap();
        assert_source(&GgufSource::open(&path).unwrap(), LargeShape::Tiny, weights);
        let hf_dir = dir.path().join(format!("{weights:?}-hf"));
        write_large_hf(LargeShape::Tiny, None, &hf_dir, weights, SEED).unwrap();
        assert_source(&HfSource::open(&hf_dir).unwrap(), LargeShape::Tiny, weights);
    }
}

#[test]
fn fewer_blocks_keep_every_tensor_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one-block.gguf");
    let report = write_large_gguf(LargeShape::Tiny, Some(1), &path, LargeWeights::F16, SEED).unwrap();
    let full = LargeShape::Tiny.config();
    let source = GgufSource::open(&path).unwrap();
    let one = source.config();
    assert_eq!(one.n_layers, 1);
    assert_eq!((one.dim, one.ffn_dim, one.vocab_size), (full.dim, full.ffn_dim, full.vocab_size));
    assert_eq!(
        report.tensors,
        tensor_list(&full).len() - tensor_list(&full).iter().filter(|(n, _)| n.starts_with("blk.1.")).count()
    );
    for bad in [0, full.n_layers as usize + 1] {
        let err = write_large_gguf(LargeShape::Tiny, Some(bad), &path, LargeWeights::F16, SEED).unwrap_err();
        assert!(format!("{err:#}").contains("--layers"), "{err:#}");
    }
}

#[test]
fn shapes_and_weight_types_parse() {
    assert_eq!(LargeShape::parse("tiny").unwrap(), LargeShape::Tiny);
    let big = LargeShape::parse("llama2-7b").unwrap().config();
    assert_eq!(
        (
            big.dim,
            big.n_layers,
            big.n_heads,
            big.n_kv_heads,
            big.ffn_dim,
            big.vocab_size,
            big.context_length,
            big.tied_output
        ),
        (4096, 32, 32, 32, 11008, 32000, 4096, 0)
    );
    let bytes: usize = tensor_list(&big).iter().map(|(_, s)| s.iter().product::<usize>() * 2).sum();
    assert_eq!(bytes, 6_738_415_616 * 2, "Llama-2-7B has 6,738,415,616 parameters");
    let tinyllama = LargeShape::parse("tinyllama").unwrap().config();
    assert_eq!(
        (tinyllama.dim, tinyllama.n_layers, tinyllama.n_heads, tinyllama.n_kv_heads, tinyllama.ffn_dim),
        (2048, 22, 32, 4, 5632)
    );
    assert_eq!((tinyllama.head_dim, tinyllama.vocab_size, tinyllama.tied_output), (64, 32000, 0));
    let params: usize = tensor_list(&tinyllama).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(params, 1_100_048_384, "TinyLlama-1.1B has 1,100,048,384 parameters");
    let error = LargeShape::parse("llama2-70b").unwrap_err().to_string();
    assert!(error.contains("tiny, llama2-7b, tinyllama"), "{error}");
    assert!(LargeWeights::parse("q4_0").is_err());
}

/// A small writer with one tensor given and two declared.
fn writer() -> GgufWriter {
    let mut writer = GgufWriter::new();
    writer.set("general.architecture", Value::String(b"llama".to_vec()));
    writer.add_tensor("given", &[3], GgmlType::F32, vec![1; 12]).unwrap();
    writer.declare_tensor("first", &[2, 32], GgmlType::F16).unwrap();
    writer.declare_tensor("second", &[5], GgmlType::F32).unwrap();
    writer
}

#[test]
fn streaming_gguf_matches_the_in_memory_writer() {
    let dir = tempfile::tempdir().unwrap();
    let data = |name: &str| -> Vec<u8> {
        match name {
            "first" => (0..128).map(|i| i as u8).collect(),
            "second" => vec![9; 20],
            other => panic!("asked for {other}"),
        }
    };
    let streamed = dir.path().join("streamed.gguf");
    writer()
        .write_streaming(&streamed, |name, out| {
            // In uneven pieces.
            let bytes = data(name);
            let (head, tail) = bytes.split_at(bytes.len() / 3);
            out.write_all(head)?;
            out.write_all(tail)?;
            Ok(())
        })
        .unwrap();

    let mut in_memory = GgufWriter::new();
    in_memory.set("general.architecture", Value::String(b"llama".to_vec()));
    in_memory.add_tensor("given", &[3], GgmlType::F32, vec![1; 12]).unwrap();
    in_memory.add_tensor("first", &[2, 32], GgmlType::F16, data("first")).unwrap();
    in_memory.add_tensor("second", &[5], GgmlType::F32, data("second")).unwrap();
    assert_eq!(std::fs::read(&streamed).unwrap(), in_memory.to_bytes().unwrap());

    // A writer with declared tensors has no bytes to give without streaming.
    let error = writer().to_bytes().unwrap_err().to_string();
    assert!(error.contains("'first'") && error.contains("write_streaming"), "{error}");
}

#[test]
fn streaming_gguf_refuses_a_tensor_of_the_wrong_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.gguf");
    let error = writer().write_streaming(&path, |_, out| Ok(out.write_all(&[0; 10])?)).unwrap_err();
    let message = format!("{error:#}");
    assert!(message.contains("short.gguf") && message.contains("'first'"), "{message}");
    assert!(message.contains("10 bytes written") && message.contains("take 128"), "{message}");
}

#[test]
fn cli_synth_shape_then_convert() {
    let dir = tempfile::tempdir().unwrap();
    let bramble = env!("CARGO_BIN_EXE_bramble");
    for (format, output) in [("gguf", "tiny.gguf"), ("hf", "tiny-hf")] {
        let output = dir.path().join(output);
        let synth = Command::new(bramble)
            .args(["synth", "--format", format, "--shape", "tiny", "--output"])
            .arg(&output)
            .output()
            .unwrap();
        assert!(synth.status.success(), "{}", String::from_utf8_lossy(&synth.stderr));
        let stdout = String::from_utf8_lossy(&synth.stdout);
        assert!(stdout.contains("tiny with 2 blocks, f16"), "{stdout}");
        let image = dir.path().join(format!("{format}.bramble"));
        let converted = Command::new(bramble)
            .args(["convert", "--quant", "q4", "--json", "--input"])
            .arg(&output)
            .arg("--output")
            .arg(&image)
            .output()
            .unwrap();
        assert!(converted.status.success(), "{}", String::from_utf8_lossy(&converted.stderr));
        let report: serde_json::Value = serde_json::from_slice(&converted.stdout).unwrap();
        assert_eq!(report["tensors"], 21);
        assert!(report["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0), "{report}");
    }
    let refused = Command::new(bramble)
        .args(["synth", "--format", "llama2c", "--shape", "tiny", "--output"])
        .arg(dir.path().join("x.bin"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("expected gguf or hf"));
}
