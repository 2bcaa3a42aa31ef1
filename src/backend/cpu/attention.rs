//! Causal multi-head attention of new query rows against a sequence's cached keys/values,
//! with grouped-query heads and an optional sliding window.

use super::simd::{dots, weighted_sum, SendPtr, Strided};
use crate::kv::LayerCache;
use rayon::prelude::*;

pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub sliding_window: Option<usize>,
}

/// One sequence's rows of a batched attention call: query rows `rows` attend over `cache`.
pub struct Segment<'a> {
    pub rows: std::ops::Range<usize>,
    pub cache: &'a LayerCache,
}

/// For each query row `t` (at `positions[t]`) and head, attends over its segment's cache slots
/// whose position is ≤ the query's (and inside the window), writing `out[t, h·d..(h+1)·d]`.
/// All (row, head) pairs of all sequences are one pool of tasks, so a batch of single-token
/// decodes spreads over the threads like one long prefill does.
pub fn attend(
    shape: &AttentionShape,
    q: &[f32],
    positions: &[usize],
    segments: &[Segment],
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
    let mut row_cache: Vec<&LayerCache> = Vec::with_capacity(rows);
    for seg in segments {
        row_cache.extend(seg.rows.clone().map(|_| seg.cache));
    }
    assert_eq!(
        row_cache.len(),
        rows,
        "attend: segments must cover every row"
    );
    let work = |task: usize| {
        let (t, head) = (task / h, task % h);
        let cache = row_cache[t];
        let kv_head = head / group;
        let pos = positions[t];
        let qv = &q[t * h * d + head * d..][..d];
        let visible = |p: u32| {
            let p = p as usize;
            p <= pos && shape.sliding_window.is_none_or(|w| pos - p < w)
        };
        let slots: Vec<usize> = (0..cache.positions.len())
            .filter(|&s| visible(cache.positions[s]))
            .collect();
        let mut scores = vec![0f32; slots.len()];
        let rows = Strided {
            data: &cache.keys,
            stride: kv_dim,
            offset: kv_head * d,
            len: d,
        };
        dots(qv, &rows, &slots, &mut scores);
        scores.iter_mut().for_each(|s| *s *= scale);
        super::ops::softmax(&mut scores);
        // SAFETY: task (t, head) writes only out[t, head·d .. head·d + d]; tasks are disjoint.
        let o =
            unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(t * h * d + head * d), d) };
        let rows = Strided {
            data: &cache.values,
            stride: kv_dim,
            offset: kv_head * d,
            len: d,
        };
        weighted_sum(o, &rows, &slots, &scores);
    };
    // Short contexts are cheaper to run inline than to hand to the pool.
    let work_macs: usize = row_cache.iter().map(|c| c.positions.len() * h * d).sum();
    if work_macs < PARALLEL_MIN_MACS {
        (0..rows * h).for_each(work);
    } else {
        (0..rows * h).into_par_iter().with_min_len(2).for_each(work);
    }
}

const PARALLEL_MIN_MACS: usize = 1 << 15;
