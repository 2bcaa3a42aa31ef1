//! OLMoE (<https://arxiv.org/abs/2409.02060>): experts in every layer, each of
//! `intermediate_size`; an RMSNorm over the whole q and k projections (`q_norm` of
//! `num_attention_heads × head_dim`, `k_norm` of `num_key_value_heads × head_dim`), then q, k
//! and v clamped to `±clip_qkv` when the config sets it (the engine applies both). Tensor
//! names follow OlmoeForCausalLM, which are Qwen2-MoE's without a shared expert.

use super::qwen2_moe;
use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::weights::{TensorSource, WeightForm, Weights};

pub fn load(cfg: &ModelConfig, src: &dyn TensorSource, form: WeightForm) -> Result<Weights> {
    qwen2_moe::load_named(cfg, src, form, "intermediate_size")
}
