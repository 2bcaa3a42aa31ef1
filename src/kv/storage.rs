//! Where a layer's keys and values live. `kv/` keeps the slot → position map and the policies;
//! the bytes belong to the backend that computes with them (host vectors for the CPU, device
//! buffers for a GPU), behind [`KvStorage`]. The backend appends to its own storage and attends
//! over it directly; `kv/` only asks it to make room, drop slots and report its size.

use crate::error::Result;
use std::any::Any;
use std::borrow::Cow;

/// A layer's keys and values in a backend's own format: `len_slots()` slots of `kv_dim()`
/// floats each, slot `s` beside position `s` of the layer's position map.
pub trait KvStorage: Send + Sync + std::fmt::Debug + Any {
    /// Floats per key (= per value).
    fn kv_dim(&self) -> usize;
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
    fn to_host(&self) -> Result<HostRows<'_>>;
    /// For the owning backend to reach its concrete type.
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;

    /// Drops every slot; capacity stays.
    fn clear(&mut self) {
        self.truncate(0);
    }
}

/// A storage's keys and values on the host (borrowed where they live there).
#[derive(Debug)]
pub struct HostRows<'a> {
    pub keys: Cow<'a, [f32]>,
    pub values: Cow<'a, [f32]>,
}
