//! DeepSeek-V2 / V3 configs (transformers' DeepseekV2Config / DeepseekV3Config): multi-head
//! latent attention, DeepSeek's routings, YaRN.

use super::{
    activation, rope_and_yarn, ArchOptions, Architecture, FfnKind, Fields, GroupedSigmoid,
    ModelConfig,
};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Multi-head latent attention's shapes (DeepSeek): q from `q_proj`, or through a rank
/// `q_lora_rank` bottleneck (`q_a_proj`, `q_a_layernorm`, `q_b_proj`); keys and values from a
/// shared `kv_lora_rank` latent (`kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`), beside one
/// `qk_rope_head_dim` key part all heads share. Each head's query and key are `qk_nope_head_dim`
/// unrotated values and `qk_rope_head_dim` rotated ones (`ModelConfig::head_dim` is their sum),
/// its value `v_head_dim` wide.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatentAttention {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// The rotated values pair up as (0, 1), (2, 3), … (V2's complex rotation, V3's
    /// `rope_interleave`), not as halves.
    pub interleaved: bool,
}

/// DeepSeek-V2's routing: softmax scores; with `n_group` above 1 (`group_limited_greedy`) only
/// the experts of the `topk_group` groups with the highest single score may be chosen; the
/// chosen experts' scores times `routed_scaling_factor` (never renormalized: transformers'
/// DeepseekV2 ignores `norm_topk_prob`) mix their outputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SoftmaxGroups {
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f32,
}

impl SoftmaxGroups {
    /// The groups must split the experts evenly and offer at least `top_k` of them.
    pub(super) fn check(
        &self,
        experts: usize,
        top_k: usize,
    ) -> std::result::Result<(), (&'static str, String)> {
        super::check_groups(
            (self.n_group, self.topk_group, self.routed_scaling_factor),
            experts,
            top_k,
            1,
        )
    }
}

impl LatentAttention {
    /// Checked against the config's `head_dim` (= nope + rope).
    pub(super) fn check(&self, head_dim: usize) -> std::result::Result<(), (&'static str, String)> {
        let positive = [
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("q_lora_rank", self.q_lora_rank.unwrap_or(1)),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err((field, "must be positive".into()));
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err((
                "qk_rope_head_dim",
                format!("{} must be even for RoPE", self.qk_rope_head_dim),
            ));
        }
        if self.qk_nope_head_dim.checked_add(self.qk_rope_head_dim) != Some(head_dim) {
            return Err((
                "qk_nope_head_dim",
                format!(
                    "{} + qk_rope_head_dim {} is not the head width {head_dim}",
                    self.qk_nope_head_dim, self.qk_rope_head_dim
                ),
            ));
        }
        // Values share the key cache's width, zero-padded (see engine::mla).
        if self.v_head_dim > head_dim {
            return Err((
                "v_head_dim",
                format!(
                    "{} is wider than qk_nope_head_dim + qk_rope_head_dim {head_dim} \
                     (values are cached at the key width)",
                    self.v_head_dim
                ),
            ));
        }
        Ok(())
    }
}

/// transformers' defaults per version (V2, V3).
struct Defaults {
    hidden: usize,
    heads: usize,
    layers: usize,
    vocab: usize,
    dense_ffn: usize,
    expert_ffn: usize,
    max_positions: usize,
    experts: usize,
    top_k: Option<usize>,
    shared: usize,
    first_dense: usize,
    scaling: f32,
    norm_topk_prob: bool,
    bos: u32,
    eos: u32,
}

const V2: Defaults = Defaults {
    hidden: 4096,
    heads: 32,
    layers: 32,
    vocab: 102400,
    dense_ffn: 11008,
    expert_ffn: 1407,
    max_positions: 2048,
    experts: 64,
    top_k: None,
    shared: 2,
    first_dense: 0,
    scaling: 1.0,
    norm_topk_prob: false,
    bos: 1,
    eos: 2,
};

const V3: Defaults = Defaults {
    hidden: 7168,
    heads: 128,
    layers: 61,
    vocab: 129280,
    dense_ffn: 18432,
    expert_ffn: 2048,
    max_positions: 4096,
    experts: 256,
    top_k: Some(8),
    shared: 1,
    first_dense: 3,
    scaling: 2.5,
    norm_topk_prob: true,
    bos: 0,
    eos: 1,
};

/// A DeepSeek-V2 (`v3` false) or V3 config.
pub(super) fn deepseek(f: &Fields, v3: bool) -> Result<ModelConfig> {
    let d = if v3 { &V3 } else { &V2 };
    let refuse = |field: &str, why: String| Error::config(f.path, field, why);
    let hidden = f.positive("hidden_size", Some(d.hidden))?;
    let heads = f.positive("num_attention_heads", Some(d.heads))?;
    // Keys and values are per head once decompressed; transformers would repeat them
    // num_attention_heads / num_key_value_heads times, which only 1 makes sense of.
    let kv = f.positive("num_key_value_heads", Some(heads))?;
    if kv != heads {
        return Err(refuse(
            "num_key_value_heads",
            format!("{kv} differs from num_attention_heads {heads} (latent attention has a key and value per head)"),
        ));
    }
    let layers = f.layers(d.layers)?;
    let max_positions = f.positive("max_position_embeddings", Some(d.max_positions))?;
    // An explicit null means a direct q_proj; absent, the default rank.
    let q_lora_rank = match f.json.get("q_lora_rank") {
        Some(Value::Null) => None,
        _ => Some(f.positive("q_lora_rank", Some(1536))?),
    };
    let nope = f.usize_or("qk_nope_head_dim", Some(128))?;
    let rope = f.positive("qk_rope_head_dim", Some(64))?;
    let mla = LatentAttention {
        q_lora_rank,
        kv_lora_rank: f.positive("kv_lora_rank", Some(512))?,
        qk_nope_head_dim: nope,
        qk_rope_head_dim: rope,
        v_head_dim: f.positive("v_head_dim", Some(128))?,
        interleaved: !v3 || f.bool_or("rope_interleave", true)?,
    };
    let head_dim = nope
        .checked_add(rope)
        .ok_or_else(|| refuse("qk_nope_head_dim", format!("{nope} + {rope} overflows")))?;
    let (theta, yarn) = rope_and_yarn(f, max_positions, 10000.0, None)?;
    let experts = f.positive("n_routed_experts", Some(d.experts))?;
    let top_k = f.positive("num_experts_per_tok", d.top_k)?;
    let scaling = f.f32_or("routed_scaling_factor", d.scaling)?;
    let norm_topk_prob = f.bool_or("norm_topk_prob", d.norm_topk_prob)?;
    let group = |field: &str, default: usize| f.positive(field, Some(default));
    let (grouped_sigmoid, softmax_groups) = if v3 {
        let g = GroupedSigmoid {
            n_group: group("n_group", 8)?,
            topk_group: group("topk_group", 4)?,
            routed_scaling_factor: scaling,
        };
        (Some(g), None)
    } else {
        if norm_topk_prob {
            return Err(refuse(
                "norm_topk_prob",
                "true is not supported for DeepSeek-V2: transformers' DeepseekV2 ignores it \
                 while DeepSeek's own code renormalizes, so the reference is ambiguous"
                    .into(),
            ));
        }
        let method = f
            .present("topk_method")
            .map_or(Some("greedy"), Value::as_str);
        let (n_group, topk_group) = match method {
            Some("greedy") => (1, 1),
            Some("group_limited_greedy") => (
                f.positive("n_group", None)?,
                f.positive("topk_group", None)?,
            ),
            other => {
                return Err(refuse(
                    "topk_method",
                    format!(
                        "{} is not supported (greedy or group_limited_greedy)",
                        other.map_or("a non-string".to_string(), |m| format!("`{m}`"))
                    ),
                ))
            }
        };
        let g = SoftmaxGroups {
            n_group,
            topk_group,
            routed_scaling_factor: scaling,
        };
        (None, Some(g))
    };
    if f.bool_or("mlp_bias", false)? {
        return Err(refuse("mlp_bias", "true is not supported".into()));
    }
    let dense = f.usize_or("first_k_dense_replace", Some(d.first_dense))?;
    let expert_ffn = f.positive("moe_intermediate_size", Some(d.expert_ffn))?;
    let shared = f.usize_or("n_shared_experts", Some(d.shared))?;
    let shared_ffn = expert_ffn.checked_mul(shared).ok_or_else(|| {
        refuse(
            "n_shared_experts",
            format!("{shared} × {expert_ffn} overflows"),
        )
    })?;
    let eos = f.token_ids("eos_token_id")?;
    Ok(ModelConfig {
        arch: if v3 {
            Architecture::DeepseekV3
        } else {
            Architecture::DeepseekV2
        },
        vocab_size: f.positive("vocab_size", Some(d.vocab))?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: heads,
        head_dim,
        max_position_embeddings: max_positions,
        norm_eps: f.f32_or("rms_norm_eps", 1e-6)?,
        rope_theta: Some(theta),
        sliding_window: None,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        activation: activation(f, "hidden_act", "silu")?,
        layer_ffn: (0..layers)
            .map(|i| {
                if i < dense {
                    FfnKind::DenseGated
                } else {
                    FfnKind::Moe
                }
            })
            .collect(),
        dense_ffn: f.positive("intermediate_size", Some(d.dense_ffn))?,
        num_experts: experts,
        top_k,
        expert_ffn,
        norm_topk_prob: v3 && norm_topk_prob,
        shared_expert_ffn: (shared_ffn > 0).then_some(shared_ffn),
        attention_bias: f.bool_or("attention_bias", false)?,
        word_embed_proj_dim: hidden,
        pre_norm: true,
        final_norm: true,
        bos_token_id: Some(f.opt_token_id("bos_token_id")?.unwrap_or(d.bos)),
        ffn_hadamard_block: None,
        head_transform: false,
        qk_norm: None,
        clip_qkv: None,
        options: ArchOptions {
            rotary_dim: Some(rope),
            grouped_sigmoid,
            softmax_groups,
            mla: Some(mla),
            yarn,
            ..ArchOptions::default()
        },
        eos_token_ids: if eos.is_empty() { vec![d.eos] } else { eos },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_json(&v, Path::new("config.json"))
    }

    /// DeepseekV2Config / DeepseekV3Config defaults: the head is nope + rope wide, one KV head
    /// per head, the versions' routings and layer plans.
    #[test]
    fn defaults_follow_transformers() {
        let v2 = parse(json!({"model_type": "deepseek_v2", "num_experts_per_tok": 6})).unwrap();
        assert_eq!(v2.arch, Architecture::DeepseekV2);
        assert_eq!((v2.head_dim, v2.num_kv_heads, v2.num_heads), (192, 32, 32));
        assert_eq!(v2.layer_ffn[0], FfnKind::Moe);
        assert_eq!(v2.shared_expert_ffn, Some(2 * 1407));
        assert_eq!(v2.options.rotary_dim, Some(64));
        let m = v2.options.mla.unwrap();
        assert_eq!(
            (m.q_lora_rank, m.kv_lora_rank, m.v_head_dim),
            (Some(1536), 512, 128)
        );
        assert!(m.interleaved && v2.options.yarn.is_none() && !v2.norm_topk_prob);
        assert_eq!(
            v2.options.softmax_groups,
            Some(SoftmaxGroups {
                n_group: 1,
                topk_group: 1,
                routed_scaling_factor: 1.0
            })
        );
        assert_eq!(v2.options.grouped_sigmoid, None);
        let v3 = parse(json!({"architectures": ["DeepseekV3ForCausalLM"]})).unwrap();
        assert_eq!((v3.num_layers, v3.num_experts, v3.top_k), (61, 256, 8));
        assert_eq!(
            &v3.layer_ffn[..4],
            &[
                FfnKind::DenseGated,
                FfnKind::DenseGated,
                FfnKind::DenseGated,
                FfnKind::Moe
            ]
        );
        let g = v3.options.grouped_sigmoid.unwrap();
        assert_eq!(
            (g.n_group, g.topk_group, g.routed_scaling_factor),
            (8, 4, 2.5)
        );
        assert!(v3.norm_topk_prob && v3.options.softmax_groups.is_none());
        assert_eq!(
            (v3.bos_token_id, v3.eos_token_ids.clone()),
            (Some(0), vec![1])
        );
    }

    /// DeepSeek-V3's Hub config: q_lora null is a direct q_proj, legacy rope_scaling of type
    /// yarn with the base at the top level, rope_interleave.
    #[test]
    fn hub_fields_are_read() {
        let c = parse(
            json!({"architectures": ["DeepseekV3ForCausalLM"], "q_lora_rank": null,
            "rope_theta": 5000.0, "rope_interleave": false, "max_position_embeddings": 163840,
            "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}}),
        )
        .unwrap();
        let m = c.options.mla.unwrap();
        assert_eq!(m.q_lora_rank, None);
        assert!(!m.interleaved);
        assert_eq!(c.rope_theta, Some(5000.0));
        let y = c.options.yarn.unwrap();
        assert_eq!((y.factor, y.original_max_position_embeddings), (40.0, 4096));
        // V2 is interleaved whatever rope_interleave says (transformers ignores it there).
        let v2 = parse(
            json!({"model_type": "deepseek_v2", "num_experts_per_tok": 6,
            "rope_interleave": false, "topk_method": "group_limited_greedy", "n_group": 8,
            "topk_group": 3}),
        )
        .unwrap();
        assert!(v2.options.mla.unwrap().interleaved);
        assert_eq!(v2.options.softmax_groups.map(|g| g.n_group), Some(8));
    }

    #[test]
    fn bad_fields_are_named() {
        let v2 = |extra: Value| {
            let mut c = json!({"model_type": "deepseek_v2", "num_experts_per_tok": 6});
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            c
        };
        for (cfg, field) in [
            (json!({"model_type": "deepseek_v2"}), "num_experts_per_tok"),
            (v2(json!({"norm_topk_prob": true})), "norm_topk_prob"),
            (v2(json!({"topk_method": "noaux_tc"})), "topk_method"),
            (
                v2(json!({"topk_method": "group_limited_greedy"})),
                "n_group",
            ),
            (
                v2(json!({"topk_method": "group_limited_greedy", "n_group": 5, "topk_group": 2})),
                "n_group",
            ),
            (
                v2(json!({"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 9})),
                "topk_group",
            ),
            (v2(json!({"num_key_value_heads": 8})), "num_key_value_heads"),
            (v2(json!({"mlp_bias": true})), "mlp_bias"),
            (v2(json!({"v_head_dim": 256})), "v_head_dim"),
            (
                v2(json!({"qk_nope_head_dim": 127, "qk_rope_head_dim": 7})),
                "qk_rope_head_dim",
            ),
            (v2(json!({"kv_lora_rank": 0})), "kv_lora_rank"),
            (
                v2(json!({"rope_scaling": {"type": "linear", "factor": 2.0}})),
                "rope_scaling",
            ),
            (
                v2(json!({"rope_parameters": {"rope_type": "yarn", "factor": 0.0}})),
                "rope_parameters",
            ),
            (
                json!({"model_type": "deepseek_v3", "n_group": 3}),
                "n_group",
            ),
            (
                json!({"model_type": "deepseek_v3", "routed_scaling_factor": 0.0}),
                "routed_scaling_factor",
            ),
        ] {
            let e = parse(cfg).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}
