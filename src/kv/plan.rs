//! How much KV memory a run reserves: the slots one sequence's cache can hold at most (its
//! budget when it evicts, else every token it can reach), times the sequences that run at once.
//! `--mem` counts this instead of a fixed guess, so a smaller budget leaves more room for the
//! expert cache.

use super::{KvLayout, KvOptions, Policy};
use crate::error::Result;

/// What a run will ask of KV memory, before it meets a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvDemand {
    pub options: KvOptions,
    /// Most tokens one sequence reaches (prompt + completion, a ppl window); capped at the
    /// model's context. `usize::MAX`: the whole context (a server, a C API session).
    pub reach: usize,
    /// Sequences whose caches are held at once (serve's `--max-batch`).
    pub sequences: usize,
}

impl Default for KvDemand {
    /// One sequence that may fill the context, keeping every token.
    fn default() -> KvDemand {
        KvDemand {
            options: KvOptions::default(),
            reach: usize::MAX,
            sequences: 1,
        }
    }
}

/// The KV memory a run reserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KvPlan {
    /// Slots one sequence's cache holds at most, per layer.
    pub tokens_per_sequence: usize,
    pub sequences: usize,
    /// Bytes one slot takes over all layers: keys, values (none stored where they are key
    /// prefixes: latent rows), its position, and the policy's statistics when it ranks by
    /// attention.
    pub bytes_per_token: u64,
}

impl KvPlan {
    pub fn bytes(&self) -> u64 {
        self.tokens_per_sequence as u64 * self.sequences as u64 * self.bytes_per_token
    }
}

/// Bytes one cached token takes over `layers` layers, as [`super::KvCache::allocated_bytes`]
/// counts them: f32 keys and values as `layout` stores them, a u32 position and, for h2o and
/// lazy, an f32 mass and two u32 step counters per layer.
pub fn bytes_per_token(layers: usize, layout: KvLayout, policy: Policy) -> u64 {
    bytes_per_token_maps(layers, layout, 1, policy)
}

/// Bytes the keys and values of one token take over `layers` layers: what the cache's rows
/// hold, without positions or statistics (`layers × (kv_lora_rank + qk_rope_head_dim) × 4`
/// for latent rows).
pub fn row_bytes_per_token(layers: usize, layout: KvLayout) -> u64 {
    layers as u64 * layout.stored_floats() as u64 * 4
}

/// [`bytes_per_token`] for layers of `maps` position maps (one per KV head when each head keeps
/// its own tokens, [`KvOptions::position_maps`]): a position and the statistics per map.
pub fn bytes_per_token_maps(layers: usize, layout: KvLayout, maps: usize, policy: Policy) -> u64 {
    let stats = match policy {
        Policy::H2o | Policy::Lazy => 3 * 4,
        Policy::Full | Policy::Window => 0,
    };
    row_bytes_per_token(layers, layout) + layers as u64 * maps as u64 * (4 + stats)
}

impl KvDemand {
    /// The most slots one sequence of this demand holds, in a model of `context` tokens.
    pub fn tokens_per_sequence(&self, context: usize) -> Result<usize> {
        let reach = self.reach.min(context);
        Ok(match self.options.resolve(reach)? {
            Some(plan) => plan.budget.min(reach),
            None => reach,
        })
    }

    /// The plan for a model of `layers` layers, slots laid out as `layout` in `kv_heads` KV
    /// heads and a context of `context` tokens; a budget too small for the policy is refused.
    pub fn plan(
        &self,
        layers: usize,
        layout: KvLayout,
        kv_heads: usize,
        context: usize,
    ) -> Result<KvPlan> {
        let maps = self.options.position_maps(kv_heads);
        Ok(KvPlan {
            tokens_per_sequence: self.tokens_per_sequence(context)?,
            sequences: self.sequences.max(1),
            bytes_per_token: bytes_per_token_maps(layers, layout, maps, self.options.policy),
        })
    }

    /// [`Self::plan`] for the cache `cfg`'s engine makes ([`ModelConfig::kv_layout`](crate::model::config::ModelConfig::kv_layout),
    /// [`ModelConfig::cache_kv_heads`](crate::model::config::ModelConfig::cache_kv_heads)).
    pub fn plan_for(&self, cfg: &crate::model::config::ModelConfig) -> Result<KvPlan> {
        self.plan(
            cfg.num_layers,
            cfg.kv_layout(),
            cfg.cache_kv_heads(),
            cfg.max_position_embeddings,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Budget;

    #[test]
    fn a_budget_caps_the_tokens_a_sequence_reserves() {
        let full = KvDemand {
            reach: 1000,
            sequences: 3,
            ..KvDemand::default()
        };
        let p = full.plan(2, KvLayout::separate(8), 2, 512).unwrap();
        // The context caps the reach; every layer holds keys, values and a position.
        assert_eq!(p.tokens_per_sequence, 512);
        assert_eq!(p.bytes_per_token, 2 * (17 * 4));
        assert_eq!(p.bytes(), 512 * 3 * 136);
        let lazy = KvDemand {
            options: KvOptions {
                policy: Policy::Lazy,
                budget: Some(Budget::Tokens(200)),
                ..KvOptions::default()
            },
            ..full
        };
        let p = lazy.plan(2, KvLayout::separate(8), 2, 4096).unwrap();
        assert_eq!(
            (p.tokens_per_sequence, p.bytes_per_token),
            (200, 2 * (68 + 12))
        );
        // A sequence shorter than its budget holds only what it reaches.
        let short = KvDemand { reach: 150, ..lazy };
        assert_eq!(short.tokens_per_sequence(4096).unwrap(), 150);
        let pct = KvDemand {
            options: KvOptions {
                budget: Some(Budget::Percent(25.0)),
                ..lazy.options
            },
            reach: usize::MAX,
            ..lazy
        };
        assert_eq!(pct.tokens_per_sequence(4096).unwrap(), 1024);
        assert!(pct.tokens_per_sequence(400).is_err(), "100 tokens < 132");
    }

    /// With per-KV-head eviction every head keeps a position and statistics per slot, and the
    /// plan counts what such a cache really allocates.
    #[test]
    fn per_head_eviction_counts_a_map_per_head() {
        use crate::backend::cpu::kv::HostKv;
        use crate::kv::{Granularity, KvCache, KvStorage};
        let options = KvOptions {
            policy: Policy::Lazy,
            budget: Some(Budget::Tokens(200)),
            granularity: Granularity::Head,
            ..KvOptions::default()
        };
        let demand = KvDemand {
            options,
            reach: 1000,
            sequences: 1,
        };
        let p = demand.plan(2, KvLayout::separate(8), 2, 4096).unwrap();
        assert_eq!(p.bytes_per_token, 2 * (64 + 2 * (4 + 12)));
        let mut cache = KvCache::with_storage(2, 8, |d| {
            Some(Box::new(HostKv::new(d)) as Box<dyn KvStorage>)
        });
        cache
            .set_eviction(options.resolve(1000).unwrap(), 2)
            .unwrap();
        cache.reserve(1000);
        assert_eq!(cache.allocated_bytes() as u64, p.bytes());
        // Without a budget the granularity changes nothing.
        let full = KvDemand {
            options: KvOptions {
                policy: Policy::Full,
                budget: None,
                ..options
            },
            ..demand
        };
        assert_eq!(
            full.plan(2, KvLayout::separate(8), 2, 4096)
                .unwrap()
                .bytes_per_token,
            2 * 68
        );
    }
}
