//! What the eviction policies know about each cached token: the attention mass it has received
//! (H2O) and when it last received significant attention and its longest gap between two such
//! steps, its maximum recurrence interval (LazyEviction). One [`SlotStats`] per layer, slot
//! for slot beside the layer's cache.

/// Per-slot statistics of one layer, in the cache's slot order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotStats {
    /// Attention mass accumulated over every query row (mean over the heads).
    pub mass: Vec<f32>,
    /// Step (query position) of the last significant attention; the token's own position until
    /// it receives any, so its arrival counts as the first.
    pub last_hit: Vec<u32>,
    /// Longest interval between two consecutive significant steps (arrival included).
    pub mri: Vec<u32>,
}

impl SlotStats {
    pub fn len(&self) -> usize {
        self.mass.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mass.is_empty()
    }

    pub fn clear(&mut self) {
        self.mass.clear();
        self.last_hit.clear();
        self.mri.clear();
    }

    /// Adds the slots the cache gained since the last call (appends go to the end).
    pub fn sync(&mut self, positions: &[u32]) {
        for &p in &positions[self.len().min(positions.len())..] {
            self.mass.push(0.0);
            self.last_hit.push(p);
            self.mri.push(0);
        }
    }

    /// Takes one query row's attention: `mass[s]` is what slot `s` received from the query at
    /// position `query` (mean over heads, so a row sums to 1). A slot's attention is significant
    /// above `threshold` times the uniform share of the slots the query sees; the query's own
    /// slot is its arrival, not a recurrence.
    pub fn observe(&mut self, positions: &[u32], query: usize, mass: &[f32], threshold: f32) {
        self.sync(positions);
        let q = query as u32;
        let visible = positions.iter().filter(|&&p| p <= q).count().max(1);
        let cut = threshold / visible as f32;
        for (s, &m) in mass.iter().enumerate().take(positions.len()) {
            self.mass[s] += m;
            if m > cut && positions[s] < q && self.last_hit[s] < q {
                self.mri[s] = self.mri[s].max(q - self.last_hit[s]);
                self.last_hit[s] = q;
            }
        }
    }

    /// Keeps slots `kept` (ascending), moved to the front in order.
    pub fn retain(&mut self, kept: &[u32]) {
        for (i, &s) in kept.iter().enumerate() {
            let s = s as usize;
            self.mass[i] = self.mass[s];
            self.last_hit[i] = self.last_hit[s];
            self.mri[i] = self.mri[s];
        }
        self.mass.truncate(kept.len());
        self.last_hit.truncate(kept.len());
        self.mri.truncate(kept.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token hit at steps 5 and 25 after arriving at 2 has recurrence intervals 3 and 20.
    #[test]
    fn tracks_the_longest_recurrence_interval() {
        let positions: Vec<u32> = (0..4).collect();
        let mut st = SlotStats::default();
        let mut mass = vec![0.05f32; 4];
        mass[2] = 0.85;
        st.observe(&positions, 5, &mass, 1.0);
        assert_eq!((st.last_hit[2], st.mri[2]), (5, 3));
        // Below the uniform share (1/4): not significant, but accumulated.
        st.observe(&positions, 9, &[0.2, 0.2, 0.2, 0.4], 1.0);
        assert_eq!((st.last_hit[2], st.mri[2]), (5, 3));
        st.observe(&positions, 25, &mass, 1.0);
        assert_eq!((st.last_hit[2], st.mri[2]), (25, 20));
        assert_eq!(st.last_hit[0], 0);
        assert!((st.mass[2] - 1.9).abs() < 1e-6);
    }
}
