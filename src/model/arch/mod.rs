//! One loader per architecture: checkpoint tensor names → [`Weights`]. Each reads like the
//! architecture's block diagram; the forward pass itself is shared (`engine`).

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

use crate::error::Result;
use crate::model::config::{Architecture, ModelConfig};
use crate::model::weights::{TensorSource, WeightForm, Weights};

pub fn load_weights(
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    form: WeightForm,
) -> Result<Weights> {
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
    }
}
