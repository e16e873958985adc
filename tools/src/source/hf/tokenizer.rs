//! The tokenizer of a Hugging Face directory: `tokenizer.json` (the
//! `tokenizers` library's format) or, without it, SentencePiece's
//! `tokenizer.model`; special tokens, BOS/EOS flags and the chat template from
//! `tokenizer_config.json`. Also the writers of those files, for tests.
//!
//! What each form carries into a [`Vocab`]:
//!
//! - `tokenizer.model`: every field. BOS/EOS/UNK/PAD come from the trainer
//!   spec unless `tokenizer_config.json` names others.
//! - `tokenizer.json`, byte-level BPE: every field (scores are all 0).
//! - `tokenizer.json`, SentencePiece-style BPE: everything but the scores, which
//!   the format does not hold. A token's score becomes −(rank of the first
//!   merge that makes it), so a score-driven SentencePiece merger applies the
//!   merges in the file's order; single characters, byte and special tokens
//!   score 0 (no merge makes them). A longer normal token that no merge makes
//!   can never come out of Hugging Face's BPE: it reads as `Unused` with
//!   score −(number of merges), which a SentencePiece merger splits back into
//!   the pieces it was formed from, as BPE would have left them.
//! - Neither form stores the end-of-turn token: it is the first of
//!   `<|im_end|>`, `<|eot_id|>`, `<|end|>`, `<end_of_turn>` in the vocabulary.
//!   `Unused` types are not carried by `tokenizer.json` (unused tokens read as
//!   normal, or unused as above); ids missing from the file are filled with
//!   unused `[PAD<id>]` tokens.

use super::sentencepiece_model::{self, Piece, SentencePieceModel, MODEL_TYPE_BPE};
use anyhow::{anyhow, bail, Context, Result};
use bramble_runtime::vocab::{PreTokenizer, TokenType, TokenizerKind};
use bramble_runtime::Vocab;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;

/// SentencePiece's stand-in for a space.
const SPACE_PIECE: &str = "\u{2581}";

/// Largest token id accepted from a file, so a corrupt id cannot make us allocate gigabytes.
const MAX_TOKEN_ID: u64 = 1 << 24;

/// Largest tokenizer file read into memory.
const MAX_TOKENIZER_FILE_BYTES: u64 = 1 << 29;

/// Llama-3's pre-tokenizer regex, as its `tokenizer.json` spells it.
pub(super) const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's (Qwen2.5's, Qwen3's) split regex in `tokenizer.json`: Llama-3's with single digits.
pub(super) const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Tokens that end a chat turn, in the order they are looked for.
const END_OF_TURN_TOKENS: [&str; 4] = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"];

/// What `config.json` says that the tokenizer reader needs: special-token ids,
/// used when the tokenizer files give none, and the vocabulary size, which
/// bounds the token ids a tokenizer file may use.
#[derive(Debug, Clone, Copy)]
pub(super) struct ModelFacts {
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub vocab_size: u32,
}

/// What `tokenizer_config.json` says. Outer `None`: the key is absent; inner `None`: it is `null`.
#[derive(Debug, Clone, Default)]
struct TokenizerConfig {
    bos_token: Option<Option<String>>,
    eos_token: Option<Option<String>>,
    unk_token: Option<Option<String>>,
    pad_token: Option<Option<String>>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    chat_template: Option<String>,
}

/// Reads a file of at most [`MAX_TOKENIZER_FILE_BYTES`].
pub(super) fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let length = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?.len();
    if length > MAX_TOKENIZER_FILE_BYTES {
        bail!("{}: {length} bytes is larger than any tokenizer file ({MAX_TOKENIZER_FILE_BYTES})", path.display());
    }
    std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// Parses a JSON file, with an error naming it.
pub(super) fn read_json(path: &Path) -> Result<Value> {
    let bytes = read_bounded(path)?;
    serde_json::from_slice(&bytes).map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))
}

/// A special token's text: a string, or an `AddedToken` object `{"content": ...}`.
fn special_token_text(path: &Path, key: &str, value: &Value) -> Result<Option<String>> {
    match value {
        Value::Null => Ok(None),
        Value::String(text) => Ok(Some(text.clone())),
        Value::Object(object) => match object.get("content") {
            Some(Value::String(text)) => Ok(Some(text.clone())),
            _ => bail!("{}: `{key}` is an object without a string `content`", path.display()),
        },
        _ => bail!("{}: `{key}` is neither a string nor an object", path.display()),
    }
}

impl TokenizerConfig {
    fn read(path: &Path) -> Result<Self> {
        let json = read_json(path)?;
        let Value::Object(object) = &json else {
            bail!("{}: not a JSON object", path.display());
        };
        let mut config = TokenizerConfig::default();
        for (key, slot) in [
            ("bos_token", &mut config.bos_token),
            ("eos_token", &mut config.eos_token),
            ("unk_token", &mut config.unk_token),
            ("pad_token", &mut config.pad_token),
        ] {
            if let Some(value) = object.get(key) {
                *slot = Some(special_token_text(path, key, value)?);
            }
        }
        for (key, slot) in [("add_bos_token", &mut config.add_bos_token), ("add_eos_token", &mut config.add_eos_token)]
        {
            match object.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::Bool(flag)) => *slot = Some(*flag),
                Some(_) => bail!("{}: `{key}` is not true or false", path.display()),
            }
        }
        config.chat_template = match object.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(template)) => Some(template.clone()),
            // Several named templates: the one called "default" is the chat template.
            Some(Value::Array(templates)) => {
                let mut default = None;
                for (index, entry) in templates.iter().enumerate() {
                    let name = entry.get("name").and_then(Value::as_str);
                    let template = entry.get("template").and_then(Value::as_str);
                    let (Some(name), Some(template)) = (name, template) else {
                        bail!("{}: `chat_template[{index}]` lacks a string `name` or `template`", path.display());
                    };
                    if name == "default" {
                        default = Some(template.to_string());
                    }
                }
                if default.is_none() {
                    log::warn!("{}: no chat template is named \"default\"; using none", path.display());
                }
                default
            }
            Some(_) => bail!("{}: `chat_template` is neither a string nor a list", path.display()),
        };
        Ok(config)
    }
}

/// Reads the tokenizer of the Hugging Face directory `dir`: the vocabulary and the chat template.
pub(super) fn read_tokenizer(dir: &Path, model_ids: ModelFacts) -> Result<(Vocab, Option<String>)> {
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.is_file() { TokenizerConfig::read(&config_path)? } else { TokenizerConfig::default() };
    let json_path = dir.join("tokenizer.json");
    let model_path = dir.join("tokenizer.model");
    let mut vocab = if json_path.is_file() {
        let json = read_json(&json_path)?;
        vocab_from_tokenizer_json(&json_path, &json, model_ids)?
    } else if model_path.is_file() {
        let bytes = read_bounded(&model_path)?;
        let model = sentencepiece_model::parse(&bytes).map_err(|e| anyhow!("{}: {e:#}", model_path.display()))?;
        vocab_from_sentencepiece(&model_path, &model)?
    } else {
        bail!("{}: no tokenizer.json or tokenizer.model", dir.display());
    };
    apply_tokenizer_config(&mut vocab, &config, &config_path)?;
    let mut chat_template = config.chat_template.clone();
    let jinja_path = dir.join("chat_template.jinja");
    if chat_template.is_none() && jinja_path.is_file() {
        let bytes = read_bounded(&jinja_path)?;
        let text = String::from_utf8(bytes).map_err(|_| anyhow!("{}: not valid UTF-8", jinja_path.display()))?;
        chat_template = Some(text);
    }
    Ok((vocab, chat_template))
}

/// Token text → id, first id for a text that repeats.
fn index_by_text(tokens: &[Vec<u8>]) -> HashMap<&[u8], u32> {
    let mut index = HashMap::with_capacity(tokens.len());
    for (id, text) in tokens.iter().enumerate() {
        index.entry(text.as_slice()).or_insert(id as u32);
    }
    index
}

/// Sets special ids and flags from `tokenizer_config.json` over what the tokenizer file said.
fn apply_tokenizer_config(vocab: &mut Vocab, config: &TokenizerConfig, path: &Path) -> Result<()> {
    let index = index_by_text(&vocab.tokens);
    let lookup =
        |key: &str, setting: &Option<Option<String>>, current: Option<u32>, required: bool| -> Result<Option<u32>> {
            match setting {
                None => Ok(current),
                Some(None) => Ok(None),
                Some(Some(text)) => match index.get(text.as_bytes()) {
                    Some(&id) => Ok(Some(id)),
                    None if required => bail!("{}: `{key}` {text:?} is not in the vocabulary", path.display()),
                    None => {
                        log::warn!("{}: `{key}` {text:?} is not in the vocabulary; ignored", path.display());
                        Ok(None)
                    }
                },
            }
        };
    let bos_id = lookup("bos_token", &config.bos_token, vocab.bos_id, true)?;
    let eos_id = lookup("eos_token", &config.eos_token, vocab.eos_id, true)?;
    let unk_id = lookup("unk_token", &config.unk_token, vocab.unk_id, true)?;
    let pad_id = lookup("pad_token", &config.pad_token, vocab.pad_id, false)?;
    vocab.bos_id = bos_id;
    vocab.eos_id = eos_id;
    vocab.unk_id = unk_id;
    vocab.pad_id = pad_id;
    if let Some(flag) = config.add_bos_token {
        vocab.add_bos = flag;
    }
    if let Some(flag) = config.add_eos_token {
        vocab.add_eos = flag;
    }
    if vocab.add_bos && vocab.bos_id.is_none() {
        bail!("{}: add_bos_token is set but there is no BOS token", path.display());
    }
    if vocab.add_eos && vocab.eos_id.is_none() {
        bail!("{}: add_eos_token is set but there is no EOS token", path.display());
    }
    Ok(())
}

fn end_of_turn(tokens: &[Vec<u8>]) -> Option<u32> {
    END_OF_TURN_TOKENS.iter().find_map(|name| tokens.iter().position(|t| t == name.as_bytes()).map(|i| i as u32))
}

/// Whether `text` is a SentencePiece byte token `<0xAB>`.
fn is_byte_token(text: &[u8]) -> bool {
    text.len() == 6 && text.starts_with(b"<0x") && text[5] == b'>' && text[3..5].iter().all(u8::is_ascii_hexdigit)
}

/// A vocabulary from a parsed `tokenizer.model`.
pub(super) fn vocab_from_sentencepiece(path: &Path, model: &SentencePieceModel) -> Result<Vocab> {
    if model.model_type != MODEL_TYPE_BPE {
        let name = match model.model_type {
            1 => "unigram",
            3 => "word",
            4 => "char",
            _ => "unknown",
        };
        bail!(
            "{}: trainer_spec model_type is {name} ({}); only BPE ({MODEL_TYPE_BPE}) SentencePiece models are supported",
            path.display(),
            model.model_type
        );
    }
    if model.pieces.len() as u64 > MAX_TOKEN_ID {
        bail!("{}: {} pieces is more than any vocabulary", path.display(), model.pieces.len());
    }
    let id = |value: i32| u32::try_from(value).ok();
    let tokens: Vec<Vec<u8>> = model.pieces.iter().map(|p| p.text.clone()).collect();
    Ok(Vocab {
        kind: TokenizerKind::SentencePiece,
        pre_tokenizer: PreTokenizer::None,
        scores: model.pieces.iter().map(|p| p.score).collect(),
        types: model.pieces.iter().map(|p| p.token_type).collect(),
        merges: Vec::new(),
        bos_id: id(model.bos_id),
        eos_id: id(model.eos_id),
        unk_id: id(model.unk_id),
        pad_id: id(model.pad_id),
        eot_id: end_of_turn(&tokens),
        add_bos: true,
        add_eos: false,
        add_space_prefix: model.add_dummy_prefix,
        tokens,
    })
}

/// Calls `visit` on `value` and every object nested in it.
fn for_each_object<'a>(value: &'a Value, visit: &mut dyn FnMut(&'a Map<String, Value>)) {
    match value {
        Value::Object(object) => {
            visit(object);
            for child in object.values() {
                for_each_object(child, visit);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| for_each_object(item, visit)),
        _ => {}
    }
}

fn has_type(value: &Value, name: &str) -> bool {
    let mut found = false;
    for_each_object(value, &mut |object| found |= object.get("type").and_then(Value::as_str) == Some(name));
    found
}

/// The steps of a pre-tokenizer: the list of a `Sequence`, or the one step.
fn steps(value: &Value) -> Vec<&Value> {
    match value.get("type").and_then(Value::as_str) {
        Some("Sequence") => value
            .get("pretokenizers")
            .or_else(|| value.get("normalizers"))
            .or_else(|| value.get("decoders"))
            .and_then(Value::as_array)
            .map(|items| items.iter().collect())
            .unwrap_or_default(),
        Some(_) => vec![value],
        None => Vec::new(),
    }
}

fn type_of(value: &Value) -> Option<&str> {
    value.get("type").and_then(Value::as_str)
}

/// Which GPT-2-style word splitting a byte-level `pre_tokenizer` does.
fn byte_level_pre_tokenizer(pre_tokenizer: &Value) -> PreTokenizer {
    let steps = steps(pre_tokenizer);
    let position = |test: &dyn Fn(&Value) -> bool| steps.iter().position(|step| test(step));
    let llama3 = position(&|step| {
        type_of(step) == Some("Split")
            && step.pointer("/pattern/Regex").and_then(Value::as_str).is_some_and(|regex| regex.contains(r"\p{N}{1,3}"))
    });
    if llama3.is_some() {
        return PreTokenizer::Llama3;
    }
    let qwen2 = position(&|step| {
        type_of(step) == Some("Split")
            && step.pointer("/pattern/Regex").and_then(Value::as_str).is_some_and(|regex| regex == QWEN2_REGEX)
    });
    if qwen2.is_some() {
        return PreTokenizer::Qwen2;
    }
    let digits = position(&|step| {
        type_of(step) == Some("Digits") && step.get("individual_digits").and_then(Value::as_bool) == Some(true)
    });
    let byte_level = position(&|step| type_of(step) == Some("ByteLevel"));
    match (digits, byte_level) {
        (Some(digits), Some(byte_level)) if digits < byte_level => PreTokenizer::SmolLm,
        _ => PreTokenizer::Gpt2,
    }
}

/// Whether a SentencePiece-style `tokenizer.json` puts a space before the text.
fn sentencepiece_space_prefix(json: &Value) -> bool {
    let mut prefix = false;
    for key in ["normalizer", "pre_tokenizer"] {
        if let Some(part) = json.get(key) {
            for_each_object(part, &mut |object| match object.get("type").and_then(Value::as_str) {
                Some("Prepend") => prefix |= object.get("prepend").and_then(Value::as_str) == Some(SPACE_PIECE),
                Some("Metaspace") => {
                    // Older files say add_prefix_space, newer ones prepend_scheme.
                    if let Some(add) = object.get("add_prefix_space").and_then(Value::as_bool) {
                        prefix |= add;
                    }
                    if let Some(scheme) = object.get("prepend_scheme").and_then(Value::as_str) {
                        prefix |= scheme == "first" || scheme == "always";
                    }
                }
                _ => {}
            });
        }
    }
    prefix
}

/// Whether a `tokenizer.json` is SentencePiece-style: byte fallback, a Metaspace
/// step, or a normalizer/decoder that swaps spaces and `▁`.
fn is_sentencepiece_style(json: &Value, model: &Value) -> bool {
    if model.get("byte_fallback").and_then(Value::as_bool) == Some(true) {
        return true;
    }
    let mut found = false;
    for key in ["normalizer", "pre_tokenizer", "decoder"] {
        if let Some(part) = json.get(key) {
            for_each_object(part, &mut |object| match object.get("type").and_then(Value::as_str) {
                Some("Metaspace") => found = true,
                Some("Replace") | Some("Prepend") => {
                    let text = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| s.contains(SPACE_PIECE));
                    found |= text(object.get("content"))
                        || text(object.get("prepend"))
                        || text(object.get("pattern").and_then(|p| p.get("String")));
                }
                _ => {}
            });
        }
    }
    found
}

/// BOS/EOS flags from a `TemplateProcessing` post-processor: whether its
/// single-sequence template starts and ends with a special token.
fn template_flags(json: &Value, bos: Option<&str>, eos: Option<&str>) -> Option<(bool, bool)> {
    let processor = json.get("post_processor")?;
    let template = steps_of_processor(processor)?;
    fn special(item: Option<&Value>) -> Option<&str> {
        item.and_then(|i| i.pointer("/SpecialToken/id")).and_then(Value::as_str)
    }
    let first = special(template.first());
    let last = special(template.last());
    Some((first.is_some() && first == bos, last.is_some() && last == eos && template.len() > 1))
}

fn steps_of_processor(processor: &Value) -> Option<&Vec<Value>> {
    match type_of(processor)? {
        "TemplateProcessing" => processor.get("single")?.as_array(),
        "Sequence" => processor.get("processors")?.as_array()?.iter().find_map(steps_of_processor),
        _ => None,
    }
}

fn token_ids(path: &Path, map: &Map<String, Value>) -> Result<Vec<(String, u32)>> {
    let mut entries = Vec::with_capacity(map.len());
    for (text, id) in map {
        let id = id
            .as_u64()
            .filter(|&id| id < MAX_TOKEN_ID)
            .ok_or_else(|| anyhow!("{}: model.vocab[{text:?}] = {id} is not a token id", path.display()))?;
        entries.push((text.clone(), id as u32));
    }
    Ok(entries)
}

/// A merge `"left right"` or `["left", "right"]`.
fn merge_pair<'a>(path: &Path, rank: usize, merge: &'a Value) -> Result<(&'a str, &'a str)> {
    let pair = match merge {
        Value::String(text) => text.split_once(' '),
        Value::Array(items) if items.len() == 2 => items[0].as_str().zip(items[1].as_str()),
        _ => None,
    };
    pair.ok_or_else(|| anyhow!("{}: model.merges[{rank}] is not \"left right\" or [left, right]", path.display()))
}

/// A vocabulary from a parsed `tokenizer.json`.
pub(super) fn vocab_from_tokenizer_json(path: &Path, json: &Value, model_ids: ModelFacts) -> Result<Vocab> {
    let name = path.display();
    let model = json.get("model").filter(|m| m.is_object()).ok_or_else(|| anyhow!("{name}: no `model` object"))?;
    match type_of(model) {
        Some("BPE") => {}
        // Old files leave the type out; a vocab with merges is BPE.
        None if model.get("merges").is_some() => {}
        Some(other) => bail!("{name}: model type {other} is not supported (only BPE)"),
        None => bail!("{name}: `model` has no type and no merges"),
    }
    let vocab_map =
        model.get("vocab").and_then(Value::as_object).ok_or_else(|| anyhow!("{name}: model.vocab is not an object"))?;
    let mut entries = token_ids(path, vocab_map)?;
    // Added tokens, as (id, special).
    let mut added: Vec<(u32, bool)> = Vec::new();
    if let Some(list) = json.get("added_tokens").filter(|v| !v.is_null()) {
        let list = list.as_array().ok_or_else(|| anyhow!("{name}: added_tokens is not a list"))?;
        for (index, token) in list.iter().enumerate() {
            let id = token.get("id").and_then(Value::as_u64).filter(|&id| id < MAX_TOKEN_ID);
            let content = token.get("content").and_then(Value::as_str);
            let (Some(id), Some(content)) = (id, content) else {
                bail!("{name}: added_tokens[{index}] lacks a token id or a string content");
            };
            let special = token.get("special").and_then(Value::as_bool).unwrap_or(false);
            entries.push((content.to_string(), id as u32));
            added.push((id as u32, special));
        }
    }
    let count = entries.iter().map(|(_, id)| *id as usize + 1).max().unwrap_or(0);
    if count == 0 {
        bail!("{name}: the vocabulary is empty");
    }
    if count > model_ids.vocab_size as usize {
        bail!("{name}: token id {} is past config.json's vocab_size {}", count - 1, model_ids.vocab_size);
    }
    let mut tokens: Vec<Option<Vec<u8>>> = vec![None; count];
    for (text, id) in &entries {
        let slot = &mut tokens[*id as usize];
        match slot {
            Some(existing) if existing != text.as_bytes() => {
                bail!("{name}: token id {id} is both {:?} and {text:?}", String::from_utf8_lossy(existing))
            }
            _ => *slot = Some(text.as_bytes().to_vec()),
        }
    }
    let mut types = vec![TokenType::Normal; count];
    let tokens: Vec<Vec<u8>> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, text)| {
            text.unwrap_or_else(|| {
                types[id] = TokenType::Unused;
                format!("[PAD{id}]").into_bytes()
            })
        })
        .collect();
    let index = index_by_text(&tokens);

    let merge_list = match model.get("merges") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(list)) => list.as_slice(),
        Some(_) => bail!("{name}: model.merges is not a list"),
    };
    let mut merges = Vec::with_capacity(merge_list.len());
    let mut merged_ids = Vec::with_capacity(merge_list.len());
    for (rank, merge) in merge_list.iter().enumerate() {
        let (left, right) = merge_pair(path, rank, merge)?;
        let find = |text: &str| index.get(text.as_bytes()).copied();
        let joined = format!("{left}{right}");
        let (Some(left_id), Some(right_id), Some(merged_id)) = (find(left), find(right), find(&joined)) else {
            bail!("{name}: model.merges[{rank}] ({left:?}, {right:?}) uses or makes a token not in the vocabulary");
        };
        merges.push((left_id, right_id));
        merged_ids.push(merged_id);
    }

    let byte_level =
        ["pre_tokenizer", "decoder"].iter().any(|key| json.get(*key).is_some_and(|v| has_type(v, "ByteLevel")));
    let sentencepiece = is_sentencepiece_style(json, model);
    let kind = match (byte_level, sentencepiece) {
        (true, false) => TokenizerKind::ByteLevelBpe,
        (false, true) => TokenizerKind::SentencePiece,
        (true, true) => bail!("{name}: has both ByteLevel steps and SentencePiece-style byte fallback / ▁ spaces"),
        (false, false) => bail!("{name}: neither a byte-level (ByteLevel) nor a SentencePiece-style (byte_fallback, Metaspace, ▁) BPE tokenizer"),
    };

    for &(id, special) in &added {
        types[id as usize] = if special { TokenType::Control } else { TokenType::UserDefined };
    }
    let unk_text = match model.get("unk_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.as_str()),
        Some(_) => bail!("{name}: model.unk_token is not a string"),
    };
    let unk_id = match unk_text {
        None => None,
        Some(text) => Some(
            *index
                .get(text.as_bytes())
                .ok_or_else(|| anyhow!("{name}: model.unk_token {text:?} is not in the vocabulary"))?,
        ),
    };
    let check_id = |key: &str, id: Option<u32>| match id {
        Some(id) if id as usize >= count => {
            log::warn!("config.json: {key} {id} is outside the tokenizer's {count} tokens; ignored");
            None
        }
        other => other,
    };
    let mut bos_id = check_id("bos_token_id", model_ids.bos_id);
    let mut eos_id = check_id("eos_token_id", model_ids.eos_id);

    let (scores, pre_tokenizer, add_space_prefix, vocab_merges) = match kind {
        TokenizerKind::SentencePiece => {
            for (id, text) in tokens.iter().enumerate() {
                if types[id] == TokenType::Normal && is_byte_token(text) {
                    types[id] = TokenType::Byte;
                }
            }
            if let Some(id) = unk_id {
                types[id as usize] = TokenType::Unknown;
            }
            let mut first_rank: Vec<Option<usize>> = vec![None; count];
            for (rank, &merged) in merged_ids.iter().enumerate() {
                first_rank[merged as usize].get_or_insert(rank);
            }
            let unreachable_score = -(merges.len() as f32);
            let mut scores = vec![0.0; count];
            for id in 0..count {
                match first_rank[id] {
                    Some(rank) => scores[id] = -(rank as f32),
                    None if types[id] == TokenType::Normal
                        && std::str::from_utf8(&tokens[id]).map_or(0, |t| t.chars().count()) > 1 =>
                    {
                        // No merge makes this piece, so Hugging Face's BPE never
                        // emits it. A SentencePiece merger would still form it from
                        // any two symbols that spell it; as unused it is split
                        // back into those symbols, which is what BPE gives.
                        scores[id] = unreachable_score;
                        types[id] = TokenType::Unused;
                    }
                    None => {}
                }
            }
            bos_id = bos_id.or_else(|| index.get(&b"<s>"[..]).copied());
            eos_id = eos_id.or_else(|| index.get(&b"</s>"[..]).copied());
            (scores, PreTokenizer::None, sentencepiece_space_prefix(json), Vec::new())
        }
        TokenizerKind::ByteLevelBpe => {
            let pre_tokenizer = json.get("pre_tokenizer").map_or(PreTokenizer::Gpt2, byte_level_pre_tokenizer);
            let mut add_prefix_space = false;
            if let Some(pre) = json.get("pre_tokenizer") {
                for_each_object(pre, &mut |object| {
                    if object.get("type").and_then(Value::as_str) == Some("ByteLevel") {
                        add_prefix_space |= object.get("add_prefix_space").and_then(Value::as_bool) == Some(true);
                    }
                });
            }
            (vec![0.0; count], pre_tokenizer, add_prefix_space, merges)
        }
    };
    let text_of = |id: Option<u32>| id.and_then(|id| std::str::from_utf8(&tokens[id as usize]).ok());
    let default_bos = kind == TokenizerKind::SentencePiece;
    let (add_bos, add_eos) =
        template_flags(json, text_of(bos_id), text_of(eos_id)).unwrap_or((default_bos && bos_id.is_some(), false));
    Ok(Vocab {
        kind,
        pre_tokenizer,
        scores,
        types,
        merges: vocab_merges,
        bos_id,
        eos_id,
        unk_id,
        pad_id: None,
        eot_id: end_of_turn(&tokens),
        add_bos,
        add_eos,
        add_space_prefix,
        tokens,
    })
}

/// The chat-template form [`write_tokenizer_config`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TemplateForm {
    /// `"chat_template": "..."`.
    String,
    /// `"chat_template": [{"name": "default", "template": "..."}]`.
    List,
}

fn token_text(vocab: &Vocab, id: u32) -> Result<&str> {
    let bytes = vocab.tokens.get(id as usize).ok_or_else(|| anyhow!("token id {id} is outside the vocabulary"))?;
    std::str::from_utf8(bytes).map_err(|_| anyhow!("token {id} is not valid UTF-8, which JSON cannot hold"))
}

/// `tokenizer_config.json` for `vocab`.
pub(super) fn tokenizer_config_json(
    vocab: &Vocab,
    chat_template: Option<&str>,
    form: TemplateForm,
    context_length: u32,
) -> Result<Value> {
    let text = |id: Option<u32>| -> Result<Value> {
        Ok(match id {
            Some(id) => Value::String(token_text(vocab, id)?.to_string()),
            None => Value::Null,
        })
    };
    let mut object = Map::new();
    object.insert("add_bos_token".into(), Value::Bool(vocab.add_bos));
    object.insert("add_eos_token".into(), Value::Bool(vocab.add_eos));
    object.insert("bos_token".into(), text(vocab.bos_id)?);
    object.insert("eos_token".into(), text(vocab.eos_id)?);
    object.insert("unk_token".into(), text(vocab.unk_id)?);
    object.insert("pad_token".into(), text(vocab.pad_id)?);
    object.insert("clean_up_tokenization_spaces".into(), Value::Bool(false));
    object.insert("model_max_length".into(), json!(context_length));
    let class = match vocab.kind {
        TokenizerKind::SentencePiece => "LlamaTokenizer",
        TokenizerKind::ByteLevelBpe => "GPT2Tokenizer",
    };
    object.insert("tokenizer_class".into(), json!(class));
    if let Some(template) = chat_template {
        let value = match form {
            TemplateForm::String => json!(template),
            TemplateForm::List => json!([
                {"name": "tool_use", "template": "{{ 'tools are not supported' }}"},
                {"name": "default", "template": template},
            ]),
        };
        object.insert("chat_template".into(), value);
    }
    Ok(Value::Object(object))
}

/// A `TemplateProcessing` post-processor that adds BOS and/or EOS.
fn template_processor(vocab: &Vocab) -> Result<Value> {
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special_tokens = Map::new();
    let mut special = |id: u32, type_id: u32, list: &mut Vec<Value>| -> Result<()> {
        let text = token_text(vocab, id)?;
        list.push(json!({"SpecialToken": {"id": text, "type_id": type_id}}));
        special_tokens.insert(text.to_string(), json!({"id": text, "ids": [id], "tokens": [text]}));
        Ok(())
    };
    for (list, sequences) in [(&mut single, &["A"][..]), (&mut pair, &["A", "B"][..])] {
        for (type_id, sequence) in sequences.iter().enumerate() {
            if let Some(bos) = vocab.bos_id.filter(|_| vocab.add_bos) {
                special(bos, type_id as u32, list)?;
            }
            list.push(json!({"Sequence": {"id": sequence, "type_id": type_id}}));
            if let Some(eos) = vocab.eos_id.filter(|_| vocab.add_eos) {
                special(eos, type_id as u32, list)?;
            }
        }
    }
    Ok(json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens}))
}

/// Merges for a SentencePiece vocabulary, which stores scores instead: each
/// longer normal piece, best score first, split at the first point where both
/// halves are tokens. Pieces with no such split get no merge.
fn derive_merges(vocab: &Vocab) -> Vec<(String, String)> {
    let index: HashMap<&str, u32> = vocab
        .tokens
        .iter()
        .enumerate()
        .filter_map(|(id, text)| Some((std::str::from_utf8(text).ok()?, id as u32)))
        .collect();
    let usable = |text: &str| {
        index
            .get(text)
            .is_some_and(|&id| matches!(vocab.types[id as usize], TokenType::Normal | TokenType::UserDefined))
    };
    let mut pieces: Vec<u32> = (0..vocab.len() as u32)
        .filter(|&id| vocab.types[id as usize] == TokenType::Normal)
        .filter(|&id| std::str::from_utf8(&vocab.tokens[id as usize]).is_ok_and(|t| t.chars().count() > 1))
        .collect();
    pieces.sort_by(|&a, &b| vocab.scores[b as usize].total_cmp(&vocab.scores[a as usize]).then(a.cmp(&b)));
    let mut merges = Vec::new();
    for id in pieces {
        let text = std::str::from_utf8(&vocab.tokens[id as usize]).expect("filtered to UTF-8 above");
        let split = text.char_indices().skip(1).map(|(at, _)| text.split_at(at)).find(|(l, r)| usable(l) && usable(r));
        if let Some((left, right)) = split {
            merges.push((left.to_string(), right.to_string()));
        }
    }
    merges
}

/// `tokenizer.json` for `vocab`, as the `tokenizers` library writes it: Llama-2's
/// layout for a SentencePiece vocabulary, SmolLM's / GPT-2's / Llama-3's for a
/// byte-level one.
pub(super) fn tokenizer_json(vocab: &Vocab) -> Result<Value> {
    let mut vocab_map = Map::new();
    let mut added_tokens = Vec::new();
    for id in 0..vocab.len() as u32 {
        let text = token_text(vocab, id)?;
        if vocab_map.insert(text.to_string(), json!(id)).is_some() {
            bail!("token {text:?} appears twice, which tokenizer.json cannot hold");
        }
        let token_type = vocab.types[id as usize];
        if matches!(token_type, TokenType::Control | TokenType::Unknown | TokenType::UserDefined) {
            added_tokens.push(json!({
                "id": id, "content": text, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": token_type == TokenType::UserDefined, "special": token_type != TokenType::UserDefined,
            }));
        }
    }
    let post_processor = if vocab.add_bos || vocab.add_eos { Some(template_processor(vocab)?) } else { None };
    let byte_level_step = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": vocab.add_space_prefix, "trim_offsets": true, "use_regex": use_regex});
    match vocab.kind {
        TokenizerKind::SentencePiece => {
            let merges: Vec<Value> = derive_merges(vocab).into_iter().map(|(l, r)| json!([l, r])).collect();
            let mut normalizers = Vec::new();
            if vocab.add_space_prefix {
                normalizers.push(json!({"type": "Prepend", "prepend": SPACE_PIECE}));
            }
            normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE_PIECE}));
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": SPACE_PIECE}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if vocab.add_space_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let unk = match vocab.unk_id {
                Some(id) => json!(token_text(vocab, id)?),
                None => Value::Null,
            };
            Ok(json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added_tokens,
                "normalizer": {"type": "Sequence", "normalizers": normalizers},
                "pre_tokenizer": null,
                "post_processor": post_processor,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                    "vocab": vocab_map, "merges": merges,
                },
            }))
        }
        TokenizerKind::ByteLevelBpe => {
            let pre_tokenizer = match vocab.pre_tokenizer {
                PreTokenizer::Gpt2 => byte_level_step(true),
                PreTokenizer::SmolLm => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    byte_level_step(true),
                ]}),
                PreTokenizer::Llama3 => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
                    byte_level_step(false),
                ]}),
                PreTokenizer::Qwen2 => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": false},
                    byte_level_step(false),
                ]}),
                PreTokenizer::None => {
                    bail!("a byte-level vocabulary needs a pre-tokenizer to be written as tokenizer.json")
                }
            };
            // The classic "left right" strings, unless a token holds a space.
            let mut pairs = Vec::with_capacity(vocab.merges.len());
            for &(left, right) in &vocab.merges {
                pairs.push((token_text(vocab, left)?, token_text(vocab, right)?));
            }
            let as_strings = pairs.iter().all(|(l, r)| !l.contains(' ') && !r.contains(' '));
            let merges: Vec<Value> =
                pairs.iter().map(|(l, r)| if as_strings { json!(format!("{l} {r}")) } else { json!([l, r]) }).collect();
            let post_processor = post_processor.unwrap_or_else(
                || json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
            );
            Ok(json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added_tokens,
                "normalizer": null,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": post_processor,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": vocab_map, "merges": merges,
                },
            }))
        }
    }
}

/// `tokenizer.model` bytes for a SentencePiece `vocab`.
pub(super) fn sentencepiece_model_bytes(vocab: &Vocab) -> Result<Vec<u8>> {
    if vocab.kind != TokenizerKind::SentencePiece {
        bail!("tokenizer.model holds SentencePiece vocabularies only, not byte-level BPE");
    }
    let id = |id: Option<u32>| id.map_or(-1, |id| id as i32);
    let model = SentencePieceModel {
        pieces: (0..vocab.len())
            .map(|i| Piece { text: vocab.tokens[i].clone(), score: vocab.scores[i], token_type: vocab.types[i] })
            .collect(),
        model_type: MODEL_TYPE_BPE,
        byte_fallback: vocab.types.contains(&TokenType::Byte),
        unk_id: id(vocab.unk_id),
        bos_id: id(vocab.bos_id),
        eos_id: id(vocab.eos_id),
        pad_id: id(vocab.pad_id),
        add_dummy_prefix: vocab.add_space_prefix,
    };
    Ok(sentencepiece_model::encode(&model))
}
