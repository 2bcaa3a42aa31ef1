use edgemoe::backend::cpu::matmul::matmul;
use std::time::Instant;
fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for &(rows, n, k) in &[
        (1usize, 256usize, 128usize),
        (2, 256, 128),
        (8, 2048, 128),
        (1, 2048, 128),
        (64, 256, 128),
        (1, 3584, 1024),
    ] {
        let x = vec![0.5f32; rows * k];
        let w = vec![0.25f32; n * k];
        let mut out = vec![0f32; rows * n];
        let iters = (200_000_000 / (rows * n * k)).max(10);
        pool.install(|| {
            let t = Instant::now();
            for _ in 0..iters {
                matmul(&x, rows, &w, n, k, None, &mut out);
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "rows {rows} n {n} k {k}: {:.1} GMAC/s, {:.2} us/call",
                (rows * n * k * iters) as f64 / s / 1e9,
                s / iters as f64 * 1e6
            );
        });
    }
}
