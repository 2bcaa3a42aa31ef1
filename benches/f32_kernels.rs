//! The f32 matmul kernels on one thread: weights packed in panels (`backend::cpu::packed`, what
//! linear layers use) against the row-major dot-product kernel (`backend::cpu::matmul`, what a
//! tied head uses), on decode-sized shapes of the trained fixture (k = 128, 256) and the Mixtral
//! shape (k = 1024).
//!
//! `cargo bench --bench f32_kernels` prints a table: GMAC/s of each kernel (the median of 7
//! timed runs, weights warm in cache), their ratio, and the packed kernel on weights that come
//! from L3 (copies of the matrix filling 8 MiB, used in turn). Under `cargo test --benches` it
//! runs each shape once, as a smoke test.

use edgemoe::backend::cpu::matmul::matmul;
use edgemoe::backend::cpu::packed::{matmul_packed, PackedF32};
use std::hint::black_box;
use std::time::Instant;

/// (rows, n, k)
const SHAPES: [(usize, usize, usize); 12] = [
    (1, 256, 128),
    (2, 256, 128),
    (3, 256, 128),
    (4, 256, 128),
    (5, 256, 128),
    (7, 256, 128),
    (8, 256, 128),
    (1, 2048, 128),
    (8, 2048, 128),
    (3, 128, 256),
    (1, 4096, 1024),
    (8, 4096, 1024),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds per call: the median of `runs` runs of enough calls for ~20 ms each.
fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    f();
    let once = start.elapsed().as_secs_f64().max(1e-7);
    let calls = ((0.02 / once) as usize).clamp(1, 100_000);
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..calls {
                    f();
                }
                t.elapsed().as_secs_f64() / calls as f64
            })
            .collect(),
    )
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let runs = if full { 7 } else { 1 };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread pool");
    println!(
        "| rows × n × k | packed GMAC/s | row-major GMAC/s | packed / row-major | packed, from L3 |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (rows, n, k) in SHAPES {
        let x: Vec<f32> = (0..rows * k).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 11) as f32 * 0.01 - 0.05).collect();
        let packed = PackedF32::from_rows(&w, n, k);
        let mut out = vec![0f32; rows * n];
        let mut reference = vec![0f32; rows * n];
        // Copies of the matrix filling 8 MiB, used in turn: each call finds its weights in L3
        // but not in L2, as a decode step finds an expert's.
        let copies = ((8 << 20) / packed.bytes()).max(2);
        let cold: Vec<PackedF32> = (0..copies).map(|_| packed.clone()).collect();
        let mut next = 0;
        let (p, r, c) = pool.install(|| {
            let p = time(runs, || {
                matmul_packed(black_box(&x), rows, &packed, None, &mut out);
                black_box(&out);
            });
            let r = time(runs, || {
                matmul(black_box(&x), rows, &w, n, k, None, &mut reference);
                black_box(&reference);
            });
            let c = time(runs, || {
                matmul_packed(black_box(&x), rows, &cold[next], None, &mut out);
                next = (next + 1) % copies;
                black_box(&out);
            });
            (p, r, c)
        });
        let worst = out
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{rows}×{n}×{k}: kernels disagree by {worst}");
        let macs = (rows * n * k) as f64;
        println!(
            "| {rows} × {n} × {k} | {:.1} | {:.1} | {:.2} | {:.1} |",
            macs / p / 1e9,
            macs / r / 1e9,
            r / p,
            macs / c / 1e9
        );
    }
}
