//! Llama (<https://arxiv.org/abs/2302.13971>), dense: RMSNorm → GQA attention with RoPE →
//! RMSNorm → a SwiGLU MLP `down(silu(gate·x) ⊙ up·x)` in every layer; no biases. Tensor names
//! follow transformers' LlamaForCausalLM (a GGUF file's names are mapped to them on reading).

use super::mixtral::{attention, rms_decoder};
use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::weights::{Ffn, Layer, Loader, TensorSource, WeightForm, Weights};

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
                ffn: Ffn::Gated(l.gated_mlp(
                    &format!("{p}.mlp"),
                    ["gate_proj", "up_proj", "down_proj"],
                    h,
                    cfg.dense_ffn,
                    "intermediate_size",
                )?),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    rms_decoder(&l, cfg, layers)
}
