//! W4A8 against W8A8 kernels on Mixtral-bench's expert shapes (`builtin:mixtral-bench`: hidden
//! 1024, ffn 3584), on one thread and on every core (a decode step's pool), alternated: decode GEMV (M = 1: weight bytes streamed per
//! second, cycling over `EXPERTS` matrices so they come from DRAM as a decode step's experts
//! do) and prefill GEMM (M = 64: integer MACs per second), medians of `RUNS` alternated
//! timings. `cargo bench --bench w4a8_kernels` prints a Markdown table.

use edgemoe::backend::cpu::int8::{gemm, int4, quantize_rows, Int8Matrix, QuantizedRows};
use edgemoe::model::int4::{round_scale, Int4Matrix};
use std::time::Instant;

const RUNS: usize = 32;
/// Matrices cycled through: 16 × 3.7 MB of int8, beyond any L3 of the machines we run on.
const EXPERTS: usize = 16;

fn lcg(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut thread_counts = vec![1, cores];
    thread_counts.dedup();
    let mut seed = 7u64;
    println!("| shape (n × k) | threads | M | W8A8 | W4A8 | W4A8 / W8A8 |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (n, k) in [(3584usize, 1024usize), (1024, 3584)] {
        let kg = k.div_ceil(64);
        let mut w8s = Vec::new();
        let mut w4s = Vec::new();
        for _ in 0..EXPERTS {
            let w8: Vec<i8> = (0..n * k)
                .map(|_| ((lcg(&mut seed) % 255) as i32 - 127) as i8)
                .collect();
            w8s.push(Int8Matrix::from_quantized(n, k, &w8, vec![0.01; n]).unwrap());
            let u: Vec<u8> = (0..n * k).map(|_| (lcg(&mut seed) % 16) as u8).collect();
            let s = vec![round_scale(0.01); n * kg];
            w4s.push(Int4Matrix::from_quantized(n, k, 64, &u, &s, None).unwrap());
        }
        for (&threads, m) in thread_counts.iter().flat_map(|t| [(t, 1usize), (t, 64)]) {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let x: Vec<f32> = (0..m * k)
                .map(|_| lcg(&mut seed) as f32 / 2e9 - 1.0)
                .collect();
            let mut q = QuantizedRows::new();
            quantize_rows(&x, m, k, &mut q);
            let mut out = vec![0f32; m * n];
            let (mut t8, mut t4) = (Vec::new(), Vec::new());
            for run in 0..RUNS {
                let (w8, w4) = (&w8s[run % EXPERTS], &w4s[run % EXPERTS]);
                // Inside the pool, as a decode step calls the kernels.
                pool.install(|| {
                    let s = Instant::now();
                    gemm(&mut out, &q, w8, None, &pool);
                    t8.push(s.elapsed().as_secs_f64());
                    let s = Instant::now();
                    int4::gemm(&mut out, &q, w4, None, &pool);
                    t4.push(s.elapsed().as_secs_f64());
                });
            }
            let (a, b) = (median(t8), median(t4));
            let (r8, r4, unit) = if m == 1 {
                let (b8, b4) = (w8s[0].bytes() as f64, w4s[0].bytes() as f64);
                (b8 / a / 1e9, b4 / b / 1e9, "GB/s")
            } else {
                let ops = 2.0 * (m * n * k) as f64;
                (ops / a / 1e9, ops / b / 1e9, "GOPS")
            };
            println!(
                "| {n} × {k} | {threads} | {m} | {r8:.1} {unit} ({:.3} ms) | {r4:.1} {unit} ({:.3} ms) | {:.2}× faster |",
                a * 1e3,
                b * 1e3,
                a / b
            );
        }
    }
}
