//! Reads an .emoe file through a memory map. `open` validates the whole structure and the
//! non-expert region's checksum; each expert block's checksum is verified the first time any of
//! its bytes are handed out, and the verdict cached.

use super::format::{parse_header, Header};
use super::{EmoeDtype, ExpertBlockEntry};
use crate::error::{Error, Result};
use crate::model::buf::{Buf, HalfKind, Plain, SharedMap};
use crate::model::config::ModelConfig;
use crate::model::weights::{Stored, StoredBlock, TensorSource};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::OnceLock;

pub struct EmoeFile {
    path: PathBuf,
    map: SharedMap,
    header: Header,
    /// Per block, its computed CRC-32C once somebody has read it.
    block_crcs: Vec<OnceLock<u32>>,
}

/// A tensor's bytes inside the map (little-endian, 64-byte aligned).
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub dtype: EmoeDtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl<'a> TensorView<'a> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A floating-point tensor (F32, F16, BF16) converted to f32; `None` for integer dtypes.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let b = self.bytes;
        Some(match self.dtype {
            EmoeDtype::F32 => crate::model::convert::f32s(b),
            EmoeDtype::F16 => crate::model::convert::f16s(b),
            EmoeDtype::BF16 => crate::model::convert::bf16s(b),
            EmoeDtype::I8 | EmoeDtype::I32 | EmoeDtype::U8 => return None,
        })
    }

    /// An I8 tensor's values, without copying.
    pub fn as_i8(&self) -> Option<&'a [i8]> {
        if self.dtype != EmoeDtype::I8 {
            return None;
        }
        // SAFETY: i8 and u8 have the same size and alignment and every bit pattern is valid for
        // both; the new slice covers exactly the old one and borrows it for the same lifetime.
        Some(unsafe {
            std::slice::from_raw_parts(self.bytes.as_ptr().cast::<i8>(), self.bytes.len())
        })
    }

    /// An F32 tensor's values without copying, where the bytes are aligned for f32 (always in a
    /// mapped .emoe: the map is page-aligned and tensors 64-byte aligned) and the host is
    /// little-endian; `None` otherwise (use [`TensorView::to_f32`]).
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        if self.dtype != EmoeDtype::F32 || cfg!(target_endian = "big") {
            return None;
        }
        // SAFETY: every bit pattern is a valid f32; align_to only returns a middle part that is
        // properly aligned, and we use it only when it covers all the bytes.
        let (head, mid, tail) = unsafe { self.bytes.align_to::<f32>() };
        (head.is_empty() && tail.is_empty()).then_some(mid)
    }
}

impl EmoeFile {
    /// Maps the file and validates every offset, length and the non-expert region's checksum.
    pub fn open(path: &Path) -> Result<EmoeFile> {
        // Mapping a directory or a device fails as "No such device (os error 19)", and opening
        // a FIFO blocks: say what is wrong instead, before opening.
        if let Some(what) = crate::model::buf::not_mappable(path) {
            return Err(Error::Emoe {
                path: path.to_path_buf(),
                reason: what.into(),
            });
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and lives as long as `self`; every slice handed out is
        // bounds-checked against it. A file rewritten underneath a running process is outside
        // what we can defend (the writer renames a new file into place instead).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = parse_header(&map).map_err(|reason| Error::Emoe {
            path: path.to_path_buf(),
            reason,
        })?;
        let block_crcs = header.blocks.iter().map(|_| OnceLock::new()).collect();
        let f = EmoeFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
            header,
            block_crcs,
        };
        // Most of a large vocabulary's embedding rows are never read: the check does not keep
        // the region's pages resident.
        f.verify_data_region()?;
        Ok(f)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn config(&self) -> &ModelConfig {
        &self.header.config
    }

    pub fn tokenizer_json(&self) -> &str {
        &self.header.tokenizer_json
    }

    /// The chat template the store was written with, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.header.chat_template.as_deref()
    }

    pub fn quant(&self) -> &serde_json::Value {
        &self.header.quant
    }

    pub fn has(&self, name: &str) -> bool {
        self.header.get(name).is_some()
    }

    pub fn expert_blocks(&self) -> &[ExpertBlockEntry] {
        &self.header.blocks
    }

    /// A tensor's bytes; an expert tensor's block checksum is verified on first access.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let t = self.header.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        if let Some(block) = t.block {
            self.verify_block(block)?;
        }
        Ok(TensorView {
            dtype: t.dtype,
            shape: &t.shape,
            bytes: self.slice(t.offset, t.len)?,
        })
    }

    /// All bytes of one expert's block (its tensors and the padding between them), verified.
    pub fn block_bytes(&self, layer: usize, expert: usize) -> Result<&[u8]> {
        let i = self.header.block_index(layer, expert).ok_or_else(|| {
            Error::invalid(format!(
                "{}: has no expert block (layer {layer}, expert {expert})",
                self.path.display()
            ))
        })?;
        self.verify_block(i)?;
        let b = &self.header.blocks[i];
        self.slice(b.offset, b.len)
    }

    /// Verifies every expert block now (reads the whole file); stops at the first bad one.
    pub fn verify_all(&self) -> Result<()> {
        (0..self.header.blocks.len()).try_for_each(|i| self.verify_block(i))
    }

    fn verify_data_region(&self) -> Result<()> {
        let d = self.header.data;
        // In chunks, each chunk's pages given back once summed: the pass never holds more than
        // a chunk of the region resident (kernels map pages in again as they read them).
        const CHUNK: usize = 8 << 20;
        let bytes = self.slice(d.offset, d.len)?;
        let mut computed = 0;
        for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
            computed = crc32c::crc32c_append(computed, chunk);
            crate::model::buf::release_pages(&self.map, d.offset as usize + i * CHUNK, chunk.len());
        }
        if computed != d.crc32c {
            return Err(self.corrupt(format!(
                "non-expert data region at offset {}: checksum mismatch (stored crc32c {:#010x}, computed {computed:#010x}): the file is corrupt",
                d.offset, d.crc32c
            )));
        }
        Ok(())
    }

    fn verify_block(&self, i: usize) -> Result<()> {
        let (Some(b), Some(verdict)) = (self.header.blocks.get(i), self.block_crcs.get(i)) else {
            return Err(self.corrupt(format!("no expert block {i}")));
        };
        let bytes = self.slice(b.offset, b.len)?;
        let computed = *verdict.get_or_init(|| crc32c::crc32c(bytes));
        if computed != b.crc32c {
            return Err(self.corrupt(format!(
                "expert block (layer {}, expert {}) at offset {}: checksum mismatch (stored crc32c {:#010x}, computed {computed:#010x}): the file is corrupt",
                b.layer, b.expert, b.offset, b.crc32c
            )));
        }
        Ok(())
    }

    /// `len` bytes at `offset`, bounds-checked (parse_header already proved them in range).
    fn slice(&self, offset: u64, len: u64) -> Result<&[u8]> {
        let range = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(o, l)| Some(o..o.checked_add(l)?));
        range
            .and_then(|r| self.map.get(r))
            .ok_or_else(|| self.corrupt(format!("bytes [{offset}, +{len}) lie outside the file")))
    }

    fn corrupt(&self, reason: String) -> Error {
        Error::Emoe {
            path: self.path.clone(),
            reason,
        }
    }
}

impl TensorSource for EmoeFile {
    fn has(&self, name: &str) -> bool {
        EmoeFile::has(self, name)
    }

    /// In place from the map (every tensor is 64-byte aligned); expert tensors are not read
    /// here: their block is verified when the expert first runs ([`Self::expert_block`]).
    fn stored(&self, name: &str, shape: &[usize], why: &str) -> Result<Stored> {
        let t = self.header.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        if t.shape != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: t.shape.clone(),
                why: format!("from the .emoe config {why}"),
            });
        }
        let numel = t.shape.iter().product();
        // parse_header proved offset + len inside the file, so both fit in usize.
        let offset = t.offset as usize;
        Ok(match t.dtype {
            EmoeDtype::F32 => Stored::F32(self.in_place(name, offset, numel)?),
            EmoeDtype::F16 => Stored::Half(HalfKind::F16, self.in_place(name, offset, numel)?),
            EmoeDtype::BF16 => Stored::Half(HalfKind::Bf16, self.in_place(name, offset, numel)?),
            EmoeDtype::I8 => Stored::I8(self.in_place(name, offset, numel)?),
            EmoeDtype::I32 => Stored::I32(self.in_place(name, offset, numel)?),
            EmoeDtype::U8 => Stored::U8(self.in_place(name, offset, numel)?),
        })
    }

    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.header.get(name).map(|t| t.shape.clone())
    }

    fn expert_block(&self, layer: usize, expert: usize) -> Option<Arc<StoredBlock>> {
        let b = &self.header.blocks[self.header.block_index(layer, expert)?];
        let what = format!(
            "expert block (layer {}, expert {}) at offset {}",
            b.layer, b.expert, b.offset
        );
        let range = (b.offset as usize, b.len as usize);
        Some(Arc::new(StoredBlock::new(
            &self.path,
            self.map.clone(),
            range,
            b.crc32c,
            what,
        )))
    }
}

impl EmoeFile {
    /// `numel` values at `offset`, in place; parse_header proved the range inside the file and
    /// 64-byte aligned.
    fn in_place<T: Plain>(&self, name: &str, offset: usize, numel: usize) -> Result<Buf<T>> {
        Buf::mapped(&self.map, offset, numel).ok_or_else(|| {
            self.corrupt(format!(
                "tensor `{name}` cannot be used in place (misaligned, or a big-endian host)"
            ))
        })
    }
}
