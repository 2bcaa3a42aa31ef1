//! Where a layer's keys and values live. `kv/` keeps the slot → position map and the policies;
//! the bytes belong to the backend that computes with them (host vectors for the CPU, device
//! buffers for a GPU), behind [`KvStorage`]. The backend appends to its own storage and attends
//! over it directly; `kv/` only asks it to make room, drop slots and report its size.

use crate::error::Result;
use std::any::Any;
use std::borrow::Cow;

/// What one slot of a layer's storage holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Floats per key.
    pub key_dim: usize,
    /// `None`: a value row of `key_dim` floats beside each key. `Some(n)`: the value is the
    /// first `n` floats of the key itself and is not stored again (multi-head latent
    /// attention's rows: `[latent | rotated shared key]`, the latent read as the value).
    pub value_prefix: Option<usize>,
}

impl KvLayout {
    /// A key and a value of `kv_dim` floats each.
    pub fn separate(kv_dim: usize) -> KvLayout {
        KvLayout {
            key_dim: kv_dim,
            value_prefix: None,
        }
    }

    /// One row of `key_dim` floats whose first `value_dim` are the value.
    pub fn key_prefix(key_dim: usize, value_dim: usize) -> KvLayout {
        debug_assert!(value_dim <= key_dim);
        KvLayout {
            key_dim,
            value_prefix: Some(value_dim),
        }
    }

    /// Floats per value.
    pub fn value_dim(&self) -> usize {
        self.value_prefix.unwrap_or(self.key_dim)
    }

    /// Floats a slot stores: key and value, or the key alone when the value is its prefix.
    pub fn stored_floats(&self) -> usize {
        match self.value_prefix {
            None => 2 * self.key_dim,
            Some(_) => self.key_dim,
        }
    }
}

/// A layer's keys and values in a backend's own format: `len_slots()` slots of `kv_dim()`
/// floats of key each (and as many of value, unless [`Self::layout`] reads the value from the
/// key), slot `s` beside position `s` of the layer's position map.
pub trait KvStorage: Send + Sync + std::fmt::Debug + Any {
    /// Floats per key.
    fn kv_dim(&self) -> usize;
    /// What a slot holds: by default a key and a value of `kv_dim()` floats each.
    fn layout(&self) -> KvLayout {
        KvLayout::separate(self.kv_dim())
    }
    /// Slots held.
    fn len_slots(&self) -> usize;
    /// Slots it can hold without reallocating.
    fn capacity_slots(&self) -> usize;
    /// Room for at least `more` slots beyond those held, and no more than that (what `--mem`
    /// reserves for a sequence is what it allocates). A storage that cannot get the memory now
    /// keeps its room as it is: the append that needs it grows the storage and reports the
    /// failure itself.
    fn reserve_exact(&mut self, more: usize);
    /// Keeps the first `slots` slots (no-op when it holds fewer); capacity stays.
    fn truncate(&mut self, slots: usize);
    /// Moves slots `kept` (ascending) to the front in order and drops the rest; capacity
    /// stays, so the freed slots take the next appends. `positions` are the kept slots'
    /// positions, in order, for a storage that keeps its own copy beside the rows (a device's
    /// kernels read them there). Nothing changes when it fails.
    fn keep(&mut self, kept: &[u32], positions: &[u32]) -> Result<()>;
    /// Per-KV-head eviction: KV head `h` (floats `h·head_dim..(h+1)·head_dim` of a slot)
    /// moves its slots `kept[h·k..(h+1)·k]` (ascending; `k = kept.len() / heads`) to the front
    /// in order, each head independently, and the rest are dropped; capacity stays. Nothing
    /// changes when it fails. A storage that cannot (a device's, so far) says so.
    fn keep_heads(&mut self, kept: &[u32], head_dim: usize) -> Result<()> {
        let _ = (kept, head_dim);
        Err(crate::error::Error::invalid(
            "this backend's KV storage cannot evict per KV head (use --kv-granularity layer)",
        ))
    }
    /// Gives back capacity beyond `slots` (or beyond what it holds, if more), where it can.
    fn shrink_to(&mut self, slots: usize);
    /// Bytes its buffers have allocated, reserve included.
    fn allocated_bytes(&self) -> usize;
    /// Bytes the held slots take.
    fn bytes(&self) -> usize;
    /// The held keys and values, `len_slots() × kv_dim()` each, slot-major, on the host: for
    /// reference paths, tests and a backend adopting another's storage, never a hot path.
    /// Values are empty where the layout reads them from the keys.
    fn to_host(&self) -> Result<HostRows<'_>>;
    /// For the owning backend to reach its concrete type.
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;

    /// Drops every slot; capacity stays.
    fn clear(&mut self) {
        self.truncate(0);
    }
}

/// A storage's keys and values on the host (borrowed where they live there); `values` is
/// empty for a [`KvLayout`] whose values are key prefixes.
#[derive(Debug)]
pub struct HostRows<'a> {
    pub keys: Cow<'a, [f32]>,
    pub values: Cow<'a, [f32]>,
}
