//! Writes an .emoe file: lays the tensors out (data region, then one aligned block per expert),
//! checksums each region, writes `PATH.tmp` and renames it over `PATH`, so a reader never sees a
//! half-written file.

use super::format::{data_start_after, DataRegion, ExpertBlockEntry, HeaderJson, TensorEntry};
use super::{
    align_up, ClassTally, EmoeDtype, TensorData, BLOCK_ALIGN, MAGIC, TENSOR_ALIGN, VERSION,
    VERSION_WITHOUT_INT4,
};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use serde::Serialize;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Collects a model's tensors, then writes them as one .emoe file.
pub struct EmoeWriter<'a> {
    config: ModelConfig,
    tokenizer_json: String,
    chat_template: Option<String>,
    quant: Value,
    tensors: Vec<TensorData<'a>>,
    blocks: Vec<PendingBlock<'a>>,
}

struct PendingBlock<'a> {
    layer: usize,
    expert: usize,
    tensors: Vec<TensorData<'a>>,
}

/// What [`EmoeWriter::write`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct WriteSummary {
    pub path: PathBuf,
    pub total_bytes: u64,
    pub tensors: usize,
    pub expert_blocks: usize,
    pub classes: ClassTally,
}

/// Offsets relative to the start of the data region (itself [`BLOCK_ALIGN`]-aligned, so relative
/// alignment is absolute alignment), and the checksums, which do not depend on where it starts.
struct Plan {
    data_offsets: Vec<u64>,
    data_len: u64,
    data_crc: u32,
    blocks: Vec<BlockPlan>,
}

struct BlockPlan {
    offset: u64,
    len: u64,
    /// Relative to the block's start.
    tensor_offsets: Vec<u64>,
    crc: u32,
}

type Sink<'s> = dyn FnMut(&[u8]) -> std::io::Result<()> + 's;

impl<'a> EmoeWriter<'a> {
    pub fn new(config: &ModelConfig, tokenizer_json: String, quant: Value) -> Self {
        EmoeWriter {
            config: config.clone(),
            tokenizer_json,
            chat_template: None,
            quant,
            tensors: Vec::new(),
            blocks: Vec::new(),
        }
    }

    /// Keeps the checkpoint's chat template in the header, so a served store renders chats.
    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.chat_template = template;
    }

    /// A non-expert tensor (embeddings, attention, norms, router, head, …).
    pub fn add_tensor(&mut self, t: TensorData<'a>) {
        self.tensors.push(t);
    }

    /// All tensors of expert `expert` of layer `layer`, stored as one contiguous block.
    pub fn add_expert_block(&mut self, layer: usize, expert: usize, tensors: Vec<TensorData<'a>>) {
        self.blocks.push(PendingBlock {
            layer,
            expert,
            tensors,
        });
    }

    /// Writes `path` atomically (via `path.tmp`). Checks names, sizes and block keys first.
    pub fn write(self, path: &Path) -> Result<WriteSummary> {
        self.validate(path)?;
        let overflow = || Error::invalid(format!("{}: layout overflows u64", path.display()));
        let plan = self.plan().ok_or_else(overflow)?;
        let (json, data_start) = self.header_with_fixed_point(&plan, path)?;
        let tmp = tmp_path(path);
        let written = self.write_to(&tmp, &plan, &json, data_start);
        let total_bytes = match written {
            Ok(n) => n,
            Err(e) => {
                // Best effort: the error that matters is the write's.
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::io(&tmp, e));
            }
        };
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        Ok(WriteSummary {
            path: path.to_path_buf(),
            total_bytes,
            tensors: self.tensors.len()
                + self.blocks.iter().map(|b| b.tensors.len()).sum::<usize>(),
            expert_blocks: self.blocks.len(),
            classes: self.tally(),
        })
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::invalid(format!("{}: {reason}", path.display()));
        let mut names = HashSet::new();
        let all = self
            .tensors
            .iter()
            .chain(self.blocks.iter().flat_map(|b| &b.tensors));
        for t in all {
            if !names.insert(t.name.as_str()) {
                return Err(bad(format!("duplicate tensor name `{}`", t.name)));
            }
            let need = t
                .shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .and_then(|n| n.checked_mul(t.dtype.size()));
            if need != Some(t.bytes.len()) {
                return Err(bad(format!(
                    "tensor `{}` has {} bytes, but {:?} {:?} needs {need:?}",
                    t.name,
                    t.bytes.len(),
                    t.dtype,
                    t.shape
                )));
            }
        }
        let mut experts = HashSet::new();
        for b in &self.blocks {
            let what = format!("expert block (layer {}, expert {})", b.layer, b.expert);
            if b.layer >= self.config.num_layers || b.expert >= self.config.num_experts {
                return Err(bad(format!(
                    "{what} is out of range for a model of {} layers and {} experts",
                    self.config.num_layers, self.config.num_experts
                )));
            }
            if !experts.insert((b.layer, b.expert)) {
                return Err(bad(format!("duplicate {what}")));
            }
            if b.tensors.is_empty() {
                return Err(bad(format!("{what} has no tensors")));
            }
        }
        Ok(())
    }

    fn plan(&self) -> Option<Plan> {
        let (data_offsets, data_len) = pack(&self.tensors)?;
        let data_crc = crc_of(&data_offsets, &self.tensors);
        let mut cursor = data_len;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let offset = align_up(cursor, BLOCK_ALIGN)?;
            let (tensor_offsets, len) = pack(&b.tensors)?;
            let crc = crc_of(&tensor_offsets, &b.tensors);
            cursor = offset.checked_add(len)?;
            blocks.push(BlockPlan {
                offset,
                len,
                tensor_offsets,
                crc,
            });
        }
        Some(Plan {
            data_offsets,
            data_len,
            data_crc,
            blocks,
        })
    }

    /// The header's offsets depend on where the data starts, which depends on the header's
    /// length: grow the start until the header fits before it (two or three rounds).
    fn header_with_fixed_point(&self, plan: &Plan, path: &Path) -> Result<(Vec<u8>, u64)> {
        let mut data_start = BLOCK_ALIGN;
        for _ in 0..16 {
            let json = self.header_json(plan, data_start).map_err(|e| {
                Error::invalid(format!("{}: cannot encode the header: {e}", path.display()))
            })?;
            let need = data_start_after(json.len() as u64).unwrap_or(u64::MAX);
            if need <= data_start {
                return Ok((json, data_start));
            }
            data_start = need;
        }
        Err(Error::invalid(format!(
            "{}: header layout did not converge",
            path.display()
        )))
    }

    fn header_json(&self, plan: &Plan, data_start: u64) -> serde_json::Result<Vec<u8>> {
        let mut tensors = Vec::new();
        for (t, &off) in self.tensors.iter().zip(&plan.data_offsets) {
            tensors.push(entry(t, data_start + off, None));
        }
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (i, (b, p)) in self.blocks.iter().zip(&plan.blocks).enumerate() {
            let start = data_start + p.offset;
            for (t, &off) in b.tensors.iter().zip(&p.tensor_offsets) {
                tensors.push(entry(t, start + off, Some(i)));
            }
            blocks.push(ExpertBlockEntry {
                layer: b.layer,
                expert: b.expert,
                offset: start,
                len: p.len,
                crc32c: p.crc,
                tensors: Vec::new(),
            });
        }
        serde_json::to_vec(&HeaderJson {
            config: Cow::Borrowed(&self.config),
            tokenizer_json: Cow::Borrowed(&self.tokenizer_json),
            chat_template: self.chat_template.as_deref().map(Cow::Borrowed),
            quant: Cow::Borrowed(&self.quant),
            data: DataRegion {
                offset: data_start,
                len: plan.data_len,
                crc32c: plan.data_crc,
            },
            tensors,
            blocks,
        })
    }

    /// Writes the whole file; returns its length.
    fn write_to(
        &self,
        tmp: &Path,
        plan: &Plan,
        json: &[u8],
        data_start: u64,
    ) -> std::io::Result<u64> {
        let mut out = Counted {
            w: BufWriter::with_capacity(1 << 20, File::create(tmp)?),
            pos: 0,
        };
        out.put(&MAGIC)?;
        out.put(&self.version().to_le_bytes())?;
        out.put(&(json.len() as u64).to_le_bytes())?;
        out.put(&crc32c::crc32c(json).to_le_bytes())?;
        out.put(json)?;
        out.pad_to(data_start)?;
        emit(&plan.data_offsets, &self.tensors, &mut |b| out.put(b))?;
        for (b, p) in self.blocks.iter().zip(&plan.blocks) {
            out.pad_to(data_start + p.offset)?;
            emit(&p.tensor_offsets, &b.tensors, &mut |bytes| out.put(bytes))?;
        }
        let total = out.pos;
        let file = out.w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(total)
    }

    /// The oldest version that holds every tensor: files without int4 stay readable by
    /// builds that know only version 3.
    fn version(&self) -> u32 {
        let blocks = self.blocks.iter().flat_map(|b| &b.tensors);
        if self
            .tensors
            .iter()
            .chain(blocks)
            .any(|t| t.dtype == EmoeDtype::U8)
        {
            VERSION
        } else {
            VERSION_WITHOUT_INT4
        }
    }

    fn tally(&self) -> ClassTally {
        let mut tally = ClassTally::default();
        let blocks = self.blocks.iter().flat_map(|b| &b.tensors);
        let all = self
            .tensors
            .iter()
            .map(|t| (t, false))
            .chain(blocks.map(|t| (t, true)));
        for (t, in_block) in all {
            let numel = t.shape.iter().map(|&d| d as u64).product();
            tally.add(&t.name, t.dtype, numel, t.bytes.len() as u64, in_block);
        }
        tally
    }
}

fn entry(t: &TensorData, offset: u64, block: Option<usize>) -> TensorEntry {
    TensorEntry {
        name: t.name.clone(),
        dtype: t.dtype,
        shape: t.shape.clone(),
        offset,
        len: t.bytes.len() as u64,
        block,
    }
}

/// Packs tensors from offset 0, each [`TENSOR_ALIGN`]-aligned; returns the offsets and the end.
fn pack(tensors: &[TensorData]) -> Option<(Vec<u64>, u64)> {
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut cursor = 0u64;
    for t in tensors {
        let off = align_up(cursor, TENSOR_ALIGN)?;
        offsets.push(off);
        cursor = off.checked_add(t.bytes.len() as u64)?;
    }
    Some((offsets, cursor))
}

/// Feeds a packed region to `sink`: zero padding, then each tensor at its offset.
fn emit(offsets: &[u64], tensors: &[TensorData], sink: &mut Sink) -> std::io::Result<()> {
    const ZEROS: [u8; TENSOR_ALIGN as usize] = [0; TENSOR_ALIGN as usize];
    let mut cursor = 0u64;
    for (&off, t) in offsets.iter().zip(tensors) {
        // pack() placed each tensor at most TENSOR_ALIGN - 1 bytes past the previous end.
        sink(&ZEROS[..(off - cursor) as usize])?;
        sink(&t.bytes)?;
        cursor = off + t.bytes.len() as u64;
    }
    Ok(())
}

fn crc_of(offsets: &[u64], tensors: &[TensorData]) -> u32 {
    let mut crc = 0u32;
    let mut sink = |b: &[u8]| {
        crc = crc32c::crc32c_append(crc, b);
        Ok(())
    };
    // The sink never fails.
    let _ = emit(offsets, tensors, &mut sink);
    crc
}

/// `PATH.tmp` beside `PATH`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// A buffered file writer that knows its position, for padding to absolute offsets.
struct Counted {
    w: BufWriter<File>,
    pos: u64,
}

impl Counted {
    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.w.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, offset: u64) -> std::io::Result<()> {
        const ZEROS: [u8; BLOCK_ALIGN as usize] = [0; BLOCK_ALIGN as usize];
        while self.pos < offset {
            let n = (offset - self.pos).min(BLOCK_ALIGN) as usize;
            self.put(&ZEROS[..n])?;
        }
        Ok(())
    }
}
