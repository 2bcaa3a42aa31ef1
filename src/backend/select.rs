//! Choosing the backend at run time (`--backend cpu|cuda|auto`). Without the `cuda` feature
//! only the CPU exists. With it, `Selected` is either backend behind one type, so the
//! engine, the CLI, serve and bench stay written once; `auto` takes the GPU when a device
//! exists and otherwise runs on the CPU after one line saying why.

#[cfg(not(feature = "cuda"))]
use crate::error::Error;
use crate::error::Result;
use crate::model::Model;
use std::sync::Arc;

/// What `--backend` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendChoice {
    /// The GPU when this build has CUDA and a device exists, else the CPU.
    #[default]
    Auto,
    /// The CPU (f32, bf16 and int8 kernels for AVX-512 VNNI, AVX2 or plain Rust).
    Cpu,
    /// The GPU (needs the `cuda` feature and a device).
    Cuda,
}

/// Prepares `model`'s weights for the backend `choice` picks (the CPU's f32 panels; the GPU
/// uploads from any form) before several engines share the model: an engine prepares a model
/// only when it holds the sole reference. `Auto` prepares for the CPU, which every build has.
pub fn prepare_model(model: &mut Model, choice: BackendChoice) {
    if choice != BackendChoice::Cuda {
        super::cpu::prepare::prepare_weights(&mut model.weights);
    }
}

/// An engine on the backend `choice` names, with `threads` CPU workers (0: one per core).
pub fn engine_for(
    model: Arc<Model>,
    choice: BackendChoice,
    threads: usize,
) -> Result<crate::Engine> {
    #[cfg(not(feature = "cuda"))]
    {
        if choice == BackendChoice::Cuda {
            return Err(Error::invalid(
                "--backend cuda: this edgemoe was built without the `cuda` feature",
            ));
        }
        crate::Engine::new(model, threads)
    }
    #[cfg(feature = "cuda")]
    {
        let backend = match choice {
            BackendChoice::Cpu => Selected::Cpu(super::cpu::CpuBackend::new(threads)?),
            BackendChoice::Cuda => Selected::Cuda(super::cuda::CudaBackend::new(&model)?),
            BackendChoice::Auto => match super::cuda::CudaBackend::new(&model) {
                Ok(b) => Selected::Cuda(b),
                Err(e) => {
                    eprintln!("edgemoe: no usable GPU ({e}); running on the CPU");
                    Selected::Cpu(super::cpu::CpuBackend::new(threads)?)
                }
            },
        };
        Ok(crate::Engine::with_backend(model, backend))
    }
}

#[cfg(feature = "cuda")]
pub use dispatch::{Selected, SelectedAct, SelectedRope};

#[cfg(feature = "cuda")]
mod dispatch {
    use crate::backend::cpu::{CpuBackend, Rows};
    use crate::backend::cuda::{backend::DeviceRope, CudaBackend, DeviceRows};
    use crate::backend::{AttentionShape, Backend, DeviceTiming, ExpertWork, Pick, Segment, Tasks};
    use crate::error::Result;
    use crate::kv::{EvictionConfig, KvLayout, KvStorage, LayerCache, SlotStats};
    use crate::model::config::{Activation, ClampedSwiglu};
    use crate::model::weights::{GatedMlp, Linear, Norm};
    use std::borrow::Cow;

    // The CUDA variant is much larger than the CPU one; there is one backend per engine.
    #[allow(clippy::large_enum_variant)]
    pub enum Selected {
        Cpu(CpuBackend),
        Cuda(CudaBackend),
    }

    pub enum SelectedAct {
        Cpu(Rows),
        Cuda(DeviceRows),
    }

    pub enum SelectedRope {
        Cpu(crate::backend::cpu::ops::RopeTable),
        Cuda(DeviceRope),
    }

    impl Selected {
        /// The CPU backend on `threads` workers (what `Engine::new` builds).
        pub fn new(threads: usize) -> crate::Result<Selected> {
            Ok(Selected::Cpu(CpuBackend::new(threads)?))
        }
    }

    /// An activation made by the other backend: a bug in the engine, never input.
    fn mixed() -> ! {
        unreachable!("activations of one backend passed to the other")
    }

    macro_rules! cpu_act {
        ($x:expr) => {
            match $x {
                SelectedAct::Cpu(x) => x,
                SelectedAct::Cuda(_) => mixed(),
            }
        };
    }
    macro_rules! gpu_act {
        ($x:expr) => {
            match $x {
                SelectedAct::Cuda(x) => x,
                SelectedAct::Cpu(_) => mixed(),
            }
        };
    }

    impl Backend for Selected {
        type Act = SelectedAct;
        type Rope = SelectedRope;

        fn name(&self) -> &'static str {
            match self {
                Selected::Cpu(b) => b.name(),
                Selected::Cuda(b) => b.name(),
            }
        }

        fn threads(&self) -> usize {
            match self {
                Selected::Cpu(b) => b.threads(),
                Selected::Cuda(b) => b.threads(),
            }
        }

        fn prepare_weights(&self, weights: &mut crate::model::weights::Weights) {
            match self {
                Selected::Cpu(b) => b.prepare_weights(weights),
                Selected::Cuda(b) => b.prepare_weights(weights),
            }
        }

        fn upload_rows(&self, data: Vec<f32>, cols: usize) -> SelectedAct {
            match self {
                Selected::Cpu(b) => SelectedAct::Cpu(b.upload_rows(data, cols)),
                Selected::Cuda(b) => SelectedAct::Cuda(b.upload_rows(data, cols)),
            }
        }

        fn admit_expert(&self, mlp: &GatedMlp) -> crate::error::Result<usize> {
            match self {
                Selected::Cpu(b) => b.admit_expert(mlp),
                Selected::Cuda(b) => b.admit_expert(mlp),
            }
        }

        fn release_expert(&self, mlp: &GatedMlp) {
            match self {
                Selected::Cpu(b) => b.release_expert(mlp),
                Selected::Cuda(b) => b.release_expert(mlp),
            }
        }

        fn timed<R>(
            &self,
            work: ExpertWork,
            queue: impl FnOnce() -> R,
        ) -> (R, Option<Box<dyn DeviceTiming>>) {
            match self {
                Selected::Cpu(b) => b.timed(work, queue),
                Selected::Cuda(b) => b.timed(work, queue),
            }
        }

        fn paged_experts_unsupported(&self) -> Option<&'static str> {
            match self {
                Selected::Cpu(b) => b.paged_experts_unsupported(),
                Selected::Cuda(b) => b.paged_experts_unsupported(),
            }
        }

        fn run<R: Send>(&self, step: impl FnOnce() -> R + Send) -> R {
            match self {
                Selected::Cpu(b) => b.run(step),
                Selected::Cuda(b) => b.run(step),
            }
        }

        fn rows(&self, x: &SelectedAct) -> usize {
            match x {
                SelectedAct::Cpu(x) => x.rows(),
                SelectedAct::Cuda(x) => x.rows,
            }
        }

        fn to_host<'a>(&self, x: &'a SelectedAct) -> Cow<'a, [f32]> {
            match self {
                Selected::Cpu(b) => b.to_host(cpu_act!(x)),
                Selected::Cuda(b) => b.to_host(gpu_act!(x)),
            }
        }

        fn select_rows(&self, x: &SelectedAct, rows: &[usize]) -> SelectedAct {
            match self {
                Selected::Cpu(b) => SelectedAct::Cpu(b.select_rows(cpu_act!(x), rows)),
                Selected::Cuda(b) => SelectedAct::Cuda(b.select_rows(gpu_act!(x), rows)),
            }
        }

        fn concat_rows(&self, parts: Vec<SelectedAct>) -> SelectedAct {
            match self {
                Selected::Cpu(b) => SelectedAct::Cpu(
                    b.concat_rows(parts.into_iter().map(|p| cpu_act!(p)).collect()),
                ),
                Selected::Cuda(b) => SelectedAct::Cuda(
                    b.concat_rows(parts.into_iter().map(|p| gpu_act!(p)).collect()),
                ),
            }
        }

        fn embed(&self, table: &Linear, tokens: &[u32]) -> SelectedAct {
            match self {
                Selected::Cpu(b) => SelectedAct::Cpu(b.embed(table, tokens)),
                Selected::Cuda(b) => SelectedAct::Cuda(b.embed(table, tokens)),
            }
        }

        fn add_table_rows(&self, x: &mut SelectedAct, table: &[f32], index: &[usize]) {
            match self {
                Selected::Cpu(b) => b.add_table_rows(cpu_act!(x), table, index),
                Selected::Cuda(b) => b.add_table_rows(gpu_act!(x), table, index),
            }
        }

        fn norm(&self, norm: &Norm, x: &SelectedAct) -> SelectedAct {
            match self {
                Selected::Cpu(b) => SelectedAct::Cpu(b.norm(norm, cpu_act!(x))),
                Selected::Cuda(b) => SelectedAct::Cuda(b.norm(norm, gpu_act!(x))),
            }
        }

        fn norm_runs(&self, norm: &Norm, x: &SelectedAct, dim: usize) -> SelectedAct {
            match self {
                Selected::Cpu(b) => SelectedAct::Cpu(b.norm_runs(norm, cpu_act!(x), dim)),
                Selected::Cuda(b) => SelectedAct::Cuda(b.norm_runs(norm, gpu_act!(x), dim)),
            }
        }

        fn clamp(&self, x: &mut SelectedAct, limit: f32) {
            match self {
                Selected::Cpu(b) => b.clamp(cpu_act!(x), limit),
                Selected::Cuda(b) => b.clamp(gpu_act!(x), limit),
            }
        }

        fn apply_rope_partial(
            &self,
            x: &mut SelectedAct,
            rope: &SelectedRope,
            first_row: usize,
            dims: (usize, usize),
        ) {
            match (self, rope) {
                (Selected::Cpu(b), SelectedRope::Cpu(r)) => {
                    b.apply_rope_partial(cpu_act!(x), r, first_row, dims)
                }
                (Selected::Cuda(b), SelectedRope::Cuda(r)) => {
                    b.apply_rope_partial(gpu_act!(x), r, first_row, dims)
                }
                _ => mixed(),
            }
        }

        fn scale(&self, x: &mut SelectedAct, factor: f32) {
            match self {
                Selected::Cpu(b) => b.scale(cpu_act!(x), factor),
                Selected::Cuda(b) => b.scale(gpu_act!(x), factor),
            }
        }

        fn linear(&self, lin: &Linear, x: &SelectedAct) -> SelectedAct {
            match self {
                Selected::Cpu(b) => SelectedAct::Cpu(b.linear(lin, cpu_act!(x))),
                Selected::Cuda(b) => SelectedAct::Cuda(b.linear(lin, gpu_act!(x))),
            }
        }

        fn linears<const N: usize>(&self, lins: [&Linear; N], x: &SelectedAct) -> [SelectedAct; N] {
            match self {
                Selected::Cpu(b) => b.linears(lins, cpu_act!(x)).map(SelectedAct::Cpu),
                Selected::Cuda(b) => b.linears(lins, gpu_act!(x)).map(SelectedAct::Cuda),
            }
        }

        fn rope_table(&self, head_dim: usize, theta: f32, positions: &[usize]) -> SelectedRope {
            match self {
                Selected::Cpu(b) => SelectedRope::Cpu(b.rope_table(head_dim, theta, positions)),
                Selected::Cuda(b) => SelectedRope::Cuda(b.rope_table(head_dim, theta, positions)),
            }
        }

        fn rope_table_freqs(
            &self,
            inv_freq: &[f32],
            scale: f32,
            positions: &[usize],
        ) -> SelectedRope {
            match self {
                Selected::Cpu(b) => {
                    SelectedRope::Cpu(b.rope_table_freqs(inv_freq, scale, positions))
                }
                Selected::Cuda(b) => {
                    SelectedRope::Cuda(b.rope_table_freqs(inv_freq, scale, positions))
                }
            }
        }

        fn apply_rope(&self, x: &mut SelectedAct, rope: &SelectedRope, first_row: usize) {
            match (self, rope) {
                (Selected::Cpu(b), SelectedRope::Cpu(r)) => b.apply_rope(cpu_act!(x), r, first_row),
                (Selected::Cuda(b), SelectedRope::Cuda(r)) => {
                    b.apply_rope(gpu_act!(x), r, first_row)
                }
                _ => mixed(),
            }
        }

        fn new_kv(&self, layout: KvLayout) -> Box<dyn KvStorage> {
            match self {
                Selected::Cpu(b) => b.new_kv(layout),
                Selected::Cuda(b) => b.new_kv(layout),
            }
        }

        fn append_kv(
            &self,
            cache: &mut LayerCache,
            k: &SelectedAct,
            v: &SelectedAct,
            rows: std::ops::Range<usize>,
            positions: &[usize],
        ) {
            match self {
                Selected::Cpu(b) => b.append_kv(cache, cpu_act!(k), cpu_act!(v), rows, positions),
                Selected::Cuda(b) => b.append_kv(cache, gpu_act!(k), gpu_act!(v), rows, positions),
            }
        }

        fn attention(
            &self,
            shape: &AttentionShape,
            q: &SelectedAct,
            positions: &[usize],
            segments: &[Segment],
        ) -> (SelectedAct, usize) {
            match self {
                Selected::Cpu(b) => {
                    let (o, n) = b.attention(shape, cpu_act!(q), positions, segments);
                    (SelectedAct::Cpu(o), n)
                }
                Selected::Cuda(b) => {
                    let (o, n) = b.attention(shape, gpu_act!(q), positions, segments);
                    (SelectedAct::Cuda(o), n)
                }
            }
        }

        fn attention_with_mass(
            &self,
            shape: &AttentionShape,
            q: &SelectedAct,
            positions: &[usize],
            segments: &[Segment],
        ) -> (SelectedAct, usize, Vec<f32>) {
            match self {
                Selected::Cpu(b) => {
                    let (o, n, m) = b.attention_with_mass(shape, cpu_act!(q), positions, segments);
                    (SelectedAct::Cpu(o), n, m)
                }
                Selected::Cuda(b) => {
                    let (o, n, m) = b.attention_with_mass(shape, gpu_act!(q), positions, segments);
                    (SelectedAct::Cuda(o), n, m)
                }
            }
        }

        fn attention_with_head_mass(
            &self,
            shape: &AttentionShape,
            q: &SelectedAct,
            positions: &[usize],
            segments: &[Segment],
        ) -> (SelectedAct, usize, Vec<f32>) {
            match self {
                Selected::Cpu(b) => {
                    let (o, n, m) =
                        b.attention_with_head_mass(shape, cpu_act!(q), positions, segments);
                    (SelectedAct::Cpu(o), n, m)
                }
                Selected::Cuda(b) => {
                    let (o, n, m) =
                        b.attention_with_head_mass(shape, gpu_act!(q), positions, segments);
                    (SelectedAct::Cuda(o), n, m)
                }
            }
        }

        fn evicts_per_head(&self) -> bool {
            match self {
                Selected::Cpu(b) => b.evicts_per_head(),
                Selected::Cuda(b) => b.evicts_per_head(),
            }
        }

        fn evict_heads(
            &self,
            config: &EvictionConfig,
            cache: &mut LayerCache,
            stats: &mut [SlotStats],
            now: usize,
        ) -> Result<()> {
            match self {
                Selected::Cpu(b) => b.evict_heads(config, cache, stats, now),
                Selected::Cuda(b) => b.evict_heads(config, cache, stats, now),
            }
        }

        fn evict(
            &self,
            config: &EvictionConfig,
            cache: &mut LayerCache,
            stats: &mut SlotStats,
            now: usize,
        ) -> Result<()> {
            match self {
                Selected::Cpu(b) => b.evict(config, cache, stats, now),
                Selected::Cuda(b) => b.evict(config, cache, stats, now),
            }
        }

        fn activate(&self, act: Activation, x: &mut SelectedAct) {
            match self {
                Selected::Cpu(b) => b.activate(act, cpu_act!(x)),
                Selected::Cuda(b) => b.activate(act, gpu_act!(x)),
            }
        }

        fn gated_activation(&self, act: Activation, gate: &mut SelectedAct, up: &SelectedAct) {
            match self {
                Selected::Cpu(b) => b.gated_activation(act, cpu_act!(gate), cpu_act!(up)),
                Selected::Cuda(b) => b.gated_activation(act, gpu_act!(gate), gpu_act!(up)),
            }
        }

        fn clamped_swiglu(&self, gate: &mut SelectedAct, up: &SelectedAct, s: ClampedSwiglu) {
            match self {
                Selected::Cpu(b) => b.clamped_swiglu(cpu_act!(gate), cpu_act!(up), s),
                Selected::Cuda(b) => b.clamped_swiglu(gpu_act!(gate), gpu_act!(up), s),
            }
        }

        fn add(&self, x: &mut SelectedAct, y: &SelectedAct) {
            match self {
                Selected::Cpu(b) => b.add(cpu_act!(x), cpu_act!(y)),
                Selected::Cuda(b) => b.add(gpu_act!(x), gpu_act!(y)),
            }
        }

        fn rotate_rows(&self, x: &mut SelectedAct, block: usize) {
            match self {
                Selected::Cpu(b) => b.rotate_rows(cpu_act!(x), block),
                Selected::Cuda(b) => b.rotate_rows(gpu_act!(x), block),
            }
        }

        fn route(
            &self,
            logits: &SelectedAct,
            top_k: usize,
            renormalize: bool,
            first_row: usize,
        ) -> Vec<Pick> {
            match self {
                Selected::Cpu(b) => b.route(cpu_act!(logits), top_k, renormalize, first_row),
                Selected::Cuda(b) => b.route(gpu_act!(logits), top_k, renormalize, first_row),
            }
        }

        fn mix_rows(&self, out: &mut SelectedAct, y: &SelectedAct, picks: &[Pick]) {
            match self {
                Selected::Cpu(b) => b.mix_rows(cpu_act!(out), cpu_act!(y), picks),
                Selected::Cuda(b) => b.mix_rows(gpu_act!(out), gpu_act!(y), picks),
            }
        }

        fn add_gated(&self, out: &mut SelectedAct, y: &SelectedAct, gate: &SelectedAct) {
            match self {
                Selected::Cpu(b) => b.add_gated(cpu_act!(out), cpu_act!(y), cpu_act!(gate)),
                Selected::Cuda(b) => b.add_gated(gpu_act!(out), gpu_act!(y), gpu_act!(gate)),
            }
        }

        fn zeros(&self, rows: usize, cols: usize) -> SelectedAct {
            match self {
                Selected::Cpu(b) => SelectedAct::Cpu(b.zeros(rows, cols)),
                Selected::Cuda(b) => SelectedAct::Cuda(b.zeros(rows, cols)),
            }
        }

        fn run_tasks<T: Send, R: Send>(
            &self,
            kind: Tasks,
            tasks: Vec<T>,
            cost: impl Fn(&T) -> usize,
            task: impl Fn(T) -> R + Sync,
        ) -> Vec<R> {
            match self {
                Selected::Cpu(b) => b.run_tasks(kind, tasks, cost, task),
                Selected::Cuda(b) => b.run_tasks(kind, tasks, cost, task),
            }
        }

        fn sequence_groups(
            &self,
            sequences: usize,
            decoding: bool,
            layer_weight_bytes: usize,
        ) -> usize {
            match self {
                Selected::Cpu(b) => b.sequence_groups(sequences, decoding, layer_weight_bytes),
                Selected::Cuda(b) => b.sequence_groups(sequences, decoding, layer_weight_bytes),
            }
        }
    }
}
