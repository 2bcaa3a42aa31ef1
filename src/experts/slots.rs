//! Cache slots: 4096-aligned anonymous maps edgemoe owns, each holding one expert block as read
//! from the file, and the expert's matrices re-pointed into them. A slot is shared as an
//! `Arc<Mmap>` by every expert handle that uses it, so an expert in use cannot be overwritten:
//! a slot is refilled only when the cache holds its sole reference.

use crate::model::buf::{Buf, Plain, SharedMap};
use crate::model::weights::{GatedMlp, Linear, LinearWeight};
use memmap2::{Mmap, MmapMut};
use std::sync::Arc;

/// A fresh slot of `bytes` (a multiple of 4096; pages cost nothing until first read into).
pub fn new_slot(bytes: usize) -> std::io::Result<SharedMap> {
    Ok(Arc::new(MmapMut::map_anon(bytes)?.make_read_only()?))
}

/// Makes a slot writable, fills it with `fill`, and makes it read-only again.
pub fn refill(
    slot: Mmap,
    fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<SharedMap> {
    let mut m = slot.make_mut()?;
    fill(&mut m)?;
    Ok(Arc::new(m.make_read_only()?))
}

/// The block `[offset, offset + len)` of `file` as it will sit at the start of a slot.
#[derive(Clone, Copy)]
pub struct BlockSpan {
    pub offset: usize,
    pub len: usize,
}

fn rebase_buf<T: Plain>(
    b: &Buf<T>,
    file: &SharedMap,
    span: BlockSpan,
    slot: &SharedMap,
) -> Option<Buf<T>> {
    match b {
        Buf::Owned(_) => Some(b.clone()),
        Buf::Mapped { map, offset, len } => {
            let inside = Arc::ptr_eq(map, file)
                && *offset >= span.offset
                && offset + len * size_of::<T>() <= span.offset + span.len;
            // The block offset is 4096-aligned and so is the slot: alignment is kept.
            inside.then(|| Buf::Mapped {
                map: slot.clone(),
                offset: offset - span.offset,
                len: *len,
            })
        }
    }
}

fn rebase_linear(
    l: &Linear,
    file: &SharedMap,
    span: BlockSpan,
    slot: &SharedMap,
) -> Option<Linear> {
    let weight = match &l.weight {
        LinearWeight::Int8(m) | LinearWeight::Int8WeightOnly(m) => {
            let mut m = m.clone();
            m.data = rebase_buf(&m.data, file, span, slot)?;
            m.scales = rebase_buf(&m.scales, file, span, slot)?;
            m.row_sums = rebase_buf(&m.row_sums, file, span, slot)?;
            if matches!(l.weight, LinearWeight::Int8(_)) {
                LinearWeight::Int8(m)
            } else {
                LinearWeight::Int8WeightOnly(m)
            }
        }
        LinearWeight::Int4(m) => {
            let mut m = m.clone();
            m.data = rebase_buf(&m.data, file, span, slot)?;
            m.scales = rebase_buf(&m.scales, file, span, slot)?;
            if let Some(z) = &m.zeros {
                m.zeros = Some(rebase_buf(z, file, span, slot)?);
            }
            LinearWeight::Int4(m)
        }
        LinearWeight::F32Rows(b) => LinearWeight::F32Rows(rebase_buf(b, file, span, slot)?),
        LinearWeight::Half(k, b) => LinearWeight::Half(*k, rebase_buf(b, file, span, slot)?),
        LinearWeight::Prepared(p) => LinearWeight::Prepared(p.clone()),
    };
    Some(Linear {
        weight,
        ..l.clone()
    })
}

/// `mlp` with every matrix that lives in its block of `file` read from `slot` instead; `None`
/// where one lies in the file outside the block (such an expert cannot be paged).
pub fn rebase(
    mlp: &GatedMlp,
    file: &SharedMap,
    span: BlockSpan,
    slot: &SharedMap,
) -> Option<GatedMlp> {
    Some(GatedMlp {
        gate: rebase_linear(&mlp.gate, file, span, slot)?,
        up: rebase_linear(&mlp.up, file, span, slot)?,
        down: rebase_linear(&mlp.down, file, span, slot)?,
        block: None,
    })
}
