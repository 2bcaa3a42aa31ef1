//! The router's top-k: softmax over a token's router logits, the k largest (ties to the lower
//! expert index, as torch.topk does in practice), optionally renormalized.

use super::ops::softmax;
use crate::backend::Pick;

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
