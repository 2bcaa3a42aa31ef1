//! One way to set up an [`Engine`]: the model, the backend, worker threads, where the experts
//! come from (in place, paged under a memory budget, or a service the caller made), the KV
//! options, and an optional observer of linear layers. The CLI (generate, ppl, serve, bench,
//! profile) and the C ABI all build their engines here, so a choice such as `--backend` means
//! the same thing everywhere.

#![warn(missing_docs)]

use crate::backend::BackendChoice;
use crate::engine::{Engine, LinearObserver};
use crate::error::Result;
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
        }
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
        let mut engine =
            crate::backend::engine_for(self.model.clone(), self.backend, self.threads)?;
        engine.set_kv_options(self.kv.options)?;
        let service = match self.experts {
            ExpertSource::InPlace => None,
            ExpertSource::Paged(mut options) => {
                options.kv = self.kv;
                Some(ExpertService::paged(self.model, &options)?)
            }
            ExpertSource::Service(service) => Some(*service),
        };
        if let Some(service) = service {
            engine = engine.with_experts(service);
        }
        if let Some(observer) = self.observer {
            engine = engine.with_observer(observer);
        }
        Ok(engine)
    }
}
