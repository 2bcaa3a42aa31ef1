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
/// the experts are used in place, `device` when the engine has no device expert tier).
fn experts<T>(sched: &Scheduler<T>, counts: &[Vec<u64>]) -> Value {
    let engine = sched.engine();
    let model = engine.model();
    let device = engine.tier();
    let (map, reads) = engine.experts.heat_map(model, counts, |l, e| {
        device.is_some_and(|t| t.is_resident((l, e)))
    });
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
        "device": device.map(|t| t.stats()),
        "prediction": prediction,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{BatchItem, Engine, Logits};
    use crate::experts::tier::{ExpertTier, Placement};
    use crate::model::Model;
    use crate::serve::scheduler::SchedulerOptions;
    use std::sync::Arc;

    fn tiers(v: &Value) -> Vec<String> {
        v["experts"]["map"]["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter())
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    }

    /// An engine with a device expert tier (a CPU backend in the device's role, as in
    /// tests/tiers.rs) reports the experts its slots hold as on the GPU, and only those.
    #[test]
    fn device_tier_experts_show_as_gpu() {
        let model = Arc::new(Model::builtin_default());
        let (layers, experts) = (model.config.num_layers, model.config.num_experts);
        let tier = ExpertTier::new(3, layers, experts, Placement::Gpu, false);
        let engine = Engine::new(model.clone(), 1)
            .unwrap()
            .with_tier(tier, 1)
            .unwrap();
        let tokens = model.tokenizer.encode("the cat sat", false).unwrap();
        let mut cache = engine.new_cache();
        engine
            .forward(&mut [BatchItem {
                tokens: &tokens,
                cache: &mut cache,
                logits: Logits::Last,
            }])
            .unwrap();
        let sched: Scheduler<()> = Scheduler::new(&engine, SchedulerOptions::default());
        let v = render(&sched, false);
        let t = tiers(&v);
        assert_eq!(t.iter().filter(|t| *t == "gpu").count(), 3, "{t:?}");
        assert_eq!(t.iter().filter(|t| *t == "ram").count(), t.len() - 3);
        assert_eq!(v["experts"]["device"]["resident"], 3);
        // Without the tier, nothing is on the GPU.
        let plain = Engine::new(model, 1).unwrap();
        let sched: Scheduler<()> = Scheduler::new(&plain, SchedulerOptions::default());
        let v = render(&sched, false);
        assert!(v["experts"]["device"].is_null());
        assert!(tiers(&v).iter().all(|t| t == "ram"));
    }
}
