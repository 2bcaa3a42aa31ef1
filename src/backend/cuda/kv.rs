//! The CUDA backend's K/V storage: a layer's keys, values and slot positions in device buffers
//! that the attention kernel reads directly. Appends copy the new rows device to device;
//! growth doubles (or takes exactly what the cache reserves) and copies what is held into the
//! larger buffers; eviction gathers the kept rows into fresh buffers of the same capacity, so a
//! failure leaves the old ones in place. Where the layout reads values from the keys
//! (multi-head latent attention's latent rows) only the keys are held, and the kernel is given
//! the key buffer as the values.

use super::device::Gpu;
use super::kernels::AttnInputs;
use crate::error::{Error, Result};
use crate::kv::{HostRows, KvLayout, KvStorage};
use cudarc::driver::{CudaSlice, CudaView};
use std::any::Any;
use std::borrow::Cow;
use std::sync::Arc;

/// Device memory of `capacity` slots.
struct Buffers {
    keys: CudaSlice<f32>,
    /// `None` where the values are key prefixes.
    values: Option<CudaSlice<f32>>,
    /// Each slot's position (the kernel masks by it).
    positions: CudaSlice<i32>,
    /// Per-slot validity bytes, all set: the storage holds only live slots.
    valid: CudaSlice<u8>,
    capacity: usize,
}

impl Buffers {
    fn new(gpu: &Gpu, layout: KvLayout, capacity: usize) -> Result<Buffers> {
        let kv_dim = layout.key_dim;
        let values = match layout.value_prefix {
            None => Some(gpu.zeros(capacity * kv_dim, "KV cache values")?),
            Some(_) => None,
        };
        Ok(Buffers {
            keys: gpu.zeros(capacity * kv_dim, "KV cache keys")?,
            values,
            positions: gpu.zeros(capacity, "KV slot positions")?,
            valid: gpu.upload(&vec![1u8; capacity], "KV slot validity")?,
            capacity,
        })
    }
}

/// One layer's keys and values on the device: `len` slots of `kv_dim` floats each.
pub struct DeviceKv {
    gpu: Arc<Gpu>,
    layout: KvLayout,
    kv_dim: usize,
    len: usize,
    /// `None` until the first slot or reservation.
    bufs: Option<Buffers>,
}

impl std::fmt::Debug for DeviceKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKv")
            .field("layout", &self.layout)
            .field("len", &self.len)
            .field("capacity", &self.capacity_slots())
            .finish()
    }
}

fn copy_error(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| super::device::driver_error(what, e)
}

impl DeviceKv {
    /// An empty storage (nothing allocated yet).
    pub fn new(gpu: Arc<Gpu>, layout: KvLayout) -> DeviceKv {
        DeviceKv {
            gpu,
            layout,
            kv_dim: layout.key_dim,
            len: 0,
            bufs: None,
        }
    }

    /// The same slots as another backend's storage (read back through the host), at
    /// `positions`; an empty storage when there is none.
    pub fn adopt(
        gpu: Arc<Gpu>,
        kv_dim: usize,
        other: Option<&dyn KvStorage>,
        positions: &[u32],
    ) -> Result<DeviceKv> {
        let Some(other) = other else {
            return Ok(DeviceKv::new(gpu, KvLayout::separate(kv_dim)));
        };
        let layout = other.layout();
        let mut kv = DeviceKv::new(gpu, layout);
        let rows = other.to_host()?;
        let n = positions.len();
        if other.kv_dim() != kv_dim || rows.keys.len() != n * kv_dim {
            return Err(Error::invalid(format!(
                "a KV layer of {} slots × {} floats does not fit {n} positions × {kv_dim}",
                other.len_slots(),
                other.kv_dim()
            )));
        }
        if n == 0 {
            return Ok(kv);
        }
        let mut b = Buffers::new(&kv.gpu, layout, n)?;
        let err = copy_error("uploading a KV cache");
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let stream = &kv.gpu.stream;
        stream
            .memcpy_htod(&rows.keys[..], &mut b.keys)
            .map_err(&err)?;
        if let Some(values) = &mut b.values {
            stream.memcpy_htod(&rows.values[..], values).map_err(&err)?;
        }
        stream.memcpy_htod(&pos, &mut b.positions).map_err(&err)?;
        kv.bufs = Some(b);
        kv.len = n;
        Ok(kv)
    }

    /// Room for `need` slots in all: exactly that many when `exact`, else at least double the
    /// current room.
    fn grow(&mut self, need: usize, exact: bool) -> Result<()> {
        let capacity = self.capacity_slots();
        if need <= capacity {
            return Ok(());
        }
        self.reallocate(if exact { need } else { need.max(2 * capacity) })
    }

    /// Moves what is held into new buffers of `capacity` (≥ the slots held) slots; on failure
    /// the old buffers stay.
    fn reallocate(&mut self, capacity: usize) -> Result<()> {
        let mut fresh = Buffers::new(&self.gpu, self.layout, capacity)?;
        let n = self.len;
        if let Some(old) = self.bufs.as_ref().filter(|_| n > 0) {
            let err = copy_error("moving the KV cache to new buffers");
            let stream = &self.gpu.stream;
            let rows = 0..n * self.kv_dim;
            stream
                .memcpy_dtod(
                    &old.keys.slice(rows.clone()),
                    &mut fresh.keys.slice_mut(rows.clone()),
                )
                .map_err(&err)?;
            if let (Some(old), Some(fresh)) = (&old.values, &mut fresh.values) {
                stream
                    .memcpy_dtod(&old.slice(rows.clone()), &mut fresh.slice_mut(rows))
                    .map_err(&err)?;
            }
            stream
                .memcpy_dtod(
                    &old.positions.slice(0..n),
                    &mut fresh.positions.slice_mut(0..n),
                )
                .map_err(&err)?;
        }
        self.bufs = Some(fresh);
        Ok(())
    }

    /// Appends `positions.len()` slots whose keys and values are `k` and `v` (on the device,
    /// slot-major; `v` unread where the values are key prefixes).
    pub fn append(
        &mut self,
        k: CudaView<f32>,
        v: CudaView<f32>,
        positions: &[usize],
    ) -> Result<()> {
        let rows = positions.len();
        let floats = rows * self.kv_dim;
        if k.len() != floats || v.len() != floats {
            return Err(Error::invalid(format!(
                "appending {rows} KV slots of {} floats given {} keys and {} values",
                self.kv_dim,
                k.len(),
                v.len()
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        self.grow(self.len + rows, false)?;
        let Some(b) = &mut self.bufs else {
            unreachable!("grow allocated the buffers");
        };
        let err = copy_error("appending to the KV cache");
        let (at, end) = (self.len * self.kv_dim, (self.len + rows) * self.kv_dim);
        let stream = &self.gpu.stream;
        stream
            .memcpy_dtod(&k, &mut b.keys.slice_mut(at..end))
            .map_err(&err)?;
        if let Some(values) = &mut b.values {
            stream
                .memcpy_dtod(&v, &mut values.slice_mut(at..end))
                .map_err(&err)?;
        }
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        stream
            .memcpy_htod(&pos, &mut b.positions.slice_mut(self.len..self.len + rows))
            .map_err(&err)?;
        self.len += rows;
        Ok(())
    }

    /// The attention kernel's inputs over the held slots, for queries `q` at `q_positions`;
    /// `None` while nothing is held.
    pub fn attn_inputs<'a>(
        &'a self,
        q: CudaView<'a, f32>,
        q_positions: &'a [usize],
    ) -> Option<AttnInputs<'a>> {
        let b = self.bufs.as_ref().filter(|_| self.len > 0)?;
        Some(AttnInputs {
            q,
            q_positions,
            keys: &b.keys,
            values: b.values.as_ref().unwrap_or(&b.keys),
            slot_positions: &b.positions,
            valid: &b.valid,
            slots: self.len,
        })
    }
}

impl KvStorage for DeviceKv {
    fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    fn layout(&self) -> KvLayout {
        self.layout
    }

    fn len_slots(&self) -> usize {
        self.len
    }

    fn capacity_slots(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.capacity)
    }

    fn reserve_exact(&mut self, more: usize) {
        // Without the memory now, the append that needs it grows the storage and fails there,
        // naming the allocation.
        self.grow(self.len + more, true).ok();
    }

    fn truncate(&mut self, slots: usize) {
        self.len = self.len.min(slots);
    }

    fn keep(&mut self, kept: &[u32], positions: &[u32]) -> Result<()> {
        if kept.len() == self.len {
            // Ascending, distinct and held: every slot.
            return Ok(());
        }
        let Some(old) = &self.bufs else {
            return Ok(());
        };
        let mut fresh = Buffers::new(&self.gpu, self.layout, old.capacity)?;
        if !kept.is_empty() {
            let index: Vec<usize> = kept.iter().map(|&s| s as usize).collect();
            let gpu = &self.gpu;
            gpu.gather_rows_into(&old.keys, self.len, self.kv_dim, &index, &mut fresh.keys)?;
            if let (Some(old), Some(fresh)) = (&old.values, &mut fresh.values) {
                gpu.gather_rows_into(old, self.len, self.kv_dim, &index, fresh)?;
            }
            let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
            gpu.stream
                .memcpy_htod(&pos, &mut fresh.positions.slice_mut(0..kept.len()))
                .map_err(copy_error("compacting the KV cache"))?;
        }
        self.bufs = Some(fresh);
        self.len = kept.len();
        Ok(())
    }

    fn shrink_to(&mut self, slots: usize) {
        let target = slots.max(self.len);
        if target >= self.capacity_slots() {
            return;
        }
        if target == 0 {
            self.bufs = None;
        } else {
            // Memory given back where it can be: on failure the larger buffers stay.
            self.reallocate(target).ok();
        }
    }

    fn allocated_bytes(&self) -> usize {
        // Keys and values (f32), a position (i32) and a validity byte per slot.
        self.capacity_slots() * (self.layout.stored_floats() * 4 + 4 + 1)
    }

    fn bytes(&self) -> usize {
        self.len * self.layout.stored_floats() * 4
    }

    fn to_host(&self) -> Result<HostRows<'_>> {
        let Some(b) = &self.bufs else {
            return Ok(HostRows {
                keys: Cow::Owned(Vec::new()),
                values: Cow::Owned(Vec::new()),
            });
        };
        let n = self.len * self.kv_dim;
        Ok(HostRows {
            keys: Cow::Owned(self.gpu.download(&b.keys, n, "KV cache keys")?),
            values: Cow::Owned(match &b.values {
                Some(v) => self.gpu.download(v, n, "KV cache values")?,
                None => Vec::new(),
            }),
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
