//! AVX2 tier: `vpmaddubsw` of the unpacked nibbles (unsigned) against broadcast activation
//! bytes (signed), widened by `vpmaddwd`; a tile's 16 rows are two vectors of 8 lanes. A pair
//! of products is at most 2·15·127 = 3810 and the low and high nibbles' pairs add to at most
//! 7620, so the i16 steps never saturate.

use std::arch::x86_64::*;

use super::{TileJob, TileOut, MAX_TOKENS};
use crate::backend::cpu::simd::prefetch_next_page;
use crate::model::int4::{STEP_BYTES, STEP_K, SYMMETRIC_ZERO, TILE_ROWS};

/// # Safety
/// The CPU must have AVX2 and F16C.
pub(super) unsafe fn tile(job: &TileJob, f: &mut TileOut) {
    // SAFETY: the caller guarantees the features.
    unsafe {
        match job.tokens {
            1 => tokens::<1>(job, f),
            2 => tokens::<2>(job, f),
            3 => tokens::<3>(job, f),
            4 => tokens::<4>(job, f),
            n => unreachable!("no AVX2 int4 tile for {n} tokens"),
        }
    }
}

/// Four activation bytes at `p` as one i32, for a broadcast.
///
/// # Safety
/// `p..p + 4` must be readable.
#[inline(always)]
unsafe fn quad(p: *const i8) -> __m256i {
    // SAFETY: the caller guarantees 4 readable bytes; an unaligned read.
    _mm256_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

#[target_feature(enable = "avx2,f16c")]
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

    let nibbles = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut sums = [[_mm256_setzero_ps(); 2]; R];
    for g in 0..job.groups() {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for s in g * per_group..((g + 1) * per_group).min(steps) {
            // SAFETY: s < steps: the step's 64 bytes lie in `data` and its 8 activation
            // bytes in each token's row (asserted above).
            let p = unsafe { data.add(s * STEP_BYTES) };
            prefetch_next_page(p, STEP_BYTES);
            let mut x_lo = [_mm256_setzero_si256(); R];
            let mut x_hi = [_mm256_setzero_si256(); R];
            for t in 0..R {
                // SAFETY: as above.
                unsafe {
                    let x = xs[t].add(s * STEP_K);
                    x_lo[t] = quad(x);
                    x_hi[t] = quad(x.add(4));
                }
            }
            for (h, offset) in [0, 32].into_iter().enumerate() {
                // SAFETY: 32 of the step's 64 bytes; `loadu` has no alignment need.
                let v = unsafe { _mm256_loadu_si256(p.add(offset).cast()) };
                let lo = _mm256_and_si256(v, nibbles);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibbles);
                for t in 0..R {
                    let pairs = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, x_lo[t]),
                        _mm256_maddubs_epi16(hi, x_hi[t]),
                    );
                    acc[t][h] = _mm256_add_epi32(acc[t][h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for h in 0..2 {
            let meta = g * TILE_ROWS + 8 * h..g * TILE_ROWS + 8 * h + 8;
            let zeros = job.zeros.map(|z| {
                // SAFETY: 8 readable bytes (asserted above).
                _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(z[meta.clone()].as_ptr().cast()) })
            });
            // SAFETY: 8 readable u16 (asserted above).
            let scale =
                _mm256_cvtph_ps(unsafe { _mm_loadu_si128(job.scales[meta].as_ptr().cast()) });
            for t in 0..R {
                // zero · Σx: per lane where stored, else the symmetric 8 (the same integers).
                let correction = match zeros {
                    Some(z) => _mm256_mullo_epi32(z, _mm256_set1_epi32(job.xsums[t][g])),
                    None => _mm256_set1_epi32(i32::from(SYMMETRIC_ZERO) * job.xsums[t][g]),
                };
                let d = _mm256_sub_epi32(acc[t][h], correction);
                sums[t][h] = _mm256_add_ps(sums[t][h], _mm256_mul_ps(_mm256_cvtepi32_ps(d), scale));
            }
        }
    }
    for (out, v) in f.iter_mut().zip(sums) {
        for (h, half) in v.into_iter().enumerate() {
            // SAFETY: floats 8h..8h+8 of 16 are writable.
            unsafe { _mm256_storeu_ps(out[8 * h..].as_mut_ptr(), half) };
        }
    }
}
