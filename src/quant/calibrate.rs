//! Calibration: run the f32 engine over text and collect, for every linear layer's input, the
//! per-channel max |x|, the Hessian proxy H = XᵀX, and a reservoir of input rows (for the α
//! search). Layers that read the same tensor share one record (q/k/v; an expert's gate/up); an
//! expert's record sees only the tokens routed to it.

use crate::backend::cpu::matmul::matmul;
use crate::engine::LinearObserver;
use crate::model::weights::Linear;
use crate::util::rng::SplitMix64;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Input rows kept per record for the α search.
const SAMPLE_ROWS: usize = 256;

#[derive(Debug, Clone)]
pub struct InputStats {
    pub k: usize,
    pub tokens: usize,
    pub max_abs: Vec<f32>,
    /// `k × k`: the sum of every call's XᵀX (each from the f32 kernel). f32 halves what the
    /// largest records hold (a Mixtral layer's eight down-projection inputs).
    pub hessian: Vec<f32>,
    /// Up to SAMPLE_ROWS input rows, `rows × k` (reservoir sample over all tokens).
    pub samples: Vec<f32>,
    rng: SplitMix64,
}

impl InputStats {
    fn new(k: usize) -> Self {
        InputStats {
            k,
            tokens: 0,
            max_abs: vec![0.0; k],
            hessian: vec![0.0; k * k],
            samples: Vec::new(),
            rng: SplitMix64::new(k as u64),
        }
    }

    pub fn sample_rows(&self) -> usize {
        self.samples.len() / self.k
    }

    fn add(&mut self, x: &[f32], rows: usize, xtx: &[f32]) {
        let k = self.k;
        for r in 0..rows {
            let row = &x[r * k..(r + 1) * k];
            for (m, v) in self.max_abs.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
            let seen = self.tokens + r;
            if seen < SAMPLE_ROWS {
                self.samples.extend_from_slice(row);
            } else {
                let slot = (self.rng.next_u64() % (seen as u64 + 1)) as usize;
                if slot < SAMPLE_ROWS {
                    self.samples[slot * k..(slot + 1) * k].copy_from_slice(row);
                }
            }
        }
        for (h, &v) in self.hessian.iter_mut().zip(xtx) {
            *h += v;
        }
        self.tokens += rows;
    }
}

/// Which record a linear layer's input belongs to; `None` for inputs another layer records.
/// Under latent attention q_a_proj (or q_proj) and kv_a_proj_with_mqa read the layer's input;
/// q_b_proj and kv_b_proj have records of their own.
pub fn stats_key(name: &str) -> Option<String> {
    let (prefix, last) = name.rsplit_once('.').unwrap_or(("", name));
    match last {
        "q_proj" | "q_a_proj" => Some(format!("{prefix}.qkv_in")),
        "k_proj" | "v_proj" | "kv_a_proj_with_mqa" => None,
        "w1" | "gate_proj" => Some(format!("{prefix}.gate_up_in")),
        "w3" | "up_proj" => None,
        _ => Some(name.to_string()),
    }
}

/// The record a layer's input is found under (what `stats_key` gives its reader).
pub fn input_key(name: &str) -> String {
    let (prefix, last) = name.rsplit_once('.').unwrap_or(("", name));
    match last {
        "q_proj" | "k_proj" | "v_proj" | "q_a_proj" | "kv_a_proj_with_mqa" => {
            format!("{prefix}.qkv_in")
        }
        "w1" | "w3" | "gate_proj" | "up_proj" => format!("{prefix}.gate_up_in"),
        _ => name.to_string(),
    }
}

#[derive(Default)]
pub struct Calibrator {
    stats: Mutex<HashMap<String, InputStats>>,
    /// Off while the quantizer runs a layer only for its outputs.
    paused: AtomicBool,
}

impl LinearObserver for Calibrator {
    fn observe(&self, linear: &Linear, x: &[f32], rows: usize) {
        if self.paused.load(Ordering::Relaxed) {
            return;
        }
        let Some(key) = stats_key(&linear.name) else {
            return;
        };
        let k = linear.in_features;
        let xtx = xtx(x, rows, k);
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats
            .entry(key)
            .or_insert_with(|| InputStats::new(k))
            .add(x, rows, &xtx);
    }
}

/// Rows of XᵀX computed per kernel call: each block of rows only against the columns from its
/// own start on, since the matrix is symmetric.
const GRAM_BLOCK: usize = 64;

/// XᵀX (`k × k`) of `rows` input rows `x` (`rows × k`) through the f32 kernel: transpose once,
/// then (Xᵀ)(Xᵀ)ᵀ.
pub(crate) fn xtx(x: &[f32], rows: usize, k: usize) -> Vec<f32> {
    let mut xt = vec![0f32; k * rows];
    for r in 0..rows {
        for c in 0..k {
            xt[c * rows + r] = x[r * k + c];
        }
    }
    gram(&xt, k, rows)
}

/// XᵀX (`k × k`) from Xᵀ (`k × rows`): the upper triangle by blocks through the f32 kernel,
/// mirrored into the lower.
fn gram(xt: &[f32], k: usize, rows: usize) -> Vec<f32> {
    let mut g = vec![0f32; k * k];
    let mut block = vec![0f32; GRAM_BLOCK * k];
    for b0 in (0..k).step_by(GRAM_BLOCK) {
        let b = GRAM_BLOCK.min(k - b0);
        let n = k - b0;
        matmul(
            &xt[b0 * rows..(b0 + b) * rows],
            b,
            &xt[b0 * rows..],
            n,
            rows,
            None,
            &mut block[..b * n],
        );
        for i in 0..b {
            g[(b0 + i) * k + b0..(b0 + i + 1) * k].copy_from_slice(&block[i * n..(i + 1) * n]);
        }
    }
    for i in 0..k {
        for j in 0..i {
            g[i * k + j] = g[j * k + i];
        }
    }
    g
}

impl Calibrator {
    /// Stops or resumes recording.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// What was recorded so far, leaving the calibrator empty.
    pub fn take(&self) -> HashMap<String, InputStats> {
        std::mem::take(&mut *self.stats.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix64;

    #[test]
    fn gram_equals_the_plain_product() {
        let mut rng = SplitMix64::new(2);
        for (k, rows) in [(1, 3), (70, 5), (130, 33)] {
            let xt: Vec<f32> = (0..k * rows).map(|_| rng.normal()).collect();
            let g = gram(&xt, k, rows);
            for i in 0..k {
                for j in 0..k {
                    let want: f64 = (0..rows)
                        .map(|r| xt[i * rows + r] as f64 * xt[j * rows + r] as f64)
                        .sum();
                    assert!((g[i * k + j] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
                }
            }
        }
    }
}
