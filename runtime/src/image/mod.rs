//! The packed model image: open, validate, and view in place.
//!
//! The format is specified in `models/FORMAT.md`. [`ModelImage::open`] maps
//! the file and checks everything once — magic, versions, section bounds and
//! alignment, every checksum, the config, the tokenizer, every tensor's
//! encoding, shape, bounds and alignment — so that later typed views
//! ([`ModelImage::tensor_view`]) cannot fail on a file that opened.

pub mod layout;
mod vocab_section;
mod writer;

pub use vocab_section::{decode_vocab, encode_vocab};
pub use writer::ImageWriter;

use crate::architecture::Architecture;
use crate::config::ModelConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::kquant::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K};
use crate::quant::{BlockQ2Kx4, BlockQ3Kx4, BlockQ5Kx4};
use crate::quant::{
    BlockQ4, BlockQ4Kx4, BlockQ4Kx8, BlockQ4S, BlockQ4Sx4, BlockQ4x4, BlockQ6Kx4, BlockQ8, BlockQ8x4, Encoding,
};
use crate::quant::{BlockQ4B, BlockQ4Bx4, BlockQ5, BlockQ5S, BlockQ5Sx4, BlockQ5x4};
use crate::rope::RopeScaling;
use crate::vocab::Vocab;
use half::f16;
use layout::*;
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Where a tensor lies in the image, and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// GGUF-style name.
    pub name: String,
    /// How the values are stored.
    pub encoding: Encoding,
    /// Outermost first.
    pub shape: Vec<usize>,
    /// Absolute offset in the file.
    pub offset: usize,
    /// Bytes.
    pub size: usize,
}

impl TensorInfo {
    /// Rows: all but the innermost dimension.
    pub fn rows(&self) -> usize {
        self.shape[..self.shape.len() - 1].iter().product()
    }
    /// Values per row: the innermost dimension.
    pub fn cols(&self) -> usize {
        self.shape[self.shape.len() - 1]
    }
}

/// A tensor's bytes as typed values or blocks, borrowed from the map.
#[derive(Clone, Copy)]
pub enum TensorView<'a> {
    /// binary32 values.
    F32(&'a [f32]),
    /// binary16 values.
    F16(&'a [f16]),
    /// Q8 blocks.
    Q8(&'a [BlockQ8]),
    /// Asymmetric Q4 blocks.
    Q4(&'a [BlockQ4]),
    /// Symmetric Q4 blocks.
    Q4S(&'a [BlockQ4S]),
    /// Q8 blocks, four rows interleaved.
    Q8X4(&'a [BlockQ8x4]),
    /// Asymmetric Q4 blocks, four rows interleaved.
    Q4X4(&'a [BlockQ4x4]),
    /// Symmetric Q4 blocks, four rows interleaved.
    Q4SX4(&'a [BlockQ4Sx4]),
    /// Q8 blocks, channel-major (`crate::quant::to_channel_major`).
    Q8C(&'a [u8]),
    /// Asymmetric Q4 blocks, channel-major.
    Q4C(&'a [u8]),
    /// ggml Q4_K super-blocks, row-major.
    Q4K(&'a [BlockQ4K]),
    /// ggml Q5_K super-blocks, row-major.
    Q5K(&'a [BlockQ5K]),
    /// ggml Q6_K super-blocks, row-major.
    Q6K(&'a [BlockQ6K]),
    /// ggml Q3_K super-blocks, row-major.
    Q3K(&'a [BlockQ3K]),
    /// ggml Q4_K super-blocks, four rows interleaved.
    Q4KX4(&'a [BlockQ4Kx4]),
    /// ggml Q4_K super-blocks, eight rows interleaved (two rows' levels a byte).
    Q4KX8(&'a [BlockQ4Kx8]),
    /// ggml Q6_K super-blocks, four rows interleaved.
    Q6KX4(&'a [BlockQ6Kx4]),
    /// ggml Q3_K super-blocks, four rows interleaved (levels repacked, `BlockQ3Kx4`).
    Q3KX4(&'a [BlockQ3Kx4]),
    /// ggml Q5_K super-blocks, four rows interleaved.
    Q5KX4(&'a [BlockQ5Kx4]),
    /// Symmetric Q5 blocks (ggml's Q5_0).
    Q5S(&'a [BlockQ5S]),
    /// Symmetric Q5 blocks, four rows interleaved.
    Q5SX4(&'a [BlockQ5Sx4]),
    /// Asymmetric Q5 blocks (ggml's Q5_1).
    Q5(&'a [BlockQ5]),
    /// Asymmetric Q5 blocks, four rows interleaved.
    Q5X4(&'a [BlockQ5x4]),
    /// ggml Q2_K super-blocks, row-major.
    Q2K(&'a [BlockQ2K]),
    /// ggml Q2_K super-blocks, four rows interleaved.
    Q2KX4(&'a [BlockQ2Kx4]),
    /// 4-bit blocks with byte scales: each row's f32 scale, then the blocks.
    Q4B(&'a [f32], &'a [BlockQ4B]),
    /// As [`TensorView::Q4B`], the blocks four rows interleaved.
    Q4BX4(&'a [f32], &'a [BlockQ4Bx4]),
}

impl std::fmt::Debug for TensorView<'_> {
    /// The variant and its length (the k-quant blocks have no `Debug` of
    /// their own, and a tensor's contents are too long to print anyway).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (variant, len) = match self {
            TensorView::F32(v) => ("F32", v.len()),
            TensorView::F16(v) => ("F16", v.len()),
            TensorView::Q8(v) => ("Q8", v.len()),
            TensorView::Q4(v) => ("Q4", v.len()),
            TensorView::Q4S(v) => ("Q4S", v.len()),
            TensorView::Q8X4(v) => ("Q8X4", v.len()),
            TensorView::Q4X4(v) => ("Q4X4", v.len()),
            TensorView::Q4SX4(v) => ("Q4SX4", v.len()),
            TensorView::Q8C(v) => ("Q8C", v.len()),
            TensorView::Q4C(v) => ("Q4C", v.len()),
            TensorView::Q4K(v) => ("Q4K", v.len()),
            TensorView::Q5K(v) => ("Q5K", v.len()),
            TensorView::Q6K(v) => ("Q6K", v.len()),
            TensorView::Q3K(v) => ("Q3K", v.len()),
            TensorView::Q4KX4(v) => ("Q4KX4", v.len()),
            TensorView::Q4KX8(v) => ("Q4KX8", v.len()),
            TensorView::Q6KX4(v) => ("Q6KX4", v.len()),
            TensorView::Q3KX4(v) => ("Q3KX4", v.len()),
            TensorView::Q5KX4(v) => ("Q5KX4", v.len()),
            TensorView::Q5S(v) => ("Q5S", v.len()),
            TensorView::Q5SX4(v) => ("Q5SX4", v.len()),
            TensorView::Q5(v) => ("Q5", v.len()),
            TensorView::Q5X4(v) => ("Q5X4", v.len()),
            TensorView::Q2K(v) => ("Q2K", v.len()),
            TensorView::Q2KX4(v) => ("Q2KX4", v.len()),
            TensorView::Q4B(_, v) => ("Q4B", v.len()),
            TensorView::Q4BX4(_, v) => ("Q4BX4", v.len()),
        };
        write!(f, "{variant}([{len} items])")
    }
}

/// A section as listed in the section table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionInfo {
    /// Name.
    pub name: String,
    /// Absolute offset.
    pub offset: usize,
    /// Bytes.
    pub size: usize,
    /// Whether readers must know it.
    pub required: bool,
}

/// The bytes of an image: a file mapping, or a buffer (tests, and images built in memory).
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u64>, usize),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(map) => map,
            // A Vec<u64> keeps the buffer 8-byte aligned like a page-aligned map
            // is; `len` trims the padding of its last word.
            Storage::Owned(words, len) => &bytemuck::cast_slice(words)[..*len],
        }
    }
}

/// An opened and validated image.
pub struct ModelImage {
    path: PathBuf,
    storage: Storage,
    layout_version: u32,
    sections: Vec<SectionInfo>,
    config: ModelConfig,
    rope_scaling: Option<RopeScaling>,
    architecture: Architecture,
    vocab: Vocab,
    chat_template: Option<String>,
    tensors: Vec<TensorInfo>,
}

/// What [`ModelImage::open_with`] checks beyond the structure.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Compute the CRC-32 of every tensor (reads the whole file once).
    pub verify_tensor_checksums: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self { verify_tensor_checksums: true }
    }
}

impl ModelImage {
    /// Maps and validates the image at `path`, checksums included.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, OpenOptions::default())
    }

    /// Maps and validates the image at `path`, which must be a regular file.
    pub fn open_with(path: &Path, options: OpenOptions) -> Result<Self> {
        let io = |e: std::io::Error| Error::new(ErrorKind::Io, format!("{}: {e}", path.display()));
        // Before opening: opening a FIFO for reading blocks until a writer
        // comes, perhaps forever, and a device or directory cannot be an image.
        let regular = |metadata: std::fs::Metadata| match metadata.is_file() {
            true => Ok(()),
            false => Err(Error::new(
                ErrorKind::Io,
                format!("{}: not a regular file but {}", path.display(), file_kind(&metadata.file_type())),
            )),
        };
        regular(std::fs::metadata(path).map_err(io)?)?;
        let file = File::open(path).map_err(io)?;
        // Again on what was opened, in case the path changed in between.
        regular(file.metadata().map_err(io)?)?;
        // SAFETY: the map is read-only and private to this process. Bramble's
        // images are written once (to a temporary name, then renamed into
        // place) and never modified in place, so the bytes do not change
        // under the map while it lives.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| Error::new(ErrorKind::Io, format!("{}: cannot map: {e}", path.display())))?;
        Self::validate(path.to_path_buf(), Storage::Mapped(map), options)
    }

    /// Validates an image held in memory (`name` is used in messages).
    pub fn from_bytes(name: &str, bytes: &[u8], options: OpenOptions) -> Result<Self> {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Self::validate(PathBuf::from(name), Storage::Owned(words, bytes.len()), options)
    }

    fn validate(path: PathBuf, storage: Storage, options: OpenOptions) -> Result<Self> {
        let context = path.display().to_string();
        let parsed = Parsed::parse(storage.bytes(), options).map_err(|e| e.context(&context))?;
        Ok(Self {
            path,
            layout_version: parsed.layout_version,
            sections: parsed.sections,
            config: parsed.config,
            rope_scaling: parsed.rope_scaling,
            architecture: parsed.architecture,
            vocab: parsed.vocab,
            chat_template: parsed.chat_template,
            tensors: parsed.tensors,
            storage,
        })
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }
    /// The layout version of the quantized blocks.
    pub fn layout_version(&self) -> u32 {
        self.layout_version
    }
    /// The model's hyperparameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    /// RoPE's per-pair frequency factors (the `rope_scaling` section), if
    /// the model scales its frequencies (Llama-3.x).
    pub fn rope_scaling(&self) -> Option<&RopeScaling> {
        self.rope_scaling.as_ref()
    }
    /// The block (the `architecture` section; the Llama block without one).
    pub fn architecture(&self) -> &Architecture {
        &self.architecture
    }
    /// The tokenizer vocabulary.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }
    /// The chat template, if the image has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
    /// The section table.
    pub fn sections(&self) -> &[SectionInfo] {
        &self.sections
    }
    /// The bytes of a section, if present.
    pub fn section(&self, name: &str) -> Option<&[u8]> {
        let info = self.sections.iter().find(|s| s.name == name)?;
        Some(&self.bytes()[info.offset..info.offset + info.size])
    }
    /// Every tensor.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.bytes()[info.offset..info.offset + info.size]
    }
    /// The tensor's values or blocks, typed. Cannot fail for a tensor of this
    /// image: its size and alignment were checked at open.
    pub fn tensor_view(&self, info: &TensorInfo) -> TensorView<'_> {
        let bytes = self.tensor_bytes(info);
        let checked = "tensor size and alignment are validated at open";
        match info.encoding {
            Encoding::F32 => TensorView::F32(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::F16 => TensorView::F16(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q8 => TensorView::Q8(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q4 => TensorView::Q4(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q4S => TensorView::Q4S(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q8X4 => TensorView::Q8X4(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q4X4 => TensorView::Q4X4(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q4SX4 => TensorView::Q4SX4(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q8C => TensorView::Q8C(bytes),
            Encoding::Q4C => TensorView::Q4C(bytes),
            // Alignment 1: any offset views as blocks; the size was checked at open.
            Encoding::Q4K => TensorView::Q4K(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q5K => TensorView::Q5K(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q6K => TensorView::Q6K(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q3K => TensorView::Q3K(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q4KX4 => TensorView::Q4KX4(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q4KX8 => TensorView::Q4KX8(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q6KX4 => TensorView::Q6KX4(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q3KX4 => TensorView::Q3KX4(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q5KX4 => TensorView::Q5KX4(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q5S => TensorView::Q5S(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q5SX4 => TensorView::Q5SX4(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q5 => TensorView::Q5(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q5X4 => TensorView::Q5X4(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q2K => TensorView::Q2K(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q2KX4 => TensorView::Q2KX4(bytemuck::try_cast_slice(bytes).expect(checked)),
            Encoding::Q4B | Encoding::Q4BX4 => {
                // The row scales first (the tensor's offset is aligned), then blocks of alignment 1.
                let (scales, blocks) = bytes.split_at(info.encoding.row_scale_bytes(info.rows()));
                let scales = bytemuck::try_cast_slice(scales).expect(checked);
                match info.encoding {
                    Encoding::Q4B => TensorView::Q4B(scales, bytemuck::try_cast_slice(blocks).expect(checked)),
                    _ => TensorView::Q4BX4(scales, bytemuck::try_cast_slice(blocks).expect(checked)),
                }
            }
        }
    }
    /// Total bytes of all tensors.
    pub fn weight_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.size).sum()
    }
}

/// What a file that is not a regular file is, for messages.
fn file_kind(file_type: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if file_type.is_socket() {
            return "a socket";
        }
        if file_type.is_block_device() || file_type.is_char_device() {
            return "a device";
        }
    }
    if file_type.is_dir() {
        "a directory"
    } else {
        "another kind of file"
    }
}

/// What [`Parsed::parse`] found in a valid image.
struct Parsed {
    layout_version: u32,
    sections: Vec<SectionInfo>,
    config: ModelConfig,
    rope_scaling: Option<RopeScaling>,
    architecture: Architecture,
    vocab: Vocab,
    chat_template: Option<String>,
    tensors: Vec<TensorInfo>,
}

fn corrupt(message: String) -> Error {
    Error::corrupt(message)
}

impl Parsed {
    fn parse(bytes: &[u8], options: OpenOptions) -> Result<Self> {
        // Header: magic, versions, checksum, size.
        if bytes.len() < 64 {
            return Err(corrupt(format!("{} bytes is too short for an image header (64)", bytes.len())));
        }
        let header: Header = bytemuck::pod_read_unaligned(&bytes[..64]);
        if header.magic != MAGIC {
            return Err(corrupt("not a Bramble image (bad magic)".into()));
        }
        if header.format_version != FORMAT_VERSION {
            return Err(Error::new(
                ErrorKind::Version,
                format!(
                    "format version {} is not supported (this reader knows {FORMAT_VERSION})",
                    header.format_version
                ),
            ));
        }
        // Layout 2 only added encodings; a layout-1 file means what it meant.
        if !(1..=LAYOUT_VERSION).contains(&header.layout_version) {
            return Err(Error::new(
                ErrorKind::Version,
                format!(
                    "layout version {} is not supported (this reader knows {LAYOUT_VERSION}); convert the model again",
                    header.layout_version
                ),
            ));
        }
        if crc32fast::hash(&bytes[..60]) != header.header_checksum {
            return Err(corrupt("header checksum mismatch".into()));
        }
        if header.file_size != bytes.len() as u64 {
            return Err(corrupt(format!(
                "file is {} bytes but its header says {} (truncated or extended)",
                bytes.len(),
                header.file_size
            )));
        }

        // Section table.
        let table_offset = header.section_table_offset;
        let table_size = header.section_count as u64 * 64;
        if !table_offset.is_multiple_of(ALIGNMENT)
            || table_offset.checked_add(table_size).is_none_or(|end| end > bytes.len() as u64)
        {
            return Err(corrupt(format!(
                "section table ({} entries at {table_offset}) lies outside the file",
                header.section_count
            )));
        }
        let table = &bytes[table_offset as usize..(table_offset + table_size) as usize];
        let mut sections = Vec::new();
        let mut per_tensor_data = None;
        for (i, raw) in table.chunks_exact(64).enumerate() {
            let entry: SectionEntry = bytemuck::pod_read_unaligned(raw);
            let name = read_fixed_name(&entry.name)
                .ok_or_else(|| corrupt(format!("section {i}: name is not ASCII")))?
                .to_string();
            let end = entry.offset.checked_add(entry.size);
            if !entry.offset.is_multiple_of(ALIGNMENT) || end.is_none_or(|end| end > bytes.len() as u64) {
                return Err(corrupt(format!(
                    "section {name}: {} bytes at {} is misaligned or runs past the end of the file",
                    entry.size, entry.offset
                )));
            }
            let required = entry.flags & SECTION_REQUIRED != 0;
            if required && !section::KNOWN.contains(&name.as_str()) {
                return Err(Error::unsupported(format!(
                    "section {name} is required but unknown to this reader; upgrade Bramble"
                )));
            }
            if sections.iter().any(|s: &SectionInfo| s.name == name) {
                return Err(corrupt(format!("section {name} appears twice")));
            }
            let info =
                SectionInfo { name: name.clone(), offset: entry.offset as usize, size: entry.size as usize, required };
            if entry.flags & SECTION_PER_TENSOR != 0 {
                if name != section::TENSOR_DATA {
                    return Err(corrupt(format!("section {name}: only tensor_data is checked per tensor")));
                }
                per_tensor_data = Some(info.clone());
            } else if crc32fast::hash(&bytes[info.offset..info.offset + info.size]) != entry.checksum {
                return Err(corrupt(format!("section {name}: checksum mismatch (the file is corrupt)")));
            }
            sections.push(info);
        }
        let section_bytes = |name: &str| -> Result<&[u8]> {
            let info = sections
                .iter()
                .find(|s| s.name == name)
                .ok_or_else(|| corrupt(format!("section {name} is missing")))?;
            Ok(&bytes[info.offset..info.offset + info.size])
        };

        // Config.
        let config_bytes = section_bytes(section::CONFIG)?;
        if config_bytes.len() != std::mem::size_of::<ModelConfig>() {
            return Err(corrupt(format!("section config: {} bytes, expected 128", config_bytes.len())));
        }
        let config: ModelConfig = bytemuck::pod_read_unaligned(config_bytes);
        config.validate()?;
        // RoPE's frequency factors: required wherever they are, so that a
        // reader that does not know them refuses the file instead of running
        // plain RoPE.
        let rope_scaling = match sections.iter().find(|s| s.name == section::ROPE_SCALING) {
            Some(info) if !info.required => {
                return Err(corrupt(format!("section {} is not marked required", section::ROPE_SCALING)));
            }
            Some(_) => Some(RopeScaling::from_section(section_bytes(section::ROPE_SCALING)?, &config)?),
            None => None,
        };
        // The block: required for the same reason.
        let architecture = match sections.iter().find(|s| s.name == section::ARCHITECTURE) {
            Some(info) if !info.required => {
                return Err(corrupt(format!("section {} is not marked required", section::ARCHITECTURE)));
            }
            Some(_) => Architecture::from_section(section_bytes(section::ARCHITECTURE)?, &config)?,
            None => Architecture::llama(&config),
        };

        // Tokenizer and chat template.
        let vocab = decode_vocab(section_bytes(section::TOKENIZER)?)?;
        if vocab.len() != config.vocab_size as usize {
            return Err(corrupt(format!(
                "tokenizer has {} tokens but the config says vocab_size {}",
                vocab.len(),
                config.vocab_size
            )));
        }
        let chat_template = match sections.iter().any(|s| s.name == section::CHAT_TEMPLATE) {
            true => Some(
                std::str::from_utf8(section_bytes(section::CHAT_TEMPLATE)?)
                    .map_err(|_| corrupt("section chat_template is not UTF-8".into()))?
                    .to_string(),
            ),
            false => None,
        };

        // Tensor index.
        let index = section_bytes(section::TENSOR_INDEX)?;
        if index.len() % std::mem::size_of::<TensorEntry>() != 0 {
            return Err(corrupt(format!(
                "section tensor_index: {} bytes is not a whole number of entries",
                index.len()
            )));
        }
        let data = per_tensor_data.ok_or_else(|| corrupt("section tensor_data is missing".into()))?;
        let mut tensors: Vec<TensorInfo> = Vec::new();
        for (i, raw) in index.chunks_exact(std::mem::size_of::<TensorEntry>()).enumerate() {
            let entry: TensorEntry = bytemuck::pod_read_unaligned(raw);
            let tensor = Self::check_tensor(i, &entry, &data, bytes, options)?;
            if header.layout_version < 2 && tensor.encoding.row_multiple() > 1 {
                return Err(corrupt(format!(
                    "tensor {}: {} is a layout-2 encoding in a layout-{} file",
                    tensor.name,
                    tensor.encoding.name(),
                    header.layout_version
                )));
            }
            if tensors.iter().any(|t| t.name == tensor.name) {
                return Err(corrupt(format!("tensor {} appears twice", tensor.name)));
            }
            tensors.push(tensor);
        }
        Ok(Self {
            layout_version: header.layout_version,
            sections,
            config,
            rope_scaling,
            architecture,
            vocab,
            chat_template,
            tensors,
        })
    }

    fn check_tensor(
        i: usize,
        entry: &TensorEntry,
        data: &SectionInfo,
        bytes: &[u8],
        options: OpenOptions,
    ) -> Result<TensorInfo> {
        let name =
            read_fixed_name(&entry.name).ok_or_else(|| corrupt(format!("tensor {i}: name is not ASCII")))?.to_string();
        let fail = |what: String| corrupt(format!("tensor {name}: {what}"));
        if let Some(was) = Encoding::retired(entry.encoding) {
            return Err(fail(format!(
                "encoding {} is {was}, which this reader no longer runs: convert the model again",
                entry.encoding
            )));
        }
        let encoding =
            Encoding::from_id(entry.encoding).ok_or_else(|| fail(format!("unknown encoding {}", entry.encoding)))?;
        if !(1..=4).contains(&entry.n_dims) {
            return Err(fail(format!("{} dimensions", entry.n_dims)));
        }
        let mut shape = Vec::new();
        let mut values: u64 = 1;
        for &d in &entry.shape[..entry.n_dims as usize] {
            if d == 0 || d > u32::MAX as u64 {
                return Err(fail(format!("dimension {d} is out of range")));
            }
            values = values.checked_mul(d).ok_or_else(|| fail("size overflows".into()))?;
            shape.push(d as usize);
        }
        let cols = *shape.last().unwrap();
        let block_values = encoding.block_values();
        if !cols.is_multiple_of(block_values) {
            return Err(fail(format!(
                "rows of {cols} values are not whole {} blocks of {block_values}",
                encoding.name()
            )));
        }
        let multiple = encoding.row_multiple();
        if multiple > 1 && (shape.len() != 2 || !shape[0].is_multiple_of(multiple)) {
            return Err(fail(format!(
                "{} needs a matrix of whole groups of {multiple} rows, not {shape:?}",
                encoding.name()
            )));
        }
        let expected = encoding.tensor_bytes(values as usize / cols.max(1), cols) as u64;
        if entry.size != expected {
            return Err(fail(format!("{} bytes, but {values} {} values take {expected}", entry.size, encoding.name())));
        }
        if !entry.offset.is_multiple_of(ALIGNMENT)
            || entry.offset.checked_add(entry.size).is_none_or(|end| end > data.size as u64)
        {
            return Err(fail(format!(
                "{} bytes at offset {} is misaligned or outside tensor_data",
                entry.size, entry.offset
            )));
        }
        let offset = data.offset + entry.offset as usize;
        let size = entry.size as usize;
        if options.verify_tensor_checksums && crc32fast::hash(&bytes[offset..offset + size]) != entry.checksum {
            return Err(fail("checksum mismatch (the file is corrupt)".into()));
        }
        Ok(TensorInfo { name, encoding, shape, offset, size })
    }
}
