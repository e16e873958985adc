//! The tokenizer vocabulary of a GGUF file (`tokenizer.ggml.*`), read the way
//! llama.cpp's `llama_vocab::load` reads it.

use super::GgufFile;
use anyhow::{anyhow, bail, Result};
use bramble_runtime::vocab::{PreTokenizer, TokenType, TokenizerKind};
use bramble_runtime::Vocab;
use std::collections::HashMap;
use std::path::Path;

/// Token spellings that end a chat turn, for files without `tokenizer.ggml.eot_token_id`.
const END_OF_TURN_TOKENS: [&str; 3] = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>"];

/// The vocabulary stored in `file`'s `tokenizer.ggml.*` metadata.
pub fn vocab_from_gguf(file: &GgufFile) -> Result<Vocab> {
    let path = file.path().display();
    let model = file
        .string("tokenizer.ggml.model")?
        .ok_or_else(|| anyhow!("{path}: metadata key 'tokenizer.ggml.model' is missing (the file has no tokenizer)"))?;
    let (kind, pre_tokenizer) = match model {
        "llama" => (TokenizerKind::SentencePiece, PreTokenizer::None),
        "gpt2" => {
            let pre = match file.string("tokenizer.ggml.pre")? {
                Some(name) => PreTokenizer::from_gguf_name(name).unwrap_or_else(|| {
                    log::warn!("{path}: unknown tokenizer.ggml.pre '{name}', splitting words as GPT-2 does");
                    PreTokenizer::Gpt2
                }),
                None => {
                    log::warn!("{path}: no tokenizer.ggml.pre, splitting words as GPT-2 does");
                    PreTokenizer::Gpt2
                }
            };
            (TokenizerKind::ByteLevelBpe, pre)
        }
        other => bail!("{path}: tokenizer.ggml.model '{other}' is not supported (expected 'llama' or 'gpt2')"),
    };

    let tokens = file
        .string_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| anyhow!("{path}: metadata key 'tokenizer.ggml.tokens' is missing"))?
        .to_vec();
    let n_tokens = tokens.len();
    if n_tokens == 0 {
        bail!("{path}: tokenizer.ggml.tokens is empty");
    }
    if u32::try_from(n_tokens).is_err() {
        bail!("{path}: tokenizer.ggml.tokens has {n_tokens} tokens, more than ids can number");
    }
    let check_length = |key: &str, length: usize| {
        if length == n_tokens {
            Ok(())
        } else {
            Err(anyhow!("{path}: {key} has {length} entries but there are {n_tokens} tokens"))
        }
    };
    let scores = match file.f32_array("tokenizer.ggml.scores")? {
        Some(scores) => {
            check_length("tokenizer.ggml.scores", scores.len())?;
            scores
        }
        None => vec![0.0; n_tokens],
    };
    let types = match file.i32_array("tokenizer.ggml.token_type")? {
        Some(ids) => {
            check_length("tokenizer.ggml.token_type", ids.len())?;
            // Negative ids are as unknown as large ones: both read as Normal.
            ids.into_iter().map(|id| TokenType::from_id(u32::try_from(id).unwrap_or(0))).collect()
        }
        None => vec![TokenType::Normal; n_tokens],
    };

    let merges = match file.string_array("tokenizer.ggml.merges")? {
        None => Vec::new(),
        Some(merges) => {
            // Later duplicates win, as in llama.cpp's token_to_id map.
            let ids: HashMap<&[u8], u32> = tokens.iter().enumerate().map(|(i, t)| (t.as_slice(), i as u32)).collect();
            merges
                .iter()
                .enumerate()
                .map(|(rank, merge)| {
                    parse_merge(merge, &ids).map_err(|e| anyhow!("{path}: tokenizer.ggml.merges[{rank}] {e}"))
                })
                .collect::<Result<Vec<_>>>()?
        }
    };

    let special = |key: &str| -> Result<Option<u32>> {
        let key = format!("tokenizer.ggml.{key}");
        match file.u32(&key)? {
            Some(id) if (id as usize) < n_tokens => Ok(Some(id)),
            Some(id) => {
                // llama.cpp warns and carries on; a stray padding id should not block a model.
                log::warn!("{path}: {key} = {id} is not a token id (there are {n_tokens} tokens); ignoring it");
                Ok(None)
            }
            None => Ok(None),
        }
    };
    let eot_id = match special("eot_token_id")? {
        Some(id) => Some(id),
        None => END_OF_TURN_TOKENS
            .iter()
            .find_map(|text| tokens.iter().position(|t| t == text.as_bytes()))
            .map(|i| i as u32),
    };
    let sentencepiece = kind == TokenizerKind::SentencePiece;
    Ok(Vocab {
        kind,
        pre_tokenizer,
        scores,
        types,
        merges,
        bos_id: special("bos_token_id")?,
        eos_id: special("eos_token_id")?,
        unk_id: special("unknown_token_id")?,
        pad_id: special("padding_token_id")?,
        eot_id,
        add_bos: file.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(sentencepiece),
        add_eos: file.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        add_space_prefix: file.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(sentencepiece),
        tokens,
    })
}

/// Splits a merge `"left right"` at its space (searching from the second byte,
/// as llama.cpp does, so a left side may itself be a space) and looks both sides up.
fn parse_merge(merge: &[u8], ids: &HashMap<&[u8], u32>) -> Result<(u32, u32)> {
    let space = merge
        .iter()
        .skip(1)
        .position(|&b| b == b' ')
        .map(|i| i + 1)
        .ok_or_else(|| anyhow!("'{}' has no space between its two tokens", String::from_utf8_lossy(merge)))?;
    let (left, right) = (&merge[..space], &merge[space + 1..]);
    let id = |side: &[u8]| {
        ids.get(side).copied().ok_or_else(|| {
            anyhow!(
                "'{}' names token '{}', which is not in the vocabulary",
                String::from_utf8_lossy(merge),
                String::from_utf8_lossy(side)
            )
        })
    };
    Ok((id(left)?, id(right)?))
}

/// Reads the vocabulary and the chat template (`tokenizer.chat_template`) of
/// the GGUF file at `path`. Works on vocabulary-only files, which have no tensors.
pub fn read_vocab(path: &Path) -> Result<(Vocab, Option<String>)> {
    let file = GgufFile::open(path)?;
    let vocab = vocab_from_gguf(&file)?;
    let template = file.string("tokenizer.chat_template")?.map(str::to_string);
    Ok((vocab, template))
}
