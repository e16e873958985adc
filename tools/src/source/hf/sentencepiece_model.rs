//! SentencePiece's `tokenizer.model`: a protobuf `ModelProto`, read and written
//! with a minimal decoder of our own rather than a protobuf dependency. Only
//! the fields a Llama tokenizer needs are interpreted; every other field is
//! skipped by its wire type, as protobuf readers do.
//!
//! The fields used (from sentencepiece's `sentencepiece_model.proto`):
//!
//! ```text
//! ModelProto      1: repeated SentencePiece pieces   2: TrainerSpec   3: NormalizerSpec
//! SentencePiece   1: string piece   2: float score   3: Type (1 normal, 2 unknown,
//!                 3 control, 4 user defined, 5 unused, 6 byte; default normal)
//! TrainerSpec     3: ModelType (1 unigram (default), 2 BPE, 3 word, 4 char)
//!                 35: bool byte_fallback   40: unk_id (0)   41: bos_id (1)
//!                 42: eos_id (2)   43: pad_id (-1)
//! NormalizerSpec  1: string name   3: bool add_dummy_prefix (true)
//! ```
//!
//! Parsing is bounded by the input: every length is checked against the bytes
//! that remain, so garbage gives an error, never a panic or a huge allocation.

use anyhow::{anyhow, bail, Result};
use bramble_runtime::vocab::TokenType;

/// `TrainerSpec.model_type` of a BPE model.
pub const MODEL_TYPE_BPE: i32 = 2;

/// One vocabulary entry of a SentencePiece model.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece's text, `▁` standing for a space.
    pub text: Vec<u8>,
    /// Its score: higher scores merge first in BPE.
    pub score: f32,
    /// Its role.
    pub token_type: TokenType,
}

/// The parts of a SentencePiece `ModelProto` a Llama tokenizer uses.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    /// The vocabulary, in id order.
    pub pieces: Vec<Piece>,
    /// `TrainerSpec.model_type`: 1 unigram, 2 BPE ([`MODEL_TYPE_BPE`]), 3 word, 4 char.
    pub model_type: i32,
    /// `TrainerSpec.byte_fallback`.
    pub byte_fallback: bool,
    /// Unknown-token id (−1: none).
    pub unk_id: i32,
    /// Beginning-of-sequence id (−1: none).
    pub bos_id: i32,
    /// End-of-sequence id (−1: none).
    pub eos_id: i32,
    /// Padding id (−1: none).
    pub pad_id: i32,
    /// `NormalizerSpec.add_dummy_prefix`: put a space before the text.
    pub add_dummy_prefix: bool,
}

/// A protobuf field's value, by wire type.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Varint(u64),
    /// Read past; no field we use has this type.
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl Value<'_> {
    fn wire_name(&self) -> &'static str {
        match self {
            Value::Varint(_) => "varint",
            Value::Fixed64 => "fixed64",
            Value::Bytes(_) => "length-delimited",
            Value::Fixed32(_) => "fixed32",
        }
    }
}

/// Reads the fields of one protobuf message.
struct MessageReader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> MessageReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, position: 0 }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        // A varint is at most 10 bytes (64 bits, 7 per byte).
        for index in 0..10 {
            let Some(&byte) = self.bytes.get(self.position) else {
                bail!("varint truncated at byte {}", self.position);
            };
            self.position += 1;
            value |= u64::from(byte & 0x7F) << (7 * index);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        bail!("varint longer than 10 bytes ending at byte {}", self.position)
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8]> {
        let end = self.position.checked_add(count).filter(|&end| end <= self.bytes.len()).ok_or_else(|| {
            anyhow!("field of {count} bytes at byte {} runs past the end ({} bytes)", self.position, self.bytes.len())
        })?;
        let slice = &self.bytes[self.position..end];
        self.position = end;
        Ok(slice)
    }

    /// The next `(field number, value)`, or `None` at the end of the message.
    fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>> {
        if self.position >= self.bytes.len() {
            return Ok(None);
        }
        let start = self.position;
        let key = self.varint()?;
        let field = u32::try_from(key >> 3)
            .ok()
            .filter(|&f| f != 0)
            .ok_or_else(|| anyhow!("invalid field number {} at byte {start}", key >> 3))?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let length = usize::try_from(self.varint()?).unwrap_or(usize::MAX);
                Value::Bytes(self.take(length)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.take(4)?.try_into()?)),
            wire => bail!("field {field} at byte {start} has wire type {wire}, which protobuf 3 does not use"),
        };
        Ok(Some((field, value)))
    }
}

fn expect_varint(message: &str, field: u32, value: Value) -> Result<u64> {
    match value {
        Value::Varint(v) => Ok(v),
        other => bail!("{message} field {field} is {}, expected varint", other.wire_name()),
    }
}

fn expect_bytes<'a>(message: &str, field: u32, value: Value<'a>) -> Result<&'a [u8]> {
    match value {
        Value::Bytes(b) => Ok(b),
        other => bail!("{message} field {field} is {}, expected length-delimited", other.wire_name()),
    }
}

/// Protobuf `int32` is sent as a sign-extended 64-bit varint; the low 32 bits are the value.
fn varint_to_i32(value: u64) -> i32 {
    value as u32 as i32
}

fn parse_piece(bytes: &[u8], index: usize) -> Result<Piece> {
    let message = format!("piece {index}");
    let mut reader = MessageReader::new(bytes);
    let mut piece = Piece { text: Vec::new(), score: 0.0, token_type: TokenType::Normal };
    let mut has_text = false;
    while let Some((field, value)) = reader.next_field().map_err(|e| anyhow!("{message}: {e}"))? {
        match field {
            1 => {
                piece.text = expect_bytes(&message, field, value)?.to_vec();
                has_text = true;
            }
            2 => match value {
                Value::Fixed32(bits) => piece.score = f32::from_bits(bits),
                other => bail!("{message} score is {}, expected fixed32", other.wire_name()),
            },
            3 => {
                let kind = expect_varint(&message, field, value)?;
                piece.token_type = match kind {
                    1 => TokenType::Normal,
                    2 => TokenType::Unknown,
                    3 => TokenType::Control,
                    4 => TokenType::UserDefined,
                    5 => TokenType::Unused,
                    6 => TokenType::Byte,
                    other => bail!("{message} has unknown type {other}"),
                };
            }
            _ => {}
        }
    }
    if !has_text {
        bail!("{message} has no text");
    }
    if !piece.score.is_finite() {
        bail!("{message} has a score that is not a finite number ({})", piece.score);
    }
    Ok(piece)
}

/// Parses a serialized SentencePiece `ModelProto` (the bytes of `tokenizer.model`).
/// Errors say which piece or field is wrong; the caller adds the file name.
pub fn parse(bytes: &[u8]) -> Result<SentencePieceModel> {
    let mut model = SentencePieceModel {
        pieces: Vec::new(),
        model_type: 1,
        byte_fallback: false,
        unk_id: 0,
        bos_id: 1,
        eos_id: 2,
        pad_id: -1,
        add_dummy_prefix: true,
    };
    let mut reader = MessageReader::new(bytes);
    while let Some((field, value)) = reader.next_field().map_err(|e| anyhow!("ModelProto: {e}"))? {
        match field {
            1 => {
                let piece_bytes = expect_bytes("ModelProto", field, value)?;
                let index = model.pieces.len();
                model.pieces.push(parse_piece(piece_bytes, index)?);
            }
            2 => {
                let mut trainer = MessageReader::new(expect_bytes("ModelProto", field, value)?);
                while let Some((field, value)) = trainer.next_field().map_err(|e| anyhow!("trainer_spec: {e}"))? {
                    match field {
                        3 => model.model_type = varint_to_i32(expect_varint("trainer_spec", field, value)?),
                        35 => model.byte_fallback = expect_varint("trainer_spec", field, value)? != 0,
                        40 => model.unk_id = varint_to_i32(expect_varint("trainer_spec", field, value)?),
                        41 => model.bos_id = varint_to_i32(expect_varint("trainer_spec", field, value)?),
                        42 => model.eos_id = varint_to_i32(expect_varint("trainer_spec", field, value)?),
                        43 => model.pad_id = varint_to_i32(expect_varint("trainer_spec", field, value)?),
                        _ => {}
                    }
                }
            }
            3 => {
                let mut normalizer = MessageReader::new(expect_bytes("ModelProto", field, value)?);
                while let Some((field, value)) = normalizer.next_field().map_err(|e| anyhow!("normalizer_spec: {e}"))? {
                    if field == 3 {
                        model.add_dummy_prefix = expect_varint("normalizer_spec", field, value)? != 0;
                    }
                }
            }
            _ => {}
        }
    }
    if model.pieces.is_empty() {
        bail!("ModelProto has no pieces");
    }
    let count = model.pieces.len();
    for (name, id) in
        [("unk_id", model.unk_id), ("bos_id", model.bos_id), ("eos_id", model.eos_id), ("pad_id", model.pad_id)]
    {
        if id < -1 || id >= 0 && id as usize >= count {
            bail!("trainer_spec {name} = {id} is outside the {count} pieces");
        }
    }
    Ok(model)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, u64::from(field) << 3 | u64::from(wire));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_int32(out: &mut Vec<u8>, field: u32, value: i32) {
    put_key(out, field, 0);
    // Negative int32 values are sign-extended to 64 bits, as protobuf does.
    put_varint(out, value as i64 as u64);
}

/// Serializes `model` as a `ModelProto` that sentencepiece itself can load.
pub fn encode(model: &SentencePieceModel) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in &model.pieces {
        let mut message = Vec::new();
        put_bytes(&mut message, 1, &piece.text);
        put_key(&mut message, 2, 5);
        message.extend_from_slice(&piece.score.to_bits().to_le_bytes());
        // Normal is the default and sentencepiece leaves it out.
        if piece.token_type != TokenType::Normal {
            put_key(&mut message, 3, 0);
            put_varint(&mut message, u64::from(piece.token_type.id()));
        }
        put_bytes(&mut out, 1, &message);
    }
    let mut trainer = Vec::new();
    put_int32(&mut trainer, 3, model.model_type);
    // vocab_size (field 4): sentencepiece checks it against the pieces.
    put_int32(&mut trainer, 4, model.pieces.len() as i32);
    put_key(&mut trainer, 35, 0);
    put_varint(&mut trainer, model.byte_fallback as u64);
    put_int32(&mut trainer, 40, model.unk_id);
    put_int32(&mut trainer, 41, model.bos_id);
    put_int32(&mut trainer, 42, model.eos_id);
    put_int32(&mut trainer, 43, model.pad_id);
    put_bytes(&mut out, 2, &trainer);
    let mut normalizer = Vec::new();
    put_bytes(&mut normalizer, 1, b"identity");
    put_key(&mut normalizer, 3, 0);
    put_varint(&mut normalizer, model.add_dummy_prefix as u64);
    // remove_extra_whitespaces (4) defaults to true; Llama's model turns it off.
    put_key(&mut normalizer, 4, 0);
    put_varint(&mut normalizer, 0);
    put_bytes(&mut out, 3, &normalizer);
    out
}
