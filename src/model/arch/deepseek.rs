//! DeepSeek-V2 / V3 (<https://huggingface.co/deepseek-ai/DeepSeek-V3>): GLM-4-MoE's layer plan
//! (`first_k_dense_replace` dense layers, then routed experts beside an ungated shared expert,
//! the same tensor names) with multi-head latent attention: `q_proj` or `q_a_proj` →
//! `q_a_layernorm` → `q_b_proj`; `kv_a_proj_with_mqa` → (latent → `kv_a_layernorm` →
//! `kv_b_proj`, shared rotated key); `o_proj`. V2 routes by softmax, V3 by grouped sigmoid
//! with a correction bias (`ModelConfig::options`; the engine runs both, and the attention in
//! `engine::mla`).

use super::glm4_moe::moe;
use super::mixtral::rms_decoder;
use crate::error::{Error, Result};
use crate::model::config::{FfnKind, ModelConfig};
use crate::model::weights::{
    Attention, Ffn, LatentParts, Layer, Loader, TensorSource, WeightForm, Weights,
};

/// transformers builds q_a_layernorm and kv_a_layernorm with the RMSNorm's default epsilon, not
/// `rms_norm_eps`.
const LATENT_NORM_EPS: f32 = 1e-6;

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
                    ["gate_proj", "up_proj", "down_proj"],
                    h,
                    cfg.dense_ffn,
                    "intermediate_size",
                )?),
            };
            Ok(Layer {
                attn_norm: l.rms_norm(&format!("{p}.input_layernorm"), h, cfg.norm_eps)?,
                attn: latent_attention(&l, cfg, &format!("{p}.self_attn"))?,
                ffn_norm: l.rms_norm(&format!("{p}.post_attention_layernorm"), h, cfg.norm_eps)?,
                ffn,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    rms_decoder(&l, cfg, layers)
}

fn latent_attention(l: &Loader, cfg: &ModelConfig, p: &str) -> Result<Attention> {
    let m = cfg
        .options
        .mla
        .ok_or_else(|| Error::invalid(format!("{p}: the config has no latent attention shapes")))?;
    let (h, heads, bias) = (cfg.hidden_size, cfg.num_heads, cfg.attention_bias);
    let q_out = cfg.q_dim();
    let (q_a, q) = match m.q_lora_rank {
        Some(rank) => {
            let q_a = l.linear(
                &format!("{p}.q_a_proj"),
                rank,
                h,
                bias,
                "q_lora_rank × hidden_size",
            )?;
            let norm = l.rms_norm_of(
                &format!("{p}.q_a_layernorm"),
                rank,
                LATENT_NORM_EPS,
                "q_lora_rank",
            )?;
            let q = l.linear(
                &format!("{p}.q_b_proj"),
                q_out,
                rank,
                false,
                "num_attention_heads × (qk_nope_head_dim + qk_rope_head_dim), q_lora_rank",
            )?;
            (Some((q_a, norm)), q)
        }
        None => {
            let q = l.linear(
                &format!("{p}.q_proj"),
                q_out,
                h,
                false,
                "num_attention_heads × (qk_nope_head_dim + qk_rope_head_dim), hidden_size",
            )?;
            (None, q)
        }
    };
    Ok(Attention {
        q,
        k: l.linear(
            &format!("{p}.kv_a_proj_with_mqa"),
            m.kv_lora_rank + m.qk_rope_head_dim,
            h,
            bias,
            "kv_lora_rank + qk_rope_head_dim, hidden_size",
        )?,
        v: l.linear(
            &format!("{p}.kv_b_proj"),
            heads * (m.qk_nope_head_dim + m.v_head_dim),
            m.kv_lora_rank,
            false,
            "num_attention_heads × (qk_nope_head_dim + v_head_dim), kv_lora_rank",
        )?,
        o: l.linear(
            &format!("{p}.o_proj"),
            h,
            heads * m.v_head_dim,
            bias,
            "hidden_size, num_attention_heads × v_head_dim",
        )?,
        qk_norm: None,
        sinks: None,
        latent: Some(Box::new(LatentParts {
            q_a,
            kv_a_norm: l.rms_norm_of(
                &format!("{p}.kv_a_layernorm"),
                m.kv_lora_rank,
                LATENT_NORM_EPS,
                "kv_lora_rank",
            )?,
            absorbed: Default::default(),
        })),
    })
}
