//! Calibration text run through a model one decoder layer at a time (GPTQ's sequential
//! procedure): the hidden states of every calibration window are kept between layers, so only
//! the layer being quantized needs f32 weights, Hessians and input samples at any moment.

use super::calibrate::{Calibrator, InputStats};
use crate::backend::cpu::backend::{CpuBackend, Rows};
use crate::engine::{BatchItem, Engine, Logits};
use crate::error::{Error, Result};
use crate::model::weights::Layer;
use crate::model::Model;
use std::collections::HashMap;
use std::sync::Arc;

pub struct LayerRunner {
    engine: Engine<CpuBackend>,
    calibrator: Arc<Calibrator>,
    windows: Vec<Vec<u32>>,
    /// Every window's input to the next layer, `tokens × hidden`.
    hidden: Vec<Rows>,
}

impl LayerRunner {
    /// `frame` is the model without its layers (embeddings, config); the windows are `ctx`
    /// tokens of `calib` each (a shorter last one is kept if it has 2 tokens).
    pub fn new(frame: Arc<Model>, threads: usize, calib: &[u32], ctx: usize) -> Result<Self> {
        if ctx < 2 {
            return Err(Error::invalid(
                "the calibration window (--ctx) must be at least 2 tokens",
            ));
        }
        let calibrator = Arc::new(Calibrator::default());
        let backend = CpuBackend::new(threads)?;
        let engine = Engine::with_backend(frame, backend).with_observer(calibrator.clone());
        let windows: Vec<Vec<u32>> = calib
            .chunks(ctx)
            .filter(|w| w.len() >= 2)
            .map(<[u32]>::to_vec)
            .collect();
        let hidden = windows
            .iter()
            .map(|w| engine.embed_tokens(w, 0))
            .collect::<Result<Vec<_>>>()?;
        Ok(LayerRunner {
            engine,
            calibrator,
            windows,
            hidden,
        })
    }

    /// Runs `layer` (as layer `li`) on every window's current input, recording the inputs of
    /// its linears; returns the records and the layer's outputs.
    pub fn observe(
        &self,
        li: usize,
        layer: &Layer,
    ) -> Result<(HashMap<String, InputStats>, Vec<Rows>)> {
        self.calibrator.take();
        self.calibrator.set_paused(false);
        let out = self.run_all(li, layer);
        self.calibrator.set_paused(true);
        Ok((self.calibrator.take(), out?))
    }

    /// Runs `layer` on every window's current input without recording; returns its outputs.
    pub fn run(&self, li: usize, layer: &Layer) -> Result<Vec<Rows>> {
        self.calibrator.set_paused(true);
        self.run_all(li, layer)
    }

    /// Makes `outputs` (of the layer just done) the next layer's inputs.
    pub fn advance(&mut self, outputs: Vec<Rows>) {
        self.hidden = outputs;
    }

    fn run_all(&self, li: usize, layer: &Layer) -> Result<Vec<Rows>> {
        self.windows
            .iter()
            .zip(&self.hidden)
            .map(|(tokens, x)| {
                // A window attends only to itself: a fresh cache, filled at this layer only.
                let mut cache = self.engine.new_cache();
                let mut item = BatchItem {
                    tokens,
                    cache: &mut cache,
                    logits: Logits::Last,
                };
                let mut y = Rows::new(x.data.clone(), x.cols);
                self.engine.forward_layer(li, layer, &mut y, &mut item)?;
                Ok(y)
            })
            .collect()
    }

    /// Ends the run: every window's output of the last layer advanced to (the head's input,
    /// once the final norm is applied).
    pub fn into_hidden(self) -> Vec<Rows> {
        self.hidden
    }

    /// Gives back the model frame the runner was made with.
    pub fn into_frame(self) -> Arc<Model> {
        self.engine.model().clone()
    }
}
