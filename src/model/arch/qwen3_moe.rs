//! Qwen3-MoE (<https://qwenlm.github.io/blog/qwen3/>): Qwen2-MoE's block and tensor names
//! without the shared expert or q/k/v biases, and an RMSNorm (`q_norm`, `k_norm`, of `head_dim`)
//! on every query and key head before RoPE. Dense layers where `mlp_only_layers` /
//! `decoder_sparse_step` say so; `norm_topk_prob` renormalizes the top-k weights.
//! Names follow Qwen3MoeForCausalLM; the q/k norms are read by `mixtral::attention`.

use super::qwen2_moe;
use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::weights::{TensorSource, WeightForm, Weights};

pub fn load(cfg: &ModelConfig, src: &dyn TensorSource, form: WeightForm) -> Result<Weights> {
    // No shared expert: config.rs leaves `shared_expert_ffn` unset, so none is read.
    qwen2_moe::load_named(cfg, src, form, "moe_intermediate_size")
}
