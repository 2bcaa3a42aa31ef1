//! The half-precision weight kernels (`backend::cpu::half`, bf16 and f16) against the f32 packed
//! kernel (`backend::cpu::packed`) on decode and short-prefill shapes: rows 1, 2, 4, 8 and 64 for
//! n × k = 1024 × 3584, 3584 × 1024 (a Mixtral-bench expert's down and gate/up projections) and
//! 576 × 1536 (SmolLM2-135M's down projection), on 1 and 2 threads.
//!
//! `cargo bench --bench half_kernels` prints the memory read bandwidth, then a table of weight
//! GB/s (bytes of the matrix read per second) and GMAC/s per kernel, each the median over
//! rounds in which the kernels take turns (the machine's load may drift), and the half kernels'
//! speed over f32. Weights rotate over copies totalling ≥ 128 MiB (4× the L3), so every call
//! reads them from DRAM, as a decode step reads an expert's. `EDGEMOE_HALF_TIER` picks the tier.
//! Under `cargo test --benches` it runs one small shape once, as a smoke test.

use edgemoe::backend::cpu::half::{active_tier, matmul_half, HalfKind, HalfView};
use edgemoe::backend::cpu::packed::{matmul_packed, PackedF32};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Instant;

/// (n, k)
const SHAPES: [(usize, usize); 3] = [(1024, 3584), (3584, 1024), (576, 1536)];
const ROWS: [usize; 5] = [1, 2, 4, 8, 64];
const THREADS: [usize; 2] = [1, 2];
const COLD_BYTES: usize = 128 << 20;
const ROUNDS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("rayon pool")
}

/// Deterministic values in about [-1, 1).
fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
        .collect()
}

/// Seconds per call of `f(i)` (`i` counts calls, to rotate over copies), over about 20 ms.
fn seconds_per_call(mut f: impl FnMut(usize)) -> f64 {
    let start = Instant::now();
    f(0);
    let once = start.elapsed().as_secs_f64().max(1e-7);
    let calls = ((0.02 / once) as usize).clamp(1, 10_000);
    let start = Instant::now();
    for i in 1..=calls {
        f(i);
    }
    start.elapsed().as_secs_f64() / calls as f64
}

/// GB/s of one read of `buf` split over the pool's threads.
fn read_bandwidth(buf: &[u64], pool: &rayon::ThreadPool) -> f64 {
    let part = buf.len().div_ceil(pool.current_num_threads());
    let start = Instant::now();
    let total = pool.install(|| {
        buf.par_chunks(part)
            .map(|c| {
                // Eight independent lanes, so the compiler vectorizes the sum.
                let mut lanes = [0u64; 8];
                for chunk in c.chunks_exact(8) {
                    for (l, &v) in lanes.iter_mut().zip(chunk) {
                        *l = l.wrapping_add(v);
                    }
                }
                lanes.iter().fold(0u64, |a, &b| a.wrapping_add(b))
            })
            .reduce(|| 0, u64::wrapping_add)
    });
    black_box(total);
    std::mem::size_of_val(buf) as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// One shape's weights in the three formats, each in copies filling `cold` bytes.
struct Case {
    n: usize,
    k: usize,
    bf16: Vec<Vec<u16>>,
    f16: Vec<Vec<u16>>,
    f32: Vec<PackedF32>,
}

impl Case {
    fn new(n: usize, k: usize, cold: usize) -> Self {
        let w = values(n * k, 1);
        let half = |kind: HalfKind| -> Vec<u16> { w.iter().map(|&v| kind.from_f32(v)).collect() };
        let (bf16, f16) = (half(HalfKind::Bf16), half(HalfKind::F16));
        let packed = PackedF32::from_rows(&w, n, k);
        let copies = |bytes: usize| cold.div_ceil(bytes).max(2);
        Self {
            n,
            k,
            bf16: vec![bf16.clone(); copies(2 * n * k)],
            f16: vec![f16.clone(); copies(2 * n * k)],
            f32: vec![packed.clone(); copies(packed.bytes())],
        }
    }

    /// Seconds per call of bf16, f16 and f32 for `rows` rows, checking that they agree.
    fn time(&self, rows: usize) -> [f64; 3] {
        let (n, k) = (self.n, self.k);
        let x = values(rows * k, 2);
        let mut outs = [
            vec![0f32; rows * n],
            vec![0f32; rows * n],
            vec![0f32; rows * n],
        ];
        let mut times = [0f64; 3];
        for (i, (kind, mats)) in [(HalfKind::Bf16, &self.bf16), (HalfKind::F16, &self.f16)]
            .into_iter()
            .enumerate()
        {
            let out = &mut outs[i];
            times[i] = seconds_per_call(|c| {
                let w = HalfView::new(kind, n, k, &mats[c % mats.len()]).expect("n × k");
                matmul_half(black_box(&x), rows, w, None, out);
                black_box(&out);
            });
        }
        let out = &mut outs[2];
        times[2] = seconds_per_call(|c| {
            matmul_packed(
                black_box(&x),
                rows,
                &self.f32[c % self.f32.len()],
                None,
                out,
            );
            black_box(&out);
        });
        // Half-precision weights differ from f32 by their rounding: about 2⁻⁸ (bf16) of a sum.
        let worst = |a: &[f32]| {
            a.iter()
                .zip(&outs[2])
                .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
                .fold(0f32, f32::max)
        };
        assert!(
            worst(&outs[0]) < 0.5 && worst(&outs[1]) < 0.05,
            "kernels disagree"
        );
        times
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (shapes, rows, rounds, cold): (&[(usize, usize)], &[usize], usize, usize) = if full {
        (&SHAPES, &ROWS, ROUNDS, COLD_BYTES)
    } else {
        (&[(40, 72)], &[1, 9], 1, 1 << 16)
    };
    println!("half tier: {}", active_tier());
    let buf: Vec<u64> = (0..(if full { 1 << 27 } else { 1 << 12 }) as u64).collect();
    for threads in THREADS {
        let pool = pool(threads);
        let bw = median((0..rounds).map(|_| read_bandwidth(&buf, &pool)).collect());
        println!("memory read, {threads} thread(s): {bw:.1} GB/s");
    }
    drop(buf);
    println!();
    println!("| threads | rows | n × k | bf16 GB/s | f16 GB/s | f32 GB/s | bf16 GMAC/s | f16 GMAC/s | f32 GMAC/s | bf16 / f32 speed | f16 / f32 speed |");
    println!("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &(n, k) in shapes {
        eprintln!("half_kernels: {n} × {k}…");
        let case = Case::new(n, k, cold);
        for threads in THREADS {
            let pool = pool(threads);
            for &r in rows {
                let mut runs = [vec![], vec![], vec![]];
                for _ in 0..rounds {
                    let t = pool.install(|| case.time(r));
                    for (all, t) in runs.iter_mut().zip(t) {
                        all.push(t);
                    }
                }
                let t = runs.map(median);
                let bytes = [2.0, 2.0, 4.0].map(|b| b * (n * k) as f64);
                let gb = [0, 1, 2].map(|i| bytes[i] / t[i] / 1e9);
                let gmac = t.map(|t| (r * n * k) as f64 / t / 1e9);
                println!(
                    "| {threads} | {r} | {n} × {k} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
                    gb[0], gb[1], gb[2], gmac[0], gmac[1], gmac[2], t[2] / t[0], t[2] / t[1]
                );
            }
        }
    }
}
