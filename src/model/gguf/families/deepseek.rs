//! DeepSeek-V2 / V3 (`deepseek2`) configs, and the YaRN block GPT-OSS shares.

use super::{object, SIGMOID, SOFTMAX};
use crate::error::Result;
use crate::model::gguf::GgufFile;
use serde_json::{json, Map, Value as Json};

impl GgufFile {
    /// DeepSeek-V2 / V3 (`deepseek2`): V3 when the experts are gated by sigmoid. The latent
    /// widths from `key_length_mla` / `value_length_mla` (newer converters, which store one
    /// MQA head of `kv_lora_rank + rope`), else from `key_length` / `value_length` (older ones).
    pub(super) fn deepseek(&self) -> Result<Map<String, Json>> {
        let k = |s: &str| self.k(s);
        let v3 = self.gating(SOFTMAX)? == SIGMOID;
        let heads = self.positive(&k("attention.head_count"), None)?;
        let kv_lora_rank = self.positive(&k("attention.kv_lora_rank"), None)?;
        let rope = self.rope_dims()?;
        let (key, value) = if self.get(&k("attention.key_length_mla")).is_some() {
            ("attention.key_length_mla", "attention.value_length_mla")
        } else if self.has_tensor("blk.0.attn_k_b.weight") {
            return Err(self.key_error(
                &k("attention.key_length_mla"),
                "missing, though the file splits kv_b_proj (attn_k_b / attn_v_b)",
            ));
        } else {
            ("attention.key_length", "attention.value_length")
        };
        let qk = self.positive(&k(key), None)?;
        let nope = qk.checked_sub(rope).ok_or_else(|| {
            self.key_error(
                &k(key),
                format!("{qk} is narrower than rope.dimension_count {rope}"),
            )
        })?;
        let q_lora_rank = match self.get(&k("attention.q_lora_rank")) {
            None => Json::Null,
            Some(_) => json!(self.positive(&k("attention.q_lora_rank"), None)?),
        };
        let n_group = self.positive(&k("expert_group_count"), Some(1))?;
        let mut j = object(json!({
            "architectures": [if v3 { "DeepseekV3ForCausalLM" } else { "DeepseekV2ForCausalLM" }],
            // One key and value per head once decompressed (the file's MQA head is the latent).
            "num_key_value_heads": heads,
            "q_lora_rank": q_lora_rank,
            "kv_lora_rank": kv_lora_rank,
            "qk_rope_head_dim": rope,
            "qk_nope_head_dim": nope,
            "v_head_dim": self.positive(&k(value), None)?,
            // llama.cpp limits the groups whenever there are several.
            "topk_method": if v3 { "noaux_tc" } else if n_group > 1 { "group_limited_greedy" } else { "greedy" },
            "rope_interleave": true,
            "attention_bias": self.has_tensor("blk.0.attn_kv_a_mqa.bias"),
        }));
        j.extend(self.grouped_experts()?);
        if let Some(mut y) = self.yarn()? {
            // llama.cpp stores 0.1 · mscale_all_dim and takes mscale as equal to it.
            let key = k("rope.scaling.yarn_log_multiplier");
            if self.get(&key).is_some() {
                let m = decimal(self.float(&key, 0.0)?) * 10.0;
                y.insert("mscale_all_dim".into(), json!(m));
                y.insert("mscale".into(), json!(m));
            }
            j.insert("rope_parameters".into(), Json::Object(y));
        }
        Ok(j)
    }

    /// The YaRN block of `rope.scaling.*`, without the base; `None` without scaling.
    pub(super) fn yarn(&self) -> Result<Option<Map<String, Json>>> {
        let k = |s: &str| self.k(s);
        let key = k("rope.scaling.type");
        match self.get(&key) {
            None => return Ok(None),
            Some(v) if v.as_str() == Some("none") => return Ok(None),
            Some(v) if v.as_str() == Some("yarn") => {}
            Some(v) => {
                return Err(self.key_error(&key, format!("{v:?} is not supported (none or yarn)")))
            }
        }
        let mut y = object(json!({
            "rope_type": "yarn",
            "rope_theta": self.float(&k("rope.freq_base"), 10000.0)?,
            "factor": self.float(&k("rope.scaling.factor"), 0.0).and_then(|f| {
                if f > 0.0 {
                    Ok(f)
                } else {
                    Err(self.key_error(&k("rope.scaling.factor"), "missing or not positive"))
                }
            })?,
            "original_max_position_embeddings":
                self.positive(&k("rope.scaling.original_context_length"), None)?,
            "beta_fast": self.float(&k("rope.scaling.yarn_beta_fast"), 32.0)?,
            "beta_slow": self.float(&k("rope.scaling.yarn_beta_slow"), 1.0)?,
        }));
        let attn = k("rope.scaling.yarn_attn_factor");
        if self.get(&attn).is_some() {
            y.insert("attention_factor".into(), json!(self.float(&attn, 1.0)?));
        }
        Ok(Some(y))
    }
}

/// An f32 key as the shortest decimal that rounds to it: the value the converter wrote
/// (0.1 · 0.707 is stored as 0.0707f32, whose f32 product by 10 misses 0.707f32).
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}
