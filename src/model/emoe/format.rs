//! The .emoe header: its on-disk shape and the validation every file passes before use.
//!
//! [`parse_header`] is pure (bytes in, header or reason out) so the fuzzer can drive it. It checks,
//! with checked arithmetic and in this order: magic, version, header length (capped, inside the
//! file), the header's CRC-32C, JSON and its fields, the embedded config (as config.json is
//! validated), the data region, the expert blocks (in the model's range, unique,
//! 4096-aligned, inside the file, not overlapping each other, the header or the data region), then
//! every tensor (unique name, `len == numel × dtype size`, 64-byte aligned, inside the file and
//! inside its declared block or the data region, not overlapping another tensor). Checksums are
//! the reader's job: the data region's at open, each block's on first access.

use super::{align_up, ClassTally, EmoeDtype, BLOCK_ALIGN, MAGIC, VERSION, VERSION_WITHOUT_INT4};
use crate::model::config::ModelConfig;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;

/// Magic (8 B), version (u32), header length (u64) and the header JSON's CRC-32C (u32) precede
/// the header JSON.
pub const PREAMBLE_LEN: usize = 24;
/// Headers larger than this are rejected before parsing (the embedded tokenizer.json of a large
/// vocabulary is a few MB; the tensor directory of a big MoE a few more).
pub const MAX_HEADER_BYTES: u64 = 256 * 1024 * 1024;
/// Alignment of every tensor: enough for any SIMD load and for zero-copy `&[f32]` views.
pub const TENSOR_ALIGN: u64 = 64;

/// One tensor in the directory. `offset` is absolute; `block` indexes `blocks` for expert tensors.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: EmoeDtype,
    pub shape: Vec<usize>,
    pub offset: u64,
    pub len: u64,
    pub block: Option<usize>,
}

/// One expert's block: all its tensors, contiguous, `offset` a multiple of [`BLOCK_ALIGN`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ExpertBlockEntry {
    pub layer: usize,
    pub expert: usize,
    pub offset: u64,
    pub len: u64,
    /// CRC-32C (Castagnoli) of the block's `len` bytes.
    pub crc32c: u32,
    /// The tensors inside, in directory order; filled from the tensor directory, not stored.
    #[serde(skip)]
    pub tensors: Vec<String>,
}

/// The non-expert tensors' region and its CRC-32C.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRegion {
    pub offset: u64,
    pub len: u64,
    pub crc32c: u32,
}

/// The header JSON as stored; the writer serializes it borrowed, the parser reads it owned.
#[derive(Serialize, Deserialize)]
pub(super) struct HeaderJson<'a> {
    pub config: Cow<'a, ModelConfig>,
    pub tokenizer_json: Cow<'a, str>,
    /// The checkpoint's chat template (absent in files written before it was kept, or for
    /// models without one); optional, so every version reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<Cow<'a, str>>,
    pub quant: Cow<'a, Value>,
    pub data: DataRegion,
    pub tensors: Vec<TensorEntry>,
    pub blocks: Vec<ExpertBlockEntry>,
}

/// A parsed header whose every offset and length has been checked against the file.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub file_len: u64,
    /// Bytes of header JSON (after the preamble).
    pub header_len: u64,
    pub config: ModelConfig,
    pub tokenizer_json: String,
    pub chat_template: Option<String>,
    pub quant: Value,
    pub data: DataRegion,
    pub tensors: Vec<TensorEntry>,
    pub blocks: Vec<ExpertBlockEntry>,
    by_name: HashMap<String, usize>,
    by_expert: HashMap<(usize, usize), usize>,
}

impl Header {
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// Index into `blocks` of expert `(layer, expert)`.
    pub fn block_index(&self, layer: usize, expert: usize) -> Option<usize> {
        self.by_expert.get(&(layer, expert)).copied()
    }

    /// Bytes, tensors and int8 parameters per tensor class.
    pub fn class_tally(&self) -> ClassTally {
        let mut tally = ClassTally::default();
        for t in &self.tensors {
            let numel = t.shape.iter().map(|&d| d as u64).product();
            tally.add(&t.name, t.dtype, numel, t.len, t.block.is_some());
        }
        tally
    }
}

/// Parses and validates the header of a whole .emoe file; the reason names the offending field,
/// tensor or block, and says "truncated" where the file ends early.
pub fn parse_header(file: &[u8]) -> Result<Header, String> {
    let file_len = file.len() as u64;
    let (version, header_len, header_crc) = read_preamble(file)?;
    let header_end = (PREAMBLE_LEN as u64)
        .checked_add(header_len)
        .ok_or("header length overflows")?;
    let json = usize::try_from(header_end)
        .ok()
        .and_then(|end| file.get(PREAMBLE_LEN..end))
        .ok_or_else(|| {
            format!(
                "header length {header_len} points past the end of the {file_len}-byte file (truncated?)"
            )
        })?;
    let computed = crc32c::crc32c(json);
    if computed != header_crc {
        return Err(format!(
            "header checksum mismatch (stored crc32c {header_crc:#010x}, computed {computed:#010x}): the file is corrupt"
        ));
    }
    let raw: HeaderJson = serde_json::from_slice(json).map_err(|e| {
        if e.is_data() {
            format!("header is malformed: {e}")
        } else {
            format!("header is not valid JSON: {e}")
        }
    })?;
    raw.config
        .check()
        .map_err(|(field, reason)| format!("embedded config field `{field}`: {reason}"))?;
    if version < VERSION {
        if let Some(t) = raw.tensors.iter().find(|t| t.dtype == EmoeDtype::U8) {
            return Err(format!(
                "tensor `{}` is U8 (int4), which a version {version} .emoe cannot hold",
                t.name
            ));
        }
    }
    let mut blocks = raw.blocks;
    check_data_region(&raw.data, header_end, file_len)?;
    let by_expert = check_blocks(&blocks, &raw.config, file_len)?;
    check_regions_disjoint(&blocks, &raw.data, header_end)?;
    let by_name = check_tensors(&raw.tensors, &mut blocks, &raw.data, file_len)?;
    Ok(Header {
        version,
        file_len,
        header_len,
        config: raw.config.into_owned(),
        tokenizer_json: raw.tokenizer_json.into_owned(),
        chat_template: raw.chat_template.map(Cow::into_owned),
        quant: raw.quant.into_owned(),
        data: raw.data,
        tensors: raw.tensors,
        blocks,
        by_name,
        by_expert,
    })
}

/// Magic, version, header length (capped) and the header's checksum.
fn read_preamble(file: &[u8]) -> Result<(u32, u64, u32), String> {
    if let Some(magic) = file.get(..MAGIC.len()) {
        if magic != MAGIC {
            return Err(format!(
                "bad magic \"{}\" (expected \"{}\"): not an .emoe file",
                magic.escape_ascii(),
                MAGIC.escape_ascii()
            ));
        }
    }
    let le_u32 = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(file.get(at..at + 4)?.try_into().ok()?))
    };
    let Some(version) = le_u32(8) else {
        return Err(truncated_preamble(file.len()));
    };
    match version {
        1 => return Err(format!(
            "this is a version 1 .emoe; this build reads version {VERSION} (int8 weights stored in the kernels' layout, used in place): re-quantize the checkpoint with `edgemoe quantize`"
        )),
        2 => return Err(format!(
            "this is a version 2 .emoe, whose header has no checksum; this build reads version {VERSION}: re-quantize the checkpoint with `edgemoe quantize`"
        )),
        VERSION_WITHOUT_INT4 | VERSION => {}
        _ => return Err(format!(
            "unsupported .emoe version {version}: this build reads versions {VERSION_WITHOUT_INT4} and {VERSION}"
        )),
    }
    let header_len = file
        .get(12..20)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes);
    let (Some(header_len), Some(crc)) = (header_len, le_u32(20)) else {
        return Err(truncated_preamble(file.len()));
    };
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt length field?)"
        ));
    }
    Ok((version, header_len, crc))
}

fn truncated_preamble(len: usize) -> String {
    format!(
        "truncated: the file is {len} bytes, shorter than the {PREAMBLE_LEN}-byte preamble (magic, version, header length, header checksum)"
    )
}

/// `offset + len`, checked to lie inside the file.
fn end_in_file(what: &str, offset: u64, len: u64, file_len: u64) -> Result<u64, String> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| format!("{what}: offset {offset} + length {len} overflows"))?;
    if end > file_len {
        return Err(format!(
            "{what}: bytes [{offset}, {end}) extend past the end of the {file_len}-byte file (truncated?)"
        ));
    }
    Ok(end)
}

fn check_data_region(data: &DataRegion, header_end: u64, file_len: u64) -> Result<(), String> {
    let what = "non-expert data region";
    end_in_file(what, data.offset, data.len, file_len)?;
    if !data.offset.is_multiple_of(BLOCK_ALIGN) {
        return Err(format!(
            "{what}: offset {} is not {BLOCK_ALIGN}-byte aligned",
            data.offset
        ));
    }
    if data.offset < header_end {
        return Err(format!(
            "{what}: offset {} overlaps the header, which ends at {header_end}",
            data.offset
        ));
    }
    Ok(())
}

fn block_name(b: &ExpertBlockEntry) -> String {
    format!("expert block (layer {}, expert {})", b.layer, b.expert)
}

/// Each block: in the model's range, unique, aligned, inside the file. Returns the index.
fn check_blocks(
    blocks: &[ExpertBlockEntry],
    config: &ModelConfig,
    file_len: u64,
) -> Result<HashMap<(usize, usize), usize>, String> {
    let mut by_expert = HashMap::with_capacity(blocks.len());
    for (i, b) in blocks.iter().enumerate() {
        let what = block_name(b);
        if b.layer >= config.num_layers || b.expert >= config.num_experts {
            return Err(format!(
                "{what} is out of range for a model of {} layers and {} experts",
                config.num_layers, config.num_experts
            ));
        }
        if by_expert.insert((b.layer, b.expert), i).is_some() {
            return Err(format!("duplicate {what}"));
        }
        if !b.offset.is_multiple_of(BLOCK_ALIGN) {
            return Err(format!(
                "{what}: offset {} is not {BLOCK_ALIGN}-byte aligned",
                b.offset
            ));
        }
        end_in_file(&what, b.offset, b.len, file_len)?;
    }
    Ok(by_expert)
}

/// The header, the data region and the blocks must not overlap (ends were checked already).
fn check_regions_disjoint(
    blocks: &[ExpertBlockEntry],
    data: &DataRegion,
    header_end: u64,
) -> Result<(), String> {
    let mut regions: Vec<(u64, u64, String)> = Vec::with_capacity(blocks.len() + 2);
    regions.push((0, header_end, "the header".to_string()));
    regions.push((
        data.offset,
        data.offset.saturating_add(data.len),
        "the non-expert data region".to_string(),
    ));
    for b in blocks {
        regions.push((b.offset, b.offset.saturating_add(b.len), block_name(b)));
    }
    check_disjoint(regions)
}

/// Sorted by start, each range must begin at or after the previous one's end.
fn check_disjoint(mut ranges: Vec<(u64, u64, String)>) -> Result<(), String> {
    ranges.sort_unstable_by_key(|r| (r.0, r.1));
    for pair in ranges.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if b.0 < a.1 {
            return Err(format!(
                "{} [{}, {}) and {} [{}, {}) overlap",
                a.2, a.0, a.1, b.2, b.0, b.1
            ));
        }
    }
    Ok(())
}

/// Every tensor: unique, sized by dtype × shape, aligned, inside its container, not overlapping.
/// Fills each block's tensor list; returns the name index.
fn check_tensors(
    tensors: &[TensorEntry],
    blocks: &mut [ExpertBlockEntry],
    data: &DataRegion,
    file_len: u64,
) -> Result<HashMap<String, usize>, String> {
    let mut by_name = HashMap::with_capacity(tensors.len());
    let mut ranges = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        let what = format!("tensor `{}`", t.name);
        if by_name.insert(t.name.clone(), i).is_some() {
            return Err(format!("duplicate tensor name `{}`", t.name));
        }
        let nbytes = t
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .and_then(|numel| numel.checked_mul(t.dtype.size() as u64))
            .ok_or_else(|| format!("{what}: shape {:?} overflows", t.shape))?;
        if t.len != nbytes {
            return Err(format!(
                "{what}: len {} does not match {:?} {:?} ({nbytes} bytes)",
                t.len, t.dtype, t.shape
            ));
        }
        let end = end_in_file(&what, t.offset, t.len, file_len)?;
        if !t.offset.is_multiple_of(TENSOR_ALIGN) {
            return Err(format!(
                "{what}: offset {} is not {TENSOR_ALIGN}-byte aligned",
                t.offset
            ));
        }
        check_container(t, end, blocks, data)?;
        ranges.push((t.offset, end, what));
    }
    check_disjoint(ranges)?;
    Ok(by_name)
}

/// The tensor lies inside its declared block, or inside the data region when it has none.
fn check_container(
    t: &TensorEntry,
    end: u64,
    blocks: &mut [ExpertBlockEntry],
    data: &DataRegion,
) -> Result<(), String> {
    let (start, stop, container) = match t.block {
        None => (
            data.offset,
            data.offset.saturating_add(data.len),
            "the non-expert data region".to_string(),
        ),
        Some(i) => {
            let n = blocks.len();
            let b = blocks.get_mut(i).ok_or_else(|| {
                format!(
                    "tensor `{}` names expert block {i}, but the file has {n} blocks",
                    t.name
                )
            })?;
            b.tensors.push(t.name.clone());
            let container = format!("its declared {}", block_name(b));
            (b.offset, b.offset.saturating_add(b.len), container)
        }
    };
    if t.offset < start || end > stop {
        return Err(format!(
            "tensor `{}` [{}, {end}) is not inside {container} [{start}, {stop})",
            t.name, t.offset
        ));
    }
    Ok(())
}

/// Where the data region starts for a header of `json_len` bytes, at the earliest.
pub(super) fn data_start_after(json_len: u64) -> Option<u64> {
    align_up((PREAMBLE_LEN as u64).checked_add(json_len)?, BLOCK_ALIGN)
}
