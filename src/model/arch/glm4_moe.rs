//! GLM-4-MoE (<https://huggingface.co/zai-org/GLM-4.5-Air>): `first_k_dense_replace` leading
//! dense layers, then experts beside an ungated shared expert (`shared_experts`), routed by
//! sigmoid scores: the choice adds `e_score_correction_bias` and is limited to the best groups,
//! the weights are the plain scores (renormalized where `norm_topk_prob`) times
//! `routed_scaling_factor` (`ModelConfig::options`, the engine routes). Attention has biases
//! on q/k/v where `attention_bias`, per-head q/k RMSNorms where `use_qk_norm`, and RoPE on the
//! first `partial_rotary_factor` of each head only, halves convention. Names follow
//! Glm4MoeForCausalLM as transformers saves it (one tensor per expert matrix).

use super::mixtral::{attention, rms_decoder};
use crate::error::Result;
use crate::model::config::{FfnKind, ModelConfig};
use crate::model::weights::{
    Ffn, Layer, Loader, MoeBlock, SharedExpert, TensorSource, WeightForm, Weights,
};

const PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

pub fn load(cfg: &ModelConfig, src: &dyn TensorSource, form: WeightForm) -> Result<Weights> {
    let l = Loader { src, form };
    let h = cfg.hidden_size;
    let layers = (0..cfg.num_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let ffn = match cfg.layer_ffn[i] {
                FfnKind::Moe => Ffn::Moe(Box::new(moe(&l, cfg, i, &format!("{p}.mlp"))?)),
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

/// The experts, router and shared expert under `p` (DeepSeek's names too); the router's
/// correction bias is read where the routing is grouped sigmoid.
pub(super) fn moe(l: &Loader, cfg: &ModelConfig, layer: usize, p: &str) -> Result<MoeBlock> {
    let (h, f, n) = (cfg.hidden_size, cfg.expert_ffn, cfg.num_experts);
    let experts = (0..n)
        .map(|e| {
            let prefix = format!("{p}.experts.{e}");
            l.expert(
                (layer, e),
                &prefix,
                PROJECTIONS,
                h,
                f,
                "moe_intermediate_size",
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let shared = match cfg.shared_expert_ffn {
        Some(s) => Some(SharedExpert {
            mlp: l.gated_mlp(
                &format!("{p}.shared_experts"),
                PROJECTIONS,
                h,
                s,
                "moe_intermediate_size × n_shared_experts",
            )?,
            gate: None,
        }),
        None => None,
    };
    Ok(MoeBlock {
        router: l.linear(
            &format!("{p}.gate"),
            n,
            h,
            false,
            "n_routed_experts × hidden_size",
        )?,
        experts,
        shared,
        score_bias: match cfg.options.grouped_sigmoid {
            Some(_) => Some(l.vector(
                &format!("{p}.gate.e_score_correction_bias"),
                n,
                "n_routed_experts",
            )?),
            None => None,
        },
    })
}
