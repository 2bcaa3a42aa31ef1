//! Hugging Face tensor names → the names llama.cpp's converter gives them (gguf-py's tensor
//! map), for every architecture edgemoe reads from GGUF. Most names are shared; where an
//! architecture differs (GLM-4-MoE's and GPT-OSS's `post_attention_norm`) the `arch`
//! (`general.architecture`) decides.

/// The GGUF name llama.cpp gives Hugging Face tensor `hf` in a file of architecture `arch`,
/// if it has one; experts are [`gguf_expert`]'s.
pub fn gguf_name_in(arch: &str, hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    // Two names without a weight/bias suffix of their own.
    if let Some((layer, rest)) = layer_and_rest(hf) {
        match rest {
            "self_attn.sinks" => return Some(format!("blk.{layer}.attn_sinks.weight")),
            "mlp.gate.e_score_correction_bias" => {
                return Some(format!("blk.{layer}.exp_probs_b.bias"))
            }
            _ => {}
        }
    }
    let (layer, module, suffix) = layer_parts(hf)?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if matches!(arch, "glm4moe" | "gpt-oss") => {
            "post_attention_norm"
        }
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        // DeepSeek's latent attention.
        "self_attn.q_a_proj" => "attn_q_a",
        "self_attn.q_a_layernorm" => "attn_q_a_norm",
        "self_attn.q_b_proj" => "attn_q_b",
        "self_attn.kv_a_proj_with_mqa" => "attn_kv_a_mqa",
        "self_attn.kv_a_layernorm" => "attn_kv_a_norm",
        "self_attn.kv_b_proj" => "attn_kv_b",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        // Routers: Qwen/OLMoE/GLM/DeepSeek, Mixtral, Granite, GPT-OSS.
        "mlp.gate" | "block_sparse_moe.gate" | "block_sparse_moe.router.layer" | "mlp.router" => {
            "ffn_gate_inp"
        }
        // Shared experts: Qwen2-MoE's, GLM/DeepSeek's, Granite's (split by the converter).
        "mlp.shared_expert.gate_proj" | "mlp.shared_experts.gate_proj" | "shared_mlp.gate_proj" => {
            "ffn_gate_shexp"
        }
        "mlp.shared_expert.up_proj" | "mlp.shared_experts.up_proj" | "shared_mlp.up_proj" => {
            "ffn_up_shexp"
        }
        "mlp.shared_expert.down_proj" | "mlp.shared_experts.down_proj" | "shared_mlp.down_proj" => {
            "ffn_down_shexp"
        }
        "mlp.shared_expert_gate" => "ffn_gate_inp_shexp",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// [`gguf_name_in`] for the architectures without names of their own (Llama, Mixtral,
/// Qwen2/3-MoE, OLMoE, Granite, DeepSeek).
pub fn gguf_name(hf: &str) -> Option<String> {
    gguf_name_in("", hf)
}

/// `model.layers.N.REST` split into `N` and `REST`.
fn layer_and_rest(hf: &str) -> Option<(&str, &str)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    (!layer.is_empty() && layer.bytes().all(|b| b.is_ascii_digit())).then_some((layer, rest))
}

/// `model.layers.N.MODULE.SUFFIX` (SUFFIX `weight` or `bias`) split into its parts.
pub(super) fn layer_parts(hf: &str) -> Option<(&str, &str, &str)> {
    let (layer, rest) = layer_and_rest(hf)?;
    let (module, suffix) = rest.rsplit_once('.')?;
    (suffix == "weight" || suffix == "bias").then_some((layer, module, suffix))
}

/// An expert's projection (weight, or GPT-OSS's bias): the stacked tensor llama.cpp writes
/// (`blk.N.ffn_gate_exps.weight`, `[n_expert, ...]`), the expert's index in it, and the
/// per-expert name older Mixtral GGUFs used (`blk.N.ffn_gate.E.weight`).
pub fn gguf_expert(hf: &str) -> Option<(String, usize, String)> {
    let (layer, module, suffix) = layer_parts(hf)?;
    let rest = module
        .strip_prefix("mlp.experts.")
        .or_else(|| module.strip_prefix("block_sparse_moe.experts."))?;
    let (expert, proj) = rest.split_once('.')?;
    let expert: usize = expert.parse().ok()?;
    let g = match proj {
        "gate_proj" | "w1" => "ffn_gate",
        "up_proj" | "w3" => "ffn_up",
        "down_proj" | "w2" => "ffn_down",
        _ => return None,
    };
    Some((
        format!("blk.{layer}.{g}_exps.{suffix}"),
        expert,
        format!("blk.{layer}.{g}.{expert}.{suffix}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp() {
        let cases = [
            ("model.embed_tokens.weight", Some("token_embd.weight")),
            ("lm_head.weight", Some("output.weight")),
            ("model.norm.weight", Some("output_norm.weight")),
            (
                "model.layers.12.self_attn.o_proj.weight",
                Some("blk.12.attn_output.weight"),
            ),
            (
                "model.layers.0.mlp.up_proj.weight",
                Some("blk.0.ffn_up.weight"),
            ),
            (
                "model.layers.3.post_attention_layernorm.weight",
                Some("blk.3.ffn_norm.weight"),
            ),
            ("model.layers.0.self_attn.q_proj.qweight", None),
            ("model.layers.x.mlp.up_proj.weight", None),
            (
                "model.layers.0.block_sparse_moe.gate.weight",
                Some("blk.0.ffn_gate_inp.weight"),
            ),
            (
                "model.layers.2.mlp.gate.weight",
                Some("blk.2.ffn_gate_inp.weight"),
            ),
            (
                "model.layers.1.mlp.shared_expert_gate.weight",
                Some("blk.1.ffn_gate_inp_shexp.weight"),
            ),
            (
                "model.layers.1.mlp.shared_expert.down_proj.weight",
                Some("blk.1.ffn_down_shexp.weight"),
            ),
            (
                "model.layers.0.self_attn.k_norm.weight",
                Some("blk.0.attn_k_norm.weight"),
            ),
            ("model.layers.0.mlp.experts.3.up_proj.weight", None),
            (
                "model.layers.1.block_sparse_moe.router.layer.weight",
                Some("blk.1.ffn_gate_inp.weight"),
            ),
            (
                "model.layers.1.shared_mlp.up_proj.weight",
                Some("blk.1.ffn_up_shexp.weight"),
            ),
            (
                "model.layers.1.mlp.shared_experts.gate_proj.weight",
                Some("blk.1.ffn_gate_shexp.weight"),
            ),
            (
                "model.layers.1.mlp.gate.e_score_correction_bias",
                Some("blk.1.exp_probs_b.bias"),
            ),
            (
                "model.layers.0.self_attn.kv_a_proj_with_mqa.bias",
                Some("blk.0.attn_kv_a_mqa.bias"),
            ),
            (
                "model.layers.0.self_attn.q_a_layernorm.weight",
                Some("blk.0.attn_q_a_norm.weight"),
            ),
            (
                "model.layers.2.self_attn.sinks",
                Some("blk.2.attn_sinks.weight"),
            ),
            (
                "model.layers.2.mlp.router.bias",
                Some("blk.2.ffn_gate_inp.bias"),
            ),
        ];
        for (hf, want) in cases {
            assert_eq!(gguf_name(hf).as_deref(), want, "{hf}");
        }
        for arch in ["glm4moe", "gpt-oss"] {
            assert_eq!(
                gguf_name_in(arch, "model.layers.1.post_attention_layernorm.weight").as_deref(),
                Some("blk.1.post_attention_norm.weight")
            );
        }
        let (stacked, e, legacy) =
            gguf_expert("model.layers.4.block_sparse_moe.experts.7.w2.weight").unwrap();
        assert_eq!(
            (stacked.as_str(), e, legacy.as_str()),
            ("blk.4.ffn_down_exps.weight", 7, "blk.4.ffn_down.7.weight")
        );
        let (stacked, e, _) =
            gguf_expert("model.layers.0.mlp.experts.12.gate_proj.weight").unwrap();
        assert_eq!((stacked.as_str(), e), ("blk.0.ffn_gate_exps.weight", 12));
        let (stacked, e, _) = gguf_expert("model.layers.0.mlp.experts.1.gate_proj.bias").unwrap();
        assert_eq!((stacked.as_str(), e), ("blk.0.ffn_gate_exps.bias", 1));
        assert!(gguf_expert("model.layers.0.mlp.experts.x.gate_proj.weight").is_none());
        assert!(gguf_expert("model.layers.0.mlp.experts.gate_up_proj").is_none());
    }
}
