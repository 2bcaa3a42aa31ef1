//! The sparse feed-forward block: route each token to its top-k experts, run every chosen expert
//! once on all the tokens that chose it, and mix the outputs by the routing weights.

use super::Engine;
use crate::backend::cpu::ops::{sigmoid, softmax};
use crate::backend::cpu::parallel::{largest_first, serially};
use crate::model::weights::MoeBlock;

/// Below this many weights per expert matrix, experts run in parallel with each other.
const SMALL_EXPERT_WEIGHTS: usize = 1 << 20;

/// Top-k experts of one token and their mixing weights.
pub fn route(router_logits: &[f32], top_k: usize, renormalize: bool) -> Vec<(usize, f32)> {
    let mut chosen = Vec::with_capacity(top_k);
    route_into(
        router_logits,
        top_k,
        renormalize,
        &mut Vec::new(),
        &mut chosen,
    );
    chosen
}

/// [`route`] into `chosen`, with `probs` as scratch: a batch routes every token without
/// allocating.
fn route_into(
    router_logits: &[f32],
    top_k: usize,
    renormalize: bool,
    probs: &mut Vec<f32>,
    chosen: &mut Vec<(usize, f32)>,
) {
    probs.clear();
    probs.extend_from_slice(router_logits);
    softmax(probs);
    chosen.clear();
    // k passes of a max scan (k and the expert count are small; no sort, no index vector).
    // Ties go to the lower expert index, as torch.topk does in practice.
    for _ in 0..top_k.min(probs.len()) {
        let mut best: Option<usize> = None;
        for (e, p) in probs.iter().enumerate() {
            let taken = chosen.iter().any(|c| c.0 == e);
            if !taken && best.is_none_or(|b| p.total_cmp(&probs[b]).is_gt()) {
                best = Some(e);
            }
        }
        if let Some(e) = best {
            chosen.push((e, probs[e]));
        }
    }
    if renormalize {
        let sum: f32 = chosen.iter().map(|c| c.1).sum();
        chosen.iter_mut().for_each(|c| c.1 /= sum);
    }
}

/// One token's pick of one expert.
#[derive(Clone, Copy)]
pub struct Pick {
    expert: usize,
    row: usize,
    weight: f32,
}

/// Every pick of rows `first_row..`, given their router logits (`rows × experts`), in row
/// order.
pub fn route_rows(
    logits: &[f32],
    experts: usize,
    top_k: usize,
    renormalize: bool,
    first_row: usize,
) -> Vec<Pick> {
    let mut picks = Vec::with_capacity(logits.len() / experts.max(1) * top_k);
    let (mut probs, mut chosen) = (Vec::with_capacity(experts), Vec::with_capacity(top_k));
    for (r, row_logits) in logits.chunks_exact(experts.max(1)).enumerate() {
        route_into(row_logits, top_k, renormalize, &mut probs, &mut chosen);
        picks.extend(chosen.iter().map(|&(expert, weight)| Pick {
            expert,
            row: first_row + r,
            weight,
        }));
    }
    picks
}

/// The block on normalized rows `x`, given every token's picks ([`route_rows`]).
pub fn forward(
    engine: &Engine,
    layer: usize,
    block: &MoeBlock,
    x: &[f32],
    rows: usize,
    mut picks: Vec<Pick>,
) -> Vec<f32> {
    let cfg = &engine.model().config;
    let h = cfg.hidden_size;
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
        bytes += shared.mlp.weight_bytes() + shared.gate.weight_bytes();
    }
    engine.stats.add_bytes_read(bytes, 0);
    let small = h * cfg.expert_ffn < SMALL_EXPERT_WEIGHTS;
    let run = |(e, tokens): (usize, &[Pick])| {
        let mut xs = Vec::with_capacity(tokens.len() * h);
        for p in tokens {
            xs.extend_from_slice(&x[p.row * h..(p.row + 1) * h]);
        }
        engine.gated_mlp(&block.experts[e], &xs, tokens.len())
    };
    // Small experts run side by side on the pool (one small matmul alone would not fill it),
    // those with the most tokens first: in a batched step one expert may have eight tokens and
    // the next one. Large ones run one after another, each matmul spread over the pool, so
    // weights stream from memory without the threads competing. Outputs are mixed in expert
    // order afterwards, so results don't depend on scheduling.
    let outputs: Vec<Vec<f32>> = if small {
        largest_first(
            groups.len(),
            |i| groups[i].1.len(),
            |i| serially(|| run(groups[i])),
        )
    } else {
        groups.iter().map(|&g| run(g)).collect()
    };
    let mut out = vec![0f32; rows * h];
    for (&(_, tokens), ys) in groups.iter().zip(&outputs) {
        for (p, y) in tokens.iter().zip(ys.chunks_exact(h)) {
            out[p.row * h..(p.row + 1) * h]
                .iter_mut()
                .zip(y)
                .for_each(|(o, v)| *o += p.weight * v);
        }
    }
    if let Some(shared) = &block.shared {
        let ys = engine.gated_mlp(&shared.mlp, x, rows);
        let gates = engine.linear(&shared.gate, x, rows);
        for r in 0..rows {
            let g = sigmoid(gates[r]);
            out[r * h..(r + 1) * h]
                .iter_mut()
                .zip(&ys[r * h..(r + 1) * h])
                .for_each(|(o, v)| *o += g * v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_picks_top_k_and_renormalizes() {
        let r = route(&[0.0, 2.0, 1.0, -1.0], 2, true);
        assert_eq!(r.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2]);
        let sum: f32 = r.iter().map(|c| c.1).sum();
        assert!((sum - 1.0).abs() < 1e-6);
        let e = 1f32.exp();
        assert!((r[0].1 - e / (e + 1.0)).abs() < 1e-6);
        let r = route(&[0.0, 2.0, 1.0, -1.0], 2, false);
        assert!(r.iter().map(|c| c.1).sum::<f32>() < 0.95);
        // Ties: the lower expert index first.
        let ids = |r: Vec<(usize, f32)>| r.iter().map(|c| c.0).collect::<Vec<_>>();
        assert_eq!(ids(route(&[3.0, 1.0, 3.0, 3.0], 2, true)), vec![0, 2]);
        assert_eq!(ids(route(&[1.0, 3.0, 3.0, 0.0], 3, true)), vec![1, 2, 0]);
    }
}
