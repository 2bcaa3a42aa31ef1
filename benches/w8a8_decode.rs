//! Decode speed of a W8A8 Mixtral-shaped model large enough to leave the caches, against the f32
//! engine on the same model and threads, and against the memory roofline (bytes of weights one
//! token reads ÷ read bandwidth measured in this same run).
//!
//! `cargo bench --bench w8a8_decode` (env EDGEMOE_BENCH_MODEL=builtin:mixtral-bench for a
//! smaller run). Prints a markdown table; medians of the repetitions.

use edgemoe::bench::{run_point, BenchPoint};
use edgemoe::model::weights::{Ffn, Linear};
use edgemoe::quant::{self, Method, QuantOptions};
use edgemoe::util::membw::read_bandwidth_gbs;
use edgemoe::{Engine, Model};
use std::sync::Arc;

/// Bytes of weights one decoded token streams: attention, router, its top-k experts, the head.
fn bytes_per_token(m: &Model) -> usize {
    let lin = Linear::weight_bytes;
    let w = &m.weights;
    let mut n = lin(w.head())
        + w.project_in.as_ref().map_or(0, lin)
        + w.project_out.as_ref().map_or(0, lin);
    for l in &w.layers {
        let a = &l.attn;
        n += lin(&a.q) + lin(&a.k) + lin(&a.v) + lin(&a.o);
        n += match &l.ffn {
            Ffn::Moe(b) => {
                let e = &b.experts[0];
                lin(&b.router) + m.config.top_k * (lin(&e.gate) + lin(&e.up) + lin(&e.down))
            }
            Ffn::Gated(g) => lin(&g.gate) + lin(&g.up) + lin(&g.down),
            Ffn::Plain(p) => lin(&p.fc1) + lin(&p.fc2),
        };
    }
    n
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn decode_tps(model: &Arc<Model>, threads: usize) -> f64 {
    let engine = Engine::new(model.clone(), threads).expect("engine");
    let point = BenchPoint {
        threads,
        batch: 1,
        prompt: 16,
        gen: 32,
    };
    median(
        run_point(&engine, &point, 3)
            .expect("bench run")
            .tg_tokens_per_s(),
    )
}

fn main() {
    let name = std::env::var("EDGEMOE_BENCH_MODEL").unwrap_or_else(|_| "builtin:mixtral-1g".into());
    eprintln!("building {name} (f32)...");
    let f32_model =
        Arc::new(edgemoe::load_model(Some(std::path::Path::new(&name))).expect("model"));
    let f32_bytes = bytes_per_token(&f32_model);
    let f32_tps: Vec<f64> = [1, 2].iter().map(|&t| decode_tps(&f32_model, t)).collect();
    let model = Arc::try_unwrap(f32_model).ok().expect("sole owner");
    eprintln!("quantizing (rtn, head included)...");
    let mut opts = QuantOptions::new(Method::Rtn, &model);
    opts.head = quant::HeadQuant::W8A8;
    let (q, _) = quant::quantize(model, &[], 0, &opts, |_, _, _| {}).expect("quantize");
    let expert_bytes: usize = q
        .weights
        .layers
        .iter()
        .map(|l| match &l.ffn {
            Ffn::Moe(b) => b
                .experts
                .iter()
                .map(|e| e.gate.weight_bytes() + e.up.weight_bytes() + e.down.weight_bytes())
                .sum(),
            _ => 0,
        })
        .sum();
    let q = Arc::new(q);
    let q_bytes = bytes_per_token(&q);
    println!("model {name}: {:.2} GB of int8 expert weights; weights read per token: f32 {:.1} MB, w8a8 {:.1} MB", expert_bytes as f64 / 1e9, f32_bytes as f64 / 1e6, q_bytes as f64 / 1e6);
    println!();
    println!("| threads | read GB/s | f32 tok/s | w8a8 tok/s | w8a8 / f32 | roofline tok/s | w8a8 / roofline |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, threads) in [1usize, 2].into_iter().enumerate() {
        let q_tps = decode_tps(&q, threads);
        let bw = read_bandwidth_gbs(1 << 30, threads, 5);
        let roof = bw * 1e9 / q_bytes as f64;
        println!(
            "| {threads} | {bw:.1} | {:.1} | {q_tps:.1} | {:.2}x | {roof:.1} | {:.0}% |",
            f32_tps[i],
            q_tps / f32_tps[i],
            100.0 * q_tps / roof
        );
    }
}
