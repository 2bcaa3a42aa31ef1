//! Hessian-aware W8A8 quantization: calibrate → smooth (SmoothQuant) → quantize weights
//! (GPTQ with the smoothed inputs' Hessian, or round-to-nearest) → int8 linears. Activations are
//! quantized per token at run time. Router, norms and embeddings stay f32.
//!
//! Methods: `rtn` (plain rounding), `smooth` (smoothing + rounding), `gptq` (Hessian only),
//! `haq` (both).

pub(crate) mod calibrate;
mod errors;
pub mod gptq;
pub mod gptq4;
pub(crate) mod head;
pub mod layerwise;
pub mod linalg;
pub mod outliers;
pub(crate) mod rotate;
pub(crate) mod smooth;
pub(crate) mod spill;
pub mod store;

use crate::backend::cpu::int8::Int8Matrix;
use crate::backend::cpu::prepare::prepare_linear;
use crate::error::{Error, Result};
use crate::model::config::Activation;
use crate::model::int4::Int4Matrix;
use crate::model::weights::{Attention, Ffn, Layer, Linear, LinearWeight};
use crate::model::Model;
use calibrate::{input_key, InputStats};
use gptq::{gptq_factored, GptqOptions, HessianFactor};
use layerwise::LayerRunner;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Rtn,
    Smooth,
    Gptq,
    Haq,
}

impl Method {
    fn smooths(self) -> bool {
        matches!(self, Method::Smooth | Method::Haq)
    }
    fn uses_hessian(self) -> bool {
        matches!(self, Method::Gptq | Method::Haq)
    }
}

/// What happens to the output head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum HeadQuant {
    /// Kept in f32.
    F32,
    /// Int8 weights and per-token int8 activations, like the other linears.
    W8A8,
    /// Int8 weights, f32 activations.
    WeightOnly,
}

/// Which outputs of a quantized layer feed the calibration of the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Propagate {
    /// The quantized layer's: later layers learn to correct the error of earlier ones.
    Quantized,
    /// The f32 layer's: every layer calibrated on what the f32 model would feed it.
    F32,
}

/// GPTQ's default damping (a share of the Hessian diagonal's mean). Chosen by the mean KL
/// divergence from the f32 model on the TUNING texts only (tools/data/tune/ code and docs, the
/// KJV `heldout.txt`; SmolLM2-135M haq on tools/data/calib/mix.txt, ctx 256 and 1024): 0.003
/// gave 2.98 millinats, 0.01 3.11, 0.03 3.11, 0.1 3.06 (act-order 3.02). The margin is a few
/// percent, near what another calibration draw moves (docs/quantization.md).
pub const DEFAULT_DAMP: f64 = 0.003;

#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantOptions {
    pub method: Method,
    /// SmoothQuant α; `None` searches it per layer group.
    pub alpha: Option<f32>,
    /// Also smooth inputs with no norm before them (o_proj, w2/down_proj, fc2) through a
    /// per-channel input scale applied by the int8 kernel.
    pub smooth_unnormed: bool,
    /// Smooths every gated MLP's down-projection input exactly, by folding 1/s into the rows of
    /// its up-projection (`act(gate·x) ⊙ (up·x)` is linear in each row of `up`): no input
    /// scale, no run-time cost.
    pub fold_down: bool,
    /// Smooths o_proj's input exactly by folding 1/s into v_proj's output channels.
    pub fold_vo: bool,
    pub act_order: bool,
    /// What the next layer is calibrated on: the quantized layer's outputs or the f32 one's.
    pub propagate: Propagate,
    pub damp: f64,
    /// Linears that saw fewer calibration tokens fall back to round-to-nearest.
    pub min_tokens: usize,
    /// Also quantize the output head (round-to-nearest); embeddings tied to it too (one int8
    /// matrix, looked up and used as the head, also when rotated).
    pub head: HeadQuant,
    pub threads: usize,
    /// Linears whose names contain one of these stay f32 (mixed precision, and finding which
    /// linears a model is sensitive in).
    pub keep_f32: Vec<String>,
    /// Rotates the residual stream and the down-projections' input first (`rotate.rs`), on
    /// models where the rotation is exact (pre-norm RMSNorm, gated MLPs); others skip it.
    pub rotate: bool,
    /// Seeds the rotation's random signs and odd-size factor.
    pub rotate_seed: u64,
    /// Moves each quantized layer into an unlinked file in this folder (`spill.rs`), so the
    /// process holds one layer, not the whole int8 model; `None` keeps them in memory.
    #[serde(skip)]
    pub spill_dir: Option<std::path::PathBuf>,
    /// W4A8 experts (`--bits 4`); `None`: every quantized linear is int8.
    pub int4: Option<Int4Options>,
    /// Methods with a Hessian (gptq, haq) also round the head, and a tied embedding table with
    /// it, by GPTQ on the head's input (`head.rs`); off: plain rounding.
    pub head_gptq: bool,
    /// The head's GPTQ damping; `None`: `damp`.
    pub head_damp: Option<f64>,
    /// 4-bit GPTQ: how each group's clipped range is chosen (`gptq4.rs`).
    pub int4_rule: gptq4::GroupRule,
    /// 4-bit GPTQ: refit each row's group scales by least squares on the input's Hessian once
    /// GPTQ has fixed the codes (`gptq4::refit_scales`).
    pub int4_refit: bool,
}

/// Which linears get 4-bit weights, on which grid.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Int4Options {
    pub grid: gptq4::Int4Grid,
    /// Routed-expert linears whose names contain one of these stay int8.
    pub keep_int8: Vec<String>,
    /// Other linears whose names contain one of these get 4 bits too (attention stays 8
    /// unless asked).
    pub also: Vec<String>,
}

impl Int4Options {
    /// The grid for linear `name`, if it gets 4 bits: routed experts (as `TensorClass` names
    /// them) unless kept at 8, and whatever `also` names.
    pub fn grid_for(&self, name: &str) -> Option<gptq4::Int4Grid> {
        let has = |patterns: &[String]| patterns.iter().any(|p| name.contains(p.as_str()));
        let expert = crate::model::emoe::TensorClass::of(name, false)
            == crate::model::emoe::TensorClass::Experts;
        ((expert && !has(&self.keep_int8)) || has(&self.also)).then_some(self.grid)
    }
}

impl QuantOptions {
    pub fn keeps_f32(&self, name: &str) -> bool {
        self.keep_f32.iter().any(|p| name.contains(p.as_str()))
    }

    /// The defaults: α searched per layer group, every exact fold, GPTQ on top.
    pub fn new(method: Method, _model: &Model) -> QuantOptions {
        QuantOptions {
            method,
            // Searched per layer group by the W8A8 output error on the calibration rows: on
            // SmolLM2-135M +1.48% ppl against +2.12% with a fixed 0.5 (docs/BENCHMARKS.md).
            alpha: None,
            // Measured on the outlier fixture (benches/quant_accuracy.rs): smoothing the un-normed
            // inputs gains nothing there, and costs a per-channel multiply in every kernel call.
            smooth_unnormed: false,
            fold_down: true,
            fold_vo: true,
            act_order: false,
            propagate: Propagate::Quantized,
            damp: DEFAULT_DAMP,
            min_tokens: 32,
            // Int8 weights (a quarter of the f32 bytes, and a third of a small model's bytes per
            // token), f32 activations: on SmolLM2-135M (docs/BENCHMARKS.md) quantizing the head's
            // input per token cost +0.5% ppl (haq +2.12% W8A8 head, +1.60% weight-only, +1.53%
            // f32 head).
            head: HeadQuant::WeightOnly,
            threads: 0,
            keep_f32: Vec::new(),
            // On SmolLM2-135M haq +0.20% ppl rotated against +0.97% not (docs/BENCHMARKS.md).
            rotate: true,
            rotate_seed: 0x005E_ED0F_2024,
            spill_dir: None,
            int4: None,
            head_gptq: true,
            head_damp: None,
            // Chosen by mean KL from f32 on the tuning texts only (tools/data/tune/ code and
            // docs, the KJV heldout.txt's first 9 600 bytes; SmolLM2-135M W4A8 recipe, haq,
            // ctx 256; docs/quantization.md "Sixth round"): 65.24 millinats with the squared
            // rounding error rule and no refit, 62.80 with GPTQ's cost, 64.74 with the refit
            // alone, 59.26 with both.
            int4_rule: gptq4::GroupRule::Gptq,
            int4_refit: true,
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QuantSummary {
    pub linears: usize,
    pub params: usize,
    pub gptq: usize,
    /// Linears given 4-bit weights (counted in `linears` too).
    pub int4_linears: usize,
    /// Linears quantized by rounding because they saw too few calibration tokens.
    pub rtn_fallback: Vec<String>,
    /// α chosen per smoothed group.
    pub alphas: Vec<(String, f32)>,
    pub calib_tokens: usize,
    /// Wall seconds per phase (embed, read, calibrate, smooth, quantize, spill, propagate).
    pub phase_seconds: Vec<(String, f64)>,
    /// The process's peak resident set when quantization ended.
    pub peak_rss_bytes: Option<u64>,
    /// How the model was rotated before quantizing, or why it was not.
    pub rotation: Option<String>,
}

/// Quantizes `model` in place of its linears, one layer at a time: each layer's f32 weights
/// are taken from the model's source, calibrated on the windows of `calib` (`ctx` tokens each)
/// as they come out of the layers before, smoothed and quantized, and only then is the next
/// layer read. `progress` gets (stage, done, total).
pub fn quantize(
    mut model: Model,
    calib: &[u32],
    ctx: usize,
    opts: &QuantOptions,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<(Model, QuantSummary)> {
    let mut summary = QuantSummary {
        calib_tokens: calib.len(),
        ..Default::default()
    };
    check_keep_f32(&mut model, opts)?;
    let mut clock = PhaseClock::default();
    let head_gptq = opts.head_gptq && opts.method.uses_hessian() && opts.head != HeadQuant::F32;
    let mut tied_table_f32 = None;
    let rotation = if !opts.rotate {
        None
    } else if let Some(why) = rotate::unsupported(&model.config, &model.weights) {
        summary.rotation = Some(format!("not rotated: {why}"));
        None
    } else {
        let r = rotate::ModelRotation::new(&model.config, opts.rotate_seed);
        clock.time("rotate", || {
            r.rotate_embeddings(&mut model.config, &mut model.weights)
        })?;
        // The table is int8 as a tied one is (rows are looked up and dequantized; rotated rows
        // have no outlier to widen a scale). Done now, so calibration sees the embeddings the
        // quantized model will, and the f32 table is not held through every layer. A tied head
        // is this very matrix (it reads the final norm through `head_transform`), so it takes
        // the head's form now and is not rounded again.
        if opts.head != HeadQuant::F32 {
            let tied = model.weights.lm_head.is_none();
            let weight_only = !tied || opts.head == HeadQuant::WeightOnly;
            let embed = &mut model.weights.embed;
            // A tied table rounded by GPTQ at the end starts from its f32 rows again (and is
            // counted then).
            let mut redone = QuantSummary::default();
            let counted = if tied && head_gptq {
                tied_table_f32 = Some(embed.clone());
                &mut redone
            } else {
                &mut summary
            };
            clock.time("quantize", || {
                round_to_int8(embed, opts, weight_only, None, counted)
            })?;
        }
        summary.rotation = Some(format!(
            "residual stream rotated ({}), down-projection input {}",
            r.residual.dim(),
            match r.ffn_block {
                Some(b) => format!("by Hadamard blocks of {b}"),
                None => "not rotated (no power-of-two block of 32 or more)".into(),
            }
        ));
        Some(r)
    };
    // The down-projection's input is rotated at run time: an up→down smoothing fold would scale
    // the channels before the rotation, not the ones the int8 kernel sees.
    // A clamp between v_proj and o_proj (OLMoE's clip_qkv) does not commute with scaling v's
    // channels, so o_proj is then smoothed on its own. GPT-OSS's clamped SwiGLU is not linear
    // in up's rows, so its down-projections are smoothed on their own too.
    let opts = &QuantOptions {
        fold_down: opts.fold_down
            && model.config.ffn_hadamard_block.is_none()
            && model.config.options.clamped_swiglu.is_none(),
        fold_vo: opts.fold_vo && model.config.clip_qkv.is_none(),
        ..opts.clone()
    };
    // Checked as the engine's pool is: 10^5 threads once hung here, starting them one by one.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(crate::backend::cpu::backend::worker_threads(opts.threads)?)
        .build()
        .map_err(|e| Error::invalid(format!("thread pool: {e}")))?;
    let pre_norm = model.config.pre_norm;
    let heads = smooth::HeadLayout::of(&model.config);
    let shape = (&heads, model.config.activation);
    let mut layers = std::mem::take(&mut model.weights.layers);
    let frame = Arc::new(model);
    let mut runner = match opts.method {
        Method::Rtn => None,
        _ => Some(clock.time("embed", || {
            LayerRunner::new(frame.clone(), opts.threads, calib, ctx)
        })?),
    };
    let mut spill = opts.spill_dir.as_deref().map(spill::Spill::new);
    let total = layers.len();
    progress("layers", 0, total);
    for (li, layer) in layers.iter_mut().enumerate() {
        clock.time("read", || {
            layer_linears(layer).into_iter().for_each(|lin| {
                // f32 the process owns, in the CPU kernels' panels (calibration runs them).
                lin.widen_half_rows();
                prepare_linear(lin);
            })
        });
        if let Some(r) = &rotation {
            clock.time("rotate", || r.rotate_layer(li, layer))?;
        }
        let (mut stats, f32_outputs) = match &runner {
            Some(r) => {
                let (stats, out) = clock.time("calibrate", || r.observe(li, layer))?;
                (stats, Some(out))
            }
            None => (HashMap::new(), None),
        };
        if opts.method.smooths() {
            clock.time("smooth", || {
                smooth_layer(layer, pre_norm, shape, opts, &mut stats, &mut summary)
            });
        }
        clock.time("quantize", || {
            pool.install(|| quantize_layer(layer, opts, stats, &mut summary))
        })?;
        // Smoothing leaves the matrices it edited row-major; what stays f32 runs from panels.
        layer_linears(layer).into_iter().for_each(prepare_linear);
        // Calibration split kv_b_proj as it was before the folds and rounding.
        layer.attn.forget_absorbed();
        if let Some(s) = &mut spill {
            clock.time("spill", || s.take(layer_linears(layer)))?;
        }
        if let (Some(r), Some(f32_outputs)) = (&mut runner, f32_outputs) {
            let next = match opts.propagate {
                Propagate::Quantized => clock.time("propagate", || r.run(li, layer))?,
                Propagate::F32 => f32_outputs,
            };
            r.advance(next);
        }
        if let Some(s) = &mut spill {
            s.release_last();
        }
        progress("layers", li + 1, total);
    }
    let last_hidden = runner.map(LayerRunner::into_hidden);
    let mut model = Arc::try_unwrap(frame)
        .map_err(|_| Error::invalid("model still shared after calibration"))?;
    if let Some(r) = &rotation {
        clock.time("rotate", || {
            r.rotate_head(&mut model.config, &mut model.weights)
        })?;
    }
    // The head's input Hessian, from the quantized layers' outputs through the final norm.
    let mut head_factor = None;
    if let (true, Some(hidden)) = (head_gptq, &last_hidden) {
        let (m, h, tokens) = clock.time("calibrate", || {
            head::head_hessian(model, hidden, opts.threads)
        })?;
        model = m;
        if tokens >= opts.min_tokens {
            let k = model.weights.head().in_features;
            let gopts = GptqOptions {
                damp: opts.head_damp.unwrap_or(opts.damp),
                act_order: opts.act_order,
            };
            let factor = HessianFactor::new(&h, k, &gopts);
            // GPTQ zeroes the weights of inputs that never fire: harmless in a head, but a tied
            // table's rows are also the embeddings, whose every coordinate reaches the residual
            // stream. Such a table is rounded to nearest instead.
            let tied = model.weights.lm_head.is_none();
            if !(tied && factor.dead.iter().any(|&d| d)) {
                head_factor = Some(factor);
            }
        }
    }
    drop(last_hidden);
    model.weights.layers = layers;
    if opts.head != HeadQuant::F32 {
        let w = &mut model.weights;
        // A tied table rounded above (to calibrate on) is rounded again from its f32 rows by
        // GPTQ; without GPTQ it is int8 already and rounding skips it.
        if let (Some(table), Some(_)) = (tied_table_f32.take(), &head_factor) {
            w.embed = table;
        }
        let head = w.lm_head.as_mut().unwrap_or(&mut w.embed);
        let weight_only = opts.head == HeadQuant::WeightOnly;
        clock.time("quantize", || {
            round_to_int8(head, opts, weight_only, head_factor.as_ref(), &mut summary)
        })?;
    }
    summary.phase_seconds = clock.phases;
    summary.peak_rss_bytes = crate::util::memory::peak_rss_bytes();
    Ok((model, summary))
}

/// A `--keep-f32` pattern that names no linear is a typo that would quietly quantize what the
/// user meant to keep: refused before any work.
fn check_keep_f32(model: &mut Model, opts: &QuantOptions) -> Result<()> {
    let w = &mut model.weights;
    let mut names: Vec<String> = [&w.embed]
        .into_iter()
        .chain(&w.lm_head)
        .map(|l| l.name.clone())
        .collect();
    for layer in &mut w.layers {
        names.extend(layer_linears(layer).into_iter().map(|l| l.name.clone()));
    }
    if let Some(int4) = &opts.int4 {
        let experts: Vec<&String> = names
            .iter()
            .filter(|n| {
                crate::model::emoe::TensorClass::of(n, false)
                    == crate::model::emoe::TensorClass::Experts
            })
            .collect();
        // Without routed experts `--bits 4` alone would give 4 bits to nothing.
        if experts.is_empty() && int4.also.is_empty() {
            return Err(Error::invalid(
                "--bits 4 gives 4-bit weights to routed experts and this model has none: name \
                 the linears with --int4 NAME (on a Llama-style dense model, e.g. --int4 q_proj \
                 --int4 k_proj --int4 o_proj --int4 gate_proj --int4 up_proj, which keeps v_proj \
                 and down_proj at 8 bits; docs/quantization.md)",
            ));
        }
        if let Some(p) = int4
            .keep_int8
            .iter()
            .find(|p| !experts.iter().any(|n| n.contains(p.as_str())))
        {
            return Err(Error::invalid(format!(
                "--keep-int8 {p:?} matches no routed-expert linear of this model{}",
                experts
                    .first()
                    .map_or(" (it has none)".to_string(), |n| format!(
                        " (names look like {n:?})"
                    ))
            )));
        }
        if let Some(p) = int4
            .also
            .iter()
            .find(|p| !names.iter().any(|n| n.contains(p.as_str())))
        {
            return Err(Error::invalid(format!(
                "--int4 {p:?} matches no linear of this model"
            )));
        }
    }
    match opts
        .keep_f32
        .iter()
        .find(|p| !names.iter().any(|n| n.contains(p.as_str())))
    {
        None => Ok(()),
        Some(p) => Err(Error::invalid(format!(
            "--keep-f32 {p:?} matches no linear of this model (names look like {:?})",
            names
                .iter()
                .find(|n| n.contains("layers.0."))
                .unwrap_or(&names[0])
        ))),
    }
}

/// Rounds the head or the embeddings `lin` to int8, by GPTQ where its input's `factor` is given,
/// keeping f32 activations when `weight_only`.
fn round_to_int8(
    lin: &mut Linear,
    opts: &QuantOptions,
    weight_only: bool,
    factor: Option<&HessianFactor>,
    summary: &mut QuantSummary,
) -> Result<()> {
    let method = match factor {
        Some(_) => opts.method,
        None => Method::Rtn,
    };
    let opts = QuantOptions {
        method,
        ..opts.clone()
    };
    quantize_linear(lin, &opts, factor, None, summary)?;
    if weight_only {
        let w = std::mem::replace(&mut lin.weight, LinearWeight::F32Rows(Vec::new().into()));
        lin.weight = match w {
            LinearWeight::Int8(m) => LinearWeight::Int8WeightOnly(m),
            other => other,
        };
    }
    Ok(())
}

/// Wall time per phase, in the order phases first ran.
#[derive(Default)]
struct PhaseClock {
    phases: Vec<(String, f64)>,
}

impl PhaseClock {
    fn time<R>(&mut self, phase: &str, f: impl FnOnce() -> R) -> R {
        let start = std::time::Instant::now();
        let r = f();
        let secs = start.elapsed().as_secs_f64();
        match self.phases.iter_mut().find(|(p, _)| p == phase) {
            Some((_, t)) => *t += secs,
            None => self.phases.push((phase.to_string(), secs)),
        }
        r
    }
}

/// Every linear of a layer: attention, then the feed-forward block's. Linears that read one
/// input come one after another (quantizing keeps one input's Hessian factor at a time).
fn layer_linears(layer: &mut Layer) -> Vec<&mut Linear> {
    let Attention {
        q, k, v, o, latent, ..
    } = &mut layer.attn;
    let mut all: Vec<&mut Linear> = match latent.as_deref_mut().and_then(|l| l.q_a.as_mut()) {
        // q_a_proj and kv_a_proj_with_mqa read the layer's input, q_b_proj the query latent.
        Some((q_a, _)) => vec![q_a, k, q, v, o],
        None => vec![q, k, v, o],
    };
    match &mut layer.ffn {
        Ffn::Moe(b) => {
            all.push(&mut b.router);
            for e in &mut b.experts {
                all.extend([&mut e.gate, &mut e.up, &mut e.down]);
            }
            if let Some(s) = &mut b.shared {
                all.extend([&mut s.mlp.gate, &mut s.mlp.up, &mut s.mlp.down]);
                all.extend(&mut s.gate);
            }
        }
        Ffn::Gated(m) => all.extend([&mut m.gate, &mut m.up, &mut m.down]),
        Ffn::Plain(m) => all.extend([&mut m.fc1, &mut m.fc2]),
    }
    all
}

/// The attention linears that read the layer's normed input: q/k/v, or under latent attention
/// q_a_proj (q_proj without a query latent) and kv_a_proj_with_mqa; q_b_proj and kv_b_proj
/// read the latents' own norms.
pub(crate) fn attn_input_linears(a: &mut Attention) -> Vec<&mut Linear> {
    let Attention {
        q, k, v, latent, ..
    } = a;
    match latent.as_deref_mut() {
        Some(l) => match &mut l.q_a {
            Some((q_a, _)) => vec![q_a, k],
            None => vec![q, k],
        },
        None => vec![q, k, v],
    }
}

/// The linears of a layer's feed-forward block that read its (normalized) input.
fn ffn_input_linears(ffn: &mut Ffn) -> Vec<&mut Linear> {
    match ffn {
        Ffn::Moe(b) => {
            let mut v = vec![&mut b.router];
            for e in &mut b.experts {
                v.push(&mut e.gate);
                v.push(&mut e.up);
            }
            if let Some(s) = &mut b.shared {
                v.push(&mut s.mlp.gate);
                v.push(&mut s.mlp.up);
                v.extend(&mut s.gate);
            }
            v
        }
        Ffn::Gated(m) => vec![&mut m.gate, &mut m.up],
        Ffn::Plain(m) => vec![&mut m.fc1],
    }
}

/// Linears whose input is an intermediate activation with no norm before it.
fn unnormed_linears(layer: &mut Layer) -> Vec<&mut Linear> {
    let mut v = vec![&mut layer.attn.o];
    match &mut layer.ffn {
        Ffn::Moe(b) => {
            for e in &mut b.experts {
                v.push(&mut e.down);
            }
            if let Some(s) = &mut b.shared {
                v.push(&mut s.mlp.down);
            }
        }
        Ffn::Gated(m) => v.push(&mut m.down),
        Ffn::Plain(m) => v.push(&mut m.fc2),
    }
    v
}

/// A layer's gated MLPs: experts, shared expert, or its dense MLP.
pub(crate) fn gated_mlps(ffn: &mut Ffn) -> Vec<&mut crate::model::weights::GatedMlp> {
    match ffn {
        Ffn::Moe(b) => {
            let mut v: Vec<_> = b.experts.iter_mut().collect();
            if let Some(s) = &mut b.shared {
                v.push(&mut s.mlp);
            }
            v
        }
        Ffn::Gated(m) => vec![m],
        Ffn::Plain(_) => Vec::new(),
    }
}

fn record_keys(members: &[&mut Linear]) -> Vec<String> {
    let mut keys: Vec<String> = members.iter().map(|l| input_key(&l.name)).collect();
    keys.sort();
    keys.dedup();
    keys
}

fn smooth_layer(
    layer: &mut Layer,
    pre_norm: bool,
    (heads, activation): (&smooth::HeadLayout, Activation),
    opts: &QuantOptions,
    stats: &mut HashMap<String, InputStats>,
    summary: &mut QuantSummary,
) {
    // Attention input: q/k/v (latent attention: q_a/q and kv_a) read the attention norm's
    // output.
    let members = attn_input_linears(&mut layer.attn);
    smooth_normed(
        members,
        &mut layer.attn_norm,
        pre_norm,
        opts,
        stats,
        summary,
    );
    let a = &mut layer.attn;
    // Latent attention's own norms each feed one linear alone (q_a_layernorm only q_b_proj,
    // kv_a_layernorm only kv_b_proj, never the residual): 1/s folds into them exactly.
    if let Some(l) = a.latent.as_deref_mut() {
        if let Some((_, q_norm)) = &mut l.q_a {
            smooth_normed(vec![&mut a.q], q_norm, true, opts, stats, summary);
        }
        smooth_normed(vec![&mut a.v], &mut l.kv_a_norm, true, opts, stats, summary);
    }
    // o_proj's input, exactly through v_proj's output channels.
    if opts.fold_vo {
        if let Some(alpha) = smooth::fold_v_into_o(&mut a.v, &mut a.o, heads, stats, opts.alpha) {
            summary.alphas.push((input_key(&a.o.name), alpha));
        }
    }
    // Feed-forward input: the router (which sees every token) gives max |X|.
    let members = ffn_input_linears(&mut layer.ffn);
    smooth_normed(members, &mut layer.ffn_norm, pre_norm, opts, stats, summary);
    if opts.fold_down {
        for mlp in gated_mlps(&mut layer.ffn) {
            if let Some(s) = smooth_alone(&mut mlp.down, opts, stats, summary) {
                let inv: Vec<f32> = s.iter().map(|f| 1.0 / f).collect();
                mlp.up.scale_output_channels(&inv);
            }
        }
        // ReLU(x/s) = ReLU(x)/s for s > 0: fc1's rows (and bias) take 1/s, fc2's columns s.
        if let (Ffn::Plain(mlp), Activation::Relu) = (&mut layer.ffn, activation) {
            if let Some(s) = smooth_alone(&mut mlp.fc2, opts, stats, summary) {
                let inv: Vec<f32> = s.iter().map(|f| 1.0 / f).collect();
                mlp.fc1.scale_output_channels(&inv);
            }
        }
    }
    if opts.smooth_unnormed {
        for lin in unnormed_linears(layer) {
            let folded = (opts.fold_down
                && (lin.name.contains(".down_proj")
                    || lin.name.ends_with(".w2")
                    || (lin.name.ends_with(".fc2") && activation == Activation::Relu)))
                || (opts.fold_vo && lin.name.ends_with(".o_proj"));
            if folded {
                continue;
            }
            if let Some(s) = smooth_alone(lin, opts, stats, summary) {
                set_input_scale(&mut [lin], &s);
            }
        }
    }
}

/// Smooths one linear whose input no other reads; returns the factors for the caller to fold
/// (1/s into whatever produces the input, or an input scale).
fn smooth_alone(
    lin: &mut Linear,
    opts: &QuantOptions,
    stats: &mut HashMap<String, InputStats>,
    summary: &mut QuantSummary,
) -> Option<Vec<f32>> {
    let key = input_key(&lin.name);
    let keys = std::slice::from_ref(&key);
    let (s, alpha) = smooth::smooth_group(&mut [lin], &key, keys, stats, opts.alpha)?;
    summary.alphas.push((key, alpha));
    Some(s)
}

/// Smooths linears that read one norm's output: 1/s goes into the norm (pre-norm blocks) or,
/// where the norm's output also feeds the residual (post-norm), into an input scale.
fn smooth_normed(
    mut members: Vec<&mut Linear>,
    norm: &mut crate::model::weights::Norm,
    pre_norm: bool,
    opts: &QuantOptions,
    stats: &mut HashMap<String, InputStats>,
    summary: &mut QuantSummary,
) {
    let x_key = input_key(&members[0].name);
    let keys = record_keys(&members);
    if let Some((s, alpha)) = smooth::smooth_group(&mut members, &x_key, &keys, stats, opts.alpha) {
        summary.alphas.push((x_key, alpha));
        if pre_norm {
            smooth::fold_into_norm(norm, &s);
        } else {
            set_input_scale(&mut members, &s);
        }
    }
}

/// Where no norm can absorb 1/s, the input is multiplied by it before the product (inside
/// the int8 kernel's activation quantization).
fn set_input_scale(members: &mut [&mut Linear], s: &[f32]) {
    let inv: Vec<f32> = s.iter().map(|f| 1.0 / f).collect();
    for lin in members.iter_mut() {
        lin.input_scale = Some(inv.clone());
    }
}

/// Whether a linear is quantized to int8 (routers — `gate`, Granite's `router.layer`,
/// GPT-OSS's `router` — and the 1-wide shared-expert gate stay f32).
pub fn is_quantized_layer(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    !matches!(last, "gate" | "router" | "shared_expert_gate") && !name.ends_with(".router.layer")
}

/// An input's GPTQ factor, with its Hessian where 4-bit scales are refitted on it.
type FactorAndHessian = (HessianFactor, Option<Vec<f32>>);

fn quantize_layer(
    layer: &mut Layer,
    opts: &QuantOptions,
    mut stats: HashMap<String, InputStats>,
    summary: &mut QuantSummary,
) -> Result<()> {
    // One factor per input, shared by the linears reading it (q/k/v; gate/up), which come one
    // after another: only the current one is held, and each record is dropped once factored
    // (a Mixtral layer's eight down-projection Hessians are the largest thing a layer keeps).
    // With the factor, the Hessian itself where a 4-bit linear's scales are refitted on it.
    let mut current: Option<(String, Option<FactorAndHessian>)> = None;
    for lin in layer_linears(layer) {
        if !is_quantized_layer(&lin.name) || opts.keeps_f32(&lin.name) {
            continue;
        }
        let key = input_key(&lin.name);
        if current.as_ref().is_none_or(|(k, _)| *k != key) {
            drop(current.take()); // frees the previous factor first
            let factor = stats
                .remove(&key)
                .filter(|st| opts.method.uses_hessian() && st.tokens >= opts.min_tokens)
                .map(|st| {
                    let gopts = GptqOptions {
                        damp: opts.damp,
                        act_order: opts.act_order,
                    };
                    let f = HessianFactor::new(&st.hessian, st.k, &gopts);
                    let refit = opts.int4_refit && opts.int4.is_some();
                    (f, refit.then_some(st.hessian))
                });
            current = Some((key, factor));
        }
        let factor = current.as_ref().and_then(|(_, f)| f.as_ref());
        let hessian = factor.and_then(|(_, h)| h.as_deref());
        quantize_linear(lin, opts, factor.map(|(f, _)| f), hessian, summary)?;
    }
    Ok(())
}

/// Quantizes one linear: by GPTQ where its input's Hessian factor is given, else by rounding.
fn quantize_linear(
    lin: &mut Linear,
    opts: &QuantOptions,
    factor: Option<&HessianFactor>,
    hessian: Option<&[f32]>,
    summary: &mut QuantSummary,
) -> Result<()> {
    // Row-major f32 for the quantizers (bf16/f16 widened, panels unpacked).
    lin.widen_half_rows();
    lin.unpack();
    let LinearWeight::F32Rows(rows) = &lin.weight else {
        return Ok(());
    };
    let w = &rows[..];
    let (n, k) = (lin.out_features, lin.in_features);
    if let (Some(f), Some(h), Some(int4)) = (factor, hessian, opts.int4.as_ref()) {
        errors::report(&lin.name, w, n, k, f, h, opts, int4.grid);
    }
    if let Some(grid) = opts.int4.as_ref().and_then(|o| o.grid_for(&lin.name)) {
        let q = match factor {
            Some(f) if opts.method.uses_hessian() => {
                summary.gptq += 1;
                let mut q = gptq4::gptq4_factored(w, n, f, grid, opts.int4_rule);
                if let Some(h) = hessian.filter(|_| f.hinv.is_some()) {
                    gptq4::refit_scales(w, n, k, h, opts.damp, grid, &mut q);
                }
                q
            }
            _ => {
                if opts.method.uses_hessian() {
                    summary.rtn_fallback.push(lin.name.clone());
                }
                gptq4::rtn4(w, n, k, grid)
            }
        };
        let zeros = (!grid.symmetric).then_some(&q.zeros[..]);
        let matrix = Int4Matrix::from_quantized(n, k, grid.group, &q.u, &q.scales, zeros)
            .map_err(|e| Error::invalid(format!("{}: {e}", lin.name)))?;
        summary.linears += 1;
        summary.int4_linears += 1;
        summary.params += n * k;
        lin.weight = LinearWeight::Int4(matrix);
        return Ok(());
    }
    let bad =
        |e: crate::backend::cpu::int8::Int8Error| Error::invalid(format!("{}: {e}", lin.name));
    let matrix = match factor {
        Some(f) if opts.method.uses_hessian() => {
            summary.gptq += 1;
            let (q, scales) = gptq_factored(w, n, f);
            Int8Matrix::from_quantized(n, k, &q, scales).map_err(bad)?
        }
        _ => {
            if opts.method.uses_hessian() {
                summary.rtn_fallback.push(lin.name.clone());
            }
            Int8Matrix::quantize_rtn(w, n, k).map_err(bad)?
        }
    };
    let mut matrix = matrix;
    // Scales are stored as f16: use exactly those values in memory too, so a model computes the
    // same before and after its .emoe round trip (a relative change of at most 2⁻¹¹ per row).
    for s in matrix.scales.make_mut() {
        *s = half::f16::from_f32(*s).to_f32();
    }
    summary.linears += 1;
    summary.params += n * k;
    lin.weight = LinearWeight::Int8(matrix);
    Ok(())
}
