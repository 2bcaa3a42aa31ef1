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
    let mut probs = router_logits.to_vec();
    softmax(&mut probs);
    // k passes of a max scan (k and the expert count are small; no sort, no index vector).
    // Ties go to the lower expert index, as torch.topk does in practice.
    let mut chosen: Vec<(usize, f32)> = Vec::with_capacity(top_k);
    for _ in 0..top_k.min(probs.len()) {
        let best = (0..probs.len())
            .filter(|e| chosen.iter().all(|c| c.0 != *e))
            .reduce(|a, b| {
                if probs[b].total_cmp(&probs[a]).is_gt() {
                    b
                } else {
                    a
                }
            });
        if let Some(e) = best {
            chosen.push((e, probs[e]));
        }
    }
    if renormalize {
        let sum: f32 = chosen.iter().map(|c| c.1).sum();
        chosen.iter_mut().for_each(|c| c.1 /= sum);
    }
    chosen
}

pub fn forward(
    engine: &Engine,
    layer: usize,
    block: &MoeBlock,
    x: &[f32],
    rows: usize,
) -> Vec<f32> {
    let cfg = &engine.model().config;
    let h = cfg.hidden_size;
    let logits = engine.linear(&block.router, x, rows);
    let e_count = block.experts.len();
    // Tokens (row, weight) per expert.
    let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e_count];
    for r in 0..rows {
        for (e, wgt) in route(
            &logits[r * e_count..(r + 1) * e_count],
            cfg.top_k,
            cfg.norm_topk_prob,
        ) {
            assigned[e].push((r, wgt));
        }
    }
    let chosen: Vec<usize> = (0..e_count).filter(|&e| !assigned[e].is_empty()).collect();
    // Counted here, on the caller, rather than by the tasks: the counters of a layer share a
    // cache line that the threads would otherwise pass back and forth.
    let mut bytes = block.router.weight_bytes();
    for &e in &chosen {
        engine.stats.record_expert(layer, e, assigned[e].len());
        bytes += block.experts[e].weight_bytes();
    }
    if let Some(shared) = &block.shared {
        bytes += shared.mlp.weight_bytes() + shared.gate.weight_bytes();
    }
    engine.stats.add_bytes_read(bytes, 0);
    let small = h * cfg.expert_ffn < SMALL_EXPERT_WEIGHTS;
    let run = |e: usize| {
        let tokens = &assigned[e];
        let mut xs = Vec::with_capacity(tokens.len() * h);
        for &(r, _) in tokens {
            xs.extend_from_slice(&x[r * h..(r + 1) * h]);
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
            chosen.len(),
            |i| assigned[chosen[i]].len(),
            |i| serially(|| run(chosen[i])),
        )
    } else {
        chosen.iter().map(|&e| run(e)).collect()
    };
    let mut out = vec![0f32; rows * h];
    for (&e, ys) in chosen.iter().zip(&outputs) {
        for (i, &(r, wgt)) in assigned[e].iter().enumerate() {
            let y = &ys[i * h..(i + 1) * h];
            out[r * h..(r + 1) * h]
                .iter_mut()
                .zip(y)
                .for_each(|(o, v)| *o += wgt * v);
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
