//! The KV cache: per layer, keys and values in slots with an explicit slot → position map.
//!
//! Attention reads slots, never assumes slot i holds position i, so an eviction policy may drop
//! tokens (compacting slots) without the engine noticing. Keys are stored already rotated by
//! RoPE at their true position. The keys and values themselves live in the backend's own
//! storage (`storage`): the backend appends and attends; this module keeps the position map,
//! the budgets and the policies, and tells the storage what to keep.
//!
//! With an [`EvictionConfig`] the cache holds at most a budget of slots per layer: when a step
//! would overflow it, the engine asks the backend to evict (see `evict`) down to
//! `budget − window`, ranking slots by the statistics the attention kernel reported (`stats`).
//!
//! A layer evicts as a whole (one position map: a slot holds every KV head of its token) or,
//! with [`Granularity::Head`], per KV head: each head's slice of a slot may hold another
//! token, so each head has its own position map and statistics. All heads hold the same number
//! of slots, and the tokens a step appends take the same slots in every head; the storage
//! layout stays `[slot][kv_dim]`.
//!
//! A slot is a key and a value of `kv_dim` floats, or under multi-head latent attention one
//! row whose prefix is the value ([`KvLayout::key_prefix`]: DeepSeek's latent, stored once;
//! the layer then has one KV head, so eviction keeps or drops whole rows).

pub(crate) mod evict;
pub(crate) mod mass;
pub mod plan;
pub(crate) mod policy;
pub(crate) mod rewind;
pub(crate) mod shape;
pub(crate) mod stats;
pub mod storage;
#[cfg(test)]
pub(crate) mod testing;

pub use plan::{KvDemand, KvPlan};
pub use policy::{Budget, EvictionConfig, Granularity, KvOptions, Policy};
pub use shape::{AttentionShape, Segment};
pub use stats::SlotStats;
pub use storage::{HostRows, KvLayout, KvStorage};

use crate::error::{Error, Result};

/// One layer of a sequence's cache: the position of the token in each slot, and the keys and
/// values in a storage the backend owns (none until a backend first appends, or the engine
/// made the cache with its backend's). Storage and position maps always hold the same slots.
#[derive(Debug, Default)]
pub struct LayerCache {
    /// Slot → position (KV head 0's where each head keeps its own tokens).
    positions: Vec<u32>,
    /// Per-KV-head eviction only: the position maps of KV heads 1.. (empty otherwise).
    other_heads: Vec<Vec<u32>>,
    storage: Option<Box<dyn KvStorage>>,
}

#[derive(Debug)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    layout: KvLayout,
    /// Position the next appended token takes (tokens seen so far, evicted or not).
    next_position: usize,
    /// The budget and policy, with per-layer slot statistics; `None` keeps every token.
    eviction: Option<Eviction>,
}

/// A cache's eviction plan and what its policy has observed.
#[derive(Debug, Clone)]
pub struct Eviction {
    pub config: EvictionConfig,
    /// Position maps (and statistics) per layer: 1, or the KV heads with per-head eviction.
    pub heads: usize,
    /// Per layer, per position map (layer `l`'s are `stats[l·heads..(l+1)·heads]`).
    pub stats: Vec<SlotStats>,
    /// Evictions run so far (per layer, counted once).
    pub evictions: usize,
}

impl KvCache {
    /// A cache whose layers get their storage from the backend that first appends to them
    /// (until then, reserving room reserves only their position maps).
    pub fn new(num_layers: usize, kv_dim: usize) -> KvCache {
        KvCache::with_storage(num_layers, kv_dim, |_| None)
    }

    /// A cache whose layers start with the storage `make` gives for `kv_dim` (a backend's empty
    /// one), so room reserved before the first step is real memory.
    pub fn with_storage(
        num_layers: usize,
        kv_dim: usize,
        mut make: impl FnMut(usize) -> Option<Box<dyn KvStorage>>,
    ) -> KvCache {
        KvCache::with_layout(num_layers, KvLayout::separate(kv_dim), |l| make(l.key_dim))
    }

    /// [`Self::with_storage`] for slots of `layout` (multi-head latent attention's one row a
    /// token).
    pub fn with_layout(
        num_layers: usize,
        layout: KvLayout,
        mut make: impl FnMut(KvLayout) -> Option<Box<dyn KvStorage>>,
    ) -> KvCache {
        KvCache {
            layers: (0..num_layers)
                .map(|_| LayerCache {
                    positions: Vec::new(),
                    other_heads: Vec::new(),
                    storage: make(layout),
                })
                .collect(),
            layout,
            next_position: 0,
            eviction: None,
        }
    }

    /// Sets (or with `None` removes) the eviction plan of a cache whose layers have `kv_heads`
    /// KV heads; the statistics start empty. A per-head plan gives every head its own position
    /// map (a copy of the layer's); going back to one map is refused once the heads' tokens
    /// differ (clear the cache first).
    pub fn set_eviction(&mut self, config: Option<EvictionConfig>, kv_heads: usize) -> Result<()> {
        let heads = match config {
            Some(c) if c.per_head() => kv_heads,
            _ => 1,
        };
        if heads == 0 || !self.layout.key_dim.is_multiple_of(heads) {
            return Err(Error::invalid(format!(
                "per-KV-head eviction of {heads} heads in a cache of {} floats a slot",
                self.layout.key_dim
            )));
        }
        for l in &mut self.layers {
            l.set_position_maps(heads)?;
        }
        let layers = self.layers.len();
        self.eviction = config.map(|config| Eviction {
            config,
            heads,
            stats: vec![SlotStats::default(); layers * heads],
            evictions: 0,
        });
        Ok(())
    }

    pub fn eviction(&self) -> Option<&Eviction> {
        self.eviction.as_ref()
    }

    pub fn eviction_mut(&mut self) -> Option<&mut Eviction> {
        self.eviction.as_mut()
    }

    /// The layers and the eviction state together (an eviction changes both).
    pub fn parts_mut(&mut self) -> (&mut [LayerCache], Option<&mut Eviction>) {
        (&mut self.layers, self.eviction.as_mut())
    }

    /// The plan, if any.
    pub fn eviction_config(&self) -> Option<EvictionConfig> {
        self.eviction.as_ref().map(|e| e.config)
    }

    /// How many tokens the next step may add: all it likes without a budget; up to the budget
    /// while there is room; one observation window once the cache is full (the step then starts
    /// with an eviction). Steps this long evict at the same moments as single-token steps.
    pub fn room(&self) -> usize {
        match self.eviction_config() {
            None => usize::MAX,
            Some(c) if self.len_tokens() < c.budget => c.budget - self.len_tokens(),
            Some(c) => c.window,
        }
    }

    /// Slots held in the fullest layer.
    pub fn len_tokens(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.positions.len())
            .max()
            .unwrap_or(0)
    }

    /// Reserves room for `tokens` more tokens in every layer, so appending during decoding
    /// never stops to grow (and copy) the buffers.
    pub fn reserve(&mut self, tokens: usize) {
        // With a budget, a layer never holds more than the budget.
        let tokens = match &mut self.eviction {
            None => tokens,
            Some(e) => {
                let held = self
                    .layers
                    .iter()
                    .map(|l| l.positions.len())
                    .max()
                    .unwrap_or(0);
                let tokens = tokens.min(e.config.budget.saturating_sub(held));
                if e.config.needs_attention() {
                    for st in &mut e.stats {
                        st.mass.reserve_exact(tokens);
                        st.last_hit.reserve_exact(tokens);
                        st.mri.reserve_exact(tokens);
                    }
                }
                tokens
            }
        };
        // Exact: what `--mem` reserved for a sequence is what its cache allocates.
        for l in &mut self.layers {
            if let Some(s) = &mut l.storage {
                s.reserve_exact(tokens);
            }
            l.positions.reserve_exact(tokens);
            for map in &mut l.other_heads {
                map.reserve_exact(tokens);
            }
        }
    }

    /// Room for `new` more tokens in every layer. Growth doubles, so appending stays cheap, but
    /// stops at `cap` slots (the model's context: what `--mem` reserved for a sequence that may
    /// fill it) unless the step itself needs more.
    pub fn make_room(&mut self, new: usize, cap: usize) {
        let len = self.len_tokens();
        let need = len.saturating_add(new);
        if self.capacity_tokens() >= need {
            return;
        }
        let target = need.max(len.saturating_mul(2)).min(cap.max(need));
        self.reserve(target - len);
    }

    /// Slots every layer can hold without reallocating (none in a layer without storage).
    pub fn capacity_tokens(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                let kv = l.storage.as_ref().map_or(0, |s| s.capacity_slots());
                kv.min(l.positions.capacity())
            })
            .min()
            .unwrap_or(0)
    }

    /// Gives back memory beyond `tokens` slots per layer (a recycled cache that held a longer
    /// sequence), so a budgeted sequence never holds more than its budget. Empty caches only.
    pub fn shrink_to(&mut self, tokens: usize) {
        for l in &mut self.layers {
            if let Some(s) = &mut l.storage {
                s.shrink_to(tokens);
            }
            l.positions.shrink_to(tokens);
            for map in &mut l.other_heads {
                map.shrink_to(tokens);
            }
        }
        if let Some(e) = &mut self.eviction {
            for st in &mut e.stats {
                st.mass.shrink_to(tokens);
                st.last_hit.shrink_to(tokens);
                st.mri.shrink_to(tokens);
            }
        }
    }

    pub fn next_position(&self) -> usize {
        self.next_position
    }

    /// Marks `n` tokens as processed (after every layer appended them).
    pub fn advance(&mut self, n: usize) {
        self.next_position += n;
    }

    /// Floats per key.
    pub fn kv_dim(&self) -> usize {
        self.layout.key_dim
    }

    /// What each slot holds.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Slots held in layer `l`.
    pub fn len(&self, l: usize) -> usize {
        self.layers[l].positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.next_position == 0
    }

    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.storage.as_ref().map_or(0, |s| s.bytes())
                    + l.positions.len() * 4 * (1 + l.other_heads.len())
            })
            .sum()
    }

    /// Bytes the cache's buffers have allocated (what it holds in memory, reserve included).
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.storage.as_ref().map_or(0, |s| s.allocated_bytes())
                    + l.positions.capacity() * 4
                    + l.other_heads
                        .iter()
                        .map(|m| m.capacity() * 4)
                        .sum::<usize>()
            })
            .sum::<usize>()
            + self.eviction.as_ref().map_or(0, |e| {
                e.stats
                    .iter()
                    .map(|s| (s.mass.capacity() + s.last_hit.capacity() + s.mri.capacity()) * 4)
                    .sum()
            })
    }

    pub fn clear(&mut self) {
        for l in &mut self.layers {
            l.truncate(0);
        }
        if let Some(e) = &mut self.eviction {
            e.stats.iter_mut().for_each(SlotStats::clear);
            e.evictions = 0;
        }
        self.next_position = 0;
    }
}

impl Eviction {
    /// Layer `l`'s statistics, one per position map.
    pub fn layer_stats_mut(&mut self, l: usize) -> &mut [SlotStats] {
        &mut self.stats[l * self.heads..(l + 1) * self.heads]
    }
}

impl LayerCache {
    /// A layer holding `storage`'s slots at `positions` (one each).
    pub fn with_storage(positions: Vec<u32>, storage: Box<dyn KvStorage>) -> Result<LayerCache> {
        if storage.len_slots() != positions.len() {
            return Err(Error::invalid(format!(
                "a KV storage of {} slots given {} positions",
                storage.len_slots(),
                positions.len()
            )));
        }
        Ok(LayerCache {
            positions,
            other_heads: Vec::new(),
            storage: Some(storage),
        })
    }

    /// A layer whose KV heads keep their own tokens: head `h`'s slice of each slot of `storage`
    /// holds the token at `head_positions[h][slot]` (as many slots for every head).
    pub fn with_head_storage(
        head_positions: Vec<Vec<u32>>,
        storage: Box<dyn KvStorage>,
    ) -> Result<LayerCache> {
        let heads = head_positions.len();
        let slots = storage.len_slots();
        if heads == 0
            || !storage.kv_dim().is_multiple_of(heads)
            || head_positions.iter().any(|m| m.len() != slots)
        {
            return Err(Error::invalid(format!(
                "a KV storage of {slots} slots of {} floats given {heads} position maps of {:?} \
                 slots",
                storage.kv_dim(),
                head_positions.iter().map(Vec::len).collect::<Vec<_>>()
            )));
        }
        let mut maps = head_positions.into_iter();
        let positions = maps.next().unwrap_or_default();
        Ok(LayerCache {
            positions,
            other_heads: maps.collect(),
            storage: Some(storage),
        })
    }

    /// Position of the token held in each slot; where each KV head keeps its own tokens, KV
    /// head 0's (see [`Self::head_positions`]).
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// Position maps the layer keeps: 1, or one per KV head with per-head eviction.
    pub fn position_maps(&self) -> usize {
        1 + self.other_heads.len()
    }

    /// Whether each KV head keeps its own tokens (and position map).
    pub fn per_head(&self) -> bool {
        !self.other_heads.is_empty()
    }

    /// Position of the token KV head `head` holds in each slot (the layer's map when the
    /// layer evicts as a whole).
    pub fn head_positions(&self, head: usize) -> &[u32] {
        match head {
            0 => &self.positions,
            h => self.other_heads.get(h - 1).unwrap_or(&self.positions),
        }
    }

    /// Gives the layer `maps` position maps (1: one for the layer; else one per KV head), each
    /// a copy of the layer's; one map again only while every head holds the same tokens.
    fn set_position_maps(&mut self, maps: usize) -> Result<()> {
        if maps == self.position_maps() {
            return Ok(());
        }
        if self.other_heads.iter().any(|m| *m != self.positions) {
            return Err(Error::invalid(
                "a KV cache whose heads hold different tokens cannot change its granularity \
                 (clear it first)",
            ));
        }
        self.other_heads = vec![self.positions.clone(); maps.saturating_sub(1)];
        Ok(())
    }

    /// Slots held.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// The keys and values, if a backend has made their storage yet.
    pub fn storage(&self) -> Option<&dyn KvStorage> {
        self.storage.as_deref()
    }

    /// The storage as backend type `S`, if it is one.
    pub fn storage_as<S: KvStorage>(&self) -> Option<&S> {
        self.storage.as_deref()?.as_any().downcast_ref()
    }

    /// Appends slots at `positions`: `write` adds exactly that many keys and values to the
    /// layer's storage, which is the calling backend's own type `S`. A layer without storage, or
    /// with another backend's, first gets the one `adopt` makes of it and the slots' positions
    /// (the same slots, in `S`).
    pub fn append_with<S: KvStorage>(
        &mut self,
        positions: &[usize],
        adopt: impl FnOnce(Option<&dyn KvStorage>, &[u32]) -> Result<S>,
        write: impl FnOnce(&mut S) -> Result<()>,
    ) -> Result<()> {
        if self.storage_as::<S>().is_none() {
            let own = adopt(self.storage.as_deref(), &self.positions)?;
            if own.len_slots() != self.positions.len() {
                return Err(Error::invalid(format!(
                    "a backend adopted a KV layer of {} slots as {}",
                    self.positions.len(),
                    own.len_slots()
                )));
            }
            self.storage = Some(Box::new(own));
        }
        let Some(own) = self
            .storage
            .as_deref_mut()
            .and_then(|s| s.as_any_mut().downcast_mut::<S>())
        else {
            unreachable!("the layer's storage was just made the backend's own");
        };
        write(own)?;
        let held = own.len_slots();
        self.positions.extend(positions.iter().map(|&p| p as u32));
        for map in &mut self.other_heads {
            map.extend(positions.iter().map(|&p| p as u32));
        }
        assert_eq!(
            held,
            self.positions.len(),
            "a backend appended a different number of KV slots than positions"
        );
        Ok(())
    }

    /// Keeps the first `slots` slots.
    pub(crate) fn truncate(&mut self, slots: usize) {
        if let Some(s) = &mut self.storage {
            s.truncate(slots);
        }
        self.positions.truncate(slots);
        for map in &mut self.other_heads {
            map.truncate(slots);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{append, vec_cache};
    use super::KvCache;

    fn fill(cache: &mut KvCache, tokens: usize) {
        let kv = vec![0.5f32; cache.kv_dim()];
        for _ in 0..tokens {
            let pos = cache.next_position();
            for layer in cache.parts_mut().0 {
                append(layer, &kv, &kv, pos);
            }
            cache.advance(1);
        }
    }

    #[test]
    fn growth_doubles_but_stops_at_the_cap() {
        let mut cache = vec_cache(2, 8);
        cache.reserve(4);
        fill(&mut cache, 4);
        assert_eq!(cache.capacity_tokens(), 4);
        cache.make_room(1, 100);
        assert_eq!(cache.capacity_tokens(), 8, "doubles below the cap");
        fill(&mut cache, 4);
        cache.make_room(1, 10);
        assert_eq!(cache.capacity_tokens(), 10, "stops at the cap");
        fill(&mut cache, 2);
        cache.make_room(3, 10);
        assert_eq!(
            cache.capacity_tokens(),
            13,
            "past the cap, only what the step needs"
        );
        let before = cache.capacity_tokens();
        cache.make_room(0, 10);
        assert_eq!(cache.capacity_tokens(), before, "no growth without need");
    }
}
