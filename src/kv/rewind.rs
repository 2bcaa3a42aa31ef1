//! Undoing a failed step: a [`Mark`] taken before a forward step lets the cache drop what that
//! step appended, so a server can retry the other sequences of a batch that failed (one bad
//! sequence must not end the rest). Exact only when the step changed nothing else: no eviction
//! ran, and no policy folded the step's attention into its statistics.

use super::KvCache;

/// Where a cache stood before a step.
#[derive(Debug, Clone)]
pub struct Mark {
    lens: Vec<usize>,
    next_position: usize,
    evictions: usize,
}

impl KvCache {
    /// The cache's state now, for [`KvCache::rewind`].
    pub fn mark(&self) -> Mark {
        Mark {
            lens: self.layers.iter().map(|l| l.positions.len()).collect(),
            next_position: self.next_position,
            evictions: self.eviction.as_ref().map_or(0, |e| e.evictions),
        }
    }

    /// Back to `mark`, dropping the slots appended since; false (cache untouched) where that
    /// would not restore it exactly.
    pub fn rewind(&mut self, mark: &Mark) -> bool {
        if let Some(e) = &self.eviction {
            if e.evictions != mark.evictions || e.config.needs_attention() {
                return false;
            }
        }
        let fits = self.layers.len() == mark.lens.len()
            && self
                .layers
                .iter()
                .zip(&mark.lens)
                .all(|(l, &n)| l.positions.len() >= n);
        if !fits || self.next_position < mark.next_position {
            return false;
        }
        for (l, &n) in self.layers.iter_mut().zip(&mark.lens) {
            l.truncate(n);
        }
        if let Some(e) = &mut self.eviction {
            let heads = e.heads;
            for (st, &n) in e
                .stats
                .iter_mut()
                .zip(mark.lens.iter().flat_map(|n| std::iter::repeat_n(n, heads)))
            {
                st.mass.truncate(n);
                st.last_hit.truncate(n);
                st.mri.truncate(n);
            }
        }
        self.next_position = mark.next_position;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::testing::{append, VecKv};
    use crate::kv::SlotStats;

    fn rows(c: &KvCache, l: usize) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
        let layer = &c.layers[l];
        let s = layer.storage_as::<VecKv>().expect("a VecKv layer");
        (s.keys.clone(), s.values.clone(), layer.positions().to_vec())
    }

    #[test]
    fn rewind_drops_what_a_step_appended() {
        let mut c = KvCache::new(2, 2);
        append(&mut c.layers[0], &[1.0, 2.0], &[3.0, 4.0], 0);
        append(&mut c.layers[1], &[5.0, 6.0], &[7.0, 8.0], 0);
        c.advance(1);
        let before = [rows(&c, 0), rows(&c, 1)];
        let mark = c.mark();
        // A step that failed after the first layer appended its tokens.
        append(&mut c.layers[0], &[9.0, 9.0], &[9.0, 9.0], 1);
        append(&mut c.layers[0], &[9.0, 9.0], &[9.0, 9.0], 2);
        assert!(c.rewind(&mark));
        assert_eq!([rows(&c, 0), rows(&c, 1)], before);
        assert_eq!(c.next_position(), 1);
        // Also after the step advanced the position.
        append(&mut c.layers[1], &[9.0, 9.0], &[9.0, 9.0], 1);
        c.advance(1);
        assert!(c.rewind(&mark));
        assert_eq!((c.next_position(), c.len(1)), (1, 1));
        // A cache emptied since cannot go back.
        c.clear();
        assert!(!c.rewind(&mark));
    }

    /// A cache whose KV heads keep their own tokens: a rewind drops what the step appended in
    /// every head's map; `clear` empties them all; the granularity changes back only while the
    /// heads hold the same tokens.
    #[test]
    fn per_head_maps_rewind_clear_and_switch() {
        use crate::kv::evict::compact_heads;
        use crate::kv::{Budget, Granularity, KvOptions, Policy};
        let opts = KvOptions {
            policy: Policy::Window,
            budget: Some(Budget::Tokens(10)),
            window: 2,
            sinks: 1,
            granularity: Granularity::Head,
            ..KvOptions::default()
        };
        let mut c = KvCache::new(1, 4);
        c.set_eviction(opts.resolve(0).unwrap(), 2).unwrap();
        for p in 0..4 {
            append(&mut c.layers[0], &[p as f32; 4], &[0.0; 4], p);
            c.advance(1);
        }
        assert_eq!(c.layers[0].position_maps(), 2);
        // Head 1 drops its token 1, head 0 its token 2 (as a per-head eviction would).
        let stats = &mut [SlotStats::default(), SlotStats::default()];
        compact_heads(&mut c.layers[0], stats, &[vec![0, 1, 3], vec![0, 2, 3]]).unwrap();
        let before = (rows(&c, 0), c.layers[0].head_positions(1).to_vec());
        assert_eq!(before.0 .2, [0, 1, 3]);
        assert_eq!(before.1, [0, 2, 3]);
        // Slot 1 holds head 0's token 1 and head 1's token 2.
        assert_eq!(
            before.0 .0,
            [0., 0., 0., 0., 1., 1., 2., 2., 3., 3., 3., 3.]
        );
        let mark = c.mark();
        append(&mut c.layers[0], &[9.0; 4], &[9.0; 4], 4);
        c.advance(1);
        assert_eq!(c.layers[0].head_positions(1), [0, 2, 3, 4]);
        assert!(c.rewind(&mark));
        assert_eq!(
            (rows(&c, 0), c.layers[0].head_positions(1).to_vec()),
            before
        );
        assert!(
            c.set_eviction(None, 2).is_err(),
            "heads hold different tokens"
        );
        c.clear();
        assert!(c.layers[0].head_positions(1).is_empty());
        c.set_eviction(None, 2).unwrap();
        assert_eq!(c.layers[0].position_maps(), 1);
    }
}
