//! AVX-512 F/BW tier: 16 f32 lanes; a step is 32 weights of a row, one 64-byte cache line.
//!
//! bf16: one 512-bit load, the even elements as `lane << 16` and the odd ones as
//! `lane & 0xffff0000`. f16: two 256-bit halves through `vcvtph2ps` (AVX-512F).

use std::arch::x86_64::*;

use super::blocking::{HalfKernel, Sums};
use super::HalfKind;

const LANES: usize = 16;
const STEP: usize = 2 * LANES;
/// How far ahead (in weights: 2 KiB) tiles of [`PREFETCH_ROWS`]+ rows prefetch each weight row.
const PREFETCH: usize = 1024;
/// One-row tiles do so little per line that the hardware prefetchers keep up; a software
/// prefetch only costs them issue slots (measured 0–10% slower).
const PREFETCH_ROWS: usize = 2;

/// The AVX-512 [`HalfKernel`].
pub(super) struct Avx512;

impl HalfKernel for Avx512 {
    // 16 accumulators + 8 widened weight vectors + 2 activation vectors: 26 of 32 zmm.
    const TILE_ROWS: usize = 4;
    const BLOCK_COLS: usize = 4;

    fn stream_cols(_rows: usize) -> usize {
        4
    }

    unsafe fn dots(kind: HalfKind, xs: &[&[f32]], ws: &[&[u16]], sums: &mut Sums) {
        // SAFETY: the caller guarantees AVX-512 F + BW.
        unsafe { dots_avx512(kind, xs, ws, sums) }
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
fn dots_avx512(kind: HalfKind, xs: &[&[f32]], ws: &[&[u16]], sums: &mut Sums) {
    macro_rules! shapes {
        ($($r:literal, $c:literal);*) => {
            match (kind, xs.len(), ws.len()) {
                $(
                    (HalfKind::Bf16, $r, $c) => tile::<$r, $c, true>(xs, ws, sums),
                    (HalfKind::F16, $r, $c) => tile::<$r, $c, false>(xs, ws, sums),
                )*
                (_, r, c) => unreachable!("no AVX-512 tile for {r} rows × {c} weight rows"),
            }
        };
    }
    shapes!(1, 1; 1, 4; 2, 1; 2, 4; 3, 1; 3, 4; 4, 1; 4, 4)
}

/// One `R × C` register tile over whole rows.
#[target_feature(enable = "avx512f,avx512bw")]
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
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    for s in 0..steps {
        let wp: [*const u16; C] = std::array::from_fn(|c| match s < full {
            true => ws[c].as_ptr().wrapping_add(s * STEP),
            false => tail[c].as_ptr(),
        });
        if R >= PREFETCH_ROWS {
            // Into L2: these tiles compute long enough per line that the hardware prefetchers
            // fall behind (measured on 1 thread, weights from DRAM: 2 rows up to 20% faster,
            // 4 rows ~50%, 8 rows ~40%; 1–8 KiB ahead alike, into L1 worse). Past a row's end it
            // fetches the next row of the same run: the next streaming tile's.
            for &p in &wp {
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(PREFETCH).cast());
            }
        }
        // SAFETY: a full step `s < full` reads weights `s·32..(s + 1)·32 ≤ k` of each row, the
        // last partial one 32 of `tail`; activations are `steps·32` long (asserted).
        unsafe { step::<R, C, BF16>(&mut acc, wp, xp, s * STEP) };
    }
    for (sums_r, acc_r) in sums.iter_mut().zip(&acc) {
        for (s, &a) in sums_r.iter_mut().zip(acc_r) {
            *s = _mm512_reduce_add_ps(a);
        }
    }
}

/// Adds one step of every weight row times every activation row into `acc`.
///
/// # Safety
/// Each `w[c]` must point to 32 readable weights and each `x[r]` to `at + 32` readable floats.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn step<const R: usize, const C: usize, const BF16: bool>(
    acc: &mut [[__m512; C]; R],
    w: [*const u16; C],
    x: [*const f32; R],
    at: usize,
) {
    let mut even = [_mm512_setzero_ps(); C];
    let mut odd = [_mm512_setzero_ps(); C];
    for c in 0..C {
        // SAFETY: 32 weights at `w[c]` (the caller's contract).
        (even[c], odd[c]) = unsafe { widen::<BF16>(w[c]) };
    }
    for (acc_r, &xr) in acc.iter_mut().zip(&x) {
        // SAFETY: `at + 32` floats at `xr` (the caller's contract).
        let (xe, xo) = unsafe {
            (
                _mm512_loadu_ps(xr.add(at)),
                _mm512_loadu_ps(xr.add(at + LANES)),
            )
        };
        for ((a, &e), &o) in acc_r.iter_mut().zip(&even).zip(&odd) {
            *a = _mm512_fmadd_ps(e, xe, *a);
            *a = _mm512_fmadd_ps(o, xo, *a);
        }
    }
}

/// 32 weights at `p` as two f32 vectors: bf16's even and odd elements, f16's two halves.
///
/// # Safety
/// `p` must point to 32 readable `u16`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn widen<const BF16: bool>(p: *const u16) -> (__m512, __m512) {
    if BF16 {
        // SAFETY: 64 readable bytes; `loadu` has no alignment requirement.
        let v = unsafe { _mm512_loadu_si512(p.cast()) };
        let even = _mm512_slli_epi32::<16>(v);
        let odd = _mm512_and_si512(v, _mm512_set1_epi32(0xffff_0000_u32 as i32));
        (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
    } else {
        // SAFETY: as above, in two 32-byte halves.
        let (lo, hi) = unsafe {
            (
                _mm256_loadu_si256(p.cast()),
                _mm256_loadu_si256(p.add(LANES).cast()),
            )
        };
        (_mm512_cvtph_ps(lo), _mm512_cvtph_ps(hi))
    }
}

/// Reorders each step of 32 activations to its 16 even then its 16 odd elements (the order
/// [`widen`] gives bf16 weights). `src` and `dst` are whole steps, equally long.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn deinterleave(src: &[f32], dst: &mut [f32]) {
    assert!(src.len() == dst.len() && src.len().is_multiple_of(STEP));
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (s, d) in src.chunks_exact(STEP).zip(dst.chunks_exact_mut(STEP)) {
        // SAFETY: both chunks are 32 floats.
        unsafe {
            let (a, b) = (
                _mm512_loadu_ps(s.as_ptr()),
                _mm512_loadu_ps(s.as_ptr().add(LANES)),
            );
            _mm512_storeu_ps(d.as_mut_ptr(), _mm512_permutex2var_ps(a, even, b));
            _mm512_storeu_ps(d.as_mut_ptr().add(LANES), _mm512_permutex2var_ps(a, odd, b));
        }
    }
}
