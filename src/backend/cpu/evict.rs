//! The CPU backend's eviction step: the same kept set as the reference
//! ([`crate::kv::evict::kept_slots_reference`]), found by a partial selection (linear time)
//! instead of a full sort of the candidates.

use crate::error::Result;
use crate::kv::evict::{compact, keep_order, protected};
use crate::kv::{EvictionConfig, LayerCache, SlotStats};

/// The slots that survive an eviction at step `now`, ascending.
pub fn kept_slots(
    cfg: &EvictionConfig,
    positions: &[u32],
    stats: &SlotStats,
    now: usize,
) -> Vec<u32> {
    let n = positions.len();
    if n <= cfg.keep() {
        return (0..n as u32).collect();
    }
    let (mut kept, mut rest): (Vec<usize>, Vec<usize>) =
        (0..n).partition(|&s| protected(cfg, positions[s], now));
    let room = cfg.keep().saturating_sub(kept.len()).min(rest.len());
    if room > 0 && room < rest.len() {
        // The order is total, so the first `room` after the selection are exactly the
        // reference's first `room` after its sort.
        rest.select_nth_unstable_by(room - 1, |&a, &b| {
            keep_order(cfg, positions, stats, now, a, b)
        });
    }
    kept.extend_from_slice(&rest[..room]);
    kept.sort_unstable();
    kept.into_iter().map(|s| s as u32).collect()
}

/// Evicts one layer down to its plan's `keep()` slots.
pub fn evict(
    cfg: &EvictionConfig,
    cache: &mut LayerCache,
    stats: &mut SlotStats,
    now: usize,
) -> Result<()> {
    let kept = kept_slots(cfg, cache.positions(), stats, now);
    compact(cache, stats, &kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::evict::kept_slots_reference;
    use crate::kv::{Budget, KvOptions, Policy};
    use crate::util::rng::SplitMix64;

    /// On random statistics with many ties (small integer masses and hit steps), the partial
    /// selection keeps exactly the reference's set for every policy and budget.
    #[test]
    fn keeps_the_same_set_as_the_reference() {
        let mut rng = SplitMix64::new(5);
        for trial in 0..60 {
            let n = 40 + trial * 7;
            let now = n + 3;
            // Positions with gaps, as after earlier evictions.
            let positions: Vec<u32> = (0..n as u32).map(|p| p + p / 5).collect();
            let now = now + n / 5;
            let mut stats = SlotStats::default();
            stats.sync(&positions);
            for (s, &p) in positions.iter().enumerate() {
                stats.mass[s] = (rng.next_u64() % 4) as f32 * 0.5;
                let hit = p + (rng.next_u64() % 30) as u32;
                stats.last_hit[s] = hit.min(now as u32 - 1);
                stats.mri[s] = (rng.next_u64() % 25) as u32;
            }
            for (policy, recent) in [
                (Policy::Window, 0.0),
                (Policy::H2o, 0.0),
                (Policy::Lazy, 0.0),
                (Policy::H2o, 0.5),
                (Policy::Lazy, 0.5),
            ] {
                for budget in [20, n / 2 + 10, n - 1] {
                    let cfg = KvOptions {
                        policy,
                        budget: Some(Budget::Tokens(budget)),
                        window: 6,
                        sinks: 3,
                        threshold: 1.0,
                        recent,
                    }
                    .resolve(0)
                    .unwrap()
                    .unwrap();
                    let want = kept_slots_reference(&cfg, &positions, &stats, now);
                    let got = kept_slots(&cfg, &positions, &stats, now);
                    assert_eq!(got, want, "{policy} budget {budget} n {n}");
                    assert_eq!(got.len(), cfg.keep().min(n));
                }
            }
        }
    }
}
