//! Benchmarks for the W8A8 int8 kernels (`edgemoe::backend::cpu::int8`).
//!
//! `cargo bench --bench int8_kernels` first prints a summary to stdout (progress on stderr), each
//! figure the median of several timed runs:
//! - memory read bandwidth: AVX2 sums over a 1 GiB buffer as 1, 4 and 8 sequential streams per
//!   thread, on 1 and 2 threads (several streams keep more misses in flight and read faster);
//! - int8 GEMV GB/s on 4096 × 14336 weights in both orientations, and its ratio to the best of
//!   those bandwidths (weights rotate over copies totalling ≥ 256 MiB, so they come from DRAM);
//! - int8 GEMM GOPS (rows 16, 64, 128, 512; n = k = 4096) against a packed, blocked
//!   broadcast-FMA f32 matmul on the same shape;
//! - the weight-only int8 output head (`int8w::matmul_w8`: f32 activations, one token) GB/s on
//!   32000 × 1024 (Mixtral-shaped) and 49152 × 576 (SmolLM2-shaped), and its ratio to the best
//!   read bandwidth, measured in alternation as the GEMV table is.
//!
//! Then the criterion groups `gemv`, `gemm`, `head` and `quantize` run (short settings); a filter argument
//! selects among them as usual. `EDGEMOE_BENCH_SUMMARY=0` skips the summary,
//! `EDGEMOE_BENCH_CRITERION=0` the criterion groups, `EDGEMOE_BENCH_GEMM=0` the summary's GEMM
//! table; `EDGEMOE_BENCH_GEMV=NxK,…` replaces the summary's GEMV shapes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use edgemoe::backend::cpu::int8::*;
use edgemoe::backend::cpu::int8w;
use rayon::prelude::*;

const THREADS: [usize; 2] = [1, 2];
const GEMV_SHAPES: [(usize, usize); 2] = [(14336, 4096), (4096, 14336)];
const GEMM_ROWS: [usize; 4] = [16, 64, 128, 512];
const GEMM_NK: usize = 4096;
/// Output heads: Mixtral-shaped (vocab 32000, d 1024) and SmolLM2-shaped (49152, 576).
const HEAD_SHAPES: [(usize, usize); 2] = [(32000, 1024), (49152, 576)];

/// Problem sizes for the criterion groups: the real ones under `cargo bench`, small ones when
/// `cargo test --benches` runs each benchmark once as a smoke test (unoptimized).
struct Sizes {
    gemv: [(usize, usize); 2],
    gemm_rows: [usize; 4],
    gemm_nk: usize,
    head: [(usize, usize); 2],
}

const FULL: Sizes = Sizes {
    gemv: GEMV_SHAPES,
    gemm_rows: GEMM_ROWS,
    gemm_nk: GEMM_NK,
    head: HEAD_SHAPES,
};

const SMOKE: Sizes = Sizes {
    gemv: [(224, 64), (64, 224)],
    gemm_rows: [1, 3, 16, 33],
    gemm_nk: 128,
    head: [(37, 33), (130, 64)],
};

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("rayon pool")
}

/// splitmix64, for reproducible inputs.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn f32s(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.unit()).collect()
    }
}

fn random_weights(n: usize, k: usize, seed: u64) -> Int8Matrix {
    let w = Rng(seed).f32s(n * k);
    Int8Matrix::quantize_rtn(&w, n, k).expect("finite weights")
}

fn random_activations(rows: usize, k: usize, seed: u64) -> QuantizedRows {
    let mut q = QuantizedRows::new();
    quantize_rows(&Rng(seed).f32s(rows * k), rows, k, &mut q);
    q
}

/// Sums a buffer as `S` interleaved sequential streams (one contiguous part each), with AVX2
/// where the CPU has it. One stream is the plain sum; several keep more cache misses in flight,
/// as the GEMV kernels do, and usually read faster.
fn sum_u64<const S: usize>(buf: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return unsafe { x86::sum_u64_avx2::<S>(buf) };
    }
    buf.iter().fold(0, |a, &b| a.wrapping_add(b))
}

/// Seconds for one read of `buf` by `sum`, split across the pool's threads.
fn time_read(buf: &[u64], pool: &rayon::ThreadPool, sum: fn(&[u64]) -> u64) -> f64 {
    let parts = buf.len().div_ceil(pool.current_num_threads());
    let start = Instant::now();
    let total: u64 = pool.install(|| {
        buf.par_chunks(parts)
            .map(sum)
            .reduce(|| 0, u64::wrapping_add)
    });
    black_box(total);
    start.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The summary's GEMV shapes: [`GEMV_SHAPES`], or `EDGEMOE_BENCH_GEMV=NxK,NxK,…` (e.g. a
/// model's own matrices, `3584x1024,1024x3584,32000x1024` for `builtin:mixtral-bench`).
fn gemv_shapes() -> Vec<(usize, usize)> {
    let Ok(list) = std::env::var("EDGEMOE_BENCH_GEMV") else {
        return GEMV_SHAPES.to_vec();
    };
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let (n, k) = s
                .trim()
                .split_once('x')
                .expect("EDGEMOE_BENCH_GEMV: NxK,NxK,…");
            let dim = |v: &str| {
                v.parse::<usize>()
                    .expect("EDGEMOE_BENCH_GEMV: a whole number")
            };
            (dim(n), dim(k))
        })
        .collect()
}

/// Weights for a GEMV measurement: copies totalling ≥ 256 MiB, used in turn so that each call
/// reads its weights from DRAM rather than from the last level cache.
struct GemvCase {
    mats: Vec<Int8Matrix>,
    x: QuantizedRows,
    out: Vec<f32>,
    next: usize,
}

impl GemvCase {
    fn new(n: usize, k: usize) -> Self {
        let w = random_weights(n, k, 7);
        let copies = (256usize << 20).div_ceil(w.data.len()).max(2);
        let mut case = Self {
            mats: vec![w; copies],
            x: random_activations(1, k, 8),
            out: vec![0f32; n],
            next: 0,
        };
        case.gb_per_s(&pool(1), 1); // warm-up: page in every copy
        case
    }

    /// Weight GB/s over `calls` consecutive calls.
    fn gb_per_s(&mut self, pool: &rayon::ThreadPool, calls: usize) -> f64 {
        let start = Instant::now();
        for _ in 0..calls {
            let w = &self.mats[self.next % self.mats.len()];
            // Inside the pool, as a decode step calls it (a hop into the pool per call is not).
            pool.install(|| gemm(&mut self.out, &self.x, w, None, pool));
            self.next += 1;
        }
        let bytes = calls * self.mats[0].data.len();
        bytes as f64 / start.elapsed().as_secs_f64() / 1e9
    }
}

/// Weight-only int8 head weights for a one-token product: copies totalling ≥ 256 MiB, used in
/// turn (as [`GemvCase`]) so that each call reads its weights from DRAM.
struct HeadCase {
    mats: Vec<Int8Matrix>,
    x: Vec<f32>,
    out: Vec<f32>,
    next: usize,
}

impl HeadCase {
    fn new(n: usize, k: usize) -> Self {
        let w = random_weights(n, k, 13);
        let copies = (256usize << 20).div_ceil(w.data.len()).max(2);
        let mut case = Self {
            mats: vec![w; copies],
            x: Rng(14).f32s(k),
            out: vec![0f32; n],
            next: 0,
        };
        case.gb_per_s(&pool(1), copies); // warm-up: page in every copy
        case
    }

    /// Weight GB/s over `calls` consecutive calls.
    fn gb_per_s(&mut self, pool: &rayon::ThreadPool, calls: usize) -> f64 {
        let start = Instant::now();
        for _ in 0..calls {
            let w = &self.mats[self.next % self.mats.len()];
            pool.install(|| int8w::matmul_w8(&self.x, 1, w, None, &mut self.out));
            self.next += 1;
        }
        let bytes = calls * self.mats[0].data.len();
        bytes as f64 / start.elapsed().as_secs_f64() / 1e9
    }
}

/// A one-token product whose weight GB/s a table reports ([`print_stream_table`]).
trait Streamed {
    /// Weight GB/s over `calls` consecutive calls.
    fn gb_per_s(&mut self, pool: &rayon::ThreadPool, calls: usize) -> f64;
    /// Weight bytes one call reads.
    fn call_bytes(&self) -> usize;
}

impl Streamed for GemvCase {
    fn gb_per_s(&mut self, pool: &rayon::ThreadPool, calls: usize) -> f64 {
        GemvCase::gb_per_s(self, pool, calls)
    }
    fn call_bytes(&self) -> usize {
        self.mats[0].data.len()
    }
}

impl Streamed for HeadCase {
    fn gb_per_s(&mut self, pool: &rayon::ThreadPool, calls: usize) -> f64 {
        HeadCase::gb_per_s(self, pool, calls)
    }
    fn call_bytes(&self) -> usize {
        self.mats[0].data.len()
    }
}

/// Calls per timing: at least `min`, and at least 32 MiB of weights, so a small matrix is not
/// timed over a few microseconds (where the first call's TLB misses dominate).
fn calls_for(case: &impl Streamed, min: usize) -> usize {
    min.max((32usize << 20) / case.call_bytes().max(1))
}

/// Memory read bandwidth and a kernel's weight GB/s (`what`, one case per shape, at least
/// `calls` per round: [`calls_for`]), measured in alternation (per round: one read of `buf` per stream count, then the
/// calls per shape) so that both see the same machine, whose load may drift. Prints medians over
/// the rounds; the ratio is the median of per-round ratios.
fn print_stream_table(
    buf: &[u64],
    what: &str,
    shapes: &[(usize, usize)],
    cases: &mut [impl Streamed],
    calls: usize,
) {
    const ROUNDS: usize = 9;
    let sums: [fn(&[u64]) -> u64; 3] = [sum_u64::<1>, sum_u64::<4>, sum_u64::<8>];
    println!("| threads | read 1 / 4 / 8 streams | {what} n×k | {what} GB/s | ratio |");
    println!("|---|---|---|---|---|");
    for threads in THREADS {
        eprintln!("int8 summary: bandwidth and {what}, {threads} thread(s)…");
        let pool = pool(threads);
        let mut read = [const { Vec::new() }; 3];
        let mut kernel = vec![Vec::new(); cases.len()];
        let mut ratio = vec![Vec::new(); cases.len()];
        for _ in 0..ROUNDS {
            let round: Vec<f64> = sums
                .iter()
                .map(|&sum| std::mem::size_of_val(buf) as f64 / time_read(buf, &pool, sum) / 1e9)
                .collect();
            let best = round.iter().copied().fold(0.0, f64::max);
            for (all, v) in read.iter_mut().zip(round) {
                all.push(v);
            }
            for (i, case) in cases.iter_mut().enumerate() {
                let gb = case.gb_per_s(&pool, calls_for(case, calls));
                kernel[i].push(gb);
                ratio[i].push(gb / best);
            }
        }
        let read = read.map(median);
        let read_text = format!("{:.1} / {:.1} / {:.1}", read[0], read[1], read[2]);
        for (i, &(n, k)) in shapes.iter().enumerate() {
            let (gb, r) = (median(kernel[i].clone()), median(ratio[i].clone()));
            println!("| {threads} | {read_text} | {n}×{k} | {gb:.1} | {r:.2} |");
        }
    }
}

/// The int8 GEMV table (`EDGEMOE_BENCH_GEMV`'s shapes; none: no table).
fn print_gemv_table(buf: &[u64]) {
    let shapes = gemv_shapes();
    if shapes.is_empty() {
        return;
    }
    let mut cases: Vec<GemvCase> = shapes.iter().map(|&(n, k)| GemvCase::new(n, k)).collect();
    print_stream_table(buf, "GEMV", &shapes, &mut cases, 3);
}

/// The weight-only head table, as [`print_gemv_table`] for the GEMV.
fn print_head_table(buf: &[u64]) {
    let mut cases: Vec<HeadCase> = HEAD_SHAPES
        .iter()
        .map(|&(n, k)| HeadCase::new(n, k))
        .collect();
    println!(
        "\nWeight-only int8 head (f32 x, 1 token), tier {}:\n",
        int8w::active_tier()
    );
    print_stream_table(buf, "head", &HEAD_SHAPES, &mut cases, 6);
}

/// Seconds for one call of `f`.
fn time_once(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

/// int8 GEMM GOPS and f32 GFLOPS (`None` without AVX2+FMA) for `rows` tokens, n = k = GEMM_NK,
/// timed in alternation like the GEMV table: medians over rounds, and of per-round ratios.
fn gemm_vs_f32(
    rows: usize,
    w: &Int8Matrix,
    w_packed: &[f32],
    x_f32: &[f32],
    pool: &rayon::ThreadPool,
) -> (f64, Option<(f64, f64)>) {
    const ROUNDS: usize = 5;
    let ops = 2.0 * (rows * GEMM_NK * GEMM_NK) as f64 / 1e9;
    let x = random_activations(rows, GEMM_NK, 9);
    let x_f32 = &x_f32[..rows * GEMM_NK];
    let mut out = vec![0f32; rows * GEMM_NK];
    let mut out_f32 = vec![0f32; rows * GEMM_NK.next_multiple_of(F32_PANEL)];
    let has_f32 = f32_matmul(&mut out_f32, x_f32, w_packed, rows, GEMM_NK, pool); // warm-up
    gemm(&mut out, &x, w, None, pool);
    let (mut int8, mut f32, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let i = ops / time_once(|| gemm(&mut out, &x, w, None, pool));
        int8.push(i);
        if has_f32 {
            let f = ops
                / time_once(|| {
                    f32_matmul(&mut out_f32, x_f32, w_packed, rows, GEMM_NK, pool);
                });
            f32.push(f);
            ratio.push(i / f);
        }
    }
    (median(int8), has_f32.then(|| (median(f32), median(ratio))))
}

/// Output channels per packed panel of the f32 reference (two 8-wide vectors).
const F32_PANEL: usize = 16;

/// `w` (`n × k`, row-major) packed for the f32 reference: panels of [`F32_PANEL`] output
/// channels, each `k × F32_PANEL` (channel fastest), zero padded. Packing is done once, outside
/// the timing, as an f32 GEMM library does for weights.
fn pack_f32_weights(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let panels = n.div_ceil(F32_PANEL);
    let mut packed = vec![0f32; panels * k * F32_PANEL];
    for (j, row) in w.chunks_exact(k).enumerate() {
        let panel = &mut packed[j / F32_PANEL * k * F32_PANEL..][..k * F32_PANEL];
        for (kk, &v) in row.iter().enumerate() {
            panel[kk * F32_PANEL + j % F32_PANEL] = v;
        }
    }
    packed
}

/// The f32 comparison: a broadcast-FMA matmul over packed weights. `out` holds, per panel,
/// `rows × F32_PANEL` results (`[panel][t][j % F32_PANEL]`), so each thread owns a contiguous
/// slice. `false` where AVX2+FMA is missing.
fn f32_matmul(
    out: &mut [f32],
    x: &[f32],
    w_packed: &[f32],
    rows: usize,
    k: usize,
    pool: &rayon::ThreadPool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        pool.install(|| {
            out.par_chunks_mut(rows * F32_PANEL)
                .zip(w_packed.par_chunks(k * F32_PANEL))
                .for_each(|(out, panel)| {
                    // SAFETY: AVX2 and FMA were just detected.
                    unsafe { x86::f32_panel(out, x, panel, rows, k) }
                });
        });
        return true;
    }
    let _ = (out, x, w_packed, rows, k, pool);
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    pub fn sum_u64_avx2<const S: usize>(buf: &[u64]) -> u64 {
        // Streams 37 cache lines short of an even split: starts a power of two apart alias in
        // the caches' sets and read far slower than memory allows.
        let part = (buf.len() / S / 8 * 8).saturating_sub(if S > 1 { 8 * 37 } else { 0 });
        let streams: [&[[u64; 8]]; S] =
            std::array::from_fn(|s| buf[s * part..(s + 1) * part].as_chunks::<8>().0);
        let mut acc = [[_mm256_setzero_si256(); 2]; S];
        for i in 0..part / 8 {
            for (a, stream) in acc.iter_mut().zip(&streams) {
                for (a, half) in a.iter_mut().zip(stream[i].as_chunks::<4>().0) {
                    // SAFETY: `half` is four readable u64; loadu has no alignment requirement.
                    let v = unsafe { _mm256_loadu_si256(half.as_ptr().cast()) };
                    *a = _mm256_add_epi64(*a, v);
                }
            }
        }
        let mut total = _mm256_setzero_si256();
        for v in acc.iter().flatten() {
            total = _mm256_add_epi64(total, *v);
        }
        let mut lanes = [0u64; 4];
        // SAFETY: `lanes` is 32 writable bytes.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), total) };
        lanes
            .iter()
            .chain(&buf[S * part..])
            .fold(0, |a, &b| a.wrapping_add(b))
    }

    /// One packed weight panel: `out[t][c] = Σ x[t][i]·panel[i][c]`. k in slices of KC (the
    /// panel slice, 16 KiB, stays in L1), 4 tokens × 16 channels = 8 ymm accumulators; per k
    /// step 2 loads, 4 broadcasts, 8 FMAs. (4 × 24 needs 17 registers, and the spilled
    /// accumulator's store-load chain halves the speed.) `rows % 4 == 0`.
    #[target_feature(enable = "avx2,fma")]
    pub fn f32_panel(out: &mut [f32], x: &[f32], panel: &[f32], rows: usize, k: usize) {
        const KC: usize = 256;
        assert!(rows.is_multiple_of(4) && k.is_multiple_of(KC));
        let panel = panel.as_chunks::<{ super::F32_PANEL }>().0;
        out.fill(0.0);
        for k0 in (0..k).step_by(KC) {
            let tiles = out.chunks_exact_mut(4 * super::F32_PANEL);
            for (t0, out) in (0..rows).step_by(4).zip(tiles) {
                let xs: [&[f32]; 4] = std::array::from_fn(|r| &x[(t0 + r) * k + k0..][..KC]);
                tile_4x16(out, xs, &panel[k0..k0 + KC]);
            }
        }
    }

    /// `out[r][..16] += Σ_i xs[r][i] · panel[i][..16]`.
    #[target_feature(enable = "avx2,fma")]
    fn tile_4x16(out: &mut [f32], xs: [&[f32]; 4], panel: &[[f32; 16]]) {
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        for (i, w) in panel.iter().enumerate() {
            let w = w.as_chunks::<8>().0;
            // SAFETY: each chunk is eight readable floats; loadu needs no alignment.
            let wv: [__m256; 2] =
                std::array::from_fn(|c| unsafe { _mm256_loadu_ps(w[c].as_ptr()) });
            for (acc_r, x) in acc.iter_mut().zip(&xs) {
                let xv = _mm256_set1_ps(x[i]);
                for (a, &w) in acc_r.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, w, *a);
                }
            }
        }
        for (o, a) in out
            .as_chunks_mut::<8>()
            .0
            .iter_mut()
            .zip(acc.iter().flatten())
        {
            // SAFETY: `o` is eight readable, writable floats; loadu/storeu need no alignment.
            unsafe {
                _mm256_storeu_ps(
                    o.as_mut_ptr(),
                    _mm256_add_ps(_mm256_loadu_ps(o.as_ptr()), *a),
                )
            };
        }
    }
}

fn print_summary() {
    eprintln!(
        "int8 summary: tier {}, filling a 1 GiB buffer…",
        active_tier()
    );
    let buf: Vec<u64> = (0..(1usize << 27) as u64).collect();
    println!("\n## int8 kernels (tier {})\n", active_tier());
    println!("Read GB/s: AVX2 sum over 1 GiB as 1 / 4 / 8 sequential streams per thread.");
    println!("GEMV ratio: GEMV GB/s over the best of the three, per round; medians of 9 rounds.\n");
    print_gemv_table(&buf);
    if env_enabled("EDGEMOE_BENCH_HEAD") {
        print_head_table(&buf);
    }
    drop(buf);
    if !env_enabled("EDGEMOE_BENCH_GEMM") {
        return;
    }

    let w = random_weights(GEMM_NK, GEMM_NK, 10);
    let wf = pack_f32_weights(&Rng(11).f32s(GEMM_NK * GEMM_NK), GEMM_NK, GEMM_NK);
    let xf = Rng(12).f32s(GEMM_ROWS[3] * GEMM_NK);
    println!("\n| threads | rows | int8 GOPS | f32 GFLOPS | int8/f32 |");
    println!("|---|---|---|---|---|");
    for threads in THREADS {
        let pool = pool(threads);
        for rows in GEMM_ROWS {
            eprintln!("int8 summary: GEMM rows {rows}, {threads} thread(s)…");
            match gemm_vs_f32(rows, &w, &wf, &xf, &pool) {
                (int8, Some((f32, ratio))) => {
                    println!("| {threads} | {rows} | {int8:.1} | {f32:.1} | {ratio:.2} |")
                }
                (int8, None) => println!("| {threads} | {rows} | {int8:.1} | n/a | n/a |"),
            }
        }
    }
}

fn bench_gemv(c: &mut Criterion, sizes: &Sizes) {
    let mut group = c.benchmark_group("gemv");
    for (n, k) in sizes.gemv {
        let w = random_weights(n, k, 1);
        let x = random_activations(1, k, 2);
        let mut out = vec![0f32; n];
        group.throughput(Throughput::Bytes(w.data.len() as u64));
        for threads in THREADS {
            let pool = pool(threads);
            let id = BenchmarkId::new(format!("{n}x{k}"), format!("{threads}t"));
            group.bench_function(id, |b| b.iter(|| gemm(&mut out, &x, &w, None, &pool)));
        }
    }
    group.finish();
}

fn bench_gemm(c: &mut Criterion, sizes: &Sizes) {
    let mut group = c.benchmark_group("gemm");
    let nk = sizes.gemm_nk;
    let w = random_weights(nk, nk, 3);
    for rows in sizes.gemm_rows {
        let x = random_activations(rows, nk, 4);
        let mut out = vec![0f32; rows * nk];
        group.throughput(Throughput::Elements((2 * rows * nk * nk) as u64));
        for threads in THREADS {
            let pool = pool(threads);
            let id = BenchmarkId::new(format!("rows{rows}"), format!("{threads}t"));
            group.bench_function(id, |b| b.iter(|| gemm(&mut out, &x, &w, None, &pool)));
        }
    }
    group.finish();
}

/// The weight-only head on one token (decode) and on 16 (a prefill's worth of rows, each
/// reading the weights from cache once its tile is loaded). Throughput counts weight bytes.
fn bench_head(c: &mut Criterion, sizes: &Sizes) {
    let mut group = c.benchmark_group("head");
    for (n, k) in sizes.head {
        let w = random_weights(n, k, 15);
        for rows in [1, 16] {
            let x = Rng(16).f32s(rows * k);
            let mut out = vec![0f32; rows * n];
            group.throughput(Throughput::Bytes(w.data.len() as u64));
            for threads in THREADS {
                let pool = pool(threads);
                let id = BenchmarkId::new(format!("{n}x{k}/rows{rows}"), format!("{threads}t"));
                group.bench_function(id, |b| {
                    b.iter(|| pool.install(|| int8w::matmul_w8(&x, rows, &w, None, &mut out)))
                });
            }
        }
    }
    group.finish();
}

fn bench_quantize(c: &mut Criterion, sizes: &Sizes) {
    let mut group = c.benchmark_group("quantize");
    let k = sizes.gemm_nk;
    for rows in [1, sizes.gemm_rows[3]] {
        let x = Rng(5).f32s(rows * k);
        let mut q = QuantizedRows::new();
        group.throughput(Throughput::Elements((rows * k) as u64));
        group.bench_function(format!("rows{rows}x{k}"), |b| {
            b.iter(|| quantize_rows(black_box(&x), rows, k, &mut q))
        });
    }
    group.finish();
}

fn env_enabled(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v != "0")
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not, and then criterion runs each
    // benchmark once as a smoke test: the (slow) summary is skipped and the sizes are small.
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let sizes = if benchmarking { &FULL } else { &SMOKE };
    if benchmarking && env_enabled("EDGEMOE_BENCH_SUMMARY") {
        print_summary();
    }
    if env_enabled("EDGEMOE_BENCH_CRITERION") {
        let mut c = Criterion::default()
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .configure_from_args();
        bench_gemv(&mut c, sizes);
        bench_gemm(&mut c, sizes);
        bench_head(&mut c, sizes);
        bench_quantize(&mut c, sizes);
        c.final_summary();
    }
}
