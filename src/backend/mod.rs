//! What executes the ops. The engine writes the forward pass once against [`Backend`]; a
//! backend holds the activations (host memory for `cpu`, device memory for a GPU backend) and
//! runs every op on them, so the engine never touches a backend's buffers. `cpu` is the
//! reference and the first-class path.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod health;
pub mod select;

pub use select::{engine_for, prepare_model, BackendChoice};

/// The backend that runs experts on the host CPU beside a device backend (the expert tier's
/// cold experts).
pub type HostBackend = cpu::CpuBackend;

/// The backend an [`crate::Engine`] runs on unless it is given another.
#[cfg(not(feature = "cuda"))]
pub type DefaultBackend = cpu::CpuBackend;
/// The backend an [`crate::Engine`] runs on unless it is given another: the CPU or the GPU,
/// chosen at run time (`select::engine_for`).
#[cfg(feature = "cuda")]
pub type DefaultBackend = select::Selected;

use crate::error::Result;
pub use crate::kv::{AttentionShape, Segment};
use crate::kv::{EvictionConfig, KvLayout, KvStorage, LayerCache, SlotStats};
use crate::model::config::{Activation, ClampedSwiglu};
use crate::model::weights::{GatedMlp, Linear, Norm, Weights};
use std::borrow::Cow;
use std::task::Poll;
use std::time::Duration;

/// One token's pick of one expert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    pub expert: usize,
    /// The token's row in the step.
    pub row: usize,
    pub weight: f32,
}

/// What a group of independent tasks handed to [`Backend::run_tasks`] is, so the backend can
/// choose how to schedule it.
#[derive(Debug, Clone, Copy)]
pub enum Tasks {
    /// Each task runs a few matrices of this many weights each (experts).
    Matrices { weights: usize },
    /// Each task runs a whole block for its own group of sequences.
    SequenceGroups,
}

/// Expert work whose time the expert tier's cost model learns from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertWork {
    /// An expert's weights copied into a device slot ([`Backend::admit_expert`]).
    Copy,
    /// An expert run on the backend's activations.
    Run,
}

/// The device time of work a backend queued without waiting for it (events around it, on
/// CUDA): known once the work has completed, and asked for without waiting.
pub trait DeviceTiming: Send {
    /// `Ready(Some(t))` once the work has completed, `Pending` while it runs, `Ready(None)`
    /// when it can no longer be measured (a device error).
    fn poll(&self) -> Poll<Option<Duration>>;
}

/// [`Backend::apply_rope_partial`]'s default on `be`: the rotated parts of every head gathered
/// through the host into a matrix of their own, turned by [`Backend::apply_rope`], put back.
pub(crate) fn rope_partial_through_host<B: Backend + ?Sized>(
    be: &B,
    x: &mut B::Act,
    rope: &B::Rope,
    first_row: usize,
    (head_dim, rotary): (usize, usize),
) {
    let rows = be.rows(x);
    let mut host = be.to_host(x).into_owned();
    let cols = host.len() / rows.max(1);
    let parts: Vec<f32> = host
        .chunks_exact(head_dim)
        .flat_map(|head| head[..rotary].iter().copied())
        .collect();
    let mut parts = be.upload_rows(parts, cols / head_dim * rotary);
    be.apply_rope(&mut parts, rope, first_row);
    let turned = be.to_host(&parts);
    for (head, part) in host
        .chunks_exact_mut(head_dim)
        .zip(turned.chunks_exact(rotary))
    {
        head[..rotary].copy_from_slice(part);
    }
    *x = be.upload_rows(host, cols);
}

/// Executes the ops of the forward pass. `Act` is a `rows × cols` matrix of f32 activations
/// the backend owns.
pub trait Backend: Send + Sync {
    type Act: Send + Sync;
    /// Rotation angles for the rows of one step.
    type Rope: Send + Sync;

    /// Names the backend in reports (`cpu`).
    fn name(&self) -> &'static str;
    /// Threads (or streams) the backend runs on.
    fn threads(&self) -> usize;
    /// Why this backend cannot run experts that a paging service hands out (fresh host
    /// buffers per admission, at addresses that get reused), or `None` when it can.
    fn paged_experts_unsupported(&self) -> Option<&'static str> {
        None
    }
    /// Runs one forward step in the backend's execution context.
    fn run<R: Send>(&self, step: impl FnOnce() -> R + Send) -> R;

    /// Rearranges `weights` into the layouts this backend's kernels read (the CPU packs f32
    /// matrices into panels), before the model is shared. Called once, when an engine takes a
    /// model no one else holds yet; a backend must also run weights it did not prepare.
    fn prepare_weights(&self, _weights: &mut Weights) {}
    /// A `rows × cols` activation matrix of `data` (row-major host values).
    fn upload_rows(&self, data: Vec<f32>, cols: usize) -> Self::Act;
    /// Makes a routed expert's weights resident in a slot of this backend's fast memory (the
    /// expert tier's fetch); returns the bytes copied. A backend that reads host memory
    /// directly has nothing to copy.
    fn admit_expert(&self, _mlp: &GatedMlp) -> Result<usize> {
        Ok(0)
    }
    /// Gives back the slot of an expert admitted with [`Self::admit_expert`] (also after a
    /// failed admission, whatever part of it was made).
    fn release_expert(&self, _mlp: &GatedMlp) {}
    /// Runs `queue`, which queues expert `work` on this backend, and returns its result with a
    /// handle to the work's device time where the backend only queued it (the host's wall
    /// clock around `queue` would measure the queueing, not the work). `None`: the work ran
    /// before `queue` returned, so the caller's wall clock measures it.
    fn timed<R>(
        &self,
        _work: ExpertWork,
        queue: impl FnOnce() -> R,
    ) -> (R, Option<Box<dyn DeviceTiming>>) {
        (queue(), None)
    }
    /// Rows of an activation matrix.
    fn rows(&self, x: &Self::Act) -> usize;
    /// The values, row-major (borrowed where the activations live on the host).
    fn to_host<'a>(&self, x: &'a Self::Act) -> Cow<'a, [f32]>;
    /// Rows `rows` of `x`, in that order.
    fn select_rows(&self, x: &Self::Act, rows: &[usize]) -> Self::Act;
    /// The rows of `parts`, one after another.
    fn concat_rows(&self, parts: Vec<Self::Act>) -> Self::Act;

    /// The embedding rows of `tokens` (any stored form of the table).
    fn embed(&self, table: &Linear, tokens: &[u32]) -> Self::Act;
    /// `x[r] += table[index[r]]` for every row (learned absolute positions).
    fn add_table_rows(&self, x: &mut Self::Act, table: &[f32], index: &[usize]);
    fn norm(&self, norm: &Norm, x: &Self::Act) -> Self::Act;
    /// [`Self::norm`] of every run of `dim` values of every row, `norm` being `dim` wide (a
    /// per-head norm: Qwen3-MoE's q/k norms). This default goes through the host: the values
    /// downloaded, normalized as a `rows·cols/dim × dim` matrix, and put back.
    fn norm_runs(&self, norm: &Norm, x: &Self::Act, dim: usize) -> Self::Act {
        let host = self.to_host(x);
        let cols = host.len() / self.rows(x).max(1);
        let runs = self.upload_rows(host.into_owned(), dim);
        let normed = self.norm(norm, &runs);
        let data = self.to_host(&normed).into_owned();
        self.upload_rows(data, cols)
    }
    /// Clamps every value of `x` to `[-limit, limit]` (OLMoE's clip_qkv). This default goes
    /// through the host (CUDA runs it so: a small download and upload per projection).
    fn clamp(&self, x: &mut Self::Act, limit: f32) {
        let rows = self.rows(x);
        let host = self.to_host(x);
        let data: Vec<f32> = host.iter().map(|v| v.clamp(-limit, limit)).collect();
        let cols = data.len() / rows.max(1);
        *x = self.upload_rows(data, cols);
    }
    /// Multiplies every value of `x` by `factor` (Granite's embedding, attention and residual
    /// multipliers). This default goes through the host (CUDA runs it so).
    fn scale(&self, x: &mut Self::Act, factor: f32) {
        let rows = self.rows(x);
        let host = self.to_host(x);
        let data: Vec<f32> = host.iter().map(|v| v * factor).collect();
        let cols = data.len() / rows.max(1);
        *x = self.upload_rows(data, cols);
    }
    /// GPT-OSS's expert activation in place of [`Self::gated_activation`]: `gate` clamped to
    /// at most `limit`, `up` to `[-limit, limit]`, then `gate ← (up + 1) · gate ·
    /// sigmoid(alpha · gate)`. This default goes through the host (CUDA runs it so).
    fn clamped_swiglu(&self, gate: &mut Self::Act, up: &Self::Act, swiglu: ClampedSwiglu) {
        let rows = self.rows(gate);
        let mut data = self.to_host(gate).into_owned();
        cpu::ops::clamped_swiglu(swiglu, &mut data, &self.to_host(up));
        let cols = data.len() / rows.max(1);
        *gate = self.upload_rows(data, cols);
    }
    /// `x·Wᵀ + b` for any stored form of the weights.
    fn linear(&self, lin: &Linear, x: &Self::Act) -> Self::Act;
    /// Several linears of the same input; the backend may run them side by side.
    fn linears<const N: usize>(&self, lins: [&Linear; N], x: &Self::Act) -> [Self::Act; N] {
        lins.map(|l| self.linear(l, x))
    }
    fn rope_table(&self, head_dim: usize, theta: f32, positions: &[usize]) -> Self::Rope;
    /// [`Self::rope_table`] from the inverse frequencies themselves (`head_dim / 2` of them),
    /// cos and sin multiplied by `scale` (YaRN's attention factor).
    fn rope_table_freqs(&self, inv_freq: &[f32], scale: f32, positions: &[usize]) -> Self::Rope;
    /// Rotates every head of row `r` of `x` by row `first_row + r` of `rope`.
    fn apply_rope(&self, x: &mut Self::Act, rope: &Self::Rope, first_row: usize);
    /// [`Self::apply_rope`] on the first `rotary` values of every `head_dim`-wide head of `x`,
    /// the rest passing through (GLM-4-MoE's partial rotary; `rope` is `rotary` wide). This
    /// default gathers the rotated parts into a matrix of their own through the host, rotates
    /// it with [`Self::apply_rope`] and puts them back (CUDA runs it so).
    fn apply_rope_partial(
        &self,
        x: &mut Self::Act,
        rope: &Self::Rope,
        first_row: usize,
        dims: (usize, usize),
    ) {
        rope_partial_through_host(self, x, rope, first_row, dims)
    }
    /// An empty K/V storage in this backend's format, slots laid out as `layout`: what a new
    /// cache's layers start with, so the room reserved for them is this backend's memory.
    fn new_kv(&self, layout: KvLayout) -> Box<dyn KvStorage>;
    /// Appends rows `rows` of `k` and `v` (one sequence's new tokens, at `positions`) to its
    /// cache, in the backend's own storage (a layer without one, or with another backend's,
    /// gets it first, holding the same slots; a layer without one gets separate keys and
    /// values). Where the storage's layout reads values from the keys, `v` is not read.
    fn append_kv(
        &self,
        cache: &mut LayerCache,
        k: &Self::Act,
        v: &Self::Act,
        rows: std::ops::Range<usize>,
        positions: &[usize],
    );
    /// Causal attention of query rows at `positions` over their segments' caches; returns the
    /// output and how many cache slots were read.
    fn attention(
        &self,
        shape: &AttentionShape,
        q: &Self::Act,
        positions: &[usize],
        segments: &[Segment],
    ) -> (Self::Act, usize);
    /// [`Self::attention`], and also the attention mass each slot of a row's segment cache
    /// received from it: per row, `cache.len()` values (mean over the query heads, so a row sums
    /// to 1), rows one after another. A backend emits it from its attention kernel; this
    /// default recomputes it with the plain reference (a second pass over the scores).
    fn attention_with_mass(
        &self,
        shape: &AttentionShape,
        q: &Self::Act,
        positions: &[usize],
        segments: &[Segment],
    ) -> (Self::Act, usize, Vec<f32>) {
        let (out, slots) = self.attention(shape, q, positions, segments);
        let mass = crate::kv::mass::reference_mass(shape, &self.to_host(q), positions, segments)
            .unwrap_or_else(|e| panic!("edgemoe: reading the KV cache back failed: {e}"));
        (out, slots, mass)
    }
    /// [`Self::attention`], and also per row and KV head the mass each slot of that head
    /// received: the softmax weights of the head's group of query heads summed, `num_kv_heads
    /// × cache.len()` values a row (head-major), rows one after another; the attention of a
    /// layer whose KV heads keep their own tokens (each head's own positions mask its slots).
    /// This default recomputes the mass with the plain reference.
    fn attention_with_head_mass(
        &self,
        shape: &AttentionShape,
        q: &Self::Act,
        positions: &[usize],
        segments: &[Segment],
    ) -> (Self::Act, usize, Vec<f32>) {
        let (out, slots) = self.attention(shape, q, positions, segments);
        let mass =
            crate::kv::mass::reference_head_mass(shape, &self.to_host(q), positions, segments)
                .unwrap_or_else(|e| panic!("edgemoe: reading the KV cache back failed: {e}"));
        (out, slots, mass)
    }
    /// Whether this backend runs caches whose KV heads keep their own tokens
    /// ([`crate::kv::Granularity::Head`]): its attention masks each KV head by that head's
    /// positions, and its storage compacts per head. The engine refuses the option otherwise.
    fn evicts_per_head(&self) -> bool {
        false
    }
    /// Per-KV-head eviction of one layer at step `now`: each head keeps the slots
    /// `kv::evict::kept_slots_reference` keeps of its own positions and statistics
    /// (`stats[h]`), compacted per head. This default is the plain reference.
    fn evict_heads(
        &self,
        config: &EvictionConfig,
        cache: &mut LayerCache,
        stats: &mut [SlotStats],
        now: usize,
    ) -> Result<()> {
        crate::kv::evict::evict_heads(
            config,
            cache,
            stats,
            now,
            crate::kv::evict::kept_slots_reference,
        )
    }
    /// One layer's eviction at step `now` (the next token's position): keeps the slots
    /// `kv::evict::kept_slots_reference` keeps — exactly that set — compacted to the
    /// front in order, with their statistics; a failure (a device's) leaves the layer as it
    /// was. This default is the plain reference.
    fn evict(
        &self,
        config: &EvictionConfig,
        cache: &mut LayerCache,
        stats: &mut SlotStats,
        now: usize,
    ) -> Result<()> {
        let kept = crate::kv::evict::kept_slots_reference(config, cache.positions(), stats, now);
        crate::kv::evict::compact(cache, stats, &kept)
    }
    /// `act(x)` in place.
    fn activate(&self, act: Activation, x: &mut Self::Act);
    /// `gate = act(gate) ⊙ up`.
    fn gated_activation(&self, act: Activation, gate: &mut Self::Act, up: &Self::Act);
    /// `x += y`.
    fn add(&self, x: &mut Self::Act, y: &Self::Act);
    /// A rotated model's down-projection input: `(C_m ⊗ H_b)` on every row, the Walsh–Hadamard
    /// transform on runs of `block` values, then the runs mixed by the orthonormal DCT-II
    /// (`backend::cpu::ops::rotate_rows` is the reference).
    fn rotate_rows(&self, x: &mut Self::Act, block: usize);
    /// Every row's top-k experts from its router logits (softmax, then top-k, optionally
    /// renormalized); rows numbered from `first_row`.
    fn route(
        &self,
        logits: &Self::Act,
        top_k: usize,
        renormalize: bool,
        first_row: usize,
    ) -> Vec<Pick>;
    /// `out[p.row] += p.weight · y[i]` for the `i`-th pick.
    fn mix_rows(&self, out: &mut Self::Act, y: &Self::Act, picks: &[Pick]);
    /// `out[r] += sigmoid(gate[r]) · y[r]` (a one-column `gate`).
    fn add_gated(&self, out: &mut Self::Act, y: &Self::Act, gate: &Self::Act);
    /// A `rows × cols` matrix of zeros.
    fn zeros(&self, rows: usize, cols: usize) -> Self::Act;

    /// Runs independent tasks and returns their results in task order; the backend chooses
    /// whether they run side by side or one after another (`cost` ranks them).
    fn run_tasks<T: Send, R: Send>(
        &self,
        kind: Tasks,
        tasks: Vec<T>,
        cost: impl Fn(&T) -> usize,
        task: impl Fn(T) -> R + Sync,
    ) -> Vec<R>;
    /// Into how many groups a step's sequences split for the attention half (1: none).
    fn sequence_groups(&self, sequences: usize, decoding: bool, layer_weight_bytes: usize)
        -> usize;
}

#[cfg(test)]
mod tests {
    use super::cpu::CpuBackend;
    use super::*;

    /// The default partial rotary (what CUDA runs) against the CPU's in-place one: the same
    /// values, the unrotated tail of each head untouched, rows offset by `first_row`.
    #[test]
    fn partial_rope_through_the_host_matches_the_cpu() {
        let be = CpuBackend::new(1).unwrap();
        let (heads, head_dim, rotary, rows) = (3, 12, 4, 5);
        let data: Vec<f32> = (0..rows * heads * head_dim)
            .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.1)
            .collect();
        let rope = be.rope_table(rotary, 10000.0, &[3, 4, 5, 6, 7, 8, 9]);
        let mut cpu = be.upload_rows(data.clone(), heads * head_dim);
        be.apply_rope_partial(&mut cpu, &rope, 2, (head_dim, rotary));
        let mut host = be.upload_rows(data.clone(), heads * head_dim);
        rope_partial_through_host(&be, &mut host, &rope, 2, (head_dim, rotary));
        let (cpu, host) = (be.to_host(&cpu), be.to_host(&host));
        assert_eq!(cpu, host);
        for (i, (c, d)) in cpu.iter().zip(&data).enumerate() {
            let turned = i % head_dim < rotary;
            assert_eq!(c == d, !turned, "value {i}: {c} from {d}");
        }
    }
}
