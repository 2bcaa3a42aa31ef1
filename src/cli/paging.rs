//! Options for expert paging under a memory budget, shared by every model-running command.

use crate::experts::blockio::ReadMode;
use crate::experts::budget::{human, MemBudget};
use crate::experts::pager::Policy;
use crate::experts::predict::PredictSource;
use crate::experts::PagingOptions;
use crate::kv::KvDemand;
use crate::{Engine, EngineBuilder};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct PagingArgs {
    /// Budget for everything resident (weights, expert cache, KV cache, workspaces): a size
    /// (300M, 1.5G) or a percentage of the model's weight bytes (40%). Experts of an .emoe are
    /// then read into a cache of slots, past the page cache; unlimited when omitted.
    #[arg(long)]
    pub mem: Option<MemBudget>,
    /// Which cached expert gives way (with --mem).
    #[arg(long = "expert-policy", value_enum, default_value_t = Policy::Stats, requires = "mem")]
    pub expert_policy: Policy,
    /// How expert blocks are read (with --mem): O_DIRECT, or pread + posix_fadvise(DONTNEED).
    #[arg(long = "expert-io", value_enum, default_value_t = ReadMode::Direct, requires = "mem")]
    pub expert_io: ReadMode,
    /// Do not predict and prefetch the next layer's experts (with --mem).
    #[arg(long = "no-prefetch", requires = "mem")]
    pub no_prefetch: bool,
    /// What predicts the next layer's experts.
    #[arg(long = "predict", value_enum, default_value_t = PredictSource::Both, requires = "mem")]
    pub predict: PredictSource,
    /// Experts predicted per token beyond top-k (0 by default: when the disk is the limit,
    /// every wasted prefetch costs a read; `profile` measures recall per setting).
    #[arg(long = "predict-extra", default_value_t = 0, requires = "mem")]
    pub predict_extra: usize,
    /// I/O threads that prefetch.
    #[arg(long = "io-threads", default_value_t = 2, requires = "mem")]
    pub io_threads: usize,
    /// Activation-path statistics to start from (`edgemoe profile --out`).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Print the expert cache's counters (and prediction precision/recall) at the end.
    #[arg(long)]
    pub stats: bool,
}

impl Default for PagingArgs {
    fn default() -> Self {
        PagingArgs {
            mem: None,
            expert_policy: Policy::Stats,
            expert_io: ReadMode::Direct,
            no_prefetch: false,
            predict: PredictSource::Both,
            predict_extra: 0,
            io_threads: 2,
            profile: None,
            stats: false,
        }
    }
}

impl PagingArgs {
    /// Builds `builder`'s engine with the experts paged as the options ask (in place without
    /// `--mem`), and says how the budget was split. The budget holds the builder's KV demand.
    pub fn build(&self, builder: EngineBuilder) -> anyhow::Result<Engine> {
        let Some(mem) = self.mem else {
            return Ok(builder.build()?);
        };
        let profile = match &self.profile {
            Some(p) => Some(crate::experts::paths::PathProfile::load(p)?),
            None => None,
        };
        let opts = PagingOptions {
            mem,
            policy: self.expert_policy,
            read_mode: self.expert_io,
            prefetch: !self.no_prefetch,
            io_threads: self.io_threads,
            predict: self.predict,
            predict_extra: self.predict_extra,
            profile,
            // Set by the builder from its KV demand.
            kv: KvDemand::default(),
        };
        let engine = builder.paging(opts).build()?;
        let service = &engine.experts;
        if let Some(plan) = service.plan() {
            eprintln!(
                "--mem {}: {} fixed (non-expert weights and runtime {}, KV {} for {} × {} tokens, workspaces {}); {} expert slots of {} ({:?} reads, policy {:?}, prefetch {})",
                human(plan.budget_bytes),
                human(plan.fixed.total()),
                human(plan.fixed.resident_bytes),
                human(plan.fixed.kv_bytes),
                plan.fixed.kv.sequences,
                plan.fixed.kv.tokens_per_sequence,
                human(plan.fixed.workspace_bytes),
                plan.slots,
                human(plan.slot_bytes),
                service.read_mode().unwrap_or(ReadMode::Pread),
                self.expert_policy,
                if self.no_prefetch { "off" } else { "on" },
            );
        }
        Ok(engine)
    }

    /// Prints the counters on stderr when `--stats` asked for them.
    pub fn report(&self, engine: &Engine) {
        if self.stats {
            eprintln!("{}", stats_line(engine));
        }
    }
}

/// The expert cache's counters and prediction quality in one line, with the memory the
/// budget gave the expert cache and the KV caches.
pub fn stats_line(engine: &Engine) -> String {
    let tokens = engine.stats.snapshot().tokens;
    let mut line = match engine.experts.cache_stats(tokens) {
        Some(s) => s.to_string(),
        None => "experts: in place (no --mem)".to_string(),
    };
    if let (Some(plan), Some(s)) = (engine.experts.plan(), engine.experts.cache_stats(tokens)) {
        line += &format!(
            "; memory: experts {} ({} slots of {}), KV reserved {} ({} × {} tokens of {} bytes)",
            human(s.slots as u64 * plan.slot_bytes),
            s.slots,
            human(plan.slot_bytes),
            human(plan.fixed.kv_bytes),
            plan.fixed.kv.sequences,
            plan.fixed.kv.tokens_per_sequence,
            plan.fixed.kv.bytes_per_token,
        );
    }
    if let Some(t) = engine.tier().map(|t| t.stats()) {
        line += &format!(
            "; GPU tier: {} slots, hits {}, misses {} ({} fetched, {} run on the CPU, {} failed), {} prefetched ({} then used), {} copied at {:.1} GB/s, stall {:.2} ms/token",
            t.slots,
            t.hits,
            t.misses,
            t.fetched,
            t.host_runs,
            t.fetch_failures,
            t.prefetched,
            t.prefetch_hits,
            human(t.bytes_copied),
            t.copy_gb_per_s,
            t.stall_ms_per_token,
        );
    }
    if let Some(p) = engine.experts.prediction() {
        line += &format!(
            "; next-layer prediction recall {:.1}%, precision {:.1}%",
            100.0 * p.recall(),
            100.0 * p.precision()
        );
    }
    line
}

#[cfg(test)]
mod tests {
    use super::stats_line;
    use crate::engine::{BatchItem, Logits};
    use crate::experts::tier::{ExpertTier, Placement};
    use crate::{Engine, Model};
    use std::sync::Arc;

    #[test]
    fn stats_report_the_gpu_tier() {
        let model = Arc::new(Model::builtin_default());
        let cfg = &model.config;
        let tier = ExpertTier::new(2, cfg.num_layers, cfg.num_experts, Placement::Gpu, false);
        let engine = Engine::new(model.clone(), 1)
            .unwrap()
            .with_tier(tier, 1)
            .unwrap();
        let mut cache = engine.new_cache();
        engine
            .forward(&mut [BatchItem {
                tokens: &[1, 2, 3, 4, 5],
                cache: &mut cache,
                logits: Logits::Last,
            }])
            .unwrap();
        let s = engine.tier().unwrap().stats();
        assert!(s.misses > 0 && s.fetched > 0, "{s:?}");
        let line = stats_line(&engine);
        let want = format!("GPU tier: 2 slots, hits {}, misses {}", s.hits, s.misses);
        assert!(line.contains(&want), "{line}");
    }
}
