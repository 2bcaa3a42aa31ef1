//! [`CpuBackend`]: the forward pass's ops on host memory, over a rayon pool. The pool and
//! every scheduling choice (what runs side by side, what splits over the threads) live here.

use super::attention::{attend, attend_with_head_mass, attend_with_mass};
use super::half::{matmul_half, HalfView};
use super::int8::{self, quantize_rows_smoothed, QuantizedRows};
use super::int8w::matmul_w8;
use super::kv::HostKv;
use super::matmul::matmul;
use super::ops::{activate, gated_activation, norm_rows, rotate_rows, sigmoid, Rope, RopeTable};
use super::packed::{matmul_packed, PackedF32};
use super::parallel::{kernel_threads, largest_first, serially};
use super::routing::route_rows;
use crate::backend::{AttentionShape, Backend, Pick, Segment, Tasks};
use crate::error::{Error, Result};
use crate::kv::{EvictionConfig, KvLayout, KvStorage, LayerCache, SlotStats};
use crate::model::config::{Activation, ClampedSwiglu};
use crate::model::weights::{Linear, LinearWeight, Norm, Weights};
use rayon::prelude::*;
use std::borrow::Cow;

/// Below this many multiply-adds, linears of one input run one after another on the caller.
const PARALLEL_MIN_MACS: usize = 1 << 17;
/// From this many multiply-adds a matmul splits well over the pool by itself.
const SIDE_BY_SIDE_MAX_MACS: usize = 1 << 19;
/// Attention layers whose weights take at most this many bytes (one core's L2 on the machines
/// we target) run a decode step of several sequences as one task per group of sequences, each
/// thread reading the weights itself, rather than one parallel region per operation.
const SEQUENCE_SPLIT_MAX_WEIGHT_BYTES: usize = 512 << 10;
/// Below this many weights per expert matrix, experts run side by side on the pool.
const SMALL_EXPERT_WEIGHTS: usize = 1 << 20;

/// `rows × cols` f32 activations, row-major, in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    pub data: Vec<f32>,
    pub cols: usize,
}

impl Rows {
    pub fn new(data: Vec<f32>, cols: usize) -> Rows {
        debug_assert!(cols > 0 && data.len().is_multiple_of(cols));
        Rows { data, cols }
    }

    pub fn rows(&self) -> usize {
        self.data.len() / self.cols.max(1)
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

pub struct CpuBackend {
    pool: rayon::ThreadPool,
}

/// The worker threads a pool of `requested` threads gets (0: one per core).
pub fn worker_threads(requested: usize) -> Result<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // More threads than a few per core only compete for the same cores (and thousands
    // would exhaust the process's memory for stacks): refused, naming the core count.
    let most = (4 * cores).max(16);
    match requested {
        0 => Ok(cores),
        t if t > most => Err(Error::invalid(format!(
            "{t} threads is too many for this machine's {cores} cores (at most {most})"
        ))),
        t => Ok(t),
    }
}

impl CpuBackend {
    /// A backend on `threads` worker threads (0: one per core).
    pub fn new(threads: usize) -> Result<CpuBackend> {
        let threads = worker_threads(threads)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("edgemoe-cpu-{i}"))
            .build()
            .map_err(|e| Error::invalid(format!("cannot start {threads} worker threads: {e}")))?;
        Ok(CpuBackend { pool })
    }

    /// `x·Wᵀ + b` on row-major `x` (`rows × in_features`) into `out`.
    pub fn linear_into(&self, lin: &Linear, x: &[f32], rows: usize, out: &mut [f32]) {
        let (k, bias) = (lin.in_features, lin.bias.as_deref());
        // Kernels with f32 activations take SmoothQuant's input scale here; the int8 one
        // applies it while quantizing.
        let scaled = || -> Cow<[f32]> {
            match &lin.input_scale {
                None => Cow::Borrowed(x),
                Some(s) => x
                    .chunks(k)
                    .flat_map(|r| r.iter().zip(s).map(|(a, b)| a * b))
                    .collect(),
            }
        };
        match &lin.weight {
            LinearWeight::Prepared(w) => match w.as_any().downcast_ref::<PackedF32>() {
                Some(w) => matmul_packed(&scaled(), rows, w, bias, out),
                // Another backend's layout: its rows, as the checkpoint stores them.
                None => {
                    let rows_w = w.to_rows();
                    matmul(&scaled(), rows, &rows_w, lin.out_features, k, bias, out)
                }
            },
            // A tied head: the embedding table, row-major.
            LinearWeight::F32Rows(w) => matmul(&scaled(), rows, w, lin.out_features, k, bias, out),
            LinearWeight::Half(kind, w) => {
                let view = HalfView {
                    kind: *kind,
                    n: lin.out_features,
                    k,
                    data: w,
                };
                matmul_half(&scaled(), rows, view, bias, out)
            }
            LinearWeight::Int8(matrix) => {
                // W8A8: quantize each token's activations (per-token scale), then int8 GEMM.
                let mut q = QuantizedRows::new();
                quantize_rows_smoothed(x, rows, k, lin.input_scale.as_deref(), &mut q);
                int8::gemm(out, &q, matrix, bias, &self.pool);
            }
            LinearWeight::Int8WeightOnly(matrix) => matmul_w8(&scaled(), rows, matrix, bias, out),
            LinearWeight::Int4(matrix) => {
                // W4A8: the same per-token activations, int4 weights.
                let mut q = QuantizedRows::new();
                quantize_rows_smoothed(x, rows, k, lin.input_scale.as_deref(), &mut q);
                int8::int4::gemm(out, &q, matrix, bias, &self.pool);
            }
        }
    }
}

impl Backend for CpuBackend {
    type Act = Rows;
    type Rope = RopeTable;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    fn run<R: Send>(&self, step: impl FnOnce() -> R + Send) -> R {
        self.pool.install(step)
    }

    fn rows(&self, x: &Rows) -> usize {
        x.rows()
    }

    fn prepare_weights(&self, weights: &mut Weights) {
        super::prepare::prepare_weights(weights);
    }

    fn upload_rows(&self, data: Vec<f32>, cols: usize) -> Rows {
        Rows::new(data, cols)
    }

    fn to_host<'a>(&self, x: &'a Rows) -> Cow<'a, [f32]> {
        Cow::Borrowed(&x.data)
    }

    fn select_rows(&self, x: &Rows, rows: &[usize]) -> Rows {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(x.row(r));
        }
        Rows::new(data, x.cols)
    }

    fn concat_rows(&self, parts: Vec<Rows>) -> Rows {
        let cols = parts.first().map_or(1, |p| p.cols);
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Rows::new(data, cols)
    }

    fn embed(&self, table: &Linear, tokens: &[u32]) -> Rows {
        let e = table.in_features;
        let mut x = Vec::with_capacity(tokens.len() * e);
        for &t in tokens {
            let t = t as usize;
            match &table.weight {
                LinearWeight::F32Rows(w) => x.extend_from_slice(&w[t * e..(t + 1) * e]),
                LinearWeight::Prepared(w) => match w.as_any().downcast_ref::<PackedF32>() {
                    Some(w) => x.extend(w.row(t)),
                    None => x.extend_from_slice(&w.to_rows()[t * e..(t + 1) * e]),
                },
                LinearWeight::Half(kind, w) => {
                    x.extend(w[t * e..(t + 1) * e].iter().map(|&b| kind.to_f32(b)))
                }
                // Quantized embeddings (a tied int8 head): dequantize the looked-up rows.
                LinearWeight::Int8(m) | LinearWeight::Int8WeightOnly(m) => {
                    let scale = m.scales[t];
                    x.extend(m.row(t)[..e].iter().map(|&q| q as f32 * scale))
                }
                LinearWeight::Int4(m) => x.extend(m.dequantize_row(t)),
            }
        }
        Rows::new(x, e)
    }

    fn add_table_rows(&self, x: &mut Rows, table: &[f32], index: &[usize]) {
        let h = x.cols;
        for (row, &i) in x.data.chunks_exact_mut(h).zip(index) {
            let pe = &table[i * h..(i + 1) * h];
            row.iter_mut().zip(pe).for_each(|(a, b)| *a += b);
        }
    }

    fn norm(&self, norm: &Norm, x: &Rows) -> Rows {
        let mut out = vec![0f32; x.data.len()];
        norm_rows(norm, &x.data, x.cols, &mut out);
        Rows::new(out, x.cols)
    }

    fn norm_runs(&self, norm: &Norm, x: &Rows, dim: usize) -> Rows {
        let mut out = vec![0f32; x.data.len()];
        norm_rows(norm, &x.data, dim, &mut out);
        Rows::new(out, x.cols)
    }

    fn clamp(&self, x: &mut Rows, limit: f32) {
        x.data.iter_mut().for_each(|v| *v = v.clamp(-limit, limit));
    }

    fn scale(&self, x: &mut Rows, factor: f32) {
        x.data.iter_mut().for_each(|v| *v *= factor);
    }

    fn linear(&self, lin: &Linear, x: &Rows) -> Rows {
        let rows = x.rows();
        let mut out = vec![0f32; rows * lin.out_features];
        self.linear_into(lin, &x.data, rows, &mut out);
        Rows::new(out, lin.out_features)
    }

    /// When together the linears are worth the pool but each alone is small (a decode step of a
    /// few rows on a small model), they run side by side in one parallel region instead of one
    /// region each (or none). Inside [`serially`] they run one after another.
    fn linears<const N: usize>(&self, lins: [&Linear; N], x: &Rows) -> [Rows; N] {
        let rows = x.rows();
        let macs = lins.map(|l| rows * l.out_features * l.in_features);
        let (total, largest) = (macs.iter().sum::<usize>(), macs.iter().max().copied());
        if kernel_threads() > 1
            && total >= PARALLEL_MIN_MACS
            && largest.is_some_and(|m| m < SIDE_BY_SIDE_MAX_MACS)
        {
            let mut outs: [Rows; N] = std::array::from_fn(|_| Rows::new(Vec::new(), 1));
            self.pool.install(|| {
                outs.par_iter_mut()
                    .zip(lins.par_iter())
                    .for_each(|(out, lin)| *out = serially(|| self.linear(lin, x)))
            });
            outs
        } else {
            lins.map(|l| self.linear(l, x))
        }
    }

    fn rope_table(&self, head_dim: usize, theta: f32, positions: &[usize]) -> RopeTable {
        Rope::new(head_dim, theta).table(positions)
    }

    fn rope_table_freqs(&self, inv_freq: &[f32], scale: f32, positions: &[usize]) -> RopeTable {
        Rope::from_freqs(inv_freq.to_vec(), scale).table(positions)
    }

    fn apply_rope(&self, x: &mut Rows, rope: &RopeTable, first_row: usize) {
        let cols = x.cols;
        for (r, row) in x.data.chunks_exact_mut(cols).enumerate() {
            rope.apply(first_row + r, row);
        }
    }

    fn apply_rope_partial(
        &self,
        x: &mut Rows,
        rope: &RopeTable,
        first_row: usize,
        (head_dim, _): (usize, usize),
    ) {
        let cols = x.cols;
        for (r, row) in x.data.chunks_exact_mut(cols).enumerate() {
            rope.apply_heads(first_row + r, row, head_dim);
        }
    }

    fn new_kv(&self, layout: KvLayout) -> Box<dyn KvStorage> {
        Box::new(HostKv::with_layout(layout))
    }

    fn append_kv(
        &self,
        cache: &mut LayerCache,
        k: &Rows,
        v: &Rows,
        rows: std::ops::Range<usize>,
        positions: &[usize],
    ) {
        let adopt = |other: Option<&dyn KvStorage>, _: &[u32]| {
            HostKv::adopt(KvLayout::separate(k.cols), other)
        };
        let span = rows.start * k.cols..rows.end * k.cols;
        let write = |own: &mut HostKv| {
            own.extend(&k.data[span.clone()], &v.data[span]);
            Ok(())
        };
        cache
            .append_with(&positions[rows.clone()], adopt, write)
            .unwrap_or_else(|e| panic!("edgemoe: the KV cache could not be adopted: {e}"));
    }

    fn attention(
        &self,
        shape: &AttentionShape,
        q: &Rows,
        positions: &[usize],
        segments: &[Segment],
    ) -> (Rows, usize) {
        let qd = shape.num_heads * shape.value_dim;
        let mut out = vec![0f32; positions.len() * qd];
        let slots = attend(shape, &q.data, positions, segments, &mut out);
        (Rows::new(out, qd), slots)
    }

    fn attention_with_mass(
        &self,
        shape: &AttentionShape,
        q: &Rows,
        positions: &[usize],
        segments: &[Segment],
    ) -> (Rows, usize, Vec<f32>) {
        let qd = shape.num_heads * shape.value_dim;
        let mut out = vec![0f32; positions.len() * qd];
        let (slots, mass) = attend_with_mass(shape, &q.data, positions, segments, &mut out);
        (Rows::new(out, qd), slots, mass)
    }

    fn attention_with_head_mass(
        &self,
        shape: &AttentionShape,
        q: &Rows,
        positions: &[usize],
        segments: &[Segment],
    ) -> (Rows, usize, Vec<f32>) {
        let qd = shape.num_heads * shape.value_dim;
        let mut out = vec![0f32; positions.len() * qd];
        let (slots, mass) = attend_with_head_mass(shape, &q.data, positions, segments, &mut out);
        (Rows::new(out, qd), slots, mass)
    }

    fn evicts_per_head(&self) -> bool {
        true
    }

    fn evict_heads(
        &self,
        config: &EvictionConfig,
        cache: &mut LayerCache,
        stats: &mut [SlotStats],
        now: usize,
    ) -> Result<()> {
        crate::kv::evict::evict_heads(config, cache, stats, now, super::evict::kept_slots)
    }

    fn evict(
        &self,
        config: &EvictionConfig,
        cache: &mut LayerCache,
        stats: &mut SlotStats,
        now: usize,
    ) -> Result<()> {
        super::evict::evict(config, cache, stats, now)
    }

    fn activate(&self, act: Activation, x: &mut Rows) {
        x.data.iter_mut().for_each(|v| *v = activate(act, *v));
    }

    fn gated_activation(&self, act: Activation, gate: &mut Rows, up: &Rows) {
        gated_activation(act, &mut gate.data, &up.data);
    }

    fn clamped_swiglu(&self, gate: &mut Rows, up: &Rows, swiglu: ClampedSwiglu) {
        super::ops::clamped_swiglu(swiglu, &mut gate.data, &up.data);
    }

    fn add(&self, x: &mut Rows, y: &Rows) {
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
    }

    fn rotate_rows(&self, x: &mut Rows, block: usize) {
        // Rows are independent: a prefill's rows split over the pool (one row is a few µs).
        let cols = x.cols;
        let rows = x.rows();
        let threads = if kernel_threads() == 1 {
            1
        } else {
            self.pool.current_num_threads()
        };
        if threads > 1 && rows >= 2 * threads {
            let per_task = rows.div_ceil(threads * 2) * cols;
            self.pool.install(|| {
                x.data
                    .par_chunks_mut(per_task)
                    .for_each(|rows| rotate_rows(rows, cols, block))
            });
        } else {
            rotate_rows(&mut x.data, cols, block);
        }
    }

    fn route(&self, logits: &Rows, top_k: usize, renormalize: bool, first_row: usize) -> Vec<Pick> {
        route_rows(&logits.data, logits.cols, top_k, renormalize, first_row)
    }

    fn mix_rows(&self, out: &mut Rows, y: &Rows, picks: &[Pick]) {
        let h = out.cols;
        for (p, yr) in picks.iter().zip(y.data.chunks_exact(h)) {
            out.data[p.row * h..(p.row + 1) * h]
                .iter_mut()
                .zip(yr)
                .for_each(|(o, v)| *o += p.weight * v);
        }
    }

    fn add_gated(&self, out: &mut Rows, y: &Rows, gate: &Rows) {
        let h = out.cols;
        for ((o, yr), &g) in out
            .data
            .chunks_exact_mut(h)
            .zip(y.data.chunks_exact(h))
            .zip(&gate.data)
        {
            let g = sigmoid(g);
            o.iter_mut().zip(yr).for_each(|(o, v)| *o += g * v);
        }
    }

    fn zeros(&self, rows: usize, cols: usize) -> Rows {
        Rows::new(vec![0f32; rows * cols], cols)
    }

    /// Small experts (and sequence groups) run side by side on the pool, largest first (one
    /// small matmul alone would not fill it; in a batched step one expert may have eight tokens
    /// and the next one), each confined to its thread. Large experts run one after another,
    /// each matmul spread over the pool, so weights stream without the threads competing.
    fn run_tasks<T: Send, R: Send>(
        &self,
        kind: Tasks,
        tasks: Vec<T>,
        cost: impl Fn(&T) -> usize,
        task: impl Fn(T) -> R + Sync,
    ) -> Vec<R> {
        let side_by_side = match kind {
            Tasks::Matrices { weights } => weights < SMALL_EXPERT_WEIGHTS,
            Tasks::SequenceGroups => true,
        };
        if !side_by_side || tasks.len() < 2 {
            return tasks.into_iter().map(task).collect();
        }
        let costs: Vec<usize> = tasks.iter().map(&cost).collect();
        let slots: Vec<std::sync::Mutex<Option<T>>> = tasks
            .into_iter()
            .map(|t| std::sync::Mutex::new(Some(t)))
            .collect();
        largest_first(
            slots.len(),
            |i| costs[i],
            |i| {
                // Each index is handed out once, so the slot is full and nobody else holds it.
                let t = slots[i].lock().ok().and_then(|mut s| s.take());
                t.map(|t| serially(|| task(t)))
            },
        )
        .into_iter()
        .flatten()
        .collect()
    }

    fn sequence_groups(
        &self,
        sequences: usize,
        decoding: bool,
        layer_weight_bytes: usize,
    ) -> usize {
        let threads = kernel_threads().min(sequences);
        if threads < 2 || !decoding || layer_weight_bytes > SEQUENCE_SPLIT_MAX_WEIGHT_BYTES {
            1
        } else {
            threads
        }
    }
}
