//! The forward pass, written once for every architecture: embed → per layer (norm → attention →
//! norm → feed-forward, pre- or post-norm) → final norm → head. A batch holds several sequences,
//! each with its own KV cache and any number of new tokens, so prefill, decode and continuous
//! batching share one path and every weight matrix is read once per step for all rows.

pub mod generation;
pub mod moe;
pub mod ppl;
pub mod sampling;
pub mod stats;

use crate::backend::cpu::attention::{attend, AttentionShape, Segment};
use crate::backend::cpu::int8::{self, quantize_rows_smoothed, QuantizedRows};
use crate::backend::cpu::int8w::matmul_w8;
use crate::backend::cpu::matmul::matmul;
use crate::backend::cpu::ops::{activate, gated_activation, norm_rows, Rope, RopeTable};
use crate::backend::cpu::packed::{matmul_packed, PANEL};
use crate::backend::cpu::parallel::{kernel_threads, serially};
use crate::error::{Error, Result};
use crate::kv::KvCache;
use crate::model::arch::opt::POSITION_OFFSET;
use crate::model::weights::{Ffn, GatedMlp, Layer, Linear, LinearWeight, MoeBlock, PlainMlp};
use crate::model::Model;
use rayon::prelude::*;
use stats::RuntimeStats;
use std::borrow::Cow;
use std::sync::Arc;

/// Most tokens of KV cache reserved up front for one sequence.
pub const MAX_RESERVED_TOKENS: usize = 8192;
/// Below this many multiply-adds, layers of one input run one after another on the caller.
const PARALLEL_MIN_MACS: usize = 1 << 17;
/// From this many multiply-adds a matmul splits well over the pool by itself.
const SIDE_BY_SIDE_MAX_MACS: usize = 1 << 19;
/// Attention layers whose weights take at most this many bytes (one core's L2 on the machines
/// we target) run a batch of several sequences as one task per group of sequences, each
/// thread reading the weights itself, rather than one parallel region per operation.
const SEQUENCE_SPLIT_MAX_WEIGHT_BYTES: usize = 512 << 10;

/// The feed-forward half's input for the rows of a step: normalized, and for a sparse block
/// every token's choice of experts.
struct FfnInput {
    normed: Vec<f32>,
    picks: Option<Vec<moe::Pick>>,
}

/// Which logits a sequence of the batch wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last new token's (generation).
    Last,
    /// Every new token's (perplexity).
    All,
}

/// One sequence's part of a batched forward step.
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: Logits,
}

pub struct Engine {
    model: Arc<Model>,
    pool: rayon::ThreadPool,
    rope: Option<Rope>,
    pub stats: RuntimeStats,
    /// Sees every linear layer's input (calibration); `None` in normal runs.
    observer: Option<Arc<dyn LinearObserver>>,
}

/// Watches the inputs of linear layers, e.g. to collect quantization statistics.
pub trait LinearObserver: Send + Sync {
    fn observe(&self, linear: &Linear, x: &[f32], rows: usize);
}

impl Engine {
    pub fn new(model: Arc<Model>, threads: usize) -> Result<Engine> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("edgemoe-cpu-{i}"))
            .build()
            .map_err(|e| Error::invalid(format!("cannot start {threads} worker threads: {e}")))?;
        let cfg = &model.config;
        let rope = cfg.rope_theta.map(|theta| Rope::new(cfg.head_dim, theta));
        let stats = RuntimeStats::new(cfg.num_layers, cfg.num_experts);
        Ok(Engine {
            model,
            pool,
            rope,
            stats,
            observer: None,
        })
    }

    pub fn with_observer(mut self, observer: Arc<dyn LinearObserver>) -> Engine {
        self.observer = Some(observer);
        self
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.model.config.num_layers, self.model.config.kv_dim())
    }

    /// A cache with room reserved for a sequence expected to reach `tokens` tokens (capped at
    /// the model's context and at [`MAX_RESERVED_TOKENS`]; longer ones grow as they go).
    pub fn new_cache_for(&self, tokens: usize) -> KvCache {
        let mut cache = self.new_cache();
        self.reserve_cache(&mut cache, tokens);
        cache
    }

    /// Reserves room in `cache` for `tokens` tokens in all, capped as in [`Self::new_cache_for`].
    pub fn reserve_cache(&self, cache: &mut KvCache, tokens: usize) {
        let cfg = &self.model.config;
        let wanted = tokens.min(cfg.max_position_embeddings.min(MAX_RESERVED_TOKENS));
        cache.reserve(wanted.saturating_sub(cache.len_tokens()));
    }

    /// Runs the new tokens of every item through the model, appending them to the items' caches;
    /// returns per item its logits, `rows × vocab` (one row for `Logits::Last`).
    pub fn forward(&self, batch: &mut [BatchItem]) -> Result<Vec<Vec<f32>>> {
        self.check_batch(batch)?;
        let out = self.pool.install(|| self.forward_rows(batch));
        for item in batch.iter_mut() {
            item.cache.advance(item.tokens.len());
        }
        self.stats
            .add_tokens(batch.iter().map(|b| b.tokens.len()).sum());
        Ok(out)
    }

    fn check_batch(&self, batch: &[BatchItem]) -> Result<()> {
        let cfg = &self.model.config;
        for item in batch {
            if item.tokens.is_empty() {
                return Err(Error::invalid("a batch item has no tokens"));
            }
            if let Some(&bad) = item.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::invalid(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    cfg.vocab_size
                )));
            }
            let end = item.cache.next_position() + item.tokens.len();
            if self.model.weights.positions.is_some() && end > cfg.max_position_embeddings {
                return Err(Error::invalid(format!(
                    "sequence of {end} tokens exceeds max_position_embeddings {} (learned positions)",
                    cfg.max_position_embeddings
                )));
            }
        }
        Ok(())
    }

    fn forward_rows(&self, batch: &mut [BatchItem]) -> Vec<Vec<f32>> {
        let cfg = &self.model.config;
        let w = &self.model.weights;
        let positions: Vec<usize> = batch
            .iter()
            .flat_map(|b| (0..b.tokens.len()).map(move |i| b.cache.next_position() + i))
            .collect();
        let tokens: Vec<u32> = batch
            .iter()
            .flat_map(|b| b.tokens.iter().copied())
            .collect();
        let mut x = self.embed(&tokens, &positions);
        let rope = self.rope.as_ref().map(|r| r.table(&positions));
        // Bytes read, for the runtime's counters (the MoE block counts its experts itself).
        let (mut weight_bytes, mut kv_bytes) = (self.embed_bytes(tokens.len()), 0);
        for (li, layer) in w.layers.iter().enumerate() {
            let (kv, ffn_input) =
                self.attention_block(li, layer, &mut x, batch, &positions, rope.as_ref());
            kv_bytes += kv;
            self.ffn_block(li, layer, &mut x, ffn_input);
            weight_bytes += layer.attn.weight_bytes();
            weight_bytes += match &layer.ffn {
                Ffn::Moe(_) => 0,
                Ffn::Gated(mlp) => mlp.weight_bytes(),
                Ffn::Plain(mlp) => mlp.fc1.weight_bytes() + mlp.fc2.weight_bytes(),
            };
        }
        weight_bytes +=
            w.head().weight_bytes() + w.project_out.as_ref().map_or(0, |p| p.weight_bytes());
        self.stats.add_bytes_read(weight_bytes, kv_bytes);
        // Gather the rows whose logits are wanted, then the head runs only on those.
        let h = cfg.hidden_size;
        let mut start = 0;
        let mut wanted = Vec::new();
        let mut counts = Vec::with_capacity(batch.len());
        for item in batch.iter() {
            let n = item.tokens.len();
            let rows = match item.logits {
                Logits::Last => start + n - 1..start + n,
                Logits::All => start..start + n,
            };
            counts.push(rows.len());
            wanted.extend_from_slice(&x[rows.start * h..rows.end * h]);
            start += n;
        }
        let rows = wanted.len() / h;
        let mut hs = wanted;
        if let Some(norm) = &w.final_norm {
            let mut normed = vec![0f32; hs.len()];
            norm_rows(norm, &hs, h, &mut normed);
            hs = normed;
        }
        if let Some(p) = &w.project_out {
            hs = self.linear(p, &hs, rows);
        }
        let logits = self.linear(w.head(), &hs, rows);
        let v = cfg.vocab_size;
        let mut out = Vec::with_capacity(batch.len());
        let mut r = 0;
        for n in counts {
            out.push(logits[r * v..(r + n) * v].to_vec());
            r += n;
        }
        out
    }

    /// Bytes of the embedding rows (and learned positions) `rows` tokens look up, and of the
    /// input projection they go through.
    fn embed_bytes(&self, rows: usize) -> usize {
        let w = &self.model.weights;
        let row = match &w.embed.weight {
            LinearWeight::F32Rows(_) => 4 * w.embed.in_features,
            // A row of a panel is strided: every cache line of its panel.
            LinearWeight::F32(_) => 4 * PANEL * w.embed.in_features,
            LinearWeight::Int8(_) | LinearWeight::Int8WeightOnly(_) => w.embed.in_features + 4,
        };
        let positions = w
            .positions
            .as_ref()
            .map_or(0, |_| 4 * self.model.config.hidden_size);
        rows * (row + positions) + w.project_in.as_ref().map_or(0, |p| p.weight_bytes())
    }

    fn embed(&self, tokens: &[u32], positions: &[usize]) -> Vec<f32> {
        let w = &self.model.weights;
        let e = w.embed.in_features;
        let mut x: Vec<f32> = match &w.embed.weight {
            LinearWeight::F32Rows(table) => {
                let mut x = Vec::with_capacity(tokens.len() * e);
                for &t in tokens {
                    x.extend_from_slice(&table[t as usize * e..(t as usize + 1) * e]);
                }
                x
            }
            LinearWeight::F32(table) => {
                tokens.iter().flat_map(|&t| table.row(t as usize)).collect()
            }
            // Quantized embeddings (a tied int8 head): dequantize the looked-up rows.
            LinearWeight::Int8(matrix) | LinearWeight::Int8WeightOnly(matrix) => tokens
                .iter()
                .flat_map(|&t| {
                    let scale = matrix.scales[t as usize];
                    matrix.row(t as usize)[..e]
                        .iter()
                        .map(move |&q| q as f32 * scale)
                })
                .collect(),
        };
        if let Some(p) = &w.project_in {
            x = self.linear(p, &x, tokens.len());
        }
        if let Some(table) = &w.positions {
            let h = self.model.config.hidden_size;
            for (row, &pos) in x.chunks_exact_mut(h).zip(positions) {
                let pe = &table[(pos + POSITION_OFFSET) * h..][..h];
                row.iter_mut().zip(pe).for_each(|(a, b)| *a += b);
            }
        }
        x
    }

    /// The attention half of a layer for every row of the batch; returns the KV-cache bytes
    /// read and the feed-forward half's input. When the layer is small and several sequences
    /// decode together, each operation alone is too short to split well: a fork and join per
    /// operation (projections, attention, output) would cost more than the work. Then the
    /// sequences are split into one group per thread, and each thread runs the whole block on
    /// its own group. Every row goes through the same kernels either way, so results do not
    /// change.
    fn attention_block(
        &self,
        li: usize,
        layer: &Layer,
        x: &mut [f32],
        batch: &mut [BatchItem],
        positions: &[usize],
        rope: Option<&RopeTable>,
    ) -> (usize, FfnInput) {
        let threads = kernel_threads().min(batch.len());
        let decoding = batch.iter().all(|item| item.tokens.len() == 1);
        let small = layer.attn.weight_bytes() <= SEQUENCE_SPLIT_MAX_WEIGHT_BYTES;
        if threads < 2 || !decoding || !small {
            return self.attention_rows(li, layer, x, batch, positions, rope, 0);
        }
        // A decode step: one row per sequence, groups of about equal size.
        let hd = self.model.config.hidden_size;
        let mut groups = Vec::with_capacity(threads);
        let (mut x, mut batch, mut first) = (x, batch, 0);
        for g in 0..threads {
            let rows = batch.len().div_ceil(threads - g);
            let (group_batch, rest_batch) = std::mem::take(&mut batch).split_at_mut(rows);
            let (group_x, rest_x) = std::mem::take(&mut x).split_at_mut(rows * hd);
            groups.push((group_x, group_batch, first));
            (x, batch, first) = (rest_x, rest_batch, first + rows);
        }
        let parts: Vec<(usize, FfnInput)> = groups
            .into_par_iter()
            .map(|(x, batch, first)| {
                let rows = x.len() / hd;
                serially(|| {
                    self.attention_rows(
                        li,
                        layer,
                        x,
                        batch,
                        &positions[first..first + rows],
                        rope,
                        first,
                    )
                })
            })
            .collect();
        let mut ffn = FfnInput {
            normed: Vec::with_capacity(positions.len() * hd),
            picks: None,
        };
        let mut kv_bytes = 0;
        for (kv, part) in parts {
            kv_bytes += kv;
            ffn.normed.extend_from_slice(&part.normed);
            if let Some(picks) = part.picks {
                ffn.picks.get_or_insert_with(Vec::new).extend(picks);
            }
        }
        (kv_bytes, ffn)
    }

    /// [`Self::attention_block`] for rows `first_row..` of the step (their index into `rope`).
    #[allow(clippy::too_many_arguments)]
    fn attention_rows(
        &self,
        li: usize,
        layer: &Layer,
        x: &mut [f32],
        batch: &mut [BatchItem],
        positions: &[usize],
        rope: Option<&RopeTable>,
        first_row: usize,
    ) -> (usize, FfnInput) {
        let cfg = &self.model.config;
        let (hd, rows) = (cfg.hidden_size, positions.len());
        let h = self.pre_norm(&layer.attn_norm, x);
        let a = &layer.attn;
        let [mut q, mut k, v] = self.linears([&a.q, &a.k, &a.v], &h, rows);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        if let Some(rope) = rope {
            for r in 0..rows {
                rope.apply(first_row + r, &mut q[r * qd..(r + 1) * qd]);
                rope.apply(first_row + r, &mut k[r * kvd..(r + 1) * kvd]);
            }
        }
        let shape = AttentionShape {
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            sliding_window: cfg.sliding_window,
        };
        let mut attn = vec![0f32; rows * qd];
        // Append every sequence's new keys/values first, then attend over all of them at once.
        let mut start = 0;
        for item in batch.iter_mut() {
            let cache = &mut item.cache.layers[li];
            for r in start..start + item.tokens.len() {
                cache.append(
                    &k[r * kvd..(r + 1) * kvd],
                    &v[r * kvd..(r + 1) * kvd],
                    positions[r],
                );
            }
            start += item.tokens.len();
        }
        let mut start = 0;
        let segments: Vec<Segment> = batch
            .iter()
            .map(|item| {
                let rows = start..start + item.tokens.len();
                start = rows.end;
                Segment {
                    rows,
                    cache: &item.cache.layers[li],
                }
            })
            .collect();
        let slots_read = attend(&shape, &q, positions, &segments, &mut attn);
        let o = self.linear(&a.o, &attn, rows);
        self.residual(&layer.attn_norm, x, &o, hd);
        // The feed-forward half's row-by-row start, here so that a split step runs it on
        // every thread: its norm, and for a sparse block the routing.
        let normed = self.pre_norm(&layer.ffn_norm, x);
        let picks = match &layer.ffn {
            Ffn::Moe(block) => Some(self.route(block, &normed, rows, first_row)),
            Ffn::Gated(_) | Ffn::Plain(_) => None,
        };
        let ffn = FfnInput { normed, picks };
        // A slot is one f32 key row and one value row.
        (slots_read * 2 * kvd * std::mem::size_of::<f32>(), ffn)
    }

    fn ffn_block(&self, li: usize, layer: &Layer, x: &mut [f32], input: FfnInput) {
        let hd = self.model.config.hidden_size;
        let rows = x.len() / hd;
        let h = &input.normed;
        let f = match &layer.ffn {
            Ffn::Moe(block) => {
                // Routed at the end of the attention half.
                let picks = input.picks.unwrap_or_else(|| self.route(block, h, rows, 0));
                moe::forward(self, li, block, h, rows, picks)
            }
            Ffn::Gated(mlp) => self.gated_mlp(mlp, h, rows),
            Ffn::Plain(mlp) => self.plain_mlp(mlp, h, rows),
        };
        self.residual(&layer.ffn_norm, x, &f, hd);
    }

    /// The experts each of `rows` normalized rows (rows `first_row..` of the step) chooses.
    fn route(
        &self,
        block: &MoeBlock,
        normed: &[f32],
        rows: usize,
        first_row: usize,
    ) -> Vec<moe::Pick> {
        let cfg = &self.model.config;
        let logits = self.linear(&block.router, normed, rows);
        let experts = block.experts.len();
        moe::route_rows(&logits, experts, cfg.top_k, cfg.norm_topk_prob, first_row)
    }

    /// Pre-norm blocks normalize their input; post-norm blocks (OPT-350m) take it as is.
    fn pre_norm(&self, norm: &crate::model::weights::Norm, x: &[f32]) -> Vec<f32> {
        let mut h = vec![0f32; x.len()];
        if self.model.config.pre_norm {
            norm_rows(norm, x, self.model.config.hidden_size, &mut h);
        } else {
            h.copy_from_slice(x);
        }
        h
    }

    /// `x += y`, then normalize for post-norm blocks.
    fn residual(&self, norm: &crate::model::weights::Norm, x: &mut [f32], y: &[f32], hd: usize) {
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
        if !self.model.config.pre_norm {
            let sum = x.to_vec();
            norm_rows(norm, &sum, hd, x);
        }
    }

    pub(crate) fn linear(&self, lin: &Linear, x: &[f32], rows: usize) -> Vec<f32> {
        if let Some(obs) = &self.observer {
            obs.observe(lin, x, rows);
        }
        let mut out = vec![0f32; rows * lin.out_features];
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
            LinearWeight::F32(w) => matmul_packed(&scaled(), rows, w, bias, &mut out),
            // A tied head: the embedding table, row-major.
            LinearWeight::F32Rows(w) => {
                matmul(&scaled(), rows, w, lin.out_features, k, bias, &mut out)
            }
            LinearWeight::Int8(matrix) => {
                // W8A8: quantize each token's activations (per-token scale), then int8 GEMM.
                let mut q = QuantizedRows::new();
                quantize_rows_smoothed(x, rows, k, lin.input_scale.as_deref(), &mut q);
                int8::gemm(&mut out, &q, matrix, bias, &self.pool);
            }
            LinearWeight::Int8WeightOnly(matrix) => {
                matmul_w8(&scaled(), rows, matrix, bias, &mut out)
            }
        }
        out
    }

    /// Several linear layers of the same input. When together they are worth the pool but
    /// each alone is small (a decode step of a few rows on a small model), they run side by
    /// side in one parallel region instead of one region each (or none). Inside
    /// [`serially`] (the caller already fills the pool) they run one after another.
    fn linears<const N: usize>(&self, lins: [&Linear; N], x: &[f32], rows: usize) -> [Vec<f32>; N] {
        let macs = lins.map(|l| rows * l.out_features * l.in_features);
        let (total, largest) = (macs.iter().sum::<usize>(), macs.iter().max().copied());
        if kernel_threads() > 1
            && total >= PARALLEL_MIN_MACS
            && largest.is_some_and(|m| m < SIDE_BY_SIDE_MAX_MACS)
        {
            let mut outs: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
            self.pool.install(|| {
                outs.par_iter_mut()
                    .zip(lins.par_iter())
                    .for_each(|(out, lin)| *out = serially(|| self.linear(lin, x, rows)))
            });
            outs
        } else {
            lins.map(|l| self.linear(l, x, rows))
        }
    }

    pub(crate) fn gated_mlp(&self, mlp: &GatedMlp, x: &[f32], rows: usize) -> Vec<f32> {
        let [mut g, u] = self.linears([&mlp.gate, &mlp.up], x, rows);
        gated_activation(self.model.config.activation, &mut g, &u);
        self.linear(&mlp.down, &g, rows)
    }

    fn plain_mlp(&self, mlp: &PlainMlp, x: &[f32], rows: usize) -> Vec<f32> {
        let mut a = self.linear(&mlp.fc1, x, rows);
        let act = self.model.config.activation;
        a.iter_mut().for_each(|v| *v = activate(act, *v));
        self.linear(&mlp.fc2, &a, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One decode step of one sequence reads each attention matrix, the router and the head
    /// once, two experts per layer (top-2), one embedding row and every cached key and value.
    #[test]
    fn counts_the_bytes_a_decode_step_reads() {
        let model = Arc::new(Model::builtin_default());
        let engine = Engine::new(model.clone(), 1).unwrap();
        let mut cache = engine.new_cache();
        let step = |tokens: &[u32], cache: &mut KvCache| {
            let mut batch = [BatchItem {
                tokens,
                cache,
                logits: Logits::Last,
            }];
            engine.forward(&mut batch).unwrap();
        };
        step(&[1, 2, 3], &mut cache);
        let before = engine.stats.snapshot();
        step(&[4], &mut cache);
        let after = engine.stats.snapshot();

        let cfg = &model.config;
        let w = &model.weights;
        let mut weights = cfg.hidden_size * 4 + w.head().weight_bytes();
        for layer in &w.layers {
            let a = &layer.attn;
            weights += a.q.weight_bytes() + a.k.weight_bytes();
            weights += a.v.weight_bytes() + a.o.weight_bytes();
            let Ffn::Moe(block) = &layer.ffn else {
                panic!("the default model is all MoE")
            };
            weights += block.router.weight_bytes() + 2 * block.experts[0].weight_bytes();
        }
        let kv = cfg.num_layers * 4 * 2 * cfg.kv_dim() * 4;
        assert_eq!(after.weight_bytes - before.weight_bytes, weights as u64);
        assert_eq!(after.kv_bytes - before.kv_bytes, kv as u64);
    }
}
