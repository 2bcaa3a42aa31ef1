//! The portable reference: the definition every SIMD tier is tested against bit for bit.

use super::{TileJob, TileOut};
use crate::model::int4::{STEP_BYTES, STEP_K, SYMMETRIC_ZERO, TILE_ROWS};

/// Row `r`'s nibble of column `c` (`< 8`) in one 64-byte step.
#[inline(always)]
pub(super) fn nibble(step: &[u8], r: usize, c: usize) -> u8 {
    let byte = step[4 * r + c % 4];
    if c < 4 {
        byte & 0x0f
    } else {
        byte >> 4
    }
}

pub(super) fn tile(job: &TileJob, f: &mut TileOut) {
    for (x, (xsum, f_t)) in job.xs[..job.tokens]
        .iter()
        .zip(job.xsums.iter().zip(f.iter_mut()))
    {
        for (r, f_r) in f_t.iter_mut().enumerate() {
            let mut acc_f = 0f32;
            for g in 0..job.groups() {
                let mut d = 0i32;
                for s in job.steps(g) {
                    let step = &job.data[s * STEP_BYTES..(s + 1) * STEP_BYTES];
                    for c in 0..STEP_K {
                        d += i32::from(x[s * STEP_K + c]) * i32::from(nibble(step, r, c));
                    }
                }
                let at = g * TILE_ROWS + r;
                let zero = job.zeros.map_or(SYMMETRIC_ZERO, |z| z[at]);
                d -= i32::from(zero) * xsum[g];
                let scale = half::f16::from_bits(job.scales[at]).to_f32();
                acc_f += d as f32 * scale;
            }
            *f_r = acc_f;
        }
    }
}
