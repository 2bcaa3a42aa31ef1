//! One way to set up an [`Engine`]: the model, the backend, worker threads, where the experts
//! come from (in place, paged under a memory budget, or a service the caller made), the KV
//! options, and an optional observer of linear layers. The CLI (generate, ppl, serve, bench,
//! profile) and the C ABI all build their engines here, so a choice such as `--backend` means
//! the same thing everywhere.

#![warn(missing_docs)]

use crate::backend::BackendChoice;
use crate::engine::{Engine, LinearObserver};
use crate::error::Result;
use crate::experts::budget::MemBudget;
use crate::experts::tier::Placement;
use crate::experts::{ExpertService, PagingOptions};
use crate::kv::{KvDemand, KvOptions};
use crate::model::Model;
use std::sync::Arc;

/// Where the engine's experts come from.
enum ExpertSource {
    /// Used in place from the model's weights (no budget).
    InPlace,
    /// Read into a cache of slots under a memory budget (an .emoe model).
    Paged(Box<PagingOptions>),
    /// A service the caller set up (e.g. one that measures prediction quality).
    Service(Box<ExpertService>),
}

/// Builds an [`Engine`]; see the [module documentation](self).
///
/// ```no_run
/// use edgemoe::{EngineBuilder, BackendChoice};
/// let model = std::sync::Arc::new(edgemoe::load_model(None)?);
/// let engine = EngineBuilder::new(model)
///     .backend(BackendChoice::Cpu)
///     .threads(2)
///     .build()?;
/// # Ok::<(), edgemoe::Error>(())
/// ```
pub struct EngineBuilder {
    model: Arc<Model>,
    backend: BackendChoice,
    threads: usize,
    kv: KvDemand,
    experts: ExpertSource,
    observer: Option<Arc<dyn LinearObserver>>,
    tier: Option<DeviceTierOptions>,
}

/// The GPU expert tier (`--gpu-mem`, `--placement`).
#[derive(Debug, Clone, Copy)]
pub struct DeviceTierOptions {
    /// Everything edgemoe allocates on the device: non-expert weights, KV caches and workspaces
    /// first, the rest expert slots.
    pub mem: MemBudget,
    /// Where a routed expert that is not on the GPU runs.
    pub placement: Placement,
    /// Copy the next layer's predicted experts in ahead of need.
    pub prefetch: bool,
}

impl EngineBuilder {
    /// An engine for `model` with the defaults: the backend chosen automatically (the GPU when
    /// this build has CUDA and a device exists), one worker thread per core, experts in place,
    /// every sequence keeping its whole KV cache.
    pub fn new(model: Arc<Model>) -> EngineBuilder {
        EngineBuilder {
            model,
            backend: BackendChoice::Auto,
            threads: 0,
            kv: KvDemand::default(),
            experts: ExpertSource::InPlace,
            observer: None,
            tier: None,
        }
    }

    /// Keeps the hot routed experts in GPU memory under `options.mem` and runs the others as
    /// `options.placement` decides (needs the CUDA backend).
    pub fn device_tier(mut self, options: DeviceTierOptions) -> EngineBuilder {
        self.tier = Some(options);
        self
    }

    /// Which backend runs the model.
    pub fn backend(mut self, choice: BackendChoice) -> EngineBuilder {
        self.backend = choice;
        self
    }

    /// CPU worker threads (0: one per core).
    pub fn threads(mut self, threads: usize) -> EngineBuilder {
        self.threads = threads;
        self
    }

    /// KV budget and eviction policy of every sequence the engine starts.
    pub fn kv_options(mut self, options: KvOptions) -> EngineBuilder {
        self.kv.options = options;
        self
    }

    /// [`Self::kv_options`] together with what a memory budget must hold for the KV caches:
    /// how many sequences at once, each reaching how many tokens.
    pub fn kv_demand(mut self, demand: KvDemand) -> EngineBuilder {
        self.kv = demand;
        self
    }

    /// Pages the experts of an .emoe model under a memory budget. The budget holds the KV
    /// caches of [`Self::kv_demand`] (which replaces `options.kv`).
    pub fn paging(mut self, options: PagingOptions) -> EngineBuilder {
        self.experts = ExpertSource::Paged(Box::new(options));
        self
    }

    /// Takes the experts from a service the caller set up (instead of in place or paged).
    pub fn experts(mut self, service: ExpertService) -> EngineBuilder {
        self.experts = ExpertSource::Service(Box::new(service));
        self
    }

    /// Shows every linear layer's input to `observer` (quantization statistics).
    pub fn observer(mut self, observer: Arc<dyn LinearObserver>) -> EngineBuilder {
        self.observer = Some(observer);
        self
    }

    /// The engine; fails on a backend that cannot start (`--backend cuda` without the feature
    /// or a device, too many threads), invalid KV options, or a budget paging cannot meet.
    pub fn build(self) -> Result<Engine> {
        // The engine takes the model first, so that where the caller handed over the only
        // reference the backend prepares the weights in place.
        let mut engine = match self.tier {
            Some(tier) => tiered_engine(self.model, self.backend, self.threads, tier, &self.kv)?,
            None => crate::backend::engine_for(self.model, self.backend, self.threads)?,
        };
        engine.set_kv_options(self.kv.options)?;
        let service = match self.experts {
            ExpertSource::InPlace => None,
            ExpertSource::Paged(mut options) => {
                options.kv = self.kv;
                Some(ExpertService::paged(engine.model().clone(), &options)?)
            }
            ExpertSource::Service(service) => Some(*service),
        };
        if let Some(service) = service {
            engine = engine.with_experts(service)?;
        }
        if let Some(observer) = self.observer {
            engine = engine.with_observer(observer);
        }
        Ok(engine)
    }
}

/// An engine on the GPU with the routed experts in a tier of `options.mem`'s slots.
#[cfg(not(feature = "cuda"))]
fn tiered_engine(
    _model: Arc<Model>,
    _choice: BackendChoice,
    _threads: usize,
    _options: DeviceTierOptions,
    _kv: &KvDemand,
) -> Result<Engine> {
    Err(crate::error::Error::invalid(
        "--gpu-mem: this edgemoe was built without the `cuda` feature, so there is no GPU tier",
    ))
}

/// An engine on the GPU with the routed experts in a tier of `options.mem`'s slots; without a
/// usable GPU (`--backend auto`), the CPU engine after one line saying why.
#[cfg(feature = "cuda")]
fn tiered_engine(
    model: Arc<Model>,
    choice: BackendChoice,
    threads: usize,
    options: DeviceTierOptions,
    kv: &KvDemand,
) -> Result<Engine> {
    use crate::backend::cuda::CudaBackend;
    use crate::backend::select::Selected;
    use crate::error::Error;
    if choice == BackendChoice::Cpu {
        return Err(Error::invalid(
            "--gpu-mem sizes the GPU expert tier: it needs --backend cuda or auto",
        ));
    }
    if model.config.num_experts == 0 {
        return Err(Error::invalid(
            "--gpu-mem: the model has no routed experts to place",
        ));
    }
    let backend = match CudaBackend::for_tier(&model) {
        Ok(b) => b,
        Err(e) if choice == BackendChoice::Auto => {
            eprintln!("edgemoe: no usable GPU ({e}); running on the CPU (--gpu-mem unused)");
            return crate::backend::engine_for(model, BackendChoice::Cpu, threads);
        }
        Err(e) => return Err(e),
    };
    let cfg = &model.config;
    let plan = device_plan(&model, kv)?;
    let budget = options.mem.bytes(model.weight_bytes() as u64);
    let slots = crate::experts::tier::plan_device_slots(
        budget,
        plan.fixed,
        plan.slot_bytes,
        cfg.top_k.max(1),
    )?;
    eprintln!(
        "--gpu-mem {}: {} fixed (non-expert weights, KV, workspaces); {slots} expert slots of {} ({:?} placement)",
        crate::experts::budget::human(budget),
        crate::experts::budget::human(plan.fixed),
        crate::experts::budget::human(plan.slot_bytes),
        options.placement,
    );
    let tier = crate::experts::tier::ExpertTier::new(
        slots,
        cfg.num_layers,
        cfg.num_experts,
        options.placement,
        options.prefetch,
    );
    tier.set_budget(crate::experts::tier::DeviceBudget {
        fixed: plan.fixed,
        slot_bytes: plan.slot_bytes,
        top_k: cfg.top_k.max(1),
    });
    Engine::with_backend(model, Selected::Cuda(backend)).with_tier(tier, threads)
}

/// What the GPU holds besides expert slots, and one slot's size.
#[cfg(feature = "cuda")]
struct DevicePlan {
    fixed: u64,
    slot_bytes: u64,
}

#[cfg(feature = "cuda")]
fn device_plan(model: &Model, kv: &KvDemand) -> Result<DevicePlan> {
    use crate::model::weights::Ffn;
    let cfg = &model.config;
    let mut routed = 0u64;
    let mut slot_bytes = 0u64;
    for layer in &model.weights.layers {
        if let Ffn::Moe(b) = &layer.ffn {
            for e in &b.experts {
                routed += e.weight_bytes() as u64;
                slot_bytes = slot_bytes.max(e.weight_bytes() as u64);
            }
        }
    }
    let kv_plan = kv.plan_for(cfg)?;
    // Activations of a step and the int8 GEMM's quantized inputs: a few rows of the widest
    // matrices per token of a 512-token prefill chunk, with room for the allocator.
    let workspace = 64 << 20;
    Ok(DevicePlan {
        fixed: (model.weight_bytes() as u64).saturating_sub(routed) + kv_plan.bytes() + workspace,
        slot_bytes,
    })
}
