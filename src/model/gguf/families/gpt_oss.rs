//! GPT-OSS (`gpt-oss`) configs.

use super::object;
use crate::error::Result;
use crate::model::gguf::parse::Value;
use crate::model::gguf::GgufFile;
use serde_json::{json, Map, Value as Json};

impl GgufFile {
    /// GPT-OSS: sinks, biases and the clamped SwiGLU are in every file of the arch; the window
    /// on the even layers (or as `attention.sliding_window_pattern` says); YaRN not truncated.
    pub(super) fn gpt_oss(&self) -> Result<Map<String, Json>> {
        let k = |s: &str| self.k(s);
        let layers = self.positive(&k("block_count"), None)?;
        let ffn = self.uint(&k("feed_forward_length"), Some(0))?;
        let windowed: Vec<bool> = match self.get(&k("attention.sliding_window_pattern")) {
            None => (0..layers).map(|i| i % 2 == 0).collect(),
            Some(Value::Array(a)) if a.len() == layers => a
                .iter()
                .map(Value::as_bool)
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    self.key_error(&k("attention.sliding_window_pattern"), "expected bools")
                })?,
            Some(_) => {
                return Err(self.key_error(
                    &k("attention.sliding_window_pattern"),
                    format!("expected an array of {layers} bools"),
                ))
            }
        };
        let layer_types: Vec<&str> = windowed
            .iter()
            .map(|&w| {
                if w {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        let window = match self.uint(&k("attention.sliding_window"), Some(0))? {
            0 => Json::Null,
            w => json!(w),
        };
        let rope = match self.yarn()? {
            Some(mut y) => {
                y.insert("truncate".into(), json!(false));
                Json::Object(y)
            }
            None => json!({"rope_type": "default",
                           "rope_theta": self.float(&k("rope.freq_base"), 10000.0)?}),
        };
        let hidden = self.positive(&k("embedding_length"), None)?;
        let heads = self.positive(&k("attention.head_count"), None)?;
        Ok(object(json!({
            "architectures": ["GptOssForCausalLM"],
            "head_dim": self.head_dim()?.unwrap_or(hidden / heads.max(1)),
            "num_local_experts": self.positive(&k("expert_count"), None)?,
            "intermediate_size": self.positive(&k("expert_feed_forward_length"), Some(ffn))?,
            "sliding_window": window,
            "layer_types": layer_types,
            "rope_parameters": rope,
            "swiglu_limit": self.swiglu_limit(layers)?,
            "attention_bias": self.has_tensor("blk.0.attn_q.bias"),
        })))
    }

    /// `swiglu_clamp_exp` (one limit per layer, all equal), else llama.cpp's 7.
    fn swiglu_limit(&self, layers: usize) -> Result<f64> {
        let key = self.k("swiglu_clamp_exp");
        let limits: Vec<f64> = match self.get(&key) {
            None => return Ok(7.0),
            Some(Value::Array(a)) => a
                .iter()
                .map(Value::as_f64)
                .collect::<Option<_>>()
                .ok_or_else(|| self.key_error(&key, "expected numbers"))?,
            Some(v) => {
                return Err(
                    self.key_error(&key, format!("expected an array, got a {}", v.type_name()))
                )
            }
        };
        match limits.first() {
            Some(&l) if limits.len() == layers && limits.iter().all(|&x| x == l) && l > 0.0 => {
                Ok(l)
            }
            _ => Err(self.key_error(
                &key,
                format!("{limits:?}: expected one positive limit for all {layers} layers"),
            )),
        }
    }
}
