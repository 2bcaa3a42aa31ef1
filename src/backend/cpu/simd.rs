//! Run-time CPU feature detection and the f32 SIMD kernels. Feature checks are cached; the
//! environment variable `EDGEMOE_CPU=scalar` forces the portable path so tests run both tiers.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy)]
pub struct CpuFeatures {
    pub avx2_fma: bool,
}

pub fn cpu_features() -> CpuFeatures {
    static FEATURES: OnceLock<CpuFeatures> = OnceLock::new();
    *FEATURES.get_or_init(|| CpuFeatures {
        avx2_fma: !forced_scalar() && detect_avx2_fma(),
    })
}

/// `EDGEMOE_CPU=scalar`: every kernel family (f32, int8 and int4, bf16/f16 and the weight-only
/// head, the quantizer's factorizations) runs its portable path.
pub(crate) fn forced_scalar() -> bool {
    std::env::var("EDGEMOE_CPU").is_ok_and(|v| v == "scalar")
}

#[cfg(target_arch = "x86_64")]
fn detect_avx2_fma() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx2_fma() -> bool {
    false
}

/// A raw pointer that parallel tasks may share when each writes a disjoint part of the buffer.
#[derive(Clone, Copy)]
pub struct SendPtr<T>(pub *mut T);
// SAFETY: only used where callers guarantee disjoint writes (see each use).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// Through a method so closures capture the whole (Send) wrapper, not the raw field.
    pub fn get(self) -> *mut T {
        self.0
    }
}

use super::matmul::{TILE_W as TW, TILE_X as TX};

/// How many weight rows ahead the f32 tile kernel prefetches (two tiles of [`TW`] rows).
const PREFETCH_ROWS: usize = 2 * TW;

/// AVX2 tile of dot products: `acc[r][c] = x[t + r] · w[j + c]` for `r < tx`, `c < tw`.
///
/// Every dot product is summed in the same order whatever the tile's size (one 8-lane
/// accumulator, then a horizontal sum, then the scalar tail), so a row's result does not depend
/// on which other rows share its batch: batched and single-sequence decoding agree bit for bit.
///
/// # Safety
/// The CPU must support avx2 and fma; `x` must hold rows `t..t + tx` and `w` rows `j..j + tw`
/// of length `k` (checked by the slicing below, which panics rather than reading out of bounds).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn dot_tile_avx2(
    x: &[f32],
    t: usize,
    tx: usize,
    w: &[f32],
    j: usize,
    tw: usize,
    k: usize,
    acc: &mut [[f32; TW]; TX],
) {
    // Monomorphize per tile shape so the accumulators live in registers.
    macro_rules! dispatch {
        ($($r:literal, $c:literal);*) => {
            match (tx, tw) {
                $(($r, $c) => tile_avx2::<$r, $c>(x, t, w, j, k, acc),)*
                _ => unreachable!("tile shape {tx}x{tw} exceeds {TX}x{TW}"),
            }
        };
    }
    dispatch!(1,1; 1,2; 1,3; 1,4; 2,1; 2,2; 2,3; 2,4; 3,1; 3,2; 3,3; 3,4);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_avx2<const R: usize, const C: usize>(
    x: &[f32],
    t: usize,
    w: &[f32],
    j: usize,
    k: usize,
    acc: &mut [[f32; TW]; TX],
) {
    use std::arch::x86_64::*;
    // Bounds checked once here; the loop below reads rows t..t+R of x and j..j+C of w, each
    // k long, through raw pointers (no closures, no per-load checks in the hot loop).
    assert!(
        (t + R) * k <= x.len() && (j + C) * k <= w.len(),
        "tile out of bounds"
    );
    let mut xp = [std::ptr::null::<f32>(); R];
    for (r, p) in xp.iter_mut().enumerate() {
        *p = x.as_ptr().add((t + r) * k);
    }
    let mut wp = [std::ptr::null::<f32>(); C];
    for (c, p) in wp.iter_mut().enumerate() {
        *p = w.as_ptr().add((j + c) * k);
    }
    let mut v = [[_mm256_setzero_ps(); C]; R];
    let k8 = k / 8 * 8;
    let mut i = 0;
    while i < k8 {
        // Plain loops, not closures: a closure would not inherit this function's target
        // features, and every intrinsic in it would become an out-of-line call.
        // x rows first, then one weight vector at a time: R + 1 + R·C registers (16 for 3×4),
        // where holding all C weight vectors would spill accumulators to the stack.
        let mut xv = [_mm256_setzero_ps(); R];
        for r in 0..R {
            xv[r] = _mm256_loadu_ps(xp[r].add(i));
        }
        // Ask for the same place in the weight rows a few tiles ahead, one request per cache
        // line: decoding streams each weight once per step, and the hardware prefetcher alone
        // leaves the FMAs waiting on L3 between rows.
        if i % 16 == 0 {
            for p in &wp {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i + PREFETCH_ROWS * k) as *const i8);
            }
        }
        for c in 0..C {
            let wv = _mm256_loadu_ps(wp[c].add(i));
            for r in 0..R {
                v[r][c] = _mm256_fmadd_ps(xv[r], wv, v[r][c]);
            }
        }
        i += 8;
    }
    // Reduce a row's (up to) four accumulators together with one hadd tree; each lane's sum
    // follows the same order whatever its neighbours are, so results don't depend on tile shape.
    for r in 0..R {
        let mut vs = [_mm256_setzero_ps(); 4];
        vs[..C].copy_from_slice(&v[r]);
        let ab = _mm256_hadd_ps(vs[0], vs[1]);
        let cd = _mm256_hadd_ps(vs[2], vs[3]);
        let abcd = _mm256_hadd_ps(ab, cd);
        let quad = _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
        let mut sums = [0f32; 4];
        _mm_storeu_ps(sums.as_mut_ptr(), quad);
        for c in 0..C {
            let mut s = sums[c];
            for ii in k8..k {
                s += *xp[r].add(ii) * *wp[c].add(ii);
            }
            acc[r][c] = s;
        }
    }
}

/// Reductions of one row (norms, softmax): with one scalar accumulator each add waits for the
/// previous one, so a 128-float row costs ~500 cycles; eight lanes × four accumulators don't.
/// The order of the adds depends only on the row's length.
pub fn sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if cpu_features().avx2_fma {
        // SAFETY: avx2+fma detected at run time.
        return unsafe { reduce_avx2::<false>(x) };
    }
    x.iter().sum()
}

/// `Σ x²` of one row, as [`sum`].
pub fn sum_squares(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if cpu_features().avx2_fma {
        // SAFETY: avx2+fma detected at run time.
        return unsafe { reduce_avx2::<true>(x) };
    }
    x.iter().map(|v| v * v).sum()
}

/// Largest element (−∞ for an empty row; NaNs are skipped, as `f32::max` does).
pub fn max(x: &[f32]) -> f32 {
    let mut chunks = x.chunks_exact(8);
    let mut m = [f32::NEG_INFINITY; 8];
    for c in &mut chunks {
        for (mi, &v) in m.iter_mut().zip(c) {
            *mi = mi.max(v);
        }
    }
    let tail = chunks.remainder().iter().copied();
    m.into_iter().chain(tail).fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn reduce_avx2<const SQUARES: bool>(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut blocks = x.chunks_exact(32);
    for b in &mut blocks {
        for (u, a) in acc.iter_mut().enumerate() {
            // In bounds: each block holds 32 floats.
            let v = _mm256_loadu_ps(b.as_ptr().add(8 * u));
            *a = if SQUARES {
                _mm256_fmadd_ps(v, v, *a)
            } else {
                _mm256_add_ps(*a, v)
            };
        }
    }
    let mut total = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    for &v in blocks.remainder() {
        total += if SQUARES { v * v } else { v };
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Scalar fallbacks so non-x86 builds compile; never called there since detection says false.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn dot_tile_avx2(
    x: &[f32],
    t: usize,
    tx: usize,
    w: &[f32],
    j: usize,
    tw: usize,
    k: usize,
    acc: &mut [[f32; TW]; TX],
) {
    super::matmul::dot_tile_scalar(x, t, tx, w, j, tw, k, acc)
}

/// Bytes of a page: the hardware prefetchers do not cross its end.
const PAGE: usize = 4096;
/// Lines of the next page asked for when a weight stream enters a page.
const NEXT_PAGE_LINES: usize = 8;

/// Called every `stride` bytes along a sequential weight stream (`stride` ≤ a page), asks for
/// the first lines of the next page once per page: when `p` is among the first `stride` bytes
/// of its page. The hardware prefetchers stop at a page's end and start again cold in the
/// next one (whose translation is also missed on first touch); asking ahead hides that
/// restart, which a kernel reading one long stream per thread otherwise pays every 4 KiB: the
/// int4 GEMV gained by it; the int8 GEMV and head, which read four streams at once, did not
/// (docs/BENCHMARKS.md, "Issue 28, the int4 GEMV").
#[inline(always)]
pub(crate) fn prefetch_next_page(p: *const u8, stride: usize) {
    #[cfg(target_arch = "x86_64")]
    if (p as usize) % PAGE < stride {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let next = p.wrapping_add(PAGE - (p as usize) % PAGE);
        for line in 0..NEXT_PAGE_LINES {
            // SAFETY: a prefetch is a hint that never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line * 64).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, stride);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_reductions_match_f64() {
        for len in [0, 1, 7, 8, 31, 32, 33, 100, 257] {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.31)
                .collect();
            let want: f64 = x.iter().map(|&v| v as f64).sum();
            let want_sq: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let want_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert!((sum(&x) as f64 - want).abs() < 1e-4, "sum, len {len}");
            assert!(
                (sum_squares(&x) as f64 - want_sq).abs() < 1e-3,
                "squares, len {len}"
            );
            assert_eq!(max(&x), want_max, "max, len {len}");
        }
        assert_eq!(max(&[f32::NAN, 1.0]), 1.0);
    }
}
