//! Next-layer prediction: when layer `l` has routed, guess which experts layer `l + 1` will
//! choose, so their blocks can be read while layer `l` computes. Two sources, per token:
//! - pre-gating: layer `l + 1`'s router applied to the hidden state entering layer `l`'s
//!   feed-forward (normalized with layer `l + 1`'s norm): the residual stream changes little
//!   between adjacent layers, so the router mostly agrees with what it will see;
//! - transitions: the experts most often chosen at `l + 1` after the token's experts at `l`.
//!
//! A token's prediction is its pre-gating top-k plus the `extra` best experts by the two
//! sources' combined score. Precision and recall are counted per token (what decode sees).

use super::paths::PathStats;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PredictSource {
    /// Layer l+1's router on layer l's hidden state.
    Pregate,
    /// Layer l → l+1 transition counts.
    Transitions,
    /// Both: pre-gating's top-k plus the best of the combined score.
    Both,
}

/// Prediction quality so far, per token.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PredictionCounts {
    /// Experts predicted (summed over tokens and layers).
    pub predicted: u64,
    /// Experts actually chosen where a prediction had been made.
    pub actual: u64,
    /// Of those, predicted.
    pub correct: u64,
}

impl PredictionCounts {
    pub fn recall(&self) -> f64 {
        self.correct as f64 / self.actual.max(1) as f64
    }
    pub fn precision(&self) -> f64 {
        self.correct as f64 / self.predicted.max(1) as f64
    }
}

pub struct Predictor {
    pub source: PredictSource,
    /// Experts predicted per token beyond the pre-gating top-k (or in all, for transitions:
    /// `top_k + extra`).
    pub extra: usize,
    top_k: usize,
    /// The last prediction made: (layer, per row its predicted experts).
    pending: Mutex<Option<(usize, Vec<Vec<usize>>)>>,
    predicted: AtomicU64,
    actual: AtomicU64,
    correct: AtomicU64,
}

impl Predictor {
    pub fn new(source: PredictSource, top_k: usize, extra: usize) -> Predictor {
        Predictor {
            source,
            extra,
            top_k,
            pending: Mutex::new(None),
            predicted: AtomicU64::new(0),
            actual: AtomicU64::new(0),
            correct: AtomicU64::new(0),
        }
    }

    /// Per row, the experts predicted for `layer + 1` from the row's choices at `layer` and
    /// (where given) its pre-gating router probabilities for `layer + 1` (`experts` per row).
    pub fn predict(
        &self,
        stats: &PathStats,
        layer: usize,
        rows: &[Vec<usize>],
        pregate_probs: Option<&[f32]>,
    ) -> Vec<Vec<usize>> {
        let e_n = stats.experts();
        let mut out = Vec::with_capacity(rows.len());
        for (r, chosen) in rows.iter().enumerate() {
            let probs = pregate_probs.map(|p| &p[r * e_n..(r + 1) * e_n]);
            // Transition score: P(e' at l+1 | the row's experts at l), averaged over them.
            let mut trans = vec![0f64; e_n];
            for &e in chosen {
                let total: u64 = (0..e_n).map(|b| stats.transition(layer, e, b)).sum();
                if total > 0 {
                    for (b, t) in trans.iter_mut().enumerate() {
                        *t += stats.transition(layer, e, b) as f64 / total as f64;
                    }
                }
            }
            trans
                .iter_mut()
                .for_each(|t| *t /= chosen.len().max(1) as f64);
            let mut picked: Vec<usize> = Vec::new();
            let (base, score): (Vec<f64>, Vec<f64>) = match (self.source, probs) {
                (PredictSource::Transitions, _) | (_, None) => (trans.clone(), trans),
                (PredictSource::Pregate, Some(p)) => {
                    let p: Vec<f64> = p.iter().map(|&v| v as f64).collect();
                    (p.clone(), p)
                }
                (PredictSource::Both, Some(p)) => {
                    let p: Vec<f64> = p.iter().map(|&v| v as f64).collect();
                    let mix = p.iter().zip(&trans).map(|(a, b)| a + b).collect();
                    (p, mix)
                }
            };
            picked.extend(top_n(&base, self.top_k));
            let more = top_n(&score, self.top_k + self.extra);
            for e in more {
                if picked.len() >= self.top_k + self.extra {
                    break;
                }
                if !picked.contains(&e) {
                    picked.push(e);
                }
            }
            out.push(picked);
        }
        out
    }

    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Remembers the prediction made for `layer`.
    pub fn set_pending(&self, layer: usize, rows: Vec<Vec<usize>>) {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some((layer, rows));
    }

    /// Scores the pending prediction for `layer` against what the rows chose.
    pub fn score(&self, layer: usize, rows: &[Vec<usize>]) {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some((pl, predicted)) = pending else {
            return;
        };
        if pl != layer || predicted.len() != rows.len() {
            return;
        }
        let (mut p, mut a, mut c) = (0, 0, 0);
        for (guess, chosen) in predicted.iter().zip(rows) {
            p += guess.len() as u64;
            a += chosen.len() as u64;
            c += chosen.iter().filter(|e| guess.contains(e)).count() as u64;
        }
        self.predicted.fetch_add(p, Ordering::Relaxed);
        self.actual.fetch_add(a, Ordering::Relaxed);
        self.correct.fetch_add(c, Ordering::Relaxed);
    }

    pub fn counts(&self) -> PredictionCounts {
        PredictionCounts {
            predicted: self.predicted.load(Ordering::Relaxed),
            actual: self.actual.load(Ordering::Relaxed),
            correct: self.correct.load(Ordering::Relaxed),
        }
    }
}

/// Indices of the `n` largest values, largest first (ties: lower index).
fn top_n(v: &[f64], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(n);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicts_from_transitions_and_pregating_and_scores() {
        let stats = PathStats::new(2, 4);
        // Tokens at expert 0 go on to 3 and 2.
        for _ in 0..5 {
            stats.observe(0, &[vec![0, 1]]);
            stats.observe(1, &[vec![3, 2]]);
            stats.end_step();
        }
        let t = Predictor::new(PredictSource::Transitions, 2, 0);
        assert_eq!(t.predict(&stats, 0, &[vec![0, 1]], None), vec![vec![2, 3]]);
        let probs = [0.1, 0.6, 0.25, 0.05];
        let p = Predictor::new(PredictSource::Pregate, 2, 1);
        assert_eq!(
            p.predict(&stats, 0, &[vec![0]], Some(&probs)),
            vec![vec![1, 2, 0]]
        );
        let b = Predictor::new(PredictSource::Both, 2, 1);
        let guess = b.predict(&stats, 0, &[vec![0]], Some(&probs));
        assert_eq!(guess, vec![vec![1, 2, 3]]);
        b.set_pending(1, guess);
        b.score(1, &[vec![3, 0]]);
        let c = b.counts();
        assert_eq!((c.predicted, c.actual, c.correct), (3, 2, 1));
        assert!((c.recall() - 0.5).abs() < 1e-12 && (c.precision() - 1.0 / 3.0).abs() < 1e-12);
    }
}
