//! Counters the runtime keeps for `bench`, `serve`'s stats and expert placement: tokens run, how
//! often each expert of each layer was chosen, and the bytes the forward passes read.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct RuntimeStats {
    num_experts: usize,
    tokens: AtomicU64,
    /// `layers × experts` counts of tokens routed to each expert.
    expert_tokens: Vec<AtomicU64>,
    /// Weight bytes read: each matrix a step uses counted once (the experts its tokens chose),
    /// plus the embedding rows looked up.
    weight_bytes: AtomicU64,
    /// KV-cache bytes read by attention: every visible key and value, once per query row.
    kv_bytes: AtomicU64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StatsSnapshot {
    pub tokens: u64,
    pub expert_tokens: Vec<Vec<u64>>,
    pub weight_bytes: u64,
    pub kv_bytes: u64,
}

impl RuntimeStats {
    pub fn new(layers: usize, experts: usize) -> Self {
        RuntimeStats {
            num_experts: experts,
            tokens: AtomicU64::new(0),
            expert_tokens: (0..layers * experts).map(|_| AtomicU64::new(0)).collect(),
            weight_bytes: AtomicU64::new(0),
            kv_bytes: AtomicU64::new(0),
        }
    }

    pub fn add_tokens(&self, n: usize) {
        self.tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn add_bytes_read(&self, weights: usize, kv: usize) {
        self.weight_bytes
            .fetch_add(weights as u64, Ordering::Relaxed);
        self.kv_bytes.fetch_add(kv as u64, Ordering::Relaxed);
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
            weight_bytes: self.weight_bytes.load(Ordering::Relaxed),
            kv_bytes: self.kv_bytes.load(Ordering::Relaxed),
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
