//! Encoding and decoding of the `tokenizer` section (see `models/FORMAT.md`).

use super::layout::*;
use crate::error::{Error, Result};
use crate::vocab::{PreTokenizer, TokenType, TokenizerKind, Vocab};

fn optional_id(id: Option<u32>) -> i32 {
    id.map_or(-1, |v| v as i32)
}

/// Serializes a vocabulary into the bytes of a `tokenizer` section.
pub fn encode_vocab(vocab: &Vocab) -> Result<Vec<u8>> {
    let n = vocab.tokens.len();
    if vocab.scores.len() != n || vocab.types.len() != n {
        return Err(Error::invalid(format!(
            "vocabulary has {n} tokens but {} scores and {} types",
            vocab.scores.len(),
            vocab.types.len()
        )));
    }
    let text_bytes: usize = vocab.tokens.iter().map(Vec::len).sum();
    let too_big = |what: &str| Error::invalid(format!("vocabulary {what} does not fit in 32 bits"));
    let header = TokenizerHeader {
        kind: vocab.kind.id(),
        pre_tokenizer: vocab.pre_tokenizer.id(),
        n_tokens: u32::try_from(n).map_err(|_| too_big("size"))?,
        n_merges: u32::try_from(vocab.merges.len()).map_err(|_| too_big("merges"))?,
        bos_id: optional_id(vocab.bos_id),
        eos_id: optional_id(vocab.eos_id),
        unk_id: optional_id(vocab.unk_id),
        pad_id: optional_id(vocab.pad_id),
        flags: (vocab.add_bos as u32 * TOKENIZER_ADD_BOS)
            | (vocab.add_eos as u32 * TOKENIZER_ADD_EOS)
            | (vocab.add_space_prefix as u32 * TOKENIZER_ADD_SPACE_PREFIX),
        text_bytes: u32::try_from(text_bytes).map_err(|_| too_big("text"))?,
        eot_id_plus1: vocab.eot_id.map_or(0, |id| id + 1),
        reserved: [0; 5],
    };
    let mut out = Vec::with_capacity(64 + n * 12 + vocab.merges.len() * 8 + text_bytes);
    out.extend_from_slice(bytemuck::bytes_of(&header));
    let mut offset = 0u32;
    out.extend_from_slice(&offset.to_le_bytes());
    for token in &vocab.tokens {
        offset += token.len() as u32;
        out.extend_from_slice(&offset.to_le_bytes());
    }
    for score in &vocab.scores {
        out.extend_from_slice(&score.to_le_bytes());
    }
    for token_type in &vocab.types {
        out.extend_from_slice(&token_type.id().to_le_bytes());
    }
    for &(left, right) in &vocab.merges {
        out.extend_from_slice(&left.to_le_bytes());
        out.extend_from_slice(&right.to_le_bytes());
    }
    for token in &vocab.tokens {
        out.extend_from_slice(token);
    }
    Ok(out)
}

/// A little-endian cursor that refuses to read past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| Error::corrupt(format!("tokenizer section: {what} runs past the end of the section")))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u32_array(&mut self, n: usize, what: &str) -> Result<impl Iterator<Item = u32> + 'a> {
        let bytes = self.take(n.saturating_mul(4), what)?;
        Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
    }
}

/// Parses the bytes of a `tokenizer` section.
pub fn decode_vocab(bytes: &[u8]) -> Result<Vocab> {
    let mut reader = Reader { bytes, at: 0 };
    let header: TokenizerHeader = bytemuck::pod_read_unaligned(reader.take(64, "header")?);
    let kind = TokenizerKind::from_id(header.kind)
        .ok_or_else(|| Error::unsupported(format!("tokenizer section: unknown tokenizer kind {}", header.kind)))?;
    let pre_tokenizer = PreTokenizer::from_id(header.pre_tokenizer).ok_or_else(|| {
        Error::unsupported(format!("tokenizer section: unknown pre-tokenizer {}", header.pre_tokenizer))
    })?;
    let n = header.n_tokens as usize;
    let offsets: Vec<u32> = reader.u32_array(n + 1, "token offsets")?.collect();
    let scores: Vec<f32> = reader.u32_array(n, "scores")?.map(f32::from_bits).collect();
    let types: Vec<TokenType> = reader.u32_array(n, "token types")?.map(TokenType::from_id).collect();
    let merge_ids: Vec<u32> = reader.u32_array(header.n_merges as usize * 2, "merges")?.collect();
    let text = reader.take(header.text_bytes as usize, "token text")?;
    if reader.at != bytes.len() {
        return Err(Error::corrupt(format!(
            "tokenizer section: {} bytes left over after the token text",
            bytes.len() - reader.at
        )));
    }
    let mut tokens = Vec::with_capacity(n);
    for (i, pair) in offsets.windows(2).enumerate() {
        let (start, end) = (pair[0] as usize, pair[1] as usize);
        if start > end || end > text.len() {
            return Err(Error::corrupt(format!(
                "tokenizer section: token {i} has text range {start}..{end} outside the {} text bytes",
                text.len()
            )));
        }
        tokens.push(text[start..end].to_vec());
    }
    let check_id = |id: u32, what: &str| -> Result<u32> {
        if (id as usize) < n {
            Ok(id)
        } else {
            Err(Error::corrupt(format!("tokenizer section: {what} id {id} is not below the vocabulary size {n}")))
        }
    };
    let optional = |id: i32, what: &str| -> Result<Option<u32>> {
        if id < 0 {
            Ok(None)
        } else {
            check_id(id as u32, what).map(Some)
        }
    };
    let mut merges = Vec::with_capacity(merge_ids.len() / 2);
    for pair in merge_ids.chunks_exact(2) {
        merges.push((check_id(pair[0], "merge")?, check_id(pair[1], "merge")?));
    }
    Ok(Vocab {
        kind,
        pre_tokenizer,
        tokens,
        scores,
        types,
        merges,
        bos_id: optional(header.bos_id, "BOS")?,
        eos_id: optional(header.eos_id, "EOS")?,
        unk_id: optional(header.unk_id, "unknown-token")?,
        pad_id: optional(header.pad_id, "padding")?,
        eot_id: match header.eot_id_plus1 {
            0 => None,
            id => Some(check_id(id - 1, "end-of-turn")?),
        },
        add_bos: header.flags & TOKENIZER_ADD_BOS != 0,
        add_eos: header.flags & TOKENIZER_ADD_EOS != 0,
        add_space_prefix: header.flags & TOKENIZER_ADD_SPACE_PREFIX != 0,
    })
}
