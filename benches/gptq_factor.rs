//! GPTQ's per-linear factorization, `inverse_upper_cholesky` (Cholesky of the reversed Hessian,
//! then a triangular inverse), blocked against the unblocked reference, on a 2-thread pool at
//! k = 1024 and k = 3584 (a Mixtral-shaped down-projection's input width).
//!
//! `cargo bench --bench gptq_factor` prints a table: the median seconds of each over 5 runs at
//! k = 1024 and 3 at k = 3584, the two alternated so a load change hits both, and GFLOP/s
//! counting k³/3 for the Cholesky and k³/3 for the inverse. `EDGEMOE_CPU=avx2` runs the blocked
//! one on the AVX2 kernel instead of AVX-512. Under `cargo test --benches` it runs k = 130 once
//! and checks the two agree.

use edgemoe::quant::linalg::{inverse_upper_cholesky, reference, tile};
use edgemoe::util::rng::SplitMix64;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A symmetric, strictly diagonally dominant (so positive definite) k × k matrix: the timing
/// does not depend on the values, and a B Bᵀ product would cost more than the factorization.
fn spd(k: usize) -> Vec<f64> {
    let mut rng = SplitMix64::new(k as u64);
    let mut a = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..i {
            let v = rng.uniform() * 2.0 - 1.0;
            a[i * k + j] = v;
            a[j * k + i] = v;
        }
        a[i * k + i] = k as f64;
    }
    a
}

fn timed(f: impl FnOnce() -> Option<Vec<f64>>) -> (f64, Vec<f64>) {
    let t = Instant::now();
    let u = f().expect("the matrix is positive definite");
    (t.elapsed().as_secs_f64(), u)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: &[(usize, usize)] = if full {
        &[(1024, 5), (3584, 3)]
    } else {
        &[(130, 1)]
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a two-thread pool");
    println!("blocked kernel tier: {:?}", tile::tier());
    println!("| k | unblocked s | unblocked GFLOP/s | blocked s | blocked GFLOP/s | speed-up |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for &(k, runs) in sizes {
        let a = spd(k);
        let (mut old, mut new) = (Vec::new(), Vec::new());
        let mut worst = 0f64;
        pool.install(|| {
            for _ in 0..runs {
                let (t, ur) = timed(|| reference::inverse_upper_cholesky(a.clone(), k));
                old.push(t);
                let (t, ub) = timed(|| inverse_upper_cholesky(a.clone(), k));
                new.push(t);
                let scale = ur.iter().fold(0f64, |m, v| m.max(v.abs()));
                worst = ub
                    .iter()
                    .zip(&ur)
                    .fold(worst, |m, (x, y)| m.max((x - y).abs() / scale));
            }
        });
        // Diagonally dominant: cond(A) ≤ 3, so the two agree to a few ε · k.
        assert!(
            worst < 1e-12,
            "k {k}: blocked and unblocked differ by {worst:e}"
        );
        let (o, n) = (median(old), median(new));
        let gflop = 2.0 * (k as f64).powi(3) / 3.0 / 1e9;
        println!(
            "| {k} | {o:.3} | {:.1} | {n:.3} | {:.1} | {:.2}x |",
            gflop / o,
            gflop / n,
            o / n
        );
    }
}
