//! Device benchmarks, run by tools/gpu-check.sh (`--ignored`): one JSON line each, prefixed
//! `BENCH `, on Mixtral's expert shapes (4096 ↔ 14336). Nothing is asserted.

use super::common::*;
use edgemoe::backend::cpu::int8::QuantizedRows;
use edgemoe::backend::cuda::kernels::{GemmKernel, OutType};
use edgemoe::backend::cuda::Gpu;
use std::time::Instant;

const SHAPES: [(usize, usize); 2] = [(14336, 4096), (4096, 14336)];

/// Seconds per call of `f`, after warming up, over repetitions adding up to ~0.3 s.
fn time(g: &Gpu, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    g.sync("warm-up").unwrap();
    let t = Instant::now();
    f();
    g.sync("probe").unwrap();
    let one = t.elapsed().as_secs_f64().max(1e-6);
    let reps = ((0.3 / one) as usize).clamp(3, 1000);
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    g.sync("timed runs").unwrap();
    t.elapsed().as_secs_f64() / reps as f64
}

fn quantized(rng: &mut Rng, m: usize, k: usize) -> QuantizedRows {
    let x: Vec<f32> = rng.f32s(m * k, 1.0);
    let mut q = QuantizedRows::new();
    edgemoe::backend::cpu::int8::quantize_rows(&x, m, k, &mut q);
    q
}

#[test]
#[ignore = "benchmark: tools/gpu-check.sh"]
fn bench_w8a8_gemm() {
    let Some(b) = device("bench_w8a8_gemm") else {
        return;
    };
    let g = b.gpu();
    let mut rng = Rng(1);
    for (n, k) in SHAPES {
        let w = upload_matrix(b, &random_matrix(&mut rng, n, k));
        for m in [1, 8, 64, 512, 4096] {
            let x = upload_quant(b, &quantized(&mut rng, m, k));
            let mut out = g.zeros::<f32>(m * n, "out").unwrap();
            let s = time(g, || {
                g.gemm_w8a8(GemmKernel::Auto, &x, &w, None, OutType::F32, &mut out, None)
                    .unwrap()
            });
            let tops = 2.0 * (m * n * k) as f64 / s / 1e12;
            println!(
                "BENCH {}",
                serde_json::json!({"bench": "w8a8_gemm", "m": m, "n": n, "k": k, "seconds": s, "tops": tops})
            );
        }
    }
}

#[test]
#[ignore = "benchmark: tools/gpu-check.sh"]
fn bench_gemv_and_copy_bandwidth() {
    let Some(b) = device("bench_gemv") else {
        return;
    };
    let g = b.gpu();
    let mut rng = Rng(2);
    // Device-to-device copy of 1 GiB: bytes read + written per second, and read alone.
    let bytes = 1usize << 30;
    let src = g.zeros::<u8>(bytes, "copy source").unwrap();
    let mut dst = g.zeros::<u8>(bytes, "copy target").unwrap();
    let s = time(g, || g.stream.memcpy_dtod(&src, &mut dst).unwrap());
    println!(
        "BENCH {}",
        serde_json::json!({"bench": "copy", "bytes": bytes, "seconds": s,
        "read_plus_write_gb_s": 2.0 * bytes as f64 / s / 1e9, "read_gb_s": bytes as f64 / s / 1e9})
    );
    drop((src, dst));
    for (n, k) in SHAPES {
        let w = upload_matrix(b, &random_matrix(&mut rng, n, k));
        for m in 1..=8 {
            let x = upload_quant(b, &quantized(&mut rng, m, k));
            let mut out = g.zeros::<f32>(m * n, "out").unwrap();
            let s = time(g, || {
                g.gemm_w8a8(GemmKernel::Gemv, &x, &w, None, OutType::F32, &mut out, None)
                    .unwrap()
            });
            let read = (n * w.k_padded + m * w.k_padded + 4 * n) as f64;
            println!(
                "BENCH {}",
                serde_json::json!({"bench": "gemv", "m": m, "n": n, "k": k, "seconds": s, "gb_s": read / s / 1e9})
            );
        }
    }
}

/// Host → device copy of a Mixtral expert matrix (14336 × 4096 int8, 58.7 MB): through the
/// expert copier (staging ring + copy stream, what a fetch does) beside a plain
/// `cudaMemcpyAsync` from page-locked memory into a buffer allocated once. The copier's rate
/// should be at least 80% of the plain one's.
#[test]
#[ignore = "benchmark: tools/gpu-check.sh"]
fn bench_expert_copy() {
    let Some(b) = device("bench_expert_copy") else {
        return;
    };
    let g = b.gpu();
    let bytes = 14336 * 4096;
    let data: Vec<i8> = (0..bytes).map(|i| (i % 251) as i8).collect();
    let copier = edgemoe::backend::cuda::copier::ExpertCopier::new(g).unwrap();
    let reps = 16;
    let timed = |f: &mut dyn FnMut()| {
        f();
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        t.elapsed().as_secs_f64() / reps as f64
    };
    let mut keep = Vec::new();
    let ours = timed(&mut || {
        keep.push(copier.upload_i8(g, &data, "bench").unwrap());
        if keep.len() > 4 {
            copier.sync().unwrap();
            keep.clear();
        }
    });
    copier.sync().unwrap();
    drop(keep);
    let mut pinned = unsafe { g.ctx.alloc_pinned::<i8>(bytes) }.unwrap();
    pinned.as_mut_slice().unwrap().copy_from_slice(&data);
    let mut dst = g.zeros::<i8>(bytes, "copy target").unwrap();
    let plain = timed(&mut || {
        g.stream.memcpy_htod(&pinned, &mut dst).unwrap();
        g.sync("plain copy").unwrap();
    });
    println!(
        "BENCH {}",
        serde_json::json!({"bench": "expert_copy", "bytes": bytes,
            "copier_gb_s": bytes as f64 / ours / 1e9, "plain_pinned_gb_s": bytes as f64 / plain / 1e9,
            "ratio": plain / ours})
    );
}
