//! Causal multi-head attention of new query rows against a sequence's cached keys/values,
//! with grouped-query heads and an optional sliding window.
//!
//! One task is one query row; for each KV head it handles all the query heads that share it,
//! so each cached key and value row is read once for the whole group. Scores go through the
//! vectorized softmax; the AVX2 kernels keep the per-slot work to a few instructions and
//! prefetch the cache rows ahead, since decoding calls this once per layer for every sequence
//! in the batch and the cache has gone cold in between.

use super::kv::{host_kv, HostKv};
use super::simd::{cpu_features, SendPtr};
use super::vexp::{softmax, softmax_with_sink};
use crate::backend::{AttentionShape, Segment};
use rayon::prelude::*;
use std::borrow::Cow;

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
    attend_into(shape, q, positions, segments, out, None)
}

/// [`attend`], and also the attention mass every cache slot received from every query row, as
/// the kernel computed it (no second pass over the scores): row `t`'s slots
/// `0..cache.len()` one after another for every row, each the mean over the query heads, so a
/// row's mass sums to 1. Eviction policies rank slots by it.
pub fn attend_with_mass(
    shape: &AttentionShape,
    q: &[f32],
    positions: &[usize],
    segments: &[Segment],
    out: &mut [f32],
) -> (usize, Vec<f32>) {
    let kv_heads = shape.num_kv_heads;
    let lens: Vec<usize> = segments
        .iter()
        .flat_map(|seg| seg.rows.clone().map(|_| seg.cache.len()))
        .collect();
    // Per row, per KV head, per slot: each task writes its own (row, KV head) part.
    let mut per_head = vec![0f32; lens.iter().sum::<usize>() * kv_heads];
    let slots = attend_into(shape, q, positions, segments, out, Some(&mut per_head));
    let mut mass = Vec::with_capacity(per_head.len() / kv_heads.max(1));
    let scale = 1.0 / shape.num_heads as f32;
    let mut at = 0;
    for &n in &lens {
        let row = &per_head[at..at + n * kv_heads];
        mass.extend((0..n).map(|s| (0..kv_heads).map(|k| row[k * n + s]).sum::<f32>() * scale));
        at += n * kv_heads;
    }
    (slots, mass)
}

/// [`attend`], and also per row and KV head the mass every slot of that head received: the
/// softmax weights of the head's group of query heads summed, row `t`'s `kv_heads ×
/// cache.len()` values head-major, rows one after another (what per-KV-head eviction ranks by;
/// [`crate::kv::mass::reference_head_mass`] is its reference).
pub fn attend_with_head_mass(
    shape: &AttentionShape,
    q: &[f32],
    positions: &[usize],
    segments: &[Segment],
    out: &mut [f32],
) -> (usize, Vec<f32>) {
    let held: usize = segments
        .iter()
        .map(|seg| seg.rows.len() * seg.cache.len())
        .sum();
    let mut mass = vec![0f32; held * shape.num_kv_heads];
    let slots = attend_into(shape, q, positions, segments, out, Some(&mut mass));
    (slots, mass)
}

/// [`attend`], with the per-(row, KV head, slot) mass summed over each group's query heads
/// into `mass` when given (laid out as in [`attend_with_mass`], times the KV heads).
fn attend_into(
    shape: &AttentionShape,
    q: &[f32],
    positions: &[usize],
    segments: &[Segment],
    out: &mut [f32],
    mass: Option<&mut [f32]>,
) -> usize {
    let (h, d) = (shape.num_heads, shape.head_dim);
    let rows = positions.len();
    assert!(
        out.len() >= rows * h * shape.value_dim && q.len() >= rows * h * d,
        "attend: buffer too small"
    );
    let kvs: Vec<Cow<HostKv>> = segments.iter().map(|seg| host_kv(seg.cache)).collect();
    let mut row_cache: Vec<CacheView> = Vec::with_capacity(rows);
    for (seg, kv) in segments.iter().zip(&kvs) {
        let view = CacheView {
            positions: seg.cache.positions(),
            heads: seg.cache.per_head().then_some(seg.cache),
            keys: kv.keys(),
            // Latent rows: a value is the prefix of its key row, read in place.
            values: if kv.values_in_keys() {
                kv.keys()
            } else {
                kv.values()
            },
        };
        row_cache.extend(seg.rows.clone().map(|_| view));
    }
    assert_eq!(
        row_cache.len(),
        rows,
        "attend: segments must cover every row"
    );
    let out_ptr = SendPtr(out.as_mut_ptr());
    // Where each row's mass starts (row t: kv_heads × its cache's slots).
    let mass_at: Vec<usize> = row_cache
        .iter()
        .scan(0, |at, c| {
            let here = *at;
            *at += c.positions.len() * shape.num_kv_heads;
            Some(here)
        })
        .collect();
    if let Some(m) = &mass {
        let need = mass_at.last().map_or(0, |&a| a)
            + row_cache
                .last()
                .map_or(0, |c| c.positions.len() * shape.num_kv_heads);
        assert!(m.len() >= need, "attend: mass buffer too small");
    }
    let mass_ptr = mass.map(|m| SendPtr(m.as_mut_ptr()));
    // One task per query row: the visible slots are found once, and the row's KV heads are
    // read one after another from the same cache lines. With fewer rows than threads (a
    // decode step of one sequence), a task is one KV head of a row instead, so the other
    // threads do not wait.
    let threads = super::parallel::kernel_threads();
    let per_head = rows < threads;
    let work = |task: usize| {
        let (t, heads) = if per_head {
            let kv = task % shape.num_kv_heads;
            (task / shape.num_kv_heads, kv..kv + 1)
        } else {
            (task, 0..shape.num_kv_heads)
        };
        let cache = row_cache[t];
        // SAFETY: row t's mass region lies inside the buffer (asserted above).
        let mass = mass_ptr.map(|m| unsafe { SendPtr(m.get().add(mass_at[t])) });
        let slots = match cache.heads {
            None => attend_visible(shape, q, out_ptr, mass, t, positions[t], heads, cache),
            // Each KV head keeps its own tokens: its own positions mask its slots. Slots read
            // are counted by the first KV head's mask (every head holds as many slots).
            Some(layer) => heads
                .map(|kv| {
                    let view = CacheView {
                        positions: layer.head_positions(kv),
                        ..cache
                    };
                    let one = kv..kv + 1;
                    attend_visible(shape, q, out_ptr, mass, t, positions[t], one, view)
                })
                .reduce(|first, _| first)
                .unwrap_or(0),
        };
        // A row's slots count once, whichever task read them.
        if per_head && !task.is_multiple_of(shape.num_kv_heads) {
            0
        } else {
            slots
        }
    };
    let work_macs: usize = row_cache
        .iter()
        .map(|c| 2 * c.positions.len() * h * d)
        .sum();
    let tasks = if per_head {
        rows * shape.num_kv_heads
    } else {
        rows
    };
    if work_macs < PARALLEL_MIN_MACS || threads == 1 {
        (0..tasks).map(work).sum()
    } else {
        (0..tasks).into_par_iter().map(work).sum()
    }
}

/// Attends query row `t` (at `pos`) over the slots of `cache` its position map makes visible,
/// for KV heads `heads`; returns how many slots it read.
#[allow(clippy::too_many_arguments)]
fn attend_visible(
    shape: &AttentionShape,
    q: &[f32],
    out: SendPtr<f32>,
    mass: Option<SendPtr<f32>>,
    t: usize,
    pos: usize,
    heads: std::ops::Range<usize>,
    cache: CacheView,
) -> usize {
    let visible = |p: u32| {
        let p = p as usize;
        p <= pos && shape.sliding_window.is_none_or(|w| pos - p < w)
    };
    // Usually every cached token is visible (decoding without a window): the row reads
    // slots 0..n in order, with no list of them to build or follow. Visible positions
    // form an interval, so its oldest and newest tokens decide.
    let n = cache.positions.len();
    let (lo, hi) = cache
        .positions
        .iter()
        .fold((u32::MAX, 0), |(lo, hi), &p| (lo.min(p), hi.max(p)));
    if n == 0 || (visible(lo) && visible(hi)) {
        attend_row(shape, q, out, mass, t, heads, cache, &AllSlots(n))
    } else {
        let slots: Vec<u32> = (0..n as u32)
            .filter(|&s| visible(cache.positions[s as usize]))
            .collect();
        attend_row(shape, q, out, mass, t, heads, cache, slots.as_slice())
    }
}

/// One sequence's layer cache as the kernels read it.
#[derive(Clone, Copy)]
struct CacheView<'a> {
    /// Slot → position: the layer's, or (in a view of one KV head) that head's.
    positions: &'a [u32],
    /// The layer, where each KV head keeps its own tokens (and positions).
    heads: Option<&'a crate::kv::LayerCache>,
    /// `positions.len() × kv_dim`, slot-major.
    keys: &'a [f32],
    values: &'a [f32],
}

/// The cache slots a query row sees, in the order it reads them.
trait Slots {
    fn count(&self) -> usize;
    /// The `j`-th visible slot.
    fn at(&self, j: usize) -> usize;
    /// One past the highest slot.
    fn end(&self) -> usize;
}

/// The first `n` slots: a row that sees the whole cache (decoding without a window).
struct AllSlots(usize);

impl Slots for AllSlots {
    fn count(&self) -> usize {
        self.0
    }
    #[inline(always)]
    fn at(&self, j: usize) -> usize {
        j
    }
    fn end(&self) -> usize {
        self.0
    }
}

impl Slots for [u32] {
    fn count(&self) -> usize {
        self.len()
    }
    #[inline(always)]
    fn at(&self, j: usize) -> usize {
        self[j] as usize
    }
    fn end(&self) -> usize {
        self.iter().max().map_or(0, |&s| s as usize + 1)
    }
}

/// Attends query row `t` over `slots` of `cache`, for the query heads of KV heads `kv_heads_of`
/// (head group by head group), into row `t` of the output; returns how many slots it read.
/// With `mass` (row t's `kv_heads × cache.len()` region), adds each slot's softmax weight
/// summed over the group's heads to `mass[kv_head · len + slot]`.
#[allow(clippy::too_many_arguments)]
fn attend_row<S: Slots + ?Sized>(
    shape: &AttentionShape,
    q: &[f32],
    out: SendPtr<f32>,
    mass: Option<SendPtr<f32>>,
    t: usize,
    kv_heads_of: std::ops::Range<usize>,
    cache: CacheView,
    slots: &S,
) -> usize {
    let (h, d, kv_heads) = (shape.num_heads, shape.head_dim, shape.num_kv_heads);
    let vd = shape.value_dim;
    let group = h / kv_heads;
    let mut scores = vec![0f32; group * slots.count()];
    for kv_head in kv_heads_of {
        let first = t * h * d + kv_head * group * d;
        let first_out = t * h * vd + kv_head * group * vd;
        // SAFETY: this task writes only row t's heads of its KV heads (kv_head's group of them
        // here); tasks are disjoint, and `out` outlives them (its length is asserted by
        // `attend`).
        let o = unsafe { std::slice::from_raw_parts_mut(out.get().add(first_out), group * vd) };
        let heads = HeadGroup {
            q: &q[first..first + group * d],
            group,
            head_dim: d,
            value_dim: vd,
            kv_dim: kv_heads * d,
            offset: kv_head * d,
            sinks: shape
                .sink_logits
                .map(|s| &s[kv_head * group..(kv_head + 1) * group]),
        };
        heads.attend(&cache, slots, &mut scores, o);
        if let Some(m) = mass {
            let (n, count) = (cache.positions.len(), slots.count());
            // SAFETY: this task alone writes row t's KV head `kv_head` part, inside the
            // region `attend_into` sized for the row.
            let m = unsafe { std::slice::from_raw_parts_mut(m.get().add(kv_head * n), n) };
            for j in 0..count {
                m[slots.at(j)] += (0..group).map(|g| scores[g * count + j]).sum::<f32>();
            }
        }
    }
    slots.count()
}

/// The query heads of one row that share a KV head, and where that head sits in a cache row.
struct HeadGroup<'a> {
    /// `group × head_dim` queries.
    q: &'a [f32],
    group: usize,
    head_dim: usize,
    /// Floats of a value (and of each head's output), from `offset` in a value row.
    value_dim: usize,
    kv_dim: usize,
    offset: usize,
    /// The group's sink logits, one a head (GPT-OSS), joining each softmax's denominator.
    sinks: Option<&'a [f32]>,
}

impl HeadGroup<'_> {
    /// Every head's scores (`group` rows of `n`) turned into softmax weights.
    fn normalize(&self, scores: &mut [f32], n: usize) {
        match self.sinks {
            Some(sinks) => scores
                .chunks_exact_mut(n.max(1))
                .zip(sinks)
                .for_each(|(row, &sink)| softmax_with_sink(row, sink)),
            None => scores.chunks_exact_mut(n.max(1)).for_each(softmax),
        }
    }

    /// `scores`: scratch of `group × slots.count()` floats.
    fn attend<S: Slots + ?Sized>(
        &self,
        cache: &CacheView,
        slots: &S,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let n = slots.count();
        let needed = slots.end() * self.kv_dim;
        assert!(
            cache.keys.len() >= needed && cache.values.len() >= needed,
            "attend: slot outside the cache"
        );
        assert!(
            out.len() == self.group * self.value_dim
                && self.offset + self.head_dim.max(self.value_dim) <= self.kv_dim
        );
        // scores[g·n + j]: head g against slot j.
        assert_eq!(scores.len(), self.group * n, "attend: scores scratch size");
        #[cfg(target_arch = "x86_64")]
        if cpu_features().avx2_fma {
            // SAFETY: avx2+fma detected at run time; slots and out bounds asserted above.
            unsafe {
                self.scores_avx2(cache.keys, slots, scores);
                self.normalize(scores, n);
                self.mix_avx2(cache.values, slots, scores, out);
            }
            return;
        }
        self.scores_scalar(cache.keys, slots, scores);
        self.normalize(scores, n);
        self.mix_scalar(cache.values, slots, scores, out);
    }

    fn row<'c>(&self, data: &'c [f32], slot: usize) -> &'c [f32] {
        &data[slot * self.kv_dim + self.offset..][..self.head_dim]
    }

    fn value_row<'c>(&self, data: &'c [f32], slot: usize) -> &'c [f32] {
        &data[slot * self.kv_dim + self.offset..][..self.value_dim]
    }

    fn scores_scalar<S: Slots + ?Sized>(&self, keys: &[f32], slots: &S, scores: &mut [f32]) {
        let (d, n) = (self.head_dim, slots.count());
        let scale = 1.0 / (d as f32).sqrt();
        for j in 0..n {
            let key = self.row(keys, slots.at(j));
            for g in 0..self.group {
                let q = &self.q[g * d..(g + 1) * d];
                scores[g * n + j] = q.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
        }
    }

    fn mix_scalar<S: Slots + ?Sized>(
        &self,
        values: &[f32],
        slots: &S,
        scores: &[f32],
        out: &mut [f32],
    ) {
        let (d, n) = (self.value_dim, slots.count());
        out.fill(0.0);
        for j in 0..n {
            let value = self.value_row(values, slots.at(j));
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
    unsafe fn scores_avx2<S: Slots + ?Sized>(&self, keys: &[f32], slots: &S, scores: &mut [f32]) {
        use std::arch::x86_64::*;
        let (d, n) = (self.head_dim, slots.count());
        let d8 = d / 8 * 8;
        let scale = _mm256_set1_ps(1.0 / (d as f32).sqrt());
        let base = keys.as_ptr().add(self.offset);
        // Eight slots at a time, every head of the group against them while their key rows
        // are in L1: eight independent FMA chains per head, then one reduction tree that
        // leaves the eight dot products in one vector. A lane's sum order does not depend on
        // its neighbours, and a short last block is padded with repeats of its last slot.
        for start in (0..n).step_by(8) {
            let len = (n - start).min(8);
            for j in (start + PREFETCH_SLOTS..n).take(8) {
                prefetch(base.add(slots.at(j) * self.kv_dim), d);
            }
            let mut key = [std::ptr::null::<f32>(); 8];
            for (u, p) in key.iter_mut().enumerate() {
                *p = base.add(slots.at(start + u.min(len - 1)) * self.kv_dim);
            }
            for g in 0..self.group {
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
                let row = &mut scores[g * n + start..g * n + start + len];
                if len == 8 {
                    _mm256_storeu_ps(row.as_mut_ptr(), dots);
                } else {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), dots);
                    row.copy_from_slice(&lanes[..len]);
                }
            }
        }
    }

    /// # Safety
    /// avx2+fma; every slot's row lies inside `values`; `out` holds `group × value_dim`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mix_avx2<S: Slots + ?Sized>(
        &self,
        values: &[f32],
        slots: &S,
        scores: &[f32],
        out: &mut [f32],
    ) {
        let (d, n) = (self.value_dim, slots.count());
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
                    4 => self.mix_pair_avx2::<4, S>(col, slots, w, o),
                    3 => self.mix_pair_avx2::<3, S>(col, slots, w, o),
                    2 => self.mix_pair_avx2::<2, S>(col, slots, w, o),
                    _ => self.mix_pair_avx2::<1, S>(col, slots, w, o),
                }
                c0 += 32;
            }
            for h in 0..2 {
                for i in d8..d {
                    *og[h].add(i) = (0..n)
                        .map(|j| w[h][j] * values[slots.at(j) * self.kv_dim + self.offset + i])
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
                    4 => self.mix_columns_avx2::<4, S>(col, slots, weights, og.add(c0)),
                    3 => self.mix_columns_avx2::<3, S>(col, slots, weights, og.add(c0)),
                    2 => self.mix_columns_avx2::<2, S>(col, slots, weights, og.add(c0)),
                    _ => self.mix_columns_avx2::<1, S>(col, slots, weights, og.add(c0)),
                }
                c0 += 32;
            }
            for i in d8..d {
                *og.add(i) = (0..n)
                    .map(|j| weights[j] * values[slots.at(j) * self.kv_dim + self.offset + i])
                    .sum();
            }
        }
    }

    /// For both heads `h` of a pair, `out[h][0..8·V] = Σ_j weights[h][j] · col[slot_j·kv_dim ..]`:
    /// one FMA chain per head and vector (eight for V = 4) over value rows loaded once.
    ///
    /// # Safety
    /// avx2+fma; `col + slot·kv_dim + 8·V` stays inside the values for every slot; each `out`
    /// holds 8·V floats; `weights` are `slots.count()` long.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mix_pair_avx2<const V: usize, S: Slots + ?Sized>(
        &self,
        col: *const f32,
        slots: &S,
        weights: [&[f32]; 2],
        out: [*mut f32; 2],
    ) {
        use std::arch::x86_64::*;
        let n = slots.count();
        let mut acc = [[_mm256_setzero_ps(); V]; 2];
        for (j, (&w0, &w1)) in weights[0].iter().zip(weights[1]).enumerate().take(n) {
            if j + PREFETCH_SLOTS < n {
                prefetch(col.add(slots.at(j + PREFETCH_SLOTS) * self.kv_dim), 8 * V);
            }
            let row = col.add(slots.at(j) * self.kv_dim);
            let w = [_mm256_set1_ps(w0), _mm256_set1_ps(w1)];
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

    /// `out[0..8·V] = Σ_j weights[j] · col[slot_j·kv_dim ..]`, with even and odd slots in
    /// separate accumulators (two FMA chains) that are added at the end.
    ///
    /// # Safety
    /// avx2+fma; `col + slot·kv_dim + 8·V` stays inside the values for every slot; `out` holds
    /// 8·V floats.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mix_columns_avx2<const V: usize, S: Slots + ?Sized>(
        &self,
        col: *const f32,
        slots: &S,
        weights: &[f32],
        out: *mut f32,
    ) {
        use std::arch::x86_64::*;
        let n = slots.count();
        let mut even = [_mm256_setzero_ps(); V];
        let mut odd = [_mm256_setzero_ps(); V];
        for j in (0..n / 2 * 2).step_by(2) {
            for p in (j + PREFETCH_SLOTS..n).take(2) {
                prefetch(col.add(slots.at(p) * self.kv_dim), 8 * V);
            }
            let (r0, r1) = (
                col.add(slots.at(j) * self.kv_dim),
                col.add(slots.at(j + 1) * self.kv_dim),
            );
            let (w0, w1) = (_mm256_set1_ps(weights[j]), _mm256_set1_ps(weights[j + 1]));
            for v in 0..V {
                even[v] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(r0.add(8 * v)), even[v]);
                odd[v] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(r1.add(8 * v)), odd[v]);
            }
        }
        if n % 2 == 1 {
            let r = col.add(slots.at(n - 1) * self.kv_dim);
            let w = _mm256_set1_ps(weights[n - 1]);
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
    use crate::kv::LayerCache;
    use crate::util::rng::SplitMix64;

    /// A layer cache of `positions.len()` random slots in the CPU's storage.
    fn random_cache(rng: &mut SplitMix64, kv_dim: usize, positions: Vec<u32>) -> LayerCache {
        let n = positions.len() * kv_dim;
        let keys = (0..n).map(|_| rng.normal()).collect();
        let values = (0..n).map(|_| rng.normal()).collect();
        let storage = HostKv::from_rows(kv_dim, keys, values);
        LayerCache::with_storage(positions, Box::new(storage)).unwrap()
    }

    /// Straightforward per-head attention in f64 over the positions visible to each head's KV
    /// head (its own map where the KV heads keep their own tokens).
    fn reference(shape: &AttentionShape, q: &[f32], pos: usize, layer: &LayerCache) -> Vec<f32> {
        let kv = host_kv(layer);
        let (h, d) = (shape.num_heads, shape.head_dim);
        let kv_dim = shape.num_kv_heads * d;
        let group = h / shape.num_kv_heads;
        let vd = shape.value_dim;
        let mut out = vec![0f32; h * vd];
        for head in 0..h {
            let kvh = head / group;
            let cache = CacheView {
                positions: layer.head_positions(kvh),
                heads: None,
                keys: kv.keys(),
                values: if kv.values_in_keys() {
                    kv.keys()
                } else {
                    kv.values()
                },
            };
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
            let sink = shape.sink_logits.map(|s| f64::from(s[head]));
            let max = scores
                .iter()
                .copied()
                .chain(sink)
                .fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().chain(&sink).map(|s| (s - max).exp()).sum();
            for i in 0..vd {
                out[head * vd + i] = visible
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

    /// A decode step of one sequence on a pool splits a row's KV heads over the threads: the
    /// same bits as one thread computing them all, the reference's values, each slot counted
    /// once.
    #[test]
    fn one_row_split_by_kv_head_matches_one_thread() {
        let mut rng = SplitMix64::new(11);
        let shape = AttentionShape {
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            value_dim: 64,
            sliding_window: None,
            sink_logits: None,
        };
        let kv_dim = 3 * 64;
        // Enough slots that the call is worth the pool (2·slots·h·d ≥ PARALLEL_MIN_MACS).
        let n = 200;
        let cache = random_cache(&mut rng, kv_dim, (0..n as u32).collect());
        let q: Vec<f32> = (0..9 * 64).map(|_| rng.normal()).collect();
        let seg = [Segment {
            rows: 0..1,
            cache: &cache,
        }];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let run = |serial: bool| {
            let mut out = vec![0f32; q.len()];
            let mut call = || attend(&shape, &q, &[n - 1], &seg, &mut out);
            let slots = pool.install(|| {
                if serial {
                    crate::backend::cpu::parallel::serially(call)
                } else {
                    call()
                }
            });
            (slots, out)
        };
        let (split_slots, split) = run(false);
        let (one_slots, one) = run(true);
        assert_eq!((split_slots, one_slots), (n, n));
        assert_eq!(split, one);
        let want = reference(&shape, &q, n - 1, &cache);
        for (a, b) in split.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    /// The mass the kernel emits equals the plain reference's (f64 softmax weights, mean over
    /// heads) for prefill rows over gapped caches, two sequences in one call, and a decode row
    /// split by KV head over a pool; the output is the same as without the mass.
    #[test]
    fn emitted_mass_matches_the_reference() {
        let mut rng = SplitMix64::new(3);
        let shape = AttentionShape {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 32,
            value_dim: 32,
            sliding_window: Some(40),
            sink_logits: None,
        };
        let kv_dim = 2 * 32;
        let make = |rng: &mut SplitMix64, positions| random_cache(rng, kv_dim, positions);
        // Sequence a: 50 tokens with gaps (as after eviction); b: 400 in order (pool-sized).
        let a = make(&mut rng, (0..60u32).filter(|p| p % 6 != 1).collect());
        let b = make(&mut rng, (0..400u32).collect());
        for (rows_a, rows_b) in [(vec![59usize, 30, 5], vec![399usize]), (vec![], vec![399])] {
            let positions: Vec<usize> = rows_a.iter().chain(&rows_b).copied().collect();
            let q: Vec<f32> = (0..positions.len() * 6 * 32)
                .map(|_| rng.normal())
                .collect();
            let mut segs = Vec::new();
            if !rows_a.is_empty() {
                segs.push(Segment {
                    rows: 0..rows_a.len(),
                    cache: &a,
                });
            }
            segs.push(Segment {
                rows: rows_a.len()..positions.len(),
                cache: &b,
            });
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap();
            let mut out = vec![0f32; q.len()];
            let (slots, mass) =
                pool.install(|| attend_with_mass(&shape, &q, &positions, &segs, &mut out));
            let mut plain = vec![0f32; q.len()];
            let plain_slots = pool.install(|| attend(&shape, &q, &positions, &segs, &mut plain));
            assert_eq!((slots, &out), (plain_slots, &plain));
            let want = crate::kv::mass::reference_mass(&shape, &q, &positions, &segs).unwrap();
            assert_eq!(mass.len(), want.len());
            for (m, w) in mass.iter().zip(&want) {
                assert!((m - w).abs() < 1e-5, "{m} vs {w}");
            }
            // Each row's mass sums to 1.
            let mut at = 0;
            for seg in &segs {
                let n = seg.cache.len();
                for _ in seg.rows.clone() {
                    let sum: f32 = mass[at..at + n].iter().sum();
                    assert!((sum - 1.0).abs() < 1e-4, "row sums to {sum}");
                    at += n;
                }
            }
        }
    }

    /// Also with a sink logit per head (GPT-OSS), which takes weight from every slot.
    #[test]
    fn matches_reference_with_gqa_window_and_gaps() {
        let mut rng = SplitMix64::new(7);
        for (heads, kv_heads, d, window, with_sinks) in [
            (4, 2, 32, None, false),
            (6, 3, 12, Some(5), false),
            (2, 2, 7, None, false),
            (6, 2, 16, None, false),
            (8, 2, 20, Some(9), false),
            (4, 2, 32, None, true),
            (6, 3, 12, Some(5), true),
            (8, 2, 20, Some(9), true),
        ] {
            let sinks: Vec<f32> = (0..heads).map(|_| 2.0 * rng.normal()).collect();
            let shape = AttentionShape {
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim: d,
                value_dim: d,
                sliding_window: window,
                sink_logits: with_sinks.then_some(&sinks[..]),
            };
            let kv_dim = kv_heads * d;
            // Slots out of position order with a gap (as after eviction), 20 tokens.
            let positions: Vec<u32> = (0..24u32).filter(|p| p % 7 != 3).rev().collect();
            let cache = random_cache(&mut rng, kv_dim, positions);
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

    /// A layer whose KV heads hold different tokens: every head is masked by its own
    /// positions (a query sees a slot in one head and not in another, by causality and by a
    /// sliding window), for prefill rows, a pool-split decode row and two sequences, and the
    /// emitted per-KV-head mass equals the f64 reference's; the output is the same with and
    /// without the mass.
    #[test]
    fn per_head_positions_mask_each_head_and_emit_its_mass() {
        let mut rng = SplitMix64::new(29);
        for window in [None, Some(30)] {
            let shape = AttentionShape {
                num_heads: 6,
                num_kv_heads: 3,
                head_dim: 16,
                value_dim: 16,
                sliding_window: window,
                sink_logits: None,
            };
            let kv_dim = 3 * 16;
            // Three heads over 40 slots: head 0 holds 0..40, head 1 every other token of
            // 0..80, head 2 the newest 40 of 0..80 (each its own map, as per-head eviction
            // leaves them); a second sequence of 300 slots, heads shifted by 0, 5 and 9.
            let maps = vec![
                (0..40u32).collect::<Vec<_>>(),
                (0..40u32).map(|p| 2 * p).collect(),
                (40..80u32).collect(),
            ];
            let make = |rng: &mut SplitMix64, maps: Vec<Vec<u32>>| {
                let n = maps[0].len() * kv_dim;
                let keys = (0..n).map(|_| rng.normal()).collect();
                let values = (0..n).map(|_| rng.normal()).collect();
                let storage = HostKv::from_rows(kv_dim, keys, values);
                LayerCache::with_head_storage(maps, Box::new(storage)).unwrap()
            };
            let a = make(&mut rng, maps);
            let b = make(
                &mut rng,
                [0u32, 5, 9]
                    .iter()
                    .map(|&o| (0..300u32).map(|p| p + o).collect())
                    .collect(),
            );
            assert!(a.per_head() && b.per_head());
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap();
            for (rows_a, rows_b) in [(vec![79usize, 45, 20], vec![310usize]), (vec![], vec![308])] {
                let positions: Vec<usize> = rows_a.iter().chain(&rows_b).copied().collect();
                let q: Vec<f32> = (0..positions.len() * 6 * 16)
                    .map(|_| rng.normal())
                    .collect();
                let mut segs = Vec::new();
                if !rows_a.is_empty() {
                    segs.push(Segment {
                        rows: 0..rows_a.len(),
                        cache: &a,
                    });
                }
                segs.push(Segment {
                    rows: rows_a.len()..positions.len(),
                    cache: &b,
                });
                let mut out = vec![0f32; q.len()];
                let (slots, mass) =
                    pool.install(|| attend_with_head_mass(&shape, &q, &positions, &segs, &mut out));
                let mut plain = vec![0f32; q.len()];
                let plain_slots =
                    pool.install(|| attend(&shape, &q, &positions, &segs, &mut plain));
                assert_eq!((slots, &out), (plain_slots, &plain));
                let hd = 6 * 16;
                for seg in &segs {
                    for t in seg.rows.clone() {
                        let want = reference(&shape, &q[t * hd..][..hd], positions[t], seg.cache);
                        for (x, y) in out[t * hd..][..hd].iter().zip(&want) {
                            assert!((x - y).abs() < 1e-5, "row {t}: {x} vs {y}");
                        }
                    }
                }
                let want =
                    crate::kv::mass::reference_head_mass(&shape, &q, &positions, &segs).unwrap();
                assert_eq!(mass.len(), want.len());
                for (m, w) in mass.iter().zip(&want) {
                    assert!((m - w).abs() < 1e-5, "{m} vs {w}");
                }
                // A head's row sums to its group of 2 query heads, unless none of its slots is
                // visible; and an invisible slot gets none.
                let mut at = 0;
                for seg in &segs {
                    let n = seg.cache.len();
                    for t in seg.rows.clone() {
                        for h in 0..3 {
                            let row = &mass[at..at + n];
                            let map = seg.cache.head_positions(h);
                            let seen = (0..n).any(|s| {
                                let p = map[s] as usize;
                                p <= positions[t] && window.is_none_or(|w| positions[t] - p < w)
                            });
                            let sum: f32 = row.iter().sum();
                            let expect = if seen { 2.0 } else { 0.0 };
                            assert!((sum - expect).abs() < 1e-4, "row {t} head {h}: {sum}");
                            for (s, &m) in row.iter().enumerate() {
                                if map[s] as usize > positions[t] {
                                    assert_eq!(m, 0.0, "row {t} head {h} slot {s}");
                                }
                            }
                            at += n;
                        }
                    }
                }
            }
        }
    }

    /// Latent rows (multi-head latent attention): one shared KV head whose value is the first
    /// `value_dim` floats of its key row, stored once. The output is `value_dim` wide per head,
    /// equals the f64 reference reading the value from the key, and has the same bits as a
    /// storage holding that prefix again as separate values; the emitted mass is unchanged.
    #[test]
    fn values_read_from_key_prefixes_match_separate_values() {
        use crate::kv::{KvLayout, KvStorage};
        let mut rng = SplitMix64::new(41);
        // 40 = 32 latent + 8 rotary floats a row (odd value widths exercise the tails too).
        for (key_dim, value_dim, heads) in [(40, 32, 4), (24, 13, 3), (576, 512, 2)] {
            let shape = AttentionShape {
                num_heads: heads,
                num_kv_heads: 1,
                head_dim: key_dim,
                value_dim,
                sliding_window: None,
                sink_logits: None,
            };
            let positions: Vec<u32> = (0..70u32).filter(|p| p % 9 != 4).collect();
            let n = positions.len();
            let keys: Vec<f32> = (0..n * key_dim).map(|_| rng.normal()).collect();
            let latent = HostKv::from_layout_rows(
                KvLayout::key_prefix(key_dim, value_dim),
                keys.clone(),
                Vec::new(),
            );
            // The same values stored separately (the rest of each value row never read).
            let separate = HostKv::from_rows(key_dim, keys.clone(), keys.clone());
            assert_eq!(latent.bytes() * 2, separate.bytes());
            let a = LayerCache::with_storage(positions.clone(), Box::new(latent)).unwrap();
            let b = LayerCache::with_storage(positions.clone(), Box::new(separate)).unwrap();
            let query_pos = [69usize, 30, 0];
            let q: Vec<f32> = (0..query_pos.len() * heads * key_dim)
                .map(|_| rng.normal())
                .collect();
            let run = |cache: &LayerCache| {
                let seg = [Segment {
                    rows: 0..query_pos.len(),
                    cache,
                }];
                let mut out = vec![0f32; query_pos.len() * heads * value_dim];
                let (slots, mass) = attend_with_mass(&shape, &q, &query_pos, &seg, &mut out);
                (slots, mass, out)
            };
            let (got, want_bits) = (run(&a), run(&b));
            assert_eq!(got, want_bits);
            let out = &got.2;
            for (t, &pos) in query_pos.iter().enumerate() {
                let want = reference(
                    &shape,
                    &q[t * heads * key_dim..][..heads * key_dim],
                    pos,
                    &a,
                );
                for (x, y) in out[t * heads * value_dim..][..heads * value_dim]
                    .iter()
                    .zip(&want)
                {
                    assert!((x - y).abs() < 1e-5, "{key_dim}/{value_dim}: {x} vs {y}");
                }
            }
        }
    }
}
