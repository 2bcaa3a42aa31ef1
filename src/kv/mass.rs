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
    let h = shape.num_heads as f64;
    let mut mass = Vec::new();
    for_each_row(shape, q, positions, segments, |n, weights| {
        let mut row = vec![0f64; n];
        for w in weights {
            for (s, &x) in w.iter().enumerate() {
                row[s] += x / h;
            }
        }
        mass.extend(row.iter().map(|&m| m as f32));
    })?;
    Ok(mass)
}

/// Per query row and KV head, the mass slot `s` of that head's map received: the softmax
/// weights of the head's group of query heads, summed (so a row's head sums to the group's
/// size); rows one after another, each `num_kv_heads × cache.len()` long, head-major. Where
/// each KV head keeps its own tokens, a head sees the slots its own positions make visible.
pub fn reference_head_mass(
    shape: &AttentionShape,
    q: &[f32],
    positions: &[usize],
    segments: &[Segment],
) -> Result<Vec<f32>> {
    let group = shape.num_heads / shape.num_kv_heads;
    let mut mass = Vec::new();
    for_each_row(shape, q, positions, segments, |n, weights| {
        let mut row = vec![0f64; shape.num_kv_heads * n];
        for (head, w) in weights.iter().enumerate() {
            let at = head / group * n;
            for (s, &x) in w.iter().enumerate() {
                row[at + s] += x;
            }
        }
        mass.extend(row.iter().map(|&m| m as f32));
    })?;
    Ok(mass)
}

/// Calls `f(slots, weights)` for every query row in order: per query head, the softmax weight
/// of each of the row's cache slots (0 where invisible to the head's KV head).
fn for_each_row(
    shape: &AttentionShape,
    q: &[f32],
    positions: &[usize],
    segments: &[Segment],
    mut f: impl FnMut(usize, &[Vec<f64>]),
) -> Result<()> {
    let (h, d) = (shape.num_heads, shape.head_dim);
    let group = h / shape.num_kv_heads;
    let kv_dim = shape.num_kv_heads * d;
    for seg in segments {
        let cache = seg.cache;
        let n = cache.len();
        let keys = match cache.storage() {
            Some(s) => s.to_host()?.keys,
            None => std::borrow::Cow::Borrowed(&[][..]),
        };
        for t in seg.rows.clone() {
            let pos = positions[t];
            let mut weights = vec![vec![0f64; n]; h];
            for (head, w) in weights.iter_mut().enumerate() {
                let kvh = head / group;
                let slot_positions = cache.head_positions(kvh);
                let visible: Vec<usize> = (0..n)
                    .filter(|&s| {
                        let p = slot_positions[s] as usize;
                        p <= pos && shape.sliding_window.is_none_or(|w| pos - p < w)
                    })
                    .collect();
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
                // A sink logit joins the denominator and takes no weight.
                let sink = shape.sink_logits.map(|s| f64::from(s[head]));
                let max = scores
                    .iter()
                    .copied()
                    .chain(sink)
                    .fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().chain(&sink).map(|s| (s - max).exp()).sum();
                for (&s, sc) in visible.iter().zip(&scores) {
                    w[s] = (sc - max).exp() / z;
                }
            }
            f(n, &weights);
        }
    }
    Ok(())
}
