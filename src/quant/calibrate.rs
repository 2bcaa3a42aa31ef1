//! Calibration: run the f32 engine over text and collect, for every linear layer's input, the
//! per-channel max |x|, the Hessian proxy H = XᵀX, and a reservoir of input rows (for the α
//! search). Layers that read the same tensor share one record (q/k/v; an expert's gate/up); an
//! expert's record sees only the tokens routed to it.

use crate::backend::cpu::matmul::matmul;
use crate::engine::{BatchItem, Engine, LinearObserver, Logits};
use crate::error::Result;
use crate::model::weights::Linear;
use crate::util::rng::SplitMix64;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Input rows kept per record for the α search.
const SAMPLE_ROWS: usize = 256;

#[derive(Debug, Clone)]
pub struct InputStats {
    pub k: usize,
    pub tokens: usize,
    pub max_abs: Vec<f32>,
    /// `k × k`, accumulated in f64.
    pub hessian: Vec<f64>,
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
            *h += v as f64;
        }
        self.tokens += rows;
    }
}

/// Which record a linear layer's input belongs to; `None` for inputs another layer records.
pub fn stats_key(name: &str) -> Option<String> {
    let (prefix, last) = name.rsplit_once('.').unwrap_or(("", name));
    match last {
        "q_proj" => Some(format!("{prefix}.qkv_in")),
        "k_proj" | "v_proj" => None,
        "w1" | "gate_proj" => Some(format!("{prefix}.gate_up_in")),
        "w3" | "up_proj" => None,
        _ => Some(name.to_string()),
    }
}

/// The record a layer's input is found under (what `stats_key` gives its reader).
pub fn input_key(name: &str) -> String {
    let (prefix, last) = name.rsplit_once('.').unwrap_or(("", name));
    match last {
        "q_proj" | "k_proj" | "v_proj" => format!("{prefix}.qkv_in"),
        "w1" | "w3" | "gate_proj" | "up_proj" => format!("{prefix}.gate_up_in"),
        _ => name.to_string(),
    }
}

#[derive(Default)]
pub struct Calibrator {
    stats: Mutex<HashMap<String, InputStats>>,
}

impl LinearObserver for Calibrator {
    fn observe(&self, linear: &Linear, x: &[f32], rows: usize) {
        let Some(key) = stats_key(&linear.name) else {
            return;
        };
        let k = linear.in_features;
        // XᵀX through the f32 kernel: transpose once, then (Xᵀ)(Xᵀ)ᵀ.
        let mut xt = vec![0f32; k * rows];
        for r in 0..rows {
            for c in 0..k {
                xt[c * rows + r] = x[r * k + c];
            }
        }
        let mut xtx = vec![0f32; k * k];
        matmul(&xt, k, &xt, k, rows, None, &mut xtx);
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats
            .entry(key)
            .or_insert_with(|| InputStats::new(k))
            .add(x, rows, &xtx);
    }
}

impl Calibrator {
    pub fn into_stats(self) -> HashMap<String, InputStats> {
        self.stats.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs `tokens` through the model in windows of `ctx` (each from an empty cache) and returns
/// the collected statistics.
pub fn calibrate(
    model: Arc<crate::Model>,
    threads: usize,
    tokens: &[u32],
    ctx: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<HashMap<String, InputStats>> {
    if ctx < 2 {
        return Err(crate::error::Error::invalid(
            "the calibration window (--ctx) must be at least 2 tokens",
        ));
    }
    let calibrator = Arc::new(Calibrator::default());
    let engine = Engine::new(model, threads)?.with_observer(calibrator.clone());
    let windows: Vec<&[u32]> = tokens.chunks(ctx).filter(|w| w.len() >= 2).collect();
    for (i, w) in windows.iter().enumerate() {
        let mut cache = engine.new_cache();
        engine.forward(&mut [BatchItem {
            tokens: w,
            cache: &mut cache,
            logits: Logits::Last,
        }])?;
        progress(i + 1, windows.len());
    }
    drop(engine);
    let calibrator = Arc::try_unwrap(calibrator).unwrap_or_else(|arc| Calibrator {
        stats: Mutex::new(arc.stats.lock().map(|s| s.clone()).unwrap_or_default()),
    });
    Ok(calibrator.into_stats())
}
