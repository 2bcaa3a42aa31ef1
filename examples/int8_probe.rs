use edgemoe::backend::cpu::int8::*;
use std::time::Instant;
fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let (n, k) = (3584usize, 1024usize);
    // 24 matrices (88 MB) so they come from DRAM.
    let mats: Vec<Int8Matrix> = (0..24)
        .map(|m| {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7 + m) % 255) as f32 - 127.0)
                .collect();
            Int8Matrix::quantize_rtn(&w, n, k).unwrap()
        })
        .collect();
    for rows in [1usize, 2, 3, 4, 5, 8, 16] {
        let x: Vec<f32> = (0..rows * k).map(|i| (i % 13) as f32 - 6.0).collect();
        let mut q = QuantizedRows::new();
        quantize_rows(&x, rows, k, &mut q);
        let mut out = vec![0f32; rows * n];
        let t = Instant::now();
        let reps = 10;
        for _ in 0..reps {
            for m in &mats {
                gemm(&mut out, &q, m, None, &pool);
            }
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "rows {rows}: {:.1} GB/s of weights, {:.2} ms per matrix",
            (n * k * 24 * reps) as f64 / s / 1e9,
            s / (24 * reps) as f64 * 1e3
        );
    }
}
