//! The forward pass, written once for every architecture: embed → per layer (norm → attention →
//! norm → feed-forward, pre- or post-norm) → final norm → head. A batch holds several sequences,
//! each with its own KV cache and any number of new tokens, so prefill, decode and continuous
//! batching share one path and every weight matrix is read once per step for all rows.

pub mod builder;
pub mod generation;
mod mla;
pub(crate) mod moe;
pub(crate) mod penalties;
pub mod ppl;
pub mod recall;
pub mod sampling;
pub(crate) mod stats;
pub mod stream;
mod tiered;

use crate::backend::health::StepFailure;
use crate::backend::{AttentionShape, Backend, DefaultBackend, Pick, Segment, Tasks};
use crate::error::{Error, Result};
use crate::experts::ExpertService;
use crate::kv::{Granularity, KvCache, KvOptions};
use crate::model::arch::opt::POSITION_OFFSET;
use crate::model::config::QkNorm;
use crate::model::weights::{Ffn, GatedMlp, Layer, Linear, MoeBlock, Norm, PlainMlp};
use crate::model::Model;
pub use builder::EngineBuilder;
use stats::RuntimeStats;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Most tokens of KV cache reserved up front for one sequence.
pub const MAX_RESERVED_TOKENS: usize = 8192;

/// The feed-forward half's input for the rows of a step: normalized, and for a sparse block
/// every token's choice of experts.
struct FfnInput<A> {
    normed: A,
    picks: Option<Vec<Pick>>,
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
    /// The tokens to run (after those already in `cache`).
    pub tokens: &'a [u32],
    /// The sequence's KV cache; the tokens are appended to it.
    pub cache: &'a mut KvCache,
    /// Which logits to return.
    pub logits: Logits,
}

/// A model ready to run on a backend: the forward pass, its runtime statistics, the expert
/// service and the KV options new sequences get. Made by [`EngineBuilder`] (or [`Engine::new`]
/// for the CPU with defaults); run a completion with [`Engine::stream`].
pub struct Engine<B: Backend = DefaultBackend> {
    model: Arc<Model>,
    backend: B,
    /// Tokens, steps and expert activations counted while running.
    pub stats: RuntimeStats,
    /// Where the experts come from (in place, or paged under a memory budget).
    pub experts: ExpertService,
    /// Sees every linear layer's input (calibration); `None` in normal runs.
    observer: Option<Arc<dyn LinearObserver>>,
    /// KV budget and eviction policy of the caches [`Self::prepare_cache`] sets up.
    kv: KvOptions,
    /// The device's expert slots and the host backend for the experts it does not hold;
    /// `None`: every expert runs on [`Self::backend`].
    tier: Option<tiered::Tiered>,
}

/// Watches the inputs of linear layers, e.g. to collect quantization statistics.
pub trait LinearObserver: Send + Sync {
    /// `x` is the `rows × linear.in_features` input of `linear`.
    fn observe(&self, linear: &Linear, x: &[f32], rows: usize);
}

impl Engine<DefaultBackend> {
    /// An engine on the default backend with `threads` workers (0: one per core).
    pub fn new(model: Arc<Model>, threads: usize) -> Result<Engine> {
        Ok(Engine::with_backend(model, DefaultBackend::new(threads)?))
    }
}

impl<B: Backend> Engine<B> {
    /// An engine on `backend`, experts in place, default KV options.
    pub fn with_backend(mut model: Arc<Model>, backend: B) -> Engine<B> {
        // Weights the backend keeps in a layout of its own are rearranged before the model is
        // shared (in place, no second copy); a model already shared runs as it is.
        if let Some(m) = Arc::get_mut(&mut model) {
            backend.prepare_weights(&mut m.weights);
        }
        let cfg = &model.config;
        let stats = RuntimeStats::new(cfg.num_layers, cfg.num_experts);
        let experts = ExpertService::in_place(&model);
        Engine {
            model,
            backend,
            stats,
            experts,
            observer: None,
            kv: KvOptions::default(),
            tier: None,
        }
    }

    /// The engine with experts from `experts` (e.g. paged under a memory budget).
    pub fn with_experts(mut self, experts: ExpertService) -> Result<Engine<B>> {
        // With a device tier, experts reach the device only through its bounded slots.
        if experts.is_paged() && self.tier.is_none() {
            if let Some(why) = self.backend.paged_experts_unsupported() {
                return Err(crate::error::Error::invalid(format!(
                    "--mem (expert paging) cannot run on the {} backend: {why}; use --backend cpu",
                    self.backend.name()
                )));
            }
        }
        self.experts = experts;
        Ok(self)
    }

    /// The engine with a device expert tier of `tier`'s slots: routed experts not resident in
    /// it are fetched into a slot or run on a host CPU backend of `host_threads` workers
    /// (0: one per core), as the tier's placement decides.
    pub fn with_tier(
        mut self,
        tier: crate::experts::tier::ExpertTier,
        host_threads: usize,
    ) -> Result<Engine<B>> {
        let host = crate::backend::HostBackend::new(host_threads)?;
        self.tier = Some(tiered::Tiered::new(tier, host, self.model.config.top_k));
        Ok(self)
    }

    /// The device expert tier, when the engine has one.
    pub fn tier(&self) -> Option<&crate::experts::tier::ExpertTier> {
        self.tier.as_ref().map(|t| &t.tier)
    }

    /// Resizes the device tier to a GPU budget of `bytes` between steps (`set_gpu_mem`):
    /// returns the new slot count; too small a budget is refused and the tier keeps its size.
    pub fn set_gpu_mem(&self, bytes: u64) -> Result<usize> {
        let Some(t) = &self.tier else {
            return Err(Error::invalid(
                "set_gpu_mem needs the GPU expert tier (start with --gpu-mem)",
            ));
        };
        let slots = t.tier.slots_for(bytes)?;
        self.set_tier_slots(slots)?;
        Ok(slots)
    }

    /// Changes the device tier's slot count between steps, giving back the slots of the
    /// experts that leave.
    pub fn set_tier_slots(&self, slots: usize) -> Result<()> {
        let Some(t) = &self.tier else {
            return Err(Error::invalid("the engine has no device expert tier"));
        };
        for key in t.tier.resize(slots) {
            tiered::release(self, key);
        }
        Ok(())
    }

    /// Sets the KV budget and policy every sequence started from now on gets (checked first).
    pub fn set_kv_options(&mut self, kv: KvOptions) -> Result<()> {
        kv.validate()?;
        self.check_granularity(&kv)?;
        self.kv = kv;
        Ok(())
    }

    /// Per-KV-head eviction needs a backend whose attention masks each KV head by its own
    /// positions; the others refuse it here, by name.
    fn check_granularity(&self, kv: &KvOptions) -> Result<()> {
        if kv.granularity == Granularity::Head
            && kv.budget.is_some()
            && !self.backend.evicts_per_head()
        {
            return Err(Error::invalid(
                "--kv-granularity head (per-KV-head eviction) runs on the CPU backend only: \
                 this backend's attention keeps one position map per layer (use \
                 --kv-granularity layer)",
            ));
        }
        Ok(())
    }

    /// The KV options new sequences get.
    pub fn kv_options(&self) -> &KvOptions {
        &self.kv
    }

    /// Sets `cache` (empty) up for a sequence expected to reach `tokens` tokens: the engine's
    /// eviction plan (a percentage budget is of `tokens`), and room reserved up to the budget.
    pub fn prepare_cache(&self, cache: &mut KvCache, tokens: usize) -> Result<()> {
        self.prepare_cache_with(&self.kv, cache, tokens)
    }

    /// [`Self::prepare_cache`] with a sequence's own options (a serve request's budget); a
    /// budgeted cache gives back memory beyond its budget (a recycled one may hold more).
    pub fn prepare_cache_with(
        &self,
        kv: &KvOptions,
        cache: &mut KvCache,
        tokens: usize,
    ) -> Result<()> {
        let plan = kv.resolve(tokens)?;
        self.check_granularity(kv)?;
        cache.set_eviction(plan, self.model.config.cache_kv_heads())?;
        if let Some(p) = plan {
            cache.shrink_to(p.budget.min(tokens));
        }
        self.reserve_cache(cache, tokens);
        Ok(())
    }

    /// The engine with `observer` shown every linear layer's input.
    pub fn with_observer(mut self, observer: Arc<dyn LinearObserver>) -> Engine<B> {
        self.observer = Some(observer);
        self
    }

    /// The model it runs.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The backend it runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Worker threads (or streams) of the backend.
    pub fn threads(&self) -> usize {
        self.backend.threads()
    }

    /// An empty KV cache for one sequence, its layers in the backend's storage.
    pub fn new_cache(&self) -> KvCache {
        let cfg = &self.model.config;
        KvCache::with_layout(cfg.num_layers, cfg.kv_layout(), |layout| {
            Some(self.backend.new_kv(layout))
        })
    }

    /// A cache with room reserved for a sequence expected to reach `tokens` tokens (capped at
    /// the model's context and at [`MAX_RESERVED_TOKENS`]; longer ones grow as they go, never
    /// past the context: see [`KvCache::make_room`]).
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
    /// returns per item its logits, `rows × vocab` (one row for `Logits::Last`). On an error
    /// (a corrupt expert block, a failed device op) each item's cache is back where it stood
    /// before the step, or empty where that cannot be restored exactly (an eviction ran, or
    /// the policy folded the step's attention into its statistics).
    pub fn forward(&self, batch: &mut [BatchItem]) -> Result<Vec<Vec<f32>>> {
        self.check_batch(batch)?;
        self.backend.run(|| self.evict_for(batch))?;
        let context = self.model.config.max_position_embeddings;
        for item in batch.iter_mut() {
            item.cache.make_room(item.tokens.len(), context);
        }
        let marks: Vec<_> = batch.iter().map(|b| b.cache.mark()).collect();
        // A device op that fails unwinds with its error (`health::fail_step`): it ends this
        // step only. Any other panic is a bug and goes on unwinding.
        let out = catch_unwind(AssertUnwindSafe(|| {
            self.backend.run(|| self.forward_rows(batch))
        }))
        .unwrap_or_else(|payload| match payload.downcast::<StepFailure>() {
            Ok(failure) => Err(failure.0),
            Err(other) => resume_unwind(other),
        });
        self.experts.end_step();
        if out.is_err() {
            // The step may have appended to some layers only: undo it where that is exact,
            // else start the sequence over rather than attend over a half-written cache.
            for (item, mark) in batch.iter_mut().zip(&marks) {
                if !item.cache.rewind(mark) {
                    item.cache.clear();
                }
            }
        }
        let out = out?;
        for item in batch.iter_mut() {
            item.cache.advance(item.tokens.len());
        }
        self.stats
            .add_tokens(batch.iter().map(|b| b.tokens.len()).sum());
        Ok(out)
    }

    /// The first layer's input for `tokens` at positions `first_position..`: what a model run
    /// one layer at a time (the quantizer) starts from.
    pub fn embed_tokens(&self, tokens: &[u32], first_position: usize) -> Result<B::Act> {
        let positions: Vec<usize> = (first_position..first_position + tokens.len()).collect();
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.model.config.vocab_size)
        {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.model.config.vocab_size
            )));
        }
        Ok(self.backend.run(|| self.embed(tokens, &positions)))
    }

    /// What the head reads for the last layer's hidden states `x` (the quantizer calibrates the
    /// head on it).
    pub fn head_input_of(&self, x: B::Act) -> B::Act {
        self.backend.run(|| self.head_input(x))
    }

    /// The final norm, a tied head's transform and an output projection, applied to `x`.
    fn head_input(&self, x: B::Act) -> B::Act {
        let w = &self.model.weights;
        let mut hs = match &w.final_norm {
            Some(norm) => self.backend.norm(norm, &x),
            None => x,
        };
        if let Some(t) = &w.head_transform {
            hs = self.linear(t, &hs);
        }
        if let Some(p) = &w.project_out {
            hs = self.linear(p, &hs);
        }
        hs
    }

    /// Runs `layer` as layer `li` on the hidden states `x` of `item`'s new tokens, appending
    /// their keys and values to the item's cache at `li` (the cache's position does not move).
    /// `layer` need not be the model's own: the quantizer runs each layer's f32 weights, then
    /// its quantized ones, while the model holds neither.
    pub fn forward_layer(
        &self,
        li: usize,
        layer: &Layer,
        x: &mut B::Act,
        item: &mut BatchItem,
    ) -> Result<()> {
        if li >= item.cache.layers.len() || self.backend.rows(x) != item.tokens.len() {
            return Err(Error::invalid(format!(
                "forward_layer: layer {li} of {}, {} rows for {} tokens",
                item.cache.layers.len(),
                self.backend.rows(x),
                item.tokens.len()
            )));
        }
        let first = item.cache.next_position();
        let positions: Vec<usize> = (first..first + item.tokens.len()).collect();
        self.backend.run(|| {
            let rope = self.rope_table(&positions);
            let batch = std::slice::from_mut(item);
            let (_, ffn_input) =
                self.attention_block(li, layer, x, batch, &positions, rope.as_ref());
            self.ffn_block(li, layer, x, ffn_input)
        })
    }

    /// The step's RoPE angles (over the rotated part of a head only, under partial rotary);
    /// `None` for learned positions.
    fn rope_table(&self, positions: &[usize]) -> Option<B::Rope> {
        let cfg = &self.model.config;
        let dim = cfg.options.rotary_dim.unwrap_or(cfg.head_dim);
        let theta = cfg.rope_theta?;
        Some(match &cfg.options.yarn {
            // YaRN's attention factor multiplies cos and sin, so every rotated value (latent
            // attention's rotated parts too).
            Some(y) => self.backend.rope_table_freqs(
                &y.inv_freq(dim, theta),
                y.attention_factor as f32,
                positions,
            ),
            None => self.backend.rope_table(dim, theta, positions),
        })
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

    /// Evicts, in every item whose cache has a budget that its new tokens would overflow, each
    /// layer down to `budget − window` slots: lazily, once per observation window.
    fn evict_for(&self, batch: &mut [BatchItem]) -> Result<()> {
        for item in batch.iter_mut() {
            let Some(cfg) = item.cache.eviction_config() else {
                continue;
            };
            let (held, n) = (item.cache.len_tokens(), item.tokens.len());
            if held + n <= cfg.budget {
                continue;
            }
            if n > cfg.window {
                return Err(Error::invalid(format!(
                    "a step of {n} tokens with a full KV cache exceeds the observation window \
                     of {} (feed at most KvCache::room() tokens per step)",
                    cfg.window
                )));
            }
            let now = item.cache.next_position();
            let (layers, eviction) = item.cache.parts_mut();
            let Some(eviction) = eviction else { continue };
            let heads = eviction.heads;
            for (layer, stats) in layers.iter_mut().zip(eviction.stats.chunks_mut(heads)) {
                if cfg.needs_attention() {
                    for (h, st) in stats.iter_mut().enumerate() {
                        st.sync(layer.head_positions(h));
                    }
                }
                if cfg.per_head() {
                    self.backend.evict_heads(&cfg, layer, stats, now)?;
                } else {
                    self.backend.evict(&cfg, layer, &mut stats[0], now)?;
                }
            }
            eviction.evictions += 1;
        }
        Ok(())
    }

    fn forward_rows(&self, batch: &mut [BatchItem]) -> Result<Vec<Vec<f32>>> {
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
        let rope = self.rope_table(&positions);
        // Bytes read, for the runtime's counters (the MoE block counts its experts itself).
        let (mut weight_bytes, mut kv_bytes) = (self.embed_bytes(tokens.len()), 0);
        for (li, layer) in w.layers.iter().enumerate() {
            let (kv, ffn_input) =
                self.attention_block(li, layer, &mut x, batch, &positions, rope.as_ref());
            kv_bytes += kv;
            self.ffn_block(li, layer, &mut x, ffn_input)?;
            weight_bytes += layer.attn.streamed_bytes();
            weight_bytes += match &layer.ffn {
                Ffn::Moe(_) => 0,
                Ffn::Gated(mlp) => mlp.weight_bytes(),
                Ffn::Plain(mlp) => mlp.fc1.weight_bytes() + mlp.fc2.weight_bytes(),
            };
        }
        weight_bytes += w.head().weight_bytes()
            + [&w.head_transform, &w.project_out]
                .into_iter()
                .flatten()
                .map(|p| p.weight_bytes())
                .sum::<usize>();
        self.stats.add_bytes_read(weight_bytes, kv_bytes);
        // Gather the rows whose logits are wanted, then the head runs only on those.
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
            wanted.extend(rows);
            start += n;
        }
        let hs = self.head_input(self.backend.select_rows(&x, &wanted));
        let logits = self.linear(w.head(), &hs);
        let mut logits = self.backend.to_host(&logits);
        if let Some(s) = cfg.options.logits_scaling {
            logits.to_mut().iter_mut().for_each(|l| *l /= s);
        }
        let v = cfg.vocab_size;
        let mut out = Vec::with_capacity(batch.len());
        let mut r = 0;
        for n in counts {
            out.push(logits[r * v..(r + n) * v].to_vec());
            r += n;
        }
        Ok(out)
    }

    /// Bytes of the embedding rows (and learned positions) `rows` tokens look up, and of the
    /// input projection they go through.
    fn embed_bytes(&self, rows: usize) -> usize {
        let w = &self.model.weights;
        let positions = w
            .positions
            .as_ref()
            .map_or(0, |_| 4 * self.model.config.hidden_size);
        rows * (w.embed.row_read_bytes() + positions)
            + w.project_in.as_ref().map_or(0, |p| p.weight_bytes())
    }

    fn embed(&self, tokens: &[u32], positions: &[usize]) -> B::Act {
        let w = &self.model.weights;
        let mut x = self.backend.embed(&w.embed, tokens);
        if let Some(m) = self.model.config.options.embedding_multiplier {
            self.backend.scale(&mut x, m);
        }
        if let Some(p) = &w.project_in {
            x = self.linear(p, &x);
        }
        if let Some(table) = &w.positions {
            let index: Vec<usize> = positions.iter().map(|p| p + POSITION_OFFSET).collect();
            self.backend.add_table_rows(&mut x, table, &index);
        }
        x
    }

    /// The attention half of a layer for every row of the batch; returns the KV-cache bytes
    /// read and the feed-forward half's input. The backend may split a step's sequences into
    /// groups that each run the whole half (a decode step of a small layer on several threads:
    /// a fork and join per operation would cost more than the work). Every row goes through the
    /// same kernels either way, so results do not change.
    fn attention_block(
        &self,
        li: usize,
        layer: &Layer,
        x: &mut B::Act,
        batch: &mut [BatchItem],
        positions: &[usize],
        rope: Option<&B::Rope>,
    ) -> (usize, FfnInput<B::Act>) {
        let decoding = batch.iter().all(|item| item.tokens.len() == 1);
        let weight_bytes = layer.attn.streamed_bytes();
        let groups = self
            .backend
            .sequence_groups(batch.len(), decoding, weight_bytes);
        if groups < 2 {
            return self.attention_rows(li, layer, x, batch, positions, rope, 0);
        }
        // A decode step: one row per sequence, groups of about equal size.
        let mut parts = Vec::with_capacity(groups);
        let (mut rest, mut first) = (batch, 0);
        for g in 0..groups {
            let rows = rest.len().div_ceil(groups - g);
            let (group, tail) = std::mem::take(&mut rest).split_at_mut(rows);
            let range: Vec<usize> = (first..first + rows).collect();
            parts.push((self.backend.select_rows(x, &range), group, first));
            (rest, first) = (tail, first + rows);
        }
        let done = self.backend.run_tasks(
            Tasks::SequenceGroups,
            parts,
            |p| p.1.len(),
            |(mut gx, group, first)| {
                let rows = group.len();
                let (kv, ffn) = self.attention_rows(
                    li,
                    layer,
                    &mut gx,
                    group,
                    &positions[first..first + rows],
                    rope,
                    first,
                );
                (gx, kv, ffn)
            },
        );
        let (mut xs, mut normed, mut picks, mut kv_bytes) = (vec![], vec![], None, 0);
        for (gx, kv, part) in done {
            kv_bytes += kv;
            xs.push(gx);
            normed.push(part.normed);
            if let Some(p) = part.picks {
                picks.get_or_insert_with(Vec::new).extend(p);
            }
        }
        *x = self.backend.concat_rows(xs);
        let normed = self.backend.concat_rows(normed);
        (kv_bytes, FfnInput { normed, picks })
    }

    /// [`Self::attention_block`] for rows `first_row..` of the step (their index into `rope`).
    #[allow(clippy::too_many_arguments)]
    fn attention_rows(
        &self,
        li: usize,
        layer: &Layer,
        x: &mut B::Act,
        batch: &mut [BatchItem],
        positions: &[usize],
        rope: Option<&B::Rope>,
        first_row: usize,
    ) -> (usize, FfnInput<B::Act>) {
        let cfg = &self.model.config;
        let be = &self.backend;
        let h = self.pre_norm(&layer.attn_norm, x);
        let a = &layer.attn;
        // Latent attention appends one row a token, its value the row's prefix (no `v`).
        let (q, k, v, shape) = match (&a.latent, cfg.options.mla) {
            (Some(parts), Some(m)) => {
                let [q, c] = self.latent_qc(a, parts, &h, rope, first_row);
                (q, c, None, self.latent_shape(&m, li))
            }
            _ => {
                let [q, k, v] = self.qkv(a, &h, rope, first_row);
                let shape = AttentionShape {
                    num_heads: cfg.num_heads,
                    num_kv_heads: cfg.num_kv_heads,
                    head_dim: cfg.head_dim,
                    value_dim: cfg.head_dim,
                    sliding_window: cfg.window_of(li),
                    sink_logits: a.sinks.as_deref(),
                };
                (q, k, Some(v), shape)
            }
        };
        // Append every sequence's new keys/values first, then attend over all of them at once.
        let mut start = 0;
        for item in batch.iter_mut() {
            let rows = start..start + item.tokens.len();
            let v = v.as_ref().unwrap_or(&k);
            be.append_kv(&mut item.cache.layers[li], &k, v, rows.clone(), positions);
            start = rows.end;
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
        // Policies that rank by attention take it from the kernel itself: per KV head where
        // any sequence's heads keep their own tokens (or any cache's heads do: its mask is per
        // head), else per layer.
        let wants_mass = batch.iter().any(|item| {
            item.cache
                .eviction_config()
                .is_some_and(|c| c.needs_attention())
        });
        let per_head = batch.iter().any(|item| {
            item.cache.layers[li].per_head()
                || item.cache.eviction_config().is_some_and(|c| c.per_head())
        });
        let (attn, slots_read, mass) = if per_head {
            be.attention_with_head_mass(&shape, &q, positions, &segments)
        } else if wants_mass {
            be.attention_with_mass(&shape, &q, positions, &segments)
        } else {
            let (attn, slots) = be.attention(&shape, &q, positions, &segments);
            (attn, slots, Vec::new())
        };
        drop(segments);
        if per_head {
            observe_head_mass(li, batch, positions, &mass, &shape);
        } else if wants_mass {
            observe_mass(li, batch, positions, &mass);
        }
        let attn = match &a.latent {
            Some(parts) => self.latent_output(a, parts, attn),
            None => attn,
        };
        let o = self.linear(&a.o, &attn);
        self.residual(&layer.attn_norm, x, o);
        // The feed-forward half's row-by-row start, here so that a split step runs it on
        // every thread: its norm, and for a sparse block the routing.
        let normed = self.pre_norm(&layer.ffn_norm, x);
        let picks = match &layer.ffn {
            Ffn::Moe(block) => Some(self.route(block, &normed, first_row)),
            Ffn::Gated(_) | Ffn::Plain(_) => None,
        };
        // A slot is one f32 key row and one value row (or a latent row alone).
        let kv_bytes = slots_read * cfg.kv_layout().stored_floats() * std::mem::size_of::<f32>();
        (kv_bytes, FfnInput { normed, picks })
    }

    /// The step's q, k and v rows from the normalized input `h` by q/k/v projections: q/k
    /// norms, clamps, RoPE (rows `first_row..` of `rope`) and the attention multiplier applied.
    fn qkv(
        &self,
        a: &crate::model::weights::Attention,
        h: &B::Act,
        rope: Option<&B::Rope>,
        first_row: usize,
    ) -> [B::Act; 3] {
        let cfg = &self.model.config;
        let be = &self.backend;
        let [mut q, mut k, mut v] = self.linears([&a.q, &a.k, &a.v], h);
        if let Some([q_norm, k_norm]) = &a.qk_norm {
            (q, k) = match cfg.qk_norm {
                Some(QkNorm::PerHead) => (
                    be.norm_runs(q_norm, &q, cfg.head_dim),
                    be.norm_runs(k_norm, &k, cfg.head_dim),
                ),
                _ => (be.norm(q_norm, &q), be.norm(k_norm, &k)),
            };
        }
        if let Some(clip) = cfg.clip_qkv {
            for x in [&mut q, &mut k, &mut v] {
                be.clamp(x, clip);
            }
        }
        if let Some(rope) = rope {
            match cfg.options.rotary_dim {
                Some(r) => {
                    be.apply_rope_partial(&mut q, rope, first_row, (cfg.head_dim, r));
                    be.apply_rope_partial(&mut k, rope, first_row, (cfg.head_dim, r));
                }
                None => {
                    be.apply_rope(&mut q, rope, first_row);
                    be.apply_rope(&mut k, rope, first_row);
                }
            }
        }
        if let Some(m) = cfg.options.attention_multiplier {
            // The kernel scales scores by 1/sqrt(head_dim); the model wants `m` instead.
            be.scale(&mut q, m * (cfg.head_dim as f32).sqrt());
        }
        [q, k, v]
    }

    fn ffn_block(
        &self,
        li: usize,
        layer: &Layer,
        x: &mut B::Act,
        input: FfnInput<B::Act>,
    ) -> Result<()> {
        let h = &input.normed;
        let f = match &layer.ffn {
            Ffn::Moe(block) => {
                // Routed at the end of the attention half.
                let picks = input.picks.unwrap_or_else(|| self.route(block, h, 0));
                moe::forward(self, li, block, h, x, picks)?
            }
            Ffn::Gated(mlp) => self.gated_mlp(mlp, h),
            Ffn::Plain(mlp) => self.plain_mlp(mlp, h),
        };
        self.residual(&layer.ffn_norm, x, f);
        Ok(())
    }

    /// The experts each normalized row (rows `first_row..` of the step) chooses.
    fn route(&self, block: &MoeBlock, normed: &B::Act, first_row: usize) -> Vec<Pick> {
        let cfg = &self.model.config;
        let logits = self.linear(&block.router, normed);
        if let Some(g) = &cfg.options.softmax_groups {
            // DeepSeek-V2's routing runs on the host, on every backend (one small download).
            return crate::backend::cpu::routing::route_grouped_softmax(
                &self.backend.to_host(&logits),
                cfg.num_experts,
                g,
                cfg.top_k,
                first_row,
            );
        }
        match (&cfg.options.grouped_sigmoid, &block.score_bias) {
            // Grouped sigmoid routing runs on the host, on every backend (one small download).
            (Some(g), Some(bias)) => crate::backend::cpu::routing::route_grouped_sigmoid(
                &self.backend.to_host(&logits),
                bias,
                g,
                (cfg.top_k, cfg.norm_topk_prob),
                first_row,
            ),
            _ => self
                .backend
                .route(&logits, cfg.top_k, cfg.norm_topk_prob, first_row),
        }
    }

    /// Pre-norm blocks normalize their input; post-norm blocks (OPT-350m) take it as is.
    pub(crate) fn pre_norm(&self, norm: &Norm, x: &B::Act) -> B::Act {
        if self.model.config.pre_norm {
            self.backend.norm(norm, x)
        } else {
            let all: Vec<usize> = (0..self.backend.rows(x)).collect();
            self.backend.select_rows(x, &all)
        }
    }

    /// `x += y` (`y` scaled by Granite's residual multiplier), then normalize for post-norm
    /// blocks.
    fn residual(&self, norm: &Norm, x: &mut B::Act, mut y: B::Act) {
        if let Some(m) = self.model.config.options.residual_multiplier {
            self.backend.scale(&mut y, m);
        }
        self.backend.add(x, &y);
        if !self.model.config.pre_norm {
            *x = self.backend.norm(norm, x);
        }
    }

    pub(crate) fn observe(&self, lin: &Linear, x: &B::Act) {
        if let Some(obs) = &self.observer {
            obs.observe(lin, &self.backend.to_host(x), self.backend.rows(x));
        }
    }

    pub(crate) fn linear(&self, lin: &Linear, x: &B::Act) -> B::Act {
        self.observe(lin, x);
        self.backend.linear(lin, x)
    }

    /// Several linear layers of the same input (the backend may run them side by side).
    fn linears<const N: usize>(&self, lins: [&Linear; N], x: &B::Act) -> [B::Act; N] {
        lins.iter().for_each(|l| self.observe(l, x));
        self.backend.linears(lins, x)
    }

    pub(crate) fn gated_mlp(&self, mlp: &GatedMlp, x: &B::Act) -> B::Act {
        if self.observer.is_none() {
            return gated_mlp_on(&self.backend, &self.model.config, mlp, x);
        }
        let [mut g, u] = self.linears([&mlp.gate, &mlp.up], x);
        gate_activation(&self.backend, &self.model.config, &mut g, &u);
        if let Some(block) = self.model.config.ffn_hadamard_block {
            self.backend.rotate_rows(&mut g, block);
        }
        self.linear(&mlp.down, &g)
    }

    fn plain_mlp(&self, mlp: &PlainMlp, x: &B::Act) -> B::Act {
        let mut a = self.linear(&mlp.fc1, x);
        self.backend.activate(self.model.config.activation, &mut a);
        self.linear(&mlp.fc2, &a)
    }
}

/// `down(act(gate·x) ⊙ up·x)` on backend `be`: the engine's gated MLP without its observer, so
/// an expert computes the same on whichever backend runs it.
pub(crate) fn gated_mlp_on<X: Backend>(
    be: &X,
    cfg: &crate::model::config::ModelConfig,
    mlp: &GatedMlp,
    x: &X::Act,
) -> X::Act {
    let [mut g, u] = be.linears([&mlp.gate, &mlp.up], x);
    gate_activation(be, cfg, &mut g, &u);
    if let Some(block) = cfg.ffn_hadamard_block {
        be.rotate_rows(&mut g, block);
    }
    be.linear(&mlp.down, &g)
}

/// A gated MLP's middle: `act(gate) ⊙ up`, or GPT-OSS's clamped SwiGLU where the model has it.
fn gate_activation<X: Backend>(
    be: &X,
    cfg: &crate::model::config::ModelConfig,
    gate: &mut X::Act,
    up: &X::Act,
) {
    match cfg.options.clamped_swiglu {
        Some(s) => be.clamped_swiglu(gate, up, s),
        None => be.gated_activation(cfg.activation, gate, up),
    }
}

/// Hands every evicting sequence's rows of `mass` (laid out as
/// [`Backend::attention_with_mass`] returns it) to its layer-`li` statistics.
fn observe_mass(li: usize, batch: &mut [BatchItem], positions: &[usize], mass: &[f32]) {
    let (mut row, mut at) = (0, 0);
    for item in batch.iter_mut() {
        let n = item.cache.layers[li].len();
        let rows = item.tokens.len();
        let (layers, eviction) = item.cache.parts_mut();
        if let Some(e) = eviction.filter(|e| e.config.needs_attention()) {
            let threshold = e.config.threshold;
            for r in 0..rows {
                let m = &mass[at + r * n..at + (r + 1) * n];
                e.stats[li].observe(layers[li].positions(), positions[row + r], m, threshold);
            }
        }
        row += rows;
        at += rows * n;
    }
}

/// [`observe_mass`] for mass laid out per KV head ([`Backend::attention_with_head_mass`]):
/// a sequence whose heads keep their own tokens gives each head's statistics that head's mass
/// (its group's sum over the group's size, so a head's row sums to 1); one that evicts per
/// layer gets the mean over all query heads, summed as the CPU's layer kernel sums it.
fn observe_head_mass(
    li: usize,
    batch: &mut [BatchItem],
    positions: &[usize],
    mass: &[f32],
    shape: &AttentionShape,
) {
    let kv_heads = shape.num_kv_heads;
    let group = (shape.num_heads / kv_heads) as f32;
    let scale = 1.0 / shape.num_heads as f32;
    let (mut row, mut at) = (0, 0);
    for item in batch.iter_mut() {
        let n = item.cache.layers[li].len();
        let rows = item.tokens.len();
        let (layers, eviction) = item.cache.parts_mut();
        if let Some(e) = eviction.filter(|e| e.config.needs_attention()) {
            let threshold = e.config.threshold;
            let per_head = e.heads > 1;
            let stats = e.layer_stats_mut(li);
            for r in 0..rows {
                let m = &mass[at + r * kv_heads * n..at + (r + 1) * kv_heads * n];
                let query = positions[row + r];
                if per_head {
                    for (h, st) in stats.iter_mut().enumerate() {
                        let own: Vec<f32> =
                            m[h * n..(h + 1) * n].iter().map(|x| x / group).collect();
                        st.observe(layers[li].head_positions(h), query, &own, threshold);
                    }
                } else {
                    let layer: Vec<f32> = (0..n)
                        .map(|s| (0..kv_heads).map(|k| m[k * n + s]).sum::<f32>() * scale)
                        .collect();
                    stats[0].observe(layers[li].positions(), query, &layer, threshold);
                }
            }
        }
        row += rows;
        at += rows * kv_heads * n;
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
