//! The router's top-k: softmax over a token's router logits, the k largest (ties to the lower
//! expert index, as torch.topk does in practice), optionally renormalized.

use super::ops::softmax;
use crate::backend::Pick;
use crate::model::config::{GroupedSigmoid, SoftmaxGroups};

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

/// Every pick of rows `first_row..` under grouped sigmoid routing ([`GroupedSigmoid`]), given
/// their router logits (`rows × experts`) and the experts' correction bias: what transformers'
/// Glm4MoeTopkRouter computes, ties going to the lower index as in [`route`].
pub fn route_grouped_sigmoid(
    logits: &[f32],
    bias: &[f32],
    g: &GroupedSigmoid,
    (top_k, renormalize): (usize, bool),
    first_row: usize,
) -> Vec<Pick> {
    let experts = bias.len().max(1);
    let per_group = experts / g.n_group.max(1);
    let mut picks = Vec::with_capacity(logits.len() / experts * top_k);
    let (mut scores, mut choice) = (Vec::with_capacity(experts), Vec::with_capacity(experts));
    for (r, row) in logits.chunks_exact(experts).enumerate() {
        scores.clear();
        scores.extend(row.iter().map(|&l| 1.0 / (1.0 + (-l).exp())));
        choice.clear();
        choice.extend(scores.iter().zip(bias).map(|(s, b)| s + b));
        // A group's score: the sum of its two best choice values.
        let group_score: Vec<f32> = choice
            .chunks_exact(per_group)
            .map(|c| {
                let best = top_indices(c, 2);
                best.iter().map(|&i| c[i]).sum()
            })
            .collect();
        let groups = top_indices(&group_score, g.topk_group);
        for (i, v) in choice.iter_mut().enumerate() {
            if !groups.contains(&(i / per_group)) {
                *v = f32::NEG_INFINITY;
            }
        }
        let chosen = top_indices(&choice, top_k);
        let sum: f32 = chosen.iter().map(|&e| scores[e]).sum();
        picks.extend(chosen.iter().map(|&e| {
            let w = if renormalize {
                scores[e] / (sum + 1e-20)
            } else {
                scores[e]
            };
            Pick {
                expert: e,
                row: first_row + r,
                weight: w * g.routed_scaling_factor,
            }
        }));
    }
    picks
}

/// Every pick of rows `first_row..` under DeepSeek-V2's softmax routing ([`SoftmaxGroups`]),
/// given their router logits (`rows × experts`): what transformers' DeepseekV2TopkRouter
/// computes (a group's score is its best expert's; experts of other groups score 0), ties
/// going to the lower index as in [`route`].
pub fn route_grouped_softmax(
    logits: &[f32],
    experts: usize,
    g: &SoftmaxGroups,
    top_k: usize,
    first_row: usize,
) -> Vec<Pick> {
    let experts = experts.max(1);
    let per_group = experts / g.n_group.max(1);
    let mut picks = Vec::with_capacity(logits.len() / experts * top_k);
    for (r, row) in logits.chunks_exact(experts).enumerate() {
        let mut scores = row.to_vec();
        softmax(&mut scores);
        if g.n_group > 1 {
            let group_best: Vec<f32> = scores
                .chunks_exact(per_group)
                .map(|c| c.iter().copied().fold(f32::NEG_INFINITY, f32::max))
                .collect();
            let groups = top_indices(&group_best, g.topk_group);
            for (i, s) in scores.iter_mut().enumerate() {
                if !groups.contains(&(i / per_group)) {
                    *s = 0.0;
                }
            }
        }
        picks.extend(top_indices(&scores, top_k).into_iter().map(|e| Pick {
            expert: e,
            row: first_row + r,
            weight: scores[e] * g.routed_scaling_factor,
        }));
    }
    picks
}

/// Indices of the `k` largest values, largest first, ties to the lower index.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut chosen: Vec<usize> = Vec::with_capacity(k);
    for _ in 0..k.min(values.len()) {
        let best = (0..values.len())
            .filter(|i| !chosen.contains(i))
            .reduce(|b, i| {
                if values[i].total_cmp(&values[b]).is_gt() {
                    i
                } else {
                    b
                }
            });
        chosen.extend(best);
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Groups {0,1}, {2,3}, {4,5}: the bias steers the choice (expert 5 over 4) but not the
    /// weights; only the best group's experts can be chosen.
    #[test]
    fn grouped_sigmoid_chooses_within_the_best_groups() {
        let logits = [2.0, 1.9, 0.0, 3.0, 1.0, 0.9];
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.5];
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let g = GroupedSigmoid {
            n_group: 3,
            topk_group: 1,
            routed_scaling_factor: 2.5,
        };
        // Group sums of the two best: {0,1} 1.75, {2,3} 1.45, {4,5} 1.94 → only group 2.
        let picks = route_grouped_sigmoid(&logits, &bias, &g, (2, false), 7);
        let ids: Vec<usize> = picks.iter().map(|p| p.expert).collect();
        assert_eq!(ids, vec![5, 4]);
        assert!((picks[0].weight - 2.5 * sig(0.9)).abs() < 1e-6);
        assert!(picks.iter().all(|p| p.row == 7));
        let g = GroupedSigmoid { topk_group: 3, ..g };
        let picks = route_grouped_sigmoid(&logits, &bias, &g, (2, true), 0);
        // Every group open: the biased 5 (1.21), then 3 (0.95).
        let ids: Vec<usize> = picks.iter().map(|p| p.expert).collect();
        assert_eq!(ids, vec![5, 3]);
        let sum: f32 = picks.iter().map(|p| p.weight).sum();
        assert!((sum - 2.5).abs() < 1e-5, "{sum}");
    }

    /// Groups {0,1}, {2,3}, {4,5}: group scores are the best single softmax score; the
    /// chosen experts' plain scores, times the factor, are the weights.
    #[test]
    fn grouped_softmax_chooses_within_the_best_groups() {
        let logits = [2.0, 1.9, 0.0, 3.0, 1.0, 2.9];
        let mut p = logits.to_vec();
        softmax(&mut p);
        let g = SoftmaxGroups {
            n_group: 3,
            topk_group: 2,
            routed_scaling_factor: 1.5,
        };
        // Best of each group: 2.0, 3.0, 2.9 → groups 1 and 2; then 3 and 5.
        let picks = route_grouped_softmax(&logits, 6, &g, 2, 4);
        let ids: Vec<usize> = picks.iter().map(|p| p.expert).collect();
        assert_eq!(ids, vec![3, 5]);
        assert!((picks[0].weight - 1.5 * p[3]).abs() < 1e-7);
        assert!((picks[1].weight - 1.5 * p[5]).abs() < 1e-7);
        assert!(picks.iter().all(|p| p.row == 4));
        // Greedy (one group): the top two over all, 3 then 5, 0 third.
        let greedy = SoftmaxGroups {
            n_group: 1,
            topk_group: 1,
            ..g
        };
        let picks = route_grouped_softmax(&logits, 6, &greedy, 3, 0);
        let ids: Vec<usize> = picks.iter().map(|p| p.expert).collect();
        assert_eq!(ids, vec![3, 5, 0]);
        // One group only: expert 0 of group 0 would be third overall but is shut out.
        let one = SoftmaxGroups { topk_group: 1, ..g };
        let ids: Vec<usize> = route_grouped_softmax(&logits, 6, &one, 2, 0)
            .iter()
            .map(|p| p.expert)
            .collect();
        assert_eq!(ids, vec![3, 2]);
    }

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
