//! Memory read bandwidth of this machine, measured the way a decode step reads weights: a large
//! buffer streamed once per pass by every thread of a pool over disjoint chunks.

use rayon::prelude::*;
use std::time::Instant;

/// Median GB/s of `passes` reads of a `bytes`-sized buffer with `threads` threads.
pub fn read_bandwidth_gbs(bytes: usize, threads: usize, passes: usize) -> f64 {
    let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(p) => p,
        Err(_) => return 0.0,
    };
    let words = bytes / 8;
    // Non-zero contents so pages are really backed (a zeroed Vec may map the shared zero page).
    let buf: Vec<u64> = (0..words as u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9))
        .collect();
    let mut rates = Vec::with_capacity(passes);
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        let sum: u64 = pool.install(|| {
            buf.par_chunks(1 << 16)
                .map(xor_chunk)
                .reduce(|| 0, |a, b| a ^ b)
        });
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        rates.push(bytes as f64 / secs / 1e9);
    }
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// Eight independent lanes so the loop vectorizes and is bound by memory, not by a dependency.
fn xor_chunk(c: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut it = c.chunks_exact(8);
    for block in &mut it {
        for (a, &b) in acc.iter_mut().zip(block) {
            *a ^= b;
        }
    }
    it.remainder()
        .iter()
        .fold(acc.iter().fold(0, |x, &y| x ^ y), |x, &y| x ^ y)
}
