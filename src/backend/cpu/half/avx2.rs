//! AVX2 + FMA + F16C tier: 8 f32 lanes; a step is 16 weights of a row (32 bytes).
//!
//! bf16: one 256-bit load, the even elements as `lane << 16` and the odd ones as
//! `lane & 0xffff0000`. f16: two 128-bit halves through `vcvtph2ps` (F16C).

use std::arch::x86_64::*;

use super::blocking::{HalfKernel, Sums};
use super::HalfKind;

const LANES: usize = 8;
const STEP: usize = 2 * LANES;
/// Software prefetch of the weights, as in the AVX-512 tier (which see).
const PREFETCH: usize = 1024;
const PREFETCH_ROWS: usize = 2;

/// The AVX2 [`HalfKernel`].
pub(super) struct Avx2;

impl HalfKernel for Avx2 {
    // 8 accumulators + 4 widened weight vectors + 2 activation vectors: 14 of 16 ymm.
    const TILE_ROWS: usize = 4;
    const BLOCK_COLS: usize = 2;

    /// As many weight rows as the 16 ymm registers hold: `R·C` sums, `2·C` widened weights and
    /// the two activation vectors in use.
    fn stream_cols(rows: usize) -> usize {
        match rows {
            1 => 4,
            2 => 3,
            _ => 2,
        }
    }

    unsafe fn dots(kind: HalfKind, xs: &[&[f32]], ws: &[&[u16]], sums: &mut Sums) {
        // SAFETY: the caller guarantees AVX2 + FMA + F16C.
        unsafe { dots_avx2(kind, xs, ws, sums) }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dots_avx2(kind: HalfKind, xs: &[&[f32]], ws: &[&[u16]], sums: &mut Sums) {
    macro_rules! shapes {
        ($($r:literal, $c:literal);*) => {
            match (kind, xs.len(), ws.len()) {
                $(
                    (HalfKind::Bf16, $r, $c) => tile::<$r, $c, true>(xs, ws, sums),
                    (HalfKind::F16, $r, $c) => tile::<$r, $c, false>(xs, ws, sums),
                )*
                (_, r, c) => unreachable!("no AVX2 tile for {r} rows × {c} weight rows"),
            }
        };
    }
    shapes!(1, 1; 1, 2; 1, 4; 2, 1; 2, 2; 2, 3; 3, 1; 3, 2; 4, 1; 4, 2)
}

/// One `R × C` register tile over whole rows.
#[target_feature(enable = "avx2,fma,f16c")]
fn tile<const R: usize, const C: usize, const BF16: bool>(
    xs: &[&[f32]],
    ws: &[&[u16]],
    sums: &mut Sums,
) {
    let k = ws[0].len();
    let (full, steps) = (k / STEP, k.div_ceil(STEP));
    assert!(xs.len() == R && ws.len() == C && R <= sums.len() && C <= sums[0].len());
    assert!(ws.iter().all(|w| w.len() == k));
    assert!(xs.iter().all(|x| x.len() == steps * STEP));
    let xp: [*const f32; R] = std::array::from_fn(|r| xs[r].as_ptr());
    // A last partial step reads zero-padded copies (the activations are padded already). One
    // loop for all steps, rather than a second copy of the step after it, keeps the sums in
    // registers (measured 5–20% faster).
    let mut tail = [[0u16; STEP]; C];
    for (t, w) in tail.iter_mut().zip(ws) {
        t[..k - full * STEP].copy_from_slice(&w[full * STEP..]);
    }
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    for s in 0..steps {
        let wp: [*const u16; C] = std::array::from_fn(|c| match s < full {
            true => ws[c].as_ptr().wrapping_add(s * STEP),
            false => tail[c].as_ptr(),
        });
        if R >= PREFETCH_ROWS && s % 2 == 0 {
            // One request per 64-byte line, that is per two steps.
            for &p in &wp {
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(PREFETCH).cast());
            }
        }
        // SAFETY: a full step `s < full` reads weights `s·16..(s + 1)·16 ≤ k` of each row, the
        // last partial one 16 of `tail`; activations are `steps·16` long (asserted).
        unsafe { step::<R, C, BF16>(&mut acc, wp, xp, s * STEP) };
    }
    for (sums_r, acc_r) in sums.iter_mut().zip(&acc) {
        for (s, &a) in sums_r.iter_mut().zip(acc_r) {
            *s = hsum(a);
        }
    }
}

/// Adds one step of every weight row times every activation row into `acc`.
///
/// # Safety
/// Each `w[c]` must point to 16 readable weights and each `x[r]` to `at + 16` readable floats.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn step<const R: usize, const C: usize, const BF16: bool>(
    acc: &mut [[__m256; C]; R],
    w: [*const u16; C],
    x: [*const f32; R],
    at: usize,
) {
    let mut even = [_mm256_setzero_ps(); C];
    let mut odd = [_mm256_setzero_ps(); C];
    for c in 0..C {
        // SAFETY: 16 weights at `w[c]` (the caller's contract).
        (even[c], odd[c]) = unsafe { widen::<BF16>(w[c]) };
    }
    for (acc_r, &xr) in acc.iter_mut().zip(&x) {
        // SAFETY: `at + 16` floats at `xr` (the caller's contract).
        let (xe, xo) = unsafe {
            (
                _mm256_loadu_ps(xr.add(at)),
                _mm256_loadu_ps(xr.add(at + LANES)),
            )
        };
        for ((a, &e), &o) in acc_r.iter_mut().zip(&even).zip(&odd) {
            *a = _mm256_fmadd_ps(e, xe, *a);
            *a = _mm256_fmadd_ps(o, xo, *a);
        }
    }
}

/// 16 weights at `p` as two f32 vectors: bf16's even and odd elements, f16's two halves.
///
/// # Safety
/// `p` must point to 16 readable `u16`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn widen<const BF16: bool>(p: *const u16) -> (__m256, __m256) {
    if BF16 {
        // SAFETY: 32 readable bytes; `loadu` has no alignment requirement.
        let v = unsafe { _mm256_loadu_si256(p.cast()) };
        let even = _mm256_slli_epi32::<16>(v);
        let odd = _mm256_and_si256(v, _mm256_set1_epi32(0xffff_0000_u32 as i32));
        (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
    } else {
        // SAFETY: as above, in two 16-byte halves.
        let (lo, hi) = unsafe {
            (
                _mm_loadu_si128(p.cast()),
                _mm_loadu_si128(p.add(LANES).cast()),
            )
        };
        (_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi))
    }
}

/// Horizontal sum of eight lanes, in a fixed order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Reorders each step of 16 activations to its 8 even then its 8 odd elements (the order
/// [`widen`] gives bf16 weights). `src` and `dst` are whole steps, equally long.
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn deinterleave(src: &[f32], dst: &mut [f32]) {
    assert!(src.len() == dst.len() && src.len().is_multiple_of(STEP));
    for (s, d) in src.chunks_exact(STEP).zip(dst.chunks_exact_mut(STEP)) {
        // SAFETY: both chunks are 16 floats.
        unsafe {
            let (a, b) = (
                _mm256_loadu_ps(s.as_ptr()),
                _mm256_loadu_ps(s.as_ptr().add(LANES)),
            );
            // Per 128-bit lane: [a0 a2 b0 b2 | a4 a6 b4 b6]; then the 64-bit pairs in order.
            let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
            let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
            _mm256_storeu_ps(d.as_mut_ptr(), pairs_in_order(even));
            _mm256_storeu_ps(d.as_mut_ptr().add(LANES), pairs_in_order(odd));
        }
    }
}

/// `[p0 p1 p2 p3]` of 64-bit pairs as `[p0 p2 p1 p3]`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn pairs_in_order(v: __m256) -> __m256 {
    _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
}
