//! Latency/throughput sweeps in the manner of llama-bench.
//!
//! One run of a point = `batch` sequences prefilled with `prompt` synthetic tokens in one batched
//! step (time to first token), then `gen` batched decode steps (inter-token latency). Inputs are
//! a fixed pseudo-random token stream, identical across compared runs; tokenization and sampling
//! are outside the timed region (the next input is the next synthetic token, not a sample).

pub(crate) mod paging;
pub(crate) mod plot;
pub(crate) mod report;
pub(crate) mod tier;

use crate::engine::{BatchItem, Engine, Logits};
use crate::error::Result;
use crate::util::rng::SplitMix64;
use serde::Serialize;
use std::time::Instant;

/// One combination of the swept parameters.
#[derive(Debug, Clone, Serialize)]
pub struct BenchPoint {
    pub threads: usize,
    pub batch: usize,
    pub prompt: usize,
    pub gen: usize,
}

/// Measurements of one repetition.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Wall time of each decode step.
    pub step_s: Vec<f64>,
    pub expert_tokens: u64,
    /// Weight and KV-cache bytes the decode steps read (the runtime's counters).
    pub decode_weight_bytes: u64,
    pub decode_kv_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PointResult {
    pub point: BenchPoint,
    /// The backend that ran it (`Backend::name`: `cpu`, `cuda`).
    pub backend: String,
    pub samples: Vec<Sample>,
    pub peak_rss_bytes: Option<u64>,
    pub kv_cache_bytes: usize,
    /// Weights, KV cache (allocated) and resident set at the end of the point.
    pub memory: crate::util::memory::MemoryReport,
}

impl PointResult {
    pub fn pp_tokens_per_s(&self) -> Vec<f64> {
        let tokens = (self.point.batch * self.point.prompt) as f64;
        self.samples.iter().map(|s| tokens / s.prefill_s).collect()
    }

    pub fn tg_tokens_per_s(&self) -> Vec<f64> {
        let tokens = (self.point.batch * self.point.gen) as f64;
        self.samples
            .iter()
            .filter(|s| s.decode_s > 0.0)
            .map(|s| tokens / s.decode_s)
            .collect()
    }

    /// Bytes the decode steps read per generated token (weights, KV cache), mean over samples.
    pub fn decode_bytes_per_token(&self) -> (f64, f64) {
        let tokens = (self.point.batch * self.point.gen).max(1) as f64;
        let n = self.samples.len().max(1) as f64;
        let sum = |f: fn(&Sample) -> u64| self.samples.iter().map(|s| f(s) as f64).sum::<f64>();
        (
            sum(|s| s.decode_weight_bytes) / n / tokens,
            sum(|s| s.decode_kv_bytes) / n / tokens,
        )
    }

    /// Bytes read per second while decoding, per sample: how close a run is to memory bandwidth.
    pub fn decode_read_bytes_per_s(&self) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.decode_s > 0.0)
            .map(|s| (s.decode_weight_bytes + s.decode_kv_bytes) as f64 / s.decode_s)
            .collect()
    }

    pub fn ttft_ms(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.prefill_s * 1e3).collect()
    }

    pub fn itl_ms(&self) -> Vec<f64> {
        self.samples
            .iter()
            .flat_map(|s| s.step_s.iter().map(|t| t * 1e3))
            .collect()
    }
}

/// Synthetic token ids, the same for every run with the same vocabulary.
pub fn synthetic_tokens(count: usize, vocab: usize, stream: u64) -> Vec<u32> {
    let mut rng = SplitMix64::new(0xbe7c_4000 + stream);
    (0..count)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

/// Runs one point `reps` times (after one untimed warm-up run).
pub fn run_point(engine: &Engine, point: &BenchPoint, reps: usize) -> Result<PointResult> {
    let vocab = engine.model().config.vocab_size;
    let inputs: Vec<Vec<u32>> = (0..point.batch)
        .map(|b| synthetic_tokens(point.prompt.max(1) + point.gen, vocab, b as u64))
        .collect();
    let mut samples = Vec::with_capacity(reps);
    let mut kv_bytes = 0;
    // One set of caches for all runs, emptied in between, as a server keeps its KV memory:
    // the warm-up run has touched it, so page faults are not timed.
    let mut caches: Vec<_> = (0..point.batch)
        .map(|_| {
            let mut cache = engine.new_cache();
            engine.prepare_cache(&mut cache, point.prompt.max(1) + point.gen)?;
            Ok(cache)
        })
        .collect::<Result<_>>()?;
    for rep in 0..=reps {
        let before = routed_tokens(engine);
        caches.iter_mut().for_each(|c| c.clear());
        let prompt_len = point.prompt.max(1);
        let started = Instant::now();
        step(engine, &inputs, &mut caches, 0..prompt_len)?;
        let prefill_s = started.elapsed().as_secs_f64();
        let mut step_s = Vec::with_capacity(point.gen);
        let read_before = engine.stats.snapshot();
        let decode_start = Instant::now();
        for i in 0..point.gen {
            let t = Instant::now();
            step(
                engine,
                &inputs,
                &mut caches,
                prompt_len + i..prompt_len + i + 1,
            )?;
            step_s.push(t.elapsed().as_secs_f64());
        }
        let decode_s = decode_start.elapsed().as_secs_f64();
        let read_after = engine.stats.snapshot();
        kv_bytes = caches.iter().map(|c| c.bytes()).sum();
        let after = routed_tokens(engine);
        if rep > 0 {
            samples.push(Sample {
                prefill_s,
                decode_s,
                step_s,
                expert_tokens: after - before,
                decode_weight_bytes: read_after.weight_bytes - read_before.weight_bytes,
                decode_kv_bytes: read_after.kv_bytes - read_before.kv_bytes,
            });
        }
    }
    let allocated = caches.iter().map(|c| c.allocated_bytes()).sum();
    Ok(PointResult {
        point: point.clone(),
        backend: crate::backend::Backend::name(engine.backend()).to_string(),
        samples,
        peak_rss_bytes: crate::util::peak_rss_bytes(),
        kv_cache_bytes: kv_bytes,
        memory: crate::util::memory::MemoryReport::new(engine.model().weight_memory(), allocated),
    })
}

/// Tokens routed to experts so far, all layers together.
fn routed_tokens(engine: &Engine) -> u64 {
    engine.stats.snapshot().expert_tokens.iter().flatten().sum()
}

fn step(
    engine: &Engine,
    inputs: &[Vec<u32>],
    caches: &mut [crate::kv::KvCache],
    range: std::ops::Range<usize>,
) -> Result<()> {
    // With a KV budget a long prompt goes in pieces the caches have room for.
    let room = caches.iter().map(|c| c.room()).min().unwrap_or(usize::MAX);
    if range.len() > room {
        let mid = range.start + room;
        step(engine, inputs, caches, range.start..mid)?;
        return step(engine, inputs, caches, mid..range.end);
    }
    let mut items: Vec<BatchItem> = inputs
        .iter()
        .zip(caches.iter_mut())
        .map(|(toks, cache)| BatchItem {
            tokens: &toks[range.clone()],
            cache,
            logits: Logits::Last,
        })
        .collect();
    engine.forward(&mut items)?;
    Ok(())
}

/// Mean and sample standard deviation.
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// The q-quantile (0..=1) by nearest rank.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let idx = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[idx]
}
