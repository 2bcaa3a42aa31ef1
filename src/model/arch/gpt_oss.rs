//! GPT-OSS (<https://huggingface.co/openai/gpt-oss-20b>): RMSNorm → GQA attention with q/k/v/o
//! biases, a learned sink logit per head in the softmax denominator, YaRN RoPE and a sliding
//! window on the `sliding_attention` layers → RMSNorm → a router with a bias (softmax over the
//! top-k logits) choosing experts with biases and a clamped SwiGLU (`ModelConfig::options`
//! carries the window's layers, the sinks' presence, YaRN and the activation; the engine
//! applies them).
//!
//! The checkpoint stacks the experts as `x·W` products: `mlp.experts.gate_up_proj` is
//! `[experts, hidden, 2·intermediate]` with each expert's gate and up columns interleaved
//! (gate even, up odd), `gate_up_proj_bias` `[experts, 2·intermediate]`, `down_proj`
//! `[experts, intermediate, hidden]` and `down_proj_bias` `[experts, hidden]`. Each expert is
//! transposed at load (a copy, 16-bit weights kept 16-bit) into `[out, in]` linears under names
//! of its own
//! (`mlp.experts.E.gate_proj`, with biases), which is how a quantized store writes it and
//! reads it back. The released checkpoints' MXFP4 experts (`*_blocks` / `*_scales`) are
//! decoded by `gpt_oss_mxfp4`.

use super::mixtral::{attention_with, rms_decoder};
use crate::error::{Error, Result};
use crate::model::buf::HalfKind;
use crate::model::config::ModelConfig;
use crate::model::weights::{
    Ffn, GatedMlp, Layer, Linear, LinearWeight, Loader, MoeBlock, Stored, TensorSource, WeightForm,
    Weights,
};

/// The per-expert names a quantized store keeps.
pub const PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

pub fn load(cfg: &ModelConfig, src: &dyn TensorSource, form: WeightForm) -> Result<Weights> {
    let l = Loader { src, form };
    let h = cfg.hidden_size;
    let bias = cfg.attention_bias;
    let layers = (0..cfg.num_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let mut attn = attention_with(&l, cfg, &format!("{p}.self_attn"), [bias, bias])?;
            attn.sinks = Some(l.vector(
                &format!("{p}.self_attn.sinks"),
                cfg.num_heads,
                "num_attention_heads",
            )?);
            Ok(Layer {
                attn_norm: l.rms_norm(&format!("{p}.input_layernorm"), h, cfg.norm_eps)?,
                attn,
                ffn_norm: l.rms_norm(&format!("{p}.post_attention_layernorm"), h, cfg.norm_eps)?,
                ffn: Ffn::Moe(Box::new(moe(&l, cfg, i, &format!("{p}.mlp"))?)),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    rms_decoder(&l, cfg, layers)
}

fn moe(l: &Loader, cfg: &ModelConfig, layer: usize, p: &str) -> Result<MoeBlock> {
    let (h, n) = (cfg.hidden_size, cfg.num_experts);
    let stacked = format!("{p}.experts.gate_up_proj");
    let experts = if l.src.has(&stacked) {
        stacked_experts(l, cfg, layer, p)?
    } else if l.src.has(&format!("{stacked}_blocks")) {
        super::gpt_oss_mxfp4::experts(l, cfg, layer, p)?
    } else {
        // A quantized store: each expert under its own names, biases beside its weights.
        (0..n)
            .map(|e| {
                let prefix = format!("{p}.experts.{e}");
                let mut mlp = expert_linears(l, cfg, &prefix)?;
                mlp.block = l.src.expert_block(layer, e);
                Ok(mlp)
            })
            .collect::<Result<Vec<_>>>()?
    };
    Ok(MoeBlock {
        router: l.linear(
            &format!("{p}.router"),
            n,
            h,
            true,
            "num_local_experts × hidden_size",
        )?,
        experts,
        shared: None,
        score_bias: None,
    })
}

/// One expert of a quantized store: its three linears with biases.
pub(super) fn expert_linears(l: &Loader, cfg: &ModelConfig, prefix: &str) -> Result<GatedMlp> {
    let (h, f) = (cfg.hidden_size, cfg.expert_ffn);
    let name = |proj: &str| format!("{prefix}.{proj}");
    let why = "intermediate_size × hidden_size";
    Ok(GatedMlp::new(
        l.linear(&name(PROJECTIONS[0]), f, h, true, why)?,
        l.linear(&name(PROJECTIONS[1]), f, h, true, why)?,
        l.linear(
            &name(PROJECTIONS[2]),
            h,
            f,
            true,
            "hidden_size × intermediate_size",
        )?,
    ))
}

/// Every expert of the checkpoint's stacked tensors, transposed to `[out, in]` linears (the
/// gate from the even columns of `gate_up_proj`, the up projection from the odd ones). bf16 /
/// f16 weights stay 16-bit (copied in the new order) unless the loader wants f32.
fn stacked_experts(l: &Loader, cfg: &ModelConfig, layer: usize, p: &str) -> Result<Vec<GatedMlp>> {
    let (h, f, n) = (cfg.hidden_size, cfg.expert_ffn, cfg.num_experts);
    let e = "num_local_experts";
    let gate_up = Matrix::read(
        l,
        &format!("{p}.experts.gate_up_proj"),
        &[n, h, 2 * f],
        &format!("{e} × hidden_size × 2·intermediate_size"),
    )?;
    let gate_up_bias = l.src.tensor(
        &format!("{p}.experts.gate_up_proj_bias"),
        &[n, 2 * f],
        &format!("{e} × 2·intermediate_size"),
    )?;
    let down = Matrix::read(
        l,
        &format!("{p}.experts.down_proj"),
        &[n, f, h],
        &format!("{e} × intermediate_size × hidden_size"),
    )?;
    let down_bias = l.src.tensor(
        &format!("{p}.experts.down_proj_bias"),
        &[n, h],
        &format!("{e} × hidden_size"),
    )?;
    let experts = (0..n)
        .map(|x| {
            let name = |proj: &str| format!("{p}.experts.{x}.{proj}");
            let gu_bias = &gate_up_bias[x * 2 * f..(x + 1) * 2 * f];
            // Expert x's [hidden, 2f] block → row j of the gate (column 2j) or of up (2j + 1).
            let half = |odd: usize| {
                let at = x * h * 2 * f;
                let weight = gate_up
                    .gather((0..f).flat_map(|j| (0..h).map(move |i| at + i * 2 * f + 2 * j + odd)));
                let bias = (0..f).map(|j| gu_bias[2 * j + odd]).collect();
                (weight, Some(bias))
            };
            // Expert x's [f, hidden] block, transposed.
            let at = x * f * h;
            let down_w = down.gather((0..h).flat_map(|o| (0..f).map(move |j| at + j * h + o)));
            let down_b = Some(down_bias[x * h..(x + 1) * h].to_vec());
            let linear = |proj: &str, (out, inp), (weight, bias)| Linear {
                name: name(proj),
                out_features: out,
                in_features: inp,
                weight,
                bias,
                input_scale: None,
            };
            let mut mlp = GatedMlp::new(
                linear(PROJECTIONS[0], (f, h), half(0)),
                linear(PROJECTIONS[1], (f, h), half(1)),
                linear(PROJECTIONS[2], (h, f), (down_w, down_b)),
            );
            mlp.block = l.src.expert_block(layer, x);
            mlp
        })
        .collect();
    Ok(experts)
}

/// A stacked expert tensor's values: f32, or bf16 / f16 kept 16-bit.
enum Matrix {
    F32(Vec<f32>),
    Half(HalfKind, Vec<u16>),
}

impl Matrix {
    fn read(l: &Loader, name: &str, shape: &[usize], why: &str) -> Result<Matrix> {
        Ok(match (l.src.stored(name, shape, why)?, l.form) {
            (Stored::Half(kind, b), WeightForm::AsStored | WeightForm::InPlace) => {
                Matrix::Half(kind, b.to_vec())
            }
            (Stored::Half(kind, b), WeightForm::F32) => Matrix::F32(kind.widen(&b)),
            (Stored::F32(b), _) => Matrix::F32(b.to_vec()),
            _ => {
                return Err(Error::invalid(format!(
                    "{name}: expected F32, BF16 or F16 expert weights"
                )))
            }
        })
    }

    /// The values at `index`, in that order, as a linear's weight.
    fn gather(&self, index: impl Iterator<Item = usize>) -> LinearWeight {
        match self {
            Matrix::F32(v) => LinearWeight::F32Rows(index.map(|i| v[i]).collect::<Vec<_>>().into()),
            Matrix::Half(kind, v) => {
                LinearWeight::Half(*kind, index.map(|i| v[i]).collect::<Vec<_>>().into())
            }
        }
    }
}
