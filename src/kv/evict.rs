//! The eviction step's plain reference: rank every slot of a layer by its policy, keep the sinks,
//! the most recent window and the best-ranked rest up to `budget − window`, and compact the
//! kept slots to the front (their keys stay rotated at their original positions). A backend's
//! own eviction must keep exactly the same set ([`keep_order`] is a total order).

use super::policy::{EvictionConfig, Policy};
use super::stats::SlotStats;
use super::LayerCache;
use crate::error::Result;
use std::cmp::Ordering;

/// Whether slot `a` ranks above slot `b` for keeping (`Less` = keep `a` first). Ties fall to
/// the newer token, so the order is total.
pub fn keep_order(
    cfg: &EvictionConfig,
    positions: &[u32],
    stats: &SlotStats,
    now: usize,
    a: usize,
    b: usize,
) -> Ordering {
    let by_position = positions[b].cmp(&positions[a]);
    match cfg.policy {
        Policy::Full | Policy::Window => by_position,
        Policy::H2o => stats.mass[b].total_cmp(&stats.mass[a]).then(by_position),
        Policy::Lazy => {
            // How long a token has gone without significant attention, measured in its own
            // longest recurrence interval: the most overdue go first. A ratio, not a
            // difference, so a fact attended once after 100 steps outlasts prose tokens only
            // ever attended by their neighbours, whatever their age.
            let overdue = |s: usize| {
                (now as f64 - stats.last_hit[s] as f64 + 1.0) / (stats.mri[s] as f64 + 1.0)
            };
            overdue(a)
                .total_cmp(&overdue(b))
                .then(stats.mass[b].total_cmp(&stats.mass[a]))
                .then(by_position)
        }
    }
}

/// Slots that every policy keeps: the sinks and the last `recent` (≥ `window`) tokens.
pub fn protected(cfg: &EvictionConfig, position: u32, now: usize) -> bool {
    (position as usize) < cfg.sinks || position as usize + cfg.recent >= now
}

/// The slots of a layer that survive an eviction at step `now` (the next token's position),
/// ascending: a full sort of the candidates, the plain reference.
pub fn kept_slots_reference(
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
    let room = cfg.keep().saturating_sub(kept.len());
    rest.sort_by(|&a, &b| keep_order(cfg, positions, stats, now, a, b));
    kept.extend(rest.into_iter().take(room));
    kept.sort_unstable();
    kept.into_iter().map(|s| s as u32).collect()
}

/// Moves slots `kept` (ascending) of `cache` and `stats` to the front and frees the rest: the
/// storage compacts its rows (keeping its capacity, so the freed slots take the next appends),
/// then the position map and the statistics follow. A storage that fails leaves all unchanged.
pub fn compact(cache: &mut LayerCache, stats: &mut SlotStats, kept: &[u32]) -> Result<()> {
    assert!(
        kept.windows(2).all(|w| w[0] < w[1])
            && kept
                .last()
                .is_none_or(|&s| (s as usize) < cache.positions.len()),
        "compact: kept slots must be ascending and held"
    );
    let positions: Vec<u32> = kept.iter().map(|&s| cache.positions[s as usize]).collect();
    if let Some(storage) = &mut cache.storage {
        storage.keep(kept, &positions)?;
    }
    cache.positions.clear();
    cache.positions.extend_from_slice(&positions);
    if !stats.is_empty() {
        stats.retain(kept);
    }
    Ok(())
}

/// Per-KV-head eviction at step `now`: each head's surviving slots chosen by `select` (the
/// reference [`kept_slots_reference`], or a backend's equal selection) from its own positions
/// and statistics (`stats[h]`), then compacted head by head ([`compact_heads`]).
pub fn evict_heads(
    cfg: &EvictionConfig,
    cache: &mut LayerCache,
    stats: &mut [SlotStats],
    now: usize,
    select: impl Fn(&EvictionConfig, &[u32], &SlotStats, usize) -> Vec<u32>,
) -> Result<()> {
    let empty = SlotStats::default();
    let kept: Vec<Vec<u32>> = (0..cache.position_maps())
        .map(|h| {
            select(
                cfg,
                cache.head_positions(h),
                stats.get(h).unwrap_or(&empty),
                now,
            )
        })
        .collect();
    compact_heads(cache, stats, &kept)
}

/// [`compact`] for a layer whose KV heads keep their own tokens: head `h` moves its slots
/// `kept[h]` (ascending; as many for every head) to the front, in the storage (its slice of
/// each slot), its position map and its statistics `stats[h]` (when kept). A storage that
/// fails leaves all unchanged.
pub fn compact_heads(
    cache: &mut LayerCache,
    stats: &mut [SlotStats],
    kept: &[Vec<u32>],
) -> Result<()> {
    let heads = cache.position_maps();
    let k = kept.first().map_or(0, Vec::len);
    assert!(
        kept.len() == heads
            && kept.iter().all(|h| {
                h.len() == k
                    && h.windows(2).all(|w| w[0] < w[1])
                    && h.last()
                        .is_none_or(|&s| (s as usize) < cache.positions.len())
            }),
        "compact_heads: per head, as many kept slots, ascending and held"
    );
    if let Some(storage) = &mut cache.storage {
        let head_dim = storage.kv_dim() / heads;
        storage.keep_heads(&kept.concat(), head_dim)?;
    }
    for (h, kept) in kept.iter().enumerate() {
        let map = match h {
            0 => &mut cache.positions,
            h => &mut cache.other_heads[h - 1],
        };
        // In place (ascending, so forward only): the map keeps its capacity.
        for (i, &s) in kept.iter().enumerate() {
            map[i] = map[s as usize];
        }
        map.truncate(kept.len());
        if let Some(st) = stats.get_mut(h).filter(|st| !st.is_empty()) {
            st.retain(kept);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::policy::{Budget, KvOptions};
    use crate::kv::testing::VecKv;

    fn cfg(policy: Policy, budget: usize) -> EvictionConfig {
        KvOptions {
            policy,
            budget: Some(Budget::Tokens(budget)),
            window: 4,
            sinks: 2,
            threshold: 1.0,
            recent: Some(0.0),
            granularity: crate::kv::Granularity::Layer,
        }
        .resolve(0)
        .unwrap()
        .unwrap()
    }

    #[test]
    fn each_policy_keeps_sinks_recent_and_its_best() {
        // 20 tokens at positions 0..20; budget 14 keeps 10: sinks 0,1, recent 16..20, 4 more.
        let positions: Vec<u32> = (0..20).collect();
        let mut stats = SlotStats::default();
        stats.sync(&positions);
        stats.mass[5] = 3.0;
        stats.mass[6] = 2.0;
        stats.mass[12] = 1.0;
        stats.mass[7] = 0.5;
        // Slot 3: hit at step 15 after a 12-step gap — still inside its interval at now 20.
        stats.last_hit[3] = 15;
        stats.mri[3] = 12;
        let now = 20;
        let window = kept_slots_reference(&cfg(Policy::Window, 14), &positions, &stats, now);
        assert_eq!(window, [0, 1, 12, 13, 14, 15, 16, 17, 18, 19]);
        let h2o = kept_slots_reference(&cfg(Policy::H2o, 14), &positions, &stats, now);
        assert_eq!(h2o, [0, 1, 5, 6, 7, 12, 16, 17, 18, 19]);
        let lazy = kept_slots_reference(&cfg(Policy::Lazy, 14), &positions, &stats, now);
        // Slot 3 (idle 5 of an MRI of 12) first; the rest by idle time (20 − p): 15, 14, 13.
        assert_eq!(lazy, [0, 1, 3, 13, 14, 15, 16, 17, 18, 19]);
    }

    /// With a recent share the last `recent` tokens stay whatever the ranking says: here h2o
    /// would keep the heavy slots 5 and 6, but 7 recent tokens leave room for one of them.
    #[test]
    fn a_recent_share_protects_the_newest_tokens() {
        let positions: Vec<u32> = (0..20).collect();
        let mut stats = SlotStats::default();
        stats.sync(&positions);
        stats.mass[5] = 3.0;
        stats.mass[6] = 2.0;
        let mut c = cfg(Policy::H2o, 14);
        c.recent = 7;
        let kept = kept_slots_reference(&c, &positions, &stats, 20);
        assert_eq!(kept, [0, 1, 5, 13, 14, 15, 16, 17, 18, 19]);
    }

    /// Lazy per layer by default keeps the newest quarter of its budget unranked. 60 tokens,
    /// budget 40, window 4, sinks 2: keep 36. Slots 2..32 were re-attended at step 40 after
    /// gaps of 100 + s steps (all inside their interval: the larger s, the better); 32..60 were
    /// never re-attended. With no share (only the window, 56..60 protected) the 30 re-attended
    /// slots fill the 30 free places; with the default 0.25 the newest 10 (50..60) are
    /// protected and only the best 24 re-attended ones (8..32) stay.
    #[test]
    fn lazy_keeps_a_quarter_recent_by_default() {
        let positions: Vec<u32> = (0..60).collect();
        let mut stats = SlotStats::default();
        stats.sync(&positions);
        for s in 2..32 {
            stats.last_hit[s] = 40;
            stats.mri[s] = 100 + s as u32;
        }
        let opts = |recent| KvOptions {
            policy: Policy::Lazy,
            budget: Some(Budget::Tokens(40)),
            window: 4,
            sinks: 2,
            recent,
            ..KvOptions::default()
        };
        let plain = opts(Some(0.0)).resolve(0).unwrap().unwrap();
        let want: Vec<u32> = (0..32).chain(56..60).collect();
        assert_eq!(kept_slots_reference(&plain, &positions, &stats, 60), want);
        let default = opts(None).resolve(0).unwrap().unwrap();
        assert_eq!(default.recent, 10);
        let want: Vec<u32> = [0, 1].into_iter().chain(8..32).chain(50..60).collect();
        assert_eq!(kept_slots_reference(&default, &positions, &stats, 60), want);
    }

    #[test]
    fn compaction_moves_rows_and_keeps_positions() {
        let storage = VecKv {
            kv_dim: 3,
            keys: (0..15).map(|v| v as f32).collect(),
            values: (0..15).map(|v| -(v as f32)).collect(),
        };
        let mut cache = LayerCache::with_storage(vec![0, 1, 2, 3, 4], Box::new(storage)).unwrap();
        let cap = cache.storage().unwrap().capacity_slots();
        let mut stats = SlotStats::default();
        stats.sync(cache.positions());
        stats.mass = vec![0.0, 1.0, 2.0, 3.0, 4.0];
        compact(&mut cache, &mut stats, &[0, 2, 4]).unwrap();
        assert_eq!(cache.positions(), [0, 2, 4]);
        let rows = cache.storage().unwrap().to_host().unwrap();
        assert_eq!(*rows.keys, [0., 1., 2., 6., 7., 8., 12., 13., 14.]);
        assert_eq!(rows.values[3..6], [-6., -7., -8.]);
        assert_eq!(stats.mass, [0.0, 2.0, 4.0]);
        assert_eq!(cache.storage().unwrap().capacity_slots(), cap);
    }
}
