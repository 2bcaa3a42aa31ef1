//! Bench output: a markdown table (llama-bench style), JSON with every sample, CSV, and an SVG
//! plot of tokens/s against the swept parameter.

use super::{mean_sd, quantile, PointResult};
use crate::model::Model;
use serde_json::json;

/// What the table says about the model.
pub struct ModelInfo {
    pub name: String,
    pub size_bytes: usize,
    pub params: usize,
    pub active_params: usize,
    pub backend: String,
}

impl ModelInfo {
    pub fn of(model: &Model, backend: &str) -> ModelInfo {
        ModelInfo {
            name: model.source.clone(),
            size_bytes: model.weight_bytes(),
            params: model.num_params(),
            active_params: model.active_params(),
            backend: backend.to_string(),
        }
    }
}

/// One table row: a test (ppN or tgN) of one point.
struct Row<'a> {
    r: &'a PointResult,
    test: String,
    tps: Vec<f64>,
}

fn rows(results: &[PointResult]) -> Vec<Row<'_>> {
    let mut out = Vec::new();
    for r in results {
        if r.point.prompt > 0 {
            out.push(Row {
                r,
                test: format!("pp{}", r.point.prompt),
                tps: r.pp_tokens_per_s(),
            });
        }
        if r.point.gen > 0 {
            out.push(Row {
                r,
                test: format!("tg{}", r.point.gen),
                tps: r.tg_tokens_per_s(),
            });
        }
    }
    out
}

pub fn table(info: &ModelInfo, results: &[PointResult]) -> String {
    let mut s = String::from(
        "| model | size | params | active | backend | threads | batch | test | t/s | TTFT ms | ITL p50 ms | ITL p99 ms | MB/token | read GB/s | KV MiB | RSS anon MiB | RSS mapped MiB | peak RSS |\n\
         | --- | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for row in rows(results) {
        let (m, sd) = mean_sd(&row.tps);
        let p = &row.r.point;
        let is_tg = row.test.starts_with("tg");
        let itl = row.r.itl_ms();
        let (ttft, _) = mean_sd(&row.r.ttft_ms());
        let (weights, kv) = row.r.decode_bytes_per_token();
        let read = mean_sd(&row.r.decode_read_bytes_per_s()).0;
        s.push_str(&format!(
            "| {} | {:.1} MiB | {:.2} M | {:.2} M | {} | {} | {} | {} | {:.1} ± {:.1} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {:.0} | {:.0} MiB |\n",
            info.name,
            info.size_bytes as f64 / (1 << 20) as f64,
            info.params as f64 / 1e6,
            info.active_params as f64 / 1e6,
            info.backend,
            p.threads,
            p.batch,
            row.test,
            m,
            sd,
            if is_tg { "".into() } else { format!("{ttft:.1}") },
            if is_tg { format!("{:.2}", quantile(&itl, 0.5)) } else { "".into() },
            if is_tg { format!("{:.2}", quantile(&itl, 0.99)) } else { "".into() },
            if is_tg { format!("{:.2}", (weights + kv) / 1e6) } else { "".into() },
            if is_tg { format!("{:.1}", read / 1e9) } else { "".into() },
            mib(row.r.memory.kv_bytes as u64),
            mib(row.r.memory.rss_anon_bytes.unwrap_or(0)),
            mib(row.r.memory.rss_file_bytes.unwrap_or(0)),
            mib(row.r.peak_rss_bytes.unwrap_or(0)),
        ));
    }
    s
}

pub fn json(info: &ModelInfo, results: &[PointResult]) -> serde_json::Value {
    let tests: Vec<_> = rows(results)
        .iter()
        .map(|row| {
            let (m, sd) = mean_sd(&row.tps);
            let itl = row.r.itl_ms();
            let (weights, kv) = row.r.decode_bytes_per_token();
            json!({
                "test": row.test,
                "point": row.r.point,
                "tokens_per_s": {"mean": m, "sd": sd, "samples": row.tps},
                "ttft_ms": row.r.ttft_ms(),
                "itl_ms": {"mean": mean_sd(&itl).0, "p50": quantile(&itl, 0.5), "p99": quantile(&itl, 0.99)},
                "peak_rss_bytes": row.r.peak_rss_bytes,
                "kv_cache_bytes": row.r.kv_cache_bytes,
                "memory": row.r.memory,
                "expert_tokens": row.r.samples.iter().map(|s| s.expert_tokens).collect::<Vec<_>>(),
                "decode_bytes_per_token": {"weights": weights, "kv_cache": kv},
                "decode_read_bytes_per_s": row.r.decode_read_bytes_per_s(),
            })
        })
        .collect();
    json!({
        "model": info.name,
        "size_bytes": info.size_bytes,
        "params": info.params,
        "active_params": info.active_params,
        "backend": info.backend,
        "results": tests,
        "raw": results,
    })
}

pub fn csv(info: &ModelInfo, results: &[PointResult]) -> String {
    let mut s = String::from("model,backend,threads,batch,test,tps_mean,tps_sd,ttft_ms,itl_p50_ms,itl_p99_ms,decode_bytes_per_token,decode_read_bytes_per_s,peak_rss_bytes\n");
    for row in rows(results) {
        let (m, sd) = mean_sd(&row.tps);
        let itl = row.r.itl_ms();
        let p = &row.r.point;
        let (weights, kv) = row.r.decode_bytes_per_token();
        s.push_str(&format!(
            "{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.0},{:.0},{}\n",
            info.name,
            info.backend,
            p.threads,
            p.batch,
            row.test,
            m,
            sd,
            mean_sd(&row.r.ttft_ms()).0,
            quantile(&itl, 0.5),
            quantile(&itl, 0.99),
            weights + kv,
            mean_sd(&row.r.decode_read_bytes_per_s()).0,
            row.r.peak_rss_bytes.unwrap_or(0)
        ));
    }
    s
}

/// Tokens/s (mean) against the swept parameter with the most values, one line per test and
/// combination of the other parameters.
/// A swept parameter: its name and how to read it off a result.
type Axis = (&'static str, fn(&PointResult) -> usize);

pub fn plot(path: &std::path::Path, results: &[PointResult]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let axis: Axis = {
        let distinct = |f: fn(&PointResult) -> usize| {
            let mut v: Vec<usize> = results.iter().map(f).collect();
            v.sort_unstable();
            v.dedup();
            v.len()
        };
        let candidates: [Axis; 3] = [
            ("batch", |r| r.point.batch),
            ("threads", |r| r.point.threads),
            ("prompt", |r| r.point.prompt),
        ];
        candidates
            .into_iter()
            .max_by_key(|c| distinct(c.1))
            .unwrap_or(("batch", |r| r.point.batch))
    };
    let mut series: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for row in rows(results) {
        let p = &row.r.point;
        let label = match axis.0 {
            "batch" => format!("{} t{}", row.test, p.threads),
            "threads" => format!("{} b{}", row.test, p.batch),
            _ => format!("{} b{} t{}", row.test, p.batch, p.threads),
        };
        series
            .entry(label)
            .or_default()
            .push(((axis.1)(row.r) as f64, mean_sd(&row.tps).0));
    }
    let xmax = series.values().flatten().map(|p| p.0).fold(1.0, f64::max);
    let ymax = series.values().flatten().map(|p| p.1).fold(1.0, f64::max);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("edgemoe bench: tokens/s", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax * 1.05, 0f64..ymax * 1.1)?;
    chart
        .configure_mesh()
        .x_desc(axis.0)
        .y_desc("tokens/s")
        .draw()?;
    for (i, (label, mut pts)) in series.into_iter().enumerate() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}
