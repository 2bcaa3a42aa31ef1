//! Causal multi-head attention of new query rows against a sequence's cached keys/values,
//! with grouped-query heads and an optional sliding window.
//!
//! One task is one query row; for each KV head it handles all the query heads that share it,
//! so each cached key and value row is read once for the whole group. Scores go through the
//! vectorized softmax; the AVX2 kernels keep the per-slot work to a few instructions and
//! prefetch the cache rows ahead, since decoding calls this once per layer for every sequence
//! in the batch and the cache has gone cold in between.

use super::simd::{cpu_features, SendPtr};
use super::vexp::softmax;
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

/// Below this many multiply-adds a call runs on the caller: handing tasks to the pool costs
/// more than short contexts take.
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// For each query row `t` (at `positions[t]`) and head, attends over its segment's cache slots
/// whose position is ≤ the query's (and inside the window), writing `out[t, h·d..(h+1)·d]`.
/// The rows of all sequences are one pool of tasks, so a batch of single-token decodes spreads
/// over the threads like one long prefill does. Returns how many cache slots the rows read in
/// all (each slot is one key and one value row).
pub fn attend(
    shape: &AttentionShape,
    q: &[f32],
    positions: &[usize],
    segments: &[Segment],
    out: &mut [f32],
) -> usize {
    let (h, d, kv_heads) = (shape.num_heads, shape.head_dim, shape.num_kv_heads);
    let group = h / kv_heads;
    let kv_dim = kv_heads * d;
    let rows = positions.len();
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
    let out_ptr = SendPtr(out.as_mut_ptr());
    // One task per query row: the visible slots are found once, and the row's KV heads are
    // read one after another from the same cache lines.
    let work = |t: usize| {
        let cache = row_cache[t];
        let pos = positions[t];
        let visible = |p: u32| {
            let p = p as usize;
            p <= pos && shape.sliding_window.is_none_or(|w| pos - p < w)
        };
        // Usually every cached token is visible (decoding without a window): skip the filter.
        let slots: Vec<u32> = if cache.positions.iter().all(|&p| visible(p)) {
            (0..cache.positions.len() as u32).collect()
        } else {
            (0..cache.positions.len() as u32)
                .filter(|&s| visible(cache.positions[s as usize]))
                .collect()
        };
        let mut scores = vec![0f32; group * slots.len()];
        for kv_head in 0..kv_heads {
            let first = t * h * d + kv_head * group * d;
            // SAFETY: this task writes only row t's heads (kv_head's group of them here);
            // tasks are disjoint, and `out` outlives them (asserted long enough above).
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(first), group * d) };
            let heads = HeadGroup {
                q: &q[first..first + group * d],
                group,
                head_dim: d,
                kv_dim,
                offset: kv_head * d,
            };
            heads.attend(cache, &slots, &mut scores, o);
        }
        slots.len()
    };
    let work_macs: usize = row_cache
        .iter()
        .map(|c| 2 * c.positions.len() * h * d)
        .sum();
    if work_macs < PARALLEL_MIN_MACS || super::parallel::kernel_threads() == 1 {
        (0..rows).map(work).sum()
    } else {
        (0..rows).into_par_iter().map(work).sum()
    }
}

/// The query heads of one row that share a KV head, and where that head sits in a cache row.
struct HeadGroup<'a> {
    /// `group × head_dim` queries.
    q: &'a [f32],
    group: usize,
    head_dim: usize,
    kv_dim: usize,
    offset: usize,
}

impl HeadGroup<'_> {
    /// `scores`: scratch of `group × slots.len()` floats.
    fn attend(&self, cache: &LayerCache, slots: &[u32], scores: &mut [f32], out: &mut [f32]) {
        let n = slots.len();
        let needed = slots.iter().max().map_or(0, |&s| s as usize + 1) * self.kv_dim;
        assert!(
            cache.keys.len() >= needed && cache.values.len() >= needed,
            "attend: slot outside the cache"
        );
        assert!(
            out.len() == self.group * self.head_dim && self.offset + self.head_dim <= self.kv_dim
        );
        // scores[g·n + j]: head g against slot j.
        assert_eq!(scores.len(), self.group * n, "attend: scores scratch size");
        #[cfg(target_arch = "x86_64")]
        if cpu_features().avx2_fma {
            // SAFETY: avx2+fma detected at run time; slots and out bounds asserted above.
            unsafe {
                self.scores_avx2(&cache.keys, slots, scores);
                scores.chunks_exact_mut(n.max(1)).for_each(softmax);
                self.mix_avx2(&cache.values, slots, scores, out);
            }
            return;
        }
        self.scores_scalar(&cache.keys, slots, scores);
        scores.chunks_exact_mut(n.max(1)).for_each(softmax);
        self.mix_scalar(&cache.values, slots, scores, out);
    }

    fn row<'c>(&self, data: &'c [f32], slot: u32) -> &'c [f32] {
        &data[slot as usize * self.kv_dim + self.offset..][..self.head_dim]
    }

    fn scores_scalar(&self, keys: &[f32], slots: &[u32], scores: &mut [f32]) {
        let (d, n) = (self.head_dim, slots.len());
        let scale = 1.0 / (d as f32).sqrt();
        for (j, &s) in slots.iter().enumerate() {
            let key = self.row(keys, s);
            for g in 0..self.group {
                let q = &self.q[g * d..(g + 1) * d];
                scores[g * n + j] = q.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
        }
    }

    fn mix_scalar(&self, values: &[f32], slots: &[u32], scores: &[f32], out: &mut [f32]) {
        let (d, n) = (self.head_dim, slots.len());
        out.fill(0.0);
        for (j, &s) in slots.iter().enumerate() {
            let value = self.row(values, s);
            for g in 0..self.group {
                let w = scores[g * n + j];
                out[g * d..(g + 1) * d]
                    .iter_mut()
                    .zip(value)
                    .for_each(|(o, &v)| *o += w * v);
            }
        }
    }

    /// # Safety
    /// avx2+fma; every slot's row lies inside `keys` (checked by the caller).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scores_avx2(&self, keys: &[f32], slots: &[u32], scores: &mut [f32]) {
        use std::arch::x86_64::*;
        let (d, n) = (self.head_dim, slots.len());
        let d8 = d / 8 * 8;
        let scale = _mm256_set1_ps(1.0 / (d as f32).sqrt());
        // Eight slots at a time: eight independent FMA chains, then one reduction tree that
        // leaves the eight dot products in one vector. A lane's sum order does not depend on
        // its neighbours, and a short last block is padded with repeats of its last slot.
        for (start, block) in slots.chunks(8).enumerate().map(|(i, b)| (i * 8, b)) {
            for &s in slots.iter().skip(start + PREFETCH_SLOTS).take(8) {
                prefetch(keys.as_ptr().add(s as usize * self.kv_dim + self.offset), d);
            }
            let mut key = [std::ptr::null::<f32>(); 8];
            for (u, p) in key.iter_mut().enumerate() {
                let s = block[u.min(block.len() - 1)];
                *p = keys.as_ptr().add(s as usize * self.kv_dim + self.offset);
            }
            // Heads that share this KV head go two at a time over four slots each, so a key
            // row is loaded once for both (see `scores_pair_avx2`); a last odd head alone.
            let paired = self.group / 2 * 2;
            for g in (0..paired).step_by(2) {
                for half in 0..block.len().div_ceil(4) {
                    let at = start + 4 * half;
                    let sub = &block[4 * half..(4 * half + 4).min(block.len())];
                    self.scores_pair_avx2(keys, sub, g, at, scores);
                }
            }
            for g in paired..self.group {
                let q = self.q.as_ptr().add(g * d);
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut i = 0;
                while i < d8 {
                    let qv = _mm256_loadu_ps(q.add(i));
                    for u in 0..8 {
                        acc[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key[u].add(i)), acc[u]);
                    }
                    i += 8;
                }
                let mut dots = reduce8(&acc);
                if d8 < d {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), dots);
                    for (u, lane) in lanes.iter_mut().enumerate() {
                        for i in d8..d {
                            *lane += *q.add(i) * *key[u].add(i);
                        }
                    }
                    dots = _mm256_loadu_ps(lanes.as_ptr());
                }
                dots = _mm256_mul_ps(dots, scale);
                let row = &mut scores[g * n + start..g * n + start + block.len()];
                if block.len() == 8 {
                    _mm256_storeu_ps(row.as_mut_ptr(), dots);
                } else {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), dots);
                    row.copy_from_slice(&lanes[..block.len()]);
                }
            }
        }
    }

    /// Scores of heads `g` and `g + 1` against up to four slots (`block`, starting at slot
    /// index `start`): eight FMA chains over shared key loads, reduced by the same tree as the
    /// single-head blocks, so every score has the same bits either way.
    ///
    /// # Safety
    /// avx2+fma; every slot's row lies inside `keys`; `g + 1 < group`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scores_pair_avx2(
        &self,
        keys: &[f32],
        block: &[u32],
        g: usize,
        start: usize,
        scores: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let d = self.head_dim;
        let d8 = d / 8 * 8;
        let n = scores.len() / self.group;
        let mut key = [std::ptr::null::<f32>(); 4];
        for (u, p) in key.iter_mut().enumerate() {
            let s = block[u.min(block.len() - 1)];
            *p = keys.as_ptr().add(s as usize * self.kv_dim + self.offset);
        }
        let q = [self.q.as_ptr().add(g * d), self.q.as_ptr().add((g + 1) * d)];
        // acc[4h + u]: head g + h against slot u.
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i < d8 {
            let q0 = _mm256_loadu_ps(q[0].add(i));
            let q1 = _mm256_loadu_ps(q[1].add(i));
            for u in 0..4 {
                let kv = _mm256_loadu_ps(key[u].add(i));
                acc[u] = _mm256_fmadd_ps(q0, kv, acc[u]);
                acc[4 + u] = _mm256_fmadd_ps(q1, kv, acc[4 + u]);
            }
            i += 8;
        }
        let dots = reduce8(&acc);
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), dots);
        let scale = 1.0 / (d as f32).sqrt();
        for (lane, v) in lanes.iter_mut().enumerate() {
            let (h, u) = (lane / 4, lane % 4);
            for i in d8..d {
                *v += *q[h].add(i) * *key[u].add(i);
            }
            if u < block.len() {
                scores[(g + h) * n + start + u] = *v * scale;
            }
        }
    }

    /// # Safety
    /// avx2+fma; every slot's row lies inside `values`; `out` holds `group × head_dim`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mix_avx2(&self, values: &[f32], slots: &[u32], scores: &[f32], out: &mut [f32]) {
        let (d, n) = (self.head_dim, slots.len());
        let d8 = d / 8 * 8;
        // Heads that share this KV head go two at a time, so each value row is loaded once
        // for both; a last odd head alone.
        let paired = self.group / 2 * 2;
        for g in (0..paired).step_by(2) {
            let w = [
                &scores[g * n..(g + 1) * n],
                &scores[(g + 1) * n..(g + 2) * n],
            ];
            let og = [
                out.as_mut_ptr().add(g * d),
                out.as_mut_ptr().add((g + 1) * d),
            ];
            let mut c0 = 0;
            while c0 < d8 {
                let col = values.as_ptr().add(self.offset + c0);
                let o = [og[0].add(c0), og[1].add(c0)];
                match ((d8 - c0) / 8).min(4) {
                    4 => self.mix_pair_avx2::<4>(col, slots, w, o),
                    3 => self.mix_pair_avx2::<3>(col, slots, w, o),
                    2 => self.mix_pair_avx2::<2>(col, slots, w, o),
                    _ => self.mix_pair_avx2::<1>(col, slots, w, o),
                }
                c0 += 32;
            }
            for h in 0..2 {
                for i in d8..d {
                    *og[h].add(i) = slots
                        .iter()
                        .zip(w[h])
                        .map(|(&s, &wt)| wt * values[s as usize * self.kv_dim + self.offset + i])
                        .sum();
                }
            }
        }
        for g in paired..self.group {
            let weights = &scores[g * n..(g + 1) * n];
            let og = out.as_mut_ptr().add(g * d);
            // Up to 32 dims at a time, their sums held in registers across all slots.
            let mut c0 = 0;
            while c0 < d8 {
                let col = values.as_ptr().add(self.offset + c0);
                match ((d8 - c0) / 8).min(4) {
                    4 => self.mix_columns_avx2::<4>(col, slots, weights, og.add(c0)),
                    3 => self.mix_columns_avx2::<3>(col, slots, weights, og.add(c0)),
                    2 => self.mix_columns_avx2::<2>(col, slots, weights, og.add(c0)),
                    _ => self.mix_columns_avx2::<1>(col, slots, weights, og.add(c0)),
                }
                c0 += 32;
            }
            for i in d8..d {
                *og.add(i) = slots
                    .iter()
                    .zip(weights)
                    .map(|(&s, &w)| w * values[s as usize * self.kv_dim + self.offset + i])
                    .sum();
            }
        }
    }

    /// For both heads `h` of a pair, `out[h][0..8·V] = Σ_j weights[h][j] · col[slots[j]·kv_dim ..]`:
    /// one FMA chain per head and vector (eight for V = 4) over value rows loaded once.
    ///
    /// # Safety
    /// avx2+fma; `col + slot·kv_dim + 8·V` stays inside the values for every slot; each `out`
    /// holds 8·V floats; `weights` are `slots.len()` long.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mix_pair_avx2<const V: usize>(
        &self,
        col: *const f32,
        slots: &[u32],
        weights: [&[f32]; 2],
        out: [*mut f32; 2],
    ) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm256_setzero_ps(); V]; 2];
        let mut ahead = slots.iter().skip(PREFETCH_SLOTS);
        for (j, &s) in slots.iter().enumerate() {
            if let Some(&p) = ahead.next() {
                prefetch(col.add(p as usize * self.kv_dim), 8 * V);
            }
            let row = col.add(s as usize * self.kv_dim);
            let w = [_mm256_set1_ps(weights[0][j]), _mm256_set1_ps(weights[1][j])];
            let [a0, a1] = &mut acc;
            for (v, (x0, x1)) in a0.iter_mut().zip(a1.iter_mut()).enumerate() {
                let value = _mm256_loadu_ps(row.add(8 * v));
                *x0 = _mm256_fmadd_ps(w[0], value, *x0);
                *x1 = _mm256_fmadd_ps(w[1], value, *x1);
            }
        }
        for (head, o) in acc.iter().zip(out) {
            for (v, a) in head.iter().enumerate() {
                _mm256_storeu_ps(o.add(8 * v), *a);
            }
        }
    }

    /// `out[0..8·V] = Σ_j weights[j] · col[slots[j]·kv_dim ..]`, with even and odd slots in
    /// separate accumulators (two FMA chains) that are added at the end.
    ///
    /// # Safety
    /// avx2+fma; `col + slot·kv_dim + 8·V` stays inside the values for every slot; `out` holds
    /// 8·V floats.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mix_columns_avx2<const V: usize>(
        &self,
        col: *const f32,
        slots: &[u32],
        weights: &[f32],
        out: *mut f32,
    ) {
        use std::arch::x86_64::*;
        let mut even = [_mm256_setzero_ps(); V];
        let mut odd = [_mm256_setzero_ps(); V];
        let mut pairs = slots.chunks_exact(2).zip(weights.chunks_exact(2));
        let mut ahead = slots.iter().skip(PREFETCH_SLOTS);
        for (s, w) in &mut pairs {
            for &p in ahead.by_ref().take(2) {
                prefetch(col.add(p as usize * self.kv_dim), 8 * V);
            }
            let (r0, r1) = (
                col.add(s[0] as usize * self.kv_dim),
                col.add(s[1] as usize * self.kv_dim),
            );
            let (w0, w1) = (_mm256_set1_ps(w[0]), _mm256_set1_ps(w[1]));
            for v in 0..V {
                even[v] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(r0.add(8 * v)), even[v]);
                odd[v] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(r1.add(8 * v)), odd[v]);
            }
        }
        if slots.len() % 2 == 1 {
            let r = col.add(slots[slots.len() - 1] as usize * self.kv_dim);
            let w = _mm256_set1_ps(weights[slots.len() - 1]);
            for (v, acc) in even.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(r.add(8 * v)), *acc);
            }
        }
        for (v, (e, o)) in even.iter().zip(&odd).enumerate() {
            _mm256_storeu_ps(out.add(8 * v), _mm256_add_ps(*e, *o));
        }
    }
}

/// The eight sums of eight vectors, lane `u` = Σ of `acc[u]`, by one tree
/// (((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))): every score block reduces the same way, so a score's
/// bits do not depend on which block computed it.
///
/// # Safety
/// avx2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn reduce8(acc: &[std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let h01 = _mm256_hadd_ps(acc[0], acc[1]);
    let h23 = _mm256_hadd_ps(acc[2], acc[3]);
    let h45 = _mm256_hadd_ps(acc[4], acc[5]);
    let h67 = _mm256_hadd_ps(acc[6], acc[7]);
    let lo = _mm256_hadd_ps(h01, h23);
    let hi = _mm256_hadd_ps(h45, h67);
    _mm256_add_ps(
        _mm256_permute2f128_ps(lo, hi, 0x20),
        _mm256_permute2f128_ps(lo, hi, 0x31),
    )
}

/// How many slots ahead the kernels ask for cache rows: far enough to cover a memory access
/// at a few nanoseconds per slot. Decoding reads the cache once per layer, and the weights
/// streamed in between have evicted it.
#[cfg(target_arch = "x86_64")]
const PREFETCH_SLOTS: usize = 16;

/// Asks for the cache lines of `len` floats at `p` (a hint: never faults, even past the end).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn prefetch(p: *const f32, len: usize) {
    use std::arch::x86_64::*;
    let mut offset = 0;
    while offset < len {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(offset) as *const i8);
        offset += 16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix64;

    /// Straightforward per-head attention in f64 over the visible positions.
    fn reference(shape: &AttentionShape, q: &[f32], pos: usize, cache: &LayerCache) -> Vec<f32> {
        let (h, d) = (shape.num_heads, shape.head_dim);
        let kv_dim = shape.num_kv_heads * d;
        let group = h / shape.num_kv_heads;
        let mut out = vec![0f32; h * d];
        for head in 0..h {
            let kvh = head / group;
            let visible: Vec<usize> = (0..cache.positions.len())
                .filter(|&s| {
                    let p = cache.positions[s] as usize;
                    p <= pos && shape.sliding_window.is_none_or(|w| pos - p < w)
                })
                .collect();
            let scores: Vec<f64> = visible
                .iter()
                .map(|&s| {
                    (0..d)
                        .map(|i| {
                            q[head * d + i] as f64 * cache.keys[s * kv_dim + kvh * d + i] as f64
                        })
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for i in 0..d {
                out[head * d + i] = visible
                    .iter()
                    .zip(&scores)
                    .map(|(&s, sc)| {
                        (sc - max).exp() / z * cache.values[s * kv_dim + kvh * d + i] as f64
                    })
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn matches_reference_with_gqa_window_and_gaps() {
        let mut rng = SplitMix64::new(7);
        for (heads, kv_heads, d, window) in [
            (4, 2, 32, None),
            (6, 3, 12, Some(5)),
            (2, 2, 7, None),
            (6, 2, 16, None),
            (8, 2, 20, Some(9)),
        ] {
            let shape = AttentionShape {
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim: d,
                sliding_window: window,
            };
            let kv_dim = kv_heads * d;
            // Slots out of position order with a gap (as after eviction), 20 tokens.
            let positions: Vec<u32> = (0..24u32).filter(|p| p % 7 != 3).rev().collect();
            let cache = LayerCache {
                keys: (0..positions.len() * kv_dim)
                    .map(|_| rng.normal())
                    .collect(),
                values: (0..positions.len() * kv_dim)
                    .map(|_| rng.normal())
                    .collect(),
                positions,
            };
            let query_pos = [23usize, 12, 0, 17];
            let q: Vec<f32> = (0..query_pos.len() * heads * d)
                .map(|_| rng.normal())
                .collect();
            let mut out = vec![0f32; q.len()];
            let seg = [Segment {
                rows: 0..query_pos.len(),
                cache: &cache,
            }];
            attend(&shape, &q, &query_pos, &seg, &mut out);
            for (t, &pos) in query_pos.iter().enumerate() {
                let want = reference(&shape, &q[t * heads * d..(t + 1) * heads * d], pos, &cache);
                for (a, b) in out[t * heads * d..(t + 1) * heads * d].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "{heads}/{kv_heads}/{d}: {a} vs {b}");
                }
            }
        }
    }
}
