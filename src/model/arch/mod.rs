//! One loader per architecture: checkpoint tensor names → [`Weights`]. Each reads like the
//! architecture's block diagram; the forward pass itself is shared (`engine`).

pub(crate) mod deepseek;
pub(crate) mod glm4_moe;
pub(crate) mod gpt_oss;
mod gpt_oss_mxfp4;
pub(crate) mod granite_moe;
pub(crate) mod llama;
pub(crate) mod mixtral;
pub(crate) mod olmoe;
pub(crate) mod opt;
pub(crate) mod qwen2_moe;
pub(crate) mod qwen3_moe;

use crate::error::{Error, Result};
use crate::model::config::{Architecture, ModelConfig};
use crate::model::weights::{Linear, Loader, Norm, TensorSource, WeightForm, Weights};

pub fn load_weights(
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    form: WeightForm,
) -> Result<Weights> {
    let mut w = arch_weights(cfg, src, form)?;
    if cfg.head_transform {
        w.head_transform = Some(head_transform(cfg, &w, &Loader { src, form })?);
    }
    Ok(w)
}

/// The `hidden × hidden` linear the head reads the final norm through, stored beside that norm
/// as `P.transform` (any architecture with a final norm).
fn head_transform(cfg: &ModelConfig, w: &Weights, l: &Loader) -> Result<Linear> {
    let norm = match &w.final_norm {
        Some(Norm::Rms { name, .. } | Norm::Layer { name, .. }) => name,
        None => return Err(Error::invalid("head_transform needs a final norm")),
    };
    let h = cfg.hidden_size;
    l.linear(
        &format!("{norm}.transform"),
        h,
        h,
        false,
        "hidden_size × hidden_size",
    )
}

fn arch_weights(cfg: &ModelConfig, src: &dyn TensorSource, form: WeightForm) -> Result<Weights> {
    match cfg.arch {
        Architecture::Mixtral => mixtral::load(cfg, src, form),
        Architecture::Qwen2Moe => qwen2_moe::load(cfg, src, form),
        Architecture::Opt => opt::load(cfg, src, form),
        Architecture::Llama => llama::load(cfg, src, form),
        Architecture::Qwen3Moe => qwen3_moe::load(cfg, src, form),
        Architecture::Olmoe => olmoe::load(cfg, src, form),
        Architecture::GraniteMoe | Architecture::GraniteMoeShared => {
            granite_moe::load(cfg, src, form)
        }
        Architecture::Glm4Moe => glm4_moe::load(cfg, src, form),
        Architecture::GptOss => gpt_oss::load(cfg, src, form),
        Architecture::DeepseekV2 | Architecture::DeepseekV3 => deepseek::load(cfg, src, form),
    }
}
