//! Calibration of the output head. Every layer's GPTQ reads its input's Hessian; the head's
//! input is the final norm's output (through a tied head's transform), which no layer records.
//! It is computed here from the last layer's outputs on the calibration windows, as the
//! quantized layers left them, so GPTQ can round the head (and with it a tied embedding table)
//! against the error it makes in the logits rather than row by row.

use super::calibrate::xtx;
use crate::backend::cpu::backend::{CpuBackend, Rows};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::Model;
use std::sync::Arc;

/// `XᵀX` of the head's input over the calibration windows' last hidden states `hidden`, and the
/// number of rows it sums. `model` must be final up to the head: its final norm and head
/// transform are the ones the head will read through.
pub fn head_hessian(
    model: Model,
    hidden: &[Rows],
    threads: usize,
) -> Result<(Model, Vec<f64>, usize)> {
    let frame = Arc::new(model);
    let k = frame.weights.head().in_features;
    let mut h = vec![0f64; k * k];
    let mut tokens = 0;
    {
        let engine = Engine::with_backend(frame.clone(), CpuBackend::new(threads)?);
        for x in hidden {
            let y = engine.head_input_of(Rows::new(x.data.clone(), x.cols));
            if y.cols != k {
                return Err(Error::invalid(format!(
                    "head calibration: the head reads {k} features, its input has {}",
                    y.cols
                )));
            }
            let rows = y.data.len() / k;
            // Summed over the windows in f64, which f32 sums of ~16 000 tokens would not keep.
            for (acc, v) in h.iter_mut().zip(xtx(&y.data, rows, k)) {
                *acc += v as f64;
            }
            tokens += rows;
        }
    }
    let model = Arc::try_unwrap(frame)
        .map_err(|_| Error::invalid("model still shared after the head's calibration"))?;
    Ok((model, h, tokens))
}
