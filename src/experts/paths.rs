//! Activation-path statistics: per layer how many tokens chose each expert, and per pair of
//! adjacent layers how often a token that chose expert `e` at layer `l` chose `e'` at `l + 1`.
//! Kept online by the runtime (every MoE step feeds them), saved and loaded as JSON
//! (`edgemoe profile`), and read by placement (`stats` policy) and prediction.

use crate::backend::Pick;
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The statistics as saved: `counts[l][e]`, `transitions[l][e][e2]` (layer `l` to `l + 1`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PathProfile {
    pub layers: usize,
    pub experts: usize,
    /// Tokens seen (each token counted once per layer in `counts`, `top_k` times in all).
    pub tokens: u64,
    pub counts: Vec<Vec<u64>>,
    pub transitions: Vec<Vec<Vec<u64>>>,
}

impl PathProfile {
    pub fn load(path: &Path) -> Result<PathProfile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let p: PathProfile = serde_json::from_str(&text).map_err(|e| {
            Error::invalid(format!("{}: not an expert profile: {e}", path.display()))
        })?;
        let shape_ok = p.counts.len() == p.layers
            && p.counts.iter().all(|c| c.len() == p.experts)
            && p.transitions.len() == p.layers.saturating_sub(1)
            && p.transitions
                .iter()
                .all(|t| t.len() == p.experts && t.iter().all(|r| r.len() == p.experts));
        if !shape_ok {
            return Err(Error::invalid(format!(
                "{}: expert profile arrays do not match its {} layers × {} experts",
                path.display(),
                p.layers,
                p.experts
            )));
        }
        Ok(p)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string(self).map_err(|e| Error::invalid(e.to_string()))?;
        std::fs::write(path, json).map_err(|e| Error::io(path, e))
    }
}

/// The online statistics; every counter is an atomic so readers never block the forward pass.
pub struct PathStats {
    layers: usize,
    experts: usize,
    tokens: AtomicU64,
    counts: Vec<AtomicU64>,
    transitions: Vec<AtomicU64>,
    /// The previous MoE layer's choices of this step, per row: (layer, row → experts).
    previous: Mutex<Option<(usize, Vec<Vec<usize>>)>>,
}

fn zeros(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// Each row's chosen experts, from a step's picks.
pub fn experts_per_row(picks: &[Pick]) -> Vec<Vec<usize>> {
    let rows = picks.iter().map(|p| p.row + 1).max().unwrap_or(0);
    let mut out = vec![Vec::new(); rows];
    for p in picks {
        out[p.row].push(p.expert);
    }
    out
}

impl PathStats {
    pub fn new(layers: usize, experts: usize) -> PathStats {
        PathStats {
            layers,
            experts,
            tokens: AtomicU64::new(0),
            counts: zeros(layers * experts),
            transitions: zeros(layers.saturating_sub(1) * experts * experts),
            previous: Mutex::new(None),
        }
    }

    /// Starts from a saved profile (its counts become the prior the online ones add to).
    pub fn from_profile(p: &PathProfile) -> PathStats {
        let s = PathStats::new(p.layers, p.experts);
        s.tokens.store(p.tokens, Ordering::Relaxed);
        for (c, v) in s.counts.iter().zip(p.counts.iter().flatten()) {
            c.store(*v, Ordering::Relaxed);
        }
        let flat = p.transitions.iter().flatten().flatten();
        for (c, v) in s.transitions.iter().zip(flat) {
            c.store(*v, Ordering::Relaxed);
        }
        s
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Records a step's routing at `layer`; rows are the step's tokens.
    pub fn observe(&self, layer: usize, rows: &[Vec<usize>]) {
        if layer >= self.layers {
            return;
        }
        let e_n = self.experts;
        for row in rows {
            for &e in row {
                self.counts[layer * e_n + e].fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut prev = self.previous.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((pl, prows)) = prev.as_ref() {
            if *pl + 1 == layer {
                let base = pl * e_n * e_n;
                for (a, b) in prows.iter().zip(rows) {
                    for &e in a {
                        for &e2 in b {
                            self.transitions[base + e * e_n + e2].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        if layer == 0 || prev.is_none() {
            self.tokens.fetch_add(rows.len() as u64, Ordering::Relaxed);
        }
        *prev = Some((layer, rows.to_vec()));
    }

    /// Ends a step: the next step's first layer has no predecessor.
    pub fn end_step(&self) {
        *self.previous.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn count(&self, layer: usize, expert: usize) -> u64 {
        self.counts
            .get(layer * self.experts + expert)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Tokens routed at `layer` in all (top-k per token).
    pub fn layer_total(&self, layer: usize) -> u64 {
        (0..self.experts).map(|e| self.count(layer, e)).sum()
    }

    pub fn transition(&self, layer: usize, from: usize, to: usize) -> u64 {
        let e_n = self.experts;
        self.transitions
            .get(layer * e_n * e_n + from * e_n + to)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn snapshot(&self) -> PathProfile {
        let e_n = self.experts;
        PathProfile {
            layers: self.layers,
            experts: e_n,
            tokens: self.tokens.load(Ordering::Relaxed),
            counts: (0..self.layers)
                .map(|l| (0..e_n).map(|e| self.count(l, e)).collect())
                .collect(),
            transitions: (0..self.layers.saturating_sub(1))
                .map(|l| {
                    (0..e_n)
                        .map(|a| (0..e_n).map(|b| self.transition(l, a, b)).collect())
                        .collect()
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_choices_and_transitions_and_round_trips() {
        let s = PathStats::new(3, 4);
        s.observe(0, &[vec![0, 1], vec![2, 3]]);
        s.observe(1, &[vec![1, 2], vec![2, 0]]);
        s.end_step();
        s.observe(2, &[vec![3, 1]]);
        let p = s.snapshot();
        assert_eq!(p.counts[0], vec![1, 1, 1, 1]);
        assert_eq!(p.counts[1], vec![1, 1, 2, 0]);
        assert_eq!(p.transitions[0][0], vec![0, 1, 1, 0]);
        assert_eq!(p.transitions[0][3], vec![1, 0, 1, 0]);
        assert!(
            p.transitions[1].iter().flatten().all(|&c| c == 0),
            "a new step"
        );
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.json");
        p.save(&path).unwrap();
        assert_eq!(
            PathStats::from_profile(&PathProfile::load(&path).unwrap()).snapshot(),
            p
        );
    }
}
