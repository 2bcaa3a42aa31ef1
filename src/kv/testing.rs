//! A plain storage for tests: kv/'s own (which must not depend on a backend), and a backend's,
//! where it stands for another backend's storage that the backend must adopt.

use super::{HostRows, KvCache, KvStorage, LayerCache};
use crate::error::Result;
use std::any::Any;
use std::borrow::Cow;

/// Keys and values in two vectors, compacted by building new ones.
#[derive(Debug, Clone, Default)]
pub struct VecKv {
    pub kv_dim: usize,
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

impl VecKv {
    pub fn new(kv_dim: usize) -> VecKv {
        VecKv {
            kv_dim,
            ..VecKv::default()
        }
    }

    fn row(data: &[f32], kv_dim: usize, s: usize) -> &[f32] {
        &data[s * kv_dim..(s + 1) * kv_dim]
    }
}

impl KvStorage for VecKv {
    fn kv_dim(&self) -> usize {
        self.kv_dim
    }
    fn len_slots(&self) -> usize {
        self.keys.len() / self.kv_dim.max(1)
    }
    fn capacity_slots(&self) -> usize {
        self.keys.capacity().min(self.values.capacity()) / self.kv_dim.max(1)
    }
    fn reserve_exact(&mut self, more: usize) {
        self.keys.reserve_exact(more * self.kv_dim);
        self.values.reserve_exact(more * self.kv_dim);
    }
    fn truncate(&mut self, slots: usize) {
        self.keys.truncate(slots * self.kv_dim);
        self.values.truncate(slots * self.kv_dim);
    }
    fn keep(&mut self, kept: &[u32], _positions: &[u32]) -> Result<()> {
        let d = self.kv_dim;
        let gather = |data: &[f32]| {
            let mut out = Vec::with_capacity(data.len().max(kept.len() * d));
            for &s in kept {
                out.extend_from_slice(VecKv::row(data, d, s as usize));
            }
            out
        };
        (self.keys, self.values) = (gather(&self.keys), gather(&self.values));
        Ok(())
    }
    /// The plain reference: every head's kept slices gathered into fresh buffers.
    fn keep_heads(&mut self, kept: &[u32], head_dim: usize) -> Result<()> {
        let d = self.kv_dim;
        let heads = d / head_dim;
        let k = kept.len() / heads;
        let gather = |data: &[f32]| {
            let mut out = vec![0f32; k * d];
            for h in 0..heads {
                for (i, &s) in kept[h * k..(h + 1) * k].iter().enumerate() {
                    let from = s as usize * d + h * head_dim;
                    out[i * d + h * head_dim..][..head_dim]
                        .copy_from_slice(&data[from..from + head_dim]);
                }
            }
            out
        };
        (self.keys, self.values) = (gather(&self.keys), gather(&self.values));
        Ok(())
    }
    fn shrink_to(&mut self, slots: usize) {
        self.keys.shrink_to(slots * self.kv_dim);
        self.values.shrink_to(slots * self.kv_dim);
    }
    fn allocated_bytes(&self) -> usize {
        (self.keys.capacity() + self.values.capacity()) * 4
    }
    fn bytes(&self) -> usize {
        (self.keys.len() + self.values.len()) * 4
    }
    fn to_host(&self) -> Result<HostRows<'_>> {
        Ok(HostRows {
            keys: Cow::Borrowed(&self.keys),
            values: Cow::Borrowed(&self.values),
        })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Appends one slot to `layer` in a [`VecKv`], as a backend appends to its own storage.
pub fn append(layer: &mut LayerCache, key: &[f32], value: &[f32], position: usize) {
    let adopt = |old: Option<&dyn KvStorage>, _: &[u32]| -> Result<VecKv> {
        let Some(old) = old else {
            return Ok(VecKv::new(key.len()));
        };
        let rows = old.to_host()?;
        Ok(VecKv {
            kv_dim: old.kv_dim(),
            keys: rows.keys.into_owned(),
            values: rows.values.into_owned(),
        })
    };
    let write = |s: &mut VecKv| {
        s.keys.extend_from_slice(key);
        s.values.extend_from_slice(value);
        Ok(())
    };
    layer
        .append_with(&[position], adopt, write)
        .expect("a VecKv append cannot fail");
}

/// A cache whose layers start with a [`VecKv`] each (so room reserved before the first append
/// is real).
pub fn vec_cache(layers: usize, kv_dim: usize) -> KvCache {
    KvCache::with_storage(layers, kv_dim, |d| {
        Some(Box::new(VecKv::new(d)) as Box<dyn KvStorage>)
    })
}
