//! Qwen2-MoE (<https://qwenlm.github.io/blog/qwen-moe/>): Mixtral's block with q/k/v biases, an
//! optional renormalization of the top-k weights (`norm_topk_prob`), a shared expert added to
//! every token scaled by `sigmoid(shared_expert_gate·x)`, and dense MLP layers where
//! `mlp_only_layers` / `decoder_sparse_step` say so. Names follow Qwen2MoeForCausalLM.

use super::mixtral::{attention, rms_decoder};
use crate::error::Result;
use crate::model::config::{FfnKind, ModelConfig};
use crate::model::weights::{
    Ffn, Layer, Loader, MoeBlock, SharedExpert, TensorSource, WeightForm, Weights,
};

pub fn load(cfg: &ModelConfig, src: &dyn TensorSource, form: WeightForm) -> Result<Weights> {
    load_named(cfg, src, form, "moe_intermediate_size")
}

/// [`load`], with `expert_width` the config field that gives an expert's hidden width (named
/// when a tensor's shape disagrees).
pub fn load_named(
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    form: WeightForm,
    expert_width: &str,
) -> Result<Weights> {
    let l = Loader { src, form };
    let h = cfg.hidden_size;
    let layers = (0..cfg.num_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let ffn = match cfg.layer_ffn[i] {
                FfnKind::Moe => {
                    let block = moe(&l, cfg, i, &format!("{p}.mlp"), expert_width)?;
                    Ffn::Moe(Box::new(block))
                }
                _ => Ffn::Gated(l.gated_mlp(
                    &format!("{p}.mlp"),
                    PROJECTIONS,
                    h,
                    cfg.dense_ffn,
                    "intermediate_size",
                )?),
            };
            Ok(Layer {
                attn_norm: l.rms_norm(&format!("{p}.input_layernorm"), h, cfg.norm_eps)?,
                attn: attention(&l, cfg, &format!("{p}.self_attn"), cfg.attention_bias)?,
                ffn_norm: l.rms_norm(&format!("{p}.post_attention_layernorm"), h, cfg.norm_eps)?,
                ffn,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    rms_decoder(&l, cfg, layers)
}

const PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

fn moe(l: &Loader, cfg: &ModelConfig, layer: usize, p: &str, why: &str) -> Result<MoeBlock> {
    let h = cfg.hidden_size;
    let experts = (0..cfg.num_experts)
        .map(|e| {
            let prefix = format!("{p}.experts.{e}");
            l.expert((layer, e), &prefix, PROJECTIONS, h, cfg.expert_ffn, why)
        })
        .collect::<Result<Vec<_>>>()?;
    let shared = match cfg.shared_expert_ffn {
        Some(f) => Some(SharedExpert {
            mlp: l.gated_mlp(
                &format!("{p}.shared_expert"),
                PROJECTIONS,
                h,
                f,
                "shared_expert_intermediate_size",
            )?,
            gate: Some(l.linear(
                &format!("{p}.shared_expert_gate"),
                1,
                h,
                false,
                "1 × hidden_size",
            )?),
        }),
        None => None,
    };
    Ok(MoeBlock {
        router: l.linear(
            &format!("{p}.gate"),
            cfg.num_experts,
            h,
            false,
            "num_experts × hidden_size",
        )?,
        experts,
        shared,
        score_bias: None,
    })
}
