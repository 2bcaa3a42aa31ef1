//! Mixtral (<https://arxiv.org/abs/2401.04088>): RMSNorm → GQA attention with RoPE → RMSNorm →
//! a router choosing top-k of E SwiGLU experts, whose outputs are mixed by the renormalized
//! softmax weights. Tensor names follow transformers' MixtralForCausalLM.

use crate::error::Result;
use crate::model::config::{ModelConfig, QkNorm};
use crate::model::weights::{
    Attention, Ffn, Layer, Loader, MoeBlock, Norm, TensorSource, WeightForm, Weights,
};

pub fn load(cfg: &ModelConfig, src: &dyn TensorSource, form: WeightForm) -> Result<Weights> {
    let l = Loader { src, form };
    let h = cfg.hidden_size;
    let layers = (0..cfg.num_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            Ok(Layer {
                attn_norm: l.rms_norm(&format!("{p}.input_layernorm"), h, cfg.norm_eps)?,
                attn: attention(&l, cfg, &format!("{p}.self_attn"), false)?,
                ffn_norm: l.rms_norm(&format!("{p}.post_attention_layernorm"), h, cfg.norm_eps)?,
                ffn: Ffn::Moe(Box::new(moe(&l, cfg, i, &format!("{p}.block_sparse_moe"))?)),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    rms_decoder(&l, cfg, layers)
}

/// Embeddings, final RMSNorm and head around `layers`: the frame Mixtral and Qwen2-MoE share.
pub fn rms_decoder(l: &Loader, cfg: &ModelConfig, layers: Vec<Layer>) -> Result<Weights> {
    let h = cfg.hidden_size;
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
        lm_head: lm_head(l, cfg)?,
    })
}

/// q/k/v/o projections, and q_norm / k_norm where the config has them; Qwen2-MoE shares this
/// with `bias` on q/k/v.
pub fn attention(l: &Loader, cfg: &ModelConfig, p: &str, qkv_bias: bool) -> Result<Attention> {
    attention_with(l, cfg, p, [qkv_bias, false])
}

/// [`attention`] with biases on q/k/v and on o as `[qkv_bias, o_bias]` say (Granite: both).
pub fn attention_with(
    l: &Loader,
    cfg: &ModelConfig,
    p: &str,
    [qkv_bias, o_bias]: [bool; 2],
) -> Result<Attention> {
    let h = cfg.hidden_size;
    Ok(Attention {
        q: l.linear(
            &format!("{p}.q_proj"),
            cfg.q_dim(),
            h,
            qkv_bias,
            "num_attention_heads × head_dim, hidden_size",
        )?,
        k: l.linear(
            &format!("{p}.k_proj"),
            cfg.kv_dim(),
            h,
            qkv_bias,
            "num_key_value_heads × head_dim, hidden_size",
        )?,
        v: l.linear(
            &format!("{p}.v_proj"),
            cfg.kv_dim(),
            h,
            qkv_bias,
            "num_key_value_heads × head_dim, hidden_size",
        )?,
        o: l.linear(
            &format!("{p}.o_proj"),
            h,
            cfg.q_dim(),
            o_bias,
            "hidden_size, num_attention_heads × head_dim",
        )?,
        qk_norm: qk_norms(l, cfg, p)?,
        sinks: None,
        latent: None,
    })
}

/// Qwen3-MoE's norms act on each head's `head_dim` values, OLMoE's on the whole projection.
fn qk_norms(l: &Loader, cfg: &ModelConfig, p: &str) -> Result<Option<[Norm; 2]>> {
    let (q, k, why) = match cfg.qk_norm {
        None => return Ok(None),
        Some(QkNorm::PerHead) => (cfg.head_dim, cfg.head_dim, ["head_dim", "head_dim"]),
        Some(QkNorm::Whole) => (
            cfg.q_dim(),
            cfg.kv_dim(),
            [
                "num_attention_heads × head_dim",
                "num_key_value_heads × head_dim",
            ],
        ),
    };
    let eps = cfg.norm_eps;
    Ok(Some([
        l.rms_norm_of(&format!("{p}.q_norm"), q, eps, why[0])?,
        l.rms_norm_of(&format!("{p}.k_norm"), k, eps, why[1])?,
    ]))
}

/// The untied head, or `None` when tied to the embeddings.
pub fn lm_head(l: &Loader, cfg: &ModelConfig) -> Result<Option<crate::model::weights::Linear>> {
    if cfg.tie_word_embeddings {
        return Ok(None);
    }
    l.linear(
        "lm_head",
        cfg.vocab_size,
        cfg.hidden_size,
        false,
        "vocab_size × hidden_size",
    )
    .map(Some)
}

fn moe(l: &Loader, cfg: &ModelConfig, layer: usize, p: &str) -> Result<MoeBlock> {
    let (h, f) = (cfg.hidden_size, cfg.expert_ffn);
    let experts = (0..cfg.num_experts)
        .map(|e| {
            let names = ["w1", "w3", "w2"];
            l.expert(
                (layer, e),
                &format!("{p}.experts.{e}"),
                names,
                h,
                f,
                "intermediate_size",
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(MoeBlock {
        router: l.linear(
            &format!("{p}.gate"),
            cfg.num_experts,
            h,
            false,
            "num_local_experts × hidden_size",
        )?,
        experts,
        shared: None,
        score_bias: None,
    })
}
