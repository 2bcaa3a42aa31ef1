//! `bench --mem …`: decode throughput and the expert cache's behaviour per memory budget,
//! policy and prefetch setting. One warm-up run (prefill + decode) brings the cache to a steady
//! state; the counters then cover only the timed decode steps.

use super::{step, synthetic_tokens};
use crate::engine::Engine;
use crate::error::Result;
use crate::experts::budget::human;
use crate::experts::counters::CacheStats;
use crate::experts::pager::Policy;
use crate::experts::predict::PredictionCounts;
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct PagingRow {
    /// The backend that ran it (`Backend::name`; paged experts run on the CPU).
    pub backend: String,
    pub budget_bytes: u64,
    /// The budget as a share of the model's expert bytes.
    pub budget_of_experts: f64,
    pub policy: Policy,
    pub prefetch: bool,
    pub prompt: usize,
    pub gen: usize,
    /// Decode tokens/s per repetition.
    pub tg_tokens_per_s: Vec<f64>,
    pub cache: CacheStats,
    pub prediction: Option<PredictionCounts>,
    /// The expert cache's slots at the end.
    pub expert_cache_bytes: u64,
    /// What the budget reserved for the KV cache, and what it allocated.
    pub kv_reserved_bytes: u64,
    pub kv_allocated_bytes: u64,
    pub peak_rss_bytes: Option<u64>,
}

/// Runs `reps` timed prefill+decode runs of one sequence after a warm-up.
pub fn run_paged(
    engine: &Engine,
    policy: Policy,
    prefetch: bool,
    prompt: usize,
    gen: usize,
    reps: usize,
) -> Result<PagingRow> {
    let vocab = engine.model().config.vocab_size;
    let plan = *engine
        .experts
        .plan()
        .ok_or_else(|| crate::Error::invalid("bench --mem needs a paged engine"))?;
    let pager = engine
        .experts
        .pager()
        .ok_or_else(|| crate::Error::invalid("no pager"))?;
    let prompt = prompt.max(1);
    let mut tps = Vec::with_capacity(reps);
    let mut decode_tokens = 0;
    let mut total: Option<CacheStats> = None;
    let mut kv_allocated = 0;
    for rep in 0..=reps {
        // A different stream each run: a repeated text would find its experts cached.
        let tokens = synthetic_tokens(prompt + gen, vocab, 100 + rep as u64);
        let mut cache = engine.new_cache();
        engine.prepare_cache(&mut cache, prompt + gen)?;
        let mut caches = vec![cache];
        let inputs = vec![tokens];
        step(engine, &inputs, &mut caches, 0..prompt)?;
        let before = pager.stats(0);
        let started = Instant::now();
        for i in 0..gen {
            step(engine, &inputs, &mut caches, prompt + i..prompt + i + 1)?;
        }
        let s = started.elapsed().as_secs_f64();
        kv_allocated = caches[0].allocated_bytes() as u64;
        if rep > 0 {
            tps.push(gen as f64 / s.max(1e-9));
            decode_tokens += gen;
            let d = pager.stats(0).since(&before, 0);
            total = Some(match total {
                None => d,
                Some(t) => t.plus(&d),
            });
        }
    }
    let cache = total
        .unwrap_or_default()
        .since(&CacheStats::default(), decode_tokens as u64);
    Ok(PagingRow {
        backend: crate::backend::Backend::name(engine.backend()).to_string(),
        budget_bytes: plan.budget_bytes,
        budget_of_experts: plan.budget_bytes as f64 / pager.expert_bytes().max(1) as f64,
        policy,
        prefetch,
        prompt,
        gen,
        tg_tokens_per_s: tps,
        cache,
        prediction: engine.experts.prediction(),
        expert_cache_bytes: cache.slots as u64 * plan.slot_bytes,
        kv_reserved_bytes: plan.fixed.kv_bytes,
        kv_allocated_bytes: kv_allocated,
        peak_rss_bytes: crate::util::peak_rss_bytes(),
    })
}

/// The policy as `--expert-policy` spells it.
fn policy_name(p: Policy) -> String {
    clap::ValueEnum::to_possible_value(&p)
        .map_or_else(|| format!("{p:?}"), |v| v.get_name().to_string())
}

/// A markdown table, one row per configuration.
pub fn table(rows: &[PagingRow]) -> String {
    let mut s = String::from(
        "| backend | budget | of experts | policy | prefetch | slots | expert cache | KV reserved / allocated | hit rate | stall ms/token | read GB/s | test | tg t/s (median) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let mut t = r.tg_tokens_per_s.clone();
        t.sort_by(f64::total_cmp);
        let median = t.get(t.len() / 2).copied().unwrap_or(0.0);
        s += &format!(
            "| {} | {} | {:.0}% | {} | {} | {} | {} | {} / {} | {:.1}% | {:.1} | {:.2} | {} | {:.2} |\n",
            r.backend,
            human(r.budget_bytes),
            100.0 * r.budget_of_experts,
            policy_name(r.policy),
            if r.prefetch { "on" } else { "off" },
            r.cache.slots,
            human(r.expert_cache_bytes),
            human(r.kv_reserved_bytes),
            human(r.kv_allocated_bytes),
            100.0 * r.cache.hit_rate,
            r.cache.stall_ms_per_token,
            r.cache.read_gb_per_s,
            super::report::decode_test_name(r.gen, r.prompt),
            median
        );
    }
    s
}

/// Decode tokens/s against the budget, one line per policy and prefetch setting.
pub fn plot(path: &std::path::Path, rows: &[PagingRow]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let mut series: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for r in rows {
        let t = super::mean_sd(&r.tg_tokens_per_s).0;
        let label = format!(
            "{} prefetch {}",
            policy_name(r.policy),
            if r.prefetch { "on" } else { "off" }
        );
        series
            .entry(label)
            .or_default()
            .push((r.budget_bytes as f64 / (1u64 << 20) as f64, t));
    }
    let xmax = series.values().flatten().map(|p| p.0).fold(1.0, f64::max);
    let ymax = series.values().flatten().map(|p| p.1).fold(1e-3, f64::max);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("decode tokens/s against --mem", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..xmax * 1.05, 0.0..ymax * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("budget (MiB)")
        .y_desc("tokens/s")
        .draw()?;
    for (i, (label, mut pts)) in series.into_iter().enumerate() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart.configure_series_labels().border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
