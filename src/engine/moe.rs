//! The sparse feed-forward block: route each token to its top-k experts, run every chosen expert
//! once on all the tokens that chose it, and mix the outputs by the routing weights.

use super::Engine;
use crate::backend::{Backend, Pick, Tasks};
use crate::error::Result;
use crate::model::weights::MoeBlock;

/// The block on normalized rows `x`, given every token's picks (the backend's `route`).
pub fn forward<B: Backend>(
    engine: &Engine<B>,
    layer: usize,
    block: &MoeBlock,
    x: &B::Act,
    mut picks: Vec<Pick>,
) -> Result<B::Act> {
    let cfg = &engine.model().config;
    let be = engine.backend();
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
        // A mapped expert's block is checked the first time it runs.
        block.experts[e].ensure_verified()?;
    }
    if let Some(shared) = &block.shared {
        bytes += shared.mlp.weight_bytes() + shared.gate.weight_bytes();
    }
    engine.stats.add_bytes_read(bytes, 0);
    let weights = cfg.hidden_size * cfg.expert_ffn;
    // Outputs are mixed in expert order afterwards, so results don't depend on scheduling.
    let outputs = be.run_tasks(
        Tasks::Matrices { weights },
        groups.clone(),
        |g| g.1.len(),
        |(e, tokens)| {
            let rows: Vec<usize> = tokens.iter().map(|p| p.row).collect();
            engine.gated_mlp(&block.experts[e], &be.select_rows(x, &rows))
        },
    );
    let mut out = be.zeros(be.rows(x), cfg.hidden_size);
    for (&(_, tokens), ys) in groups.iter().zip(&outputs) {
        be.mix_rows(&mut out, ys, tokens);
    }
    if let Some(shared) = &block.shared {
        let ys = engine.gated_mlp(&shared.mlp, x);
        let gates = engine.linear(&shared.gate, x);
        be.add_gated(&mut out, &ys, &gates);
    }
    Ok(out)
}
