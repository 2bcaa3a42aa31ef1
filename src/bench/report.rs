//! Bench output: a markdown table (llama-bench style), JSON with every sample and CSV. A decode
//! test is named with the prompt it followed (`tg64@pp512`: 64 tokens decoded after a 512-token
//! prompt), since its speed depends on it; every row names the backend that ran it (`cpu`,
//! `cuda`) and, apart, how the weights are stored (`f32`, `bf16`, `w8a8`). The plot is `plot.rs`.

use super::{mean_sd, quantile, PointResult};
use crate::model::buf::HalfKind;
use crate::model::weights::LinearWeight;
use crate::model::Model;
use serde_json::json;

/// What the table says about the model.
pub struct ModelInfo {
    pub name: String,
    pub size_bytes: usize,
    pub params: usize,
    pub active_params: usize,
    /// How the weights are stored: `f32`, `bf16`, `f16` or `w8a8` (int8 with f32 scales).
    pub weights: String,
    /// Bytes of keys and values one token adds to the KV cache over all layers (f32 rows as
    /// [`kv_layout`](crate::model::config::ModelConfig::kv_layout) lays them out: one latent row a layer under
    /// multi-head latent attention), without its position and policy statistics.
    pub kv_bytes_per_token: u64,
}

impl ModelInfo {
    pub fn of(model: &Model) -> ModelInfo {
        ModelInfo {
            name: model.source.clone(),
            size_bytes: model.weight_bytes(),
            params: model.num_params(),
            active_params: model.active_params(),
            weights: weight_format(model).to_string(),
            kv_bytes_per_token: crate::kv::plan::row_bytes_per_token(
                model.config.num_layers,
                model.config.kv_layout(),
            ),
        }
    }
}

/// The weights' storage, named by the most compact form any linear layer uses (embeddings
/// usually stay wider).
pub fn weight_format(model: &Model) -> &'static str {
    let linears = model.weights.linears();
    let has = |f: fn(&LinearWeight) -> bool| linears.iter().any(|l| f(&l.weight));
    if has(|w| matches!(w, LinearWeight::Int4(_))) {
        "w4a8"
    } else if has(|w| matches!(w, LinearWeight::Int8(_) | LinearWeight::Int8WeightOnly(_))) {
        "w8a8"
    } else if has(|w| matches!(w, LinearWeight::Half(HalfKind::Bf16, _))) {
        "bf16"
    } else if has(|w| matches!(w, LinearWeight::Half(HalfKind::F16, _))) {
        "f16"
    } else {
        "f32"
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
                test: decode_test_name(r.point.gen, r.point.prompt),
                tps: r.tg_tokens_per_s(),
            });
        }
    }
    out
}

/// `tgN@ppP`: N tokens decoded after a P-token prompt (`tgN` after none).
pub fn decode_test_name(gen: usize, prompt: usize) -> String {
    match prompt {
        0 => format!("tg{gen}"),
        p => format!("tg{gen}@pp{p}"),
    }
}

pub fn table(info: &ModelInfo, results: &[PointResult]) -> String {
    let mut s = String::from(
        "| model | size | params | active | backend | weights | threads | batch | test | t/s | TTFT ms | ITL p50 ms | ITL p99 ms | MB/token | read GB/s | KV MiB | KV B/token | RSS anon MiB | RSS mapped MiB | peak RSS |\n\
         | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
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
            "| {} | {:.1} MiB | {:.2} M | {:.2} M | {} | {} | {} | {} | {} | {:.1} ± {:.1} | {} | {} | {} | {} | {} | {:.1} | {} | {:.0} | {:.0} | {:.0} MiB |\n",
            info.name,
            info.size_bytes as f64 / (1 << 20) as f64,
            info.params as f64 / 1e6,
            info.active_params as f64 / 1e6,
            row.r.backend,
            info.weights,
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
            info.kv_bytes_per_token,
            mib(row.r.memory.rss_anon_bytes.unwrap_or(0)),
            mib(row.r.memory.rss_file_bytes.unwrap_or(0)),
            mib(row.r.peak_rss_bytes.unwrap_or(0)),
        ));
    }
    s
}

/// Lines under the table: the measured read bandwidth, and per decode row the tokens/s that
/// bandwidth allows for the row's bytes per token (weights and KV cache) and the share reached.
pub fn roofline(results: &[PointResult], threads: usize, gbs: f64) -> String {
    if gbs <= 0.0 || !gbs.is_finite() {
        return "\nmemory read bandwidth: could not be measured\n".into();
    }
    let mut s = format!("\nmemory read bandwidth: {gbs:.1} GB/s ({threads} threads)\n");
    for row in rows(results) {
        let (weights, kv) = row.r.decode_bytes_per_token();
        let bytes = weights + kv;
        if !row.test.starts_with("tg") || bytes <= 0.0 {
            continue;
        }
        let bound = gbs * 1e9 / bytes;
        let (tps, _) = mean_sd(&row.tps);
        s += &format!(
            "{}: {:.1} MB/token bounds decode at {bound:.1} tok/s; measured {tps:.1} ({:.0}%)\n",
            row.test,
            bytes / 1e6,
            100.0 * tps / bound
        );
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
                "backend": row.r.backend,
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
        "weights": info.weights,
        "kv_bytes_per_token": info.kv_bytes_per_token,
        "results": tests,
        "raw": results,
    })
}

pub fn csv(info: &ModelInfo, results: &[PointResult]) -> String {
    let mut s = String::from("model,backend,weights,threads,batch,prompt,gen,test,tps_mean,tps_sd,ttft_ms,itl_p50_ms,itl_p99_ms,decode_bytes_per_token,decode_read_bytes_per_s,peak_rss_bytes,kv_bytes_per_token\n");
    for row in rows(results) {
        let (m, sd) = mean_sd(&row.tps);
        let itl = row.r.itl_ms();
        let p = &row.r.point;
        let (weights, kv) = row.r.decode_bytes_per_token();
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.0},{:.0},{},{}\n",
            info.name,
            row.r.backend,
            info.weights,
            p.threads,
            p.batch,
            p.prompt,
            p.gen,
            row.test,
            m,
            sd,
            mean_sd(&row.r.ttft_ms()).0,
            quantile(&itl, 0.5),
            quantile(&itl, 0.99),
            weights + kv,
            mean_sd(&row.r.decode_read_bytes_per_s()).0,
            row.r.peak_rss_bytes.unwrap_or(0),
            info.kv_bytes_per_token
        ));
    }
    s
}

pub use super::plot::plot;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::plot::tests::{speeds, sweep};

    fn info() -> ModelInfo {
        ModelInfo {
            name: "m".into(),
            size_bytes: 1 << 20,
            params: 1000,
            active_params: 500,
            weights: "w8a8".into(),
            kv_bytes_per_token: 4096,
        }
    }

    #[test]
    fn decode_rows_name_their_prompt_and_every_row_its_backend() {
        let results = sweep();
        let table = table(&info(), &results);
        let rows: Vec<Vec<&str>> = table
            .lines()
            .skip(2)
            .map(|l| l.split('|').map(str::trim).collect())
            .collect();
        assert_eq!(rows.len(), 16);
        let head: Vec<&str> = table
            .lines()
            .next()
            .unwrap()
            .split('|')
            .map(str::trim)
            .collect();
        let col = |name: &str| head.iter().position(|h| *h == name).unwrap();
        for (row, r) in rows.chunks(2).zip(&results) {
            let p = &r.point;
            assert_eq!(row[0][col("test")], format!("pp{}", p.prompt));
            assert_eq!(row[1][col("test")], format!("tg32@pp{}", p.prompt));
            for line in row {
                assert_eq!(line[col("backend")], "cpu");
                assert_eq!(line[col("weights")], "w8a8");
            }
            let tps: f64 = row[1][col("t/s")]
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!((tps - speeds(p).0).abs() < 0.06, "{tps}");
        }
        let csv = csv(&info(), &results);
        let mut lines = csv.lines();
        let head: Vec<&str> = lines.next().unwrap().split(',').collect();
        let (pi, ti) = (
            head.iter().position(|h| *h == "prompt").unwrap(),
            head.iter().position(|h| *h == "test").unwrap(),
        );
        for line in lines {
            let f: Vec<&str> = line.split(',').collect();
            assert!(f[ti].ends_with(&format!("pp{}", f[pi])), "{line}");
        }
        let json = json(&info(), &results);
        assert_eq!(json["weights"], "w8a8");
        assert_eq!(json["results"][1]["test"], "tg32@pp64");
        assert_eq!(json["results"][1]["backend"], "cpu");
        assert_eq!(decode_test_name(8, 0), "tg8");
    }
}
