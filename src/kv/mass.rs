//! The plain reference of the attention mass each cache slot receives: scores, softmax and the
//! per-slot weights recomputed in f64 from the queries and the cache. Backends emit the mass
//! from their attention kernel instead; this is what they are tested against, and what a
//! backend without its own emission falls back to.

use super::{AttentionShape, Segment};
use crate::error::Result;

/// Per query row, the mass slot `s` of its segment's cache received (mean over the query
/// heads), rows one after another, each `cache.len()` long; invisible slots get 0. Fails only
/// where a storage cannot be read back (a device's).
pub fn reference_mass(
    shape: &AttentionShape,
    q: &[f32],
    positions: &[usize],
    segments: &[Segment],
) -> Result<Vec<f32>> {
    let (h, d) = (shape.num_heads, shape.head_dim);
    let group = h / shape.num_kv_heads;
    let kv_dim = shape.num_kv_heads * d;
    let mut mass = Vec::new();
    for seg in segments {
        let cache = seg.cache;
        let n = cache.positions.len();
        let keys = match cache.storage() {
            Some(s) => s.to_host()?.keys,
            None => std::borrow::Cow::Borrowed(&[][..]),
        };
        for t in seg.rows.clone() {
            let pos = positions[t];
            let visible: Vec<usize> = (0..n)
                .filter(|&s| {
                    let p = cache.positions[s] as usize;
                    p <= pos && shape.sliding_window.is_none_or(|w| pos - p < w)
                })
                .collect();
            let mut row = vec![0f64; n];
            for head in 0..h {
                let kvh = head / group;
                let qh = &q[t * h * d + head * d..][..d];
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&s| {
                        let k = &keys[s * kv_dim + kvh * d..][..d];
                        qh.iter()
                            .zip(k)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (&s, sc) in visible.iter().zip(&scores) {
                    row[s] += (sc - max).exp() / z / h as f64;
                }
            }
            mass.extend(row.iter().map(|&m| m as f32));
        }
    }
    Ok(mass)
}
