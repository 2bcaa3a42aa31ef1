//! The expert cache's counters: what `--stats`, `serve`'s `{"op":"stats"}` and `bench` report.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Needed experts a prefetch had brought in (or was bringing in) first.
    pub prefetch_hits: AtomicU64,
    /// Prefetched blocks evicted before any step used them.
    pub wasted_prefetches: AtomicU64,
    pub prefetches: AtomicU64,
    pub bytes_read: AtomicU64,
    /// Nanoseconds the reads took (summed over threads).
    pub read_ns: AtomicU64,
    /// Nanoseconds the forward pass waited for expert blocks.
    pub stall_ns: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CacheStats {
    pub slots: usize,
    pub slot_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub prefetch_hits: u64,
    pub wasted_prefetches: u64,
    pub prefetches: u64,
    pub bytes_read: u64,
    pub read_gb_per_s: f64,
    pub stall_s: f64,
    /// Seconds the reads took (summed over threads).
    pub read_s: f64,
    /// Set by the caller who knows the tokens run.
    pub stall_ms_per_token: f64,
    pub hit_rate: f64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self, slots: usize, slot_bytes: u64, tokens: u64) -> CacheStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (hits, misses, ph) = (g(&self.hits), g(&self.misses), g(&self.prefetch_hits));
        let bytes = g(&self.bytes_read);
        let stall_s = g(&self.stall_ns) as f64 * 1e-9;
        CacheStats {
            slots,
            slot_bytes,
            hits,
            misses,
            prefetch_hits: ph,
            wasted_prefetches: g(&self.wasted_prefetches),
            prefetches: g(&self.prefetches),
            bytes_read: bytes,
            read_gb_per_s: bytes as f64 / (g(&self.read_ns) as f64).max(1.0),
            stall_s,
            read_s: g(&self.read_ns) as f64 * 1e-9,
            stall_ms_per_token: stall_s * 1e3 / tokens.max(1) as f64,
            hit_rate: (hits + ph) as f64 / (hits + ph + misses).max(1) as f64,
        }
    }
}

impl CacheStats {
    /// What happened between `before` and `self`, with stall per token over `tokens`.
    pub fn since(&self, before: &CacheStats, tokens: u64) -> CacheStats {
        let (hits, misses) = (self.hits - before.hits, self.misses - before.misses);
        let ph = self.prefetch_hits - before.prefetch_hits;
        let bytes = self.bytes_read - before.bytes_read;
        let read_s = self.read_s - before.read_s;
        let stall_s = self.stall_s - before.stall_s;
        CacheStats {
            slots: self.slots,
            slot_bytes: self.slot_bytes,
            hits,
            misses,
            prefetch_hits: ph,
            wasted_prefetches: self.wasted_prefetches - before.wasted_prefetches,
            prefetches: self.prefetches - before.prefetches,
            bytes_read: bytes,
            read_gb_per_s: bytes as f64 / (read_s * 1e9).max(1.0),
            stall_s,
            read_s,
            stall_ms_per_token: stall_s * 1e3 / tokens.max(1) as f64,
            hit_rate: (hits + ph) as f64 / (hits + ph + misses).max(1) as f64,
        }
    }
}

impl CacheStats {
    /// Both periods' counts together (`self`'s slots).
    pub fn plus(&self, o: &CacheStats) -> CacheStats {
        let sum = CacheStats {
            hits: self.hits + o.hits,
            misses: self.misses + o.misses,
            prefetch_hits: self.prefetch_hits + o.prefetch_hits,
            wasted_prefetches: self.wasted_prefetches + o.wasted_prefetches,
            prefetches: self.prefetches + o.prefetches,
            bytes_read: self.bytes_read + o.bytes_read,
            stall_s: self.stall_s + o.stall_s,
            read_s: self.read_s + o.read_s,
            ..*self
        };
        sum.since(&CacheStats::default(), 0)
    }
}

impl std::fmt::Display for CacheStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "experts: {} slots of {:.2} MiB; hits {}, misses {}, prefetch hits {}, wasted prefetches {} (of {}); hit rate {:.1}%; read {:.1} MiB at {:.2} GB/s; stalled {:.3} s ({:.2} ms/token)",
            self.slots,
            self.slot_bytes as f64 / (1u64 << 20) as f64,
            self.hits,
            self.misses,
            self.prefetch_hits,
            self.wasted_prefetches,
            self.prefetches,
            self.hit_rate * 100.0,
            self.bytes_read as f64 / (1u64 << 20) as f64,
            self.read_gb_per_s,
            self.stall_s,
            self.stall_ms_per_token
        )
    }
}
