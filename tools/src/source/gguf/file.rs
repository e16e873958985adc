//! The GGUF container over a memory map: header, metadata, tensor infos and
//! the data section. Layout per ggml's `docs/gguf.md` (versions 2 and 3).
//!
//! Every count and length in the file is checked against the bytes that are
//! left before anything is allocated for it, so a corrupt or hostile file gives
//! an error naming the file and the field, never a panic or a huge allocation.

use super::GgmlType;
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The four bytes a GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a ggml tensor has.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays we accept. GGUF files in the wild nest
/// at most once; the limit keeps a hostile file from overflowing the stack.
const MAX_ARRAY_DEPTH: usize = 8;
/// Bytes of the fixed header: magic, version, tensor count, metadata count.
const HEADER_BYTES: usize = 24;
/// Smallest possible tensor info: empty name (8), n_dims (4), one dim (8), type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: usize = 32;
/// Smallest possible metadata entry: empty key (8), type (4), a one-byte value.
const MIN_METADATA_BYTES: usize = 13;

/// GGUF's metadata value type ids.
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `UINT8`.
    U8(u8),
    /// `INT8`.
    I8(i8),
    /// `UINT16`.
    U16(u16),
    /// `INT16`.
    I16(i16),
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `UINT64`.
    U64(u64),
    /// `INT64`.
    I64(i64),
    /// `FLOAT32`.
    F32(f32),
    /// `FLOAT64`.
    F64(f64),
    /// `BOOL`.
    Bool(bool),
    /// `STRING`, as stored: GGUF says UTF-8, but token texts are not always.
    String(Vec<u8>),
    /// `ARRAY`.
    Array(Array),
}

/// A metadata array: all elements have one type, kept unboxed.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    /// `UINT8` elements.
    U8(Vec<u8>),
    /// `INT8` elements.
    I8(Vec<i8>),
    /// `UINT16` elements.
    U16(Vec<u16>),
    /// `INT16` elements.
    I16(Vec<i16>),
    /// `UINT32` elements.
    U32(Vec<u32>),
    /// `INT32` elements.
    I32(Vec<i32>),
    /// `UINT64` elements.
    U64(Vec<u64>),
    /// `INT64` elements.
    I64(Vec<i64>),
    /// `FLOAT32` elements.
    F32(Vec<f32>),
    /// `FLOAT64` elements.
    F64(Vec<f64>),
    /// `BOOL` elements.
    Bool(Vec<bool>),
    /// `STRING` elements, as stored.
    String(Vec<Vec<u8>>),
    /// Nested arrays.
    Array(Vec<Array>),
}

impl Value {
    /// GGUF's name for the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "UINT8",
            Value::I8(_) => "INT8",
            Value::U16(_) => "UINT16",
            Value::I16(_) => "INT16",
            Value::U32(_) => "UINT32",
            Value::I32(_) => "INT32",
            Value::U64(_) => "UINT64",
            Value::I64(_) => "INT64",
            Value::F32(_) => "FLOAT32",
            Value::F64(_) => "FLOAT64",
            Value::Bool(_) => "BOOL",
            Value::String(_) => "STRING",
            Value::Array(_) => "ARRAY",
        }
    }
    /// GGUF's id for the value's type.
    pub fn type_id(&self) -> u32 {
        use value_type::*;
        match self {
            Value::U8(_) => U8,
            Value::I8(_) => I8,
            Value::U16(_) => U16,
            Value::I16(_) => I16,
            Value::U32(_) => U32,
            Value::I32(_) => I32,
            Value::U64(_) => U64,
            Value::I64(_) => I64,
            Value::F32(_) => F32,
            Value::F64(_) => F64,
            Value::Bool(_) => BOOL,
            Value::String(_) => STRING,
            Value::Array(_) => ARRAY,
        }
    }
    /// The value as a signed integer wide enough for every GGUF integer type.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }
}

impl Array {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
        }
    }
    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// GGUF's id for the element type.
    pub fn element_type_id(&self) -> u32 {
        use value_type::*;
        match self {
            Array::U8(_) => U8,
            Array::I8(_) => I8,
            Array::U16(_) => U16,
            Array::I16(_) => I16,
            Array::U32(_) => U32,
            Array::I32(_) => I32,
            Array::U64(_) => U64,
            Array::I64(_) => I64,
            Array::F32(_) => F32,
            Array::F64(_) => F64,
            Array::Bool(_) => BOOL,
            Array::String(_) => STRING,
            Array::Array(_) => ARRAY,
        }
    }
    /// GGUF's name for the element type, for messages.
    pub fn element_type_name(&self) -> &'static str {
        match self {
            Array::U8(_) => "UINT8",
            Array::I8(_) => "INT8",
            Array::U16(_) => "UINT16",
            Array::I16(_) => "INT16",
            Array::U32(_) => "UINT32",
            Array::I32(_) => "INT32",
            Array::U64(_) => "UINT64",
            Array::I64(_) => "INT64",
            Array::F32(_) => "FLOAT32",
            Array::F64(_) => "FLOAT64",
            Array::Bool(_) => "BOOL",
            Array::String(_) => "STRING",
            Array::Array(_) => "ARRAY",
        }
    }
    /// The elements as signed integers, when they are integers.
    pub fn integers(&self) -> Option<Vec<i128>> {
        fn widen<T: Copy + Into<i128>>(values: &[T]) -> Vec<i128> {
            values.iter().map(|&v| v.into()).collect()
        }
        Some(match self {
            Array::U8(v) => widen(v),
            Array::I8(v) => widen(v),
            Array::U16(v) => widen(v),
            Array::I16(v) => widen(v),
            Array::U32(v) => widen(v),
            Array::I32(v) => widen(v),
            Array::U64(v) => widen(v),
            Array::I64(v) => widen(v),
            _ => return None,
        })
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Name, e.g. `blk.3.attn_q.weight`.
    pub name: String,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Dimensions in GGUF order: innermost (the row length) first.
    pub dims: Vec<usize>,
    /// File offset of the first byte of the data (already checked to lie in the file).
    pub offset: usize,
    /// Bytes of data.
    pub size: usize,
}

impl TensorInfo {
    /// Shape in our convention, outermost first (GGUF's dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
    /// Number of elements.
    pub fn element_count(&self) -> usize {
        // Checked not to overflow when the file was opened.
        self.dims.iter().product()
    }
    /// Length of a row: the innermost dimension.
    pub fn row_length(&self) -> usize {
        self.dims[0]
    }
    /// Number of rows: the product of all but the innermost dimension.
    pub fn row_count(&self) -> usize {
        self.dims[1..].iter().product()
    }
}

/// An open GGUF file: parsed metadata and tensor infos, tensor data left in the
/// memory map.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    version: u32,
    metadata: Vec<(String, Value)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl GgufFile {
    /// Maps and parses `path`. Errors name the file and the part that is wrong.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let at_fault = |error: anyhow::Error| anyhow!("{}: {error:#}", path.display());
        let file = File::open(path).map_err(|e| anyhow!("{}: cannot open: {e}", path.display()))?;
        let length = file.metadata().map_err(|e| anyhow!("{}: cannot stat: {e}", path.display()))?.len();
        if length < HEADER_BYTES as u64 {
            return Err(at_fault(anyhow!("file is {length} bytes, too short for a GGUF header")));
        }
        // SAFETY: the map is read-only. Like every reader of mapped model files we
        // assume nobody truncates or rewrites the file while it is open; the parser
        // itself never trusts the contents.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| anyhow!("{}: cannot map: {e}", path.display()))?;
        let parsed = parse(&map).map_err(at_fault)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version: parsed.version,
            metadata_index: parsed.metadata.iter().enumerate().map(|(i, (key, _))| (key.clone(), i)).collect(),
            metadata: parsed.metadata,
            tensor_index: parsed.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect(),
            tensors: parsed.tensors,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Tensor data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// File offset of the data section, which tensor offsets are relative to.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }
    /// Size of the file in bytes.
    pub fn file_size(&self) -> usize {
        self.map.len()
    }
    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }
    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn wrong_type(&self, key: &str, value: &Value, expected: &str) -> anyhow::Error {
        let found = match value {
            Value::Array(array) => format!("an ARRAY of {}", array.element_type_name()),
            other => other.type_name().to_string(),
        };
        anyhow!("{}: metadata key '{key}' is {found}, expected {expected}", self.path.display())
    }

    /// String value of `key` (`None` when absent; an error when not a UTF-8 string).
    pub fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(bytes)) => std::str::from_utf8(bytes)
                .map(Some)
                .map_err(|e| anyhow!("{}: metadata key '{key}' is not UTF-8: {e}", self.path.display())),
            Some(other) => Err(self.wrong_type(key, other, "a STRING")),
        }
    }

    /// Integer value of `key` as `T`, whatever integer type the file uses, when it fits.
    fn integer<T: TryFrom<i128>>(&self, key: &str, type_name: &str) -> Result<Option<T>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let Some(integer) = value.as_integer() else {
            return Err(self.wrong_type(key, value, "an integer"));
        };
        T::try_from(integer).map(Some).map_err(|_| {
            anyhow!("{}: metadata key '{key}' = {integer} does not fit in {type_name}", self.path.display())
        })
    }
    /// Value of `key` as a `u32`, from any integer type.
    pub fn u32(&self, key: &str) -> Result<Option<u32>> {
        self.integer(key, "u32")
    }
    /// Value of `key` as a `u64`, from any integer type.
    pub fn u64(&self, key: &str) -> Result<Option<u64>> {
        self.integer(key, "u64")
    }
    /// Value of `key` as an `i32`, from any integer type.
    pub fn i32(&self, key: &str) -> Result<Option<i32>> {
        self.integer(key, "i32")
    }
    /// Value of `key` as an `f32`, from `FLOAT32` or `FLOAT64`.
    pub fn f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(&Value::F32(v)) => Ok(Some(v)),
            Some(&Value::F64(v)) => Ok(Some(v as f32)),
            Some(other) => Err(self.wrong_type(key, other, "a FLOAT32")),
        }
    }
    /// Value of `key` as a `bool`.
    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(&Value::Bool(v)) => Ok(Some(v)),
            Some(other) => Err(self.wrong_type(key, other, "a BOOL")),
        }
    }
    /// The array value of `key`.
    pub fn array(&self, key: &str) -> Result<Option<&Array>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(array)) => Ok(Some(array)),
            Some(other) => Err(self.wrong_type(key, other, "an ARRAY")),
        }
    }
    /// Array-of-strings value of `key`, each string as stored (bytes).
    pub fn string_array(&self, key: &str) -> Result<Option<&[Vec<u8>]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(Array::String(strings))) => Ok(Some(strings)),
            Some(other) => Err(self.wrong_type(key, other, "an ARRAY of STRING")),
        }
    }
    /// Array-of-floats value of `key` (`FLOAT32`, or `FLOAT64` narrowed).
    pub fn f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(Array::F32(values))) => Ok(Some(values.clone())),
            Some(Value::Array(Array::F64(values))) => Ok(Some(values.iter().map(|&v| v as f32).collect())),
            Some(other) => Err(self.wrong_type(key, other, "an ARRAY of FLOAT32")),
        }
    }
    /// Array-of-integers value of `key` as `i32`, from any integer element type
    /// whose values fit.
    pub fn i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(Array::I32(values))) => Ok(Some(values.clone())),
            Some(value @ Value::Array(array)) => {
                let integers = array.integers().ok_or_else(|| self.wrong_type(key, value, "an ARRAY of INT32"))?;
                integers
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| {
                        i32::try_from(v).map_err(|_| {
                            anyhow!(
                                "{}: metadata key '{key}': element {i} = {v} does not fit in i32",
                                self.path.display()
                            )
                        })
                    })
                    .collect::<Result<Vec<i32>>>()
                    .map(Some)
            }
            Some(other) => Err(self.wrong_type(key, other, "an ARRAY of INT32")),
        }
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    /// Index (into [`GgufFile::tensors`]) of the tensor called `name`.
    pub fn tensor_index(&self, name: &str) -> Option<usize> {
        self.tensor_index.get(name).copied()
    }
    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index(name).map(|i| &self.tensors[i])
    }
    /// The stored bytes of tensor `index` (panics if `index` is out of range,
    /// like slice indexing; the range itself was checked at open).
    pub fn tensor_bytes(&self, index: usize) -> &[u8] {
        let tensor = &self.tensors[index];
        &self.map[tensor.offset..tensor.offset + tensor.size]
    }

    /// Drops the resident pages of tensor `index` (a hint; errors are ignored).
    /// They are read back from the file if the tensor is used again.
    pub fn release_tensor(&self, index: usize) {
        let Some(tensor) = self.tensors.get(index) else {
            return;
        };
        if tensor.size == 0 {
            return;
        }
        #[cfg(unix)]
        {
            // SAFETY: the map is read-only and backed by the file, so DONTNEED only
            // drops clean page-cache references: a later read of the range faults the
            // same bytes back in from the file. No Rust reference observes a change.
            // The range was checked to lie inside the map at open.
            let result = unsafe {
                self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, tensor.offset, tensor.size)
            };
            if let Err(error) = result {
                log::debug!("{}: madvise(DONTNEED) on tensor '{}' failed: {error}", self.path.display(), tensor.name);
            }
        }
    }
}

/// What [`parse`] finds.
struct Parsed {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// A cursor over the file's bytes that refuses to read past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }
    fn take(&mut self, count: usize, what: &str) -> Result<&'a [u8]> {
        if count > self.remaining() {
            bail!(
                "{what}: {count} bytes at offset {} run past the end of the file ({} bytes left)",
                self.position,
                self.remaining()
            );
        }
        let slice = &self.bytes[self.position..self.position + count];
        self.position += count;
        Ok(slice)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let slice = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }
    /// A count of items at least `min_item_bytes` each: checked against the bytes left.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize> {
        let at = self.position;
        let count = self.u64(what)?;
        let fits = (self.remaining() / min_item_bytes.max(1)) as u64;
        if count > fits {
            bail!("{what} = {count} at offset {at}: that many items cannot fit in the {} bytes left", self.remaining());
        }
        Ok(count as usize)
    }
    fn string(&mut self, what: &str) -> Result<&'a [u8]> {
        let at = self.position;
        let length = self.u64(what)?;
        if length > self.remaining() as u64 {
            bail!(
                "{what}: string length {length} at offset {at} runs past the end of the file ({} bytes left)",
                self.remaining()
            );
        }
        self.take(length as usize, what)
    }
}

fn parse(bytes: &[u8]) -> Result<Parsed> {
    let mut reader = Reader { bytes, position: 0 };
    let magic: [u8; 4] = reader.array("magic")?;
    if magic != GGUF_MAGIC {
        bail!("not a GGUF file: it starts with {magic:02X?}, not \"GGUF\"");
    }
    let version = reader.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            bail!("GGUF version 1 is not supported (re-convert the model with a current llama.cpp)")
        }
        _ if matches!(version.swap_bytes(), 2 | 3) => {
            bail!("big-endian GGUF files are not supported")
        }
        _ => bail!("unknown GGUF version {version}"),
    }
    let tensor_count = reader.count(MIN_TENSOR_INFO_BYTES, "tensor count")?;
    let metadata_count = reader.count(MIN_METADATA_BYTES, "metadata count")?;

    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(metadata_count);
    let mut seen_keys = HashMap::with_capacity(metadata_count);
    for entry in 0..metadata_count {
        let location = format!("metadata entry {entry} of {metadata_count}");
        let key = reader.string(&format!("{location}: key"))?;
        let key = std::str::from_utf8(key).with_context(|| format!("{location}: key is not UTF-8"))?.to_string();
        let value_type = reader.u32(&format!("metadata key '{key}': type"))?;
        let value = read_value(&mut reader, value_type, 0).with_context(|| format!("metadata key '{key}'"))?;
        if seen_keys.insert(key.clone(), entry).is_some() {
            bail!("metadata key '{key}' appears twice");
        }
        metadata.push((key, value));
    }

    let alignment = match seen_keys.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(value) => {
            let alignment = value.as_integer().ok_or_else(|| {
                anyhow!("metadata key 'general.alignment' is {}, expected an integer", value.type_name())
            })?;
            if alignment <= 0 || alignment > 1 << 30 || (alignment & (alignment - 1)) != 0 {
                bail!("metadata key 'general.alignment' = {alignment} is not a power of two up to 2^30");
            }
            alignment as u64
        }
    };

    let mut tensors = Vec::with_capacity(tensor_count);
    let mut tensor_names = HashMap::with_capacity(tensor_count);
    let mut relative_offsets = Vec::with_capacity(tensor_count);
    for index in 0..tensor_count {
        let location = format!("tensor info {index} of {tensor_count}");
        let name = reader.string(&format!("{location}: name"))?;
        let name = std::str::from_utf8(name).with_context(|| format!("{location}: name is not UTF-8"))?.to_string();
        let (info, relative_offset) =
            read_tensor_info(&mut reader, name.clone()).with_context(|| format!("tensor '{name}'"))?;
        if tensor_names.insert(name.clone(), index).is_some() {
            bail!("tensor '{name}' appears twice");
        }
        tensors.push(info);
        relative_offsets.push(relative_offset);
    }

    // The data section starts at the next multiple of the alignment.
    let end_of_infos = reader.position as u64;
    let data_offset = end_of_infos.div_ceil(alignment) * alignment;
    let file_size = bytes.len() as u64;
    for (tensor, relative_offset) in tensors.iter_mut().zip(relative_offsets) {
        let name = &tensor.name;
        if !relative_offset.is_multiple_of(alignment) {
            bail!("tensor '{name}': data offset {relative_offset} is not a multiple of the alignment {alignment}");
        }
        let start = data_offset.checked_add(relative_offset);
        let end = start.and_then(|start| start.checked_add(tensor.size as u64));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_size => tensor.offset = start as usize,
            _ => bail!(
                "tensor '{name}': data runs past end of file ({} bytes at data offset {relative_offset}, \
                 data section starts at {data_offset}, file is {file_size} bytes)",
                tensor.size
            ),
        }
    }
    Ok(Parsed { version, metadata, tensors, alignment, data_offset })
}

/// Reads a tensor info after its name; returns it with the data offset relative
/// to the data section (the absolute offset is filled in by the caller).
fn read_tensor_info(reader: &mut Reader, name: String) -> Result<(TensorInfo, u64)> {
    let n_dims = reader.u32("number of dimensions")? as usize;
    if n_dims == 0 || n_dims > MAX_DIMS {
        bail!("{n_dims} dimensions (expected 1 to {MAX_DIMS})");
    }
    let mut dims = Vec::with_capacity(n_dims);
    let mut element_count: u64 = 1;
    for axis in 0..n_dims {
        let dim = reader.u64("dimension")?;
        // ggml stores dims as int64; and each must index a real element.
        if dim == 0 || dim > i64::MAX as u64 {
            bail!("dimension {axis} is {dim}");
        }
        element_count = element_count
            .checked_mul(dim)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| anyhow!("number of elements overflows (dims so far {dims:?}, then {dim})"))?;
        let dim = usize::try_from(dim).map_err(|_| anyhow!("dimension {axis} = {dim} is too big for this machine"))?;
        dims.push(dim);
    }
    let type_id = reader.u32("type")?;
    let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| anyhow!("unknown GGML type id {type_id}"))?;
    let relative_offset = reader.u64("data offset")?;
    let (block_values, block_bytes) = ggml_type.block_layout();
    if !dims[0].is_multiple_of(block_values) {
        bail!("row length {} is not a multiple of the {} block size {block_values}", dims[0], ggml_type.name());
    }
    let size = (element_count / block_values as u64)
        .checked_mul(block_bytes as u64)
        .and_then(|size| usize::try_from(size).ok())
        .ok_or_else(|| anyhow!("data size overflows ({element_count} elements of {})", ggml_type.name()))?;
    Ok((TensorInfo { name, ggml_type, dims, offset: 0, size }, relative_offset))
}

/// Reads `count` fixed-size little-endian elements.
fn read_fixed<T, const N: usize>(reader: &mut Reader, count: usize, decode: impl Fn([u8; N]) -> T) -> Result<Vec<T>> {
    let bytes = reader.take(count * N, "array elements")?;
    Ok(bytes
        .chunks_exact(N)
        .map(|chunk| {
            let mut raw = [0u8; N];
            raw.copy_from_slice(chunk);
            decode(raw)
        })
        .collect())
}

fn read_bool(byte: u8) -> Result<bool> {
    match byte {
        0 => Ok(false),
        1 => Ok(true),
        _ => bail!("BOOL value is {byte}, not 0 or 1"),
    }
}

fn read_value(reader: &mut Reader, value_type: u32, depth: usize) -> Result<Value> {
    use value_type::*;
    Ok(match value_type {
        U8 => Value::U8(reader.array::<1>("value")?[0]),
        I8 => Value::I8(reader.array::<1>("value")?[0] as i8),
        U16 => Value::U16(u16::from_le_bytes(reader.array("value")?)),
        I16 => Value::I16(i16::from_le_bytes(reader.array("value")?)),
        U32 => Value::U32(u32::from_le_bytes(reader.array("value")?)),
        I32 => Value::I32(i32::from_le_bytes(reader.array("value")?)),
        U64 => Value::U64(u64::from_le_bytes(reader.array("value")?)),
        I64 => Value::I64(i64::from_le_bytes(reader.array("value")?)),
        F32 => Value::F32(f32::from_le_bytes(reader.array("value")?)),
        F64 => Value::F64(f64::from_le_bytes(reader.array("value")?)),
        BOOL => Value::Bool(read_bool(reader.array::<1>("value")?[0])?),
        STRING => Value::String(reader.string("value")?.to_vec()),
        ARRAY => Value::Array(read_array(reader, depth + 1)?),
        other => bail!("unknown value type {other}"),
    })
}

fn read_array(reader: &mut Reader, depth: usize) -> Result<Array> {
    use value_type::*;
    if depth > MAX_ARRAY_DEPTH {
        bail!("arrays nested deeper than {MAX_ARRAY_DEPTH}");
    }
    let element_type = reader.u32("array element type")?;
    // Smallest encoding of one element, to bound the count by the bytes left.
    let element_bytes = match element_type {
        U8 | I8 | BOOL => 1,
        U16 | I16 => 2,
        U32 | I32 | F32 => 4,
        U64 | I64 | F64 | STRING => 8,
        ARRAY => 12,
        other => bail!("unknown array element type {other}"),
    };
    let count = reader.count(element_bytes, "array length")?;
    Ok(match element_type {
        U8 => Array::U8(reader.take(count, "array elements")?.to_vec()),
        I8 => Array::I8(read_fixed(reader, count, |b: [u8; 1]| b[0] as i8)?),
        U16 => Array::U16(read_fixed(reader, count, u16::from_le_bytes)?),
        I16 => Array::I16(read_fixed(reader, count, i16::from_le_bytes)?),
        U32 => Array::U32(read_fixed(reader, count, u32::from_le_bytes)?),
        I32 => Array::I32(read_fixed(reader, count, i32::from_le_bytes)?),
        U64 => Array::U64(read_fixed(reader, count, u64::from_le_bytes)?),
        I64 => Array::I64(read_fixed(reader, count, i64::from_le_bytes)?),
        F32 => Array::F32(read_fixed(reader, count, f32::from_le_bytes)?),
        F64 => Array::F64(read_fixed(reader, count, f64::from_le_bytes)?),
        BOOL => Array::Bool(
            reader
                .take(count, "array elements")?
                .iter()
                .enumerate()
                .map(|(i, &b)| read_bool(b).with_context(|| format!("element {i}")))
                .collect::<Result<_>>()?,
        ),
        STRING => {
            let mut strings = Vec::with_capacity(count);
            for i in 0..count {
                strings.push(reader.string(&format!("element {i}"))?.to_vec());
            }
            Array::String(strings)
        }
        _ => {
            let mut arrays = Vec::with_capacity(count);
            for i in 0..count {
                arrays.push(read_array(reader, depth + 1).with_context(|| format!("element {i}"))?);
            }
            Array::Array(arrays)
        }
    })
}
