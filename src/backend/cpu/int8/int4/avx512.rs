//! AVX-512 VNNI tier: `vpdpbusd` of the unpacked nibbles (unsigned) against four broadcast
//! activation bytes (signed), one 32-bit lane per row of the tile.

use std::arch::x86_64::*;

use super::{TileJob, TileOut, MAX_TOKENS};
use crate::backend::cpu::simd::prefetch_next_page;
use crate::model::int4::{STEP_BYTES, STEP_K, SYMMETRIC_ZERO, TILE_ROWS};

/// # Safety
/// The CPU must have AVX-512 F + BW + VNNI.
pub(super) unsafe fn tile(job: &TileJob, f: &mut TileOut) {
    // SAFETY: the caller guarantees the features.
    unsafe {
        match job.tokens {
            1 => tokens::<1>(job, f),
            2 => tokens::<2>(job, f),
            3 => tokens::<3>(job, f),
            4 => tokens::<4>(job, f),
            n => unreachable!("no VNNI int4 tile for {n} tokens"),
        }
    }
}

/// Four activation bytes at `p` as one i32, for a broadcast.
///
/// # Safety
/// `p..p + 4` must be readable.
#[inline(always)]
unsafe fn quad(p: *const i8) -> __m512i {
    // SAFETY: the caller guarantees 4 readable bytes; an unaligned read.
    _mm512_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn tokens<const R: usize>(job: &TileJob, f: &mut TileOut) {
    const { assert!(R <= MAX_TOKENS) };
    let steps = job.k_x / STEP_K;
    assert!(
        job.k_x.is_multiple_of(STEP_K) && job.data.len() >= steps * STEP_BYTES,
        "the tile is shorter than the activations"
    );
    assert!(job.xs[..R].iter().all(|x| x.len() == job.k_x));
    assert!(job.group.is_multiple_of(STEP_K));
    assert!(job.scales.len() >= job.groups() * TILE_ROWS);
    assert!(job
        .zeros
        .is_none_or(|z| z.len() >= job.groups() * TILE_ROWS));
    assert!(job.xsums[..R].iter().all(|s| s.len() >= job.groups()));
    let (data, per_group) = (job.data.as_ptr(), job.group / STEP_K);
    let xs: [*const i8; R] = std::array::from_fn(|t| job.xs[t].as_ptr());

    let nibbles = _mm512_set1_epi8(0x0f);
    let mut sums = [_mm512_setzero_ps(); R];
    for g in 0..job.groups() {
        let mut lo_acc = [_mm512_setzero_si512(); R];
        let mut hi_acc = [_mm512_setzero_si512(); R];
        for s in g * per_group..((g + 1) * per_group).min(steps) {
            // SAFETY: s < steps: the step's 64 bytes lie in `data` and its 8 activation
            // bytes in each token's row (asserted above); `loadu` needs no alignment.
            let p = unsafe { data.add(s * STEP_BYTES) };
            prefetch_next_page(p, STEP_BYTES);
            // SAFETY: as above.
            let v = unsafe { _mm512_loadu_si512(p.cast()) };
            let lo = _mm512_and_si512(v, nibbles);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibbles);
            for t in 0..R {
                // SAFETY: as above.
                let (q_lo, q_hi) = unsafe {
                    let x = xs[t].add(s * STEP_K);
                    (quad(x), quad(x.add(4)))
                };
                lo_acc[t] = _mm512_dpbusd_epi32(lo_acc[t], lo, q_lo);
                hi_acc[t] = _mm512_dpbusd_epi32(hi_acc[t], hi, q_hi);
            }
        }
        let meta = g * TILE_ROWS..(g + 1) * TILE_ROWS;
        let zeros = job.zeros.map(|z| {
            // SAFETY: 16 readable bytes (asserted above).
            _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(z[meta.clone()].as_ptr().cast()) })
        });
        // SAFETY: 16 readable u16 (asserted above).
        let scale =
            _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(job.scales[meta].as_ptr().cast()) });
        for t in 0..R {
            let d = _mm512_add_epi32(lo_acc[t], hi_acc[t]);
            // zero · Σx: per lane where stored, else the symmetric 8 (the same integers).
            let correction = match zeros {
                Some(z) => _mm512_mullo_epi32(z, _mm512_set1_epi32(job.xsums[t][g])),
                None => _mm512_set1_epi32(i32::from(SYMMETRIC_ZERO) * job.xsums[t][g]),
            };
            let d = _mm512_sub_epi32(d, correction);
            sums[t] = _mm512_add_ps(sums[t], _mm512_mul_ps(_mm512_cvtepi32_ps(d), scale));
        }
    }
    for (out, v) in f.iter_mut().zip(sums) {
        // SAFETY: `out` is 16 writable floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
    }
}
