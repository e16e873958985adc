//! The Hugging Face reader and writer: synthetic models written as Hugging Face
//! directories (every dtype, sharded or not, tied or not, both tokenizer
//! forms) read back equal; the q/k permutation against hand-computed rows;
//! tokenizer files as the real libraries write them; corrupt input.
//!
//! What a Hugging Face directory cannot carry, so these tests do not compare:
//! - SentencePiece scores in `tokenizer.json` (the format has none): scores
//!   read back as −(merge rank), so only their order among merged tokens is
//!   checked; `tokenizer.model` carries them exactly.
//! - The end-of-turn id is found by its spelling (`<|im_end|>`, ...), not stored.
//!
//! Tests marked "(Python)" compare against Hugging Face `tokenizers` and
//! Google `sentencepiece` through `tests/reference/hf_tokenizers.py`, and are
//! skipped (with a message) where Python or those modules are missing.

use bramble_runtime::rng::SplitMix64;
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::vocab::{PreTokenizer, TokenType, TokenizerKind};
use bramble_runtime::{Encoding, Vocab};
use bramble_tools::source::hf::{
    self, permuted_source_row, permuted_target_row, sentencepiece_model, HfDtype, HfTokenizerForm, HfWriteOptions,
};
use bramble_tools::source::ModelSource;
use bramble_tools::synth::{SyntheticModel, SyntheticShape};
use half::{bf16, f16};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// F16 keeps 11 significant bits: relative error at most 2⁻¹¹, plus the
/// absolute step of subnormals for values near zero.
const F16_RELATIVE_TOLERANCE: f32 = 1.0 / 2048.0;
const F16_ABSOLUTE_TOLERANCE: f32 = 6.0e-8;
/// BF16 keeps 8 significant bits: relative error at most 2⁻⁸.
const BF16_RELATIVE_TOLERANCE: f32 = 1.0 / 256.0;

const CHATML: &str =
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}";
const LLAMA2_CHAT: &str = "{% for message in messages %}[INST] {{ message.content }} [/INST]{% endfor %}";

fn model(tied: bool, tokenizer: TokenizerKind, seed: u64) -> SyntheticModel {
    let shape = SyntheticShape { tied_output: tied, tokenizer, ..SyntheticShape::default() };
    SyntheticModel::generate(shape, seed)
}

fn read_all(source: &dyn ModelSource, index: usize) -> Vec<f32> {
    let tensor = &source.tensors()[index];
    let mut out = vec![0f32; tensor.rows() * tensor.cols()];
    source.read_rows(index, 0, &mut out).unwrap();
    out
}

/// Checks every synthetic tensor against the source: names, order, shapes,
/// values (whole tensor and a row range), and the native encoding.
fn assert_tensors(source: &dyn ModelSource, model: &SyntheticModel, dtype: HfDtype) {
    let names: Vec<&str> = source.tensors().iter().map(|t| t.name.as_str()).collect();
    let expected: Vec<&str> = model.tensors.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(names, expected, "tensor list and GGUF order");
    for (index, (name, shape, values)) in model.tensors.iter().enumerate() {
        let tensor = &source.tensors()[index];
        assert_eq!(&tensor.shape, shape, "{name}");
        assert_eq!(tensor.source_type, dtype.name(), "{name}");
        let read = read_all(source, index);
        for (i, (&got, &want)) in read.iter().zip(values).enumerate() {
            match dtype {
                HfDtype::F32 => assert_eq!(got.to_bits(), want.to_bits(), "{name}[{i}]"),
                HfDtype::F16 => {
                    assert_eq!(got, f16::from_f32(want).to_f32(), "{name}[{i}] is not f16's rounding");
                    assert!((got - want).abs() <= want.abs() * F16_RELATIVE_TOLERANCE + F16_ABSOLUTE_TOLERANCE);
                }
                HfDtype::BF16 => {
                    assert_eq!(got, bf16::from_f32(want).to_f32(), "{name}[{i}] is not bf16's rounding");
                    assert!((got - want).abs() <= want.abs() * BF16_RELATIVE_TOLERANCE);
                }
            }
        }
        // A row range in the middle reads the same rows as the whole tensor.
        if tensor.rows() >= 4 {
            let cols = tensor.cols();
            let mut part = vec![0f32; 2 * cols];
            source.read_rows(index, 1, &mut part).unwrap();
            assert_eq!(part, read[cols..3 * cols], "{name} rows 1..3");
        }
        let permuted = name.contains("attn_q") || name.contains("attn_k");
        let native = match dtype {
            HfDtype::F32 if !permuted => Some(Encoding::F32),
            HfDtype::F16 if !permuted => Some(Encoding::F16),
            _ => None,
        };
        assert_eq!(tensor.native, native, "{name} native encoding");
        match native {
            Some(Encoding::F32) => {
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                assert_eq!(source.native_bytes(index).unwrap(), bytes.as_slice(), "{name} native bytes");
            }
            Some(_) => {
                let bytes: Vec<u8> = values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
                assert_eq!(source.native_bytes(index).unwrap(), bytes.as_slice(), "{name} native bytes");
            }
            None => assert!(source.native_bytes(index).is_none(), "{name}"),
        }
        source.release(index);
    }
}

/// Every field but the scores; for tokens some merge makes, the scores' order.
fn assert_vocab_equal_but_scores(got: &Vocab, want: &Vocab) {
    assert_eq!(got.kind, want.kind);
    assert_eq!(got.pre_tokenizer, want.pre_tokenizer);
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.types, want.types);
    assert_eq!(got.merges, want.merges);
    assert_eq!(
        (got.bos_id, got.eos_id, got.unk_id, got.pad_id, got.eot_id),
        (want.bos_id, want.eos_id, want.unk_id, want.pad_id, want.eot_id)
    );
    assert_eq!((got.add_bos, got.add_eos, got.add_space_prefix), (want.add_bos, want.add_eos, want.add_space_prefix));
    assert_eq!(got.scores.len(), want.scores.len());
}

/// Multi-character normal pieces that no two normal tokens spell: no merge can make them.
fn unsplittable(vocab: &Vocab) -> Vec<usize> {
    let normal = |text: &str| vocab.find(text).is_some_and(|id| vocab.types[id as usize] == TokenType::Normal);
    (0..vocab.len())
        .filter(|&id| vocab.types[id] == TokenType::Normal)
        .filter(|&id| {
            let text = std::str::from_utf8(&vocab.tokens[id]).unwrap();
            let mut splits = text.char_indices().skip(1).map(|(at, _)| text.split_at(at));
            text.chars().count() > 1 && !splits.any(|(left, right)| normal(left) && normal(right))
        })
        .collect()
}

fn write(model: &SyntheticModel, options: HfWriteOptions) -> (tempfile::TempDir, PathBuf) {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("model");
    hf::write_hf_dir(model, &dir, options).unwrap();
    (temp, dir)
}

/// Appends a normal token to the vocabulary and a row to the embedding and output.
fn push_token(model: &mut SyntheticModel, text: &str, score: f32) {
    model.vocab.tokens.push(text.as_bytes().to_vec());
    model.vocab.scores.push(score);
    model.vocab.types.push(TokenType::Normal);
    model.config.vocab_size += 1;
    let dim = model.config.dim as usize;
    for (name, shape, values) in &mut model.tensors {
        if name == "token_embd.weight" || name == "output.weight" {
            shape[0] += 1;
            values.extend((0..dim).map(|i| i as f32 / 64.0));
        }
    }
}

#[test]
fn f32_unsharded_untied_sentencepiece_json_round_trips() {
    let mut model = model(false, TokenizerKind::SentencePiece, 1);
    // No merge can make this piece: no "x", "y" or "z" tokens.
    push_token(&mut model, "▁xyzzy", -0.5);
    let options = HfWriteOptions { chat_template: Some(LLAMA2_CHAT.into()), ..HfWriteOptions::default() };
    let (_temp, dir) = write(&model, options);
    assert!(dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file());
    let source = hf::open(&dir).unwrap();
    assert_eq!(*source.config(), model.config);
    assert_eq!(source.chat_template(), Some(LLAMA2_CHAT));
    assert_tensors(&source, &model, HfDtype::F32);
    let vocab = source.vocab();
    // Pieces no two normal tokens spell get no merge, so they read back as
    // unused (at least the appended "▁xyzzy"); every other field is carried.
    let mut want = model.vocab.clone();
    let unmergeable = unsplittable(&model.vocab);
    let xyzzy = model.vocab.find("▁xyzzy").unwrap() as usize;
    assert!(unmergeable.contains(&xyzzy));
    assert!(!unmergeable.contains(&(model.vocab.find("▁the").unwrap() as usize)));
    for &id in &unmergeable {
        want.types[id] = TokenType::Unused;
    }
    assert_vocab_equal_but_scores(vocab, &want);

    // Scores: merged pieces keep their order, single characters and specials
    // score 0, pieces no merge can make score below every merged piece.
    let merged: Vec<usize> = (0..vocab.len())
        .filter(|&i| model.vocab.types[i] == TokenType::Normal && !unmergeable.contains(&i))
        .filter(|&i| std::str::from_utf8(&vocab.tokens[i]).unwrap().chars().count() > 1)
        .collect();
    assert!(merged.len() > 20, "most multi-character pieces get a merge");
    for &a in &merged {
        for &id in &unmergeable {
            assert!(vocab.scores[id] < vocab.scores[a], "unmergeable {id} scores below merged {a}");
        }
        for &b in &merged {
            if model.vocab.scores[a] > model.vocab.scores[b] {
                assert!(vocab.scores[a] > vocab.scores[b], "order of {a} and {b}");
            }
        }
    }
    for id in [0usize, 1, 2, 3, 100, vocab.find("e").unwrap() as usize, vocab.find("▁").unwrap() as usize] {
        assert_eq!(vocab.scores[id], 0.0, "token {id} is no merge's result");
    }
    assert!(source.describe().contains("Hugging Face") && source.describe().contains(&dir.display().to_string()));
}

#[test]
fn f16_three_shards_tied_tokenizer_model_round_trips() {
    let model = model(true, TokenizerKind::SentencePiece, 2);
    let options = HfWriteOptions {
        dtype: HfDtype::F16,
        shards: 3,
        tokenizer: HfTokenizerForm::SentencePieceModel,
        chat_template: Some(LLAMA2_CHAT.into()),
        chat_template_as_list: true,
        gemma3_multimodal: false,
    };
    let (_temp, dir) = write(&model, options);
    assert!(!dir.join("model.safetensors").exists());
    assert!(dir.join("model-00003-of-00003.safetensors").is_file());
    assert!(dir.join("model.safetensors.index.json").is_file() && !dir.join("tokenizer.json").exists());
    let source = hf::open(&dir).unwrap();
    assert_eq!(source.config().tied_output, 1);
    assert_eq!(*source.config(), model.config);
    assert!(source.tensors().iter().all(|t| t.name != "output.weight"));
    assert_eq!(source.chat_template(), Some(LLAMA2_CHAT), "the list's \"default\" template");
    // tokenizer.model carries every field, scores included.
    assert_eq!(*source.vocab(), model.vocab);
    assert_tensors(&source, &model, HfDtype::F16);
}

#[test]
fn bf16_two_shards_untied_round_trips() {
    let model = model(false, TokenizerKind::SentencePiece, 3);
    let options = HfWriteOptions { dtype: HfDtype::BF16, shards: 2, ..HfWriteOptions::default() };
    let (_temp, dir) = write(&model, options);
    let source = hf::open(&dir).unwrap();
    assert_eq!(*source.config(), model.config);
    assert_eq!(source.chat_template(), None);
    assert_tensors(&source, &model, HfDtype::BF16);
}

#[test]
fn byte_level_vocab_round_trips_through_tokenizer_json() {
    for tied in [false, true] {
        let model = model(tied, TokenizerKind::ByteLevelBpe, 4);
        let options = HfWriteOptions { chat_template: Some(CHATML.into()), ..HfWriteOptions::default() };
        let (_temp, dir) = write(&model, options);
        let source = hf::open(&dir).unwrap();
        assert_eq!(*source.config(), model.config);
        // Byte-level tokenizer.json carries everything (scores are all 0).
        assert_eq!(*source.vocab(), model.vocab);
        assert_eq!(source.vocab().pre_tokenizer, PreTokenizer::SmolLm);
        assert_eq!(source.chat_template(), Some(CHATML));
        assert_tensors(&source, &model, HfDtype::F32);
    }
}

#[test]
fn byte_level_pre_tokenizers_round_trip() {
    for pre_tokenizer in [PreTokenizer::Gpt2, PreTokenizer::SmolLm, PreTokenizer::Llama3] {
        let mut model = model(false, TokenizerKind::ByteLevelBpe, 5);
        model.vocab.pre_tokenizer = pre_tokenizer;
        let (_temp, dir) = write(&model, HfWriteOptions::default());
        assert_eq!(hf::open(&dir).unwrap().vocab().pre_tokenizer, pre_tokenizer);
    }
}

/// A tiny model whose q/k rows are recognizable: row r of every matrix holds r·100 + column.
fn small_model() -> SyntheticModel {
    let shape =
        SyntheticShape { dim: 8, n_heads: 2, n_kv_heads: 1, ffn_dim: 16, n_layers: 1, ..SyntheticShape::default() };
    let mut model = SyntheticModel::generate(shape, 6);
    for (name, shape, values) in &mut model.tensors {
        if name.contains("attn_q") || name.contains("attn_k") {
            for (i, value) in values.iter_mut().enumerate() {
                *value = ((i / shape[1]) * 100 + i % shape[1]) as f32;
            }
        }
    }
    model
}

/// The rows of a safetensors tensor, as f32.
fn stored_rows(path: &Path, name: &str) -> Vec<Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor(name).unwrap();
    let cols = view.shape()[1];
    let values: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    values.chunks(cols).map(|r| r.to_vec()).collect()
}

#[test]
fn qk_permutation_matches_hand_computed_rows() {
    // head_dim 4: our rows (h, 2j + k) come from Hugging Face's (h, k·2 + j).
    // Per head, ours [0 1 2 3] = Hugging Face's [0 2 1 3].
    let hand: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];
    for (ours, &theirs) in hand.iter().enumerate() {
        assert_eq!(permuted_source_row(ours, 4), theirs, "row {ours}");
        assert_eq!(permuted_target_row(theirs, 4), ours, "row {theirs}");
    }
    // head_dim 8: ours [0..8] = Hugging Face's [0 4 1 5 2 6 3 7].
    let hand8 = [0, 4, 1, 5, 2, 6, 3, 7];
    for (ours, &theirs) in hand8.iter().enumerate() {
        assert_eq!(permuted_source_row(ours + 8, 8), theirs + 8);
    }

    let model = small_model();
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    // The file holds Hugging Face's order: its row i is our row hand[i]
    // (the map is its own inverse for head_dim 4).
    let q = stored_rows(&dir.join("model.safetensors"), "model.layers.0.self_attn.q_proj.weight");
    let k = stored_rows(&dir.join("model.safetensors"), "model.layers.0.self_attn.k_proj.weight");
    assert_eq!(q.iter().map(|r| r[0] as usize / 100).collect::<Vec<_>>(), hand);
    assert_eq!(k.iter().map(|r| r[0] as usize / 100).collect::<Vec<_>>(), hand[..4]);
    assert_eq!(q[2][5], 105.0, "a whole row moves, columns stay");
    // v is not permuted.
    let v = stored_rows(&dir.join("model.safetensors"), "model.layers.0.self_attn.v_proj.weight");
    let (_, v_values) = model.tensor("blk.0.attn_v.weight").unwrap();
    assert_eq!(v.concat(), v_values);

    // Reading puts them back, for any row range.
    let source = hf::open(&dir).unwrap();
    let index = source.tensors().iter().position(|t| t.name == "blk.0.attn_q.weight").unwrap();
    let read = read_all(&source, index);
    let rows: Vec<usize> = read.chunks(8).map(|r| r[0] as usize / 100).collect();
    assert_eq!(rows, (0..8).collect::<Vec<_>>());
    let mut two = vec![0f32; 16];
    source.read_rows(index, 5, &mut two).unwrap();
    assert_eq!((two[0], two[8]), (500.0, 600.0));
    let index = source.tensors().iter().position(|t| t.name == "blk.0.attn_k.weight").unwrap();
    assert_eq!(source.tensors()[index].shape, vec![4, 8]);
    let rows: Vec<usize> = read_all(&source, index).chunks(8).map(|r| r[0] as usize / 100).collect();
    assert_eq!(rows, vec![0, 1, 2, 3]);
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut json: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(json.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
}

#[test]
fn config_json_defaults() {
    let model = model(false, TokenizerKind::SentencePiece, 7);
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    edit_json(&dir.join("config.json"), |config| {
        for key in [
            "head_dim",
            "rope_theta",
            "rope_scaling",
            "hidden_act",
            "attention_bias",
            "mlp_bias",
            "tie_word_embeddings",
        ] {
            config.remove(key);
        }
        config.insert("rope_scaling".into(), json!({"rope_type": "default"}));
        config.insert("architectures".into(), json!(["SomethingElse"]));
    });
    let source = hf::open(&dir).unwrap();
    assert_eq!(
        *source.config(),
        model.config,
        "defaults: head_dim = hidden/heads, θ = 10000; model_type llama suffices"
    );
    edit_json(&dir.join("config.json"), |config| {
        config.remove("num_key_value_heads");
        config.insert("num_attention_heads".into(), json!(2));
    });
    // Two heads of 32 and kv heads = heads: k_proj no longer fits.
    let error = format!("{:#}", hf::open(&dir).unwrap_err());
    assert!(error.contains("k_proj") && error.contains("[64, 64]"), "{error}");
}

#[test]
fn config_json_rejections_name_the_file_and_key() {
    let model = model(false, TokenizerKind::SentencePiece, 8);
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    let original = std::fs::read(dir.join("config.json")).unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Map<String, Value>)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "rope_scaling type `llama3` needs a number `original_max_position_embeddings`",
            Box::new(|c| drop(c.insert("rope_scaling".into(), json!({"rope_type": "llama3", "factor": 8.0})))),
        ),
        (
            "rope_scaling type `yarn`",
            Box::new(|c| drop(c.insert("rope_scaling".into(), json!({"type": "yarn", "factor": 2.0})))),
        ),
        (
            "rope_scaling type `dynamic` is not supported",
            Box::new(|c| drop(c.insert("rope_scaling".into(), json!({"rope_type": "dynamic", "factor": 2.0})))),
        ),
        (
            "high_freq_factor 1 is not above low_freq_factor 1",
            Box::new(|c| {
                let scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 1.0, "original_max_position_embeddings": 64});
                drop(c.insert("rope_scaling".into(), scaling))
            }),
        ),
        (
            "not a supported model (architectures [\"MistralForCausalLM\"], model_type Some(\"mistral\")); expected one of \
             LlamaForCausalLM / llama, Qwen2ForCausalLM / qwen2",
            Box::new(|c| {
                c.insert("architectures".into(), json!(["MistralForCausalLM"]));
                c.insert("model_type".into(), json!("mistral"));
            }),
        ),
        ("hidden_act", Box::new(|c| drop(c.insert("hidden_act".into(), json!("gelu"))))),
        ("`attention_bias` is true; a llama block has no such biases", Box::new(|c| drop(c.insert("attention_bias".into(), json!(true))))),
        ("hidden_size", Box::new(|c| drop(c.remove("hidden_size")))),
        ("num_hidden_layers", Box::new(|c| drop(c.insert("num_hidden_layers".into(), json!(-2))))),
        ("intermediate_size", Box::new(|c| drop(c.insert("intermediate_size".into(), json!("160"))))),
        ("vocab_size", Box::new(|c| drop(c.insert("vocab_size".into(), json!(0))))),
        ("tie_word_embeddings", Box::new(|c| drop(c.insert("tie_word_embeddings".into(), json!("yes"))))),
        ("rms_norm_eps", Box::new(|c| drop(c.insert("rms_norm_eps".into(), json!([1]))))),
    ];
    for (expected, edit) in cases {
        std::fs::write(dir.join("config.json"), &original).unwrap();
        edit_json(&dir.join("config.json"), |c| edit(c));
        let error = format!("{}", hf::open(&dir).unwrap_err());
        assert!(error.contains("config.json") && error.contains(expected), "{expected}: {error}");
    }
}

#[test]
fn tokenizer_config_special_tokens_and_flags() {
    let model = model(false, TokenizerKind::SentencePiece, 9);
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    let config_path = dir.join("tokenizer_config.json");
    // Without add_bos_token, Llama-2's TemplateProcessing post-processor says BOS is added.
    edit_json(&config_path, |c| {
        c.remove("add_bos_token");
        c.insert("eos_token".into(), json!({"content": "</s>", "lstrip": false}));
        c.insert("pad_token".into(), json!("<unk>"));
    });
    let vocab = hf::open(&dir).unwrap().vocab().clone();
    assert!(vocab.add_bos && !vocab.add_eos);
    assert_eq!((vocab.eos_id, vocab.pad_id), (Some(2), Some(0)));
    edit_json(&config_path, |c| {
        c.insert("add_bos_token".into(), json!(false));
        c.insert("add_eos_token".into(), json!(true));
        c.insert("bos_token".into(), Value::Null);
    });
    let vocab = hf::open(&dir).unwrap().vocab().clone();
    assert!(!vocab.add_bos && vocab.add_eos && vocab.bos_id.is_none());
    // Without tokenizer_config.json: config.json's ids and the post-processor.
    std::fs::remove_file(&config_path).unwrap();
    let vocab = hf::open(&dir).unwrap().vocab().clone();
    assert_eq!((vocab.bos_id, vocab.eos_id, vocab.unk_id), (Some(1), Some(2), Some(0)));
    assert!(vocab.add_bos);
    // A BOS token that is not in the vocabulary.
    std::fs::write(&config_path, r#"{"bos_token": "<|begin|>"}"#).unwrap();
    let error = format!("{}", hf::open(&dir).unwrap_err());
    assert!(error.contains("tokenizer_config.json") && error.contains("bos_token"), "{error}");

    // Byte-level: no BOS unless asked.
    let model = self::model(false, TokenizerKind::ByteLevelBpe, 9);
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    edit_json(&dir.join("tokenizer_config.json"), |c| drop(c.remove("add_bos_token")));
    assert!(!hf::open(&dir).unwrap().vocab().add_bos);
}

#[test]
fn chat_template_jinja_file_is_read_when_the_config_has_none() {
    let model = model(false, TokenizerKind::ByteLevelBpe, 10);
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    std::fs::write(dir.join("chat_template.jinja"), CHATML).unwrap();
    assert_eq!(hf::open(&dir).unwrap().chat_template(), Some(CHATML));
}

/// A SmolLM2-style tokenizer.json as the tokenizers library writes it (merges as
/// strings, the ByteLevel post-processor), cut down to a handful of tokens.
const SMOLLM_TOKENIZER_JSON: &str = r#"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [
    {"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 2, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": null,
  "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": true},
    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
  ]},
  "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
  "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
  "model": {
    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
    "vocab": {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "Ġ": 3, "t": 4, "h": 5, "e": 6,
              "Ġt": 7, "he": 8, "Ġthe": 9, "1": 10},
    "merges": ["Ġ t", "h e", "Ġt he"]
  }
}"#;

#[test]
fn smollm_tokenizer_json_is_byte_level_with_digit_splitting() {
    let model = model(false, TokenizerKind::ByteLevelBpe, 11);
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    std::fs::write(dir.join("tokenizer.json"), SMOLLM_TOKENIZER_JSON).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>",
            "chat_template": "{{ messages }}"}"#,
    )
    .unwrap();
    let source = hf::open(&dir).unwrap();
    let vocab = source.vocab();
    assert_eq!(vocab.kind, TokenizerKind::ByteLevelBpe);
    assert_eq!(vocab.pre_tokenizer, PreTokenizer::SmolLm);
    assert_eq!(
        &vocab.tokens[..11],
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġ", "t", "h", "e", "Ġt", "he", "Ġthe", "1"]
            .map(|t| t.as_bytes().to_vec())
    );
    assert_eq!(vocab.merges, vec![(3, 4), (5, 6), (7, 8)]);
    assert_eq!(&vocab.types[..4], &[TokenType::Control, TokenType::Control, TokenType::Control, TokenType::Normal]);
    assert_eq!(
        (vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id, vocab.eot_id),
        (Some(1), Some(2), Some(0), Some(2), Some(2))
    );
    assert!(!vocab.add_bos && !vocab.add_eos && !vocab.add_space_prefix);
    assert!(vocab.scores.iter().all(|&s| s == 0.0));
    // The model's embedding has more rows than the tokenizer has tokens: placeholders fill them.
    assert_eq!(vocab.len(), model.config.vocab_size as usize);
    assert_eq!(vocab.tokens[11], b"[PAD11]");
    assert_eq!(vocab.types[11], TokenType::Unused);
    assert_eq!(source.chat_template(), Some("{{ messages }}"));

    // Merges as [left, right] pairs, as tokenizers ≥ 0.20 writes them.
    let arrays =
        SMOLLM_TOKENIZER_JSON.replace(r#"["Ġ t", "h e", "Ġt he"]"#, r#"[["Ġ", "t"], ["h", "e"], ["Ġt", "he"]]"#);
    std::fs::write(dir.join("tokenizer.json"), arrays).unwrap();
    assert_eq!(hf::open(&dir).unwrap().vocab().merges, vec![(3, 4), (5, 6), (7, 8)]);

    // Digits after ByteLevel, or none: plain GPT-2 splitting.
    let gpt2 = SMOLLM_TOKENIZER_JSON.replace(r#"{"type": "Digits", "individual_digits": true},"#, "");
    std::fs::write(dir.join("tokenizer.json"), gpt2).unwrap();
    assert_eq!(hf::open(&dir).unwrap().vocab().pre_tokenizer, PreTokenizer::Gpt2);

    // A token id far past the model's vocabulary is refused before anything is allocated for it.
    let far = SMOLLM_TOKENIZER_JSON.replace(r#""1": 10}"#, r#""1": 16000000}"#);
    std::fs::write(dir.join("tokenizer.json"), far).unwrap();
    let error = format!("{}", hf::open(&dir).unwrap_err());
    assert!(error.contains("tokenizer.json") && error.contains("vocab_size"), "{error}");

    // A merge whose result is not a token.
    let bad = SMOLLM_TOKENIZER_JSON.replace(r#""h e""#, r#""e h""#);
    std::fs::write(dir.join("tokenizer.json"), bad).unwrap();
    let error = format!("{}", hf::open(&dir).unwrap_err());
    assert!(error.contains("tokenizer.json") && error.contains("merges[1]"), "{error}");
}

#[test]
fn metaspace_tokenizer_json_is_sentencepiece() {
    // Newer Llama-style files: a Metaspace pre-tokenizer and decoder instead of the normalizer.
    let model = model(false, TokenizerKind::SentencePiece, 12);
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    let path = dir.join("tokenizer.json");
    for (scheme, prefix) in [("first", true), ("never", false)] {
        edit_json(&path, |t| {
            t.insert("normalizer".into(), Value::Null);
            t.insert(
                "pre_tokenizer".into(),
                json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": false}),
            );
            t.insert(
                "decoder".into(),
                json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": false}),
            );
            t.get_mut("model").unwrap().as_object_mut().unwrap().insert("byte_fallback".into(), json!(false));
        });
        let vocab = hf::open(&dir).unwrap().vocab().clone();
        assert_eq!(vocab.kind, TokenizerKind::SentencePiece);
        assert_eq!(vocab.add_space_prefix, prefix, "prepend_scheme {scheme}");
        assert_eq!(vocab.types[3], TokenType::Byte);
    }
}

#[test]
fn sentencepiece_protobuf_round_trips_and_rejects_garbage() {
    let model = model(false, TokenizerKind::SentencePiece, 13);
    let (_temp, dir) =
        write(&model, HfWriteOptions { tokenizer: HfTokenizerForm::SentencePieceModel, ..HfWriteOptions::default() });
    let bytes = std::fs::read(dir.join("tokenizer.model")).unwrap();
    let parsed = sentencepiece_model::parse(&bytes).unwrap();
    assert_eq!(parsed.pieces.len(), model.vocab.len());
    assert_eq!((parsed.unk_id, parsed.bos_id, parsed.eos_id, parsed.pad_id), (0, 1, 2, -1));
    assert_eq!(parsed.model_type, sentencepiece_model::MODEL_TYPE_BPE);
    assert!(parsed.add_dummy_prefix && parsed.byte_fallback);
    assert_eq!(sentencepiece_model::encode(&parsed), bytes, "encode ∘ parse is the identity");
    for garbage in
        [&[0x0A, 0x80][..], &[0x0A, 0x05, 0x0A], &[0x0B], &[0x08], &[0x0A, 0x02, 0x15, 0x00], &[0xFF; 11], &[]]
    {
        assert!(sentencepiece_model::parse(garbage).is_err(), "{garbage:?}");
    }
    // A unigram model is refused by name.
    let mut unigram = parsed.clone();
    unigram.model_type = 1;
    std::fs::write(dir.join("tokenizer.model"), sentencepiece_model::encode(&unigram)).unwrap();
    let error = format!("{}", hf::open(&dir).unwrap_err());
    assert!(error.contains("tokenizer.model") && error.contains("unigram"), "{error}");
    // Ids past the pieces.
    let mut bad = parsed.clone();
    bad.eos_id = 100_000;
    assert!(sentencepiece_model::parse(&sentencepiece_model::encode(&bad)).is_err());
    std::fs::write(dir.join("tokenizer.model"), b"\x0a\x03abc garbage \xff\xff").unwrap();
    let error = format!("{}", hf::open(&dir).unwrap_err());
    assert!(error.contains("tokenizer.model"), "{error}");
}

#[test]
fn writer_refuses_what_the_format_cannot_hold() {
    let model = model(false, TokenizerKind::ByteLevelBpe, 14);
    let temp = tempfile::tempdir().unwrap();
    let options = HfWriteOptions { tokenizer: HfTokenizerForm::SentencePieceModel, ..HfWriteOptions::default() };
    assert!(hf::write_hf_dir(&model, temp.path(), options).is_err(), "tokenizer.model is SentencePiece only");
    let options = HfWriteOptions { shards: 0, ..HfWriteOptions::default() };
    assert!(hf::write_hf_dir(&model, temp.path(), options).is_err());
    let options = HfWriteOptions { shards: 1000, ..HfWriteOptions::default() };
    assert!(hf::write_hf_dir(&model, temp.path(), options).is_err());
}

// ---------------------------------------------------------------------------
// Corrupt input: errors that name the file, never a panic.

fn assert_error_names(dir: &Path, file: &str) -> String {
    let error = format!("{}", hf::open(dir).expect_err("corrupt input must be refused"));
    assert!(error.contains(file), "error does not name {file}: {error}");
    error
}

#[test]
fn garbage_config_json_is_an_error_naming_the_file() {
    let model = model(false, TokenizerKind::SentencePiece, 20);
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    for garbage in [&b"{\"hidden_size\": 64,"[..], b"[1, 2]", b"\xff\xfe", b""] {
        std::fs::write(dir.join("config.json"), garbage).unwrap();
        assert_error_names(&dir, "config.json");
    }
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_error_names(&dir, "config.json");
}

#[test]
fn missing_shard_is_an_error_naming_it() {
    let model = model(false, TokenizerKind::SentencePiece, 21);
    let (_temp, dir) = write(&model, HfWriteOptions { shards: 2, ..HfWriteOptions::default() });
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let error = assert_error_names(&dir, "model-00002-of-00002.safetensors");
    assert!(error.contains("missing"), "{error}");
    // A shard name that leaves the directory.
    edit_json(&dir.join("model.safetensors.index.json"), |index| {
        index["weight_map"]["model.norm.weight"] = json!("../elsewhere.safetensors");
    });
    assert_error_names(&dir, "model.safetensors.index.json");
}

#[test]
fn index_that_disagrees_with_the_shards_is_an_error() {
    let model = model(false, TokenizerKind::SentencePiece, 22);
    let (_temp, dir) = write(&model, HfWriteOptions { shards: 2, ..HfWriteOptions::default() });
    edit_json(&dir.join("model.safetensors.index.json"), |index| {
        index["weight_map"]["model.norm.weight"] = json!("model-00001-of-00002.safetensors");
        index["weight_map"]["model.embed_tokens.weight"] = json!("model-00002-of-00002.safetensors");
    });
    assert_error_names(&dir, "model.safetensors.index.json");
}

#[test]
fn bad_safetensors_header_is_an_error_naming_the_file() {
    let model = model(false, TokenizerKind::SentencePiece, 23);
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    let path = dir.join("model.safetensors");
    let original = std::fs::read(&path).unwrap();
    let header_length = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let mut cases: Vec<Vec<u8>> = vec![
        original[..original.len() - 4].to_vec(),    // truncated data
        original[..8 + header_length / 2].to_vec(), // truncated header
        b"\x05\x00\x00\x00\x00\x00\x00\x00{\"a\":".to_vec(),
        vec![0xFF; 8],
        vec![1, 2, 3],
        Vec::new(),
    ];
    let mut extra = original.clone();
    extra.extend_from_slice(&[0; 8]);
    cases.push(extra);
    let header = String::from_utf8(original[8..8 + header_length].to_vec()).unwrap();
    let same_length = |text: String| {
        assert_eq!(text.len(), header.len());
        let mut bytes = original.clone();
        bytes[8..8 + header_length].copy_from_slice(text.as_bytes());
        bytes
    };
    cases.push(same_length(header.replacen("\"F32\"", "\"I32\"", 1)));
    cases.push(same_length(header.replacen("\"F32\"", "\"F64\"", 1)));
    for (index, bytes) in cases.into_iter().enumerate() {
        std::fs::write(&path, &bytes).unwrap();
        let error = assert_error_names(&dir, "model.safetensors");
        if index == 7 {
            assert!(error.contains("I32") || error.contains("dtype"), "{error}");
        }
    }
}

#[test]
fn wrong_missing_and_unexpected_tensors_are_errors_naming_them() {
    // Written as a model of another shape, read against this config.json.
    let model = model(false, TokenizerKind::SentencePiece, 24);
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    edit_json(&dir.join("config.json"), |c| drop(c.insert("intermediate_size".into(), json!(128))));
    let error = assert_error_names(&dir, "model.safetensors");
    assert!(error.contains("gate_proj") && error.contains("[160, 64]") && error.contains("[128, 64]"), "{error}");
    // More layers in config.json than in the file.
    edit_json(&dir.join("config.json"), |c| {
        c.insert("intermediate_size".into(), json!(160));
        c.insert("num_hidden_layers".into(), json!(3));
    });
    let error = format!("{}", hf::open(&dir).unwrap_err());
    assert!(error.contains("model.layers.2.") && error.contains("missing"), "{error}");
    // A corrupt layer count is refused before any per-layer list is made.
    edit_json(&dir.join("config.json"), |c| drop(c.insert("num_hidden_layers".into(), json!(1 << 24))));
    let started = std::time::Instant::now();
    assert_error_names(&dir, "config.json");
    assert!(started.elapsed().as_secs() < 2, "took {:?}", started.elapsed());
    // Fewer layers: layer 1's tensors are left over.
    edit_json(&dir.join("config.json"), |c| drop(c.insert("num_hidden_layers".into(), json!(1))));
    let error = assert_error_names(&dir, "model.safetensors");
    assert!(error.contains("model.layers.1."), "{error}");

    // A bias tensor: not a plain Llama.
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    let data = vec![0u8; 64 * 4];
    tensors.push((
        "model.layers.0.self_attn.q_proj.bias".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![64], &data).unwrap(),
    ));
    let bytes = safetensors::serialize(tensors, &None).unwrap();
    let (_temp2, dir) = write(&model, HfWriteOptions { shards: 2, ..HfWriteOptions::default() });
    std::fs::write(dir.join("extra.safetensors"), bytes).unwrap();
    edit_json(&dir.join("model.safetensors.index.json"), |index| {
        index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = json!("extra.safetensors");
    });
    let error = assert_error_names(&dir, "extra.safetensors");
    assert!(error.contains("q_proj.bias"), "{error}");
}

#[test]
fn read_rows_out_of_range_is_an_error() {
    let model = model(false, TokenizerKind::SentencePiece, 25);
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    let source = hf::open(&dir).unwrap();
    let cols = source.tensors()[0].cols();
    let rows = source.tensors()[0].rows();
    let mut out = vec![0f32; cols * 2];
    assert!(source.read_rows(0, rows - 1, &mut out).is_err());
    assert!(source.read_rows(0, usize::MAX, &mut out).is_err());
    assert!(source.read_rows(0, 0, &mut out[..cols + 1]).is_err());
    let error = format!("{}", source.read_rows(10_000, 0, &mut out).unwrap_err());
    assert!(error.contains(&dir.display().to_string()), "{error}");
    assert!(source.native_bytes(10_000).is_none());
    source.release(10_000);
}

/// Mutates `bytes` at random: flips, overwrites, truncates or inserts.
fn mutate(bytes: &[u8], random: &mut SplitMix64) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let edits = 1 + random.next_u64() % 4;
    for _ in 0..edits {
        if out.is_empty() {
            out.push(random.next_u64() as u8);
            continue;
        }
        let at = (random.next_u64() % out.len() as u64) as usize;
        match random.next_u64() % 5 {
            0 => out[at] ^= 1 << (random.next_u64() % 8),
            1 => out[at] = random.next_u64() as u8,
            2 => out.truncate(at),
            3 => out.insert(at, random.next_u64() as u8),
            _ => {
                // Digits and JSON punctuation reach further into parsers than noise does.
                let table = b"0123456789-.,:[]{}\"e";
                out[at] = table[(random.next_u64() % table.len() as u64) as usize];
            }
        }
    }
    out
}

#[test]
fn random_mutations_never_panic_and_errors_name_a_file() {
    let mut random = SplitMix64(0xB4A3_B1E5);
    let json_model = model(false, TokenizerKind::SentencePiece, 30);
    let proto_model = model(true, TokenizerKind::SentencePiece, 31);
    let (_temp1, json_dir) = write(&json_model, HfWriteOptions { shards: 2, ..HfWriteOptions::default() });
    let options = HfWriteOptions { tokenizer: HfTokenizerForm::SentencePieceModel, ..HfWriteOptions::default() };
    let (_temp2, proto_dir) = write(&proto_model, options);
    let targets: Vec<(PathBuf, &str)> = vec![
        (json_dir.clone(), "config.json"),
        (json_dir.clone(), "tokenizer_config.json"),
        (json_dir.clone(), "tokenizer.json"),
        (json_dir.clone(), "model.safetensors.index.json"),
        (proto_dir.clone(), "tokenizer.model"),
        (proto_dir.clone(), "model.safetensors"),
    ];
    let (mut refused, mut accepted) = (0, 0);
    for (dir, file) in &targets {
        let path = dir.join(file);
        let original = std::fs::read(&path).unwrap();
        let rounds = if *file == "tokenizer.json" { 60 } else { 150 };
        for _ in 0..rounds {
            let mutated = if *file == "model.safetensors" {
                // Mutate the header, where the structure is; the data is just numbers.
                let header_end = 8 + u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
                let mut bytes = mutate(&original[..header_end], &mut random);
                bytes.extend_from_slice(&original[header_end..]);
                bytes
            } else {
                mutate(&original, &mut random)
            };
            std::fs::write(&path, &mutated).unwrap();
            let result = std::panic::catch_unwind(|| match hf::open(dir) {
                Ok(source) => {
                    for index in 0..source.tensors().len() {
                        let _ = read_all(&source, index);
                    }
                    Ok(())
                }
                Err(error) => Err(format!("{error}")),
            });
            match result.unwrap_or_else(|_| panic!("{file}: a mutation made the reader panic: {mutated:?}")) {
                Ok(()) => accepted += 1,
                Err(error) => {
                    assert!(error.contains(&dir.display().to_string()), "{file}: error names no file: {error}");
                    refused += 1;
                }
            }
        }
        std::fs::write(&path, &original).unwrap();
    }
    eprintln!("mutations: {refused} refused, {accepted} accepted");
    assert!(refused > 200, "most mutations are refused ({refused} refused, {accepted} accepted)");
}

// ---------------------------------------------------------------------------
// Against the real libraries (Python).

fn reference_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/hf_tokenizers.py")
}

/// Runs the reference script; `None` (with a message) when Python or a module is missing.
fn python(args: &[&str], input: Option<&Value>) -> Option<Value> {
    let mut command = Command::new("python3");
    command.arg(reference_script()).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let Ok(mut child) = command.spawn() else {
        eprintln!("skipped: python3 is not available");
        return None;
    };
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        if let Some(input) = input {
            stdin.write_all(input.to_string().as_bytes()).unwrap();
        }
    }
    let output = child.wait_with_output().unwrap();
    if output.status.code() == Some(3) {
        eprintln!("skipped: {}", String::from_utf8_lossy(&output.stderr).trim());
        return None;
    }
    assert!(output.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    if output.stdout.is_empty() {
        return Some(Value::Null);
    }
    Some(serde_json::from_slice(&output.stdout).unwrap())
}

const TEXTS: [&str; 9] = [
    "Hello world",
    "xyzzy, said the wizard; jump",
    "the cat and the hat, in the end.",
    " leading space and  two spaces",
    "Hi!\nnew line",
    "wörld 12345 ünïcödé",
    "she sells sea shells",
    "<s> is not special here",
    "",
];

/// The runtime's ids for [`TEXTS`]. Hugging Face `tokenizers` always cuts special
/// tokens out of the text (`parse_special`); sentencepiece never does.
fn runtime_ids(vocab: &Vocab, parse_special: bool) -> Vec<Vec<u32>> {
    let tokenizer = Tokenizer::new(vocab).unwrap();
    TEXTS.iter().map(|text| tokenizer.encode(text, false, parse_special)).collect()
}

fn as_ids(value: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(value.clone()).unwrap()
}

#[test]
fn sentencepiece_tokenizer_json_encodes_like_hf_tokenizers() {
    // (Python) Scores of −(merge rank) make the runtime's score-driven merger apply
    // the file's merges in the same order Hugging Face's BPE does, and a piece no
    // merge makes ("▁xyzzy") is split back as BPE leaves it.
    let mut model = model(false, TokenizerKind::SentencePiece, 40);
    // "▁j" has no merge (there is no "j"), yet a SentencePiece merger forms it from "▁" and "j".
    for (i, piece) in ["x", "y", "▁xy", "zzy", "▁xyzzy", "▁j"].iter().enumerate() {
        push_token(&mut model, piece, -100.0 - i as f32);
    }
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    let path = dir.join("tokenizer.json");
    let Some(reference) = python(&["encode-json", path.to_str().unwrap()], Some(&json!(TEXTS))) else {
        return;
    };
    let vocab = hf::open(&dir).unwrap().vocab().clone();
    assert_eq!(runtime_ids(&vocab, true), as_ids(&reference));
    // The comparison means something only if merges happened.
    let pieces: Vec<String> =
        as_ids(&reference)[0].iter().map(|&id| String::from_utf8(vocab.tokens[id as usize].clone()).unwrap()).collect();
    assert_eq!(pieces.concat(), "▁Hello▁world");
    assert!(pieces.len() < 6, "{pieces:?}");
}

#[test]
fn byte_level_tokenizer_json_encodes_like_hf_tokenizers() {
    // (Python)
    let model = model(false, TokenizerKind::ByteLevelBpe, 41);
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    let path = dir.join("tokenizer.json");
    let Some(reference) = python(&["encode-json", path.to_str().unwrap()], Some(&json!(TEXTS))) else {
        return;
    };
    let vocab = hf::open(&dir).unwrap().vocab().clone();
    assert_eq!(runtime_ids(&vocab, true), as_ids(&reference));
}

#[test]
fn tokenizer_json_as_the_tokenizers_library_writes_it() {
    // (Python) The library's own serialization of SmolLM-, Llama-3- and GPT-2-style
    // tokenizers reads back as the vocabulary it was built from.
    let model = model(false, TokenizerKind::ByteLevelBpe, 42);
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    let ours = dir.join("tokenizer.json");
    let theirs = dir.join("rebuilt.json");
    for (style, pre_tokenizer) in
        [("smollm", PreTokenizer::SmolLm), ("llama3", PreTokenizer::Llama3), ("gpt2", PreTokenizer::Gpt2)]
    {
        let args = ["rebuild-json", ours.to_str().unwrap(), theirs.to_str().unwrap(), style];
        if python(&args, None).is_none() {
            return;
        }
        let json: Value = serde_json::from_slice(&std::fs::read(&theirs).unwrap()).unwrap();
        let sub = tempfile::tempdir().unwrap();
        for file in ["config.json", "model.safetensors", "tokenizer_config.json"] {
            std::fs::copy(dir.join(file), sub.path().join(file)).unwrap();
        }
        std::fs::write(sub.path().join("tokenizer.json"), serde_json::to_vec(&json).unwrap()).unwrap();
        let mut want = model.vocab.clone();
        want.pre_tokenizer = pre_tokenizer;
        assert_eq!(*hf::open(sub.path()).unwrap().vocab(), want, "{style}");
    }
}

#[test]
fn tokenizer_model_loads_in_sentencepiece_and_encodes_alike() {
    // (Python) Our tokenizer.model is a ModelProto sentencepiece reads as written,
    // and sentencepiece's ids match the runtime's on the vocabulary read back.
    let model = model(false, TokenizerKind::SentencePiece, 43);
    let (_temp, dir) =
        write(&model, HfWriteOptions { tokenizer: HfTokenizerForm::SentencePieceModel, ..HfWriteOptions::default() });
    let path = dir.join("tokenizer.model");
    let Some(described) = python(&["sp-describe", path.to_str().unwrap()], None) else {
        return;
    };
    let pieces: Vec<String> = serde_json::from_value(described["pieces"].clone()).unwrap();
    assert_eq!(pieces.iter().map(|p| p.as_bytes().to_vec()).collect::<Vec<_>>(), model.vocab.tokens);
    let scores: Vec<f32> = serde_json::from_value(described["scores"].clone()).unwrap();
    assert_eq!(scores, model.vocab.scores);
    let types: Vec<String> = serde_json::from_value(described["types"].clone()).unwrap();
    let names = |t: &TokenType| match t {
        TokenType::Unknown => "unknown",
        TokenType::Control => "control",
        TokenType::Byte => "byte",
        TokenType::Unused => "unused",
        _ => "normal",
    };
    assert_eq!(types, model.vocab.types.iter().map(names).collect::<Vec<_>>());
    assert_eq!(
        (&described["unk"], &described["bos"], &described["eos"], &described["pad"]),
        (&json!(0), &json!(1), &json!(2), &json!(-1))
    );
    let reference = python(&["sp-encode", path.to_str().unwrap()], Some(&json!(TEXTS))).unwrap();
    let vocab = hf::open(&dir).unwrap().vocab().clone();
    assert_eq!(runtime_ids(&vocab, false), as_ids(&reference));
}

#[test]
fn trained_sentencepiece_model_parses_as_sentencepiece_reads_it() {
    // (Python) A tokenizer.model made by sentencepiece's own trainer.
    let temp = tempfile::tempdir().unwrap();
    let corpus = temp.path().join("corpus.txt");
    let mut text = String::new();
    for i in 0..200 {
        text.push_str(&format!(
            "The quick brown fox {i} jumps over the lazy dog. Hello world, the end of line {}.\n",
            i * 7
        ));
    }
    std::fs::write(&corpus, text).unwrap();
    let prefix = temp.path().join("sp");
    if python(&["sp-train", corpus.to_str().unwrap(), prefix.to_str().unwrap(), "400"], None).is_none() {
        return;
    }
    let path = temp.path().join("sp.model");
    let described = python(&["sp-describe", path.to_str().unwrap()], None).unwrap();
    let parsed = sentencepiece_model::parse(&std::fs::read(&path).unwrap()).unwrap();
    let pieces: Vec<String> = serde_json::from_value(described["pieces"].clone()).unwrap();
    assert_eq!(parsed.pieces.iter().map(|p| String::from_utf8(p.text.clone()).unwrap()).collect::<Vec<_>>(), pieces);
    let scores: Vec<f32> = serde_json::from_value(described["scores"].clone()).unwrap();
    assert_eq!(parsed.pieces.iter().map(|p| p.score).collect::<Vec<_>>(), scores);
    assert_eq!(parsed.model_type, sentencepiece_model::MODEL_TYPE_BPE);
    assert!(parsed.byte_fallback && parsed.add_dummy_prefix);
    assert_eq!((parsed.unk_id, parsed.bos_id, parsed.eos_id, parsed.pad_id), (0, 1, 2, -1));
    assert_eq!(parsed.pieces.iter().filter(|p| p.token_type == TokenType::Byte).count(), 256);

    // As a model directory's tokenizer, it encodes as sentencepiece does.
    let mut model = model(false, TokenizerKind::SentencePiece, 44);
    model.config.vocab_size = parsed.pieces.len() as u32;
    let dim = model.config.dim as usize;
    for tensor in &mut model.tensors {
        if tensor.0 == "token_embd.weight" || tensor.0 == "output.weight" {
            tensor.1 = vec![parsed.pieces.len(), dim];
            tensor.2 = vec![0.5; parsed.pieces.len() * dim];
        }
    }
    let (_temp, dir) = write(&model, HfWriteOptions::default());
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    std::fs::copy(&path, dir.join("tokenizer.model")).unwrap();
    let vocab = hf::open(&dir).unwrap().vocab().clone();
    let reference = python(&["sp-encode", path.to_str().unwrap()], Some(&json!(TEXTS))).unwrap();
    assert_eq!(runtime_ids(&vocab, false), as_ids(&reference));
}
