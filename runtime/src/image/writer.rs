//! Writes images. Tensors stream through in pieces, so a converter never
//! holds more than one chunk of a tensor; the file appears under its name only
//! when [`ImageWriter::finish`] has written and synced everything.
//! [`ImageWriter::rewrite`] copies an image with some sections set, the one
//! way the tools add calibration sections to a converted image.

use super::layout::*;
use super::{ModelImage, TensorInfo};
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
        if !cols.is_multiple_of(encoding.block_values()) {
            return Err(Error::invalid(format!(
                "tensor {name}: rows of {cols} values cannot be {} blocks of {}",
                encoding.name(),
                encoding.block_values()
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
        // Rows of `cols` values (Q4B stores a scale a row before its blocks).
        let cols = shape.last().copied().unwrap_or(1).max(1);
        let entry = TensorEntry {
            name: name_field,
            encoding: encoding.id(),
            n_dims: shape.len() as u32,
            shape: dims,
            offset: self.position - data_start,
            size: encoding.tensor_bytes(values / cols, cols) as u64,
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

impl ImageWriter {
    /// Writes a copy of `image` to `destination` with each of `sections`
    /// (name, bytes) set: replacing the image's section of that name, or
    /// added. `tensor` may give a tensor a new encoding and bytes (`None`
    /// copies it byte for byte); the tensors keep their order and shapes.
    /// Returns the new image's size in bytes.
    ///
    /// Section order, the one rule of every rewrite: the image's other
    /// sections keep their order and their side of the tensors (those before
    /// the tensor data, such as `config`, `tokenizer` and `chat_template`,
    /// stay before it, so a reader's first pages still hold what it parses
    /// at open; those after it, such as `source` and the calibration
    /// sections, stay after); the given sections come last, after every
    /// other, in the order given. They are written optional: a reader that
    /// does not know them skips them. Every copied section keeps its bytes
    /// and its required flag.
    pub fn rewrite(
        image: &ModelImage,
        destination: &Path,
        sections: &[(&str, &[u8])],
        mut tensor: impl FnMut(&TensorInfo, &[u8]) -> Option<(Encoding, Vec<u8>)>,
    ) -> Result<u64> {
        let data_offset = image
            .sections()
            .iter()
            .find(|s| s.name == section::TENSOR_DATA)
            .map(|s| s.offset)
            .ok_or_else(|| Error::corrupt(format!("{}: section tensor_data is missing", image.path().display())))?;
        // The writer makes the tensor index and data itself; the given sections are written last.
        let copied = |s: &&super::SectionInfo| {
            s.name != section::TENSOR_INDEX
                && s.name != section::TENSOR_DATA
                && !sections.iter().any(|(name, _)| *name == s.name)
        };
        let (before, after): (Vec<_>, Vec<_>) =
            image.sections().iter().filter(copied).partition(|s| s.offset < data_offset);
        let mut writer = Self::create(destination)?;
        for s in before {
            writer.add_section(&s.name, image.section(&s.name).expect("a listed section"), s.required)?;
        }
        for t in image.tensors() {
            let bytes = image.tensor_bytes(t);
            match tensor(t, bytes) {
                Some((encoding, bytes)) => writer.add_tensor(&t.name, encoding, &t.shape, &bytes)?,
                None => writer.add_tensor(&t.name, t.encoding, &t.shape, bytes)?,
            }
        }
        for s in after {
            writer.add_section(&s.name, image.section(&s.name).expect("a listed section"), s.required)?;
        }
        for (name, bytes) in sections {
            writer.add_section(name, bytes, false)?;
        }
        writer.finish()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ARCH_LLAMA;
    use crate::image::encode_vocab;
    use crate::tokenizer::synthetic::sentencepiece_vocab;
    use crate::ModelConfig;
    use bytemuck::Zeroable;

    const DIM: usize = 32;

    /// An image laid out as a converted and then calibrated one is: small
    /// sections, the tensors, then `source` and a calibration section.
    fn write_calibrated_image(path: &Path) {
        let vocab = sentencepiece_vocab();
        let mut config = ModelConfig::zeroed();
        config.arch = ARCH_LLAMA;
        (config.dim, config.n_layers, config.n_heads, config.n_kv_heads) = (DIM as u32, 1, 2, 1);
        (config.head_dim, config.rope_dim, config.ffn_dim) = (16, 16, 64);
        (config.vocab_size, config.context_length, config.tied_output) = (vocab.len() as u32, 16, 1);
        (config.rope_theta, config.norm_eps) = (10000.0, 1e-5);
        let values = |n: usize| -> Vec<u8> {
            let floats: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
            bytemuck::cast_slice(&floats).to_vec()
        };
        let mut writer = ImageWriter::create(path).unwrap();
        writer.add_section(section::CONFIG, bytemuck::bytes_of(&config), true).unwrap();
        writer.add_section(section::TOKENIZER, &encode_vocab(&vocab).unwrap(), true).unwrap();
        writer.add_section(section::CHAT_TEMPLATE, b"{{ messages }}", false).unwrap();
        writer.add_tensor("token_embd.weight", Encoding::F32, &[vocab.len(), DIM], &values(vocab.len() * DIM)).unwrap();
        writer.add_tensor("output_norm.weight", Encoding::F32, &[DIM], &values(DIM)).unwrap();
        writer.add_section(section::SOURCE, br#"{"from": "a test"}"#, false).unwrap();
        writer.add_section("rsparse", b"the first plan", false).unwrap();
        writer.finish().unwrap();
    }

    /// Section names in the order their bytes lie in the file.
    fn names_by_offset(image: &ModelImage) -> Vec<String> {
        let mut sections = image.sections().to_vec();
        sections.sort_by_key(|s| s.offset);
        sections.into_iter().map(|s| s.name).collect()
    }

    #[test]
    fn rewrite_replaces_and_adds_sections_and_copies_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (original_path, rewritten_path) = (dir.path().join("a.bramble"), dir.path().join("b.bramble"));
        write_calibrated_image(&original_path);
        let original = ModelImage::open(&original_path).unwrap();
        let norm_f16: Vec<u8> = (0..DIM).flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes()).collect();
        let new_sections: [(&str, &[u8]); 2] = [("rsparse", b"the second plan"), ("bias", b"a constraint")];
        ImageWriter::rewrite(&original, &rewritten_path, &new_sections, |tensor, _| {
            (tensor.name == "output_norm.weight").then(|| (Encoding::F16, norm_f16.clone()))
        })
        .unwrap();

        let rewritten = ModelImage::open(&rewritten_path).unwrap();
        assert_eq!(
            names_by_offset(&rewritten),
            ["config", "tokenizer", "chat_template", "tensor_data", "source", "rsparse", "bias", "tensor_index"]
        );
        for name in [section::CONFIG, section::TOKENIZER, section::CHAT_TEMPLATE, section::SOURCE] {
            assert_eq!(rewritten.section(name), original.section(name), "section {name}");
            let required = |image: &ModelImage| image.sections().iter().find(|s| s.name == name).unwrap().required;
            assert_eq!(required(&rewritten), required(&original), "section {name}");
        }
        assert_eq!(rewritten.section("rsparse"), Some(&b"the second plan"[..]));
        assert_eq!(rewritten.section("bias"), Some(&b"a constraint"[..]));
        let embedding = |image: &ModelImage| image.tensor_bytes(image.tensor("token_embd.weight").unwrap()).to_vec();
        assert_eq!(embedding(&rewritten), embedding(&original));
        let norm = rewritten.tensor("output_norm.weight").unwrap();
        assert_eq!((norm.encoding, norm.shape.as_slice()), (Encoding::F16, &[DIM][..]));
        assert_eq!(rewritten.tensor_bytes(norm), norm_f16.as_slice());
    }

    #[test]
    fn rewriting_with_nothing_to_change_gives_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let (original_path, copy_path) = (dir.path().join("a.bramble"), dir.path().join("b.bramble"));
        write_calibrated_image(&original_path);
        let original = ModelImage::open(&original_path).unwrap();
        ImageWriter::rewrite(&original, &copy_path, &[], |_, _| None).unwrap();
        assert!(std::fs::read(&copy_path).unwrap() == std::fs::read(&original_path).unwrap());
    }
}
