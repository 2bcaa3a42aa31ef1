//! Vectorized `exp` and the operations built on it (softmax, SiLU gating).
//!
//! A scalar `expf` call costs as much as attending one cached token, so softmax over a long
//! context and the SiLU of every expert's hidden units are done eight lanes at a time. Every
//! element goes through the same 8-lane routine — a slice's tail is padded into one vector — so
//! an element's result never depends on the length of the slice it sits in (batched and
//! single-sequence decoding stay bit-identical).

use super::simd::{self, cpu_features};

/// Cephes `expf` polynomial for e^r on |r| ≤ ln2/2 (relative error about 1e-7, one f32 ulp).
const EXP_POLY: [f32; 6] = [
    1.987_569_2e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
/// ln 2 split in two so `x - n·ln2` is exact for the n that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Inputs are clamped here: below, e^x is under f32's smallest normal; above, it overflows.
const EXP_MIN: f32 = -87.336_55;
const EXP_MAX: f32 = 88.3;

/// The scalar twin of the AVX2 routine (same steps, same constants), for CPUs without AVX2.
pub fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let p = EXP_POLY[1..]
        .iter()
        .fold(EXP_POLY[0], |acc, &c| acc.mul_add(r, c));
    let e = (r * r).mul_add(p, r) + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Defines an AVX2 slice routine that applies an 8-lane body to every element, padding the
/// tail into one vector. (A macro, not a closure: closures would not inherit the target features.)
macro_rules! map8_avx2 {
    ($name:ident, |$v:ident| $body:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $name(x: &mut [f32]) {
            use std::arch::x86_64::*;
            let mut chunks = x.chunks_exact_mut(8);
            for c in &mut chunks {
                let $v = _mm256_loadu_ps(c.as_ptr());
                // In bounds: each chunk holds exactly 8 floats.
                _mm256_storeu_ps(c.as_mut_ptr(), $body);
            }
            let tail = chunks.into_remainder();
            if !tail.is_empty() {
                let mut pad = [0f32; 8];
                pad[..tail.len()].copy_from_slice(tail);
                let $v = _mm256_loadu_ps(pad.as_ptr());
                _mm256_storeu_ps(pad.as_mut_ptr(), $body);
                tail.copy_from_slice(&pad[..tail.len()]);
            }
        }
    };
}

map8_avx2!(exp_slice_avx2, |v| exp8(v));
map8_avx2!(silu_slice_avx2, |v| _mm256_div_ps(
    v,
    _mm256_add_ps(
        _mm256_set1_ps(1.0),
        exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))
    )
));

/// e^x on eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN)),
        _mm256_set1_ps(EXP_MAX),
    );
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_add_ps(
        _mm256_fmadd_ps(_mm256_mul_ps(r, r), p, r),
        _mm256_set1_ps(1.0),
    );
    let bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(e, _mm256_castsi256_ps(bits))
}

/// `x ← e^x` element-wise.
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if cpu_features().avx2_fma {
        // SAFETY: avx2+fma detected at run time.
        unsafe { exp_slice_avx2(x) };
        return;
    }
    x.iter_mut().for_each(|v| *v = exp_approx(*v));
}

/// In-place softmax, computed stably (max subtracted first).
pub fn softmax(x: &mut [f32]) {
    let max = simd::max(x);
    x.iter_mut().for_each(|v| *v -= max);
    exp_in_place(x);
    let inv = 1.0 / simd::sum(x);
    x.iter_mut().for_each(|v| *v *= inv);
}

/// [`softmax`] of `x` with one more logit, `sink`, in the denominator that is then dropped
/// (an attention sink): the weights sum to less than one.
pub fn softmax_with_sink(x: &mut [f32], sink: f32) {
    let max = simd::max(x).max(sink);
    x.iter_mut().for_each(|v| *v -= max);
    exp_in_place(x);
    let inv = 1.0 / (simd::sum(x) + exp_approx(sink - max));
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `silu(x) = x / (1 + e^-x)` element-wise.
pub fn silu_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if cpu_features().avx2_fma {
        // SAFETY: avx2+fma detected at run time.
        unsafe { silu_slice_avx2(x) };
        return;
    }
    x.iter_mut().for_each(|v| *v /= 1.0 + exp_approx(-*v));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_std() {
        let mut xs: Vec<f32> = (-8700..=8800).map(|i| i as f32 * 0.01 + 0.003).collect();
        xs.extend([0.0, -0.0, 1e-8, -1e-8, 0.5, -0.5]);
        let mut v = xs.clone();
        exp_in_place(&mut v);
        for (&x, &e) in xs.iter().zip(&v) {
            let want = (x as f64).exp();
            let rel = ((e as f64 - want) / want).abs();
            assert!(rel < 2.5e-7, "exp({x}) = {e}, want {want} (rel {rel:e})");
            let s = exp_approx(x) as f64;
            assert!(((s - want) / want).abs() < 2.5e-7, "scalar exp({x}) = {s}");
        }
    }

    #[test]
    fn exp_saturates_instead_of_nan() {
        let mut v = vec![-1e30, -200.0, 200.0, 1e30, f32::NEG_INFINITY];
        exp_in_place(&mut v);
        assert!(v.iter().all(|e| e.is_finite() && *e >= 0.0), "{v:?}");
        assert!(v[0] < 1e-37 && v[2] > 1e38);
    }

    #[test]
    fn tail_elements_match_full_vectors() {
        // Element i must come out the same whatever slice length it was computed in.
        let xs: Vec<f32> = (0..19).map(|i| (i as f32 - 9.0) * 0.37).collect();
        let mut full = xs.clone();
        silu_in_place(&mut full);
        for len in 1..xs.len() {
            let mut part = xs[..len].to_vec();
            silu_in_place(&mut part);
            assert_eq!(part, full[..len]);
        }
    }

    #[test]
    fn silu_and_softmax_match_f64() {
        let xs: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.61).collect();
        let mut s = xs.clone();
        silu_in_place(&mut s);
        for (&x, &y) in xs.iter().zip(&s) {
            let want = x as f64 / (1.0 + (-x as f64).exp());
            assert!(
                (y as f64 - want).abs() < 1e-6 * want.abs().max(1.0),
                "silu({x})"
            );
        }
        let mut p = xs.clone();
        softmax(&mut p);
        let z: f64 = xs.iter().map(|&x| (x as f64).exp()).sum();
        for (&x, &y) in xs.iter().zip(&p) {
            assert!(
                (y as f64 - (x as f64).exp() / z).abs() < 1e-7,
                "softmax at {x}"
            );
        }
    }
}
