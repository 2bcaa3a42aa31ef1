//! Run-time CPU feature detection and the f32 SIMD kernels. Feature checks are cached; the
//! environment variable `EDGEMOE_CPU=scalar` forces the portable path so tests run both tiers.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy)]
pub struct CpuFeatures {
    pub avx2_fma: bool,
}

pub fn cpu_features() -> CpuFeatures {
    static FEATURES: OnceLock<CpuFeatures> = OnceLock::new();
    *FEATURES.get_or_init(|| {
        let forced_scalar = std::env::var("EDGEMOE_CPU").is_ok_and(|v| v == "scalar");
        CpuFeatures {
            avx2_fma: !forced_scalar && detect_avx2_fma(),
        }
    })
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
        let mut wv = [_mm256_setzero_ps(); C];
        for c in 0..C {
            wv[c] = _mm256_loadu_ps(wp[c].add(i));
        }
        for r in 0..R {
            let xv = _mm256_loadu_ps(xp[r].add(i));
            for c in 0..C {
                v[r][c] = _mm256_fmadd_ps(xv, wv[c], v[r][c]);
            }
        }
        i += 8;
    }
    for r in 0..R {
        for c in 0..C {
            let mut s = hsum(v[r][c]);
            for ii in k8..k {
                s += *xp[r].add(ii) * *wp[c].add(ii);
            }
            acc[r][c] = s;
        }
    }
}

/// # Safety
/// The CPU must support avx2 and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let n32 = n / 32 * 32;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < n32 {
        for (u, a_u) in acc.iter_mut().enumerate() {
            let av = _mm256_loadu_ps(a.as_ptr().add(i + 8 * u));
            let bv = _mm256_loadu_ps(b.as_ptr().add(i + 8 * u));
            *a_u = _mm256_fmadd_ps(av, bv, *a_u);
        }
        i += 32;
    }
    let mut s = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
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

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Dot product on the best available tier.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    if cpu_features().avx2_fma {
        // SAFETY: avx2+fma detected at run time.
        unsafe { dot_avx2(a, b) }
    } else {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }
}

/// `y += a·x` on the best available tier.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if cpu_features().avx2_fma {
        // SAFETY: avx2+fma detected at run time.
        unsafe { axpy_avx2(y, a, x) };
        return;
    }
    y.iter_mut().zip(x).for_each(|(yi, &xi)| *yi += a * xi);
}

/// # Safety
/// The CPU must support avx2 and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    use std::arch::x86_64::*;
    let n = y.len().min(x.len());
    let n8 = n / 8 * 8;
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i < n8 {
        // In bounds: i + 8 <= n8 <= both lengths.
        let yv = _mm256_loadu_ps(y.as_ptr().add(i));
        let xv = _mm256_loadu_ps(x.as_ptr().add(i));
        _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_fmadd_ps(av, xv, yv));
        i += 8;
    }
    for j in n8..n {
        y[j] += a * x[j];
    }
}

/// Rows of `len` floats at `offset + i·stride` in `data`: one head's keys or values in the cache.
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub stride: usize,
    pub offset: usize,
    pub len: usize,
}

impl Strided<'_> {
    fn row(&self, i: usize) -> &[f32] {
        &self.data[self.offset + i * self.stride..][..self.len]
    }
}

/// `out[j] = q · rows[slots[j]]`, in one call so the per-dot dispatch is paid once.
pub fn dots(q: &[f32], rows: &Strided, slots: &[usize], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if cpu_features().avx2_fma {
        // SAFETY: avx2+fma detected at run time.
        unsafe { dots_avx2(q, rows, slots, out) };
        return;
    }
    for (o, &s) in out.iter_mut().zip(slots) {
        *o = q.iter().zip(rows.row(s)).map(|(a, b)| a * b).sum();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(q: &[f32], rows: &Strided, slots: &[usize], out: &mut [f32]) {
    for (o, &s) in out.iter_mut().zip(slots) {
        *o = dot_avx2(q, rows.row(s));
    }
}

/// `out = Σ_j w[j] · rows[slots[j]]`.
pub fn weighted_sum(out: &mut [f32], rows: &Strided, slots: &[usize], w: &[f32]) {
    out.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    if cpu_features().avx2_fma {
        // SAFETY: avx2+fma detected at run time.
        unsafe { weighted_sum_avx2(out, rows, slots, w) };
        return;
    }
    for (&s, &wj) in slots.iter().zip(w) {
        out.iter_mut()
            .zip(rows.row(s))
            .for_each(|(o, &v)| *o += wj * v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_avx2(out: &mut [f32], rows: &Strided, slots: &[usize], w: &[f32]) {
    for (&s, &wj) in slots.iter().zip(w) {
        axpy_avx2(out, wj, rows.row(s));
    }
}
