//! Device mirrors of the engine's KV caches. The engine owns each sequence's cache on the host
//! (`LayerCache`, the slot → position map eviction edits); the backend keeps a device copy of
//! every layer cache it has seen, appends to both, and before each use checks the mirror
//! against the host's slot count and positions, rebuilding it from the host when they differ
//! (an evicted, cleared or moved cache). A mirror unused for a while is dropped.

use super::device::Gpu;
use crate::error::Result;
use crate::kv::LayerCache;
use cudarc::driver::{CudaSlice, CudaView};
use std::collections::HashMap;

/// Steps a mirror survives without being used.
const IDLE_STEPS: u64 = 8;

pub struct Mirror {
    pub keys: CudaSlice<f32>,
    pub values: CudaSlice<f32>,
    pub positions: CudaSlice<i32>,
    /// Per-slot validity bytes (all set: the host cache holds only live slots).
    pub valid: CudaSlice<u8>,
    /// Slots the buffers have room for.
    capacity: usize,
    /// Slots held (== the host cache's, after `sync`).
    pub len: usize,
    /// The host positions the mirror holds, and where the host's keys live: a host cache
    /// that differs in either (evicted, cleared, reallocated, or another cache at a reused
    /// address) is uploaded again rather than trusted.
    host_positions: Vec<u32>,
    host_keys: usize,
    last_used: u64,
}

#[derive(Default)]
pub struct KvMirrors {
    mirrors: HashMap<usize, Mirror>,
    step: u64,
}

impl Mirror {
    fn with_capacity(gpu: &Gpu, kv_dim: usize, capacity: usize) -> Result<Mirror> {
        let capacity = capacity.max(16);
        Ok(Mirror {
            keys: gpu.zeros(capacity * kv_dim, "KV cache keys")?,
            values: gpu.zeros(capacity * kv_dim, "KV cache values")?,
            positions: gpu.zeros(capacity, "KV slot positions")?,
            valid: gpu.upload(&vec![1u8; capacity], "KV slot validity")?,
            capacity,
            len: 0,
            host_positions: Vec::new(),
            host_keys: 0,
            last_used: 0,
        })
    }

    /// A mirror holding exactly what the host cache holds.
    fn from_host(gpu: &Gpu, cache: &LayerCache, kv_dim: usize) -> Result<Mirror> {
        let len = cache.positions.len();
        let mut m = Mirror::with_capacity(gpu, kv_dim, (2 * len).max(64))?;
        if len > 0 {
            gpu.stream
                .memcpy_htod(
                    &cache.keys[..len * kv_dim],
                    &mut m.keys.slice_mut(0..len * kv_dim),
                )
                .map_err(|e| super::device::driver_error("uploading KV keys", e))?;
            gpu.stream
                .memcpy_htod(
                    &cache.values[..len * kv_dim],
                    &mut m.values.slice_mut(0..len * kv_dim),
                )
                .map_err(|e| super::device::driver_error("uploading KV values", e))?;
            let pos: Vec<i32> = cache.positions.iter().map(|&p| p as i32).collect();
            gpu.stream
                .memcpy_htod(&pos, &mut m.positions.slice_mut(0..len))
                .map_err(|e| super::device::driver_error("uploading KV positions", e))?;
        }
        m.len = len;
        m.host_positions = cache.positions.clone();
        m.host_keys = cache.keys.as_ptr() as usize;
        Ok(m)
    }

    /// Room for `more` slots, copying what is held into larger buffers when needed.
    fn reserve(&mut self, gpu: &Gpu, kv_dim: usize, more: usize) -> Result<()> {
        let need = self.len + more;
        if need <= self.capacity {
            return Ok(());
        }
        let mut bigger = Mirror::with_capacity(gpu, kv_dim, need.max(2 * self.capacity))?;
        let n = self.len * kv_dim;
        let copy = |src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>| {
            gpu.stream
                .memcpy_dtod(&src.slice(0..n), &mut dst.slice_mut(0..n))
                .map_err(|e| super::device::driver_error("growing the KV cache", e))
        };
        if n > 0 {
            copy(&self.keys, &mut bigger.keys)?;
            copy(&self.values, &mut bigger.values)?;
            gpu.stream
                .memcpy_dtod(
                    &self.positions.slice(0..self.len),
                    &mut bigger.positions.slice_mut(0..self.len),
                )
                .map_err(|e| super::device::driver_error("growing the KV cache", e))?;
        }
        bigger.len = self.len;
        bigger.host_positions = std::mem::take(&mut self.host_positions);
        bigger.host_keys = self.host_keys;
        *self = bigger;
        Ok(())
    }
}

impl KvMirrors {
    /// Starts a forward step: drops mirrors unused for [`IDLE_STEPS`] steps.
    pub fn next_step(&mut self) {
        self.step += 1;
        let step = self.step;
        self.mirrors.retain(|_, m| step - m.last_used <= IDLE_STEPS);
    }

    /// The mirror of `cache`, in agreement with it.
    pub fn sync(&mut self, gpu: &Gpu, cache: &LayerCache, kv_dim: usize) -> Result<&mut Mirror> {
        let key = cache as *const LayerCache as usize;
        let fresh = match self.mirrors.get(&key) {
            Some(m) => {
                m.len != cache.positions.len()
                    || m.host_keys != cache.keys.as_ptr() as usize
                    || m.host_positions != cache.positions
            }
            None => true,
        };
        if fresh {
            self.mirrors
                .insert(key, Mirror::from_host(gpu, cache, kv_dim)?);
        }
        let step = self.step;
        let m = self
            .mirrors
            .get_mut(&key)
            .ok_or_else(|| crate::Error::Cuda("KV mirror vanished".to_owned()))?;
        m.last_used = step;
        Ok(m)
    }

    /// Appends `rows` slots (their keys and values on the device, at `positions`) to the
    /// mirror of `cache`, which the caller has already appended them to on the host (so the
    /// mirror is synced against the cache without them first).
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        gpu: &Gpu,
        cache_before: &LayerCache,
        kv_dim: usize,
        k: CudaView<f32>,
        v: CudaView<f32>,
        positions: &[usize],
    ) -> Result<usize> {
        let key = cache_before as *const LayerCache as usize;
        let m = self.sync(gpu, cache_before, kv_dim)?;
        let rows = positions.len();
        m.reserve(gpu, kv_dim, rows)?;
        let (a, b) = (m.len * kv_dim, (m.len + rows) * kv_dim);
        let err = |e| super::device::driver_error("appending to the KV cache", e);
        gpu.stream
            .memcpy_dtod(&k, &mut m.keys.slice_mut(a..b))
            .map_err(err)?;
        gpu.stream
            .memcpy_dtod(&v, &mut m.values.slice_mut(a..b))
            .map_err(err)?;
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        gpu.stream
            .memcpy_htod(&pos, &mut m.positions.slice_mut(m.len..m.len + rows))
            .map_err(err)?;
        m.len += rows;
        m.host_positions.extend(positions.iter().map(|&p| p as u32));
        Ok(key)
    }

    /// Records where `cache` keeps its keys after the caller appended to it the rows it just
    /// gave [`Self::append`] (its buffer may have moved; the contents agree).
    pub fn note_host_append(&mut self, cache: &LayerCache) {
        let key = cache as *const LayerCache as usize;
        if let Some(m) = self.mirrors.get_mut(&key) {
            m.host_keys = cache.keys.as_ptr() as usize;
        }
    }
}
