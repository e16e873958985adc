//! The fixed structs of the image, `#[repr(C)]` and read in place.
//! Their byte layout is specified in `models/FORMAT.md`.

use bytemuck::{Pod, Zeroable};

/// `Header::magic`.
pub const MAGIC: [u8; 8] = *b"BRAMBLE\0";
/// The container version this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The block layout version this code writes (it reads 1 and 2).
pub const LAYOUT_VERSION: u32 = 2;
/// Every section and every tensor starts on a multiple of this.
pub const ALIGNMENT: u64 = 64;

/// `SectionEntry::flags`: a reader that does not know the section must refuse the file.
pub const SECTION_REQUIRED: u32 = 1 << 0;
/// `SectionEntry::flags`: the section is checked by per-tensor checksums instead.
pub const SECTION_PER_TENSOR: u32 = 1 << 1;

/// Names of the sections this version knows.
pub mod section {
    /// `ModelConfig`.
    pub const CONFIG: &str = "config";
    /// Tokenizer header, arrays and texts.
    pub const TOKENIZER: &str = "tokenizer";
    /// Jinja chat template.
    pub const CHAT_TEMPLATE: &str = "chat_template";
    /// `TensorEntry[]`.
    pub const TENSOR_INDEX: &str = "tensor_index";
    /// The tensors.
    pub const TENSOR_DATA: &str = "tensor_data";
    /// JSON describing the conversion.
    pub const SOURCE: &str = "source";
    /// RoPE's per-pair frequency factors (`crate::rope`); required, so that a
    /// reader from before it refuses the file by this name.
    pub const ROPE_SCALING: &str = crate::rope::SECTION;
    /// The block's differences from Llama's (`crate::architecture`);
    /// required, so that a reader from before it refuses the file by this name.
    pub const ARCHITECTURE: &str = crate::architecture::SECTION;
    /// All of the above.
    pub const KNOWN: [&str; 8] =
        [CONFIG, TOKENIZER, CHAT_TEMPLATE, TENSOR_INDEX, TENSOR_DATA, SOURCE, ROPE_SCALING, ARCHITECTURE];
}

/// The first 64 bytes of an image.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// [`LAYOUT_VERSION`].
    pub layout_version: u32,
    /// Entries in the section table.
    pub section_count: u32,
    /// Zero.
    pub flags: u32,
    /// Where the section table starts.
    pub section_table_offset: u64,
    /// Size of the whole file.
    pub file_size: u64,
    /// Zero.
    pub reserved: [u8; 20],
    /// CRC-32 of the 60 bytes before this field.
    pub header_checksum: u32,
}
const _: () = assert!(std::mem::size_of::<Header>() == 64);

/// One entry of the section table.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct SectionEntry {
    /// ASCII, NUL-padded.
    pub name: [u8; 32],
    /// From the start of the file; a multiple of [`ALIGNMENT`].
    pub offset: u64,
    /// Bytes.
    pub size: u64,
    /// CRC-32 of the section (0 with [`SECTION_PER_TENSOR`]).
    pub checksum: u32,
    /// [`SECTION_REQUIRED`], [`SECTION_PER_TENSOR`].
    pub flags: u32,
    /// Zero.
    pub reserved: u64,
}
const _: () = assert!(std::mem::size_of::<SectionEntry>() == 64);

/// One entry of the `tensor_index` section.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct TensorEntry {
    /// ASCII, NUL-padded.
    pub name: [u8; 56],
    /// `Encoding::id`.
    pub encoding: u32,
    /// 1 or 2.
    pub n_dims: u32,
    /// Outermost first; unused dimensions are 0.
    pub shape: [u64; 4],
    /// From the start of `tensor_data`; a multiple of [`ALIGNMENT`].
    pub offset: u64,
    /// Bytes.
    pub size: u64,
    /// CRC-32 of the tensor's bytes.
    pub checksum: u32,
    /// Zero.
    pub reserved: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<TensorEntry>() == 128);

/// The fixed part of the `tokenizer` section.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct TokenizerHeader {
    /// `TokenizerKind::id`.
    pub kind: u32,
    /// `PreTokenizer::id`.
    pub pre_tokenizer: u32,
    /// Tokens in the vocabulary.
    pub n_tokens: u32,
    /// BPE merges.
    pub n_merges: u32,
    /// BOS id or −1.
    pub bos_id: i32,
    /// EOS id or −1.
    pub eos_id: i32,
    /// Unknown-token id or −1.
    pub unk_id: i32,
    /// Padding id or −1.
    pub pad_id: i32,
    /// Bit 0 add BOS, bit 1 add EOS, bit 2 add a space prefix.
    pub flags: u32,
    /// Length of the token text blob.
    pub text_bytes: u32,
    /// End-of-turn id + 1, or 0 for none.
    pub eot_id_plus1: u32,
    /// Zero.
    pub reserved: [u32; 5],
}
const _: () = assert!(std::mem::size_of::<TokenizerHeader>() == 64);

/// `TokenizerHeader::flags` bit: add BOS.
pub const TOKENIZER_ADD_BOS: u32 = 1 << 0;
/// `TokenizerHeader::flags` bit: add EOS.
pub const TOKENIZER_ADD_EOS: u32 = 1 << 1;
/// `TokenizerHeader::flags` bit: add a space prefix.
pub const TOKENIZER_ADD_SPACE_PREFIX: u32 = 1 << 2;

/// Writes `name` into a NUL-padded fixed field; `None` if it does not fit or is not ASCII.
pub fn fixed_name<const N: usize>(name: &str) -> Option<[u8; N]> {
    if name.len() >= N || !name.is_ascii() || name.bytes().any(|b| b == 0) {
        return None;
    }
    let mut out = [0u8; N];
    out[..name.len()].copy_from_slice(name.as_bytes());
    Some(out)
}

/// Reads a NUL-padded fixed field; `None` if it is not ASCII.
pub fn read_fixed_name(field: &[u8]) -> Option<&str> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let name = &field[..end];
    if name.is_ascii() {
        std::str::from_utf8(name).ok()
    } else {
        None
    }
}

/// Rounds `offset` up to the next multiple of [`ALIGNMENT`].
pub fn align_up(offset: u64) -> u64 {
    offset.div_ceil(ALIGNMENT) * ALIGNMENT
}
