//! Granite-MoE (<https://huggingface.co/ibm-granite/granite-3.0-1b-a400m-base>): Mixtral's block
//! scaled four ways — the embeddings by `embedding_multiplier`, the attention softmax by
//! `attention_multiplier` (in place of `1/sqrt(head_dim)`), each block's output by
//! `residual_multiplier` before it joins the residual, and the logits divided by
//! `logits_scaling` (the engine applies all four, `ModelConfig::options`). q/k/v/o take biases
//! when `attention_bias` is set. GraniteMoeShared adds an ungated shared MLP.
//!
//! The checkpoint stacks the experts: `block_sparse_moe.input_linear.weight` is
//! `[experts, 2·intermediate, hidden]` (each expert's gate rows, then its up rows),
//! `output_linear.weight` `[experts, hidden, intermediate]`, and the router is
//! `block_sparse_moe.router.layer`. Each expert is read as rows of those tensors (in place where
//! the file is mapped) under names of its own (`block_sparse_moe.experts.E.gate_proj`), which is
//! how a quantized store writes it and reads it back.

use super::mixtral::{attention_with, lm_head};
use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::weights::{
    Ffn, GatedMlp, Layer, Loader, MoeBlock, SharedExpert, TensorSource, WeightForm, Weights,
};

pub fn load(cfg: &ModelConfig, src: &dyn TensorSource, form: WeightForm) -> Result<Weights> {
    let l = Loader { src, form };
    let h = cfg.hidden_size;
    let bias = cfg.attention_bias;
    let layers = (0..cfg.num_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            Ok(Layer {
                attn_norm: l.rms_norm(&format!("{p}.input_layernorm"), h, cfg.norm_eps)?,
                attn: attention_with(&l, cfg, &format!("{p}.self_attn"), [bias, bias])?,
                ffn_norm: l.rms_norm(&format!("{p}.post_attention_layernorm"), h, cfg.norm_eps)?,
                ffn: Ffn::Moe(Box::new(moe(&l, cfg, i, &p)?)),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Weights {
        embed: l.embedding(
            "model.embed_tokens",
            cfg.vocab_size,
            h,
            "vocab_size × hidden_size",
        )?,
        positions: None,
        project_in: None,
        layers,
        final_norm: Some(l.rms_norm("model.norm", h, cfg.norm_eps)?),
        head_transform: None,
        project_out: None,
        lm_head: lm_head(&l, cfg)?,
    })
}

/// The per-expert names a quantized store keeps (and export stacks back).
pub const PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

fn moe(l: &Loader, cfg: &ModelConfig, layer: usize, p: &str) -> Result<MoeBlock> {
    let (h, f, n) = (cfg.hidden_size, cfg.expert_ffn, cfg.num_experts);
    let b = format!("{p}.block_sparse_moe");
    let stacked = format!("{b}.input_linear.weight");
    let experts = if l.src.has(&stacked) {
        let gate_up = l.src.stored(
            &stacked,
            &[n, 2 * f, h],
            "num_local_experts × 2·intermediate_size × hidden_size",
        )?;
        let down_name = format!("{b}.output_linear.weight");
        let down = l.src.stored(
            &down_name,
            &[n, h, f],
            "num_local_experts × hidden_size × intermediate_size",
        )?;
        (0..n)
            .map(|e| {
                let name = |proj: &str| format!("{b}.experts.{e}.{proj}");
                let mut mlp = GatedMlp::new(
                    l.rows_of(&gate_up, &stacked, &name("gate_proj"), 2 * f * e, (f, h))?,
                    l.rows_of(&gate_up, &stacked, &name("up_proj"), 2 * f * e + f, (f, h))?,
                    l.rows_of(&down, &down_name, &name("down_proj"), h * e, (h, f))?,
                );
                mlp.block = l.src.expert_block(layer, e);
                Ok(mlp)
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        // A quantized store: each expert under its own names.
        (0..n)
            .map(|e| {
                let prefix = format!("{b}.experts.{e}");
                l.expert((layer, e), &prefix, PROJECTIONS, h, f, "intermediate_size")
            })
            .collect::<Result<Vec<_>>>()?
    };
    let shared = match cfg.shared_expert_ffn {
        Some(s) => Some(SharedExpert {
            mlp: shared_mlp(l, &format!("{p}.shared_mlp"), h, s)?,
            gate: None,
        }),
        None => None,
    };
    Ok(MoeBlock {
        router: l.linear(
            &format!("{b}.router.layer"),
            n,
            h,
            false,
            "num_local_experts × hidden_size",
        )?,
        experts,
        shared,
        score_bias: None,
    })
}

/// GraniteMoeShared's `shared_mlp`: `input_linear` `[2·shared, hidden]` (gate rows, then up
/// rows) and `output_linear` `[hidden, shared]`; a quantized store names the three apart.
fn shared_mlp(l: &Loader, p: &str, h: usize, s: usize) -> Result<GatedMlp> {
    let why = "shared_intermediate_size";
    let stacked = format!("{p}.input_linear.weight");
    if !l.src.has(&stacked) {
        return l.gated_mlp(p, PROJECTIONS, h, s, why);
    }
    let gate_up = l.src.stored(
        &stacked,
        &[2 * s, h],
        "2·shared_intermediate_size × hidden_size",
    )?;
    let name = |proj: &str| format!("{p}.{proj}");
    let mut down = l.linear(
        &name("output_linear"),
        h,
        s,
        false,
        "hidden_size × shared_intermediate_size",
    )?;
    down.name = name("down_proj");
    Ok(GatedMlp::new(
        l.rows_of(&gate_up, &stacked, &name("gate_proj"), 0, (s, h))?,
        l.rows_of(&gate_up, &stacked, &name("up_proj"), s, (s, h))?,
        down,
    ))
}
