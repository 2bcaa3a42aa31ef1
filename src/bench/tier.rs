//! `bench --gpu-mem …`: decode and prefill throughput and the GPU expert tier's behaviour per
//! device budget × placement. One warm-up run fills the tier; the counters then cover the timed
//! runs only.

use super::{step, synthetic_tokens};
use crate::engine::Engine;
use crate::error::Result;
use crate::experts::budget::human;
use crate::experts::tier::{Placement, TierStats};
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct TierRow {
    /// The backend that ran it (`cpu` where no GPU was usable).
    pub backend: String,
    /// `--gpu-mem` as given (bytes or a percentage of the weight bytes).
    pub gpu_mem: String,
    pub placement: Placement,
    pub prompt: usize,
    pub gen: usize,
    /// Prefill tokens/s per repetition.
    pub pp_tokens_per_s: Vec<f64>,
    /// Decode tokens/s per repetition.
    pub tg_tokens_per_s: Vec<f64>,
    /// The tier's counters at the end (including the warm-up run).
    pub tier: Option<TierStats>,
}

/// Runs `reps` timed prefill + decode runs of one sequence after a warm-up.
pub fn run_tiered(
    engine: &Engine,
    gpu_mem: String,
    placement: Placement,
    prompt: usize,
    gen: usize,
    reps: usize,
) -> Result<TierRow> {
    let vocab = engine.model().config.vocab_size;
    let prompt = prompt.max(1);
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for rep in 0..=reps {
        let tokens = synthetic_tokens(prompt + gen, vocab, 300 + rep as u64);
        let mut cache = engine.new_cache();
        engine.prepare_cache(&mut cache, prompt + gen)?;
        let mut caches = vec![cache];
        let inputs = vec![tokens];
        let started = Instant::now();
        step(engine, &inputs, &mut caches, 0..prompt)?;
        let pp_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        for i in 0..gen {
            step(engine, &inputs, &mut caches, prompt + i..prompt + i + 1)?;
        }
        let tg_s = started.elapsed().as_secs_f64();
        if rep > 0 {
            pp.push(prompt as f64 / pp_s.max(1e-9));
            tg.push(gen as f64 / tg_s.max(1e-9));
        }
    }
    Ok(TierRow {
        backend: crate::backend::Backend::name(engine.backend()).to_string(),
        gpu_mem,
        placement,
        prompt,
        gen,
        pp_tokens_per_s: pp,
        tg_tokens_per_s: tg,
        tier: engine.tier().map(|t| t.stats()),
    })
}

fn median(v: &[f64]) -> f64 {
    let mut t = v.to_vec();
    t.sort_by(f64::total_cmp);
    t.get(t.len() / 2).copied().unwrap_or(0.0)
}

/// A markdown table, one row per budget × placement.
pub fn table(rows: &[TierRow]) -> String {
    let mut s = String::from(
        "| backend | --gpu-mem | placement | slots | hit rate | fetched | CPU runs | copied | copy GB/s | pp t/s (median) | tg t/s (median) |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let t = r.tier.unwrap_or_default();
        s += &format!(
            "| {} | {} | {:?} | {} | {:.1}% | {} | {} | {} | {:.2} | {:.1} | {:.2} |\n",
            r.backend,
            r.gpu_mem,
            r.placement,
            t.slots,
            100.0 * t.hit_rate,
            t.fetched,
            t.host_runs,
            human(t.bytes_copied),
            t.copy_gb_per_s,
            median(&r.pp_tokens_per_s),
            median(&r.tg_tokens_per_s),
        );
    }
    s
}
