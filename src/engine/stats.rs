//! Counters the runtime keeps for `bench`, `serve`'s stats and expert placement: tokens run and
//! how often each expert of each layer was chosen.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct RuntimeStats {
    num_experts: usize,
    tokens: AtomicU64,
    /// `layers × experts` counts of tokens routed to each expert.
    expert_tokens: Vec<AtomicU64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StatsSnapshot {
    pub tokens: u64,
    pub expert_tokens: Vec<Vec<u64>>,
}

impl RuntimeStats {
    pub fn new(layers: usize, experts: usize) -> Self {
        RuntimeStats {
            num_experts: experts,
            tokens: AtomicU64::new(0),
            expert_tokens: (0..layers * experts).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn add_tokens(&self, n: usize) {
        self.tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn record_expert(&self, layer: usize, expert: usize, tokens: usize) {
        if let Some(c) = self.expert_tokens.get(layer * self.num_experts + expert) {
            c.fetch_add(tokens as u64, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let counts: Vec<u64> = self
            .expert_tokens
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        StatsSnapshot {
            tokens: self.tokens.load(Ordering::Relaxed),
            expert_tokens: if self.num_experts == 0 {
                vec![]
            } else {
                counts
                    .chunks(self.num_experts)
                    .map(<[u64]>::to_vec)
                    .collect()
            },
        }
    }
}
