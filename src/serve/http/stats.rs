//! `GET /v1/stats`: what the dashboard polls, as one JSON object read from the live engine and
//! scheduler between steps: throughput, the queue, each running request's KV cache, and the
//! expert tiers as a layer × expert heat map with the cache's counters. docs/dashboard.md lists
//! every field.

use crate::experts::heatmap;
use crate::serve::scheduler::Scheduler;
use serde_json::{json, Value};

pub fn render<T>(sched: &Scheduler<T>, chat_template: bool) -> Value {
    let engine = sched.engine();
    let runtime = engine.stats.snapshot();
    let c = &sched.counters;
    let sequences: Vec<Value> = sched
        .running()
        .map(|(_, gen)| crate::serve::kv::sequence(gen))
        .collect();
    let running_evictions: u64 = sequences
        .iter()
        .filter_map(|s| s["evictions"].as_u64())
        .sum();
    json!({
        "object": "edgemoe.dashboard",
        "chat_template": chat_template,
        "tokens_per_s": sched.tokens_per_s(),
        "queue": {
            "waiting": sched.queue_depth(),
            "active": sched.active_len(),
        },
        "requests": c,
        "runtime": {
            "tokens": runtime.tokens,
            "weight_bytes": runtime.weight_bytes,
            "kv_bytes": runtime.kv_bytes,
        },
        "kv": {
            "bytes": sched.kv_bytes(),
            "evictions": c.kv_evictions + running_evictions,
            "sequences": sequences,
        },
        "experts": experts(sched, &runtime.expert_tokens),
        "memory": {
            "resident_bytes": crate::util::memory::rss_bytes(),
        },
    })
}

/// The heat map and the expert cache's counters (`cache` and `prediction` are `null` when
/// the experts are used in place).
fn experts<T>(sched: &Scheduler<T>, counts: &[Vec<u64>]) -> Value {
    let engine = sched.engine();
    let model = engine.model();
    let (map, reads) = engine.experts.heat_map(model, counts);
    let tokens = engine.stats.snapshot().tokens;
    let prediction = engine.experts.prediction().map(|p| {
        json!({
            "predicted": p.predicted,
            "correct": p.correct,
            "recall": p.recall(),
            "precision": p.precision(),
        })
    });
    json!({
        "paged": engine.experts.is_paged(),
        "top_k": model.config.top_k,
        "palette": heatmap::palette(),
        "min_opacity": heatmap::MIN_OPACITY,
        "map": map,
        "reads": reads,
        "cache": engine.experts.cache_stats(tokens),
        "prediction": prediction,
    })
}
