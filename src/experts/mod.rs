//! The expert service the engine asks for experts: "run these experts of layer `l`". Without a
//! memory budget the experts are used in place (from the mapped .emoe or memory); with one they
//! are paged through a cache of slots (`pager`). Either way the service keeps the activation-path
//! statistics (`paths`) online and, when paging, predicts and prefetches the next layer's
//! experts (`predict`), so the engine never knows about paging.

pub mod blockio;
pub mod budget;
pub(crate) mod counters;
pub mod heatmap;
pub mod pager;
pub mod paths;
pub mod predict;
pub(crate) mod slots;
pub(crate) mod synth;
pub mod tier;

use crate::error::Result;
use crate::kv::{KvDemand, KvPlan};
use crate::model::weights::{Ffn, GatedMlp, MoeBlock};
use crate::model::Model;
use budget::{FixedCosts, MemBudget, SlotPlan};
use counters::CacheStats;
use heatmap::{HeatMap, Tier};
use pager::{Pager, PagerOptions};
use paths::PathStats;
use predict::{PredictSource, PredictionCounts, Predictor};
use std::sync::Arc;

/// How experts are paged (`--mem` and friends).
#[derive(Debug, Clone)]
pub struct PagingOptions {
    /// Budget for everything resident: weights, expert cache, KV caches, workspaces.
    pub mem: MemBudget,
    /// Which cached expert gives way.
    pub policy: pager::Policy,
    /// How expert blocks are read (O_DIRECT, or pread and dropping the page cache).
    pub read_mode: blockio::ReadMode,
    /// Prefetch the predicted next-layer experts on I/O threads.
    pub prefetch: bool,
    /// Threads that prefetch.
    pub io_threads: usize,
    /// What predicts the next layer's experts.
    pub predict: PredictSource,
    /// Experts predicted per token beyond top-k.
    pub predict_extra: usize,
    /// A saved profile to start the statistics from.
    pub profile: Option<paths::PathProfile>,
    /// The KV caches the budget must hold beside the experts.
    pub kv: KvDemand,
}

impl PagingOptions {
    /// The defaults (`stats` policy, O_DIRECT, prefetch of top-k on two I/O threads).
    pub fn with_budget(mem: MemBudget) -> PagingOptions {
        PagingOptions {
            mem,
            policy: pager::Policy::Stats,
            read_mode: blockio::ReadMode::Direct,
            prefetch: true,
            io_threads: 2,
            predict: PredictSource::Both,
            predict_extra: 0,
            profile: None,
            kv: KvDemand::default(),
        }
    }
}

/// Where an engine's experts come from: in place, or paged under a memory budget; and the
/// statistics of which experts run.
pub struct ExpertService {
    /// Per layer, how often each expert and each expert-to-expert path was taken.
    pub paths: Arc<PathStats>,
    /// Set when predictions are made (paging with prefetch, or `profile` measuring them).
    pub predictor: Option<Predictor>,
    pager: Option<Pager>,
    plan: Option<SlotPlan>,
    /// Expert blocks in the model: more slots than this are never useful.
    blocks: usize,
    top_k: usize,
}

/// Runtime overhead the budget always reserves: the binary's and libraries' resident pages,
/// the tokenizer and the heap (a run of the trained fixture holds about 10 MiB of them).
const RUNTIME_BYTES: u64 = 24 << 20;
/// The pre-gating probability below which a predicted expert is not prefetched. On the 2 GB
/// benchmark model at 50% (`bench --mem 1062M -n 24`), prefetching every predicted expert
/// wasted 3.6 block reads per token, a threshold of 0.2 wasted 1.4 and 0.3 wasted 0.2, while
/// the needed reads stayed at 15.5–15.7 per token.
pub const PREFETCH_MIN_PROB: f32 = 0.3;
/// Rows of activations (and logits) a step's workspaces are sized for.
const WORKSPACE_ROWS: u64 = 256;

impl ExpertService {
    /// Experts used in place; statistics only.
    pub fn in_place(model: &Model) -> ExpertService {
        ExpertService {
            paths: Arc::new(PathStats::new(
                model.config.num_layers,
                model.config.num_experts,
            )),
            predictor: None,
            pager: None,
            plan: None,
            blocks: 0,
            top_k: model.config.top_k.max(1),
        }
    }

    /// In place, predicting the next layer's experts and scoring the predictions.
    pub fn measuring(
        model: &Model,
        predictor: Predictor,
        profile: Option<&paths::PathProfile>,
    ) -> ExpertService {
        let mut s = ExpertService::in_place(model);
        if let Some(p) = profile {
            s.paths = Arc::new(PathStats::from_profile(p));
        }
        s.predictor = Some(predictor);
        s
    }

    /// Experts paged through a cache sized from the budget.
    pub fn paged(model: Arc<Model>, opts: &PagingOptions) -> Result<ExpertService> {
        let cfg = &model.config;
        let paths =
            Arc::new(match &opts.profile {
                Some(p) if p.layers == cfg.num_layers && p.experts == cfg.num_experts => {
                    PathStats::from_profile(p)
                }
                Some(_) => return Err(crate::Error::invalid(
                    "--profile: the profile was made for a model with other layer/expert counts",
                )),
                None => PathStats::new(cfg.num_layers, cfg.num_experts),
            });
        let kv = opts.kv.plan_for(cfg)?;
        let fixed = fixed_costs(&model, kv);
        let weight_bytes = model.weight_bytes() as u64;
        // The plan needs the slot size, which the pager finds; a zero-slot pager is cheap.
        let io_threads = if opts.prefetch {
            opts.io_threads.max(1)
        } else {
            0
        };
        let popts = PagerOptions {
            policy: opts.policy,
            read_mode: opts.read_mode,
            io_threads,
        };
        let pager = Pager::new(model.clone(), 0, &popts, paths.clone())?;
        let blocks = model
            .weights
            .layers
            .iter()
            .filter(|l| matches!(l.ffn, Ffn::Moe(_)))
            .count()
            * cfg.num_experts;
        let plan = budget::plan_slots(
            opts.mem.bytes(weight_bytes),
            fixed,
            pager.slot_bytes() as u64,
            cfg.top_k.max(1),
            blocks,
        )?;
        pager.resize(plan.slots)?;
        let predictor = opts
            .prefetch
            .then(|| Predictor::new(opts.predict, cfg.top_k, opts.predict_extra));
        Ok(ExpertService {
            paths,
            predictor,
            pager: Some(pager),
            plan: Some(plan),
            blocks,
            top_k: cfg.top_k.max(1),
        })
    }

    /// Whether experts are paged under a budget.
    pub fn is_paged(&self) -> bool {
        self.pager.is_some()
    }

    /// How the budget was split (paged only).
    pub fn plan(&self) -> Option<&SlotPlan> {
        self.plan.as_ref()
    }

    /// How expert blocks are read (paged only).
    pub fn read_mode(&self) -> Option<blockio::ReadMode> {
        self.pager.as_ref().map(Pager::read_mode)
    }

    /// Whether the engine should compute pre-gating router outputs for the next layer.
    pub fn wants_prediction(&self) -> bool {
        self.predictor.is_some()
    }

    /// Records a step's routing at `layer` (rows: each token's experts) and scores the
    /// prediction made for it.
    pub fn observe(&self, layer: usize, rows: &[Vec<usize>]) {
        self.paths.observe(layer, rows);
        if let Some(p) = &self.predictor {
            p.score(layer, rows);
        }
    }

    /// Predicts layer `next`'s experts per row and starts prefetching their union.
    pub fn predict_next(
        &self,
        layer: usize,
        next: usize,
        rows: &[Vec<usize>],
        pregate_probs: Option<&[f32]>,
    ) -> Option<(usize, Vec<usize>)> {
        let p = self.predictor.as_ref()?;
        Some(prefetch_request(
            &self.paths,
            p,
            layer,
            next,
            rows,
            pregate_probs,
        ))
    }

    /// Runs `run` on the experts `ids` of `layer` (in place, or in cache slots a chunk at a
    /// time); `run` gets each chunk's start in `ids` and its experts, and returns one result
    /// per expert. `next` is a prefetch request for the following layer.
    pub fn run<R>(
        &self,
        layer: usize,
        block: &MoeBlock,
        ids: &[usize],
        next: Option<(usize, Vec<usize>)>,
        mut run: impl FnMut(usize, &[&GatedMlp]) -> Vec<R>,
    ) -> Result<Vec<R>> {
        match &self.pager {
            None => {
                let mlps: Vec<&GatedMlp> = ids.iter().map(|&e| &block.experts[e]).collect();
                for m in &mlps {
                    // A mapped expert's block is checked the first time it runs.
                    m.ensure_verified()?;
                }
                Ok(run(0, &mlps))
            }
            Some(pager) => pager.with_experts(layer, ids, next, run),
        }
    }

    /// The end of a forward step: the `stats` policy re-ranks its resident set from the
    /// counts as they are now.
    pub fn end_step(&self) {
        self.paths.end_step();
        if let Some(p) = &self.pager {
            p.refresh_placement();
        }
    }

    /// The expert cache's counters after `tokens` tokens (paged only).
    pub fn cache_stats(&self, tokens: u64) -> Option<CacheStats> {
        self.pager.as_ref().map(|p| p.stats(tokens))
    }

    /// Next-layer prediction counts, when predictions are made.
    pub fn prediction(&self) -> Option<PredictionCounts> {
        self.predictor.as_ref().map(Predictor::counts)
    }

    /// Changes the budget to `bytes` while requests run; returns the new slot count. Too small
    /// a budget is refused (the cache keeps its size).
    pub fn set_mem(&self, bytes: u64) -> Result<usize> {
        let (Some(pager), Some(plan)) = (&self.pager, &self.plan) else {
            return Err(crate::Error::invalid(
                "set_mem needs a paged engine (start it with --mem)",
            ));
        };
        let new = budget::plan_slots(bytes, plan.fixed, plan.slot_bytes, self.top_k, self.blocks)?;
        pager.resize(new.slots)?;
        Ok(new.slots)
    }

    /// The pager (paged only).
    pub fn pager(&self) -> Option<&Pager> {
        self.pager.as_ref()
    }

    /// The heat map of `counts` (tokens routed, per model layer and expert) with where each
    /// expert is now: on the GPU where `on_device(layer, expert)` (the engine's device tier
    /// holds it), else in RAM when used in place, else in a cache slot (RAM) or only in the file
    /// (storage). When paging, also each cell's reads from the file, row for row.
    pub fn heat_map(
        &self,
        model: &Model,
        counts: &[Vec<u64>],
        on_device: impl Fn(usize, usize) -> bool,
    ) -> (HeatMap, Option<Vec<Vec<u64>>>) {
        let e_n = model.config.num_experts;
        let residency = self.pager.as_ref().map(Pager::residency);
        let at = |l: usize, e: usize| residency.as_ref()?.get(l * e_n + e).copied();
        let map = HeatMap::new(heatmap::moe_layers(model), e_n, counts, |l, e| {
            match at(l, e) {
                _ if on_device(l, e) => Tier::Gpu,
                Some((false, _)) => Tier::Storage,
                _ => Tier::Ram,
            }
        });
        let reads = residency.as_ref().map(|_| {
            map.layers
                .iter()
                .map(|&l| (0..e_n).map(|e| at(l, e).map_or(0, |r| r.1)).collect())
                .collect()
        });
        (map, reads)
    }
}

/// `predictor`'s guess of layer `next`'s experts per row (from the rows' choices at `layer`
/// and, where given, their pre-gating probabilities), remembered for scoring, and the request
/// to prefetch: the union of the confident guesses, most-voted first.
pub fn prefetch_request(
    paths: &PathStats,
    predictor: &Predictor,
    layer: usize,
    next: usize,
    rows: &[Vec<usize>],
    pregate_probs: Option<&[f32]>,
) -> (usize, Vec<usize>) {
    let guess = predictor.predict(paths, layer, rows, pregate_probs);
    // A speculative read costs a whole block of disk time when it is wrong, so only the
    // confident guesses are read (pre-gating probability; transitions alone are unfiltered).
    let e_n = paths.experts();
    let sure = |r: usize, e: usize| {
        pregate_probs.is_none_or(|p| p.get(r * e_n + e).is_none_or(|&v| v >= PREFETCH_MIN_PROB))
    };
    let mut union: Vec<usize> = guess
        .iter()
        .enumerate()
        .flat_map(|(r, g)| g.iter().copied().filter(move |&e| sure(r, e)))
        .collect();
    // Most-voted first: a prefetch that runs out of free slots drops the least likely.
    let mut votes = vec![0usize; e_n];
    union.iter().for_each(|&e| votes[e] += 1);
    union.sort_unstable();
    union.dedup();
    union.sort_by_key(|&e| std::cmp::Reverse(votes[e]));
    predictor.set_pending(next, guess);
    (next, union)
}

/// What the budget holds besides expert slots: the non-expert weights (owned or mapped), the
/// runtime (binary, heap), the KV caches of `kv` and a step's workspaces.
fn fixed_costs(model: &Model, kv: KvPlan) -> FixedCosts {
    let cfg = &model.config;
    let mem = model.weight_memory();
    let expert_mapped: u64 = model
        .weights
        .layers
        .iter()
        .filter_map(|l| match &l.ffn {
            Ffn::Moe(b) => Some(
                b.experts
                    .iter()
                    .map(|e| e.weight_bytes() as u64)
                    .sum::<u64>(),
            ),
            _ => None,
        })
        .sum();
    let mapped_other = (mem.mapped_bytes as u64).saturating_sub(expert_mapped);
    // From the model alone (not the process's resident set now), so a budget means the same
    // thing whenever an engine is made.
    let resident = mem.owned_bytes as u64 + mapped_other + RUNTIME_BYTES;
    let row =
        (cfg.vocab_size + 8 * cfg.hidden_size + 4 * cfg.expert_ffn.max(cfg.dense_ffn)) as u64 * 4;
    FixedCosts {
        resident_bytes: resident,
        kv_bytes: kv.bytes(),
        workspace_bytes: WORKSPACE_ROWS * row,
        kv,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only guesses at or above `PREFETCH_MIN_PROB` are prefetched, most-voted first; scoring
    /// still sees the whole prediction.
    #[test]
    fn prefetch_requests_skip_unconfident_guesses() {
        let model = Model::builtin_default();
        let e_n = model.config.num_experts;
        let k = model.config.top_k;
        assert!(
            e_n >= 4 && k == 2,
            "the test assumes top-2 of at least 4 experts"
        );
        let s =
            ExpertService::measuring(&model, Predictor::new(PredictSource::Pregate, k, 0), None);
        // Row 0 is sure of expert 1 and unsure of 2; row 1 is sure of 1 and 3.
        let mut probs = vec![0.0f32; 2 * e_n];
        probs[1] = 0.7;
        probs[2] = PREFETCH_MIN_PROB - 0.05;
        probs[e_n + 1] = 0.5;
        probs[e_n + 3] = PREFETCH_MIN_PROB;
        let rows = vec![vec![0, 1], vec![0, 2]];
        let (next, ids) = s.predict_next(0, 1, &rows, Some(&probs)).unwrap();
        assert_eq!((next, ids), (1, vec![1, 3]));
        // The scored prediction keeps the unconfident guess: row 0 chose 2 and was predicted it.
        s.observe(1, &[vec![1, 2], vec![1, 3]]);
        let c = s.prediction().unwrap();
        assert_eq!((c.predicted, c.correct), (4, 4));
    }
}
