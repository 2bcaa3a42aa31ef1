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
                        recent: Some(recent),
                        granularity: crate::kv::Granularity::Layer,
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

    /// Per-KV-head eviction: on a layer whose heads hold different tokens with their own
    /// statistics, the CPU's selection keeps per head exactly the reference sort's set, and its
    /// in-place compaction per head gives the plain gather's rows, maps and statistics.
    #[test]
    fn per_head_eviction_matches_the_reference_per_head() {
        use crate::backend::cpu::kv::HostKv;
        use crate::kv::evict::evict_heads;
        use crate::kv::testing::VecKv;
        use crate::kv::Granularity;
        let mut rng = SplitMix64::new(17);
        let (heads, head_dim) = (3, 4);
        let kv_dim = heads * head_dim;
        for trial in 0..12 {
            let n = 60 + trial * 5;
            // Each head holds its own tokens: positions with head-dependent gaps.
            let maps: Vec<Vec<u32>> = (0..heads as u32)
                .map(|h| (0..n as u32).map(|p| p + p / (3 + h)).collect())
                .collect();
            let now = *maps.iter().map(|m| m.last().unwrap()).max().unwrap() as usize + 1;
            let stats: Vec<SlotStats> = maps
                .iter()
                .map(|m| {
                    let mut st = SlotStats::default();
                    st.sync(m);
                    for (s, &p) in m.iter().enumerate() {
                        st.mass[s] = (rng.next_u64() % 5) as f32 * 0.25;
                        st.last_hit[s] = (p + (rng.next_u64() % 20) as u32).min(now as u32 - 1);
                        st.mri[s] = (rng.next_u64() % 15) as u32;
                    }
                    st
                })
                .collect();
            let keys: Vec<f32> = (0..n * kv_dim).map(|v| v as f32).collect();
            let values: Vec<f32> = keys.iter().map(|v| -v).collect();
            for policy in [Policy::Window, Policy::H2o, Policy::Lazy] {
                let cfg = KvOptions {
                    policy,
                    budget: Some(Budget::Tokens(n / 2 + 8)),
                    window: 5,
                    sinks: 2,
                    threshold: 1.0,
                    recent: Some(0.0),
                    granularity: Granularity::Head,
                }
                .resolve(0)
                .unwrap()
                .unwrap();
                let host = HostKv::from_rows(kv_dim, keys.clone(), values.clone());
                let plain = VecKv {
                    kv_dim,
                    keys: keys.clone(),
                    values: values.clone(),
                };
                let mut a = LayerCache::with_head_storage(maps.clone(), Box::new(host)).unwrap();
                let mut b = LayerCache::with_head_storage(maps.clone(), Box::new(plain)).unwrap();
                let (mut sa, mut sb) = (stats.clone(), stats.clone());
                evict_heads(&cfg, &mut a, &mut sa, now, kept_slots).unwrap();
                evict_heads(&cfg, &mut b, &mut sb, now, kept_slots_reference).unwrap();
                assert_eq!(a.len(), cfg.keep(), "{policy}");
                for h in 0..heads {
                    let want = kept_slots_reference(&cfg, &maps[h], &stats[h], now);
                    let want: Vec<u32> = want.iter().map(|&s| maps[h][s as usize]).collect();
                    assert_eq!(a.head_positions(h), want, "{policy} head {h}");
                    assert_eq!(b.head_positions(h), want, "{policy} head {h}");
                    assert_eq!(sa[h], sb[h], "{policy} head {h}");
                }
                let (ra, rb) = (
                    a.storage().unwrap().to_host().unwrap(),
                    b.storage().unwrap().to_host().unwrap(),
                );
                assert_eq!(
                    (&*ra.keys, &*ra.values),
                    (&*rb.keys, &*rb.values),
                    "{policy}"
                );
                // Head h's slice of slot i is the row of its kept token's old slot.
                for h in 0..heads {
                    let old = kept_slots_reference(&cfg, &maps[h], &stats[h], now);
                    for (i, &s) in old.iter().enumerate() {
                        let at = i * kv_dim + h * head_dim;
                        assert_eq!(ra.keys[at], (s as usize * kv_dim + h * head_dim) as f32);
                    }
                }
            }
        }
    }
}
