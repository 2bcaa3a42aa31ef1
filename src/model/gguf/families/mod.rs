//! Configs of the GGUF architectures whose transformers configs carry options of their own:
//! `granitemoe` (Granite-MoE, and GraniteMoeShared when it has a shared MLP), `glm4moe`,
//! `deepseek2` (DeepSeek-V2, or V3 when its experts are gated by sigmoid) and `gpt-oss`. The
//! `{arch}.*` keys (llama.cpp's names; errors name the key) are written out as the config.json
//! transformers would read, and that is parsed by [`ModelConfig::from_json`], so defaults and
//! checks are the safetensors path's.
//!
//! What llama.cpp's layout cannot say is taken as llama.cpp takes it: DeepSeek's YaRN `mscale`
//! equals `mscale_all_dim` (unless `rope.scaling.yarn_attn_factor` gives the cos/sin factor),
//! GPT-OSS's `swiglu_alpha` is 1.702, its `swiglu_limit` 7 (unless `swiglu_clamp_exp` says)
//! and its even layers slide (unless `attention.sliding_window_pattern` says).

mod deepseek;
mod gpt_oss;

use super::GgufFile;
use crate::error::{Error, Result};
use crate::model::config::{FfnKind, ModelConfig};
use serde_json::{json, Map, Value as Json};

/// llama.cpp's `expert_gating_func` values.
const SOFTMAX: usize = 1;
const SIGMOID: usize = 2;

impl GgufFile {
    /// The config of a `granitemoe`, `glm4moe`, `deepseek2` or `gpt-oss` file; `None` for the
    /// other architectures.
    pub(super) fn family_config(&self) -> Result<Option<ModelConfig>> {
        let mut j = match self.architecture() {
            "granitemoe" => self.granite()?,
            "glm4moe" => self.glm4_moe()?,
            "deepseek2" => self.deepseek()?,
            "gpt-oss" => self.gpt_oss()?,
            _ => return Ok(None),
        };
        self.common(&mut j)?;
        let mut cfg =
            ModelConfig::from_json(&Json::Object(j), &self.path).map_err(|e| self.keyed(e))?;
        if self.architecture() == "glm4moe" {
            // The rotated width as stored (from_json derives it from a factor, which can round).
            let (rot, hd) = (self.rope_dims()?, cfg.head_dim);
            cfg.options.rotary_dim = (rot != hd).then_some(rot);
            cfg.validate(&self.path)?;
        }
        self.check_expert_count(&cfg)?;
        Ok(Some(cfg))
    }

    /// `expert_count` against the first stacked expert tensor, so a count that disagrees
    /// with the file fails naming the key, before any expert is sliced.
    fn check_expert_count(&self, cfg: &ModelConfig) -> Result<()> {
        let Some(layer) = cfg.layer_ffn.iter().position(|f| *f == FfnKind::Moe) else {
            return Ok(());
        };
        let name = format!("blk.{layer}.ffn_up_exps.weight");
        let Some(shape) = self.info(&name).map(|i| i.shape()) else {
            return Ok(());
        };
        match shape.first() {
            Some(&n) if n == cfg.num_experts => Ok(()),
            _ => Err(self.key_error(
                &self.k("expert_count"),
                format!(
                    "{}, but `{name}` {shape:?} holds {} experts",
                    cfg.num_experts,
                    shape.first().copied().unwrap_or(0)
                ),
            )),
        }
    }

    /// A config error named by the GGUF key its field came from.
    fn keyed(&self, e: Error) -> Error {
        let Error::Config { field, reason, .. } = e else {
            return e;
        };
        let key = match field.as_str() {
            "hidden_size" => "embedding_length",
            "num_hidden_layers" => "block_count",
            "num_attention_heads" => "attention.head_count",
            "num_key_value_heads" => "attention.head_count_kv",
            "head_dim" => "attention.key_length",
            "max_position_embeddings" => "context_length",
            "rms_norm_eps" => "attention.layer_norm_rms_epsilon",
            "vocab_size" => "vocab_size",
            "intermediate_size" => "feed_forward_length",
            "moe_intermediate_size" => "expert_feed_forward_length",
            "num_local_experts" | "n_routed_experts" => "expert_count",
            "num_experts_per_tok" => "expert_used_count",
            "n_shared_experts" => "expert_shared_count",
            "first_k_dense_replace" => "leading_dense_block_count",
            "routed_scaling_factor" => "expert_weights_scale",
            "norm_topk_prob" => "expert_weights_norm",
            "n_group" => "expert_group_count",
            "topk_group" => "expert_group_used_count",
            "q_lora_rank" => "attention.q_lora_rank",
            "kv_lora_rank" => "attention.kv_lora_rank",
            "qk_rope_head_dim" | "partial_rotary_factor" => "rope.dimension_count",
            "qk_nope_head_dim" => "attention.key_length_mla",
            "v_head_dim" => "attention.value_length_mla",
            "rope_parameters" | "rope_scaling" => "rope.scaling.*",
            "sliding_window" => "attention.sliding_window",
            "layer_types" => "attention.sliding_window_pattern",
            "swiglu_limit" => "swiglu_clamp_exp",
            "shared_intermediate_size" => "expert_shared_feed_forward_length",
            _ => return Error::config(&self.path, &field, reason),
        };
        Error::config(
            &self.path,
            &self.k(key),
            format!("{reason} (as config.json's `{field}`)"),
        )
    }

    fn k(&self, key: &str) -> String {
        format!("{}.{key}", self.architecture())
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.info(name).is_some()
    }

    /// The keys every family shares.
    fn common(&self, j: &mut Map<String, Json>) -> Result<()> {
        let k = |s: &str| self.k(s);
        let heads = self.positive(&k("attention.head_count"), None)?;
        j.entry("num_attention_heads").or_insert(json!(heads));
        j.entry("num_key_value_heads").or_insert(json!(
            self.positive(&k("attention.head_count_kv"), Some(heads))?
        ));
        j.insert(
            "hidden_size".into(),
            json!(self.positive(&k("embedding_length"), None)?),
        );
        j.entry("num_hidden_layers")
            .or_insert(json!(self.positive(&k("block_count"), None)?));
        j.insert(
            "max_position_embeddings".into(),
            json!(self.positive(&k("context_length"), Some(2048))?),
        );
        j.insert(
            "rms_norm_eps".into(),
            json!(self.float(&k("attention.layer_norm_rms_epsilon"), 1e-5)?),
        );
        j.entry("rope_theta")
            .or_insert(json!(self.float(&k("rope.freq_base"), 10000.0)?));
        j.insert("vocab_size".into(), json!(self.vocab_size()?));
        j.insert(
            "tie_word_embeddings".into(),
            json!(!self.has_tensor("output.weight")),
        );
        j.insert(
            "bos_token_id".into(),
            json!(self.token_id("tokenizer.ggml.bos_token_id")?),
        );
        j.insert("eos_token_id".into(), json!(self.eos_ids()?));
        j.insert(
            "num_experts_per_tok".into(),
            json!(self.positive(&k("expert_used_count"), None)?),
        );
        let ffn = self.uint(&k("feed_forward_length"), Some(0))?;
        if ffn > 0 {
            j.entry("intermediate_size").or_insert(json!(ffn));
        }
        Ok(())
    }

    /// `rope.dimension_count`, which must be even and at most the head.
    fn rope_dims(&self) -> Result<usize> {
        self.positive(&self.k("rope.dimension_count"), None)
    }

    /// Refuses RoPE scaling where the family has none.
    fn no_rope_scaling(&self) -> Result<()> {
        let key = self.k("rope.scaling.type");
        match self.get(&key) {
            None => Ok(()),
            Some(v) if v.as_str() == Some("none") => Ok(()),
            Some(v) => Err(self.key_error(&key, format!("{v:?}: RoPE scaling is not supported"))),
        }
    }

    /// `{arch}.expert_gating_func`: softmax or sigmoid, `default` where absent (as llama.cpp).
    fn gating(&self, default: usize) -> Result<usize> {
        let key = self.k("expert_gating_func");
        match self.uint(&key, Some(default))? {
            g @ (SOFTMAX | SIGMOID) => Ok(g),
            g => Err(self.key_error(&key, format!("{g} is not softmax (1) or sigmoid (2)"))),
        }
    }

    /// The head width: `attention.key_length`, else hidden / heads; values as wide.
    fn head_dim(&self) -> Result<Option<usize>> {
        let key = self.k("attention.key_length");
        let Some(_) = self.get(&key) else {
            return Ok(None);
        };
        let hd = self.positive(&key, None)?;
        let vkey = self.k("attention.value_length");
        if self.positive(&vkey, Some(hd))? != hd {
            return Err(self.key_error(&vkey, format!("must equal key_length {hd}")));
        }
        Ok(Some(hd))
    }

    /// GraniteMoe(Shared): Mixtral's keys plus the four scalars; a shared MLP makes it
    /// GraniteMoeShared. q/k rows come permuted (see `rope_permuted_heads`).
    fn granite(&self) -> Result<Map<String, Json>> {
        let k = |s: &str| self.k(s);
        self.no_rope_scaling()?;
        let hidden = self.positive(&k("embedding_length"), None)?;
        let heads = self.positive(&k("attention.head_count"), None)?;
        let rot = self.rope_dims()?;
        if rot.checked_mul(heads) != Some(hidden) {
            return Err(self.key_error(
                &k("rope.dimension_count"),
                format!("{rot}: Granite rotates whole heads of hidden / heads"),
            ));
        }
        let ffn = self.uint(&k("feed_forward_length"), Some(0))?;
        let shared = self.uint(&k("expert_shared_feed_forward_length"), Some(0))?;
        let (arch, model_type) = if shared > 0 {
            ("GraniteMoeSharedForCausalLM", "granitemoeshared")
        } else {
            ("GraniteMoeForCausalLM", "granitemoe")
        };
        let mut j = json!({
            "architectures": [arch],
            "model_type": model_type,
            "num_local_experts": self.positive(&k("expert_count"), None)?,
            "intermediate_size": self.positive(&k("expert_feed_forward_length"), Some(ffn))?,
            "attention_bias": self.has_tensor("blk.0.attn_q.bias"),
            "attention_multiplier": self.float(&k("attention.scale"), 1.0)?,
            "embedding_multiplier": self.float(&k("embedding_scale"), 1.0)?,
            "residual_multiplier": self.float(&k("residual_scale"), 1.0)?,
            "logits_scaling": self.float(&k("logit_scale"), 1.0)?,
        });
        if shared > 0 {
            j["shared_intermediate_size"] = json!(shared);
        }
        Ok(object(j))
    }

    /// GLM-4-MoE: `block_count` counts the NextN layers llama.cpp keeps and never runs;
    /// partial rotary from `rope.dimension_count`; sigmoid routing in groups.
    fn glm4_moe(&self) -> Result<Map<String, Json>> {
        let k = |s: &str| self.k(s);
        self.no_rope_scaling()?;
        if self.gating(SIGMOID)? != SIGMOID {
            return Err(self.key_error(&k("expert_gating_func"), "GLM-4-MoE routes by sigmoid (2)"));
        }
        let blocks = self.positive(&k("block_count"), None)?;
        let nextn = self.uint(&k("nextn_predict_layers"), Some(0))?;
        if nextn >= blocks {
            return Err(self.key_error(
                &k("nextn_predict_layers"),
                format!("{nextn} leaves none of the {blocks} blocks"),
            ));
        }
        let hidden = self.positive(&k("embedding_length"), None)?;
        let heads = self.positive(&k("attention.head_count"), None)?;
        let head_dim = self.head_dim()?.unwrap_or(hidden / heads.max(1));
        let rot = self.rope_dims()?;
        if rot > head_dim || rot % 2 != 0 {
            return Err(self.key_error(
                &k("rope.dimension_count"),
                format!("{rot} is not an even width of at most head_dim {head_dim}"),
            ));
        }
        let mut j = object(json!({
            "architectures": ["Glm4MoeForCausalLM"],
            "num_hidden_layers": blocks - nextn,
            "head_dim": head_dim,
            "partial_rotary_factor": rot as f64 / head_dim as f64,
            "use_qk_norm": self.has_tensor("blk.0.attn_q_norm.weight"),
            "attention_bias": self.has_tensor("blk.0.attn_q.bias"),
        }));
        j.extend(self.grouped_experts()?);
        Ok(j)
    }

    /// The routed and shared experts of GLM-4-MoE and DeepSeek, under their config.json names.
    fn grouped_experts(&self) -> Result<Map<String, Json>> {
        let k = |s: &str| self.k(s);
        Ok(object(json!({
            "n_routed_experts": self.positive(&k("expert_count"), None)?,
            "moe_intermediate_size": self.positive(&k("expert_feed_forward_length"), None)?,
            "n_shared_experts": self.uint(&k("expert_shared_count"), Some(0))?,
            "first_k_dense_replace": self.uint(&k("leading_dense_block_count"), Some(0))?,
            "routed_scaling_factor": self.float(&k("expert_weights_scale"), 1.0)?,
            "norm_topk_prob": self.flag(&k("expert_weights_norm"), false)?,
            "n_group": self.positive(&k("expert_group_count"), Some(1))?,
            "topk_group": self.positive(&k("expert_group_used_count"), Some(1))?,
        })))
    }
}

/// A `json!({...})` object's map.
fn object(v: Json) -> Map<String, Json> {
    match v {
        Json::Object(m) => m,
        _ => Map::new(),
    }
}
