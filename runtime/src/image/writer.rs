//! Writes images. Tensors stream through in pieces, so a converter never
//! holds more than one chunk of a tensor; the file appears under its name only
//! when [`ImageWriter::finish`] has written and synced everything.

use super::layout::*;
use crate::error::{Error, ErrorKind, Result};
use crate::quant::Encoding;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The tensor being written.
struct OpenTensor {
    entry: TensorEntry,
    written: u64,
    hasher: crc32fast::Hasher,
}

/// Writes an image to a temporary file beside its destination, then renames it.
pub struct ImageWriter {
    destination: PathBuf,
    temporary: PathBuf,
    out: Option<BufWriter<File>>,
    position: u64,
    sections: Vec<SectionEntry>,
    tensors: Vec<TensorEntry>,
    tensor_data_start: Option<u64>,
    open_tensor: Option<OpenTensor>,
    renamed: bool,
}

fn io_error(path: &Path, error: std::io::Error) -> Error {
    Error::new(ErrorKind::Io, format!("{}: {error}", path.display()))
}

impl ImageWriter {
    /// Starts writing an image that will be called `destination`.
    pub fn create(destination: &Path) -> Result<Self> {
        let file_name = destination
            .file_name()
            .ok_or_else(|| Error::invalid(format!("{}: not a file name", destination.display())))?;
        let temporary =
            destination.with_file_name(format!(".{}.{}.tmp", file_name.to_string_lossy(), std::process::id()));
        let file = File::create(&temporary).map_err(|e| io_error(&temporary, e))?;
        let mut writer = Self {
            destination: destination.to_path_buf(),
            temporary,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            position: 0,
            sections: Vec::new(),
            tensors: Vec::new(),
            tensor_data_start: None,
            open_tensor: None,
            renamed: false,
        };
        // The header is written last, once the section table is known.
        writer.write_raw(&[0u8; 64])?;
        Ok(writer)
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let out = self.out.as_mut().expect("writer is open until finish");
        out.write_all(bytes).map_err(|e| io_error(&self.temporary, e))?;
        self.position += bytes.len() as u64;
        Ok(())
    }

    fn pad_to_alignment(&mut self) -> Result<()> {
        let padding = align_up(self.position) - self.position;
        self.write_raw(&[0u8; ALIGNMENT as usize][..padding as usize])
    }

    fn push_section(&mut self, name: &str, offset: u64, size: u64, checksum: u32, flags: u32) -> Result<()> {
        if self.sections.iter().any(|s| read_fixed_name(&s.name) == Some(name)) {
            return Err(Error::invalid(format!("section {name} written twice")));
        }
        let name_field = fixed_name::<32>(name)
            .ok_or_else(|| Error::invalid(format!("section name {name:?} is not ASCII of at most 31 bytes")))?;
        self.sections.push(SectionEntry { name: name_field, offset, size, checksum, flags, reserved: 0 });
        Ok(())
    }

    /// Adds a whole section. `required` sections make readers that do not know them refuse the file.
    pub fn add_section(&mut self, name: &str, bytes: &[u8], required: bool) -> Result<()> {
        if self.tensor_data_start.is_some() && self.open_tensor.is_some() {
            return Err(Error::invalid("a section cannot be added while a tensor is open"));
        }
        self.pad_to_alignment()?;
        let offset = self.position;
        self.write_raw(bytes)?;
        let flags = if required { SECTION_REQUIRED } else { 0 };
        self.push_section(name, offset, bytes.len() as u64, crc32fast::hash(bytes), flags)
    }

    /// Starts a tensor; its bytes follow through [`write_tensor_data`](Self::write_tensor_data).
    pub fn begin_tensor(&mut self, name: &str, encoding: Encoding, shape: &[usize]) -> Result<()> {
        if self.open_tensor.is_some() {
            return Err(Error::invalid(format!("tensor {name} begun before the previous one ended")));
        }
        if shape.is_empty() || shape.len() > 4 {
            return Err(Error::invalid(format!("tensor {name}: {} dimensions", shape.len())));
        }
        let cols = *shape.last().unwrap();
        if encoding.is_blocked() && !cols.is_multiple_of(crate::quant::GROUP) {
            return Err(Error::invalid(format!(
                "tensor {name}: rows of {cols} values cannot be {} blocks of {}",
                encoding.name(),
                crate::quant::GROUP
            )));
        }
        let name_field = fixed_name::<56>(name)
            .ok_or_else(|| Error::invalid(format!("tensor name {name:?} is not ASCII of at most 55 bytes")))?;
        if self.tensors.iter().any(|t| t.name == name_field) {
            return Err(Error::invalid(format!("tensor {name} written twice")));
        }
        self.pad_to_alignment()?;
        let data_start = *self.tensor_data_start.get_or_insert(self.position);
        let mut dims = [0u64; 4];
        for (d, &s) in dims.iter_mut().zip(shape) {
            *d = s as u64;
        }
        let values: usize = shape.iter().product();
        let entry = TensorEntry {
            name: name_field,
            encoding: encoding.id(),
            n_dims: shape.len() as u32,
            shape: dims,
            offset: self.position - data_start,
            size: encoding.bytes_for(values) as u64,
            checksum: 0,
            reserved: [0; 3],
        };
        self.open_tensor = Some(OpenTensor { entry, written: 0, hasher: crc32fast::Hasher::new() });
        Ok(())
    }

    /// Appends bytes of the open tensor.
    pub fn write_tensor_data(&mut self, bytes: &[u8]) -> Result<()> {
        let tensor =
            self.open_tensor.as_mut().ok_or_else(|| Error::invalid("tensor data written with no tensor begun"))?;
        tensor.written += bytes.len() as u64;
        if tensor.written > tensor.entry.size {
            let name = read_fixed_name(&tensor.entry.name).unwrap_or("?").to_string();
            return Err(Error::invalid(format!("tensor {name}: more than its {} bytes written", tensor.entry.size)));
        }
        tensor.hasher.update(bytes);
        self.write_raw(bytes)
    }

    /// Ends the open tensor, checking that all of its bytes were written.
    pub fn end_tensor(&mut self) -> Result<()> {
        let tensor = self.open_tensor.take().ok_or_else(|| Error::invalid("end_tensor with no tensor begun"))?;
        let mut entry = tensor.entry;
        if tensor.written != entry.size {
            let name = read_fixed_name(&entry.name).unwrap_or("?");
            return Err(Error::invalid(format!(
                "tensor {name}: {} of its {} bytes written",
                tensor.written, entry.size
            )));
        }
        entry.checksum = tensor.hasher.finalize();
        self.tensors.push(entry);
        Ok(())
    }

    /// Writes a whole tensor at once.
    pub fn add_tensor(&mut self, name: &str, encoding: Encoding, shape: &[usize], bytes: &[u8]) -> Result<()> {
        self.begin_tensor(name, encoding, shape)?;
        self.write_tensor_data(bytes)?;
        self.end_tensor()
    }

    /// Writes the tensor index, the section table and the header, syncs, and
    /// renames the file into place. Returns the image's size in bytes.
    pub fn finish(mut self) -> Result<u64> {
        if self.open_tensor.is_some() {
            return Err(Error::invalid("finish with a tensor still open"));
        }
        // tensor_data: everything from the first tensor to the end of the last.
        let data_start = self.tensor_data_start.unwrap_or_else(|| align_up(self.position));
        self.pad_to_alignment()?;
        let data_size = self.tensors.iter().map(|t| t.offset + t.size).max().unwrap_or(0);
        self.push_section(section::TENSOR_DATA, data_start, data_size, 0, SECTION_REQUIRED | SECTION_PER_TENSOR)?;
        let index: Vec<u8> = bytemuck::cast_slice(&self.tensors).to_vec();
        self.add_section(section::TENSOR_INDEX, &index, true)?;

        self.pad_to_alignment()?;
        let table_offset = self.position;
        let table: Vec<u8> = bytemuck::cast_slice(&self.sections).to_vec();
        self.write_raw(&table)?;
        let file_size = self.position;

        let mut header = Header {
            magic: MAGIC,
            format_version: FORMAT_VERSION,
            layout_version: LAYOUT_VERSION,
            section_count: self.sections.len() as u32,
            flags: 0,
            section_table_offset: table_offset,
            file_size,
            reserved: [0; 20],
            header_checksum: 0,
        };
        header.header_checksum = crc32fast::hash(&bytemuck::bytes_of(&header)[..60]);

        let mut out = self.out.take().expect("writer is open until finish");
        let temporary = self.temporary.clone();
        out.seek(SeekFrom::Start(0)).map_err(|e| io_error(&temporary, e))?;
        out.write_all(bytemuck::bytes_of(&header)).map_err(|e| io_error(&temporary, e))?;
        let file = out.into_inner().map_err(|e| io_error(&temporary, e.into_error()))?;
        file.sync_all().map_err(|e| io_error(&temporary, e))?;
        drop(file);
        std::fs::rename(&temporary, &self.destination).map_err(|e| io_error(&self.destination, e))?;
        self.renamed = true;
        Ok(file_size)
    }
}

impl Drop for ImageWriter {
    /// An unfinished image leaves nothing behind.
    fn drop(&mut self) {
        drop(self.out.take());
        if !self.renamed {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}
