//! The KV cache: per layer, keys and values in slots with an explicit slot → position map.
//!
//! Attention reads slots, never assumes slot i holds position i, so an eviction policy may drop
//! tokens (compacting slots) without the engine noticing. Keys are stored already rotated by
//! RoPE at their true position.

#[derive(Debug, Clone)]
pub struct LayerCache {
    /// `len × kv_dim` keys, slot-major.
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
    /// Position of the token held in each slot.
    pub positions: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    kv_dim: usize,
    /// Position the next appended token takes (tokens seen so far, evicted or not).
    next_position: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, kv_dim: usize) -> KvCache {
        KvCache {
            layers: (0..num_layers)
                .map(|_| LayerCache {
                    keys: Vec::new(),
                    values: Vec::new(),
                    positions: Vec::new(),
                })
                .collect(),
            kv_dim,
            next_position: 0,
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
        let kv_dim = self.kv_dim;
        for l in &mut self.layers {
            l.keys.reserve(tokens * kv_dim);
            l.values.reserve(tokens * kv_dim);
            l.positions.reserve(tokens);
        }
    }

    pub fn next_position(&self) -> usize {
        self.next_position
    }

    /// Marks `n` tokens as processed (after every layer appended them).
    pub fn advance(&mut self, n: usize) {
        self.next_position += n;
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_dim
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
            .map(|l| (l.keys.len() + l.values.len()) * 4 + l.positions.len() * 4)
            .sum()
    }

    /// Bytes the cache's buffers have allocated (what it holds in memory, reserve included).
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.keys.capacity() + l.values.capacity() + l.positions.capacity()) * 4)
            .sum()
    }

    pub fn clear(&mut self) {
        for l in &mut self.layers {
            l.keys.clear();
            l.values.clear();
            l.positions.clear();
        }
        self.next_position = 0;
    }
}

impl LayerCache {
    pub fn append(&mut self, key: &[f32], value: &[f32], position: usize) {
        self.keys.extend_from_slice(key);
        self.values.extend_from_slice(value);
        self.positions.push(position as u32);
    }
}
