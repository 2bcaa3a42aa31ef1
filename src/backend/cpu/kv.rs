//! The CPU backend's K/V storage: keys and values in two host vectors, slot-major, grown only
//! where the cache asks (`reserve_exact`) or by `Vec`'s doubling, and compacted in place. A
//! layout whose values are key prefixes (multi-head latent attention) keeps the keys alone.

use crate::error::Result;
use crate::kv::{HostRows, KvLayout, KvStorage, LayerCache};
use std::any::Any;
use std::borrow::Cow;

/// `len × kv_dim` keys and as many values (none where the layout reads them from the keys),
/// slot-major.
#[derive(Debug, Clone)]
pub struct HostKv {
    layout: KvLayout,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl Default for HostKv {
    fn default() -> HostKv {
        HostKv::new(0)
    }
}

impl HostKv {
    pub fn new(kv_dim: usize) -> HostKv {
        HostKv::with_layout(KvLayout::separate(kv_dim))
    }

    /// An empty storage of slots laid out as `layout`.
    pub fn with_layout(layout: KvLayout) -> HostKv {
        HostKv {
            layout,
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    /// A storage holding `keys` and `values` (`kv_dim` floats a slot, as many slots each).
    pub fn from_rows(kv_dim: usize, keys: Vec<f32>, values: Vec<f32>) -> HostKv {
        HostKv::from_layout_rows(KvLayout::separate(kv_dim), keys, values)
    }

    /// A storage of `layout` holding `keys` and `values` (empty where the layout reads the
    /// values from the keys).
    pub fn from_layout_rows(layout: KvLayout, keys: Vec<f32>, values: Vec<f32>) -> HostKv {
        let whole = keys.len().is_multiple_of(layout.key_dim.max(1));
        let values_fit = match layout.value_prefix {
            None => values.len() == keys.len(),
            Some(_) => values.is_empty(),
        };
        assert!(
            whole && values_fit,
            "HostKv: keys and values of whole slots"
        );
        HostKv {
            layout,
            keys,
            values,
        }
    }

    /// The same slots as another backend's storage (read back to the host), or an empty one of
    /// `layout`.
    pub fn adopt(layout: KvLayout, other: Option<&dyn KvStorage>) -> Result<HostKv> {
        let Some(other) = other else {
            return Ok(HostKv::with_layout(layout));
        };
        let rows = other.to_host()?;
        Ok(HostKv::from_layout_rows(
            other.layout(),
            rows.keys.into_owned(),
            rows.values.into_owned(),
        ))
    }

    pub fn keys(&self) -> &[f32] {
        &self.keys
    }

    /// The value rows, `kv_dim` floats a slot; empty where the values are key prefixes (read
    /// them from [`Self::keys`]).
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Whether the values are read from the keys.
    pub fn values_in_keys(&self) -> bool {
        self.layout.value_prefix.is_some()
    }

    /// Appends whole slots: `keys` and `values` of `kv_dim` floats a slot (`values` unread
    /// where the layout takes them from the keys).
    pub fn extend(&mut self, keys: &[f32], values: &[f32]) {
        let d = self.layout.key_dim.max(1);
        debug_assert!(keys.len().is_multiple_of(d));
        self.keys.extend_from_slice(keys);
        if !self.values_in_keys() {
            debug_assert_eq!(keys.len(), values.len());
            self.values.extend_from_slice(values);
        }
    }

    /// Floats of value storage per slot (0 where the values are key prefixes).
    fn value_stride(&self) -> usize {
        if self.values_in_keys() {
            0
        } else {
            self.layout.key_dim
        }
    }
}

impl KvStorage for HostKv {
    fn kv_dim(&self) -> usize {
        self.layout.key_dim
    }

    fn layout(&self) -> KvLayout {
        self.layout
    }

    fn len_slots(&self) -> usize {
        self.keys.len() / self.layout.key_dim.max(1)
    }

    fn capacity_slots(&self) -> usize {
        let keys = self.keys.capacity() / self.layout.key_dim.max(1);
        match self.value_stride() {
            0 => keys,
            v => keys.min(self.values.capacity() / v),
        }
    }

    fn reserve_exact(&mut self, more: usize) {
        self.keys.reserve_exact(more * self.layout.key_dim);
        self.values.reserve_exact(more * self.value_stride());
    }

    fn truncate(&mut self, slots: usize) {
        self.keys.truncate(slots * self.layout.key_dim);
        self.values.truncate(slots * self.value_stride());
    }

    fn keep(&mut self, kept: &[u32], _positions: &[u32]) -> Result<()> {
        let (d, vd) = (self.layout.key_dim, self.value_stride());
        for (i, &s) in kept.iter().enumerate() {
            let s = s as usize;
            assert!(s >= i, "keep: kept slots must be ascending");
            if s != i {
                self.keys.copy_within(s * d..(s + 1) * d, i * d);
                self.values.copy_within(s * vd..(s + 1) * vd, i * vd);
            }
        }
        self.truncate(kept.len());
        Ok(())
    }

    /// In place, head by head: a head's kept slots are ascending, so each moves only towards
    /// the front, over slices no other head touches.
    fn keep_heads(&mut self, kept: &[u32], head_dim: usize) -> Result<()> {
        let (d, vd) = (self.layout.key_dim, self.value_stride());
        assert!(
            head_dim > 0 && d.is_multiple_of(head_dim),
            "keep_heads: head_dim must divide kv_dim"
        );
        let heads = d / head_dim;
        assert!(
            kept.len().is_multiple_of(heads),
            "keep_heads: the same number of slots for every head"
        );
        let k = kept.len() / heads;
        for h in 0..heads {
            for (i, &s) in kept[h * k..(h + 1) * k].iter().enumerate() {
                let s = s as usize;
                assert!(s >= i, "keep_heads: kept slots must be ascending");
                if s != i {
                    let (from, to) = (s * d + h * head_dim, i * d + h * head_dim);
                    self.keys.copy_within(from..from + head_dim, to);
                    if vd > 0 {
                        self.values.copy_within(from..from + head_dim, to);
                    }
                }
            }
        }
        self.truncate(k);
        Ok(())
    }

    fn shrink_to(&mut self, slots: usize) {
        self.keys.shrink_to(slots * self.layout.key_dim);
        self.values.shrink_to(slots * self.value_stride());
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

/// A layer's keys and values as the CPU kernels read them: its own storage borrowed, another
/// backend's read back (only where a cache reaches the CPU without having been appended to by
/// it), none for a layer without storage.
pub fn host_kv(cache: &LayerCache) -> Cow<'_, HostKv> {
    match cache.storage() {
        None => Cow::Owned(HostKv::default()),
        Some(s) => match s.as_any().downcast_ref::<HostKv>() {
            Some(own) => Cow::Borrowed(own),
            None => Cow::Owned(
                HostKv::adopt(s.layout(), Some(s))
                    .unwrap_or_else(|e| panic!("edgemoe: reading the KV cache back failed: {e}")),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::evict::compact;
    use crate::kv::testing::{append, VecKv};
    use crate::kv::{KvCache, SlotStats};

    fn layer(kv_dim: usize, slots: usize) -> LayerCache {
        let n = slots * kv_dim;
        let keys: Vec<f32> = (0..n).map(|v| v as f32).collect();
        let values: Vec<f32> = (0..n).map(|v| -(v as f32)).collect();
        let storage = HostKv::from_rows(kv_dim, keys, values);
        LayerCache::with_storage((0..slots as u32).collect(), Box::new(storage)).unwrap()
    }

    /// Eviction's compaction moves the kept rows to the front in place, as the plain gather of
    /// the test storage does, and keeps the capacity for the next appends.
    #[test]
    fn compaction_matches_a_plain_gather_and_keeps_capacity() {
        let (kv_dim, slots) = (3, 9);
        let mut host = layer(kv_dim, slots);
        let plain = VecKv {
            kv_dim,
            keys: host_kv(&host).keys().to_vec(),
            values: host_kv(&host).values().to_vec(),
        };
        let mut plain =
            LayerCache::with_storage((0..slots as u32).collect(), Box::new(plain)).unwrap();
        let cap = host.storage().unwrap().capacity_slots();
        let kept = [0u32, 2, 3, 7, 8];
        for cache in [&mut host, &mut plain] {
            compact(cache, &mut SlotStats::default(), &kept).unwrap();
        }
        assert_eq!(host.positions(), kept);
        let (h, p) = (host_kv(&host), plain.storage().unwrap().to_host().unwrap());
        assert_eq!((h.keys(), h.values()), (&*p.keys, &*p.values));
        assert_eq!(h.keys()[3..6], [6., 7., 8.]);
        assert_eq!(host.storage().unwrap().capacity_slots(), cap);
    }

    /// What a cache reserves is what its storage allocates, and `shrink_to` gives back the rest.
    #[test]
    fn reserves_exactly_and_shrinks() {
        let mut cache = KvCache::with_storage(2, 4, |d| {
            Some(Box::new(HostKv::new(d)) as Box<dyn KvStorage>)
        });
        cache.reserve(10);
        assert_eq!(cache.capacity_tokens(), 10);
        // Keys, values and positions: (4 + 4 + 1) floats a slot, two layers.
        assert_eq!(cache.allocated_bytes(), 2 * 10 * 9 * 4);
        cache.shrink_to(3);
        assert_eq!(cache.capacity_tokens(), 3);
    }

    /// A layer whose storage is another backend's is adopted on the CPU backend's first append:
    /// the same rows, then the new one, in the CPU's storage.
    #[test]
    fn an_append_adopts_another_backends_storage() {
        use crate::backend::{cpu::CpuBackend, Backend};
        let be = CpuBackend::new(1).unwrap();
        let mut cache = LayerCache::default();
        append(&mut cache, &[1.0, 2.0], &[3.0, 4.0], 0);
        append(&mut cache, &[5.0, 6.0], &[7.0, 8.0], 4);
        assert!(cache.storage_as::<VecKv>().is_some());
        let k = be.upload_rows(vec![0.0, 0.0, 9.0, 10.0], 2);
        let v = be.upload_rows(vec![0.0, 0.0, 11.0, 12.0], 2);
        be.append_kv(&mut cache, &k, &v, 1..2, &[0, 6]);
        let own = cache.storage_as::<HostKv>().expect("adopted");
        assert_eq!(own.keys(), [1.0, 2.0, 5.0, 6.0, 9.0, 10.0]);
        assert_eq!(own.values(), [3.0, 4.0, 7.0, 8.0, 11.0, 12.0]);
        assert_eq!(cache.positions(), [0, 4, 6]);
    }

    /// Latent rows (values are key prefixes): the storage holds the keys alone. What a cache
    /// reserves is what the plan counts (one row and a position a slot), an append ignores the
    /// values it is given, compaction moves the rows in place keeping capacity, and another
    /// storage adopting it keeps the layout.
    #[test]
    fn latent_rows_store_the_keys_alone() {
        use crate::backend::{cpu::CpuBackend, Backend};
        use crate::kv::{KvDemand, KvLayout};
        let layout = KvLayout::key_prefix(6, 4);
        let mut cache = KvCache::with_layout(2, layout, |l| {
            Some(Box::new(HostKv::with_layout(l)) as Box<dyn KvStorage>)
        });
        cache.reserve(10);
        assert_eq!(cache.capacity_tokens(), 10);
        let demand = KvDemand {
            reach: 10,
            ..KvDemand::default()
        };
        let plan = demand.plan(2, layout, 1, 4096).unwrap();
        assert_eq!(plan.bytes_per_token, 2 * (6 * 4 + 4));
        assert_eq!(cache.allocated_bytes() as u64, plan.bytes());
        let be = CpuBackend::new(1).unwrap();
        let k = be.upload_rows((0..30).map(|v| v as f32).collect(), 6);
        let v = be.upload_rows(vec![-1.0; 30], 6);
        for layer in &mut cache.layers {
            be.append_kv(layer, &k, &v, 0..5, &[0, 1, 2, 3, 4]);
        }
        cache.advance(5);
        assert_eq!(cache.bytes(), 2 * 5 * (6 * 4 + 4));
        let own = cache.layers[0].storage_as::<HostKv>().unwrap();
        assert!(own.values().is_empty() && own.values_in_keys());
        assert_eq!(own.keys(), (0..30).map(|v| v as f32).collect::<Vec<_>>());
        compact(&mut cache.layers[0], &mut SlotStats::default(), &[1, 3, 4]).unwrap();
        let own = host_kv(&cache.layers[0]);
        let want: Vec<f32> = [1, 3, 4]
            .iter()
            .flat_map(|s| (s * 6..s * 6 + 6).map(|v| v as f32))
            .collect();
        assert_eq!(own.keys(), want);
        assert_eq!(cache.layers[0].storage().unwrap().capacity_slots(), 10);
        let adopted = HostKv::adopt(KvLayout::separate(1), cache.layers[0].storage()).unwrap();
        assert_eq!((adopted.layout(), adopted.keys()), (layout, &want[..]));
    }
}
