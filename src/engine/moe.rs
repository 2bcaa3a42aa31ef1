//! The sparse feed-forward block: route each token to its top-k experts, run every chosen expert
//! once on all the tokens that chose it, and mix the outputs by the routing weights. The experts
//! come from the engine's expert service (in place, or paged through a cache), which also
//! sees every step's routing and, when it predicts, the next layer's pre-gating.

use super::tiered;
use super::Engine;
use crate::backend::{Backend, Pick, Tasks};
use crate::error::Result;
use crate::experts::paths::experts_per_row;
use crate::model::weights::{Ffn, MoeBlock};

/// The block on normalized rows `x`, given every token's picks (the backend's `route`);
/// `residual` is the hidden state the rows were normalized from (pre-gating reads it).
pub fn forward<B: Backend>(
    engine: &Engine<B>,
    layer: usize,
    block: &MoeBlock,
    x: &B::Act,
    residual: &B::Act,
    mut picks: Vec<Pick>,
) -> Result<B::Act> {
    let cfg = &engine.model().config;
    let be = engine.backend();
    let service = &engine.experts;
    let rows = experts_per_row(&picks);
    service.observe(layer, &rows);
    let next = if service.wants_prediction() {
        let probs = pregate_probs(engine, layer + 1, residual);
        service.predict_next(layer, layer + 1, &rows, probs.as_deref())
    } else {
        None
    };
    // The device tier prefetches by the RAM tier's prediction, or by its own where the RAM
    // tier makes none.
    let device_next = match &engine.tier {
        Some(t) if t.tier.prefetches() => match &next {
            Some(n) => Some(n.clone()),
            None => {
                let probs = pregate_probs(engine, layer + 1, residual);
                tiered::predict_next(engine, t, layer, &rows, probs.as_deref())
            }
        },
        _ => None,
    };
    // Grouped by expert (a stable sort keeps each expert's tokens in row order): one list for
    // the whole step instead of one per expert.
    picks.sort_by_key(|p| p.expert);
    // (expert, its picks), in expert order.
    let groups: Vec<(usize, &[Pick])> = picks
        .chunk_by(|a, b| a.expert == b.expert)
        .map(|g| (g[0].expert, g))
        .collect();
    // Counted here, on the caller, rather than by the tasks: the counters of a layer share a
    // cache line that the threads would otherwise pass back and forth.
    let mut bytes = block.router.weight_bytes();
    for &(e, tokens) in &groups {
        engine.stats.record_expert(layer, e, tokens.len());
        bytes += block.experts[e].weight_bytes();
    }
    if let Some(shared) = &block.shared {
        bytes += shared.mlp.weight_bytes() + shared.gate.as_ref().map_or(0, |g| g.weight_bytes());
    }
    engine.stats.add_bytes_read(bytes, 0);
    let weights = cfg.hidden_size * cfg.expert_ffn;
    let ids: Vec<usize> = groups.iter().map(|g| g.0).collect();
    // Outputs are mixed in expert order afterwards, so results don't depend on scheduling
    // (nor on how many experts the cache held at once, nor on where each expert ran).
    let outputs = match &engine.tier {
        Some(tiered) => tiered::run(engine, tiered, layer, block, x, &groups, next, device_next)?,
        None => service.run(layer, block, &ids, next, |start, mlps| {
            let tasks: Vec<_> = groups[start..start + mlps.len()]
                .iter()
                .zip(mlps)
                .map(|(&(_, tokens), &mlp)| (tokens, mlp))
                .collect();
            be.run_tasks(
                Tasks::Matrices { weights },
                tasks,
                |t| t.0.len(),
                |(tokens, mlp)| {
                    let rows: Vec<usize> = tokens.iter().map(|p| p.row).collect();
                    engine.gated_mlp(mlp, &be.select_rows(x, &rows))
                },
            )
        })?,
    };
    let mut out = be.zeros(be.rows(x), cfg.hidden_size);
    for (&(_, tokens), ys) in groups.iter().zip(&outputs) {
        be.mix_rows(&mut out, ys, tokens);
    }
    if let Some(shared) = &block.shared {
        let ys = engine.gated_mlp(&shared.mlp, x);
        match &shared.gate {
            Some(gate) => {
                let gates = engine.linear(gate, x);
                be.add_gated(&mut out, &ys, &gates);
            }
            None => be.add(&mut out, &ys),
        }
    }
    Ok(out)
}

/// Pre-gating: layer `next`'s router probabilities for every row, applied to the hidden state
/// entering this layer's feed-forward (normalized with `next`'s norm); `None` when `next` is
/// not a sparse layer.
fn pregate_probs<B: Backend>(
    engine: &Engine<B>,
    next: usize,
    residual: &B::Act,
) -> Option<Vec<f32>> {
    let layer = engine.model().weights.layers.get(next)?;
    let Ffn::Moe(block) = &layer.ffn else {
        return None;
    };
    let be = engine.backend();
    let normed = engine.pre_norm(&layer.ffn_norm, residual);
    let logits = be.linear(&block.router, &normed);
    let mut probs = be.to_host(&logits).into_owned();
    for row in probs.chunks_mut(block.router.out_features.max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        row.iter_mut().for_each(|v| {
            *v = (*v - max).exp();
            sum += *v;
        });
        row.iter_mut().for_each(|v| *v /= sum);
    }
    Some(probs)
}
