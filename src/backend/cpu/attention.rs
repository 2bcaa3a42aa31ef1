//! Causal multi-head attention of new query rows against a sequence's cached keys/values,
//! with grouped-query heads and an optional sliding window.

use super::simd::{dot, SendPtr};
use crate::kv::LayerCache;
use rayon::prelude::*;

pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub sliding_window: Option<usize>,
}

/// For each query row `t` (at `positions[t]`) and head, attends over the cache slots whose
/// position is ≤ the query's (and inside the window), writing `out[t, h·d..(h+1)·d]`.
pub fn attend(
    shape: &AttentionShape,
    q: &[f32],
    positions: &[usize],
    cache: &LayerCache,
    out: &mut [f32],
) {
    let (h, d) = (shape.num_heads, shape.head_dim);
    let kv_dim = shape.num_kv_heads * d;
    let group = h / shape.num_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let rows = positions.len();
    let out_ptr = SendPtr(out.as_mut_ptr());
    let total = rows * h * d;
    assert!(
        out.len() >= total && q.len() >= total,
        "attend: buffer too small"
    );
    let work = |task: usize| {
        let (t, head) = (task / h, task % h);
        let kv_head = head / group;
        let pos = positions[t];
        let qv = &q[t * h * d + head * d..][..d];
        let visible = |p: u32| {
            let p = p as usize;
            p <= pos && shape.sliding_window.is_none_or(|w| pos - p < w)
        };
        let mut scores: Vec<f32> = Vec::with_capacity(cache.positions.len());
        let mut slots: Vec<usize> = Vec::with_capacity(cache.positions.len());
        for (slot, &p) in cache.positions.iter().enumerate() {
            if visible(p) {
                let kv = &cache.keys[slot * kv_dim + kv_head * d..][..d];
                scores.push(dot(qv, kv) * scale);
                slots.push(slot);
            }
        }
        super::ops::softmax(&mut scores);
        // SAFETY: task (t, head) writes only out[t, head·d .. head·d + d]; tasks are disjoint.
        let o =
            unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(t * h * d + head * d), d) };
        o.fill(0.0);
        for (&slot, &wgt) in slots.iter().zip(&scores) {
            let vv = &cache.values[slot * kv_dim + kv_head * d..][..d];
            for (oi, &vi) in o.iter_mut().zip(vv) {
                *oi += wgt * vi;
            }
        }
    };
    // Short contexts are cheaper to run inline than to hand to the pool.
    if rows * h * cache.positions.len() * d < PARALLEL_MIN_MACS {
        (0..rows * h).for_each(work);
    } else {
        (0..rows * h).into_par_iter().for_each(work);
    }
}

const PARALLEL_MIN_MACS: usize = 1 << 16;
